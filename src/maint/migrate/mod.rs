//! `imgsrv migrate --from DATA_DIR --to CONFIG`: an embedded appliance (the SQLite
//! catalog and the blob files in DATA_DIR) copied into the deployment CONFIG names
//! (an `imgsrv.toml` whose `[storage]` is PostgreSQL and/or S3), faithfully: the
//! same ids, timestamps, fingerprints, manifests and signatures, so that the copy
//! serves the same Simple Streams index and every signature still verifies.
//!
//! # What is copied
//! The whole catalog through
//! [`TransferCatalog`](crate::catalog::transfer::TransferCatalog) (which keeps the
//! target's guards armed, see `catalog/transfer.rs`): blob rows, principals with their grants and
//! tokens (their hashes: the same tokens keep working), images, versions in every
//! state with their artifacts, attachments, metadata, publish records (manifests,
//! signatures), projection rows, retirements and collections, aliases, the audit
//! log (same ids and times), the last job runs, and the trusted publisher keys
//! with their scopes, retirements and revocations (also those of keys no longer
//! listed: a removed or revoked key is never trusted on the deployment either);
//! every blob the catalog has a row for; the transparency log, entry for entry, with
//! its checkpoints ([`tlog`]). Beside the catalog: the TLS certificate and the log's
//! key ([`files`]), and the settings the deployment's configuration lacks, named, not
//! written. Not copied: upload sessions (uploads in progress start again on the
//! deployment), blob pins, and the failed-login throttle's counts.
//!
//! # The source is stopped and only read
//! The source's `serve.lock` is held for the whole run: `imgsrv serve` on it is
//! refused meanwhile, and a running server makes `migrate` refuse ("stop it
//! first"), so nothing is published into it that the copy would then lack. Its
//! catalog is read from a snapshot ([`MaintCatalog::snapshot_to`] into a temporary
//! directory): one moment, whatever a local admin command does meanwhile. Its
//! `blobs` lock is held shared while blobs are copied, as a backup holds it (a GC
//! waits). Nothing else in DATA_DIR is written (opening it applies pending schema
//! migrations of an older imgsrv, as every command does).
//!
//! # Plan, then apply; resumable
//! The plan compares every item of the source with the target: missing (to copy),
//! the same (copied by an earlier run: recognised, not copied again) or different.
//! It is printed; `--dry-run` stops there and writes nothing to the target. The
//! target must be empty, or hold a partial copy of this source (every item it has
//! is the source's, unchanged), which a migrate that was interrupted (kill -9, an
//! outage) or failed left; anything else is refused with what to do.
//!
//! Applying marks the target first (a job-run row `migrate`, see [`refuse_unfinished`]):
//! until the migration completes, `imgsrv serve`, `init`, the admin commands, `gc`
//! and `scrub` refuse the target's catalog on every instance, so a half-filled
//! deployment is never served and `init` makes no second admin. Then, in
//! dependency order: blobs (each copied unless the bucket already has it, read back
//! and its sha256 checked, then its row loaded: a row in the target means its bytes
//! were verified; a blob an earlier run recorded is read back and hashed again, and
//! copied again if the target's bytes are missing or damaged), trusted keys (each
//! with its retirement and revocation in one transaction), principals, images,
//! versions, aliases, the audit log, job runs. One bad item (a blob damaged in the
//! source, the versions citing it) is counted and reported, and the rest is copied.
//! A catalog or store that cannot be reached stops the run (run it again).
//!
//! A target that holds a completed migration is left alone: of this appliance,
//! unchanged, "nothing to do"; anything of the source it lacks (or gives to
//! another id: another appliance's) is refused, as the deployment may be serving.
//!
//! # Verified on the far side
//! Every item is read back from the target and compared with the source; every
//! published version's stored manifest is checked against its digest, its
//! signature verified with the migrated trusted keys, and its blobs found in the target
//! store with their sizes. Only then is the migration marked complete (and an
//! audit row `migrate` appended to the target's log). With failures it stays
//! incomplete and the command exits non-zero; a second run after success changes
//! nothing and says so.

mod check;
mod copy;
mod files;
mod plan;
mod tlog;

