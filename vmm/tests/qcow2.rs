//! qcow2 disks checked against QEMU's own tools: overlays we create and write must pass
//! `qemu-img check` and be identical (`qemu-img compare`) to a raw shadow of every write;
//! images, backing chains and compressed images made by qemu-img must read back exactly
//! as `qemu-img convert` sees them. Requests go through real virtqueues in guest memory,
//! served by the queue workers (two queues at once) with every engine and cache mode.

mod blk_common;

use std::path::Path;

use blk_common::{assert_qcow2_holds, chain, qemu_img_check, tool, Rng};
use std::sync::Arc;

use stratus_vmm::devices::virtio::block::io::qcow2::{
    create_overlay, flatten_to_raw, flatten_to_raw_while,
};
use stratus_vmm::devices::virtio::block::io::{
    create_engine, AsyncIo, CacheMode, Completion, DiskError, DiskFile, DiskOp, ImageFormat,
    IoEngine,
};
use stratus_vmm::devices::virtio::block::worker::{QueueWorker, QueueWorkerParts};
use stratus_vmm::devices::virtio::block::*;
use stratus_vmm::devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const MEM_SIZE: usize = 64 << 20;
/// Per queue: its rings at `QUEUE_BASE`, headers, statuses and data buffers after it.
const QUEUE_STRIDE: u64 = 24 * MIB;
const HEADERS: u64 = 0x1_0000;
const STATUSES: u64 = 0x2_0000;
const BUFFERS: u64 = 0x10_0000;
const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {}
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// O_DIRECT needs a real filesystem (tmpfs refuses it), so not /tmp.
fn workdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

enum Op {
    Read {
        sector: u64,
        len: u32,
    },
    Write {
        sector: u64,
        data: Vec<u8>,
    },
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
    Discard {
        sector: u64,
        sectors: u32,
    },
    Flush,
}

/// A guest driver for one queue: lays requests out in its slice of guest memory.
struct Batch {
    base: u64,
    descs: Vec<Vec<(u64, u32, u32)>>,
    reads: Vec<(u64, u64, u32)>,
    statuses: Vec<u64>,
    next_buffer: u64,
}

impl Batch {
    fn new(queue: u64) -> Self {
        Batch {
            base: queue * QUEUE_STRIDE,
            descs: Vec::new(),
            reads: Vec::new(),
            statuses: Vec::new(),
            next_buffer: 0,
        }
    }

    fn add(&mut self, mem: &GuestMemoryMmap, op: &Op, misaligned: bool) {
        let i = self.descs.len() as u64;
        let header = self.base + HEADERS + i * 16;
        let status = self.base + STATUSES + i * 16;
        let buffer = self.base + BUFFERS + self.next_buffer + u64::from(misaligned) * 3;
        let put_header = |kind: u32, sector: u64| {
            mem.write_obj(kind.to_le(), GuestAddress(header)).unwrap();
            mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
            mem.write_obj(sector.to_le(), GuestAddress(header + 8))
                .unwrap();
        };
        let put_range = |sector: u64, sectors: u32, flags: u32| {
            mem.write_obj(sector.to_le(), GuestAddress(buffer)).unwrap();
            mem.write_obj(sectors.to_le(), GuestAddress(buffer + 8))
                .unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(buffer + 12))
                .unwrap();
        };
        let (descs, used) = match *op {
            Op::Read { sector, len } => {
                put_header(VIRTIO_BLK_T_IN, sector);
                self.reads.push((buffer, sector, len));
                (vec![(header, 16, R), (buffer, len, W), (status, 1, W)], len)
            }
            Op::Write { sector, ref data } => {
                put_header(VIRTIO_BLK_T_OUT, sector);
                mem.write_slice(data, GuestAddress(buffer)).unwrap();
                let len = data.len() as u32;
                // Two data descriptors split at a sector boundary.
                let split = (len / 2) & !511;
                let mut d = vec![(header, 16, R)];
                if split > 0 {
                    d.push((buffer, split, R));
                }
                d.push((buffer + u64::from(split), len - split, R));
                d.push((status, 1, W));
                (d, len)
            }
            Op::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => {
                put_header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                put_range(sector, sectors, u32::from(unmap));
                (vec![(header, 16, R), (buffer, 16, R), (status, 1, W)], 16)
            }
            Op::Discard { sector, sectors } => {
                put_header(VIRTIO_BLK_T_DISCARD, 0);
                put_range(sector, sectors, 0);
                (vec![(header, 16, R), (buffer, 16, R), (status, 1, W)], 16)
            }
            Op::Flush => {
                put_header(VIRTIO_BLK_T_FLUSH, 0);
                (vec![(header, 16, R), (status, 1, W)], 0)
            }
        };
        mem.write_obj(0xaau8, GuestAddress(status)).unwrap();
        self.statuses.push(status);
        self.next_buffer += u64::from(used).next_multiple_of(4096) + 4096;
        self.descs.push(descs);
    }

    /// Puts the chains in a fresh queue at this batch's base.
    fn queue<'a>(&self, mem: &'a GuestMemoryMmap) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(self.base), QUEUE_SIZE);
        let mut first = 0u16;
        for d in &self.descs {
            mock.add_desc_chains(&chain(d, first), first).unwrap();
            first += d.len() as u16;
        }
        let queue = mock.create_queue().unwrap();
        (mock, queue)
    }
}

