//! Device-level virtio-blk benchmark: a simulated driver keeps N requests in flight through
//! real virtqueues in guest memory (indirect descriptor tables, like Linux's virtio_blk),
//! served by stratus-vmm's queue worker on its own thread; compared with fio on the same file.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use stratus_vmm::devices::virtio::block::io::{
    create_engine, CacheMode, DiskFile, ImageFormat, IoEngine,
};
use stratus_vmm::devices::virtio::block::worker::{QueueWorker, QueueWorkerParts};
use stratus_vmm::devices::virtio::block::{BlockConfig, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use stratus_vmm::devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Per-slot area: request header, indirect table and status byte.
const SLOT_META: u64 = 0x1_0000;
const SLOT_META_SIZE: u64 = 0x100;
const DATA_BASE: u64 = 0x100_0000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    pub fn fio_rw(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::SeqRead => "read",
            Pattern::SeqWrite => "write",
        }
    }
    fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }
    fn is_random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub pattern: Pattern,
    pub block_size: u64,
    pub queue_depth: u16,
    pub runtime: Duration,
    /// The simulated driver spins on the used ring instead of sleeping until the device's
    /// interrupt (only the stratus side; fio always waits in io_uring_enter).
    pub polling_driver: bool,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU time of the serving side per completed request.
    pub cpu_us_per_io: f64,
}

pub(crate) struct EventInterrupt(pub(crate) EventFd);

impl VirtioInterrupt for EventInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) {
        let _ = self.0.write(1);
    }
}

pub(crate) fn thread_cpu(tid: i32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the comm field.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// CPU time of every thread of this process so far.
fn process_cpu() -> Result<Duration> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Ok(Duration::from_micros(
        micros(usage.ru_utime) + micros(usage.ru_stime),
    ))
}

pub(crate) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[idx]) / 1000.0
}

/// Runs `job` against `path` through stratus-vmm's virtio-blk queue worker.
pub fn run_stratus(
    path: &std::path::Path,
    format: ImageFormat,
    engine: IoEngine,
    job: Job,
) -> Result<Outcome> {
    let disk = DiskFile::open_format(path, format, false, CacheMode::None)?;
    run_stratus_on(disk, engine, job)
}

/// Runs `job` against a disk opened from its configuration (an RBD image, an iSCSI LUN).
pub fn run_stratus_config(config: &BlockConfig, job: Job) -> Result<Outcome> {
    let disk = DiskFile::open_config(config)?;
    run_stratus_on(disk, IoEngine::IoUring, job)
}

