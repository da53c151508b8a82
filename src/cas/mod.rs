//! The content-addressed blob store. Blobs are named by their SHA-256 and are
//! written once: ingest hashes while it stores, refuses a wrong digest or
//! size, and never replaces an existing blob. The local implementation is
//! [`FsStore`]; the S3-compatible one is `s3::S3Store` (cargo feature `s3`).

pub mod fs;
pub mod hooked;
#[cfg(feature = "s3")]
pub mod s3;

use crate::digest::{Digest, Hasher};
use std::io::Read;
use std::path::Path;

pub use fs::FsStore;

/// Opens the blob store `storage` names: `DATA_DIR/sha256/...`, or the S3
/// bucket. The one place that chooses a blob backend; the store alone maps a
/// digest to where its bytes are (a path, an object key).
pub fn open(
    storage: &crate::config::StorageConfig,
    data_dir: &Path,
) -> anyhow::Result<std::sync::Arc<dyn BlobStore>> {
    use anyhow::Context;
    match &storage.blobs {
        crate::config::BlobBackend::Fs => Ok(std::sync::Arc::new(
            FsStore::open(data_dir).context("opening the blob store")?,
        )),
        #[cfg(feature = "s3")]
        crate::config::BlobBackend::S3(c) => {
            let opts = s3::S3Options {
                endpoint: c.endpoint.clone(),
                bucket: c.bucket.clone(),
                region: c.region.clone(),
                access_key_id: c.access_key_id.clone(),
                secret_access_key: c.secret_access_key.clone(),
                path_style: c.path_style,
                ca_file: c.ca_file.clone(),
            };
            let s = s3::S3Store::open(&opts).with_context(|| {
                format!(
                    "opening the S3 blob store {} bucket {}",
                    c.endpoint, c.bucket
                )
            })?;
            Ok(std::sync::Arc::new(s))
        }
        #[cfg(not(feature = "s3"))]
        crate::config::BlobBackend::S3(_) => anyhow::bail!(
            "[storage] blobs = \"s3\", but this imgsrv was built without S3 support: build it \
             with `cargo build --release --features full`"
        ),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("blob {0} not found")]
    NotFound(Digest),
    #[error("content does not match: expected {expected} ({expected_size} bytes), got {actual} ({actual_size} bytes)")]
    Mismatch {
        expected: Digest,
        expected_size: u64,
        actual: Digest,
        actual_size: u64,
    },
    #[error("expected {expected} bytes, received {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("upload part {0} is missing")]
    MissingPart(u32),
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store's storage has no room for this write: refused up front
    /// (the size was known and does not fit), or the filesystem answered
    /// ENOSPC/EDQUOT on the way. Nothing was stored and nothing partial
    /// stays; the same write succeeds once space is freed.
    #[error("the blob store is full ({path}): {reason}")]
    Full { path: String, reason: String },
    /// The store cannot be reached now (a refused, reset or timed-out
    /// connection; an S3 server answering 500/502/503/504): nothing was done,
    /// and the same request may succeed once it answers again (HTTP 503 with
    /// Retry-After).
    #[error("the blob store cannot be reached ({path}): {reason}")]
    Unavailable { path: String, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = CasError> = std::result::Result<T, E>;

/// Result of staging one upload part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedPart {
    pub digest: Digest,
    pub size: u64,
}

/// A blob as the store has it (not as the catalog says it should be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size: u64,
    /// When it was stored (the file's modification time).
    pub stored_at: std::time::SystemTime,
}

/// Something in the store that is not a blob: a file being written (or left
/// by a crash), or the staged parts of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub kind: LeftoverKind,
    /// The temp file's name, or the upload id.
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftoverKind {
    Temp,
    Staged,
}

/// What is stored under a blob's name, as a download must see it
/// ([`BlobStore::stat_served`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Absent,
    /// The blob, of this size.
    Blob(u64),
    /// An object of `size` bytes the store can tell, without reading it, it did
    /// not write (`reason` says how): never served.
    Disowned {
        size: u64,
        reason: String,
    },
}

/// A blob [`BlobStore::quarantine`] moved out of the served store: its
/// damaged bytes are kept for the operator to inspect, never served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub digest: Digest,
    /// Size of the damaged copy kept; `None` when the operator removed it
    /// (the record stays until they remove it too).
    pub size: Option<u64>,
    /// Why it failed (what the check found).
    pub reason: String,
    /// When it was quarantined (RFC 3339).
    pub at: String,
    /// Where an operator finds it (a path, an object key).
    pub location: String,
}

