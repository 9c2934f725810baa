//! seccomp confinement, one allow-list per kind of thread. A guest that takes over a
//! device model gets a thread that can only make the system calls that thread needs:
//! no `execve`, no fork, no `ptrace`, no mounts or namespaces, no new privileges.
//!
//! Filters stack: a thread keeps the filter of the thread that created it and adds its
//! own, and the kernel applies the strictest answer. So a thread's list must hold every
//! call of the threads it creates: the main thread (which creates and hot-plugs devices)
//! holds everything, a vCPU thread (which starts a device's workers when the guest's
//! driver enables it) holds the workers' calls, and the workers, the API, the clock and
//! the signal threads hold only their own.
//!
//! The action on a forbidden call is process-wide (`--seccomp kill`, the default: the
//! kernel kills the VMM with SIGSYS, which its parent reports), logged only (`log`), or
//! nothing is installed (`off`). The library's default is `off`, so device tests that run
//! workers in their own process are confined only when they ask for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {kind:?} thread: {source}")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the seccomp filter of the {kind:?} thread: {source}")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
}

/// What a forbidden system call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No filter.
    Off = 0,
    /// Allowed, and logged by the kernel (audit / kernel log): for finding a missing call.
    Log = 1,
    /// The whole VMM is killed with SIGSYS.
    Kill = 2,
}

static MODE: AtomicU8 = AtomicU8::new(Mode::Off as u8);

/// Sets what every thread confined from now on does with a forbidden call.
pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::SeqCst);
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        1 => Mode::Log,
        2 => Mode::Kill,
        _ => Mode::Off,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Builds the VM, serves control requests (hot-plug, pause, stop), tears down.
    Main,
    /// Runs KVM_RUN and the device models it exits to; starts device workers.
    Vcpu,
    /// One virtio-blk queue: file, io_uring, iSCSI and RBD I/O.
    BlockWorker,
    /// One virtio-net queue pair: the TAP.
    NetWorker,
    /// The control API (a Unix socket, descriptors passed with requests).
    Api,
    /// The CMOS clock's update and alarm timer.
    Clock,
    /// Waits for SIGTERM/SIGINT.
    Signals,
    /// Forwards the terminal to the serial port.
    ConsoleIn,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::BlockWorker,
        ThreadKind::NetWorker,
        ThreadKind::Api,
        ThreadKind::Clock,
        ThreadKind::Signals,
        ThreadKind::ConsoleIn,
    ];
}

use libc::*;

/// What every thread does: memory, locks, time, its own start and end, a log line, a
/// panic's abort.
const EVERY_THREAD: &[c_long] = &[
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_futex,
    SYS_get_robust_list,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_clock_gettime,
    SYS_clock_getres,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettimeofday,
    SYS_getrandom,
    SYS_gettid,
    SYS_getpid,
    SYS_prctl,
    SYS_sigaltstack,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_rt_sigaction,
    SYS_restart_syscall,
    SYS_tgkill,
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_fcntl,
    SYS_exit,
    SYS_exit_group,
    // A thread created by this one installs its own, stricter, filter.
    SYS_seccomp,
];

/// A virtio-blk queue's worker: its event loop, the sync, io_uring and qcow2 engines,
/// libiscsi (including a reconnect, which resolves the portal's name again) and librbd's
/// completions.
const BLOCK_WORKER: &[c_long] = &[
    // Its own wake-ups batched (see `batch_wakeups`), nothing else.
    SYS_sched_setscheduler,
    SYS_read,
    SYS_readv,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_lseek,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
    SYS_ftruncate,
    SYS_ioctl,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_io_uring_enter,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_poll,
    SYS_ppoll,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
    SYS_eventfd2,
    SYS_socket,
    SYS_connect,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_sendto,
    SYS_sendmsg,
    // glibc's DNS client sends the A and AAAA queries together.
    SYS_sendmmsg,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_shutdown,
    // Name resolution asks the kernel's routing table over netlink.
    SYS_bind,
    SYS_dup2,
    SYS_dup3,
    SYS_openat,
    SYS_uname,
];

/// A virtio-net queue pair's worker.
const NET_WORKER: &[c_long] = &[
    SYS_sched_setscheduler,
    SYS_read,
    SYS_readv,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
];

