//! What a jail holds, as the node agent asks for it and as `stratus-jailer` parses it: one
//! type for both sides, so an argument the agent writes is one the jailer reads.

use std::path::{Component, Path, PathBuf};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{what} {path:?} must be an absolute path without '.' or '..' components")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error("device {0:?} must be under /dev")]
    NotADevice(PathBuf),
    #[error("the VM's user must not be root (uid {uid}, gid {gid})")]
    Root { uid: u32, gid: u32 },
    #[error("jail id {0:?}: 1-64 letters, digits, '-', '_' or '.'")]
    BadId(String),
    #[error("{inner:?} lies inside {outer:?}: a directory already shared with the jail")]
    Nested { inner: PathBuf, outer: PathBuf },
}

#[derive(Debug, Parser)]
#[command(
    name = "stratus-jailer",
    version,
    about = "Starts one stratus-vmm confined: its own mount, PID and IPC namespaces, a \
             per-VM user, a cgroup with limits, no capabilities"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Starts the VMM in a new jail and waits for it; exits as the VMM exited.
    Run(JailSpec),
    /// Shows one more host path or device to the VMM of a running jail (disk hot-plug).
    Enter(EnterSpec),
}

/// Limits of the jail's cgroup.
#[derive(Clone, Debug, Args, PartialEq, Eq)]
pub struct CgroupLimits {
    /// The cgroup (relative to the hierarchy's root) under which each VM gets its own.
    #[arg(
        long = "cgroup-parent",
        id = "cgroup_parent",
        default_value = "stratus"
    )]
    pub parent: String,
    /// Where the cgroup hierarchies are mounted.
    #[arg(
        long = "cgroup-root",
        id = "cgroup_root",
        default_value = "/sys/fs/cgroup"
    )]
    pub root: PathBuf,
    /// Memory the VMM may use in all (guest RAM + its own), in bytes.
    #[arg(long = "memory-max")]
    pub memory_max: Option<u64>,
    /// Tasks (threads) the VMM may have.
    #[arg(long = "pids-max")]
    pub pids_max: Option<u64>,
    /// CPU time per period, in thousandths of a CPU (a 2-vCPU VM: 2000).
    #[arg(long = "cpu-millis")]
    pub cpu_millis: Option<u64>,
}

