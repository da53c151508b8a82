//! `imgsrv backup --data DIR --out DEST`: an online backup of a data
//! directory, safe while `imgsrv serve` serves and publishes on it.
//!
//! 1. The `blobs` job lock is taken shared ([`MaintCatalog::job_lock`])
//!    before anything else, and held until every blob is copied: a GC holds
//!    it exclusive while it deletes, so no blob the snapshot cites can go
//!    away under the backup (a backup started during a GC waits for it).
//! 2. The catalog is snapshotted ([`MaintCatalog::snapshot_to`]): one
//!    consistent moment, taken while writers go on.
//! 3. The snapshot is opened as a catalog and its blob rows are the plan:
//!    a blob DEST already holds with the right size is skipped (a backup
//!    into the DEST of an earlier one copies only what is new). The plan is
//!    printed; `--dry-run` stops there.
//! 4. Each blob is copied through the blob stores ([`BlobStore::open_range`]
//!    on the source, [`BlobStore::put`] into DEST's store, which checks the
//!    sha256 and size of what it writes and keeps nothing else).
//! 5. The files a data directory needs to be served again (config, trusted
//!    keys, TLS certificate and key, admin token, the mirror jobs' keys,
//!    mirror status) are copied into a staging directory, secrets with mode
//!    0600.
//! 6. Commit: `backup.json` is removed, the staged files and the snapshot
//!    are renamed into place, and a new `backup.json` is written last.
//!
//! DEST is itself a data directory (a restore is a verified copy of it)
//! plus `backup.json`, the manifest: when, which imgsrv, the catalog's
//! sha256, the blob counts and every file with its sha256. A DEST without
//! `backup.json` is not a good backup: a crash at any point leaves either
//! the previous backup as it was (plus blobs it does not cite, which are
//! harmless and make the next run shorter) or no `backup.json` at all.
//! Blobs are only ever added to DEST: an older backup's are kept, so a
//! blob a later catalog no longer cites stays in DEST (remove DEST and back
//! up afresh to shed them).

use super::restore;
use crate::app::{App, CATALOG_FILE};
use crate::cas::{BlobStore, CasError, FsStore};
use crate::catalog::{Blob, Catalog, LockMode, MaintCatalog};
use crate::config::Config;
use crate::digest::{Digest, Hasher};
use anyhow::{bail, Context, Result};
use indicatif::HumanBytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// The manifest of a complete backup, written last.
pub const MANIFEST_FILE: &str = "backup.json";
/// Written first into a new DEST: marks it as an imgsrv backup directory, so
/// that a backup that did not finish can be run again into it.
pub const MARKER_FILE: &str = ".imgsrv-backup";
/// `backup.json` format.
pub const FORMAT: u32 = 1;
/// Where files outside the data directory (a TLS certificate in /etc) are
/// kept in a backup: `external/<absolute path>`.
pub const EXTERNAL_DIR: &str = "external";
/// Prefix of the staging directories in `DEST/tmp`.
const STAGING_PREFIX: &str = "backup-";

/// What to back up where.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub data_dir: PathBuf,
    pub out: PathBuf,
    pub dry_run: bool,
}

/// A count of blobs and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub count: u64,
    pub bytes: u64,
}

impl Counts {
    pub(crate) fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} blobs, {} bytes ({})",
            self.count,
            self.bytes,
            HumanBytes(self.bytes)
        )
    }
}

/// A file of a backup, with its path in DEST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to DEST (and to the data directory, for a file inside it).
    pub path: String,
    pub sha256: Digest,
    pub size: u64,
    /// Permission bits (0600 for secrets), written in octal.
    #[serde(with = "octal")]
    pub mode: u32,
    pub secret: bool,
    /// A file outside the data directory: where it was. Kept under
    /// [`EXTERNAL_DIR`]; a restore does not write outside its directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<PathBuf>,
}

/// Permission bits as an octal string (`"0600"`) in `backup.json`.
mod octal {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{mode:04o}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        u32::from_str_radix(&text, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("mode {text:?} is not octal 0000-0777"))
            })
    }
}

