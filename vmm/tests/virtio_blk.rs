//! virtio-blk without KVM: requests built in a virtqueue in plain guest memory, served by
//! the queue worker with every I/O engine, cache mode and image format (raw, and a qcow2
//! overlay on a raw base), checked against the disk contents and the used ring. qcow2
//! contents are read back with qemu-img, and every qcow2 image must pass `qemu-img check`.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use stratus_vmm::devices::rate_limiter::{RateLimit, RateLimiter};
use stratus_vmm::devices::virtio::block::counters::{BlockCounters, BlockCountersReport};
use stratus_vmm::devices::virtio::block::worker::{QueueWorker, QueueWorkerParts};
mod blk_common;
#[path = "support/timer.rs"]
mod timer;

use blk_common::{chain, qemu_img_check, tool, Rng};
use stratus_vmm::devices::virtio::block::io::qcow2::create_overlay;
use stratus_vmm::devices::virtio::block::io::{
    create_engine, CacheMode, DiskFile, ImageFormat, IoEngine,
};
use stratus_vmm::devices::virtio::block::*;
use stratus_vmm::devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 16 << 20;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SECTORS: u64 = 64;

#[derive(Default)]
struct CountingInterrupt(AtomicUsize);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) {
        assert_eq!(kind, VirtioInterruptType::Queue(0));
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Fixture {
    mem: GuestMemoryMmap,
    dir: tempfile::TempDir,
    /// What the VMM opens: the raw file, or the qcow2 overlay on it.
    image: std::path::PathBuf,
    /// The raw file holding the initial pattern.
    base: std::path::PathBuf,
    interrupt: Arc<CountingInterrupt>,
    engine: IoEngine,
    cache: CacheMode,
    format: ImageFormat,
    /// Shared by every worker the fixture makes, like a device's queues share them.
    counters: Arc<BlockCounters>,
}

/// Every engine with every cache mode and every format.
fn fixtures() -> Vec<Fixture> {
    let mut all = Vec::new();
    for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
        for engine in [IoEngine::Sync, IoEngine::IoUring] {
            for cache in [CacheMode::Writeback, CacheMode::None] {
                all.push(Fixture::new(engine, cache, format));
            }
        }
    }
    all
}

