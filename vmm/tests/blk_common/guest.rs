//! A guest driving one queue of a disk of any kind (file, iSCSI, RBD) through plain guest
//! memory: random batches of requests against a shadow copy of the disk, served by the
//! queue worker with the disk's own engine. Shared by the network-disk test files.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use stratus_vmm::devices::virtio::block::counters::BlockCounters;
use stratus_vmm::devices::virtio::block::io::{create_engine, DiskFile, IoEngine};
use stratus_vmm::devices::virtio::block::worker::{QueueWorker, QueueWorkerParts};
use stratus_vmm::devices::virtio::block::*;
use stratus_vmm::devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{chain, Rng};

pub const MEM_SIZE: usize = 16 << 20;
pub const HEADER: u64 = 0x10_0000;
/// 48 requests of up to 32 KiB each fit between DATA and STATUS.
pub const DATA: u64 = 0x20_0000;
pub const STATUS: u64 = 0x60_0000;
pub const R: u32 = 0;
pub const W: u32 = VRING_DESC_F_WRITE;

/// Descriptors of one chain: (address, length, flags).
pub type Chain = Vec<(u64, u32, u32)>;

#[derive(Default)]
pub struct CountingInterrupt(pub AtomicUsize);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub disk: Arc<DiskFile>,
}

/// One batch of non-overlapping requests and what they must produce.
pub struct Batch {
    pub chains: Vec<Chain>,
    pub statuses: Vec<u64>,
    /// (guest buffer, bytes a read must find there)
    pub reads: Vec<(u64, Vec<u8>)>,
}

impl Guest {
    pub fn new(config: &BlockConfig) -> Self {
        let disk = match DiskFile::open_config(config) {
            Ok(disk) => disk,
            Err(e) => panic!("cannot open {}: {e}", config.source_name().display()),
        };
        Guest {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            disk: Arc::new(disk),
        }
    }

    pub fn worker(&self, queue: Queue) -> QueueWorker {
        let engine = create_engine(IoEngine::Sync, &self.disk, u32::from(QUEUE_SIZE)).unwrap();
        QueueWorker::new(QueueWorkerParts {
            mem: self.mem.clone(),
            disk: self.disk.clone(),
            serial: Arc::from(&b"network-disk"[..]),
            queue,
            queue_index: 0,
            queue_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            interrupt: Arc::new(CountingInterrupt::default()),
            kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            engine,
            limiter: None,
            counters: Arc::new(BlockCounters::default()),
        })
        .unwrap()
    }