fn worker(
    mem: &GuestMemoryMmap,
    disk: &Arc<DiskFile>,
    engine: IoEngine,
    queue: Queue,
    index: u16,
) -> QueueWorker {
    QueueWorker::new(QueueWorkerParts {
        mem: mem.clone(),
        disk: disk.clone(),
        serial: Arc::from(&b"qcow2"[..]),
        queue,
        queue_index: index,
        queue_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        interrupt: Arc::new(NoInterrupt),
        kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        engine: create_engine(engine, disk, u32::from(QUEUE_SIZE)).unwrap(),
        limiter: None,
        counters: Default::default(),
    })
    .expect("worker")
}

/// Serves every batch on its own queue, all queues at once; checks every status is OK
/// and every used entry came back.
fn serve(mem: &GuestMemoryMmap, disk: &Arc<DiskFile>, engine: IoEngine, batches: &[Batch]) {
    std::thread::scope(|scope| {
        for (index, batch) in batches.iter().enumerate() {
            scope.spawn(move || {
                let (mock, queue) = batch.queue(mem);
                let mut worker = worker(mem, disk, engine, queue, index as u16);
                // Under the queue worker's seccomp filter, as in the VMM.
                blk_common::confine_as_worker();
                assert_eq!(worker.process_queue(), batch.descs.len());
                worker.drain();
                assert_eq!(usize::from(mock.used().idx().load()), batch.descs.len());
            });
        }
    });
    for batch in batches {
        for status in &batch.statuses {
            let got: u8 = mem.read_obj(GuestAddress(*status)).unwrap();
            assert_eq!(got, VIRTIO_BLK_S_OK, "request with status at {status:#x}");
        }
    }
}

/// Reads the whole disk through the device (one queue) in 1 MiB requests.
fn read_all(mem: &GuestMemoryMmap, disk: &Arc<DiskFile>, engine: IoEngine) -> Vec<u8> {
    let size = disk.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let mut batch = Batch::new(0);
        let first = at;
        while at < size && batch.descs.len() < 8 {
            let len = (size - at).min(MIB) as u32;
            batch.add(
                mem,
                &Op::Read {
                    sector: at >> 9,
                    len,
                },
                false,
            );
            at += u64::from(len);
        }
        serve(mem, disk, engine, std::slice::from_ref(&batch));
        let mut offset = first;
        for &(buffer, sector, len) in &batch.reads {
            assert_eq!(sector << 9, offset);
            let mut data = vec![0u8; len as usize];
            mem.read_slice(&mut data, GuestAddress(buffer)).unwrap();
            out.extend_from_slice(&data);
            offset += u64::from(len);
        }
    }
    out
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn combinations() -> Vec<(IoEngine, CacheMode)> {
    let mut all = Vec::new();
    for engine in [IoEngine::Sync, IoEngine::IoUring] {
        for cache in [CacheMode::Writeback, CacheMode::None] {
            all.push((engine, cache));
        }
    }
    all
}

