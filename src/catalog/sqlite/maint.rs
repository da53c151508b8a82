//! The SQLite catalog's side of the maintenance jobs and of operations: job
//! locks, blob rows and their claims, pins, expired upload sessions, online
//! snapshots (the backup API), integrity checks, blob totals (metrics), the
//! write probe (`/readyz`), the listings a scrub checks the store against.

use super::*;
use std::os::unix::io::AsRawFd;

/// The claims on blobs, as (digest, kind, id, state, collected, expires_at, at);
/// `{cond}` is replaced by a condition on each part's digest column.
const CLAIMS: &str = "\
    SELECT a.primary_blob_digest, 'v', v.id, v.state, \
           EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id), NULL, a.created_at \
      FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id \
     WHERE {cond:a.primary_blob_digest} \
    UNION ALL \
    SELECT t.blob_digest, 'v', v.id, v.state, \
           EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id), NULL, t.created_at \
      FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id \
      JOIN image_versions v ON v.id = a.version_id \
     WHERE {cond:t.blob_digest} \
    UNION ALL \
    SELECT expected_digest, 'u', id, state, 0, expires_at, updated_at FROM upload_sessions \
     WHERE {cond:expected_digest} \
    UNION ALL \
    SELECT digest, 'p', holder, NULL, 0, expires_at, NULL FROM blob_pins WHERE {cond:digest}";

fn claims_sql(one: bool) -> String {
    let mut sql = CLAIMS.to_string();
    for col in [
        "a.primary_blob_digest",
        "t.blob_digest",
        "expected_digest",
        "digest",
    ] {
        let cond = if one {
            format!("{col} = ?1")
        } else {
            "1".to_string()
        };
        sql = sql.replace(&format!("{{cond:{col}}}"), &cond);
    }
    sql
}

/// Reads claims; a row whose digest does not parse (the sqlite3 shell) cites
/// no stored blob and is skipped. A state that does not parse keeps the
/// blob (a draft's claim; an upload that counts as live).
fn read_claims(c: &Connection, digest: Option<&Digest>) -> Result<Vec<(Digest, Claim)>> {
    let sql = claims_sql(digest.is_some());
    let mut st = c.prepare_cached(&sql).map_err(backend)?;
    let map = |r: &Row| -> rusqlite::Result<Option<(Digest, Claim)>> {
        let Some(d) = opt_text(r, 0)?.and_then(|s| s.parse::<Digest>().ok()) else {
            return Ok(None);
        };
        let id = opt_text(r, 2)?.unwrap_or_default();
        let state = opt_text(r, 3)?.unwrap_or_default();
        let expires_at = opt_text(r, 5)?.unwrap_or_default();
        let at = opt_text(r, 6)?.unwrap_or_default();
        let claim = match opt_text(r, 1)?.as_deref() {
            Some("v") => Claim::Version {
                version_id: id,
                state: VersionState::parse(&state).unwrap_or(VersionState::Draft),
                collected: r.get::<_, Option<bool>>(4)?.unwrap_or(false),
                cited_at: at,
            },
            Some("u") => Claim::Upload {
                id,
                state: UploadState::parse(&state).unwrap_or(UploadState::Uploading),
                expires_at,
                updated_at: at,
            },
            _ => Claim::Pin {
                holder: id,
                expires_at,
            },
        };
        Ok(Some((d, claim)))
    };
    let rows = match digest {
        Some(d) => st.query_map([d.to_string()], map),
        None => st.query_map([], map),
    }
    .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        if let Some(claim) = row.map_err(backend)? {
            out.push(claim);
        }
    }
    Ok(out)
}

/// Blob rows read per query by [`MaintCatalog::each_blob`].
const BLOB_PAGE: i64 = 512;

/// How long a snapshot waits for a source that answers busy (a recovery in
/// progress) before it gives up.
const SNAPSHOT_BUSY_LIMIT: Duration = Duration::from_secs(60);

fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| CatalogError::Backend(format!("syncing {}: {e}", path.display())))
}

