//! virtio-blk on Ceph RBD images, against a real throw-away cluster (one monitor, one
//! memstore OSD on loopback: scripts/ceph-cluster.sh): requests built in a virtqueue in
//! plain guest memory, served by the queue worker through librbd, checked against what
//! `rbd export` reads back — our code never judges its own writes. Snapshots are read-only
//! and keep their data; a client id with its own keyring works; a wrong pool, image or
//! keyring is refused with the reason. One cluster serves the whole file (it takes a few
//! seconds to start), so the checks run in one test, in order.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

mod blk_common;

use blk_common::{chain, Rng};
use stratus_vmm::devices::virtio::block::counters::BlockCounters;
use stratus_vmm::devices::virtio::block::io::rbd::RbdSource;
use stratus_vmm::devices::virtio::block::io::{create_engine, DiskFile, IoEngine};
use stratus_vmm::devices::virtio::block::worker::{QueueWorker, QueueWorkerParts};
use stratus_vmm::devices::virtio::block::*;
use stratus_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 16 << 20;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x60_0000;
const IMAGE_MIB: u64 = 8;
const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;

struct Cluster {
    dir: tempfile::TempDir,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh")
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let out = Command::new("bash")
            .arg(script())
            .args(["start", dir.path().to_str().unwrap()])
            .output()
            .expect("run scripts/ceph-cluster.sh");
        assert!(
            out.status.success(),
            "ceph-cluster.sh start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster { dir }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    fn rbd(&self, args: &[&str]) -> String {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The image's bytes as `rbd export` reads them.
    fn export(&self, image: &str) -> Vec<u8> {
        let out = self.dir.path().join("export.raw");
        let _ = std::fs::remove_file(&out);
        self.rbd(&["export", image, out.to_str().unwrap()]);
        std::fs::read(out).unwrap()
    }

    fn source(&self, image: &str) -> RbdSource {
        RbdSource {
            image: image.into(),
            conf: Some(self.conf()),
            id: None,
            keyring: None,
            timeout_secs: 30,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", self.dir.path().to_str().unwrap()])
            .status();
    }
}

fn config(source: RbdSource) -> BlockConfig {
    let mut config = BlockConfig::new("");
    config.rbd = Some(source);
    config
}

#[derive(Default)]
struct CountingInterrupt(AtomicUsize);

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    disk: Arc<DiskFile>,
}

impl Guest {
    fn new(config: &BlockConfig) -> Self {
        Guest {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            disk: Arc::new(DiskFile::open_config(config).unwrap()),
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

    fn range(&self, at: u64, sector: u64, num_sectors: u32, flags: u32) {
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

    /// Serves the chains on a fresh queue; returns the used ring's head order and every
    /// request's status byte.
    fn serve(&self, chains: &[Vec<(u64, u32, u32)>], statuses: &[u64]) -> (Vec<u32>, Vec<u8>) {
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        let mut next = 0u16;
        for c in chains {
            mock.add_desc_chains(&chain(c, next), next).unwrap();
            next += c.len() as u16;
        }
        let engine = create_engine(IoEngine::Sync, &self.disk, u32::from(QUEUE_SIZE)).unwrap();
        let mut worker = QueueWorker::new(QueueWorkerParts {
            mem: self.mem.clone(),
            disk: self.disk.clone(),
            serial: Arc::from(&b"rbd"[..]),
            queue: mock.create_queue().unwrap(),
            queue_index: 0,
            queue_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            interrupt: Arc::new(CountingInterrupt::default()),
            kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            engine,
            limiter: None,
            counters: Arc::new(BlockCounters::default()),
        })
        .unwrap();
        assert_eq!(worker.process_queue(), chains.len());
        worker.drain();
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
}

/// A random batch of non-overlapping writes, reads, write-zeroes and discards against the
/// shadow; returns the chains, their status addresses and the reads' expected bytes.
#[allow(clippy::type_complexity)]
fn random_batch(
    g: &Guest,
    rng: &mut Rng,
    shadow: &mut [u8],
) -> (Vec<Vec<(u64, u32, u32)>>, Vec<u64>, Vec<(u64, Vec<u8>)>) {
    let sectors = shadow.len() as u64 / 512;
    let mut taken = vec![false; sectors as usize];
    let (mut chains, mut statuses, mut reads) = (Vec::new(), Vec::new(), Vec::new());
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
        let descs = match rng.below(5) {
            0 | 1 => {
                let data = rng.bytes(bytes);
                g.mem.write_slice(&data, GuestAddress(buffer)).unwrap();
                shadow[range].copy_from_slice(&data);
                g.header(header, VIRTIO_BLK_T_OUT, sector);
                vec![(header, 16, R), (buffer, bytes as u32, R), (status, 1, W)]
            }
            2 => {
                g.header(header, VIRTIO_BLK_T_IN, sector);
                reads.push((buffer, shadow[range].to_vec()));
                vec![(header, 16, R), (buffer, bytes as u32, W), (status, 1, W)]
            }
            kind => {
                let request = if kind == 3 {
                    VIRTIO_BLK_T_WRITE_ZEROES
                } else {
                    VIRTIO_BLK_T_DISCARD
                };
                g.header(header, request, 0);
                g.range(buffer, sector, len as u32, 0);
                shadow[range].fill(0);
                vec![(header, 16, R), (buffer, 16, R), (status, 1, W)]
            }
        };
        g.mem.write_obj(0xaau8, GuestAddress(status)).unwrap();
        chains.push(descs);
        statuses.push(status);
    }
    (chains, statuses, reads)
}

fn check_reads(g: &Guest, reads: &[(u64, Vec<u8>)]) {
    for (buffer, want) in reads {
        let mut got = vec![0u8; want.len()];
        g.mem.read_slice(&mut got, GuestAddress(*buffer)).unwrap();
        assert!(got == *want, "read at {buffer:#x} differs from the shadow");
    }
}

fn open_error(config: &BlockConfig) -> String {
    match DiskFile::open_config(config) {
        Ok(_) => panic!("{:?} opened", config.rbd),
        Err(e) => e.to_string(),
    }
}

#[test]
fn rbd_images_serve_the_guest_and_rbd_export_reads_back_its_writes() {
    let cluster = Cluster::start();
    let size = IMAGE_MIB.to_string();
    cluster.rbd(&["create", "rbd/disk1", "--size", &size]);

    // A random workload against a shadow, checked by rbd export after the disk closes.
    let mut shadow = vec![0u8; (IMAGE_MIB << 20) as usize];
    let mut rng = Rng(0x0c3f_0001);
    {
        let g = Guest::new(&config(cluster.source("rbd/disk1")));
        assert_eq!(g.disk.size(), IMAGE_MIB << 20);
        assert!(!g.disk.read_only());
        for round in 0..10 {
            let (chains, statuses, reads) = random_batch(&g, &mut rng, &mut shadow);
            let (_, got) = g.serve(&chains, &statuses);
            assert!(
                got.iter().all(|s| *s == VIRTIO_BLK_S_OK),
                "round {round}: {got:?}"
            );
            check_reads(&g, &reads);
        }
        // A flush is answered after every write queued before it.
        let mut chains = Vec::new();
        let mut statuses = Vec::new();
        for i in 0..16u64 {
            g.header(HEADER + i * 16, VIRTIO_BLK_T_OUT, i * 64);
            let data = rng.bytes(32768);
            g.mem
                .write_slice(&data, GuestAddress(DATA + i * 0x8000))
                .unwrap();
            let at = (i * 64 * 512) as usize;
            shadow[at..at + 32768].copy_from_slice(&data);
            chains.push(vec![
                (HEADER + i * 16, 16, R),
                (DATA + i * 0x8000, 32768, R),
                (STATUS + i * 16, 1, W),
            ]);
            statuses.push(STATUS + i * 16);
        }
        g.header(HEADER + 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        chains.push(vec![(HEADER + 0x1000, 16, R), (STATUS + 0x1000, 1, W)]);
        statuses.push(STATUS + 0x1000);
        let (order, got) = g.serve(&chains, &statuses);
        assert!(got.iter().all(|s| *s == VIRTIO_BLK_S_OK), "{got:?}");
        assert_eq!(
            *order.last().unwrap(),
            16 * 3,
            "flush answered early: {order:?}"
        );
    }
    assert!(
        cluster.export("rbd/disk1") == shadow,
        "rbd export differs from the shadow"
    );

    // A snapshot opens read-only whatever the configuration says, refuses writes, and
    // keeps its data while the image moves on.
    cluster.rbd(&["snap", "create", "rbd/disk1@s1"]);
    let at_snapshot = shadow.clone();
    {
        let g = Guest::new(&config(cluster.source("rbd/disk1")));
        let (chains, statuses, _) = random_batch(&g, &mut rng, &mut shadow);
        let (_, got) = g.serve(&chains, &statuses);
        assert!(got.iter().all(|s| *s == VIRTIO_BLK_S_OK), "{got:?}");
    }
    let snap = config(cluster.source("rbd/disk1@s1"));
    let features = VirtioBlock::new(&snap, 2).unwrap().available_features();
    assert_ne!(features & VIRTIO_BLK_F_RO, 0, "a snapshot is read-only");
    let g = Guest::new(&snap);
    assert!(g.disk.read_only());
    g.header(HEADER, VIRTIO_BLK_T_OUT, 0);
    g.header(HEADER + 16, VIRTIO_BLK_T_IN, 128);
    let chains = vec![
        vec![(HEADER, 16, R), (DATA, 4096, R), (STATUS, 1, W)],
        vec![
            (HEADER + 16, 16, R),
            (DATA + 0x10000, 8192, W),
            (STATUS + 16, 1, W),
        ],
    ];
    let (_, got) = g.serve(&chains, &[STATUS, STATUS + 16]);
    assert_eq!(got, vec![VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]);
    let mut read = vec![0u8; 8192];
    g.mem
        .read_slice(&mut read, GuestAddress(DATA + 0x10000))
        .unwrap();
    assert!(
        read[..] == at_snapshot[128 * 512..128 * 512 + 8192],
        "the snapshot's data"
    );
    drop(g);
    assert!(cluster.export("rbd/disk1@s1") == at_snapshot);
    assert!(cluster.export("rbd/disk1") == shadow);

    // Another client with its own keyring (caps for the rbd pool only).
    let mut own = cluster.source("rbd/disk1");
    own.id = Some("stratus".into());
    own.keyring = Some(cluster.dir.path().join("client.stratus.keyring"));
    assert_eq!(
        DiskFile::open_config(&config(own.clone())).unwrap().size(),
        IMAGE_MIB << 20
    );

    // Refusals name the image and the reason.
    let e = open_error(&config(cluster.source("nopool/disk1")));
    assert!(
        e.contains("rbd:nopool/disk1") && e.contains("no pool nopool"),
        "{e}"
    );
    let e = open_error(&config(cluster.source("rbd/nothere")));
    assert!(e.contains("cannot open image rbd/nothere"), "{e}");
    let e = open_error(&config(cluster.source("rbd/disk1@nosnap")));
    assert!(e.contains("cannot open image rbd/disk1@nosnap"), "{e}");
    own.keyring = Some(cluster.dir.path().join("no-such.keyring"));
    own.timeout_secs = 5;
    let e = open_error(&config(own));
    assert!(e.contains("rbd:rbd/disk1"), "{e}");

    // The binary: exit 1, one line naming the image.
    let kernel = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kernel.path(), b"\x7fELF").unwrap();
    let spec = format!("rbd:nopool/disk1,conf={}", cluster.conf().display());
    let out = Command::new(env!("CARGO_BIN_EXE_stratus-vmm"))
        .args([
            "--kernel",
            kernel.path().to_str().unwrap(),
            "--console",
            "off",
        ])
        .args(["--disk", &spec])
        .env("STRATUS_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rbd:nopool/disk1") && err.contains("no pool"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}
