//! Large blob writes bypass the page cache (`O_DIRECT`) where the filesystem
//! allows it. Measured on the development machine (a virtio disk, 1 GiB,
//! `dd bs=1M conv=fsync`): about 0.3 s of system time and 1 s of wall time
//! with `oflag=direct`, 1.1 to 2.4 s and 3 to 6 s through the page cache, whose
//! copy of every byte was the largest single cost of an upload. The bytes are
//! fsynced afterwards all the same (metadata, device cache). A filesystem that
//! refuses it (tmpfs, some network filesystems) gets buffered writes, and so
//! does the tail of a file that is not a whole number of blocks.

use std::fs::File;
use std::io::{self, Write};

/// Alignment of memory, offsets and lengths for direct writes (a page: any
/// logical block size up to it works).
const ALIGN: usize = 4096;

/// A buffer whose bytes start at an [`ALIGN`]ed address.
pub(super) struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    pub(super) fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        // the Vec is never resized, so its bytes stay where they are
        let offset = storage.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// Writes a file's chunks in order, directly while it can.
pub(super) struct Writer<'a> {
    file: &'a File,
    direct: bool,
}

impl<'a> Writer<'a> {
    /// Tries to switch `file` (opened for writing, at offset 0) to direct writes.
    pub(super) fn new(file: &'a File) -> Self {
        let direct = set_direct(file, true);
        Writer { file, direct }
    }

    /// Writes all of `buf` (from an [`AlignedBuf`]) at the current end of the file.
    pub(super) fn write_chunk(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut f = self.file;
        if self.direct
            && (!buf.len().is_multiple_of(ALIGN) || buf.as_ptr().align_offset(ALIGN) != 0)
        {
            self.buffered(); // the tail of the file
        }
        let mut done = 0;
        while done < buf.len() {
            match f.write(&buf[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // refused after all, or the rest of a short write is unaligned:
                // that write wrote nothing; the rest goes through the page cache
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => self.buffered(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn buffered(&mut self) {
        set_direct(self.file, false);
        self.direct = false;
    }
}

impl Drop for Writer<'_> {
    /// The file is left as it was opened (later reads of the same descriptor
    /// need no alignment).
    fn drop(&mut self) {
        if self.direct {
            self.buffered();
        }
    }
}

#[cfg(target_os = "linux")]
fn set_direct(f: &File, on: bool) -> bool {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl with F_GETFL/F_SETFL only reads and sets the open file's
    // status flags; the descriptor is open for the borrow of `f`.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return false;
        }
        let flags = match on {
            true => flags | libc::O_DIRECT,
            false => flags & !libc::O_DIRECT,
        };
        libc::fcntl(fd, libc::F_SETFL, flags) == 0 && on
    }
}

#[cfg(not(target_os = "linux"))]
fn set_direct(_: &File, _: bool) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    #[test]
    fn chunks_written_directly_or_not_make_the_same_file() {
        // beside the build (a disk filesystem, which takes direct writes) and in
        // the temporary directory, whichever writes that one allows
        let disk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        // (there is none when CARGO_TARGET_DIR puts the build elsewhere)
        std::fs::create_dir_all(&disk).unwrap();
        for (dir, on_disk) in [(disk, true), (std::env::temp_dir(), false)] {
            let d = tempfile::tempdir_in(&dir).unwrap();
            let path = d.path().join("blob");
            let mut file = File::options()
                .create_new(true)
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut expected = Vec::new();
            {
                let mut w = Writer::new(&file);
                assert!(w.direct || !on_disk, "direct writes in {}", dir.display());
                let mut buf = AlignedBuf::new(1 << 16);
                for round in 0..3u8 {
                    buf.iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b = (i as u8) ^ round);
                    w.write_chunk(&buf).unwrap();
                    expected.extend_from_slice(&buf);
                }
                // an unaligned address, then a tail that is not whole blocks
                w.write_chunk(&buf[1..4097]).unwrap();
                w.write_chunk(&buf[..100]).unwrap();
                expected.extend_from_slice(&buf[1..4097]);
                expected.extend_from_slice(&buf[..100]);
                assert!(!w.direct, "the tail goes through the page cache");
            }
            file.sync_all().unwrap();
            // the same descriptor reads without alignment afterwards
            file.seek(io::SeekFrom::Start(1)).unwrap();
            let mut got = vec![0u8];
            file.read_to_end(&mut got).unwrap();
            got[0] = expected[0];
            assert_eq!(got, expected, "in {}", dir.display());
        }
    }
}
