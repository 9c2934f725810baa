use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::ContextError;

/// How the context reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ContextMethod {
    /// HEPiX/OpenNebula CD (`_STRATUSLAB`): StratusLab's default.
    #[default]
    One,
    /// StratusLab's CloudInit VFAT disk (`_CLOUD_INIT`, `meta.js`).
    CloudInit,
    /// cloud-init NoCloud seed (`cidata`), read by stock distribution cloud images.
    NoCloud,
}

impl ContextMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ContextMethod::One => "one",
            ContextMethod::CloudInit => "cloud-init",
            ContextMethod::NoCloud => "nocloud",
        }
    }
}

impl fmt::Display for ContextMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ContextMethod {
    type Err = ContextError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "one" => Ok(ContextMethod::One),
            "cloud-init" => Ok(ContextMethod::CloudInit),
            "nocloud" => Ok(ContextMethod::NoCloud),
            other => Err(ContextError::UnknownMethod(other.to_string())),
        }
    }
}

/// Keys that `context.sh` sets itself; a user value would silently replace ours.
pub const GENERATED_KEYS: [&str; 2] = ["PUBLIC_KEY", "TARGET"];

/// Shell variables whose replacement would change how the guest's scripts run,
/// since `context.sh` is sourced (and exported) by a root shell.
/// Bash keeps some of them read-only, and assigning one ends a POSIX-mode bash (the `sh`
/// of Red Hat-like guests) before the key is installed.
const SHELL_KEYS: [&str; 17] = [
    "IFS",
    "PATH",
    "ENV",
    "CDPATH",
    "PS1",
    "PS2",
    "PS4",
    "OPTIND",
    "OPTARG",
    "PPID",
    "LINENO",
    "SHELLOPTS",
    "BASHOPTS",
    "BASH_ENV",
    "UID",
    "EUID",
    "BASH_VERSINFO",
];

/// Largest context value, in bytes. The guest's epilog exports every key to SCRIPT_EXEC, and
/// Linux refuses to start a program with one environment string over 128 KiB.
pub const MAX_CONTEXT_VALUE: usize = 64 * 1024;

/// Largest context as a whole (`KEY=VALUE` pairs), in bytes: all of it goes into the
/// environment of SCRIPT_EXEC, which Linux limits to a quarter of the stack limit (2 MiB
/// with the usual 8 MiB), arguments and the guest's own variables included.
pub const MAX_CONTEXT_BYTES: usize = 512 * 1024;

/// A VM's context, as the orchestrator hands it to the node agent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    /// User key/value pairs in the order given (`--context`, `--context-file`),
    /// with the names as the user typed them; writers upper-case them.
    pub pairs: Vec<(String, String)>,
    /// The user's SSH public key(s), one per line.
    pub public_key: Option<String>,
    pub instance_id: String,
    pub hostname: String,
    /// Raw user data set by the orchestrator (not base64, not gzipped).
    pub user_data: Option<Vec<u8>>,
    /// Static addressing; `None` means the guest uses DHCP.
    pub network: Option<StaticNetwork>,
}

impl Context {
    pub fn new(instance_id: impl Into<String>, hostname: impl Into<String>) -> Self {
        Context {
            instance_id: instance_id.into(),
            hostname: hostname.into(),
            ..Context::default()
        }
    }

    pub fn with_public_key(mut self, key: impl Into<String>) -> Self {
        self.public_key = Some(key.into());
        self
    }

    pub fn with_pair(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.pairs.push((key.into(), value.into()));
        self
    }

    pub fn with_pairs(mut self, pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        self.pairs.extend(pairs);
        self
    }

    pub fn with_user_data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.user_data = Some(data.into());
        self
    }

    pub fn with_network(mut self, network: StaticNetwork) -> Self {
        self.network = Some(network);
        self
    }

    /// The value of a user key, matched the way writers see it (upper-cased).
    pub fn get(&self, key: &str) -> Option<&str> {
        let wanted = key.to_ascii_uppercase();
        self.pairs
            .iter()
            .find(|(k, _)| k.to_ascii_uppercase() == wanted)
            .map(|(_, v)| v.as_str())
    }

    /// The method asked for by a `CONTEXT_METHOD` key (as `prepare-context`
    /// files carry), if any; the node agent falls back to its default.
    pub fn requested_method(&self) -> Result<Option<ContextMethod>, ContextError> {
        self.get("CONTEXT_METHOD")
            .map(|m| m.trim().parse())
            .transpose()
    }

    /// Checks everything every method relies on; writers call it first so that
    /// a bad context fails before any file is created.
    pub fn validate(&self) -> Result<(), ContextError> {
        validate_instance_id(&self.instance_id)?;
        validate_hostname(&self.hostname)?;
        let mut seen: Vec<(String, &str)> = Vec::with_capacity(self.pairs.len());
        for (key, value) in &self.pairs {
            validate_key(key)?;
            let upper = key.to_ascii_uppercase();
            if GENERATED_KEYS.contains(&upper.as_str()) {
                return Err(ContextError::ReservedKey {
                    key: key.clone(),
                    reason: "context.sh sets it from the instance (public key, CD target)",
                });
            }
            if SHELL_KEYS.contains(&upper.as_str()) || upper.starts_with("LD_") {
                return Err(ContextError::ReservedKey {
                    key: key.clone(),
                    reason: "the guest sources context.sh in a root shell, where this name changes how the shell runs",
                });
            }
            if let Some((_, first)) = seen.iter().find(|(u, _)| *u == upper) {
                return Err(ContextError::DuplicateKey {
                    key: upper.clone(),
                    first: first.to_string(),
                    second: key.clone(),
                });
            }
            if value.contains('\0') {
                return Err(ContextError::NulInValue { key: key.clone() });
            }
            if value.len() > MAX_CONTEXT_VALUE {
                return Err(ContextError::ValueTooLong {
                    key: key.clone(),
                    len: value.len(),
                });
            }
            seen.push((upper, key.as_str()));
        }
        let total: usize = self.pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if total > MAX_CONTEXT_BYTES {
            return Err(ContextError::ContextTooLarge { len: total });
        }
        if let Some(key) = &self.public_key {
            if key.contains('\0') {
                return Err(ContextError::NulInValue {
                    key: "PUBLIC_KEY".into(),
                });
            }
        }
        if let Some(net) = &self.network {
            net.validate()?;
        }
        Ok(())
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what a POSIX shell accepts as a variable name.
pub fn validate_key(key: &str) -> Result<(), ContextError> {
    let mut chars = key.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ContextError::InvalidKey {
            key: key.to_string(),
        })
    }
}

