//! The orchestrator's configuration file (TOML). Every key has a default;
//! `stratus-orchestrator --check-config` prints the file with the defaults filled in.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error("the [tls] section")]
    Tls(#[source] stratus_nodeagent::config::ConfigError),
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
    /// Implied by `[tls]`.
    #[serde(default)]
    pub console_secure_cookies: bool,
    /// `[tls]`: serve the API and the web console over HTTPS only, with this certificate
    /// chain and key (as the node agent's section).
    #[serde(default)]
    pub tls: Option<stratus_nodeagent::config::TlsFiles>,
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
    /// More volume pools, each under its own name (`stratus-create-volume --pool NAME`):
    /// `dir` alone makes a file pool, `dir` with `[volume_pools.iscsi]` an iSCSI pool,
    /// `[volume_pools.rbd]` alone an RBD pool. `volume_dir`, `[volume_iscsi]` and
    /// `[volume_rbd]` are the pools named `file`, `iscsi` and `rbd`.
    #[serde(default)]
    pub volume_pools: Vec<VolumePoolConfig>,
    /// The pool a new volume goes to when its request names none (default: `rbd` if
    /// configured, else `iscsi`, else `file`, else the first of `volume_pools`).
    #[serde(default)]
    pub default_volume_pool: Option<String>,
    /// The pool that holds image ORIGINs and VM roots with `root_volumes` (default: the
    /// default pool if it is a file or RBD pool, whose snapshots take constant time, else
    /// the first that is, else the default pool: an iSCSI pool copies the ORIGIN for each
    /// VM).
    #[serde(default)]
    pub root_volume_pool: Option<String>,
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

/// One of `[[volume_pools]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumePoolConfig {
    /// What users name the pool by: letters, digits, '.', '_', '-'.
    pub name: String,
    /// A file pool's directory, or where an iSCSI pool's LUN files live.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub iscsi: Option<crate::pdisk::iscsi::IscsiPoolConfig>,
    #[serde(default)]
    pub rbd: Option<crate::pdisk::rbd::RbdPoolConfig>,
}