impl Fixture {
    fn new(engine: IoEngine, cache: CacheMode, format: ImageFormat) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        // O_DIRECT needs a real filesystem (tmpfs refuses it), so not /tmp.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let base = dir.path().join("base.raw");
        let pattern: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &pattern).unwrap();
        let image = match format {
            ImageFormat::Raw => base.clone(),
            ImageFormat::Qcow2 => {
                let overlay = dir.path().join("overlay.qcow2");
                create_overlay(&overlay, &base, ImageFormat::Raw).unwrap();
                overlay
            }
        };
        Fixture {
            mem,
            dir,
            image,
            base,
            interrupt: Arc::new(CountingInterrupt::default()),
            engine,
            cache,
            format,
            counters: Arc::default(),
        }
    }

    fn name(&self) -> String {
        format!("{:?}/{:?}/{}", self.engine, self.cache, self.format)
    }

    fn worker(&self, queue: Queue, read_only: bool) -> QueueWorker {
        self.limited_worker(queue, read_only, None)
    }

    fn limited_worker(
        &self,
        queue: Queue,
        read_only: bool,
        limiter: Option<RateLimiter>,
    ) -> QueueWorker {
        let disk = DiskFile::open_format(&self.image, self.format, read_only, self.cache).unwrap();
        let engine = create_engine(self.engine, &disk, u32::from(QUEUE_SIZE)).unwrap();
        QueueWorker::new(QueueWorkerParts {
            mem: self.mem.clone(),
            disk: Arc::new(disk),
            serial: Arc::from(&b"stratus-disk-serial-0123"[..]),
            queue,
            queue_index: 0,
            queue_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            interrupt: self.interrupt.clone(),
            kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            engine,
            limiter,
            counters: self.counters.clone(),
        })
        .expect("worker")
    }

    /// Takes every chain, then waits until all their I/O has completed.
    fn run(&self, worker: &mut QueueWorker) -> usize {
        let taken = worker.process_queue();
        worker.drain();
        taken
    }

    fn header(&self, at: u64, request_type: u32, sector: u64) {
        self.mem
            .write_obj(request_type.to_le(), GuestAddress(at))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at + 8))
            .unwrap();
    }

    /// Serves the given chains (each placed after the previous) and returns
    /// (status byte, used length) per chain.
    fn serve(&self, chains: &[Vec<(u64, u32, u32)>], read_only: bool) -> Vec<(u8, u32)> {
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        let mut first = 0u16;
        for c in chains {
            mock.add_desc_chains(&chain(c, first), first).unwrap();
            first += c.len() as u16;
        }
        // The status is the last byte of the last buffer.
        let status_at =
            |last: &(u64, u32, u32)| GuestAddress(last.0 + u64::from(last.1.max(1) - 1));
        for c in chains {
            if let Some(status) = c.last() {
                // Statuses outside guest memory cannot be pre-set; the device must not write them.
                let _ = self.mem.write_obj(0xaau8, status_at(status));
            }
        }
        let queue: Queue = mock.create_queue().unwrap();
        let mut worker = self.worker(queue, read_only);
        let taken = self.run(&mut worker);
        assert_eq!(taken, chains.len(), "every chain is taken");
        let used = mock.used();
        assert_eq!(used.idx().load(), chains.len() as u16);
        // Requests complete in any order; match used entries to chains by head index.
        let used_len: std::collections::HashMap<u32, u32> = (0..chains.len())
            .map(|i| used.ring().ref_at(i).unwrap().load())
            .map(|e| (e.id(), e.len()))
            .collect();
        let mut head = 0u32;
        chains
            .iter()
            .map(|c| {
                let len = *used_len.get(&head).expect("every chain completed once");
                head += c.len() as u32;
                let status = c
                    .last()
                    .and_then(|s| self.mem.read_obj::<u8>(status_at(s)).ok())
                    .unwrap_or(0xaa);
                (status, len)
            })
            .collect()
    }

    /// What the guest sees on the disk, read without our code: the raw file, or the qcow2
    /// chain converted by qemu-img (after `qemu-img check` passed on it).
    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let raw = match self.format {
            ImageFormat::Raw => self.base.clone(),
            ImageFormat::Qcow2 => {
                qemu_img_check(&self.image);
                let out = self.dir.path().join("converted.raw");
                tool(
                    "qemu-img",
                    &[
                        "convert".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        "-O".as_ref(),
                        "raw".as_ref(),
                        self.image.as_os_str(),
                        out.as_os_str(),
                    ],
                );
                out
            }
        };
        let mut buf = vec![0; len];
        std::fs::File::open(raw)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    fn raw_only(self) -> Option<Self> {
        (self.format == ImageFormat::Raw).then_some(self)
    }
}

/// Descriptors of one chain: (address, length, flags).
type Chain = Vec<(u64, u32, u32)>;

const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;

#[test]
fn write_then_read_back_across_two_data_descriptors() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let payload: Vec<u8> = (0..1536u32).map(|i| (i * 7 % 256) as u8).collect();
        f.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
        f.header(HEADER, VIRTIO_BLK_T_OUT, 3);
        let write = vec![
            (HEADER, 16, R),
            (DATA, 1024, R),
            (DATA + 1024, 512, R),
            (STATUS, 1, W),
        ];
        f.header(HEADER + 16, VIRTIO_BLK_T_IN, 3);
        let read = vec![
            (HEADER + 16, 16, R),
            (DATA + 0x10000, 1536, W),
            (STATUS + 16, 1, W),
        ];
        // Requests in flight together may run in any order (as on real disks), so the read
        // is only made available once the write has completed.
        assert_eq!(f.serve(&[write], false), vec![(VIRTIO_BLK_S_OK, 1)]);
        assert_eq!(f.serve(&[read], false), vec![(VIRTIO_BLK_S_OK, 1537)]);
        assert_eq!(f.disk_bytes(3 * 512, 1536), payload);
        let mut back = vec![0u8; 1536];
        f.mem
            .read_slice(&mut back, GuestAddress(DATA + 0x10000))
            .unwrap();
        assert_eq!(back, payload);
        assert!(f.interrupt.0.load(Ordering::SeqCst) >= 1);
    }
}

