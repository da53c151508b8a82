//! `imgsrv restore --from DEST --data NEWDIR`: a verified copy of a backup
//! (see [`super::backup`]) into a new data directory, usable only once
//! everything checked out.
//!
//! * NEWDIR is locked as a server would lock it ([`crate::serve::ServeLock`])
//!   for the whole restore: a directory a running server holds is refused,
//!   and no server starts on NEWDIR meanwhile.
//! * NEWDIR must be new or empty. The one exception is a restore that did
//!   not finish: it left [`INCOMPLETE_MARKER`] in NEWDIR, and a restore into
//!   it clears what it holds and starts over.
//! * [`INCOMPLETE_MARKER`] is written before anything else and removed only
//!   when every check passed. While it is there, `imgsrv serve`, `imgsrv
//!   init`, the local admin commands and `imgsrv backup` refuse NEWDIR
//!   ([`refuse_incomplete`]): a failed or interrupted restore never looks
//!   like a usable, empty or half-filled data directory.
//! * The checks, in order: the catalog file's sha256 against `backup.json`;
//!   every file's sha256; the catalog opened as a catalog (migrations and
//!   repairs run) and its storage checked ([`MaintCatalog::check_integrity`]);
//!   every blob it has a row for copied through the blob stores, sha256 and
//!   size checked as it is written; every published version's blobs present
//!   with their sizes; every published version's stored manifest matching
//!   its digest, and its signature verifying with the restored trusted keys.
//!   A problem with a blob names the versions it affects.

use super::backup::{
    affected, citing_versions, copy_file, entries_besides_lock, file_digest, inside, sync_dir,
    Counts, FileEntry, Manifest, MANIFEST_FILE,
};
use crate::app::{App, CATALOG_FILE};
use crate::cas::{BlobStore, CasError, FsStore};
use crate::catalog::{Blob, Catalog, Verification, VersionState};
use crate::config::Config;
use crate::digest::Digest;
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// In a data directory while a restore into it runs, and after one that
/// failed or was interrupted: the directory is not usable.
pub const INCOMPLETE_MARKER: &str = "RESTORE-INCOMPLETE";

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// A backup directory (with `backup.json`).
    pub from: PathBuf,
    /// The data directory to make (new or empty).
    pub data_dir: PathBuf,
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub blobs: Counts,
    pub files: usize,
    pub signatures_verified: usize,
    /// Not failures, but worth reading (a file kept outside the directory,
    /// a version published without a verified signature...).
    pub notes: Vec<String>,
    pub failed: Vec<String>,
}

/// An error unless `data_dir` is usable: a restore into it that did not
/// finish leaves [`INCOMPLETE_MARKER`] in it.
pub fn refuse_incomplete(data_dir: &Path) -> Result<()> {
    if data_dir.join(INCOMPLETE_MARKER).exists() {
        bail!(
            "{} is not usable: a restore into it failed or did not finish ({INCOMPLETE_MARKER} is \
             in it); run `imgsrv restore --from BACKUP --data {}` again (it starts over), or \
             remove the directory",
            data_dir.display(),
            data_dir.display()
        );
    }
    Ok(())
}

/// Whether `data_dir` may be restored into: `Ok(true)` when it holds what
/// an unfinished restore left, `Ok(false)` when it is new or empty.
fn restorable(data_dir: &Path) -> Result<bool> {
    if data_dir.exists() && !data_dir.is_dir() {
        bail!("--data {} is not a directory", data_dir.display());
    }
    match entries_besides_lock(data_dir)? {
        None => Ok(false),
        Some(names) if names.is_empty() => Ok(false),
        Some(names) if names.iter().any(|n| n == INCOMPLETE_MARKER) => Ok(true),
        Some(names) => bail!(
            "--data {} is not empty ({}{}): restore writes only into a new or empty directory \
             (or one an unfinished restore left, marked {INCOMPLETE_MARKER}); give another \
             directory, or empty this one",
            data_dir.display(),
            names.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if names.len() > 5 { ", ..." } else { "" }
        ),
    }
}

