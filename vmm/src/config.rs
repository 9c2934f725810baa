//! VM configuration: from command-line flags or an equivalent JSON file.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::devices::rate_limiter::RateLimit;
use crate::devices::virtio::block::io::iscsi::{IscsiSource, IscsiUrl, DEFAULT_TIMEOUT_SECS};
use crate::devices::virtio::block::io::rbd::{
    RbdName, RbdSource, DEFAULT_TIMEOUT_SECS as RBD_DEFAULT_TIMEOUT_SECS,
};
use crate::devices::virtio::block::io::{CacheMode, ImageFormat, IoEngine};
use crate::devices::virtio::block::{BlockConfig, VIRTIO_BLK_ID_BYTES};
use crate::devices::virtio::net::device::parse_mac;
use crate::devices::virtio::net::{NetConfig, MAX_QUEUE_PAIRS};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    /// The VMM's standard output (and standard input when it is a terminal).
    #[default]
    Stdout,
    /// Append the console to a file capped at `max_bytes` (rotated once to `PATH.1`).
    File(ConsoleFile),
    /// Discard console output.
    Off,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleFile {
    pub path: PathBuf,
    #[serde(default = "default_console_max_bytes")]
    pub max_bytes: u64,
}

fn default_console_max_bytes() -> u64 {
    crate::console_log::DEFAULT_MAX_BYTES
}

const CONSOLE_SHAPE: &str = "--console takes stdout, off or file=PATH[,max=BYTES]";

impl FromStr for ConsoleConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err(ConfigError::Invalid(CONSOLE_SHAPE.into())),
            "stdout" => Ok(ConsoleConfig::Stdout),
            "off" => Ok(ConsoleConfig::Off),
            spec if spec.starts_with("file=") => {
                let mut path = None;
                let mut max_bytes = default_console_max_bytes();
                for item in spec.split(',') {
                    match item.split_once('=') {
                        Some(("file", value)) if !value.is_empty() => path = Some(value.into()),
                        Some(("max", value)) => {
                            max_bytes = value.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                                ConfigError::Invalid(format!(
                                    "--console max= takes a positive number of bytes, not '{value}'"
                                ))
                            })?;
                        }
                        _ => {
                            return Err(ConfigError::Invalid(format!(
                                "{CONSOLE_SHAPE}; '{item}' is not one of those"
                            )))
                        }
                    }
                }
                let path = path.ok_or_else(|| ConfigError::Invalid(CONSOLE_SHAPE.into()))?;
                Ok(ConsoleConfig::File(ConsoleFile { path, max_bytes }))
            }
            // A bare path, as before file= existed.
            path => Ok(ConsoleConfig::File(ConsoleFile {
                path: path.into(),
                max_bytes: default_console_max_bytes(),
            })),
        }
    }
}

fn default_cpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    512
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default)]
    pub disks: Vec<BlockConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Unix socket for the VMM control API (`--api-socket`); no API without it.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// PCI slots kept free for hot-plugged disks and NICs (`--pci-slots`).
    #[serde(default = "default_pci_slots")]
    pub pci_slots: u8,
}

