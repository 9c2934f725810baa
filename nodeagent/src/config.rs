//! The agent's configuration file (TOML). Every key has a default except `token_file`;
//! `stratus-nodeagent --check-config FILE` reads it, checks it and prints it with the
//! defaults filled in.

use std::net::SocketAddr;
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
    #[error("cannot read {what} from {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("{what} file {path} is readable by other users (mode {mode:o}); chmod 600 it")]
    PrivateFileMode {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("the TLS certificate file {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("the TLS file {path} is not valid PEM: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the TLS certificate {cert} and key {key} do not make a server identity: {source}")]
    TlsIdentity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// `/etc/stratus/nodeagent.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// File holding the bearer token every request must carry (mode 0600).
    pub token_file: PathBuf,
    /// VM records, per-VM disks and console logs live here; it must survive reboots.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The jails' root directories (empty mount points; gone with the jails).
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// The VMM binary to run, one process per VM.
    #[serde(default = "default_vmm_binary")]
    pub vmm_binary: PathBuf,
    /// Seconds a graceful shutdown waits for the guest before a hard stop.
    #[serde(default = "default_shutdown_timeout_s")]
    pub shutdown_timeout_s: u64,
    /// Where Marketplace images are cached (default: `state_dir/images`).
    #[serde(default)]
    pub image_cache_dir: Option<PathBuf>,
    /// The site's image policy (endorser, checksum and identifier white/black lists);
    /// none by default.
    #[serde(default)]
    pub image_policy: Option<PathBuf>,
    /// Follow `file://` locations of Marketplace entries (images on a filesystem every node
    /// mounts). Off by default: an entry's locations are its endorser's choice, and a
    /// `file://` one would have the agent copy any file it can read into a VM's disk.
    #[serde(default)]
    pub allow_file_locations: bool,
    /// The Marketplace `POST /images {"identifier": …}` looks identifiers up in.
    #[serde(default)]
    pub marketplace_endpoint: Option<String>,
    /// Largest console log kept per VM, in bytes (rotated once).
    #[serde(default = "default_console_max_bytes")]
    pub console_max_bytes: u64,
    #[serde(default)]
    pub capacity: CapacityConfig,
    /// `kvm` (the default): every VM is a `stratus-vmm` process. `none`: for control-plane
    /// benchmarks only (as Nova's fake driver) — VMs are accepted, recorded and reported
    /// but never started, and nothing is made for them on the host; the agent refuses to
    /// start with it unless run with `--allow-no-vm-hypervisor`.
    #[serde(default)]
    pub hypervisor: Hypervisor,
    /// The guest networks VMs' NICs join.
    #[serde(default)]
    pub networks: Vec<crate::networks::NetworkConfig>,
    /// Serve the API over HTTPS with this certificate; plain HTTP when absent (then keep
    /// `listen` on an address only the orchestrator reaches).
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub jailer: JailerConfig,
}

/// `[jailer]`: how each VMM is confined (`stratus-jailer`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailerConfig {
    /// Start every VMM through the jailer. Off, VMMs run as the agent's user (root) in the
    /// host's namespaces, with only their seccomp filters.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Default: `stratus-jailer` beside `vmm_binary`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// VM number n runs as uid and gid `uid_base + n`; keep the range clear of the host's
    /// users and of subordinate id ranges.
    #[serde(default = "default_uid_base")]
    pub uid_base: u32,
    #[serde(default = "default_uid_count")]
    pub uid_count: u32,
    /// Put each VMM in a cgroup with limits (v2, or v1's memory/pids/cpu controllers).
    #[serde(default = "yes")]
    pub cgroups: bool,
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    /// Memory a VMM may use beyond its guest's RAM (its own code, queues, bounce buffers,
    /// librbd's caches).
    #[serde(default = "default_memory_overhead_mib")]
    pub memory_overhead_mib: u64,
    /// Threads a VMM may have (vCPUs, device workers, librbd's threads).
    #[serde(default = "default_pids_max")]
    pub pids_max: u64,
}

