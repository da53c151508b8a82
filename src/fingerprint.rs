//! Incus fingerprints: sha256(metadata tarball bytes || root bytes), read
//! from the blob store at publish time (or handed over by the mirror in the
//! same process, see [`Known`]) and kept with the version.

use crate::cas::{BlobStore, CasError};
use crate::catalog::{ProjectionRow, VersionView};
use crate::digest::Hasher;
use std::collections::{BTreeMap, HashMap};

/// Fingerprints a caller in this process computed while it checked both
/// inputs' sha256 in the same pass: (metadata sha256, root sha256) →
/// sha256(metadata || root). The blob store holds only bytes with those
/// digests, so such a fingerprint is the one [`compute`] would read from it.
/// Never built from data a client sent.
pub type Known = BTreeMap<(crate::digest::Digest, crate::digest::Digest), crate::digest::Digest>;

/// Fingerprints this server took while blobs came in, for the publish that
/// cites them: an upload that names its metadata tarball at begin
/// (`incus_metadata`) and arrives as one part has `sha256(metadata || root)`
/// taken in the pass that hashes the part, instead of a second read of the
/// root at publish. Memory only and bounded: what is not here (a restart, a
/// part received by another instance, more than [`Seen::CAP`] pending) is
/// read from the store at publish as before.
#[derive(Default)]
pub struct Seen {
    /// Upload id → the metadata tarball its root follows.
    hints: std::sync::Mutex<HashMap<String, crate::digest::Digest>>,
    known: std::sync::Mutex<Known>,
}

impl Seen {
    /// At most this many hints and this many fingerprints are kept.
    pub const CAP: usize = 1024;

    pub fn hint(&self, upload: &str, metadata: crate::digest::Digest) {
        let mut h = self.hints.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() >= Self::CAP {
            // (abandoned sessions): their fingerprints are read at publish
            h.clear();
        }
        h.insert(upload.to_string(), metadata);
    }

    pub fn hinted(&self, upload: &str) -> Option<crate::digest::Digest> {
        let h = self.hints.lock().unwrap_or_else(|e| e.into_inner());
        h.get(upload).copied()
    }

    pub fn forget_hint(&self, upload: &str) {
        let mut h = self.hints.lock().unwrap_or_else(|e| e.into_inner());
        h.remove(upload);
    }

    /// Records a fingerprint this process computed from stored metadata bytes
    /// and the root bytes it hashed to `root`.
    pub fn record(
        &self,
        metadata: crate::digest::Digest,
        root: crate::digest::Digest,
        fingerprint: crate::digest::Digest,
    ) {
        let mut k = self.known.lock().unwrap_or_else(|e| e.into_inner());
        while k.len() >= Self::CAP {
            k.pop_first();
        }
        k.insert((metadata, root), fingerprint);
    }

    /// `known` and what was seen for the artifacts of `view`.
    pub fn with(&self, known: &Known, view: &VersionView) -> Known {
        let k = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = known.clone();
        for a in &view.artifacts {
            for t in &a.attachments {
                let key = (t.blob_digest, a.artifact.primary_blob_digest);
                if let Some(fp) = k.get(&key) {
                    out.entry(key).or_insert(*fp);
                }
            }
        }
        out
    }
}

/// The attachment name that marks an artifact's Incus metadata tarball.
pub const INCUS_METADATA: &str = "incus.tar.xz";

/// Simple Streams ftype of a root artifact format, if Incus can use it.
pub fn ftype(format: &str) -> Option<&'static str> {
    match format {
        "squashfs" => Some("squashfs"),
        "qcow2" => Some("disk-kvm.img"),
        "tar.xz" => Some("root.tar.xz"),
        _ => None,
    }
}

fn feed(
    blobs: &dyn BlobStore,
    h: &mut Hasher,
    digest: &crate::digest::Digest,
    size: u64,
) -> Result<(), CasError> {
    let mut r = blobs.open_range(digest, 0, size)?;
    let before = h.len();
    crate::digest::read_chunks(&mut r, |c| h.update(c)).map_err(|e| CasError::Io {
        op: "read",
        path: digest.to_string(),
        source: e,
    })?;
    if h.len() - before < size {
        return Err(CasError::Truncated {
            expected: size,
            actual: h.len() - before,
        });
    }
    Ok(())
}

/// Projection rows for every artifact of `view` that Incus can use: a root
/// format it knows plus an `incus.tar.xz` attachment.
pub fn compute(blobs: &dyn BlobStore, view: &VersionView) -> Result<Vec<ProjectionRow>, CasError> {
    compute_with(blobs, view, &Known::new())
}

/// [`compute`], taking the fingerprints in `known` instead of reading their
/// blobs (each blob must still be stored with its declared size).
pub fn compute_with(
    blobs: &dyn BlobStore,
    view: &VersionView,
    known: &Known,
) -> Result<Vec<ProjectionRow>, CasError> {
    let mut meta_state: HashMap<crate::digest::Digest, Hasher> = HashMap::new();
    let mut rows = Vec::new();
    for a in &view.artifacts {
        let Some(ftype) = ftype(&a.artifact.format) else {
            continue;
        };
        let Some(meta) = a.attachments.iter().find(|t| t.name == INCUS_METADATA) else {
            continue;
        };
        if let Some(fp) = known.get(&(meta.blob_digest, a.artifact.primary_blob_digest)) {
            for (d, size) in [
                (&meta.blob_digest, meta.blob_size_bytes),
                (
                    &a.artifact.primary_blob_digest,
                    a.artifact.primary_blob_size_bytes,
                ),
            ] {
                match blobs.stat(d)? {
                    Some(n) if n == size => {}
                    None => return Err(CasError::NotFound(*d)),
                    Some(n) => {
                        return Err(CasError::Truncated {
                            expected: size,
                            actual: n,
                        })
                    }
                }
            }
            rows.push(ProjectionRow {
                artifact_id: a.artifact.id.clone(),
                metadata_attachment_id: meta.id.clone(),
                ftype: ftype.to_string(),
                combined_sha256: *fp,
            });
            continue;
        }
        let mut h = match meta_state.get(&meta.blob_digest) {
            Some(h) => h.clone(),
            None => {
                let mut h = Hasher::new();
                feed(blobs, &mut h, &meta.blob_digest, meta.blob_size_bytes)?;
                meta_state.insert(meta.blob_digest, h.clone());
                h
            }
        };
        let before = h.len();
        feed(
            blobs,
            &mut h,
            &a.artifact.primary_blob_digest,
            a.artifact.primary_blob_size_bytes,
        )?;
        debug_assert_eq!(h.len() - before, a.artifact.primary_blob_size_bytes);
        rows.push(ProjectionRow {
            artifact_id: a.artifact.id.clone(),
            metadata_attachment_id: meta.id.clone(),
            ftype: ftype.to_string(),
            combined_sha256: h.finish(),
        });
    }
    Ok(rows)
}