fn default_pci_slots() -> u8 {
    crate::device_manager::DEFAULT_SPARE_SLOTS
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not a valid VM configuration: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// APIC ids are 8 bits and 0xff is broadcast.
pub const MAX_VCPUS: u8 = 254;

impl VmConfig {
    pub fn from_json_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let config: VmConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what can be checked without touching KVM or the files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "--cpus must be between 1 and {MAX_VCPUS}, not {}",
                self.cpus
            )));
        }
        for disk in &self.disks {
            Self::validate_disk(disk)?;
        }
        let devices = self.disks.len() + self.nets.len();
        let slots = usize::from(crate::device_manager::MAX_SLOT);
        if devices + usize::from(self.pci_slots) > slots {
            return Err(ConfigError::Invalid(format!(
                "{devices} disks and NICs plus --pci-slots {} spare slots need more than the {slots} PCI slots there are",
                self.pci_slots
            )));
        }
        for net in &self.nets {
            Self::validate_net(net)?;
        }
        Ok(())
    }

    /// What a disk's fields must satisfy beyond their types (also for hot-plugged disks).
    pub fn validate_disk(disk: &BlockConfig) -> Result<(), ConfigError> {
        let name = disk.source_name();
        if let Some(source) = &disk.rbd {
            if disk.iscsi.is_some() || !disk.path.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "disk {}: give one of path, iscsi and rbd",
                    name.display()
                )));
            }
            RbdName::parse(&source.image).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if disk.format != ImageFormat::Raw {
                return Err(ConfigError::Invalid(format!(
                    "disk {}: an RBD disk is raw; qcow2 needs a file",
                    name.display()
                )));
            }
        }
        match (&disk.iscsi, disk.path.as_os_str().is_empty()) {
            _ if disk.rbd.is_some() => {}
            (Some(_), false) => {
                return Err(ConfigError::Invalid(format!(
                    "disk {}: give path or iscsi, not both",
                    name.display()
                )))
            }
            (None, true) => {
                return Err(ConfigError::Invalid(
                    "a disk needs path (a file or block device) or iscsi (a LUN)".into(),
                ))
            }
            (Some(source), true) => {
                IscsiUrl::parse(&source.url).map_err(|e| ConfigError::Invalid(e.to_string()))?;
                if disk.format != ImageFormat::Raw {
                    return Err(ConfigError::Invalid(format!(
                        "disk {}: an iSCSI disk is raw; qcow2 needs a file",
                        name.display()
                    )));
                }
            }
            (None, false) => {}
        }
        zero_rate(&format!("disk {}", name.display()), &disk.rate_limit)?;
        if let Some(serial) = &disk.serial {
            if serial.len() > VIRTIO_BLK_ID_BYTES {
                return Err(ConfigError::Invalid(format!(
                    "disk serial '{serial}' is longer than {VIRTIO_BLK_ID_BYTES} bytes"
                )));
            }
        }
        Ok(())
    }

    pub fn validate_net(net: &NetConfig) -> Result<(), ConfigError> {
        zero_rate(&format!("NIC {}", net.tap), &net.rate_limit)?;
        net.check_queues(net.fd.is_some())
            .map_err(|e| ConfigError::Invalid(format!("NIC {}: {e}", net.tap)))?;
        if parse_mac(&net.mac).is_none() {
            return Err(ConfigError::Invalid(format!(
                "--net mac '{}' is not a unicast MAC address like 02:00:c6:12:00:0a",
                net.mac
            )));
        }
        Ok(())
    }
}

/// The flags refuse a rate of 0 (it would read as "no limit"); so does the JSON form.
fn zero_rate(what: &str, limit: &RateLimit) -> Result<(), ConfigError> {
    if limit.bytes_per_sec == Some(0) || limit.ops_per_sec == Some(0) {
        Err(ConfigError::Invalid(format!(
            "{what} rate limits take a positive number per second, not 0 (leave the field out for no limit)"
        )))
    } else {
        Ok(())
    }
}

/// Parses `tap=NAME,mac=02:00:…[,fd=N][,queues=N]`.
pub fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let mut tap = None;
    let mut mac = None;
    let mut fd = None;
    let mut queues = 1;
    let mut id = None;
    let mut rate_limit = RateLimit::default();
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::Invalid(format!("--net item '{item}' is not key=value")))?;
        match key {
            "id" => id = Some(value.to_string()),
            "tap" => tap = Some(value.to_string()),
            "mac" => mac = Some(value.to_string()),
            "fd" => {
                fd = Some(value.parse::<i32>().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "--net fd= takes a descriptor number, not '{value}'"
                    ))
                })?)
            }
            "queues" => {
                queues = value
                    .parse::<u16>()
                    .ok()
                    .filter(|q| (1..=MAX_QUEUE_PAIRS).contains(q))
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "--net queues= takes a number of queue pairs from 1 to \
                             {MAX_QUEUE_PAIRS}, not '{value}'"
                        ))
                    })?
            }
            "bps" => rate_limit.bytes_per_sec = Some(parse_rate("--net", key, value)?),
            "pps" => rate_limit.ops_per_sec = Some(parse_rate("--net", key, value)?),
            other => {
                return Err(ConfigError::Invalid(format!(
                    "--net has no option '{other}' (known: id, tap, mac, fd, queues, bps, pps)"
                )))
            }
        }
    }
    let tap = tap
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ConfigError::Invalid(format!("--net '{spec}' needs tap=")))?;
    let mac = mac.ok_or_else(|| ConfigError::Invalid(format!("--net '{spec}' needs mac=")))?;
    if parse_mac(&mac).is_none() {
        return Err(ConfigError::Invalid(format!(
            "--net mac '{mac}' is not a unicast MAC address like 02:00:c6:12:00:0a"
        )));
    }
    Ok(NetConfig {
        id,
        tap,
        mac,
        fd,
        rate_limit,
        queues,
    })
}

