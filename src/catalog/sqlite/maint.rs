//! The SQLite catalog's side of the maintenance jobs and of operations: job locks,
//! blob totals (metrics), the write probe (`/readyz`).

use super::*;
use std::os::unix::io::AsRawFd;

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

    fn blob_totals(&self) -> Result<(u64, u64)> {
        self.blob_totals_sql()
    }

    fn probe_writable(&self) -> Result<()> {
        self.probe_files()?;
        self.room_for_change()
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
    }
}
