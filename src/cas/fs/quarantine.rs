//! The local store's quarantine: `DATA/quarantine/<hex>` (the damaged copy,
//! moved out of `sha256/` by rename) and `DATA/quarantine/<hex>.reason` (why).

use super::{fsync_dir, io_err, FsStore};
use crate::cas::{Quarantined, Result};
use crate::digest::Digest;
use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;

/// Under the data directory: where [`crate::cas::BlobStore::quarantine`] moves blobs.
pub const QUARANTINE_DIR: &str = "quarantine";
/// `quarantine/<hex>.reason`: why `<hex>` is there.
const NOTE_SUFFIX: &str = ".reason";

impl FsStore {
    fn quarantine_dir(&self) -> PathBuf {
        self.root.join(QUARANTINE_DIR)
    }

    /// The quarantine record of `digest` from its note and kept copy.
    pub(super) fn read_quarantined(&self, digest: &Digest) -> Result<Option<Quarantined>> {
        let dir = self.quarantine_dir();
        let copy = dir.join(digest.hex());
        let note_path = dir.join(format!("{}{NOTE_SUFFIX}", digest.hex()));
        let size = match fs::metadata(&copy) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("stat", &copy)(e)),
        };
        let note = match fs::read_to_string(&note_path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &note_path)(e)),
        };
        if size.is_none() && note.is_none() {
            return Ok(None);
        }
        let field = |key: &str| {
            note.as_deref().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(": ")))
                    .map(str::to_string)
            })
        };
        Ok(Some(Quarantined {
            digest: *digest,
            size,
            reason: field("reason").unwrap_or_else(|| "(no reason note)".into()),
            at: field("quarantined_at").unwrap_or_default(),
            location: copy.display().to_string(),
        }))
    }

    /// [`crate::cas::BlobStore::quarantine`]: the note first, then the rename.
    pub(super) fn quarantine_blob(&self, digest: &Digest, reason: &str) -> Result<bool> {
        let src = self.blob_path(digest);
        match fs::symlink_metadata(&src) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", &src)(e)),
        }
        let dir = self.quarantine_dir();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let hex = digest.hex();
        // The note first, then the move: a crash in between leaves a note
        // beside a blob still in place, which is only ever read once the
        // blob is gone (the next scrub quarantines it again).
        let note_path = dir.join(format!("{hex}{NOTE_SUFFIX}"));
        let note = format!(
            "digest: {digest}\nquarantined_at: {}\nreason: {}\n",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            reason.replace(['\n', '\r'], " ")
        );
        let mut tmp = tempfile::Builder::new()
            .prefix(".note-")
            .tempfile_in(&dir)
            .map_err(io_err("create temp in", &dir))?;
        tmp.write_all(note.as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io_err("write", tmp.path()))?;
        tmp.persist(&note_path)
            .map_err(|e| io_err("rename", &note_path)(e.error))?;
        let dst = dir.join(&hex);
        match fs::rename(&src, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // removed meanwhile (a GC): nothing was quarantined
                let _ = fs::remove_file(&note_path);
                return Ok(false);
            }
            Err(e) => return Err(io_err("rename", &src)(e)),
        }
        fsync_dir(&dir)?;
        if let Some(shard) = src.parent() {
            fsync_dir(shard)?;
        }
        log::warn!(
            "blob store: {digest} quarantined to {}: {reason}",
            dst.display()
        );
        Ok(true)
    }

    /// [`crate::cas::BlobStore::list_quarantined`].
    pub(super) fn list_quarantine(&self, each: &mut dyn FnMut(Quarantined) -> bool) -> Result<()> {
        let dir = self.quarantine_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("read", &dir)(e)),
        };
        let mut digests = std::collections::BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(io_err("read", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(NOTE_SUFFIX).unwrap_or(&name);
            if let Ok(d) = Digest::from_hex(hex) {
                digests.insert(d);
            }
        }
        for d in digests {
            if let Some(q) = self.read_quarantined(&d)? {
                if !each(q) {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{read_all, store, tmp_is_empty};
    use crate::cas::{BlobStore, CasError};
    use crate::digest::Digest;
    use std::fs;

    #[test]
    fn quarantine_moves_a_damaged_blob_out_and_the_right_bytes_come_back() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, s) = store();
        let d = Digest::of(b"ROOT");
        s.put(&d, 4, &mut &b"ROOT"[..]).unwrap();
        let p = s.blob_path(&d);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&p, b"RooT").unwrap();
        assert!(s.quarantine(&d, "sha256 mismatch\nsecond line").unwrap());
        assert_eq!(s.stat(&d).unwrap(), None);
        assert!(!p.exists());
        assert!(matches!(s.open_range(&d, 0, 4), Err(CasError::NotFound(_))));
        let q = s.quarantined(&d).unwrap().unwrap();
        assert_eq!(
            (q.size, q.reason.as_str()),
            (Some(4), "sha256 mismatch second line")
        );
        assert!(q.at.ends_with('Z'), "{}", q.at);
        let kept = dir.path().join("quarantine").join(d.hex());
        assert_eq!(q.location, kept.display().to_string());
        assert_eq!(fs::read(&kept).unwrap(), b"RooT");
        let mut listed = Vec::new();
        s.list(&mut |b| {
            listed.push(b.digest);
            true
        })
        .unwrap();
        assert!(listed.is_empty(), "a quarantined blob is not in the store");
        let mut quarantined = Vec::new();
        s.list_quarantined(&mut |q| {
            quarantined.push(q.digest);
            true
        })
        .unwrap();
        assert_eq!(quarantined, vec![d]);
        // the right bytes are stored again like any missing blob; the copy stays
        s.put(&d, 4, &mut &b"ROOT"[..]).unwrap();
        assert_eq!(read_all(&s, &d), b"ROOT");
        assert_eq!(fs::read(&kept).unwrap(), b"RooT");
        assert!(s.quarantined(&d).unwrap().is_some());
        // the operator removes the copy: the note alone still says why
        fs::remove_file(&kept).unwrap();
        assert_eq!(s.quarantined(&d).unwrap().unwrap().size, None);
        let other = Digest::of(b"x");
        assert!(!s.quarantine(&other, "r").unwrap());
        assert!(s.quarantined(&other).unwrap().is_none());
        assert!(tmp_is_empty(dir.path()));
    }
}
