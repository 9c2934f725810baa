//! Emulated devices: legacy PC devices, the PCI bus and virtio devices.

pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;
