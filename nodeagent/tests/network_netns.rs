//! Host networking against the real kernel, inside network namespaces these tests create.
//! They need root, iproute2 and busybox (udhcpc): CI runs as root, so a missing capability
//! is a failure, not a skip. Only 198.18.0.0/15 (RFC 2544 benchmarking) addresses are used.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stratus_nodeagent::network::{
    BridgeConfig, DhcpServer, DhcpTable, LinkError, LinkKind, Netlink, NetworkPool, PoolDefinition,
    TapConfig,
};

/// Deletes the namespace on drop, also when the test panics, so nothing is left behind.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "stratus-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = run("ip", &["netns", "add", &name]);
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed (these tests need root and iproute2): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a setup command in the namespace and fails the test if it fails.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered this namespace, under a runtime on that thread,
    /// so every socket it opens (netlink, DHCP) belongs to the namespace.
    fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        });
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = run("ip", &["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "cleanup: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (is it installed?): {e}"))
}

fn sysfs(ns: &NetNs, dev: &str, attr: &str) -> String {
    // `ip netns exec` mounts a sysfs of the namespace, so /sys/class/net shows its devices.
    ns.ok(&["cat", &format!("/sys/class/net/{dev}/{attr}")])
        .trim()
        .to_string()
}

const BRIDGE: &str = "stbr0";
const TAP: &str = "sttap0";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn bridge_cfg() -> BridgeConfig {
    BridgeConfig {
        name: BRIDGE.into(),
        mtu: Some(1400),
        address: Some((GATEWAY, 24)),
    }
}

fn tap_cfg() -> TapConfig {
    TapConfig {
        name: TAP.into(),
        bridge: Some(BRIDGE.into()),
        mtu: Some(1400),
        owner: Some(65534),
        group: Some(65534),
        multi_queue: false,
    }
}

#[test]
fn tap_and_bridge_converge_and_delete_cleanly() {
    let ns = NetNs::new("links");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();

        let b1 = nl.ensure_bridge(&bridge_cfg()).await.unwrap();
        let b2 = nl.ensure_bridge(&bridge_cfg()).await.unwrap();
        assert_eq!(b1, b2);
        assert_eq!(b1.kind, LinkKind::Bridge);
        assert!(b1.up);
        assert_eq!(b1.mtu, 1400);
        assert_eq!(nl.ipv4_addresses(BRIDGE).await.unwrap(), vec![(GATEWAY, 24)]);

        let tap = nl.ensure_tap(&tap_cfg()).await.unwrap();
        let state = nl.link(TAP).await.unwrap().unwrap();
        assert_eq!(state.index, tap.index);
        assert_eq!(state.kind, LinkKind::Tun);
        assert_eq!(state.controller, Some(b1.index));
        assert_eq!(state.mtu, 1400);
        assert!(state.up);

        // A non-multiqueue TAP has one queue: while it is held, nobody else may attach.
        let busy = nl.ensure_tap(&tap_cfg()).await.unwrap_err();
        assert!(
            matches!(&busy, LinkError::Tun { source, .. } if source.raw_os_error() == Some(libc::EBUSY)),
            "{busy}"
        );
        drop(tap);

        // Persistent: closing the fd keeps the device, and a second ensure re-attaches.
        assert!(nl.link(TAP).await.unwrap().is_some());
        let again = nl.ensure_tap(&tap_cfg()).await.unwrap();
        assert_eq!(again.index, state.index);
        drop(again);
        let all = nl.links().await.unwrap();
        assert_eq!(all.iter().filter(|l| l.name == TAP).count(), 1);
        assert_eq!(all.iter().filter(|l| l.name == BRIDGE).count(), 1);
    });

    // Owned by the VMM user, with the flags a virtio-net backend needs.
    assert_eq!(sysfs(&ns, TAP, "owner"), "65534");
    assert_eq!(sysfs(&ns, TAP, "group"), "65534");
    let flags =
        u32::from_str_radix(sysfs(&ns, TAP, "tun_flags").trim_start_matches("0x"), 16).unwrap();
    let want = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u32;
    assert_eq!(flags & want, want, "tun_flags {flags:#x}");
    assert_ne!(flags & libc::IFF_PERSIST as u32, 0, "tun_flags {flags:#x}");

    // What a crash halfway through could leave: detached, down, wrong MTU, address gone.
    ns.ok(&["ip", "link", "set", TAP, "nomaster", "down", "mtu", "1500"]);
    ns.ok(&["ip", "link", "set", BRIDGE, "down"]);
    ns.ok(&["ip", "addr", "flush", "dev", BRIDGE]);

    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        let b = nl.ensure_bridge(&bridge_cfg()).await.unwrap();
        assert!(b.up);
        assert_eq!(
            nl.ipv4_addresses(BRIDGE).await.unwrap(),
            vec![(GATEWAY, 24)]
        );
        drop(nl.ensure_tap(&tap_cfg()).await.unwrap());
        let t = nl.link(TAP).await.unwrap().unwrap();
        assert_eq!(t.controller, Some(b.index));
        assert_eq!(t.mtu, 1400);
        assert!(t.up);

        assert!(nl.delete_tap(TAP).await.unwrap());
        assert!(!nl.delete_tap(TAP).await.unwrap());
        assert!(nl.link(TAP).await.unwrap().is_none());
        assert!(nl.delete_bridge(BRIDGE).await.unwrap());
        assert!(!nl.delete_bridge(BRIDGE).await.unwrap());
        let left: Vec<String> = nl
            .links()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(left, vec!["lo".to_string()], "links left behind");
    });
}

