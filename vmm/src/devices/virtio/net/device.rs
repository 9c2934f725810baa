//! The virtio-net device: MAC, link status and queue pairs in config space, offload
//! negotiation with the TAP, and the workers' lifecycle.

use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, TapError};
use super::worker::{NetCtrl, NetStats, NetWorker, NetWorkerParts};
use super::*;
use crate::devices::rate_limiter::{RateLimit, RateLimiter};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
};

pub const VIRTIO_ID_NET: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// How the VMM API names the NIC; `net<N>` when not given.
    #[serde(default)]
    pub id: Option<String>,
    /// TAP device to open (created if it does not exist), or the name of `fd`'s TAP.
    pub tap: String,
    /// Guest MAC, e.g. 02:00:c6:12:00:0a.
    pub mac: String,
    /// An already open TAP descriptor inherited from the node agent (IFF_VNET_HDR set).
    #[serde(default)]
    pub fd: Option<i32>,
    /// Applied to each direction separately.
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// Queue pairs (VIRTIO_NET_F_MQ on a multiqueue TAP), 1 to 16: one per vCPU lets each
    /// vCPU send and receive on its own. Needs the VMM to open the TAP by name.
    #[serde(default = "one_queue_pair")]
    pub queues: u16,
}

fn one_queue_pair() -> u16 {
    1
}

impl NetConfig {
    /// The queue count is possible: 1 to 16 pairs, and several only on a TAP the VMM
    /// opens by name (`handed_over`: a descriptor passed to the VMM is one queue).
    pub fn check_queues(&self, handed_over: bool) -> Result<(), NetError> {
        if self.queues == 0 || self.queues > MAX_QUEUE_PAIRS {
            return Err(NetError::BadQueues(self.queues));
        }
        if self.queues > 1 && handed_over {
            return Err(NetError::QueuesNeedTapName(self.queues));
        }
        Ok(())
    }
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    // A multicast MAC cannot be a NIC's address.
    (mac[0] & 1 == 0).then_some(mac)
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("'{0}' is not a unicast MAC address like 02:00:c6:12:00:0a")]
    BadMac(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("descriptor {0} is not an open /dev/net/tun (TAP) descriptor")]
    NotTap(i32),
    #[error("queues={0}: a NIC has 1 to {MAX_QUEUE_PAIRS} queue pairs")]
    BadQueues(u16),
    #[error(
        "queues={0}: a TAP descriptor handed to the VMM is one queue; for several, the VMM \
         opens the TAP by name (leave fd out)"
    )]
    QueuesNeedTapName(u16),
}

/// Takes over an inherited descriptor number after checking it really is a TAP queue.
fn inherited_tap(fd: i32, name: &str) -> Result<Tap, NetError> {
    use std::os::unix::io::{FromRawFd, OwnedFd};
    if fd < 3 || !is_tun(fd) {
        return Err(NetError::NotTap(fd));
    }
    // SAFETY: the descriptor is open (it resolved above), refers to /dev/net/tun and was
    // handed to this process to own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Tap::from_fd(owned, name)?)
}

/// Takes over a descriptor handed over the API socket; anything but a TAP queue is closed
/// and refused.
fn passed_tap(fd: std::os::unix::io::OwnedFd, name: &str) -> Result<Tap, NetError> {
    use std::os::unix::io::AsRawFd;
    let raw = fd.as_raw_fd();
    if !is_tun(raw) {
        return Err(NetError::NotTap(raw));
    }
    Ok(Tap::from_fd(fd, name)?)
}

fn is_tun(fd: i32) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|target| target == std::path::Path::new("/dev/net/tun"))
}

/// A NIC's two limiters: `rate_limit` (config, `--net bps=,pps=`, the API) applies to each
/// direction separately, with its own buckets.
#[derive(Clone, Debug)]
pub struct NetRateLimiters {
    pub rx: RateLimiter,
    pub tx: RateLimiter,
}

impl NetRateLimiters {
    pub fn new(limit: RateLimit) -> Self {
        NetRateLimiters {
            rx: RateLimiter::new(limit),
            tx: RateLimiter::new(limit),
        }
    }

    /// The limit in force (both directions always have the same one).
    pub fn limit(&self) -> RateLimit {
        self.rx.limit()
    }

    pub fn update(&self, limit: RateLimit) {
        self.rx.update(limit);
        self.tx.update(limit);
    }
}

pub struct VirtioNet {
    /// One TAP queue per queue pair.
    taps: Vec<Arc<Tap>>,
    mac: [u8; 6],
    stats: Arc<NetStats>,
    workers: Vec<(EventFd, JoinHandle<()>)>,
    /// Outlive activations, so that run-time changes survive a driver reset.
    limiters: NetRateLimiters,
}