#[test]
fn overlay_on_a_raw_base_matches_a_shadow_across_clusters_and_queues() {
    const DISK: u64 = 8 * MIB;
    for (engine, cache) in combinations() {
        eprintln!("engine/cache: {engine:?}/{cache:?}");
        let dir = workdir();
        let base = dir.path().join("base.raw");
        let overlay = dir.path().join("overlay.qcow2");
        let mut rng = Rng(0x9c0_2000 + engine as u64 * 2 + cache as u64);
        let mut shadow = rng.bytes(DISK as usize);
        std::fs::write(&base, &shadow).unwrap();
        create_overlay(&overlay, &base, ImageFormat::Raw).unwrap();
        let mem = memory();
        let disk =
            Arc::new(DiskFile::open_format(&overlay, ImageFormat::Qcow2, false, cache).unwrap());
        assert_eq!(disk.size(), DISK);
        let sectors = DISK >> 9;
        for round in 0..12 {
            // Requests of one round never overlap, so any completion order is right.
            let mut taken = vec![false; sectors as usize];
            let mut batches = [Batch::new(0), Batch::new(1)];
            // (guest buffer, what the read into it must return)
            let mut expected_reads = Vec::new();
            for i in 0..40 {
                let queue = i % 2;
                // Up to 256 KiB, so requests cross 64 KiB cluster boundaries.
                let len = 1 + rng.below(512);
                let sector = rng.below(sectors - len + 1);
                let range = sector as usize..(sector + len) as usize;
                if taken[range.clone()].iter().any(|t| *t) {
                    continue;
                }
                taken[range].fill(true);
                let bytes = (sector * 512) as usize..((sector + len) * 512) as usize;
                let op = match rng.below(10) {
                    0..=4 => {
                        let data = rng.bytes((len * 512) as usize);
                        shadow[bytes].copy_from_slice(&data);
                        Op::Write { sector, data }
                    }
                    5..=7 => Op::Read {
                        sector,
                        len: (len * 512) as u32,
                    },
                    8 => {
                        shadow[bytes].fill(0);
                        Op::WriteZeroes {
                            sector,
                            sectors: len as u32,
                            unmap: rng.below(2) == 1,
                        }
                    }
                    _ => Op::Flush,
                };
                let expected = match &op {
                    Op::Read { .. } => Some(
                        shadow[(sector * 512) as usize..((sector + len) * 512) as usize].to_vec(),
                    ),
                    _ => None,
                };
                batches[queue].add(&mem, &op, rng.below(4) == 0);
                if let Some(expected) = expected {
                    let &(buffer, _, _) = batches[queue].reads.last().unwrap();
                    expected_reads.push((buffer, expected));
                }
            }
            serve(&mem, &disk, engine, &batches);
            for (buffer, expected) in expected_reads {
                let mut got = vec![0u8; expected.len()];
                mem.read_slice(&mut got, GuestAddress(buffer)).unwrap();
                assert!(
                    got == expected,
                    "round {round}: read into {buffer:#x} differs"
                );
            }
        }
        // Closing the disk writes imago's cached metadata.
        drop(disk);
        assert_qcow2_holds(&overlay, &shadow, dir.path());
        // The base image is never written.
        let base_now = std::fs::read(&base).unwrap();
        assert!(base_now != shadow, "the test wrote nothing");
    }
}

/// Writes `pattern` bytes at each (offset, len) with qemu-io.
fn qemu_io_write(image: &Path, format: &str, writes: &[(u8, u64, u64)]) {
    for &(pattern, offset, len) in writes {
        tool(
            "qemu-io",
            &[
                "-f",
                format,
                "-c",
                &format!("write -P {pattern:#x} {offset} {len}"),
                p(image),
            ],
        );
    }
}

fn qemu_img_raw(image: &Path, format: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-view.raw");
    tool(
        "qemu-img",
        &["convert", "-f", format, "-O", "raw", p(image), p(&out)],
    );
    std::fs::read(out).unwrap()
}