/// `backup.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created_at: String,
    pub imgsrv_version: String,
    /// The data directory backed up.
    pub source: PathBuf,
    /// The catalog snapshot (`catalog.db`).
    pub catalog: FileEntry,
    /// Every blob the catalog has a row for (all are in the backup).
    pub blobs: Counts,
    /// Of those, copied by the backup that wrote this manifest...
    pub copied: Counts,
    /// ... and already in DEST from an earlier one.
    pub skipped: Counts,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Reads `DEST/backup.json`; `None` when there is none.
    pub fn read(dest: &Path) -> Result<Option<Manifest>> {
        let path = dest.join(MANIFEST_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not an imgsrv backup manifest", path.display()))?;
        if m.format != FORMAT {
            bail!(
                "{} has format {}; this imgsrv ({}) reads format {FORMAT}",
                path.display(),
                m.format,
                env!("CARGO_PKG_VERSION")
            );
        }
        Ok(Some(m))
    }
}

/// What a backup did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct BackupReport {
    pub blobs: Counts,
    pub copied: Counts,
    pub skipped: Counts,
    pub files: usize,
    /// Blobs that could not be copied, with why and who cites them.
    pub failed: Vec<String>,
}

/// A file of the data directory that a backup carries.
#[derive(Debug, Clone)]
struct DataFile {
    src: PathBuf,
    /// Path in DEST.
    rel: PathBuf,
    secret: bool,
    original: Option<PathBuf>,
}

/// `path` relative to `dir` when it is inside it (lexically, with no `..`).
pub(crate) fn inside(dir: &Path, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(dir).ok()?;
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && rel.components().next().is_some()).then(|| rel.to_path_buf())
}

/// The files besides the catalog and the blobs that a data directory needs
/// to be served again, as `config` names them.
fn data_files(config: &Config) -> Result<Vec<DataFile>> {
    let data = &config.data_dir;
    let mut wanted: Vec<(PathBuf, bool)> = vec![
        (Config::path(data), false),
        (data.join(crate::auth::ADMIN_TOKEN_FILE), true),
        (data.join(crate::schedule::STATUS_FILE), false),
    ];
    let keys = data.join("keys");
    match fs::read_dir(&keys) {
        Ok(entries) => {
            for e in entries {
                let e = e.with_context(|| format!("reading {}", keys.display()))?;
                let hidden = e.file_name().to_string_lossy().starts_with('.');
                if !hidden && e.file_type()?.is_file() {
                    wanted.push((e.path(), false));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", keys.display())),
    }
    wanted.push((config.tls_cert.clone(), false));
    wanted.push((config.tls_key.clone(), true));
    // the transparency log's key: without it a restored server cannot go on with its log
    let log = data.join(crate::ledger::LOG_DIR);
    wanted.push((log.join(crate::ledger::KEY_FILE), true));
    wanted.push((log.join(crate::ledger::VKEY_FILE), false));
    let jobs = crate::schedule::parse_jobs(&config.mirrors, data)
        .context("reading the [[mirror]] jobs (their keys are backed up)")?;
    for j in jobs {
        wanted.push((j.options.key, true));
        wanted.extend(j.options.upstream_ca.map(|ca| (ca, false)));
    }
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    for (src, secret) in wanted {
        if !seen.insert(src.clone()) || !src.is_file() {
            continue;
        }
        let (rel, original) = match inside(data, &src) {
            Some(rel) => (rel, None),
            None => {
                let abs = std::path::absolute(&src)?;
                let under: PathBuf = abs
                    .components()
                    .filter(|c| matches!(c, Component::Normal(_)))
                    .collect();
                (Path::new(EXTERNAL_DIR).join(under), Some(abs))
            }
        };
        files.push(DataFile {
            src,
            rel,
            secret,
            original,
        });
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(files)
}

/// sha256 and size of the file at `path`.
pub(crate) fn file_digest(path: &Path) -> Result<(Digest, u64)> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Hasher::new();
    crate::digest::read_chunks(&mut f, |c| h.update(c))
        .with_context(|| format!("reading {}", path.display()))?;
    let n = h.len();
    Ok((h.finish(), n))
}

/// Makes `dir` and its missing parents with `mode`.
pub(crate) fn make_dirs(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Copies `src` to `dest` with permission bits `mode`: a temporary file
/// beside `dest`, synced, then renamed over it. Returns the sha256 and
/// size of what was written.
pub(crate) fn copy_file(src: &Path, dest: &Path, mode: u32) -> Result<(Digest, u64)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = dest.parent().unwrap_or(Path::new("."));
    make_dirs(dir, 0o700)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".copy-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    let mut input = fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", src.display())),
        };
        h.update(&buf[..n]);
        tmp.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dest.display()))?;
    }
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("writing {}", dest.display()))?;
    tmp.persist(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", dest.display()))?;
    sync_dir(dir)?;
    let n = h.len();
    Ok((h.finish(), n))
}

