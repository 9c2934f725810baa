//! virtio-blk on iSCSI LUNs served by a real tgtd on loopback (scripts/iscsi-target.sh):
//! requests built in a virtqueue in plain guest memory, served by the queue worker through
//! libiscsi, checked against the LUN's backing file read directly — our code never judges
//! its own writes. Also: the target restarted with I/O in flight, the target gone past
//! the timeout, CHAP, and what the guest is offered on thin and thick LUNs.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod blk_common;

use blk_common::binary::vmm;
use blk_common::guest::{Batch, Guest, DATA, HEADER, R, STATUS, W};
use blk_common::{chain, Rng};
use stratus_vmm::devices::virtio::block::io::iscsi::IscsiSource;
use stratus_vmm::devices::virtio::block::io::DiskFile;
use stratus_vmm::devices::virtio::block::*;
use stratus_vmm::devices::virtio::VirtioDevice;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const LUN_BYTES: u64 = 4 << 20;

/// A tgtd instance of its own, stopped (killed) when dropped.
struct Target {
    dir: tempfile::TempDir,
    port: u16,
    luns: usize,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/iscsi-target.sh")
}

fn run_script(args: &[&str]) {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("run scripts/iscsi-target.sh");
    assert!(
        out.status.success(),
        "iscsi-target.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Target {
    fn start() -> Self {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        run_script(&["start", dir.path().to_str().unwrap()]);
        let port = std::fs::read_to_string(dir.path().join("port"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Target { dir, port, luns: 0 }
    }

    fn dir(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    /// A LUN over a new file filled with a pattern; returns (IQN, backing file).
    fn add(&mut self, thin: bool, chap: Option<(&str, &str)>) -> (String, PathBuf) {
        self.luns += 1;
        let iqn = format!("iqn.2026-12.eu.stratuslab.test:lun{}", self.luns);
        let file = self.dir.path().join(format!("lun{}.img", self.luns));
        let pattern: Vec<u8> = (0..LUN_BYTES).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, pattern).unwrap();
        let mut args = vec!["add", self.dir(), &iqn, file.to_str().unwrap()];
        if thin {
            args.push("thin");
        }
        if let Some((user, secret)) = chap {
            args.extend([user, secret]);
        }
        run_script(&args);
        (iqn, file)
    }

    fn url(&self, iqn: &str) -> String {
        format!("iscsi://127.0.0.1:{}/{iqn}/1", self.port)
    }

    fn restart(&self) {
        run_script(&["restart", self.dir()]);
    }

    fn stop(&self) {
        run_script(&["stop", self.dir()]);
    }

    /// Stops tgtd without closing its connections (SIGSTOP): commands sent to it stay
    /// unanswered.
    fn freeze(&self) {
        let pid = std::fs::read_to_string(self.dir.path().join("pid")).unwrap();
        let status = Command::new("kill")
            .args(["-STOP", pid.trim()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", self.dir()])
            .status();
    }
}

fn source(url: String) -> IscsiSource {
    IscsiSource {
        url,
        initiator: None,
        secret_file: None,
        timeout_secs: 60,
    }
}

fn config(source: IscsiSource) -> BlockConfig {
    let mut config = BlockConfig::new("");
    config.iscsi = Some(source);
    config
}

fn backing_bytes(file: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; LUN_BYTES as usize];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    buf
}

#[test]
fn random_workload_on_thin_and_thick_luns_matches_the_backing_file() {
    let mut target = Target::start();
    for thin in [true, false] {
        let (iqn, file) = target.add(thin, None);
        let g = Guest::new(&config(source(target.url(&iqn))));
        assert_eq!(g.disk.size(), LUN_BYTES);
        assert_eq!(g.disk.can_discard(), thin, "UNMAP only on a thin LUN");
        let mut shadow = backing_bytes(&file);
        let mut rng = Rng(0x15c5_1000 + u64::from(thin));
        for round in 0..12 {
            let batch = g.random_batch(&mut rng, &mut shadow, thin);
            let statuses = g.serve_batch(&batch, || {});
            assert!(
                statuses.iter().all(|s| *s == VIRTIO_BLK_S_OK),
                "thin={thin} round {round}: {statuses:?}"
            );
            g.check_reads(&batch);
        }
        assert!(
            backing_bytes(&file) == shadow,
            "thin={thin}: the LUN's file differs from the shadow"
        );
    }
}

#[test]
fn the_guest_is_offered_discard_only_where_the_lun_can_unmap() {
    let mut target = Target::start();
    let (thin, _) = target.add(true, None);
    let (thick, _) = target.add(false, None);
    let features = |iqn: &str, read_only: bool| {
        let mut c = config(source(target.url(iqn)));
        c.read_only = read_only;
        VirtioBlock::new(&c, 1).unwrap().available_features()
    };
    let f = features(&thin, false);
    assert_ne!(f & VIRTIO_BLK_F_DISCARD, 0);
    assert_ne!(f & VIRTIO_BLK_F_WRITE_ZEROES, 0);
    let f = features(&thick, false);
    assert_eq!(f & VIRTIO_BLK_F_DISCARD, 0, "a thick LUN cannot UNMAP");
    assert_ne!(
        f & VIRTIO_BLK_F_WRITE_ZEROES,
        0,
        "WRITE SAME works on any LUN"
    );
    let f = features(&thin, true);
    assert_ne!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn a_read_only_iscsi_disk_refuses_writes_and_leaves_the_lun_alone() {
    let mut target = Target::start();
    let (iqn, file) = target.add(false, None);
    let mut c = config(source(target.url(&iqn)));
    c.read_only = true;
    let g = Guest::new(&c);
    let before = backing_bytes(&file);
    g.mem
        .write_slice(&[0x5a; 4096], GuestAddress(DATA))
        .unwrap();
    g.header(HEADER, VIRTIO_BLK_T_OUT, 8);
    g.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    let batch = Batch {
        chains: vec![vec![(HEADER, 16, R), (DATA, 4096, R), (STATUS, 1, W)]],
        statuses: vec![STATUS],
        reads: Vec::new(),
    };
    assert_eq!(g.serve_batch(&batch, || {}), vec![VIRTIO_BLK_S_IOERR]);
    assert!(backing_bytes(&file) == before);
}

#[test]
fn a_flush_completes_after_every_write_before_it() {
    let mut target = Target::start();
    let (iqn, _) = target.add(false, None);
    let g = Guest::new(&config(source(target.url(&iqn))));
    let mut chains = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..24u64 {
        let header = HEADER + i * 16;
        g.header(header, VIRTIO_BLK_T_OUT, i * 64);
        chains.push(vec![
            (header, 16, R),
            (DATA + i * 0x8000, 32768, R),
            (STATUS + i * 16, 1, W),
        ]);
        statuses.push(STATUS + i * 16);
    }
    g.header(HEADER + 0x1000, VIRTIO_BLK_T_FLUSH, 0);
    chains.push(vec![(HEADER + 0x1000, 16, R), (STATUS + 0x1000, 1, W)]);
    statuses.push(STATUS + 0x1000);
    // Two writes after the flush: they may not overtake it either.
    for i in 24..26u64 {
        let header = HEADER + i * 16;
        g.header(header, VIRTIO_BLK_T_OUT, i * 64);
        chains.push(vec![
            (header, 16, R),
            (DATA + i * 0x8000, 4096, R),
            (STATUS + i * 16, 1, W),
        ]);
        statuses.push(STATUS + i * 16);
    }
    let mock = MockSplitQueue::create(&g.mem, GuestAddress(0), QUEUE_SIZE);
    let mut next = 0u16;
    let mut flush_head = 0;
    for (i, c) in chains.iter().enumerate() {
        if i == 24 {
            flush_head = u32::from(next);
        }
        mock.add_desc_chains(&chain(c, next), next).unwrap();
        next += c.len() as u16;
    }
    let mut worker = g.worker(mock.create_queue().unwrap());
    worker.process_queue();
    worker.drain();
    let used = mock.used();
    let order: Vec<u32> = (0..chains.len())
        .map(|i| used.ring().ref_at(i).unwrap().load().id())
        .collect();
    let flush_at = order.iter().position(|h| *h == flush_head).unwrap();
    assert_eq!(flush_at, 24, "the flush completed out of place: {order:?}");
    for s in statuses {
        assert_eq!(
            g.mem.read_obj::<u8>(GuestAddress(s)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

#[test]
fn a_target_restarted_with_io_in_flight_loses_no_request() {
    let mut target = Target::start();
    let (iqn, file) = target.add(true, None);
    let g = Guest::new(&config(source(target.url(&iqn))));
    let mut shadow = backing_bytes(&file);
    let mut rng = Rng(0xdead_beef);
    for round in 0..3 {
        let mock = MockSplitQueue::create(&g.mem, GuestAddress(0), QUEUE_SIZE);
        let mut worker = g.worker(mock.create_queue().unwrap());
        // One read first, so the queue is logged in and serving before the target stops.
        let warm_up = [
            (HEADER + 0x2000, 16, R),
            (0x50_0000, 512, W),
            (STATUS + 0x2000, 1, W),
        ];
        g.header(HEADER + 0x2000, VIRTIO_BLK_T_IN, 0);
        mock.add_desc_chains(&chain(&warm_up, 0), 0).unwrap();
        assert_eq!(worker.process_queue(), 1);
        worker.drain();
        // The target stops answering: the requests go out and stay in flight...
        let batch = g.random_batch(&mut rng, &mut shadow, true);
        target.freeze();
        let mut next = warm_up.len() as u16;
        for c in &batch.chains {
            mock.add_desc_chains(&chain(c, next), next).unwrap();
            next += c.len() as u16;
        }
        assert_eq!(worker.process_queue(), batch.chains.len());
        std::thread::sleep(Duration::from_millis(300));
        worker.reap();
        assert_eq!(
            worker.in_flight(),
            batch.chains.len(),
            "round {round}: a request finished on a frozen target"
        );
        // ...until it is killed and started again: they are sent again and all succeed.
        target.restart();
        worker.drain();
        assert_eq!(
            mock.used().idx().load() as usize,
            batch.chains.len() + 1,
            "round {round}"
        );
        for status in &batch.statuses {
            let status: u8 = g.mem.read_obj(GuestAddress(*status)).unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK, "round {round}");
        }
        g.check_reads(&batch);
    }
    assert!(backing_bytes(&file) == shadow, "data lost across restarts");
}

#[test]
fn a_target_gone_past_the_timeout_fails_requests_and_the_disk_recovers_when_it_returns() {
    let mut target = Target::start();
    let (iqn, file) = target.add(false, None);
    let mut s = source(target.url(&iqn));
    s.timeout_secs = 2;
    let g = Guest::new(&config(s));
    let mut shadow = backing_bytes(&file);
    let mut rng = Rng(7);
    let batch = g.random_batch(&mut rng, &mut shadow, false);
    let started = Instant::now();
    let statuses = g.serve_batch(&batch, || target.stop());
    let waited = started.elapsed();
    // Requests the target finished before it went are fine; none hangs, the rest fail.
    assert!(statuses
        .iter()
        .all(|s| *s == VIRTIO_BLK_S_OK || *s == VIRTIO_BLK_S_IOERR));
    assert!(
        statuses.contains(&VIRTIO_BLK_S_IOERR),
        "a request succeeded on a stopped target: {statuses:?}"
    );
    assert!(waited < Duration::from_secs(30), "failing took {waited:?}");
    // Later requests on the same queue also fail while it is away...
    let mut scratch = shadow.clone();
    let batch = g.random_batch(&mut rng, &mut scratch, false);
    let statuses = g.serve_batch(&batch, || {});
    assert!(
        statuses.iter().all(|s| *s == VIRTIO_BLK_S_IOERR),
        "{statuses:?}"
    );
    // ...and succeed once it is back.
    target.restart();
    let mut shadow = backing_bytes(&file);
    let batch = g.random_batch(&mut rng, &mut shadow, false);
    let statuses = g.serve_batch(&batch, || {});
    assert!(
        statuses.iter().all(|s| *s == VIRTIO_BLK_S_OK),
        "{statuses:?}"
    );
    g.check_reads(&batch);
    assert!(backing_bytes(&file) == shadow);
}

fn open_error(config: &BlockConfig) -> String {
    match DiskFile::open_config(config) {
        Ok(_) => panic!("{:?} opened", config.iscsi),
        Err(e) => e.to_string(),
    }
}

fn secret_file(dir: &Path, secret: &str) -> PathBuf {
    let path = dir.join("chap-secret");
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn chap_logs_in_with_the_right_secret_and_names_the_url_without_it_otherwise() {
    let mut target = Target::start();
    let (iqn, _) = target.add(false, Some(("alice", "right-secret-123")));
    let url = format!("iscsi://alice@127.0.0.1:{}/{iqn}/1", target.port);
    let mut s = source(url.clone());
    s.secret_file = Some(secret_file(target.dir.path(), "right-secret-123"));
    assert_eq!(DiskFile::open_config(&config(s)).unwrap().size(), LUN_BYTES);

    let mut s = source(url.clone());
    s.secret_file = Some(secret_file(target.dir.path(), "wrong-secret-456"));
    let e = open_error(&config(s));
    assert!(e.contains(&url) && e.contains("cannot log in"), "{e}");
    assert!(!e.contains("wrong-secret"), "the secret leaked: {e}");

    // Without credentials the target refuses too.
    let e = open_error(&config(source(target.url(&iqn))));
    assert!(e.contains("cannot log in"), "{e}");
}

#[test]
fn the_vmm_exits_1_naming_the_url_for_an_unknown_target_or_a_wrong_secret() {
    let mut target = Target::start();
    let (iqn, _) = target.add(false, Some(("bob", "bobs-secret-789")));
    let kernel = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kernel.path(), b"\x7fELF").unwrap();
    let kernel = kernel.path().to_str().unwrap();

    let unknown = format!(
        "iscsi://127.0.0.1:{}/iqn.2026-12.eu.stratuslab.test:nope/1",
        target.port
    );
    let (code, err) = vmm(&["--kernel", kernel, "--console", "off", "--disk", &unknown]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&unknown) && err.contains("cannot log in"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let secret = secret_file(target.dir.path(), "not-bobs-secret");
    let url = format!("iscsi://bob@127.0.0.1:{}/{iqn}/1", target.port);
    let spec = format!("{url},secret-file={}", secret.display());
    let (code, err) = vmm(&["--kernel", kernel, "--console", "off", "--disk", &spec]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&url), "{err}");
    assert!(!err.contains("not-bobs-secret"), "the secret leaked: {err}");

    let (code, err) = vmm(&[
        "--kernel",
        kernel,
        "--console",
        "off",
        "--disk",
        "iscsi://carol:pw@127.0.0.1/iqn.x/1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("use secret-file="), "{err}");
}
