//! Bytes into the bucket: [`BlobStore::put`], the staged parts of an upload
//! session and their commit. Every byte is hashed on its way; an object is
//! made visible only after the digest and size were checked.

use super::{S3Store, UPLOADS_PREFIX};
use crate::cas::fs::{check_digest, fill, valid_upload_id};
use crate::cas::{BlobStore, CasError, Result, StagedPart};
use crate::digest::{Digest, Hasher};
use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc;

/// Multipart uploads have at most this many parts.
const MAX_PARTS: u64 = 10_000;
/// Part buffers in memory per upload: one being filled, one queued, one
/// being sent.
const BUFFERS: usize = 3;

/// What [`S3Store::upload`] does once every byte is in and hashed.
pub(super) enum Verdict {
    /// Make the object visible.
    Store,
    /// Drop the bytes (the key is taken: keep what is there).
    Skip,
}

/// [`CasError::Truncated`] if `reader` has one more byte (it was longer than
/// declared).
fn no_more(reader: &mut dyn Read, size: u64) -> Result<()> {
    let mut extra = [0u8; 1];
    loop {
        match reader.read(&mut extra) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(CasError::Truncated {
                    expected: size,
                    actual: size + 1,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // the bytes declared were all there; a source that fails after
            // them cannot have sent more
            Err(_) => return Ok(()),
        }
    }
}

impl S3Store {
    /// The part size for an object of `size` bytes: [`super::PART_SIZE`], or
    /// more (whole MiB) when that would take more than 10,000 parts.
    fn part_size_for(&self, size: u64) -> u64 {
        let min = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
        self.part_size.max(min)
    }

    /// Streams exactly `size` bytes of `reader` to `key`, hashing them. Once
    /// all are in (and, when `exact`, the reader has nothing more), `decide`
    /// gets their digest: [`Verdict::Store`] makes the object visible,
    /// [`Verdict::Skip`] or an error drops them. On every failure nothing is
    /// stored: a multipart upload is aborted. Returns the digest and whether
    /// the object was stored. A blob's object carries `stamp`, the digest
    /// `decide` requires (see "A blob carries its digest" in [`super`]).
    pub(super) fn upload(
        &self,
        key: &str,
        size: u64,
        reader: &mut dyn Read,
        exact: bool,
        stamp: Option<&Digest>,
        decide: &mut dyn FnMut(Digest) -> Result<Verdict>,
    ) -> Result<(Digest, bool)> {
        let location = self.client.location(key);
        let path = Path::new(&location);
        if size <= self.part_size {
            let mut buf = vec![0u8; size as usize];
            let got = fill(reader, &mut buf, size, size, 0, path)?;
            debug_assert_eq!(got as u64, size);
            if exact {
                no_more(reader, size)?;
            }
            let digest = Digest::of(&buf);
            return match decide(digest)? {
                Verdict::Store => {
                    self.client.put(key, &buf, Some(digest.as_bytes()), stamp)?;
                    Ok((digest, true))
                }
                Verdict::Skip => Ok((digest, false)),
            };
        }
        let upload_id = self.client.create_multipart(key, stamp)?;
        let result = (|| {
            let (digest, etags) = self.send_parts(key, &upload_id, size, reader, path)?;
            if exact {
                no_more(reader, size)?;
            }
            match decide(digest)? {
                Verdict::Store => {
                    self.client.complete_multipart(key, &upload_id, &etags)?;
                    Ok((digest, true))
                }
                Verdict::Skip => Ok((digest, false)),
            }
        })();
        if !matches!(result, Ok((_, true))) {
            if let Err(a) = self.client.abort_multipart(key, &upload_id) {
                // (listed as a leftover; garbage collection aborts it)
                log::warn!("blob store: aborting the multipart upload of {location}: {a}");
            }
        }
        result
    }

    /// The parts of a multipart upload: this thread reads and hashes, a
    /// second one sends the previous part meanwhile. The digest and the
    /// parts' ETags in order.
    fn send_parts(
        &self,
        key: &str,
        upload_id: &str,
        size: u64,
        reader: &mut dyn Read,
        path: &Path,
    ) -> Result<(Digest, Vec<String>)> {
        let part = self.part_size_for(size);
        let (to_send, queued) = mpsc::sync_channel::<(u16, Vec<u8>)>(1);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || -> Result<Vec<String>> {
                let mut etags = Vec::new();
                for (n, buf) in queued {
                    etags.push(self.client.upload_part(key, upload_id, n, &buf)?);
                    // the reader may have stopped; then nobody needs it back
                    let _ = free_tx.send(buf);
                }
                Ok(etags)
            });
            let read = (|| -> Result<Option<Digest>> {
                let mut hasher = Hasher::new();
                let (mut done, mut n, mut allocated) = (0u64, 0u16, 0usize);
                while done < size {
                    let want = part.min(size - done) as usize;
                    let mut buf = if allocated < BUFFERS {
                        allocated += 1;
                        Vec::with_capacity(part as usize)
                    } else {
                        match free_rx.recv() {
                            Ok(b) => b,
                            // the sender failed: its error is the one to report
                            Err(_) => return Ok(None),
                        }
                    };
                    buf.resize(want, 0);
                    fill(reader, &mut buf, size - done, size, done, path)?;
                    hasher.update(&buf);
                    done += want as u64;
                    n += 1;
                    if to_send.send((n, buf)).is_err() {
                        return Ok(None);
                    }
                }
                Ok(Some(hasher.finish()))
            })();
            drop(to_send);
            let sent = sender.join().expect("the part sender does not panic");
            match (read, sent) {
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                (Ok(Some(d)), Ok(etags)) => Ok((d, etags)),
                (Ok(None), Ok(_)) => Err(CasError::Invalid("the part sender stopped early".into())),
            }
        })
    }

    /// Reads and hashes exactly `size` bytes of `reader` without storing them.
    fn hash_only(&self, key: &str, size: u64, reader: &mut dyn Read) -> Result<Digest> {
        let location = self.client.location(key);
        let path = Path::new(&location);
        let mut buf = vec![0u8; (1 << 20).min(size.max(1)) as usize];
        let mut hasher = Hasher::new();
        let mut done = 0;
        while done < size {
            let n = fill(reader, &mut buf, size - done, size, done, path)?;
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        no_more(reader, size)?;
        Ok(hasher.finish())
    }

    /// `decide` of a blob's upload: the digest must be right, and the key
    /// still free (the HEAD under the caller's per-digest lock: see the
    /// module documentation); when it is taken, what is there is kept.
    fn check_and_claim(
        &self,
        key: &str,
        digest: &Digest,
        size: u64,
        actual: Digest,
    ) -> Result<Verdict> {
        check_digest(digest, size, actual, size)?;
        Ok(if self.client.head(key)?.is_some() {
            Verdict::Skip
        } else {
            Verdict::Store
        })
    }

    /// [`BlobStore::put`].
    pub(super) fn put_blob(&self, digest: &Digest, size: u64, reader: &mut dyn Read) -> Result<()> {
        self.ensure_room(size)?;
        let key = Self::key_of(digest);
        if self.client.head(&key)?.is_some() {
            // Never overwritten. The bytes are still read and checked, so a
            // wrong put fails whether or not the blob is there.
            let actual = self.hash_only(&key, size, reader)?;
            return check_digest(digest, size, actual, size);
        }
        self.upload(&key, size, reader, true, Some(digest), &mut |actual| {
            self.check_and_claim(&key, digest, size, actual)
        })
        .map(drop)
    }

    /// [`BlobStore::stage_part`]: straight to `uploads/<id>/<n>.part` (a
    /// re-sent part replaces it; a failed one leaves the previous one).
    pub(super) fn stage(
        &self,
        upload: &str,
        n: u32,
        len: u64,
        reader: &mut dyn Read,
    ) -> Result<StagedPart> {
        valid_upload_id(upload)?;
        self.ensure_room(len)?;
        let key = Self::part_key(upload, n);
        let (digest, _) =
            self.upload(&key, len, reader, false, None, &mut |_| Ok(Verdict::Store))?;
        Ok(StagedPart { digest, size: len })
    }

    /// [`BlobStore::commit_upload`]. One part (hashed while it arrived) is
    /// copied server-side to its CAS key; several are read back in order
    /// and hashed on their way into a new upload, as the filesystem store
    /// does. The staged parts are removed either way, except when the
    /// bucket is full (quota) or cannot be reached: the same commit can
    /// succeed later.
    pub(super) fn commit(
        &self,
        upload: &str,
        parts: &[(u32, StagedPart)],
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        valid_upload_id(upload)?;
        let result = self.commit_parts(upload, parts, digest, size);
        if !matches!(
            result,
            Err(CasError::Full { .. } | CasError::Unavailable { .. })
        ) {
            if let Err(e) = self.discard(upload) {
                // (a leftover: garbage collection removes it)
                log::warn!("blob store: removing the staged parts of upload {upload}: {e}");
            }
        }
        result
    }

    fn commit_parts(
        &self,
        upload: &str,
        parts: &[(u32, StagedPart)],
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        let total: u64 = parts.iter().map(|(_, p)| p.size).sum();
        if total != size {
            return Err(CasError::Truncated {
                expected: size,
                actual: total,
            });
        }
        let key = Self::key_of(digest);
        let existing = self.client.head(&key)?;
        if existing.as_ref().is_some_and(|o| o.size == size) {
            return Ok(());
        }
        for (n, p) in parts {
            let o = self
                .client
                .head(&Self::part_key(upload, *n))?
                .ok_or(CasError::MissingPart(*n))?;
            if o.size != p.size {
                return Err(CasError::Truncated {
                    expected: p.size,
                    actual: o.size,
                });
            }
        }
        if let [(n, p)] = parts {
            if size <= self.copy_max {
                check_digest(digest, size, p.digest, size)?;
                if self.client.head(&key)?.is_some() {
                    return Ok(());
                }
                if !self
                    .client
                    .copy(&Self::part_key(upload, *n), &key, Some(digest))?
                {
                    return Err(CasError::MissingPart(*n));
                }
                return Ok(());
            }
        }
        let mut reader = PartsReader {
            store: self,
            upload,
            parts,
            next: 0,
            current: None,
            failed: None,
        };
        let r = if existing.is_some() {
            // Never overwritten (another size: damaged behind imgsrv's back,
            // for scrub to find). The parts are still read and checked, so a
            // wrong commit fails whether or not the key is taken.
            self.hash_only(&key, size, &mut reader)
                .and_then(|actual| check_digest(digest, size, actual, size))
        } else {
            self.ensure_room(size)?;
            self.upload(
                &key,
                size,
                &mut reader,
                false,
                Some(digest),
                &mut |actual| self.check_and_claim(&key, digest, size, actual),
            )
            .map(drop)
        };
        if let Some(e) = reader.failed.take() {
            return Err(e);
        }
        r
    }

    /// [`BlobStore::discard_upload`]: the staged parts and any unfinished
    /// multipart upload of one.
    pub(super) fn discard(&self, upload: &str) -> Result<()> {
        valid_upload_id(upload)?;
        let prefix = Self::upload_prefix(upload);
        debug_assert!(prefix.starts_with(UPLOADS_PREFIX));
        let mut keys = Vec::new();
        self.client.list(&prefix, &mut |o| {
            keys.push(o.key);
            true
        })?;
        for k in keys {
            self.client.delete(&k)?;
        }
        for m in self.client.list_multipart(&prefix)? {
            self.client.abort_multipart(&m.key, &m.upload_id)?;
        }
        Ok(())
    }
}

