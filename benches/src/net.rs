//! Device-level virtio-net benchmark. A simulated guest driver behaves like Linux's
//! virtio_net (EVENT_IDX both ways, mergeable RX buffers, TX frames in indirect tables) and
//! moves frames through real virtqueues in guest memory, served by stratus-vmm's net worker
//! on its own thread, on a TAP in a network namespace of this process's own. On the TAP's
//! kernel side a peer (an AF_PACKET socket on its own thread) receives what the guest
//! sends, sends what the guest receives, or echoes frames back. The raw limit is the same
//! peer against a thread that reads or writes the TAP descriptor itself, in the same run.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use stratus_vmm::devices::virtio::net::tap::Tap;
use stratus_vmm::devices::virtio::net::worker::{NetStats, NetWorker, NetWorkerParts};
use stratus_vmm::devices::virtio::net::{MAX_PACKET_LEN, VNET_HDR_LEN};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::{percentile, thread_cpu, EventInterrupt};

const QUEUE_SIZE: u16 = 256;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
/// Descriptor table, available ring and used ring of a queue, from its base.
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
const TX_TABLES: u64 = 0x1_0000;
const TX_TABLE_SIZE: u64 = 0x200;
const TX_FRAMES: u64 = 0x10_0000;
const TX_FRAME_STRIDE: u64 = 0x1_1000;
const RX_BUFFERS: u64 = 0x200_0000;
/// The VMM's smallest guest.
const MEM_SIZE: usize = 0x400_0000;
/// Linux's TX scatter-gather: the header and linear part, then page-sized fragments.
const TX_FRAGMENT: usize = 4096;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const TAP_NAME: &str = "snb0";
/// IEEE "local experimental" EtherType: nothing in the kernel answers or forwards it.
const ETHERTYPE_BENCH: u16 = 0x88b5;
const ETH_P_IP: u16 = 0x0800;
const GUEST_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0, 0x0a];
const PEER_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0, 0x01];
/// The 10-byte virtio_net_hdr an AF_PACKET socket with PACKET_VNET_HDR uses.
const PACKET_VNET_HDR_LEN: usize = 10;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Guest → TAP.
    Tx,
    /// TAP → guest.
    Rx,
}

#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub direction: Direction,
    /// Ethernet frame length, header included; above 1514 the frame is a TCP/IPv4 GSO frame
    /// the TAP carries whole (TSO).
    pub frame_len: usize,
    pub runtime: Duration,
}

