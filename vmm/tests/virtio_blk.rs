//! virtio-blk without KVM: requests built in a virtqueue in plain guest memory, served by
//! the device worker, checked against the disk file and the used ring.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use stratus_vmm::devices::virtio::block::event_handler::BlockWorker;
use stratus_vmm::devices::virtio::block::io::DiskImage;
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
    disk: tempfile::NamedTempFile,
    interrupt: Arc<CountingInterrupt>,
}

/// Chains `descs` (setting NEXT and indices) at table index `first`.
fn chain(descs: &[(u64, u32, u32)], first: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i == descs.len() - 1;
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
        })
        .collect()
}

impl Fixture {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let disk = tempfile::NamedTempFile::new().unwrap();
        let pattern: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
        disk.as_file().write_all_at(&pattern, 0).unwrap();
        Fixture {
            mem,
            disk,
            interrupt: Arc::new(CountingInterrupt::default()),
        }
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
        for c in chains {
            if let Some(status) = c.last() {
                // Statuses outside guest memory cannot be pre-set; the device must not write them.
                let _ = self.mem.write_obj(0xaau8, GuestAddress(status.0));
            }
        }
        let queue: Queue = mock.create_queue().unwrap();
        let mut worker = BlockWorker {
            mem: self.mem.clone(),
            disk: Arc::new(DiskImage::open(self.disk.path(), read_only).unwrap()),
            serial: b"stratus-disk-serial-0123".to_vec(),
            queues: vec![queue],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            interrupt: self.interrupt.clone(),
            kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let completed = worker.process_queue(0);
        assert_eq!(
            completed,
            chains.len(),
            "every chain is returned to the driver"
        );
        let used = mock.used();
        assert_eq!(used.idx().load(), chains.len() as u16);
        chains
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let elem = used.ring().ref_at(i).unwrap().load();
                let status = c
                    .last()
                    .and_then(|s| self.mem.read_obj::<u8>(GuestAddress(s.0)).ok())
                    .unwrap_or(0xaa);
                (status, elem.len())
            })
            .collect()
    }

    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.disk.as_file().read_exact_at(&mut buf, offset).unwrap();
        buf
    }
}

/// Descriptors of one chain: (address, length, flags).
type Chain = Vec<(u64, u32, u32)>;

const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;

#[test]
fn write_then_read_back_across_two_data_descriptors() {
    let f = Fixture::new();
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
    let results = f.serve(&[write, read], false);
    assert_eq!(results[0], (VIRTIO_BLK_S_OK, 1));
    assert_eq!(results[1], (VIRTIO_BLK_S_OK, 1537));
    assert_eq!(f.disk_bytes(3 * 512, 1536), payload);
    let mut back = vec![0u8; 1536];
    f.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x10000))
        .unwrap();
    assert_eq!(back, payload);
    assert!(f.interrupt.0.load(Ordering::SeqCst) >= 1);
}

#[test]
fn flush_succeeds_and_get_id_returns_the_first_20_serial_bytes() {
    let f = Fixture::new();
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

#[test]
fn write_to_a_read_only_disk_is_refused_and_leaves_the_file_alone() {
    let f = Fixture::new();
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

#[test]
fn malformed_requests_get_an_error_status_and_never_touch_the_disk() {
    let f = Fixture::new();
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
    ];
    let chains: Vec<_> = cases.iter().map(|(c, _)| c.clone()).collect();
    let results = f.serve(&chains, false);
    for (i, ((status, used_len), (_, expected))) in results.iter().zip(&cases).enumerate() {
        assert_eq!(*status, *expected, "case {i}");
        assert_eq!(*used_len, 1, "case {i}: only the status byte is reported");
    }
    assert_eq!(f.disk_bytes(0, (DISK_SECTORS * 512) as usize), before);
}

#[test]
fn chains_without_a_usable_status_descriptor_are_returned_unanswered() {
    let f = Fixture::new();
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

#[test]
fn a_descriptor_loop_is_cut_off_without_hanging() {
    let f = Fixture::new();
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
    let mut worker = BlockWorker {
        mem: f.mem.clone(),
        disk: Arc::new(DiskImage::open(f.disk.path(), false).unwrap()),
        serial: vec![],
        queues: vec![queue],
        queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        interrupt: f.interrupt.clone(),
        kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    assert_eq!(worker.process_queue(0), 1);
    assert_eq!(mock.used().idx().load(), 1);
    // No trustworthy status byte in a chain that never ends: nothing is reported.
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 0);
}

#[test]
fn an_over_long_indirect_chain_is_refused_with_an_error_status() {
    let f = Fixture::new();
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
    let mut worker = BlockWorker {
        mem: f.mem.clone(),
        disk: Arc::new(DiskImage::open(f.disk.path(), false).unwrap()),
        serial: vec![],
        queues: vec![queue],
        queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        interrupt: f.interrupt.clone(),
        kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    assert_eq!(worker.process_queue(0), 1);
    assert_eq!(
        f.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 1);
}
