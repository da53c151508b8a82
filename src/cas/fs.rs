//! Local directory blob store.
//!
//! Layout under the data directory:
//! * `sha256/ab/cd/<hex>`: blobs, read-only (0444) once in place;
//! * `uploads/<upload id>/<n>.part`: staged upload parts;
//! * `tmp/`: files being written; anything here after a crash is garbage;
//! * `quarantine/<hex>` and `quarantine/<hex>.reason`: blobs that failed a
//!   scrub, moved out of `sha256/` by rename, with a note saying why. Never
//!   served, never read by the store again; the operator inspects and
//!   removes them.
//!
//! A blob is written to `tmp/`, fsynced, then hard-linked into place (link
//! fails if the name exists, so an existing blob is never replaced), and the
//! shard directory is fsynced. All three directories are on one filesystem.
//! A file already on that filesystem (the mirror's staging directory) can be
//! adopted instead of copied: linked into `tmp/`, hashed in place, fsynced
//! and linked into place the same way.

use super::{BlobStore, CasError, Quarantined, Result, StagedPart};
use crate::digest::{Digest, Hasher};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

const BUF: usize = 1 << 20;
/// Copies at least this large hash on a second thread.
const PIPELINE_MIN: u64 = 8 << 20;
const PIPELINE_BUFFERS: usize = 4;
/// Ask the kernel to start writing back every this many bytes.
const WRITEBACK_STEP: u64 = 32 << 20;
/// What a write of a known size must leave free on the store's filesystem:
/// room for the catalog rows that record it (the catalog may share the
/// filesystem) and the directories it adds. A write that would leave less
/// is refused up front ([`CasError::Full`]) rather than met half-way.
pub const KEEP_FREE: u64 = 1 << 20;
/// Names the links [`FsStore::adopt`] makes in `tmp/`.
static ADOPT_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reads into `buf` until it is full or `left` bytes came; a short source
/// is [`CasError::Truncated`].
pub(super) fn fill(
    reader: &mut dyn Read,
    buf: &mut [u8],
    left: u64,
    len: u64,
    done: u64,
    path: &Path,
) -> Result<usize> {
    let want = (left.min(buf.len() as u64)) as usize;
    let mut got = 0;
    while got < want {
        match reader.read(&mut buf[got..want]) {
            Ok(0) => {
                return Err(CasError::Truncated {
                    expected: len,
                    actual: done + got as u64,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(CasError::Truncated {
                    expected: len,
                    actual: done + got as u64,
                });
            }
            Err(e) => return Err(io_err("read into", path)(e)),
        }
    }
    Ok(got)
}

/// Starts (does not wait for) writeback of a file range, so a later fsync is short.
fn start_writeback(f: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only reads its integer arguments; the fd is open.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
}

mod direct;
mod quarantine;
mod sweep;
pub use quarantine::QUARANTINE_DIR;
pub use sweep::IN_USE_LOCK;

pub struct FsStore {
    root: PathBuf,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CasError {
    let path = path.display().to_string();
    move |source| match source.raw_os_error() {
        // A full filesystem (or a quota) is no fault of the store: the caller
        // hears "full" (HTTP 507), and the same write works once space is freed.
        Some(libc::ENOSPC | libc::EDQUOT) => CasError::Full {
            path,
            reason: format!("{op}: {source}"),
        },
        _ => CasError::Io { op, path, source },
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `dir`
/// (statvfs: `f_bavail` × `f_frsize`). Blocks reserved for root are not
/// counted, so a check against this errs on the safe side for a server
/// running as root.
pub fn available_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path, `st` a statvfs for the call to fill.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled `st` (which was zeroed anyway).
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // u64 here, other widths on other platforms
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

pub(super) fn valid_upload_id(id: &str) -> Result<()> {
    // upload ids are server-made UUIDs; refuse anything that could walk the tree
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(CasError::Invalid(format!("bad upload id {id:?}")));
    }
    Ok(())
}

/// [`CasError::Mismatch`] unless `actual` (over `actual_size` bytes) is `expected`.
pub(super) fn check_digest(
    expected: &Digest,
    expected_size: u64,
    actual: Digest,
    actual_size: u64,
) -> Result<()> {
    if actual == *expected {
        return Ok(());
    }
    Err(CasError::Mismatch {
        expected: *expected,
        expected_size,
        actual,
        actual_size,
    })
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

impl FsStore {
    /// Opens the store rooted at `root` (the data directory), creating its directories.
    pub fn open(root: &Path) -> Result<FsStore> {
        for d in ["sha256", "uploads", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        Ok(FsStore {
            root: root.to_path_buf(),
        })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.cas_path())
    }

    fn tmp_file(&self) -> Result<tempfile::NamedTempFile> {
        let dir = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix("ingest-")
            .tempfile_in(&dir)
            .map_err(io_err("create temp in", &dir))
    }

    /// Copies exactly `len` bytes from `reader` into `out` while hashing.
    ///
    /// Large copies read, write and hash on three threads (ingest is then
    /// bounded by the slowest of the three, not their sum), write directly to the
    /// device where the filesystem allows it ([`direct`]), and start the kernel's
    /// writeback of anything else as they go so that the final fsync has little
    /// left to wait for. No more than a few buffers are in memory.
    /// With `side`, every byte also goes to that second hash, on a fourth
    /// thread, from the same buffers.
    fn copy_hashing(
        reader: &mut dyn Read,
        out: &mut File,
        len: u64,
        hasher: &mut Hasher,
        mut side: Option<&mut Hasher>,
        path: &Path,
    ) -> Result<()> {
        if len < PIPELINE_MIN {
            let mut buf = vec![0u8; BUF.min(len.max(1) as usize)];
            let mut done = 0;
            while done < len {
                let n = fill(reader, &mut buf, len - done, len, done, path)?;
                hasher.update(&buf[..n]);
                if let Some(side) = side.as_deref_mut() {
                    side.update(&buf[..n]);
                }
                out.write_all(&buf[..n]).map_err(io_err("write", path))?;
                done += n as u64;
            }
            return Ok(());
        }
        use direct::AlignedBuf;
        // reader (this thread) -> writer -> hasher [-> side hasher] -> back to the reader
        type Chunk = (AlignedBuf, usize);
        let (to_write, write_rx) = mpsc::sync_channel::<Chunk>(PIPELINE_BUFFERS);
        let (to_hash, hash_rx) = mpsc::sync_channel::<Chunk>(PIPELINE_BUFFERS);
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        for _ in 0..PIPELINE_BUFFERS + 2 {
            free_tx.send(AlignedBuf::new(BUF)).expect("receiver alive");
        }
        /// Where a hashing stage passes a chunk on.
        enum Next {
            Free(mpsc::Sender<AlignedBuf>),
            Stage(mpsc::SyncSender<Chunk>),
        }
        impl Next {
            /// False once nobody takes chunks any more (the reader stopped early).
            fn pass(&self, chunk: Chunk) -> bool {
                match self {
                    Next::Free(tx) => tx.send(chunk.0).is_ok(),
                    Next::Stage(tx) => tx.send(chunk).is_ok(),
                }
            }
        }
        fn hash_stage(mut h: Hasher, rx: mpsc::Receiver<Chunk>, next: Next) -> Hasher {
            for (buf, n) in rx {
                h.update(&buf[..n]);
                if !next.pass((buf, n)) {
                    break;
                }
            }
            h
        }
        let local = std::mem::take(hasher);
        let side_local = side.as_deref_mut().map(std::mem::take);
        let file: &File = out;
        let (read, wrote, hashed, side_hashed) = std::thread::scope(|scope| {
            let (next, side_hashing) = match side_local {
                None => (Next::Free(free_tx), None),
                Some(h) => {
                    let (to_side, side_rx) = mpsc::sync_channel::<Chunk>(PIPELINE_BUFFERS);
                    let free = Next::Free(free_tx);
                    let t = scope.spawn(move || hash_stage(h, side_rx, free));
                    (Next::Stage(to_side), Some(t))
                }
            };
            let hashing = scope.spawn(move || hash_stage(local, hash_rx, next));
            // A writer of its own: a direct write waits for the device, and the
            // reader should not (a socket's sender would stall meanwhile). It
            // starts the kernel's writeback of what went through the page cache so
            // that a full device queue does not stall the copy either. On an
            // error it stops, and so does everything else.
            let writing = scope.spawn(move || -> Result<()> {
                let mut w = direct::Writer::new(file);
                let (mut done, mut synced) = (0u64, 0u64);
                for (buf, n) in write_rx {
                    w.write_chunk(&buf[..n]).map_err(io_err("write", path))?;
                    done += n as u64;
                    if done - synced >= WRITEBACK_STEP {
                        start_writeback(file, synced, done - synced);
                        synced = done;
                    }
                    if to_hash.send((buf, n)).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            let read = (|| {
                let mut done = 0u64;
                while done < len {
                    // none comes back once the writer or the hasher stopped
                    let Ok(mut buf) = free_rx.recv() else {
                        return Ok(false);
                    };
                    let n = fill(reader, &mut buf, len - done, len, done, path)?;
                    done += n as u64;
                    if to_write.send((buf, n)).is_err() {
                        return Ok(false);
                    }
                }
                Ok(true)
            })();
            drop(to_write);
            let wrote = writing.join().expect("writing thread does not panic");
            let hashed = hashing.join().expect("hashing thread does not panic");
            let side_hashed =
                side_hashing.map(|t| t.join().expect("hashing thread does not panic"));
            (read, wrote, hashed, side_hashed)
        });
        match (read?, wrote) {
            (_, Err(e)) => return Err(e),
            (true, Ok(())) => {}
            // (the pipeline stops early only on an error, reported above)
            (false, Ok(())) => {
                return Err(io_err("write", path)(io::Error::other(
                    "the copy stopped early",
                )))
            }
        }
        *hasher = hashed;
        if let (Some(side), Some(h)) = (side, side_hashed) {
            *side = h;
        }
        Ok(())
    }

    /// Moves a fully written and fsynced file into its CAS place without
    /// replacing an existing blob.
    fn install(&self, src: &Path, digest: &Digest) -> Result<()> {
        let dst = self.blob_path(digest);
        let shard = dst.parent().expect("cas path has a parent");
        fs::create_dir_all(shard).map_err(io_err("create", shard))?;
        let mut perms = fs::metadata(src)
            .map_err(io_err("stat", src))?
            .permissions();
        perms.set_readonly(true);
        fs::set_permissions(src, perms).map_err(io_err("chmod", src))?;
        match fs::hard_link(src, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // same digest already stored: keep the existing bytes
            }
            Err(e) => return Err(io_err("link", &dst)(e)),
        }
        let _ = fs::remove_file(src);
        fsync_dir(shard)?;
        if let Some(p) = shard.parent() {
            fsync_dir(p)?;
        }
        Ok(())
    }

    /// Fsyncs a fully written temporary file and installs it; on failure
    /// the temporary file is removed.
    fn install_tmp(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<()> {
        let path = tmp.path().to_path_buf();
        tmp.as_file().sync_all().map_err(io_err("fsync", &path))?;
        let (_f, kept) = tmp.keep().map_err(|e| io_err("keep", &path)(e.error))?;
        let r = self.install(&kept, digest);
        if r.is_err() {
            let _ = fs::remove_file(&kept);
        }
        r
    }

    /// [`BlobStore::adopt`] in place: the file is hard-linked into `tmp/`
    /// (so the inode hashed is the one installed, whatever happens to
    /// `path` meanwhile), hashed there in one read pass unless `hashed` (see
    /// [`BlobStore::adopt_hashed`]), checked, fsynced and linked into its CAS
    /// place (an existing blob is kept). `Ok(false)`: the file is on another
    /// filesystem and nothing was done.
    fn adopt_in_place(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
        hashed: bool,
    ) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path).map_err(io_err("stat", path))?;
        let root_dev = fs::metadata(&self.root)
            .map_err(io_err("stat", &self.root))?
            .dev();
        if meta.dev() != root_dev || !meta.is_file() {
            return Ok(false);
        }
        let tmp_dir = self.root.join("tmp");
        let link = tmp_dir.join(format!(
            "adopt-{}-{}",
            std::process::id(),
            ADOPT_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        match fs::hard_link(path, &link) {
            Ok(()) => {}
            // same st_dev but another mount (a bind mount): copy instead
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => return Ok(false),
            Err(e) => return Err(io_err("link", &link)(e)),
        }
        let r = (|| {
            let mut f = File::open(&link).map_err(io_err("open", &link))?;
            let actual_size = f.metadata().map_err(io_err("stat", &link))?.len();
            if actual_size != size {
                return Err(CasError::Truncated {
                    expected: size,
                    actual: actual_size,
                });
            }
            if hashed {
                f.sync_all().map_err(io_err("fsync", &link))?;
                return self.install(&link, digest);
            }
            let mut hasher = Hasher::new();
            let read = crate::digest::read_chunks(&mut f, |c| hasher.update(c))
                .map_err(io_err("read", &link))?;
            let actual = hasher.finish();
            if read != size {
                return Err(CasError::Truncated {
                    expected: size,
                    actual: read,
                });
            }
            check_digest(digest, size, actual, read)?;
            f.sync_all().map_err(io_err("fsync", &link))?;
            self.install(&link, digest)
        })();
        if r.is_err() {
            let _ = fs::remove_file(&link);
        }
        r.map(|()| true)
    }

    /// In place when it can; otherwise a copy through `put`, which hashes.
    fn adopt_file(&self, path: &Path, digest: &Digest, size: u64, hashed: bool) -> Result<()> {
        if self.adopt_in_place(path, digest, size, hashed)? {
            return Ok(());
        }
        super::put_file(self, path, digest, size)
    }

    fn part_dir(&self, upload: &str) -> PathBuf {
        self.root.join("uploads").join(upload)
    }
}

impl BlobStore for FsStore {
    fn list(&self, each: &mut dyn FnMut(super::StoredBlob) -> bool) -> Result<()> {
        self.list_blobs(each)
    }

    fn leftovers(&self) -> Result<Vec<super::Leftover>> {
        self.list_leftovers()
    }

    fn remove_leftover(&self, l: &super::Leftover) -> Result<u64> {
        self.remove_leftover_at(l)
    }

    fn delete(&self, digest: &Digest) -> Result<bool> {
        self.delete_blob(digest)
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
        let p = self.blob_path(digest);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &p)(e)),
        }
    }

    fn open_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        let p = self.blob_path(digest);
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CasError::NotFound(*digest))
            }
            Err(e) => return Err(io_err("open", &p)(e)),
        };
        if offset > 0 {
            f.seek(SeekFrom::Start(offset))
                .map_err(io_err("seek", &p))?;
        }
        Ok(Box::new(f.take(len)))
    }

    fn put(&self, digest: &Digest, size: u64, reader: &mut dyn Read) -> Result<()> {
        self.ensure_room(size)?;
        let mut tmp = self.tmp_file()?;
        let path = tmp.path().to_path_buf();
        let mut hasher = Hasher::new();
        Self::copy_hashing(reader, tmp.as_file_mut(), size, &mut hasher, None, &path)?;
        // one more byte means the source was longer than declared
        if super::longer_than_declared(reader) {
            return Err(CasError::Truncated {
                expected: size,
                actual: size + 1,
            });
        }
        check_digest(digest, size, hasher.finish(), size)?;
        self.install_tmp(tmp, digest)
    }

    fn put_new(&self, size: u64, reader: &mut dyn Read) -> Result<Digest> {
        self.put_new_hashing(size, reader, None)
    }

    fn put_new_hashing(
        &self,
        size: u64,
        reader: &mut dyn Read,
        side: Option<&mut Hasher>,
    ) -> Result<Digest> {
        self.ensure_room(size)?;
        let mut tmp = self.tmp_file()?;
        let path = tmp.path().to_path_buf();
        let mut hasher = Hasher::new();
        Self::copy_hashing(reader, tmp.as_file_mut(), size, &mut hasher, side, &path)?;
        if super::longer_than_declared(reader) {
            return Err(CasError::Truncated {
                expected: size,
                actual: size + 1,
            });
        }
        let digest = hasher.finish();
        if self.stat(&digest)? == Some(size) {
            // stored already: keep those bytes (the temporary file goes)
            return Ok(digest);
        }
        self.install_tmp(tmp, &digest)?;
        Ok(digest)
    }

    fn adopt(&self, path: &Path, digest: &Digest, size: u64) -> Result<()> {
        self.adopt_file(path, digest, size, false)
    }

    fn adopt_hashed(&self, path: &Path, digest: &Digest, size: u64) -> Result<()> {
        self.adopt_file(path, digest, size, true)
    }

    fn stage_part(
        &self,
        upload: &str,
        n: u32,
        len: u64,
        reader: &mut dyn Read,
    ) -> Result<StagedPart> {
        self.stage_part_hashing(upload, n, len, reader, None)
    }

    fn stage_part_hashing(
        &self,
        upload: &str,
        n: u32,
        len: u64,
        reader: &mut dyn Read,
        side: Option<&mut Hasher>,
    ) -> Result<StagedPart> {
        valid_upload_id(upload)?;
        self.ensure_room(len)?;
        let dir = self.part_dir(upload);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let staged = (|| {
            // removed on every error path (dropped unpersisted)
            let mut tmp = tempfile::Builder::new()
                .prefix(".part-")
                .tempfile_in(&dir)
                .map_err(io_err("create temp in", &dir))?;
            let path = tmp.path().to_path_buf();
            let mut hasher = Hasher::new();
            Self::copy_hashing(reader, tmp.as_file_mut(), len, &mut hasher, side, &path)?;
            let dst = dir.join(format!("{n}.part"));
            tmp.persist(&dst)
                .map_err(|e| io_err("rename", &dst)(e.error))?;
            Ok(StagedPart {
                digest: hasher.finish(),
                size: len,
            })
        })();
        if staged.is_err() {
            // an upload whose first part failed leaves no empty directory
            // (remove_dir leaves one holding other parts alone)
            let _ = fs::remove_dir(&dir);
        }
        staged
    }

    fn commit_upload(
        &self,
        upload: &str,
        parts: &[(u32, StagedPart)],
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        valid_upload_id(upload)?;
        let dir = self.part_dir(upload);
        let total: u64 = parts.iter().map(|(_, p)| p.size).sum();
        let result = (|| {
            if total != size {
                return Err(CasError::Truncated {
                    expected: size,
                    actual: total,
                });
            }
            if self.stat(digest)? == Some(size) {
                return Ok(());
            }
            // One part whose hash was taken while it arrived: no second pass.
            if let [(n, p)] = parts {
                let path = dir.join(format!("{n}.part"));
                let len = fs::metadata(&path)
                    .map_err(|_| CasError::MissingPart(*n))?
                    .len();
                if len != p.size {
                    return Err(CasError::Truncated {
                        expected: p.size,
                        actual: len,
                    });
                }
                check_digest(digest, size, p.digest, len)?;
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err("fsync", &path))?;
                return self.install(&path, digest);
            }
            // the parts are copied into one new file: it needs the room again
            self.ensure_room(size)?;
            let mut tmp = self.tmp_file()?;
            let mut hasher = Hasher::new();
            for (n, p) in parts {
                let path = dir.join(format!("{n}.part"));
                let mut f = File::open(&path).map_err(|_| CasError::MissingPart(*n))?;
                Self::copy_hashing(&mut f, tmp.as_file_mut(), p.size, &mut hasher, None, &path)?;
            }
            check_digest(digest, size, hasher.finish(), total)?;
            self.install_tmp(tmp, digest)
        })();
        // A full store keeps the staged parts (the catalog still lists them):
        // the same commit succeeds once space is freed, without sending them
        // again. The temporary file is gone either way.
        if !matches!(result, Err(CasError::Full { .. })) {
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    fn discard_upload(&self, upload: &str) -> Result<()> {
        valid_upload_id(upload)?;
        let dir = self.part_dir(upload);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &dir)(e)),
        }
    }

    fn discard_part(&self, upload: &str, n: u32) -> Result<()> {
        valid_upload_id(upload)?;
        let p = self.part_dir(upload).join(format!("{n}.part"));
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &p)(e)),
        }
    }

    fn probe_writable(&self) -> Result<()> {
        let dir = self.root.join("tmp");
        // (a leftover after a crash is a temp file like any other in tmp/)
        let mut f = tempfile::Builder::new()
            .prefix("probe-")
            .tempfile_in(&dir)
            .map_err(io_err("create temp in", &dir))?;
        let path = f.path().to_path_buf();
        f.write_all(b"probe").map_err(io_err("write", &path))?;
        f.close().map_err(io_err("remove", &path))?;
        self.ensure_room(0)
    }

    fn ensure_room(&self, bytes: u64) -> Result<()> {
        let available = available_bytes(&self.root).map_err(io_err("statvfs", &self.root))?;
        if bytes.saturating_add(KEEP_FREE) <= available {
            return Ok(());
        }
        use indicatif::HumanBytes;
        Err(CasError::Full {
            path: self.root.display().to_string(),
            reason: format!(
                "{} available, {} needed plus {} kept free",
                HumanBytes(available),
                HumanBytes(bytes),
                HumanBytes(KEEP_FREE)
            ),
        })
    }
}