#[test]
fn counters_follow_completed_and_failed_requests() {
    for f in fixtures().into_iter().filter_map(Fixture::raw_only) {
        eprintln!("engine/cache: {}", f.name());
        f.header(HEADER, VIRTIO_BLK_T_OUT, 0);
        f.header(HEADER + 16, VIRTIO_BLK_T_IN, 4);
        f.header(HEADER + 32, VIRTIO_BLK_T_FLUSH, 0);
        f.header(HEADER + 48, VIRTIO_BLK_T_DISCARD, 0);
        range_segment(&f, DATA + 0x8000, 8, 4, 0);
        // Past the end of the disk: refused.
        f.header(HEADER + 64, VIRTIO_BLK_T_IN, DISK_SECTORS);
        let results = f.serve(
            &[
                vec![(HEADER, 16, R), (DATA, 1024, R), (STATUS, 1, W)],
                vec![
                    (HEADER + 16, 16, R),
                    (DATA + 0x1000, 512, W),
                    (STATUS + 16, 1, W),
                ],
                vec![(HEADER + 32, 16, R), (STATUS + 32, 1, W)],
                vec![
                    (HEADER + 48, 16, R),
                    (DATA + 0x8000, 16, R),
                    (STATUS + 48, 1, W),
                ],
                vec![
                    (HEADER + 64, 16, R),
                    (DATA + 0x2000, 512, W),
                    (STATUS + 64, 1, W),
                ],
            ],
            false,
        );
        assert_eq!(results[4].0, VIRTIO_BLK_S_IOERR, "{results:?}");
        assert_eq!(
            f.counters.report(),
            BlockCountersReport {
                read_ops: 1,
                read_bytes: 512,
                write_ops: 1,
                write_bytes: 1024,
                flush_ops: 1,
                discard_ops: 1,
                discard_bytes: 4 * 512,
                errors: 1,
                ..Default::default()
            }
        );
    }
}

#[test]
fn flush_succeeds_and_get_id_returns_the_first_20_serial_bytes() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        f.header(HEADER, VIRTIO_BLK_T_FLUSH, 0);
        f.header(HEADER + 16, VIRTIO_BLK_T_GET_ID, 0);
        let results = f.serve(
            &[
                vec![(HEADER, 16, R), (STATUS, 1, W)],
                vec![(HEADER + 16, 16, R), (DATA, 20, W), (STATUS + 16, 1, W)],
            ],
            false,
        );
        assert_eq!(results[0], (VIRTIO_BLK_S_OK, 1));
        assert_eq!(results[1], (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"stratus-disk-serial-");
    }
}

#[test]
fn write_to_a_read_only_disk_is_refused_and_leaves_the_file_alone() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let before = f.disk_bytes(0, 512);
        f.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
        f.header(HEADER, VIRTIO_BLK_T_OUT, 0);
        let results = f.serve(
            &[vec![(HEADER, 16, R), (DATA, 512, R), (STATUS, 1, W)]],
            true,
        );
        assert_eq!(results[0], (VIRTIO_BLK_S_IOERR, 1));
        assert_eq!(f.disk_bytes(0, 512), before);
    }
}

