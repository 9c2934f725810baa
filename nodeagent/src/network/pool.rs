//! Network pools (StratusLab's `public`, `local` and `private` classes) and their leases.
//!
//! `public` and `local` are fixed lists of IP/MAC pairs chosen by the site; `private` is an
//! address range whose MACs follow the `02:00:<ipv4>` convention. Every lease is a fixed
//! MAC → IP pair: the DHCP server never picks addresses itself, it serves what the pool leased.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::dhcp::DhcpHost;
use super::mac::MacAddr;

/// Lease time StratusLab's installer put in dhcpd.conf (`dhcp_lease_time 3600`).
pub const DEFAULT_LEASE_TIME_SECS: u32 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{kind} pool exhausted: all {size} addresses are leased")]
    Exhausted { kind: PoolKind, size: usize },
    #[error("address {ip} is outside the {kind} pool")]
    OutsidePool { kind: PoolKind, ip: Ipv4Addr },
    #[error("address {ip} in the {kind} pool is already leased to {owner:?}")]
    AlreadyLeased {
        kind: PoolKind,
        ip: Ipv4Addr,
        owner: String,
    },
    #[error("address {ip} in the {kind} pool is not leased, so it cannot be released")]
    NotLeased { kind: PoolKind, ip: Ipv4Addr },
    #[error("no {kind} pool is configured on this node")]
    NoSuchPool { kind: PoolKind },
    #[error("address {ip} belongs to no pool of this node")]
    NoPoolFor { ip: Ipv4Addr },
    #[error("invalid {kind} pool: {reason}")]
    InvalidDefinition { kind: PoolKind, reason: String },
    #[error("invalid subnet {0:?}: expected a.b.c.d/prefix with host bits clear and prefix <= 30")]
    InvalidSubnet(String),
    #[error("pool JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The three StratusLab address classes (`--local-ip`, `--private-ip`, default public).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    Public,
    Local,
    Private,
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolKind::Public => "public",
            PoolKind::Local => "local",
            PoolKind::Private => "private",
        })
    }
}

/// An IPv4 network, serialised as `a.b.c.d/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Subnet {
    /// Prefixes longer than /30 leave no usable host address, so they are refused.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, PoolError> {
        let candidate = Ipv4Subnet { network, prefix };
        if prefix > 30 || u32::from(network) & !candidate.mask_bits() != 0 {
            return Err(PoolError::InvalidSubnet(format!("{network}/{prefix}")));
        }
        Ok(candidate)
    }

    fn mask_bits(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask_bits())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.network)
    }

    /// In the subnet and neither its network nor its broadcast address.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.broadcast()
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PoolError::InvalidSubnet(s.to_string());
        let (net, prefix) = s.split_once('/').ok_or_else(err)?;
        let net: Ipv4Addr = net.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        Ipv4Subnet::new(net, prefix).map_err(|_| err())
    }
}

impl Serialize for Ipv4Subnet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One site-assigned IP/MAC pair of a `public` or `local` pool. The MAC may be omitted, in
/// which case the `02:00:<ipv4>` convention supplies it (the docs only recommend it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedAddress {
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The name registered in the site's DNS for this address, sent as DHCP option 12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PoolAddresses {
    Fixed(Vec<FixedAddress>),
    /// Inclusive range; every MAC is derived from its address.
    Range {
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
}

/// A pool as the site defines it (JSON), with the parameters DHCP hands to guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDefinition {
    pub kind: PoolKind,
    pub subnet: Ipv4Subnet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns_servers: Vec<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default = "default_lease_time")]
    pub lease_time_secs: u32,
    pub addresses: PoolAddresses,
}

fn default_lease_time() -> u32 {
    DEFAULT_LEASE_TIME_SECS
}