#[allow(dead_code)]
fn _assert_object_safe(_: &dyn BlobStore) {}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn store() -> (tempfile::TempDir, FsStore) {
        let d = tempfile::tempdir().unwrap();
        let s = FsStore::open(d.path()).unwrap();
        (d, s)
    }

    pub(super) fn read_all(s: &FsStore, d: &Digest) -> Vec<u8> {
        let len = s.stat(d).unwrap().unwrap();
        let mut v = Vec::new();
        s.open_range(d, 0, len)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    }

    pub(super) fn tmp_is_empty(dir: &Path) -> bool {
        fs::read_dir(dir.join("tmp")).unwrap().next().is_none()
    }

    #[test]
    fn put_stores_at_sharded_path_and_never_replaces() {
        let (dir, s) = store();
        let d = Digest::of(b"ROOT");
        s.put(&d, 4, &mut &b"ROOT"[..]).unwrap();
        let p = dir.path().join("sha256/fe/d4").join(d.hex());
        assert_eq!(fs::read(&p).unwrap(), b"ROOT");
        assert!(fs::metadata(&p).unwrap().permissions().readonly());
        // a second put of the same digest keeps the file (same inode)
        use std::os::unix::fs::MetadataExt;
        let ino = fs::metadata(&p).unwrap().ino();
        s.put(&d, 4, &mut &b"ROOT"[..]).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino);
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn wrong_digest_short_or_long_input_leaves_nothing() {
        let (dir, s) = store();
        let d = Digest::of(b"ROOT");
        assert!(matches!(
            s.put(&d, 4, &mut &b"RooT"[..]),
            Err(CasError::Mismatch { .. })
        ));
        assert!(matches!(
            s.put(&d, 4, &mut &b"ROO"[..]),
            Err(CasError::Truncated { .. })
        ));
        assert!(matches!(
            s.put(&d, 4, &mut &b"ROOTS"[..]),
            Err(CasError::Truncated { .. })
        ));
        assert_eq!(s.stat(&d).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
    }

    /// Both ways of storing bytes of a digest not known beforehand: the fs store's
    /// own (a temporary file) and the default (a one-part upload).
    #[test]
    fn put_new_stores_under_the_digest_the_bytes_make() {
        type PutNew = fn(&FsStore, u64, &mut dyn Read) -> Result<Digest>;
        let ways: [(&str, PutNew); 2] = [
            ("fs", |s, n, r| s.put_new(n, r)),
            ("staged", |s, n, r| crate::cas::put_new_staged(s, n, r)),
        ];
        for (way, put_new) in ways {
            let (dir, s) = store();
            let big: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 253) as u8).collect();
            for bytes in [&b"ROOT"[..], &big[..]] {
                let d = put_new(&s, bytes.len() as u64, &mut &bytes[..]).unwrap();
                assert_eq!(d, Digest::of(bytes), "{way}");
                assert_eq!(read_all(&s, &d), bytes, "{way}");
            }
            // again: the stored file is kept (same inode)
            use std::os::unix::fs::MetadataExt;
            let d = Digest::of(b"ROOT");
            let ino = fs::metadata(s.blob_path(&d)).unwrap().ino();
            assert_eq!(put_new(&s, 4, &mut &b"ROOT"[..]).unwrap(), d);
            assert_eq!(fs::metadata(s.blob_path(&d)).unwrap().ino(), ino, "{way}");
            // a short or long source stores nothing
            for (bytes, n) in [(&b"MET"[..], 4), (&b"METAS"[..], 4)] {
                assert!(
                    matches!(
                        put_new(&s, n, &mut &bytes[..]),
                        Err(CasError::Truncated { .. })
                    ),
                    "{way}"
                );
                assert_eq!(
                    s.stat(&Digest::of(&bytes[..4.min(bytes.len())])).unwrap(),
                    None
                );
            }
            assert!(tmp_is_empty(dir.path()), "{way}");
            let uploads = dir.path().join("uploads");
            assert!(
                !uploads.exists() || fs::read_dir(&uploads).unwrap().next().is_none(),
                "{way}: staged parts left"
            );
        }
    }

    #[test]
    fn multipart_upload_concatenates_in_order_and_resent_part_replaces() {
        let (dir, s) = store();
        let id = "0e3c4b9e-0000-4000-8000-000000000001";
        let d = Digest::of(b"METAROOT");
        let p2 = s.stage_part(id, 2, 4, &mut &b"ROOT"[..]).unwrap();
        let _bad = s.stage_part(id, 1, 4, &mut &b"XXXX"[..]).unwrap();
        let p1 = s.stage_part(id, 1, 4, &mut &b"META"[..]).unwrap();
        assert_eq!(p1.digest, Digest::of(b"META"));
        s.commit_upload(id, &[(1, p1), (2, p2)], &d, 8).unwrap();
        assert_eq!(read_all(&s, &d), b"METAROOT");
        assert!(!dir.path().join("uploads").join(id).exists());
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn single_part_commit_checks_digest_and_size() {
        let (dir, s) = store();
        let id = "0e3c4b9e-0000-4000-8000-000000000002";
        let p = s.stage_part(id, 1, 4, &mut &b"DISK"[..]).unwrap();
        let wrong = Digest::of(b"ROOT");
        assert!(matches!(
            s.commit_upload(id, &[(1, p.clone())], &wrong, 4),
            Err(CasError::Mismatch { .. })
        ));
        assert_eq!(s.stat(&wrong).unwrap(), None);
        let p = s.stage_part(id, 1, 4, &mut &b"DISK"[..]).unwrap();
        assert!(matches!(
            s.commit_upload(id, &[(1, p.clone())], &p.digest, 5),
            Err(CasError::Truncated { .. })
        ));
        let p = s.stage_part(id, 1, 4, &mut &b"DISK"[..]).unwrap();
        s.commit_upload(id, &[(1, p.clone())], &p.digest, 4)
            .unwrap();
        assert_eq!(read_all(&s, &p.digest), b"DISK");
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn large_copies_hash_on_a_second_thread_with_the_same_result() {
        let (dir, s) = store();
        // not a multiple of the buffer size, larger than the pipeline threshold
        let data: Vec<u8> = (0..(PIPELINE_MIN as usize * 2 + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let d = Digest::of(&data);
        s.put(&d, data.len() as u64, &mut &data[..]).unwrap();
        assert_eq!(read_all(&s, &d), data);
        let id = "0e3c4b9e-0000-4000-8000-000000000004";
        let p = s
            .stage_part(id, 1, data.len() as u64, &mut &data[..])
            .unwrap();
        assert_eq!(p.digest, d);
        // a large source that ends early, or bytes that do not match
        let short = &data[..data.len() - 1];
        assert!(matches!(
            s.stage_part(id, 2, data.len() as u64, &mut &short[..]),
            Err(CasError::Truncated { actual, .. }) if actual == short.len() as u64
        ));
        let mut bad = data.clone();
        bad[PIPELINE_MIN as usize + 3] ^= 1;
        let other = Digest::of(b"x");
        assert!(matches!(
            s.put(&other, bad.len() as u64, &mut &bad[..]),
            Err(CasError::Mismatch { .. })
        ));
        assert_eq!(s.stat(&other).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
    }

    fn ino(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).unwrap().ino()
    }

    #[test]
    fn adopt_links_the_checked_file_in_place() {
        let (dir, s) = store();
        let staging = dir.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let src = staging.join("root");
        fs::write(&src, b"ROOT").unwrap();
        let d = Digest::of(b"ROOT");
        s.adopt(&src, &d, 4).unwrap();
        let blob = s.blob_path(&d);
        assert_eq!(ino(&blob), ino(&src), "hard-linked, not copied");
        assert_eq!(read_all(&s, &d), b"ROOT");
        assert!(fs::metadata(&blob).unwrap().permissions().readonly());
        assert!(src.exists(), "the caller's file stays");
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn adopt_refuses_a_wrong_digest_or_size_and_stores_nothing() {
        let (dir, s) = store();
        let src = dir.path().join("root");
        fs::write(&src, b"RooT").unwrap();
        let d = Digest::of(b"ROOT");
        assert!(matches!(
            s.adopt(&src, &d, 4),
            Err(CasError::Mismatch { .. })
        ));
        let right = Digest::of(b"RooT");
        for size in [3, 5] {
            assert!(matches!(
                s.adopt(&src, &right, size),
                Err(CasError::Truncated { .. })
            ));
            assert_eq!(s.stat(&right).unwrap(), None);
        }
        assert_eq!(s.stat(&d).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
        // the file is left to the caller, untouched
        assert_eq!(fs::read(&src).unwrap(), b"RooT");
        assert!(!fs::metadata(&src).unwrap().permissions().readonly());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&src).unwrap().nlink(), 1);
    }

    /// A directory on another filesystem than `dir`: /dev/shm (tmpfs, on every
    /// Linux machine this runs on). Fails rather than skips without one.
    fn other_filesystem(dir: &Path) -> tempfile::TempDir {
        use std::os::unix::fs::MetadataExt;
        let other = tempfile::tempdir_in("/dev/shm").expect("a writable /dev/shm");
        assert_ne!(
            fs::metadata(other.path()).unwrap().dev(),
            fs::metadata(dir).unwrap().dev(),
            "the test store ({}) must not be on /dev/shm: set TMPDIR elsewhere",
            dir.display()
        );
        other
    }

    #[test]
    fn adopt_hashed_checks_the_size_and_links_without_reading() {
        let (dir, s) = store();
        let staging = dir.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let src = staging.join("root");
        fs::write(&src, b"ROOT").unwrap();
        let d = Digest::of(b"ROOT");
        for size in [3, 5] {
            assert!(matches!(
                s.adopt_hashed(&src, &d, size),
                Err(CasError::Truncated { .. })
            ));
        }
        assert_eq!(s.stat(&d).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
        s.adopt_hashed(&src, &d, 4).unwrap();
        assert_eq!(ino(&s.blob_path(&d)), ino(&src), "hard-linked, not copied");
        assert_eq!(read_all(&s, &d), b"ROOT");
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn adopt_hashed_from_another_filesystem_copies_and_hashes() {
        let (dir, s) = store();
        let other = other_filesystem(dir.path());
        let src = other.path().join("root");
        fs::write(&src, b"RooT").unwrap();
        let claimed = Digest::of(b"ROOT");
        assert!(matches!(
            s.adopt_hashed(&src, &claimed, 4),
            Err(CasError::Mismatch { .. })
        ));
        assert_eq!(s.stat(&claimed).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn adopt_keeps_an_existing_blob() {
        let (dir, s) = store();
        let d = Digest::of(b"ROOT");
        s.put(&d, 4, &mut &b"ROOT"[..]).unwrap();
        let before = ino(&s.blob_path(&d));
        let src = dir.path().join("root");
        fs::write(&src, b"ROOT").unwrap();
        s.adopt(&src, &d, 4).unwrap();
        assert_eq!(ino(&s.blob_path(&d)), before);
        assert_ne!(ino(&src), before);
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn adopt_from_another_filesystem_copies() {
        use std::os::unix::fs::MetadataExt;
        let (dir, s) = store();
        let other = other_filesystem(dir.path());
        let src = other.path().join("root");
        fs::write(&src, b"ROOT").unwrap();
        let d = Digest::of(b"ROOT");
        s.adopt(&src, &d, 4).unwrap();
        assert_eq!(read_all(&s, &d), b"ROOT");
        assert_ne!(ino(&s.blob_path(&d)), ino(&src));
        assert_eq!(fs::metadata(&src).unwrap().nlink(), 1);
        // and a wrong digest stores nothing there either
        let wrong = Digest::of(b"x");
        assert!(s.adopt(&src, &wrong, 4).is_err());
        assert_eq!(s.stat(&wrong).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
    }

    #[test]
    fn a_full_filesystem_is_full_not_an_io_fault() {
        let p = Path::new("/data/tmp/ingest-x");
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = io_err("write", p)(io::Error::from_raw_os_error(errno));
            assert!(
                matches!(&e, CasError::Full { path, reason }
                    if path == "/data/tmp/ingest-x" && reason.starts_with("write: ")),
                "{e:?}"
            );
        }
        let e = io_err("write", p)(io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, CasError::Io { .. }), "{e:?}");
    }

    /// A reader that must not be read.
    struct Untouched;
    impl Read for Untouched {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            panic!("read although the write was refused up front");
        }
    }

    #[test]
    fn a_write_that_cannot_fit_is_refused_before_any_byte() {
        let (dir, s) = store();
        // (other tests share the filesystem: no exact boundary here)
        let available = available_bytes(dir.path()).unwrap();
        assert!(available > KEEP_FREE, "the test directory has room");
        s.ensure_room(0).unwrap();
        let too_big = available.saturating_mul(2);
        assert!(matches!(s.ensure_room(too_big), Err(CasError::Full { .. })));
        let d = Digest::of(b"x");
        match s.put(&d, too_big, &mut Untouched) {
            Err(CasError::Full { path, reason }) => {
                assert_eq!(path, dir.path().display().to_string());
                assert!(reason.contains("available"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let id = "0e3c4b9e-0000-4000-8000-000000000005";
        assert!(matches!(
            s.stage_part(id, 1, too_big, &mut Untouched),
            Err(CasError::Full { .. })
        ));
        assert_eq!(s.stat(&d).unwrap(), None);
        assert!(tmp_is_empty(dir.path()));
        assert!(!dir.path().join("uploads").join(id).exists());
    }

    #[test]
    fn a_failed_first_part_leaves_no_upload_directory() {
        let (dir, s) = store();
        let id = "0e3c4b9e-0000-4000-8000-000000000006";
        assert!(s.stage_part(id, 1, 10, &mut &b"DISK"[..]).is_err());
        assert!(!dir.path().join("uploads").join(id).exists());
    }

    #[test]
    fn a_discarded_part_cannot_be_committed() {
        let (_dir, s) = store();
        let id = "0e3c4b9e-0000-4000-8000-000000000007";
        let p1 = s.stage_part(id, 1, 4, &mut &b"META"[..]).unwrap();
        let p2 = s.stage_part(id, 2, 4, &mut &b"ROOT"[..]).unwrap();
        s.discard_part(id, 2).unwrap();
        s.discard_part(id, 2).unwrap();
        let d = Digest::of(b"METAROOT");
        assert!(matches!(
            s.commit_upload(id, &[(1, p1), (2, p2)], &d, 8),
            Err(CasError::MissingPart(2))
        ));
        assert_eq!(s.stat(&d).unwrap(), None);
    }

    #[test]
    fn truncated_part_is_refused() {
        let (_dir, s) = store();
        let id = "0e3c4b9e-0000-4000-8000-000000000003";
        assert!(matches!(
            s.stage_part(id, 1, 10, &mut &b"DISK"[..]),
            Err(CasError::Truncated {
                expected: 10,
                actual: 4
            })
        ));
    }

    #[test]
    fn upload_ids_cannot_walk_the_tree() {
        let (_dir, s) = store();
        for bad in ["../x", "", "a/b", "..", "x y"] {
            assert!(s.stage_part(bad, 1, 0, &mut &b""[..]).is_err(), "{bad}");
            assert!(s.discard_upload(bad).is_err());
        }
    }

    #[test]
    fn range_reads() {
        let (_dir, s) = store();
        let d = Digest::of(b"0123456789");
        s.put(&d, 10, &mut &b"0123456789"[..]).unwrap();
        let mut v = Vec::new();
        s.open_range(&d, 3, 4).unwrap().read_to_end(&mut v).unwrap();
        assert_eq!(v, b"3456");
        assert!(matches!(
            s.open_range(&Digest::of(b"x"), 0, 1),
            Err(CasError::NotFound(_))
        ));
    }
}
