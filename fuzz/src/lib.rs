//! What the fuzz targets share: reading fields off the input, and a guest whose memory and
//! virtqueue come from it.
//!
//! Failures to set up the harness itself (no memory for a 64 KiB mapping, no eventfd) are
//! not findings about the input: they panic with a message saying so.

use stratus_vmm::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of every virtio target: room for a 256-entry ring and its buffers, small
/// enough to be rewritten on every run.
pub const MEM_SIZE: usize = 64 << 10;

/// Fields taken off the front of the input; past its end every field reads as zero, so
/// any input decodes.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// `MEM_SIZE` bytes of guest RAM at address 0 holding `image` (zero after it).
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("harness: cannot map guest memory");
    let image = &image[..image.len().min(MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0))
        .expect("harness: guest memory shorter than MEM_SIZE");
    mem
}

/// Where a queue of `size` entries lives: descriptor table at `base`, then the available
/// ring, then the used ring (4-byte aligned), as a driver lays out a split ring.
pub fn ring_layout(base: u64, size: u16) -> (u64, u64, u64) {
    let size = u64::from(size);
    let desc = base;
    let avail = desc + 16 * size;
    let used = (avail + 6 + 2 * size + 3) & !3;
    (desc, avail, used)
}

/// A queue as the transport hands it to a device at activation: size a power of two up
/// to `max`, rings placed by `ring_layout` at `base`, both ring positions at `start` (a
/// device that ran for a while is anywhere in the 16-bit index space). `None` when the
/// rings do not fit in `mem`, which activation refuses too.
pub fn ready_queue(
    mem: &GuestMemoryMmap,
    max: u16,
    log2_size: u8,
    base: u64,
    start: u16,
    event_idx: bool,
) -> Option<Queue> {
    let mut queue = Queue::new(max).expect("harness: queue maximum is a power of two");
    let size = 1u16 << (u32::from(log2_size) % (max.trailing_zeros() + 1));
    queue.set_size(size);
    let (desc, avail, used) = ring_layout(base, size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(desc);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used);
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(true);
    queue.set_event_idx(event_idx);
    queue.set_next_avail(start);
    queue.set_next_used(start);
    queue.is_valid(mem).then_some(queue)
}

/// A virtio-net worker on `rx` and `tx`, with a datagram socket in place of the TAP (it
/// keeps frame boundaries the way a TAP does); returns it with the socket's other end.
pub fn net_worker(
    mem: &GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    mergeable_rx: bool,
) -> (
    stratus_vmm::devices::virtio::net::worker::NetWorker,
    std::sync::Arc<stratus_vmm::devices::virtio::net::worker::NetStats>,
    std::os::unix::net::UnixDatagram,
) {
    use std::os::unix::io::IntoRawFd;
    use std::sync::Arc;
    use stratus_vmm::devices::virtio::net::tap::Tap;
    use stratus_vmm::devices::virtio::net::worker::{NetStats, NetWorker, NetWorkerParts};
    use vmm_sys_util::eventfd::EventFd;

    let (ours, peer) = std::os::unix::net::UnixDatagram::pair().expect("harness: socketpair");
    ours.set_nonblocking(true).expect("harness: O_NONBLOCK");
    peer.set_nonblocking(true).expect("harness: O_NONBLOCK");
    let tap = Tap::from_raw_datagram_fd(ours.into_raw_fd(), "fuzz0");
    let stats = Arc::new(NetStats::default());
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("harness: eventfd");
    let worker = NetWorker::new(NetWorkerParts {
        mem: mem.clone(),
        pair: 0,
        tap: Arc::new(tap),
        rx,
        tx,
        rx_event: eventfd(),
        tx_event: eventfd(),
        interrupt: Arc::new(NoInterrupt),
        kill: eventfd(),
        mergeable_rx,
        stats: stats.clone(),
        rx_limiter: None,
        tx_limiter: None,
        ctrl: None,
    })
    .expect("harness: cannot create the net worker");
    (worker, stats, peer)
}

/// Interrupts go nowhere: the targets look at what the device wrote, not when it said so.
pub struct NoInterrupt;

impl stratus_vmm::devices::virtio::VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: stratus_vmm::devices::virtio::VirtioInterruptType) {}
}
