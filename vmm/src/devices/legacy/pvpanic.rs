//! pvpanic (QEMU-compatible, ACPI id QEMU0001): the guest kernel reports its own panic.

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    exit: ExitSignal,
}

impl PvPanic {
    pub fn new(exit: ExitSignal) -> Self {
        PvPanic { exit }
    }
}

impl BusDevice for PvPanic {
    /// The driver reads the events the device supports.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            tracing::warn!("guest reported a kernel panic through pvpanic");
            self.exit.request(ExitReason::GuestPanic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicked_event_ends_the_vm_as_a_panic() {
        let exit = ExitSignal::new();
        let mut dev = PvPanic::new(exit.clone());
        let mut caps = [0u8];
        dev.read(0, &mut caps);
        assert_eq!(caps[0], 3);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        assert!(!exit.is_requested());
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.wait(), ExitReason::GuestPanic);
    }
}