#[test]
fn images_made_by_qemu_img_read_back_as_qemu_sees_them() {
    for (engine, cache) in combinations() {
        eprintln!("engine/cache: {engine:?}/{cache:?}");
        let dir = workdir();
        let d = dir.path();
        let mem = memory();
        let mut rng = Rng(0xba5e);
        // A three-level chain: raw base <- qcow2 middle <- qcow2 top, with writes at each
        // level, some straddling clusters, some zeroed.
        let base = d.join("base.raw");
        std::fs::write(&base, rng.bytes(4 * MIB as usize)).unwrap();
        let middle = d.join("middle.qcow2");
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                p(&middle),
            ],
        );
        qemu_io_write(
            &middle,
            "qcow2",
            &[(0x11, 60 * 1024, 10 * 1024), (0x22, MIB, 300 * 1024)],
        );
        let top = d.join("top.qcow2");
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-b",
                p(&middle),
                "-F",
                "qcow2",
                p(&top),
            ],
        );
        qemu_io_write(
            &top,
            "qcow2",
            &[(0x33, 1100 * 1024, 8192), (0x44, 3 * MIB - 512, 1024)],
        );
        tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -z 2M 64k", p(&top)],
        );
        let disk = Arc::new(DiskFile::open_format(&top, ImageFormat::Qcow2, true, cache).unwrap());
        assert_eq!(
            read_all(&mem, &disk, engine),
            qemu_img_raw(&top, "qcow2", d),
            "chain"
        );

        // A compressed image: every cluster is encoded, so imago decodes each one.
        let compressed = d.join("compressed.qcow2");
        tool(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                p(&top),
                p(&compressed),
            ],
        );
        let disk =
            Arc::new(DiskFile::open_format(&compressed, ImageFormat::Qcow2, false, cache).unwrap());
        let want = qemu_img_raw(&compressed, "qcow2", d);
        assert_eq!(read_all(&mem, &disk, engine), want, "compressed");

        // Writing into compressed clusters reallocates them; the rest stays as it was.
        let mut shadow = want;
        let data = rng.bytes(12 * 1024);
        let at = 70 * 1024;
        shadow[at..at + data.len()].copy_from_slice(&data);
        let mut batch = Batch::new(0);
        batch.add(
            &mem,
            &Op::Write {
                sector: (at >> 9) as u64,
                data,
            },
            false,
        );
        serve(&mem, &disk, engine, std::slice::from_ref(&batch));
        drop(disk);
        assert_qcow2_holds(&compressed, &shadow, d);
    }
}

/// Bytes the file takes on its filesystem.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn discard_zeroes_whole_clusters_gives_their_space_back_and_keeps_the_image_consistent() {
    for (engine, cache) in combinations() {
        eprintln!("engine/cache: {engine:?}/{cache:?}");
        let dir = workdir();
        let image = dir.path().join("disk.qcow2");
        tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p(&image), "4M"],
        );
        qemu_io_write(&image, "qcow2", &[(0x5a, 0, 4 * MIB)]);
        let mem = memory();
        let disk =
            Arc::new(DiskFile::open_format(&image, ImageFormat::Qcow2, false, cache).unwrap());
        let mut batch = Batch::new(0);
        // 1 MiB + 512 B at 1 MiB - 512: only the 16 whole 64 KiB clusters can go.
        batch.add(
            &mem,
            &Op::Discard {
                sector: 2047,
                sectors: 2049,
            },
            false,
        );
        batch.add(&mem, &Op::Flush, false);
        let before = allocated(&image);
        serve(&mem, &disk, engine, std::slice::from_ref(&batch));
        drop(disk);
        let after = allocated(&image);
        assert!(
            after + MIB <= before,
            "the discarded MiB is still allocated: {before} bytes before, {after} after"
        );
        qemu_img_check(&image);
        let map = tool(
            "qemu-img",
            &["map", "--output=json", "-f", "qcow2", p(&image)],
        );
        let map: serde_json::Value = serde_json::from_str(&map).unwrap();
        let data_at = |offset: u64| {
            map.as_array()
                .unwrap()
                .iter()
                .find(|e| {
                    let start = e["start"].as_u64().unwrap();
                    start <= offset && offset < start + e["length"].as_u64().unwrap()
                })
                .map(|e| e["data"].as_bool().unwrap())
                .unwrap()
        };
        assert!(
            data_at(MIB - 512),
            "the partial cluster before the range keeps its data"
        );
        assert!(!data_at(MIB), "a discarded cluster still holds data: {map}");
        assert!(
            !data_at(2 * MIB - 1),
            "a discarded cluster still holds data: {map}"
        );
        assert!(
            data_at(2 * MIB),
            "the cluster after the range keeps its data"
        );
        let raw = qemu_img_raw(&image, "qcow2", dir.path());
        assert!(raw[..MIB as usize].iter().all(|&b| b == 0x5a));
        assert!(raw[2 * MIB as usize..].iter().all(|&b| b == 0x5a));
    }
}