/// Removes everything an unfinished restore left in `data_dir` but the lock.
fn clear_leftover(data_dir: &Path) -> Result<()> {
    for e in fs::read_dir(data_dir)? {
        let e = e?;
        if e.file_name() == crate::serve::LOCK_FILE {
            continue;
        }
        let p = e.path();
        let removed = match e.file_type()?.is_dir() {
            true => fs::remove_dir_all(&p),
            false => fs::remove_file(&p),
        };
        removed.with_context(|| format!("removing {}", p.display()))?;
    }
    sync_dir(data_dir)
}

/// Restores a backup (see the module doc), printing the plan and the
/// outcome to `out`. Any problem is an error, after all of them are listed;
/// the directory is then left unusable.
pub fn restore(opts: &RestoreOptions, out: &mut dyn Write) -> Result<RestoreReport> {
    let (from, data) = (&opts.from, &opts.data_dir);
    let manifest = Manifest::read(from)?.with_context(|| {
        format!(
            "{} is not a complete imgsrv backup: it has no {MANIFEST_FILE} (a backup that did \
             not finish, or not a backup); run `imgsrv backup` again",
            from.display()
        )
    })?;
    super::backup::check_apart(("--from", from), ("--data", data))?;
    // before the lock makes the directory (and its lock file): refuse a
    // non-empty one untouched; a server's directory has its lock already,
    // and taking it is what says a server holds it
    if !data.join(crate::serve::LOCK_FILE).exists() {
        restorable(data)?;
    }
    let _lock = crate::serve::ServeLock::acquire_for(data, "restore")?;
    if restorable(data)? {
        writeln!(
            out,
            "clearing what an unfinished restore left in {}",
            data.display()
        )?;
        clear_leftover(data)?;
    }
    fs::write(
        data.join(INCOMPLETE_MARKER),
        "an imgsrv restore into this directory is running, failed or was interrupted: \
         the directory is not usable until a restore into it completes\n",
    )
    .context("marking the directory as being restored")?;
    sync_dir(data)?;
    writeln!(
        out,
        "restore of {} (a backup of {} taken {} by imgsrv {}) into {}",
        from.display(),
        manifest.source.display(),
        manifest.created_at,
        manifest.imgsrv_version,
        data.display()
    )?;
    writeln!(
        out,
        "plan: catalog ({} bytes), {}, {} files",
        manifest.catalog.size,
        manifest.blobs,
        manifest.files.len()
    )?;

    let mut report = RestoreReport::default();
    restore_catalog(from, data, &manifest.catalog)?;
    for f in &manifest.files {
        restore_file(from, data, f, &mut report)?;
    }
    let app = App::open(Config::load(data, None).context("loading the restored configuration")?)
        .context("opening the restored data directory")?;
    let problems = app.catalog.check_integrity()?;
    if !problems.is_empty() {
        bail!(
            "the restored catalog is damaged ({}); {} is left unusable",
            problems.join("; "),
            data.display()
        );
    }
    check_tls(&app.config, &mut report);
    let source = FsStore::open(from).context("opening the backup's blob store")?;
    restore_blobs(
        app.catalog.as_ref(),
        &source,
        app.blobs.as_ref(),
        &mut report,
    )?;
    check_versions(&app, &mut report)?;
    report.files = manifest.files.len();
    if report.failed.is_empty() {
        app.catalog.append_audit(&crate::catalog::AuditEntry {
            principal_name: Some(crate::admin_cli::local_actor()),
            action: "restore".into(),
            target: std::path::absolute(from)?.display().to_string(),
            outcome: "ok".into(),
            detail: serde_json::json!({
                "backup_created_at": manifest.created_at,
                "backup_of": manifest.source,
                "blobs": report.blobs,
                "signatures_verified": report.signatures_verified,
            })
            .to_string(),
            ..Default::default()
        })?;
    }
    drop(app);

    for n in &report.notes {
        writeln!(out, "note: {n}")?;
    }
    if !report.failed.is_empty() {
        for f in &report.failed {
            writeln!(out, "FAILED {f}")?;
        }
        bail!(
            "restore failed: {} problems (listed above); {} is left unusable ({INCOMPLETE_MARKER} \
             is in it, and `imgsrv serve` refuses it): restore again from a good backup (it \
             starts over), or remove the directory",
            report.failed.len(),
            data.display()
        );
    }
    fs::remove_file(data.join(INCOMPLETE_MARKER)).context("marking the restore complete")?;
    sync_dir(data)?;
    writeln!(
        out,
        "restore complete: {} is ready to serve: catalog checked, {} copied and verified, {} \
         files, {} published signatures verified",
        data.display(),
        report.blobs,
        report.files,
        report.signatures_verified
    )?;
    Ok(report)
}