/// RFC 1123 label rules: DHCP clients write these names into /etc/hostname and resolv.conf.
fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl PoolDefinition {
    pub fn from_json(json: &str) -> Result<Self, PoolError> {
        let def: PoolDefinition = serde_json::from_str(json)?;
        def.validate()?;
        Ok(def)
    }

    pub fn validate(&self) -> Result<(), PoolError> {
        let invalid = |reason: String| PoolError::InvalidDefinition {
            kind: self.kind,
            reason,
        };
        if self.lease_time_secs == 0 {
            return Err(invalid("lease_time_secs must be positive".into()));
        }
        if let Some(gw) = self.gateway {
            if !self.subnet.is_host(gw) {
                return Err(invalid(format!(
                    "gateway {gw} is not a host address of {}",
                    self.subnet
                )));
            }
        }
        if let Some(domain) = &self.domain {
            if !valid_dns_name(domain) {
                return Err(invalid(format!("domain {domain:?} is not a DNS name")));
            }
        }
        match &self.addresses {
            PoolAddresses::Fixed(entries) => {
                if entries.is_empty() {
                    return Err(invalid("no addresses".into()));
                }
                let mut ips = HashSet::new();
                let mut macs = HashSet::new();
                for e in entries {
                    if !self.subnet.is_host(e.ip) {
                        return Err(invalid(format!(
                            "address {} is not a host address of {}",
                            e.ip, self.subnet
                        )));
                    }
                    if Some(e.ip) == self.gateway {
                        return Err(invalid(format!("address {} is the gateway", e.ip)));
                    }
                    if !ips.insert(e.ip) {
                        return Err(invalid(format!("address {} listed twice", e.ip)));
                    }
                    let mac = e.mac.unwrap_or_else(|| MacAddr::from_ipv4(e.ip));
                    // Bit 0 of the first byte marks multicast: a NIC cannot own such an address.
                    if mac.0[0] & 1 == 1 {
                        return Err(invalid(format!("MAC {mac} of {} is multicast", e.ip)));
                    }
                    if !macs.insert(mac) {
                        return Err(invalid(format!("MAC {mac} listed twice")));
                    }
                    if let Some(h) = &e.hostname {
                        if !valid_dns_name(h) {
                            return Err(invalid(format!(
                                "hostname {h:?} of {} is not a DNS name",
                                e.ip
                            )));
                        }
                    }
                }
            }
            PoolAddresses::Range { first, last } => {
                for ip in [first, last] {
                    if !self.subnet.is_host(*ip) {
                        return Err(invalid(format!(
                            "range bound {ip} is not a host address of {}",
                            self.subnet
                        )));
                    }
                }
                if first > last {
                    return Err(invalid(format!("range {first}-{last} is empty")));
                }
            }
        }
        Ok(())
    }

    /// MAC and hostname of an address of this pool, `None` if the pool does not hold it.
    fn entry(&self, ip: Ipv4Addr) -> Option<(MacAddr, Option<String>)> {
        if Some(ip) == self.gateway {
            return None;
        }
        match &self.addresses {
            PoolAddresses::Fixed(entries) => entries.iter().find(|e| e.ip == ip).map(|e| {
                (
                    e.mac.unwrap_or_else(|| MacAddr::from_ipv4(ip)),
                    e.hostname.clone(),
                )
            }),
            PoolAddresses::Range { first, last } => {
                (*first <= ip && ip <= *last).then(|| (MacAddr::from_ipv4(ip), None))
            }
        }
    }

    /// All addresses in allocation order; the gateway is skipped if a range covers it.
    fn addresses(&self) -> Box<dyn Iterator<Item = Ipv4Addr> + '_> {
        let gateway = self.gateway;
        match &self.addresses {
            PoolAddresses::Fixed(entries) => Box::new(entries.iter().map(|e| e.ip)),
            PoolAddresses::Range { first, last } => Box::new(
                (u32::from(*first)..=u32::from(*last))
                    .map(Ipv4Addr::from)
                    .filter(move |ip| Some(*ip) != gateway),
            ),
        }
    }

    pub fn size(&self) -> usize {
        self.addresses().count()
    }
}

