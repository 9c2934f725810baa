//! Legacy PC devices on port I/O.

pub mod acpi_pm;
pub mod cmos;
pub mod debug_port;
pub mod ged;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// Raises a level on an irqfd-backed GSI.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
