//! virtio-net with two queue pairs on a real multiqueue TAP, in a network namespace of the
//! test's own: the device as the VMM runs it (its workers under the seccomp filter), a
//! simulated driver on real virtqueues, and a packet socket on the TAP's interface playing
//! the host's side. Frames for the guest are UDP flows, which the TAP spreads over its
//! attached queues by flow hash.

#[path = "support/virtq.rs"]
mod virtq;

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_vmm::devices::virtio::net::worker::MIN_PAIRS_CHANGE_INTERVAL;
use stratus_vmm::devices::virtio::net::*;
use stratus_vmm::devices::virtio::{
    ActivateContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use stratus_vmm::memory::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const TAP: &str = "stratusmq0";
const MEM_SIZE: usize = 16 << 20;
/// rx0, tx0, rx1, tx1, ctrl: one 64 KiB ring area each.
const RINGS: [u64; 5] = [0x0, 0x10000, 0x20000, 0x30000, 0x40000];
/// virtio-queue's mock puts the used ring 260 bytes after the avail ring, over its entries
/// past 127: no more buffers than that.
const RX_BUFFERS: u16 = 120;
const RX_BUFFER_LEN: u32 = 2048;
/// Where each RX queue's buffers start.
const RX_AREA: [u64; 2] = [0x10_0000, 0x20_0000];
const TX_AREA: u64 = 0x30_0000;
const CTRL_AREA: u64 = 0x40_0000;
const MARKER: &[u8; 10] = b"STRATUS-MQ";

#[derive(Default)]
struct Irqs([AtomicUsize; 5]);

impl VirtioInterrupt for Irqs {
    fn trigger(&self, kind: VirtioInterruptType) {
        match kind {
            VirtioInterruptType::Queue(q) if usize::from(q) < 5 => {
                self.0[usize::from(q)].fetch_add(1, Ordering::SeqCst);
            }
            other => panic!("unexpected interrupt {other:?}"),
        }
    }
}

/// One of the simulated driver's queues.
struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next: u16,
    kick: EventFd,
}

impl DriverQueue<'_> {
    fn add(&mut self, descs: &[(u64, u32, u32)]) -> u16 {
        let head = self.next;
        let raw = virtq::chain(descs, head);
        self.mock.add_desc_chains(&raw, head).unwrap();
        self.next += descs.len() as u16;
        head
    }

    fn used(&self) -> Vec<(u32, u32)> {
        let n = self.mock.used().idx().load();
        (0..usize::from(n))
            .map(|i| self.mock.used().ring().ref_at(i).unwrap().load())
            .map(|e| (e.id(), e.len()))
            .collect()
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }
}

/// The host's side of the TAP: a packet socket bound to its interface.
struct HostSide {
    socket: OwnedFd,
    ifindex: i32,
}

