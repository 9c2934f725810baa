//! What this host offers to VMs, and what it is like now (load, disk, hypervisor).

use std::path::Path;

use crate::config::CapacityConfig;

/// The vCPUs and guest memory this host hands out, overcommit included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_total: u64,
    pub memory_total_mib: u64,
}

impl Capacity {
    pub fn from_config(config: &CapacityConfig) -> Capacity {
        let cpus = config
            .cpus
            .map(u64::from)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));
        let memory = config.memory_mib.unwrap_or_else(host_memory_mib);
        let usable = memory.saturating_sub(config.memory_reserve_mib);
        Capacity {
            cpu_total: (cpus as f64 * config.cpu_overcommit).floor() as u64,
            memory_total_mib: (usable as f64 * config.memory_overcommit).floor() as u64,
        }
    }
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

pub fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Total and free bytes of the filesystem holding `path`.
pub fn filesystem_space(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs fills the struct it is given from a NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c_path.as_ptr(), &mut st) != 0 {
            return (0, 0);
        }
        let block = st.f_frsize as u64;
        (st.f_blocks as u64 * block, st.f_bavail as u64 * block)
    }
}

/// What runs the VMs here: KVM with hardware virtualisation, or a PVM `/dev/kvm` (no
/// VT-x/AMD-V: only the project's tiny guests run directly).
pub fn hypervisor() -> String {
    if !Path::new("/dev/kvm").exists() {
        return "none (no /dev/kvm)".into();
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    if has("vmx") {
        "kvm (Intel VT-x)".into()
    } else if has("svm") {
        "kvm (AMD-V)".into()
    } else {
        "kvm (no hardware virtualisation: PVM)".into()
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_applies_the_reserve_and_the_overcommit() {
        let config = CapacityConfig {
            cpu_overcommit: 2.5,
            memory_overcommit: 1.5,
            memory_reserve_mib: 1024,
            cpus: Some(4),
            memory_mib: Some(9216),
        };
        assert_eq!(
            Capacity::from_config(&config),
            Capacity {
                cpu_total: 10,
                memory_total_mib: 12288
            }
        );
        let tiny = CapacityConfig {
            memory_mib: Some(512),
            ..config
        };
        assert_eq!(Capacity::from_config(&tiny).memory_total_mib, 0);
        assert!(Capacity::from_config(&CapacityConfig::default()).cpu_total >= 1);
    }

    #[test]
    fn host_facts_are_read() {
        let (total, free) = filesystem_space(Path::new("/"));
        assert!(total > 0 && free <= total);
        assert!(!hostname().is_empty());
        assert!(load_1m() >= 0.0);
    }
}