/// A fixed MAC → IP pair handed to one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub hostname: String,
    /// Who holds the lease (a VM id); shown in errors so an operator can find the holder.
    pub owner: String,
}

/// What the agent persists for one pool: the definition and the leases it handed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolState {
    pub definition: PoolDefinition,
    pub leases: Vec<Lease>,
}

/// A pool with its lease table. Serialises as [`PoolState`]; deserialising re-checks that
/// every lease belongs to the pool, so a hand-edited or stale state file is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PoolState", into = "PoolState")]
pub struct NetworkPool {
    definition: PoolDefinition,
    leases: BTreeMap<Ipv4Addr, Lease>,
}

impl From<NetworkPool> for PoolState {
    fn from(pool: NetworkPool) -> Self {
        PoolState {
            definition: pool.definition,
            leases: pool.leases.into_values().collect(),
        }
    }
}

impl TryFrom<PoolState> for NetworkPool {
    type Error = PoolError;

    fn try_from(state: PoolState) -> Result<Self, Self::Error> {
        let mut pool = NetworkPool::new(state.definition)?;
        for lease in state.leases {
            let fresh = pool.allocate_address(lease.ip, &lease.owner)?;
            if fresh.mac != lease.mac || fresh.hostname != lease.hostname {
                return Err(PoolError::InvalidDefinition {
                    kind: pool.kind(),
                    reason: format!(
                        "stored lease of {} ({} {}) disagrees with the pool ({} {})",
                        lease.ip, lease.mac, lease.hostname, fresh.mac, fresh.hostname
                    ),
                });
            }
        }
        Ok(pool)
    }
}

impl NetworkPool {
    pub fn new(definition: PoolDefinition) -> Result<Self, PoolError> {
        definition.validate()?;
        Ok(NetworkPool {
            definition,
            leases: BTreeMap::new(),
        })
    }

    pub fn from_json(json: &str) -> Result<Self, PoolError> {
        Ok(serde_json::from_str(json)?)
    }

    pub fn to_json(&self) -> Result<String, PoolError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    pub fn kind(&self) -> PoolKind {
        self.definition.kind
    }

    pub fn definition(&self) -> &PoolDefinition {
        &self.definition
    }

    pub fn size(&self) -> usize {
        self.definition.size()
    }

