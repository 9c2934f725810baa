//! The virtio-net worker: TX chains are written to the TAP as they come; frames read from
//! the TAP are spread over as many RX buffers as they need (mergeable buffers), read
//! straight into them when enough are reserved for the largest frame, copied through a
//! frame buffer otherwise. The worker sleeps in epoll on the TAP, both queue notifications
//! and its kill event; after work it polls briefly, with the guest's kicks left off, for
//! the next TX frames, returned RX buffers and frames on the TAP (`Polling`, the window
//! adapting as the block worker's does). A NIC with several queue pairs has one worker
//! per pair, each on its own queue of a multiqueue TAP; pair 0's worker also serves the
//! control queue, where the driver says how many pairs it uses.

use std::collections::VecDeque;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::tap::Tap;
use super::*;
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::worker::{run_worker, Polling, Throttle, WorkerEpoll, WorkerHandler};
use crate::devices::virtio::{
    enable_notification_checked, has_available, VirtioInterrupt, VirtioInterruptType,
};
use crate::log_limit::rate_limited;
use crate::memory::GuestMemoryMmap;

/// Counters a test or the VMM API can read.
#[derive(Default, Debug)]
pub struct NetStats {
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    /// Frame bytes without the virtio-net header.
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub throttled_us: AtomicU64,
}

/// `GET /vm/counters`, per NIC: totals since the device was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetCountersReport {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the TAP that could not be delivered (malformed RX chains, oversized).
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Guest frames refused (malformed chains, oversized) or refused by the TAP.
    pub tx_dropped: u64,
    /// Time the rate limiter held either direction back.
    pub throttled_us: u64,
}

impl NetStats {
    pub fn report(&self) -> NetCountersReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCountersReport {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            throttled_us: get(&self.throttled_us),
        }
    }
}

pub struct NetWorkerParts {
    pub mem: GuestMemoryMmap,
    /// Which queue pair this worker serves: its queues are 2 × pair and 2 × pair + 1.
    pub pair: u16,
    pub tap: Arc<Tap>,
    pub rx: Queue,
    pub tx: Queue,
    pub rx_event: EventFd,
    pub tx_event: EventFd,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub kill: EventFd,
    pub mergeable_rx: bool,
    pub stats: Arc<NetStats>,
    pub rx_limiter: Option<RateLimiter>,
    pub tx_limiter: Option<RateLimiter>,
    /// The control queue, for pair 0's worker when the driver accepted one.
    pub ctrl: Option<NetCtrl>,
}

/// The control queue. The one command served is the number of queue pairs in use
/// (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET): the TAP then spreads received frames over those
/// pairs' queues only, as the pairs above them get no RX buffers.
pub struct NetCtrl {
    pub queue: Queue,
    pub event: EventFd,
    /// The control queue's index, for its interrupt.
    pub index: u16,
    /// The TAP queue of every pair the driver may use, pair 0 first.
    pub taps: Vec<Arc<Tap>>,
    /// Pairs whose TAP queues are attached; None after a change failed partway.
    pub pairs_in_use: Option<usize>,
    pub last_pairs_change: Option<std::time::Instant>,
}

/// Least time between two changes of the pairs in use. Each detaches or attaches TAP
/// queues under the host's RTNL lock (and waits for in-flight packets): a guest switching
/// back and forth could otherwise keep every other VM's network set-up on the host waiting.
/// Linux changes them at probe and on `ethtool -L`; its driver waits for the answer.
pub const MIN_PAIRS_CHANGE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl NetCtrl {
    /// Answers every command the driver queued; returns whether any was answered.
    fn process(&mut self, mem: &GuestMemoryMmap) -> bool {
        let mut answered = false;
        loop {
            answered |= self.answer_queued(mem);
            // With EVENT_IDX the driver kicks only when the device asked to hear about its
            // next command: ask, and answer what came meanwhile. (Not asking left the avail
            // event at 0: Linux's second command, `ethtool -L` say, came without a kick
            // and its driver waited for the answer forever, holding the RTNL lock.)
            if !self.queue.event_idx_enabled() || !enable_notification_checked(&mut self.queue, mem)
            {
                return answered;
            }
        }
    }

    fn answer_queued(&mut self, mem: &GuestMemoryMmap) -> bool {
        let mut answered = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // class, command and a command's data: VQ_PAIRS_SET's is a u16.
            let mut command = [0u8; 4];
            let mut read = 0usize;
            let mut status_at = None;
            let mut valid = true;
            for d in chain {
                if d.is_write_only() {
                    if status_at.is_none() && d.len() >= 1 {
                        status_at = Some(d.addr());
                    }
                } else if status_at.is_some() {
                    // The device-readable part comes first.
                    valid = false;
                } else {
                    let take = (d.len() as usize).min(command.len() - read);
                    if mem
                        .read_slice(&mut command[read..read + take], d.addr())
                        .is_err()
                    {
                        valid = false;
                    }
                    read += take;
                }
            }
            let used = match status_at {
                Some(at) => {
                    let status = if valid && read >= 2 {
                        self.command(command[0], command[1], &command[2..read])
                    } else {
                        VIRTIO_NET_ERR
                    };
                    u32::from(mem.write_slice(&[status], at).is_ok())
                }
                None => {
                    tracing::debug!("virtio-net: a control command {head} without a status byte");
                    0
                }
            };
            if self.queue.add_used(mem, head, used).is_err() {
                rate_limited!(
                    tracing::Level::ERROR,
                    "virtio-net: cannot return control buffer {head}"
                );
            }
            answered = true;
        }
        answered
    }

    fn command(&mut self, class: u8, command: u8, data: &[u8]) -> u8 {
        match (class, command, data) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, [lo, hi]) => {
                let pairs = usize::from(u16::from_le_bytes([*lo, *hi]));
                if pairs == 0 || pairs > self.taps.len() {
                    tracing::debug!("virtio-net: the driver asked for {pairs} queue pairs");
                    return VIRTIO_NET_ERR;
                }
                self.use_pairs(pairs)
            }
            _ => {
                tracing::debug!("virtio-net: unknown control command {class}/{command}");
                VIRTIO_NET_ERR
            }
        }
    }

    /// Attaches the TAP queues of the first `pairs` pairs and detaches the others.
    /// Attaching before detaching keeps at least one queue attached throughout. A change
    /// that comes sooner than MIN_PAIRS_CHANGE_INTERVAL after the last one waits (this
    /// pair's worker with it: only the guest that asks waits).
    fn use_pairs(&mut self, pairs: usize) -> u8 {
        if self.pairs_in_use == Some(pairs) {
            return VIRTIO_NET_OK;
        }
        if let Some(last) = self.last_pairs_change {
            std::thread::sleep(MIN_PAIRS_CHANGE_INTERVAL.saturating_sub(last.elapsed()));
        }
        self.last_pairs_change = Some(std::time::Instant::now());
        self.pairs_in_use = None;
        let (used, unused) = self.taps.split_at(pairs);
        let attach = used.iter().map(|t| (t, true));
        let detach = unused.iter().map(|t| (t, false));
        for (tap, attached) in attach.chain(detach) {
            if let Err(e) = tap.set_queue_attached(attached) {
                rate_limited!(
                    tracing::Level::WARN,
                    "virtio-net: cannot use {pairs} queue pairs: {e}"
                );
                return VIRTIO_NET_ERR;
            }
        }
        self.pairs_in_use = Some(pairs);
        VIRTIO_NET_OK
    }
}

