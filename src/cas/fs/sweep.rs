//! The local store's side of garbage collection and scrub: walking the blob
//! tree, the leftovers in `tmp/` and `uploads/`, and removing blobs.

use super::{io_err, valid_upload_id, FsStore};
use crate::cas::{BlobStore, CasError, Leftover, LeftoverKind, Result, StoredBlob};
use crate::digest::Digest;
use std::fs;
use std::io;

/// Name of the lock a directory under `tmp/` holds while a job works in it (a
/// mirror run's staging directory, `mirror::fetch::Staging`).
pub const IN_USE_LOCK: &str = ".lock";

/// `None` when `path` is a directory whose [`IN_USE_LOCK`] another holder has
/// locked (a job at work there: not a leftover). Otherwise `Some`, holding that
/// lock, if there is one, until dropped, so that the directory can be removed
/// before any job takes it again.
fn in_use(path: &std::path::Path) -> Option<Option<fs::File>> {
    use std::os::fd::AsRawFd;
    let lock = path.join(IN_USE_LOCK);
    let Ok(f) = fs::OpenOptions::new().write(true).open(&lock) else {
        return Some(None);
    };
    // SAFETY: flock(2) on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Some(Some(f))
    } else {
        None
    }
}

impl FsStore {
    pub(super) fn list_blobs(&self, each: &mut dyn FnMut(StoredBlob) -> bool) -> Result<()> {
        let top = self.root.join("sha256");
        for entry in walkdir::WalkDir::new(&top).min_depth(3).max_depth(3) {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(&top).to_path_buf();
                io_err("walk", &path)(e.into())
            })?;
            if !entry.file_type().is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy();
            let digest = match Digest::from_hex(&name) {
                Ok(d) if self.blob_path(&d) == entry.path() => d,
                _ => {
                    log::warn!(
                        "blob store: {} is not a blob; left alone",
                        entry.path().display()
                    );
                    continue;
                }
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                // removed while walking (a GC): not there any more
                Err(e) if e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound) => {
                    continue
                }
                Err(e) => return Err(io_err("stat", entry.path())(e.into())),
            };
            let stored_at = meta.modified().map_err(io_err("stat", entry.path()))?;
            if !each(StoredBlob {
                digest,
                size: meta.len(),
                stored_at,
            }) {
                break;
            }
        }
        Ok(())
    }

    pub(super) fn list_leftovers(&self) -> Result<Vec<Leftover>> {
        let mut out = Vec::new();
        for (dir, kind) in [
            ("tmp", LeftoverKind::Temp),
            ("uploads", LeftoverKind::Staged),
        ] {
            let top = self.root.join(dir);
            let entries = match fs::read_dir(&top) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list", &top)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("list", &top))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if kind == LeftoverKind::Temp && in_use(&entry.path()).is_none() {
                    log::debug!(
                        "blob store: {} is in use; left alone",
                        entry.path().display()
                    );
                    continue;
                }
                if kind == LeftoverKind::Staged && valid_upload_id(&name).is_err() {
                    log::warn!(
                        "blob store: {} is not an upload; left alone",
                        entry.path().display()
                    );
                    continue;
                }
                let bytes = walkdir::WalkDir::new(entry.path())
                    .into_iter()
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum();
                out.push(Leftover { kind, name, bytes });
            }
        }
        Ok(out)
    }

    pub(super) fn remove_leftover_at(&self, l: &Leftover) -> Result<u64> {
        match l.kind {
            LeftoverKind::Staged => self.discard_upload(&l.name)?,
            LeftoverKind::Temp => {
                if l.name.contains('/') || l.name.starts_with('.') {
                    return Err(CasError::Invalid(format!("temp file name {:?}", l.name)));
                }
                let p = self.root.join("tmp").join(&l.name);
                // held from here to the removal: a run that locks it now waits
                let Some(_unused) = in_use(&p) else {
                    return Ok(0);
                };
                let r = match fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
                    Ok(_) => fs::remove_file(&p),
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
                    Err(e) => return Err(io_err("remove", &p)(e)),
                }
            }
        }
        Ok(l.bytes)
    }

    pub(super) fn delete_blob(&self, digest: &Digest) -> Result<bool> {
        let p = self.blob_path(digest);
        // no fsync of the directory: a removal lost to a power cut brings
        // back a file with no row, which the next collection removes again
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove", &p)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::store;
    use crate::cas::BlobStore;
    use std::os::fd::AsRawFd;

    /// A job's directory under `tmp/` (a mirror's staging directory, locked
    /// while a run works in it) is not a leftover while the lock is held, and is
    /// one, removable, once it is not.
    #[test]
    fn a_locked_work_directory_in_tmp_is_not_a_leftover() {
        let (dir, s) = store();
        let work = dir.path().join("tmp").join("mirror");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("partial"), b"half a download").unwrap();
        let lock = std::fs::File::create(work.join(super::IN_USE_LOCK)).unwrap();
        // SAFETY: flock(2) on a descriptor we own.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        std::fs::write(dir.path().join("tmp").join("ingest-crashed"), b"x").unwrap();
        let names = |s: &crate::cas::FsStore| -> Vec<String> {
            s.leftovers().unwrap().into_iter().map(|l| l.name).collect()
        };
        assert_eq!(names(&s), ["ingest-crashed"]);
        // listed before the job took its lock: still not removed while it holds it
        drop(lock);
        let listed = s.leftovers().unwrap();
        assert_eq!(listed.len(), 2);
        let held = std::fs::File::open(work.join(super::IN_USE_LOCK)).unwrap();
        // SAFETY: as above
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_SH) }, 0);
        let m = listed.iter().find(|l| l.name == "mirror").unwrap();
        assert_eq!(s.remove_leftover(m).unwrap(), 0);
        assert!(work.join("partial").exists());
        drop(held);
        assert_eq!(s.remove_leftover(m).unwrap(), 15);
        assert!(!work.exists());
    }
}