/// One queue discards a cluster while another queue's write to it is still in flight (the
/// guest writes where it discards); then other writes need new clusters and a new L2 table.
/// Had the discarded cluster's host cluster been freed — by the discard itself, or by a
/// later write moving the zero cluster to a new host cluster as part of a longer allocation
/// — imago would put the table there and the late write would land on it.
#[test]
fn a_write_still_in_flight_to_a_discarded_cluster_cannot_land_in_the_image_s_metadata() {
    if !stratus_vmm::devices::virtio::block::io::io_uring_supported() {
        eprintln!("skipped: this kernel has no io_uring, whose queued writes the race needs");
        return;
    }
    // 4 KiB clusters: an L2 table maps 2 MiB, so a write at 8 MiB needs a new one.
    const DISK: u64 = 16 * MIB;
    const CLUSTER: usize = 4096;
    // Page-aligned buffers, for O_DIRECT.
    let buffer = |byte: u8, len: usize| {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size; the allocation is filled before use and
        // leaked (a test's few KiB).
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `ptr` points to `len` writable bytes just allocated.
        let slice = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        slice.fill(byte);
        libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        }
    };
    let stale = [buffer(0xee, CLUSTER)];
    let pair = [buffer(0x66, 2 * CLUSTER)];
    let far = [buffer(0x77, CLUSTER)];
    let half = (DISK / 2) as usize;
    // The discarded cluster, and whether a write over it and the cluster before it follows.
    for (discarded, write_across) in [(0, false), (CLUSTER, true)] {
        for cache in [CacheMode::Writeback, CacheMode::None] {
            eprintln!("discarded cluster at {discarded}, cache {cache:?}");
            let dir = workdir();
            let image = dir.path().join("disk.qcow2");
            tool(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=4096",
                    p(&image),
                    "16M",
                ],
            );
            qemu_io_write(&image, "qcow2", &[(0x5a, discarded as u64, CLUSTER as u64)]);
            let disk =
                Arc::new(DiskFile::open_format(&image, ImageFormat::Qcow2, false, cache).unwrap());
            let mut late = create_engine(IoEngine::IoUring, &disk, 8).unwrap();
            let mut other = create_engine(IoEngine::IoUring, &disk, 8).unwrap();
            // Queued, not yet submitted: the write is in flight to the cluster's host offset.
            let offset = discarded as u64;
            late.queue(
                DiskOp::Write {
                    offset,
                    iovecs: &stale,
                },
                1,
            )
            .unwrap();
            let mut ops = vec![DiskOp::Discard {
                offset,
                len: CLUSTER as u64,
            }];
            if write_across {
                ops.push(DiskOp::Write {
                    offset: 0,
                    iovecs: &pair,
                });
            }
            ops.push(DiskOp::Write {
                offset: DISK / 2,
                iovecs: &far,
            });
            ops.push(DiskOp::Flush);
            for (user_data, op) in ops.into_iter().enumerate() {
                other.queue(op, user_data as u64).unwrap();
                other.submit().unwrap();
                let completion = wait_completion(other.as_mut());
                assert!(
                    completion.result >= 0,
                    "request {user_data}: {completion:?}"
                );
            }
            late.submit().unwrap();
            assert_eq!(wait_completion(late.as_mut()).result, CLUSTER as i64);
            drop((late, other, disk));
            // Whatever the discarded cluster holds now (the guest raced itself there), the
            // image must be sound and every other write where it was put.
            qemu_img_check(&image);
            let raw = qemu_img_raw(&image, "qcow2", dir.path());
            assert!(raw[half..half + CLUSTER].iter().all(|&b| b == 0x77));
            let mut expected = vec![0u8; raw.len()];
            if write_across {
                expected[..2 * CLUSTER].fill(0x66);
            }
            expected[half..half + CLUSTER].fill(0x77);
            // The raced cluster is the guest's to lose.
            expected[discarded..discarded + CLUSTER]
                .copy_from_slice(&raw[discarded..discarded + CLUSTER]);
            assert!(raw == expected, "data outside the raced cluster changed");
        }
    }
}

