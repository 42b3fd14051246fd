//! Write-behind for files written once, front to back (snapshots, the NAT
//! event log): the kernel is told to write each MiB back as soon as it is
//! written, and the MiB before it is waited for and dropped from the page
//! cache.
//!
//! Without it, such a file's pages stay dirty until the kernel's flusher
//! takes them (30 s later by default) in one burst of tens or hundreds of
//! MB, or until a whole snapshot is fsynced at once; a journal commit's
//! fdatasync on the same disk then waits behind that burst (measured: a
//! NAT log written at 25 MB/s stalled commits for up to 96 ms every few
//! seconds once its first pages were 30 s old). Small steady writebacks
//! leave each commit a MiB or so to wait behind at most. The same idea as
//! RocksDB's `bytes_per_sync` and PostgreSQL's `*_flush_after`.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Writeback is started every this many bytes.
pub const WRITE_BEHIND: u64 = 1 << 20;

/// Where a file's writeback stands.
#[derive(Debug, Clone, Copy)]
pub struct WriteBehind {
    /// Writeback was started up to here.
    started: u64,
    /// Everything before this is on disk and out of the page cache.
    waited: u64,
}

impl WriteBehind {
    /// For a file whose first `len` bytes are left as they are.
    pub fn new(len: u64) -> Self {
        WriteBehind {
            started: len,
            waited: len,
        }
    }

    /// The file is now `end` bytes long. Every [`WRITE_BEHIND`] bytes:
    /// starts writing back what is new, then waits for what was started
    /// the time before and lets the page cache drop it. Advisory: an
    /// error changes nothing (what must be durable is fsynced by its
    /// writer), so none is returned.
    pub fn wrote(&mut self, file: &File, end: u64) {
        if end < self.started || end - self.started < WRITE_BEHIND {
            return;
        }
        let fd = file.as_raw_fd();
        sync_range(
            fd,
            self.started,
            end - self.started,
            libc::SYNC_FILE_RANGE_WRITE,
        );
        if self.started > self.waited {
            let (at, len) = (self.waited, self.started - self.waited);
            sync_range(
                fd,
                at,
                len,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
            drop_cached(fd, at, len);
        }
        self.waited = self.started;
        self.started = end;
    }
}

fn sync_range(fd: i32, at: u64, len: u64, flags: libc::c_uint) {
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a file descriptor the caller's `File`
    // keeps open; no memory is passed.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::sync_file_range(fd, at, len, flags) };
}

fn drop_cached(fd: i32, at: u64, len: u64) {
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else {
        return;
    };
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::posix_fadvise(fd, at, len, libc::POSIX_FADV_DONTNEED) };
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::{WriteBehind, WRITE_BEHIND};

    /// Pages before the last MiB written back are out of the page cache
    /// (mincore), the file's bytes are intact, and short writes start no
    /// writeback.
    #[test]
    fn written_mibs_are_written_back_and_dropped_from_the_cache() {
        // On the checkout's disk: /tmp may be a tmpfs, whose pages are
        // the file itself and never leave the cache.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target")
            .join(format!("pcp-behind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut behind = WriteBehind::new(0);
        let chunk = vec![7u8; 64 << 10];
        let mut len = 0u64;
        while len < 4 * WRITE_BEHIND {
            f.write_all(&chunk).unwrap();
            len += chunk.len() as u64;
            behind.wrote(&f, len);
        }
        assert_eq!(behind.started, 4 * WRITE_BEHIND);
        assert_eq!(behind.waited, 3 * WRITE_BEHIND);
        let cached = resident_pages(&path, 3 * WRITE_BEHIND);
        assert!(
            cached < 16,
            "{cached} pages of the first 3 MiB still cached"
        );
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len() as u64, len);
        assert!(back.iter().all(|b| *b == 7));
        // Less than a MiB more: nothing started.
        f.write_all(&chunk).unwrap();
        behind.wrote(&f, len + chunk.len() as u64);
        assert_eq!(behind.started, 4 * WRITE_BEHIND);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// How many of the first `len` bytes' pages are in the page cache.
    fn resident_pages(path: &std::path::Path, len: u64) -> usize {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let page = 4096usize;
        let n = (len as usize).div_ceil(page);
        let mut vec = vec![0u8; n];
        // SAFETY: test only; the mapping is read-only, `vec` has one byte
        // per page of it, and it is unmapped before returning.
        #[allow(unsafe_code)]
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mincore(p, len as usize, vec.as_mut_ptr()), 0);
            libc::munmap(p, len as usize);
        }
        vec.iter().filter(|b| *b & 1 == 1).count()
    }
}