pub trait BlobStore: Send + Sync {
    /// Temp files and staged uploads, for garbage collection: it removes
    /// temp files only while no write is under way (it holds the `blobs` job
    /// lock exclusively, every write holds it shared), and staged parts only
    /// of upload sessions that are gone.
    fn leftovers(&self) -> Result<Vec<Leftover>>;
    /// Removes a leftover; the bytes freed.
    fn remove_leftover(&self, l: &Leftover) -> Result<u64>;
    /// Every blob stored, in no particular order, one at a time to `each`
    /// (which returns `false` to stop). A name in the store that is not a
    /// blob (a stray file) is skipped with a warning, never listed.
    fn list(&self, each: &mut dyn FnMut(StoredBlob) -> bool) -> Result<()>;
    /// Removes a blob; `false` if it was not there. Only garbage
    /// collection calls this, after the catalog says nothing needs it.
    fn delete(&self, digest: &Digest) -> Result<bool>;
    /// Moves a stored blob that failed a check (its bytes do not hash to
    /// its name) out of the store, atomically: afterwards the store has no
    /// blob of that name ([`BlobStore::stat`] is `None`) and putting the
    /// right bytes back stores them as for any missing blob. The damaged
    /// copy is kept with `reason` ([`BlobStore::quarantined`]) until the
    /// operator removes it; a later quarantine of the same digest replaces
    /// it. `false` if the blob was not there.
    fn quarantine(&self, digest: &Digest, reason: &str) -> Result<bool>;
    /// The quarantine record of `digest`, if it was ever quarantined (and
    /// the record not removed): also after the right bytes were put back.
    fn quarantined(&self, digest: &Digest) -> Result<Option<Quarantined>>;
    /// Every quarantine record, in no particular order, one at a time to
    /// `each` (which returns `false` to stop).
    fn list_quarantined(&self, each: &mut dyn FnMut(Quarantined) -> bool) -> Result<()>;

    /// True when this store cannot refuse to overwrite an object by itself: then
    /// every write of a blob ([`BlobStore::put`], [`BlobStore::adopt`],
    /// [`BlobStore::commit_upload`]) must run under the digest's lock from the
    /// catalog ([`crate::app::App`] takes it), and the store looks before it
    /// writes. An S3 bucket is such a store: Garage ignores `If-None-Match` on
    /// PUT (an existing key was overwritten when the project measured it), so a
    /// conditional write would not keep a key from being written twice. The
    /// local store links a finished file into place, which never replaces one.
    fn needs_write_lock(&self) -> bool {
        false
    }

    /// Size of a stored blob, `None` if absent.
    fn stat(&self, digest: &Digest) -> Result<Option<u64>>;
    /// What a download checks before it serves blob `digest` (one request, as
    /// [`BlobStore::stat`]): its size, or [`Stored::Disowned`] when the store can
    /// tell without reading the bytes that the object under that name is not
    /// one it wrote. The S3 store stamps every blob it writes with the digest
    /// its bytes were checked against; an object put there behind imgsrv's back
    /// has no stamp (or another one). The local store cannot tell: the default
    /// is [`BlobStore::stat`], and a scrub is what finds bytes changed in place.
    fn stat_served(&self, digest: &Digest) -> Result<Stored> {
        Ok(match self.stat(digest)? {
            Some(size) => Stored::Blob(size),
            None => Stored::Absent,
        })
    }
    /// Called by a scrub for a blob it has just read back whole and right: a
    /// store that stamps its blobs ([`BlobStore::stat_served`]) stamps this one
    /// if it is not (copied into the bucket by another tool), so that it is
    /// served again. `true` when it did. Default: nothing to do.
    fn vouch(&self, _digest: &Digest) -> Result<bool> {
        Ok(false)
    }
    /// Reads `len` bytes from `offset` (the caller checked the bounds).
    fn open_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Box<dyn Read + Send>>;
    /// Stores bytes from `reader`, which must be exactly `size` bytes hashing
    /// to `digest`; otherwise nothing is stored.
    fn put(&self, digest: &Digest, size: u64, reader: &mut dyn Read) -> Result<()>;

    /// Stores exactly `size` bytes from `reader` whose digest the caller does not
    /// know yet, and returns it: the bytes are hashed as they are written, and the
    /// blob is stored under the digest they make (an existing blob of that digest is
    /// kept). A source shorter or longer than `size` stores nothing. For one who
    /// would otherwise read a file twice: once to hash it, once to store it (a
    /// publish on the server's own machine). The default stages the bytes as a
    /// one-part upload and commits it.
    fn put_new(&self, size: u64, reader: &mut dyn Read) -> Result<Digest> {
        put_new_staged(self, size, reader)
    }

    /// [`BlobStore::put_new`] that, with `side`, also feeds every byte it stores,
    /// in order, to that second hash of the same bytes (an Incus fingerprint),
    /// from the buffers the store reads into anyway. The default copies each
    /// chunk to a hashing thread of its own ([`side_hashed`]).
    fn put_new_hashing(
        &self,
        size: u64,
        reader: &mut dyn Read,
        side: Option<&mut Hasher>,
    ) -> Result<Digest> {
        match side {
            None => self.put_new(size, reader),
            Some(side) => side_hashed(reader, side, |r| self.put_new(size, r)),
        }
    }

    /// Stores the file at `path`, which must be exactly `size` bytes hashing
    /// to `digest`; otherwise nothing is stored. A store that can take the
    /// file in place (same filesystem) does so without copying it; the
    /// default copies it through [`BlobStore::put`]. The file is left where
    /// it is either way (its mode may become read-only), and the caller must
    /// not write to it any more: once adopted it may be the stored blob.
    fn adopt(&self, path: &Path, digest: &Digest, size: u64) -> Result<()> {
        put_file(self, path, digest, size)
    }