#[test]
fn refuses_to_touch_devices_of_another_kind() {
    let ns = NetNs::new("kinds");
    // veth rather than dummy: the dummy module is not built into every CI kernel.
    ns.ok(&[
        "ip", "link", "add", "stdum0", "type", "veth", "peer", "name", "stdum1",
    ]);
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        let as_tap = TapConfig {
            name: "stdum0".into(),
            bridge: None,
            ..tap_cfg()
        };
        for err in [
            nl.ensure_tap(&as_tap).await.unwrap_err(),
            nl.delete_tap("stdum0").await.unwrap_err(),
            nl.delete_bridge("stdum0").await.unwrap_err(),
            nl.ensure_bridge(&BridgeConfig {
                name: "stdum0".into(),
                ..bridge_cfg()
            })
            .await
            .unwrap_err(),
        ] {
            assert!(
                matches!(&err, LinkError::WrongKind { name, found: LinkKind::Veth, .. }
                    if name == "stdum0"),
                "{err}"
            );
        }
        assert_eq!(
            nl.link("stdum0").await.unwrap().unwrap().kind,
            LinkKind::Veth
        );

        let err = nl.ensure_tap(&tap_cfg()).await.unwrap_err();
        assert!(
            matches!(&err, LinkError::NoBridge { tap, bridge } if tap == TAP && bridge == BRIDGE),
            "{err}"
        );
        assert!(
            nl.link(TAP).await.unwrap().is_none(),
            "TAP created despite missing bridge"
        );

        for bad in ["", "much-too-long-name", "a/b", "a b", "x:1"] {
            let err = nl.delete_tap(bad).await.unwrap_err();
            assert!(
                matches!(&err, LinkError::InvalidName(n) if n == bad),
                "{err}"
            );
        }
    });
}

const POOL_JSON: &str = r#"{
    "kind": "public",
    "subnet": "198.18.0.0/24",
    "gateway": "198.18.0.1",
    "dns_servers": ["198.18.0.2", "198.18.0.3"],
    "domain": "cloud.example.org",
    "lease_time_secs": 600,
    "addresses": {"fixed": [
        {"ip": "198.18.0.10", "hostname": "onevm-10"},
        {"ip": "198.18.0.11"}
    ]}
}"#;

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# Prints the lease for the test to check, and applies it like a guest's script would.
case "$1" in
bound|renew)
    echo "LEASE ip=$ip|mask=$mask|subnet=$subnet|router=$router|dns=$dns|domain=$domain|hostname=$hostname|lease=$lease|serverid=$serverid"
    ip addr add "$ip/$mask" dev "$interface"
    ;;
esac
exit 0
"#;

