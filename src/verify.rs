//! Consumer-side verification: `imgsrv verify` and `imgsrv pull`.
//!
//! Signing at publish time protects the server; this protects the people
//! who install images. Before anything is kept, the installing side checks,
//! against public keys it trusts itself (never the server's list), in order:
//!
//! 1. the manifest signature (`…/manifest` + `…/manifest.minisig`);
//! 2. the signer key: not revoked in the consumer's store, not reported
//!    revoked by the server's `GET /v1/keys` (revocation can only make
//!    verification fail, so honouring the server's word is safe, and a
//!    server saying "active" never overrides a local "revoked"), and its
//!    local scopes cover the image;
//! 3. that the manifest names the image and version asked for (and that the
//!    server's publication record names this manifest);
//! 4. sha256 and size of the metadata tarball (`incus.tar.xz`) and of the
//!    root (squashfs or qcow2), hashed while streaming;
//! 5. the Incus fingerprint, sha256(metadata || root), against the one the
//!    server advertises for that artifact.
//!
//! Only then does `pull` move the files into place. `verify` keeps nothing:
//! it streams the bytes through the hashers without touching the disk.
//!
//! The mode (`off | warn | enforce`, default enforce) comes only from the
//! consumer's own config file; an unreadable setting means enforce. `off`
//! skips steps 1 and 2 (the signature) and nothing else: the digest and
//! fingerprint checks cost nothing extra while downloading, and bytes that
//! do not match the manifest are corruption or tampering whatever one thinks
//! of signatures, so they stay fatal. `warn` reports every problem as a
//! warning and keeps going (files are kept).

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{ApiClient, KeyInfo, VersionView};
use crate::config::VerificationMode;
use crate::digest::{Digest, Hasher};
use crate::fingerprint::INCUS_METADATA;
use crate::manifest::{Manifest, ManifestArtifact, ManifestAttachment};
use crate::sign::{KeyState, SignError, TrustedKey, Verified};

/// Environment variable naming the consumer's config file.
pub const CLIENT_CONFIG_ENV: &str = "IMGSRV_CLIENT_CONFIG";
/// File names `pull` writes into its output directory.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIGNATURE_FILE: &str = "manifest.json.minisig";
pub const ROOTFS_FILE: &str = "rootfs.squashfs";
pub const DISK_FILE: &str = "disk.qcow2";

// ------------------------------------------------------------ what to fetch

/// Which version of an image: `IMAGE`, `IMAGE:ALIAS` or `IMAGE@VERSION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Newest,
    Alias(String),
    Version(String),
}

/// A parsed `IMAGE[:ALIAS|@VERSION]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub image: String,
    pub selector: Selector,
}

impl std::str::FromStr for Target {
    type Err = String;

    /// Image names contain neither `:` nor `@`; the first of them decides.
    /// Versions may contain `:` (`IMAGE@1.0+b1:2`), aliases may not.
    fn from_str(s: &str) -> Result<Target, String> {
        let (image, selector) = match s.find([':', '@']) {
            None => (s, Selector::Newest),
            Some(i) if s.as_bytes()[i] == b'@' => (&s[..i], Selector::Version(s[i + 1..].into())),
            Some(i) => (&s[..i], Selector::Alias(s[i + 1..].into())),
        };
        if !crate::names::image_name(image) {
            return Err(format!(
                "invalid image name {image:?} in {s:?}: expected IMAGE, IMAGE:ALIAS or IMAGE@VERSION"
            ));
        }
        match &selector {
            Selector::Alias(a) if !crate::names::alias(a) => {
                return Err(format!("invalid alias {a:?} in {s:?}"))
            }
            Selector::Version(v) if !crate::names::version(v) => {
                return Err(format!("invalid version {v:?} in {s:?}"))
            }
            _ => {}
        }
        Ok(Target {
            image: image.to_string(),
            selector,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Selector::Newest => write!(f, "{}", self.image),
            Selector::Alias(a) => write!(f, "{}:{a}", self.image),
            Selector::Version(v) => write!(f, "{}@{v}", self.image),
        }
    }
}

/// Architecture names as Incus and the kernel spell them: `amd64` and
/// `x86_64` are the same, so are `arm64` and `aarch64`.
pub fn normalize_arch(arch: &str) -> String {
    let a = arch.to_ascii_lowercase();
    match a.as_str() {
        "amd64" | "x86_64" | "x86-64" | "x64" => "x86_64".into(),
        "arm64" | "aarch64" => "aarch64".into(),
        _ => a,
    }
}

/// This machine's architecture, normalized.
pub fn host_arch() -> String {
    normalize_arch(std::env::consts::ARCH)
}

// ------------------------------------------------------------ consumer config

/// The verification mode and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeSetting {
    pub mode: VerificationMode,
    /// The config file read, if any.
    pub source: Option<PathBuf>,
    /// Problems reading the setting, to print loudly.
    pub warnings: Vec<String>,
}

/// The consumer config file: `explicit` (`--config`), else
/// `$IMGSRV_CLIENT_CONFIG`, else `$XDG_CONFIG_HOME/imgsrv/client.toml`, else
/// `~/.config/imgsrv/client.toml`. The flag says whether the user named it.
pub fn config_path(explicit: Option<&Path>) -> Option<(PathBuf, bool)> {
    config_path_from(
        explicit,
        std::env::var_os(CLIENT_CONFIG_ENV),
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
}

fn config_path_from(
    explicit: Option<&Path>,
    env: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<(PathBuf, bool)> {
    if let Some(p) = explicit {
        return Some((p.to_path_buf(), true));
    }
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(p), true));
    }
    // XDG base directories: a relative XDG_CONFIG_HOME is invalid and ignored.
    if let Some(x) = xdg.map(PathBuf::from).filter(|p| p.is_absolute()) {
        return Some((x.join("imgsrv").join("client.toml"), false));
    }
    home.filter(|h| !h.is_empty())
        .map(|h| (PathBuf::from(h).join(".config/imgsrv/client.toml"), false))
}

