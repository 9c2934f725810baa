//! Bus 0 of the root complex: configuration accesses by port (0xCF8/0xCFC) and by ECAM,
//! and BAR placement on the MMIO bus as the guest enables or moves them.

use std::sync::{Arc, Mutex};

use super::configuration::{PciConfiguration, NUM_BARS};
use crate::bus::{Bus, BusDevice};
use crate::log_limit::rate_limited;

/// A PCI function. BAR accesses reach the device through its `BusDevice` side, with the
/// offset relative to BAR 0 (every device here has a single BAR).
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;

    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config_mut().write_reg(reg, offset, data);
    }

    /// The BAR is now decoded at `to` (or nowhere); devices move their ioeventfds here.
    fn bar_moved(&mut self, _bar: usize, _from: Option<u64>, _to: Option<u64>) {}
}

pub const MAX_DEVICES: usize = 32;

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    /// `None` for devices without BARs.
    bar_target: Option<Arc<Mutex<dyn BusDevice>>>,
    mapped: [Option<u64>; NUM_BARS],
}

#[derive(Debug, thiserror::Error)]
pub enum PciRootError {
    #[error("all {MAX_DEVICES} PCI slots are taken")]
    NoFreeSlot,
    #[error("PCI slot {0} is taken or does not exist")]
    SlotTaken(usize),
    #[error("cannot map BAR {bar} of device {slot:02x} at {addr:#x}: {source}")]
    MapBar {
        slot: usize,
        bar: usize,
        addr: u64,
        source: crate::bus::BusError,
    },
}

pub struct PciRoot {
    /// Indexed by slot (device number on bus 0); `None` is an empty slot.
    slots: Vec<Option<Slot>>,
    mmio_bus: Arc<Bus>,
}

impl PciRoot {
    pub fn new(mmio_bus: Arc<Bus>) -> Self {
        PciRoot {
            slots: (0..MAX_DEVICES).map(|_| None).collect(),
            mmio_bus,
        }
    }

    pub fn is_free(&self, slot: usize) -> bool {
        matches!(self.slots.get(slot), Some(None))
    }

    /// Adds a device at the first free slot and maps its BARs as configured.
    pub fn add_device(
        &mut self,
        device: Arc<Mutex<dyn PciDevice>>,
        bar_target: Option<Arc<Mutex<dyn BusDevice>>>,
    ) -> Result<usize, PciRootError> {
        let slot = (0..MAX_DEVICES)
            .find(|&s| self.is_free(s))
            .ok_or(PciRootError::NoFreeSlot)?;
        self.add_device_at(slot, device, bar_target)?;
        Ok(slot)
    }

    /// Adds a device at `slot` and maps its BARs; on failure the slot stays empty.
    pub fn add_device_at(
        &mut self,
        slot: usize,
        device: Arc<Mutex<dyn PciDevice>>,
        bar_target: Option<Arc<Mutex<dyn BusDevice>>>,
    ) -> Result<(), PciRootError> {
        if !self.is_free(slot) {
            return Err(PciRootError::SlotTaken(slot));
        }
        self.slots[slot] = Some(Slot {
            device,
            bar_target,
            mapped: [None; NUM_BARS],
        });
        if let Err(e) = self.reconcile_bars(slot) {
            self.remove_device(slot);
            return Err(e);
        }
        Ok(())
    }

