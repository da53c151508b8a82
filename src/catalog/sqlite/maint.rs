//! The SQLite catalog's side of the maintenance jobs: job locks, online
//! snapshots (the backup API), integrity checks, blob rows.

use super::*;
use std::os::unix::io::AsRawFd;

pub(super) const BLOB_COLS: &str =
    "digest, size_bytes, storage_key, media_type, verified_at, created_at";

/// A `cas_blobs` row selected with [`BLOB_COLS`].
pub(super) fn blob_row(r: &Row) -> rusqlite::Result<Blob> {
    Ok(Blob {
        digest: digest_col(r, 0)?,
        size_bytes: u64_col(r, 1)?,
        storage_key: r.get(2)?,
        media_type: r.get(3)?,
        verified_at: r.get(4)?,
        created_at: r.get(5)?,
    })
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
    /// flock(2) on `jobs/<job>.lock` beside the catalog file: every process
    /// opening this catalog (a `serve`, an `imgsrv gc` next to it) sees the
    /// same lock, and the kernel releases it however the holder ends.
    fn job_lock(&self, job: &str, mode: LockMode, wait: bool) -> Result<Option<JobLock>> {
        if job.is_empty() || !job.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
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
}
