//! imgsrv to imgsrv replication (`imgsrv mirror-imgsrv`), and what it shares
//! with bundle import ([`crate::bundle`]): a [`Destination`] (a server or a
//! data directory, wrapping a [`Target`]), the target's own signature rules
//! ([`SignatureCheck`]), and storing a blob while checking its digest and size.
//!
//! Mirroring copies every published version of an upstream imgsrv with its
//! ORIGINAL canonical manifest bytes and minisign signature: the target
//! re-creates the version byte for byte ([`Target::stage`]) and publishes it
//! with the publisher's signature, which its own verification (enforce by
//! default, against its own trusted keys) checks. Nothing is re-signed.

use crate::client::ApiClient;
use crate::config::VerificationMode;
use crate::digest::{Digest, Hasher};
use crate::manifest::Manifest;
use crate::target::{LocalTarget, RemoteTarget, Target, VersionStatus};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

// ------------------------------------------------------------ command line

/// A site: a running server (`--server`, through the API) or a data
/// directory (`--data`, directly). Exactly one; a flag typed wins over the
/// other's variable ([`crate::site::choose`]).
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("site").required(true).multiple(true).args(["server", "data"])))]
pub struct SiteArgs {
    /// Server URL, e.g. https://images.example.org:8443 (writing needs a content-writer token).
    #[arg(long, value_name = "URL", env = "IMGSRV_SERVER")]
    pub server: Option<String>,
    /// PEM certificate to trust for --server (pinned: a self-signed one too).
    #[arg(long, value_name = "CERT", env = "IMGSRV_CA")]
    pub ca: Option<PathBuf>,
    /// File holding the API token for --server (else the token in IMGSRV_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Data directory, used directly (its own verification mode and trusted keys apply).
    #[arg(long, value_name = "DIR", env = "IMGSRV_DATA")]
    pub data: Option<PathBuf>,
}

impl SiteArgs {
    /// The site named: `--data` or `--server` (see [`crate::site::choose`]).
    pub fn site(&self) -> Result<crate::site::Site> {
        crate::site::choose(self.server.as_deref(), self.data.as_deref())?
            .context("give --server URL (or IMGSRV_SERVER) or --data DIR (or IMGSRV_DATA)")
    }

    /// The data directory, when the site is one.
    pub fn data_dir(&self) -> Result<Option<PathBuf>> {
        Ok(match self.site()? {
            crate::site::Site::Data(d) => Some(d),
            crate::site::Site::Server(_) => None,
        })
    }

    fn server_args(&self) -> Result<Option<crate::cli::ServerArgs>> {
        Ok(match self.site()? {
            crate::site::Site::Server(s) => Some(crate::cli::ServerArgs {
                server: s,
                ca: self.ca.clone(),
                token_file: self.token_file.clone(),
            }),
            crate::site::Site::Data(_) => None,
        })
    }

    /// An API client for `--server` (with the token when there is one).
    pub fn client(&self, token_required: bool) -> Result<Option<ApiClient>> {
        let Some(s) = self.server_args()? else {
            return Ok(None);
        };
        let token = if token_required {
            Some(s.require_token()?)
        } else {
            s.token()?
        };
        Ok(Some(s.client(token)?))
    }

    /// Opens the site as a destination to write into.
    pub fn destination(&self) -> Result<Destination> {
        match (self.data_dir()?, self.client(true)?) {
            (Some(dir), _) => Destination::open_data(&dir),
            (None, Some(client)) => Ok(Destination::Remote(RemoteTarget { client })),
            (None, None) => bail!("give --server URL or --data DIR"),
        }
    }
}

/// `imgsrv mirror-imgsrv`: copy published versions from another imgsrv.
#[derive(Args, Debug)]
pub struct MirrorImgsrvArgs {
    #[command(flatten)]
    pub target: SiteArgs,
    /// PEM certificate to trust for the upstream server (pinned: a self-signed one too).
    #[arg(long, value_name = "CERT")]
    pub upstream_ca: Option<PathBuf>,
    /// File holding an API token for the upstream (to see private images).
    #[arg(long, value_name = "FILE")]
    pub upstream_token_file: Option<PathBuf>,
    /// Only images whose name matches this glob (e.g. debian-*).
    #[arg(long, value_name = "GLOB")]
    pub image: Option<String>,
    /// Only the newest N published versions of each image.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub latest: Option<u32>,
    /// The client config whose `[transparency_log]` keys the upstream's log is checked
    /// against, as `imgsrv verify` does (default: $IMGSRV_CLIENT_CONFIG, else
    /// ~/.config/imgsrv/client.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The upstream imgsrv, e.g. https://images.example.org:8443
    #[arg(value_name = "UPSTREAM_URL")]
    pub upstream: String,
}