impl VolumePoolConfig {
    /// `file`, `iscsi` or `rbd`.
    pub fn kind(&self) -> &'static str {
        match (&self.iscsi, &self.rbd) {
            (_, Some(_)) => "rbd",
            (Some(_), None) => "iscsi",
            (None, None) => "file",
        }
    }
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

    /// Whether the console's cookies are `Secure`: users reach it over HTTPS.
    pub fn secure_cookies(&self) -> bool {
        self.console_secure_cookies || self.tls.is_some()
    }

    /// The server's TLS settings from `[tls]`, checked (the key's mode, the pair belonging
    /// together), or None to serve plain HTTP.
    pub fn server_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        self.tls
            .as_ref()
            .map(|files| stratus_nodeagent::tls::server_config(files).map_err(ConfigError::Tls))
            .transpose()
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
        self.check_volume_pools()?;
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

    /// Every volume pool: `volume_dir`, `[volume_iscsi]` and `[volume_rbd]` under the names
    /// `file`, `iscsi` and `rbd`, then `volume_pools`.
    pub fn all_volume_pools(&self) -> Vec<VolumePoolConfig> {
        let mut pools = Vec::new();
        if let Some(dir) = &self.volume_dir {
            pools.push(VolumePoolConfig {
                name: "file".into(),
                dir: Some(dir.clone()),
                iscsi: None,
                rbd: None,
            });
            if let Some(iscsi) = &self.volume_iscsi {
                pools.push(VolumePoolConfig {
                    name: "iscsi".into(),
                    dir: Some(dir.clone()),
                    iscsi: Some(iscsi.clone()),
                    rbd: None,
                });
            }
        }
        if let Some(rbd) = &self.volume_rbd {
            pools.push(VolumePoolConfig {
                name: "rbd".into(),
                dir: None,
                iscsi: None,
                rbd: Some(rbd.clone()),
            });
        }
        pools.extend(self.volume_pools.iter().cloned());
        pools
    }

    /// The pool new volumes go to when their request names none.
    pub fn default_volume_pool_name(&self) -> Option<String> {
        if let Some(name) = &self.default_volume_pool {
            return Some(name.clone());
        }
        let legacy = [
            (self.volume_rbd.is_some(), "rbd"),
            (
                self.volume_iscsi.is_some() && self.volume_dir.is_some(),
                "iscsi",
            ),
            (self.volume_dir.is_some(), "file"),
        ];
        legacy
            .iter()
            .find(|(configured, _)| *configured)
            .map(|(_, name)| (*name).to_owned())
            .or_else(|| self.volume_pools.first().map(|p| p.name.clone()))
    }

    /// The pool of image ORIGINs and VM roots: `root_volume_pool`, else the default pool if
    /// it makes copy-on-write snapshots, else the first pool that does, else the default.
    pub fn root_volume_pool_name(&self) -> Option<String> {
        if let Some(name) = &self.root_volume_pool {
            return Some(name.clone());
        }
        let pools = self.all_volume_pools();
        let default = self.default_volume_pool_name();
        let makes_snapshots = |p: &&VolumePoolConfig| p.kind() != "iscsi";
        pools
            .iter()
            .filter(makes_snapshots)
            .find(|p| Some(&p.name) == default.as_ref())
            .or_else(|| pools.iter().find(makes_snapshots))
            .map(|p| p.name.clone())
            .or(default)
    }

    fn check_volume_pools(&self) -> Result<(), String> {
        if self.volume_iscsi.is_some() && self.volume_dir.is_none() {
            return Err("[volume_iscsi] needs volume_dir: the exported files live there".into());
        }
        let pools = self.all_volume_pools();
        let mut names = std::collections::BTreeSet::new();
        for pool in &pools {
            let name = &pool.name;
            let name_ok = !name.is_empty()
                && name.len() <= 40
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !name_ok {
                return Err(format!(
                    "volume pool name {name:?}: 1 to 40 letters, digits, '.', '_' or '-'"
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(format!(
                    "volume pool '{name}' is defined twice (volume_dir, [volume_iscsi] and \
                     [volume_rbd] are the pools 'file', 'iscsi' and 'rbd')"
                ));
            }
            match (&pool.dir, &pool.iscsi, &pool.rbd) {
                (None, None, Some(_)) | (Some(_), _, None) => {}
                (_, _, Some(_)) => {
                    return Err(format!(
                        "volume pool '{name}': an RBD pool has no dir and no [iscsi]"
                    ))
                }
                (None, _, None) => {
                    return Err(format!(
                        "volume pool '{name}' needs dir (file, iSCSI) or [rbd]"
                    ))
                }
            }
        }
        for (i, a) in pools.iter().enumerate() {
            for b in &pools[i + 1..] {
                let same_kind = a.kind() == b.kind();
                if let (Some(x), Some(y), true) = (&a.dir, &b.dir, same_kind && a.kind() == "file")
                {
                    if x.starts_with(y) || y.starts_with(x) {
                        return Err(format!(
                            "file pools '{}' and '{}' overlap ({} and {}): a volume's path \
                             must name one pool",
                            a.name,
                            b.name,
                            x.display(),
                            y.display()
                        ));
                    }
                }
                if let (Some(x), Some(y)) = (&a.iscsi, &b.iscsi) {
                    if x.portal == y.portal && x.iqn_prefix == y.iqn_prefix {
                        return Err(format!(
                            "iSCSI pools '{}' and '{}' share portal {} and iqn_prefix {}: \
                             give each its own iqn_prefix",
                            a.name, b.name, x.portal, x.iqn_prefix
                        ));
                    }
                }
                if let (Some(x), Some(y)) = (&a.rbd, &b.rbd) {
                    if x.pool == y.pool {
                        return Err(format!(
                            "RBD pools '{}' and '{}' both use the Ceph pool '{}': a volume's \
                             `rbd:POOL/IMAGE` must name one of them",
                            a.name, b.name, x.pool
                        ));
                    }
                }
            }
        }
        let pool_named = |setting: &str, name: &str| {
            pools.iter().find(|p| p.name == name).ok_or_else(|| {
                format!(
                    "{setting} '{name}' is not a volume pool (pools: {})",
                    pools
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        };
        if let Some(name) = &self.default_volume_pool {
            pool_named("default_volume_pool", name)?;
        }
        if let Some(name) = &self.root_volume_pool {
            pool_named("root_volume_pool", name)?;
        }
        if self.root_volumes {
            let Some(name) = self.root_volume_pool_name() else {
                return Err(
                    "root_volumes needs a volume pool (volume_dir, [volume_rbd] or volume_pools)"
                        .into(),
                );
            };
            pool_named("root_volume_pool", &name)?;
            if pools.iter().all(|p| p.dir.is_none()) {
                return Err(
                    "root_volumes needs a pool with a dir (volume_dir or a file pool): \
                     images are downloaded there"
                        .into(),
                );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check().map(|()| config)
    }

    const RBD: &str = "conf = \"/etc/ceph/ceph.conf\"\nid = \"stratus\"\n\
                       keyring = \"/etc/ceph/k\"\n";

    #[test]
    fn the_legacy_keys_are_pools_named_by_their_kind() {
        let config = checked(&format!(
            "volume_dir = \"/v\"\n[volume_iscsi]\nportal = \"198.18.0.1:3260\"\n\
             [volume_rbd]\n{RBD}[[volume_pools]]\nname = \"scratch\"\ndir = \"/s\"\n"
        ))
        .unwrap();
        let pools: Vec<(String, &str)> = config
            .all_volume_pools()
            .iter()
            .map(|p| (p.name.clone(), p.kind()))
            .collect();
        assert_eq!(
            pools,
            [
                ("file".into(), "file"),
                ("iscsi".into(), "iscsi"),
                ("rbd".into(), "rbd"),
                ("scratch".into(), "file")
            ]
        );
        // As before pools had names: RBD first, then iSCSI, then files.
        assert_eq!(config.default_volume_pool_name().as_deref(), Some("rbd"));
        let only_new = checked("[[volume_pools]]\nname = \"a\"\ndir = \"/a\"\n").unwrap();
        assert_eq!(only_new.default_volume_pool_name().as_deref(), Some("a"));
        assert_eq!(Config::default().default_volume_pool_name(), None);
    }

    #[test]
    fn pools_that_a_location_could_not_tell_apart_are_refused() {
        let cases = [
            (
                "volume_dir = \"/v\"\n[[volume_pools]]\nname = \"file\"\ndir = \"/w\"\n",
                "volume pool 'file' is defined twice",
            ),
            (
                "[[volume_pools]]\nname = \"a\"\ndir = \"/v\"\n\
                 [[volume_pools]]\nname = \"b\"\ndir = \"/v/b\"\n",
                "file pools 'a' and 'b' overlap",
            ),
            (
                "volume_dir = \"/v\"\n[volume_iscsi]\nportal = \"198.18.0.1:3260\"\n\
                 [[volume_pools]]\nname = \"b\"\ndir = \"/w\"\n\
                 [volume_pools.iscsi]\nportal = \"198.18.0.1:3260\"\n",
                "give each its own iqn_prefix",
            ),
            (
                &format!(
                    "[volume_rbd]\n{RBD}[[volume_pools]]\nname = \"b\"\n\
                     [volume_pools.rbd]\n{RBD}"
                ),
                "both use the Ceph pool 'rbd'",
            ),
            (
                "[[volume_pools]]\nname = \"has space\"\ndir = \"/v\"\n",
                "1 to 40 letters",
            ),
            (
                "[[volume_pools]]\nname = \"a\"\n",
                "needs dir (file, iSCSI) or [rbd]",
            ),
            (
                &format!("[[volume_pools]]\nname = \"a\"\ndir = \"/v\"\n[volume_pools.rbd]\n{RBD}"),
                "an RBD pool has no dir",
            ),
            (
                "[volume_iscsi]\nportal = \"198.18.0.1:3260\"\n",
                "[volume_iscsi] needs volume_dir",
            ),
        ];
        for (text, reason) in cases {
            let e = checked(text).unwrap_err();
            assert!(e.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn the_default_and_root_pools_must_exist() {
        let e = checked("default_volume_pool = \"x\"\nvolume_dir = \"/v\"\n").unwrap_err();
        assert!(
            e.contains("default_volume_pool 'x' is not a volume pool (pools: file)"),
            "{e}"
        );
        // Volumes go to the iSCSI pool, roots to the file pool beside it unless told.
        let split = checked(
            "root_volumes = true\nvolume_dir = \"/v\"\n\
             [volume_iscsi]\nportal = \"198.18.0.1:3260\"\n",
        )
        .unwrap();
        assert_eq!(split.default_volume_pool_name().as_deref(), Some("iscsi"));
        assert_eq!(split.root_volume_pool_name().as_deref(), Some("file"));
        let told = checked(
            "root_volumes = true\nroot_volume_pool = \"iscsi\"\nvolume_dir = \"/v\"\n\
             [volume_iscsi]\nportal = \"198.18.0.1:3260\"\n",
        )
        .unwrap();
        assert_eq!(told.root_volume_pool_name().as_deref(), Some("iscsi"));
        let only_iscsi = checked(
            "root_volumes = true\n[[volume_pools]]\nname = \"san\"\ndir = \"/s\"\n\
             [volume_pools.iscsi]\nportal = \"198.18.0.1:3260\"\n",
        )
        .unwrap();
        assert_eq!(only_iscsi.root_volume_pool_name().as_deref(), Some("san"));
        let e = checked(&format!("root_volumes = true\n[volume_rbd]\n{RBD}")).unwrap_err();
        assert!(e.contains("images are downloaded there"), "{e}");
        let e = checked("root_volumes = true\n").unwrap_err();
        assert!(e.contains("root_volumes needs a volume pool"), "{e}");
    }
}