    /// Takes the device out of `slot`: its BARs are unmapped (and the device told, so it
    /// drops its ioeventfds) and the root's reference to it is dropped.
    pub fn remove_device(&mut self, slot: usize) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let taken = self.slots.get_mut(slot)?.take()?;
        let mut device = taken.device.lock().expect("PCI device lock poisoned");
        for (bar, addr) in taken.mapped.iter().enumerate() {
            if let Some(addr) = addr {
                let _ = self.mmio_bus.remove(*addr);
                device.bar_moved(bar, Some(*addr), None);
            }
        }
        drop(device);
        Some(taken.device)
    }

    /// Unmaps and drops every device. The root, its MMIO bus and the ECAM window on that
    /// bus refer to each other, so the devices would otherwise outlive the VM and never
    /// shut down (a qcow2 disk would not write its metadata).
    pub fn remove_all(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(slot) = slot.take() {
                for addr in slot.mapped.into_iter().flatten() {
                    let _ = self.mmio_bus.remove(addr);
                }
            }
        }
    }

    pub fn read_config(&self, device: usize, function: usize, reg: usize) -> u32 {
        match self.slots.get(device) {
            Some(Some(slot)) if function == 0 => slot
                .device
                .lock()
                .expect("PCI device lock poisoned")
                .read_config_register(reg),
            _ => 0xffff_ffff,
        }
    }

    pub fn write_config(
        &mut self,
        device: usize,
        function: usize,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        let Some(Some(slot)) = self.slots.get(device).filter(|_| function == 0) else {
            return;
        };
        slot.device
            .lock()
            .expect("PCI device lock poisoned")
            .write_config_register(reg, offset, data);
        if let Err(e) = self.reconcile_bars(device) {
            rate_limited!(
                tracing::Level::WARN,
                "guest placed a BAR where it cannot be mapped: {e}"
            );
        }
    }

    /// Makes the MMIO bus match where the device decodes its BARs now.
    fn reconcile_bars(&mut self, index: usize) -> Result<(), PciRootError> {
        let Some(Some(slot)) = self.slots.get_mut(index) else {
            return Ok(());
        };
        let Some(target) = slot.bar_target.clone() else {
            return Ok(());
        };
        let mut device = slot.device.lock().expect("PCI device lock poisoned");
        for bar in 0..NUM_BARS {
            let wanted = device.config().bar_mapping(bar);
            let current = slot.mapped[bar];
            if wanted == current {
                continue;
            }
            if let Some(old) = current {
                let _ = self.mmio_bus.remove(old);
            }
            slot.mapped[bar] = None;
            if let Some(addr) = wanted {
                let size = device.config().bar_size(bar);
                if let Err(source) = self.mmio_bus.insert(target.clone(), addr, size) {
                    // The BAR decodes nowhere now: the device must drop what it had
                    // registered at the old address (its ioeventfds).
                    device.bar_moved(bar, current, None);
                    return Err(PciRootError::MapBar {
                        slot: index,
                        bar,
                        addr,
                        source,
                    });
                }
                slot.mapped[bar] = Some(addr);
            }
            device.bar_moved(bar, current, slot.mapped[bar]);
        }
        Ok(())
    }
}

/// Configuration mechanism #1: address at 0xCF8, data at 0xCFC..0xCFF.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