impl Default for JailerConfig {
    fn default() -> Self {
        JailerConfig {
            enabled: true,
            binary: None,
            uid_base: default_uid_base(),
            uid_count: default_uid_count(),
            cgroups: true,
            cgroup_parent: default_cgroup_parent(),
            cgroup_root: default_cgroup_root(),
            memory_overhead_mib: default_memory_overhead_mib(),
            pids_max: default_pids_max(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_uid_base() -> u32 {
    1_900_000_000
}
fn default_uid_count() -> u32 {
    65_536
}
fn default_cgroup_parent() -> String {
    "stratus".into()
}
fn default_cgroup_root() -> PathBuf {
    "/sys/fs/cgroup".into()
}
fn default_memory_overhead_mib() -> u64 {
    256
}
fn default_pids_max() -> u64 {
    1024
}

/// `[tls]`: the agent's server certificate, as PEM files.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, the agent's own certificate first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1), mode 0600.
    pub key_file: PathBuf,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    #[default]
    Kvm,
    /// No VMs at all: the benchmarks' stand-in for a host.
    None,
}

/// What the host offers to VMs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// vCPUs handed out per host CPU.
    #[serde(default = "one")]
    pub cpu_overcommit: f64,
    /// Guest memory handed out per MiB of host memory (after the reserve).
    #[serde(default = "one")]
    pub memory_overcommit: f64,
    /// Host memory kept for the host itself and the VMMs' own overhead.
    #[serde(default = "default_memory_reserve_mib")]
    pub memory_reserve_mib: u64,
    /// Host CPUs offered (default: what the host has).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Host memory offered in MiB (default: what the host has).
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig {
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            memory_reserve_mib: default_memory_reserve_mib(),
            cpus: None,
            memory_mib: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8776))
}
fn default_state_dir() -> PathBuf {
    "/var/lib/stratus/nodeagent".into()
}
fn default_run_dir() -> PathBuf {
    "/run/stratus".into()
}
fn default_vmm_binary() -> PathBuf {
    "/usr/bin/stratus-vmm".into()
}
fn default_shutdown_timeout_s() -> u64 {
    120
}
fn default_console_max_bytes() -> u64 {
    stratus_vmm::console_log::DEFAULT_MAX_BYTES
}
fn one() -> f64 {
    1.0
}
fn default_memory_reserve_mib() -> u64 {
    1024
}

/// A secret's file, refused when anyone but its owner may read it.
pub(crate) fn read_private_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let read_err = |source| ConfigError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    };
    // Checked on the opened file, so a swap between the check and the read cannot pass.
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mode = file.metadata().map_err(read_err)?.mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError::PrivateFileMode {
            what,
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read_err)?;
    Ok(bytes)
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if let Some(endpoint) = &config.marketplace_endpoint {
            let uri = endpoint.parse::<axum::http::Uri>();
            let web = uri.as_ref().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            });
            if !web {
                return Err(invalid(format!(
                    "marketplace_endpoint '{endpoint}' is not an http:// or https:// URL"
                )));
            }
        }
        let c = &config.capacity;
        for (name, ratio) in [
            ("capacity.cpu_overcommit", c.cpu_overcommit),
            ("capacity.memory_overcommit", c.memory_overcommit),
        ] {
            if !(ratio.is_finite() && ratio > 0.0 && ratio <= 64.0) {
                return Err(invalid(format!(
                    "{name} must be between 0 and 64, not {ratio}"
                )));
            }
        }
        let mut names = std::collections::HashSet::new();
        for network in &config.networks {
            if !names.insert(network.name.as_str()) {
                return Err(invalid(format!(
                    "network '{}' is defined twice",
                    network.name
                )));
            }
            if !network.subnet.is_host(network.address) {
                return Err(invalid(format!(
                    "network '{}': address {} is not in its subnet",
                    network.name, network.address
                )));
            }
            if network.bridge.is_empty() || network.bridge.len() >= libc::IFNAMSIZ {
                return Err(invalid(format!(
                    "network '{}': bridge name must be 1 to 15 bytes",
                    network.name
                )));
            }
        }
        if config.shutdown_timeout_s == 0 {
            return Err(invalid("shutdown_timeout_s must be at least 1".into()));
        }
        let jailer = &config.jailer;
        if jailer.uid_base == 0
            || jailer.uid_count == 0
            || jailer.uid_base.checked_add(jailer.uid_count).is_none()
        {
            return Err(invalid(format!(
                "jailer.uid_base ({}) and jailer.uid_count ({}) must give a non-empty range of \
                 non-root ids below 2^32",
                jailer.uid_base, jailer.uid_count
            )));
        }
        for (name, dir) in [
            ("state_dir", &config.state_dir),
            ("run_dir", &config.run_dir),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(format!(
                    "{name} must be an absolute path, not {}",
                    dir.display()
                )));
            }
        }
        Ok(config)
    }

    /// The bearer token, from a file only its owner may read.
    pub fn read_token(&self) -> Result<String, ConfigError> {
        let path = &self.token_file;
        let bytes = read_private_file("the API token", path)?;
        let token = String::from_utf8_lossy(&bytes).trim().to_owned();
        if token.is_empty() {
            return Err(ConfigError::EmptyToken { path: path.clone() });
        }
        Ok(token)
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// Where the jail of VM `id` has its root while the VM runs.
    pub fn jail_root(&self, id: &str) -> PathBuf {
        self.run_dir.join("jails").join(id)
    }

    pub fn jailer_binary(&self) -> PathBuf {
        self.jailer
            .binary
            .clone()
            .unwrap_or_else(|| self.vmm_binary.with_file_name("stratus-jailer"))
    }

    pub fn image_cache_dir(&self) -> PathBuf {
        self.image_cache_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("images"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_everything_but_the_token_file() {
        let c = AgentConfig::parse("token_file = \"/etc/stratus/token\"\n", Path::new("a.toml"))
            .unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.shutdown_timeout_s, 120);
        assert_eq!(c.capacity.cpu_overcommit, 1.0);
        assert_eq!(c.capacity.memory_reserve_mib, 1024);
        let e = AgentConfig::parse("", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_file"), "{e}");
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused_with_their_names() {
        let base = "token_file = \"/t\"\n";
        for (extra, needle) in [
            (
                "[capacity]\ncpu_overcommit = 0.0\n",
                "capacity.cpu_overcommit",
            ),
            (
                "[capacity]\nmemory_overcommit = -1.0\n",
                "capacity.memory_overcommit",
            ),
            ("shutdown_timeout_s = 0\n", "shutdown_timeout_s"),
            ("state_dir = \"relative\"\n", "state_dir"),
            ("listen = \"nowhere\"\n", "listen"),
            ("colour = \"blue\"\n", "colour"),
            (
                "marketplace_endpoint = \"marketplace.example.org\"\n",
                "marketplace_endpoint 'marketplace.example.org'",
            ),
        ] {
            let e = AgentConfig::parse(&format!("{base}{extra}"), Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn the_token_file_must_be_private_and_not_empty() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = AgentConfig::parse("token_file = \"/t\"\n", Path::new("a.toml")).unwrap();
        c.token_file = path.clone();
        assert!(c
            .read_token()
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(c.read_token().unwrap(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(c.read_token().unwrap_err().to_string().contains("empty"));
    }
}