/// Moves `src` over `dest` (same filesystem), making `dest`'s directory.
fn move_into_place(src: &Path, dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    make_dirs(dir, 0o700)?;
    fs::rename(src, dest)
        .with_context(|| format!("moving {} to {}", src.display(), dest.display()))?;
    sync_dir(dir)
}

/// For every blob a version cites (artifact or attachment), the versions
/// citing it as `image@version` (drafts marked): to name what a bad blob
/// affects.
pub(crate) fn citing_versions(cat: &dyn Catalog) -> Result<BTreeMap<Digest, Vec<String>>> {
    let mut map: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    for img in cat.list_images(true)? {
        for v in cat.list_versions(&img.name, true)? {
            let view = cat.version_view(&img.name, &v.version)?;
            let name = match v.state {
                crate::catalog::VersionState::Published => format!("{}@{}", img.name, v.version),
                s => format!("{}@{} ({})", img.name, v.version, s.as_str()),
            };
            for a in &view.artifacts {
                let cited = std::iter::once(&a.artifact.primary_blob_digest)
                    .chain(a.attachments.iter().map(|t| &t.blob_digest));
                for d in cited {
                    let names = map.entry(*d).or_default();
                    if !names.contains(&name) {
                        names.push(name.clone());
                    }
                }
            }
        }
    }
    Ok(map)
}

/// `image@version, ...` citing `digest`, or a note that none does.
pub(crate) fn affected(map: &BTreeMap<Digest, Vec<String>>, digest: &Digest) -> String {
    match map.get(digest) {
        Some(v) if !v.is_empty() => format!("affects {}", v.join(", ")),
        _ => "cited by no version (an upload not attached yet)".to_string(),
    }
}

