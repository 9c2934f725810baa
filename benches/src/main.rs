//! stratus-bench: boot-time and memory benchmarks of stratus-vmm, side by side with QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use stratus_benches::guest::{guest_code, pvh_elf, READY_BYTE};
use stratus_benches::measure::{median, parse_smaps, time_process, time_process_until, Residency};

#[derive(Parser)]
#[command(name = "stratus-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// How long and how often the network-disk benchmarks run each job.
#[derive(clap::Args)]
struct NetworkDiskRounds {
    #[arg(long, default_value_t = 3000)]
    runtime_ms: u64,
    /// Only the jobs whose label contains this (e.g. "4k QD32").
    #[arg(long)]
    only: Option<String>,
    /// Rounds per job; rows show medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Process start -> first guest instruction -> guest power-off of a tiny PVH guest on
    /// this host's /dev/kvm, stratus-vmm and QEMU microvm alternated.
    BootKvm {
        #[arg(long)]
        vmm: PathBuf,
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Resident memory of the VMM beyond the guest RAM it touched (1 vCPU, 128 MiB).
    Memory {
        #[arg(long)]
        vmm: PathBuf,
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
    },
    /// virtio-blk device throughput against fio on the host, same file, O_DIRECT, alternated.
    Blk {
        /// Data file on the disk under test (created if missing).
        #[arg(long, default_value = "target/bench-disk.img")]
        file: PathBuf,
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        #[arg(long, default_value_t = 3000)]
        runtime_ms: u64,
        /// Only the jobs whose label contains this (e.g. "4k QD32").
        #[arg(long)]
        only: Option<String>,
        /// Rounds per job; rows show medians.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// The simulated guest driver polls the used ring instead of sleeping until the
        /// interrupt: shows how much of a gap is the driver's wake-up, not the device.
        #[arg(long)]
        polling_driver: bool,
    },
    /// virtio-blk on a Ceph RBD image: the same simulated driver through stratus-vmm's
    /// queue worker and its librbd engine, against fio's own rbd engine on the same image,
    /// alternated. The image must exist and hold data (benches/blk_rbd.sh makes a
    /// throw-away cluster and one).
    BlkRbd {
        /// POOL/IMAGE.
        #[arg(long)]
        image: String,
        /// The cluster's ceph.conf.
        #[arg(long)]
        conf: PathBuf,
        /// The cephx user (without `client.`); its keyring is found through the conf.
        #[arg(long, default_value = "admin")]
        id: String,
        #[command(flatten)]
        rounds: NetworkDiskRounds,
    },
    /// virtio-blk on an iSCSI LUN: the same simulated driver through stratus-vmm's queue
    /// worker and its libiscsi engine (no peer at this level: Debian's fio has no libiscsi
    /// engine; QEMU's iscsi driver is measured in the nested guest, benches/nested_blk.sh).
    BlkIscsi {
        /// iscsi://HOST[:PORT]/TARGET-IQN/LUN of a LUN that may be overwritten.
        #[arg(long)]
        url: String,
        #[command(flatten)]
        rounds: NetworkDiskRounds,
    },
    /// virtio-net device throughput and latency against the raw TAP limit: a simulated
    /// Linux driver through real virtqueues, a TAP in a network namespace of its own, an
    /// AF_PACKET peer on the other side; raw and stratus alternated. Runs as root.
    Net {
        #[arg(long, default_value_t = 2000)]
        runtime_ms: u64,
        /// Only the rows whose label contains this (e.g. "TX 64 B").
        #[arg(long)]
        only: Option<String>,
        /// Rounds per row; rows show medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Round trips in the request/response row.
        #[arg(long, default_value_t = 20000)]
        round_trips: u64,
    },
    /// Image download throughput: stratus-image-fetch (HTTP, xz, checksums, writing the
    /// image) vs `curl | xz -d | sha1sum`, from a server in this process on 127.0.0.1,
    /// alternated.
    Download {
        #[arg(long)]
        fetch: PathBuf,
        /// Size of the (decompressed) image; the xz file is made once and kept in --dir.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "target/bench-download")]
        dir: PathBuf,
    },
    /// Control plane: run-instance (POST /vms) latency and placements per second of
    /// stratus-orchestrator, all requests at once, against node agents with the no-VM
    /// hypervisor.
    Cloud {
        #[arg(long, default_value = "target/release/stratus-orchestrator")]
        orchestrator: PathBuf,
        #[arg(long, default_value = "target/release/stratus-nodeagent")]
        agent: PathBuf,
        #[arg(long, default_value = "target/release/stratus-marketplace")]
        marketplace: PathBuf,
        #[arg(long, default_value_t = 100)]
        agents: usize,
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        #[arg(long, value_enum, default_value = "sqlite")]
        database: stratus_benches::cloud::Database,
        /// Scratch directory (emptied first).
        #[arg(long, default_value = "target/bench-cloud")]
        dir: PathBuf,
    },
    /// Node agent: create-to-running and delete (kill + DELETE) latency of real VMs with a
    /// tiny guest on /dev/kvm, the agent's RSS with 0 and 100 VMs, and image-cache-hit →
    /// copy-on-write root time for a 10 MiB and a large sparse image.
    Agent {
        #[arg(long, default_value = "target/release/stratus-nodeagent")]
        agent: PathBuf,
        #[arg(long, default_value = "target/release/stratus-vmm")]
        vmm: PathBuf,
        #[arg(long, default_value_t = 200)]
        vms: usize,
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        /// Size of the large image, GiB.
        #[arg(long, default_value_t = 10)]
        big_gib: u64,
        /// Scratch directory (emptied first).
        #[arg(long, default_value = "target/bench-agent")]
        dir: PathBuf,
    },
    /// pdisk: LIVE snapshot creation (`POST /disks/{origin}`) for a 1 GiB and a 1 TiB
    /// ORIGIN holding 10 MiB on each pool (file; iSCSI with tgt installed; RBD with Ceph),
    /// against the storage's own tool making the same child, alternated.
    Pdisk {
        #[arg(long, default_value = "target/release/stratus-orchestrator")]
        orchestrator: PathBuf,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Scratch directory (emptied first) on the filesystem under test.
        #[arg(long, default_value = "target/bench-pdisk")]
        dir: PathBuf,
    },
    /// Hot-plug through the node agent: `PUT /vms/{id}/disks/{disk}` → on the guest's bus
    /// (the 201) → read by the guest, for a raw file and an iSCSI LUN (tgtd on loopback).
    Hotplug {
        #[arg(long, default_value = "target/release/stratus-nodeagent")]
        agent: PathBuf,
        #[arg(long, default_value = "target/release/stratus-vmm")]
        vmm: PathBuf,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Scratch directory (emptied first).
        #[arg(long, default_value = "target/bench-hotplug")]
        dir: PathBuf,
    },
    /// Writes the tiny PVH guest used by the benchmarks.
    TinyGuest {
        #[arg(long)]
        out: PathBuf,
        /// Halt after printing instead of powering off.
        #[arg(long)]
        halt: bool,
    },
    /// Runs a command and prints, as JSON, when each marker first appeared on its output.
    Stamp {
        /// name=text; repeatable.
        #[arg(long = "marker", required = true)]
        markers: Vec<String>,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
        /// Output lines starting with this prefix are copied into the JSON ("captured").
        #[arg(long)]
        capture: Option<String>,
        /// Kill the command once this marker (by name) appears; "exit" is then null.
        #[arg(long)]
        stop_after: Option<String>,
        /// Write everything the command printed to this file.
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

/// An emptied scratch directory, as an absolute path (the agents' and the orchestrator's
/// configurations need absolute paths).
fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))
}

