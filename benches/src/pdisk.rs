//! pdisk snapshot benchmark: the time `stratus-orchestrator` takes to answer StratusLab's
//! `POST /disks/{uuid}` on an ORIGIN (a new LIVE snapshot: its row, the storage call, the
//! row again, over HTTP), for the smallest and the largest ORIGIN pdisk allows, each
//! holding 10 MiB of data, against the storage's own tool making the same child in the
//! same run, alternated: `qemu-img create -b` beside the ORIGIN on the file pool, `cp
//! --sparse=always` of the LUN file and `sync -d` of the copy on the iSCSI pool (tgtd
//! serves raw files only, so a LIVE there is a copy, durable before pdisk answers), `rbd
//! clone` of the ORIGIN's base snapshot on the RBD pool. The
//! iSCSI pool runs on a throw-away tgtd and the RBD pool on a throw-away Ceph cluster,
//! each where its Debian packages are installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use stratus_vmm::test_ceph::CephCluster;

use crate::cloud::{admin_call, start_orchestrator, Children};
use crate::measure::percentile;
use crate::tgtd::Tgtd;

pub struct Options {
    pub orchestrator: PathBuf,
    /// Timed snapshots per ORIGIN size and per side.
    pub runs: usize,
    /// Scratch directory, absolute (the pool lives in it).
    pub dir: PathBuf,
}

#[derive(Debug, serde::Serialize)]
pub struct Row {
    pub pool: String,
    pub origin_gib: u64,
    pub stratus_p50_ms: f64,
    pub stratus_max_ms: f64,
    pub tool: String,
    pub tool_p50_ms: f64,
    pub tool_max_ms: f64,
}

/// pdisk's smallest and largest volumes.
const ORIGIN_SIZES_GIB: [u64; 2] = [1, 1024];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// What the ORIGINs hold: a Marketplace image's worth of data, at their start.
const ORIGIN_DATA_BYTES: usize = 10 << 20;

/// The pools that can run here, and how their admin would make the same child by hand.
struct Pools {
    tgtd: Option<Tgtd>,
    ceph: Option<CephCluster>,
}

