//! The host's guest networks: one Linux bridge each, with the host's address on it and a
//! DHCP server that answers only the MACs the orchestrator leased (StratusLab's fixed
//! MAC → IP model). A VM's NIC is a TAP on its network's bridge plus a lease in that
//! server's table; both are made when the VM is created and removed when it is deleted.
//! Unless a network says otherwise, the TAP is guarded first: its guest may only send as
//! its own MAC and leased address (`network::antispoof`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::api::types::NicSpec;
use crate::network::antispoof::{AntiSpoofError, AntiSpoofing, GuestPort};
use crate::network::{
    BridgeConfig, DhcpHost, DhcpServer, DhcpTable, Ipv4Subnet, LinkError, MacAddr, Netlink,
    TapConfig,
};

/// One `[[networks]]` entry of the agent's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The name VM specs use (StratusLab's `public`, `local`, `private`).
    pub name: String,
    /// The bridge the VMs' TAPs join (created if missing).
    pub bridge: String,
    /// The guests' subnet, e.g. "198.18.0.0/24".
    pub subnet: Ipv4Subnet,
    /// The host's address on the bridge; the DHCP server answers from it.
    pub address: Ipv4Addr,
    /// The guests' default route (default: `address`).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns_servers: Vec<Ipv4Addr>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default = "default_lease_time")]
    pub lease_time_secs: u32,
    /// Per-TAP nftables rules that hold each guest to its own MAC and leased address.
    /// Only a network whose guests must forward others' traffic (a guest router) turns
    /// them off.
    #[serde(default = "default_anti_spoofing")]
    pub anti_spoofing: bool,
}

fn default_lease_time() -> u32 {
    3600
}

fn default_anti_spoofing() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("no network '{0}' on this host (configured: {1})")]
    Unknown(String, String),
    #[error("NIC '{nic}': {reason}")]
    BadNic { nic: String, reason: String },
    #[error("MAC {mac} is already leased on network '{network}' to another VM")]
    MacInUse { mac: MacAddr, network: String },
    #[error("{ip} is already leased on network '{network}' to VM {owner}")]
    IpInUse {
        ip: Ipv4Addr,
        network: String,
        owner: String,
    },
    #[error(
        "VM id '{id}' would take the TAPs of VM '{other}' on this host ({tap}): choose another id"
    )]
    TapNameTaken {
        id: String,
        other: String,
        tap: String,
    },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot start the DHCP server on {bridge}: {reason}")]
    Dhcp { bridge: String, reason: String },
    #[error(transparent)]
    AntiSpoof(#[from] AntiSpoofError),
}

struct Network {
    config: NetworkConfig,
    table: Arc<RwLock<DhcpTable>>,
    /// Which VM each leased MAC is, and its address: the lease's hostname is the guest's
    /// name, which need not be the VM's id, nor unique.
    owners: RwLock<BTreeMap<MacAddr, (String, Ipv4Addr)>>,
}

pub struct Networks {
    netlink: Option<Netlink>,
    guard: AntiSpoofing,
    networks: BTreeMap<String, Network>,
}

/// The TAP of a VM's NIC: short (IFNAMSIZ) and the same every time for the same VM and NIC.
pub fn tap_name(vm_id: &str, nic_index: usize) -> String {
    // FNV-1a: stable across runs and builds, unlike the std hasher.
    let hash = vm_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("st{:08x}n{nic_index}", hash as u32)
}

impl Networks {
    /// No networks (a host whose VMs have no NICs).
    pub fn none() -> Networks {
        Networks {
            netlink: None,
            guard: AntiSpoofing::default(),
            networks: BTreeMap::new(),
        }
    }

    /// Makes every configured bridge (idempotently) and starts its DHCP server.
    pub async fn start(configs: &[NetworkConfig]) -> Result<Networks, NetworkError> {
        if configs.is_empty() {
            return Ok(Networks::none());
        }
        let netlink = Netlink::connect()?;
        let guard = AntiSpoofing::default();
        if configs.iter().any(|config| config.anti_spoofing) {
            // Here rather than at the first VM: a host without nftables fails at start.
            guard.ensure_table().await?;
        }
        let mut networks = BTreeMap::new();
        for config in configs {
            netlink
                .ensure_bridge(&BridgeConfig {
                    name: config.bridge.clone(),
                    mtu: None,
                    address: Some((config.address, config.subnet.prefix())),
                })
                .await?;
            let bound = DhcpServer::new(config.address, DhcpTable::default())
                .bind(&config.bridge)
                .map_err(|e| NetworkError::Dhcp {
                    bridge: config.bridge.clone(),
                    reason: e.to_string(),
                })?;
            let table = bound.server().table();
            tokio::spawn(bound.run(std::future::pending()));
            tracing::info!(
                "network '{}': bridge {} at {}/{}, DHCP on, anti-spoofing {}",
                config.name,
                config.bridge,
                config.address,
                config.subnet.prefix(),
                if config.anti_spoofing { "on" } else { "off" }
            );
            networks.insert(
                config.name.clone(),
                Network {
                    config: config.clone(),
                    table,
                    owners: RwLock::default(),
                },
            );
        }
        Ok(Networks {
            netlink: Some(netlink),
            guard,
            networks,
        })
    }

