//! PCI: configuration space, MSI-X, the host bridge and the root complex that routes
//! configuration accesses (port 0xCF8/0xCFC and ECAM) and maps BARs.

pub mod configuration;
pub mod host_bridge;
pub mod hotplug;
pub mod msix;
pub mod root;

pub use configuration::{PciConfiguration, PciHeader};
pub use root::{PciConfigIo, PciConfigMmio, PciDevice, PciRoot};
