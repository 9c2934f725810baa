//! The virtio-pci transport as a guest driver sees it: configuration space through ECAM
//! and ports 0xCF8/0xCFC (capabilities, BAR moves, the MSI-X control word, the PCI
//! configuration access window), BAR 0 through the MMIO bus and directly (common
//! configuration, ISR, device configuration, notifications, MSI-X table and PBA), and
//! interrupts raised by the device in between. The device behind the transport is a stand-in
//! with two queues, so activation is cheap and never starts a worker thread.
//!
//! Input: operations of 12 bytes each: kind, size selector, 16-bit offset, 64-bit value.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use stratus_fuzz::{guest_memory, Input};
use stratus_vmm::bus::{Bus, BusDevice};
use stratus_vmm::devices::pci::host_bridge::HostBridge;
use stratus_vmm::devices::pci::msix::{MsiSink, Msix};
use stratus_vmm::devices::pci::{PciConfigIo, PciConfigMmio, PciDevice, PciRoot};
use stratus_vmm::devices::virtio::transport::pci::{VirtioPciDevice, BAR0_SIZE};
use stratus_vmm::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
use stratus_vmm::interrupts::{InterruptError, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

const BAR0: u64 = 0xc000_0000;
const SLOT: u64 = 1;
const QUEUES: usize = 2;

/// Routes go nowhere without KVM.
struct NoRoutes;

impl MsiSink for NoRoutes {
    fn route(&self, _gsi: u32, _msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        Ok(())
    }
}

type SharedInterrupt = Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>;

/// Holds on to the interrupt it is given at activation, so the target can raise
/// interrupts the way a worker would.
struct StandIn {
    config: [u8; 16],
    interrupt: SharedInterrupt,
}

impl VirtioDevice for StandIn {
    fn device_type(&self) -> u32 {
        stratus_vmm::devices::virtio::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256; QUEUES]
    }

    fn available_features(&self) -> u64 {
        stratus_vmm::devices::virtio::VIRTIO_F_RING_INDIRECT_DESC
            | stratus_vmm::devices::virtio::VIRTIO_RING_F_EVENT_IDX
            | 1 << 9
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(slot) = at.and_then(|at| self.config.get_mut(at)) {
                *slot = *byte;
            }
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.is_empty() {
            return Err(ActivateError::QueueCount {
                enabled: 0,
                needed: 1,
            });
        }
        *lock(&self.interrupt) = Some(ctx.interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        *lock(&self.interrupt) = None;
    }
}

/// A poisoned lock here is a panic already reported.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory(&[]);
    let interrupt = SharedInterrupt::default();
    let eventfds = (0..=QUEUES)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("harness: eventfd"))
        .collect();
    let gsis = (24..24 + QUEUES as u32 + 1).collect();
    let msix = Msix::new(gsis, eventfds, Box::new(NoRoutes)).expect("harness: MSI-X");
    let device = VirtioPciDevice::new(
        Box::new(StandIn {
            config: std::array::from_fn(|i| i as u8),
            interrupt: interrupt.clone(),
        }),
        mem,
        msix,
        BAR0,
        None,
    )
    .expect("harness: virtio-pci device");
    let device = Arc::new(Mutex::new(device));
    let mmio = Arc::new(Bus::new());
    let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone())));
    {
        let mut root = lock(&root);
        root.add_device(Arc::new(Mutex::new(HostBridge::new())), None)
            .expect("harness: host bridge");
        root.add_device_at(SLOT as usize, device.clone(), Some(device.clone()))
            .expect("harness: device slot");
    }
    let mut ecam = PciConfigMmio::new(root.clone());
    let mut ports = PciConfigIo::new(root.clone());

    let mut input = Input::new(data);
    while !input.is_empty() {
        let kind = input.u8();
        let selector = input.u8();
        let offset = u64::from(input.u16());
        let value = input.u64().to_le_bytes();
        // What a vCPU exit carries: 1, 2, 4 or 8 bytes.
        let size = 1usize << (selector & 3);
        let mut buf = [0u8; 8];
        let (write, read) = (&value[..size], &mut buf[..size]);
        match kind % 9 {
            0 => lock(&device).write(offset % BAR0_SIZE, write),
            1 => lock(&device).read(offset % BAR0_SIZE, read),
            2 | 3 => {
                // Mostly the device's own function; otherwise anywhere on bus 0.
                let function = if selector & 4 == 0 {
                    SLOT << 15
                } else {
                    u64::from(selector >> 3) << 12
                };
                let at = function | (offset & 0xfff);
                if kind % 9 == 2 {
                    ecam.write(at, write)
                } else {
                    ecam.read(at, read)
                }
            }
            4 => ports.write(offset % PciConfigIo::LEN, write),
            5 => ports.read(offset % PciConfigIo::LEN, read),
            6 | 7 => {
                // Where the guest has put BAR 0 now (nothing answers while it is off).
                let base = lock(&device).config().bar_mapping(0).unwrap_or(BAR0);
                let at = base + offset % BAR0_SIZE;
                if kind % 9 == 6 {
                    mmio.write(at, write);
                } else {
                    mmio.read(at, read);
                }
            }
            _ => {
                let raised = lock(&interrupt).clone();
                if let Some(raised) = raised {
                    raised.trigger(match value[0] % 4 {
                        // Queue 2 does not exist: it must raise nothing.
                        q @ 0..=2 => VirtioInterruptType::Queue(u16::from(q)),
                        _ => VirtioInterruptType::Config,
                    });
                }
            }
        }
    }
    // The root, the bus and the device refer to each other, as in a VM.
    lock(&root).remove_all();
});
