//! Run-time rate-limit changes (what the VMM API does) reach a virtio-blk device that is
//! already serving its queue: through the limiter handle the device hands out, without KVM.

mod blk_common;
#[path = "support/timer.rs"]
mod timer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blk_common::chain;
use stratus_vmm::devices::rate_limiter::RateLimit;
use stratus_vmm::devices::virtio::block::io::{create_engine, CacheMode, DiskFile, IoEngine};
use stratus_vmm::devices::virtio::block::worker::{QueueWorker, QueueWorkerParts};
use stratus_vmm::devices::virtio::block::*;
use stratus_vmm::devices::virtio::{
    ActivateContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 16 << 20;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
/// Generous: a bound on a hung worker, not a speed target.
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Interrupts(AtomicUsize);

impl VirtioInterrupt for Interrupts {
    fn trigger(&self, _: VirtioInterruptType) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// One request per second: after the first, every request waits for the throttle timer.
fn one_op_per_second() -> RateLimit {
    RateLimit {
        bytes_per_sec: None,
        ops_per_sec: Some(1),
    }
}

struct Setup {
    mem: GuestMemoryMmap,
    disk: tempfile::NamedTempFile,
}

impl Setup {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let disk = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        disk.as_file().set_len(64 * 512).unwrap();
        Setup { mem, disk }
    }

    /// A queue holding `count` one-sector reads; their status bytes start at 0xaa.
    fn queue_of_reads(&self, count: u16) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        for i in 0..count {
            let at = u64::from(i);
            let header = HEADER + at * 16;
            self.mem
                .write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(header))
                .unwrap();
            self.mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
            self.mem
                .write_obj(at.to_le(), GuestAddress(header + 8))
                .unwrap();
            self.mem
                .write_obj(0xaau8, GuestAddress(STATUS + at))
                .unwrap();
            let first = i * 3;
            let descs = [
                (header, 16, 0),
                (DATA + at * 512, 512, VRING_DESC_F_WRITE),
                (STATUS + at, 1, VRING_DESC_F_WRITE),
            ];
            mock.add_desc_chains(&chain(&descs, first), first).unwrap();
        }
        let queue = mock.create_queue().unwrap();
        (mock, queue)
    }

    fn statuses(&self, count: u16) -> Vec<u8> {
        (0..u64::from(count))
            .map(|i| self.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap())
            .collect()
    }
}

#[test]
fn a_throttled_queue_resumes_at_once_when_the_limit_is_lifted_through_the_device_handle() {
    let s = Setup::new();
    let mut config = BlockConfig::new(s.disk.path());
    config.rate_limit = one_op_per_second();
    let block = VirtioBlock::new(&config, 1).unwrap();
    // What the VMM hands the API: the limiter every queue of this device shares.
    let handle = block.rate_limiter();
    assert_eq!(handle.limit(), one_op_per_second());

    let (mock, queue) = s.queue_of_reads(3);
    let disk = DiskFile::open(s.disk.path(), false, CacheMode::Writeback).unwrap();
    let engine = create_engine(IoEngine::Sync, &disk, u32::from(QUEUE_SIZE)).unwrap();
    let mut worker = QueueWorker::new(QueueWorkerParts {
        mem: s.mem.clone(),
        disk: Arc::new(disk),
        serial: Arc::from(&b"rl"[..]),
        queue,
        queue_index: 0,
        queue_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        interrupt: Arc::new(Interrupts::default()),
        kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        engine,
        limiter: Some(handle.clone()),
        counters: Default::default(),
    })
    .expect("worker");
    assert_eq!(worker.process_queue(), 1);
    worker.drain();
    assert!(worker.throttled());
    assert_eq!(mock.used().idx().load(), 1, "two requests wait in the ring");
    assert!(!worker.limits_changed(), "no change is pending yet");

    handle.update(RateLimit::default());
    assert!(
        worker.limits_changed(),
        "the update wakes the throttled worker"
    );
    // The old deadline was up to a second away; the timer now fires at once. (If this
    // machine took a second to get here the old timer has expired too: weaker, not flaky.)
    assert!(
        !worker.throttle_timer().is_armed().unwrap(),
        "the throttle timer is due now"
    );
    timer::wait_until_fired(worker.throttle_timer());
    assert_eq!(worker.unthrottle(), 2, "both waiting requests go");
    worker.drain();
    assert!(!worker.throttled());
    assert_eq!(mock.used().idx().load(), 3);
    assert_eq!(s.statuses(3), vec![VIRTIO_BLK_S_OK; 3]);
    assert!(handle.is_unlimited());
}

#[test]
fn an_activated_device_drains_its_throttled_queue_once_the_limit_is_lifted() {
    let s = Setup::new();
    let mut config = BlockConfig::new(s.disk.path());
    config.rate_limit = one_op_per_second();
    config.engine = Some(IoEngine::Sync);
    let mut block = VirtioBlock::new(&config, 1).unwrap();
    let handle = block.rate_limiter();
    // Left to the limit, the last of these would be served about seven seconds from now.
    const REQUESTS: u16 = 8;
    let (mock, queue) = s.queue_of_reads(REQUESTS);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    block
        .activate(ActivateContext {
            mem: s.mem.clone(),
            interrupt: Arc::new(Interrupts::default()),
            queues: vec![queue],
            queue_events: vec![kick.try_clone().unwrap()],
            acked_features: 0,
        })
        .unwrap();
    kick.write(1).unwrap();
    let wait_for_used = |n: u16| {
        let start = Instant::now();
        while mock.used().idx().load() < n {
            assert!(start.elapsed() < DEADLINE, "fewer than {n} requests served");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for_used(1);
    handle.update(RateLimit::default());
    wait_for_used(REQUESTS);
    block.reset();
    assert_eq!(mock.used().idx().load(), REQUESTS);
    assert_eq!(
        s.statuses(REQUESTS),
        vec![VIRTIO_BLK_S_OK; REQUESTS as usize]
    );
}
