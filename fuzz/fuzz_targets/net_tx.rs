//! virtio-net TX: a guest whose memory (rings, descriptor chains, frames) is the input;
//! every chain is taken, and what reaches the TAP must be a frame the TX path may send.
//!
//! Input: flags (bit 1 EVENT_IDX), log2 of the queue size, the ring positions (u16), then
//! guest memory from address 0, the TX queue's descriptor table first (`ring_layout`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratus_fuzz::{guest_memory, net_worker, ready_queue, Input};
use stratus_vmm::devices::virtio::net::{MAX_PACKET_LEN, MIN_FRAME_LEN, QUEUE_SIZE, VNET_HDR_LEN};
use virtio_queue::{Queue, QueueT};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let log2_size = input.u8();
    let start = input.u16();
    let mem = guest_memory(input.rest());
    let Some(tx) = ready_queue(&mem, QUEUE_SIZE, log2_size, 0, start, flags & 2 != 0) else {
        return;
    };
    // The RX queue is not set up: TX must not need it.
    let rx = Queue::new(QUEUE_SIZE).expect("harness: queue size");
    let (mut worker, stats, peer) = net_worker(&mem, rx, tx, false);
    let consumed = worker.process_tx();

    let mut frame = vec![0u8; MAX_PACKET_LEN + 1];
    let mut sent = 0u64;
    while let Ok(len) = peer.recv(&mut frame) {
        assert!(
            (VNET_HDR_LEN + MIN_FRAME_LEN..=MAX_PACKET_LEN).contains(&len),
            "a {len}-byte frame reached the TAP"
        );
        sent += 1;
    }
    let stats = stats.report();
    assert_eq!(
        stats.tx_frames, sent,
        "frames counted as sent reached the TAP"
    );
    assert_eq!(
        stats.tx_frames + stats.tx_dropped,
        consumed as u64,
        "every chain taken was sent or dropped"
    );
});