/// An error that means "could not run" (exit 2; `main` maps
/// [`crate::verify::VerifyError::CannotRun`] to 2, every other error to 1).
pub fn cannot_run(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(crate::verify::VerifyError::CannotRun(e))
}

/// Runs `imgsrv mirror-imgsrv`. Exit 0: every selected version is on the
/// target; 1: some version was refused or failed; 2: could not run.
pub fn mirror_command(a: MirrorImgsrvArgs) -> Result<()> {
    let setup = || -> Result<(Destination, MirrorOptions)> {
        if let Some(g) = &a.image {
            if !crate::names::scope(g) {
                bail!("invalid --image glob {g:?}: an image-name glob such as debian-* or *");
            }
        }
        let upstream_token = match &a.upstream_token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let opts = MirrorOptions {
            upstream: a.upstream.clone(),
            upstream_ca: a.upstream_ca.clone(),
            upstream_token: upstream_token.filter(|t| !t.is_empty()),
            image_glob: a.image.clone(),
            latest: a.latest.map(|n| n as usize),
            log: crate::verify::load_log_policy(crate::verify::config_path(a.config.as_deref()))?,
        };
        Ok((a.target.destination()?, opts))
    };
    let (dest, opts) = setup().map_err(cannot_run)?;
    let report = mirror_imgsrv(&opts, &dest, &mut io::stdout().lock()).map_err(cannot_run)?;
    if !report.failed.is_empty() {
        let list: Vec<String> = report
            .failed
            .iter()
            .map(|(v, why)| format!("{v}: {why}"))
            .collect();
        bail!(
            "{} version(s) not mirrored:\n  {}",
            report.failed.len(),
            list.join("\n  ")
        );
    }
    Ok(())
}

// ------------------------------------------------------------ destination

/// Where replicated or imported versions go: a [`Target`] plus what mirroring
/// and import need to know about it beyond that trait.
#[allow(clippy::large_enum_variant)] // one per run
pub enum Destination {
    Local(LocalTarget),
    Remote(RemoteTarget),
}

impl Destination {
    /// An initialised data directory (its verification mode and trusted keys decide).
    pub fn open_data(dir: &Path) -> Result<Destination> {
        Ok(Destination::Local(LocalTarget::open(dir)?))
    }

    pub fn target(&self) -> &(dyn Target + Sync) {
        match self {
            Destination::Local(t) => t,
            Destination::Remote(t) => t,
        }
    }

    pub fn describe(&self) -> String {
        self.target().describe()
    }