const GUEST_MIB: u64 = 128;

fn stratus_cmd(vmm: &Path, kernel: &Path) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel").arg(kernel).args([
        "--memory",
        &GUEST_MIB.to_string(),
        "--cpus",
        "1",
        "--console",
        "stdout",
    ]);
    cmd
}

fn qemu_cmd(qemu: &Path, kernel: &Path) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,rtc=off",
        "-accel",
        "kvm",
        "-m",
        &GUEST_MIB.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=1",
        "-kernel",
    ])
    .arg(kernel);
    cmd
}

fn write_guest(dir: &Path, power_off: bool) -> Result<PathBuf> {
    let path = dir.join(if power_off {
        "tiny-poweroff.elf"
    } else {
        "tiny-halt.elf"
    });
    std::fs::write(&path, pvh_elf(&guest_code(power_off)))?;
    Ok(path)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn boot_kvm(vmm: &Path, qemu: &Path, runs: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("stratus-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kernel = write_guest(&dir, true)?;
    let limit = Duration::from_secs(60);
    // (first guest output, exit) per VMM, in ms.
    let mut results: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for run in 0..runs {
        for (i, (name, cmd, ok_status)) in [
            ("stratus-vmm", stratus_cmd(vmm, &kernel), 0),
            // isa-debug-exit turns the guest's 0 into exit status 1.
            ("qemu", qemu_cmd(qemu, &kernel), 1),
        ]
        .into_iter()
        .enumerate()
        {
            let t = time_process(cmd, &[&[READY_BYTE]], limit)?;
            let Some(first) = t.markers[0] else {
                bail!(
                    "{name} run {run}: the guest printed nothing (status {:?})",
                    t.status
                );
            };
            if t.status != Some(ok_status) {
                bail!(
                    "{name} run {run}: exit status {:?}, expected {ok_status}",
                    t.status
                );
            }
            results[i].0.push(ms(first));
            results[i].1.push(ms(t.exited));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let [(mut s_first, mut s_exit), (mut q_first, mut q_exit)] = results;
    let (sf, se, qf, qe) = (
        median(&mut s_first),
        median(&mut s_exit),
        median(&mut q_first),
        median(&mut q_exit),
    );
    println!("| boot, tiny PVH guest on this host's /dev/kvm ({runs} alternated runs, medians) | stratus-vmm | QEMU microvm | QEMU / stratus |");
    println!("|---|---|---|---|");
    println!(
        "| process start → first guest output | {sf:.2} ms | {qf:.2} ms | {:.1}× |",
        qf / sf
    );
    println!(
        "| process start → guest power-off → exit | {se:.2} ms | {qe:.2} ms | {:.1}× |",
        qe / se
    );
    Ok(())
}

fn residency(mut cmd: Command) -> Result<Residency> {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut byte = [0u8; 1];
    let ready = stdout.read_exact(&mut byte).is_ok() && byte[0] == READY_BYTE;
    // Let start-up work (threads, lazy allocations) settle before sampling.
    std::thread::sleep(Duration::from_millis(300));
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    if !ready {
        bail!("the guest never printed its ready byte");
    }
    parse_smaps(&smaps?, GUEST_MIB << 20)
}

fn memory(vmm: &Path, qemu: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("stratus-bench-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kernel = write_guest(&dir, false)?;
    let s = residency(stratus_cmd(vmm, &kernel)).context("stratus-vmm")?;
    let q = residency(qemu_cmd(qemu, &kernel)).context("qemu")?;
    let _ = std::fs::remove_dir_all(&dir);
    println!("| VMM memory, 1 vCPU / {GUEST_MIB} MiB, tiny guest | stratus-vmm | QEMU microvm | QEMU / stratus |");
    println!("|---|---|---|---|");
    println!(
        "| RSS − touched guest RAM | {:.2} MiB | {:.2} MiB | {:.1}× |",
        s.overhead_kib() as f64 / 1024.0,
        q.overhead_kib() as f64 / 1024.0,
        q.overhead_kib() as f64 / s.overhead_kib() as f64
    );
    println!(
        "| private memory outside guest RAM (per-VM cost) | {:.2} MiB | {:.2} MiB | {:.1}× |",
        s.private_overhead_kib as f64 / 1024.0,
        q.private_overhead_kib as f64 / 1024.0,
        q.private_overhead_kib as f64 / s.private_overhead_kib as f64
    );
    Ok(())
}

struct StampOptions<'a> {
    timeout_s: u64,
    capture: Option<&'a str>,
    stop_after: Option<&'a str>,
    output: Option<&'a Path>,
}

fn stamp(markers: &[String], options: StampOptions, command: &[String]) -> Result<()> {
    let StampOptions {
        timeout_s,
        capture,
        stop_after,
        output,
    } = options;
    let parsed: Vec<(&str, &str)> = markers
        .iter()
        .map(|m| m.split_once('=').context("--marker takes name=text"))
        .collect::<Result<_>>()?;
    let needles: Vec<&[u8]> = parsed.iter().map(|(_, t)| t.as_bytes()).collect();
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    let stop_after = stop_after
        .map(|name| {
            parsed
                .iter()
                .position(|(n, _)| *n == name)
                .with_context(|| format!("--stop-after {name}: no marker of that name"))
        })
        .transpose()?;
    let t = time_process_until(cmd, &needles, Duration::from_secs(timeout_s), stop_after)?;
    if let Some(path) = output {
        std::fs::write(path, &t.output)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut json = serde_json::Map::new();
    for ((name, _), at) in parsed.iter().zip(&t.markers) {
        json.insert((*name).into(), at.map(ms).into());
    }
    if let Some(prefix) = capture {
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&t.output)
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.to_string().into())
            .collect();
        json.insert("captured".into(), lines.into());
    }
    let exit = (!t.stopped).then(|| ms(t.exited));
    json.insert("exit".into(), exit.into());
    json.insert("status".into(), t.status.into());
    println!("STAMP {}", serde_json::Value::Object(json));
    Ok(())
}

fn blk(
    file: &Path,
    size_mib: u64,
    runtime_ms: u64,
    only: Option<&str>,
    runs: usize,
    polling_driver: bool,
) -> Result<()> {
    use stratus_benches::blk::{
        prepare_file, prepare_qcow2_copy, run_fio, run_stratus, Job, Outcome, Pattern,
    };
    use stratus_vmm::devices::virtio::block::io::{ImageFormat, IoEngine};
    prepare_file(file, size_mib << 20)?;
    let qcow2 = prepare_qcow2_copy(file)?;
    let runtime = Duration::from_millis(runtime_ms);
    let jobs = [
        (Pattern::RandRead, 4096, 1),
        (Pattern::RandRead, 4096, 32),
        (Pattern::RandRead, 4096, 128),
        (Pattern::RandWrite, 4096, 1),
        (Pattern::RandWrite, 4096, 32),
        (Pattern::RandWrite, 4096, 128),
        (Pattern::SeqRead, 128 << 10, 32),
        (Pattern::SeqWrite, 128 << 10, 32),
        (Pattern::SeqRead, 1 << 20, 8),
        (Pattern::SeqWrite, 1 << 20, 8),
    ];
    println!("| virtio-blk device vs fio on the host (O_DIRECT, same file, {runtime_ms} ms each, medians of {runs} alternated rounds) | host fio | stratus io_uring | ratio | stratus sync | ratio | stratus qcow2 io_uring | ratio | p50 / p99 µs host | p50 / p99 µs stratus | CPU µs/IO fio / stratus / qcow2 |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let label = |pattern: Pattern, bs: u64, qd: u16| {
        let size = if bs >= 1 << 20 {
            format!("{}M", bs >> 20)
        } else {
            format!("{}k", bs >> 10)
        };
        format!("{} {size} QD{qd}", pattern.fio_rw())
    };
    let selected = jobs
        .iter()
        .filter(|(p, bs, qd)| only.is_none_or(|o| label(*p, *bs, *qd).contains(o)));
    for &(pattern, bs, qd) in selected {
        let job = Job {
            pattern,
            block_size: bs,
            queue_depth: qd,
            runtime,
            polling_driver,
        };
        // Rounds of all four sides, in a rotating order; the row shows medians, and each
        // ratio is the median of the per-round ratios (the host disk is shared and noisy).
        let (mut host, mut uring, mut sync, mut qcow) = (vec![], vec![], vec![], vec![]);
        for round in 0..runs.max(1) {
            for side in 0..4 {
                match (side + round) % 4 {
                    0 => host.push(run_fio(file, job)?),
                    1 => uring.push(run_stratus(file, ImageFormat::Raw, IoEngine::IoUring, job)?),
                    2 => sync.push(run_stratus(file, ImageFormat::Raw, IoEngine::Sync, job)?),
                    _ => qcow.push(run_stratus(
                        &qcow2,
                        ImageFormat::Qcow2,
                        IoEngine::IoUring,
                        job,
                    )?),
                }
            }
        }
        let ratio = |side: &[Outcome]| median_ratio(side, &host);
        let (r_uring, r_sync, r_qcow) = (ratio(&uring), ratio(&sync), ratio(&qcow));
        let (host, uring, sync, qcow) = (
            median_outcome(&host),
            median_outcome(&uring),
            median_outcome(&sync),
            median_outcome(&qcow),
        );
        println!(
            "| {} | {} | {} | {:.2} | {} | {:.2} | {} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} / {:.1} / {:.1} |",
            label(pattern, bs, qd),
            blk_cell(&host, bs),
            blk_cell(&uring, bs),
            r_uring,
            blk_cell(&sync, bs),
            r_sync,
            blk_cell(&qcow, bs),
            r_qcow,
            host.p50_us,
            host.p99_us,
            uring.p50_us,
            uring.p99_us,
            host.cpu_us_per_io,
            uring.cpu_us_per_io,
            qcow.cpu_us_per_io
        );
    }
    Ok(())
}

fn net(runtime_ms: u64, only: Option<&str>, runs: usize, round_trips: u64) -> Result<()> {
    use stratus_benches::net::{
        enter_private_netns, latency, place_threads, run_raw, run_stratus, Direction, Job,
    };
    enter_private_netns()?;
    place_threads()?;
    let runtime = Duration::from_millis(runtime_ms);
    let rows = [
        (Direction::Tx, 65534usize, "TX 64 KiB TSO"),
        (Direction::Tx, 1514, "TX 1514 B"),
        (Direction::Tx, 64, "TX 64 B"),
        (Direction::Rx, 65534, "RX 64 KiB TSO"),
        (Direction::Rx, 1514, "RX 1514 B"),
        (Direction::Rx, 64, "RX 64 B"),
    ];
    println!("| virtio-net device vs the raw TAP (same AF_PACKET peer, {runtime_ms} ms each, medians of {runs} alternated rounds) | raw TAP | stratus | ratio | CPU µs/frame raw / stratus | frames lost raw / stratus |");
    println!("|---|---|---|---|---|---|");
    let cell = |o: &stratus_benches::net::Outcome, len: usize| {
        if len >= 1514 {
            format!("{:.0} MiB/s", o.mib_s)
        } else {
            format!("{:.0} kpps", o.frames_per_s / 1000.0)
        }
    };
    for (direction, frame_len, label) in rows {
        if only.is_some_and(|o| !label.contains(o)) {
            continue;
        }
        let job = Job {
            direction,
            frame_len,
            runtime,
        };
        let (mut raw, mut ours) = (vec![], vec![]);
        for round in 0..runs.max(1) {
            if round % 2 == 0 {
                raw.push(run_raw(job)?);
                ours.push(run_stratus(job)?);
            } else {
                ours.push(run_stratus(job)?);
                raw.push(run_raw(job)?);
            }
        }
        let mut ratios: Vec<f64> = ours
            .iter()
            .zip(&raw)
            .map(|(o, r)| o.frames_per_s / r.frames_per_s)
            .collect();
        let ratio = median(&mut ratios);
        let med = |side: &[stratus_benches::net::Outcome],
                   f: fn(&stratus_benches::net::Outcome) -> f64| {
            median(&mut side.iter().map(f).collect::<Vec<_>>())
        };
        let summary = |side: &[stratus_benches::net::Outcome]| stratus_benches::net::Outcome {
            frames_per_s: med(side, |o| o.frames_per_s),
            mib_s: med(side, |o| o.mib_s),
            cpu_us_per_frame: med(side, |o| o.cpu_us_per_frame),
            lost: side.iter().map(|o| o.lost).sum(),
        };
        let (r, o) = (summary(&raw), summary(&ours));
        println!(
            "| {label} | {} | {} | {ratio:.2} | {:.2} / {:.2} | {} / {} |",
            cell(&r, frame_len),
            cell(&o, frame_len),
            r.cpu_us_per_frame,
            o.cpu_us_per_frame,
            r.lost,
            o.lost
        );
    }
    if only.is_none_or(|o| "request/response".contains(o)) {
        let (mut raw, mut ours) = (vec![], vec![]);
        for _ in 0..runs.max(1) {
            raw.push(latency(true, round_trips)?);
            ours.push(latency(false, round_trips)?);
        }
        let p = |side: &[stratus_benches::net::Latency],
                 f: fn(&stratus_benches::net::Latency) -> f64| {
            median(&mut side.iter().map(f).collect::<Vec<_>>())
        };
        println!(
            "| request/response 64 B, p50 / p99 µs ({round_trips} round trips) | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} | | |",
            p(&raw, |l| l.p50_us),
            p(&raw, |l| l.p99_us),
            p(&ours, |l| l.p50_us),
            p(&ours, |l| l.p99_us),
            p(&raw, |l| l.p50_us) / p(&ours, |l| l.p50_us),
        );
    }
    Ok(())
}

/// Field-wise medians over the rounds.
fn blk_rbd(image: &str, conf: &Path, id: &str, rounds: &NetworkDiskRounds) -> Result<()> {
    let (runtime_ms, only, runs) = (rounds.runtime_ms, rounds.only.as_deref(), rounds.runs);
    use stratus_benches::blk::{run_fio_rbd, run_stratus_config};
    use stratus_vmm::devices::virtio::block::io::rbd::RbdSource;
    use stratus_vmm::devices::virtio::block::BlockConfig;
    let mut config = BlockConfig::new("");
    config.rbd = Some(RbdSource {
        image: image.to_owned(),
        conf: Some(conf.to_owned()),
        id: Some(id.to_owned()),
        keyring: None,
        timeout_secs: 60,
    });
    println!("| virtio-blk on RBD vs fio's rbd engine (same image, {runtime_ms} ms each, medians of {runs} alternated rounds) | fio rbd | stratus | ratio | p50 / p99 µs fio | p50 / p99 µs stratus | CPU µs/IO fio / stratus |");
    println!("|---|---|---|---|---|---|---|");
    for (job, label) in network_disk_jobs(runtime_ms) {
        if only.is_some_and(|o| !label.contains(o)) {
            continue;
        }
        let bs = job.block_size;
        let (mut fio, mut ours) = (vec![], vec![]);
        for round in 0..runs.max(1) {
            if round % 2 == 0 {
                fio.push(run_fio_rbd(image, conf, id, job)?);
                ours.push(run_stratus_config(&config, job)?);
            } else {
                ours.push(run_stratus_config(&config, job)?);
                fio.push(run_fio_rbd(image, conf, id, job)?);
            }
        }
        let ratio = median_ratio(&ours, &fio);
        let (fio, ours) = (median_outcome(&fio), median_outcome(&ours));
        println!(
            "| {label} | {} | {} | {ratio:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} / {:.1} |",
            blk_cell(&fio, bs),
            blk_cell(&ours, bs),
            fio.p50_us,
            fio.p99_us,
            ours.p50_us,
            ours.p99_us,
            fio.cpu_us_per_io,
            ours.cpu_us_per_io
        );
    }
    Ok(())
}

fn blk_iscsi(url: &str, rounds: &NetworkDiskRounds) -> Result<()> {
    let (runtime_ms, only, runs) = (rounds.runtime_ms, rounds.only.as_deref(), rounds.runs);
    use stratus_benches::blk::run_stratus_config;
    use stratus_vmm::devices::virtio::block::io::iscsi::IscsiSource;
    use stratus_vmm::devices::virtio::block::BlockConfig;
    let mut config = BlockConfig::new("");
    config.iscsi = Some(IscsiSource {
        url: url.to_owned(),
        initiator: None,
        secret_file: None,
        timeout_secs: 60,
    });
    println!("| virtio-blk on an iSCSI LUN ({runtime_ms} ms each, medians of {runs} rounds) | stratus | p50 / p99 µs | CPU µs/IO |");
    println!("|---|---|---|---|");
    for (job, label) in network_disk_jobs(runtime_ms) {
        if only.is_some_and(|o| !label.contains(o)) {
            continue;
        }
        let rounds = (0..runs.max(1))
            .map(|_| run_stratus_config(&config, job))
            .collect::<Result<Vec<_>>>()?;
        let o = median_outcome(&rounds);
        println!(
            "| {label} | {} | {:.0} / {:.0} | {:.1} |",
            blk_cell(&o, job.block_size),
            o.p50_us,
            o.p99_us,
            o.cpu_us_per_io
        );
    }
    Ok(())
}

/// The jobs of the network-disk rows: 4k random at QD1 and QD32, 1 MiB sequential at QD8.
fn network_disk_jobs(runtime_ms: u64) -> Vec<(stratus_benches::blk::Job, &'static str)> {
    use stratus_benches::blk::{Job, Pattern};
    [
        (Pattern::RandRead, 4096u64, 1u16, "randread 4k QD1"),
        (Pattern::RandRead, 4096, 32, "randread 4k QD32"),
        (Pattern::RandWrite, 4096, 1, "randwrite 4k QD1"),
        (Pattern::RandWrite, 4096, 32, "randwrite 4k QD32"),
        (Pattern::SeqRead, 1 << 20, 8, "read 1M QD8"),
        (Pattern::SeqWrite, 1 << 20, 8, "write 1M QD8"),
    ]
    .into_iter()
    .map(|(pattern, block_size, queue_depth, label)| {
        let job = Job {
            pattern,
            block_size,
            queue_depth,
            runtime: Duration::from_millis(runtime_ms),
            polling_driver: false,
        };
        (job, label)
    })
    .collect()
}

/// A throughput cell: IOPS for small blocks, MiB/s for large ones.
fn blk_cell(o: &stratus_benches::blk::Outcome, block_size: u64) -> String {
    if block_size <= 4096 {
        format!("{:.0} IOPS", o.iops)
    } else {
        format!("{:.0} MiB/s", o.mib_s)
    }
}

/// The median of the per-round ratios `ours / peer` (rounds alternate, so each pair ran
/// side by side).
fn median_ratio(
    ours: &[stratus_benches::blk::Outcome],
    peer: &[stratus_benches::blk::Outcome],
) -> f64 {
    let mut ratios: Vec<f64> = ours
        .iter()
        .zip(peer)
        .map(|(o, p)| o.iops / p.iops)
        .collect();
    median(&mut ratios)
}

fn median_outcome(runs: &[stratus_benches::blk::Outcome]) -> stratus_benches::blk::Outcome {
    let field = |f: fn(&stratus_benches::blk::Outcome) -> f64| {
        median(&mut runs.iter().map(f).collect::<Vec<_>>())
    };
    stratus_benches::blk::Outcome {
        iops: field(|o| o.iops),
        mib_s: field(|o| o.mib_s),
        p50_us: field(|o| o.p50_us),
        p99_us: field(|o| o.p99_us),
        cpu_us_per_io: field(|o| o.cpu_us_per_io),
    }
}

fn download(fetch: &Path, size_mib: u64, runs: usize, dir: &Path) -> Result<()> {
    use stratus_benches::download::{prepare_image, serve, time_curl, time_stratus};
    let (xz, sha1) = prepare_image(dir, size_mib)?;
    let xz_mib = std::fs::metadata(&xz)?.len() as f64 / f64::from(1 << 20);
    let url = format!("http://127.0.0.1:{}/img.xz", serve(xz)?);
    let dest = dir.join("fetched.img");
    let bytes = size_mib << 20;
    let (mut s, mut c) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // Alternate which side goes first.
        if run % 2 == 0 {
            s.push(time_stratus(fetch, &url, &dest, bytes, &sha1)?.as_secs_f64());
            c.push(time_curl(&url, &sha1)?.as_secs_f64());
        } else {
            c.push(time_curl(&url, &sha1)?.as_secs_f64());
            s.push(time_stratus(fetch, &url, &dest, bytes, &sha1)?.as_secs_f64());
        }
    }
    let (sm, cm) = (
        size_mib as f64 / median(&mut s),
        size_mib as f64 / median(&mut c),
    );
    println!("| image download, {size_mib} MiB image as {xz_mib:.0} MiB of xz over HTTP on 127.0.0.1 ({runs} alternated runs, medians, MiB/s of decompressed data) | stratus-image-fetch (+ size, MD5, SHA-1, SHA-256, SHA-512, writes the image) | curl \\| xz -d \\| sha1sum | stratus / curl |");
    println!("|---|---|---|---|");
    println!(
        "| download + xz decompression + checksum | {sm:.0} MiB/s | {cm:.0} MiB/s | {:.2}× |",
        sm / cm
    );
    Ok(())
}

fn main() -> Result<()> {
    // reqwest's TLS (enabled workspace-wide by the orchestrator) takes the process's
    // rustls provider; the workspace uses ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Cmd::BootKvm { vmm, qemu, runs } => boot_kvm(&vmm, &qemu, runs),
        Cmd::Memory { vmm, qemu } => memory(&vmm, &qemu),
        Cmd::Net {
            runtime_ms,
            only,
            runs,
            round_trips,
        } => net(runtime_ms, only.as_deref(), runs, round_trips),
        Cmd::BlkRbd {
            image,
            conf,
            id,
            rounds,
        } => blk_rbd(&image, &conf, &id, &rounds),
        Cmd::BlkIscsi { url, rounds } => blk_iscsi(&url, &rounds),
        Cmd::Blk {
            file,
            size_mib,
            runtime_ms,
            only,
            runs,
            polling_driver,
        } => blk(
            &file,
            size_mib,
            runtime_ms,
            only.as_deref(),
            runs,
            polling_driver,
        ),
        Cmd::Download {
            fetch,
            size_mib,
            runs,
            dir,
        } => download(&fetch, size_mib, runs, &dir),
        Cmd::Agent {
            agent,
            vmm,
            vms,
            concurrency,
            big_gib,
            dir,
        } => {
            let dir = fresh_dir(&dir)?;
            let report = stratus_benches::agent::bench(&stratus_benches::agent::Options {
                agent: std::fs::canonicalize(&agent)?,
                vmm: std::fs::canonicalize(&vmm)?,
                vms,
                concurrency,
                big_gib,
                dir,
            })?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Cloud {
            orchestrator,
            agent,
            marketplace,
            agents,
            requests,
            database,
            dir,
        } => {
            let dir = fresh_dir(&dir)?;
            let report = stratus_benches::cloud::bench(&stratus_benches::cloud::Options {
                orchestrator,
                agent,
                marketplace,
                agents,
                requests,
                database,
                dir,
            })?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Pdisk {
            orchestrator,
            runs,
            dir,
        } => {
            let dir = fresh_dir(&dir)?;
            let rows = stratus_benches::pdisk::bench(&stratus_benches::pdisk::Options {
                orchestrator,
                runs,
                dir,
            })?;
            println!("| pool | ORIGIN | stratus p50 / max | tool | tool p50 / max |");
            println!("|---|---|---|---|---|");
            for row in &rows {
                println!(
                    "| {} | {} GiB | {:.1} / {:.1} ms | `{}` | {:.1} / {:.1} ms |",
                    row.pool,
                    row.origin_gib,
                    row.stratus_p50_ms,
                    row.stratus_max_ms,
                    row.tool,
                    row.tool_p50_ms,
                    row.tool_max_ms
                );
            }
            Ok(())
        }
        Cmd::Hotplug {
            agent,
            vmm,
            runs,
            dir,
        } => {
            let dir = fresh_dir(&dir)?;
            let rows = stratus_benches::hotplug::bench(&stratus_benches::hotplug::Options {
                agent: std::fs::canonicalize(&agent)?,
                vmm: std::fs::canonicalize(&vmm)?,
                runs,
                dir,
            })?;
            println!("| disk | PUT → on the bus p50 / max | PUT → read by the guest p50 / max |");
            println!("|---|---|---|");
            for row in &rows {
                println!(
                    "| {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms |",
                    row.source,
                    row.on_bus_p50_ms,
                    row.on_bus_max_ms,
                    row.in_guest_p50_ms,
                    row.in_guest_max_ms
                );
            }
            Ok(())
        }
        Cmd::TinyGuest { out, halt } => std::fs::write(&out, pvh_elf(&guest_code(!halt)))
            .with_context(|| format!("cannot write {}", out.display())),
        Cmd::Stamp {
            markers,
            timeout_s,
            capture,
            stop_after,
            output,
            command,
        } => stamp(
            &markers,
            StampOptions {
                timeout_s,
                capture: capture.as_deref(),
                stop_after: stop_after.as_deref(),
                output: output.as_deref(),
            },
            &command,
        ),
    }
}