/// The catalog file, checked against the manifest before anything reads it.
fn restore_catalog(from: &Path, data: &Path, entry: &FileEntry) -> Result<()> {
    let src = from.join(CATALOG_FILE);
    let dest = data.join(CATALOG_FILE);
    let (sha, size) = copy_file(&src, &dest, entry.mode)?;
    if (sha, size) != (entry.sha256, entry.size) {
        bail!(
            "the backup's catalog {} does not match {MANIFEST_FILE} (sha256 {sha}, {size} bytes; \
             {MANIFEST_FILE} says {}, {} bytes): the backup is damaged or was changed after it \
             was taken",
            src.display(),
            entry.sha256,
            entry.size
        );
    }
    Ok(())
}

/// One file of the manifest: copied and checked, or (outside the data
/// directory) compared with what is in place.
fn restore_file(from: &Path, data: &Path, f: &FileEntry, report: &mut RestoreReport) -> Result<()> {
    let Some(rel) = inside(from, &from.join(&f.path)) else {
        report
            .failed
            .push(format!("file {:?}: not a path inside the backup", f.path));
        return Ok(());
    };
    if let Some(original) = &f.original {
        let kept = from.join(&rel);
        match file_digest(original) {
            Ok((sha, _)) if sha == f.sha256 => {}
            Ok(_) => report.notes.push(format!(
                "{} differs from the backup's copy (kept as {}); restore writes only into the \
                 data directory",
                original.display(),
                kept.display()
            )),
            Err(_) => report.notes.push(format!(
                "{} is outside the data directory and not in place: copy {} there (mode {:04o})",
                original.display(),
                kept.display(),
                f.mode
            )),
        }
        return Ok(());
    }
    let dest = data.join(&rel);
    match copy_file(&from.join(&rel), &dest, f.mode) {
        Ok((sha, size)) if (sha, size) == (f.sha256, f.size) => {}
        Ok((sha, size)) => {
            let _ = fs::remove_file(&dest);
            report.failed.push(format!(
                "file {}: sha256 {sha} ({size} bytes), {MANIFEST_FILE} says {} ({} bytes)",
                f.path, f.sha256, f.size
            ));
        }
        Err(e) => report.failed.push(format!("file {}: {e:#}", f.path)),
    }
    Ok(())
}

/// The TLS certificate and key load, or a server would not start.
fn check_tls(config: &Config, report: &mut RestoreReport) {
    let present = config.tls_cert.is_file() && config.tls_key.is_file();
    if !present {
        if config.tls_configured {
            report.notes.push(format!(
                "the configured TLS certificate {} or key {} is not in place: `imgsrv serve` \
                 does not start until both are",
                config.tls_cert.display(),
                config.tls_key.display()
            ));
        } else {
            report.notes.push(
                "no TLS certificate in the backup: `imgsrv serve` generates a new self-signed one"
                    .to_string(),
            );
        }
        return;
    }
    if let Err(e) = crate::tls::server_config(&config.tls_cert, &config.tls_key) {
        report.failed.push(format!(
            "TLS certificate {}: {e:#}",
            config.tls_cert.display()
        ));
    }
}

