//! The BlobStore contract: one suite of checks over `&dyn BlobStore`, run on
//! the filesystem store (a temp dir, always) and, with `--features s3`, on
//! the S3 store against a real Garage that tests/fixtures/garage-harness
//! starts (one server per test binary, a fresh bucket per test). Then the
//! S3-only checks: multipart uploads of large blobs, nothing left behind by
//! a refused one, never overwriting a key, virtual-host addressing, quotas.

use imgsrv::cas::{BlobStore, CasError, FsStore, LeftoverKind, StagedPart};
use imgsrv::digest::Digest;
use std::io::{self, Read};

const UPLOAD: &str = "0e3c4b9e-0000-4000-8000-00000000c0de";

fn read_range(s: &dyn BlobStore, d: &Digest, offset: u64, len: u64) -> Vec<u8> {
    let mut v = Vec::new();
    s.open_range(d, offset, len)
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

fn read_all(s: &dyn BlobStore, d: &Digest) -> Vec<u8> {
    let len = s.stat(d).unwrap().expect("stored");
    read_range(s, d, 0, len)
}

fn listed(s: &dyn BlobStore) -> Vec<(Digest, u64)> {
    let mut v = Vec::new();
    s.list(&mut |b| {
        v.push((b.digest, b.size));
        true
    })
    .unwrap();
    v.sort();
    v
}

fn put(s: &dyn BlobStore, bytes: &[u8]) -> Digest {
    let d = Digest::of(bytes);
    s.put(&d, bytes.len() as u64, &mut &bytes[..]).unwrap();
    d
}

fn assert_clean(s: &dyn BlobStore) {
    let l = s.leftovers().unwrap();
    assert!(l.is_empty(), "leftovers: {l:?}");
}

// ---- the contract ------------------------------------------------------------------

fn put_then_stat_and_read_ranges(s: &dyn BlobStore) {
    let d = put(s, b"0123456789");
    assert_eq!(s.stat(&d).unwrap(), Some(10));
    assert_eq!(read_all(s, &d), b"0123456789");
    assert_eq!(read_range(s, &d, 3, 4), b"3456");
    assert_eq!(read_range(s, &d, 9, 1), b"9");
    assert_eq!(read_range(s, &d, 0, 1), b"0");
    assert_eq!(read_range(s, &d, 5, 0), b"");
    let absent = Digest::of(b"absent");
    assert_eq!(s.stat(&absent).unwrap(), None);
    assert!(matches!(
        s.open_range(&absent, 0, 1),
        Err(CasError::NotFound(d)) if d == absent
    ));
    assert!(matches!(
        s.open_range(&absent, 0, 0),
        Err(CasError::NotFound(_))
    ));
    // an empty blob is a blob
    let empty = put(s, b"");
    assert_eq!(s.stat(&empty).unwrap(), Some(0));
    assert_eq!(read_all(s, &empty), b"");
    assert_clean(s);
}

fn put_never_replaces_and_still_checks(s: &dyn BlobStore) {
    let d = put(s, b"ROOT");
    s.put(&d, 4, &mut &b"ROOT"[..]).unwrap();
    // wrong bytes for a stored digest: refused, the blob stays as it was
    assert!(matches!(
        s.put(&d, 4, &mut &b"RooT"[..]),
        Err(CasError::Mismatch { .. })
    ));
    assert!(matches!(
        s.put(&d, 4, &mut &b"ROO"[..]),
        Err(CasError::Truncated { .. })
    ));
    assert_eq!(read_all(s, &d), b"ROOT");
    assert_eq!(listed(s), vec![(d, 4)]);
    assert_clean(s);
}

fn wrong_digest_short_or_long_input_stores_nothing(s: &dyn BlobStore) {
    let d = Digest::of(b"ROOT");
    assert!(matches!(
        s.put(&d, 4, &mut &b"RooT"[..]),
        Err(CasError::Mismatch { expected, actual, .. }) if expected == d && actual == Digest::of(b"RooT")
    ));
    assert!(matches!(
        s.put(&d, 4, &mut &b"ROO"[..]),
        Err(CasError::Truncated {
            expected: 4,
            actual: 3
        })
    ));
    assert!(matches!(
        s.put(&d, 4, &mut &b"ROOTS"[..]),
        Err(CasError::Truncated { expected: 4, .. })
    ));
    // a source that fails midway
    let mut failing = (&b"RO"[..]).chain(Failing);
    assert!(s.put(&d, 4, &mut failing).is_err());
    assert_eq!(s.stat(&d).unwrap(), None);
    assert!(listed(s).is_empty());
    assert_clean(s);
}

fn multipart_upload_in_order_with_a_resent_part(s: &dyn BlobStore) {
    let d = Digest::of(b"METAROOT");
    let p2 = s.stage_part(UPLOAD, 2, 4, &mut &b"ROOT"[..]).unwrap();
    let _bad = s.stage_part(UPLOAD, 1, 4, &mut &b"XXXX"[..]).unwrap();
    let p1 = s.stage_part(UPLOAD, 1, 4, &mut &b"META"[..]).unwrap();
    assert_eq!(
        p1,
        StagedPart {
            digest: Digest::of(b"META"),
            size: 4
        }
    );
    assert!(s
        .leftovers()
        .unwrap()
        .iter()
        .any(|l| l.kind == LeftoverKind::Staged && l.name == UPLOAD && l.bytes == 8));
    s.commit_upload(UPLOAD, &[(1, p1), (2, p2)], &d, 8).unwrap();
    assert_eq!(read_all(s, &d), b"METAROOT");
    // the staged parts are gone once committed
    assert_clean(s);
}

fn commit_checks_digest_and_size_and_stores_nothing_wrong(s: &dyn BlobStore) {
    let p = s.stage_part(UPLOAD, 1, 4, &mut &b"DISK"[..]).unwrap();
    let wrong = Digest::of(b"ROOT");
    assert!(matches!(
        s.commit_upload(UPLOAD, &[(1, p.clone())], &wrong, 4),
        Err(CasError::Mismatch { .. })
    ));
    assert_eq!(s.stat(&wrong).unwrap(), None);
    let p = s.stage_part(UPLOAD, 1, 4, &mut &b"DISK"[..]).unwrap();
    assert!(matches!(
        s.commit_upload(UPLOAD, &[(1, p.clone())], &p.digest, 5),
        Err(CasError::Truncated { .. })
    ));
    assert_eq!(s.stat(&p.digest).unwrap(), None);
    // several parts whose concatenation is not the digest
    let a = s.stage_part(UPLOAD, 1, 4, &mut &b"META"[..]).unwrap();
    let b = s.stage_part(UPLOAD, 2, 4, &mut &b"ROOT"[..]).unwrap();
    let claimed = Digest::of(b"ROOTMETA");
    assert!(matches!(
        s.commit_upload(UPLOAD, &[(1, a), (2, b)], &claimed, 8),
        Err(CasError::Mismatch { .. })
    ));
    assert_eq!(s.stat(&claimed).unwrap(), None);
    let p = s.stage_part(UPLOAD, 1, 4, &mut &b"DISK"[..]).unwrap();
    s.commit_upload(UPLOAD, &[(1, p.clone())], &p.digest, 4)
        .unwrap();
    assert_eq!(read_all(s, &p.digest), b"DISK");
    assert_eq!(listed(s), vec![(p.digest, 4)]);
    assert_clean(s);
}

fn a_truncated_part_is_refused(s: &dyn BlobStore) {
    assert!(matches!(
        s.stage_part(UPLOAD, 1, 10, &mut &b"DISK"[..]),
        Err(CasError::Truncated {
            expected: 10,
            actual: 4
        })
    ));
    assert_clean(s);
    // a failed re-send keeps the part staged before
    let p = s.stage_part(UPLOAD, 1, 4, &mut &b"DISK"[..]).unwrap();
    assert!(s.stage_part(UPLOAD, 1, 4, &mut &b"DI"[..]).is_err());
    s.commit_upload(UPLOAD, &[(1, p.clone())], &p.digest, 4)
        .unwrap();
    assert_eq!(read_all(s, &p.digest), b"DISK");
}

fn discard_removes_parts(s: &dyn BlobStore) {
    let p1 = s.stage_part(UPLOAD, 1, 4, &mut &b"META"[..]).unwrap();
    let p2 = s.stage_part(UPLOAD, 2, 4, &mut &b"ROOT"[..]).unwrap();
    s.discard_part(UPLOAD, 2).unwrap();
    s.discard_part(UPLOAD, 2).unwrap();
    let d = Digest::of(b"METAROOT");
    assert!(matches!(
        s.commit_upload(UPLOAD, &[(1, p1.clone()), (2, p2)], &d, 8),
        Err(CasError::MissingPart(2))
    ));
    assert_eq!(s.stat(&d).unwrap(), None);
    s.stage_part(UPLOAD, 1, 4, &mut &b"META"[..]).unwrap();
    s.discard_upload(UPLOAD).unwrap();
    s.discard_upload(UPLOAD).unwrap();
    assert!(matches!(
        s.commit_upload(UPLOAD, &[(1, p1)], &Digest::of(b"META"), 4),
        Err(CasError::MissingPart(1))
    ));
    assert_clean(s);
    for bad in ["../x", "", "a/b", "x y"] {
        assert!(s.stage_part(bad, 1, 0, &mut &b""[..]).is_err(), "{bad}");
        assert!(s.discard_upload(bad).is_err(), "{bad}");
    }
}

fn list_every_blob_and_stop_early(s: &dyn BlobStore) {
    let mut want: Vec<(Digest, u64)> = (0..5)
        .map(|i| {
            let bytes = vec![b'a' + i; i as usize + 1];
            (put(s, &bytes), bytes.len() as u64)
        })
        .collect();
    want.sort();
    assert_eq!(listed(s), want);
    let mut n = 0;
    s.list(&mut |_| {
        n += 1;
        false
    })
    .unwrap();
    assert_eq!(n, 1);
    let mut recent = true;
    s.list(&mut |b| {
        recent &= b.stored_at.elapsed().map_or(true, |e| e.as_secs() < 600);
        true
    })
    .unwrap();
    assert!(recent, "stored_at is when the blob was stored");
}

fn delete_removes_a_blob(s: &dyn BlobStore) {
    let d = put(s, b"ROOT");
    let keep = put(s, b"META");
    assert!(s.delete(&d).unwrap());
    assert_eq!(s.stat(&d).unwrap(), None);
    assert!(!s.delete(&d).unwrap());
    assert_eq!(listed(s), vec![(keep, 4)]);
    // and it can be stored again
    put(s, b"ROOT");
    assert_eq!(read_all(s, &d), b"ROOT");
}

fn leftovers_are_listed_and_removed(s: &dyn BlobStore) {
    assert_clean(s);
    s.stage_part(UPLOAD, 1, 4, &mut &b"META"[..]).unwrap();
    s.stage_part(UPLOAD, 2, 3, &mut &b"ABC"[..]).unwrap();
    let l = s.leftovers().unwrap();
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(
        (l[0].kind, l[0].name.as_str(), l[0].bytes),
        (LeftoverKind::Staged, UPLOAD, 7)
    );
    assert_eq!(s.remove_leftover(&l[0]).unwrap(), 7);
    assert_clean(s);
    // a blob is never a leftover
    put(s, b"ROOT");
    assert_clean(s);
}

fn quarantine_lifecycle(s: &dyn BlobStore) {
    let d = put(s, b"ROOT");
    let other = put(s, b"META");
    assert!(s.quarantine(&d, "sha256 mismatch\nsecond line").unwrap());
    assert_eq!(s.stat(&d).unwrap(), None);
    assert!(matches!(s.open_range(&d, 0, 4), Err(CasError::NotFound(_))));
    assert_eq!(
        listed(s),
        vec![(other, 4)],
        "a quarantined blob is not in the store"
    );
    let q = s.quarantined(&d).unwrap().expect("a record");
    assert_eq!(q.digest, d);
    assert_eq!(
        (q.size, q.reason.as_str()),
        (Some(4), "sha256 mismatch second line")
    );
    assert!(q.at.ends_with('Z'), "{}", q.at);
    assert!(q.location.contains(&d.hex()), "{}", q.location);
    let mut all = Vec::new();
    s.list_quarantined(&mut |q| {
        all.push(q.digest);
        true
    })
    .unwrap();
    assert_eq!(all, vec![d]);
    // the right bytes come back like any missing blob; the record stays
    put(s, b"ROOT");
    assert_eq!(read_all(s, &d), b"ROOT");
    assert!(s.quarantined(&d).unwrap().is_some());
    // quarantined again: the record is replaced
    assert!(s.quarantine(&d, "again").unwrap());
    assert_eq!(s.quarantined(&d).unwrap().unwrap().reason, "again");
    let absent = Digest::of(b"x");
    assert!(!s.quarantine(&absent, "r").unwrap());
    assert!(s.quarantined(&absent).unwrap().is_none());
    assert_clean(s);
}

fn probe_writes_nothing(s: &dyn BlobStore) {
    s.probe_writable().unwrap();
    s.probe_writable().unwrap();
    s.ensure_room(0).unwrap();
    s.ensure_room(1 << 30).unwrap();
    assert!(listed(s).is_empty());
    assert_clean(s);
}

fn adopt_copies_a_checked_file(s: &dyn BlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("root");
    std::fs::write(&f, b"ROOT").unwrap();
    let wrong = Digest::of(b"RooT");
    assert!(matches!(
        s.adopt(&f, &wrong, 4),
        Err(CasError::Mismatch { .. })
    ));
    assert_eq!(s.stat(&wrong).unwrap(), None);
    let d = Digest::of(b"ROOT");
    s.adopt_hashed(&f, &d, 4).unwrap();
    assert_eq!(read_all(s, &d), b"ROOT");
    assert_eq!(std::fs::read(&f).unwrap(), b"ROOT", "the file stays");
    assert_clean(s);
}

/// Bytes whose digest the caller does not know: stored under the digest they make
/// (small and over the multipart threshold), an existing blob kept, a short or
/// long source storing nothing.
fn put_new_stores_under_the_digest_the_bytes_make(s: &dyn BlobStore) {
    let big: Vec<u8> = (0..(17u32 << 20)).map(|i| (i % 253) as u8).collect();
    for bytes in [&b"ROOT"[..], &big[..]] {
        let d = s.put_new(bytes.len() as u64, &mut &bytes[..]).unwrap();
        assert_eq!(d, Digest::of(bytes));
        assert!(read_all(s, &d) == bytes);
    }
    assert_eq!(
        s.put_new(4, &mut &b"ROOT"[..]).unwrap(),
        Digest::of(b"ROOT")
    );
    for (bytes, n) in [(&b"MET"[..], 4), (&b"METAS"[..], 4)] {
        assert!(matches!(
            s.put_new(n, &mut &bytes[..]),
            Err(CasError::Truncated { .. })
        ));
    }
    assert_eq!(s.stat(&Digest::of(b"META")).unwrap(), None);
    assert_eq!(listed(s).len(), 2);
    assert_clean(s);
}

/// The side hash (the Incus fingerprint beside a blob's own sha256) sees exactly
/// the bytes stored, after whatever state it brought, small or pipelined; a
/// refused store leaves no blob whatever the side saw.
fn a_side_hash_sees_exactly_the_stored_bytes(s: &dyn BlobStore) {
    use imgsrv::digest::Hasher;
    let big: Vec<u8> = (0..(19u32 << 20) + 4097).map(|i| (i % 251) as u8).collect();
    let meta = b"METADATA TARBALL";
    let fingerprint = |bytes: &[u8]| {
        let mut h = Hasher::new();
        h.update(meta);
        h.update(bytes);
        h.finish()
    };
    let prefixed = || {
        let mut h = Hasher::new();
        h.update(meta);
        h
    };
    for bytes in [&b"ROOT"[..], &big[..]] {
        let mut side = prefixed();
        let d = s
            .put_new_hashing(bytes.len() as u64, &mut &bytes[..], Some(&mut side))
            .unwrap();
        assert_eq!(d, Digest::of(bytes));
        assert_eq!(side.len(), (meta.len() + bytes.len()) as u64);
        assert_eq!(side.finish(), fingerprint(bytes));
        assert!(read_all(s, &d) == bytes);

        let mut side = prefixed();
        let p = s
            .stage_part_hashing(
                UPLOAD,
                1,
                bytes.len() as u64,
                &mut &bytes[..],
                Some(&mut side),
            )
            .unwrap();
        assert_eq!(p.digest, Digest::of(bytes));
        assert_eq!(side.finish(), fingerprint(bytes));
        s.discard_upload(UPLOAD).unwrap();
    }
    let mut side = prefixed();
    assert!(matches!(
        s.put_new_hashing(4, &mut &b"METAS"[..], Some(&mut side)),
        Err(CasError::Truncated { .. })
    ));
    assert_eq!(s.stat(&Digest::of(b"META")).unwrap(), None);
    assert_eq!(listed(s).len(), 2);
    assert_clean(s);
}

/// A reader that fails.
struct Failing;
impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other("the client went away"))
    }
}