    pub fn available(&self) -> usize {
        self.size() - self.leases.len()
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn lease_for_mac(&self, mac: MacAddr) -> Option<&Lease> {
        self.leases.values().find(|l| l.mac == mac)
    }

    /// Leases the lowest free address, so allocation is reproducible across restarts.
    pub fn allocate(&mut self, owner: &str) -> Result<Lease, PoolError> {
        let free = self
            .definition
            .addresses()
            .find(|ip| !self.leases.contains_key(ip));
        match free {
            Some(ip) => self.allocate_address(ip, owner),
            None => Err(PoolError::Exhausted {
                kind: self.kind(),
                size: self.size(),
            }),
        }
    }

    /// Leases a specific address (`stratus-run-instance --address IP`).
    pub fn allocate_address(&mut self, ip: Ipv4Addr, owner: &str) -> Result<Lease, PoolError> {
        let kind = self.kind();
        let (mac, hostname) = self
            .definition
            .entry(ip)
            .ok_or(PoolError::OutsidePool { kind, ip })?;
        if let Some(held) = self.leases.get(&ip) {
            return Err(PoolError::AlreadyLeased {
                kind,
                ip,
                owner: held.owner.clone(),
            });
        }
        let lease = Lease {
            ip,
            mac,
            hostname: hostname.unwrap_or_else(|| default_hostname(ip)),
            owner: owner.to_string(),
        };
        tracing::info!(pool = %kind, %ip, %mac, owner, "leased address");
        self.leases.insert(ip, lease.clone());
        Ok(lease)
    }

    pub fn release(&mut self, ip: Ipv4Addr) -> Result<Lease, PoolError> {
        let kind = self.kind();
        if self.definition.entry(ip).is_none() {
            return Err(PoolError::OutsidePool { kind, ip });
        }
        let lease = self
            .leases
            .remove(&ip)
            .ok_or(PoolError::NotLeased { kind, ip })?;
        tracing::info!(pool = %kind, %ip, owner = lease.owner, "released address");
        Ok(lease)
    }

    /// What the DHCP server must answer for one of this pool's leases.
    pub fn dhcp_host(&self, lease: &Lease) -> DhcpHost {
        let def = &self.definition;
        DhcpHost {
            mac: lease.mac,
            ip: lease.ip,
            subnet: def.subnet,
            router: def.gateway,
            dns_servers: def.dns_servers.clone(),
            domain: def.domain.clone(),
            hostname: Some(lease.hostname.clone()),
            lease_time_secs: def.lease_time_secs,
        }
    }

    pub fn dhcp_hosts(&self) -> Vec<DhcpHost> {
        self.leases().map(|l| self.dhcp_host(l)).collect()
    }
}

/// The node's pools by kind (at most one per kind, as in StratusLab's configuration), as the
/// agent persists them: one JSON document holding every definition and lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<NetworkPool>", into = "Vec<NetworkPool>")]
pub struct NetworkPools {
    pools: BTreeMap<PoolKind, NetworkPool>,
}

impl From<NetworkPools> for Vec<NetworkPool> {
    fn from(set: NetworkPools) -> Self {
        set.pools.into_values().collect()
    }
}

impl TryFrom<Vec<NetworkPool>> for NetworkPools {
    type Error = PoolError;

    fn try_from(pools: Vec<NetworkPool>) -> Result<Self, Self::Error> {
        let mut set = NetworkPools::default();
        for pool in pools {
            set.insert(pool)?;
        }
        Ok(set)
    }
}

impl NetworkPools {
    pub fn from_json(json: &str) -> Result<Self, PoolError> {
        Ok(serde_json::from_str(json)?)
    }

    pub fn to_json(&self) -> Result<String, PoolError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Refuses a second pool of a kind, and pools sharing an address: a guest address must
    /// map back to exactly one pool on release.
    pub fn insert(&mut self, pool: NetworkPool) -> Result<(), PoolError> {
        let kind = pool.kind();
        let invalid = |reason| PoolError::InvalidDefinition { kind, reason };
        if self.pools.contains_key(&kind) {
            return Err(invalid(format!("a {kind} pool is already defined")));
        }
        for other in self.pools.values() {
            if let Some(ip) = pool
                .definition
                .addresses()
                .find(|ip| other.definition.entry(*ip).is_some())
            {
                return Err(invalid(format!(
                    "address {ip} is also in the {} pool",
                    other.kind()
                )));
            }
        }
        self.pools.insert(kind, pool);
        Ok(())
    }

    pub fn get(&self, kind: PoolKind) -> Option<&NetworkPool> {
        self.pools.get(&kind)
    }

    pub fn get_mut(&mut self, kind: PoolKind) -> Option<&mut NetworkPool> {
        self.pools.get_mut(&kind)
    }

    fn pool_mut(&mut self, kind: PoolKind) -> Result<&mut NetworkPool, PoolError> {
        self.pools
            .get_mut(&kind)
            .ok_or(PoolError::NoSuchPool { kind })
    }

    pub fn allocate(&mut self, kind: PoolKind, owner: &str) -> Result<Lease, PoolError> {
        self.pool_mut(kind)?.allocate(owner)
    }

    /// Releases an address from whichever pool holds it.
    pub fn release(&mut self, ip: Ipv4Addr) -> Result<Lease, PoolError> {
        match self
            .pools
            .values_mut()
            .find(|p| p.definition.entry(ip).is_some())
        {
            Some(pool) => pool.release(ip),
            None => Err(PoolError::NoPoolFor { ip }),
        }
    }