/// Copies every blob the catalog has a row for, checking each.
fn restore_blobs(
    catalog: &dyn Catalog,
    from: &dyn BlobStore,
    to: &dyn BlobStore,
    report: &mut RestoreReport,
) -> Result<()> {
    let mut rows: Vec<Blob> = Vec::new();
    catalog.each_blob(&mut |b| {
        rows.push(b);
        true
    })?;
    let mut bad: Vec<(Digest, String)> = Vec::new();
    for b in &rows {
        let copied = from
            .open_range(&b.digest, 0, b.size_bytes)
            .and_then(|mut r| to.put(&b.digest, b.size_bytes, &mut r));
        match copied {
            Ok(()) => report.blobs.add(b.size_bytes),
            Err(e @ CasError::Full { .. }) => return Err(e).context("restoring the blobs"),
            Err(CasError::NotFound(_)) => bad.push((b.digest, "missing from the backup".into())),
            Err(e) => bad.push((b.digest, format!("damaged in the backup: {e}"))),
        }
    }
    if !bad.is_empty() {
        let map = citing_versions(catalog)?;
        for (d, why) in bad {
            report
                .failed
                .push(format!("blob {d}: {why}; {}", affected(&map, &d)));
        }
    }
    Ok(())
}

/// Every published version: its blobs are there with their sizes, its
/// stored manifest matches its digest, and its signature verifies with the
/// restored trusted keys.
fn check_versions(app: &App, report: &mut RestoreReport) -> Result<()> {
    let cat = app.catalog.as_ref();
    let keys = app
        .trusted_keys()
        .context("reading the restored trusted keys")?;
    let mut unsigned = Vec::new();
    for img in cat.list_images(true)? {
        for v in cat.list_versions(&img.name, true)? {
            if v.state != VersionState::Published {
                continue;
            }
            let name = format!("{}@{}", img.name, v.version);
            let view = cat.version_view(&img.name, &v.version)?;
            for a in &view.artifacts {
                let cited = std::iter::once((
                    &a.artifact.primary_blob_digest,
                    a.artifact.primary_blob_size_bytes,
                ))
                .chain(
                    a.attachments
                        .iter()
                        .map(|t| (&t.blob_digest, t.blob_size_bytes)),
                );
                for (d, size) in cited {
                    let stored = app.blobs.stat(d)?;
                    if cat.get_blob(d)?.map(|b| b.size_bytes) != Some(size) || stored != Some(size)
                    {
                        report.failed.push(format!(
                            "{name}: blob {d} ({size} bytes) is not in the restored store with \
                             that size"
                        ));
                    }
                }
            }
            let rec = cat.publish_record(&v.id)?;
            if Digest::of(&rec.manifest) != rec.manifest_digest {
                report.failed.push(format!(
                    "{name}: the stored manifest does not hash to its recorded digest {}",
                    rec.manifest_digest
                ));
                continue;
            }
            let (Verification::Verified, Some(sig)) = (rec.verification, &rec.signature) else {
                unsigned.push(name);
                continue;
            };
            match crate::sign::verify_signed_by(&keys, &rec.manifest, sig) {
                Ok((k, _)) if Some(&k.key_id) == rec.signer_key_id.as_ref() => {
                    report.signatures_verified += 1
                }
                Ok((k, _)) => report.failed.push(format!(
                    "{name}: the signature verifies with key {} but the publication records {}",
                    k.key_id,
                    rec.signer_key_id.as_deref().unwrap_or("-")
                )),
                Err(crate::sign::SignError::UnknownKey(id)) => report.notes.push(format!(
                    "{name}: signed by key {id}, which the restored trusted keys no longer hold \
                     (removed with `imgsrv key remove`?): signature not checked"
                )),
                Err(e) => report
                    .failed
                    .push(format!("{name}: manifest signature: {e}")),
            }
        }
    }
    if !unsigned.is_empty() {
        report.notes.push(format!(
            "published without a verified signature (verification mode warn or off), nothing to \
             check: {}",
            unsigned.join(", ")
        ));
    }
    Ok(())
}