#[test]
fn malformed_requests_get_an_error_status_and_never_touch_the_disk() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let before = f.disk_bytes(0, (DISK_SECTORS * 512) as usize);
        let outside = MEM_SIZE as u64 + 0x1000;
        f.header(HEADER, VIRTIO_BLK_T_OUT, 0);
        f.header(HEADER + 16, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
        f.header(HEADER + 32, VIRTIO_BLK_T_OUT, 0);
        f.header(HEADER + 48, 0x77, 0);
        f.header(HEADER + 64, VIRTIO_BLK_T_IN, u64::MAX);
        let cases: Vec<(Chain, u8)> = vec![
            // Data outside guest memory.
            (
                vec![(HEADER, 16, R), (outside, 512, R), (STATUS, 1, W)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Read past the end of the disk.
            (
                vec![(HEADER + 16, 16, R), (DATA, 1024, W), (STATUS + 16, 1, W)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Length not a multiple of the sector size.
            (
                vec![(HEADER + 32, 16, R), (DATA, 100, R), (STATUS + 32, 1, W)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Unknown request type.
            (
                vec![(HEADER + 48, 16, R), (STATUS + 48, 1, W)],
                VIRTIO_BLK_S_UNSUPP,
            ),
            // Sector number that overflows.
            (
                vec![(HEADER + 64, 16, R), (DATA, 512, W), (STATUS + 64, 1, W)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Header the device would have to write, and a header too short to hold a request.
            (
                vec![(HEADER, 16, W), (STATUS + 80, 1, W)],
                VIRTIO_BLK_S_IOERR,
            ),
            (
                vec![(HEADER, 8, R), (STATUS + 96, 1, W)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Write request whose data buffer is device-writable (wrong direction).
            (
                vec![(HEADER, 16, R), (DATA, 512, W), (STATUS + 112, 1, W)],
                VIRTIO_BLK_S_IOERR,
            ),
            // The header and the data in one buffer: refused, not taken as a write of
            // nothing and answered OK.
            (
                vec![(HEADER, 16 + 512, R), (STATUS + 128, 1, W)],
                VIRTIO_BLK_S_IOERR,
            ),
        ];
        let chains: Vec<_> = cases.iter().map(|(c, _)| c.clone()).collect();
        let results = f.serve(&chains, false);
        for (i, ((status, used_len), (_, expected))) in results.iter().zip(&cases).enumerate() {
            assert_eq!(*status, *expected, "case {i}");
            assert_eq!(*used_len, 1, "case {i}: only the status byte is reported");
        }
        assert_eq!(f.disk_bytes(0, (DISK_SECTORS * 512) as usize), before);
    }
}

#[test]
fn chains_without_a_usable_status_descriptor_are_returned_unanswered() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        f.header(HEADER, VIRTIO_BLK_T_IN, 0);
        let results = f.serve(
            &[
                // Status descriptor the device cannot write.
                vec![(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, R)],
                // Only a header.
                vec![(HEADER, 16, R)],
                // Status outside guest memory.
                vec![(HEADER, 16, R), (MEM_SIZE as u64 + 16, 1, W)],
            ],
            false,
        );
        for (status, used_len) in results.iter().take(2) {
            assert_eq!(*used_len, 0);
            assert_eq!(*status, 0xaa, "status byte untouched");
        }
        assert_eq!(results[2].1, 0);
    }
}

#[test]
fn a_descriptor_loop_is_cut_off_without_hanging() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let mock = MockSplitQueue::create(&f.mem, GuestAddress(0), QUEUE_SIZE);
        f.header(HEADER, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 2 -> 1 -> 2 ... never ends.
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(
                HEADER,
                16,
                VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                DATA,
                512,
                (VRING_DESC_F_NEXT | W) as u16,
                2,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                DATA + 512,
                512,
                (VRING_DESC_F_NEXT | W) as u16,
                1,
            )),
        ];
        mock.add_desc_chains(&descs, 0).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let mut worker = f.worker(queue, false);
        assert_eq!(f.run(&mut worker), 1);
        assert_eq!(mock.used().idx().load(), 1);
        // No trustworthy status byte in a chain that never ends: nothing is reported.
        assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 0);
    }
}

#[test]
fn an_over_long_indirect_chain_is_refused_with_an_error_status() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let mock = MockSplitQueue::create(&f.mem, GuestAddress(0), QUEUE_SIZE);
        f.header(HEADER, VIRTIO_BLK_T_IN, 0);
        let table = 0x40_0000u64;
        let count = SEG_MAX as u16 + 40;
        for i in 0..count {
            let (addr, len, flags) = match i {
                0 => (HEADER, 16, 0),
                i if i == count - 1 => (STATUS, 1, W),
                i => (DATA + u64::from(i) * 512, 512, W),
            };
            let flags = if i == count - 1 {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, i + 1));
            f.mem
                .write_obj(d, GuestAddress(table + u64::from(i) * 16))
                .unwrap();
        }
        f.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
        let indirect = RawDescriptor::from(SplitDescriptor::new(
            table,
            u32::from(count) * 16,
            virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        mock.add_desc_chains(&[indirect], 0).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let mut worker = f.worker(queue, false);
        assert_eq!(f.run(&mut worker), 1);
        assert_eq!(
            f.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 1);
    }
}

fn range_segment(f: &Fixture, at: u64, sector: u64, num_sectors: u32, flags: u32) {
    f.mem.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
    f.mem
        .write_obj(num_sectors.to_le(), GuestAddress(at + 8))
        .unwrap();
    f.mem
        .write_obj(flags.to_le(), GuestAddress(at + 12))
        .unwrap();
}

#[test]
fn discard_punches_a_hole_and_write_zeroes_zeroes() {
    // qcow2 frees whole clusters only; it has its own test below.
    for f in fixtures().into_iter().filter_map(Fixture::raw_only) {
        eprintln!("engine/cache: {}", f.name());
        let blocks_before =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&f.image).unwrap());
        // Discard 16 KiB at 4 KiB, write zeroes (no unmap) over 1 KiB at 32 sectors.
        f.header(HEADER, VIRTIO_BLK_T_DISCARD, 0);
        range_segment(&f, DATA, 8, 32, 0);
        f.header(HEADER + 16, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range_segment(&f, DATA + 16, 48, 2, 0);
        let results = f.serve(
            &[
                vec![(HEADER, 16, R), (DATA, 16, R), (STATUS, 1, W)],
                vec![
                    (HEADER + 16, 16, R),
                    (DATA + 16, 16, R),
                    (STATUS + 16, 1, W),
                ],
            ],
            false,
        );
        assert_eq!(results, vec![(VIRTIO_BLK_S_OK, 1), (VIRTIO_BLK_S_OK, 1)]);
        assert!(f.disk_bytes(8 * 512, 32 * 512).iter().all(|&b| b == 0));
        assert!(f.disk_bytes(48 * 512, 2 * 512).iter().all(|&b| b == 0));
        // Data around the ranges is untouched.
        assert_eq!(
            f.disk_bytes(7 * 512, 512),
            (7 * 512..8 * 512)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            f.disk_bytes(50 * 512, 512),
            (50 * 512..51 * 512)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<_>>()
        );
        let blocks_after =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&f.image).unwrap());
        assert!(
            blocks_after + 32 <= blocks_before,
            "discard must free the 16 KiB: {blocks_before} -> {blocks_after} blocks"
        );
    }
}