    /// Whether the blob is stored there with this size (asks a server with
    /// `HEAD /v1/blobs/{digest}`, which the writer token may see). A server
    /// answering 503 (the blob is quarantined, missing or damaged there)
    /// does not have it: storing it repairs it.
    pub fn has_blob(&self, digest: &Digest, size: u64) -> Result<bool> {
        match self {
            Destination::Local(t) => t.has_blob(digest, size),
            Destination::Remote(t) => match t.client.blob_size(digest) {
                Ok(s) => Ok(s == Some(size)),
                Err(e) if e.status() == Some(503) => Ok(false),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// The canonical manifest of a published version, `None` when the
    /// version is not published there.
    pub fn published_manifest(&self, image: &str, version: &str) -> Result<Option<Vec<u8>>> {
        if self.target().status(image, version)? != VersionStatus::Published {
            return Ok(None);
        }
        match self {
            Destination::Local(t) => {
                let v = t.app.catalog.get_version(image, version)?;
                Ok(Some(t.app.catalog.publish_record(&v.id)?.manifest))
            }
            Destination::Remote(t) => Ok(Some(t.client.get_manifest_bytes(image, version)?)),
        }
    }

    /// The image's aliases there (alias to version); empty when the image is absent.
    pub fn aliases(&self, image: &str) -> Result<BTreeMap<String, String>> {
        let list: Vec<(String, String)> = match self {
            Destination::Local(t) => match t.app.catalog.list_aliases(image) {
                Ok(l) => l.into_iter().map(|a| (a.alias, a.version)).collect(),
                Err(crate::catalog::CatalogError::NotFound(_)) => Vec::new(),
                Err(e) => return Err(e.into()),
            },
            Destination::Remote(t) => match t.client.list_aliases(image) {
                Ok(l) => l.into_iter().map(|a| (a.alias, a.version)).collect(),
                Err(e) if e.status() == Some(404) => Vec::new(),
                Err(e) => return Err(e.into()),
            },
        };
        Ok(list.into_iter().collect())
    }

    /// The target's signature rules, to refuse early what its publish would
    /// refuse. A data directory: its mode and `keys/`. A server: the keys
    /// it lists in `GET /v1/keys`, in enforce mode (a server's mode is not
    /// visible over the API; its publish decides in the end either way).
    pub fn signature_check(&self) -> Result<SignatureCheck> {
        match self {
            Destination::Local(t) => Ok(SignatureCheck {
                mode: t.app.verification(),
                keys: t
                    .app
                    .trusted_keys()
                    .context("reading the target's trusted keys")?,
            }),
            Destination::Remote(t) => {
                let listed = t.client.get_keys().context("reading GET /v1/keys")?;
                Ok(SignatureCheck {
                    mode: VerificationMode::Enforce,
                    keys: keys_from_listing(&listed)?,
                })
            }
        }
    }

    /// Stores exactly `size` bytes read from `reader`, which must hash to
    /// `digest`, checking both while reading. A data directory ingests
    /// straight from the stream: its blob store writes into its own `tmp/`
    /// (the same filesystem) while hashing, then links the file into place.
    /// A server gets a temporary file (`TMPDIR`) once it has been checked.
    /// `what` names the source in messages (a bundle member, a URL).
    pub fn store_blob(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
        reader: &mut dyn Read,
        what: &str,
    ) -> Result<(), BlobError> {
        let mut r = HashingReader::new(reader.take(size.saturating_add(1)));
        match self {
            Destination::Local(t) => {
                let stored = t
                    .app
                    .ingest(&t.lease, digest, size, Some(media_type), &mut r);
                // the store may not read at all (blob already in place): read
                // what is left so that the check below covers every byte
                let drained = io::copy(&mut r, &mut io::sink());
                let (got, len) = r.finish();
                check_content(what, digest, size, got, len, drained.err())?;
                stored.map_err(|e| BlobError::Target(anyhow::Error::new(e)))?;
            }
            Destination::Remote(t) => {
                let mut tmp = tempfile::Builder::new()
                    .prefix("imgsrv-incoming-")
                    .tempfile()
                    .map_err(|e| BlobError::Target(anyhow::Error::new(e)))?;
                let copied = io::copy(&mut r, tmp.as_file_mut());
                let (got, len) = r.finish();
                check_content(what, digest, size, got, len, copied.err())?;
                t.put_blob(digest, size, media_type, tmp.path())
                    .map_err(BlobError::Target)?;
            }
        }
        Ok(())
    }
}

/// Why a blob was not stored.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The bytes are not what they should be (or could not be read).
    #[error("{0}")]
    Content(String),
    /// The target failed to store them.
    #[error("{0:#}")]
    Target(anyhow::Error),
}

fn check_content(
    what: &str,
    digest: &Digest,
    size: u64,
    got: Digest,
    len: u64,
    read_error: Option<io::Error>,
) -> Result<(), BlobError> {
    if let Some(e) = read_error {
        return Err(BlobError::Content(format!(
            "{what}: read failed after {len} bytes: {e}"
        )));
    }
    if len != size {
        return Err(BlobError::Content(format!(
            "{what}: {} bytes, expected {size}",
            if len > size {
                format!("more than {size}")
            } else {
                len.to_string()
            }
        )));
    }
    if got != *digest {
        return Err(BlobError::Content(format!(
            "{what}: sha256 is {got}, expected {digest}"
        )));
    }
    Ok(())
}

/// Hashes and counts what passes through.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(),
        }
    }
    /// The digest and length of what was read.
    pub fn finish(self) -> (Digest, u64) {
        let len = self.hasher.len();
        (self.hasher.finish(), len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

// ------------------------------------------------------------ signatures

/// A target's rules for accepting a publisher signature, applied before
/// anything is staged so that a version its publish would refuse costs no
/// download and (for bundles) stops the whole import before anything is
/// published. The target's own publish still checks again.
pub struct SignatureCheck {
    pub mode: VerificationMode,
    pub keys: Vec<crate::sign::TrustedKey>,
}

impl SignatureCheck {
    /// `Ok(None)`: accepted. `Ok(Some(warning))`: not verified, but the
    /// target's mode (warn) publishes it anyway. `Err(reason)`: refused.
    pub fn check(
        &self,
        manifest: &[u8],
        signature: Option<&str>,
        image: &str,
    ) -> Result<Option<String>, String> {
        Ok(self.check_each(manifest, signature, [image])?.pop())
    }

    /// [`SignatureCheck::check`] of one signed document for each of
    /// `images` (a bundle index speaks for every image it names): the
    /// signature is verified once, the key's scope per image. Returns the
    /// warnings, in order; the first refusal is the error.
    pub fn check_each<'a>(
        &self,
        bytes: &[u8],
        signature: Option<&str>,
        images: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<String>, String> {
        if self.mode == VerificationMode::Off {
            return Ok(Vec::new());
        }
        let mut signer = None;
        let mut warnings = Vec::new();
        for image in images {
            let key = signer.get_or_insert_with(|| self.signer(bytes, signature));
            let outcome = key
                .clone()
                .and_then(|k| k.may_sign(image).map_err(|e| e.to_string()));
            match (outcome, self.mode) {
                (Ok(()), _) => {}
                (Err(why), VerificationMode::Warn) => warnings.push(format!(
                    "{why} (the target's verification mode is warn: it publishes it unverified)"
                )),
                (Err(why), _) => return Err(why),
            }
        }
        Ok(warnings)
    }

    /// The trusted key whose valid signature `signature` is.
    fn signer(
        &self,
        bytes: &[u8],
        signature: Option<&str>,
    ) -> Result<&crate::sign::TrustedKey, String> {
        let sig = signature.ok_or("the version has no signature")?;
        crate::sign::verify_signed_by(&self.keys, bytes, sig)
            .map(|(key, _)| key)
            .map_err(|e| e.to_string())
    }
}

/// Trusted keys as a server lists them (`GET /v1/keys`), with their scopes
/// and states, loaded through the same code as a data directory's `keys/`.
fn keys_from_listing(listed: &[crate::client::KeyInfo]) -> Result<Vec<crate::sign::TrustedKey>> {
    use crate::sign::{KeyPolicy, KeyState};
    let dir = tempfile::tempdir()?;
    for k in listed {
        let Some(text) = k.public_key.as_deref() else {
            continue;
        };
        if !crate::sign::valid_key_name(&k.name) {
            continue;
        }
        let state = match k.state.as_str() {
            "active" => KeyState::Active,
            "retired" => KeyState::Retired,
            _ => KeyState::Revoked, // unknown: fail closed
        };
        let policy = KeyPolicy {
            scopes: k.scopes.clone(),
            state,
            retired_at: k.retired_at.clone(),
            revoked_at: k.revoked_at.clone(),
        };
        std::fs::write(dir.path().join(format!("{}.pub", k.name)), text)?;
        std::fs::write(
            dir.path().join(format!("{}.toml", k.name)),
            toml::to_string(&policy)?,
        )?;
    }
    crate::sign::load_keys_from(dir.path()).context("the server's key listing")
}

// ------------------------------------------------------------ mirroring

/// What to mirror from where.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// The upstream imgsrv (`https://host:port`).
    pub upstream: String,
    pub upstream_ca: Option<PathBuf>,
    /// Upstream API token (to see private images), if any.
    pub upstream_token: Option<String>,
    /// Only images matching this glob.
    pub image_glob: Option<String>,
    /// Only the newest N published versions of each image.
    pub latest: Option<usize>,
    /// The logs the consumer trusts ([`crate::verify::load_log_policy`]): each version
    /// must be in the upstream's log, consistently with what was seen of it before;
    /// `None`: not checked.
    pub log: Option<crate::tlog::consumer::LogPolicy>,
}

/// What a mirror run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// `image@version` published on the target by this run.
    pub copied: Vec<String>,
    /// Already published there with the same manifest: skipped.
    pub already_present: Vec<String>,
    /// Published unsigned upstream: skipped.
    pub skipped_unsigned: Vec<String>,
    /// Refused or failed, with the reason (a refused publish leaves a draft
    /// that the next run takes over).
    pub failed: Vec<(String, String)>,
    pub blobs_stored: u64,
    pub bytes_stored: u64,
    pub blobs_present: u64,
    /// `image:alias -> version` set or moved by this run.
    pub aliases_set: Vec<String>,
}

