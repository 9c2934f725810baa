//! TAP devices and Linux bridges, through rtnetlink (and the TUNSETIFF ioctl for the TAP
//! itself, which netlink cannot create with a vnet header or hand back as a file descriptor).
//!
//! Every operation converges: `ensure_*` fixes whatever part of the device is missing or
//! wrong after a crash, and `delete_*` of an absent device succeeds. Deletions check the
//! device kind first so a typo in a name can never take down the host's uplink.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use stratus_vmm::devices::virtio::net::tap::{attach_tap, TapError};

use super::mac::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(io::Error),
    #[error("netlink: cannot {op} {name}: {source}")]
    Netlink {
        op: &'static str,
        name: String,
        source: rtnetlink::Error,
    },
    #[error("invalid interface name {0:?}: 1-15 bytes without '/', ':' or whitespace")]
    InvalidName(String),
    #[error("{name} already exists as a {found} device, not a {expected}")]
    WrongKind {
        name: String,
        expected: LinkKind,
        found: LinkKind,
    },
    #[error("bridge {bridge} for TAP {tap} does not exist")]
    NoBridge { tap: String, bridge: String },
    #[error("TAP {name}: {op}: {source}")]
    Tun {
        name: String,
        op: &'static str,
        source: io::Error,
    },
}

/// Device kind as the kernel reports it (IFLA_INFO_KIND); tun and tap share `tun`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Tun,
    Veth,
    /// No IFLA_INFO_KIND: a physical NIC or loopback.
    Device,
    Other(String),
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkKind::Bridge => f.write_str("bridge"),
            LinkKind::Tun => f.write_str("tun/tap"),
            LinkKind::Veth => f.write_str("veth"),
            LinkKind::Device => f.write_str("physical"),
            LinkKind::Other(k) => f.write_str(k),
        }
    }
}

/// What netlink says about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    pub mtu: u32,
    /// Administratively up (IFF_UP); a TAP nobody has opened is up without carrier.
    pub up: bool,
    /// Index of the bridge this link is a port of.
    pub controller: Option<u32>,
    pub mac: Option<MacAddr>,
}

impl LinkState {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut state = LinkState {
            index: msg.header.index,
            name: String::new(),
            kind: LinkKind::Device,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            controller: None,
            mac: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => state.name = n.clone(),
                LinkAttribute::Mtu(m) => state.mtu = *m,
                LinkAttribute::Controller(c) => state.controller = Some(*c),
                LinkAttribute::Address(a) => state.mac = MacAddr::from_slice(a),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            state.kind = match k {
                                InfoKind::Bridge => LinkKind::Bridge,
                                InfoKind::Tun => LinkKind::Tun,
                                InfoKind::Veth => LinkKind::Veth,
                                other => LinkKind::Other(other.to_string()),
                            };
                        }
                    }
                }
                _ => {}
            }
        }
        state
    }
}

/// A bridge guests' TAPs are plugged into; `address` is the host's (gateway/DHCP server)
/// address on the guest network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    pub mtu: Option<u32>,
    pub address: Option<(Ipv4Addr, u8)>,
}

/// A TAP for one guest NIC. `owner`/`group` let an unprivileged VMM open it by name later;
/// `None` leaves whatever the device already has (root-only when new).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapConfig {
    pub name: String,
    pub bridge: Option<String>,
    pub mtu: Option<u32>,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// IFF_MULTI_QUEUE: every open of the device must say the same, and a VMM then opens
    /// one descriptor per queue pair.
    pub multi_queue: bool,
}

/// A persistent TAP plus the queue fd this call opened (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).
/// Dropping it closes the fd; the device stays until [`Netlink::delete_tap`].
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub index: u32,
    file: File,
}

impl Tap {
    /// For a VMM in this process, or to pass over a Unix socket to one that is not.
    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn validate_name(name: &str) -> Result<(), LinkError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(LinkError::InvalidName(name.to_string()))
    }
}