fn parse_rate(flag: &str, key: &str, value: &str) -> Result<u64, ConfigError> {
    value.parse::<u64>().ok().filter(|v| *v > 0).ok_or_else(|| {
        ConfigError::Invalid(format!(
            "{flag} {key}= takes a positive number per second, not '{value}'"
        ))
    })
}

fn parse_switch(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::Invalid(format!(
            "--disk {key}= takes on or off, not '{value}'"
        ))),
    }
}

/// Parses `path=/img,ro=on|off,serial=ID,cache=writeback|none,engine=io_uring|sync`, or
/// `iscsi://[USER@]HOST[:PORT]/TARGET-IQN/LUN[,initiator=IQN,secret-file=PATH,timeout=SECS]`
/// followed by the same options.
pub fn parse_disk(spec: &str) -> Result<BlockConfig, ConfigError> {
    let mut path = None;
    let mut iscsi = None;
    let mut rbd = None;
    let mut spec_items = spec;
    if let Some(rest) = spec.strip_prefix("rbd:") {
        let (name, rest) = rest.split_once(',').unwrap_or((rest, ""));
        RbdName::parse(name).map_err(|e| ConfigError::Invalid(format!("--disk {e}")))?;
        rbd = Some(RbdSource {
            image: name.to_owned(),
            conf: None,
            id: None,
            keyring: None,
            timeout_secs: RBD_DEFAULT_TIMEOUT_SECS,
        });
        spec_items = rest;
    } else if spec.starts_with("iscsi://") {
        let (url, rest) = spec.split_once(',').unwrap_or((spec, ""));
        IscsiUrl::parse(url).map_err(|e| ConfigError::Invalid(format!("--disk {e}")))?;
        iscsi = Some(IscsiSource {
            url: url.to_owned(),
            initiator: None,
            secret_file: None,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        });
        spec_items = rest;
    }
    let mut format = ImageFormat::Raw;
    let mut read_only = false;
    let mut serial = None;
    let mut cache = CacheMode::default();
    let mut engine = None;
    let mut rate_limit = RateLimit::default();
    let mut id = None;
    let network = iscsi.is_some() || rbd.is_some();
    for item in spec_items.split(',').filter(|i| !(i.is_empty() && network)) {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            ConfigError::Invalid(format!("--disk item '{item}' is not key=value"))
        })?;
        fn network_only<'a>(
            source: &'a mut Option<IscsiSource>,
            key: &str,
        ) -> Result<&'a mut IscsiSource, ConfigError> {
            source.as_mut().ok_or_else(|| {
                ConfigError::Invalid(format!("--disk {key}= is for iscsi:// disks only"))
            })
        }
        fn rbd_only<'a>(
            source: &'a mut Option<RbdSource>,
            key: &str,
        ) -> Result<&'a mut RbdSource, ConfigError> {
            source.as_mut().ok_or_else(|| {
                ConfigError::Invalid(format!("--disk {key}= is for rbd: disks only"))
            })
        }
        match key {
            "conf" => rbd_only(&mut rbd, key)?.conf = Some(value.into()),
            "keyring" => rbd_only(&mut rbd, key)?.keyring = Some(value.into()),
            "id" if rbd.is_some() => rbd_only(&mut rbd, key)?.id = Some(value.to_string()),
            "timeout" if rbd.is_some() => {
                rbd_only(&mut rbd, key)?.timeout_secs =
                    value.parse().ok().filter(|t| *t > 0).ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "--disk timeout= takes a positive number of seconds, not '{value}'"
                        ))
                    })?
            }
            "initiator" => network_only(&mut iscsi, key)?.initiator = Some(value.to_string()),
            "secret-file" => network_only(&mut iscsi, key)?.secret_file = Some(value.into()),
            "timeout" => {
                network_only(&mut iscsi, key)?.timeout_secs =
                    value.parse().ok().filter(|t| *t > 0).ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "--disk timeout= takes a positive number of seconds, not '{value}'"
                        ))
                    })?
            }
            // On an rbd: disk, id= names the Ceph client (as in Ceph's own tools), so the
            // device's id has a name of its own too.
            "id" | "device-id" => id = Some(value.to_string()),
            "path" => path = Some(PathBuf::from(value)),
            "format" => {
                format = value
                    .parse()
                    .map_err(|e| ConfigError::Invalid(format!("--disk {e}")))?
            }
            "ro" => read_only = parse_switch(key, value)?,
            "serial" => serial = Some(value.to_string()),
            "cache" => {
                cache = value
                    .parse()
                    .map_err(|e| ConfigError::Invalid(format!("--disk {e}")))?
            }
            "engine" => {
                engine = Some(
                    value
                        .parse::<IoEngine>()
                        .map_err(|e| ConfigError::Invalid(format!("--disk {e}")))?,
                )
            }
            "bps" => rate_limit.bytes_per_sec = Some(parse_rate("--disk", key, value)?),
            "iops" => rate_limit.ops_per_sec = Some(parse_rate("--disk", key, value)?),
            other => {
                return Err(ConfigError::Invalid(format!(
                    "--disk has no option '{other}' (known: id, device-id, path, format, ro, serial, cache, engine, bps, iops; for iscsi:// also initiator, secret-file, timeout; for rbd: also conf, id (the Ceph client), keyring, timeout)"
                )))
            }
        }
    }
    let path = match (iscsi.is_some() || rbd.is_some(), path) {
        (true, Some(_)) => {
            return Err(ConfigError::Invalid(
                "--disk takes path=, an iscsi:// URL or an rbd: image, one of them".into(),
            ))
        }
        (true, None) => PathBuf::new(),
        (false, path) => path.filter(|p| !p.as_os_str().is_empty()).ok_or_else(|| {
            ConfigError::Invalid(format!("--disk '{spec}' needs path= or an iscsi:// URL"))
        })?,
    };
    Ok(BlockConfig {
        id,
        path,
        iscsi,
        rbd,
        format,
        read_only,
        serial,
        cache,
        engine,
        rate_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_spec_parses_all_options() {
        let d = parse_disk("path=/tmp/a.img,ro=on,serial=data-1").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.serial.as_deref(), Some("data-1"));
        assert!(!parse_disk("path=/x").unwrap().read_only);
    }

    #[test]
    fn bad_disk_specs_name_the_problem() {
        let e = parse_disk("ro=on").unwrap_err().to_string();
        assert!(e.contains("needs path="), "{e}");
        let e = parse_disk("path=/x,aio=native").unwrap_err().to_string();
        assert!(e.contains("no option 'aio'"), "{e}");
        let e = parse_disk("path=/x,cache=unsafe").unwrap_err().to_string();
        assert!(e.contains("writeback or none"), "{e}");
        let e = parse_disk("path=/x,engine=aio").unwrap_err().to_string();
        assert!(e.contains("io_uring or sync"), "{e}");
        let e = parse_disk("path=/x,bps=0").unwrap_err().to_string();
        assert!(e.contains("positive number"), "{e}");
        let d = parse_disk("path=/x,bps=1048576,iops=100").unwrap();
        assert_eq!(
            d.rate_limit,
            RateLimit {
                bytes_per_sec: Some(1 << 20),
                ops_per_sec: Some(100)
            }
        );
        let d = parse_disk("path=/x,cache=none,engine=sync").unwrap();
        assert_eq!((d.cache, d.engine), (CacheMode::None, Some(IoEngine::Sync)));
        let d = parse_disk("path=/x.qcow2,format=qcow2").unwrap();
        assert_eq!(d.format, ImageFormat::Qcow2);
        assert_eq!(parse_disk("path=/x").unwrap().format, ImageFormat::Raw);
        let e = parse_disk("path=/x,format=vmdk").unwrap_err().to_string();
        assert!(e.contains("raw or qcow2, not 'vmdk'"), "{e}");
        let e = parse_disk("path=/x,ro=maybe").unwrap_err().to_string();
        assert!(e.contains("'maybe'"), "{e}");
        assert!(parse_disk("path").is_err());
    }

    #[test]
    fn console_flag_forms() {
        let file = |path: &str, max_bytes: u64| {
            ConsoleConfig::File(ConsoleFile {
                path: path.into(),
                max_bytes,
            })
        };
        assert_eq!(
            "stdout".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::Stdout
        );
        assert_eq!("off".parse::<ConsoleConfig>().unwrap(), ConsoleConfig::Off);
        assert_eq!(
            "file=/var/log/c,max=4096".parse::<ConsoleConfig>().unwrap(),
            file("/var/log/c", 4096)
        );
        assert_eq!(
            "/var/log/c".parse::<ConsoleConfig>().unwrap(),
            file("/var/log/c", crate::console_log::DEFAULT_MAX_BYTES)
        );
        for bad in [
            "",
            "file=",
            "file=/c,max=0",
            "file=/c,max=x",
            "file=/c,size=1",
        ] {
            let e = bad.parse::<ConsoleConfig>().unwrap_err().to_string();
            assert!(e.contains("--console"), "{bad}: {e}");
        }
    }

    #[test]
    fn json_config_matches_flags_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        std::fs::write(
            &path,
            r#"{"kernel":"/k","cmdline":"console=ttyS0","cpus":2,"memory_mib":256,
               "disks":[{"path":"/d.img","read_only":true,"serial":"s1"}],
               "console":{"file":{"path":"/tmp/c.log"}}}"#,
        )
        .unwrap();
        let c = VmConfig::from_json_file(&path).unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory_mib, 256);
        assert_eq!(
            c.disks[0],
            parse_disk("path=/d.img,ro=on,serial=s1").unwrap()
        );
        assert_eq!(c.console, "/tmp/c.log".parse().unwrap());
        assert_eq!(c.console, "file=/tmp/c.log".parse().unwrap());
        assert_eq!(c.api_socket, None);
        std::fs::write(
            &path,
            r#"{"kernel":"/k","api_socket":"/run/stratus/vm-1.sock"}"#,
        )
        .unwrap();
        let c = VmConfig::from_json_file(&path).unwrap();
        assert_eq!(c.api_socket, Some(PathBuf::from("/run/stratus/vm-1.sock")));
        std::fs::write(&path, r#"{"kernel":"/k","cpu":2}"#).unwrap();
        let e = VmConfig::from_json_file(&path).unwrap_err().to_string();
        assert!(e.contains("unknown field `cpu`"), "{e}");
        // A rate of 0 is refused as on the command line, not taken as "no limit".
        std::fs::write(
            &path,
            r#"{"kernel":"/k","disks":[{"path":"/d.img","rate_limit":{"ops_per_sec":0}}]}"#,
        )
        .unwrap();
        let e = VmConfig::from_json_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("disk /d.img rate limits take a positive number"),
            "{e}"
        );
        std::fs::write(
            &path,
            r#"{"kernel":"/k","nets":[{"tap":"tap0","mac":"02:00:c6:12:00:0a","rate_limit":{"bytes_per_sec":0}}]}"#,
        )
        .unwrap();
        let e = VmConfig::from_json_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("NIC tap0 rate limits take a positive number"),
            "{e}"
        );
    }

    #[test]
    fn net_spec_parses_and_bad_ones_name_the_problem() {
        let n = parse_net("tap=tap0,mac=02:00:c6:12:00:0a").unwrap();
        assert_eq!(
            (n.tap.as_str(), n.mac.as_str()),
            ("tap0", "02:00:c6:12:00:0a")
        );
        assert!(parse_net("mac=02:00:c6:12:00:0a")
            .unwrap_err()
            .to_string()
            .contains("needs tap="));
        assert!(parse_net("tap=t")
            .unwrap_err()
            .to_string()
            .contains("needs mac="));
        assert!(parse_net("tap=t,mac=01:00:00:00:00:01")
            .unwrap_err()
            .to_string()
            .contains("unicast"));
        assert!(parse_net("tap=t,mac=02:00:00:00:00:01,vhost=on")
            .unwrap_err()
            .to_string()
            .contains("no option 'vhost'"));
        assert_eq!(
            parse_net("tap=t,mac=02:00:00:00:00:01,queues=4")
                .unwrap()
                .queues,
            4
        );
        for bad in ["0", "17", "two"] {
            assert!(
                parse_net(&format!("tap=t,mac=02:00:00:00:00:01,queues={bad}"))
                    .unwrap_err()
                    .to_string()
                    .contains("queues= takes a number of queue pairs from 1 to 16")
            );
        }
    }

    #[test]
    fn vcpu_count_and_serial_length_are_checked() {
        let mut c = VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 0,
            memory_mib: 128,
            disks: vec![],
            nets: vec![],
            console: ConsoleConfig::Off,
            api_socket: None,
            pci_slots: 8,
        };
        assert!(c.validate().is_err());
        c.cpus = 2;
        assert!(c.validate().is_ok());
        // 31 slots on bus 0 besides the host bridge: devices plus spare slots must fit.
        c.pci_slots = 31;
        assert!(c.validate().is_ok());
        c.disks.push(parse_disk("path=/x").unwrap());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("31 PCI slots"));
        c.disks.clear();
        c.pci_slots = 8;
        c.disks
            .push(parse_disk("path=/x,serial=123456789012345678901").unwrap());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("longer than 20"));
    }
}