impl HostSide {
    fn open(interface: &str) -> Self {
        let name = std::ffi::CString::new(interface).unwrap();
        // SAFETY: if_nametoindex reads a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {interface}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(proto),
            )
        };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: the descriptor was just created and is owned here.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = Self::address(ifindex, proto);
        // SAFETY: bind reads a sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        HostSide { socket, ifindex }
    }

    fn address(ifindex: i32, proto: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex;
        addr
    }

    /// Sends an Ethernet frame out of the interface: the TAP hands it to one of its
    /// attached queues.
    fn send(&self, frame: &[u8]) {
        let addr = Self::address(self.ifindex, (libc::ETH_P_IP as u16).to_be());
        // SAFETY: sendto reads frame.len() bytes and a sockaddr_ll of the given size.
        let n = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the interface received (what the guest sent), within `timeout`.
    fn receive(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom writes at most buf.len() bytes and at most `len` bytes of
            // address.
            let n = unsafe {
                libc::recvfrom(
                    self.socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            // Our own frames towards the guest come back as outgoing copies.
            if i32::from(from.sll_pkttype) != libc::PACKET_OUTGOING as i32 {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

/// An Ethernet/IPv4/UDP frame of flow `flow` (its source port) carrying MARKER, the flow
/// and a sequence number: the TAP hashes the ports to pick a queue.
fn udp_frame(flow: u16, seq: u16) -> Vec<u8> {
    let mut payload = MARKER.to_vec();
    payload.extend_from_slice(&flow.to_be_bytes());
    payload.extend_from_slice(&seq.to_be_bytes());
    let udp_len = 8 + payload.len() as u16;
    let ip_len = 20 + udp_len;
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // to the guest
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[198, 18, 77, 2]);
    ip.extend_from_slice(&[198, 18, 77, 1]);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&(10_000 + flow).to_be_bytes());
    f.extend_from_slice(&7777u16.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    f
}

/// (flow, seq) of a marked frame, skipping the virtio-net header.
fn marked(packet: &[u8]) -> Option<(u16, u16)> {
    let frame = packet.get(VNET_HDR_LEN..)?;
    let at = frame.windows(MARKER.len()).position(|w| w == MARKER)? + MARKER.len();
    let rest = frame.get(at..at + 4)?;
    Some((
        u16::from_be_bytes([rest[0], rest[1]]),
        u16::from_be_bytes([rest[2], rest[3]]),
    ))
}

/// Runs `body` on a thread in a network namespace of its own (the threads it starts stay
/// in it).
fn in_own_netns(body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        body()
    })
    .join()
    .unwrap();
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    /// rx0, tx0, rx1, tx1, ctrl.
    queues: Vec<DriverQueue<'a>>,
}

impl Driver<'_> {
    /// The marked frames each RX queue holds, in the order they were used.
    fn received(&self) -> [Vec<(u16, u16)>; 2] {
        [0, 1].map(|pair| {
            let queue = &self.queues[2 * pair];
            queue
                .used()
                .into_iter()
                .filter_map(|(head, len)| {
                    let at = RX_AREA[pair] + u64::from(head) * u64::from(RX_BUFFER_LEN);
                    let mut buf = vec![0u8; len as usize];
                    self.mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
                    marked(&buf)
                })
                .collect()
        })
    }

    fn wait_for(&self, total: usize) -> [Vec<(u16, u16)>; 2] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.received();
            if got[0].len() + got[1].len() >= total || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends VQ_PAIRS_SET and returns the device's status byte.
    fn set_pairs(&mut self, pairs: u16, slot: u64) -> u8 {
        let at = CTRL_AREA + slot * 16;
        self.mem
            .write_slice(
                &[VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET],
                GuestAddress(at),
            )
            .unwrap();
        self.mem
            .write_slice(&pairs.to_le_bytes(), GuestAddress(at + 2))
            .unwrap();
        self.mem.write_slice(&[0xff], GuestAddress(at + 8)).unwrap();
        let ctrl = &mut self.queues[4];
        let before = ctrl.used().len();
        ctrl.add(&[(at, 2, 0), (at + 2, 2, 0), (at + 8, 1, VRING_DESC_F_WRITE)]);
        ctrl.kick();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctrl.used().len() == before {
            assert!(
                Instant::now() < deadline,
                "no answer to VQ_PAIRS_SET {pairs}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            ctrl.used()[before].1,
            1,
            "the status byte is the used length"
        );
        let mut status = [0u8];
        self.mem
            .read_slice(&mut status, GuestAddress(at + 8))
            .unwrap();
        status[0]
    }
}

fn nic(queues: u16, fd: Option<i32>) -> NetConfig {
    NetConfig {
        id: None,
        tap: TAP.into(),
        mac: "02:00:00:00:00:01".into(),
        fd,
        rate_limit: Default::default(),
        queues,
    }
}

#[test]
fn two_queue_pairs_share_a_multiqueue_tap_as_the_driver_asks() {
    stratus_vmm::seccomp::set_mode(stratus_vmm::seccomp::Mode::Kill);
    in_own_netns(|| {
        let mut device = VirtioNet::new(&nic(2, None)).unwrap();
        assert_eq!(
            device.queue_max_sizes().len(),
            5,
            "two pairs and a control queue"
        );
        let offered = device.available_features();
        assert_eq!(offered & VIRTIO_NET_F_MQ, VIRTIO_NET_F_MQ);
        assert_eq!(offered & VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_VQ);
        let mut cfg = [0u8; 2];
        device.read_config(8, &mut cfg);
        assert_eq!(u16::from_le_bytes(cfg), 2, "max_virtqueue_pairs");
        ip(&["link", "set", TAP, "up"]);
        let host = HostSide::open(TAP);

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut queues = Vec::new();
        let mut device_queues: Vec<Queue> = Vec::new();
        let mut events = Vec::new();
        for (i, ring) in RINGS.iter().enumerate() {
            let size = if i == 4 { CTRL_QUEUE_SIZE } else { QUEUE_SIZE };
            let mock = MockSplitQueue::create(&mem, GuestAddress(*ring), size);
            device_queues.push(mock.create_queue().unwrap());
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            events.push(kick.try_clone().unwrap());
            queues.push(DriverQueue {
                mock,
                next: 0,
                kick,
            });
        }
        let mut driver = Driver { mem: &mem, queues };
        for (pair, area) in RX_AREA.iter().enumerate() {
            for b in 0..RX_BUFFERS {
                let at = area + u64::from(b) * u64::from(RX_BUFFER_LEN);
                driver.queues[2 * pair].add(&[(at, RX_BUFFER_LEN, VRING_DESC_F_WRITE)]);
            }
        }
        let irqs = Arc::new(Irqs::default());
        device
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: irqs.clone(),
                queues: device_queues,
                queue_events: events,
                acked_features: VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MRG_RXBUF,
            })
            .unwrap();
        for pair in 0..2 {
            driver.queues[2 * pair].kick();
        }

        // Until the driver asks for more, everything comes to pair 0.
        for flow in 0..16 {
            host.send(&udp_frame(flow, 0));
        }
        let got = driver.wait_for(16);
        assert_eq!(got[0].len(), 16, "pair 0 before VQ_PAIRS_SET: {got:?}");
        assert!(got[1].is_empty(), "pair 1 before VQ_PAIRS_SET: {got:?}");

        // Out of range: refused, nothing changes.
        assert_eq!(driver.set_pairs(0, 0), VIRTIO_NET_ERR);
        assert_eq!(driver.set_pairs(3, 1), VIRTIO_NET_ERR);
        assert_eq!(driver.set_pairs(2, 2), VIRTIO_NET_OK);
        assert!(
            irqs.0[4].load(Ordering::SeqCst) >= 1,
            "control queue interrupt"
        );

        // 32 flows of two frames each: spread over both pairs by flow, none lost, and a
        // flow's frames stay on one pair, in order.
        for seq in 0..2 {
            for flow in 100..132 {
                host.send(&udp_frame(flow, seq));
            }
        }
        let got = driver.wait_for(16 + 64);
        let later: Vec<Vec<(u16, u16)>> = got
            .iter()
            .map(|q| q.iter().copied().filter(|(flow, _)| *flow >= 100).collect())
            .collect();
        assert_eq!(later[0].len() + later[1].len(), 64, "{later:?}");
        assert!(
            !later[0].is_empty() && !later[1].is_empty(),
            "32 flows all on one pair: {later:?}"
        );
        for (pair, frames) in later.iter().enumerate() {
            for flow in 100..132 {
                let seqs: Vec<u16> = frames
                    .iter()
                    .filter(|(f, _)| *f == flow)
                    .map(|(_, s)| *s)
                    .collect();
                assert!(
                    seqs.is_empty() || seqs == [0, 1],
                    "flow {flow} on pair {pair}: {seqs:?}"
                );
            }
        }
        assert!(irqs.0[2].load(Ordering::SeqCst) >= 1, "pair 1 RX interrupt");

        // A frame the guest sends on pair 1 leaves through the TAP.
        let mut out = vec![0u8; VNET_HDR_LEN];
        out.extend_from_slice(&udp_frame(999, 7));
        out[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        mem.write_slice(&out, GuestAddress(TX_AREA)).unwrap();
        driver.queues[3].add(&[(TX_AREA, out.len() as u32, 0)]);
        driver.queues[3].kick();
        let sent = loop {
            let frame = host
                .receive(Duration::from_secs(10))
                .expect("the frame sent on pair 1");
            if frame.windows(MARKER.len()).any(|w| w == MARKER) {
                break frame;
            }
        };
        assert_eq!(sent, out[VNET_HDR_LEN..]);
        assert_eq!(driver.queues[3].used().len(), 1);

        // Back to one pair: everything comes to pair 0 again.
        assert_eq!(driver.set_pairs(1, 3), VIRTIO_NET_OK);
        for flow in 200..216 {
            host.send(&udp_frame(flow, 0));
        }
        let got = driver.wait_for(16 + 64 + 16);
        let last: Vec<usize> = got
            .iter()
            .map(|q| q.iter().filter(|(flow, _)| *flow >= 200).count())
            .collect();
        assert_eq!(last, [16, 0], "after VQ_PAIRS_SET 1");

        // A guest switching back and forth gets its changes spaced out: each attaches or
        // detaches TAP queues under the host's RTNL lock. (The driver polls for the answer
        // every 5 ms, so the first answer is seen a little after the change.)
        assert_eq!(driver.set_pairs(2, 4), VIRTIO_NET_OK);
        let answered = Instant::now();
        assert_eq!(driver.set_pairs(1, 5), VIRTIO_NET_OK);
        let spaced = answered.elapsed();
        assert!(
            spaced >= MIN_PAIRS_CHANGE_INTERVAL / 2,
            "two changes {spaced:?} apart"
        );
        device.reset();
    });
}

#[test]
fn a_nic_refuses_queue_counts_it_cannot_have_before_opening_anything() {
    for queues in [0, MAX_QUEUE_PAIRS + 1] {
        let err = VirtioNet::new(&nic(queues, None))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("1 to 16 queue pairs"), "{err}");
    }
    // A descriptor handed over is one queue.
    let err = VirtioNet::new(&nic(2, Some(1000)))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("opens the TAP by name"), "{err}");
}

