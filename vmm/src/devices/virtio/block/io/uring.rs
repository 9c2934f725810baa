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
            self.ring.submit().map_err(DiskError::Io)?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }.map_err(|_| DiskError::QueueFull)?;
        }
        Ok(())
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
        if !self.ready.is_empty() {
            self.notifier.write(1).map_err(DiskError::EventFd)?;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completions must be reaped before more can be submitted; the worker does
                // that on the next notifier wake-up, which is already pending.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(DiskError::Io(e)),
            }
        }
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