    pub fn header(&self, at: u64, request_type: u32, sector: u64) {
        self.mem
            .write_obj(request_type.to_le(), GuestAddress(at))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at + 8))
            .unwrap();
    }

    /// The 16-byte segment of a discard or write-zeroes request.
    pub fn range(&self, at: u64, sector: u64, num_sectors: u32, flags: u32) {
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_obj(num_sectors.to_le(), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
    }

    /// A random batch (writes split over two descriptors, reads, write-zeroes, and
    /// discards where `discard`) against `shadow`, which it updates.
    pub fn random_batch(&self, rng: &mut Rng, shadow: &mut [u8], discard: bool) -> Batch {
        let sectors = shadow.len() as u64 / 512;
        let mut taken = vec![false; sectors as usize];
        let mut batch = Batch {
            chains: Vec::new(),
            statuses: Vec::new(),
            reads: Vec::new(),
        };
        for i in 0..48u64 {
            let len = 1 + rng.below(64);
            let sector = rng.below(sectors - len + 1);
            let span = sector as usize..(sector + len) as usize;
            if taken[span.clone()].iter().any(|t| *t) {
                continue;
            }
            taken[span].fill(true);
            let (header, status, buffer) = (HEADER + i * 16, STATUS + i * 16, DATA + i * 0x8000);
            let bytes = (len * 512) as usize;
            let range = sector as usize * 512..sector as usize * 512 + bytes;
            let descs = match rng.below(if discard { 5 } else { 4 }) {
                0 | 1 => {
                    let data = rng.bytes(bytes);
                    self.mem.write_slice(&data, GuestAddress(buffer)).unwrap();
                    shadow[range].copy_from_slice(&data);
                    self.header(header, VIRTIO_BLK_T_OUT, sector);
                    let split = 512 * (1 + rng.below(len)) as u32;
                    let mut d = vec![(header, 16, R), (buffer, split, R)];
                    if split < bytes as u32 {
                        d.push((buffer + u64::from(split), bytes as u32 - split, R));
                    }
                    d.push((status, 1, W));
                    d
                }
                2 => {
                    self.header(header, VIRTIO_BLK_T_IN, sector);
                    batch.reads.push((buffer, shadow[range].to_vec()));
                    vec![(header, 16, R), (buffer, bytes as u32, W), (status, 1, W)]
                }
                3 => {
                    self.header(header, VIRTIO_BLK_T_WRITE_ZEROES, 0);
                    let unmap = if discard { rng.below(2) as u32 } else { 0 };
                    self.range(buffer, sector, len as u32, unmap);
                    shadow[range].fill(0);
                    vec![(header, 16, R), (buffer, 16, R), (status, 1, W)]
                }
                _ => {
                    // Every disk kind here zeroes what it discards.
                    self.header(header, VIRTIO_BLK_T_DISCARD, 0);
                    self.range(buffer, sector, len as u32, 0);
                    shadow[range].fill(0);
                    vec![(header, 16, R), (buffer, 16, R), (status, 1, W)]
                }
            };
            self.mem.write_obj(0xaau8, GuestAddress(status)).unwrap();
            batch.statuses.push(status);
            batch.chains.push(descs);
        }
        batch
    }

    /// Serves `chains` on a fresh queue (`before_drain` runs once they are all taken);
    /// returns the heads in the order they were answered and every status byte.
    pub fn serve(
        &self,
        chains: &[Chain],
        statuses: &[u64],
        before_drain: impl FnOnce(),
    ) -> (Vec<u32>, Vec<u8>) {
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        let mut next = 0u16;
        for c in chains {
            mock.add_desc_chains(&chain(c, next), next).unwrap();
            next += c.len() as u16;
        }
        // Made here, as a vCPU enabling the device makes it; served on a thread under the
        // queue worker's seccomp filter, as in the VMM: a call the engine makes that the
        // filter lacks kills this test process with SIGSYS.
        // `before_drain` is the test's own doing (it may stop the target with a script),
        // so it runs here while the worker waits.
        let mut worker = self.worker(mock.create_queue().unwrap());
        let (taken_tx, taken_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let worker = &mut worker;
            let served = scope.spawn(move || {
                super::confine_as_worker();
                taken_tx.send(worker.process_queue()).unwrap();
                let _ = go_rx.recv();
                worker.drain();
            });
            if let Ok(taken) = taken_rx.recv() {
                assert_eq!(taken, chains.len());
                before_drain();
            }
            drop(go_tx);
            served
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        });
        let used = mock.used();
        assert_eq!(
            used.idx().load() as usize,
            chains.len(),
            "every request answered"
        );
        let order = (0..chains.len())
            .map(|i| used.ring().ref_at(i).unwrap().load().id())
            .collect();
        let statuses = statuses
            .iter()
            .map(|s| self.mem.read_obj::<u8>(GuestAddress(*s)).unwrap())
            .collect();
        (order, statuses)
    }

    /// Serves a batch; returns its status bytes.
    pub fn serve_batch(&self, batch: &Batch, before_drain: impl FnOnce()) -> Vec<u8> {
        self.serve(&batch.chains, &batch.statuses, before_drain).1
    }

    pub fn check_reads(&self, batch: &Batch) {
        for (buffer, want) in &batch.reads {
            let mut got = vec![0u8; want.len()];
            self.mem
                .read_slice(&mut got, GuestAddress(*buffer))
                .unwrap();
            assert!(got == *want, "read at {buffer:#x} differs from the shadow");
        }
    }
}