    fn network(&self, name: &str) -> Result<&Network, NetworkError> {
        self.networks.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.networks.keys().map(String::as_str).collect();
            NetworkError::Unknown(
                name.to_owned(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            )
        })
    }

    /// Checks a NIC against its network before anything is made for it.
    pub fn check(&self, nic: &NicSpec, vm_id: &str) -> Result<(), NetworkError> {
        let network = self.network(&nic.network)?;
        for other in self.networks.values() {
            let owners = other.owners.read().unwrap_or_else(|e| e.into_inner());
            Self::check_tap_names(&owners, vm_id)?;
        }
        let owners = network.owners.read().unwrap_or_else(|e| e.into_inner());
        Self::check_against(network, &owners, nic, vm_id).map(|_| ())
    }

    /// Whether another VM holds a TAP of this name (ids with one hash; `reserve` refuses
    /// the second, whose rolled-back create must then leave the first's TAP alone).
    fn tap_of_another(&self, vm_id: &str, index: usize) -> bool {
        let tap = tap_name(vm_id, index);
        self.networks.values().any(|network| {
            let owners = network.owners.read().unwrap_or_else(|e| e.into_inner());
            owners
                .values()
                .any(|(owner, _)| owner != vm_id && tap_name(owner, index) == tap)
        })
    }

    /// Checks the NIC and holds its MAC and address for `vm_id` in one step, so of two
    /// creates racing for one MAC or address only one gets it (`check` alone lets both
    /// through). `unplug` lets go of it.
    fn reserve(&self, nic: &NicSpec, vm_id: &str) -> Result<MacAddr, NetworkError> {
        let network = self.network(&nic.network)?;
        for other in self
            .networks
            .values()
            .filter(|n| n.config.name != network.config.name)
        {
            let owners = other.owners.read().unwrap_or_else(|e| e.into_inner());
            Self::check_tap_names(&owners, vm_id)?;
        }
        let mut owners = network.owners.write().unwrap_or_else(|e| e.into_inner());
        Self::check_tap_names(&owners, vm_id)?;
        let mac = Self::check_against(network, &owners, nic, vm_id)?;
        owners.insert(mac, (vm_id.to_owned(), nic.ip));
        Ok(mac)
    }

    /// TAP names are a 32-bit hash of the VM id: two ids with one hash would share their
    /// TAPs, each VM seeing the other's traffic.
    fn check_tap_names(
        owners: &BTreeMap<MacAddr, (String, Ipv4Addr)>,
        vm_id: &str,
    ) -> Result<(), NetworkError> {
        let ours = tap_name(vm_id, 0);
        match owners
            .values()
            .find(|(owner, _)| owner != vm_id && tap_name(owner, 0) == ours)
        {
            Some((other, _)) => Err(NetworkError::TapNameTaken {
                id: vm_id.to_owned(),
                other: other.clone(),
                tap: ours,
            }),
            None => Ok(()),
        }
    }

    fn check_against(
        network: &Network,
        owners: &BTreeMap<MacAddr, (String, Ipv4Addr)>,
        nic: &NicSpec,
        vm_id: &str,
    ) -> Result<MacAddr, NetworkError> {
        let bad = |reason: String| NetworkError::BadNic {
            nic: nic.id.clone(),
            reason,
        };
        let mac: MacAddr = nic
            .mac
            .parse()
            .map_err(|e| bad(format!("MAC '{}': {e}", nic.mac)))?;
        // A group address would put the guest's frames, and DHCP's answers, on every port.
        if mac.octets()[0] & 1 != 0 {
            return Err(bad(format!("MAC '{}' is a multicast address", nic.mac)));
        }
        let subnet = network.config.subnet;
        if !subnet.is_host(nic.ip)
            || nic.ip == network.config.address
            || Some(nic.ip) == network.config.gateway
        {
            return Err(bad(format!(
                "{} is not a guest address of network '{}' ({}/{})",
                nic.ip,
                nic.network,
                subnet.network(),
                subnet.prefix()
            )));
        }
        if owners.get(&mac).is_some_and(|(owner, _)| owner != vm_id) {
            return Err(NetworkError::MacInUse {
                mac,
                network: nic.network.clone(),
            });
        }
        let holder = owners.iter().find_map(|(other, (owner, ip))| {
            (*other != mac && *ip == nic.ip && owner != vm_id).then_some(owner)
        });
        if let Some(owner) = holder {
            return Err(NetworkError::IpInUse {
                ip: nic.ip,
                network: nic.network.clone(),
                owner: owner.clone(),
            });
        }
        Ok(mac)
    }

    /// The NIC's TAP on its bridge and its lease in the DHCP server (both idempotent, so
    /// this also repairs after a restart).
    /// `owner`: the user a jailed VMM that opens the TAP runs as.
    pub async fn plug(
        &self,
        vm_id: &str,
        index: usize,
        nic: &NicSpec,
        owner: Option<u32>,
    ) -> Result<String, NetworkError> {
        let mac = self.reserve(nic, vm_id)?;
        let network = self.network(&nic.network)?;
        let netlink = self
            .netlink
            .as_ref()
            .expect("networks without netlink are empty");
        let tap = tap_name(vm_id, index);
        if network.config.anti_spoofing {
            // Before the TAP joins the bridge: its first frame is already checked.
            self.guard
                .protect(&GuestPort {
                    tap: &tap,
                    mac,
                    ip: nic.ip,
                })
                .await?;
        }
        let tap_config = TapConfig {
            name: tap.clone(),
            bridge: Some(network.config.bridge.clone()),
            mtu: None,
            owner,
            group: owner,
            multi_queue: nic.queues > 1,
        };
        match netlink.ensure_tap(&tap_config).await {
            Ok(_) => {}
            // Its running VMM holds it: this agent restarted under the VM. The TAP is
            // there; it only needs to be on its bridge, and the lease back below.
            Err(LinkError::Tun { ref source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) =>
            {
                netlink.configure_held_tap(&tap_config).await?
            }
            Err(e) => return Err(e.into()),
        }
        let config = &network.config;
        network
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(DhcpHost {
                mac,
                ip: nic.ip,
                subnet: config.subnet,
                router: config.gateway.or(Some(config.address)),
                dns_servers: config.dns_servers.clone(),
                domain: config.domain.clone(),
                hostname: Some(nic.hostname.clone().unwrap_or_else(|| vm_id.to_owned())),
                lease_time_secs: config.lease_time_secs,
            });
        Ok(tap)
    }

    /// Removes the NIC's TAP and lease (deleting twice is not an error).
    pub async fn unplug(&self, vm_id: &str, index: usize, nic: &NicSpec) {
        // A network since removed from the configuration has no lease to take back, but
        // the VM's TAP and rules are still on the host.
        let network = self.network(&nic.network).ok();
        if let (Some(network), Ok(mac)) = (network, nic.mac.parse::<MacAddr>()) {
            // Only this VM's lease: a create rolled back after another VM's took the MAC
            // must not take it from that VM.
            let mut owners = network.owners.write().unwrap_or_else(|e| e.into_inner());
            if owners.get(&mac).is_some_and(|(owner, _)| owner == vm_id) {
                owners.remove(&mac);
                network
                    .table
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(mac);
            }
        }
        if let Some(netlink) = self
            .netlink
            .as_ref()
            .filter(|_| !self.tap_of_another(vm_id, index))
        {
            let tap = tap_name(vm_id, index);
            if let Err(e) = netlink.delete_tap(&tap).await {
                tracing::warn!("cannot delete TAP {tap}: {e}");
                // Its guard stays while the TAP may still be on the bridge.
                return;
            }
            // Releasing rules a TAP never had is harmless.
            if network.is_none_or(|n| n.config.anti_spoofing) {
                if let Err(e) = self.guard.release(&tap).await {
                    tracing::warn!("cannot remove the anti-spoofing rules of TAP {tap}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network with a router of its own (not the host's bridge address), without
    /// netlink: only `check` is used.
    fn routed_network() -> Networks {
        let config: NetworkConfig = toml::from_str(
            "name = \"public\"\nbridge = \"stbr0\"\nsubnet = \"198.18.7.0/24\"\n\
             address = \"198.18.7.1\"\ngateway = \"198.18.7.254\"\n",
        )
        .unwrap();
        let mut networks = BTreeMap::new();
        networks.insert(
            config.name.clone(),
            Network {
                config,
                table: Arc::default(),
                owners: RwLock::default(),
            },
        );
        Networks {
            netlink: None,
            guard: AntiSpoofing::default(),
            networks,
        }
    }

    fn nic(mac: &str, ip: [u8; 4]) -> NicSpec {
        serde_json::from_value(serde_json::json!({
            "id": "eth0", "network": "public", "mac": mac, "ip": Ipv4Addr::from(ip).to_string()
        }))
        .unwrap()
    }

    #[test]
    fn the_router_s_address_and_group_macs_are_not_a_guest_s() {
        let networks = routed_network();
        networks
            .check(&nic("02:00:c6:12:07:0a", [198, 18, 7, 10]), "vm")
            .unwrap();
        for (bad, why) in [
            (
                nic("02:00:c6:12:07:0a", [198, 18, 7, 254]),
                "not a guest address",
            ),
            (
                nic("02:00:c6:12:07:0a", [198, 18, 7, 1]),
                "not a guest address",
            ),
            (nic("03:00:c6:12:07:0a", [198, 18, 7, 10]), "multicast"),
            (nic("ff:ff:ff:ff:ff:ff", [198, 18, 7, 10]), "multicast"),
        ] {
            let e = networks.check(&bad, "vm").unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn tap_names_are_short_and_stable() {
        let a = tap_name("vm-42", 0);
        assert_eq!(a, tap_name("vm-42", 0));
        assert_ne!(a, tap_name("vm-43", 0));
        assert_ne!(a, tap_name("vm-42", 1));
        assert!(a.len() < libc::IFNAMSIZ, "{a}");
        assert!(tap_name(&"x".repeat(64), 9).len() < libc::IFNAMSIZ);
    }
}