impl MaintCatalog for SqliteCatalog {
    fn cited_blobs(&self) -> Result<Vec<CitedBlob>> {
        let c = self.conn()?;
        let mut st = c
            .prepare(
                "SELECT i.name, v.version, v.id, v.state = 'published', \
                        a.variant || ' ' || a.architecture || ' ' || a.format, NULL, \
                        a.primary_blob_digest, a.primary_blob_size_bytes \
                 FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id \
                 JOIN images i ON i.id = v.image_id \
                 WHERE NOT EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id) \
                 UNION ALL \
                 SELECT i.name, v.version, v.id, v.state = 'published', \
                        a.variant || ' ' || a.architecture || ' ' || a.format, t.name, \
                        t.blob_digest, t.blob_size_bytes \
                 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id \
                 JOIN image_versions v ON v.id = a.version_id JOIN images i ON i.id = v.image_id \
                 WHERE NOT EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id) \
                 ORDER BY 1, 2, 5, 6",
            )
            .map_err(backend)?;
        let rows = st
            .query_map([], |r| {
                Ok(CitedBlob {
                    image: text(r, 0)?,
                    version: text(r, 1)?,
                    version_id: text(r, 2)?,
                    published: r.get(3)?,
                    artifact: text(r, 4)?,
                    attachment: opt_text(r, 5)?,
                    digest: digest_col(r, 6)?,
                    size: u64_col(r, 7)?,
                })
            })
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn record_job_run(&self, job: &str, ok: bool, detail: &str) -> Result<()> {
        let now = now();
        let outcome = if ok { "success" } else { "error" };
        let detail: String = detail.chars().take(1000).collect();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO job_runs (job, last_attempt_at, last_outcome, last_success_at, \
                 last_error_at, detail) VALUES (?1, ?2, ?3, CASE WHEN ?3 = 'success' THEN ?2 END, \
                 CASE WHEN ?3 = 'error' THEN ?2 END, ?4) \
                 ON CONFLICT (job) DO UPDATE SET last_attempt_at = excluded.last_attempt_at, \
                 last_outcome = excluded.last_outcome, \
                 last_success_at = coalesce(excluded.last_success_at, last_success_at), \
                 last_error_at = coalesce(excluded.last_error_at, last_error_at), \
                 detail = excluded.detail",
                params![job, now, outcome, detail],
            )
            .ctx("job run")?;
            Ok(())
        })
    }

    fn job_runs(&self) -> Result<Vec<JobRun>> {
        let c = self.conn()?;
        let mut st = c
            .prepare(
                "SELECT job, last_attempt_at, last_outcome, last_success_at, last_error_at, detail \
                 FROM job_runs ORDER BY job",
            )
            .map_err(backend)?;
        let rows = st
            .query_map([], |r| {
                Ok(JobRun {
                    job: text(r, 0)?,
                    last_attempt_at: text(r, 1)?,
                    last_outcome: text(r, 2)?,
                    last_success_at: opt_text(r, 3)?,
                    last_error_at: opt_text(r, 4)?,
                    detail: opt_text(r, 5)?.unwrap_or_default(),
                })
            })
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn blob_rows(&self) -> Result<Vec<Blob>> {
        let c = self.conn()?;
        let mut st = c
            .prepare(&format!(
                "SELECT {BLOB_COLS} FROM cas_blobs ORDER BY digest"
            ))
            .map_err(backend)?;
        let rows = st.query_map([], blob_row).map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            match row {
                Ok(b) => out.push(b),
                // a row the sqlite3 shell broke names no blob this store can serve
                Err(e) => log::warn!("catalog: unreadable cas_blobs row skipped: {e}"),
            }
        }
        Ok(out)
    }

    fn blob_claims(&self, digest: Option<&Digest>) -> Result<Vec<(Digest, Claim)>> {
        read_claims(&*self.conn()?, digest)
    }

    fn delete_blob_rows(
        &self,
        digests: &[Digest],
        keep: &mut dyn FnMut(&Blob, &[Claim]) -> bool,
    ) -> Result<Vec<Blob>> {
        self.write(|tx| {
            let mut deleted = Vec::new();
            for digest in digests {
                let Some(row) = Self::blob_by_digest(tx, digest)? else {
                    continue;
                };
                let claims: Vec<Claim> = read_claims(tx, Some(digest))?
                    .into_iter()
                    .map(|(_, c)| c)
                    .collect();
                if keep(&row, &claims) {
                    continue;
                }
                tx.execute(
                    "DELETE FROM cas_blobs WHERE digest = ?1",
                    [digest.to_string()],
                )
                .ctx(&format!("blob {digest}"))?;
                deleted.push(row);
            }
            Ok(deleted)
        })
    }

    fn pin_blob(&self, digest: &Digest, holder: &str, expires_at: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO blob_pins (digest, holder, expires_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (digest, holder) DO UPDATE SET expires_at = \
                 max(expires_at, excluded.expires_at)",
                params![digest.to_string(), holder, expires_at],
            )
            .ctx("blob pin")?;
            Ok(())
        })
    }

    fn release_pins(&self, holder: &str) -> Result<()> {
        let now = now();
        self.write(|tx| {
            tx.execute(
                "DELETE FROM blob_pins WHERE holder = ?1 OR expires_at < ?2",
                params![holder, now],
            )
            .ctx("blob pins")?;
            Ok(())
        })
    }

    fn expired_uploads(&self, before: &str) -> Result<Vec<UploadSession>> {
        let c = self.conn()?;
        let mut st = c
            .prepare(&format!(
                "SELECT {UPLOAD_COLS} FROM upload_sessions WHERE expires_at < ?1 ORDER BY expires_at"
            ))
            .map_err(backend)?;
        let rows = st.query_map([before], upload_row).map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn delete_upload(&self, id: &str, before: &str) -> Result<bool> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM upload_parts WHERE upload_id = ?1 AND EXISTS \
                        (SELECT 1 FROM upload_sessions WHERE id = ?1 AND expires_at < ?2)",
                params![id, before],
            )
            .ctx("upload parts")?;
            let n = tx
                .execute(
                    "DELETE FROM upload_sessions WHERE id = ?1 AND expires_at < ?2",
                    params![id, before],
                )
                .ctx(&format!("upload {id}"))?;
            Ok(n > 0)
        })
    }

    /// flock(2) on `jobs/<job>.lock` beside the catalog file: every process
    /// opening this catalog (a `serve`, an `imgsrv gc` next to it) sees the
    /// same lock, and the kernel releases it however the holder ends.
    fn job_lock(&self, job: &str, mode: LockMode, wait: bool) -> Result<Option<JobLock>> {
        if !crate::catalog::job_lock_name_ok(job) {
            return Err(CatalogError::Invalid(format!("job lock name {job:?}")));
        }
        let dir = self
            .path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("jobs");
        std::fs::create_dir_all(&dir)
            .map_err(|e| CatalogError::Backend(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(format!("{job}.lock"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| CatalogError::Backend(format!("opening {}: {e}", path.display())))?;
        let mut op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock(2) on a descriptor owned by `file`, open here.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(Some(JobLock::new(file)));
            }
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok(None),
                _ => {
                    return Err(CatalogError::Backend(format!(
                        "locking {}: {err}",
                        path.display()
                    )))
                }
            }
        }
    }

    fn blob_totals(&self) -> Result<(u64, u64)> {
        self.blob_totals_sql()
    }

    fn probe_writable(&self) -> Result<()> {
        self.probe_files()?;
        self.room_for_change()
    }

    /// The online backup API, all pages in one step: one read transaction
    /// on the source (WAL: writers go on meanwhile), so the copy is the
    /// catalog as of that transaction's start, never a mix of two moments.
    fn snapshot_to(&self, dest: &Path) -> Result<()> {
        if dest.symlink_metadata().is_ok() {
            return Err(CatalogError::Invalid(format!(
                "snapshot destination {} already exists",
                dest.display()
            )));
        }
        let written = (|| {
            let src = self.conn()?;
            let mut out = Connection::open(dest)
                .map_err(|e| CatalogError::Backend(format!("creating {}: {e}", dest.display())))?;
            {
                use rusqlite::backup::{Backup, StepResult};
                let backup = Backup::new(&src, &mut out).map_err(backend)?;
                let deadline = std::time::Instant::now() + SNAPSHOT_BUSY_LIMIT;
                loop {
                    match backup.step(-1).ctx("catalog snapshot")? {
                        StepResult::Done => break,
                        StepResult::More => continue,
                        _ if std::time::Instant::now() > deadline => {
                            return Err(CatalogError::Backend(format!(
                                "the catalog stayed busy for {}s: no snapshot taken",
                                SNAPSHOT_BUSY_LIMIT.as_secs()
                            )))
                        }
                        _ => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            }
            out.close().map_err(|(_, e)| backend(e))?;
            sync_path(dest)?;
            sync_path(dest.parent().unwrap_or_else(|| Path::new(".")))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        written
    }

    fn check_integrity(&self) -> Result<Vec<String>> {
        let c = self.conn()?;
        let mut st = c.prepare("PRAGMA integrity_check").map_err(backend)?;
        let rows = st
            .query_map([], |r| text(r, 0))
            .map_err(backend)?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(backend)?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    fn each_blob(&self, each: &mut dyn FnMut(Blob) -> bool) -> Result<()> {
        let mut after = String::new();
        loop {
            let page: Vec<Blob> = {
                let c = self.conn()?;
                let mut st = c
                    .prepare_cached(&format!(
                        "SELECT {BLOB_COLS} FROM cas_blobs WHERE digest > ?1 ORDER BY digest LIMIT ?2"
                    ))
                    .map_err(backend)?;
                let rows = st
                    .query_map(params![after, BLOB_PAGE], blob_row)
                    .map_err(backend)?
                    .collect::<rusqlite::Result<_>>()
                    .map_err(backend)?;
                rows
            };
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = last.digest.to_string();
            let full = page.len() as i64 == BLOB_PAGE;
            for b in page {
                if !each(b) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }
}

impl SqliteCatalog {
    /// Part of [`MaintCatalog::blob_totals`]: one aggregate over `cas_blobs`.
    fn blob_totals_sql(&self) -> Result<(u64, u64)> {
        let (count, bytes): (i64, i64) = self
            .conn()?
            .query_row(
                "SELECT count(*), coalesce(sum(size_bytes), 0) FROM cas_blobs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(backend)?;
        Ok((
            u64::try_from(count).unwrap_or(0),
            u64::try_from(bytes).unwrap_or(0),
        ))
    }

    /// Part of [`MaintCatalog::probe_writable`]: the database is not open read-only
    /// (SQLite falls back to read-only when the file or its filesystem cannot be
    /// written), and a file can be made and removed beside it, where SQLite writes its
    /// WAL and index.
    fn probe_files(&self) -> Result<()> {
        if self
            .conn()?
            .is_readonly(rusqlite::MAIN_DB)
            .map_err(backend)?
        {
            return Err(CatalogError::Backend(format!(
                "{} is open read-only (the file or its filesystem cannot be written)",
                self.path.display()
            )));
        }
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let failed = |what: &str, e: std::io::Error| match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => {
                CatalogError::Full(format!("{what} a file beside the catalog: {e}"))
            }
            _ => CatalogError::Backend(format!("{what} a file in {}: {e}", dir.display())),
        };
        use std::io::Write;
        let mut f = tempfile::Builder::new()
            .prefix(".catalog-write-probe-")
            .tempfile_in(dir)
            .map_err(|e| failed("creating", e))?;
        f.write_all(b"probe").map_err(|e| failed("writing", e))?;
        f.close().map_err(|e| failed("removing", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_locks_exclude_by_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteCatalog::open(&dir.path().join("catalog.db")).unwrap();
        let b = SqliteCatalog::open(&dir.path().join("catalog.db")).unwrap();
        let s1 = a.job_lock("blobs", LockMode::Shared, false).unwrap();
        assert!(s1.is_some());
        assert!(b
            .job_lock("blobs", LockMode::Shared, false)
            .unwrap()
            .is_some());
        assert!(b
            .job_lock("blobs", LockMode::Exclusive, false)
            .unwrap()
            .is_none());
        drop(s1);
        let x = b.job_lock("blobs", LockMode::Exclusive, false).unwrap();
        assert!(x.is_some());
        assert!(a
            .job_lock("blobs", LockMode::Shared, false)
            .unwrap()
            .is_none());
        assert!(a
            .job_lock("other", LockMode::Exclusive, false)
            .unwrap()
            .is_some());
        assert!(a.job_lock("../x", LockMode::Shared, false).is_err());
        assert!(a.job_lock(".x", LockMode::Shared, false).is_err());
        assert!(a.job_lock("", LockMode::Shared, false).is_err());
        assert!(a
            .job_lock("mirror-a.b_c", LockMode::Exclusive, false)
            .unwrap()
            .is_some());
    }

    /// `n` blob rows in one transaction, named by `tag` and their index.
    fn add_blobs(cat: &SqliteCatalog, tag: &str, n: usize) {
        cat.write(|tx| {
            for i in 0..n {
                let d = Digest::of(format!("{tag}{i}").as_bytes());
                tx.execute(
                    "INSERT INTO cas_blobs (digest, size_bytes, storage_key, media_type, verified_at, created_at) \
                     VALUES (?1, ?2, ?3, NULL, 'now', 'now')",
                    params![d.to_string(), i as i64, d.cas_path()],
                )
                .map_err(backend)?;
            }
            Ok(())
        })
        .unwrap();
    }

    fn blob_rows(cat: &dyn MaintCatalog) -> Vec<Blob> {
        let mut rows = Vec::new();
        cat.each_blob(&mut |b| {
            rows.push(b);
            true
        })
        .unwrap();
        rows
    }

    #[test]
    fn a_snapshot_is_one_moment_of_a_catalog_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("catalog.db");
        let cat = SqliteCatalog::open(&db).unwrap();
        add_blobs(&cat, "before", 1100);
        let writer = {
            let db = db.clone();
            std::thread::spawn(move || {
                let w = SqliteCatalog::open(&db).unwrap();
                for round in 0..20 {
                    add_blobs(&w, &format!("during{round}-"), 50);
                }
            })
        };
        let snap = dir.path().join("snap.db");
        cat.snapshot_to(&snap).unwrap();
        writer.join().unwrap();
        assert!(cat.snapshot_to(&snap).is_err(), "an existing file is kept");

        let copy = open_file(&snap).unwrap();
        assert_eq!(copy.check_integrity().unwrap(), Vec::<String>::new());
        let rows = blob_rows(copy.as_ref());
        // whole write transactions only: the 1,100 rows before, then 50 per round
        assert!(
            rows.len() >= 1100 && (rows.len() - 1100).is_multiple_of(50),
            "{}",
            rows.len()
        );
        let digests: Vec<String> = rows.iter().map(|b| b.digest.to_string()).collect();
        let mut sorted = digests.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(digests, sorted, "in digest order, each once, across pages");
        assert_eq!(blob_rows(&cat).len(), 1100 + 20 * 50);
        let mut first = 0;
        cat.each_blob(&mut |_| {
            first += 1;
            first < 3
        })
        .unwrap();
        assert_eq!(first, 3, "each returning false stops the walk");
    }

    #[test]
    fn integrity_check_reports_a_damaged_file() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("catalog.db");
        {
            let cat = SqliteCatalog::open(&db).unwrap();
            add_blobs(&cat, "x", 2000);
            assert_eq!(cat.check_integrity().unwrap(), Vec::<String>::new());
        }
        let len = std::fs::metadata(&db).unwrap().len();
        let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        // a page in the middle of the blob rows' b-tree
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&[0xA5; 4096]).unwrap();
        drop(f);
        // the rows are in the main file (checkpointed on close): without the
        // kept WAL, whose frames would cover the damaged page, it is read alone
        for side in ["catalog.db-wal", "catalog.db-shm"] {
            let _ = std::fs::remove_file(dir.path().join(side));
        }
        let found = SqliteCatalog::open(&db)
            .map_err(|e| e.to_string())
            .and_then(|c| c.check_integrity().map_err(|e| e.to_string()));
        match found {
            Ok(problems) => assert!(!problems.is_empty(), "damage not found"),
            Err(e) => assert!(e.contains("malformed") || e.contains("corrupt"), "{e}"),
        }
    }

    #[test]
    fn cited_blobs_lists_every_citation_with_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let c = SqliteCatalog::open(&dir.path().join("catalog.db")).unwrap();
        let (root, meta, loose) = (Digest::of(b"root"), Digest::of(b"meta"), Digest::of(b"x"));
        for (d, n) in [(root, 4), (meta, 4), (loose, 1)] {
            c.insert_blob(&d, n, None).unwrap();
        }
        c.create_image("deb", None, None, "public").unwrap();
        let v = c.create_version("deb", "1", &BTreeMap::new()).unwrap();
        let a = c
            .add_artifact(
                &v.id,
                &NewArtifact {
                    variant: "default".into(),
                    operating_system: "debian".into(),
                    architecture: "amd64".into(),
                    format: "squashfs".into(),
                    primary_blob_digest: root,
                    primary_blob_size_bytes: 4,
                    primary_media_type: "application/octet-stream".into(),
                },
            )
            .unwrap();
        c.add_attachment(
            &v.id,
            &a.id,
            &NewAttachment {
                name: "incus.tar.xz".into(),
                media_type: "application/x-xz".into(),
                blob_digest: meta,
                blob_size_bytes: 4,
            },
        )
        .unwrap();
        let cited = c.cited_blobs().unwrap();
        assert_eq!(cited.len(), 2, "{cited:?}");
        assert!(cited.iter().all(|b| b.image == "deb"
            && b.version == "1"
            && b.version_id == v.id
            && !b.published
            && b.artifact == "default amd64 squashfs"));
        assert_eq!(
            (cited[0].digest, cited[0].attachment.as_deref()),
            (root, None)
        );
        assert_eq!(
            (cited[1].digest, cited[1].attachment.as_deref()),
            (meta, Some("incus.tar.xz"))
        );
        let mut rows: Vec<Digest> = c
            .blob_rows()
            .unwrap()
            .into_iter()
            .map(|b| b.digest)
            .collect();
        rows.sort();
        let mut want = vec![root, meta, loose];
        want.sort();
        assert_eq!(rows, want);
    }
}
