//! S3-compatible blob store (cargo feature `s3`), tested against Garage.
//!
//! Layout in the bucket (the store owns it: [`S3Store::key_of`]):
//! * `cas/sha256/ab/cd/<hex>`: blobs, written once;
//! * `uploads/<upload id>/<n>.part`: staged upload parts;
//! * `tmp/`: the probe object of [`BlobStore::probe_writable`]; anything
//!   there is garbage;
//! * `quarantine/<hex>` and `quarantine/<hex>.reason`: blobs that failed a
//!   scrub (copied out of `cas/`, then deleted there) and why.
//!
//! # A blob is visible only once checked
//! Bytes are hashed as they stream to the bucket. A blob of at most
//! [`PART_SIZE`] is read into memory, hashed and checked, then sent in one
//! PUT (with `x-amz-checksum-sha256`, which the server verifies as well). A
//! larger one goes up as a multipart upload to its CAS key; the upload is
//! completed (the object appears) only after the last byte was hashed and
//! the digest and size were right, and aborted otherwise: nothing is stored
//! and no parts stay behind. One thread reads and hashes while a second
//! sends the previous part: at most three parts are in memory per upload.
//!
//! # Leftovers
//! [`BlobStore::leftovers`] lists the objects under `tmp/`, the staged parts
//! under `uploads/` (one [`Leftover`] per upload id) and every unfinished
//! multipart upload: under `uploads/<id>/` it counts with that upload, on
//! any other key of the store it is a temp leftover named
//! `<key>?uploadId=<id>`. A put or commit under way has one of those, so
//! garbage collection must remove temp leftovers only while no write is
//! under way on ANY instance sharing the bucket (the `blobs` job lock must
//! then be the catalog's, not a process's).
//!
//! # A CAS key is never overwritten: the caller's per-digest lock
//! S3 has no "create only if absent" that every server honours: Garage
//! ignores `If-None-Match: *` on PUT (measured by the project: an existing
//! key was overwritten), and a completed multipart upload replaces what was
//! there. So the store does not rely on conditional writes. Instead the
//! CALLER (`App`) holds a per-digest lock from the catalog around
//! [`BlobStore::put`] and [`BlobStore::commit_upload`] (the catalog is shared
//! by every instance, a process-local mutex would not do), and under that
//! lock the store HEADs the key: when an object is there it is kept as it is
//! (the new bytes are still read and checked, so a wrong put fails as on the
//! filesystem store); the HEAD is repeated just before an upload is made
//! visible (Garage also drops an unfinished multipart upload of a key that
//! gets a new object meanwhile: that upload then fails, and nothing is
//! replaced). The HEAD-then-write is only safe under the lock: without it two
//! writers could both find the key free, and the second would replace the
//! first's object, say a re-stored blob racing a quarantine or a GC.
//!
//! # A blob carries its digest
//! Every object the store writes under `cas/` carries the digest its bytes
//! were checked against as user metadata (`x-amz-meta-sha256: <hex>`, set on
//! the PUT, the CreateMultipartUpload or the CopyObject that makes it
//! visible). An object replaced behind imgsrv's back (another client's PUT, a
//! restore by a tool that drops metadata) has no stamp, or another one:
//! [`BlobStore::stat_served`] says so from the HEAD a download makes anyway,
//! and the download answers 503 instead of serving bytes that may be wrong
//! (same size or not). `imgsrv scrub` reads it: wrong bytes are quarantined,
//! right ones are stamped again ([`BlobStore::vouch`]). The stamp is checked
//! at the HEAD before the GET; it is a claim, not a proof: someone who
//! writes a forged stamp too is found by scrub alone.
//!
//! # An unreachable server
//! A refused, reset or timed-out connection, and the answers S3 clients retry
//! (500, 502, 503, 504), are [`CasError::Unavailable`] (HTTP 503 with
//! Retry-After): nothing was done, and the request may be repeated once the
//! server is back. A commit that meets one keeps the staged parts.
//!
//! # Credentials
//! The secret key only ever goes into signatures; errors name the object
//! (`s3://bucket/key`), never a signed URL. ureq itself logs request paths
//! and queries (the signed URL, which carries the access key id but not the
//! secret) only at trace level.
//!
//! # Free space
//! S3 has no notion of free space. [`BlobStore::ensure_room`] refuses only
//! what no S3 object can hold (more than [`MAX_OBJECT`], 5 TiB, as
//! [`CasError::Invalid`]); a bucket quota (Garage `bucket set-quotas`) shows
//! up when a write is refused for it, as [`CasError::Full`] like a full disk.
//!
//! Downloads are proxied: [`BlobStore::open_range`] is a streaming ranged GET.

