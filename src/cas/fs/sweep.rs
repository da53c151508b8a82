//! The local store's side of garbage collection and scrub: walking the blob
//! tree, the leftovers in `tmp/` and `uploads/`, and removing blobs.

use super::{io_err, valid_upload_id, FsStore};
use crate::cas::{BlobStore, CasError, Leftover, LeftoverKind, Result, StoredBlob};
use crate::digest::Digest;
use std::fs;
use std::io;

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