/// Mirrors the published versions of an upstream imgsrv into `target`
/// (oldest first per image), keeping their manifests and signatures byte for
/// byte. Returns an error only when the run could not start or list the
/// upstream; per-version problems are in [`Report::failed`].
pub fn mirror_imgsrv(
    opts: &MirrorOptions,
    target: &Destination,
    out: &mut dyn Write,
) -> Result<Report> {
    let up = ApiClient::new(
        &opts.upstream,
        opts.upstream_ca.as_deref(),
        opts.upstream_token.clone(),
    )?;
    let sigs = target.signature_check()?;
    let mut report = Report::default();
    let images = up
        .list_images()
        .with_context(|| format!("listing images of {}", up.server()))?;
    for image in images {
        let name = image.name;
        if let Some(g) = &opts.image_glob {
            if !crate::names::scope_matches(g, &name) {
                continue;
            }
        }
        let private = up.image_visibility(&name)? == "private";
        let mut versions: Vec<String> = up
            .list_versions(&name)
            .with_context(|| format!("listing versions of {name}"))?
            .into_iter()
            .filter(|v| v.state == "published")
            .map(|v| v.version)
            .collect();
        if let Some(n) = opts.latest {
            versions.truncate(n);
        }
        versions.reverse(); // oldest first, as they were published upstream
        let mut on_target = BTreeSet::new();
        for version in &versions {
            let label = format!("{name}@{version}");
            match mirror_version(
                &up,
                target,
                (&sigs, opts.log.as_ref()),
                &name,
                version,
                private,
            ) {
                Ok(Outcome::Copied {
                    stored,
                    bytes,
                    present,
                }) => {
                    writeln!(
                        out,
                        "copied {label} ({stored} blob(s), {bytes} bytes; {present} already there)"
                    )?;
                    report.blobs_stored += stored;
                    report.bytes_stored += bytes;
                    report.blobs_present += present;
                    report.copied.push(label);
                    on_target.insert(version.clone());
                }
                Ok(Outcome::AlreadyPresent { restored, bytes }) => {
                    let note = match restored {
                        0 => String::new(),
                        n => format!("; restored {n} missing blob(s), {bytes} bytes"),
                    };
                    writeln!(
                        out,
                        "{label} is already published on the target: skipped{note}"
                    )?;
                    report.blobs_stored += restored;
                    report.bytes_stored += bytes;
                    report.already_present.push(label);
                    on_target.insert(version.clone());
                }
                Ok(Outcome::Unsigned) => {
                    writeln!(
                        out,
                        "WARNING: {label} was published unsigned upstream: skipped (a signed copy cannot be made)"
                    )?;
                    report.skipped_unsigned.push(label);
                }
                Err(e) => {
                    writeln!(out, "FAILED {label}: {e:#}")?;
                    report.failed.push((label, format!("{e:#}")));
                }
            }
        }
        if on_target.is_empty() {
            continue;
        }
        let have = target.aliases(&name)?;
        for a in up.list_aliases(&name)? {
            if !on_target.contains(&a.version) || have.get(&a.alias) == Some(&a.version) {
                continue;
            }
            let label = format!("{name}:{} -> {}", a.alias, a.version);
            match target.target().set_alias(&name, &a.alias, &a.version) {
                Ok(()) => {
                    writeln!(out, "alias {label}")?;
                    report.aliases_set.push(label);
                }
                Err(e) => {
                    writeln!(out, "FAILED alias {label}: {e:#}")?;
                    report
                        .failed
                        .push((format!("alias {label}"), format!("{e:#}")));
                }
            }
        }
    }
    writeln!(
        out,
        "mirrored {} version(s) from {} into {} ({} blob(s), {} bytes stored, {} already there); \
         {} already published, {} unsigned skipped, {} failed; {} alias(es) set",
        report.copied.len(),
        up.server(),
        target.describe(),
        report.blobs_stored,
        report.bytes_stored,
        report.blobs_present,
        report.already_present.len(),
        report.skipped_unsigned.len(),
        report.failed.len(),
        report.aliases_set.len()
    )?;
    Ok(report)
}