/// Opens `/dev/net/tun` and attaches to (creating if needed) the named persistent TAP.
fn open_tap(cfg: &TapConfig) -> Result<File, LinkError> {
    let tun_err = |op, source| LinkError::Tun {
        name: cfg.name.clone(),
        op,
        source,
    };
    let file = attach_tap(&cfg.name, false, cfg.multi_queue).map_err(|e| match e {
        TapError::OpenTun(source) => tun_err("open /dev/net/tun", source),
        TapError::Attach { source, .. } => tun_err("TUNSETIFF", source),
        TapError::BadName(name) => LinkError::InvalidName(name),
        TapError::Ioctl { what, source } => tun_err(what, source),
    })?;
    let fd = file.as_raw_fd();
    let set = |request, value: libc::c_ulong, op| {
        // SAFETY: these TUNSET* requests take their argument by value, not as a pointer.
        if unsafe { libc::ioctl(fd, request, value) } < 0 {
            Err(tun_err(op, io::Error::last_os_error()))
        } else {
            Ok(())
        }
    };
    // Persistent so the device outlives this fd and a VMM can open it by name later.
    set(libc::TUNSETPERSIST, 1, "TUNSETPERSIST")?;
    if let Some(uid) = cfg.owner {
        set(libc::TUNSETOWNER, libc::c_ulong::from(uid), "TUNSETOWNER")?;
    }
    if let Some(gid) = cfg.group {
        set(libc::TUNSETGROUP, libc::c_ulong::from(gid), "TUNSETGROUP")?;
    }
    Ok(file)
}