/// Refuses two directories (named by their options) of which one is, or
/// is inside, the other: a backup into its own data directory, a restore
/// into its backup.
pub(crate) fn check_apart(a: (&str, &Path), b: (&str, &Path)) -> Result<()> {
    let canon = |p: &Path| -> Result<PathBuf> {
        // it may not exist yet: its nearest existing ancestor, then the rest
        let mut existing = std::path::absolute(p)?;
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.file_name(), existing.parent()) {
                (Some(n), Some(parent)) => {
                    rest.push(n.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut c = existing.canonicalize().unwrap_or(existing);
        c.extend(rest.iter().rev());
        Ok(c)
    };
    let (ca, cb) = (canon(a.1)?, canon(b.1)?);
    if ca.starts_with(&cb) || cb.starts_with(&ca) {
        bail!(
            "{} {} and {} {} overlap: give directories apart from each other",
            a.0,
            a.1.display(),
            b.0,
            b.1.display()
        );
    }
    Ok(())
}

/// Entries of `dir` other than the lock file; `None` when it does not exist.
pub(crate) fn entries_besides_lock(dir: &Path) -> Result<Option<Vec<String>>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut names = Vec::new();
    for e in rd {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != crate::serve::LOCK_FILE {
            names.push(name);
        }
    }
    names.sort();
    Ok(Some(names))
}

/// Whether DEST may be written: new, empty, or an earlier backup's.
/// `Ok(true)` for an earlier backup (finished or not).
fn dest_state(dest: &Path) -> Result<bool> {
    if dest.exists() && !dest.is_dir() {
        bail!("--out {} is not a directory", dest.display());
    }
    let Some(names) = entries_besides_lock(dest)? else {
        return Ok(false);
    };
    if names.iter().any(|n| n == MANIFEST_FILE || n == MARKER_FILE) {
        return Ok(true);
    }
    if names.is_empty() {
        return Ok(false);
    }
    bail!(
        "--out {} is not empty and is not an imgsrv backup (it has no {MANIFEST_FILE} or \
         {MARKER_FILE}): give a new or empty directory, or the directory of an earlier backup",
        dest.display()
    )
}

/// The plan made from a snapshot: what to copy, what DEST already has.
struct Plan {
    to_copy: Vec<Blob>,
    copy: Counts,
    skip: Counts,
    total: Counts,
}

fn plan(snapshot: &dyn Catalog, dest: Option<&dyn BlobStore>) -> Result<Plan> {
    let mut p = Plan {
        to_copy: Vec::new(),
        copy: Counts::default(),
        skip: Counts::default(),
        total: Counts::default(),
    };
    let mut failed: Option<CasError> = None;
    snapshot.each_blob(&mut |b| {
        p.total.add(b.size_bytes);
        let have = match dest.map(|d| d.stat(&b.digest)).transpose() {
            Ok(have) => have.flatten(),
            Err(e) => {
                failed = Some(e);
                return false;
            }
        };
        if have == Some(b.size_bytes) {
            p.skip.add(b.size_bytes);
        } else {
            p.copy.add(b.size_bytes);
            p.to_copy.push(b);
        }
        true
    })?;
    if let Some(e) = failed {
        return Err(e).context("reading the backup's blob store");
    }
    Ok(p)
}

/// One line saying what a catalog holds.
fn describe(cat: &dyn Catalog, blobs: Counts) -> Result<String> {
    let images = cat.list_images(true)?;
    let (mut versions, mut published) = (0, 0);
    for i in &images {
        for v in cat.list_versions(&i.name, true)? {
            versions += 1;
            if v.state == crate::catalog::VersionState::Published {
                published += 1;
            }
        }
    }
    Ok(format!(
        "{} images, {versions} versions ({published} published), {blobs}",
        images.len()
    ))
}

/// Opens the data directory to back up (or to read a restore from).
pub(crate) fn open_source(data_dir: &Path) -> Result<App> {
    restore::refuse_incomplete(data_dir)?;
    let config = Config::load(data_dir, None)?;
    if !config.storage.is_embedded() {
        // A backup is a copy of the embedded stores (catalog.db and sha256/) that
        // restores into a data directory. A database and a bucket are backed up
        // with their own tools, consistently with each other: pg_dump (or the
        // database's PITR) and the bucket's replication or versioning.
        bail!(
            "{} keeps its catalog or blobs outside the directory ([storage] in {}): back up the PostgreSQL database with pg_dump and the S3 bucket with its own replication; `imgsrv backup` copies the embedded stores only",
            data_dir.display(),
            Config::path(data_dir).display()
        );
    }
    if !data_dir.join(CATALOG_FILE).is_file() {
        bail!(
            "{} has no catalog: it is not an imgsrv data directory",
            data_dir.display()
        );
    }
    App::open(config)
}

/// Runs a backup (see the module doc), printing the plan and the outcome to
/// `out`. Blobs that could not be copied are listed with the versions they
/// affect, and make it an error (no `backup.json` is written then). The
/// outcome goes into the source's audit log (`backup`).
pub fn backup(opts: &BackupOptions, out: &mut dyn Write) -> Result<BackupReport> {
    let src = open_source(&opts.data_dir)?;
    check_apart(("--data", &opts.data_dir), ("--out", &opts.out))?;
    let earlier = dest_state(&opts.out)?;
    let files = data_files(&src.config)?;
    writeln!(
        out,
        "backup of {} into {}{}",
        opts.data_dir.display(),
        opts.out.display(),
        if opts.dry_run { " (dry run)" } else { "" }
    )?;
    if opts.dry_run {
        return dry_run(&src, opts, earlier, &files, out);
    }
    let done = run(&src, opts, earlier, &files, out);
    let (outcome, detail) = match &done {
        Ok((r, m)) => (
            "ok",
            serde_json::json!({
                "blobs": r.blobs, "copied": r.copied, "skipped": r.skipped,
                "files": r.files, "catalog_sha256": m.catalog.sha256,
            }),
        ),
        Err(e) => ("failed", serde_json::json!({ "error": format!("{e:#}") })),
    };
    let audited = src.catalog.append_audit(&crate::catalog::AuditEntry {
        principal_name: Some(crate::admin_cli::local_actor()),
        action: "backup".into(),
        target: std::path::absolute(&opts.out)?.display().to_string(),
        outcome: outcome.into(),
        detail: detail.to_string(),
        ..Default::default()
    });
    if let Err(e) = audited {
        writeln!(
            out,
            "warning: the backup could not be recorded in the audit log: {e}"
        )?;
    }
    // for /metrics: the last successful backup, wherever it ran
    if let Err(e) = src.catalog.record_job_run(
        crate::metrics::JOB_BACKUP,
        done.is_ok(),
        &detail.to_string(),
    ) {
        writeln!(
            out,
            "warning: the backup's outcome could not be recorded: {e}"
        )?;
    }
    let (report, manifest) = done?;
    writeln!(
        out,
        "backup complete: copied {} blobs ({} bytes), skipped {} ({} bytes), {} files; \
         catalog {}; {}",
        report.copied.count,
        report.copied.bytes,
        report.skipped.count,
        report.skipped.bytes,
        report.files,
        manifest.catalog.sha256,
        opts.out.join(MANIFEST_FILE).display()
    )?;
    Ok(report)
}

/// The backup proper, once the source and DEST were checked.
fn run(
    src: &App,
    opts: &BackupOptions,
    earlier: bool,
    files: &[DataFile],
    out: &mut dyn Write,
) -> Result<(BackupReport, Manifest)> {
    // DEST: made 0700 (it holds secrets), locked against a server or a second
    // backup, marked as a backup directory before anything else is written
    if !opts.out.exists() {
        make_dirs(&opts.out, 0o700)?;
    }
    let _dest_lock = crate::serve::ServeLock::acquire_for(&opts.out, "backup")?;
    if !earlier {
        fs::write(
            opts.out.join(MARKER_FILE),
            "imgsrv backup directory: see backup.json (written when a backup is complete)\n",
        )
        .context("marking the backup directory")?;
        sync_dir(&opts.out)?;
    }
    let dest_store = FsStore::open(&opts.out).context("opening the backup's blob store")?;
    let tmp = opts.out.join("tmp");
    clear_stale_staging(&tmp)?;
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(&tmp)
        .with_context(|| format!("creating a staging directory in {}", tmp.display()))?;

    // the lock before the snapshot: no GC deletes what it cites until copied
    let blobs_lock = blobs_lock(src.catalog.as_ref(), out)?;
    let snap_path = staging.path().join(CATALOG_FILE);
    src.catalog
        .snapshot_to(&snap_path)
        .context("taking the catalog snapshot")?;
    let snapshot = crate::catalog::open_file(&snap_path).context("opening the snapshot")?;
    let p = plan(snapshot.as_ref(), Some(&dest_store))?;
    writeln!(
        out,
        "catalog snapshot: {}",
        describe(snapshot.as_ref(), p.total)?
    )?;
    print_plan(&p, files, out)?;
    dest_store.ensure_room(p.copy.bytes).with_context(|| {
        format!(
            "{} has no room for the {} this backup copies; nothing was copied",
            opts.out.display(),
            HumanBytes(p.copy.bytes)
        )
    })?;
    let mut report = BackupReport {
        blobs: p.total,
        skipped: p.skip,
        files: files.len(),
        ..Default::default()
    };
    let copied = copy_blobs(src.blobs.as_ref(), &dest_store, &p, &mut report);
    drop(blobs_lock);
    let bad = copied?;
    if !bad.is_empty() {
        let map = citing_versions(snapshot.as_ref())?;
        for (d, why) in &bad {
            let line = format!("blob {d}: {why}; {}", affected(&map, d));
            writeln!(out, "FAILED {line}")?;
            report.failed.push(line);
        }
        bail!(
            "{} of {} blobs could not be copied (listed above): this is not a complete backup \
             and no {MANIFEST_FILE} was written{}; `imgsrv scrub --data {}` checks the source's blobs",
            report.failed.len(),
            p.total.count,
            if earlier {
                " (the earlier backup in it is as it was)"
            } else {
                ""
            },
            opts.data_dir.display()
        );
    }
    drop(snapshot);
    let manifest = finish(opts, staging.path(), files, &report)?;
    Ok((report, manifest))
}

/// Copies the planned blobs, counting them into `report`; returns those
/// that failed, with why. A full DEST stops it.
fn copy_blobs(
    src: &dyn BlobStore,
    dest: &dyn BlobStore,
    p: &Plan,
    report: &mut BackupReport,
) -> Result<Vec<(Digest, String)>> {
    let mut bad = Vec::new();
    for b in &p.to_copy {
        match copy_blob(src, dest, b) {
            Ok(()) => report.copied.add(b.size_bytes),
            Err(e @ CasError::Full { .. }) => {
                return Err(e).context("the backup's disk filled up; no backup.json was written")
            }
            Err(e) => bad.push((b.digest, e.to_string())),
        }
    }
    Ok(bad)
}

/// Stages the files, writes the manifest and commits DEST.
fn finish(
    opts: &BackupOptions,
    staging: &Path,
    files: &[DataFile],
    report: &BackupReport,
) -> Result<Manifest> {
    use std::os::unix::fs::PermissionsExt;
    let staged = stage_files(files, staging)?;
    let snap_path = staging.join(CATALOG_FILE);
    fs::set_permissions(&snap_path, fs::Permissions::from_mode(0o600))?;
    let (sha, size) = file_digest(&snap_path)?;
    let manifest = Manifest {
        format: FORMAT,
        created_at: crate::catalog::now(),
        imgsrv_version: env!("CARGO_PKG_VERSION").to_string(),
        source: std::path::absolute(&opts.data_dir)?,
        catalog: FileEntry {
            path: CATALOG_FILE.to_string(),
            sha256: sha,
            size,
            mode: 0o600,
            secret: true,
            original: None,
        },
        blobs: report.blobs,
        copied: report.copied,
        skipped: report.skipped,
        files: staged.iter().map(|(e, _)| e.clone()).collect(),
    };
    commit(&opts.out, staging, &staged, &manifest)?;
    Ok(manifest)
}

/// The shared `blobs` lock, waiting (and saying so) while a GC holds it.
fn blobs_lock(cat: &dyn MaintCatalog, out: &mut dyn Write) -> Result<crate::catalog::JobLock> {
    if let Some(l) = cat.job_lock("blobs", LockMode::Shared, false)? {
        return Ok(l);
    }
    writeln!(
        out,
        "waiting for the blobs lock: a garbage collection is deleting blobs"
    )?;
    out.flush()?;
    cat.job_lock("blobs", LockMode::Shared, true)?
        .context("the blobs lock was not granted")
}

/// `--dry-run`: the snapshot goes into a temporary directory (removed), and
/// nothing is written to DEST.
fn dry_run(
    src: &App,
    opts: &BackupOptions,
    earlier: bool,
    files: &[DataFile],
    out: &mut dyn Write,
) -> Result<BackupReport> {
    let scratch = tempfile::Builder::new()
        .prefix("imgsrv-backup-plan-")
        .tempdir()
        .context("creating a temporary directory for the snapshot")?;
    let snap_path = scratch.path().join(CATALOG_FILE);
    src.catalog
        .snapshot_to(&snap_path)
        .context("taking the catalog snapshot")?;
    let snapshot = crate::catalog::open_file(&snap_path).context("opening the snapshot")?;
    let dest_store = match earlier {
        true => Some(FsStore::open(&opts.out).context("opening the backup's blob store")?),
        false => None,
    };
    let p = plan(
        snapshot.as_ref(),
        dest_store.as_ref().map(|s| s as &dyn BlobStore),
    )?;
    writeln!(
        out,
        "catalog snapshot: {}",
        describe(snapshot.as_ref(), p.total)?
    )?;
    print_plan(&p, files, out)?;
    writeln!(
        out,
        "dry run: nothing was written to {}",
        opts.out.display()
    )?;
    Ok(BackupReport {
        blobs: p.total,
        copied: p.copy,
        skipped: p.skip,
        files: files.len(),
        failed: Vec::new(),
    })
}

fn print_plan(p: &Plan, files: &[DataFile], out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "plan: copy {}; skip {} already in the backup",
        p.copy, p.skip
    )?;
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            let mut n = f.rel.display().to_string();
            if let Some(o) = &f.original {
                n = format!("{} (outside the data directory)", o.display());
            }
            if f.secret {
                n.push_str(" [0600]");
            }
            n
        })
        .collect();
    writeln!(out, "files: {}", names.join(", "))?;
    Ok(())
}