#[test]
fn bad_discard_and_write_zeroes_requests_are_refused() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let before = f.disk_bytes(0, (DISK_SECTORS * 512) as usize);
        f.header(HEADER, VIRTIO_BLK_T_DISCARD, 0);
        range_segment(&f, DATA, 0, 8, 1); // discard has no flags
        range_segment(&f, DATA + 16, DISK_SECTORS - 4, 8, 0); // past the end
        range_segment(&f, DATA + 32, 0, 0, 0); // empty
        range_segment(&f, DATA + 48, 0, 8, 0);
        let results = f.serve(
            &[
                vec![(HEADER, 16, R), (DATA, 16, R), (STATUS, 1, W)],
                vec![(HEADER, 16, R), (DATA + 16, 16, R), (STATUS + 16, 1, W)],
                vec![(HEADER, 16, R), (DATA + 32, 16, R), (STATUS + 32, 1, W)],
                // Two ranges where one is allowed.
                vec![(HEADER, 16, R), (DATA + 32, 32, R), (STATUS + 48, 1, W)],
            ],
            false,
        );
        assert_eq!(
            results,
            vec![
                (VIRTIO_BLK_S_UNSUPP, 1),
                (VIRTIO_BLK_S_IOERR, 1),
                (VIRTIO_BLK_S_IOERR, 1),
                (VIRTIO_BLK_S_IOERR, 1)
            ]
        );
        // Write-zeroes knows one flag (unmap); another is refused, not ignored.
        f.header(HEADER + 16, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range_segment(&f, DATA + 64, 0, 8, 2);
        let unknown_flag = f.serve(
            &[vec![
                (HEADER + 16, 16, R),
                (DATA + 64, 16, R),
                (STATUS, 1, W),
            ]],
            false,
        );
        assert_eq!(unknown_flag, vec![(VIRTIO_BLK_S_UNSUPP, 1)]);
        // A read-only disk refuses discards altogether.
        let ro = f.serve(
            &[vec![(HEADER, 16, R), (DATA + 48, 16, R), (STATUS, 1, W)]],
            true,
        );
        assert_eq!(ro, vec![(VIRTIO_BLK_S_IOERR, 1)]);
        assert_eq!(f.disk_bytes(0, (DISK_SECTORS * 512) as usize), before);
    }
}

