//! i8042 keyboard controller: only its CPU-reset command matters (Linux `reboot=k`).

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

pub struct ResetTrigger(pub ExitSignal);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// Mapped at port 0x60 with length 5, so offset 4 is the command port 0x64.
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: ExitSignal) -> Self {
        I8042 {
            inner: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.inner.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_reset() {
        let exit = ExitSignal::new();
        let mut dev = I8042::new(exit.clone());
        dev.write(4, &[0x20]);
        assert!(!exit.is_requested());
        dev.write(4, &[0xfe]);
        assert_eq!(exit.wait(), ExitReason::Reset);
    }
}
