//! The orchestrator's configuration file (TOML). Every key has a default;
//! `stratus-orchestrator --check-config` prints the file with the defaults filled in.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// `/etc/stratus/orchestrator.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the REST API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `sqlite://PATH` (one orchestrator) or `postgres://USER@HOST/DB` (replicas).
    #[serde(default = "default_database")]
    pub database: String,
    /// This replica's name in job claims (default: hostname and process id).
    #[serde(default)]
    pub replica: Option<String>,
    /// The Marketplace that run requests' image identifiers are looked up in.
    #[serde(default)]
    pub marketplace_endpoint: Option<String>,
    /// A file holding the Marketplace's upload token (`stratus-marketplace
    /// --upload-token-file`): the web console forwards users' signed entries with it.
    /// Without it the console's upload form is off.
    #[serde(default)]
    pub marketplace_upload_token_file: Option<PathBuf>,
    /// The web console's cookies get `Secure` (sent over HTTPS only): set it when users
    /// reach the console through an HTTPS proxy, as they should from outside the site.
    #[serde(default)]
    pub console_secure_cookies: bool,
    /// The site's image policy (endorser, checksum and identifier white/black lists).
    #[serde(default)]
    pub image_policy: Option<PathBuf>,
    /// A file holding the first `admin` user's password; without it a password is made
    /// up and printed once, when the database is created.
    #[serde(default)]
    pub admin_password_file: Option<PathBuf>,
    /// PEM bundle of the CA(s) that sign the node agents' certificates: nodes added with an
    /// `https://` URL must present a certificate for their host name chained to one of
    /// these. Without it, the system's trusted roots.
    #[serde(default)]
    pub agent_ca_file: Option<PathBuf>,
    /// Seconds between two polls of each node agent (StratusLab: 60).
    #[serde(default = "default_poll_interval_s")]
    pub poll_interval_s: u64,
    /// A node that has not answered for this many seconds is down: it gets no new VMs and
    /// its VMs are Unknown.
    #[serde(default = "default_node_timeout_s")]
    pub node_timeout_s: u64,
    /// Jobs this replica works on at once.
    #[serde(default = "default_job_workers")]
    pub job_workers: usize,
    /// Seconds a claimed job stays this replica's without renewal; after that (the replica
    /// died) another replica takes it up.
    #[serde(default = "default_job_lease_s")]
    pub job_lease_s: u64,
    /// Seconds a graceful shutdown waits for the guest before the node stops it hard.
    #[serde(default = "default_shutdown_timeout_s")]
    pub shutdown_timeout_s: u64,
    /// `spread` (StratusLab's default: the node with the fewest running VMs) or `pack`
    /// (the fullest node that fits).
    #[serde(default)]
    pub rank: Rank,
    /// Quotas of users who have none of their own.
    #[serde(default)]
    pub quotas: QuotaConfig,
    /// Instance types beyond StratusLab's seven (a name of theirs replaces it).
    #[serde(default)]
    pub instance_types: Vec<InstanceTypeConfig>,
    /// Where persistent volumes are kept (pdisk's file backend: sparse raw files the nodes
    /// open at the same path, so this host or a filesystem they share). Without it, the
    /// cloud has no volumes.
    #[serde(default)]
    pub volume_dir: Option<PathBuf>,
    /// Export volumes over iSCSI from this host's tgtd instead (their files still live in
    /// `volume_dir`): nodes need no shared filesystem, their VMMs log in to the LUNs.
    #[serde(default)]
    pub volume_iscsi: Option<crate::pdisk::iscsi::IscsiPoolConfig>,
    /// Make new volumes as images in a Ceph pool instead (no `volume_dir` needed): nodes'
    /// VMMs open them through librbd with the configuration and keyring given here, which
    /// must be at the same paths on every node.
    #[serde(default)]
    pub volume_rbd: Option<crate::pdisk::rbd::RbdPoolConfig>,
    /// Give VMs their root disks from pdisk, as StratusLab did: each Marketplace image is
    /// fetched once into an ORIGIN volume (owned by the service) in `volume_dir`, and each
    /// VM boots a LIVE copy-on-write snapshot of it, owned by the VM's user; when the VM
    /// ends, the snapshot is quarantined for `quarantine_period_s`, then deleted. Without
    /// it, nodes keep the root disks in their own image caches.
    #[serde(default)]
    pub root_volumes: bool,
    /// How long the root snapshot of an ended VM is kept before it is deleted
    /// (StratusLab: 15 minutes).
    #[serde(default = "default_quarantine_period_s")]
    pub quarantine_period_s: u64,
    /// Follow `file://` locations of Marketplace entries when filling ORIGINs (off: an
    /// entry's endorser, not the site, chooses its locations).
    #[serde(default)]
    pub allow_file_image_locations: bool,
    /// The networks VMs are given addresses on; node agents serve them under the same
    /// names.
    #[serde(default)]
    pub networks: Vec<NetworkConfig>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rank {
    #[default]
    Spread,
    Pack,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// vCPUs of a user's VMs together (StratusLab: 20).
    #[serde(default = "default_cpu_quota")]
    pub cpu: i64,
    /// MiB of memory of a user's VMs together (0: no limit).
    #[serde(default)]
    pub memory_mib: i64,
    /// Number of VMs (0: no limit).
    #[serde(default)]
    pub vms: i64,
    /// GiB of persistent volumes (0: no limit).
    #[serde(default)]
    pub volume_gib: i64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            cpu: default_cpu_quota(),
            memory_mib: 0,
            volume_gib: 0,
            vms: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceTypeConfig {
    pub name: String,
    pub cpu: u8,
    pub ram_mib: u64,
    pub swap_mib: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    /// Fixed IP/MAC pairs reachable from outside.
    Public,
    /// Fixed IP/MAC pairs on the site's internal network.
    Local,
    /// A private range (StratusLab: 172.16.0.0/16).
    Private,
}

/// One `[[networks]]` entry: either a fixed list of addresses (`public`, `local`) or a
/// range (`private`). MACs default to StratusLab's `02:00` + the four address bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub name: String,
    pub kind: NetworkKind,
    /// Fixed addresses, each `"IP"` or `"IP MAC"`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// First and last address of a range, inclusive.
    #[serde(default)]
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
}

