//! ACPI PCI hot-plug registers, read and written by the DSDT's methods (the protocol of
//! QEMU's `acpi-pci-hotplug` block, which the stock kernel's `acpiphp` drives through them):
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0 | `PCIU`: slots with a new device (the guest rescans them) | read, clears |
//! | 4 | `PCID`: slots whose device should go (the guest ejects it) | read, clears |
//! | 8 | `B0EJ`: the guest has let go of the devices in these slots | write |
//!
//! Bit `n` is slot `n` of bus 0.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::log_limit::rate_limited;

pub const LEN: u64 = 12;

#[derive(Default)]
struct Pending {
    up: u32,
    down: u32,
    /// Slots the VMM asked the guest to free and that it has not ejected yet: the only
    /// ones an eject takes down. A guest's eject of any other slot (its own idea, or a
    /// write repeated after the slot was given to a new device) would take a device away
    /// behind the back of whoever plugged it.
    removal_asked: u32,
}

/// What the VMM does when the guest ejects slots (a bitmap).
pub type EjectHandler = Box<dyn Fn(u32) + Send>;

pub struct PciHotplug {
    pending: Arc<Mutex<Pending>>,
    on_eject: EjectHandler,
}

/// The VMM's side: marks slots before it raises the hot-plug event.
#[derive(Clone)]
pub struct HotplugSlots(Arc<Mutex<Pending>>);

impl HotplugSlots {
    pub fn device_added(&self, slot: u8) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.up |= 1 << slot;
        p.down &= !(1 << slot);
        p.removal_asked &= !(1 << slot);
    }

    pub fn removal_requested(&self, slot: u8) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.down |= 1 << slot;
        p.up &= !(1 << slot);
        p.removal_asked |= 1 << slot;
    }

    /// The slot's device is gone: a removal asked again after the guest's eject (a second
    /// DELETE) must not let a later eject take the slot's next device.
    pub fn slot_freed(&self, slot: u8) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.down &= !(1 << slot);
        p.removal_asked &= !(1 << slot);
    }
}

impl PciHotplug {
    pub fn new(on_eject: EjectHandler) -> (PciHotplug, HotplugSlots) {
        let pending = Arc::new(Mutex::new(Pending::default()));
        (
            PciHotplug {
                pending: pending.clone(),
                on_eject,
            },
            HotplugSlots(pending),
        )
    }
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let value = match offset {
            0 => std::mem::take(&mut p.up),
            4 => std::mem::take(&mut p.down),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (8, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) else {
            return;
        };
        let written = u32::from_le_bytes(bytes);
        let slots = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let slots = written & p.removal_asked;
            p.removal_asked &= !slots;
            slots
        };
        if written & !slots != 0 {
            // The guest writes the register at will.
            rate_limited!(
                tracing::Level::WARN,
                "the guest ejected PCI slots {:#x} that no removal was asked for; ignored",
                written & !slots
            );
        }
        if slots != 0 {
            (self.on_eject)(slots);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn read32(dev: &mut PciHotplug, offset: u64) -> u32 {
        let mut v = [0u8; 4];
        dev.read(offset, &mut v);
        u32::from_le_bytes(v)
    }

    #[test]
    fn slots_up_and_down_are_reported_once_and_ejects_reach_the_vmm() {
        let (tx, rx) = mpsc::channel();
        let (mut dev, slots) = PciHotplug::new(Box::new(move |s| tx.send(s).unwrap()));
        slots.device_added(3);
        slots.device_added(4);
        slots.removal_requested(4);
        assert_eq!(read32(&mut dev, 0), 1 << 3);
        assert_eq!(read32(&mut dev, 0), 0);
        assert_eq!(read32(&mut dev, 4), 1 << 4);
        assert_eq!(read32(&mut dev, 4), 0);
        dev.write(8, &(1u32 << 4).to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), 1 << 4);
        // The host bridge cannot be ejected; odd sizes and other offsets are ignored.
        dev.write(8, &1u32.to_le_bytes());
        dev.write(8, &[0x10]);
        dev.write(0, &(1u32 << 5).to_le_bytes());
        assert!(rx.try_recv().is_err());
        // Only slots the VMM asked to free are taken down, each once: an eject of the
        // guest's own idea, or one repeated after the slot got a new device, is not.
        dev.write(8, &(1u32 << 3).to_le_bytes());
        dev.write(8, &(1u32 << 4).to_le_bytes());
        slots.removal_requested(5);
        slots.removal_requested(6);
        slots.device_added(6);
        slots.removal_requested(7);
        slots.slot_freed(7);
        dev.write(8, &(0b1111u32 << 4).to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), 1 << 5);
        assert!(rx.try_recv().is_err());
        assert_eq!(
            read32(&mut dev, 4),
            1 << 5,
            "a freed slot is no longer to eject"
        );
        let mut short = [0xffu8; 2];
        dev.read(0, &mut short);
        assert_eq!(short, [0, 0]);
    }
}
