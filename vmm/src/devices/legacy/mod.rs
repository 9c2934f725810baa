//! Legacy PC devices on port I/O.

pub mod acpi_pm;
pub mod cmos;
pub mod debug_port;
pub mod ged;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt a device raises now and then.
pub trait IrqTrigger: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}

/// An eventfd bound to a GSI (irqfd), or any eventfd a test reads.
impl IrqTrigger for EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// An edge on an IOAPIC pin raised with `KVM_IRQ_LINE`: for devices that interrupt
/// rarely (the RTC, the GED), where binding an irqfd would cost start-up time (each
/// `KVM_IRQFD` waits for the kernel's RCU) and never pay it back.
pub struct IrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLine {
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        IrqLine { vm, gsi }
    }
}

impl IrqTrigger for IrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        let os = |e: kvm_ioctls::Error| std::io::Error::from_raw_os_error(e.errno());
        self.vm.set_irq_line(self.gsi, true).map_err(os)?;
        self.vm.set_irq_line(self.gsi, false).map_err(os)
    }
}

/// Raises a level on an irqfd-backed GSI.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