use super::backup::Counts;
use crate::cas::BlobStore;
use crate::catalog::{Catalog, LockMode, MaintCatalog};
use crate::config::{BlobBackend, CatalogBackend, Config, StorageConfig};
use anyhow::{bail, Context, Result};
use indicatif::HumanBytes;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The job-run row that marks a catalog `imgsrv migrate` is filling (or filled).
pub const MARKER_JOB: &str = "migrate";

/// What to migrate where.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The appliance's data directory.
    pub from: PathBuf,
    /// The deployment's `imgsrv.toml`.
    pub to: PathBuf,
    /// Print the plan and stop.
    pub dry_run: bool,
}

/// Items of one kind: how many the source has, how many this run loaded, and how
/// many an earlier run had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub total: u64,
    pub loaded: u64,
    pub present: u64,
}

/// What a migration did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrateReport {
    /// Every blob the source has a row for.
    pub blobs: Counts,
    /// Sent to the target store by this run...
    pub copied: Counts,
    /// ... found there already (an interrupted run's), read back and checked...
    pub found: Counts,
    /// ... and recorded in the target by an earlier run (not copied again).
    pub skipped: Counts,
    /// Read back from the target store and hashed by this run: every blob but
    /// those that failed.
    pub verified: Counts,
    pub principals: Tally,
    pub images: Tally,
    pub versions: Tally,
    pub aliases: Tally,
    pub audit_rows: Tally,
    pub job_runs: Tally,
    /// Trusted keys (with their retirements and revocations).
    pub keys: Tally,
    /// Retirements and revocations of keys no longer listed.
    pub key_states: Tally,
    /// Entries of the transparency log.
    pub log_entries: Tally,
    /// Published versions whose signature verified on the target.
    pub signatures_verified: u64,
    /// Upload sessions of the source, not copied.
    pub uploads_skipped: u64,
    /// The target held this complete migration already: nothing was done.
    pub already_complete: bool,
    pub notes: Vec<String>,
    pub failed: Vec<String>,
}

/// What the marker row says (its `detail`, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Marker {
    /// `incomplete` or `complete`.
    pub state: String,
    /// The data directory migrated.
    pub source: PathBuf,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
}

const INCOMPLETE: &str = "incomplete";
const COMPLETE: &str = "complete";

impl Marker {
    /// The marker of `cat`, if `imgsrv migrate` ever wrote into it. A row that
    /// does not parse counts as an unfinished migration from an unknown source.
    pub(crate) fn read(cat: &dyn Catalog) -> Result<Option<Marker>> {
        let runs = cat.job_runs().context("reading the catalog's job runs")?;
        Ok(runs.into_iter().find(|r| r.job == MARKER_JOB).map(|r| {
            serde_json::from_str(&r.detail).unwrap_or_else(|_| Marker {
                state: INCOMPLETE.into(),
                source: PathBuf::from("?"),
                started_at: r.last_attempt_at,
                completed_at: None,
            })
        }))
    }

    fn write(&self, cat: &dyn Catalog) -> Result<()> {
        let detail = serde_json::to_string(self)?;
        cat.record_job_run(MARKER_JOB, self.state == COMPLETE, &detail)
            .context("marking the target catalog")
    }

    fn complete(&self) -> bool {
        self.state == COMPLETE
    }
}

/// An error unless `cat` may be used: a catalog `imgsrv migrate` has begun to
/// fill and not completed is refused by every command but `migrate` (a half-filled
/// deployment must not be served, and `init` must not make an admin in it).
pub fn refuse_unfinished(cat: &dyn Catalog) -> Result<()> {
    match Marker::read(cat)? {
        Some(m) if !m.complete() => bail!(
            "this catalog is being filled by `imgsrv migrate --from {}` (started {}), which \
             has not completed: run that command again to finish it (it goes on where it \
             stopped); until then nothing else may use the catalog",
            m.source.display(),
            m.started_at
        ),
        _ => Ok(()),
    }
}

/// The appliance, opened for reading.
pub(super) struct Source {
    pub dir: PathBuf,
    pub config: Config,
    pub catalog: Arc<dyn Catalog>,
    pub blobs: Arc<dyn BlobStore>,
}

/// The deployment, opened.
pub(super) struct Target {
    /// The directory of CONFIG: the deployment instance's data directory.
    pub dir: PathBuf,
    pub config: PathBuf,
    pub storage: StorageConfig,
    pub catalog: Arc<dyn Catalog>,
    pub blobs: Arc<dyn BlobStore>,
}

