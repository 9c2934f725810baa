//! The host bridge at 00:00.0: identity only, so the guest sees a normal root complex.

use super::configuration::{PciConfiguration, PciHeader};
use super::root::PciDevice;

pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(PciHeader {
                // Red Hat's PCIe host bridge id, as QEMU's generic hosts use.
                vendor_id: 0x1b36,
                device_id: 0x0008,
                revision: 0,
                class_code: (0x06, 0x00, 0x00),
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}