enum Outcome {
    Copied {
        stored: u64,
        bytes: u64,
        present: u64,
    },
    /// Published there already; `restored` blobs it had lost (a scrub
    /// quarantined them) were fetched again.
    AlreadyPresent {
        restored: u64,
        bytes: u64,
    },
    Unsigned,
}

/// Fetches again the blobs of `image@version`, published on the target
/// with the same manifest, that the target has lost (a scrub quarantined
/// them, or they went missing): the repair a mirror run makes.
fn restore_missing(
    up: &ApiClient,
    target: &Destination,
    manifest_bytes: &[u8],
    image: &str,
    version: &str,
) -> Result<(u64, u64)> {
    let manifest = parse_manifest_for(manifest_bytes, image, version)
        .map_err(|e| anyhow::anyhow!("upstream manifest: {e}"))?;
    let (mut restored, mut bytes) = (0, 0);
    for (digest, size, media_type) in manifest.blobs() {
        if target.has_blob(&digest, size)? {
            continue;
        }
        let what = format!("{}/v1/blobs/{digest}", up.server());
        let mut body = up.open_blob(&digest)?;
        target
            .store_blob(&digest, size, &media_type, &mut body, &what)
            .map_err(anyhow::Error::new)?;
        restored += 1;
        bytes += size;
    }
    Ok((restored, bytes))
}

