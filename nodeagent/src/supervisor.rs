//! One stratus-vmm process per VM: started in a process group of its own (so that signals
//! to the agent never reach the VMs, and the VMs outlive an agent restart), and waited for
//! either as the agent's child or, after the agent restarted, through a pidfd.

use std::os::unix::io::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::unix::AsyncFd;

/// How one VMM process is to be started.
#[derive(Clone, Debug)]
pub struct VmmLaunch {
    pub vmm_binary: PathBuf,
    /// Everything after the binary.
    pub args: Vec<String>,
    /// The VMM's own messages (its exit reason among them) are appended here.
    pub log: PathBuf,
}

/// How the process ended, as far as its watcher can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    /// Exit status; `None` for an adopted process (not our child) or one killed by a signal.
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

pub enum VmmProcess {
    Child(tokio::process::Child),
    /// A VMM started by an earlier run of the agent.
    Adopted {
        pid: u32,
        pidfd: AsyncFd<OwnedFd>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the VMM log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl VmmProcess {
    pub fn spawn(launch: &VmmLaunch) -> Result<VmmProcess, SupervisorError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log)
            .map_err(|source| SupervisorError::Log {
                path: launch.log.clone(),
                source,
            })?;
        let child = tokio::process::Command::new(&launch.vmm_binary)
            .args(&launch.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("STRATUS_LOG", "stratus_vmm=info")
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| SupervisorError::Spawn {
                binary: launch.vmm_binary.clone(),
                source,
            })?;
        Ok(VmmProcess::Child(child))
    }

    /// Takes over the VMM `pid` if it is still the process that was started at
    /// `start_time` (not a new process that reused the number).
    pub fn adopt(pid: u32, start_time: u64) -> Option<VmmProcess> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the descriptor was just created for us and is owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after the pidfd exists: from here on the number cannot be reused under us.
        if process_start_time(pid) != Some(start_time) {
            return None;
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same descriptor
        // until the AsyncFd is dropped.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .ok()?;
        Some(VmmProcess::Adopted { pid, pidfd })
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            VmmProcess::Child(child) => child.id(),
            VmmProcess::Adopted { pid, .. } => Some(*pid),
        }
    }

    /// Waits for the process to end.
    pub async fn wait(self) -> Ended {
        match self {
            VmmProcess::Child(mut child) => match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    Ended {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(e) => {
                    tracing::error!("cannot wait for a VMM: {e}");
                    Ended {
                        code: None,
                        signal: None,
                    }
                }
            },
            VmmProcess::Adopted { pidfd, .. } => {
                // A pidfd becomes readable when its process exits.
                if let Ok(mut guard) = pidfd.readable().await {
                    guard.retain_ready();
                }
                Ended {
                    code: None,
                    signal: None,
                }
            }
        }
    }
}

/// When `pid` started (clock ticks since boot, `/proc/PID/stat` field 22), to tell a
/// process from a later one with the same number; `None` once it has ended, also while
/// it waits to be reaped (a restarted agent's VMM or jailer is reaped by init, a moment
/// after it ended: adopted then, the VM showed Running after its VMM was gone).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields restart after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Sends `signal` to `pid` if it is still the process that started at `start_time`.
pub fn signal_if_same(pid: u32, start_time: u64, signal: i32) -> bool {
    if process_start_time(pid) != Some(start_time) {
        return false;
    }
    // SAFETY: kill only sends a signal; the pid was checked to be the VMM just above.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// The parent of process `pid` (`/proc/PID/stat` field 4).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// A process this agent's user runs from `binary` with `--api-socket <socket>` among its
/// arguments: a VMM (or jailer) launched for the VM whose socket that is, found where its
/// pid was never recorded (the agent died between starting it and saving the pid) and
/// its socket not yet bound, or its server taking no connection (a hung VMM). Only the
/// agent's user can start a process from that binary with those arguments, so none is
/// taken for another user's. One started from a binary since replaced in place (an upgrade
/// while it ran) counts too: the kernel then names its executable "<path> (deleted)".
pub fn launched_for(binary: &Path, socket: &Path) -> Option<u32> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let binary = std::fs::canonicalize(binary).ok()?;
    // SAFETY: geteuid has no side effects.
    let agent_uid = unsafe { libc::geteuid() };
    let wanted = [b"--api-socket".as_slice(), socket.as_os_str().as_bytes()];
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path();
            if entry.metadata().ok()?.uid() != agent_uid {
                return None;
            }
            let exe = std::fs::read_link(dir.join("exe")).ok()?;
            let replaced = [binary.as_os_str().as_bytes(), b" (deleted)"].concat();
            if exe != binary && exe.as_os_str().as_bytes() != replaced.as_slice() {
                return None;
            }
            let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2).any(|pair| pair == wanted).then_some(pid)
        })
}