/// A vCPU: KVM_RUN and the devices' registers, the console log (rotated in place), and a
/// device being enabled by the guest: its engines made (io_uring rings, a new iSCSI
/// session, timers, eventfds) and its workers started.
const VCPU: &[c_long] = &[
    SYS_ioctl,
    SYS_read,
    SYS_openat,
    SYS_rename,
    SYS_renameat,
    SYS_newfstatat,
    SYS_fstat,
    SYS_statx,
    SYS_lseek,
    SYS_dup,
    SYS_clone,
    SYS_clone3,
    SYS_eventfd2,
    SYS_timerfd_create,
    SYS_epoll_create1,
    SYS_io_uring_setup,
    SYS_io_uring_register,
];

/// The control API.
const API: &[c_long] = &[
    SYS_read,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_accept4,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_eventfd2,
    SYS_ioctl,
    // The console's tail and the descriptors that come with requests.
    SYS_openat,
    SYS_newfstatat,
    SYS_fstat,
    SYS_statx,
    SYS_lseek,
    SYS_pread64,
    SYS_readlink,
    SYS_dup,
    // tokio's blocking pool (the console's tail and control requests wait there).
    SYS_clone,
    SYS_clone3,
];

/// The RTC's timer thread; it raises its interrupt with `KVM_IRQ_LINE` (`allow_list`).
const CLOCK: &[c_long] = &[];

/// `_IOW(KVMIO, 0x61, struct kvm_irq_level)`: an edge on an IOAPIC pin.
const KVM_IRQ_LINE: u64 = 0x4008_ae61;

const SIGNALS: &[c_long] = &[SYS_rt_sigtimedwait];

const CONSOLE_IN: &[c_long] = &[SYS_read];

/// The main thread, beyond what the threads it creates do: KVM and memory set-up, the
/// API socket, disks and kernels opened, librbd loaded and connected, the exit status
/// written, the vCPUs kicked.
const MAIN: &[c_long] = &[
    SYS_open,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getdents64,
    SYS_getcwd,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_unlink,
    SYS_unlinkat,
    SYS_umask,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_chmod,
    SYS_fstatfs,
    SYS_statfs,
    SYS_flock,
    SYS_pipe2,
    SYS_bind,
    SYS_listen,
    SYS_socketpair,
    SYS_memfd_create,
    SYS_mlock,
    SYS_munlock,
    SYS_prlimit64,
    SYS_getrlimit,
    SYS_setrlimit,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_getppid,
    SYS_arch_prctl,
    SYS_set_tid_address,
    SYS_sched_setaffinity,
    SYS_kill,
    SYS_tkill,
    SYS_wait4,
    SYS_sysinfo,
    SYS_getpriority,
    SYS_setpriority,
    SYS_timerfd_create,
    // librbd's own threads, created by the main thread when an RBD disk is opened or
    // hot-plugged, live under its filter: their event loops and admin socket.
    SYS_epoll_create,
    SYS_accept,
    SYS_dup2,
    SYS_dup3,
    SYS_pipe,
];

fn list(kind: ThreadKind) -> Vec<c_long> {
    let mut calls: Vec<c_long> = EVERY_THREAD.to_vec();
    let mut add = |more: &[c_long]| calls.extend_from_slice(more);
    match kind {
        ThreadKind::BlockWorker => add(BLOCK_WORKER),
        ThreadKind::NetWorker => add(NET_WORKER),
        ThreadKind::Api => add(API),
        ThreadKind::Clock => add(CLOCK),
        ThreadKind::Signals => add(SIGNALS),
        ThreadKind::ConsoleIn => add(CONSOLE_IN),
        ThreadKind::Vcpu => {
            add(VCPU);
            add(BLOCK_WORKER);
            add(NET_WORKER);
        }
        ThreadKind::Main => {
            for part in [
                MAIN,
                VCPU,
                BLOCK_WORKER,
                NET_WORKER,
                API,
                CLOCK,
                SIGNALS,
                CONSOLE_IN,
            ] {
                add(part);
            }
        }
    }
    calls.sort_unstable();
    calls.dedup();
    calls
}