/// A disk path that names a FIFO (or a directory) is refused at once: opening a FIFO
/// waited for a writer on the thread that answers the control API.
#[test]
fn a_disk_that_is_neither_a_file_nor_a_block_device_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    for (path, read_only) in [(fifo.clone(), true), (dir.path().to_owned(), true)] {
        let (tx, rx) = std::sync::mpsc::channel();
        let opening = path.clone();
        std::thread::spawn(move || {
            let opened =
                DiskFile::open_format(&opening, ImageFormat::Raw, read_only, CacheMode::Writeback);
            let _ = tx.send(opened.err().map(|e| e.to_string()));
        });
        let error = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening the disk blocked")
            .expect("opened");
        assert!(
            error.contains("neither a regular file nor a block device"),
            "{}: {error}",
            path.display()
        );
    }
}

/// A last buffer longer than one byte holds data, then the status in its last byte (any
/// layout: Linux gives the status a buffer of its own, other drivers need not).
#[test]
fn a_read_s_data_may_share_the_status_byte_s_buffer() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        f.header(HEADER, VIRTIO_BLK_T_IN, 0);
        f.header(HEADER + 16, VIRTIO_BLK_T_IN, 2);
        let results = f.serve(
            &[
                vec![(HEADER, 16, R), (DATA, 1025, W)],
                vec![
                    (HEADER + 16, 16, R),
                    (DATA + 0x1000, 512, W),
                    (DATA + 0x2000, 513, W),
                ],
            ],
            false,
        );
        assert_eq!(
            results,
            vec![(VIRTIO_BLK_S_OK, 1025), (VIRTIO_BLK_S_OK, 1025)]
        );
        let expected = f.disk_bytes(0, 2048);
        let mut got = vec![0u8; 1024];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got == expected[..1024], "sectors 0-1 in the shared buffer");
        f.mem
            .read_slice(&mut got[..512], GuestAddress(DATA + 0x1000))
            .unwrap();
        f.mem
            .read_slice(&mut got[512..], GuestAddress(DATA + 0x2000))
            .unwrap();
        assert!(got == expected[1024..], "sectors 2-3 across two buffers");
    }
}

