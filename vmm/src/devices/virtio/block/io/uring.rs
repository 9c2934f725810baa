//! The io_uring engine: one ring per queue, the image's files registered as fixed files,
//! submissions batched per queue notification, completions signalled on an eventfd.
//! FLUSH is submitted with IO_DRAIN, so it starts only after every earlier operation on
//! the ring has completed: a flush never overtakes the writes it must make durable.

use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use std::collections::VecDeque;

use super::{range_call, run_range_call, AsyncIo, Completion, DiskError, DiskOp, RangeCall};

pub struct IoUringIo {
    ring: IoUring,
    // Kept open for as long as the ring refers to them as fixed files.
    files: Vec<File>,
    /// The files are host block devices (see `fallocate_mode`).
    block_device: bool,
    /// Completions of operations carried out without the ring.
    ready: VecDeque<Completion>,
    notifier: EventFd,
}

impl IoUringIo {
    pub fn new(files: Vec<File>, depth: u32, block_device: bool) -> Result<Self, DiskError> {
        let ring =
            IoUring::new(depth.max(2).next_power_of_two()).map_err(DiskError::IoUringSetup)?;
        let fds: Vec<i32> = files.iter().map(AsRawFd::as_raw_fd).collect();
        ring.submitter()
            .register_files(&fds)
            .map_err(DiskError::IoUringSetup)?;
        let notifier = EventFd::new(libc::EFD_NONBLOCK).map_err(DiskError::EventFd)?;
        ring.submitter()
            .register_eventfd(notifier.as_raw_fd())
            .map_err(DiskError::IoUringSetup)?;
        Ok(IoUringIo {
            ring,
            files,
            block_device,
            ready: VecDeque::new(),
            notifier,
        })
    }

    /// File `file` (an index into the files given to `new`).
    pub fn file(&self, file: usize) -> Option<&File> {
        self.files.get(file)
    }

    /// Queues `op` on file `file` (an index into the files given to `new`).
    pub fn queue_on(
        &mut self,
        file: usize,
        op: DiskOp<'_>,
        user_data: u64,
    ) -> Result<(), DiskError> {
        if file >= self.files.len() {
            return Err(DiskError::NoSuchFile(file));
        }
        let fd = types::Fixed(file as u32);
        let entry = match op {
            DiskOp::Read { offset, iovecs } => {
                opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(offset)
                    .build()
            }
            DiskOp::Write { offset, iovecs } => {
                opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(offset)
                    .build()
            }
            DiskOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            ref other => match range_call(other, self.block_device) {
                Some(RangeCall::Fallocate { mode, offset, len }) => opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                // io_uring has no BLKDISCARD: it runs here, and its completion waits
                // beside the ring's.
                Some(call) => {
                    let result = run_range_call(self.files[file].as_raw_fd(), call);
                    self.ready.push_back(Completion { user_data, result });
                    return Ok(());
                }
                None => {
                    return Err(DiskError::Io(std::io::Error::from_raw_os_error(
                        libc::EINVAL,
                    )))
                }
            },
        }
        .user_data(user_data);
        // SAFETY: the entry's buffers (iovec arrays and what they point to) are kept alive by
        // the caller until this user_data's completion is collected, and the fixed file stays
        // registered for the ring's lifetime.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The ring is full: start what is queued to make room, then try once more.
            self.start_queued().map_err(DiskError::Io)?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }.map_err(|_| DiskError::QueueFull)?;
        }
        Ok(())
    }

    /// Starts what is queued. A kernel whose completion queue has overflowed refuses
    /// (EBUSY, before Linux 5.19) until completions are read: they are moved to `ready`
    /// (the next `submit` wakes the worker for them) and it is asked again.
    fn start_queued(&mut self) -> std::io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    let before = self.ready.len();
                    self.ready
                        .extend(self.ring.completion().map(|cqe| Completion {
                            user_data: cqe.user_data(),
                            result: i64::from(cqe.result()),
                        }));
                    if self.ready.len() == before {
                        // Nothing to read yet: the kernel starts them once some complete.
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl IoUringIo {
    /// The eventfd completions are signalled on (qcow2 signals its own through it too).
    pub fn notifier(&self) -> &EventFd {
        &self.notifier
    }
}

impl AsyncIo for IoUringIo {
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
        let started = self.start_queued();
        // Completions waiting in `ready` are collected on the notifier's wake-up.
        if !self.ready.is_empty() {
            self.notifier.write(1).map_err(DiskError::EventFd)?;
        }
        started.map_err(DiskError::Io)
    }

    fn next_completion(&mut self) -> Option<Completion> {
        if let Some(done) = self.ready.pop_front() {
            return Some(done);
        }
        self.ring.completion().next().map(|cqe| Completion {
            user_data: cqe.user_data(),
            result: i64::from(cqe.result()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Far more operations in flight than the ring has entries, none collected until all
    /// are queued: the submission queue fills, then the completion queue overflows. Each
    /// is queued all the same and completes once.
    #[test]
    fn more_operations_than_the_ring_holds_all_complete() {
        const OPS: usize = 64;
        let file = tempfile::tempfile().unwrap();
        file.set_len((OPS * 512) as u64).unwrap();
        let mut engine = IoUringIo::new(vec![file], 2, false).unwrap();
        let mut buffers = vec![[0u8; 512]; OPS];
        let iovecs: Vec<libc::iovec> = buffers
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        for (i, iovec) in iovecs.iter().enumerate() {
            let op = DiskOp::Read {
                offset: (i * 512) as u64,
                iovecs: std::slice::from_ref(iovec),
            };
            engine.queue(op, i as u64).unwrap();
        }
        engine.submit().unwrap();
        let mut done = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.len() < OPS {
            assert!(std::time::Instant::now() < deadline, "completed: {done:?}");
            engine.submit().unwrap();
            while let Some(c) = engine.next_completion() {
                assert_eq!(c.result, 512, "{c:?}");
                done.push(c.user_data);
            }
        }
        done.sort_unstable();
        assert_eq!(done, (0..OPS as u64).collect::<Vec<_>>());
    }
}