/// The thread's allow-list as a BPF program: `clone` only for threads (never a new
/// process), everything listed allowed, anything else `action`.
fn allow_list(kind: ThreadKind, action: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in list(kind) {
        let call_rules = if call == SYS_clone {
            let only_threads = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(CLONE_THREAD as u64),
                CLONE_THREAD as u64,
            )
            .map_err(|e| build(seccompiler::Error::Backend(e)))?;
            vec![SeccompRule::new(vec![only_threads])
                .map_err(|e| build(seccompiler::Error::Backend(e)))?]
        } else if call == SYS_sched_setscheduler {
            // The calling thread (pid 0), to SCHED_BATCH: never realtime, never another.
            let conditions = [(0, 0u64), (1, SCHED_BATCH as u64)]
                .into_iter()
                .map(|(arg, value)| {
                    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| build(seccompiler::Error::Backend(e)))?;
            vec![SeccompRule::new(conditions).map_err(|e| build(seccompiler::Error::Backend(e)))?]
        } else {
            Vec::new()
        };
        rules.insert(call, call_rules);
    }
    // One ioctl only: pair 0's net worker attaches and detaches the queues of a multiqueue
    // TAP when the driver changes how many queue pairs it uses; the RTC's thread raises
    // the interrupts the guest enabled (update, alarm, periodic: `hwclock` asks for them).
    let only_ioctl = match kind {
        ThreadKind::NetWorker => Some(TUNSETQUEUE),
        ThreadKind::Clock => Some(KVM_IRQ_LINE),
        _ => None,
    };
    if let Some(request) = only_ioctl {
        let condition =
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .map_err(|e| build(seccompiler::Error::Backend(e)))?;
        rules.insert(
            SYS_ioctl,
            vec![SeccompRule::new(vec![condition])
                .map_err(|e| build(seccompiler::Error::Backend(e)))?],
        );
    }
    let filter = SeccompFilter::new(rules, action, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(seccompiler::Error::Backend(e)))?;
    filter
        .try_into()
        .map_err(|e| build(seccompiler::Error::Backend(e)))
}

/// `clone3` passes its flags in memory a filter cannot read: it fails with ENOSYS, and
/// glibc's thread creation falls back to `clone`, whose flags the allow-list checks.
fn no_clone3(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let rules = BTreeMap::from([(SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| build(seccompiler::Error::Backend(e)))?;
    filter
        .try_into()
        .map_err(|e| build(seccompiler::Error::Backend(e)))
}

/// Confines the calling thread as a `kind` thread (per the mode set with [`set_mode`]).
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    let action = match mode() {
        Mode::Off => return Ok(()),
        Mode::Log => SeccompAction::Log,
        Mode::Kill => SeccompAction::KillProcess,
    };
    let install = |source| SeccompError::Install { kind, source };
    seccompiler::apply_filter(&no_clone3(kind)?).map_err(install)?;
    seccompiler::apply_filter(&allow_list(kind, action)?).map_err(install)?;
    Ok(())
}

/// At the start of a thread: confined, or the VMM stops here (a thread that cannot be
/// confined must not run guest-driven code unconfined).
pub fn confine_or_abort(kind: ThreadKind) {
    if let Err(e) = confine(kind) {
        eprintln!("stratus-vmm: {e}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_holds_what_the_threads_it_creates_need() {
        let main = list(ThreadKind::Main);
        let vcpu = list(ThreadKind::Vcpu);
        for kind in ThreadKind::ALL {
            for call in list(kind) {
                assert!(main.contains(&call), "{kind:?} needs {call}, main lacks it");
            }
        }
        for kind in [ThreadKind::BlockWorker, ThreadKind::NetWorker] {
            for call in list(kind) {
                assert!(vcpu.contains(&call), "{kind:?} needs {call}, vCPUs lack it");
            }
        }
        for forbidden in [
            SYS_execve,
            SYS_execveat,
            SYS_fork,
            SYS_vfork,
            SYS_ptrace,
            SYS_mount,
        ] {
            assert!(!main.contains(&forbidden), "{forbidden}");
        }
        for kind in [
            ThreadKind::BlockWorker,
            ThreadKind::NetWorker,
            ThreadKind::Clock,
        ] {
            assert!(
                !list(kind).contains(&SYS_clone),
                "{kind:?} creates no threads"
            );
        }
    }

    #[test]
    fn every_kind_builds_a_filter() {
        for kind in ThreadKind::ALL {
            assert!(!allow_list(kind, SeccompAction::KillProcess)
                .unwrap()
                .is_empty());
        }
        assert!(!no_clone3(ThreadKind::Main).unwrap().is_empty());
    }
}