const CONFIG_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    pub const LEN: u64 = 8;

    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// (device, function, register) selected by the address latch, if enabled and on bus 0.
    fn target(&self) -> Option<(usize, usize, usize)> {
        if self.address & CONFIG_ENABLE == 0 || (self.address >> 16) & 0xff != 0 {
            return None;
        }
        Some((
            ((self.address >> 11) & 0x1f) as usize,
            ((self.address >> 8) & 0x7) as usize,
            ((self.address >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        if offset < 4 || offset as usize + data.len() > 8 {
            data.fill(0xff);
            return;
        }
        let value = match self.target() {
            Some((dev, func, reg)) => self
                .root
                .lock()
                .expect("PCI root lock poisoned")
                .read_config(dev, func, reg),
            None => 0xffff_ffff,
        };
        let bytes = value.to_le_bytes();
        let start = (offset - 4) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            return;
        }
        if offset < 4 || offset as usize + data.len() > 8 {
            return;
        }
        if let Some((dev, func, reg)) = self.target() {
            self.root
                .lock()
                .expect("PCI root lock poisoned")
                .write_config(dev, func, reg, offset - 4, data);
        }
    }
}

/// ECAM for bus 0: 4 KiB of configuration space per function.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn decode(offset: u64) -> (usize, usize, usize, u64) {
        (
            ((offset >> 15) & 0x1f) as usize,
            ((offset >> 12) & 0x7) as usize,
            ((offset & 0xfff) >> 2) as usize,
            offset & 0x3,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (dev, func, reg, byte) = Self::decode(offset);
        if byte as usize + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        let value = self
            .root
            .lock()
            .expect("PCI root lock poisoned")
            .read_config(dev, func, reg);
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[byte as usize..byte as usize + data.len()]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (dev, func, reg, byte) = Self::decode(offset);
        if byte as usize + data.len() > 4 {
            return;
        }
        self.root
            .lock()
            .expect("PCI root lock poisoned")
            .write_config(dev, func, reg, byte, data);
    }
}

#[cfg(test)]
mod tests {
    use super::super::configuration::PciHeader;
    use super::super::host_bridge::HostBridge;
    use super::*;

    struct BarDevice {
        config: PciConfiguration,
        moves: Vec<(Option<u64>, Option<u64>)>,
    }

    impl PciDevice for BarDevice {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn bar_moved(&mut self, _bar: usize, from: Option<u64>, to: Option<u64>) {
            self.moves.push((from, to));
        }
    }

    impl BusDevice for BarDevice {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    fn setup() -> (Arc<Bus>, Arc<Mutex<PciRoot>>, Arc<Mutex<BarDevice>>) {
        let bus = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(bus.clone())));
        root.lock()
            .unwrap()
            .add_device(Arc::new(Mutex::new(HostBridge::new())), None)
            .unwrap();
        let mut config = PciConfiguration::new(PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: (1, 0, 0),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        });
        config.add_memory_bar(0, 0xc000_0000, 0x1000).unwrap();
        let dev = Arc::new(Mutex::new(BarDevice {
            config,
            moves: vec![],
        }));
        root.lock()
            .unwrap()
            .add_device(dev.clone(), Some(dev.clone()))
            .unwrap();
        (bus, root, dev)
    }

    #[test]
    fn port_io_reads_identity_of_each_slot_and_ones_for_empty_ones() {
        let (_bus, root, _dev) = setup();
        let mut io = PciConfigIo::new(root);
        let mut data = [0u8; 4];
        io.write(0, &(CONFIG_ENABLE | (1 << 11)).to_le_bytes());
        io.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1042_1af4);
        // 16-bit read of the device id at 0xCFE.
        let mut word = [0u8; 2];
        io.read(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1042);
        io.write(0, &CONFIG_ENABLE.to_le_bytes());
        io.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0008_1b36);
        io.write(0, &(CONFIG_ENABLE | (5 << 11)).to_le_bytes());
        io.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xffff_ffff);
        // Without the enable bit nothing is selected.
        io.write(0, &(1u32 << 11).to_le_bytes());
        io.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xffff_ffff);
    }

    #[test]
    fn ecam_reaches_the_same_registers() {
        let (_bus, root, _dev) = setup();
        let mut ecam = PciConfigMmio::new(root);
        let mut data = [0u8; 4];
        ecam.read(1 << 15, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1042_1af4);
        ecam.read((1 << 15) | 0x10, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xc000_0000);
        // Function 1 does not exist.
        ecam.read((1 << 15) | (1 << 12), &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xffff_ffff);
    }

    #[test]
    fn bars_follow_decode_enable_and_relocation() {
        let (bus, root, dev) = setup();
        let mut ecam = PciConfigMmio::new(root);
        let mut data = [0u8; 1];
        assert!(bus.read(0xc000_0003, &mut data));
        assert_eq!(data, [4]);
        // Linux sizes BARs with decoding off: the BAR leaves the bus meanwhile.
        ecam.write((1 << 15) | 0x4, &[0, 0]);
        assert!(!bus.read(0xc000_0000, &mut data));
        ecam.write((1 << 15) | 0x10, &0xffff_ffffu32.to_le_bytes());
        let mut word = [0u8; 4];
        ecam.read((1 << 15) | 0x10, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0xffff_f000);
        ecam.write((1 << 15) | 0x10, &0xc010_0000u32.to_le_bytes());
        ecam.write((1 << 15) | 0x4, &[0x2, 0]);
        assert!(bus.read(0xc010_0000, &mut data));
        assert!(!bus.read(0xc000_0000, &mut data));
        let moves = dev.lock().unwrap().moves.clone();
        assert_eq!(
            moves,
            vec![
                (None, Some(0xc000_0000)),
                (Some(0xc000_0000), None),
                (None, Some(0xc010_0000))
            ]
        );
    }

    /// Regression: a BAR moved onto a taken range used to leave the device believing it
    /// was still mapped at the old address (its ioeventfds stayed registered there).
    #[test]
    fn a_bar_moved_where_it_cannot_be_mapped_is_unmapped_and_the_device_told() {
        let (bus, root, dev) = setup();
        struct Blocker;
        impl BusDevice for Blocker {
            fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
            fn write(&mut self, _offset: u64, _data: &[u8]) {}
        }
        bus.insert(Arc::new(Mutex::new(Blocker)), 0xc020_0000, 0x1000)
            .unwrap();
        let mut ecam = PciConfigMmio::new(root);
        ecam.write((1 << 15) | 0x10, &0xc020_0000u32.to_le_bytes());
        let moves = dev.lock().unwrap().moves.clone();
        assert_eq!(
            moves,
            vec![(None, Some(0xc000_0000)), (Some(0xc000_0000), None)]
        );
        let mut data = [0u8; 1];
        assert!(!bus.read(0xc000_0000, &mut data));
    }

    #[test]
    fn devices_are_added_at_chosen_slots_and_removed_with_their_bars() {
        let (bus, root, dev) = setup();
        let mut root = root.lock().unwrap();
        assert!(!root.is_free(1));
        assert!(matches!(
            root.add_device_at(1, dev.clone(), Some(dev.clone())),
            Err(PciRootError::SlotTaken(1))
        ));
        assert!(root.remove_device(1).is_some());
        assert!(root.is_free(1));
        assert!(root.remove_device(1).is_none());
        let mut data = [0u8; 1];
        assert!(!bus.read(0xc000_0000, &mut data));
        assert_eq!(
            dev.lock().unwrap().moves.last(),
            Some(&(Some(0xc000_0000), None))
        );
        assert_eq!(root.read_config(1, 0, 0), 0xffff_ffff);
        root.add_device_at(7, dev.clone(), Some(dev.clone()))
            .unwrap();
        assert_eq!(root.read_config(7, 0, 0), 0x1042_1af4);
        assert!(bus.read(0xc000_0000, &mut data));
        assert!(root.add_device_at(MAX_DEVICES, dev.clone(), None).is_err());
    }
}