pub fn bench(opts: &Options) -> Result<Vec<Row>> {
    ensure!(opts.runs > 0, "--runs must be at least 1");
    let mut children = Children::default();
    let pool = opts.dir.join("volumes");
    let pools = Pools {
        tgtd: Tgtd::start_if_installed(&opts.dir.join("tgtd"))?,
        ceph: match Command::new("ceph-mon").arg("--version").output() {
            Ok(_) => Some(CephCluster::start()),
            Err(_) => {
                eprintln!("ceph-mon is not installed (Debian's ceph-mon): no RBD row");
                None
            }
        },
    };
    let mut settings = format!(
        "database = \"sqlite://{}\"\nvolume_dir = \"{}\"\n",
        opts.dir.join("cloud.db").display(),
        pool.display()
    );
    if let Some(tgtd) = &pools.tgtd {
        let (port, control) = tgtd.ports()?;
        settings.push_str(&format!(
            "[volume_iscsi]\nportal = \"127.0.0.1:{port}\"\ncontrol_port = {control}\n"
        ));
    }
    if let Some(ceph) = &pools.ceph {
        settings.push_str(&format!(
            "[volume_rbd]\nconf = \"{}\"\nid = \"stratus\"\nkeyring = \"{}\"\n",
            ceph.conf().display(),
            ceph.keyring().display()
        ));
    }
    // Volumes only: no node, no Marketplace; the admin has no volume quota.
    let base = start_orchestrator(&opts.orchestrator, &opts.dir, &settings, &mut children)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let admin = |method, path: &str, body| admin_call(&client, &base, method, path, body);
    let uuid_of = |volume: &Value| -> Result<String> {
        volume["uuid"]
            .as_str()
            .map(str::to_owned)
            .context("a volume without a uuid")
    };
    let data: Vec<u8> = (0..ORIGIN_DATA_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();

    let mut rows = Vec::new();
    let kinds = [
        ("file", "qemu-img create -b", true),
        ("iscsi", "cp --sparse=always; sync -d", pools.tgtd.is_some()),
        ("rbd", "rbd clone", pools.ceph.is_some()),
    ];
    for (kind, tool, available) in kinds {
        if !available {
            continue;
        }
        for size_gib in ORIGIN_SIZES_GIB {
            let origin = uuid_of(&admin(
                reqwest::Method::POST,
                "/disks",
                Some(json!({"size_gib": size_gib, "type": "MACHINE_IMAGE_ORIGIN", "pool": kind})),
            )?)?;
            let origin_name = format!("{origin}.img");
            match (&pools.ceph, kind) {
                (Some(ceph), "rbd") => fill_rbd(ceph, &origin)?,
                _ => {
                    use std::os::unix::fs::FileExt;
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .open(pool.join(&origin_name))
                        .context("the ORIGIN is not in the pool's directory")?;
                    file.write_all_at(&data, 0)?;
                    file.sync_all()?;
                }
            }
            let (mut ours, mut theirs, mut made) = (Vec::new(), Vec::new(), Vec::new());
            // One of each untimed first: the page cache and the database warm up (and on
            // RBD, the ORIGIN's base snapshot that every clone is made from is taken).
            for run in 0..=opts.runs {
                let started = Instant::now();
                let live = admin(reqwest::Method::POST, &format!("/disks/{origin}"), None)?;
                let stratus = started.elapsed();
                made.push(uuid_of(&live)?);
                let peer = format!("peer-{run}");
                let started = Instant::now();
                match (&pools.ceph, kind) {
                    (Some(ceph), "rbd") => rbd_clone(ceph, &origin, &peer)?,
                    (_, "iscsi") => sparse_copy(&pool, &origin_name, &format!("{peer}.img"))?,
                    _ => qemu_img_overlay(&pool, &origin_name, &format!("{peer}.qcow2"))?,
                }
                let tool = started.elapsed();
                if run > 0 {
                    ours.push(ms(stratus));
                    theirs.push(ms(tool));
                }
            }
            for live in made {
                admin(reqwest::Method::DELETE, &format!("/disks/{live}"), None)?;
            }
            for run in 0..=opts.runs {
                match (&pools.ceph, kind) {
                    (Some(ceph), "rbd") => {
                        ceph.rbd(&["rm", "--no-progress", &format!("rbd/peer-{run}")]);
                    }
                    (_, "iscsi") => std::fs::remove_file(pool.join(format!("peer-{run}.img")))?,
                    _ => std::fs::remove_file(pool.join(format!("peer-{run}.qcow2")))?,
                }
            }
            admin(reqwest::Method::DELETE, &format!("/disks/{origin}"), None)?;
            let (ours, theirs) = (sorted(ours), sorted(theirs));
            rows.push(Row {
                pool: kind.into(),
                origin_gib: size_gib,
                stratus_p50_ms: percentile(&ours, 50.0),
                stratus_max_ms: ours.last().copied().unwrap_or_default(),
                tool: tool.into(),
                tool_p50_ms: percentile(&theirs, 50.0),
                tool_max_ms: theirs.last().copied().unwrap_or_default(),
            });
        }
    }
    drop(children);
    Ok(rows)
}

/// Writes the ORIGIN's data into its RBD image.
fn fill_rbd(ceph: &CephCluster, origin: &str) -> Result<()> {
    let total = ORIGIN_DATA_BYTES.to_string();
    ceph.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "1M",
        "--io-total",
        &total,
        "--io-pattern",
        "seq",
        &format!("rbd/{origin}"),
    ]);
    Ok(())
}

/// What a Ceph admin would run by hand: a clone of the ORIGIN's protected base snapshot.
fn rbd_clone(ceph: &CephCluster, origin: &str, name: &str) -> Result<()> {
    ceph.rbd(&[
        "clone",
        &format!("rbd/{origin}@stratus-base"),
        &format!("rbd/{name}"),
    ]);
    Ok(())
}

/// What a tgtd admin would run by hand: a sparse copy of the LUN file beside it, made
/// durable before it is handed out (as pdisk makes its copies before it answers).
fn sparse_copy(pool: &Path, origin_name: &str, name: &str) -> Result<()> {
    for (command, args) in [
        ("cp", &["--sparse=always", origin_name, name][..]),
        ("sync", &["-d", name][..]),
    ] {
        let out = Command::new(command)
            .current_dir(pool)
            .args(args)
            .output()
            .with_context(|| format!("running {command}"))?;
        ensure!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What a site admin would run by hand: a qcow2 overlay naming the ORIGIN beside it.
fn qemu_img_overlay(pool: &Path, origin_name: &str, name: &str) -> Result<()> {
    let out = Command::new("qemu-img")
        .current_dir(pool)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            origin_name,
            name,
        ])
        .output()
        .context("running qemu-img (Debian's qemu-utils)")?;
    ensure!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