/// The most addresses one network may hold (a /16).
pub const MAX_NETWORK_ADDRESSES: u32 = 65_536;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8775))
}
fn default_database() -> String {
    "sqlite:///var/lib/stratus/orchestrator.db".into()
}
fn default_poll_interval_s() -> u64 {
    60
}
fn default_node_timeout_s() -> u64 {
    180
}
fn default_job_workers() -> usize {
    8
}
fn default_job_lease_s() -> u64 {
    30
}
fn default_shutdown_timeout_s() -> u64 {
    120
}
fn default_cpu_quota() -> i64 {
    20
}
fn default_quarantine_period_s() -> u64 {
    15 * 60
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check().map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.poll_interval_s == 0 || self.node_timeout_s == 0 {
            return Err("poll_interval_s and node_timeout_s must be at least 1".into());
        }
        if self.job_lease_s < 2 {
            return Err("job_lease_s must be at least 2".into());
        }
        if self.job_workers == 0 {
            return Err("job_workers must be at least 1".into());
        }
        if self.root_volumes && self.volume_dir.is_none() {
            return Err(
                "root_volumes needs volume_dir: ORIGINs and their snapshots are files there".into(),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for network in &self.networks {
            if !names.insert(network.name.as_str()) {
                return Err(format!("network '{}' is defined twice", network.name));
            }
            crate::networks::addresses_of(network)
                .map_err(|e| format!("network '{}': {e}", network.name))?;
        }
        for t in &self.instance_types {
            if t.cpu == 0 || t.ram_mib == 0 {
                return Err(format!(
                    "instance type '{}' needs at least 1 CPU and 1 MiB",
                    t.name
                ));
            }
        }
        Ok(())
    }

    pub fn replica_name(&self) -> String {
        self.replica.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "orchestrator".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("every key has a default")
    }
}