fn mirror_version(
    up: &ApiClient,
    target: &Destination,
    (sigs, log): (&SignatureCheck, Option<&crate::tlog::consumer::LogPolicy>),
    image: &str,
    version: &str,
    private: bool,
) -> Result<Outcome> {
    let manifest_bytes = up.get_manifest_bytes(image, version)?;
    if let Some(there) = target.published_manifest(image, version)? {
        if there != manifest_bytes {
            bail!(
                "already published on the target with a different manifest (sha256 {} there, {} upstream)",
                Digest::of(&there),
                Digest::of(&manifest_bytes)
            );
        }
        let (restored, bytes) = restore_missing(up, target, &manifest_bytes, image, version)?;
        return Ok(Outcome::AlreadyPresent { restored, bytes });
    }
    let Some(signature) = up.get_manifest_signature(image, version)? else {
        return Ok(Outcome::Unsigned);
    };
    let manifest = parse_manifest_for(&manifest_bytes, image, version)
        .map_err(|e| anyhow::anyhow!("upstream manifest: {e}"))?;
    match sigs.check(&manifest_bytes, Some(&signature), image) {
        Ok(None) => {}
        Ok(Some(warning)) => log::warn!("{image}@{version}: {warning}"),
        Err(why) => bail!("the target would refuse its signature: {why}"),
    }
    if let Some(policy) = log.filter(|_| sigs.mode != crate::config::VerificationMode::Off) {
        check_upstream_log(
            up,
            policy,
            sigs,
            (image, version),
            &manifest_bytes,
            &signature,
        )?;
    }
    let (mut stored, mut bytes, mut present) = (0, 0, 0);
    for (digest, size, media_type) in manifest.blobs() {
        if target.has_blob(&digest, size)? {
            present += 1;
            continue;
        }
        let what = format!("{}/v1/blobs/{digest}", up.server());
        let mut body = up.open_blob(&digest)?;
        target
            .store_blob(&digest, size, &media_type, &mut body, &what)
            .map_err(anyhow::Error::new)?;
        stored += 1;
        bytes += size;
    }
    let staged = target.target().stage(&manifest, private)?;
    if staged != manifest_bytes {
        bail!(
            "the target's staged manifest (sha256 {}) differs from upstream's ({}); not published",
            Digest::of(&staged),
            Digest::of(&manifest_bytes)
        );
    }
    target.target().publish(image, version, Some(&signature))?;
    Ok(Outcome::Copied {
        stored,
        bytes,
        present,
    })
}

/// The upstream's transparency log holds exactly this publication (its manifest, the
/// key that signed it as the target's keys verify it, its time), consistently with
/// what this consumer saw of that log before (the same check as `imgsrv verify`'s).
/// Refused in enforce mode, a warning in warn mode.
fn check_upstream_log(
    up: &ApiClient,
    policy: &crate::tlog::consumer::LogPolicy,
    sigs: &SignatureCheck,
    (image, version): (&str, &str),
    manifest: &[u8],
    signature: &str,
) -> Result<()> {
    let proof = up.get_tlog_proof(image, version)?;
    let view = up.get_version(image, version)?;
    let entry = crate::tlog::entry::Entry::Publish {
        image: image.to_string(),
        version: version.to_string(),
        manifest: Digest::of(manifest),
        signer: crate::sign::verify_signed_by(&sigs.keys, manifest, signature)
            .ok()
            .map(|(_, v)| v.key_id),
        time: view
            .publication
            .and_then(|p| p.published_at)
            .unwrap_or_default(),
    };
    let consistency = |old, new| up.get_log_consistency(old, new).map_err(Into::into);
    match crate::tlog::consumer::check(policy, proof.as_deref(), &entry, &consistency) {
        Ok(_) => Ok(()),
        Err(why) if sigs.mode == crate::config::VerificationMode::Warn => {
            log::warn!("{image}@{version}: transparency log: {why} (mode warn: mirrored anyway)");
            Ok(())
        }
        Err(why) => bail!("transparency log: {why}"),
    }
}