/// The process serving the Unix socket at `path`, from the kernel's peer credentials.
pub fn socket_peer_pid(path: &Path) -> Option<u32> {
    socket_peer(path).map(|(pid, _)| pid)
}

/// The process serving the Unix socket at `path` and the user it runs as; none when
/// nothing serves it, or when its server takes no connection now (a hung VMM's full
/// backlog, where a blocking connect would wait for good).
pub fn socket_peer(path: &Path) -> Option<(u32, u32)> {
    use socket2::{Domain, SockAddr, Socket, Type};
    use std::os::unix::io::AsRawFd;
    let stream = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None).ok()?;
    // A Unix socket's connect completes at once or fails (EAGAIN for a full backlog).
    stream.connect(&SockAddr::unix(path).ok()?).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a ucred into the buffer given, whose size is passed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some((cred.pid as u32, cred.uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_tell_processes_apart() {
        let me = std::process::id();
        let t = process_start_time(me).expect("our own start time");
        assert!(t > 0);
        assert_eq!(process_start_time(me), Some(t));
        assert!(
            VmmProcess::adopt(me, t + 1).is_none(),
            "a different start time is another process"
        );
        assert!(process_start_time(u32::MAX >> 1).is_none());
    }

    #[test]
    fn a_socket_whose_server_takes_no_connection_is_asked_without_waiting() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        assert_eq!(
            socket_peer(&path).map(|(pid, _)| pid),
            Some(std::process::id())
        );
        // Never accepted: the backlog fills.
        let mut waiting = Vec::new();
        loop {
            let client = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).unwrap();
            if client.connect(&SockAddr::unix(&path).unwrap()).is_err() {
                break;
            }
            waiting.push(client);
            assert!(waiting.len() < 64, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let asked = path.clone();
        std::thread::spawn(move || tx.send(socket_peer(&asked)).unwrap());
        let answer = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(answer, Ok(None), "the question waited for the server");
    }

    #[test]
    fn a_process_launched_from_a_binary_since_replaced_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("stratus-vmm");
        std::fs::copy("/bin/sh", &binary).unwrap();
        let socket = dir.path().join("api.sock");
        // The shell waits in its `read` builtin, with the arguments a VMM has. A child that
        // another test forks while the copy is still open for writing holds it open until
        // its own exec: the exec here then fails with ETXTBSY, for a moment.
        let spawn = || {
            std::process::Command::new(&binary)
                .args(["-c", "read line", "--api-socket"])
                .arg(&socket)
                .stdin(std::process::Stdio::piped())
                .spawn()
        };
        let mut child = (0..50)
            .find_map(|_| match spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                }
                spawned => Some(spawned.unwrap()),
            })
            .expect("the copy stayed busy");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while launched_for(&binary, &socket).is_none() {
            assert!(std::time::Instant::now() < deadline, "never found");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(launched_for(&binary, &socket), Some(child.id()));
        assert_eq!(launched_for(&binary, &dir.path().join("other.sock")), None);
        // An upgrade replaces the binary under the running process.
        std::fs::remove_file(&binary).unwrap();
        std::fs::copy("/bin/sh", &binary).unwrap();
        let found = launched_for(&binary, &socket);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, Some(child.id()));
    }

    #[test]
    fn a_process_that_ended_is_not_adopted_while_it_waits_to_be_reaped() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !stat().contains(") Z ") {
            assert!(std::time::Instant::now() < deadline, "{}", stat());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(process_start_time(pid), None, "{}", stat());
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn an_adopted_process_is_seen_to_end() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let pid = child.id();
        let t = process_start_time(pid).unwrap();
        let adopted = VmmProcess::adopt(pid, t).expect("adoptable");
        assert_eq!(adopted.pid(), Some(pid));
        let reaper = std::thread::spawn(move || child.wait());
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), adopted.wait())
            .await
            .expect("the pidfd fires when the process ends");
        assert_eq!(ended.code, None);
        reaper.join().unwrap().unwrap();
    }
}