/// One `#[test]` per check and backend.
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod fs_store {
            $(
                #[test]
                fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    let s = super::FsStore::open(dir.path()).unwrap();
                    super::$check(&s);
                }
            )*
        }
        #[cfg(feature = "s3")]
        mod s3_store {
            $(
                #[test]
                fn $check() {
                    let s = super::garage::store(stringify!($check));
                    super::$check(&s);
                }
            )*
        }
    };
}

contract!(
    put_then_stat_and_read_ranges,
    put_never_replaces_and_still_checks,
    wrong_digest_short_or_long_input_stores_nothing,
    multipart_upload_in_order_with_a_resent_part,
    commit_checks_digest_and_size_and_stores_nothing_wrong,
    a_truncated_part_is_refused,
    discard_removes_parts,
    list_every_blob_and_stop_early,
    delete_removes_a_blob,
    leftovers_are_listed_and_removed,
    quarantine_lifecycle,
    probe_writes_nothing,
    adopt_copies_a_checked_file,
    put_new_stores_under_the_digest_the_bytes_make,
    a_side_hash_sees_exactly_the_stored_bytes,
);

#[cfg(feature = "s3")]
#[path = "support/garage.rs"]
mod garage;

#[cfg(feature = "s3")]
mod s3_only {
    use super::garage;
    use super::*;
    use imgsrv::cas::s3::S3Store;
    use imgsrv::digest::Hasher;

