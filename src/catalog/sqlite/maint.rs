//! The SQLite catalog's side of the maintenance jobs: job locks, the
//! listings a scrub checks the store against.

use super::*;
use std::os::unix::io::AsRawFd;

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
                 UNION ALL \
                 SELECT i.name, v.version, v.id, v.state = 'published', \
                        a.variant || ' ' || a.architecture || ' ' || a.format, t.name, \
                        t.blob_digest, t.blob_size_bytes \
                 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id \
                 JOIN image_versions v ON v.id = a.version_id JOIN images i ON i.id = v.image_id \
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

    fn blob_rows(&self) -> Result<Vec<Blob>> {
        let c = self.conn()?;
        let mut st = c
            .prepare(
                "SELECT digest, size_bytes, storage_key, media_type, verified_at, created_at \
                 FROM cas_blobs ORDER BY digest",
            )
            .map_err(backend)?;
        let rows = st
            .query_map([], |r| {
                Ok(Blob {
                    digest: digest_col(r, 0)?,
                    size_bytes: u64_col(r, 1)?,
                    storage_key: text(r, 2)?,
                    media_type: opt_text(r, 3)?,
                    verified_at: text(r, 4)?,
                    created_at: text(r, 5)?,
                })
            })
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

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