/// What one pass over a queue moved: added to the shared counters once per pass rather
/// than once per frame.
#[derive(Default)]
struct PassCount {
    frames: u64,
    /// Frame bytes without the virtio-net header.
    bytes: u64,
    dropped: u64,
}

impl PassCount {
    /// A frame of `len` bytes, header included, went through.
    fn frame(&mut self, len: usize) {
        self.frames += 1;
        self.bytes += len.saturating_sub(VNET_HDR_LEN) as u64;
    }

    fn add_to(&self, frames: &AtomicU64, bytes: &AtomicU64, dropped: &AtomicU64) {
        if self.frames > 0 {
            frames.fetch_add(self.frames, Ordering::Relaxed);
            bytes.fetch_add(self.bytes, Ordering::Relaxed);
        }
        if self.dropped > 0 {
            dropped.fetch_add(self.dropped, Ordering::Relaxed);
        }
    }
}

/// An RX chain taken from the queue and checked, waiting for a frame.
struct RxChain {
    head: u16,
    capacity: usize,
    /// How many entries of `rx_buffers` are this chain's.
    buffers: usize,
    /// How many entries of `rx_iovecs` are this chain's.
    iovecs: usize,
}

/// iovecs pointing into guest memory, in a Vec or a VecDeque.
#[derive(Default)]
struct GuestIoVecs<C = Vec<libc::iovec>>(C);

// SAFETY: the pointers are into the guest memory mappings the worker's own GuestMemoryMmap
// keeps alive; the list belongs to the worker and is used by one thread at a time.
unsafe impl Send for GuestIoVecs<Vec<libc::iovec>> {}
// SAFETY: as above.
unsafe impl Send for GuestIoVecs<VecDeque<libc::iovec>> {}

impl<C> std::ops::Deref for GuestIoVecs<C> {
    type Target = C;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<C> std::ops::DerefMut for GuestIoVecs<C> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

pub struct NetWorker {
    p: NetWorkerParts,
    frame: Vec<u8>,
    rx_reserve: VecDeque<RxChain>,
    /// The reserve's buffers, chain after chain, for copying a frame into them.
    rx_buffers: VecDeque<(GuestAddress, usize)>,
    /// The reserve's buffers as host iovecs, chain after chain: frames are read straight
    /// into them when the reserve can hold the largest frame.
    rx_iovecs: GuestIoVecs<VecDeque<libc::iovec>>,
    /// `rx_iovecs` with neighbours joined, for the read.
    rx_read_iovecs: GuestIoVecs,
    rx_reserved_bytes: usize,
    /// How many bytes of the reserve a direct read offers the TAP before `frame`: about
    /// the largest recent frame. Offering all of a reserve of small buffers (43 chains of
    /// 1536 bytes for the largest frame) cost the kernel an iovec import per chain for
    /// every frame; a frame longer than guessed ends in `frame` and is copied on.
    rx_direct_len: usize,
    /// Scratch list for gathering a TX chain, kept to avoid an allocation per frame.
    tx_iovecs: GuestIoVecs,
    /// Length of a frame read from the TAP that found no room in the RX queue yet.
    pending: Option<usize>,
    /// The rate limiter already took the pending frame: it waits for buffers, and is not
    /// charged again each time it looks for them.
    pending_paid: bool,
    rx_used: bool,
    tx_used: bool,
    throttle: Throttle,
    rx_throttled: bool,
    tx_throttled: bool,
    /// The TAP is watched only while there is somewhere to put what it delivers;
    /// otherwise a readable TAP would wake the worker in a loop.
    tap_watched: bool,
    /// Reading the TAP failed (the host deleted it, say): it is read no more, and no
    /// longer watched, since its error would wake the worker in a loop.
    tap_failed: bool,
    tap_forgotten: bool,
    polling: Polling,
    /// Frames this worker took from the TAP (delivered or dropped), for telling whether a
    /// poll moved anything: the NIC's counters are shared by all its queue pairs.
    rx_moved: u64,
    /// While polling, the guest's kicks stay off (EVENT_IDX: the avail event is not moved
    /// on); they are turned back on, with one last look, when polling ends.
    polling_now: bool,
}

/// readv's limit (IOV_MAX): a guest posting tiny buffers gets its frames copied instead.
const MAX_RX_IOVECS: usize = 1024;

/// Appends `len` bytes at `base` to `iovecs`, growing the last entry when they follow it:
/// Linux carves a queue's consecutive RX buffers, and a TCP frame's fragments, out of the
/// same large pages, and the kernel copies a TAP frame one segment at a time, so fewer and
/// longer segments make the copy cheaper.
fn push_iovec(iovecs: &mut Vec<libc::iovec>, base: *mut u8, len: usize) {
    if let Some(last) = iovecs.last_mut() {
        if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == base {
            last.iov_len += len;
            return;
        }
    }
    iovecs.push(libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    });
}