impl Target {
    fn describe(&self) -> String {
        let catalog = match &self.storage.catalog {
            CatalogBackend::Sqlite => format!(
                "catalog {}",
                self.dir.join(crate::catalog::SQLITE_FILE).display()
            ),
            CatalogBackend::Postgres { url } => {
                format!("PostgreSQL {}", crate::config::redact_url(url))
            }
        };
        let blobs = match &self.storage.blobs {
            BlobBackend::Fs => format!("blobs in {}", self.dir.join("sha256").display()),
            BlobBackend::S3(s) => format!("S3 {} bucket {}", s.endpoint, s.bucket),
        };
        format!("{catalog}, {blobs}")
    }
}

/// Opens the appliance at `dir`: an embedded data directory, not served.
fn open_source(dir: &Path) -> Result<(Source, crate::serve::ServeLock)> {
    super::restore::refuse_incomplete(dir)?;
    if !dir.join(crate::catalog::SQLITE_FILE).is_file() {
        bail!(
            "--from {} has no {}: it is not an imgsrv appliance's data directory; give the \
             directory the appliance is served from (the --data of its `imgsrv serve`, e.g. \
             /var/lib/imgsrv)",
            dir.display(),
            crate::catalog::SQLITE_FILE
        );
    }
    let config = Config::load(dir, None)?;
    if !config.storage.is_embedded() {
        bail!(
            "--from {} keeps its catalog or blobs outside the directory ([storage] in {}): \
             migrate copies an embedded appliance (catalog.db and sha256/) into a deployment",
            dir.display(),
            Config::path(dir).display()
        );
    }
    let lock = crate::serve::ServeLock::acquire_for(dir, "migrate").with_context(|| {
        format!(
            "migrate copies a stopped appliance: stop `imgsrv serve` on {} first (nothing \
             may be published into it while it is copied)",
            dir.display()
        )
    })?;
    let catalog = crate::catalog::open(&config.storage, dir)?;
    let blobs = crate::cas::open(&config.storage, dir)?;
    Ok((
        Source {
            dir: dir.to_path_buf(),
            config,
            catalog,
            blobs,
        },
        lock,
    ))
}

/// The deployment CONFIG names, read and checked before anything is opened: a
/// `--to` that is refused changes nothing anywhere.
struct TargetConfig {
    /// The directory of CONFIG: the deployment instance's data directory.
    dir: PathBuf,
    config: PathBuf,
    storage: StorageConfig,
    /// The whole of CONFIG, as `imgsrv serve` on it will read it.
    parsed: Config,
}

impl TargetConfig {
    fn read(config: &Path, source: &Path) -> Result<TargetConfig> {
        let text = std::fs::read_to_string(config).with_context(|| {
            format!(
                "--to {}: reading the deployment's imgsrv.toml (give the path of the file: \
                 an imgsrv.toml whose [storage] names PostgreSQL and S3, see docs/deployment.md)",
                config.display()
            )
        })?;
        let abs = std::path::absolute(config)?;
        let dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
        super::backup::check_apart(("--from", source), ("--to's directory", &dir))?;
        let parsed =
            Config::parse(&dir, &text, None).with_context(|| format!("in {}", config.display()))?;
        if parsed.storage.is_embedded() {
            bail!(
                "--to {} names the embedded stores (no [storage] section, or catalog = \
                 \"sqlite\" and blobs = \"fs\"): migrate moves an appliance onto PostgreSQL and \
                 S3: write [storage] catalog = \"postgres\", postgres_url = ..., blobs = \"s3\" \
                 and [storage.s3] into it (see docs/deployment.md). A copy of an appliance onto \
                 another box is `imgsrv backup` then `imgsrv restore`",
                config.display()
            );
        }
        let missing: Vec<&str> = [
            (
                "PostgreSQL",
                !cfg!(feature = "postgres")
                    && matches!(parsed.storage.catalog, CatalogBackend::Postgres { .. }),
            ),
            (
                "S3",
                !cfg!(feature = "s3") && matches!(parsed.storage.blobs, BlobBackend::S3(_)),
            ),
        ]
        .into_iter()
        .filter_map(|(what, lacking)| lacking.then_some(what))
        .collect();
        if !missing.is_empty() {
            bail!(
                "--to {} names {}, and this imgsrv was built without {} support: build the \
                 deployment's imgsrv with `cargo build --release --locked --features full` and \
                 run migrate with that binary (nothing was changed)",
                config.display(),
                missing.join(" and "),
                missing.join(" and ")
            );
        }
        // opening the target would import key files found there (an older
        // appliance's DATA/keys copied along): the keys come from the appliance's
        // catalog
        let keys = dir.join("keys");
        if keys.exists() {
            bail!(
                "{} exists: the trusted keys are migrated from the appliance's catalog, and \
                 key files there would be imported into the target first. Move it out of the \
                 deployment's directory (copy only imgsrv.toml and tls/ from the appliance), \
                 then run migrate again",
                keys.display()
            );
        }
        if abs.file_name() != Some(std::ffi::OsStr::new(crate::config::CONFIG_FILE)) {
            log::warn!(
                "{} is not named {}: `imgsrv serve --data {}` reads {}",
                config.display(),
                crate::config::CONFIG_FILE,
                dir.display(),
                Config::path(&dir).display()
            );
        }
        Ok(TargetConfig {
            dir,
            config: config.to_path_buf(),
            storage: parsed.storage.clone(),
            parsed,
        })
    }

