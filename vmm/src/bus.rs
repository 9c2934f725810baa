//! Dispatch of guest port I/O and MMIO exits to devices by address range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through port I/O or MMIO. `offset` is relative to the range start.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Default)]
pub struct Bus {
    // Keyed by range start; values are (length, device).
    devices: RwLock<BTreeMap<u64, (u64, SharedDevice)>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut devices = self.devices.write().expect("bus lock poisoned");
        let overlaps_previous = devices
            .range(..end)
            .next_back()
            .is_some_and(|(&start, &(l, _))| start + l > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        devices.insert(base, (len, device));
        Ok(())
    }

    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut devices = self.devices.write().expect("bus lock poisoned");
        devices
            .remove(&base)
            .map(|(_, d)| d)
            .ok_or(BusError::NotFound(base))
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let devices = self.devices.read().expect("bus lock poisoned");
        let (&start, (len, device)) = devices.range(..=addr).next_back()?;
        (addr - start < *len).then(|| (addr - start, device.clone()))
    }

    /// Returns false when nothing is mapped at `addr` (the read then returns all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device
                    .lock()
                    .expect("device lock poisoned")
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device
                    .lock()
                    .expect("device lock poisoned")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder { last_write: None }));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![7])));
        assert!(!bus.read(0x400, &mut data));
        assert_eq!(data, [0xff]);
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder { last_write: None }));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10ff, 1),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert!(bus.insert(dev.clone(), 0xfff, 2).is_err());
        assert!(bus.insert(dev.clone(), 0x1100, 0).is_err());
        bus.insert(dev.clone(), 0x1100, 0x10).unwrap();
        bus.remove(0x1000).unwrap();
        bus.insert(dev, 0x1000, 0x100).unwrap();
    }
}
