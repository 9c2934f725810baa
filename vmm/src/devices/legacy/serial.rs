//! 16550 UART at COM1 (vm-superio), with its interrupt delivered through an irqfd.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::bus::BusDevice;
use crate::exit::ExitSignal;
use crate::log_limit::rate_limited;

/// The text Linux prints when it panics; with `panic=-1` the reset that follows is a crash.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Passes console output through and watches it for the kernel's panic message.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    exit: ExitSignal,
    line: Vec<u8>,
}

impl ConsoleWriter {
    pub fn new(out: Box<dyn Write + Send>, exit: ExitSignal) -> Self {
        ConsoleWriter {
            out,
            exit,
            line: Vec::with_capacity(128),
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                self.line.clear();
                continue;
            }
            if self.line.len() < 256 {
                self.line.push(b);
            }
            if self.line.ends_with(PANIC_MARKER) {
                self.exit.note_panic_message();
            }
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scan(buf);
        self.out.write_all(buf)?;
        // Console output must reach the log even if the VMM is killed.
        self.out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFdTrigger, out: ConsoleWriter) -> Self {
        SerialDevice {
            serial: Serial::new(interrupt, out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                // Once the console file cannot be written, every byte would say so.
                rate_limited!(tracing::Level::WARN, "serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_console_and_raise_the_interrupt() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let exit = ExitSignal::new();
        let mut dev = SerialDevice::new(
            EventFdTrigger(irq.try_clone().unwrap()),
            ConsoleWriter::new(Box::new(out.clone()), exit),
        );
        // Enable the "transmitter holding register empty" interrupt, then send.
        dev.write(1, &[0x02]);
        for b in b"ok\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"ok\n");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn panic_message_marks_the_following_reset_as_a_panic() {
        let exit = ExitSignal::new();
        let mut writer = ConsoleWriter::new(Box::new(Shared::default()), exit.clone());
        writer
            .write_all(b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        exit.request(crate::exit::ExitReason::Reset);
        assert_eq!(exit.wait(), crate::exit::ExitReason::GuestPanic);
    }
}