/// Any fork in this process (spawning a VMM, a helper) briefly holds a copy of every fd
/// until its exec closes the O_CLOEXEC ones, so a TAP whose last user just closed it can
/// still report EBUSY for a moment. Only a holder that stays is reported.
async fn open_tap_retrying(cfg: &TapConfig) -> Result<File, LinkError> {
    const ATTEMPTS: u32 = 20;
    let mut attempt = 1;
    loop {
        match open_tap(cfg) {
            Err(LinkError::Tun { ref source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && attempt < ATTEMPTS =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Positive errno of a netlink NACK.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A netlink connection, bound to the network namespace of the thread that called
/// [`Netlink::connect`]: the socket keeps that namespace even if the task later moves.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Must run inside a tokio runtime: the connection is driven by a spawned task that ends
    /// when the last clone of this handle is dropped.
    pub fn connect() -> Result<Self, LinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    fn nl_err(op: &'static str, name: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError {
        let name = name.to_string();
        move |source| LinkError::Netlink { op, name, source }
    }

    pub async fn link(&self, name: &str) -> Result<Option<LinkState>, LinkError> {
        validate_name(name)?;
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(LinkState::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Self::nl_err("look up", name)(e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<LinkState>, LinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|m| LinkState::from_message(&m))
            .try_collect()
            .await
            .map_err(Self::nl_err("list", "links"))
    }

    pub async fn ipv4_addresses(&self, name: &str) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(Vec::new());
        };
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(Self::nl_err("list addresses of", name))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == link.index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Sets MTU, controller and IFF_UP in one request; the kernel applies them atomically
    /// enough that a half-configured port is never left behind by this call alone.
    async fn configure(
        &self,
        link: &LinkState,
        mtu: Option<u32>,
        controller: Option<u32>,
    ) -> Result<(), LinkError> {
        let mut msg = LinkUnspec::new_with_index(link.index).up();
        if let Some(m) = mtu.filter(|m| *m != link.mtu) {
            msg = msg.mtu(m);
        }
        if let Some(c) = controller.filter(|c| Some(*c) != link.controller) {
            msg = msg.controller(c);
        }
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(Self::nl_err("configure", &link.name))
    }

    /// Looks the link up and refuses to touch it if it is of another kind.
    async fn existing(&self, name: &str, kind: LinkKind) -> Result<Option<LinkState>, LinkError> {
        match self.link(name).await? {
            Some(l) if l.kind != kind => Err(LinkError::WrongKind {
                name: name.to_string(),
                expected: kind,
                found: l.kind,
            }),
            other => Ok(other),
        }
    }

    pub async fn ensure_bridge(&self, cfg: &BridgeConfig) -> Result<LinkState, LinkError> {
        let name = cfg.name.as_str();
        let link = match self.existing(name, LinkKind::Bridge).await? {
            Some(l) => l,
            None => {
                tracing::info!(bridge = name, "creating bridge");
                let add = self
                    .handle
                    .link()
                    .add(LinkBridge::new(name).build())
                    .execute()
                    .await;
                match add {
                    // Another agent instance won the race; the kind check below still applies.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    r => r.map_err(Self::nl_err("create bridge", name))?,
                }
                self.existing(name, LinkKind::Bridge)
                    .await?
                    .ok_or_else(|| LinkError::Netlink {
                        op: "find new bridge",
                        name: name.to_string(),
                        source: rtnetlink::Error::RequestFailed,
                    })?
            }
        };
        self.configure(&link, cfg.mtu, None).await?;
        if let Some((ip, prefix)) = cfg.address {
            if !self.ipv4_addresses(name).await?.contains(&(ip, prefix)) {
                tracing::info!(bridge = name, %ip, prefix, "adding bridge address");
                let add = self
                    .handle
                    .address()
                    .add(link.index, IpAddr::V4(ip), prefix)
                    .execute()
                    .await;
                match add {
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    r => r.map_err(Self::nl_err("add address to", name))?,
                }
            }
        }
        self.expect(name).await
    }

    async fn expect(&self, name: &str) -> Result<LinkState, LinkError> {
        self.link(name).await?.ok_or_else(|| Self::missing(name))
    }

    fn missing(name: &str) -> LinkError {
        LinkError::Netlink {
            op: "find",
            name: name.to_string(),
            source: rtnetlink::Error::RequestFailed,
        }
    }

    /// Creates or re-attaches to the persistent TAP, plugs it into its bridge, sets its MTU
    /// and brings it up. Fails with EBUSY if a VMM keeps the TAP open for about a second.
    /// Needs a tokio runtime with the time driver enabled.
    pub async fn ensure_tap(&self, cfg: &TapConfig) -> Result<Tap, LinkError> {
        let name = cfg.name.as_str();
        validate_name(name)?;
        // Checked first: TUNSETIFF on a non-tun name would fail with a bare EINVAL.
        self.existing(name, LinkKind::Tun).await?;
        let bridge_index = self.bridge_index(cfg).await?;
        let file = open_tap_retrying(cfg).await?;
        let link = self.expect(name).await?;
        if cfg.bridge.is_none() && link.controller.is_some() {
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(link.index)
                        .nocontroller()
                        .build(),
                )
                .execute()
                .await
                .map_err(Self::nl_err("detach", name))?;
        }
        self.configure(&link, cfg.mtu, bridge_index).await?;
        tracing::info!(tap = name, bridge = ?cfg.bridge, "TAP ready");
        Ok(Tap {
            name: name.to_string(),
            index: link.index,
            file,
        })
    }

    async fn bridge_index(&self, cfg: &TapConfig) -> Result<Option<u32>, LinkError> {
        let Some(bridge) = &cfg.bridge else {
            return Ok(None);
        };
        let link = self.existing(bridge, LinkKind::Bridge).await?;
        let link = link.ok_or_else(|| LinkError::NoBridge {
            tap: cfg.name.clone(),
            bridge: bridge.clone(),
        })?;
        Ok(Some(link.index))
    }

    /// For a single-queue TAP its VMM holds (so that `ensure_tap` gets EBUSY): plugs it into
    /// its bridge, sets its MTU and brings it up, without opening it.
    pub async fn configure_held_tap(&self, cfg: &TapConfig) -> Result<(), LinkError> {
        let name = cfg.name.as_str();
        validate_name(name)?;
        let link = self
            .existing(name, LinkKind::Tun)
            .await?
            .ok_or_else(|| Self::missing(name))?;
        let bridge_index = self.bridge_index(cfg).await?;
        self.configure(&link, cfg.mtu, bridge_index).await
    }

    async fn delete(&self, name: &str, kind: LinkKind) -> Result<bool, LinkError> {
        let Some(link) = self.existing(name, kind).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => {
                tracing::info!(link = name, "deleted");
                Ok(true)
            }
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(Self::nl_err("delete", name)(e)),
        }
    }

    /// Returns whether there was a TAP to delete. Its addresses and bridge port go with it.
    pub async fn delete_tap(&self, name: &str) -> Result<bool, LinkError> {
        self.delete(name, LinkKind::Tun).await
    }

    /// Returns whether there was a bridge to delete; ports still attached are released, not
    /// deleted, so TAPs must be deleted on their own.
    pub async fn delete_bridge(&self, name: &str) -> Result<bool, LinkError> {
        self.delete(name, LinkKind::Bridge).await
    }
}
