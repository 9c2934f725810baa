//! Virtio transports.

pub mod pci;
