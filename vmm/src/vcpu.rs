//! vCPU threads: set up each vCPU, run it, and dispatch its exits to the buses.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Signal used to knock a vCPU thread out of KVM_RUN when the VM stops.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler once; delivery alone makes KVM_RUN return EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is stopping")]
    Stopping,
}

#[derive(Default)]
struct RunState {
    paused: bool,
    /// vCPU threads waiting outside KVM_RUN because of a pause.
    parked: usize,
}

/// Pauses and resumes the vCPUs: a paused vCPU thread leaves KVM_RUN (knocked out with the
/// kick signal) and waits here; devices and their threads keep running and keep their state.
#[derive(Default)]
pub struct RunControl {
    state: Mutex<RunState>,
    changed: Condvar,
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Returns once every vCPU in `handles` is parked (or has ended).
    pub fn pause(&self, handles: &[JoinHandle<()>], exit: &ExitSignal) -> Result<(), PauseError> {
        {
            let mut state = self.lock();
            if state.paused {
                return Err(PauseError::AlreadyPaused);
            }
            state.paused = true;
        }
        loop {
            if exit.is_requested() {
                return Err(PauseError::Stopping);
            }
            let running: Vec<&JoinHandle<()>> =
                handles.iter().filter(|h| !h.is_finished()).collect();
            let state = self.lock();
            if state.parked >= running.len() {
                return Ok(());
            }
            drop(state);
            // A kick that lands just before a thread enters KVM_RUN is lost; repeat it.
            for h in running {
                let _ = h.kill(kick_signal());
            }
            let state = self.lock();
            let _ = self
                .changed
                .wait_timeout(state, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn resume(&self) -> Result<(), PauseError> {
        let mut state = self.lock();
        if !state.paused {
            return Err(PauseError::NotPaused);
        }
        state.paused = false;
        self.changed.notify_all();
        Ok(())
    }

    /// Lets parked vCPUs see that the VM is stopping.
    pub fn release_all(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Called by a vCPU thread between two KVM_RUNs: waits while the VM is paused.
    fn park_if_paused(&self, exit: &ExitSignal) {
        let mut state = self.lock();
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !exit.is_requested() {
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.parked -= 1;
    }
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitSignal,
    pub run_control: Arc<RunControl>,
}

impl Vcpu {
    /// Runs until the VM stops; every stop reason goes to the exit signal.
    pub fn run(mut self) {
        let id = self.id;
        while !self.exit.is_requested() {
            self.run_control.park_if_paused(&self.exit);
            if self.exit.is_requested() {
                break;
            }
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pio.read(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio.read(addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                    None
                }
                Ok(VcpuExit::Hlt) => Some(ExitReason::PowerOff),
                Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault { vcpu: id }),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                    KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::GuestPanic),
                    other => Some(ExitReason::KvmError {
                        vcpu: id,
                        detail: format!("unknown system event {other}"),
                    }),
                },
                Ok(VcpuExit::InternalError) => Some(ExitReason::KvmError {
                    vcpu: id,
                    detail: format!(
                        "internal error (instruction emulation failed) at {}",
                        self.rip()
                    ),
                }),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::KvmError {
                    vcpu: id,
                    detail: format!("VM entry failed on host CPU {cpu}, reason {reason:#x}"),
                }),
                Ok(VcpuExit::Intr) => None,
                Ok(other) => Some(ExitReason::KvmError {
                    vcpu: id,
                    detail: format!("unexpected exit {other:?}"),
                }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(ExitReason::KvmError {
                    vcpu: id,
                    detail: format!("KVM_RUN failed: {e}"),
                }),
            };
            if let Some(reason) = outcome {
                self.exit.request(reason);
            }
        }
    }

    fn rip(&self) -> String {
        self.fd
            .get_regs()
            .map(|r| format!("rip {:#x}", r.rip))
            .unwrap_or_else(|_| "unknown rip".into())
    }

    /// Application processors wait for INIT/SIPI from the boot vCPU; only it starts runnable.
    pub fn make_runnable(&self) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
    }

    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                crate::seccomp::confine_or_abort(crate::seccomp::ThreadKind::Vcpu);
                self.run()
            })
    }
}

/// Knocks every vCPU thread out of KVM_RUN until all have returned. Repeated, because a
/// signal that lands just before a thread enters KVM_RUN is lost.
pub fn stop_vcpus(handles: Vec<JoinHandle<()>>) {
    while !handles.iter().all(|h| h.is_finished()) {
        for h in handles.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(kick_signal());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    for h in handles {
        let _ = h.join();
    }
}