/// Writes `bytes` into the guest buffers in turn, as far as they reach; returns how many
/// bytes went in. A buffer outside guest memory ends the copy: the guest gets a short frame,
/// which it can check against the used length.
fn copy_into_buffers<'a>(
    mem: &GuestMemoryMmap,
    bytes: &[u8],
    buffers: impl Iterator<Item = &'a (GuestAddress, usize)>,
) -> usize {
    let mut copied = 0;
    for &(addr, len) in buffers {
        if copied == bytes.len() {
            break;
        }
        let take = len.min(bytes.len() - copied);
        if mem
            .write_slice(&bytes[copied..copied + take], addr)
            .is_err()
        {
            break;
        }
        copied += take;
    }
    copied
}

/// Whether the reserved chains can take a frame of `len` bytes: with mergeable buffers
/// all of them together, otherwise one chain.
fn reserve_holds(
    mergeable: bool,
    reserved_bytes: usize,
    reserve: &VecDeque<RxChain>,
    len: usize,
) -> bool {
    if mergeable {
        reserved_bytes >= len
    } else {
        !reserve.is_empty()
    }
}

const TAP_TOKEN: u64 = 0;
const RX_TOKEN: u64 = 1;
const TX_TOKEN: u64 = 2;
const THROTTLE_TOKEN: u64 = 3;
const LIMIT_TOKEN: u64 = 4;
const CTRL_TOKEN: u64 = 5;

impl NetWorker {
    /// Fails only when the host is out of eventfds or timerfds.
    pub fn new(parts: NetWorkerParts) -> std::io::Result<Self> {
        let throttle = Throttle::new([&parts.rx_limiter, &parts.tx_limiter].into_iter().flatten())?;
        Ok(NetWorker {
            p: parts,
            frame: vec![0; MAX_PACKET_LEN],
            rx_reserve: VecDeque::new(),
            rx_buffers: VecDeque::new(),
            rx_iovecs: GuestIoVecs::default(),
            rx_read_iovecs: GuestIoVecs::default(),
            rx_reserved_bytes: 0,
            rx_direct_len: MAX_PACKET_LEN,
            tx_iovecs: GuestIoVecs::default(),
            pending: None,
            pending_paid: false,
            rx_used: false,
            tx_used: false,
            throttle,
            rx_throttled: false,
            tx_throttled: false,
            tap_watched: true,
            tap_failed: false,
            tap_forgotten: false,
            polling: Polling::new(true),
            rx_moved: 0,
            polling_now: false,
        })
    }

    fn throttle(&mut self, wait: std::time::Duration) {
        self.throttle.hold(wait, "virtio-net");
    }

    pub fn throttled(&self) -> (bool, bool) {
        (self.rx_throttled, self.tx_throttled)
    }

    /// The throttle timer, for callers that drive the worker by hand.
    pub fn throttle_timer(&mut self) -> &mut TimerFd {
        self.throttle.timer()
    }

    /// A limiter's limits changed: a throttled direction retries at once under the new
    /// limits (through the throttle timer). Returns whether a change was pending.
    pub fn limits_changed(&mut self) -> bool {
        let held = self.rx_throttled || self.tx_throttled;
        self.throttle.limits_changed(held, "virtio-net")
    }

    /// The throttle timer fired: both directions may go on. Returns what `process_rx`
    /// does, or false when the timer had been re-armed and the hold goes on.
    pub fn unthrottle(&mut self) -> bool {
        let Some(held) = self.throttle.released() else {
            return false;
        };
        self.rx_throttled = false;
        self.tx_throttled = false;
        let us = held.as_micros() as u64;
        self.p.stats.throttled_us.fetch_add(us, Ordering::Relaxed);
        self.process_tx();
        self.process_rx()
    }