impl VirtioNet {
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        Self::with_passed_fd(config, None)
    }

    /// `passed` is a TAP descriptor handed over the API socket (SCM_RIGHTS); it takes the
    /// place of `config.fd` and of opening the TAP by name.
    pub fn with_passed_fd(
        config: &NetConfig,
        passed: Option<std::os::unix::io::OwnedFd>,
    ) -> Result<Self, NetError> {
        let mac = parse_mac(&config.mac).ok_or_else(|| NetError::BadMac(config.mac.clone()))?;
        config.check_queues(passed.is_some() || config.fd.is_some())?;
        let taps = match (passed, config.fd) {
            (Some(fd), _) => vec![passed_tap(fd, &config.tap)?],
            (None, Some(fd)) => vec![inherited_tap(fd, &config.tap)?],
            (None, None) => Tap::open_queues(&config.tap, config.queues)?,
        };
        Ok(VirtioNet {
            taps: taps.into_iter().map(Arc::new).collect(),
            mac,
            stats: Arc::new(NetStats::default()),
            workers: Vec::new(),
            limiters: NetRateLimiters::new(config.rate_limit),
        })
    }

    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// Handles on the NIC's limiters, for changing them at run time.
    pub fn rate_limiters(&self) -> NetRateLimiters {
        self.limiters.clone()
    }

    fn stop(&mut self) {
        for (kill, _) in &self.workers {
            let _ = kill.write(1);
        }
        for (_, handle) in self.workers.drain(..) {
            let _ = handle.join();
        }
    }

    fn queue_pairs(&self) -> u16 {
        self.taps.len() as u16
    }
}

/// Offloads the TAP may use on frames it hands the guest, from what the guest accepted.
pub fn tap_offload_flags(acked: u64) -> libc::c_uint {
    let mut flags = 0;
    if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut sizes = vec![QUEUE_SIZE; 2 * self.taps.len()];
        if self.taps.len() > 1 {
            sizes.push(CTRL_QUEUE_SIZE);
        }
        sizes
    }

    fn available_features(&self) -> u64 {
        let multi_queue = if self.taps.len() > 1 {
            VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ
        } else {
            0
        };
        multi_queue
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_STATUS
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
    }

    /// struct virtio_net_config: mac, status, max_virtqueue_pairs.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&self.queue_pairs().to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let multi_queue = self.taps.len() > 1 && ctx.acked_features & VIRTIO_NET_F_MQ != 0;
        let with_ctrl = ctx.acked_features & VIRTIO_NET_F_CTRL_VQ != 0;
        let pairs = if multi_queue { self.taps.len() } else { 1 };
        let needed = 2 * pairs + usize::from(with_ctrl);
        if ctx.queues.len() < needed {
            return Err(ActivateError::QueueCount {
                enabled: ctx.queues.len(),
                needed,
            });
        }
        let worker_error = |e: TapError| ActivateError::Worker(std::io::Error::other(e));
        // Offloads are the TAP device's, whichever queue sets them.
        self.taps[0]
            .set_offload(tap_offload_flags(ctx.acked_features))
            .map_err(worker_error)?;
        if self.taps.len() > 1 {
            // Frames go to pair 0 until the driver asks for more (VQ_PAIRS_SET), and only
            // ever to pairs it can use.
            for (index, tap) in self.taps.iter().enumerate() {
                tap.set_queue_attached(index == 0).map_err(worker_error)?;
            }
        }
        let mut queues = ctx.queues.into_iter();
        let mut events = ctx.queue_events.into_iter();
        let mut pair_queues = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            let (Some(rx), Some(tx), Some(rx_event), Some(tx_event)) =
                (queues.next(), queues.next(), events.next(), events.next())
            else {
                return Err(ActivateError::QueueCount { enabled: 0, needed });
            };
            pair_queues.push((rx, tx, rx_event, tx_event));
        }
        let mut ctrl = match (with_ctrl, queues.next(), events.next()) {
            (false, ..) => None,
            (true, Some(queue), Some(event)) => Some(NetCtrl {
                queue,
                event,
                index: (2 * pairs) as u16,
                taps: self.taps[..pairs].to_vec(),
                // Attached above: pair 0's queue alone.
                pairs_in_use: Some(1),
                last_pairs_change: None,
            }),
            (true, ..) => return Err(ActivateError::QueueCount { enabled: 0, needed }),
        };
        for (pair, (rx, tx, rx_event, tx_event)) in pair_queues.into_iter().enumerate() {
            let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
            let tap = self.taps[pair].clone();
            let worker = NetWorker::new(NetWorkerParts {
                mem: ctx.mem.clone(),
                pair: pair as u16,
                tap: tap.clone(),
                rx,
                tx,
                rx_event,
                tx_event,
                interrupt: ctx.interrupt.clone(),
                kill: kill.try_clone().map_err(ActivateError::Worker)?,
                mergeable_rx: ctx.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0,
                stats: self.stats.clone(),
                rx_limiter: Some(self.limiters.rx.clone()),
                tx_limiter: Some(self.limiters.tx.clone()),
                ctrl: ctrl.take(),
            })
            .map_err(ActivateError::Worker)?;
            let name = if pairs > 1 {
                format!("virtio-net-{}-{pair}", tap.name())
            } else {
                format!("virtio-net-{}", tap.name())
            };
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    crate::seccomp::confine_or_abort(crate::seccomp::ThreadKind::NetWorker);
                    worker.run()
                })
                .map_err(ActivateError::Worker)?;
            self.workers.push((kill, handle));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing_accepts_unicast_only() {
        assert_eq!(
            parse_mac("02:00:c6:12:00:0a"),
            Some([2, 0, 0xc6, 0x12, 0, 0x0a])
        );
        assert_eq!(parse_mac("03:00:00:00:00:01"), None);
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:zz"), None);
        assert_eq!(parse_mac("2:00:00:00:00:01"), None);
    }

    #[test]
    fn offloads_follow_guest_checksum_acceptance() {
        assert_eq!(tap_offload_flags(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(
            tap_offload_flags(
                VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
            ),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
