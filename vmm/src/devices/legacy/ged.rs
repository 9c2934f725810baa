//! ACPI Generic Event Device (hardware-reduced ACPI's way to raise platform events): a
//! one-byte register of pending events and an interrupt. The DSDT's `_EVT` method reads the
//! register (which clears it) and turns each bit into a notification: PCI hot-plug slots to
//! rescan, or a press of the power button that a stock guest answers by powering off.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::IrqTrigger;
use crate::bus::BusDevice;

/// Bits of the event register, as the DSDT's `_EVT` reads them.
pub const EVENT_PCI_HOTPLUG: u8 = 1 << 0;
pub const EVENT_POWER_BUTTON: u8 = 1 << 1;
pub const LEN: u64 = 1;

struct Inner {
    pending: AtomicU8,
    irq: Box<dyn IrqTrigger>,
}

/// The handle the VMM raises events with; cheap to clone.
#[derive(Clone)]
pub struct GedNotifier(Arc<Inner>);

impl GedNotifier {
    pub fn notify(&self, event: u8) -> std::io::Result<()> {
        self.0.pending.fetch_or(event, Ordering::AcqRel);
        self.0.irq.trigger()
    }
}

/// The register on the I/O bus.
pub struct Ged(Arc<Inner>);

impl Ged {
    /// `irq` must raise the GSI the DSDT names.
    pub fn new(irq: Box<dyn IrqTrigger>) -> (Ged, GedNotifier) {
        let inner = Arc::new(Inner {
            pending: AtomicU8::new(0),
            irq,
        });
        (Ged(inner.clone()), GedNotifier(inner))
    }
}

impl BusDevice for Ged {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.0.pending.swap(0, Ordering::AcqRel);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn events_accumulate_raise_the_interrupt_and_clear_on_read() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut ged, notifier) = Ged::new(Box::new(irq.try_clone().unwrap()));
        notifier.notify(EVENT_POWER_BUTTON).unwrap();
        notifier.notify(EVENT_PCI_HOTPLUG).unwrap();
        assert_eq!(irq.read().unwrap(), 2);
        let mut v = [0u8];
        ged.read(0, &mut v);
        assert_eq!(v[0], EVENT_POWER_BUTTON | EVENT_PCI_HOTPLUG);
        ged.read(0, &mut v);
        assert_eq!(v[0], 0);
        // Writes change nothing.
        ged.write(0, &[0xff]);
        ged.read(0, &mut v);
        assert_eq!(v[0], 0);
    }
}
