//! Content addresses. A [`Digest`] is a SHA-256 value; its text form is
//! `sha256:<64 lowercase hex>` (the wire and catalog form), and
//! [`Digest::hex`] gives the bare hex used by Simple Streams and CAS paths.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

/// A SHA-256 content address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a digest string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
pub struct DigestParseError(pub String);

impl Digest {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Digest(b)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Digest of an in-memory buffer.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// Parses exactly 64 lowercase hex digits (no prefix).
    pub fn from_hex(s: &str) -> Result<Self, DigestParseError> {
        if s.len() != 64
            || !s
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(DigestParseError(s.to_string()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestParseError(s.to_string()))?;
        Ok(Digest(out))
    }

    /// Bare lowercase hex (64 chars).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Relative CAS path: `sha256/ab/cd/<hex>`.
    pub fn cas_path(&self) -> String {
        let h = self.hex();
        format!("sha256/{}/{}/{}", &h[0..2], &h[2..4], h)
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;
    /// Parses the canonical `sha256:<hex>` form only.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("sha256:") {
            Some(h) => Digest::from_hex(h).map_err(|_| DigestParseError(s.to_string())),
            None => Err(DigestParseError(s.to_string())),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}…", &self.hex()[..12])
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Streaming SHA-256 that also counts bytes.
#[derive(Default, Clone)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }
}

/// Reads `reader` to its end in 1 MiB chunks, handing each to `each`;
/// returns the number of bytes read.
pub fn read_chunks(
    reader: &mut dyn std::io::Read,
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                each(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Runs `f` over a reader of `reader` whose bytes are also hashed into `side`, on a
/// second thread, as `f` reads them: `f`'s result and `side` over exactly the bytes
/// `f` read. For a second hash of a stream another consumer reads anyway (an Incus
/// fingerprint beside the blob store's own sha256), at the cost of one copy of
/// each chunk and no second read.
pub fn with_side_hash<T>(
    reader: &mut dyn std::io::Read,
    side: Hasher,
    f: impl FnOnce(&mut dyn std::io::Read) -> T,
) -> (T, Hasher) {
    use std::sync::mpsc;
    const BUFFERS: usize = 4;
    /// Bytes gathered before they go to the hashing thread: a TLS stream reads
    /// a record (16 KiB) at a time, and a hand-over per read costs more in
    /// wake-ups than the hash.
    const BATCH: usize = 1 << 20;
    struct Tee<'a> {
        inner: &'a mut dyn std::io::Read,
        pending: Vec<u8>,
        full: mpsc::SyncSender<Vec<u8>>,
        free: mpsc::Receiver<Vec<u8>>,
    }
    impl Tee<'_> {
        fn hand_over(&mut self) {
            if self.pending.is_empty() {
                return;
            }
            let mut next = self.free.try_recv().unwrap_or_default();
            next.clear();
            next.reserve(BATCH);
            let full = std::mem::replace(&mut self.pending, next);
            // the hashing thread ends only when this sender is gone
            let _ = self.full.send(full);
        }
    }
    impl std::io::Read for Tee<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.pending.extend_from_slice(&buf[..n]);
            if self.pending.len() >= BATCH {
                self.hand_over();
            }
            Ok(n)
        }
    }
    let (full, full_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    let (free_tx, free) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            let mut side = side;
            for chunk in full_rx {
                side.update(&chunk);
                let _ = free_tx.send(chunk);
            }
            side
        });
        let mut tee = Tee {
            inner: reader,
            pending: Vec::with_capacity(BATCH),
            full,
            free,
        };
        let out = f(&mut tee);
        tee.hand_over();
        drop(tee);
        (out, worker.join().expect("the side hash does not panic"))
    })
}

/// Feeds every byte of `reader` to `first` and `second`, the second on its own
/// thread (both hashes in the time of one on a machine with two cores: a root
/// file's own sha256 and its Incus fingerprint, the metadata's state continued).
/// Calls `progress` with each chunk's length. Returns both and the byte count.
pub fn hash_twice(
    reader: &mut dyn std::io::Read,
    mut first: Hasher,
    mut second: Hasher,
    mut progress: impl FnMut(u64),
) -> std::io::Result<(Hasher, Hasher, u64)> {
    use std::sync::mpsc;
    const BUFFERS: usize = 4;
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = free_tx.send(vec![0u8; 1 << 20]);
    }
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            for (buf, n) in full_rx {
                second.update(&buf[..n]);
                if free_tx.send(buf).is_err() {
                    break;
                }
            }
            second
        });
        let mut total = 0u64;
        let read = (|| loop {
            let mut buf = free_rx.recv().unwrap_or_else(|_| vec![0u8; 1 << 20]);
            let n = loop {
                match reader.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if n == 0 {
                return Ok(());
            }
            first.update(&buf[..n]);
            total += n as u64;
            progress(n as u64);
            if full_tx.send((buf, n)).is_err() {
                return Ok(());
            }
        })();
        drop(full_tx);
        let second = worker.join().expect("the hashing thread does not panic");
        read.map(|()| (first, second, total))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_twice_is_two_hashes_of_the_same_bytes() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut prefix = Hasher::new();
        prefix.update(b"metadata");
        let mut seen = 0;
        let (a, b, n) = hash_twice(&mut &data[..], Hasher::new(), prefix, |c| seen += c).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(seen, n);
        assert_eq!(a.finish(), Digest::of(&data));
        let mut both = b"metadata".to_vec();
        both.extend_from_slice(&data);
        assert_eq!(b.finish(), Digest::of(&both));
    }

    #[test]
    fn side_hash_sees_exactly_what_was_read() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        let mut prefix = Hasher::new();
        prefix.update(b"metadata");
        // the consumer stops early: the side hash covers what it read, no more
        let ((), side) = with_side_hash(&mut &data[..], prefix, |r| {
            let mut got = vec![0u8; 2_000_000];
            r.read_exact(&mut got).unwrap();
        });
        let mut both = b"metadata".to_vec();
        both.extend_from_slice(&data[..2_000_000]);
        assert_eq!(side.finish(), Digest::of(&both));
    }

    #[test]
    fn parses_only_canonical_form() {
        let h = "2d1edf729cc53756834657ce399b1568debd59b0ceddce5da39b86750d59fbd0";
        let d: Digest = format!("sha256:{h}").parse().unwrap();
        assert_eq!(d, Digest::of(b"META"));
        assert_eq!(d.to_string(), format!("sha256:{h}"));
        assert_eq!(d.cas_path(), format!("sha256/2d/1e/{h}"));
        for bad in [
            h.to_string(),
            format!("sha256:{}", h.to_uppercase()),
            format!("sha256:{}", &h[..63]),
            format!("sha256:{h}0"),
            format!("sha512:{h}"),
            format!("sha256:../{}", &h[3..]),
            "sha256:".into(),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hasher_matches_one_shot() {
        let mut h = Hasher::new();
        h.update(b"ME");
        h.update(b"TA");
        assert_eq!(h.len(), 4);
        assert_eq!(h.finish(), Digest::of(b"META"));
    }
}