/// Runs busybox udhcpc once in the guest namespace; returns the lease variables it got, or
/// `None` if it gave up without a lease.
async fn udhcpc(guest: &str, script: &str, tries: &str) -> Option<HashMap<String, String>> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args([
        "netns", "exec", guest, "busybox", "udhcpc", "-f", "-q", "-n",
    ])
    .args(["-t", tries, "-T", "1", "-i", "vg0", "-s", script])
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("udhcpc did not exit")
        .expect("cannot run busybox udhcpc (is busybox installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lease_line = stdout.lines().find_map(|l| l.strip_prefix("LEASE "));
    match (out.status.success(), lease_line) {
        (true, Some(line)) => Some(
            line.split('|')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        (false, None) => None,
        (ok, line) => panic!(
            "udhcpc exit success={ok} but lease line {line:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn guest_gets_its_fixed_lease_and_strangers_get_nothing() {
    let host = NetNs::new("host");
    let guest = NetNs::new("guest");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("udhcpc.sh");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = script.to_str().unwrap().to_string();

    let mut pool = NetworkPool::new(PoolDefinition::from_json(POOL_JSON).unwrap()).unwrap();
    let lease = pool.allocate("vm-1").unwrap();
    assert_eq!(lease.ip, Ipv4Addr::new(198, 18, 0, 10));
    let guest_mac = lease.mac.to_string();
    assert_eq!(guest_mac, "02:00:c6:12:00:0a");
    // In the pool but not leased: the server must not answer it either.
    let unleased_mac = "02:00:c6:12:00:0b";
    let foreign_mac = "0a:0a:c6:12:00:63";

    let guest_name = guest.name.clone();
    let host_name = host.name.clone();
    let host_exec = move |args: &[&str]| {
        let mut full = vec!["netns", "exec", &host_name];
        full.extend_from_slice(args);
        let out = run("ip", &full);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let guest_exec = {
        let g = guest_name.clone();
        move |args: &[&str]| {
            let mut full = vec!["netns", "exec", g.as_str()];
            full.extend_from_slice(args);
            run("ip", &full)
        }
    };

    host.run(move || async move {
        let nl = Netlink::connect().unwrap();
        let br = nl.ensure_bridge(&bridge_cfg()).await.unwrap();
        let tap = nl.ensure_tap(&tap_cfg()).await.unwrap();
        // The guest end is a veth in its own namespace standing in for a VM's virtio-net.
        host_exec(&[
            "ip",
            "link",
            "add",
            "vh0",
            "type",
            "veth",
            "peer",
            "name",
            "vg0",
            "netns",
            &guest_name,
        ]);
        host_exec(&["ip", "link", "set", "vh0", "master", BRIDGE, "up"]);
        assert_eq!(
            nl.link("vh0").await.unwrap().unwrap().controller,
            Some(br.index)
        );
        let set_mac = |mac: &str| {
            for args in [
                vec!["ip", "addr", "flush", "dev", "vg0"],
                vec!["ip", "link", "set", "vg0", "down"],
                vec!["ip", "link", "set", "vg0", "address", mac, "up"],
            ] {
                let out = guest_exec(&args);
                assert!(
                    out.status.success(),
                    "{args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };

        let server = DhcpServer::new(GATEWAY, DhcpTable::new(pool.dhcp_hosts()));
        let bound = server.bind(BRIDGE).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(bound.run(async {
            let _ = stopped.await;
        }));

        set_mac(&guest_mac);
        let got = udhcpc(&guest_name, &script, "5")
            .await
            .expect("known MAC got no lease");
        let expect = [
            ("ip", "198.18.0.10"),
            ("mask", "24"),
            ("subnet", "255.255.255.0"),
            ("router", "198.18.0.1"),
            ("dns", "198.18.0.2 198.18.0.3"),
            ("domain", "cloud.example.org"),
            ("hostname", "onevm-10"),
            ("lease", "600"),
            ("serverid", "198.18.0.1"),
        ];
        for (k, v) in expect {
            assert_eq!(got.get(k).map(String::as_str), Some(v), "{k} in {got:?}");
        }
        let addrs = String::from_utf8_lossy(
            &guest_exec(&["ip", "-4", "addr", "show", "dev", "vg0"]).stdout,
        )
        .into_owned();
        assert!(addrs.contains("198.18.0.10/24"), "{addrs}");
        // The guest reaches the host over the bridge at the address it leased.
        let ping = guest_exec(&["busybox", "ping", "-c", "1", "-W", "3", "198.18.0.1"]);
        assert!(
            ping.status.success(),
            "ping: {}",
            String::from_utf8_lossy(&ping.stdout)
        );

        for stranger in [unleased_mac, foreign_mac] {
            set_mac(stranger);
            assert_eq!(
                udhcpc(&guest_name, &script, "2").await,
                None,
                "{stranger} got a lease"
            );
            let addrs = String::from_utf8_lossy(
                &guest_exec(&["ip", "-4", "addr", "show", "dev", "vg0"]).stdout,
            )
            .into_owned();
            assert!(!addrs.contains("inet "), "{stranger}: {addrs}");
        }

        // The silence above was the lease table, not a dead server.
        set_mac(&guest_mac);
        let again = udhcpc(&guest_name, &script, "5")
            .await
            .expect("server stopped answering");
        assert_eq!(again.get("ip").map(String::as_str), Some("198.18.0.10"));

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("server did not stop")
            .unwrap();
        drop(tap);
        assert!(nl.delete_tap(TAP).await.unwrap());
        assert!(nl.delete_bridge(BRIDGE).await.unwrap());
    });
}

/// Frames as a guest's virtio-net writes them into its TAP, and what the TAP hands back.
mod frames {
    use std::fs::File;
    use std::io::{ErrorKind, Read, Write};
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode};
    use dhcproto::{Decodable, Encodable};

    /// The TAP's default virtio-net header (no offloads): all zeros on the way in.
    const VNET_HDR_LEN: usize = 10;
    pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

    pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(14 + payload.len());
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// An IPv4/UDP datagram (UDP checksum 0: none, which IPv4 allows).
    pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + data.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let sum = ip
            .chunks(2)
            .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
        let folded = !(((sum & 0xffff) + (sum >> 16)) as u16);
        ip[10..12].copy_from_slice(&folded.to_be_bytes());
        ip.extend_from_slice(&sport.to_be_bytes());
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(data);
        ip
    }

    /// An ARP reply announcing that `ip` is at `mac`.
    pub fn arp_announce(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
        let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 2];
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&ip.octets());
        arp.extend_from_slice(&BROADCAST_MAC);
        arp.extend_from_slice(&ip.octets());
        ethernet(BROADCAST_MAC, mac, 0x0806, &arp)
    }

    pub fn dhcp_discover(src_mac: [u8; 6], chaddr: [u8; 6], xid: u32) -> Vec<u8> {
        let mut msg = Message::default();
        msg.set_opcode(Opcode::BootRequest)
            .set_xid(xid)
            .set_flags(Flags::default().set_broadcast())
            .set_chaddr(&chaddr);
        msg.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        let body = msg.to_vec().unwrap();
        let datagram = udp(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67, &body);
        ethernet(BROADCAST_MAC, src_mac, 0x0800, &datagram)
    }

    /// The xid of a DHCP offer in a frame, if it is one.
    pub fn dhcp_offer_xid(frame: &[u8]) -> Option<u32> {
        if frame.len() < 14 + 28 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
            return None;
        }
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let udp = frame.get(14 + ihl..)?;
        if udp.len() < 8 || udp[0..2] != 67u16.to_be_bytes() {
            return None;
        }
        let msg = Message::decode(&mut dhcproto::Decoder::new(&udp[8..])).ok()?;
        matches!(msg.opts().msg_type(), Some(MessageType::Offer)).then_some(msg.xid())
    }

    pub fn send(tap: &mut File, frame: &[u8]) {
        let mut buf = vec![0u8; VNET_HDR_LEN];
        buf.extend_from_slice(frame);
        tap.write_all(&buf).expect("write a frame into the TAP");
    }

    /// Every frame the TAP delivers to its guest until `until` returns true for one, or the
    /// time is up. Async: the agent's DHCP server runs on the same runtime.
    pub async fn receive_until(
        tap: &mut File,
        within: Duration,
        mut until: impl FnMut(&[u8]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + within;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            match tap.read(&mut buf) {
                Ok(n) if n > VNET_HDR_LEN => {
                    let frame = buf[VNET_HDR_LEN..n].to_vec();
                    let done = until(&frame);
                    frames.push(frame);
                    if done {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => panic!("read from TAP: {e}"),
            }
        }
        frames
    }

    pub fn contains(frames: &[Vec<u8>], marker: &[u8]) -> bool {
        frames
            .iter()
            .any(|f| f.windows(marker.len()).any(|w| w == marker))
    }
}

#[test]
fn guests_can_only_send_as_their_own_mac_and_address() {
    use frames::*;
    use stratus_nodeagent::api::types::NicSpec;
    use stratus_nodeagent::networks::{NetworkConfig, Networks};
    use stratus_vmm::devices::virtio::net::tap::{attach_tap, TapError};

    let host = NetNs::new("spoof");
    let ns_name = host.name.clone();
    host.run(move || async move {
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", ns_name.as_str()];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        let config = NetworkConfig {
            name: "public".into(),
            bridge: BRIDGE.into(),
            subnet: "198.18.0.0/24".parse().unwrap(),
            address: GATEWAY,
            gateway: None,
            dns_servers: vec![],
            domain: None,
            lease_time_secs: 600,
            anti_spoofing: true,
        };
        let networks = Networks::start(&[config]).await.unwrap();
        let nic = |mac: &str, ip: [u8; 4]| NicSpec {
            id: "eth0".into(),
            network: "public".into(),
            mac: mac.into(),
            ip: Ipv4Addr::from(ip),
            hostname: None,
            queues: 1,
        };
        let (mac_a, ip_a) = ([2, 0, 0xc6, 0x12, 0, 10], Ipv4Addr::new(198, 18, 0, 10));
        let (mac_b, ip_b) = ([2, 0, 0xc6, 0x12, 0, 11], Ipv4Addr::new(198, 18, 0, 11));
        let nic_a = nic("02:00:c6:12:00:0a", ip_a.octets());
        let nic_b = nic("02:00:c6:12:00:0b", ip_b.octets());
        let tap_a = networks.plug("vm-a", 0, &nic_a, None).await.unwrap();
        let tap_b = networks.plug("vm-b", 0, &nic_b, None).await.unwrap();
        // As a VMM would: the agent's own descriptor may still be held for a moment by a
        // fork of this test process (the other tests start `ip`), so EBUSY is retried.
        let attach = |name: &str| {
            for _ in 0..40 {
                match attach_tap(name, true, false) {
                    Err(TapError::Attach { source, .. })
                        if source.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(50))
                    }
                    other => return other.unwrap(),
                }
            }
            panic!("{name} stayed busy");
        };
        let mut a = attach(&tap_a);
        let mut b = attach(&tap_b);
        for tap in [&tap_a, &tap_b] {
            let out = in_ns(&["ip", "link", "set", tap, "up"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Ports of a fresh bridge learn and forward only once STP's forward delay is over.
        let settle = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let probe = ethernet(
                BROADCAST_MAC,
                mac_a,
                0x0800,
                &udp(ip_a, Ipv4Addr::new(198, 18, 0, 255), 9, 9, b"settle"),
            );
            send(&mut a, &probe);
            if contains(
                &receive_until(&mut b, Duration::from_millis(200), |f| {
                    f.ends_with(b"settle")
                })
                .await,
                b"settle",
            ) {
                break;
            }
            assert!(
                std::time::Instant::now() < settle,
                "the bridge never forwarded A's frames to B"
            );
        }

        // Each spoofed frame is followed by a legitimate one: once B has the legitimate
        // frame, the spoofed one would have arrived before it.
        let broadcast_ip = Ipv4Addr::new(198, 18, 0, 255);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "another guest's MAC",
                ethernet(
                    BROADCAST_MAC,
                    mac_b,
                    0x0800,
                    &udp(ip_b, broadcast_ip, 9, 9, b"spoof-mac"),
                ),
            ),
            (
                "another guest's IPv4 address",
                ethernet(
                    BROADCAST_MAC,
                    mac_a,
                    0x0800,
                    &udp(ip_b, broadcast_ip, 9, 9, b"spoof-ip"),
                ),
            ),
            (
                "an address outside its lease",
                ethernet(
                    BROADCAST_MAC,
                    mac_a,
                    0x0800,
                    &udp(
                        Ipv4Addr::new(198, 18, 0, 99),
                        broadcast_ip,
                        9,
                        9,
                        b"spoof-free-ip",
                    ),
                ),
            ),
            (
                "an ARP claim on another guest's address",
                arp_announce(mac_a, ip_b),
            ),
            (
                // Every reply of the server is broadcast: a guest sees its neighbours'
                // transaction ids and could answer them with its own router or DNS.
                "a DHCP answer from its own address",
                ethernet(
                    BROADCAST_MAC,
                    mac_a,
                    0x0800,
                    &udp(ip_a, Ipv4Addr::BROADCAST, 67, 68, b"spoof-dhcp-server"),
                ),
            ),
            (
                "IPv6, which Stratus does not lease",
                ethernet(
                    BROADCAST_MAC,
                    mac_a,
                    0x86dd,
                    b"spoof-ipv6-payload-with-some-bytes",
                ),
            ),
        ];
        for (what, spoofed) in cases {
            send(&mut a, &spoofed);
            let legit = udp(ip_a, broadcast_ip, 9, 9, what.as_bytes());
            send(&mut a, &ethernet(BROADCAST_MAC, mac_a, 0x0800, &legit));
            let seen = receive_until(&mut b, Duration::from_secs(5), |f| {
                f.ends_with(what.as_bytes())
            })
            .await;
            assert!(
                contains(&seen, what.as_bytes()),
                "{what}: the legitimate frame after it never arrived"
            );
            assert!(
                !seen.iter().any(|f| f == &spoofed),
                "{what}: the spoofed frame reached the other guest"
            );
        }
        let own_arp = arp_announce(mac_a, ip_a);
        send(&mut a, &own_arp);
        let seen = receive_until(&mut b, Duration::from_secs(5), |f| f == own_arp.as_slice()).await;
        assert!(
            seen.iter().any(|f| f == &own_arp),
            "A's ARP for its own address must pass"
        );

        // DHCP: a request for another guest's lease gets no offer, its own does.
        send(&mut a, &dhcp_discover(mac_a, mac_b, 0xbad));
        send(&mut a, &dhcp_discover(mac_a, mac_a, 0x600d));
        let seen = receive_until(&mut a, Duration::from_secs(5), |f| {
            dhcp_offer_xid(f) == Some(0x600d)
        })
        .await;
        let offers: Vec<u32> = seen.iter().filter_map(|f| dhcp_offer_xid(f)).collect();
        assert!(
            offers.contains(&0x600d),
            "A's own DISCOVER got no offer: {offers:x?}"
        );
        assert!(
            !offers.contains(&0xbad),
            "A got B's lease offered: {offers:x?}"
        );

        // A flood of DHCP is cut to the port's rate: 5/s with a burst of 20.
        for xid in 0..100u32 {
            send(&mut a, &dhcp_discover(mac_a, mac_a, 0x1000 + xid));
        }
        let seen = receive_until(&mut a, Duration::from_secs(2), |_| false).await;
        let answered = seen
            .iter()
            .filter_map(|f| dhcp_offer_xid(f))
            .filter(|xid| (0x1000..0x1000 + 100).contains(xid))
            .count();
        assert!(
            (1..=40).contains(&answered),
            "{answered} of 100 DISCOVERs sent at once were answered"
        );

        // Taking a VM away takes its rules; the other guest's stay, and a second
        // unplug (the agent repeating a delete after a crash) is harmless.
        drop(a);
        networks.unplug("vm-a", 0, &nic_a).await;
        networks.unplug("vm-a", 0, &nic_a).await;
        let chain_a = format!("guest-{tap_a}");
        let chain_b = format!("guest-{tap_b}");
        let listed =
            String::from_utf8_lossy(&in_ns(&["nft", "list", "table", "bridge", "stratus"]).stdout)
                .into_owned();
        assert!(!listed.contains(&chain_a), "{listed}");
        assert!(
            listed.contains(&format!("\"{tap_b}\" : jump {chain_b}")),
            "{listed}"
        );
        // An agent that starts again keeps the running guests' rules.
        stratus_nodeagent::network::AntiSpoofing::default()
            .ensure_table()
            .await
            .unwrap();
        let listed =
            String::from_utf8_lossy(&in_ns(&["nft", "list", "table", "bridge", "stratus"]).stdout)
                .into_owned();
        assert!(
            listed.contains(&format!("\"{tap_b}\" : jump {chain_b}")),
            "{listed}"
        );
        drop(b);
    });
}
