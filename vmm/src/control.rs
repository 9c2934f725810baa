//! The VMM's control thread: the one place that changes the running VM (its devices, its
//! vCPUs' run state, the power button). The API server and the devices reach it through a
//! command channel; the thread sleeps on that channel until a request arrives or the VM
//! stops, so nothing polls.
//!
//! A request is a closure run on the control thread with the `Controller`, its result sent
//! back on a one-shot channel: each API handler says what it needs in one place, typed,
//! without a command enum and a reply enum to keep in step.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use crate::api::VmState;
use crate::device_manager::DeviceManager;
use crate::devices::legacy::ged::{GedNotifier, EVENT_POWER_BUTTON};
use crate::exit::ExitSignal;
use crate::vcpu::{PauseError, RunControl};

type Call = Box<dyn FnOnce(&mut Controller) + Send>;

pub(crate) enum ControlMessage {
    Call(Call),
    /// The guest ejected PCI slots through `B0EJ`: the bitmap of those not handled yet.
    Ejected(Arc<AtomicU32>),
    /// Look at the exit signal.
    Wake,
}

/// What the eject register calls with the slots a guest ejects. Slots gather in one bitmap
/// until the control thread takes them, with one message sent when the bitmap stops being
/// empty: a guest writing the register in a loop, from every vCPU, while the control thread
/// is busy (a network disk's hot-plug, say), would otherwise queue messages without end.
pub(crate) fn eject_notifier(tx: mpsc::Sender<ControlMessage>) -> impl Fn(u32) + Send + Sync {
    let tx = Mutex::new(tx);
    let pending = Arc::new(AtomicU32::new(0));
    move |slots| {
        if pending.fetch_or(slots, Ordering::AcqRel) == 0 {
            let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send(ControlMessage::Ejected(pending.clone()));
        }
    }
}

/// The VM is stopping (or gone): the control thread no longer takes requests.
#[derive(Debug, thiserror::Error)]
#[error("the VM is stopping")]
pub struct VmStopping;

/// Sends requests to the control thread; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<ControlMessage>,
}

impl ControlHandle {
    pub(crate) fn new(tx: mpsc::Sender<ControlMessage>) -> Self {
        ControlHandle { tx }
    }

    /// Runs `f` on the control thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller) -> R + Send + 'static,
    ) -> Result<R, VmStopping> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(ControlMessage::Call(Box::new(move |c| {
                let _ = tx.send(f(c));
            })))
            .map_err(|_| VmStopping)?;
        rx.await.map_err(|_| VmStopping)
    }
}

/// What requests work on, owned by the control thread.
pub struct Controller {
    pub devices: DeviceManager,
    run_control: Arc<RunControl>,
    vcpus: Vec<JoinHandle<()>>,
    ged: GedNotifier,
    exit: ExitSignal,
}

impl Controller {
    pub(crate) fn new(
        devices: DeviceManager,
        run_control: Arc<RunControl>,
        vcpus: Vec<JoinHandle<()>>,
        ged: GedNotifier,
        exit: ExitSignal,
    ) -> Self {
        Controller {
            devices,
            run_control,
            vcpus,
            ged,
            exit,
        }
    }

    pub fn state(&self) -> VmState {
        if self.exit.is_requested() {
            VmState::Stopping
        } else if self.run_control.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Returns once no vCPU runs guest code.
    pub fn pause(&mut self) -> Result<(), PauseError> {
        self.run_control.pause(&self.vcpus, &self.exit)
    }

    pub fn resume(&mut self) -> Result<(), PauseError> {
        self.run_control.resume()
    }

    /// A press of the ACPI power button: a guest that handles it powers off by itself.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.ged.notify(EVENT_POWER_BUTTON)
    }

    /// Serves requests until the VM stops. Requests still queued then are dropped with
    /// the receiver: their callers learn that the VM is stopping.
    pub(crate) fn serve(&mut self, rx: mpsc::Receiver<ControlMessage>) {
        while !self.exit.is_requested() {
            match rx.recv() {
                Ok(ControlMessage::Call(call)) => call(self),
                Ok(ControlMessage::Ejected(pending)) => {
                    self.devices.ejected(pending.swap(0, Ordering::AcqRel))
                }
                Ok(ControlMessage::Wake) => {}
                Err(mpsc::RecvError) => break,
            }
        }
    }

    /// Lets paused vCPUs see the stop and hands their threads to the caller to stop.
    pub(crate) fn release_vcpus(&mut self) -> Vec<JoinHandle<()>> {
        self.run_control.release_all();
        std::mem::take(&mut self.vcpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_while_the_control_thread_is_busy_queue_one_message() {
        let (tx, rx) = mpsc::channel();
        let eject = eject_notifier(tx);
        for round in 0..10_000u32 {
            eject(1 << (1 + round % 3));
        }
        let queued: Vec<_> = rx.try_iter().collect();
        assert_eq!(queued.len(), 1, "one message for all the writes");
        let Some(ControlMessage::Ejected(pending)) = queued.first() else {
            panic!("not an eject");
        };
        assert_eq!(
            pending.swap(0, Ordering::AcqRel),
            0b1110,
            "every slot ejected"
        );
        // Taken: the next eject is a message of its own.
        eject(1 << 5);
        let Some(ControlMessage::Ejected(pending)) = rx.try_iter().next() else {
            panic!("the next eject was not sent");
        };
        assert_eq!(pending.load(Ordering::Acquire), 1 << 5);
    }
}