mod client;
mod ingest;
mod quarantine;
mod sweep;

use self::client::Client;
use super::{BlobStore, CasError, Leftover, Quarantined, Result, StagedPart, Stored, StoredBlob};
use crate::digest::Digest;
use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;

/// Key prefix of the blobs.
pub const BLOB_PREFIX: &str = "cas/sha256/";
/// Key prefix of the staged upload parts.
pub const UPLOADS_PREFIX: &str = "uploads/";
/// Key prefix of temporary objects.
pub const TMP_PREFIX: &str = "tmp/";
/// Key prefix of quarantined blobs and their notes.
pub const QUARANTINE_PREFIX: &str = "quarantine/";
/// The part size of multipart uploads (larger when an object would need more
/// than 10,000 parts), and the size up to which a blob is sent in one PUT.
pub const PART_SIZE: u64 = 16 << 20;
/// The largest S3 object.
pub const MAX_OBJECT: u64 = 5 << 40;
/// The largest object S3 copies server-side in one CopyObject; a larger one
/// is copied by reading it back and uploading it again.
const COPY_MAX: u64 = 5 << 30;

/// Where the bucket is and how to reach it. `Debug` does not show the
/// secret key, and the store never logs it.
#[derive(Clone)]
pub struct S3Options {
    /// `http://host:port` or `https://host:port` (a path prefix is kept).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `true`: `endpoint/bucket/key`; `false`: `bucket.host/key`
    /// (virtual-host addressing; `*.localhost` resolves to loopback).
    pub path_style: bool,
    /// PEM certificates trusted for an https endpoint, as `--ca` is
    /// (anchors, or the server's own certificate); `None`: the system store.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The S3 blob store; see the module documentation.
pub struct S3Store {
    client: Client,
    /// [`PART_SIZE`]
    part_size: u64,
    /// `COPY_MAX` (lowered by tests: [`S3Store::set_copy_max`])
    copy_max: u64,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.client.bucket_name())
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Checks the options and builds the client. Nothing is sent: a bucket
    /// that is down now does not keep the server from starting
    /// ([`BlobStore::probe_writable`] tells whether it answers).
    pub fn open(opts: &S3Options) -> Result<S3Store, CasError> {
        Ok(S3Store {
            client: Client::new(opts)?,
            part_size: PART_SIZE,
            copy_max: COPY_MAX,
        })
    }

    /// The key of a blob: `cas/sha256/ab/cd/<hex>`.
    pub fn key_of(digest: &Digest) -> String {
        format!("cas/{}", digest.cas_path())
    }

    /// Where an operator finds a blob: `s3://bucket/cas/sha256/ab/cd/<hex>`.
    pub fn location_of(&self, digest: &Digest) -> String {
        self.client.location(&Self::key_of(digest))
    }

    /// Lowers the size above which a stored object is copied by reading it
    /// back rather than server-side (tests of that path without 5 GiB).
    #[doc(hidden)]
    pub fn set_copy_max(&mut self, bytes: u64) {
        self.copy_max = bytes;
    }

    fn part_key(upload: &str, n: u32) -> String {
        format!("{UPLOADS_PREFIX}{upload}/{n}.part")
    }

    fn upload_prefix(upload: &str) -> String {
        format!("{UPLOADS_PREFIX}{upload}/")
    }
}

/// A ranged GET's body: exactly `left` bytes, an early end is an error (an
/// object shorter than it was is never served as complete).
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the S3 object ended {} bytes early", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

impl BlobStore for S3Store {
    /// See "A CAS key is never overwritten" above.
    fn needs_write_lock(&self) -> bool {
        true
    }

