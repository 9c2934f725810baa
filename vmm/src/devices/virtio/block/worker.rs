//! One worker thread per queue: it pops requests, hands their I/O to the queue's engine in
//! batches, and completes them as the engine reports. Guest buffers are passed to the
//! engine in place; with cache=none, buffers that break O_DIRECT's alignment go through an
//! aligned bounce buffer instead.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::counters::{BlockCounters, CountedOp};
use super::io::{AsyncIo, Completion, DiskFile, DiskOp};
use super::request::{parse, write_device_id, Request, RequestKind, SectorRange};
use super::{SECTOR_SHIFT, SIZE_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::worker::{run_worker, Polling, Throttle, WorkerEpoll, WorkerHandler};
use crate::devices::virtio::{
    enable_notification_checked, has_available, VirtioInterrupt, VirtioInterruptType,
};
use crate::log_limit::rate_limited;
use crate::memory::GuestMemoryMmap;

fn range_bytes(range: SectorRange) -> (u64, u64) {
    (
        range.sector << SECTOR_SHIFT,
        u64::from(range.num_sectors) << SECTOR_SHIFT,
    )
}

/// An aligned scratch buffer for a request whose guest buffers O_DIRECT cannot use in
/// place. It holds one piece of the request at a time (at most BOUNCE_PIECE bytes): a
/// guest cannot make the VMM allocate as much as its requests claim (descriptors may all
/// alias the same few guest pages).
struct Bounce {
    storage: Vec<u8>,
    offset: usize,
    /// Bytes the buffer holds: the longest piece.
    capacity: usize,
    /// The request's guest segments; a piece is a byte range of their concatenation.
    segments: Vec<(GuestAddress, u32)>,
    /// Where the request's data starts on the disk, and its length.
    disk_offset: u64,
    total: u64,
    /// Bytes of the request done before the piece in the buffer, and that piece's length.
    done: u64,
    piece: usize,
    is_read: bool,
}

impl Bounce {
    fn new(
        request_len: u64,
        segments: Vec<(GuestAddress, u32)>,
        disk_offset: u64,
        is_read: bool,
        align: usize,
    ) -> Self {
        let capacity = request_len.min(BOUNCE_PIECE) as usize;
        let storage = vec![0u8; capacity + align];
        let offset = storage.as_ptr().align_offset(align);
        Bounce {
            storage,
            offset,
            capacity,
            segments,
            disk_offset,
            total: request_len,
            done: 0,
            piece: 0,
            is_read,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.piece]
    }

    /// Copies the piece between the buffer and guest memory (into the guest after a read,
    /// out of it before a write).
    fn copy_piece(&mut self, mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
        let mut skip = self.done;
        let mut at = 0usize;
        let (to_guest, piece) = (self.is_read, self.piece);
        let segments = std::mem::take(&mut self.segments);
        let mut result = Ok(());
        for &(addr, len) in &segments {
            if at == piece {
                break;
            }
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = ((len - skip) as usize).min(piece - at);
            let guest = GuestAddress(addr.0 + skip);
            skip = 0;
            let range = self.offset + at..self.offset + at + n;
            result = if to_guest {
                mem.write_slice(&self.storage[range], guest)
            } else {
                mem.read_slice(&mut self.storage[range], guest)
            };
            if result.is_err() {
                break;
            }
            at += n;
        }
        self.segments = segments;
        result
    }
}

/// The longest piece of a bounced request in flight at once.
const BOUNCE_PIECE: u64 = SIZE_MAX as u64;
/// Bounce bytes one queue may hold; a request that would pass it waits in the ring until
/// bounced requests finish (one request is always let through, so each makes progress).
const BOUNCE_BUDGET: usize = 16 * BOUNCE_PIECE as usize;

/// What became of a request handed to the engine.
enum Submitted {
    Queued,
    /// The queue's bounce budget is spent: it stays in the ring for later.
    Deferred,
}

/// A request whose I/O is in the engine.
struct InFlight {
    head: u16,
    status: GuestAddress,
    /// Bytes the engine must report for success (of the current piece, when bounced).
    expected: u64,
    /// Bytes of guest buffers the device wrote (reported in the used ring before the status).
    written_to_guest: u32,
    // Referenced by the engine until completion; never read here.
    _iovecs: Vec<libc::iovec>,
    bounce: Option<Bounce>,
    counted: CountedOp,
}

// SAFETY: the iovecs point into guest memory or into this struct's own bounce buffers; they
// are only handed to the kernel, never dereferenced from another thread.
unsafe impl Send for InFlight {}

pub struct QueueWorker {
    mem: GuestMemoryMmap,
    disk: Arc<DiskFile>,
    serial: Arc<[u8]>,
    queue: Queue,
    queue_index: u16,
    queue_event: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    kill: EventFd,
    engine: Box<dyn AsyncIo>,
    inflight: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    /// A used entry was added since the guest was last notified.
    used_pending: bool,
    limiter: Option<RateLimiter>,
    throttle: Throttle,
    throttled: bool,
    counters: Arc<BlockCounters>,
    /// Spinning for completions and requests before sleeping; never for engines that
    /// need the CPU themselves (`AsyncIo::spinning_helps`).
    polling: Polling,
    /// Bounce buffer bytes held by requests in flight.
    bounce_bytes: usize,
    /// A request waits in the ring for bounce budget.
    bounce_waiting: bool,
    /// Budget came back while a request waited: take requests again.
    retry_queue: bool,
    /// A ring's worth of requests is in flight: a driver cannot have more, unless it
    /// published heads again before they were used, which would make the worker hold
    /// requests (and their buffers) without end. Taking resumes as requests finish.
    ring_full: bool,
}

/// How long a reset or shutdown waits for in-flight I/O before the engine gives up on it
/// (a network disk whose target is gone would otherwise hold it for its whole timeout).
const DRAIN_PATIENCE: Duration = Duration::from_secs(5);

const QUEUE_TOKEN: u64 = 0;
const ENGINE_TOKEN: u64 = 1;
const THROTTLE_TOKEN: u64 = 2;
const LIMIT_TOKEN: u64 = 3;

pub struct QueueWorkerParts {
    pub mem: GuestMemoryMmap,
    pub disk: Arc<DiskFile>,
    pub serial: Arc<[u8]>,
    pub queue: Queue,
    pub queue_index: u16,
    pub queue_event: EventFd,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub kill: EventFd,
    pub engine: Box<dyn AsyncIo>,
    /// Shared by all queues of the device.
    pub limiter: Option<RateLimiter>,
    /// Shared by all queues of the device.
    pub counters: Arc<BlockCounters>,
}

impl QueueWorker {
    /// Fails only when the host is out of eventfds or timerfds.
    pub fn new(parts: QueueWorkerParts) -> std::io::Result<Self> {
        let throttle = Throttle::new(parts.limiter.iter())?;
        let polling = Polling::new(parts.engine.spinning_helps());
        Ok(QueueWorker {
            mem: parts.mem,
            disk: parts.disk,
            serial: parts.serial,
            queue: parts.queue,
            queue_index: parts.queue_index,
            queue_event: parts.queue_event,
            interrupt: parts.interrupt,
            kill: parts.kill,
            engine: parts.engine,
            inflight: Vec::new(),
            free_slots: Vec::new(),
            used_pending: false,
            limiter: parts.limiter,
            throttle,
            throttled: false,
            counters: parts.counters,
            polling,
            bounce_bytes: 0,
            bounce_waiting: false,
            retry_queue: false,
            ring_full: false,
        })
    }

    /// True while the rate limiter holds the queue back.
    pub fn throttled(&self) -> bool {
        self.throttled
    }

    /// The throttle timer, for callers that drive the worker by hand.
    pub fn throttle_timer(&mut self) -> &mut TimerFd {
        self.throttle.timer()
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len() - self.free_slots.len()
    }

    /// Starts every available request; returns how many chains were taken.
    pub fn process_queue(&mut self) -> usize {
        let mut taken = 0;
        loop {
            if self.queue.event_idx_enabled() {
                let _ = self.queue.disable_notification(&self.mem);
            }
            let mem = self.mem.clone();
            while let Some(chain) = self.queue.pop_descriptor_chain(&mem) {
                if self.in_flight() >= usize::from(self.queue.size()) {
                    self.queue.go_to_previous_position();
                    self.ring_full = true;
                    break;
                }
                // An unlimited limiter is skipped before the chain is walked for its length.
                if let Some(limiter) = self.limiter.as_ref().filter(|l| !l.is_unlimited()) {
                    let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
                    if let Err(wait) = limiter.consume(bytes) {
                        // Leave the request in the ring until the tokens are back.
                        self.queue.go_to_previous_position();
                        self.throttled = true;
                        self.throttle.hold(wait, "virtio-blk");
                        break;
                    }
                }
                if !self.start(chain) {
                    self.queue.go_to_previous_position();
                    self.bounce_waiting = true;
                    break;
                }
                taken += 1;
            }
            if let Err(e) = self.engine.submit() {
                tracing::error!(
                    "virtio-blk queue {}: cannot submit I/O: {e}",
                    self.queue_index
                );
            }
            // With EVENT_IDX, re-enabling notifications races with the driver adding more
            // requests; enable_notification_checked reports those so none is left behind.
            if self.throttled
                || self.bounce_waiting
                || self.ring_full
                || !self.queue.event_idx_enabled()
                || !enable_notification_checked(&mut self.queue, &self.mem)
            {
                break;
            }
        }
        self.reap();
        taken
    }

    /// The limiter's limits changed: a throttled queue retries at once under the new
    /// limits (through its throttle timer). Returns whether a change was pending.
    pub fn limits_changed(&mut self) -> bool {
        self.throttle.limits_changed(self.throttled, "virtio-blk")
    }

    /// The throttle timer fired: take requests again. Returns how many went; none when the
    /// timer had been re-armed since it was reported ready (the hold goes on).
    pub fn unthrottle(&mut self) -> usize {
        let Some(held) = self.throttle.released() else {
            return 0;
        };
        self.counters.throttled_for(held);
        self.throttled = false;
        self.process_queue()
    }

    /// Collects finished I/O and completes those requests; notifies the guest once.
    pub fn reap(&mut self) {
        self.reap_after(false);
    }

    /// `reap`, when a completion the caller took already queued a bounced request's next
    /// piece (`finish` said so): that piece is submitted with the others.
    fn reap_after(&mut self, mut more_pieces: bool) {
        while let Some(completion) = self.engine.next_completion() {
            more_pieces |= self.finish(completion);
        }
        if more_pieces {
            if let Err(e) = self.engine.submit() {
                tracing::error!(
                    "virtio-blk queue {}: cannot submit I/O: {e}",
                    self.queue_index
                );
            }
        }
        self.notify_if_needed();
    }

    /// Whether the worker may take requests from the ring now.
    fn taking(&self) -> bool {
        !self.throttled && !self.bounce_waiting && !self.ring_full
    }

    fn notify_if_needed(&mut self) {
        if self.used_pending && self.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt
                .trigger(VirtioInterruptType::Queue(self.queue_index));
        }
        self.used_pending = false;
    }

    fn complete(&mut self, head: u16, status_addr: Option<GuestAddress>, status: u8, written: u32) {
        if status != VIRTIO_BLK_S_OK {
            self.counters.failed();
        }
        let used_len = match status_addr {
            Some(addr) if self.mem.write_obj(status, addr).is_ok() => written + 1,
            _ => 0,
        };
        if let Err(e) = self.queue.add_used(&self.mem, head, used_len) {
            rate_limited!(
                tracing::Level::ERROR,
                "virtio-blk: cannot return request {head} to the guest: {e:?}"
            );
        }
        self.used_pending = true;
    }

    /// Parses and starts one request; false when it must wait in the ring for bounce budget.
    fn start(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) -> bool {
        let head = chain.head_index();
        let sectors = self.disk.size() >> SECTOR_SHIFT;
        let request = match parse(
            chain,
            &self.mem,
            sectors,
            self.disk.read_only(),
            self.disk.range_requests(),
        ) {
            Ok(r) => r,
            Err((error, status_addr)) => {
                tracing::debug!("refusing virtio-blk request: {error}");
                self.complete(head, status_addr, error.status(), 0);
                return true;
            }
        };
        match request.kind {
            RequestKind::GetDeviceId => {
                let written = write_device_id(&request, &self.mem, &self.serial);
                self.complete(head, Some(request.status), VIRTIO_BLK_S_OK, written);
            }
            _ => match self.submit_io(head, &request) {
                Ok(Submitted::Queued) => {}
                Ok(Submitted::Deferred) => return false,
                Err(status) => self.complete(head, Some(request.status), status, 0),
            },
        }
        true
    }

    /// Host iovecs for the request's guest buffers, or None when O_DIRECT needs a bounce.
    fn guest_iovecs(&self, request: &Request) -> Result<Option<Vec<libc::iovec>>, u8> {
        let mut iovecs = Vec::with_capacity(request.data.len());
        for &(addr, len) in &request.data {
            for slice in GuestMemoryBackend::get_slices(&self.mem, addr, len as usize) {
                let slice = slice.map_err(|_| VIRTIO_BLK_S_IOERR)?;
                let ptr = slice.ptr_guard_mut().as_ptr();
                let align = self.disk.direct_alignment();
                if self.disk.direct()
                    && (!(ptr as u64).is_multiple_of(align)
                        || !(slice.len() as u64).is_multiple_of(align))
                {
                    return Ok(None);
                }
                iovecs.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Ok(Some(iovecs))
    }

    fn submit_io(&mut self, head: u16, request: &Request) -> Result<Submitted, u8> {
        let data_len = request.data_len();
        let mut inflight = InFlight {
            head,
            status: request.status,
            expected: 0,
            written_to_guest: 0,
            _iovecs: Vec::new(),
            bounce: None,
            counted: CountedOp::Flush,
        };
        let op = match request.kind {
            RequestKind::Read { sector } | RequestKind::Write { sector } => {
                let is_read = matches!(request.kind, RequestKind::Read { .. });
                inflight.expected = data_len;
                inflight.counted = if is_read {
                    CountedOp::Read(data_len)
                } else {
                    CountedOp::Write(data_len)
                };
                if is_read {
                    // At most SEG_MAX segments of SIZE_MAX bytes: it fits.
                    inflight.written_to_guest = u32::try_from(data_len).unwrap_or(u32::MAX);
                }
                let offset = sector << SECTOR_SHIFT;
                match self.guest_iovecs(request)? {
                    Some(iovecs) => {
                        inflight._iovecs = iovecs;
                        let iovecs = inflight._iovecs.as_slice();
                        if is_read {
                            DiskOp::Read { offset, iovecs }
                        } else {
                            DiskOp::Write { offset, iovecs }
                        }
                    }
                    None => {
                        let capacity = data_len.min(BOUNCE_PIECE) as usize;
                        if self.bounce_bytes > 0 && self.bounce_bytes + capacity > BOUNCE_BUDGET {
                            return Ok(Submitted::Deferred);
                        }
                        inflight.bounce = Some(Bounce::new(
                            data_len,
                            request.data.clone(),
                            offset,
                            is_read,
                            self.disk.direct_alignment() as usize,
                        ));
                        self.bounce_bytes += capacity;
                        let slot = self.take_slot();
                        return match self.queue_piece(slot, inflight) {
                            Ok(()) => Ok(Submitted::Queued),
                            Err(_) => Err(VIRTIO_BLK_S_IOERR),
                        };
                    }
                }
            }
            RequestKind::Flush => DiskOp::Flush,
            // GET_ID is answered by the worker itself (see `start`), never by an engine.
            RequestKind::GetDeviceId => return Err(VIRTIO_BLK_S_IOERR),
            RequestKind::Discard(range) => {
                let (offset, len) = range_bytes(range);
                inflight.counted = CountedOp::Discard(len);
                DiskOp::Discard { offset, len }
            }
            RequestKind::WriteZeroes(range) => {
                let (offset, len) = range_bytes(range);
                inflight.counted = CountedOp::WriteZeroes(len);
                DiskOp::WriteZeroes {
                    offset,
                    len,
                    unmap: range.unmap,
                }
            }
        };
        let slot = self.take_slot();
        match self.engine.queue(op, slot as u64) {
            Ok(()) => {
                self.inflight[slot] = Some(inflight);
                Ok(Submitted::Queued)
            }
            Err(e) => {
                tracing::warn!("virtio-blk: cannot queue I/O: {e}");
                self.free_slot(slot);
                Err(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    fn free_slot(&mut self, slot: usize) {
        self.free_slots.push(slot);
        if std::mem::take(&mut self.ring_full) {
            self.retry_queue = true;
        }
    }

    fn take_slot(&mut self) -> usize {
        self.free_slots.pop().unwrap_or_else(|| {
            self.inflight.push(None);
            self.inflight.len() - 1
        })
    }

    /// Queues the next piece of a bounced request in `slot`. On failure the slot is free
    /// again and the request's bounce budget given back; the caller completes it (its head
    /// and status address are returned).
    fn queue_piece(
        &mut self,
        slot: usize,
        mut inflight: InFlight,
    ) -> Result<(), (u16, GuestAddress)> {
        let queued = match inflight.bounce.as_mut() {
            Some(bounce) => {
                bounce.piece = (bounce.total - bounce.done).min(BOUNCE_PIECE) as usize;
                let copied = if bounce.is_read {
                    Ok(())
                } else {
                    bounce.copy_piece(&self.mem)
                };
                inflight.expected = bounce.piece as u64;
                inflight._iovecs = vec![libc::iovec {
                    iov_base: bounce.bytes_mut().as_mut_ptr().cast(),
                    iov_len: bounce.piece,
                }];
                let offset = bounce.disk_offset + bounce.done;
                let iovecs = inflight._iovecs.as_slice();
                let op = if bounce.is_read {
                    DiskOp::Read { offset, iovecs }
                } else {
                    DiskOp::Write { offset, iovecs }
                };
                match copied {
                    Ok(()) => self.engine.queue(op, slot as u64).map_err(|e| {
                        tracing::warn!("virtio-blk: cannot queue I/O: {e}");
                    }),
                    Err(e) => {
                        tracing::debug!("virtio-blk: bad guest buffer in a write: {e}");
                        Err(())
                    }
                }
            }
            None => Err(()),
        };
        match queued {
            Ok(()) => {
                self.inflight[slot] = Some(inflight);
                Ok(())
            }
            Err(()) => {
                self.free_slot(slot);
                self.release_bounce(&inflight);
                Err((inflight.head, inflight.status))
            }
        }
    }

    fn release_bounce(&mut self, inflight: &InFlight) {
        if let Some(bounce) = &inflight.bounce {
            self.bounce_bytes -= bounce.capacity;
            if self.bounce_waiting {
                self.bounce_waiting = false;
                self.retry_queue = true;
            }
        }
    }

    /// Completes the request of one engine completion, or queues the next piece of a
    /// bounced one (then returns true: the engine has I/O to submit).
    fn finish(&mut self, completion: Completion) -> bool {
        let slot = completion.user_data as usize;
        let Some(mut inflight) = self.inflight.get_mut(slot).and_then(Option::take) else {
            tracing::error!("virtio-blk: completion for unknown request {slot}");
            return false;
        };
        let ok = completion.result >= 0 && completion.result as u64 == inflight.expected;
        if !ok {
            tracing::warn!(
                "virtio-blk I/O failed: result {} (expected {} bytes)",
                completion.result,
                inflight.expected
            );
        }
        let mut status = if ok {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        };
        if let Some(bounce) = inflight.bounce.as_mut().filter(|_| ok) {
            if bounce.is_read && bounce.copy_piece(&self.mem).is_err() {
                status = VIRTIO_BLK_S_IOERR;
            } else {
                bounce.done += bounce.piece as u64;
                if bounce.done < bounce.total {
                    return match self.queue_piece(slot, inflight) {
                        Ok(()) => true,
                        Err((head, status)) => {
                            self.complete(head, Some(status), VIRTIO_BLK_S_IOERR, 0);
                            false
                        }
                    };
                }
            }
        }
        self.free_slot(slot);
        self.release_bounce(&inflight);
        if status == VIRTIO_BLK_S_OK {
            self.counters.completed(inflight.counted);
        }
        let written = if status == VIRTIO_BLK_S_OK {
            inflight.written_to_guest
        } else {
            0
        };
        self.complete(inflight.head, Some(inflight.status), status, written);
        false
    }

    /// Serves the queue until the kill event fires; in-flight I/O is drained first.
    pub fn run(mut self) {
        let fds = [
            (self.queue_event.as_raw_fd(), QUEUE_TOKEN),
            (self.engine.event_fd(), ENGINE_TOKEN),
            (self.throttle.timer_fd(), THROTTLE_TOKEN),
            (self.throttle.limit_changed_fd(), LIMIT_TOKEN),
        ];
        let kill = self.kill.as_raw_fd();
        run_worker("virtio-blk", kill, &fds, &mut self);
    }

    fn poll_briefly(&mut self) {
        let mut polling = std::mem::take(&mut self.polling);
        polling.spin(|| {
            let mut progressed = false;
            if self.in_flight() > 0 {
                if let Some(completion) = self.engine.next_completion() {
                    let more_pieces = self.finish(completion);
                    self.reap_after(more_pieces);
                    progressed = true;
                }
            }
            if self.taking() && has_available(&self.queue, &self.mem) {
                self.process_queue();
                progressed = true;
            }
            progressed
        });
        self.polling = polling;
    }

    /// Waits for every in-flight operation: guest memory must not be written after reset.
    pub fn drain(&mut self) {
        let started = Instant::now();
        let mut aborted = false;
        while self.in_flight() > 0 {
            if !aborted && started.elapsed() > DRAIN_PATIENCE {
                tracing::warn!(
                    "virtio-blk queue {}: {} request(s) still in flight after {:?}; giving up on them",
                    self.queue_index,
                    self.in_flight(),
                    DRAIN_PATIENCE
                );
                self.engine.abort();
                aborted = true;
            }
            let mut fds = [libc::pollfd {
                fd: self.engine.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: polls one valid descriptor we own, with a bounded timeout.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
            self.engine.process_events();
            self.reap();
        }
    }
}

impl WorkerHandler for QueueWorker {
    fn handle(&mut self, token: u64, _epoll: &WorkerEpoll) {
        match token {
            QUEUE_TOKEN => {
                let _ = self.queue_event.read();
                if self.taking() {
                    self.process_queue();
                }
            }
            THROTTLE_TOKEN => {
                self.unthrottle();
            }
            LIMIT_TOKEN => {
                self.limits_changed();
            }
            ENGINE_TOKEN => {
                self.engine.process_events();
                self.reap();
                if std::mem::take(&mut self.retry_queue) && self.taking() {
                    self.process_queue();
                }
            }
            _ => {}
        }
    }

    fn after_events(&mut self, slept: Duration, _epoll: &WorkerEpoll) {
        self.polling.woken_after(slept);
        self.poll_briefly();
    }

    fn stopping(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::io::{create_engine, CacheMode, DiskError, IoEngine};
    use crate::devices::virtio::block::QUEUE_SIZE;
    use std::os::unix::io::RawFd;
    use virtio_queue::mock::MockSplitQueue;

    use crate::devices::virtio::NoInterrupt;

    /// A worker on a 1 MiB scratch file over a 16-entry queue with EVENT_IDX, its engine
    /// passed through `wrap`.
    fn worker_on_scratch(
        avail_idx: u16,
        wrap: impl FnOnce(Box<dyn AsyncIo>) -> Box<dyn AsyncIo>,
    ) -> (QueueWorker, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let disk = Arc::new(DiskFile::open(file.path(), false, CacheMode::Writeback).unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(true);
        mock.avail().idx().store(avail_idx);
        (worker_with(&mem, disk, queue, wrap), file)
    }

    /// A worker on the Sync engine passed through `wrap`.
    fn worker_with(
        mem: &GuestMemoryMmap,
        disk: Arc<DiskFile>,
        queue: Queue,
        wrap: impl FnOnce(Box<dyn AsyncIo>) -> Box<dyn AsyncIo>,
    ) -> QueueWorker {
        let engine = create_engine(IoEngine::Sync, &disk, u32::from(QUEUE_SIZE)).unwrap();
        QueueWorker::new(QueueWorkerParts {
            mem: mem.clone(),
            disk,
            serial: Arc::from(&b"serial"[..]),
            queue,
            queue_index: 0,
            queue_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            interrupt: Arc::new(NoInterrupt),
            kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            engine: wrap(engine),
            limiter: None,
            counters: Arc::default(),
        })
        .unwrap()
    }

    /// Regression (found by fuzz/blk_request): with EVENT_IDX, an available index more than
    /// a queue ahead made `process_queue` loop forever; the queue is now left alone.
    #[test]
    fn a_ring_index_more_than_a_queue_ahead_does_not_hang_the_worker() {
        let (mut worker, _file) = worker_on_scratch(17, |engine| engine);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(worker.process_queue()).unwrap());
        let taken = finished.recv_timeout(Duration::from_secs(10));
        assert_eq!(taken, Ok(0), "the worker spins on a broken ring");
    }

    /// An engine like RBD's: its own threads complete the requests.
    struct NeedsTheCpu(Box<dyn AsyncIo>);

    impl AsyncIo for NeedsTheCpu {
        fn event_fd(&self) -> RawFd {
            self.0.event_fd()
        }
        fn process_events(&mut self) {
            self.0.process_events()
        }
        fn queue(&mut self, op: DiskOp<'_>, user_data: u64) -> Result<(), DiskError> {
            self.0.queue(op, user_data)
        }
        fn submit(&mut self) -> Result<(), DiskError> {
            self.0.submit()
        }
        fn next_completion(&mut self) -> Option<Completion> {
            self.0.next_completion()
        }
        fn spinning_helps(&self) -> bool {
            false
        }
    }

    /// An engine like io_uring: nothing it was given completes before `submit`; and
    /// nothing completes before `visible` is set, so the test decides which path of the
    /// worker collects the first completion.
    struct StartsOnSubmit {
        inner: Box<dyn AsyncIo>,
        queued: u64,
        submitted: u64,
        delivered: u64,
        visible: Arc<std::sync::atomic::AtomicBool>,
    }

    impl AsyncIo for StartsOnSubmit {
        fn event_fd(&self) -> RawFd {
            self.inner.event_fd()
        }
        fn process_events(&mut self) {
            self.inner.process_events()
        }
        fn queue(&mut self, op: DiskOp<'_>, user_data: u64) -> Result<(), DiskError> {
            self.queued += 1;
            self.inner.queue(op, user_data)
        }
        fn submit(&mut self) -> Result<(), DiskError> {
            self.submitted = self.queued;
            self.inner.submit()
        }
        fn next_completion(&mut self) -> Option<Completion> {
            let visible = self.visible.load(std::sync::atomic::Ordering::Relaxed);
            if !visible || self.delivered == self.submitted {
                return None;
            }
            let completion = self.inner.next_completion();
            self.delivered += u64::from(completion.is_some());
            completion
        }
    }

    /// A worker whose engine starts I/O on submit and completes nothing until the returned
    /// flag is set.
    fn worker_starting_on_submit(
        mem: &GuestMemoryMmap,
        disk: Arc<DiskFile>,
        queue: Queue,
    ) -> (QueueWorker, Arc<std::sync::atomic::AtomicBool>) {
        let visible = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shown = visible.clone();
        let worker = worker_with(mem, disk, queue, move |inner| {
            Box::new(StartsOnSubmit {
                inner,
                queued: 0,
                submitted: 0,
                delivered: 0,
                visible: shown,
            })
        });
        (worker, visible)
    }

    /// A bounced request (cache=none, a misaligned buffer, two pieces) whose first piece
    /// completes while the worker polls: the second piece is submitted, and the request
    /// finishes. (The poll path queued it and never submitted it: the request waited for
    /// the guest's next kick, for ever if it had nothing else to send.)
    #[test]
    fn a_bounced_requests_next_piece_queued_while_polling_is_submitted() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        const W: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        const NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        // O_DIRECT needs a real filesystem (tmpfs refuses it); /var/tmp is on disk.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let disk = Arc::new(DiskFile::open(&path, false, CacheMode::None).unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // A write of two SIZE_MAX segments from a misaligned address: two bounce pieces.
        let (header, data, status) = (0x1_0000u64, 0x10_0001u64, 0x2_0000u64);
        mem.write_obj(
            crate::devices::virtio::block::VIRTIO_BLK_T_OUT.to_le(),
            GuestAddress(header),
        )
        .unwrap();
        mem.write_obj(0u64, GuestAddress(header + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let descs = [
            SplitDescriptor::new(header, 16, NEXT, 1),
            SplitDescriptor::new(data, SIZE_MAX, NEXT, 2),
            SplitDescriptor::new(data + u64::from(SIZE_MAX), SIZE_MAX, NEXT, 3),
            SplitDescriptor::new(status, 1, W, 0),
        ]
        .map(RawDescriptor::from);
        mock.add_desc_chains(&descs, 0).unwrap();
        let (mut worker, visible) =
            worker_starting_on_submit(&mem, disk, mock.create_queue().unwrap());
        assert_eq!(worker.process_queue(), 1);
        assert_eq!(mock.used().idx().load(), 0, "the first piece is in flight");
        visible.store(true, std::sync::atomic::Ordering::Relaxed);
        if !worker.polling.allowed() {
            // A one-CPU host does not poll: the engine's event finishes the request.
            worker.drain();
            return;
        }
        // Woken soon after sleeping, again and again: the widest window.
        for _ in 0..5 {
            worker.polling.woken_after(Duration::from_micros(1));
        }
        worker.poll_briefly();
        // The poll may end before the second piece completes (it stops after POLL_MAX);
        // then the engine's event collects it, as here.
        worker.reap();
        assert_eq!(mock.used().idx().load(), 1, "the request never finished");
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }

    /// A driver publishing the same head again before it was used: the worker holds at
    /// most a ring's worth of requests (it took every copy, without end), and takes the
    /// rest as those finish.
    #[test]
    fn a_head_published_again_while_in_flight_does_not_grow_the_requests_held() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        const W: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        const NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let disk = Arc::new(DiskFile::open(file.path(), false, CacheMode::Writeback).unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // One read of sector 0 at head 0.
        let descs = [
            SplitDescriptor::new(0x8000, 16, NEXT, 1),
            SplitDescriptor::new(0x9000, 512, NEXT | W, 2),
            SplitDescriptor::new(0xa000, 1, W, 0),
        ]
        .map(RawDescriptor::from);
        mock.add_desc_chains(&descs, 0).unwrap();
        let publish_up_to = |idx: u16| {
            for i in 0..16 {
                mock.avail().ring().ref_at(i).unwrap().store(0);
            }
            mock.avail().idx().store(idx);
        };
        publish_up_to(16);
        let (mut worker, visible) =
            worker_starting_on_submit(&mem, disk, mock.create_queue().unwrap());
        assert_eq!(worker.process_queue(), 16);
        publish_up_to(32);
        assert_eq!(
            worker.process_queue(),
            0,
            "more requests than the ring holds"
        );
        assert_eq!(worker.in_flight(), 16);
        visible.store(true, std::sync::atomic::Ordering::Relaxed);
        worker.reap();
        assert_eq!(mock.used().idx().load(), 16);
        assert_eq!(
            worker.process_queue(),
            16,
            "taken as the first ones finished"
        );
    }

    #[test]
    fn a_worker_spins_only_for_engines_it_helps_and_with_a_cpu_to_spare() {
        let spare_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
        let (local, _file) = worker_on_scratch(0, |engine| engine);
        assert_eq!(local.polling.allowed(), spare_cpu);
        let (mut rbd_like, _file) = worker_on_scratch(0, |engine| Box::new(NeedsTheCpu(engine)));
        assert!(!rbd_like.polling.allowed());
        // Woken right after going to sleep, the sign that spinning would have caught it.
        rbd_like.polling.woken_after(Duration::from_micros(1));
        assert!(rbd_like.polling.window().is_zero());
    }
}