/// Parses canonical manifest bytes and checks they are canonical and name
/// `image@version`.
pub fn parse_manifest_for(bytes: &[u8], image: &str, version: &str) -> Result<Manifest, String> {
    let m = crate::manifest::parse(bytes)?;
    if m.image != image || m.version != version {
        return Err(format!(
            "it names {}@{}, not {image}@{version}",
            m.image, m.version
        ));
    }
    if m.canonical() != bytes {
        return Err("it is not in canonical form".into());
    }
    if !crate::names::image_name(&m.image) || !crate::names::version(&m.version) {
        return Err(format!("invalid image or version name {image}@{version}"));
    }
    if m.artifacts.is_empty() {
        return Err("it has no artifact".into());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_blob_checks_digest_and_size_and_stores_nothing_wrong() {
        let d = tempfile::tempdir().unwrap();
        crate::app::init(d.path(), &[]).unwrap();
        let dest = Destination::open_data(d.path()).unwrap();
        let data = b"some blob bytes".to_vec();
        let digest = Digest::of(&data);
        let n = data.len() as u64;
        let store = |bytes: &[u8], size: u64| {
            dest.store_blob(&digest, size, "x", &mut &bytes[..], "member")
        };
        let e = store(b"some blob bytez", n).unwrap_err().to_string();
        assert!(e.starts_with("member: sha256 is"), "{e}");
        let e = store(&data[..5], n).unwrap_err().to_string();
        assert!(e.contains("5 bytes, expected"), "{e}");
        let mut longer = data.clone();
        longer.push(b'!');
        let e = store(&longer, n).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        assert!(!dest.has_blob(&digest, n).unwrap());
        store(&data, n).unwrap();
        assert!(dest.has_blob(&digest, n).unwrap());
        // already stored: still read and checked
        let e = store(b"some blob bytez", n).unwrap_err().to_string();
        assert!(e.contains("sha256 is"), "{e}");
        store(&data, n).unwrap();
    }

    #[test]
    fn signature_check_follows_the_mode() {
        let unsigned = SignatureCheck {
            mode: VerificationMode::Enforce,
            keys: Vec::new(),
        };
        assert!(unsigned
            .check(b"m", None, "x")
            .unwrap_err()
            .contains("no signature"));
        let warn = SignatureCheck {
            mode: VerificationMode::Warn,
            keys: Vec::new(),
        };
        assert!(warn
            .check(b"m", None, "x")
            .unwrap()
            .unwrap()
            .contains("warn"));
        let off = SignatureCheck {
            mode: VerificationMode::Off,
            keys: Vec::new(),
        };
        assert_eq!(off.check(b"m", Some("junk"), "x"), Ok(None));
    }

    #[test]
    fn manifests_must_name_what_is_asked_and_be_canonical() {
        let m = Manifest {
            schema: crate::manifest::SCHEMA.into(),
            image: "demo".into(),
            version: "1".into(),
            metadata: Default::default(),
            artifacts: vec![crate::manifest::ManifestArtifact {
                variant: "default".into(),
                operating_system: "demo".into(),
                architecture: "x86_64".into(),
                format: "squashfs".into(),
                digest: Digest::of(b"r"),
                size: 1,
                media_type: "x".into(),
                attachments: vec![],
            }],
        };
        let bytes = m.canonical();
        assert_eq!(parse_manifest_for(&bytes, "demo", "1").unwrap(), m);
        assert!(parse_manifest_for(&bytes, "demo", "2")
            .unwrap_err()
            .contains("names demo@1"));
        let pretty = serde_json::to_vec_pretty(&m).unwrap();
        assert!(parse_manifest_for(&pretty, "demo", "1")
            .unwrap_err()
            .contains("canonical"));
    }
}
