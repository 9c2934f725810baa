//! One worker thread per queue: it pops requests, hands their I/O to the queue's engine in
//! batches, and completes them as the engine reports. Guest buffers are passed to the
//! engine in place; with cache=none, buffers that break O_DIRECT's alignment go through an
//! aligned bounce buffer instead.

use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::counters::{BlockCounters, CountedOp};
use super::io::{AsyncIo, Completion, DiskFile, DiskOp};
use super::request::{parse, write_device_id, Request, RequestKind, SectorRange};
use super::{SECTOR_SHIFT, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::worker::{run_worker, Throttle, WorkerEpoll, WorkerHandler};
use crate::devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use crate::memory::GuestMemoryMmap;

/// An aligned scratch buffer for guest buffers O_DIRECT cannot use in place.
struct Bounce {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
    /// Guest segments to fill from (reads) or that were copied into (writes) the buffer.
    segments: Vec<(GuestAddress, u32)>,
}

impl Bounce {
    fn new(len: usize, segments: Vec<(GuestAddress, u32)>, align: usize) -> Self {
        let storage = vec![0u8; len + align];
        let offset = storage.as_ptr().align_offset(align);
        Bounce {
            storage,
            offset,
            len,
            segments,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// A request whose I/O is in the engine.
struct InFlight {
    head: u16,
    status: GuestAddress,
    /// Bytes the engine must report for success.
    expected: u64,
    /// Bytes of guest buffers the device wrote (reported in the used ring before the status).
    written_to_guest: u32,
    // Referenced by the engine until completion; never read here.
    _iovecs: Vec<libc::iovec>,
    read_bounce: Option<Bounce>,
    _write_bounce: Option<Bounce>,
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
    /// Current polling window (see POLL_WINDOW); zero while polling does not pay.
    poll_window: Duration,
    /// False on a single-CPU host, where spinning only takes time from the vCPUs.
    polling_allowed: bool,
}

/// How long a worker keeps looking for disk completions and new requests before it goes
/// to sleep in epoll. A completion and the guest's next request usually come within tens
/// of microseconds; catching them here saves the thread a sleep and a wake-up each, which
/// is most of a request's cost at low queue depth. (QEMU's event loop polls the same way.)
/// The window adapts, as QEMU's does: it halves after a poll that found nothing (down to
/// zero, no polling) and doubles when the worker is woken soon after going to sleep.
const POLL_WINDOW: Duration = Duration::from_micros(50);
const POLL_WINDOW_MIN: Duration = Duration::from_micros(4);
/// Longest stretch spent polling without passing through epoll, so the kill, throttle and
/// limit events are never starved by a busy queue.
const POLL_MAX: Duration = Duration::from_micros(500);

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
            poll_window: Duration::ZERO,
            polling_allowed: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
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
                self.start(chain);
                taken += 1;
            }
            if let Err(e) = self.engine.submit() {
                tracing::error!(
                    "virtio-blk queue {}: cannot submit I/O: {e}",
                    self.queue_index
                );
            }
            // With EVENT_IDX, re-enabling notifications races with the driver adding more
            // requests; enable_notification reports those so none is left behind.
            if self.throttled
                || !self.queue.event_idx_enabled()
                || !self.queue.enable_notification(&self.mem).unwrap_or(false)
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

    /// The throttle timer fired: take requests again.
    pub fn unthrottle(&mut self) -> usize {
        let held = self.throttle.released();
        self.counters.throttled_for(held);
        self.throttled = false;
        self.process_queue()
    }

    /// Collects finished I/O and completes those requests; notifies the guest once.
    pub fn reap(&mut self) {
        while let Some(completion) = self.engine.next_completion() {
            self.finish(completion);
        }
        self.notify_if_needed();
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
            tracing::error!("virtio-blk: cannot return request {head} to the guest: {e:?}");
        }
        self.used_pending = true;
    }

    fn start(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) {
        let head = chain.head_index();
        let sectors = self.disk.size() >> SECTOR_SHIFT;
        let request = match parse(chain, &self.mem, sectors, self.disk.read_only()) {
            Ok(r) => r,
            Err((error, status_addr)) => {
                tracing::debug!("refusing virtio-blk request: {error}");
                self.complete(head, status_addr, error.status(), 0);
                return;
            }
        };
        match request.kind {
            RequestKind::GetDeviceId => {
                let written = write_device_id(&request, &self.mem, &self.serial);
                self.complete(head, Some(request.status), VIRTIO_BLK_S_OK, written);
            }
            _ => {
                if let Err(status) = self.submit_io(head, &request) {
                    self.complete(head, Some(request.status), status, 0);
                }
            }
        }
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

    fn submit_io(&mut self, head: u16, request: &Request) -> Result<(), u8> {
        let data_len = request.data_len();
        let mut inflight = InFlight {
            head,
            status: request.status,
            expected: 0,
            written_to_guest: 0,
            _iovecs: Vec::new(),
            read_bounce: None,
            _write_bounce: None,
            counted: CountedOp::Flush,
        };
        match request.kind {
            RequestKind::Read { .. } | RequestKind::Write { .. } => {
                inflight.expected = u64::from(data_len);
                let is_read = matches!(request.kind, RequestKind::Read { .. });
                inflight.counted = if is_read {
                    CountedOp::Read(u64::from(data_len))
                } else {
                    CountedOp::Write(u64::from(data_len))
                };
                if is_read {
                    inflight.written_to_guest = data_len;
                }
                inflight._iovecs = match self.guest_iovecs(request)? {
                    Some(iovecs) => iovecs,
                    None => {
                        let mut bounce = Bounce::new(
                            data_len as usize,
                            request.data.clone(),
                            self.disk.direct_alignment() as usize,
                        );
                        if !is_read {
                            let mut at = 0usize;
                            for &(addr, len) in &request.data {
                                let dst = &mut bounce.bytes_mut()[at..at + len as usize];
                                self.mem
                                    .read_slice(dst, addr)
                                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                                at += len as usize;
                            }
                        }
                        let iovec = libc::iovec {
                            iov_base: bounce.bytes().as_ptr() as *mut libc::c_void,
                            iov_len: bounce.len,
                        };
                        if is_read {
                            inflight.read_bounce = Some(bounce);
                        } else {
                            inflight._write_bounce = Some(bounce);
                        }
                        vec![iovec]
                    }
                };
            }
            // GET_ID is answered by the worker itself (see `start`), never by an engine.
            RequestKind::Flush
            | RequestKind::Discard(_)
            | RequestKind::WriteZeroes(_)
            | RequestKind::GetDeviceId => {}
        }
        let iovecs = inflight._iovecs.as_slice();
        let bytes = |range: SectorRange| {
            (
                range.sector << SECTOR_SHIFT,
                u64::from(range.num_sectors) << SECTOR_SHIFT,
            )
        };
        let op = match request.kind {
            RequestKind::Read { sector } => DiskOp::Read {
                offset: sector << SECTOR_SHIFT,
                iovecs,
            },
            RequestKind::Write { sector } => DiskOp::Write {
                offset: sector << SECTOR_SHIFT,
                iovecs,
            },
            RequestKind::Flush => DiskOp::Flush,
            RequestKind::GetDeviceId => return Err(VIRTIO_BLK_S_IOERR),
            RequestKind::Discard(range) => {
                let (offset, len) = bytes(range);
                inflight.counted = CountedOp::Discard(len);
                DiskOp::Discard { offset, len }
            }
            RequestKind::WriteZeroes(range) => {
                let (offset, len) = bytes(range);
                inflight.counted = CountedOp::WriteZeroes(len);
                DiskOp::WriteZeroes {
                    offset,
                    len,
                    unmap: range.unmap,
                }
            }
        };
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.inflight.push(None);
            self.inflight.len() - 1
        });
        let queued = self.engine.queue(op, slot as u64);
        match queued {
            Ok(()) => {
                self.inflight[slot] = Some(inflight);
                Ok(())
            }
            Err(e) => {
                tracing::warn!("virtio-blk: cannot queue I/O: {e}");
                self.free_slots.push(slot);
                Err(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    fn finish(&mut self, completion: Completion) {
        let slot = completion.user_data as usize;
        let Some(inflight) = self.inflight.get_mut(slot).and_then(Option::take) else {
            tracing::error!("virtio-blk: completion for unknown request {slot}");
            return;
        };
        self.free_slots.push(slot);
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
        if ok {
            if let Some(bounce) = &inflight.read_bounce {
                let mut at = 0usize;
                for &(addr, len) in &bounce.segments {
                    if self
                        .mem
                        .write_slice(&bounce.bytes()[at..at + len as usize], addr)
                        .is_err()
                    {
                        status = VIRTIO_BLK_S_IOERR;
                        break;
                    }
                    at += len as usize;
                }
            }
        }
        if status == VIRTIO_BLK_S_OK {
            self.counters.completed(inflight.counted);
        }
        let written = if status == VIRTIO_BLK_S_OK {
            inflight.written_to_guest
        } else {
            0
        };
        self.complete(inflight.head, Some(inflight.status), status, written);
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
        if self.poll_window.is_zero() {
            return;
        }
        let start = Instant::now();
        let mut deadline = start + self.poll_window;
        let mut paid = false;
        loop {
            let mut progressed = false;
            if self.in_flight() > 0 {
                if let Some(completion) = self.engine.next_completion() {
                    self.finish(completion);
                    self.reap();
                    progressed = true;
                }
            }
            if !self.throttled && self.has_new_requests() {
                self.process_queue();
                progressed = true;
            }
            let now = Instant::now();
            if progressed {
                deadline = now + self.poll_window;
                paid = true;
            }
            if now >= deadline || now - start >= POLL_MAX {
                if !paid {
                    self.poll_window /= 2;
                    if self.poll_window < POLL_WINDOW_MIN {
                        self.poll_window = Duration::ZERO;
                    }
                }
                return;
            }
            std::hint::spin_loop();
        }
    }

    fn has_new_requests(&self) -> bool {
        self.queue
            .avail_idx(&self.mem, Ordering::Acquire)
            .is_ok_and(|idx| idx != Wrapping(self.queue.next_avail()))
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
                if !self.throttled {
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
            }
            _ => {}
        }
    }

    fn after_events(&mut self, slept: Duration) {
        // Woken within one full window of going to sleep: polling would have caught it.
        if self.polling_allowed && slept < POLL_WINDOW {
            self.poll_window = (self.poll_window * 2).clamp(POLL_WINDOW_MIN, POLL_WINDOW);
        }
        self.poll_briefly();
    }

    fn stopping(&mut self) {
        self.drain();
    }
}
