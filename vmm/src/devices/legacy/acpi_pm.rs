//! Hardware-reduced ACPI sleep control and reset registers (FADT points at these ports).

use crate::arch::layout::{ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT};
use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

const SLEEP_ENABLE: u8 = 1 << 5;
/// `\_S5` in the DSDT is sleep type 5.
const S5_SLEEP_TYPE: u8 = 5;

/// Mapped from `ACPI_SLEEP_CONTROL_PORT`, three bytes: control, status, reset.
pub struct AcpiPmDevice {
    exit: ExitSignal,
}

impl AcpiPmDevice {
    pub const LEN: u64 = 3;

    pub fn new(exit: ExitSignal) -> Self {
        AcpiPmDevice { exit }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = ACPI_SLEEP_CONTROL_PORT + offset as u16;
        if port == ACPI_SLEEP_CONTROL_PORT
            && value & SLEEP_ENABLE != 0
            && (value >> 2) & 0x7 == S5_SLEEP_TYPE
        {
            self.exit.request(ExitReason::PowerOff);
        } else if port == ACPI_RESET_PORT && value == ACPI_RESET_VALUE {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let exit = ExitSignal::new();
        let mut dev = AcpiPmDevice::new(exit.clone());
        // Sleep type 5 without SLP_EN, and another sleep state, do nothing.
        dev.write(0, &[5 << 2]);
        dev.write(0, &[(3 << 2) | SLEEP_ENABLE]);
        assert!(!exit.is_requested());
        dev.write(0, &[(5 << 2) | SLEEP_ENABLE]);
        assert_eq!(exit.wait(), ExitReason::PowerOff);
    }

    #[test]
    fn reset_register_resets() {
        let exit = ExitSignal::new();
        let mut dev = AcpiPmDevice::new(exit.clone());
        dev.write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.wait(), ExitReason::Reset);
    }
}