/// Reads `[transparency_log]` from the consumer config ([`crate::tlog::consumer`]):
/// `None` when the file is absent, unreadable, not TOML, or lists no log key. A
/// `[transparency_log]` that cannot be understood is an error, never a silent skip.
pub fn load_log_policy(
    path: Option<(PathBuf, bool)>,
) -> anyhow::Result<Option<crate::tlog::consumer::LogPolicy>> {
    let Some((path, _)) = path else {
        return Ok(None);
    };
    // a file that cannot be read, or is not TOML at all, was warned about by
    // [`load_mode`] (and means enforce); its log keys cannot be read, so no log is
    // checked, which the report says. A [transparency_log] that is there but wrong is
    // an error.
    let Some(doc) = fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
    else {
        return Ok(None);
    };
    crate::tlog::consumer::policy_from(&doc)
        .map_err(|e| anyhow!("client config {}: {e:#}", path.display()))
}

/// Reads `[image_verification] mode` from the consumer config. Never
/// fails: a missing default file means enforce; a missing named file, an
/// unreadable file, a file that is not TOML or an unreadable value mean
/// enforce with a warning.
pub fn load_mode(path: Option<(PathBuf, bool)>) -> ModeSetting {
    let enforce = |source: Option<PathBuf>, warnings: Vec<String>| ModeSetting {
        mode: VerificationMode::Enforce,
        source,
        warnings,
    };
    let Some((path, explicit)) = path else {
        return enforce(None, Vec::new());
    };
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => {
            return enforce(None, Vec::new())
        }
        Err(e) => {
            let w = format!(
                "client config {}: {e}; verification mode is ENFORCE",
                path.display()
            );
            return enforce(Some(path), vec![w]);
        }
    };
    let doc: toml::Table = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            let w = format!(
                "client config {} is not valid TOML ({}); verification mode is ENFORCE",
                path.display(),
                e.message()
            );
            return enforce(Some(path), vec![w]);
        }
    };
    let (mode, warning) = crate::config::verification_mode(&doc);
    ModeSetting {
        mode,
        warnings: warning
            .map(|w| format!("client config {}: {w}", path.display()))
            .into_iter()
            .collect(),
        source: Some(path),
    }
}

// ------------------------------------------------------------ errors

/// One failed check, naming what was checked and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What was checked: `manifest signature`, `manifest`,
    /// `rootfs.squashfs (sha256:…)`, `fingerprint`…
    pub subject: String,
    pub reason: String,
}

impl Problem {
    pub fn new(subject: impl Into<String>, reason: impl Into<String>) -> Problem {
        Problem {
            subject: subject.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.reason)
    }
}

/// Why `verify`/`pull` stopped. [`VerifyError::exit_code`]: 1 when a check
/// failed, 2 when it could not run.
#[derive(Debug)]
pub enum VerifyError {
    /// A check failed (exit 1). `out`: the `pull` directory, left without
    /// any new file.
    Failed {
        problem: Problem,
        out: Option<PathBuf>,
        /// The version checked (`image@version`), once it was resolved.
        of: Option<String>,
    },
    /// It could not run: bad arguments, unreadable keys, server unreachable,
    /// not found (exit 2).
    CannotRun(anyhow::Error),
}