fn run_stratus_on(disk: DiskFile, engine: IoEngine, job: Job) -> Result<Outcome> {
    let qd = job.queue_depth.min(QUEUE_SIZE);
    let mem_size = DATA_BASE as usize + qd as usize * job.block_size as usize;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)])?;
    let disk_size = disk.size();
    let io_engine = create_engine(engine, &disk, u32::from(QUEUE_SIZE))?;
    let mut queue = Queue::new(QUEUE_SIZE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    let queue_event = EventFd::new(libc::EFD_NONBLOCK)?;
    let irq = EventFd::new(if job.polling_driver {
        libc::EFD_NONBLOCK
    } else {
        0
    })?;
    let kill = EventFd::new(libc::EFD_NONBLOCK)?;
    let worker = QueueWorker::new(QueueWorkerParts {
        mem: mem.clone(),
        disk: Arc::new(disk),
        serial: Arc::from(&b""[..]),
        queue,
        queue_index: 0,
        queue_event: queue_event.try_clone()?,
        interrupt: Arc::new(EventInterrupt(irq.try_clone()?)),
        kill: kill.try_clone()?,
        engine: io_engine,
        limiter: None,
        counters: Default::default(),
    })?;
    let handle = std::thread::spawn(move || worker.run());

    // The driver side.
    let blocks = disk_size / job.block_size;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq_next = 0u64;
    let mut next_offset = |rng: &mut u64| {
        if job.pattern.is_random() {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % blocks) * job.block_size
        } else {
            let o = seq_next;
            seq_next = (seq_next + job.block_size) % (blocks * job.block_size);
            o
        }
    };
    if job.pattern.is_write() {
        let fill: Vec<u8> = (0..qd as usize * job.block_size as usize)
            .map(|i| (i * 31) as u8)
            .collect();
        mem.write_slice(&fill, GuestAddress(DATA_BASE))?;
    }
    let mut avail_idx: u16 = 0;
    let mut used_seen: u16 = 0;
    let mut submitted_at = vec![Instant::now(); qd as usize];
    let post = |slot: u16, offset: u64, avail_idx: &mut u16| -> Result<()> {
        let meta = SLOT_META + u64::from(slot) * SLOT_META_SIZE;
        let (header, table, status) = (meta, meta + 0x20, meta + 0x80);
        let kind = if job.pattern.is_write() {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        mem.write_obj(kind, GuestAddress(header))?;
        mem.write_obj(0u32, GuestAddress(header + 4))?;
        mem.write_obj(offset / 512, GuestAddress(header + 8))?;
        let data = DATA_BASE + u64::from(slot) * job.block_size;
        let data_flags = if job.pattern.is_write() {
            0
        } else {
            VRING_DESC_F_WRITE
        };
        let descs = [
            (header, 16u32, VRING_DESC_F_NEXT, 1u16),
            (
                data,
                job.block_size as u32,
                data_flags | VRING_DESC_F_NEXT,
                2,
            ),
            (status, 1, VRING_DESC_F_WRITE, 0),
        ];
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let at = table + i as u64 * 16;
            mem.write_obj(*addr, GuestAddress(at))?;
            mem.write_obj(*len, GuestAddress(at + 8))?;
            mem.write_obj(*flags, GuestAddress(at + 12))?;
            mem.write_obj(*next, GuestAddress(at + 14))?;
        }
        let ring_desc = DESC_TABLE + u64::from(slot) * 16;
        mem.write_obj(table, GuestAddress(ring_desc))?;
        mem.write_obj(48u32, GuestAddress(ring_desc + 8))?;
        mem.write_obj(VRING_DESC_F_INDIRECT, GuestAddress(ring_desc + 12))?;
        mem.write_obj(0u16, GuestAddress(ring_desc + 14))?;
        let entry = AVAIL_RING + 4 + u64::from(*avail_idx % QUEUE_SIZE) * 2;
        mem.write_obj(slot, GuestAddress(entry))?;
        *avail_idx = avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        mem.write_obj(*avail_idx, GuestAddress(AVAIL_RING + 2))?;
        Ok(())
    };
    // The device's CPU is the whole process's but the simulated driver's (this thread):
    // the worker, and the threads of librbd or libiscsi where the disk is on the network.
    // SAFETY: gettid has no side effects.
    let driver_tid = unsafe { libc::gettid() };
    let device_cpu =
        || -> Result<Duration> { Ok(process_cpu()?.saturating_sub(thread_cpu(driver_tid)?)) };
    let started = Instant::now();
    let cpu_before = device_cpu()?;
    for slot in 0..qd {
        let offset = next_offset(&mut rng);
        submitted_at[slot as usize] = Instant::now();
        post(slot, offset, &mut avail_idx)?;
    }
    queue_event.write(1)?;
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut completed: u64 = 0;
    while started.elapsed() < job.runtime {
        match irq.read() {
            Ok(_) => {}
            Err(e) if job.polling_driver && e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        fence(Ordering::Acquire);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2))?;
        let mut reposted = false;
        while used_seen != used_idx {
            let elem = USED_RING + 4 + u64::from(used_seen % QUEUE_SIZE) * 8;
            let slot = mem.read_obj::<u32>(GuestAddress(elem))? as u16;
            used_seen = used_seen.wrapping_add(1);
            let status: u8 = mem.read_obj(GuestAddress(
                SLOT_META + u64::from(slot) * SLOT_META_SIZE + 0x80,
            ))?;
            if status != 0 {
                bail!("request failed with virtio-blk status {status}");
            }
            let now = Instant::now();
            latencies.push(
                (now - submitted_at[slot as usize])
                    .as_nanos()
                    .min(u32::MAX as u128) as u32,
            );
            completed += 1;
            if started.elapsed() < job.runtime {
                let offset = next_offset(&mut rng);
                submitted_at[slot as usize] = now;
                post(slot, offset, &mut avail_idx)?;
                reposted = true;
            }
        }
        if reposted {
            queue_event.write(1)?;
        }
    }
    let elapsed = started.elapsed();
    let cpu = device_cpu()?.saturating_sub(cpu_before);
    kill.write(1)?;
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("queue worker panicked"))?;
    latencies.sort_unstable();
    let iops = completed as f64 / elapsed.as_secs_f64();
    Ok(Outcome {
        iops,
        mib_s: iops * job.block_size as f64 / (1 << 20) as f64,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        cpu_us_per_io: cpu.as_secs_f64() * 1e6 / completed.max(1) as f64,
    })
}

