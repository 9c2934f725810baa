//! virtio-blk on Ceph RBD images, against a real throw-away cluster (one monitor, one
//! memstore OSD on loopback: scripts/ceph-cluster.sh): requests built in a virtqueue in
//! plain guest memory, served by the queue worker through librbd, checked against what
//! `rbd export` reads back — our code never judges its own writes. Snapshots are read-only
//! and keep their data; an OSD that stops answering fails requests after the timeout and
//! the disk serves again when it is back; a client id with its own keyring works; a wrong
//! pool, image or keyring is refused with the reason. One cluster serves the whole file
//! (it takes a few seconds to start), so the checks run in one test, in order.

mod blk_common;

use std::time::{Duration, Instant};

use blk_common::binary::vmm;
use blk_common::guest::{Guest, DATA, HEADER, R, STATUS, W};
use blk_common::Rng;
use stratus_vmm::devices::virtio::block::io::rbd::RbdSource;
use stratus_vmm::devices::virtio::block::io::DiskFile;
use stratus_vmm::devices::virtio::block::*;
use stratus_vmm::devices::virtio::VirtioDevice;
use stratus_vmm::test_ceph::CephCluster;
use vm_memory::{Bytes, GuestAddress};

const IMAGE_MIB: u64 = 8;

fn source(cluster: &CephCluster, image: &str) -> RbdSource {
    RbdSource {
        image: image.into(),
        conf: Some(cluster.conf()),
        id: None,
        keyring: None,
        timeout_secs: 30,
    }
}

fn config(source: RbdSource) -> BlockConfig {
    let mut config = BlockConfig::new("");
    config.rbd = Some(source);
    config
}

fn open_error(config: &BlockConfig) -> String {
    match DiskFile::open_config(config) {
        Ok(_) => panic!("{:?} opened", config.rbd),
        Err(e) => e.to_string(),
    }
}

#[test]
fn rbd_images_serve_the_guest_and_rbd_export_reads_back_its_writes() {
    let cluster = CephCluster::start();
    let size = IMAGE_MIB.to_string();
    cluster.rbd(&["create", "rbd/disk1", "--size", &size]);

    // A random workload against a shadow, checked by rbd export after the disk closes.
    let mut shadow = vec![0u8; (IMAGE_MIB << 20) as usize];
    let mut rng = Rng(0x0c3f_0001);
    {
        let g = Guest::new(&config(source(&cluster, "rbd/disk1")));
        assert_eq!(g.disk.size(), IMAGE_MIB << 20);
        assert!(!g.disk.read_only());
        for round in 0..10 {
            let batch = g.random_batch(&mut rng, &mut shadow, true);
            let got = g.serve_batch(&batch, || {});
            assert!(
                got.iter().all(|s| *s == VIRTIO_BLK_S_OK),
                "round {round}: {got:?}"
            );
            g.check_reads(&batch);
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
        let (order, got) = g.serve(&chains, &statuses, || {});
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
        let g = Guest::new(&config(source(&cluster, "rbd/disk1")));
        let batch = g.random_batch(&mut rng, &mut shadow, true);
        let got = g.serve_batch(&batch, || {});
        assert!(got.iter().all(|s| *s == VIRTIO_BLK_S_OK), "{got:?}");
    }
    let snap = config(source(&cluster, "rbd/disk1@s1"));
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
    let (_, got) = g.serve(&chains, &[STATUS, STATUS + 16], || {});
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

    // The OSD stops answering with its connections open, as a cluster cut off by the
    // network: requests fail as I/O errors once the timeout has passed, none hangs, and
    // the same disk serves again once the OSD answers. Only reads while it is away: a
    // write that timed out may still land later.
    cluster.rbd(&["create", "rbd/disk2", "--size", &size]);
    let mut away = source(&cluster, "rbd/disk2");
    away.timeout_secs = 3;
    let g = Guest::new(&config(away));
    // One 4 KiB block in each of the image's two 4 MiB objects: unwritten objects are
    // answered from the object map without asking the OSD.
    let sectors = [8u64, (4 << 20) / 512 + 8];
    // One request per block, its data at `data` + 4 KiB per block.
    let requests = |request_type, data: u64, data_flags| {
        let chains: Vec<_> = sectors
            .iter()
            .enumerate()
            .map(|(i, &sector)| {
                let i = i as u64;
                g.header(HEADER + i * 16, request_type, sector);
                vec![
                    (HEADER + i * 16, 16, R),
                    (data + i * 4096, 4096, data_flags),
                    (STATUS + i * 16, 1, W),
                ]
            })
            .collect();
        g.serve(&chains, &[STATUS, STATUS + 16], || {}).1
    };
    let written = rng.bytes(2 * 4096);
    g.mem.write_slice(&written, GuestAddress(DATA)).unwrap();
    assert_eq!(requests(VIRTIO_BLK_T_OUT, DATA, R), [VIRTIO_BLK_S_OK; 2]);
    let read_at = GuestAddress(DATA + 0x10000);
    let read_back = || {
        g.mem.write_slice(&[0u8; 2 * 4096], read_at).unwrap();
        let got = requests(VIRTIO_BLK_T_IN, read_at.0, W);
        let mut data = vec![0u8; 2 * 4096];
        g.mem.read_slice(&mut data, read_at).unwrap();
        (got, data)
    };
    cluster.freeze_osd();
    let started = Instant::now();
    let (got, _) = read_back();
    let waited = started.elapsed();
    cluster.thaw_osd();
    assert_eq!(got, [VIRTIO_BLK_S_IOERR; 2], "reads from a frozen OSD");
    assert!(waited < Duration::from_secs(30), "failing took {waited:?}");
    let (got, data) = read_back();
    assert_eq!(got, [VIRTIO_BLK_S_OK; 2], "reads once the OSD is back");
    assert!(
        data == written,
        "the blocks read back differ from those written"
    );
    drop(g);

    // Another client with its own keyring (caps for the rbd pool only).
    let mut own = source(&cluster, "rbd/disk1");
    own.id = Some("stratus".into());
    own.keyring = Some(cluster.keyring());
    assert_eq!(
        DiskFile::open_config(&config(own.clone())).unwrap().size(),
        IMAGE_MIB << 20
    );

    // Refusals name the image and the reason.
    let e = open_error(&config(source(&cluster, "nopool/disk1")));
    assert!(
        e.contains("rbd:nopool/disk1") && e.contains("no pool nopool"),
        "{e}"
    );
    let e = open_error(&config(source(&cluster, "rbd/nothere")));
    assert!(e.contains("cannot open image rbd/nothere"), "{e}");
    let e = open_error(&config(source(&cluster, "rbd/disk1@nosnap")));
    assert!(e.contains("cannot open image rbd/disk1@nosnap"), "{e}");
    own.keyring = Some(cluster.dir().join("no-such.keyring"));
    own.timeout_secs = 5;
    let e = open_error(&config(own));
    assert!(e.contains("rbd:rbd/disk1"), "{e}");

    // The binary: exit 1, one line naming the image.
    let kernel = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kernel.path(), b"\x7fELF").unwrap();
    let spec = format!("rbd:nopool/disk1,conf={}", cluster.conf().display());
    let kernel = kernel.path().to_str().unwrap();
    let (code, err) = vmm(&["--kernel", kernel, "--console", "off", "--disk", &spec]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("rbd:nopool/disk1") && err.contains("no pool"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}