    /// Sends every frame the guest queued; returns how many chains were consumed.
    pub fn process_tx(&mut self) -> usize {
        let mut consumed = 0;
        let mut pass = PassCount::default();
        let mut iovecs = std::mem::take(&mut self.tx_iovecs);
        loop {
            if self.p.tx.event_idx_enabled() {
                let _ = self.p.tx.disable_notification(&self.p.mem);
            }
            while let Some(chain) = self.p.tx.pop_descriptor_chain(&self.p.mem) {
                // An unlimited limiter is skipped before the chain is walked for its length.
                if let Some(limiter) = self.p.tx_limiter.as_ref().filter(|l| !l.is_unlimited()) {
                    let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
                    if let Err(wait) = limiter.consume(bytes) {
                        self.p.tx.go_to_previous_position();
                        self.tx_throttled = true;
                        self.throttle(wait);
                        break;
                    }
                }
                let head = chain.head_index();
                iovecs.clear();
                let mut total = 0usize;
                let mut valid = true;
                let mut last_has_next = false;
                for d in chain {
                    last_has_next = d.has_next();
                    total = total.saturating_add(d.len() as usize);
                    if d.is_write_only() || total > MAX_PACKET_LEN {
                        valid = false;
                        break;
                    }
                    for slice in
                        GuestMemoryBackend::get_slices(&self.p.mem, d.addr(), d.len() as usize)
                    {
                        match slice {
                            Ok(s) => push_iovec(&mut iovecs, s.ptr_guard_mut().as_ptr(), s.len()),
                            Err(_) => valid = false,
                        }
                    }
                }
                if last_has_next || total < VNET_HDR_LEN + MIN_FRAME_LEN {
                    valid = false;
                }
                let sent = valid
                    && match self.p.tap.write_frame(&iovecs) {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::debug!("virtio-net: TAP refused a {total}-byte frame: {e}");
                            false
                        }
                    };
                if !valid {
                    tracing::debug!("virtio-net: dropping a malformed {total}-byte TX chain");
                }
                if sent {
                    pass.frame(total);
                } else {
                    pass.dropped += 1;
                }
                // TX buffers are only read: the used length is 0 either way.
                if self.p.tx.add_used(&self.p.mem, head, 0).is_err() {
                    rate_limited!(
                        tracing::Level::ERROR,
                        "virtio-net: cannot return TX buffer {head}"
                    );
                }
                self.tx_used = true;
                consumed += 1;
            }
            // A throttled chain went back to the ring: enable_notification_checked would
            // find it again and the loop would spin until the limiter refilled.
            if !self.p.tx.event_idx_enabled()
                || self.polling_now
                || self.tx_throttled
                || !enable_notification_checked(&mut self.p.tx, &self.p.mem)
            {
                break;
            }
        }
        self.tx_iovecs = iovecs;
        let stats = &self.p.stats;
        pass.add_to(&stats.tx_frames, &stats.tx_bytes, &stats.tx_dropped);
        self.notify();
        consumed
    }

    /// Moves frames from the TAP into RX buffers. Returns false when it stopped because
    /// the guest has no buffers left (the frame stays pending).
    pub fn process_rx(&mut self) -> bool {
        let mut delivered_all = true;
        let mut pass = PassCount::default();
        loop {
            if self.tap_failed && self.pending.is_none() {
                break;
            }
            // Straight into the guest's buffers, with no copy: when no frame waits in
            // `frame`, no limiter needs the length before the read, and the reserve can
            // take the largest frame the TAP may deliver.
            if self.pending.is_none()
                && self.p.mergeable_rx
                && self.rx_unlimited()
                && self.reserve_rx(MAX_PACKET_LEN)
                && self.rx_iovecs.len() <= MAX_RX_IOVECS
            {
                match self.read_into_reserve() {
                    Ok(DirectRead::Delivered(len)) => pass.frame(len),
                    Ok(DirectRead::Dropped) => pass.dropped += 1,
                    Ok(DirectRead::Empty) => break,
                    Err(e) => {
                        self.tap_read_failed(e);
                        break;
                    }
                }
                continue;
            }
            let len = match self.pending {
                Some(len) => len,
                None => match self.p.tap.read_frame(&mut self.frame) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        self.tap_read_failed(e);
                        break;
                    }
                },
            };
            // tun reports a frame's whole length even when `frame` held less of it.
            if len < VNET_HDR_LEN || len > self.frame.len() {
                pass.dropped += 1;
                self.pending = None;
                continue;
            }
            if let Some(limiter) = self.p.rx_limiter.as_ref().filter(|_| !self.pending_paid) {
                if let Err(wait) = limiter.consume(len as u64) {
                    self.pending = Some(len);
                    self.rx_throttled = true;
                    self.throttle(wait);
                    delivered_all = false;
                    break;
                }
            }
            self.pending_paid = false;
            match self.deliver(len) {
                Delivery::Done => {
                    pass.frame(len);
                    self.pending = None;
                }
                Delivery::Dropped => {
                    pass.dropped += 1;
                    self.pending = None;
                }
                Delivery::NoBuffers => {
                    // With EVENT_IDX the driver only kicks when asked to: ask now (unless
                    // polling, which looks for buffers itself), and catch buffers that
                    // arrived while we were asking.
                    if self.p.rx.event_idx_enabled()
                        && !self.polling_now
                        && enable_notification_checked(&mut self.p.rx, &self.p.mem)
                    {
                        self.pending = Some(len);
                        self.pending_paid = true;
                        continue;
                    }
                    self.pending = Some(len);
                    self.pending_paid = true;
                    delivered_all = false;
                    break;
                }
            }
        }
        self.rx_moved += pass.frames + pass.dropped;
        let stats = &self.p.stats;
        pass.add_to(&stats.rx_frames, &stats.rx_bytes, &stats.rx_dropped);
        self.notify();
        delivered_all
    }

    fn tap_read_failed(&mut self, e: std::io::Error) {
        tracing::error!(
            "virtio-net: reading TAP {} failed ({e}); the NIC receives nothing more on it",
            self.p.tap.name()
        );
        self.tap_failed = true;
    }

    fn rx_unlimited(&self) -> bool {
        self.p.rx_limiter.as_ref().is_none_or(|l| l.is_unlimited())
    }

    /// Reads one frame from the TAP into the reserved chains' buffers and hands the chains
    /// it fills to the guest; the rest stay reserved. The caller made sure the reserve
    /// holds at least MAX_PACKET_LEN bytes, more than any read can return.
    fn read_into_reserve(&mut self) -> std::io::Result<DirectRead> {
        // The first chains, up to about the expected length, then `frame` for the rest.
        self.rx_read_iovecs.clear();
        let (mut direct, mut iovecs, mut direct_buffers) = (0usize, 0usize, 0usize);
        for chain in &self.rx_reserve {
            direct += chain.capacity;
            iovecs += chain.iovecs;
            direct_buffers += chain.buffers;
            if direct >= self.rx_direct_len {
                break;
            }
        }
        for v in self.rx_iovecs.iter().take(iovecs) {
            push_iovec(&mut self.rx_read_iovecs, v.iov_base.cast(), v.iov_len);
        }
        if direct < self.rx_reserved_bytes {
            let rest = &mut self.frame[..MAX_PACKET_LEN.min(self.rx_reserved_bytes - direct)];
            self.rx_read_iovecs.push(libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            });
        }
        let Some(len) = self.p.tap.read_frame_vectored(&self.rx_read_iovecs)? else {
            return Ok(DirectRead::Empty);
        };
        // tun reports a frame's whole length even when the buffers held less of it.
        if len < VNET_HDR_LEN || len > self.rx_reserved_bytes {
            // Nothing is handed back: the chains stay reserved for the next frame.
            return Ok(DirectRead::Dropped);
        }
        self.rx_direct_len = len.max(self.rx_direct_len - self.rx_direct_len / 8);
        if len > direct {
            // The rest went to `frame`: on into the buffers after the direct chains'.
            copy_into_buffers(
                &self.p.mem,
                &self.frame[..len - direct],
                self.rx_buffers.iter().skip(direct_buffers),
            );
        }
        let count = self.chains_for(len);
        // reserve_rx made sure the first buffer holds the whole header.
        if let Some(first) = self.rx_buffers.front() {
            let at = first.0.unchecked_add(VNET_HDR_NUM_BUFFERS as u64);
            let _ = self.p.mem.write_slice(&(count as u16).to_le_bytes(), at);
        }
        let mut left = len;
        for _ in 0..count {
            let Some(chain) = self.take_reserved() else {
                break;
            };
            let written = chain.capacity.min(left);
            left -= written;
            let _ = self.p.rx.add_used(&self.p.mem, chain.head, written as u32);
        }
        self.rx_used = true;
        Ok(DirectRead::Delivered(len))
    }

    /// How many reserved chains, from the front, a frame of `len` bytes spans.
    fn chains_for(&self, len: usize) -> usize {
        let mut room = 0usize;
        let mut count = 0usize;
        for c in &self.rx_reserve {
            count += 1;
            room += c.capacity;
            if room >= len {
                break;
            }
        }
        count
    }

    fn take_reserved(&mut self) -> Option<RxChain> {
        let chain = self.rx_reserve.pop_front()?;
        self.rx_iovecs.drain(..chain.iovecs);
        self.rx_buffers.drain(..chain.buffers);
        self.rx_reserved_bytes -= chain.capacity;
        Some(chain)
    }

    /// Takes RX chains into the reserve until they can hold `len` bytes (or, without
    /// mergeable buffers, until there is one chain). Malformed chains go back unused.
    fn reserve_rx(&mut self, len: usize) -> bool {
        if self.reserve_holds(len) {
            return true;
        }
        // The available index is read once for all the chains taken here: a 64 KiB frame
        // spans 17 page-sized buffers, and reading the index again for each of them was a
        // measurable share of the worker's time. Buffers the guest adds meanwhile are seen
        // at the next call, or by the caller's check after asking for a kick.
        let mut chains = match self.p.rx.iter(&self.p.mem) {
            Ok(chains) => chains,
            Err(e) => {
                tracing::debug!("virtio-net: RX queue unusable: {e}");
                return false;
            }
        };
        let mut malformed = Vec::new();
        while !reserve_holds(
            self.p.mergeable_rx,
            self.rx_reserved_bytes,
            &self.rx_reserve,
            len,
        ) {
            let Some(chain) = chains.next() else {
                break;
            };
            let head = chain.head_index();
            let mark = self.rx_iovecs.len();
            let buffers_mark = self.rx_buffers.len();
            let mut valid = true;
            let mut last_has_next = false;
            for d in chain {
                last_has_next = d.has_next();
                if !d.is_write_only() {
                    valid = false;
                    break;
                }
                for slice in GuestMemoryBackend::get_slices(&self.p.mem, d.addr(), d.len() as usize)
                {
                    match slice {
                        Ok(s) => self.rx_iovecs.push_back(libc::iovec {
                            iov_base: s.ptr_guard_mut().as_ptr().cast(),
                            iov_len: s.len(),
                        }),
                        Err(_) => valid = false,
                    }
                }
                if !valid {
                    break;
                }
                self.rx_buffers.push_back((d.addr(), d.len() as usize));
            }
            // Each chain's first buffer must hold a whole header: num_buffers lives there.
            let first = self.rx_buffers.get(buffers_mark);
            if !valid || last_has_next || first.is_none_or(|b| b.1 < VNET_HDR_LEN) {
                tracing::debug!("virtio-net: returning a malformed RX chain {head}");
                self.rx_iovecs.truncate(mark);
                self.rx_buffers.truncate(buffers_mark);
                malformed.push(head);
                continue;
            }
            let capacity: usize = self.rx_buffers.range(buffers_mark..).map(|b| b.1).sum();
            self.rx_reserved_bytes += capacity;
            self.rx_reserve.push_back(RxChain {
                head,
                capacity,
                buffers: self.rx_buffers.len() - buffers_mark,
                iovecs: self.rx_iovecs.len() - mark,
            });
        }
        for head in malformed {
            let _ = self.p.rx.add_used(&self.p.mem, head, 0);
            self.rx_used = true;
        }
        self.reserve_holds(len)
    }

    fn reserve_holds(&self, len: usize) -> bool {
        reserve_holds(
            self.p.mergeable_rx,
            self.rx_reserved_bytes,
            &self.rx_reserve,
            len,
        )
    }

    fn deliver(&mut self, len: usize) -> Delivery {
        if !self.reserve_rx(len) {
            // The guest's whole ring is reserved and still holds less than the frame: it
            // can never fit, and waiting for it would stop this queue receiving for good.
            if self.p.mergeable_rx && self.rx_reserve.len() >= usize::from(self.p.rx.size()) {
                return Delivery::Dropped;
            }
            return Delivery::NoBuffers;
        }
        if !self.p.mergeable_rx && self.rx_reserve.front().is_some_and(|c| c.capacity < len) {
            // Without mergeable buffers one chain must hold the frame.
            if let Some(chain) = self.take_reserved() {
                let _ = self.p.rx.add_used(&self.p.mem, chain.head, 0);
            }
            self.rx_used = true;
            return Delivery::Dropped;
        }
        // How many chains the frame spans.
        let count = self.chains_for(len);
        self.frame[VNET_HDR_NUM_BUFFERS..VNET_HDR_NUM_BUFFERS + 2]
            .copy_from_slice(&(count as u16).to_le_bytes());
        let mut copied = 0usize;
        for _ in 0..count {
            let Some(buffers) = self.rx_reserve.front().map(|c| c.buffers) else {
                break;
            };
            let written = copy_into_buffers(
                &self.p.mem,
                &self.frame[copied..len],
                self.rx_buffers.iter().take(buffers),
            );
            copied += written;
            let Some(chain) = self.take_reserved() else {
                break;
            };
            let _ = self.p.rx.add_used(&self.p.mem, chain.head, written as u32);
        }
        self.rx_used = true;
        Delivery::Done
    }

    fn notify(&mut self) {
        let rx_index = 2 * self.p.pair;
        if self.rx_used && self.p.rx.needs_notification(&self.p.mem).unwrap_or(true) {
            self.p
                .interrupt
                .trigger(VirtioInterruptType::Queue(rx_index));
        }
        if self.tx_used && self.p.tx.needs_notification(&self.p.mem).unwrap_or(true) {
            self.p
                .interrupt
                .trigger(VirtioInterruptType::Queue(rx_index + 1));
        }
        self.rx_used = false;
        self.tx_used = false;
    }

    /// Watches the TAP exactly while its frames have somewhere to go.
    fn update_tap_watch(&mut self, epoll: &WorkerEpoll) {
        if self.tap_failed {
            if !self.tap_forgotten {
                epoll.forget(self.p.tap.fd());
                self.tap_forgotten = true;
            }
            return;
        }
        let want = self.pending.is_none() && !self.rx_throttled;
        if want != self.tap_watched {
            epoll.set_watched(self.p.tap.fd(), TAP_TOKEN, want);
            self.tap_watched = want;
        }
    }

    /// Moves what comes within the polling window: TX frames the guest queues, RX
    /// buffers it gives back to a waiting frame, frames arriving on the TAP. Returns
    /// whether any frame moved.
    fn poll_step(&mut self) -> bool {
        let mut moved = false;
        if !self.tx_throttled && has_available(&self.p.tx, &self.p.mem) {
            moved |= self.process_tx() > 0;
        }
        let waiting_for_buffers = self.pending.is_some();
        if !self.rx_throttled && (!waiting_for_buffers || has_available(&self.p.rx, &self.p.mem)) {
            let before = self.rx_moved;
            self.process_rx();
            moved |= self.rx_moved != before;
        }
        moved
    }

    fn poll(&mut self) {
        let mut polling = std::mem::take(&mut self.polling);
        if polling.window().is_zero() {
            self.polling = polling;
            return;
        }
        self.polling_now = true;
        polling.spin(|| self.poll_step());
        self.polling_now = false;
        self.polling = polling;
        // Kicks back on, and what came while turning them on is taken now.
        if !self.tx_throttled {
            self.process_tx();
        }
        if !self.rx_throttled && self.pending.is_some() {
            self.process_rx();
        }
    }

    /// Answers the driver's control commands.
    pub fn process_ctrl(&mut self) {
        let Some(ctrl) = self.p.ctrl.as_mut() else {
            return;
        };
        if ctrl.process(&self.p.mem) && ctrl.queue.needs_notification(&self.p.mem).unwrap_or(true) {
            self.p
                .interrupt
                .trigger(VirtioInterruptType::Queue(ctrl.index));
        }
    }

    /// Moves frames until the kill event fires.
    pub fn run(mut self) {
        let mut fds = vec![
            (self.p.tap.fd(), TAP_TOKEN),
            (self.p.rx_event.as_raw_fd(), RX_TOKEN),
            (self.p.tx_event.as_raw_fd(), TX_TOKEN),
            (self.throttle.timer_fd(), THROTTLE_TOKEN),
            (self.throttle.limit_changed_fd(), LIMIT_TOKEN),
        ];
        if let Some(ctrl) = &self.p.ctrl {
            fds.push((ctrl.event.as_raw_fd(), CTRL_TOKEN));
        }
        let kill = self.p.kill.as_raw_fd();
        run_worker("virtio-net", kill, &fds, &mut self);
    }
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

