//! Why the VM stopped, raised by whichever vCPU or device saw it first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (keyboard controller or ACPI reset register).
    Reset,
    /// The guest kernel panicked (pvpanic, or a reset right after a panic message).
    GuestPanic,
    /// Triple fault: the vCPU shut down.
    TripleFault { vcpu: u8 },
    /// KVM could not run the vCPU.
    KvmError { vcpu: u8, detail: String },
    /// The VMM itself failed while the guest ran.
    VmmError(String),
    /// Stopped from outside: through the VMM API (`PUT /vm/actions {"action": "stop"}`), or
    /// by SIGTERM/SIGINT. Devices are shut down in order (qcow2 metadata written).
    Stopped,
}

impl ExitReason {
    /// Process exit status: 0 only for a guest that stopped on purpose. 1 is taken by bad
    /// configuration (refused before the guest runs). The node agent tells an API stop
    /// (6) from the guest's own power-off (0), and a reboot (7: start the VM again) from
    /// both.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::Reset => 7,
            ExitReason::GuestPanic => 2,
            ExitReason::TripleFault { .. } => 3,
            ExitReason::KvmError { .. } => 4,
            ExitReason::VmmError(_) => 5,
            ExitReason::Stopped => 6,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest requested a reset"),
            ExitReason::GuestPanic => write!(f, "guest kernel panicked"),
            ExitReason::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            ExitReason::KvmError { vcpu, detail } => {
                write!(f, "KVM error on vCPU {vcpu}: {detail}")
            }
            ExitReason::VmmError(detail) => write!(f, "VMM error: {detail}"),
            ExitReason::Stopped => write!(f, "VM stopped from outside (control API or signal)"),
        }
    }
}

type Waker = Arc<dyn Fn() + Send + Sync>;

/// What `--status-file` holds once the VMM has exited: for a supervisor that is not the
/// VMM's parent (a node agent restarted while its VMs ran) and cannot read the exit code.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitStatusFile {
    pub code: i32,
    pub reason: String,
}

impl ExitStatusFile {
    /// Written next to `path` and renamed over it, so a reader sees all of it or nothing.
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Read by the node agent from a directory a jailed VMM may write: no link is
    /// followed, no FIFO waited on, nothing but a small regular file read.
    pub fn read(path: &std::path::Path) -> std::io::Result<Self> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        const MAX_LEN: u64 = 64 * 1024;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other(
                "the status file is not a regular file",
            ));
        }
        let mut body = Vec::new();
        file.take(MAX_LEN).read_to_end(&mut body)?;
        serde_json::from_slice(&body).map_err(std::io::Error::other)
    }
}

#[derive(Default)]
struct ExitState {
    reason: Option<ExitReason>,
    /// Called once a reason is set, for a thread that waits on something else as well.
    waker: Option<Waker>,
}

/// First reason wins; later ones are ignored (a panic is followed by a reset, for example).
#[derive(Clone, Default)]
pub struct ExitSignal {
    state: Arc<(Mutex<ExitState>, Condvar)>,
    panic_seen: Arc<AtomicBool>,
}

impl ExitSignal {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self, reason: ExitReason) {
        let reason = match reason {
            ExitReason::Reset if self.panic_seen.load(Ordering::Acquire) => ExitReason::GuestPanic,
            other => other,
        };
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().expect("exit lock poisoned");
        if state.reason.is_none() {
            state.reason = Some(reason);
            cvar.notify_all();
            let waker = state.waker.clone();
            drop(state);
            if let Some(wake) = waker {
                wake();
            }
        }
    }

    /// `wake` is called when a reason is set (at once if one already is).
    pub fn set_waker(&self, wake: impl Fn() + Send + Sync + 'static) {
        let wake: Waker = Arc::new(wake);
        let mut state = self.state.0.lock().expect("exit lock poisoned");
        state.waker = Some(wake.clone());
        let already = state.reason.is_some();
        drop(state);
        if already {
            wake();
        }
    }

    /// Remembers that the console showed a kernel panic, so the reset that follows
    /// (`panic=-1`) is reported as a panic.
    pub fn note_panic_message(&self) {
        self.panic_seen.store(true, Ordering::Release);
    }

    pub fn is_requested(&self) -> bool {
        self.state
            .0
            .lock()
            .expect("exit lock poisoned")
            .reason
            .is_some()
    }

    pub fn wait(&self) -> ExitReason {
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().expect("exit lock poisoned");
        loop {
            if let Some(reason) = state.reason.clone() {
                return reason;
            }
            state = cvar.wait(state).expect("exit lock poisoned");
        }
    }

    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let (lock, cvar) = &*self.state;
        let state = lock.lock().expect("exit lock poisoned");
        let (state, _) = cvar
            .wait_timeout_while(state, timeout, |s| s.reason.is_none())
            .expect("exit lock poisoned");
        state.reason.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_panic_turns_reset_into_panic() {
        let signal = ExitSignal::new();
        signal.note_panic_message();
        signal.request(ExitReason::Reset);
        signal.request(ExitReason::PowerOff);
        assert_eq!(signal.wait(), ExitReason::GuestPanic);
        assert_ne!(ExitReason::GuestPanic.exit_code(), 0);
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
    }

    #[test]
    fn every_exit_code_is_distinct() {
        let reasons = [
            ExitReason::PowerOff,
            ExitReason::Reset,
            ExitReason::GuestPanic,
            ExitReason::TripleFault { vcpu: 0 },
            ExitReason::KvmError {
                vcpu: 0,
                detail: String::new(),
            },
            ExitReason::VmmError(String::new()),
            ExitReason::Stopped,
        ];
        let mut codes: Vec<i32> = reasons.iter().map(ExitReason::exit_code).collect();
        // 1 is the configuration error status main() returns before any guest runs.
        codes.push(1);
        let count = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), count, "{codes:?}");
        assert_eq!(ExitReason::Stopped.exit_code(), 6);
        assert_eq!(ExitReason::Reset.exit_code(), 7);
    }

    #[test]
    fn the_status_file_round_trips_and_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.status");
        let status = ExitStatusFile {
            code: 2,
            reason: ExitReason::GuestPanic.to_string(),
        };
        status.write(&path).unwrap();
        assert_eq!(ExitStatusFile::read(&path).unwrap(), status);
        let again = ExitStatusFile {
            code: 0,
            reason: "guest powered off".into(),
        };
        again.write(&path).unwrap();
        assert_eq!(ExitStatusFile::read(&path).unwrap(), again);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn wait_timeout_returns_none_without_a_reason() {
        assert_eq!(
            ExitSignal::new().wait_timeout(Duration::from_millis(10)),
            None
        );
    }
}
