//! virtio-net RX: frames arrive on the TAP while the guest's memory (rings, receive
//! buffers) is the input; each frame is delivered, dropped, or left pending.
//!
//! Input: flags (bit 0 mergeable receive buffers, bit 1 EVENT_IDX), log2 of the queue
//! size, the ring positions (u16), the number of frames (mod 9) and each one's length
//! (u16), then guest memory from address 0, the RX queue's descriptor table first.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use stratus_fuzz::{guest_memory, net_worker, ready_queue, Input};
use stratus_vmm::devices::virtio::net::QUEUE_SIZE;
use virtio_queue::{Queue, QueueT};

/// What the frames hold does not steer the device (it only fills in num_buffers), so one
/// pattern serves every length a u16 gives.
static PATTERN: LazyLock<Vec<u8>> =
    LazyLock::new(|| (0..=u16::MAX as usize).map(|i| (i % 253) as u8).collect());

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let log2_size = input.u8();
    let start = input.u16();
    let frames: Vec<usize> = (0..input.u8() % 9)
        .map(|_| usize::from(input.u16()))
        .collect();
    let mem = guest_memory(input.rest());
    let Some(rx) = ready_queue(&mem, QUEUE_SIZE, log2_size, 0, start, flags & 2 != 0) else {
        return;
    };
    let tx = Queue::new(QUEUE_SIZE).expect("harness: queue size");
    let (mut worker, stats, peer) = net_worker(&mem, rx, tx, flags & 1 != 0);
    // A full socket refuses the rest, as a TAP's queue would drop them.
    let sent = frames
        .iter()
        .take_while(|&&len| peer.send(&PATTERN[..len]).is_ok())
        .count() as u64;
    // The second pass finds what the first left pending.
    worker.process_rx();
    worker.process_rx();
    let stats = stats.report();
    assert!(
        stats.rx_frames + stats.rx_dropped <= sent,
        "{} delivered and {} dropped of {sent} frames",
        stats.rx_frames,
        stats.rx_dropped
    );
});