    const MIB: u64 = 1 << 20;

    /// Deterministic bytes that do not repeat with any part size: byte `i`.
    fn byte_at(i: u64) -> u8 {
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (x >> 56) as u8 ^ (i as u8)
    }

    /// `len` bytes of [`byte_at`] from `pos`, streamed (no large buffer).
    struct Pattern {
        pos: u64,
        end: u64,
    }

    impl Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min((self.end - self.pos) as usize);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = byte_at(self.pos + i as u64);
            }
            self.pos += n as u64;
            Ok(n)
        }
    }

    fn pattern(len: u64) -> Pattern {
        Pattern { pos: 0, end: len }
    }

    fn pattern_digest(len: u64) -> Digest {
        let mut h = Hasher::new();
        imgsrv::digest::read_chunks(&mut pattern(len), |c| h.update(c)).unwrap();
        h.finish()
    }

    /// Hashes what `open_range` streams, without keeping it.
    fn digest_of_range(s: &dyn BlobStore, d: &Digest, offset: u64, len: u64) -> (Digest, u64) {
        let mut h = Hasher::new();
        let n = imgsrv::digest::read_chunks(&mut s.open_range(d, offset, len).unwrap(), |c| {
            h.update(c)
        })
        .unwrap();
        (h.finish(), n)
    }

    #[test]
    fn a_100_mib_blob_goes_up_in_parts_and_comes_back_identical() {
        let (s, raw) = garage::store_and_raw("large");
        let len = 100 * MIB + 12_345;
        let d = pattern_digest(len);
        s.put(&d, len, &mut pattern(len)).unwrap();
        assert_eq!(s.stat(&d).unwrap(), Some(len));
        // a multipart object: its ETag is `<md5>-<number of parts>`
        let etag = raw.etag(&S3Store::key_of(&d)).expect("stored");
        assert!(
            etag.ends_with("-7\""),
            "7 parts of 16 MiB expected, ETag {etag}"
        );
        assert_eq!(digest_of_range(&s, &d, 0, len), (d, len));
        for (off, n) in [
            (0, 1),
            (16 * MIB - 3, 7),
            (32 * MIB - 1, 2),
            (50 * MIB + 1, 3 * MIB),
            (len - 1, 1),
        ] {
            let got = read_range(&s, &d, off, n);
            let want: Vec<u8> = (off..off + n).map(byte_at).collect();
            assert!(got == want, "range {off}+{n} differs");
        }
        assert!(raw.unfinished_uploads().is_empty());
        assert_clean(&s);
    }

    #[test]
    fn a_refused_large_put_leaves_no_object_and_no_multipart_upload() {
        let (s, raw) = garage::store_and_raw("refused");
        let len = 40 * MIB;
        let right = pattern_digest(len);
        let wrong = Digest::of(b"not these bytes");
        assert!(matches!(
            s.put(&wrong, len, &mut pattern(len)),
            Err(CasError::Mismatch { actual, .. }) if actual == right
        ));
        // short: the reader ends in the third part
        assert!(matches!(
            s.put(&right, len, &mut pattern(len - 5 * MIB)),
            Err(CasError::Truncated { expected, actual }) if expected == len && actual == len - 5 * MIB
        ));
        // long
        assert!(matches!(
            s.put(&right, len, &mut pattern(len + 1)),
            Err(CasError::Truncated { .. })
        ));
        // a client that goes away midway
        let mut failing = pattern(20 * MIB).chain(Failing);
        assert!(s.put(&right, len, &mut failing).is_err());
        for d in [right, wrong] {
            assert_eq!(s.stat(&d).unwrap(), None);
            assert_eq!(raw.etag(&S3Store::key_of(&d)), None);
        }
        assert_eq!(raw.unfinished_uploads(), Vec::<String>::new());
        assert!(raw.keys("").is_empty(), "{:?}", raw.keys(""));
        assert_clean(&s);
    }

    #[test]
    fn large_parts_commit_by_reading_them_back() {
        let (mut s, raw) = garage::store_and_raw("parts");
        // two parts of 20 MiB, each staged as a multipart upload of its own
        let part = 20 * MIB;
        let mut all = Hasher::new();
        imgsrv::digest::read_chunks(&mut pattern(2 * part), |c| all.update(c)).unwrap();
        let d = all.finish();
        let p1 = s.stage_part(UPLOAD, 1, part, &mut pattern(part)).unwrap();
        let mut second = pattern(2 * part);
        second.pos = part;
        let p2 = s.stage_part(UPLOAD, 2, part, &mut second).unwrap();
        assert_eq!(p1.digest, pattern_digest(part));
        s.commit_upload(UPLOAD, &[(1, p1), (2, p2)], &d, 2 * part)
            .unwrap();
        assert_eq!(digest_of_range(&s, &d, 0, 2 * part), (d, 2 * part));
        assert!(raw.keys("uploads/").is_empty());
        // one part larger than the server-side copy limit is read back too
        s.set_copy_max(MIB);
        let p = s.stage_part(UPLOAD, 1, part, &mut pattern(part)).unwrap();
        let one = p.digest;
        s.commit_upload(UPLOAD, &[(1, p)], &one, part).unwrap();
        assert_eq!(digest_of_range(&s, &one, 0, part), (one, part));
        // and so is a quarantined blob
        assert!(s.quarantine(&one, "test").unwrap());
        assert_eq!(s.quarantined(&one).unwrap().unwrap().size, Some(part));
        assert_eq!(raw.unfinished_uploads(), Vec::<String>::new());
        assert_clean(&s);
    }

    #[test]
    fn an_existing_key_is_never_overwritten() {
        let (s, raw) = garage::store_and_raw("keep");
        // damaged bytes under a blob's key, behind imgsrv's back
        let d = Digest::of(b"ROOT");
        let key = S3Store::key_of(&d);
        raw.put(&key, b"RooT");
        s.put(&d, 4, &mut &b"ROOT"[..]).unwrap();
        assert_eq!(raw.get(&key), b"RooT", "put kept the existing object");
        let p = s.stage_part(UPLOAD, 1, 4, &mut &b"ROOT"[..]).unwrap();
        s.commit_upload(UPLOAD, &[(1, p)], &d, 4).unwrap();
        assert_eq!(raw.get(&key), b"RooT", "a single-part commit kept it");
        let a = s.stage_part(UPLOAD, 1, 2, &mut &b"RO"[..]).unwrap();
        let b = s.stage_part(UPLOAD, 2, 2, &mut &b"OT"[..]).unwrap();
        s.commit_upload(UPLOAD, &[(1, a), (2, b)], &d, 4).unwrap();
        assert_eq!(raw.get(&key), b"RooT", "a multi-part commit kept it");
        // (kept at another size too, and wrong parts are still refused)
        raw.put(&key, b"RooT!");
        let a = s.stage_part(UPLOAD, 1, 2, &mut &b"RO"[..]).unwrap();
        let b = s.stage_part(UPLOAD, 2, 2, &mut &b"OX"[..]).unwrap();
        assert!(matches!(
            s.commit_upload(UPLOAD, &[(1, a), (2, b)], &d, 4),
            Err(CasError::Mismatch { .. })
        ));
        let a = s.stage_part(UPLOAD, 1, 2, &mut &b"RO"[..]).unwrap();
        let b = s.stage_part(UPLOAD, 2, 2, &mut &b"OT"[..]).unwrap();
        s.commit_upload(UPLOAD, &[(1, a), (2, b)], &d, 4).unwrap();
        assert_eq!(raw.get(&key), b"RooT!");
        assert!(raw.keys("uploads/").is_empty());
        raw.put(&key, b"RooT");
        // once quarantined, the right bytes go in
        assert!(s.quarantine(&d, "sha256 mismatch").unwrap());
        s.put(&d, 4, &mut &b"ROOT"[..]).unwrap();
        assert_eq!(raw.get(&key), b"ROOT");
        assert_eq!(raw.get(&format!("quarantine/{}", d.hex())), b"RooT");
        // a large put onto a taken key: no upload is even begun
        let len = 20 * MIB;
        let big = pattern_digest(len);
        raw.put(&S3Store::key_of(&big), b"taken");
        s.put(&big, len, &mut pattern(len)).unwrap();
        assert_eq!(raw.get(&S3Store::key_of(&big)), b"taken");
        assert_eq!(raw.unfinished_uploads(), Vec::<String>::new());
    }

    /// Calls `hook` once, when `at` bytes were read.
    struct Hook<R, F> {
        inner: R,
        read: u64,
        at: u64,
        hook: Option<F>,
    }

    impl<R: Read, F: FnOnce()> Read for Hook<R, F> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.read >= self.at {
                if let Some(h) = self.hook.take() {
                    h();
                }
            }
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    #[test]
    fn every_blob_written_is_stamped_and_a_replaced_one_is_disowned() {
        use imgsrv::cas::Stored;
        let (s, raw) = garage::store_and_raw("stamp");
        let disowned = |d: &Digest| matches!(s.stat_served(d).unwrap(), Stored::Disowned { .. });
        // each way a blob gets in: a PUT, a multipart upload, a one-part commit
        // (a copy), a multi-part commit (read back and uploaded again)
        let small = Digest::of(b"ROOT");
        s.put(&small, 4, &mut &b"ROOT"[..]).unwrap();
        let len = 20 * MIB;
        let big = pattern_digest(len);
        s.put(&big, len, &mut pattern(len)).unwrap();
        let copied = Digest::of(b"COPIED");
        let p = s.stage_part(UPLOAD, 1, 6, &mut &b"COPIED"[..]).unwrap();
        s.commit_upload(UPLOAD, &[(1, p)], &copied, 6).unwrap();
        let joined = Digest::of(b"JOINED");
        let a = s.stage_part(UPLOAD, 1, 3, &mut &b"JOI"[..]).unwrap();
        let b = s.stage_part(UPLOAD, 2, 3, &mut &b"NED"[..]).unwrap();
        s.commit_upload(UPLOAD, &[(1, a), (2, b)], &joined, 6)
            .unwrap();
        for (d, size) in [(small, 4), (big, len), (copied, 6), (joined, 6)] {
            assert_eq!(s.stat_served(&d).unwrap(), Stored::Blob(size), "{d}");
            assert!(!s.vouch(&d).unwrap(), "{d} was stamped already");
        }
        assert_eq!(s.stat_served(&Digest::of(b"none")).unwrap(), Stored::Absent);
        // replaced behind imgsrv's back, same size: disowned, yet still there
        let key = S3Store::key_of(&small);
        raw.put(&key, b"RooT");
        assert!(disowned(&small));
        assert_eq!(s.stat(&small).unwrap(), Some(4));
        // the right bytes put back by another tool (no stamp): disowned until
        // vouched for (a scrub does, once it read them right)
        raw.put(&key, b"ROOT");
        assert!(disowned(&small));
        assert!(s.vouch(&small).unwrap());
        assert_eq!(s.stat_served(&small).unwrap(), Stored::Blob(4));
        assert_eq!(raw.get(&key), b"ROOT");
        assert!(!s.vouch(&Digest::of(b"none")).unwrap());
    }

    #[test]
    fn a_key_taken_during_an_upload_is_kept() {
        // (what the caller's per-digest lock prevents; the HEAD just before
        // the upload is completed still keeps what is there)
        let (s, raw) = garage::store_and_raw("race");
        let len = 40 * MIB;
        let d = pattern_digest(len);
        let key = S3Store::key_of(&d);
        // taken once every part is sent, before the upload is completed
        let mut r = Hook {
            inner: pattern(len),
            read: 0,
            at: len,
            hook: Some(|| raw.put(&key, b"taken meanwhile")),
        };
        s.put(&d, len, &mut r).unwrap();
        assert_eq!(raw.get(&key), b"taken meanwhile");
        assert_eq!(raw.unfinished_uploads(), Vec::<String>::new());
        // taken midway: Garage itself drops an unfinished multipart upload of
        // a key that gets a new object, so the put fails (nothing replaced)
        let d = pattern_digest(len - 1);
        let key = S3Store::key_of(&d);
        let mut r = Hook {
            inner: pattern(len - 1),
            read: 0,
            at: 20 * MIB,
            hook: Some(|| raw.put(&key, b"taken midway")),
        };
        let midway = s.put(&d, len - 1, &mut r);
        assert!(
            // (Garage may close the connection: unavailable, as a server gone away)
            matches!(
                midway,
                Ok(()) | Err(CasError::Io { .. } | CasError::Unavailable { .. })
            ),
            "{midway:?}"
        );
        assert_eq!(raw.get(&key), b"taken midway");
        assert_eq!(raw.unfinished_uploads(), Vec::<String>::new());
        // a small one: checked in memory, HEAD, then one PUT
        let d = Digest::of(b"ROOT");
        let key = S3Store::key_of(&d);
        let mut r = Hook {
            inner: &b"ROOT"[..],
            read: 0,
            at: 2,
            hook: Some(|| raw.put(&key, b"RooT")),
        };
        s.put(&d, 4, &mut r).unwrap();
        assert_eq!(raw.get(&key), b"RooT");
    }

    #[test]
    fn listing_follows_pages() {
        let (s, _raw) = garage::store_and_raw("pages");
        // more than one ListObjectsV2 page (1,000 keys)
        let mut want: Vec<Digest> = (0..1003u32)
            .map(|i| put(&s, format!("blob {i}").as_bytes()))
            .collect();
        want.sort();
        let got: Vec<Digest> = listed(&s).into_iter().map(|(d, _)| d).collect();
        assert_eq!(got.len(), 1003);
        assert!(got == want, "every blob listed once");
    }

    #[test]
    fn unfinished_multipart_uploads_are_leftovers() {
        let (s, raw) = garage::store_and_raw("mpu");
        let d = Digest::of(b"crash");
        // what a crash mid-put leaves: an upload on a CAS key, one on a part
        raw.start_upload(&S3Store::key_of(&d));
        raw.start_upload(&format!("uploads/{UPLOAD}/1.part"));
        raw.put("tmp/probe-left", b"probe");
        let mut l = s.leftovers().unwrap();
        l.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!(
            (l[0].kind, l[0].name.as_str()),
            (LeftoverKind::Staged, UPLOAD)
        );
        assert_eq!(l[1].kind, LeftoverKind::Temp);
        assert!(l[1].name.starts_with(&S3Store::key_of(&d)), "{:?}", l[1]);
        assert_eq!(
            (l[2].kind, l[2].name.as_str(), l[2].bytes),
            (LeftoverKind::Temp, "probe-left", 5)
        );
        for x in &l {
            s.remove_leftover(x).unwrap();
        }
        assert_clean(&s);
        assert_eq!(raw.unfinished_uploads(), Vec::<String>::new());
        assert!(raw.keys("").is_empty());
    }

    #[test]
    fn virtual_host_addressing_works() {
        let (path_style, raw) = garage::store_and_raw("vhost");
        let mut opts = raw.options();
        opts.path_style = false;
        opts.endpoint = opts.endpoint.replace("127.0.0.1", "localhost");
        let s = S3Store::open(&opts).unwrap();
        let d = put(&s, b"by host name");
        assert_eq!(read_range(&path_style, &d, 3, 4), b"host");
        assert_eq!(read_all(&s, &d), b"by host name");
        assert_eq!(listed(&s), vec![(d, 12)]);
        s.probe_writable().unwrap();
    }

    #[test]
    fn an_https_endpoint_is_trusted_through_ca_file() {
        let (_s, raw) = garage::store_and_raw("tls");
        let proxy = garage::TlsProxy::start();
        let mut opts = raw.options();
        opts.endpoint = format!("https://127.0.0.1:{}", proxy.port);
        opts.ca_file = Some(proxy.cert.clone());
        let s = S3Store::open(&opts).unwrap();
        s.probe_writable().unwrap();
        let small = put(&s, b"over TLS");
        assert_eq!(read_all(&s, &small), b"over TLS");
        let len = 20 * MIB;
        let d = pattern_digest(len);
        s.put(&d, len, &mut pattern(len)).unwrap();
        assert_eq!(digest_of_range(&s, &d, 0, len), (d, len));
        assert_eq!(
            read_range(&s, &d, 16 * MIB - 1, 2),
            vec![byte_at(16 * MIB - 1), byte_at(16 * MIB)]
        );
        // without the CA file, the server's certificate is not trusted
        opts.ca_file = None;
        let untrusted = S3Store::open(&opts).unwrap();
        let e = untrusted.stat(&small).unwrap_err();
        assert!(matches!(e, CasError::Io { .. }), "{e:?}");
        // nor with another one
        let other = proxy.dir().join("other.pem");
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        std::fs::write(&other, ck.cert.pem()).unwrap();
        opts.ca_file = Some(other);
        let wrong = S3Store::open(&opts).unwrap();
        assert!(wrong.stat(&small).is_err());
        // a CA file that is no certificate is refused when opening
        let junk = proxy.dir().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        opts.ca_file = Some(junk);
        assert!(matches!(S3Store::open(&opts), Err(CasError::Invalid(m)) if m.contains("ca_file")));
    }

    #[test]
    fn a_bucket_quota_is_full_and_stores_nothing() {
        let (s, raw) = garage::store_and_raw("quota");
        raw.cli(&["bucket", "set-quotas", "--max-size", "1MiB", raw.bucket()]);
        let len = 2 * MIB;
        let d = pattern_digest(len);
        match s.put(&d, len, &mut pattern(len)) {
            Err(CasError::Full { path, reason }) => {
                assert!(path.starts_with("s3://"), "{path}");
                assert!(reason.contains("quota"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.stat(&d).unwrap(), None);
        // small writes still fit
        put(&s, b"ROOT");
    }

    #[test]
    fn bad_credentials_and_a_stopped_server_are_errors_not_panics() {
        let (_s, raw) = garage::store_and_raw("creds");
        let mut opts = raw.options();
        opts.secret_access_key = "0".repeat(64);
        let s = S3Store::open(&opts).unwrap();
        let e = s.probe_writable().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("403"), "{msg}");
        assert!(!msg.contains(&opts.access_key_id), "no key id: {msg}");
        assert!(!msg.contains("X-Amz-Signature"), "no signed URL: {msg}");
        // a server that closes every connection unanswered
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                drop(c);
            }
        });
        opts.endpoint = format!("http://127.0.0.1:{port}");
        let s = S3Store::open(&opts).unwrap();
        let e = s.stat(&Digest::of(b"x"));
        assert!(matches!(e, Err(CasError::Unavailable { .. })), "{e:?}");
        // and one that refuses them (nothing listens)
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        opts.endpoint = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let s = S3Store::open(&opts).unwrap();
        let e = s.probe_writable();
        assert!(matches!(e, Err(CasError::Unavailable { .. })), "{e:?}");
    }
}
