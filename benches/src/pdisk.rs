//! pdisk snapshot benchmark: the time `stratus-orchestrator` takes to answer StratusLab's
//! `POST /disks/{uuid}` on an ORIGIN (a new LIVE snapshot: its row, the storage call, the
//! row again, over HTTP), for the smallest and the largest ORIGIN pdisk allows, against the
//! storage's own tool making the same copy-on-write child in the same run, alternated:
//! `qemu-img create -b` beside the ORIGIN on the file pool.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::cloud::{admin_call, start_orchestrator, Children};
use crate::measure::percentile;

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

pub fn bench(opts: &Options) -> Result<Vec<Row>> {
    ensure!(opts.runs > 0, "--runs must be at least 1");
    let mut children = Children::default();
    let pool = opts.dir.join("volumes");
    // Volumes only: no node, no Marketplace; the admin has no volume quota.
    let base = start_orchestrator(
        &opts.orchestrator,
        &opts.dir,
        &format!(
            "database = \"sqlite://{}\"\nvolume_dir = \"{}\"\n",
            opts.dir.join("cloud.db").display(),
            pool.display()
        ),
        &mut children,
    )?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let admin = |method, path: &str, body| admin_call(&client, &base, method, path, body);
    let uuid_of = |volume: &Value| -> Result<String> {
        volume["uuid"]
            .as_str()
            .map(str::to_owned)
            .context("a volume without a uuid")
    };

    let mut rows = Vec::new();
    for size_gib in ORIGIN_SIZES_GIB {
        let origin = uuid_of(&admin(
            reqwest::Method::POST,
            "/disks",
            Some(json!({"size_gib": size_gib, "type": "MACHINE_IMAGE_ORIGIN"})),
        )?)?;
        let origin_name = format!("{origin}.img");
        ensure!(
            pool.join(&origin_name).exists(),
            "the ORIGIN is not in the file pool"
        );
        let (mut ours, mut theirs, mut made) = (Vec::new(), Vec::new(), Vec::new());
        // One of each untimed first: the page cache and the database warm up.
        for run in 0..=opts.runs {
            let started = Instant::now();
            let live = admin(reqwest::Method::POST, &format!("/disks/{origin}"), None)?;
            let stratus = started.elapsed();
            made.push(uuid_of(&live)?);
            let started = Instant::now();
            qemu_img_overlay(&pool, &origin_name, &format!("peer-{run}.qcow2"))?;
            let tool = started.elapsed();
            if run > 0 {
                ours.push(ms(stratus));
                theirs.push(ms(tool));
            }
        }
        for live in made {
            admin(reqwest::Method::DELETE, &format!("/disks/{live}"), None)?;
        }
        admin(reqwest::Method::DELETE, &format!("/disks/{origin}"), None)?;
        for run in 0..=opts.runs {
            std::fs::remove_file(pool.join(format!("peer-{run}.qcow2")))?;
        }
        let (ours, theirs) = (sorted(ours), sorted(theirs));
        rows.push(Row {
            pool: "file".into(),
            origin_gib: size_gib,
            stratus_p50_ms: percentile(&ours, 50.0),
            stratus_max_ms: ours.last().copied().unwrap_or_default(),
            tool: "qemu-img create -b".into(),
            tool_p50_ms: percentile(&theirs, 50.0),
            tool_max_ms: theirs.last().copied().unwrap_or_default(),
        });
    }
    drop(children);
    Ok(rows)
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
