//! Filesystems a test mounts (needs root): a small [`Tmpfs`] to fill, and a read-only
//! bind mount ([`ReadOnly`]) over a directory, as a filesystem that went read-only.

use super::{run_ok, s};
use std::fs::{self, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop. Declare it before
/// the server using it, so that the server stops first.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("imgsrv-full-disk-")
            .tempdir()
            .expect("create the mount point");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0755"))
                .arg("tmpfs")
                .arg(dir.path()),
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// What the filesystem reports available (statvfs: f_bavail × f_frsize).
    pub fn available(&self) -> u64 {
        let c = std::ffi::CString::new(s(self.path())).unwrap();
        // SAFETY: a NUL-terminated path and a zeroed out-struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Another program's file, grown until at most `leave` bytes are available.
    pub fn fill_to(&self, leave: u64) {
        let avail = self.available();
        if avail <= leave {
            return;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("filler"))
            .unwrap();
        let len = f.metadata().unwrap().len();
        // SAFETY: an open file descriptor and plain integers.
        let rc =
            unsafe { libc::posix_fallocate(f.as_raw_fd(), len as i64, (avail - leave) as i64) };
        assert_eq!(rc, 0, "posix_fallocate of the filler");
        assert!(self.available() <= leave);
    }

    pub fn remove_filler(&self) {
        fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // something still holds a file open on it: detach it now anyway
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}

/// `dir` seen read-only from now on (a bind mount of it over itself, remounted
/// read-only), as when its filesystem goes read-only; writable again on drop. Files
/// opened before stay writable through their descriptors (like files opened before
/// a remount would not: a test checks what new writes meet).
pub struct ReadOnly {
    dir: PathBuf,
}

impl ReadOnly {
    pub fn bind(dir: &Path) -> ReadOnly {
        run_ok(Command::new("mount").arg("--bind").arg(dir).arg(dir));
        let ro = ReadOnly {
            dir: dir.to_path_buf(),
        };
        run_ok(
            Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(dir),
        );
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