/// The parser holds ranges to what the disk offers (an iSCSI LUN's UNMAP and WRITE SAME
/// limits): a range the backend would refuse never reaches it.
#[test]
fn discard_and_write_zeroes_keep_to_what_the_disk_offers() {
    use stratus_vmm::devices::virtio::block::request::{
        parse, RangeRequests, RequestError, RequestKind, SectorRange,
    };
    use virtio_queue::QueueT;
    let f = fixtures().swap_remove(0);
    let parse_one = |request_type: u32, num_sectors: u32, ranges: RangeRequests| {
        f.header(HEADER, request_type, 0);
        range_segment(&f, DATA, 0, num_sectors, 0);
        let mock = MockSplitQueue::create(&f.mem, GuestAddress(0), QUEUE_SIZE);
        mock.add_desc_chains(
            &chain(&[(HEADER, 16, R), (DATA, 16, R), (STATUS, 1, W)], 0),
            0,
        )
        .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let head = queue.pop_descriptor_chain(&f.mem).unwrap();
        parse(head, &f.mem, DISK_SECTORS, false, ranges).map(|r| r.kind)
    };
    let limited = RangeRequests {
        discard: Some(8),
        write_zeroes: Some(16),
    };
    for (request_type, num_sectors) in [(VIRTIO_BLK_T_DISCARD, 8), (VIRTIO_BLK_T_WRITE_ZEROES, 16)]
    {
        let range = SectorRange {
            sector: 0,
            num_sectors,
            unmap: false,
        };
        let expected = match request_type {
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard(range),
            _ => RequestKind::WriteZeroes(range),
        };
        assert_eq!(parse_one(request_type, num_sectors, limited), Ok(expected));
        let Err((error, status)) = parse_one(request_type, num_sectors + 1, limited) else {
            panic!("type {request_type}: a range over the disk's limit was taken");
        };
        assert!(
            matches!(error, RequestError::BadRangeLength(n, max) if n == num_sectors + 1 && max == num_sectors),
            "{error}"
        );
        assert_eq!(status, Some(GuestAddress(STATUS)));
        assert_eq!(error.status(), VIRTIO_BLK_S_IOERR);
    }
    let none = RangeRequests {
        discard: None,
        write_zeroes: None,
    };
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let Err((error, _)) = parse_one(request_type, 8, none) else {
            panic!("type {request_type}: taken by a disk that does not offer it");
        };
        assert!(matches!(error, RequestError::NotOffered(_)), "{error}");
        assert_eq!(error.status(), VIRTIO_BLK_S_UNSUPP);
    }
}

#[test]
fn flush_completes_after_every_earlier_write() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let mock = MockSplitQueue::create(&f.mem, GuestAddress(0), QUEUE_SIZE);
        let writes = 12u16;
        let mut next = 0u16;
        for i in 0..writes {
            let header = HEADER + u64::from(i) * 16;
            f.header(header, VIRTIO_BLK_T_OUT, u64::from(i) * 4);
            let c = chain(
                &[
                    (header, 16, R),
                    (DATA + u64::from(i) * 2048, 2048, R),
                    (STATUS + u64::from(i) * 16, 1, W),
                ],
                next,
            );
            mock.add_desc_chains(&c, next).unwrap();
            next += 3;
        }
        let flush_header = HEADER + 0x1000;
        f.header(flush_header, VIRTIO_BLK_T_FLUSH, 0);
        let flush_head = next;
        mock.add_desc_chains(
            &chain(&[(flush_header, 16, R), (STATUS + 0x1000, 1, W)], next),
            next,
        )
        .unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let mut worker = f.worker(queue, false);
        assert_eq!(f.run(&mut worker), usize::from(writes) + 1);
        let used = mock.used();
        assert_eq!(used.idx().load(), writes + 1);
        let order: Vec<u32> = (0..usize::from(writes) + 1)
            .map(|i| used.ring().ref_at(i).unwrap().load().id())
            .collect();
        assert_eq!(
            *order.last().unwrap(),
            u32::from(flush_head),
            "flush completed before a write: {order:?}"
        );
    }
}