#[derive(Clone, Debug, Args, PartialEq, Eq)]
pub struct JailSpec {
    /// Names the jail's cgroup; the VM's id.
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub uid: u32,
    #[arg(long)]
    pub gid: u32,
    /// An empty directory of the host that becomes the VMM's `/` (made if missing).
    #[arg(long)]
    pub root: PathBuf,
    /// A host path the VMM may read and write, shown at the same path in the jail.
    #[arg(long = "bind")]
    pub binds: Vec<PathBuf>,
    /// A host path the VMM may only read, shown at the same path.
    #[arg(long = "bind-ro")]
    pub binds_ro: Vec<PathBuf>,
    /// A device node (a host block device), recreated in the jail's own /dev for the VM's
    /// user only.
    #[arg(long = "device")]
    pub devices: Vec<PathBuf>,
    /// No cgroup (hosts without a writable cgroup hierarchy).
    #[arg(long)]
    pub no_cgroup: bool,
    #[command(flatten)]
    pub cgroup: CgroupLimits,
    /// The VMM and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Clone, Debug, Args, PartialEq, Eq)]
pub struct EnterSpec {
    /// The jailer process of the running jail (the node agent's child).
    #[arg(long)]
    pub pid: u32,
    #[arg(long)]
    pub uid: u32,
    #[arg(long)]
    pub gid: u32,
    #[arg(long = "bind")]
    pub bind: Option<PathBuf>,
    #[arg(long = "bind-ro")]
    pub bind_ro: Option<PathBuf>,
    #[arg(long = "device")]
    pub device: Option<PathBuf>,
}

/// `path` as a list of normal components, or an error naming `what`.
pub(crate) fn checked_absolute(what: &'static str, path: &Path) -> Result<(), SpecError> {
    let mut components = path.components();
    let rooted = components.next() == Some(Component::RootDir);
    let normal =
        components.clone().count() > 0 && components.all(|c| matches!(c, Component::Normal(_)));
    if rooted && normal {
        Ok(())
    } else {
        Err(SpecError::NotAbsolute {
            what,
            path: path.to_owned(),
        })
    }
}

pub(crate) fn checked_device(path: &Path) -> Result<(), SpecError> {
    checked_absolute("device", path)?;
    if path.starts_with("/dev") && path != Path::new("/dev") {
        Ok(())
    } else {
        Err(SpecError::NotADevice(path.to_owned()))
    }
}

fn checked_user(uid: u32, gid: u32) -> Result<(), SpecError> {
    if uid == 0 || gid == 0 {
        return Err(SpecError::Root { uid, gid });
    }
    Ok(())
}

impl JailSpec {
    /// Refuses what would give the VMM more than it was meant to have.
    pub fn validate(&self) -> Result<(), SpecError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && self.id != "."
            && self.id != "..";
        if !id_ok {
            return Err(SpecError::BadId(self.id.clone()));
        }
        checked_user(self.uid, self.gid)?;
        checked_absolute("jail root", &self.root)?;
        for path in self.binds.iter().chain(&self.binds_ro) {
            checked_absolute("bind", path)?;
        }
        for device in &self.devices {
            checked_device(device)?;
        }
        // A placeholder for an inner path would be made in the host directory itself.
        let all: Vec<&PathBuf> = self.binds.iter().chain(&self.binds_ro).collect();
        for inner in &all {
            for outer in &all {
                if inner != outer && inner.starts_with(outer) {
                    return Err(SpecError::Nested {
                        inner: (*inner).clone(),
                        outer: (*outer).clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The `stratus-jailer` command line for this jail.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "run".to_owned(),
            "--id".to_owned(),
            self.id.clone(),
            "--uid".to_owned(),
            self.uid.to_string(),
            "--gid".to_owned(),
            self.gid.to_string(),
            "--root".to_owned(),
            self.root.display().to_string(),
        ];
        let mut push = |flag: &str, path: &Path| {
            args.push(flag.to_owned());
            args.push(path.display().to_string());
        };
        for path in &self.binds {
            push("--bind", path);
        }
        for path in &self.binds_ro {
            push("--bind-ro", path);
        }
        for path in &self.devices {
            push("--device", path);
        }
        if self.no_cgroup {
            args.push("--no-cgroup".to_owned());
        } else {
            let c = &self.cgroup;
            args.extend([
                "--cgroup-parent".to_owned(),
                c.parent.clone(),
                "--cgroup-root".to_owned(),
                c.root.display().to_string(),
            ]);
            for (flag, value) in [
                ("--memory-max", c.memory_max),
                ("--pids-max", c.pids_max),
                ("--cpu-millis", c.cpu_millis),
            ] {
                if let Some(value) = value {
                    args.extend([flag.to_owned(), value.to_string()]);
                }
            }
        }
        args.push("--".to_owned());
        args.extend(self.command.iter().cloned());
        args
    }
}

impl EnterSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        checked_user(self.uid, self.gid)?;
        for path in [&self.bind, &self.bind_ro].into_iter().flatten() {
            checked_absolute("bind", path)?;
        }
        if let Some(device) = &self.device {
            checked_device(device)?;
        }
        Ok(())
    }

    /// The `stratus-jailer` command line that shows one path to a running jail.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "enter".to_owned(),
            "--pid".to_owned(),
            self.pid.to_string(),
            "--uid".to_owned(),
            self.uid.to_string(),
            "--gid".to_owned(),
            self.gid.to_string(),
        ];
        for (flag, path) in [
            ("--bind", &self.bind),
            ("--bind-ro", &self.bind_ro),
            ("--device", &self.device),
        ] {
            if let Some(path) = path {
                args.extend([flag.to_owned(), path.display().to_string()]);
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JailSpec {
        JailSpec {
            id: "vm-1".into(),
            uid: 1_900_000_001,
            gid: 1_900_000_001,
            root: "/run/stratus/jails/vm-1".into(),
            binds: vec!["/var/lib/stratus/vms/vm-1".into()],
            binds_ro: vec!["/var/lib/stratus/images/k".into()],
            devices: vec!["/dev/sdb".into()],
            no_cgroup: false,
            cgroup: CgroupLimits {
                parent: "stratus".into(),
                root: "/sys/fs/cgroup".into(),
                memory_max: Some(640 << 20),
                pids_max: Some(512),
                cpu_millis: None,
            },
            command: vec![
                "/usr/bin/stratus-vmm".into(),
                "--memory".into(),
                "512".into(),
            ],
        }
    }

    #[test]
    fn the_agents_arguments_parse_back_to_the_same_jail() {
        let spec = spec();
        spec.validate().unwrap();
        let mut argv = vec!["stratus-jailer".to_owned()];
        argv.extend(spec.to_args());
        let Command::Run(parsed) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not a run");
        };
        assert_eq!(parsed, spec);
        let enter = EnterSpec {
            pid: 42,
            uid: 7,
            gid: 7,
            bind: None,
            bind_ro: Some("/srv/volume".into()),
            device: None,
        };
        let mut argv = vec!["stratus-jailer".to_owned()];
        argv.extend(enter.to_args());
        let Command::Enter(parsed) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not an enter");
        };
        assert_eq!(parsed, enter);
    }

    #[test]
    fn jails_that_would_leak_are_refused() {
        let root = JailSpec { uid: 0, ..spec() };
        assert!(matches!(root.validate(), Err(SpecError::Root { .. })));
        let relative = JailSpec {
            binds: vec!["images/k".into()],
            ..spec()
        };
        assert!(matches!(
            relative.validate(),
            Err(SpecError::NotAbsolute { .. })
        ));
        let dotdot = JailSpec {
            binds_ro: vec!["/var/lib/../../etc/shadow".into()],
            ..spec()
        };
        assert!(matches!(
            dotdot.validate(),
            Err(SpecError::NotAbsolute { .. })
        ));
        let whole_host = JailSpec {
            binds_ro: vec!["/".into()],
            ..spec()
        };
        assert!(whole_host.validate().is_err());
        let not_dev = JailSpec {
            devices: vec!["/etc/shadow".into()],
            ..spec()
        };
        assert!(matches!(not_dev.validate(), Err(SpecError::NotADevice(_))));
        let nested = JailSpec {
            binds_ro: vec!["/var/lib/stratus/vms/vm-1/root.qcow2".into()],
            ..spec()
        };
        assert!(matches!(nested.validate(), Err(SpecError::Nested { .. })));
        let bad_id = JailSpec {
            id: "../x".into(),
            ..spec()
        };
        assert!(matches!(bad_id.validate(), Err(SpecError::BadId(_))));
    }
}