    /// Every lease of every pool, for the DHCP table.
    pub fn dhcp_hosts(&self) -> Vec<DhcpHost> {
        self.pools.values().flat_map(|p| p.dhcp_hosts()).collect()
    }
}

/// Names like `vm-172-16-0-5`, so a guest without a DNS entry still gets a stable name.
fn default_hostname(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("vm-{a}-{b}-{c}-{d}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC_JSON: &str = r#"{
        "kind": "public",
        "subnet": "198.18.0.0/24",
        "gateway": "198.18.0.1",
        "dns_servers": ["198.18.0.2", "198.18.0.3"],
        "domain": "cloud.example.org",
        "lease_time_secs": 600,
        "addresses": {"fixed": [
            {"ip": "198.18.0.10", "mac": "0a:0a:c6:12:00:0a", "hostname": "onevm-10"},
            {"ip": "198.18.0.11"}
        ]}
    }"#;

    const PRIVATE_JSON: &str = r#"{
        "kind": "private",
        "subnet": "172.16.0.0/16",
        "gateway": "172.16.0.1",
        "addresses": {"range": {"first": "172.16.0.1", "last": "172.16.0.4"}}
    }"#;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_fixed_pool_with_defaults_from_convention() {
        let def = PoolDefinition::from_json(PUBLIC_JSON).unwrap();
        assert_eq!(def.kind, PoolKind::Public);
        assert_eq!(def.subnet.netmask(), ip("255.255.255.0"));
        assert_eq!(def.size(), 2);
        let mut pool = NetworkPool::new(def).unwrap();
        let a = pool.allocate("vm-1").unwrap();
        assert_eq!(a.ip, ip("198.18.0.10"));
        assert_eq!(a.mac.to_string(), "0a:0a:c6:12:00:0a");
        assert_eq!(a.hostname, "onevm-10");
        let b = pool.allocate("vm-2").unwrap();
        assert_eq!(b.ip, ip("198.18.0.11"));
        assert_eq!(b.mac.to_string(), "02:00:c6:12:00:0b");
        assert_eq!(b.hostname, "vm-198-18-0-11");
    }