/// The staged parts of an upload, read back in order: each GET streams
/// exactly the part's size. A part that is gone or short is remembered in
/// `failed` (the error to report, not the I/O error the copy sees).
struct PartsReader<'a> {
    store: &'a S3Store,
    upload: &'a str,
    parts: &'a [(u32, StagedPart)],
    next: usize,
    current: Option<(u32, Box<dyn Read + Send>, u64)>,
    failed: Option<CasError>,
}

impl PartsReader<'_> {
    fn fail(&mut self, e: CasError) -> io::Error {
        let msg = e.to_string();
        self.failed = Some(e);
        io::Error::other(msg)
    }
}

impl Read for PartsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some((n, body, left)) = &mut self.current {
                if *left == 0 {
                    self.current = None;
                    continue;
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let (n, got) = (*n, body.read(&mut buf[..want]));
                match got {
                    Ok(0) => {
                        let e = self.store.client.err(
                            "read",
                            &S3Store::part_key(self.upload, n),
                            io::ErrorKind::UnexpectedEof,
                            "the staged part is shorter than when it was staged".into(),
                        );
                        return Err(self.fail(e));
                    }
                    Ok(got) => {
                        if let Some((_, _, left)) = &mut self.current {
                            *left -= got as u64;
                        }
                        return Ok(got);
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((n, p)) = self.parts.get(self.next) else {
                return Ok(0);
            };
            let (n, size) = (*n, p.size);
            self.next += 1;
            match self
                .store
                .client
                .get(&S3Store::part_key(self.upload, n), None)
            {
                Ok(Some(resp)) => {
                    self.current = Some((n, Box::new(resp.into_body().into_reader()), size));
                }
                Ok(None) => return Err(self.fail(CasError::MissingPart(n))),
                Err(e) => return Err(self.fail(e)),
            }
        }
    }
}
