//! One cgroup per VM with its memory, task and CPU limits, on the unified hierarchy (v2)
//! where the host has it, otherwise on the v1 controllers (hosts that still mount them,
//! as this project's CI machines do).

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::spec::CgroupLimits;

/// The CFS period the CPU limit is expressed in (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup hierarchy with the memory controller under {0} \
         (mount cgroup2 there, or run the VM without a cgroup)"
    )]
    NoHierarchy(PathBuf),
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup parent {0:?} must be a relative path of normal components")]
    BadParent(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_error(path))
}

/// The VM's cgroup directories: one on v2, one per controller on v1.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
}

impl VmCgroup {
    /// Makes the VM's cgroup (kept if it exists) and sets its limits.
    pub fn create(limits: &CgroupLimits, id: &str) -> Result<VmCgroup, CgroupError> {
        let parent = Path::new(&limits.parent);
        if parent.is_absolute()
            || !parent
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(CgroupError::BadParent(limits.parent.clone()));
        }
        if limits.root.join("cgroup.controllers").exists() {
            Self::create_v2(limits, parent, id)
        } else if limits.root.join("memory/cgroup.procs").exists() {
            Self::create_v1(limits, parent, id)
        } else {
            Err(CgroupError::NoHierarchy(limits.root.clone()))
        }
    }

    fn create_v2(limits: &CgroupLimits, parent: &Path, id: &str) -> Result<VmCgroup, CgroupError> {
        // Controllers reach a cgroup only through every ancestor's subtree_control.
        let mut dir = limits.root.clone();
        for component in parent.components() {
            enable_controllers(&dir)?;
            dir.push(component);
            make_dir(&dir)?;
        }
        enable_controllers(&dir)?;
        let vm = dir.join(id);
        make_dir(&vm)?;
        if let Some(bytes) = limits.memory_max {
            write(&vm.join("memory.max"), &bytes.to_string())?;
            // Swap would let the VMM exceed its memory without the limit ever biting.
            let swap = vm.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        if let Some(pids) = limits.pids_max {
            write(&vm.join("pids.max"), &pids.to_string())?;
        }
        if let Some(millis) = limits.cpu_millis {
            let quota = millis * CPU_PERIOD_US / 1000;
            write(&vm.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        }
        Ok(VmCgroup { dirs: vec![vm] })
    }

    fn create_v1(limits: &CgroupLimits, parent: &Path, id: &str) -> Result<VmCgroup, CgroupError> {
        let mut dirs = Vec::new();
        for controller in ["memory", "pids", "cpu"] {
            let hierarchy = limits.root.join(controller);
            if !hierarchy.join("cgroup.procs").exists() {
                if controller == "memory" {
                    return Err(CgroupError::NoHierarchy(limits.root.clone()));
                }
                continue;
            }
            let dir = hierarchy.join(parent).join(id);
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            match controller {
                "memory" => {
                    if let Some(bytes) = limits.memory_max {
                        write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write(&memsw, &bytes.to_string())?;
                        }
                    }
                }
                "pids" => {
                    if let Some(pids) = limits.pids_max {
                        write(&dir.join("pids.max"), &pids.to_string())?;
                    }
                }
                _ => {
                    if let Some(millis) = limits.cpu_millis {
                        write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        let quota = millis * CPU_PERIOD_US / 1000;
                        write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                }
            }
            dirs.push(dir);
        }
        Ok(VmCgroup { dirs })
    }

    /// The VM's cgroup directories that exist, to remove what a killed jailer left.
    pub fn existing(limits: &CgroupLimits, id: &str) -> VmCgroup {
        let candidates = [
            limits.root.join(&limits.parent).join(id),
            limits.root.join("memory").join(&limits.parent).join(id),
            limits.root.join("pids").join(&limits.parent).join(id),
            limits.root.join("cpu").join(&limits.parent).join(id),
        ];
        VmCgroup {
            dirs: candidates.into_iter().filter(|d| d.is_dir()).collect(),
        }
    }

    /// Moves the calling process into the VM's cgroup ("0": the writer itself).
    pub fn join(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), "0")?;
        }
        Ok(())
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the cgroup once its last task is gone (the kernel lets go of an exited
    /// task's cgroup a moment after the parent reaped it).
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            let mut attempts = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 100 => {
                        attempts += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(io_error(dir)(e)),
                }
            }
        }
        Ok(())
    }
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(io_error(dir)(e)),
        _ => Ok(()),
    }
}

/// Enables what the host offers of memory, pids and cpu for `dir`'s children.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available_path = dir.join("cgroup.controllers");
    let available = fs::read_to_string(&available_path).map_err(io_error(&available_path))?;
    let control = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control).map_err(io_error(&control))?;
    for controller in ["memory", "pids", "cpu"] {
        let offered = available.split_whitespace().any(|c| c == controller);
        let on = enabled.split_whitespace().any(|c| c == controller);
        if offered && !on {
            write(&control, &format!("+{controller}"))?;
        }
    }
    Ok(())
}