fn wait_completion(engine: &mut dyn AsyncIo) -> Completion {
    loop {
        if let Some(c) = engine.next_completion() {
            return c;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn creating_an_overlay_does_not_depend_on_the_base_size() {
    let dir = workdir();
    let d = dir.path();
    // A sparse 1 TiB base: copying or scanning it would be obvious.
    let base = d.join("huge.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let overlay = d.join("vm.qcow2");
    create_overlay(&overlay, Path::new("huge.raw"), ImageFormat::Raw).unwrap();
    assert!(
        std::fs::metadata(&overlay).unwrap().len() < MIB,
        "an overlay holds headers and empty tables only"
    );
    let info: serde_json::Value = serde_json::from_str(&tool(
        "qemu-img",
        &["info", "--output=json", "-f", "qcow2", p(&overlay)],
    ))
    .unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(1 << 40));
    assert_eq!(info["backing-filename"].as_str(), Some("huge.raw"));
    assert_eq!(info["backing-filename-format"].as_str(), Some("raw"));
    qemu_img_check(&overlay);
    let disk =
        DiskFile::open_format(&overlay, ImageFormat::Qcow2, true, CacheMode::Writeback).unwrap();
    assert_eq!(disk.size(), 1 << 40);

    // An overlay on an overlay.
    let second = d.join("second.qcow2");
    create_overlay(&second, &overlay, ImageFormat::Qcow2).unwrap();
    let info = tool("qemu-img", &["info", "--backing-chain", p(&second)]);
    assert!(info.contains("huge.raw"), "{info}");
}

#[test]
fn bad_overlay_requests_fail_clearly_and_leave_nothing_behind() {
    let dir = workdir();
    let d = dir.path();
    let missing = create_overlay(&d.join("a.qcow2"), &d.join("nope.raw"), ImageFormat::Raw);
    assert!(
        matches!(&missing, Err(DiskError::Qcow2Create { reason, .. }) if reason.contains("nope.raw")),
        "{missing:?}"
    );
    assert!(!d.join("a.qcow2").exists());

    let base = d.join("base.raw");
    std::fs::write(&base, vec![1u8; 65536]).unwrap();
    let existing = d.join("taken.qcow2");
    std::fs::write(&existing, b"precious").unwrap();
    let refused = create_overlay(&existing, &base, ImageFormat::Raw);
    assert!(
        matches!(refused, Err(DiskError::Qcow2Create { .. })),
        "{refused:?}"
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"precious");

    // A raw file opened as qcow2 is refused, not misread.
    let wrong = DiskFile::open_format(&base, ImageFormat::Qcow2, true, CacheMode::Writeback);
    assert!(
        matches!(wrong, Err(DiskError::Qcow2Open { .. })),
        "{:?}",
        wrong.err()
    );
    // A qcow2 file opened as raw shows its header bytes, like any raw disk would.
    let q = d.join("q.qcow2");
    create_overlay(&q, &base, ImageFormat::Raw).unwrap();
    let raw_view = DiskFile::open(&q, true, CacheMode::Writeback).unwrap();
    assert_eq!(raw_view.format(), ImageFormat::Raw);
}

/// A rebase's copy: the overlay's view, backing data included, lands in a sparse raw
/// file; an overlay whose header names any file but the expected backing one is refused
/// before anything is read or made.
#[test]
fn flattening_copies_the_chain_sparsely_and_opens_only_the_expected_backing_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = workdir();
    let d = dir.path();
    let base = d.join("origin.img");
    let mut rng = Rng(0xf1a7);
    let mut base_data = vec![0u8; 8 * MIB as usize];
    base_data[..64 * 1024].copy_from_slice(&rng.bytes(64 * 1024));
    base_data[4 * MIB as usize..4 * MIB as usize + 4096].copy_from_slice(&rng.bytes(4096));
    std::fs::write(&base, &base_data).unwrap();
    let live = d.join("live.qcow2");
    create_overlay(&live, Path::new("origin.img"), ImageFormat::Raw).unwrap();
    qemu_io_write(
        &live,
        "qcow2",
        &[(0x5a, MIB, 128 * 1024), (0x33, 60 * 1024, 8192)],
    );

    let flat = d.join("rebased.img");
    let size = flatten_to_raw(
        &live,
        ImageFormat::Qcow2,
        std::slice::from_ref(&base),
        &flat,
    )
    .unwrap();
    assert_eq!(size, 8 * MIB);
    let copied = std::fs::read(&flat).unwrap();
    assert!(
        copied == qemu_img_raw(&live, "qcow2", d),
        "the copy reads as the overlay"
    );
    assert!(
        copied != base_data,
        "the overlay's own writes are in the copy"
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_data,
        "the origin is untouched"
    );
    let allocated = std::fs::metadata(&flat).unwrap().blocks() * 512;
    assert!(
        allocated < MIB,
        "zeroes stay holes: {allocated} bytes allocated for ~200 KiB of data"
    );
    // Done again (a crash in the middle): the same copy, not an append.
    flatten_to_raw(
        &live,
        ImageFormat::Qcow2,
        std::slice::from_ref(&base),
        &flat,
    )
    .unwrap();
    assert!(std::fs::read(&flat).unwrap() == copied);
    // A raw source copies as it is.
    let plain = d.join("plain.img");
    flatten_to_raw(&base, ImageFormat::Raw, &[], &plain).unwrap();
    assert_eq!(std::fs::read(&plain).unwrap(), base_data);
    // A copy that loses the right to write its destination (its hold on the volume
    // lapsed) writes no further chunk: here the first of its two went, the second not.
    let cut = d.join("cut.img");
    let asked = std::cell::Cell::new(0);
    let refused = flatten_to_raw_while(&base, ImageFormat::Raw, &[], &cut, &|| {
        asked.set(asked.get() + 1);
        asked.get() <= 2
    });
    match refused {
        Err(DiskError::Flatten { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::Interrupted, "{source}")
        }
        other => panic!("the copy went on: {other:?}"),
    }
    assert_eq!(
        asked.get(),
        3,
        "before opening, before each of the two chunks"
    );
    let written = std::fs::read(&cut).unwrap();
    assert_eq!(
        written,
        base_data[..64 * 1024],
        "the first chunk and nothing more"
    );
    // Told no from the start, it does not even open (and truncate) the destination.
    let stopped = flatten_to_raw_while(&base, ImageFormat::Raw, &[], &cut, &|| false);
    assert!(stopped.is_err());
    assert_eq!(std::fs::read(&cut).unwrap(), written);

    // Headers naming another file: a host secret, a FIFO that would block an open.
    let secret = d.join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    let fifo = d.join("fifo");
    tool("mkfifo", &[p(&fifo)]);
    for (name, named) in [("to-secret.qcow2", &secret), ("to-fifo.qcow2", &fifo)] {
        let evil = d.join(name);
        if named == &fifo {
            // create_overlay reads the backing file's size: write the header by hand.
            tool(
                "qemu-img",
                &[
                    "create",
                    "-f",
                    "qcow2",
                    "-u",
                    "-b",
                    p(named),
                    "-F",
                    "raw",
                    p(&evil),
                    "8M",
                ],
            );
        } else {
            create_overlay(&evil, named, ImageFormat::Raw).unwrap();
        }
        let dest = d.join(format!("{name}.img"));
        let refused = flatten_to_raw(
            &evil,
            ImageFormat::Qcow2,
            std::slice::from_ref(&base),
            &dest,
        );
        assert!(
            matches!(&refused, Err(DiskError::Flatten { source, .. })
                if source.to_string().contains("not the one expected")),
            "{name}: {refused:?}"
        );
        assert!(!dest.exists(), "{name}: nothing made");
    }
}

/// A sparse raw volume (a pdisk LUN file) copies by its data: what was written lands at
/// the same offsets, unaligned and at the odd-sized end included, and the holes between
/// stay holes, however large the volume.
#[test]
fn a_sparse_raw_file_is_copied_by_its_data_alone() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    const GIB: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let (source, copy) = (dir.path().join("volume.img"), dir.path().join("copy.img"));
    let size = 16 * GIB + 1000;
    let file = std::fs::File::create(&source).unwrap();
    file.set_len(size).unwrap();
    let writes: [(u64, &[u8]); 4] = [
        (0, b"first sector"),
        (5 * GIB + 123, b"unaligned, in the middle"),
        (9 * GIB - 2, b"across a GiB"),
        (size - 7, b"the end"),
    ];
    for (at, bytes) in writes {
        file.write_all_at(bytes, at).unwrap();
    }
    drop(file);
    assert_eq!(
        flatten_to_raw(&source, ImageFormat::Raw, &[], &copy).unwrap(),
        size
    );
    let copied = std::fs::File::open(&copy).unwrap();
    assert_eq!(copied.metadata().unwrap().len(), size);
    for (at, bytes) in writes {
        let mut found = vec![0; bytes.len() + 64];
        let start = at.saturating_sub(32);
        let n = copied.read_at(&mut found, start).unwrap();
        let mut expected = vec![0; n];
        expected[(at - start) as usize..][..bytes.len()].copy_from_slice(bytes);
        assert_eq!(&found[..n], &expected[..], "at {at}");
    }
    let allocated = copied.metadata().unwrap().blocks() * 512;
    assert!(allocated <= 64 * 1024, "{allocated} bytes allocated");
}

#[test]
fn after_a_flush_the_image_is_complete_even_if_the_vmm_dies() {
    for (engine, cache) in combinations() {
        eprintln!("engine/cache: {engine:?}/{cache:?}");
        let dir = workdir();
        let d = dir.path();
        let base = d.join("base.raw");
        let mut rng = Rng(0xf1a5);
        let mut shadow = rng.bytes(2 * MIB as usize);
        std::fs::write(&base, &shadow).unwrap();
        let overlay = d.join("overlay.qcow2");
        create_overlay(&overlay, &base, ImageFormat::Raw).unwrap();
        let mem = memory();
        let disk =
            Arc::new(DiskFile::open_format(&overlay, ImageFormat::Qcow2, false, cache).unwrap());
        let mut batch = Batch::new(0);
        for i in 0..6u64 {
            let at = i * 300 * 1024;
            let data = rng.bytes(20 * 1024);
            shadow[at as usize..at as usize + data.len()].copy_from_slice(&data);
            batch.add(
                &mem,
                &Op::Write {
                    sector: at >> 9,
                    data,
                },
                false,
            );
        }
        serve(&mem, &disk, engine, std::slice::from_ref(&batch));
        let mut flush = Batch::new(0);
        flush.add(&mem, &Op::Flush, false);
        serve(&mem, &disk, engine, std::slice::from_ref(&flush));
        // Like a killed process: the image is never closed, so only the flush wrote the
        // allocation metadata.
        std::mem::forget(disk);
        assert_qcow2_holds(&overlay, &shadow, d);
    }
}

#[test]
fn ranges_at_the_end_of_an_odd_sized_image_are_served_and_checked() {
    // 1 MiB + 7 sectors: the last 64 KiB cluster is partial. (Images smaller than one
    // cluster are covered by the virtio_blk fixtures.)
    const DISK: u64 = MIB + 7 * 512;
    let sectors = DISK >> 9;
    for (engine, cache) in combinations() {
        eprintln!("engine/cache: {engine:?}/{cache:?}");
        let dir = workdir();
        let d = dir.path();
        let mut rng = Rng(0x0dd + engine as u64 * 2 + cache as u64);
        let mut shadow = rng.bytes(DISK as usize);
        let base = d.join("base.raw");
        std::fs::write(&base, &shadow).unwrap();
        let overlay = d.join("overlay.qcow2");
        create_overlay(&overlay, &base, ImageFormat::Raw).unwrap();
        let mem = memory();
        let disk =
            Arc::new(DiskFile::open_format(&overlay, ImageFormat::Qcow2, false, cache).unwrap());
        assert_eq!(disk.size(), DISK);
        for _ in 0..30 {
            // One request per batch: they overlap freely, so order must be kept.
            let len = 1 + rng.below(300);
            let start = sectors - 1 - rng.below(400);
            let len = len.min(sectors - start);
            let bytes = (start * 512) as usize..((start + len) * 512) as usize;
            let op = match rng.below(4) {
                0 => {
                    let data = rng.bytes(bytes.len());
                    shadow[bytes].copy_from_slice(&data);
                    Op::Write {
                        sector: start,
                        data,
                    }
                }
                1 => {
                    shadow[bytes].fill(0);
                    Op::WriteZeroes {
                        sector: start,
                        sectors: len as u32,
                        unmap: rng.below(2) == 1,
                    }
                }
                _ => Op::Read {
                    sector: start,
                    len: (len * 512) as u32,
                },
            };
            let mut batch = Batch::new(0);
            batch.add(&mem, &op, rng.below(3) == 0);
            serve(&mem, &disk, engine, std::slice::from_ref(&batch));
            if let Some(&(buffer, sector, len)) = batch.reads.first() {
                let mut got = vec![0u8; len as usize];
                mem.read_slice(&mut got, GuestAddress(buffer)).unwrap();
                let at = (sector * 512) as usize;
                assert!(
                    got == shadow[at..at + len as usize],
                    "read at sector {sector}"
                );
            }
        }
        // A discard over the tail: the data there may change, the image must stay sound.
        let mut batch = Batch::new(0);
        batch.add(
            &mem,
            &Op::Discard {
                sector: sectors - 300,
                sectors: 300,
            },
            false,
        );
        serve(&mem, &disk, engine, std::slice::from_ref(&batch));
        drop(disk);
        qemu_img_check(&overlay);
        let view = qemu_img_raw(&overlay, "qcow2", d);
        let kept = ((sectors - 300) * 512) as usize / 65536 * 65536;
        assert!(
            view[..kept] == shadow[..kept],
            "data before the discarded tail"
        );
    }
}
