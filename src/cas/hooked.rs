//! [`Hooked`]: a blob store that tells a hook about each lookup, read and deletion before it
//! hands the call to the store it wraps. For the tests of jobs that must behave when
//! something happens between two of their steps (a shutdown while a scrub asks the
//! store, a database restart while a collection deletes): the hook makes it happen at
//! that exact step, against the real store and the real catalog.

use super::*;
use std::sync::Arc;

/// A call [`Hooked`] reports before it makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call<'a> {
    Stat(&'a Digest),
    Delete(&'a Digest),
    /// [`BlobStore::open_range`] (reads, downloads, scrub's re-hashing).
    Open(&'a Digest),
}

/// `inner`, with `hook` called before each [`Call`]. Every other method goes
/// straight to `inner` (the provided ones too, so the wrapped store keeps its own
/// behaviour: its write lock, its side hashing, its stamps).
pub struct Hooked<F: Fn(Call<'_>) + Send + Sync> {
    pub inner: Arc<dyn BlobStore>,
    pub hook: F,
}

impl<F: Fn(Call<'_>) + Send + Sync> BlobStore for Hooked<F> {
    fn leftovers(&self) -> Result<Vec<Leftover>> {
        self.inner.leftovers()
    }
    fn remove_leftover(&self, l: &Leftover) -> Result<u64> {
        self.inner.remove_leftover(l)
    }
    fn list(&self, each: &mut dyn FnMut(StoredBlob) -> bool) -> Result<()> {
        self.inner.list(each)
    }
    fn delete(&self, d: &Digest) -> Result<bool> {
        (self.hook)(Call::Delete(d));
        self.inner.delete(d)
    }
    fn quarantine(&self, d: &Digest, reason: &str) -> Result<bool> {
        self.inner.quarantine(d, reason)
    }
    fn quarantined(&self, d: &Digest) -> Result<Option<Quarantined>> {
        self.inner.quarantined(d)
    }
    fn list_quarantined(&self, each: &mut dyn FnMut(Quarantined) -> bool) -> Result<()> {
        self.inner.list_quarantined(each)
    }
    fn needs_write_lock(&self) -> bool {
        self.inner.needs_write_lock()
    }
    fn stat(&self, d: &Digest) -> Result<Option<u64>> {
        (self.hook)(Call::Stat(d));
        self.inner.stat(d)
    }
    fn stat_served(&self, d: &Digest) -> Result<Stored> {
        (self.hook)(Call::Stat(d));
        self.inner.stat_served(d)
    }
    fn vouch(&self, d: &Digest) -> Result<bool> {
        self.inner.vouch(d)
    }
    fn open_range(&self, d: &Digest, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        (self.hook)(Call::Open(d));
        self.inner.open_range(d, offset, len)
    }
    fn put(&self, d: &Digest, size: u64, r: &mut dyn Read) -> Result<()> {
        self.inner.put(d, size, r)
    }
    fn put_new(&self, size: u64, r: &mut dyn Read) -> Result<Digest> {
        self.inner.put_new(size, r)
    }
    fn put_new_hashing(
        &self,
        size: u64,
        r: &mut dyn Read,
        side: Option<&mut Hasher>,
    ) -> Result<Digest> {
        self.inner.put_new_hashing(size, r, side)
    }
    fn adopt(&self, path: &Path, d: &Digest, size: u64) -> Result<()> {
        self.inner.adopt(path, d, size)
    }
    fn adopt_hashed(&self, path: &Path, d: &Digest, size: u64) -> Result<()> {
        self.inner.adopt_hashed(path, d, size)
    }
    fn stage_part(&self, upload: &str, n: u32, len: u64, r: &mut dyn Read) -> Result<StagedPart> {
        self.inner.stage_part(upload, n, len, r)
    }
    fn stage_part_hashing(
        &self,
        upload: &str,
        n: u32,
        len: u64,
        r: &mut dyn Read,
        side: Option<&mut Hasher>,
    ) -> Result<StagedPart> {
        self.inner.stage_part_hashing(upload, n, len, r, side)
    }
    fn commit_upload(
        &self,
        upload: &str,
        parts: &[(u32, StagedPart)],
        d: &Digest,
        size: u64,
    ) -> Result<()> {
        self.inner.commit_upload(upload, parts, d, size)
    }
    fn discard_upload(&self, upload: &str) -> Result<()> {
        self.inner.discard_upload(upload)
    }
    fn discard_part(&self, upload: &str, n: u32) -> Result<()> {
        self.inner.discard_part(upload, n)
    }
    fn ensure_room(&self, bytes: u64) -> Result<()> {
        self.inner.ensure_room(bytes)
    }
    fn probe_writable(&self) -> Result<()> {
        self.inner.probe_writable()
    }
}