    /// Opens the stores (its directory is the instance's data directory, locked
    /// against `imgsrv serve` on it meanwhile).
    fn open(self) -> Result<(Target, crate::serve::ServeLock)> {
        let lock = crate::serve::ServeLock::acquire_for(&self.dir, "migrate")?;
        let catalog = crate::catalog::open(&self.storage, &self.dir)?;
        let blobs = crate::cas::open(&self.storage, &self.dir)?;
        Ok((
            Target {
                dir: self.dir,
                config: self.config,
                storage: self.storage,
                catalog,
                blobs,
            },
            lock,
        ))
    }
}

/// Runs a migration (see the module doc), printing the plan and the outcome to
/// `out`. Failures are listed, and make it an error once everything else was
/// copied.
pub fn migrate(opts: &MigrateOptions, out: &mut dyn Write) -> Result<MigrateReport> {
    let target = TargetConfig::read(&opts.to, &opts.from)?;
    let target_config = target.parsed.clone();
    let (src, _src_lock) = open_source(&opts.from)?;
    let (dst, _dst_lock) = target.open()?;
    writeln!(
        out,
        "migrate of {} into {} ({}){}",
        src.dir.display(),
        dst.config.display(),
        dst.describe(),
        if opts.dry_run { " (dry run)" } else { "" }
    )?;

    // the blobs lock before the snapshot: no GC takes what it cites until copied
    let src_blobs_lock = blobs_lock(src.catalog.as_ref(), "the appliance's", out)?;
    let scratch = tempfile::Builder::new()
        .prefix("imgsrv-migrate-")
        .tempdir()
        .context("creating a temporary directory for the catalog snapshot")?;
    let snap_path = scratch.path().join(crate::catalog::SQLITE_FILE);
    src.catalog
        .snapshot_to(&snap_path)
        .context("taking the catalog snapshot")?;
    let snapshot: Arc<dyn Catalog> =
        Arc::from(crate::catalog::open_file(&snap_path).context("opening the snapshot")?);
    let source = plan::Inventory::read(snapshot.as_ref()).context("reading the appliance")?;
    let marker = Marker::read(dst.catalog.as_ref())?;
    let plan = plan::Plan::make(&source, snapshot.as_ref(), &dst, marker.as_ref(), &src.dir)?;
    plan.print(&source, out)?;
    let files = files::Files::plan(&src.config, &target_config, &dst.config)?;
    files.print(out)?;

    let mut report = plan.report(&source);
    report.notes.extend(files.notes.iter().cloned());
    if let Some(m) = marker.as_ref().filter(|m| m.complete()) {
        writeln!(
            out,
            "nothing to do: the target already holds this appliance, migrated by a run that \
             completed {}",
            m.completed_at.as_deref().unwrap_or("earlier")
        )?;
        report.already_complete = true;
        return Ok(report);
    }
    if opts.dry_run {
        writeln!(out, "dry run: nothing was written to the target")?;
        return Ok(report);
    }

    let started_at = match &marker {
        Some(m) => m.started_at.clone(),
        None => crate::catalog::now(),
    };
    let mut m = Marker {
        state: INCOMPLETE.into(),
        source: std::path::absolute(&src.dir)?,
        started_at,
        completed_at: None,
    };
    m.write(dst.catalog.as_ref())?;
    tlog::claim(snapshot.as_ref(), dst.catalog.as_ref())?;
    files.apply(out)?;
    let dst_blobs_lock = blobs_lock(dst.catalog.as_ref(), "the deployment's", out)?;
    let mut run = copy::Run::new(
        &src,
        &dst,
        snapshot.as_ref(),
        &source,
        &plan,
        &mut report,
        out,
    );
    run.blobs()?;
    drop(src_blobs_lock);
    run.rows()?;
    let not_copied = run.not_copied();
    drop(run);
    tlog::copy(snapshot.as_ref(), dst.catalog.as_ref(), &mut report, out)?;
    check::after(&dst, snapshot.as_ref(), &source, &not_copied, &mut report)?;
    drop(dst_blobs_lock);

    for n in &report.notes {
        writeln!(out, "note: {n}")?;
    }
    if !report.failed.is_empty() {
        for f in &report.failed {
            writeln!(out, "FAILED {f}")?;
        }
        bail!(
            "migrate failed: {} problems (listed above); everything else was copied and checked. \
             The target stays marked as an unfinished migration (`imgsrv serve` refuses it): \
             repair the source (`imgsrv scrub --data {}` finds damaged blobs; put the right \
             bytes back from a backup, or retire or delete what cites them), then run the \
             same `imgsrv migrate` again: it copies only what is missing",
            report.failed.len(),
            src.dir.display()
        );
    }
    m.state = COMPLETE.into();
    m.completed_at = Some(crate::catalog::now());
    m.write(dst.catalog.as_ref())?;
    let audited = dst.catalog.append_audit(&crate::catalog::AuditEntry {
        principal_name: Some(crate::admin_cli::local_actor()),
        action: "migrate".into(),
        target: m.source.display().to_string(),
        outcome: "ok".into(),
        detail: serde_json::json!({
            "blobs": report.blobs, "copied": report.copied, "found": report.found,
            "skipped": report.skipped, "verified": report.verified,
            "keys": report.keys.total, "versions": report.versions.total,
            "signatures_verified": report.signatures_verified,
        })
        .to_string(),
        ..Default::default()
    });
    if let Err(e) = audited {
        writeln!(
            out,
            "warning: the migration could not be recorded in the target's audit log: {e}"
        )?;
    }
    writeln!(
        out,
        "migrate complete: {} blobs ({}): {} copied, {} found in the store, {} copied by an \
         earlier run; every one read back from the target and hashed. {} trusted keys, {} \
         principals, {} images, {} versions ({} signatures verified with the migrated keys), \
         {} aliases, {} audit rows. Serve it with `imgsrv serve --data {}`",
        report.blobs.count,
        HumanBytes(report.blobs.bytes),
        report.copied.count,
        report.found.count,
        report.skipped.count,
        report.keys.total,
        report.principals.total,
        report.images.total,
        report.versions.total,
        report.signatures_verified,
        report.aliases.total,
        report.audit_rows.total,
        dst.dir.display()
    )?;
    Ok(report)
}

/// The shared `blobs` lock of `cat`, waiting (and saying so) while a GC holds it.
fn blobs_lock(
    cat: &dyn MaintCatalog,
    whose: &str,
    out: &mut dyn Write,
) -> Result<crate::catalog::JobLock> {
    if let Some(l) = cat.job_lock(super::gc::BLOBS_LOCK, LockMode::Shared, false)? {
        return Ok(l);
    }
    writeln!(
        out,
        "waiting for {whose} blobs lock: a garbage collection is deleting blobs"
    )?;
    out.flush()?;
    cat.job_lock(super::gc::BLOBS_LOCK, LockMode::Shared, true)?
        .context("the blobs lock was not granted")
}

/// The trusted keys the copy's signatures are checked against: the target
/// catalog's, as migrated (with their scopes, retirements and revocations).
pub(super) fn trusted_keys(dst: &Target) -> Result<Vec<crate::sign::TrustedKey>> {
    crate::sign::load_trusted_keys(dst.catalog.as_ref())
        .context("reading the deployment's trusted keys")
}