    fn leftovers(&self) -> Result<Vec<Leftover>> {
        self.list_leftovers()
    }

    fn remove_leftover(&self, l: &Leftover) -> Result<u64> {
        self.remove_leftover_at(l)
    }

    fn list(&self, each: &mut dyn FnMut(StoredBlob) -> bool) -> Result<()> {
        self.list_blobs(each)
    }

    fn delete(&self, digest: &Digest) -> Result<bool> {
        let key = Self::key_of(digest);
        if self.client.head(&key)?.is_none() {
            return Ok(false);
        }
        self.client.delete(&key)?;
        Ok(true)
    }

    fn quarantine(&self, digest: &Digest, reason: &str) -> Result<bool> {
        self.quarantine_blob(digest, reason)
    }

    fn quarantined(&self, digest: &Digest) -> Result<Option<Quarantined>> {
        self.read_quarantined(digest)
    }

    fn list_quarantined(&self, each: &mut dyn FnMut(Quarantined) -> bool) -> Result<()> {
        self.list_quarantine(each)
    }

    fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.client.head(&Self::key_of(digest))?.map(|o| o.size))
    }

    /// See "A blob carries its digest" above.
    fn stat_served(&self, digest: &Digest) -> Result<Stored> {
        let key = Self::key_of(digest);
        let Some(o) = self.client.head(&key)? else {
            return Ok(Stored::Absent);
        };
        let at = self.client.location(&key);
        Ok(match o.stamp {
            Some(h) if h.eq_ignore_ascii_case(&digest.hex()) => Stored::Blob(o.size),
            Some(h) => Stored::Disowned {
                size: o.size,
                reason: format!(
                    "the object {at} is stamped with sha256 {h}, not with its name: it was \
                     put there behind imgsrv's back"
                ),
            },
            None => Stored::Disowned {
                size: o.size,
                reason: format!(
                    "the object {at} lacks the {} stamp imgsrv puts on every blob it \
                     stores: it was replaced behind imgsrv's back (or copied in by a tool \
                     that drops metadata)",
                    client::STAMP
                ),
            },
        })
    }

    /// Stamps, with a copy onto itself, a blob a scrub read back right. (A
    /// replacement between that read and this copy would be stamped too; the
    /// next scrub reads it again.)
    fn vouch(&self, digest: &Digest) -> Result<bool> {
        let key = Self::key_of(digest);
        let Some(o) = self.client.head(&key)? else {
            return Ok(false);
        };
        if o.stamp
            .is_some_and(|h| h.eq_ignore_ascii_case(&digest.hex()))
        {
            return Ok(false);
        }
        if o.size > self.copy_max {
            log::warn!(
                "blob store: {} has no stamp and is too large to stamp with a copy onto \
                 itself; put it back through imgsrv (upload, mirror, import) after removing it",
                self.client.location(&key)
            );
            return Ok(false);
        }
        self.client.copy(&key, &key, Some(digest))
    }

    fn open_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        let key = Self::key_of(digest);
        if len == 0 {
            // (no empty byte range in HTTP) the blob must still be there
            return match self.client.head(&key)? {
                Some(_) => Ok(Box::new(io::empty())),
                None => Err(CasError::NotFound(*digest)),
            };
        }
        let Some(resp) = self.client.get(&key, Some((offset, len)))? else {
            return Err(CasError::NotFound(*digest));
        };
        let status = resp.status().as_u16();
        let range_ok = match status {
            206 => resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split_once('-'))
                .is_some_and(|(start, _)| start.parse::<u64>().ok() == Some(offset)),
            // a server that ignored the range sends it all: fine from 0
            200 => offset == 0,
            _ => false,
        };
        if !range_ok {
            return Err(self.client.err(
                "get",
                &key,
                io::ErrorKind::InvalidData,
                format!("asked for bytes {offset}+{len}, the answer was HTTP {status} for another range"),
            ));
        }
        Ok(Box::new(Exact {
            inner: resp.into_body().into_reader(),
            left: len,
        }))
    }

    fn put(&self, digest: &Digest, size: u64, reader: &mut dyn Read) -> Result<()> {
        self.put_blob(digest, size, reader)
    }

    fn stage_part(
        &self,
        upload: &str,
        n: u32,
        len: u64,
        reader: &mut dyn Read,
    ) -> Result<StagedPart> {
        self.stage(upload, n, len, reader)
    }

    fn commit_upload(
        &self,
        upload: &str,
        parts: &[(u32, StagedPart)],
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        self.commit(upload, parts, digest, size)
    }

    fn discard_upload(&self, upload: &str) -> Result<()> {
        self.discard(upload)
    }

    fn discard_part(&self, upload: &str, n: u32) -> Result<()> {
        super::fs::valid_upload_id(upload)?;
        self.client.delete(&Self::part_key(upload, n))
    }

    fn ensure_room(&self, bytes: u64) -> Result<()> {
        if bytes > MAX_OBJECT {
            return Err(CasError::Invalid(format!(
                "{bytes} bytes do not fit one S3 object (at most {MAX_OBJECT}): split the image"
            )));
        }
        Ok(())
    }

    fn probe_writable(&self) -> Result<()> {
        let key = format!("{TMP_PREFIX}probe-{}", uuid::Uuid::new_v4());
        self.client.put(&key, b"probe", None, None)?;
        self.client.delete(&key)?;
        self.ensure_room(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> S3Options {
        S3Options {
            endpoint: "http://127.0.0.1:3900".into(),
            bucket: "imgsrv".into(),
            region: "garage".into(),
            access_key_id: "GK0123".into(),
            secret_access_key: "very-secret-value".into(),
            path_style: true,
            ca_file: None,
        }
    }

    #[test]
    fn debug_redacts_the_secret() {
        let s = format!("{:?}", opts());
        assert!(!s.contains("very-secret-value"), "{s}");
        assert!(s.contains("<redacted>") && s.contains("GK0123"), "{s}");
        let store = S3Store::open(&opts()).unwrap();
        assert!(!format!("{store:?}").contains("very-secret-value"));
    }

    #[test]
    fn keys_are_sharded_under_cas() {
        let d = Digest::of(b"ROOT");
        assert_eq!(S3Store::key_of(&d), format!("cas/sha256/fe/d4/{}", d.hex()));
        assert_eq!(
            S3Store::part_key("0e3c4b9e-0000-4000-8000-000000000001", 3),
            "uploads/0e3c4b9e-0000-4000-8000-000000000001/3.part"
        );
    }

    #[test]
    fn bad_options_say_what_to_fix() {
        type Change = Box<dyn Fn(&mut S3Options)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|o| o.endpoint = "127.0.0.1:3900".into()),
                "endpoint",
            ),
            (Box::new(|o| o.endpoint = "ftp://h".into()), "http or https"),
            (Box::new(|o| o.bucket = " ".into()), "bucket is empty"),
            (
                Box::new(|o| o.secret_access_key = String::new()),
                "secret_access_key is empty",
            ),
            (Box::new(|o| o.path_style = false), "path_style = true"),
            (
                Box::new(|o| o.ca_file = Some("/etc/ca.pem".into())),
                "not https",
            ),
        ];
        for (change, want) in cases {
            let mut o = opts();
            change(&mut o);
            match S3Store::open(&o) {
                Err(CasError::Invalid(m)) => assert!(m.contains(want), "{m} lacks {want}"),
                other => panic!("{o:?}: {other:?}"),
            }
        }
        // virtual-host addressing with a host name is fine
        let mut o = opts();
        o.path_style = false;
        o.endpoint = "http://localhost:3900".into();
        S3Store::open(&o).unwrap();
    }

    #[test]
    fn exact_reader_refuses_an_early_end() {
        let mut v = Vec::new();
        let mut r = Exact {
            inner: &b"abc"[..],
            left: 5,
        };
        assert_eq!(
            r.read_to_end(&mut v).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let mut r = Exact {
            inner: &b"abcdef"[..],
            left: 3,
        };
        v.clear();
        r.read_to_end(&mut v).unwrap();
        assert_eq!(v, b"abc");
    }
}