enum DirectRead {
    /// The TAP had nothing to read.
    Empty,
    /// Shorter than a virtio-net header, or longer than the buffers: dropped.
    Dropped,
    /// A frame of this length (header included) went to the guest.
    Delivered(usize),
}

impl WorkerHandler for NetWorker {
    fn handle(&mut self, token: u64, epoll: &WorkerEpoll) {
        match token {
            TAP_TOKEN | RX_TOKEN | THROTTLE_TOKEN => {
                if token == RX_TOKEN {
                    let _ = self.p.rx_event.read();
                }
                if token == THROTTLE_TOKEN {
                    self.unthrottle();
                } else if !self.rx_throttled {
                    self.process_rx();
                }
                self.update_tap_watch(epoll);
            }
            TX_TOKEN => {
                let _ = self.p.tx_event.read();
                if !self.tx_throttled {
                    self.process_tx();
                }
            }
            LIMIT_TOKEN => {
                self.limits_changed();
            }
            CTRL_TOKEN => {
                if let Some(ctrl) = &self.p.ctrl {
                    let _ = ctrl.event.read();
                }
                self.process_ctrl();
            }
            _ => {}
        }
    }

    fn after_events(&mut self, slept: std::time::Duration, epoll: &WorkerEpoll) {
        self.polling.woken_after(slept);
        self.poll();
        self.update_tap_watch(epoll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::IntoRawFd;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    use virtio_queue::mock::MockSplitQueue;

    use crate::devices::virtio::NoInterrupt;

    /// A worker over `rx` and `tx` (queues of `mem`) whose TAP is `tap`'s datagram pair.
    fn worker_over(
        mem: &GuestMemoryMmap,
        [rx, tx]: [Queue; 2],
        tap: UnixDatagram,
        tx_limiter: Option<RateLimiter>,
    ) -> NetWorker {
        tap.set_nonblocking(true).unwrap();
        NetWorker::new(NetWorkerParts {
            mem: mem.clone(),
            pair: 0,
            tap: Arc::new(Tap::from_raw_datagram_fd(tap.into_raw_fd(), "test0")),
            rx,
            tx,
            rx_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            tx_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            interrupt: Arc::new(NoInterrupt),
            kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            mergeable_rx: true,
            stats: Arc::default(),
            rx_limiter: None,
            tx_limiter,
            ctrl: None,
        })
        .unwrap()
    }

    /// Queues `count` TX frames (a header and 60 bytes of 0xab each) from `at` onwards;
    /// returns the payload.
    fn queue_tx_frames(
        mem: &GuestMemoryMmap,
        tx: &MockSplitQueue<GuestMemoryMmap>,
        at: u64,
        count: u16,
    ) -> [u8; 60] {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        let payload = [0xabu8; 60];
        let len = (VNET_HDR_LEN + payload.len()) as u32;
        let mut descs = Vec::new();
        for i in 0..u64::from(count) {
            let frame_at = at + i * 0x100;
            mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(frame_at))
                .unwrap();
            mem.write_slice(&payload, GuestAddress(frame_at + VNET_HDR_LEN as u64))
                .unwrap();
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                frame_at, len, 0, 0,
            )));
        }
        tx.add_desc_chains(&descs, 0).unwrap();
        payload
    }

    /// Two queues of `mem` with EVENT_IDX, RX at 0 and TX at 0x10000.
    fn event_idx_queues(
        mem: &GuestMemoryMmap,
    ) -> (
        MockSplitQueue<'_, GuestMemoryMmap>,
        MockSplitQueue<'_, GuestMemoryMmap>,
        [Queue; 2],
    ) {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x10000), 16);
        let mut queues: [Queue; 2] = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        for queue in &mut queues {
            queue.set_event_idx(true);
        }
        (rx, tx, queues)
    }

    /// Regression (found in review): with EVENT_IDX, a frame the TX limiter held back went
    /// back to the ring, was found there again, and the worker spun until the limiter
    /// refilled instead of leaving it to the throttle timer.
    #[test]
    fn a_throttled_tx_frame_waits_for_the_timer_instead_of_spinning() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let (_rx, tx, queues) = event_idx_queues(&mem);
        let (ours, peer) = UnixDatagram::pair().unwrap();
        let one_frame_a_second = RateLimiter::new(crate::devices::rate_limiter::RateLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(1),
        });
        let mut worker = worker_over(&mem, queues, ours, Some(one_frame_a_second));
        queue_tx_frames(&mem, &tx, 0x30000, 2);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let sent = worker.process_tx();
            done.send((sent, worker.throttled().1)).unwrap();
        });
        let (sent, tx_throttled) = finished.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(sent, 1, "the second frame waits for the limiter's timer");
        assert!(tx_throttled);
        let mut got = [0u8; 256];
        peer.set_nonblocking(true).unwrap();
        assert!(peer.recv(&mut got).is_ok());
        assert!(peer.recv(&mut got).is_err(), "one frame only went out");
    }

    #[test]
    fn every_control_command_under_event_idx_asks_for_the_next_kick() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(true);
        let mut ctrl = NetCtrl {
            queue,
            event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            index: 4,
            taps: Vec::new(),
            pairs_in_use: Some(1),
            last_pairs_change: None,
        };
        let avail_event = GuestAddress(mock.used_addr().0 + 4 + 8 * 16);
        // An unknown command (answered VIRTIO_NET_ERR, no TAP needed): class and command,
        // then a status byte; command n's descriptors at table indexes 2n and 2n + 1.
        let command = |n: u16| {
            use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
            use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
            let at = 0x10000 + u64::from(n) * 16;
            mem.write_slice(&[0xee, 0xee], GuestAddress(at)).unwrap();
            [
                SplitDescriptor::new(at, 2, VRING_DESC_F_NEXT as u16, 2 * n + 1),
                SplitDescriptor::new(at + 8, 1, VRING_DESC_F_WRITE as u16, 0),
            ]
            .map(RawDescriptor::from)
        };
        for n in 0..3u16 {
            mock.add_desc_chains(&command(n), 2 * n).unwrap();
            // The driver's side of the kick (vring_need_event, as Linux's virtqueue_kick):
            // the avail index went from n to n + 1.
            let event: u16 = mem.read_obj(avail_event).unwrap();
            let new = n + 1;
            assert!(
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(n),
                "command {n} would come without a kick (avail event {event})"
            );
            assert!(ctrl.process(&mem), "command {n} answered");
            assert_eq!(mock.used().idx().load(), new);
        }
    }

    #[test]
    fn touching_pieces_become_one_segment_and_gaps_start_a_new_one() {
        let mut area = [0u8; 64];
        let base = area.as_mut_ptr();
        let mut iovecs = Vec::new();
        push_iovec(&mut iovecs, base, 16);
        push_iovec(&mut iovecs, base.wrapping_add(16), 16);
        push_iovec(&mut iovecs, base.wrapping_add(40), 8);
        push_iovec(&mut iovecs, base.wrapping_add(48), 16);
        let segments: Vec<_> = iovecs
            .iter()
            .map(|v| (v.iov_base as usize - base as usize, v.iov_len))
            .collect();
        assert_eq!(segments, [(0, 32), (40, 24)]);
    }

    /// A frame the guest queues without a kick goes out while the worker polls after a
    /// wake-up (the guest's kicks are off while it polls); a one-CPU host does not poll.
    #[test]
    fn a_frame_queued_without_a_kick_is_sent_by_polling_after_a_wake_up() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let (_rx, tx, queues) = event_idx_queues(&mem);
        let (ours, peer) = UnixDatagram::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        let mut worker = worker_over(&mem, queues, ours, None);
        let payload = queue_tx_frames(&mem, &tx, 0x30000, 1);

        let epoll = WorkerEpoll::new().unwrap();
        // Woken a microsecond after it went to sleep: the sign that polling pays.
        worker.after_events(Duration::from_micros(1), &epoll);
        let mut got = [0u8; 256];
        let sent = peer.recv(&mut got);
        if worker.polling.allowed() {
            let n = sent.expect("the frame went out without a kick");
            assert!(got[..n].ends_with(&payload), "{:?}", &got[..n]);
            assert_eq!(tx.used().idx().load(), 1);
        } else {
            assert!(sent.is_err(), "a one-CPU host does not poll");
        }
    }

    /// A frame waiting for RX buffers is charged to the limiter once, however often the
    /// worker looks for buffers (it was charged each time: a limit of two frames a second
    /// throttled the NIC on the third look at one frame).
    #[test]
    fn a_frame_waiting_for_buffers_is_charged_once() {
        use crate::devices::rate_limiter::RateLimit;
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let (rx, _tx, queues) = event_idx_queues(&mem);
        let (ours, peer) = UnixDatagram::pair().unwrap();
        peer.send(&[0x5a; VNET_HDR_LEN + 60]).unwrap();
        let mut worker = worker_over(&mem, queues, ours, None);
        worker.p.rx_limiter = Some(RateLimiter::new(RateLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(2),
        }));
        for look in 0..3 {
            assert!(!worker.process_rx(), "look {look}: no buffers yet");
            assert!(!worker.throttled().0, "look {look}: throttled");
        }
        let buffer = SplitDescriptor::new(0x30000, 2048, VRING_DESC_F_WRITE as u16, 0);
        rx.add_desc_chains(&[RawDescriptor::from(buffer)], 0)
            .unwrap();
        assert!(worker.process_rx(), "the frame went in");
        assert_eq!(rx.used().idx().load(), 1);
        assert!(!worker.throttled().0);
    }

    /// Regression (found by fuzz/net_tx and fuzz/net_rx): with EVENT_IDX, an available
    /// index more than a queue ahead made TX, and RX with a frame waiting, loop forever.
    #[test]
    fn a_ring_index_more_than_a_queue_ahead_does_not_hang_the_worker() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
        let mut queues: [Queue; 2] = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        for (queue, mock) in queues.iter_mut().zip([&rx, &tx]) {
            queue.set_event_idx(true);
            mock.avail().idx().store(17);
        }
        let (ours, peer) = UnixDatagram::pair().unwrap();
        peer.send(&[0u8; 64]).unwrap();
        let mut worker = worker_over(&mem, queues, ours, None);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let sent = worker.process_tx();
            let delivered = worker.process_rx();
            done.send((sent, delivered)).unwrap();
        });
        let result = finished.recv_timeout(Duration::from_secs(10));
        assert_eq!(result, Ok((0, false)), "the worker spins on a broken ring");
    }
}