fn copy_blob(src: &dyn BlobStore, dest: &dyn BlobStore, b: &Blob) -> Result<(), CasError> {
    let mut r = src.open_range(&b.digest, 0, b.size_bytes)?;
    dest.put(&b.digest, b.size_bytes, &mut r)
}

/// Removes staging directories that earlier backups into DEST left behind
/// (the caller holds DEST's lock: no other backup is running).
fn clear_stale_staging(tmp: &Path) -> Result<()> {
    for e in fs::read_dir(tmp).with_context(|| format!("reading {}", tmp.display()))? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(STAGING_PREFIX) {
            fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Copies the data files into `staging/files/`; returns each file's entry
/// and its staged path.
fn stage_files(files: &[DataFile], staging: &Path) -> Result<Vec<(FileEntry, PathBuf)>> {
    use std::os::unix::fs::PermissionsExt;
    let mut staged = Vec::new();
    for f in files {
        let mode = match f.secret {
            true => 0o600,
            false => fs::metadata(&f.src)?.permissions().mode() & 0o777,
        };
        let at = staging.join("files").join(&f.rel);
        let (sha256, size) = copy_file(&f.src, &at, mode)?;
        staged.push((
            FileEntry {
                path: f.rel.display().to_string(),
                sha256,
                size,
                mode,
                secret: f.secret,
                original: f.original.clone(),
            },
            at,
        ));
    }
    Ok(staged)
}

/// Makes DEST the backup `manifest` describes: removes `backup.json`, moves
/// the staged files and the snapshot into place (removing files an earlier
/// backup listed that this one does not), then writes `backup.json`.
fn commit(
    dest: &Path,
    staging: &Path,
    staged: &[(FileEntry, PathBuf)],
    manifest: &Manifest,
) -> Result<()> {
    let old = Manifest::read(dest).ok().flatten();
    let mut text = serde_json::to_vec_pretty(manifest)?;
    text.push(b'\n');
    let manifest_tmp = staging.join(MANIFEST_FILE);
    fs::write(&manifest_tmp, &text).context("writing the manifest")?;
    fs::File::open(&manifest_tmp)?.sync_all()?;

    let manifest_path = dest.join(MANIFEST_FILE);
    match fs::remove_file(&manifest_path) {
        Ok(()) => sync_dir(dest)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", manifest_path.display())),
    }
    for (e, at) in staged {
        move_into_place(at, &dest.join(&e.path))?;
    }
    let kept: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    for stale in old.iter().flat_map(|m| &m.files) {
        if !kept.contains(stale.path.as_str()) && inside(dest, &dest.join(&stale.path)).is_some() {
            let _ = fs::remove_file(dest.join(&stale.path));
        }
    }
    move_into_place(&staging.join(CATALOG_FILE), &dest.join(CATALOG_FILE))?;
    move_into_place(&manifest_tmp, &manifest_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_inside_the_data_directory_keep_their_place() {
        let d = Path::new("/srv/data");
        assert_eq!(
            inside(d, Path::new("/srv/data/tls/cert.pem")),
            Some(PathBuf::from("tls/cert.pem"))
        );
        assert_eq!(inside(d, Path::new("/srv/data/../etc/key.pem")), None);
        assert_eq!(inside(d, Path::new("/etc/imgsrv/key.pem")), None);
        assert_eq!(inside(d, Path::new("/srv/data")), None);
    }

    #[test]
    fn a_destination_overlapping_the_data_directory_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        fs::create_dir_all(&data).unwrap();
        let apart = |out: &Path| check_apart(("--data", &data), ("--out", out));
        assert!(apart(&data).is_err());
        assert!(apart(&data.join("backup/new")).is_err());
        assert!(apart(t.path()).is_err());
        assert!(apart(&t.path().join("backup")).is_ok());
        assert!(
            apart(&t.path().join("data2")).is_ok(),
            "a sibling named alike"
        );
    }

    #[test]
    fn only_a_new_empty_or_backup_directory_is_written() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("b");
        assert!(!dest_state(&dest).unwrap());
        fs::create_dir(&dest).unwrap();
        assert!(!dest_state(&dest).unwrap());
        fs::write(dest.join("notes.txt"), "mine").unwrap();
        let e = dest_state(&dest).unwrap_err().to_string();
        assert!(e.contains("not an imgsrv backup"), "{e}");
        fs::write(dest.join(MARKER_FILE), "").unwrap();
        assert!(dest_state(&dest).unwrap());
        assert!(dest_state(&dest.join("notes.txt")).is_err());
    }
}