/// CPU time of this process's virtio-net worker threads.
fn net_workers_cpu() -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((name, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(')')) else {
            continue;
        };
        if !name.starts_with("virtio-net") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// The host deletes a running NIC's TAP: its descriptor then reports an error for ever,
/// which epoll delivers even unwatched. The worker stops reading it instead of waking in a
/// loop at full CPU (logging each time), and still stops when told.
#[test]
fn a_tap_deleted_under_a_running_nic_does_not_keep_its_worker_busy() {
    stratus_vmm::seccomp::set_mode(stratus_vmm::seccomp::Mode::Kill);
    in_own_netns(|| {
        let mut device = VirtioNet::new(&nic(1, None)).unwrap();
        ip(&["link", "set", TAP, "up"]);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut mocks = Vec::new();
        let mut queues: Vec<Queue> = Vec::new();
        let mut events = Vec::new();
        for ring in &RINGS[..2] {
            let mock = MockSplitQueue::create(&mem, GuestAddress(*ring), QUEUE_SIZE);
            queues.push(mock.create_queue().unwrap());
            events.push(EventFd::new(libc::EFD_NONBLOCK).unwrap());
            mocks.push(mock);
        }
        let irqs = Arc::new(Irqs::default());
        device
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: irqs,
                queues,
                queue_events: events,
                acked_features: VIRTIO_NET_F_MRG_RXBUF,
            })
            .unwrap();
        ip(&["link", "del", TAP]);
        // Time to notice; then the worker must be asleep.
        std::thread::sleep(Duration::from_millis(200));
        let before = net_workers_cpu();
        std::thread::sleep(Duration::from_millis(1000));
        let busy = net_workers_cpu() - before;
        assert!(
            busy < Duration::from_millis(300),
            "the worker ran {busy:?} of the last second"
        );
        device.reset();
    });
}
