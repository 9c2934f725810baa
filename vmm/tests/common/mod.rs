//! Helpers for tests that run tiny project-built guests on /dev/kvm.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use stratus_vmm::arch::regs::EntryMode;
use stratus_vmm::devices::legacy::debug_port::Milestone;
use stratus_vmm::devices::virtio::block::BlockConfig;
use stratus_vmm::{BootSource, ExitReason, Vm, VmResources};

#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct GuestRun {
    pub reason: ExitReason,
    pub console: Vec<u8>,
    pub milestones: Vec<Milestone>,
}

/// Boots `code` at `load_addr` and waits (bounded) for the guest to stop.
pub fn run_guest(
    code: &[u8],
    load_addr: u64,
    mode: EntryMode,
    disks: Vec<BlockConfig>,
) -> GuestRun {
    let console = Console::default();
    let vm = Vm::build(
        VmResources {
            boot: BootSource::Code {
                code: code.to_vec(),
                load_addr,
                mode,
            },
            cpus: 1,
            memory_mib: 64,
            disks,
            nets: vec![],
            console: Box::new(console.clone()),
            console_input: false,
            pci_slots: 8,
        },
        Instant::now(),
    )
    .expect("VM builds on /dev/kvm");
    let progress = vm.boot_progress();
    let exit = vm.exit_signal();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm.run());
    });
    // A guest that never stops is a failure, not a hung test run.
    let reason = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r,
        Err(_) => {
            exit.request(ExitReason::VmmError(
                "test guest did not stop within 60 s".into(),
            ));
            rx.recv_timeout(Duration::from_secs(10))
                .expect("VM stops after the timeout")
        }
    };
    let console = console.0.lock().unwrap().clone();
    GuestRun {
        reason,
        console,
        milestones: progress.milestones(),
    }
}