impl VerifyError {
    pub fn exit_code(&self) -> i32 {
        match self {
            VerifyError::Failed { .. } => 1,
            VerifyError::CannotRun(_) => 2,
        }
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::Failed { problem, out, of } => {
                match of {
                    Some(v) => write!(f, "verification of {v} failed: {problem}")?,
                    None => write!(f, "verification failed: {problem}")?,
                }
                if let Some(d) = out {
                    write!(f, " (nothing was written to {})", d.display())?;
                }
                Ok(())
            }
            VerifyError::CannotRun(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for VerifyError {}

fn cannot_run(e: impl Into<anyhow::Error>, context: impl fmt::Display) -> VerifyError {
    VerifyError::CannotRun(e.into().context(context.to_string()))
}

// ------------------------------------------------------------ options and report

/// What to verify (and, with `out`, pull).
#[derive(Debug, Clone)]
pub struct Options {
    pub server: String,
    pub ca: Option<PathBuf>,
    pub token: Option<String>,
    /// A `.pub` file or a directory of `<name>.pub` (+ `<name>.toml`).
    /// Required unless the mode is `off`.
    pub trusted_keys: Option<PathBuf>,
    pub mode: VerificationMode,
    pub target: Target,
    /// Normalized (see [`normalize_arch`]).
    pub arch: String,
    /// The qcow2 (virtual-machine) artifact, else the squashfs one.
    pub vm: bool,
    /// Only artifacts of this variant (default: `default` when there is one).
    pub variant: Option<String>,
    /// `pull`: the directory to write into. `None`: `verify`, nothing written.
    pub out: Option<PathBuf>,
    /// Progress bars on stderr.
    pub progress: bool,
    /// The logs the consumer trusts ([`load_log_policy`]); `None`: not checked.
    pub log: Option<crate::tlog::consumer::LogPolicy>,
}

/// A downloaded file that matched the manifest (or, in warn mode, did not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    pub name: String,
    pub digest: Digest,
    pub size: u64,
}

/// What was checked, for printing.
#[derive(Debug, Clone)]
pub struct Report {
    pub image: String,
    pub version: String,
    pub alias: Option<String>,
    pub mode: VerificationMode,
    pub manifest_digest: Digest,
    /// The signature, when checked and valid.
    pub signer: Option<Verified>,
    pub kind: &'static str,
    pub architecture: String,
    pub variant: String,
    pub files: Vec<FileCheck>,
    /// The Incus fingerprint of the downloaded pair.
    pub fingerprint: String,
    /// Problems found in warn mode (empty otherwise).
    pub problems: Vec<Problem>,
    /// `pull`: the files written, metadata tarball and root first.
    pub pulled: Vec<PathBuf>,
    /// Where the transparency log holds the publication, when the consumer trusts a log.
    pub logged: Option<crate::tlog::consumer::Logged>,
    /// Whether a log was to be checked at all.
    pub log_checked: bool,
}

impl Report {
    pub fn verified(&self) -> bool {
        self.problems.is_empty() && self.signer.is_some()
    }
}

/// Prints what was verified.
pub fn print_report(r: &Report, out: &mut dyn Write) -> io::Result<()> {
    let what = format!(
        "{} {} ({}, {}, variant {})",
        r.image, r.version, r.kind, r.architecture, r.variant
    );
    if !r.problems.is_empty() {
        writeln!(
            out,
            "NOT verified: {what}: {} problem(s), kept because the verification mode is {}",
            r.problems.len(),
            r.mode
        )?;
    } else if r.signer.is_none() {
        writeln!(
            out,
            "checked {what}: digests and fingerprint only, the signature was NOT checked (verification mode {})",
            r.mode
        )?;
    } else {
        writeln!(out, "verified {what}")?;
    }
    if let Some(a) = &r.alias {
        writeln!(
            out,
            "  alias           {a} -> {} (aliases are not signed: the server chose this version)",
            r.version
        )?;
    }
    writeln!(out, "  manifest        {}", r.manifest_digest)?;
    if let Some(s) = &r.signer {
        writeln!(out, "  signed by       {} ({})", s.key_name, s.key_id)?;
        writeln!(out, "  comment         {}", s.trusted_comment)?;
    }
    match &r.logged {
        Some(l) => writeln!(
            out,
            "  logged          entry {} of {} (tree of {}{})",
            l.index,
            l.origin,
            l.size,
            match l.since {
                Some(s) => format!(", consistent with the {s} you saw before"),
                None => ", the first you saw of it".into(),
            }
        )?,
        None if !r.log_checked => writeln!(
            out,
            "  logged          not checked (no [transparency_log] keys in your client config)"
        )?,
        None => {}
    }
    for f in &r.files {
        writeln!(out, "  {:<15} {} ({} bytes)", f.name, f.digest, f.size)?;
    }
    writeln!(out, "  fingerprint     {}", r.fingerprint)?;
    for p in &r.problems {
        writeln!(out, "  problem         {p}")?;
    }
    if let [meta, root, ..] = r.pulled.as_slice() {
        let dir = meta.parent().unwrap_or(Path::new("."));
        writeln!(out, "pulled into {}:", dir.display())?;
        for p in &r.pulled {
            writeln!(
                out,
                "  {}",
                p.file_name().unwrap_or_default().to_string_lossy()
            )?;
        }
        writeln!(
            out,
            "import with: incus image import {} {}",
            meta.display(),
            root.display()
        )?;
    }
    Ok(())
}

// ------------------------------------------------------------ checks

/// Collects problems: fatal in enforce and off modes, warnings in warn mode.
struct Checks<'a> {
    mode: VerificationMode,
    out_dir: Option<PathBuf>,
    problems: Vec<Problem>,
    err: &'a mut dyn Write,
    /// `image@version`, once resolved: every failure names it.
    of: Option<String>,
}

impl Checks<'_> {
    fn fail(&mut self, p: Problem) -> Result<(), VerifyError> {
        if self.mode == VerificationMode::Warn {
            let _ = writeln!(self.err, "warning: {p}");
            self.problems.push(p);
            Ok(())
        } else {
            Err(self.fatal(p))
        }
    }

    /// A problem that stops even warn mode (nothing left to check).
    fn fatal(&self, p: Problem) -> VerifyError {
        VerifyError::Failed {
            problem: p,
            out: self.out_dir.clone(),
            of: self.of.clone(),
        }
    }
}

/// `pull`'s staging: a hidden temporary directory inside the output
/// directory (same filesystem), removed unless [`Staging::commit`] links
/// its files into place.
struct Staging {
    dir: PathBuf,
    /// `None` once committed.
    tmp: Option<tempfile::TempDir>,
    names: Vec<&'static str>,
    /// The output directory did not exist: remove it again on failure.
    created_dir: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = tmp.close();
            if self.created_dir {
                let _ = fs::remove_dir(&self.dir); // only if still empty
            }
        }
    }
}