#[test]
fn random_workload_matches_a_shadow_disk() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let mut rng = Rng(0x5eed_0000_0000_0001 ^ f.name().len() as u64);
        let mut shadow = f.disk_bytes(0, (DISK_SECTORS * 512) as usize);
        for round in 0..30 {
            let mock = MockSplitQueue::create(&f.mem, GuestAddress(0), QUEUE_SIZE);
            // Requests in one batch never overlap, so any completion order is correct.
            let mut taken = vec![false; DISK_SECTORS as usize];
            let mut expected_reads = Vec::new();
            let mut next = 0u16;
            let mut count = 0;
            let mut issued = Vec::new();
            for i in 0..16u64 {
                let len = 1 + rng.below(8);
                let sector = rng.below(DISK_SECTORS - len + 1);
                if taken[sector as usize..(sector + len) as usize]
                    .iter()
                    .any(|t| *t)
                {
                    continue;
                }
                taken[sector as usize..(sector + len) as usize].fill(true);
                let header = HEADER + i * 16;
                let status = STATUS + i * 16;
                // Odd guest addresses force the bounce path under O_DIRECT.
                let buffer = DATA + i * 0x2000 + rng.below(2) * 3;
                let bytes = (len * 512) as usize;
                let range = sector as usize * 512..sector as usize * 512 + bytes;
                let descs = match rng.below(4) {
                    0 | 1 => {
                        let data: Vec<u8> = (0..bytes).map(|_| rng.next() as u8).collect();
                        f.mem.write_slice(&data, GuestAddress(buffer)).unwrap();
                        shadow[range].copy_from_slice(&data);
                        f.header(header, VIRTIO_BLK_T_OUT, sector);
                        // Split the data in two descriptors at a sector boundary.
                        let split = 512 * (1 + rng.below(len)) as u32;
                        let mut d = vec![(header, 16, R), (buffer, split, R)];
                        if split < bytes as u32 {
                            d.push((buffer + u64::from(split), bytes as u32 - split, R));
                        }
                        d.push((status, 1, W));
                        d
                    }
                    2 => {
                        f.header(header, VIRTIO_BLK_T_IN, sector);
                        expected_reads.push((buffer, shadow[range].to_vec()));
                        vec![(header, 16, R), (buffer, bytes as u32, W), (status, 1, W)]
                    }
                    _ => {
                        f.header(header, VIRTIO_BLK_T_WRITE_ZEROES, 0);
                        range_segment(&f, buffer, sector, len as u32, (rng.below(2)) as u32);
                        shadow[range].fill(0);
                        vec![(header, 16, R), (buffer, 16, R), (status, 1, W)]
                    }
                };
                f.mem.write_obj(0xaau8, GuestAddress(status)).unwrap();
                issued.push(status);
                mock.add_desc_chains(&chain(&descs, next), next).unwrap();
                next += descs.len() as u16;
                count += 1;
            }
            let queue: Queue = mock.create_queue().unwrap();
            let mut worker = f.worker(queue, false);
            assert_eq!(f.run(&mut worker), count, "round {round}");
            let used = mock.used();
            assert_eq!(used.idx().load() as usize, count, "round {round}");
            for status_addr in &issued {
                let status: u8 = f.mem.read_obj(GuestAddress(*status_addr)).unwrap();
                assert_eq!(
                    status, VIRTIO_BLK_S_OK,
                    "round {round}: request with status at {status_addr:#x}"
                );
            }
            for (buffer, want) in expected_reads {
                let mut got = vec![0u8; want.len()];
                f.mem.read_slice(&mut got, GuestAddress(buffer)).unwrap();
                assert_eq!(got, want, "round {round}: read at {buffer:#x}");
            }
        }
        assert_eq!(f.disk_bytes(0, shadow.len()), shadow, "final disk contents");
    }
}

#[test]
fn a_rate_limited_queue_holds_requests_back_until_tokens_return() {
    for f in fixtures() {
        eprintln!("engine/cache: {}", f.name());
        let mock = MockSplitQueue::create(&f.mem, GuestAddress(0), QUEUE_SIZE);
        let mut next = 0u16;
        for i in 0..3u64 {
            f.header(HEADER + i * 16, VIRTIO_BLK_T_IN, i);
            let c = chain(
                &[
                    (HEADER + i * 16, 16, R),
                    (DATA + i * 512, 512, W),
                    (STATUS + i * 16, 1, W),
                ],
                next,
            );
            mock.add_desc_chains(&c, next).unwrap();
            next += 3;
        }
        let queue: Queue = mock.create_queue().unwrap();
        // Two operations per second: the third request must wait for a refill.
        let limiter = RateLimiter::new(RateLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(2),
        });
        let mut worker = f.limited_worker(queue, false, Some(limiter));
        assert_eq!(worker.process_queue(), 2);
        worker.drain();
        assert!(worker.throttled());
        assert_eq!(
            mock.used().idx().load(),
            2,
            "the third request stays in the ring"
        );
        // A queue notification while throttled changes nothing.
        assert_eq!(mock.used().idx().load(), 2);
        timer::wait_until_fired(worker.throttle_timer());
        assert_eq!(
            worker.unthrottle(),
            1,
            "the timer lets the third request through"
        );
        worker.drain();
        assert_eq!(mock.used().idx().load(), 3);
        assert!(!worker.throttled());
    }
}