    /// [`BlobStore::adopt`] of a file whose `digest` the caller computed
    /// itself over exactly the bytes it wrote to (or read from) `path`, in
    /// this process, in a directory nobody else writes (the mirror's locked,
    /// mode-0700 staging directory). The store still checks the size and
    /// makes the file durable, but need not read it again: a second hash of
    /// the same page-cache bytes by the same process would only catch another
    /// writer, which the caller rules out. Every byte a store accepts is thus
    /// still hashed once on its way in. A store that cannot take the file in
    /// place copies it through [`BlobStore::put`], which hashes it anyway
    /// (the default).
    fn adopt_hashed(&self, path: &Path, digest: &Digest, size: u64) -> Result<()> {
        self.adopt(path, digest, size)
    }

    /// Stages upload part `n` of `upload` from `reader` (exactly `len` bytes).
    /// Re-staging a part replaces it.
    fn stage_part(
        &self,
        upload: &str,
        n: u32,
        len: u64,
        reader: &mut dyn Read,
    ) -> Result<StagedPart>;
    /// [`BlobStore::stage_part`] feeding the bytes to `side` as well, as
    /// [`BlobStore::put_new_hashing`] does.
    fn stage_part_hashing(
        &self,
        upload: &str,
        n: u32,
        len: u64,
        reader: &mut dyn Read,
        side: Option<&mut Hasher>,
    ) -> Result<StagedPart> {
        match side {
            None => self.stage_part(upload, n, len, reader),
            Some(side) => side_hashed(reader, side, |r| self.stage_part(upload, n, len, r)),
        }
    }
    /// Concatenates the staged parts in order, checks size and digest, and
    /// stores the blob. A mismatch stores nothing. Staged parts are removed
    /// either way, except when the store is full ([`CasError::Full`]) or
    /// cannot be reached ([`CasError::Unavailable`]): then they stay, so that
    /// the same commit can succeed once space is freed or the store is back.
    fn commit_upload(
        &self,
        upload: &str,
        parts: &[(u32, StagedPart)],
        digest: &Digest,
        size: u64,
    ) -> Result<()>;
    /// Removes whatever was staged for `upload`.
    fn discard_upload(&self, upload: &str) -> Result<()>;
    /// Removes staged part `n` of `upload` (if any): for a part the catalog
    /// could not record, which must then not be there to be committed.
    fn discard_part(&self, upload: &str, n: u32) -> Result<()>;

    /// [`CasError::Full`] unless `bytes` more can be stored now and still
    /// leave the store's minimum free space: lets a caller that knows a
    /// size (an upload's declared size) refuse before any byte arrives.
    /// Every write of a known size ([`BlobStore::put`],
    /// [`BlobStore::stage_part`], a commit that copies) checks this itself.
    fn ensure_room(&self, bytes: u64) -> Result<()>;

    /// Ok when a blob could be written now (`/readyz`): a small file is written and
    /// removed where the store stages its writes (a read-only filesystem fails here),
    /// and the minimum free space is there ([`BlobStore::ensure_room`] of 0 bytes:
    /// [`CasError::Full`] otherwise). Stores nothing.
    fn probe_writable(&self) -> Result<()>;
}

/// Runs `store` over `reader` with every byte it reads also hashed into `side`
/// on a second thread (one copy of each chunk).
pub(crate) fn side_hashed<T>(
    reader: &mut dyn Read,
    side: &mut Hasher,
    store: impl FnOnce(&mut dyn Read) -> T,
) -> T {
    let (out, hashed) = crate::digest::with_side_hash(reader, std::mem::take(side), store);
    *side = hashed;
    out
}

/// [`BlobStore::put_new`] through a one-part upload: staged (hashed as it is
/// written), then committed under the digest it made.
pub(crate) fn put_new_staged<S: BlobStore + ?Sized>(
    store: &S,
    size: u64,
    reader: &mut dyn Read,
) -> Result<Digest> {
    let id = uuid::Uuid::new_v4().to_string();
    let staged = store.stage_part(&id, 1, size, reader)?;
    if longer_than_declared(reader) {
        store.discard_upload(&id)?;
        return Err(CasError::Truncated {
            expected: size,
            actual: size + 1,
        });
    }
    let digest = staged.digest;
    store.commit_upload(&id, &[(1, staged)], &digest, size)?;
    Ok(digest)
}

/// True when `reader`, which gave the bytes a write declared, has one more.
pub fn longer_than_declared(reader: &mut dyn Read) -> bool {
    let mut extra = [0u8; 1];
    loop {
        match reader.read(&mut extra) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return matches!(r, Ok(n) if n > 0),
        }
    }
}

/// Copies the file at `path` into `store` through [`BlobStore::put`] (which
/// hashes it): how a file is adopted when it cannot be taken in place.
fn put_file<S: BlobStore + ?Sized>(
    store: &S,
    path: &Path,
    digest: &Digest,
    size: u64,
) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|source| CasError::Io {
        op: "open",
        path: path.display().to_string(),
        source,
    })?;
    store.put(digest, size, &mut f)
}
