//! The synchronous engine: each operation runs when queued; completions wait in a list.
//! It can serve several files (a qcow2 image and its backing chain); plain `queue` uses
//! the first.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

use super::{range_call, run_range_call, AsyncIo, Completion, DiskError, DiskOp};

pub struct SyncIo {
    files: Vec<File>,
    /// The files are host block devices (see `fallocate_mode`).
    block_device: bool,
    completions: VecDeque<Completion>,
    notifier: EventFd,
}

impl SyncIo {
    pub fn new(files: Vec<File>, block_device: bool) -> Result<Self, DiskError> {
        Ok(SyncIo {
            files,
            block_device,
            completions: VecDeque::new(),
            notifier: EventFd::new(libc::EFD_NONBLOCK).map_err(DiskError::EventFd)?,
        })
    }

    /// File `file` (an index into the files given to `new`).
    pub fn file(&self, file: usize) -> Option<&File> {
        self.files.get(file)
    }

    /// Runs `op` on file `file` (an index into the files given to `new`).
    pub fn queue_on(
        &mut self,
        file: usize,
        op: DiskOp<'_>,
        user_data: u64,
    ) -> Result<(), DiskError> {
        let fd = self
            .files
            .get(file)
            .ok_or(DiskError::NoSuchFile(file))?
            .as_raw_fd();
        let result = Self::run(fd, &op, self.block_device);
        self.completions.push_back(Completion { user_data, result });
        Ok(())
    }

    fn run(fd: i32, op: &DiskOp<'_>, block_device: bool) -> i64 {
        let result = match *op {
            DiskOp::Read { offset, iovecs } => rw_all(fd, iovecs, offset, false),
            DiskOp::Write { offset, iovecs } => rw_all(fd, iovecs, offset, true),
            // SAFETY: fdatasync only takes a file descriptor we own.
            DiskOp::Flush => i64::from(unsafe { libc::fdatasync(fd) }),
            DiskOp::Discard { .. } | DiskOp::WriteZeroes { .. } => {
                match range_call(op, block_device) {
                    Some(call) => return run_range_call(fd, call),
                    None => return -i64::from(libc::EINVAL),
                }
            }
        };
        if result < 0 {
            -(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as i64)
        } else {
            result
        }
    }
}

/// preadv/pwritev until every byte moved; short transfers resume where they stopped.
fn rw_all(fd: i32, iovecs: &[libc::iovec], offset: u64, write: bool) -> i64 {
    let mut vecs: Vec<libc::iovec> = iovecs.to_vec();
    let total: usize = vecs.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    let mut first = 0usize;
    while done < total {
        let slice = &vecs[first..];
        let n = if write {
            // SAFETY: every iovec points into guest memory or a bounce buffer that the
            // caller keeps alive until the operation completes.
            unsafe {
                libc::pwritev(
                    fd,
                    slice.as_ptr(),
                    slice.len() as i32,
                    (offset + done as u64) as i64,
                )
            }
        } else {
            // SAFETY: as above; the kernel writes at most iov_len bytes into each buffer.
            unsafe {
                libc::preadv(
                    fd,
                    slice.as_ptr(),
                    slice.len() as i32,
                    (offset + done as u64) as i64,
                )
            }
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return -1;
        }
        if n == 0 {
            // Reading past the end of the file: the disk is shorter than it claims.
            // SAFETY: setting errno is how the caller learns the reason.
            unsafe { *libc::__errno_location() = libc::EIO };
            return -1;
        }
        let mut advanced = n as usize;
        done += advanced;
        while advanced > 0 {
            let v = &mut vecs[first];
            if advanced >= v.iov_len {
                advanced -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: moving the base within the same buffer.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(advanced) }.cast();
                v.iov_len -= advanced;
                advanced = 0;
            }
        }
    }
    done as i64
}

impl SyncIo {
    /// The eventfd completions are signalled on (qcow2 signals its own through it too).
    pub fn notifier(&self) -> &EventFd {
        &self.notifier
    }
}

impl AsyncIo for SyncIo {
    fn event_fd(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }

    fn process_events(&mut self) {
        // Only a count of wake-ups; the completions themselves are read below.
        let _ = self.notifier.read();
    }

    fn queue(&mut self, op: DiskOp<'_>, user_data: u64) -> Result<(), DiskError> {
        self.queue_on(0, op, user_data)
    }

    fn submit(&mut self) -> Result<(), DiskError> {
        if !self.completions.is_empty() {
            self.notifier.write(1).map_err(DiskError::EventFd)?;
        }
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        self.completions.pop_front()
    }
}
