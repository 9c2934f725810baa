//! `stratus-jailer run`: the jail's life, from its cgroup to the VMM's exit status.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use crate::cgroup::{CgroupError, VmCgroup};
use crate::jail::{self, JailError};
use crate::spec::{JailSpec, SpecError};

/// The exit code of a jail that could not be set up (the VMM never ran); the reason is on
/// standard error, which the agent keeps in the VM's log.
pub const SETUP_FAILED: i32 = 125;

/// Files a VMM may hold open: many disks with io_uring, the API's connections.
const NOFILE_HARD: u64 = 65_536;

/// Signals the agent may send to stop a VM; the jailer passes them on.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe and takes plain integers.
        unsafe { libc::kill(child, signal) };
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("cannot {what}: {source}")]
    Sys {
        what: &'static str,
        source: nix::Error,
    },
    #[error("cannot create the jail root {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> RunError {
    move |source| RunError::Sys { what, source }
}

fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    set
}

/// Starts the VMM in its jail and waits for it. Returns how it ended; the caller ends the
/// same way.
pub fn run(spec: &JailSpec) -> Result<WaitStatus, RunError> {
    spec.validate()?;
    // The jail's mount points must be traversable by the VM's user whatever umask the
    // agent runs with (its systemd unit has 0077).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    fs::create_dir_all(&spec.root).map_err(|source| RunError::Root {
        path: spec.root.clone(),
        source,
    })?;
    fs::set_permissions(&spec.root, fs::Permissions::from_mode(0o755)).map_err(|source| {
        RunError::Root {
            path: spec.root.clone(),
            source,
        }
    })?;
    let program = jail::open_program(std::path::Path::new(&spec.command[0]))?;
    let cgroup = if spec.no_cgroup {
        None
    } else {
        Some(VmCgroup::create(&spec.cgroup, &spec.id)?)
    };
    // The child learns that the jailer is gone from this pipe's hang-up.
    let (alive_read, alive_write) = pipe2(OFlag::O_CLOEXEC).map_err(sys("create a pipe"))?;
    let forwarded = forwarded_set();
    forwarded
        .thread_block()
        .map_err(sys("block the stop signals"))?;
    // The next child is the PID namespace's init: the VMM.
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare the PID namespace"))?;
    // SAFETY: the jailer never starts a thread, so the child is a complete copy of a
    // single-threaded process and may do anything before exec.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            drop(alive_write);
            let error = child(spec, cgroup.as_ref(), &program, alive_read);
            eprintln!("stratus-jailer: VM {}: {error}", spec.id);
            std::process::exit(SETUP_FAILED);
        }
        ForkResult::Parent { child } => {
            drop(alive_read);
            let status = supervise(child, &forwarded);
            drop(alive_write);
            if let Some(cgroup) = &cgroup {
                if let Err(e) = cgroup.remove() {
                    eprintln!("stratus-jailer: VM {}: {e}", spec.id);
                }
            }
            // Only empty mount points are left on the host side.
            if let Err(e) = fs::remove_dir_all(&spec.root) {
                if e.kind() != io::ErrorKind::NotFound {
                    eprintln!(
                        "stratus-jailer: VM {}: cannot remove {}: {e}",
                        spec.id,
                        spec.root.display()
                    );
                }
            }
            Ok(status)
        }
    }
}

fn supervise(child: Pid, forwarded: &SigSet) -> WaitStatus {
    CHILD.store(child.as_raw(), Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in FORWARDED {
        // SAFETY: the handler only reads an atomic and calls kill(2).
        if let Err(e) = unsafe { sigaction(signal, &action) } {
            eprintln!("stratus-jailer: cannot forward {signal}: {e}");
        }
    }
    let _ = forwarded.thread_unblock();
    loop {
        match waitpid(child, None) {
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return status,
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => {
                eprintln!("stratus-jailer: cannot wait for the VMM: {e}");
                return WaitStatus::Exited(child, SETUP_FAILED);
            }
        }
    }
}

/// The jail's init process until `exec`; returns only on failure.
fn child(
    spec: &JailSpec,
    cgroup: Option<&VmCgroup>,
    program: &OwnedFd,
    alive: OwnedFd,
) -> RunError {
    let setup = || -> Result<(), RunError> {
        if let Some(cgroup) = cgroup {
            cgroup.join()?;
        }
        jail::enter(spec)?;
        // Best effort: a host may cap it lower (fs.nr_open), and the VMM copes with less.
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if hard < NOFILE_HARD {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, soft, NOFILE_HARD);
            }
        }
        jail::drop_privileges(spec.uid, spec.gid)?;
        // Set after the user changed: a change of credentials clears it.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
            .map_err(sys("set the parent-death signal"))?;
        let mut fds = [PollFd::new(alive.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).map_err(sys("poll the jailer"))?;
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            // The jailer died before the parent-death signal was armed.
            std::process::exit(SETUP_FAILED);
        }
        forwarded_set()
            .thread_unblock()
            .map_err(sys("unblock the stop signals"))?;
        Ok(())
    };
    if let Err(e) = setup() {
        return e;
    }
    RunError::Jail(jail::exec(program, &spec.command))
}

/// Ends this process the way the VMM ended.
pub fn mirror(status: WaitStatus) -> ! {
    match status {
        WaitStatus::Signaled(_, signal, _) => {
            // No core file of the jailer for a signal that was the VMM's.
            let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
            // SAFETY: restoring the default action of a signal has no preconditions.
            let _ = unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) };
            let mut set = SigSet::empty();
            set.add(signal);
            let _ = set.thread_unblock();
            let _ = nix::sys::signal::raise(signal);
            std::process::exit(128 + signal as i32);
        }
        WaitStatus::Exited(_, code) => std::process::exit(code),
        _ => std::process::exit(SETUP_FAILED),
    }
}