/// The same job with fio (io_uring, O_DIRECT) on the same file.
pub fn run_fio(path: &std::path::Path, job: Job) -> Result<Outcome> {
    let mut fio = std::process::Command::new("fio");
    fio.args(["--ioengine=io_uring", "--direct=1"])
        .arg(format!("--filename={}", path.display()));
    fio_job(fio, job, FioCpu::JobThread)
}

/// The same job with fio's own librbd engine on the same image (`POOL/IMAGE`), as the
/// cephx user `id` of the cluster `conf`.
pub fn run_fio_rbd(image: &str, conf: &std::path::Path, id: &str, job: Job) -> Result<Outcome> {
    let (pool, name) = image
        .split_once('/')
        .context("the RBD image must be POOL/IMAGE")?;
    let mut fio = std::process::Command::new("fio");
    fio.env("CEPH_CONF", conf)
        .arg("--ioengine=rbd")
        .arg(format!("--clientname={id}"))
        .arg(format!("--pool={pool}"))
        .arg(format!("--rbdname={name}"));
    fio_job(fio, job, FioCpu::WholeProcess)
}

/// Whose CPU time fio's I/Os are charged with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FioCpu {
    /// fio's own figure, its job thread's: where the engine does all the work itself
    /// (io_uring on a file).
    JobThread,
    /// The whole fio process's, from its resource usage when it has exited (start-up
    /// included): where the engine's library does its work in threads of its own
    /// (librbd), which fio's figure leaves out.
    WholeProcess,
}

fn children_cpu() -> Result<Duration> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(rusage_time(&usage))
}

fn rusage_time(usage: &libc::rusage) -> Duration {
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

fn fio_job(mut fio: std::process::Command, job: Job, cpu: FioCpu) -> Result<Outcome> {
    let children_before = children_cpu()?;
    let out = fio
        .args([
            "--name=host",
            "--time_based",
            "--output-format=json",
            "--randrepeat=0",
            "--norandommap",
        ])
        .arg(format!("--rw={}", job.pattern.fio_rw()))
        .arg(format!("--bs={}", job.block_size))
        .arg(format!("--iodepth={}", job.queue_depth))
        .arg(format!("--runtime={}ms", job.runtime.as_millis()))
        .output()
        .context("cannot run fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON")?;
    let j = &json["jobs"][0];
    let side = if job.pattern.is_write() {
        &j["write"]
    } else {
        &j["read"]
    };
    let iops = side["iops"].as_f64().context("fio iops")?;
    let clat = &side["clat_ns"]["percentile"];
    let pct = |k: &str| clat[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let cpu_pct = j["usr_cpu"].as_f64().unwrap_or(0.0) + j["sys_cpu"].as_f64().unwrap_or(0.0);
    let process_cpu = children_cpu()?.saturating_sub(children_before);
    let runtime_s = j["job_runtime"]
        .as_f64()
        .unwrap_or(job.runtime.as_millis() as f64)
        / 1000.0;
    let ios = iops * runtime_s;
    Ok(Outcome {
        iops,
        mib_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        cpu_us_per_io: match cpu {
            FioCpu::JobThread => cpu_pct / 100.0 * runtime_s * 1e6,
            FioCpu::WholeProcess => process_cpu.as_secs_f64() * 1e6,
        } / ios.max(1.0),
    })
}

/// A data file of `size` bytes with real (allocated, non-zero) contents, so that reads hit
/// the disk rather than unwritten extents.
pub fn prepare_file(path: &std::path::Path, size: u64) -> Result<()> {
    use std::io::Write;
    if std::fs::metadata(path)
        .map(|m| m.len() == size)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let mut f = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for _ in 0..size >> 20 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let _ = f.as_raw_fd();
    Ok(())
}

/// A fully allocated qcow2 copy of the raw file next to it (made by qemu-img), so qcow2
/// is measured in its steady state: every cluster mapped, no allocation on the data path.
pub fn prepare_qcow2_copy(raw: &std::path::Path) -> Result<std::path::PathBuf> {
    let qcow2 = raw.with_extension("qcow2");
    let fresh = match (std::fs::metadata(raw), std::fs::metadata(&qcow2)) {
        (Ok(r), Ok(q)) => q.modified()? >= r.modified()?,
        _ => false,
    };
    if !fresh {
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(&qcow2)
            .status()
            .context("cannot run qemu-img (install qemu-utils)")?;
        if !status.success() {
            bail!("qemu-img convert failed: {status}");
        }
    }
    Ok(qcow2)
}