fn validate_instance_id(id: &str) -> Result<(), ContextError> {
    if id.trim().is_empty() || id.chars().any(char::is_control) || id.len() > 255 {
        return Err(ContextError::InvalidInstanceId(id.to_string()));
    }
    Ok(())
}

fn validate_hostname(name: &str) -> Result<(), ContextError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(ContextError::InvalidHostname(name.to_string()));
    }
    Ok(())
}

fn split_entry(entry: &str) -> Option<(String, String)> {
    let (key, value) = entry.split_once('=')?;
    Some((key.trim().to_string(), value.to_string()))
}

/// Parses `--context 'K=V#K2=V2'`. Empty segments (a trailing `#`) are ignored.
pub fn parse_context_arg(arg: &str) -> Result<Vec<(String, String)>, ContextError> {
    let mut out = Vec::new();
    for entry in arg.split('#').filter(|e| !e.trim().is_empty()) {
        let (key, value) = split_entry(entry).ok_or_else(|| ContextError::MalformedEntry {
            entry: entry.to_string(),
        })?;
        validate_key(&key)?;
        out.push((key, value));
    }
    Ok(out)
}

/// Parses a `--context-file` (one `K=V` per line, as `stratus-prepare-context`
/// writes). Blank lines and lines starting with `#` are skipped.
pub fn parse_context_file(bytes: &[u8]) -> Result<Vec<(String, String)>, ContextError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ContextError::NotUtf8 {
        what: format!(
            "the context file (invalid byte at offset {})",
            e.valid_up_to()
        ),
    })?;
    let mut out = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (key, value) = split_entry(line).ok_or_else(|| ContextError::MalformedContextLine {
            line: idx + 1,
            text: line.to_string(),
        })?;
        validate_key(&key)?;
        out.push((key, value));
    }
    Ok(out)
}

/// An address with its prefix length, e.g. `192.0.2.10/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpCidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, ContextError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(ContextError::InvalidNetwork(format!(
                "prefix /{prefix} is too long for {addr}"
            )));
        }
        Ok(IpCidr { addr, prefix })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpCidr {
    type Err = ContextError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ContextError::InvalidNetwork(format!("`{s}` is not an address/prefix"));
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        IpCidr::new(addr, prefix)
    }
}

/// Static addressing for the guest, rendered as cloud-init network-config v2.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StaticNetwork {
    pub interfaces: Vec<StaticInterface>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticInterface {
    /// Name the guest gives the NIC (`set-name`), so that renderers without
    /// MAC matching (ifupdown, sysconfig) still configure the right device.
    pub name: String,
    /// MAC address as the VMM presents it, e.g. `02:00:c0:00:02:0a`.
    pub mac: String,
    pub addresses: Vec<IpCidr>,
    pub gateway4: Option<Ipv4Addr>,
    pub gateway6: Option<Ipv6Addr>,
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
}

impl StaticInterface {
    pub fn new(name: impl Into<String>, mac: impl Into<String>) -> Self {
        StaticInterface {
            name: name.into(),
            mac: mac.into(),
            addresses: Vec::new(),
            gateway4: None,
            gateway6: None,
            nameservers: Vec::new(),
            search: Vec::new(),
        }
    }
}

impl StaticNetwork {
    pub fn validate(&self) -> Result<(), ContextError> {
        if self.interfaces.is_empty() {
            return Err(ContextError::InvalidNetwork(
                "static addressing needs at least one interface".into(),
            ));
        }
        let mut names: Vec<&str> = Vec::new();
        for iface in &self.interfaces {
            let name_ok = !iface.name.is_empty()
                && iface.name.len() <= 15
                && iface
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !name_ok {
                return Err(ContextError::InvalidNetwork(format!(
                    "interface name `{}` must be 1-15 letters, digits, `-`, `_` or `.`",
                    iface.name
                )));
            }
            if names.contains(&iface.name.as_str()) {
                return Err(ContextError::InvalidNetwork(format!(
                    "interface `{}` is listed twice",
                    iface.name
                )));
            }
            names.push(&iface.name);
            let octets: Vec<&str> = iface.mac.split(':').collect();
            if octets.len() != 6
                || !octets
                    .iter()
                    .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(ContextError::InvalidNetwork(format!(
                    "interface `{}`: `{}` is not a MAC address like 02:00:c0:00:02:0a",
                    iface.name, iface.mac
                )));
            }
            if iface.addresses.is_empty() {
                return Err(ContextError::InvalidNetwork(format!(
                    "interface `{}` has no address",
                    iface.name
                )));
            }
            for domain in &iface.search {
                if validate_hostname(domain).is_err() {
                    return Err(ContextError::InvalidNetwork(format!(
                        "interface `{}`: `{domain}` is not a DNS search domain",
                        iface.name
                    )));
                }
            }
        }
        Ok(())
    }
}
