//! The SQLite catalog's side of the maintenance jobs: job locks.

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
