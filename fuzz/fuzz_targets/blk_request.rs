//! virtio-blk: a guest whose memory (rings, descriptors, request headers, buffers) is the
//! input, served by the real queue worker and I/O engine against a small raw disk.
//!
//! Input: flags (bit 0 read-only disk, bit 1 EVENT_IDX, bit 2 cache=none so unaligned
//! buffers go through the bounce path, bit 3 io_uring), log2 of the queue size, the ring
//! positions (u16), then guest memory from address 0: the descriptor table first, the
//! available and used rings right after it (`ring_layout`).
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use stratus_fuzz::{guest_memory, ready_queue, Input};
use stratus_vmm::devices::virtio::block::counters::BlockCounters;
use stratus_vmm::devices::virtio::block::io::{
    create_engine, io_uring_supported, CacheMode, DiskFile, ImageFormat, IoEngine,
};
use stratus_vmm::devices::virtio::block::worker::{QueueWorker, QueueWorkerParts};
use stratus_vmm::devices::virtio::block::{QUEUE_SIZE, SECTOR_SIZE};
use stratus_vmm::devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use vmm_sys_util::eventfd::EventFd;

const DISK_SECTORS: u64 = 128;

/// Longer than GET_ID's 20 bytes, so the answer is cut as the device must cut it.
const SERIAL: &[u8] = b"stratus-fuzz-disk-serial-0123";

struct Disks {
    /// Rewrites the disk before every run, so what a run reads does not depend on what
    /// earlier runs wrote.
    reset: File,
    pattern: Vec<u8>,
    /// Indexed by `read_only as usize`.
    writeback: [Arc<DiskFile>; 2],
    /// None where the temporary directory's filesystem refuses O_DIRECT (tmpfs).
    direct: Option<[Arc<DiskFile>; 2]>,
    io_uring: bool,
}

static DISKS: LazyLock<Disks> = LazyLock::new(|| {
    let path = std::env::temp_dir().join(format!("stratus-fuzz-blk-{}.raw", std::process::id()));
    let pattern: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(&path, &pattern).expect("harness: cannot create the disk file");
    let open = |read_only, cache| {
        DiskFile::open_format(&path, ImageFormat::Raw, read_only, cache).map(Arc::new)
    };
    let writeback = [
        open(false, CacheMode::Writeback).expect("harness: cannot open the disk"),
        open(true, CacheMode::Writeback).expect("harness: cannot open the disk read-only"),
    ];
    let direct = match (open(false, CacheMode::None), open(true, CacheMode::None)) {
        (Ok(rw), Ok(ro)) => Some([rw, ro]),
        _ => None,
    };
    let reset = File::options()
        .write(true)
        .open(&path)
        .expect("harness: cannot reopen the disk file");
    // The descriptors stay open; nothing is left behind in the temporary directory.
    let _ = std::fs::remove_file(&path);
    Disks {
        reset,
        pattern,
        writeback,
        direct,
        io_uring: io_uring_supported(),
    }
});

#[derive(Default)]
struct Interrupts(AtomicUsize);

impl VirtioInterrupt for Interrupts {
    fn trigger(&self, _kind: VirtioInterruptType) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fuzz_target!(|data: &[u8]| {
    let disks = &*DISKS;
    let mut input = Input::new(data);
    let flags = input.u8();
    let log2_size = input.u8();
    let start = input.u16();
    let mem = guest_memory(input.rest());
    let Some(queue) = ready_queue(&mem, QUEUE_SIZE, log2_size, 0, start, flags & 2 != 0) else {
        return;
    };
    let read_only = usize::from(flags & 1 != 0);
    let disk = match (&disks.direct, flags & 4 != 0) {
        (Some(direct), true) => direct[read_only].clone(),
        _ => disks.writeback[read_only].clone(),
    };
    let engine = if flags & 8 != 0 && disks.io_uring {
        IoEngine::IoUring
    } else {
        IoEngine::Sync
    };
    disks
        .reset
        .write_all_at(&disks.pattern, 0)
        .expect("harness: cannot rewrite the disk");
    let engine = create_engine(engine, &disk, u32::from(QUEUE_SIZE))
        .expect("harness: cannot create the I/O engine");
    let mut worker = QueueWorker::new(QueueWorkerParts {
        mem: mem.clone(),
        disk,
        serial: Arc::from(SERIAL),
        queue,
        queue_index: 0,
        queue_event: EventFd::new(libc::EFD_NONBLOCK).expect("harness: eventfd"),
        interrupt: Arc::new(Interrupts::default()),
        kill: EventFd::new(libc::EFD_NONBLOCK).expect("harness: eventfd"),
        engine,
        limiter: None,
        counters: Arc::new(BlockCounters::default()),
    })
    .expect("harness: cannot create the queue worker");
    // Requests deferred for bounce budget are taken again once earlier ones finished, as
    // the worker's event loop does; a queue holds at most QUEUE_SIZE of them.
    for _ in 0..4 {
        let taken = worker.process_queue();
        worker.drain();
        if taken == 0 {
            break;
        }
    }
    assert_eq!(
        worker.in_flight(),
        0,
        "a drained worker has nothing in flight"
    );
});