impl Staging {
    fn new(dir: &Path, root_name: &'static str) -> Result<Staging, VerifyError> {
        let created_dir = !dir.exists();
        fs::create_dir_all(dir)
            .map_err(|e| cannot_run(e, format!("creating {}", dir.display())))?;
        let names = vec![INCUS_METADATA, root_name, MANIFEST_FILE, SIGNATURE_FILE];
        for n in &names {
            let p = dir.join(n);
            if p.symlink_metadata().is_ok() {
                return Err(VerifyError::CannotRun(anyhow!(
                    "{} already exists: pull into a new or empty directory",
                    p.display()
                )));
            }
        }
        let tmp = tempfile::Builder::new()
            .prefix(".imgsrv-pull-")
            .tempdir_in(dir)
            .map_err(|e| {
                cannot_run(
                    e,
                    format!("creating a temporary directory in {}", dir.display()),
                )
            })?;
        Ok(Staging {
            dir: dir.to_path_buf(),
            tmp: Some(tmp),
            names,
            created_dir,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp
            .as_ref()
            .expect("staging is not committed yet")
            .path()
            .join(name)
    }

    fn create(&self, name: &str) -> Result<File, VerifyError> {
        let p = self.path(name);
        File::create(&p).map_err(|e| cannot_run(e, format!("creating {}", p.display())))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), VerifyError> {
        let mut f = self.create(name)?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| cannot_run(e, format!("writing {}", self.path(name).display())))
    }

    /// Hard-links every staged file into the output directory (never
    /// replacing a file; on failure the ones already linked are removed),
    /// then drops the staging directory.
    fn commit(mut self) -> Result<Vec<PathBuf>, VerifyError> {
        let mut done: Vec<PathBuf> = Vec::new();
        for n in &self.names {
            let from = self.path(n);
            if !from.exists() {
                continue; // no signature for an unsigned version
            }
            let to = self.dir.join(n);
            if let Err(e) = fs::hard_link(&from, &to) {
                for p in &done {
                    let _ = fs::remove_file(p);
                }
                return Err(cannot_run(e, format!("moving {} into place", to.display())));
            }
            done.push(to);
        }
        if let Some(tmp) = self.tmp.take() {
            let _ = tmp.close();
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| cannot_run(e, format!("syncing {}", self.dir.display())))?;
        Ok(done)
    }
}

/// Feeds what is written to the file hash and the fingerprint hash.
struct Tee<'a> {
    inner: &'a mut dyn Write,
    hash: Hasher,
    fingerprint: &'a mut Hasher,
    progress: Option<&'a ProgressBar>,
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.fingerprint.update(&buf[..n]);
        if let Some(pb) = self.progress {
            pb.inc(n as u64);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn progress_bar(show: bool, name: &str, len: u64) -> Option<ProgressBar> {
    if !show {
        return None;
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:20!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(name.to_string());
    Some(pb)
}

/// What to download and where from.
struct Blob<'a> {
    /// File name shown and written (`incus.tar.xz`, `rootfs.squashfs`…).
    name: &'static str,
    artifact_id: &'a str,
    attachment_id: Option<&'a str>,
    digest: Digest,
    size: u64,
}

/// Downloads one blob (into the staging directory, or nowhere), hashing
/// while streaming, and checks its size and sha256 against the manifest.
fn fetch(
    client: &ApiClient,
    opts: &Options,
    version: &str,
    blob: &Blob<'_>,
    staging: Option<&Staging>,
    fingerprint: &mut Hasher,
    checks: &mut Checks<'_>,
) -> Result<FileCheck, VerifyError> {
    let mut file = staging.map(|s| s.create(blob.name)).transpose()?;
    let mut sink = io::sink();
    let inner: &mut dyn Write = match file.as_mut() {
        Some(f) => f,
        None => &mut sink,
    };
    let pb = progress_bar(opts.progress, blob.name, blob.size);
    let mut tee = Tee {
        inner,
        hash: Hasher::new(),
        fingerprint,
        progress: pb.as_ref(),
    };
    let n = client
        .download_to(
            &opts.target.image,
            version,
            blob.artifact_id,
            blob.attachment_id,
            &mut tee,
            blob.size.saturating_add(1),
        )
        .map_err(|e| cannot_run(e, format!("downloading {}", blob.name)))?;
    let got = tee.hash.finish();
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if let Some(f) = file {
        f.sync_all()
            .map_err(|e| cannot_run(e, format!("writing {}", blob.name)))?;
    }
    let subject = format!("{} ({})", blob.name, blob.digest);
    if n != blob.size {
        let got_size = if n > blob.size {
            format!("more than {} bytes", blob.size)
        } else {
            format!("{n} bytes")
        };
        checks.fail(Problem::new(
            &subject,
            format!(
                "size mismatch: expected {} bytes, got {got_size}",
                blob.size
            ),
        ))?;
    } else if got != blob.digest {
        checks.fail(Problem::new(
            &subject,
            format!("sha256 mismatch: expected {}, got {got}", blob.digest),
        ))?;
    }
    Ok(FileCheck {
        name: blob.name.to_string(),
        digest: got,
        size: n,
    })
}

/// Finds the published version to check. Errors are "could not run".
fn resolve(client: &ApiClient, target: &Target) -> Result<(VersionView, String), VerifyError> {
    let image = &target.image;
    let ctx = format!("looking up {target}");
    let view = match &target.selector {
        Selector::Newest => {
            let versions = client
                .list_versions(image)
                .map_err(|e| cannot_run(e, &ctx))?;
            // With a content-writer token the list includes drafts.
            let newest = versions
                .into_iter()
                .find(|v| v.state == "published")
                .ok_or_else(|| {
                    VerifyError::CannotRun(anyhow!("{image} has no published version"))
                })?;
            client
                .get_version(image, &newest.version)
                .map_err(|e| cannot_run(e, &ctx))?
        }
        Selector::Alias(a) => client.get_ref(image, a).map_err(|e| cannot_run(e, &ctx))?,
        Selector::Version(v) => client
            .get_version(image, v)
            .map_err(|e| cannot_run(e, &ctx))?,
    };
    if view.version.state != "published" {
        return Err(VerifyError::CannotRun(anyhow!(
            "{image}@{} is not published (state {}): there is nothing signed to verify",
            view.version.version,
            view.version.state
        )));
    }
    // Asked for an exact version: check that one, whatever the server sent.
    let version = match &target.selector {
        Selector::Version(v) => v.clone(),
        _ => view.version.version.clone(),
    };
    Ok((view, version))
}

/// The problem for a signature that did not verify.
fn signature_problem(e: SignError, server_keys: &[KeyInfo], keys_path: &Path) -> Problem {
    let reason = match e {
        SignError::UnknownKey(id) => {
            let server_name = server_keys
                .iter()
                .find(|k| k.key_id.eq_ignore_ascii_case(&id))
                .map(|k| format!(" (the server calls it {:?})", k.name))
                .unwrap_or_default();
            format!(
                "signed by key {id}{server_name} which you do not trust (it is not in {})",
                keys_path.display()
            )
        }
        SignError::BadSignature { key_name, key_id } => format!(
            "does not verify with your key {key_name} ({key_id}): the manifest the server sent is not the one that was signed"
        ),
        other => other.to_string(),
    };
    Problem::new("manifest signature", reason)
}

/// ` since <time>` when the revocation time is known, else nothing.
fn since(revoked_at: Option<&str>) -> String {
    revoked_at
        .map(|t| format!(" since {t}"))
        .unwrap_or_default()
}

/// Revocation (local or reported by the server) and local scopes of the
/// key that made a valid signature.
fn check_signer(
    checks: &mut Checks<'_>,
    key: &TrustedKey,
    server_keys: &[KeyInfo],
    image: &str,
) -> Result<(), VerifyError> {
    let who = format!("key {} ({})", key.name, key.key_id);
    if key.policy.state == KeyState::Revoked {
        let at = since(key.policy.revoked_at.as_deref());
        checks.fail(Problem::new(
            "manifest signature",
            format!(
                "{who} is revoked in your trusted keys{at} ({}): nothing signed with it is trusted",
                key.origin
            ),
        ))?;
    }
    if let Some(k) = server_keys
        .iter()
        .find(|k| k.key_id.eq_ignore_ascii_case(&key.key_id) && k.state == "revoked")
    {
        let at = since(k.revoked_at.as_deref());
        checks.fail(Problem::new(
            "manifest signature",
            format!(
                "{who} is revoked: the server reports it revoked{at} (as {:?})",
                k.name
            ),
        ))?;
    }
    if !key
        .policy
        .scopes
        .iter()
        .any(|g| crate::names::scope_matches(g, image))
    {
        checks.fail(Problem::new(
            "manifest signature",
            format!(
                "{who} may sign only images matching {} in your trusted keys, not {image}",
                key.policy.scopes.join(", ")
            ),
        ))?;
    }
    Ok(())
}

fn describe(a: &ManifestArtifact) -> String {
    format!(
        "{}/{}/{}/{}",
        a.variant, a.operating_system, a.architecture, a.format
    )
}

/// The manifest artifact for the requested architecture, format and
/// variant. None or several: could not run (the user must choose).
fn select_artifact<'m>(
    m: &'m Manifest,
    opts: &Options,
) -> Result<(&'m ManifestArtifact, &'m ManifestAttachment), VerifyError> {
    let format = if opts.vm { "qcow2" } else { "squashfs" };
    let mut found: Vec<&ManifestArtifact> = m
        .artifacts
        .iter()
        .filter(|a| a.format == format && normalize_arch(&a.architecture) == opts.arch)
        .filter(|a| opts.variant.as_ref().is_none_or(|v| &a.variant == v))
        .collect();
    if opts.variant.is_none() && found.iter().any(|a| a.variant == "default") {
        found.retain(|a| a.variant == "default");
    }
    let all = || {
        m.artifacts
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let art = match found.as_slice() {
        [a] => *a,
        [] => {
            return Err(VerifyError::CannotRun(anyhow!(
                "{} {} has no {format} artifact for {}{} (it has: {}){}",
                m.image,
                m.version,
                opts.arch,
                opts.variant
                    .as_ref()
                    .map(|v| format!(", variant {v}"))
                    .unwrap_or_default(),
                all(),
                if opts.vm {
                    ""
                } else {
                    "; --vm picks the virtual-machine disk"
                }
            )))
        }
        several => {
            return Err(VerifyError::CannotRun(anyhow!(
                "several artifacts of {} {} match: {}; choose one with --variant",
                m.image,
                m.version,
                several
                    .iter()
                    .map(|a| describe(a))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let meta = art
        .attachments
        .iter()
        .find(|t| t.name == INCUS_METADATA)
        .ok_or_else(|| {
            VerifyError::CannotRun(anyhow!(
                "artifact {} of {} {} has no {INCUS_METADATA} attachment: not an Incus image",
                describe(art),
                m.image,
                m.version
            ))
        })?;
    Ok((art, meta))
}

/// Runs every check (see the module documentation) and, for `pull`,
/// writes the files into `opts.out`. Prints the report to `out`; warnings
/// go to `err` as they are found.
pub fn run(
    opts: &Options,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Report, VerifyError> {
    let image = opts.target.image.as_str();
    let root_name = if opts.vm { DISK_FILE } else { ROOTFS_FILE };
    match opts.mode {
        VerificationMode::Off => {
            let _ = writeln!(
                err,
                "warning: verification mode is off: the manifest signature is NOT checked (sha256, sizes and the fingerprint still are)"
            );
        }
        VerificationMode::Warn => {
            let _ = writeln!(
                err,
                "warning: verification mode is warn: problems are printed but do not stop you"
            );
        }
        VerificationMode::Enforce => {}
    }

    // The consumer's own keys: read before anything else, never the server's.
    let (keys, keys_path) = if opts.mode == VerificationMode::Off {
        (Vec::new(), PathBuf::new())
    } else {
        let p = opts.trusted_keys.clone().ok_or_else(|| {
            VerifyError::CannotRun(anyhow!(
                "--trusted-keys FILE_OR_DIR is required: the minisign public keys you trust, \
                 a publisher's .pub file (made by `minisign -G`) or a directory of NAME.pub \
                 files with optional NAME.toml policies (see `imgsrv verify --help`)"
            ))
        })?;
        let keys = crate::sign::load_keys_from(&p)
            .map_err(|e| cannot_run(e, format!("reading trusted keys from {}", p.display())))?;
        if keys.is_empty() {
            return Err(VerifyError::CannotRun(anyhow!(
                "no trusted keys in {} (expected <name>.pub files made by `minisign -G`)",
                p.display()
            )));
        }
        (keys, p)
    };
    let staging = opts
        .out
        .as_deref()
        .map(|d| Staging::new(d, root_name))
        .transpose()?;
    let mut checks = Checks {
        mode: opts.mode,
        out_dir: opts.out.clone(),
        problems: Vec::new(),
        err,
        of: None,
    };

    let client = ApiClient::new(&opts.server, opts.ca.as_deref(), opts.token.clone())
        .map_err(|e| cannot_run(e, "connecting to the server"))?;
    let (view, version) = resolve(&client, &opts.target)?;
    checks.of = Some(format!("{}@{version}", opts.target.image));
    let alias = match &opts.target.selector {
        Selector::Alias(a) => Some(a.clone()),
        _ => None,
    };
    let manifest_bytes = client
        .get_manifest_bytes(image, &version)
        .map_err(|e| cannot_run(e, "fetching the manifest"))?;
    let signature = client
        .get_manifest_signature(image, &version)
        .map_err(|e| cannot_run(e, "fetching the manifest signature"))?;
    let manifest_digest = Digest::of(&manifest_bytes);

    // 1-2. The signature, against the consumer's keys; the signer key's state.
    let mut signer = None;
    if opts.mode != VerificationMode::Off {
        let server_keys = client
            .get_keys()
            .map_err(|e| cannot_run(e, "fetching the server's key states (revocations)"))?;
        match &signature {
            None => checks.fail(Problem::new(
                "manifest signature",
                format!("{image}@{version} was published unsigned: nothing vouches for what the server sends"),
            ))?,
            Some(sig) => match crate::sign::verify_signed_by(&keys, &manifest_bytes, sig) {
                Ok((key, v)) => {
                    check_signer(&mut checks, key, &server_keys, image)?;
                    signer = Some(v);
                }
                Err(e) => checks.fail(signature_problem(e, &server_keys, &keys_path))?,
            },
        }
    }

    // 2b. The transparency log holds exactly this publication, consistently with what
    // this consumer saw of the log before.
    let mut logged = None;
    let log_policy = opts
        .log
        .as_ref()
        .filter(|_| opts.mode != VerificationMode::Off);
    if let Some(policy) = log_policy {
        let proof = client
            .get_tlog_proof(image, &version)
            .map_err(|e| cannot_run(e, "fetching the transparency-log proof"))?;
        let publication = view.publication.as_ref();
        // the signer is the key that verified the signature here, not what the server
        // says: a log entry naming another key (or none) does not prove this one
        let entry = crate::tlog::entry::Entry::Publish {
            image: image.to_string(),
            version: version.clone(),
            manifest: manifest_digest,
            signer: match &signer {
                Some(v) => Some(v.key_id.clone()),
                None => publication.and_then(|p| p.signer_key_id.clone()),
            },
            time: publication
                .and_then(|p| p.published_at.clone())
                .unwrap_or_default(),
        };
        let consistency = |old, new| client.get_log_consistency(old, new).map_err(Into::into);
        match crate::tlog::consumer::check(policy, proof.as_deref(), &entry, &consistency) {
            Ok(l) => logged = Some(l),
            Err(why) => checks.fail(Problem::new("transparency log", why))?,
        }
    }

    // 3. The manifest names what was asked for, and is the one published.
    let manifest_subject = format!("manifest ({manifest_digest})");
    let manifest = crate::manifest::parse(&manifest_bytes).map_err(|e| {
        checks.fatal(Problem::new(
            &manifest_subject,
            format!("not an imgsrv manifest: {e}"),
        ))
    })?;
    if manifest.image != image {
        checks.fail(Problem::new(
            &manifest_subject,
            format!("names image {:?}, you asked for {image:?}", manifest.image),
        ))?;
    }
    if manifest.version != version {
        checks.fail(Problem::new(
            &manifest_subject,
            format!("names version {:?}, expected {version:?}", manifest.version),
        ))?;
    }
    match &view.publication {
        Some(p) if p.manifest_digest == manifest_digest => {}
        Some(p) => checks.fail(Problem::new(
            &manifest_subject,
            format!(
                "the server's publication record names manifest {}, not the one it serves",
                p.manifest_digest
            ),
        ))?,
        None => checks.fail(Problem::new(
            "publication",
            format!("the server sent no publication record for {image}@{version}"),
        ))?,
    }

    // 4. Download, hashing while streaming. Which artifact is decided by the
    // manifest; the server's view only supplies the download ids.
    let (art, meta) = select_artifact(&manifest, opts)?;
    let subject = format!("{root_name} ({})", art.digest);
    let entry = view
        .artifacts
        .iter()
        .find(|e| {
            let a = &e.artifact;
            (
                a.variant.as_str(),
                a.operating_system.as_str(),
                a.architecture.as_str(),
                a.format.as_str(),
            ) == (
                art.variant.as_str(),
                art.operating_system.as_str(),
                art.architecture.as_str(),
                art.format.as_str(),
            )
        })
        .ok_or_else(|| {
            checks.fatal(Problem::new(
                &subject,
                format!(
                    "the server's version view does not list the signed artifact {}",
                    describe(art)
                ),
            ))
        })?;
    let meta_entry = entry
        .attachments
        .iter()
        .find(|t| t.name == INCUS_METADATA)
        .ok_or_else(|| {
            checks.fatal(Problem::new(
                format!("{INCUS_METADATA} ({})", meta.digest),
                "the server's version view does not list the signed metadata tarball",
            ))
        })?;
    let mut fp = Hasher::new();
    let meta_check = fetch(
        &client,
        opts,
        &version,
        &Blob {
            name: INCUS_METADATA,
            artifact_id: &entry.artifact.id,
            attachment_id: Some(&meta_entry.id),
            digest: meta.digest,
            size: meta.size,
        },
        staging.as_ref(),
        &mut fp,
        &mut checks,
    )?;
    let root_check = fetch(
        &client,
        opts,
        &version,
        &Blob {
            name: root_name,
            artifact_id: &entry.artifact.id,
            attachment_id: None,
            digest: art.digest,
            size: art.size,
        },
        staging.as_ref(),
        &mut fp,
        &mut checks,
    )?;
    let files = vec![meta_check, root_check];

    // 5. The Incus fingerprint the server advertises (what `incus` will see).
    let fingerprint = fp.finish().hex();
    let advertised = view.publication.as_ref().and_then(|p| {
        p.fingerprints
            .iter()
            .find(|f| f.artifact_id == entry.artifact.id)
    });
    match advertised {
        Some(f) if f.fingerprint == fingerprint => {}
        Some(f) => checks.fail(Problem::new(
            "fingerprint",
            format!(
                "the server advertises {} for this artifact, the downloaded {INCUS_METADATA} + {root_name} give {fingerprint}",
                f.fingerprint
            ),
        ))?,
        None => checks.fail(Problem::new(
            "fingerprint",
            format!("the server advertises no Incus fingerprint for this artifact (the downloaded files give {fingerprint})"),
        ))?,
    }

    // Every check passed (or warn mode): move the files into place.
    let pulled = match staging {
        Some(s) => {
            s.write(MANIFEST_FILE, &manifest_bytes)?;
            if let Some(sig) = &signature {
                s.write(SIGNATURE_FILE, sig.as_bytes())?;
            }
            s.commit()?
        }
        None => Vec::new(),
    };
    let report = Report {
        image: image.to_string(),
        version,
        alias,
        mode: opts.mode,
        manifest_digest,
        signer,
        kind: if opts.vm {
            "virtual-machine"
        } else {
            "container"
        },
        architecture: art.architecture.clone(),
        variant: art.variant.clone(),
        files,
        fingerprint,
        problems: checks.problems,
        pulled,
        logged,
        log_checked: log_policy.is_some(),
    };
    print_report(&report, out).map_err(|e| cannot_run(e, "writing the report"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t: Target = "debian-12".parse().unwrap();
        assert_eq!(t.selector, Selector::Newest);
        let t: Target = "debian-12:stable".parse().unwrap();
        assert_eq!(
            (t.image.as_str(), t.selector.clone()),
            ("debian-12", Selector::Alias("stable".into()))
        );
        assert_eq!(t.to_string(), "debian-12:stable");
        let t: Target = "debian-12@1.0+b1:2".parse().unwrap();
        assert_eq!(t.selector, Selector::Version("1.0+b1:2".into()));
        assert_eq!(t.to_string(), "debian-12@1.0+b1:2");
        for bad in [
            "",
            "Debian",
            "debian:",
            "debian@",
            "debian:a:b",
            "debian:a@b",
            "../x",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn architectures() {
        assert_eq!(normalize_arch("amd64"), normalize_arch("x86_64"));
        assert_eq!(normalize_arch("ARM64"), normalize_arch("aarch64"));
        assert_ne!(normalize_arch("arm64"), normalize_arch("x86_64"));
        assert_eq!(normalize_arch("riscv64"), "riscv64");
        assert!(!host_arch().is_empty());
    }

    #[test]
    fn config_path_order() {
        let os = |s: &str| Some(OsString::from(s));
        let p = |s: &str| Some((PathBuf::from(s), true));
        assert_eq!(
            config_path_from(Some(Path::new("/a.toml")), os("/b"), os("/x"), os("/h")),
            p("/a.toml")
        );
        assert_eq!(
            config_path_from(None, os("/b"), os("/x"), os("/h")),
            p("/b")
        );
        assert_eq!(
            config_path_from(None, os(""), os("/x"), os("/h")),
            Some((PathBuf::from("/x/imgsrv/client.toml"), false))
        );
        assert_eq!(
            config_path_from(None, None, os("relative"), os("/h")),
            Some((PathBuf::from("/h/.config/imgsrv/client.toml"), false))
        );
        assert_eq!(config_path_from(None, None, None, None), None);
    }

    #[test]
    fn mode_fails_closed() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("client.toml");
        let load = |text: Option<&str>, explicit: bool| {
            match text {
                Some(s) => fs::write(&f, s).unwrap(),
                None => {
                    let _ = fs::remove_file(&f);
                }
            }
            load_mode(Some((f.clone(), explicit)))
        };
        let m = load(None, false);
        assert_eq!((m.mode, m.warnings.len()), (VerificationMode::Enforce, 0));
        let m = load(None, true);
        assert_eq!(m.mode, VerificationMode::Enforce);
        assert!(m.warnings[0].contains("ENFORCE"), "{:?}", m.warnings);
        assert_eq!(
            load(Some("[image_verification]\nmode = \"warn\""), false).mode,
            VerificationMode::Warn
        );
        assert_eq!(
            load(Some("[image_verification]\nmode = \"off\""), true).mode,
            VerificationMode::Off
        );
        for bad in [
            "[image_verification]\nmode = \"of\"",
            "[image_verification]\nmode = false",
            "image_verification = \"off\"",
            "mode = off\nthis is not toml",
        ] {
            let m = load(Some(bad), false);
            assert_eq!(m.mode, VerificationMode::Enforce, "{bad}");
            assert!(m.warnings[0].contains("ENFORCE"), "{bad}: {:?}", m.warnings);
            assert!(
                m.warnings[0].contains(&f.display().to_string()),
                "the warning names the file"
            );
        }
        // A directory where the file should be: unreadable, so enforce.
        let m = load_mode(Some((t.path().to_path_buf(), false)));
        assert_eq!(m.mode, VerificationMode::Enforce);
        assert_eq!(m.warnings.len(), 1);
        assert_eq!(load_mode(None).mode, VerificationMode::Enforce);
    }

    fn manifest(arts: &[(&str, &str, &str)]) -> Manifest {
        Manifest {
            schema: crate::manifest::SCHEMA.into(),
            image: "img".into(),
            version: "1".into(),
            metadata: Default::default(),
            artifacts: arts
                .iter()
                .map(|(variant, arch, format)| ManifestArtifact {
                    variant: variant.to_string(),
                    operating_system: "debian".into(),
                    architecture: arch.to_string(),
                    format: format.to_string(),
                    digest: Digest::of(b"r"),
                    size: 1,
                    media_type: "x".into(),
                    attachments: vec![ManifestAttachment {
                        name: INCUS_METADATA.into(),
                        media_type: "y".into(),
                        digest: Digest::of(b"m"),
                        size: 1,
                    }],
                })
                .collect(),
        }
    }

    fn opts(arch: &str, vm: bool, variant: Option<&str>) -> Options {
        Options {
            server: "https://h".into(),
            ca: None,
            token: None,
            trusted_keys: None,
            mode: VerificationMode::Enforce,
            target: "img".parse().unwrap(),
            arch: normalize_arch(arch),
            vm,
            variant: variant.map(String::from),
            out: None,
            progress: false,
            log: None,
        }
    }

    #[test]
    fn artifact_selection() {
        let m = manifest(&[
            ("default", "amd64", "squashfs"),
            ("cloud", "x86_64", "squashfs"),
            ("default", "x86_64", "qcow2"),
            ("default", "aarch64", "squashfs"),
        ]);
        let pick = |o: Options| select_artifact(&m, &o).map(|(a, _)| describe(a));
        assert_eq!(
            pick(opts("x86_64", false, None)).unwrap(),
            "default/debian/amd64/squashfs"
        );
        assert_eq!(
            pick(opts("amd64", false, Some("cloud"))).unwrap(),
            "cloud/debian/x86_64/squashfs"
        );
        assert_eq!(
            pick(opts("x86_64", true, None)).unwrap(),
            "default/debian/x86_64/qcow2"
        );
        assert_eq!(
            pick(opts("arm64", false, None)).unwrap(),
            "default/debian/aarch64/squashfs"
        );
        let e = pick(opts("arm64", true, None)).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("no qcow2 artifact for aarch64"),
            "{e}"
        );

        let two = manifest(&[("a", "x86_64", "squashfs"), ("b", "x86_64", "squashfs")]);
        let e = select_artifact(&two, &opts("x86_64", false, None)).unwrap_err();
        assert!(e.to_string().contains("--variant"), "{e}");

        let mut bare = manifest(&[("default", "x86_64", "squashfs")]);
        bare.artifacts[0].attachments.clear();
        let e = select_artifact(&bare, &opts("x86_64", false, None)).unwrap_err();
        assert!(e.to_string().contains("not an Incus image"), "{e}");
    }

    #[test]
    fn errors_map_to_exit_codes_and_name_the_file() {
        let e = VerifyError::Failed {
            problem: Problem::new("rootfs.squashfs (sha256:ab)", "sha256 mismatch"),
            out: Some(PathBuf::from("/tmp/out")),
            of: Some("debian@1".into()),
        };
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.to_string(),
            "verification of debian@1 failed: rootfs.squashfs (sha256:ab): sha256 mismatch (nothing was written to /tmp/out)"
        );
        let e = cannot_run(io::Error::other("refused"), "fetching the manifest");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(e.to_string(), "fetching the manifest: refused");
    }
}