impl Job {
    fn tso(&self) -> bool {
        self.frame_len > 1514
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    pub frames_per_s: f64,
    pub mib_s: f64,
    /// CPU time of the serving side (the net worker, or the raw thread) per frame.
    pub cpu_us_per_frame: f64,
    /// Frames one side handed over that the other never took: for TX, frames the TAP took
    /// that the peer's socket had no room for; for RX, frames the TAP dropped because its
    /// reader was behind (the TAP's own counter), and frames the worker dropped. The rates
    /// count what the device (or the raw thread) moved through the TAP.
    pub lost: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Moves this process into a network namespace of its own (before any thread starts, so
/// every thread shares it) with loopback up and IPv6 off, so that the kernel sends nothing
/// on the TAP by itself.
pub fn enter_private_netns() -> Result<()> {
    // SAFETY: unshare changes only this thread's namespaces; no other thread exists yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot make a network namespace (the net benchmark runs as root)");
    }
    std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
        .context("cannot turn IPv6 off in the benchmark's namespace")?;
    ip(&["link", "set", "lo", "up"])
}

/// Which CPUs the benchmark's threads run on (see `place_threads`).
struct Placement {
    /// The side under test: the raw thread, or the net worker.
    mover: usize,
    peer: usize,
    /// The simulated driver, the guest's vCPU.
    driver: usize,
}

static PLACEMENT: std::sync::OnceLock<Option<Placement>> = std::sync::OnceLock::new();

/// With two CPUs or more, the peer gets a CPU of its own and the side under test (the raw
/// thread, or the net worker) another, the same for both sides; the simulated driver gets a
/// third when there is one, and shares the worker's otherwise (the VM on one CPU, the
/// network on the other). Left to the scheduler, the peer and the side under test shared a
/// CPU in some runs and not in others, and the raw limit alone moved between 3.4 and
/// 10.9 GiB/s from run to run.
pub fn place_threads() -> Result<()> {
    let all = allowed_cpus()?;
    let placement = match all[..] {
        [] => bail!("this process may run on no CPU"),
        [_] => None,
        [mover, peer] => Some(Placement {
            mover,
            peer,
            driver: mover,
        }),
        [mover, driver, peer, ..] => Some(Placement {
            mover,
            peer,
            driver,
        }),
    };
    let _ = PLACEMENT.set(placement);
    Ok(())
}

fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size given; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET only reads the set, at an index below its size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` comes from allowed_cpus, below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot move a thread to CPUs {cpus:?}"));
    }
    Ok(())
}

/// Moves the calling thread to the CPUs `pick` chooses, when the host has CPUs to place on.
fn place(pick: impl Fn(&Placement) -> Vec<usize>) -> Result<()> {
    match PLACEMENT.get() {
        Some(Some(placement)) => pin_current_thread(&pick(placement)),
        _ => Ok(()),
    }
}

fn place_peer() -> Result<()> {
    place(|p| vec![p.peer])
}

fn place_mover() -> Result<()> {
    place(|p| vec![p.mover])
}

fn place_driver() -> Result<()> {
    place(|p| vec![p.driver])
}

/// The VM's CPUs (the worker's and the driver's): the worker decides whether to poll by the
/// CPUs it may use when it is made, and polling is no use when it shares its CPU with the
/// driver it waits for.
fn place_vm() -> Result<()> {
    place(|p| vec![p.mover, p.driver])
}

fn ip(args: &[&str]) -> Result<()> {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .context("cannot run ip (apt-get install iproute2)")?;
    if !status.success() {
        bail!("ip {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// A fresh TAP (it goes away with its descriptor) with the offloads a Linux guest accepts,
/// up, and its interface index.
fn open_tap() -> Result<(Tap, i32)> {
    let tap = Tap::open(TAP_NAME)?;
    tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)?;
    ip(&["link", "set", TAP_NAME, "up"])?;
    let name = std::ffi::CString::new(TAP_NAME)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that lives for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("{TAP_NAME} has no interface index");
    }
    Ok((tap, index as i32))
}

/// Frames the TAP dropped on the way to its reader (its queue was full): the `tx_dropped`
/// of the TAP in this network namespace's `/proc/net/dev`.
fn tap_dropped() -> Result<u64> {
    let table = std::fs::read_to_string("/proc/self/net/dev").context("/proc/self/net/dev")?;
    let counters = table
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(&format!("{TAP_NAME}:")))
        .with_context(|| format!("{TAP_NAME} is not in /proc/self/net/dev"))?;
    // Eight receive counters, then transmit bytes, packets, errors, drops.
    let dropped = counters
        .split_whitespace()
        .nth(11)
        .context("/proc/self/net/dev has too few columns")?;
    Ok(dropped.parse()?)
}

/// The frame under test (Ethernet header included) and the virtio-net header that goes
/// before it (12 bytes, num_buffers 0). GSO frames are TCP/IPv4 with partial checksums,
/// as a guest with TSO hands them over.
fn frame(job: &Job) -> (Vec<u8>, [u8; VNET_HDR_LEN]) {
    let mut f = vec![0u8; job.frame_len];
    f[0..6].copy_from_slice(&PEER_MAC);
    f[6..12].copy_from_slice(&GUEST_MAC);
    let mut hdr = [0u8; VNET_HDR_LEN];
    if job.tso() {
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let ip_len = (job.frame_len - 14) as u16;
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[198, 18, 0, 10]);
        ip[16..20].copy_from_slice(&[198, 18, 0, 1]);
        let sum = ip
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let folded = !((sum & 0xffff) + (sum >> 16)) as u16;
        ip[10..12].copy_from_slice(&folded.to_be_bytes());
        let tcp = &mut f[34..54];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x10; // ACK
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        // flags NEEDS_CSUM, gso TCPV4, hdr_len, gso_size, csum_start, csum_offset.
        hdr[0] = 1;
        hdr[1] = 1;
        hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
        hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    } else {
        f[12..14].copy_from_slice(&ETHERTYPE_BENCH.to_be_bytes());
    }
    for (i, b) in f.iter_mut().enumerate().skip(54) {
        *b = (i * 7) as u8;
    }
    (f, hdr)
}

/// An AF_PACKET socket on the TAP's kernel side. `protocol` 0 sends only; with `vnet` every
/// frame carries the 10-byte virtio_net_hdr (GSO frames then pass whole).
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn open(ifindex: i32, protocol: u16, vnet: bool) -> Result<Self> {
        let proto = i32::from(protocol.to_be());
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let sock = PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        if vnet {
            sock.set_int(libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        }
        sock.set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20)?;
        sock.set_int(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 16 << 20)?;
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol.to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: bind reads a sockaddr_ll of the given size that lives for the call.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("bind AF_PACKET socket");
        }
        Ok(sock)
    }

    fn set_int(&self, level: i32, name: i32, value: i32) -> Result<()> {
        // SAFETY: setsockopt reads one int that lives for the call.
        let rc = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                level,
                name,
                (&value as *const i32).cast(),
                4,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setsockopt on AF_PACKET");
        }
        Ok(())
    }

    fn send(&self, buf: &[u8]) -> std::io::Result<()> {
        // SAFETY: send reads buf.len() bytes from buf.
        let n = unsafe { libc::send(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// One incoming frame (frames this socket sent are skipped); None after `timeout`.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> std::io::Result<Option<usize>> {
        loop {
            if !wait_readable(self.0.as_raw_fd(), timeout)? {
                return Ok(None);
            }
            // SAFETY: an all-zero sockaddr_ll is valid for recvfrom to fill.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom writes at most buf.len() bytes into buf and a sockaddr_ll of
            // from_len bytes into from.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e);
            }
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                return Ok(Some(n as usize));
            }
        }
    }
}

fn wait_readable(fd: RawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd that lives for the call.
    let rc = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

/// What a peer thread counted.
#[derive(Default)]
struct PeerCount {
    frames: AtomicU64,
    bytes: AtomicU64,
}

/// The peer for guest → TAP: counts the frames that come out of the TAP.
fn spawn_sink(
    ifindex: i32,
    job: Job,
    stop: Arc<AtomicBool>,
) -> Result<(Arc<PeerCount>, std::thread::JoinHandle<Result<()>>)> {
    let protocol = if job.tso() { ETH_P_IP } else { ETHERTYPE_BENCH };
    let sock = PacketSocket::open(ifindex, protocol, job.tso())?;
    let count = Arc::new(PeerCount::default());
    let counted = count.clone();
    let handle = std::thread::spawn(move || {
        place_peer()?;
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        while !stop.load(Ordering::Relaxed) {
            if let Some(n) = sock.recv(&mut buf, Duration::from_millis(50))? {
                let frame = if job.tso() {
                    n - PACKET_VNET_HDR_LEN
                } else {
                    n
                };
                counted.frames.fetch_add(1, Ordering::Relaxed);
                counted.bytes.fetch_add(frame as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    Ok((count, handle))
}

/// What a TCP sender may have in flight towards the receiver in the bulk (TSO) rows: TCP's
/// window keeps a sender this far ahead of what the receiver took, where a source sending
/// regardless filled the TAP's queue (500 frames: 32 MiB of 64 KiB frames) whenever the
/// receiver fell behind once, and every frame read after that came from memory long out of
/// the caches: a copy up to 1.8 times slower, for whichever side, raw or stratus, it
/// happened to. The raw limit alone moved between 8 and 13 µs per frame with it.
const TSO_WINDOW_BYTES: usize = 4 << 20;

/// How long a source waits with its window full and nothing taken before it counts the
/// frames in flight as lost (the TAP dropped them) and sends on.
const WINDOW_STALL: Duration = Duration::from_millis(100);

/// The peer for TAP → guest: sends the frame over and over. Small frames go regardless (the
/// TAP drops what its reader does not take in time); bulk TSO frames only while fewer than
/// TSO_WINDOW_BYTES are in flight, counted against `taken`: the frames the receiving side
/// (the raw thread, or the simulated guest driver) has taken.
fn spawn_source(
    ifindex: i32,
    job: Job,
    taken: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<u64>>> {
    let sock = PacketSocket::open(ifindex, 0, job.tso())?;
    let (frame, hdr) = frame(&job);
    let mut wire = Vec::new();
    if job.tso() {
        wire.extend_from_slice(&hdr[..PACKET_VNET_HDR_LEN]);
    }
    wire.extend_from_slice(&frame);
    let window = if job.tso() {
        (TSO_WINDOW_BYTES / job.frame_len) as u64
    } else {
        u64::MAX
    };
    Ok(std::thread::spawn(move || {
        place_peer()?;
        let (mut sent, mut given_up, mut stalls) = (0u64, 0u64, 0u64);
        let mut stalled_since: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let in_flight = sent.saturating_sub(taken.load(Ordering::Relaxed) + given_up);
            if in_flight >= window {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= WINDOW_STALL {
                    stalls += 1;
                    given_up += in_flight;
                    stalled_since = None;
                }
                // Yielding, not spinning: without placement (one CPU) the receiver it waits
                // for may need this CPU.
                std::thread::yield_now();
                continue;
            }
            stalled_since = None;
            match sock.send(&wire) {
                Ok(()) => sent += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => std::thread::yield_now(),
                Err(e) => return Err(e).context("peer send"),
            }
        }
        Ok(stalls)
    }))
}

/// The peer for request/response: sends back every frame it gets.
fn spawn_echo(ifindex: i32, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<Result<()>>> {
    let sock = PacketSocket::open(ifindex, ETHERTYPE_BENCH, false)?;
    Ok(std::thread::spawn(move || {
        place_peer()?;
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Some(n) = sock.recv(&mut buf, Duration::from_millis(50))? {
                let n = n.min(buf.len());
                let (dst, src) = buf.split_at_mut(6);
                dst.swap_with_slice(&mut src[..6]);
                sock.send(&buf[..n]).context("echo")?;
            }
        }
        Ok(())
    }))
}

/// Stops the source; warns when its window stalled, which makes a row's rate suspect (the
/// receiver stopped taking frames for WINDOW_STALL, or frames vanished uncounted).
fn stop_source(stop: &AtomicBool, handle: std::thread::JoinHandle<Result<u64>>) -> Result<()> {
    stop.store(true, Ordering::Relaxed);
    let stalls = handle
        .join()
        .map_err(|_| anyhow::anyhow!("peer thread panicked"))??;
    if stalls > 0 {
        eprintln!("warning: the peer's window stalled {stalls} times in this row");
    }
    Ok(())
}

fn stop_peer(stop: &AtomicBool, handle: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    stop.store(true, Ordering::Relaxed);
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("peer thread panicked"))?
}

fn outcome(frames: u64, frame_len: usize, elapsed: Duration, cpu: Duration, lost: u64) -> Outcome {
    let secs = elapsed.as_secs_f64();
    Outcome {
        frames_per_s: frames as f64 / secs,
        mib_s: frames as f64 * frame_len as f64 / secs / f64::from(1 << 20),
        cpu_us_per_frame: cpu.as_secs_f64() * 1e6 / frames.max(1) as f64,
        lost,
    }
}

fn current_tid() -> i32 {
    // SAFETY: gettid has no side effects.
    unsafe { libc::gettid() }
}

/// The raw side's memory, backed as the VMM backs guest RAM (transparent huge pages asked
/// for, which hosts set to `madvise` give only where asked): a 64 KiB frame then spans one
/// TLB entry on both sides, not sixteen on one of them.
struct RamLike {
    mem: GuestMemoryMmap,
    len: usize,
}

impl RamLike {
    fn new(len: usize) -> Result<Self> {
        let mib = (len as u64).div_ceil(1 << 20).max(MEM_SIZE as u64 >> 20);
        let mem = stratus_vmm::memory::create_guest_memory(mib)?;
        Ok(RamLike { mem, len })
    }

    fn bytes(&mut self) -> Result<&mut [u8]> {
        // One region holds all `len` bytes, or this fails.
        let slice = GuestMemoryBackend::get_slice(&self.mem, GuestAddress(0), self.len)?;
        let start = slice.ptr_guard_mut().as_ptr();
        // SAFETY: `start` begins `len` mapped bytes that stay mapped as long as `self.mem`
        // lives, which the returned borrow of `self` cannot outlive; nothing else in this
        // process uses them.
        Ok(unsafe { std::slice::from_raw_parts_mut(start, self.len) })
    }
}

/// The raw limit: a thread that writes the frames to the TAP itself (Tx) or reads them from
/// it (Rx), with the same peer, from or into as much memory as the guest side uses.
pub fn run_raw(job: Job) -> Result<Outcome> {
    place_mover()?;
    let (tap, ifindex) = open_tap()?;
    let stop = Arc::new(AtomicBool::new(false));
    let tid = current_tid();
    match job.direction {
        Direction::Tx => {
            let (count, peer) = spawn_sink(ifindex, job, stop.clone())?;
            // As many copies of the frame as the guest has TX slots, in as much memory:
            // the kernel's copies then meet the same caches on both sides.
            let (frame, hdr) = frame(&job);
            let stride = TX_FRAME_STRIDE as usize;
            let mut ram = RamLike::new(stride * QUEUE_SIZE as usize)?;
            let area = ram.bytes()?;
            for slot in area.chunks_mut(stride) {
                slot[..VNET_HDR_LEN].copy_from_slice(&hdr);
                slot[VNET_HDR_LEN..VNET_HDR_LEN + frame.len()].copy_from_slice(&frame);
            }
            let packet_len = VNET_HDR_LEN + frame.len();
            let cpu_before = thread_cpu(tid)?;
            let started = Instant::now();
            let mut written = 0u64;
            while started.elapsed() < job.runtime {
                for slot in area.chunks(stride) {
                    let iov = [libc::iovec {
                        iov_base: slot.as_ptr() as *mut _,
                        iov_len: packet_len,
                    }];
                    tap.write_frame(&iov).context("raw TAP write")?;
                }
                written += u64::from(QUEUE_SIZE);
            }
            let elapsed = started.elapsed();
            let cpu = thread_cpu(tid)? - cpu_before;
            finish_tx(&job, written, elapsed, cpu, &stop, peer, &count)
        }
        Direction::Rx => {
            let taken = Arc::new(AtomicU64::new(0));
            let dropped_before = tap_dropped()?;
            let peer = spawn_source(ifindex, job, taken.clone(), stop.clone())?;
            // Frames land one after the other in an area as large as the guest's RX
            // buffers, as they do in the guest.
            let area_len = QUEUE_SIZE as usize * 4096;
            let mut ram = RamLike::new(area_len + MAX_PACKET_LEN)?;
            let area = ram.bytes()?;
            let step = (VNET_HDR_LEN + job.frame_len).next_multiple_of(4096);
            let mut at = 0usize;
            let cpu_before = thread_cpu(tid)?;
            let started = Instant::now();
            let mut read = 0u64;
            while started.elapsed() < job.runtime {
                match tap
                    .read_frame(&mut area[at..at + MAX_PACKET_LEN])
                    .context("raw TAP read")?
                {
                    Some(_) => {
                        read += 1;
                        taken.store(read, Ordering::Relaxed);
                        at = (at + step) % area_len;
                    }
                    None => {
                        wait_readable(tap.fd(), Duration::from_millis(50))?;
                    }
                }
            }
            let elapsed = started.elapsed();
            let cpu = thread_cpu(tid)? - cpu_before;
            // Before the peer stops: what it sends once the row is over does not count.
            let dropped = tap_dropped()? - dropped_before;
            stop_source(&stop, peer)?;
            Ok(outcome(read, job.frame_len, elapsed, cpu, dropped))
        }
    }
}

/// A split virtqueue seen from the driver's side, with EVENT_IDX.
struct DriverQueue {
    base: u64,
    avail_idx: u16,
    /// The available index the device was last told about (for vring_need_event).
    kicked_idx: u16,
    used_seen: u16,
    event: EventFd,
}

impl DriverQueue {
    fn device_queue(base: u64) -> Result<Queue> {
        let mut queue = Queue::new(QUEUE_SIZE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some((base + AVAIL_OFF) as u32), Some(0));
        queue.set_used_ring_address(Some((base + USED_OFF) as u32), Some(0));
        queue.set_event_idx(true);
        queue.set_ready(true);
        Ok(queue)
    }

    fn write_desc(
        mem: &DriverMem,
        at: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        mem.write(at, addr.to_le())?;
        mem.write(at + 8, len.to_le())?;
        mem.write(at + 12, flags.to_le())?;
        mem.write(at + 14, next.to_le())
    }

    fn push_avail(&mut self, mem: &DriverMem, head: u16) -> Result<()> {
        let entry = self.base + AVAIL_OFF + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        mem.write(entry, head.to_le())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publishes the new entries and kicks the device if its avail_event asks for it.
    fn publish(&mut self, mem: &DriverMem) -> Result<()> {
        fence(Ordering::Release);
        mem.write(self.base + AVAIL_OFF + 2, self.avail_idx.to_le())?;
        fence(Ordering::SeqCst);
        let avail_event =
            u16::from_le(mem.read(self.base + USED_OFF + 4 + 8 * u64::from(QUEUE_SIZE))?);
        let (new, old) = (self.avail_idx, self.kicked_idx);
        // vring_need_event: the device asked to hear about the entry at avail_event.
        if new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.event.write(1)?;
        }
        self.kicked_idx = new;
        Ok(())
    }

    /// Used entries not yet seen: (id, len).
    fn take_used(&mut self, mem: &DriverMem, out: &mut Vec<(u16, u32)>) -> Result<()> {
        let used_idx = u16::from_le(mem.read(self.base + USED_OFF + 2)?);
        fence(Ordering::Acquire);
        while self.used_seen != used_idx {
            let elem = self.base + USED_OFF + 4 + u64::from(self.used_seen % QUEUE_SIZE) * 8;
            let id = u32::from_le(mem.read(elem)?);
            let len = u32::from_le(mem.read(elem + 4)?);
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        Ok(())
    }

    /// Asks for an interrupt once `ahead` more entries are used (Linux's
    /// virtqueue_enable_cb_delayed asks at 3/4 of what is outstanding).
    fn want_interrupt_after(&self, mem: &DriverMem, ahead: u16) -> Result<()> {
        let used_event = self.used_seen.wrapping_add(ahead.saturating_sub(1));
        mem.write(
            self.base + AVAIL_OFF + 4 + 2 * u64::from(QUEUE_SIZE),
            used_event.to_le(),
        )?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    fn pending_used(&self, mem: &DriverMem) -> Result<bool> {
        let used_idx = u16::from_le(mem.read(self.base + USED_OFF + 2)?);
        Ok(used_idx != self.used_seen)
    }
}

/// The simulated driver's view of guest memory: plain loads and stores, as a guest's
/// driver makes them. Through `vm-memory`'s checked accessors the driver's own cost was
/// about a tenth of the worker's, on the CPU the two share (see `place_threads`).
struct DriverMem {
    host: *mut u8,
    /// Keeps the mapping `host` points into alive.
    _mem: GuestMemoryMmap,
}

impl DriverMem {
    fn new(mem: &GuestMemoryMmap) -> Result<Self> {
        let mut slices = GuestMemoryBackend::get_slices(mem, GuestAddress(0), MEM_SIZE);
        let all = slices
            .next()
            .context("the benchmark's guest memory is empty")??;
        if all.len() != MEM_SIZE {
            bail!("the benchmark's guest memory is not one mapping");
        }
        Ok(DriverMem {
            host: all.ptr_guard_mut().as_ptr(),
            _mem: mem.clone(),
        })
    }

    fn ptr<T>(&self, at: u64) -> Result<*mut T> {
        let at = usize::try_from(at)?;
        if at % std::mem::align_of::<T>() != 0 || at + std::mem::size_of::<T>() > MEM_SIZE {
            bail!("the simulated driver addressed {at:#x} outside its memory or unaligned");
        }
        // SAFETY: `at` plus the object's size is within the MEM_SIZE-byte mapping.
        Ok(unsafe { self.host.add(at) }.cast())
    }

    fn read<T: Copy>(&self, at: u64) -> Result<T> {
        let ptr = self.ptr::<T>(at)?;
        // SAFETY: `ptr` is aligned and within the mapping `_mem` keeps alive; volatile, as
        // the worker thread writes the same memory.
        Ok(unsafe { ptr.read_volatile() })
    }

    fn write<T>(&self, at: u64, value: T) -> Result<()> {
        let ptr = self.ptr::<T>(at)?;
        // SAFETY: as in `read`.
        unsafe { ptr.write_volatile(value) };
        Ok(())
    }
}

/// A net worker on a fresh TAP, running on its own thread.
struct Device {
    mem: GuestMemoryMmap,
    /// The driver's view of `mem`.
    ring: DriverMem,
    rx: DriverQueue,
    tx: DriverQueue,
    irq: EventFd,
    kill: EventFd,
    stats: Arc<NetStats>,
    tid: i32,
    handle: std::thread::JoinHandle<()>,
    ifindex: i32,
}

impl Device {
    fn start() -> Result<Device> {
        // Backed as the VMM backs guest RAM: with transparent huge pages asked for.
        let mem = stratus_vmm::memory::create_guest_memory((MEM_SIZE >> 20) as u64)?;
        let (tap, ifindex) = open_tap()?;
        let rx_event = EventFd::new(libc::EFD_NONBLOCK)?;
        let tx_event = EventFd::new(libc::EFD_NONBLOCK)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let stats = Arc::new(NetStats::default());
        place_vm()?;
        let worker = NetWorker::new(NetWorkerParts {
            mem: mem.clone(),
            pair: 0,
            tap: Arc::new(tap),
            rx: DriverQueue::device_queue(RX_RING)?,
            tx: DriverQueue::device_queue(TX_RING)?,
            rx_event: rx_event.try_clone()?,
            tx_event: tx_event.try_clone()?,
            interrupt: Arc::new(EventInterrupt(irq.try_clone()?)),
            kill: kill.try_clone()?,
            mergeable_rx: true,
            stats: stats.clone(),
            rx_limiter: None,
            tx_limiter: None,
            ctrl: None,
        })?;
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let _ = tid_tx.send(current_tid());
            if let Err(e) = place_mover() {
                eprintln!("{e:#}");
            }
            worker.run();
        });
        let tid = tid_rx.recv()?;
        place_driver()?;
        let queue = |base, event| DriverQueue {
            base,
            avail_idx: 0,
            kicked_idx: 0,
            used_seen: 0,
            event,
        };
        Ok(Device {
            ring: DriverMem::new(&mem)?,
            mem,
            rx: queue(RX_RING, rx_event),
            tx: queue(TX_RING, tx_event),
            irq,
            kill,
            stats,
            tid,
            handle,
            ifindex,
        })
    }

    fn stop(self) -> Result<()> {
        self.kill.write(1)?;
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("net worker panicked"))
    }

    /// Fills every RX descriptor with a `size`-byte buffer and makes them available.
    fn post_rx_buffers(&mut self, size: u32) -> Result<()> {
        for slot in 0..QUEUE_SIZE {
            self.post_rx(slot, size)?;
        }
        self.rx.publish(&self.ring)
    }

    fn post_rx(&mut self, slot: u16, size: u32) -> Result<()> {
        let desc = RX_RING + u64::from(slot) * 16;
        let buffer = RX_BUFFERS + u64::from(slot) * 4096;
        DriverQueue::write_desc(&self.ring, desc, buffer, size, VRING_DESC_F_WRITE, 0)?;
        self.rx.push_avail(&self.ring, slot)
    }

    /// Lays the frame (after its header) into TX slot `slot` as Linux does: one indirect
    /// table, the header and linear part first, then page-sized fragments.
    fn prepare_tx_slot(&self, slot: u16, frame: &[u8], hdr: &[u8; VNET_HDR_LEN]) -> Result<()> {
        let data = TX_FRAMES + u64::from(slot) * TX_FRAME_STRIDE;
        self.mem.write_slice(hdr, GuestAddress(data))?;
        self.mem
            .write_slice(frame, GuestAddress(data + VNET_HDR_LEN as u64))?;
        let total = VNET_HDR_LEN + frame.len();
        let table = TX_TABLES + u64::from(slot) * TX_TABLE_SIZE;
        let pieces: Vec<(u64, usize)> = (0..total)
            .step_by(TX_FRAGMENT)
            .map(|off| (data + off as u64, TX_FRAGMENT.min(total - off)))
            .collect();
        for (i, &(addr, len)) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let (flags, next) = if last {
                (0, 0)
            } else {
                (VRING_DESC_F_NEXT, i as u16 + 1)
            };
            DriverQueue::write_desc(
                &self.ring,
                table + i as u64 * 16,
                addr,
                len as u32,
                flags,
                next,
            )?;
        }
        let ring_desc = TX_RING + u64::from(slot) * 16;
        let table_len = (pieces.len() * 16) as u32;
        DriverQueue::write_desc(
            &self.ring,
            ring_desc,
            table,
            table_len,
            VRING_DESC_F_INDIRECT,
            0,
        )
    }

    /// Sleeps until the device interrupts (or 50 ms pass).
    fn wait_interrupt(&self) -> Result<()> {
        if wait_readable(self.irq.as_raw_fd(), Duration::from_millis(50))? {
            let _ = self.irq.read();
        }
        Ok(())
    }
}

/// The job through stratus-vmm's net worker.
pub fn run_stratus(job: Job) -> Result<Outcome> {
    let mut dev = Device::start()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (frame, hdr) = frame(&job);
    let result = match job.direction {
        Direction::Tx => stratus_tx(&mut dev, &job, &frame, &hdr, &stop),
        Direction::Rx => stratus_rx(&mut dev, &job, &stop),
    };
    let stats = dev.stats.report();
    dev.stop()?;
    let mut outcome = result?;
    if job.direction == Direction::Tx && stats.tx_dropped > 0 {
        bail!("the worker dropped {} TX frames", stats.tx_dropped);
    }
    outcome.lost += stats.rx_dropped;
    Ok(outcome)
}

fn stratus_tx(
    dev: &mut Device,
    job: &Job,
    frame: &[u8],
    hdr: &[u8; VNET_HDR_LEN],
    stop: &Arc<AtomicBool>,
) -> Result<Outcome> {
    let (count, peer) = spawn_sink(dev.ifindex, *job, stop.clone())?;
    for slot in 0..QUEUE_SIZE {
        dev.prepare_tx_slot(slot, frame, hdr)?;
    }
    let mut free: Vec<u16> = (0..QUEUE_SIZE).rev().collect();
    let mut used = Vec::with_capacity(QUEUE_SIZE as usize);
    let cpu_before = thread_cpu(dev.tid)?;
    let started = Instant::now();
    while started.elapsed() < job.runtime {
        used.clear();
        dev.tx.take_used(&dev.ring, &mut used)?;
        free.extend(used.iter().map(|&(id, _)| id));
        if free.is_empty() {
            // Ring full: like Linux, stop the queue and ask for an interrupt once most of
            // what is outstanding has gone out.
            dev.tx.want_interrupt_after(&dev.ring, QUEUE_SIZE * 3 / 4)?;
            if !dev.tx.pending_used(&dev.ring)? {
                dev.wait_interrupt()?;
            }
            continue;
        }
        // Linux's start_xmit adds and kicks frame by frame; the kick is skipped while the
        // device is still busy (EVENT_IDX), which is what batches.
        while let Some(slot) = free.pop() {
            dev.tx.push_avail(&dev.ring, slot)?;
            dev.tx.publish(&dev.ring)?;
        }
    }
    let elapsed = started.elapsed();
    let cpu = thread_cpu(dev.tid)? - cpu_before;
    let written = dev.stats.report().tx_frames;
    finish_tx(job, written, elapsed, cpu, stop, peer, &count)
}

/// Lets what is still in flight reach the sink, stops it, and counts what it missed.
fn finish_tx(
    job: &Job,
    written: u64,
    elapsed: Duration,
    cpu: Duration,
    stop: &AtomicBool,
    peer: std::thread::JoinHandle<Result<()>>,
    count: &PeerCount,
) -> Result<Outcome> {
    std::thread::sleep(Duration::from_millis(100));
    stop_peer(stop, peer)?;
    let got = count.frames.load(Ordering::Relaxed);
    Ok(outcome(
        written,
        job.frame_len,
        elapsed,
        cpu,
        written.saturating_sub(got),
    ))
}

fn stratus_rx(dev: &mut Device, job: &Job, stop: &Arc<AtomicBool>) -> Result<Outcome> {
    // Linux sizes mergeable buffers by the average frame: a page for big ones.
    let buffer = if job.tso() { 4096 } else { 1536 };
    dev.post_rx_buffers(buffer)?;
    let taken = Arc::new(AtomicU64::new(0));
    let dropped_before = tap_dropped()?;
    let peer = spawn_source(dev.ifindex, *job, taken.clone(), stop.clone())?;
    let mut used = Vec::with_capacity(QUEUE_SIZE as usize);
    let cpu_before = thread_cpu(dev.tid)?;
    let started = Instant::now();
    let (mut frames, mut remaining_buffers) = (0u64, 0u16);
    while started.elapsed() < job.runtime {
        // Frames the worker dropped are gone too: they no longer count against the window.
        let dropped_by_worker = dev.stats.rx_dropped.load(Ordering::Relaxed);
        taken.store(frames + dropped_by_worker, Ordering::Relaxed);
        used.clear();
        dev.rx.take_used(&dev.ring, &mut used)?;
        if used.is_empty() {
            dev.rx.want_interrupt_after(&dev.ring, 1)?;
            if !dev.rx.pending_used(&dev.ring)? {
                dev.wait_interrupt()?;
            }
            continue;
        }
        for &(id, len) in &used {
            if remaining_buffers == 0 {
                let at = RX_BUFFERS + u64::from(id) * 4096 + 10;
                let num_buffers = u16::from_le(dev.ring.read(at)?);
                if num_buffers == 0 || len < VNET_HDR_LEN as u32 {
                    bail!("the worker wrote a frame with num_buffers {num_buffers}, length {len}");
                }
                remaining_buffers = num_buffers;
            }
            remaining_buffers -= 1;
            if remaining_buffers == 0 {
                frames += 1;
            }
            dev.post_rx(id, buffer)?;
        }
        taken.store(
            frames + dev.stats.rx_dropped.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        dev.rx.publish(&dev.ring)?;
    }
    let elapsed = started.elapsed();
    let cpu = thread_cpu(dev.tid)? - cpu_before;
    // Before the peer stops: what it sends once the row is over does not count.
    let dropped = tap_dropped()? - dropped_before;
    stop_source(stop, peer)?;
    Ok(outcome(frames, job.frame_len, elapsed, cpu, dropped))
}

/// Request/response: a 64-byte frame out, the peer's echo back, one at a time; the raw side
/// writes to and reads from the TAP itself.
pub fn latency(raw: bool, rounds: u64) -> Result<Latency> {
    let job = Job {
        direction: Direction::Tx,
        frame_len: 64,
        runtime: Duration::ZERO,
    };
    let (frame, hdr) = frame(&job);
    let stop = Arc::new(AtomicBool::new(false));
    let mut samples: Vec<u32> = Vec::with_capacity(rounds as usize);
    if raw {
        place_mover()?;
        let (tap, ifindex) = open_tap()?;
        let echo = spawn_echo(ifindex, stop.clone())?;
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut _,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut _,
                iov_len: frame.len(),
            },
        ];
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        for _ in 0..rounds {
            let start = Instant::now();
            tap.write_frame(&iov)?;
            loop {
                if tap.read_frame(&mut buf)?.is_some() {
                    break;
                }
                if !wait_readable(tap.fd(), Duration::from_secs(1))? {
                    bail!("no echo within a second (raw TAP)");
                }
            }
            samples.push(start.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        stop_peer(&stop, echo)?;
    } else {
        let mut dev = Device::start()?;
        let echo = spawn_echo(dev.ifindex, stop.clone())?;
        dev.post_rx_buffers(1536)?;
        dev.prepare_tx_slot(0, &frame, &hdr)?;
        let mut used = Vec::new();
        let result = (|| -> Result<()> {
            for _ in 0..rounds {
                let start = Instant::now();
                dev.rx.want_interrupt_after(&dev.ring, 1)?;
                dev.tx.push_avail(&dev.ring, 0)?;
                dev.tx.publish(&dev.ring)?;
                loop {
                    used.clear();
                    dev.rx.take_used(&dev.ring, &mut used)?;
                    if !used.is_empty() {
                        break;
                    }
                    if start.elapsed() > Duration::from_secs(1) {
                        bail!("no echo within a second (stratus)");
                    }
                    dev.wait_interrupt()?;
                }
                samples.push(start.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                for &(id, _) in &used {
                    dev.post_rx(id, 1536)?;
                }
                dev.rx.publish(&dev.ring)?;
                let mut done = Vec::new();
                while done.is_empty() {
                    dev.tx.take_used(&dev.ring, &mut done)?;
                }
            }
            Ok(())
        })();
        stop_peer(&stop, echo)?;
        dev.stop()?;
        result?;
    }
    samples.sort_unstable();
    Ok(Latency {
        p50_us: percentile(&samples, 0.50),
        p99_us: percentile(&samples, 0.99),
    })
}