    #[test]
    fn private_range_skips_gateway_and_exhausts() {
        let mut pool = NetworkPool::new(PoolDefinition::from_json(PRIVATE_JSON).unwrap()).unwrap();
        assert_eq!(pool.definition().lease_time_secs, DEFAULT_LEASE_TIME_SECS);
        assert_eq!(pool.size(), 3);
        let got: Vec<_> = (0..3)
            .map(|i| pool.allocate(&format!("vm-{i}")).unwrap())
            .collect();
        assert_eq!(
            got.iter().map(|l| l.ip).collect::<Vec<_>>(),
            vec![ip("172.16.0.2"), ip("172.16.0.3"), ip("172.16.0.4")]
        );
        for l in &got {
            assert_eq!(l.mac.to_ipv4().unwrap(), l.ip);
        }
        assert_eq!(pool.available(), 0);
        let err = pool.allocate("vm-9").unwrap_err();
        assert!(
            matches!(
                err,
                PoolError::Exhausted {
                    kind: PoolKind::Private,
                    size: 3
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "private pool exhausted: all 3 addresses are leased"
        );
        // A freed address is the next one handed out.
        pool.release(ip("172.16.0.3")).unwrap();
        assert_eq!(pool.allocate("vm-10").unwrap().ip, ip("172.16.0.3"));
    }

    #[test]
    fn release_errors_name_the_address() {
        let mut pool = NetworkPool::new(PoolDefinition::from_json(PRIVATE_JSON).unwrap()).unwrap();
        let lease = pool.allocate("vm-1").unwrap();
        assert_eq!(pool.release(lease.ip).unwrap(), lease);
        let err = pool.release(lease.ip).unwrap_err();
        assert!(matches!(err, PoolError::NotLeased { ip, .. } if ip == lease.ip));
        assert!(err.to_string().contains("172.16.0.2"), "{err}");
        for outside in ["172.16.0.5", "172.16.0.1", "10.0.0.1"] {
            let err = pool.release(ip(outside)).unwrap_err();
            assert!(
                matches!(err, PoolError::OutsidePool { ip: i, .. } if i == ip(outside)),
                "{err}"
            );
        }
    }

    #[test]
    fn specific_address_allocation() {
        let mut pool = NetworkPool::new(PoolDefinition::from_json(PUBLIC_JSON).unwrap()).unwrap();
        let l = pool.allocate_address(ip("198.18.0.11"), "vm-a").unwrap();
        assert_eq!(pool.lease_for_mac(l.mac), Some(&l));
        let err = pool
            .allocate_address(ip("198.18.0.11"), "vm-b")
            .unwrap_err();
        assert!(matches!(&err, PoolError::AlreadyLeased { owner, .. } if owner == "vm-a"));
        let err = pool
            .allocate_address(ip("198.18.0.12"), "vm-b")
            .unwrap_err();
        assert!(matches!(
            err,
            PoolError::OutsidePool {
                kind: PoolKind::Public,
                ..
            }
        ));
        // Allocation skips the taken address.
        assert_eq!(pool.allocate("vm-c").unwrap().ip, ip("198.18.0.10"));
        assert!(matches!(
            pool.allocate("vm-d"),
            Err(PoolError::Exhausted { size: 2, .. })
        ));
    }

    #[test]
    fn invalid_definitions_are_refused_with_reason() {
        let cases = [
            (r#""subnet": "198.18.0.1/24""#, "198.18.0.1/24"),
            (r#""subnet": "198.18.0.0/31""#, "198.18.0.0/31"),
            (r#""gateway": "198.19.0.1""#, "gateway 198.19.0.1"),
            (r#""domain": "bad domain""#, "bad domain"),
            (
                r#""addresses": {"fixed": [{"ip": "198.18.1.5"}]}"#,
                "address 198.18.1.5",
            ),
            (
                r#""addresses": {"fixed": [{"ip": "198.18.0.1"}]}"#,
                "198.18.0.1 is the gateway",
            ),
            (
                r#""addresses": {"fixed": [{"ip": "198.18.0.255"}]}"#,
                "198.18.0.255",
            ),
            (
                r#""addresses": {"fixed": [{"ip": "198.18.0.5"}, {"ip": "198.18.0.5"}]}"#,
                "listed twice",
            ),
            (
                r#""addresses": {"fixed": [{"ip": "198.18.0.5", "mac": "02:00:00:00:00:01"}, {"ip": "198.18.0.6", "mac": "02:00:00:00:00:01"}]}"#,
                "MAC 02:00:00:00:00:01 listed twice",
            ),
            (
                r#""addresses": {"fixed": [{"ip": "198.18.0.5", "mac": "01:00:5e:00:00:01"}]}"#,
                "multicast",
            ),
            (
                r#""addresses": {"range": {"first": "198.18.0.9", "last": "198.18.0.8"}}"#,
                "empty",
            ),
            (r#""addresses": {"fixed": []}"#, "no addresses"),
        ];
        for (field, needle) in cases {
            let key = &field[..field.find(':').unwrap()];
            let mut obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(PUBLIC_JSON).unwrap();
            let patch: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&format!("{{{field}}}")).unwrap();
            obj.insert(
                key.trim_matches('"').to_string(),
                patch.into_iter().next().unwrap().1,
            );
            let json = serde_json::to_string(&obj).unwrap();
            let err = PoolDefinition::from_json(&json).unwrap_err();
            assert!(err.to_string().contains(needle), "{field}: {err}");
        }
        assert!(PoolDefinition::from_json(r#"{"kind": "public"}"#).is_err());
        assert!(PoolDefinition::from_json(&PUBLIC_JSON.replace("public", "elastic")).is_err());
    }

    #[test]
    fn state_round_trips_through_json_and_is_rechecked() {
        let mut pool = NetworkPool::new(PoolDefinition::from_json(PUBLIC_JSON).unwrap()).unwrap();
        pool.allocate_address(ip("198.18.0.11"), "vm-7").unwrap();
        let json = pool.to_json().unwrap();
        let back = NetworkPool::from_json(&json).unwrap();
        assert_eq!(back, pool);
        assert_eq!(back.available(), 1);

        // A state file whose lease disagrees with the definition must not load.
        let tampered = json.replace("02:00:c6:12:00:0b", "02:00:c6:12:00:0c");
        assert_ne!(tampered, json);
        let err = NetworkPool::from_json(&tampered).unwrap_err();
        assert!(err.to_string().contains("198.18.0.11"), "{err}");

        let mut doubled: PoolState = serde_json::from_str(&json).unwrap();
        doubled.leases.push(doubled.leases[0].clone());
        let err = NetworkPool::try_from(doubled).unwrap_err();
        assert!(matches!(err, PoolError::AlreadyLeased { .. }), "{err}");
    }

    #[test]
    fn pool_set_routes_by_kind_and_address() {
        let public = NetworkPool::new(PoolDefinition::from_json(PUBLIC_JSON).unwrap()).unwrap();
        let private = NetworkPool::new(PoolDefinition::from_json(PRIVATE_JSON).unwrap()).unwrap();
        let mut set = NetworkPools::try_from(vec![public.clone(), private]).unwrap();
        assert!(matches!(
            set.allocate(PoolKind::Local, "vm-1"),
            Err(PoolError::NoSuchPool {
                kind: PoolKind::Local
            })
        ));
        let a = set.allocate(PoolKind::Private, "vm-1").unwrap();
        let b = set.allocate(PoolKind::Public, "vm-1").unwrap();
        assert_eq!(a.ip, ip("172.16.0.2"));
        assert_eq!(b.ip, ip("198.18.0.10"));
        assert_eq!(set.dhcp_hosts().len(), 2);

        let json = set.to_json().unwrap();
        let mut back = NetworkPools::from_json(&json).unwrap();
        assert_eq!(back, set);
        assert_eq!(back.release(a.ip).unwrap(), a);
        assert!(matches!(
            back.release(a.ip),
            Err(PoolError::NotLeased {
                kind: PoolKind::Private,
                ..
            })
        ));
        assert!(matches!(
            back.release(ip("10.1.2.3")),
            Err(PoolError::NoPoolFor { .. })
        ));
        assert_eq!(back.get(PoolKind::Public).unwrap().available(), 1);

        // Two public pools, or a local pool overlapping the public one, are refused.
        let err = set.insert(public.clone()).unwrap_err();
        assert!(err.to_string().contains("already defined"), "{err}");
        let mut local_def = public.definition().clone();
        local_def.kind = PoolKind::Local;
        let err = set
            .insert(NetworkPool::new(local_def).unwrap())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("198.18.0.10 is also in the public pool"),
            "{err}"
        );
    }

    #[test]
    fn dhcp_host_carries_pool_parameters() {
        let mut pool = NetworkPool::new(PoolDefinition::from_json(PUBLIC_JSON).unwrap()).unwrap();
        let lease = pool.allocate("vm-1").unwrap();
        let host = pool.dhcp_host(&lease);
        assert_eq!(host.mac, lease.mac);
        assert_eq!(host.ip, lease.ip);
        assert_eq!(host.router, Some(ip("198.18.0.1")));
        assert_eq!(host.dns_servers, vec![ip("198.18.0.2"), ip("198.18.0.3")]);
        assert_eq!(host.domain.as_deref(), Some("cloud.example.org"));
        assert_eq!(host.hostname.as_deref(), Some("onevm-10"));
        assert_eq!(host.lease_time_secs, 600);
        assert_eq!(pool.dhcp_hosts(), vec![host]);
    }
}
