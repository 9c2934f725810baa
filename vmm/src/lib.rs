//! stratus-vmm: a purpose-built KVM virtual machine monitor. It boots stock distribution
//! kernels directly (no firmware), describes the machine with ACPI, and exposes virtio
//! devices on a PCI host bridge, the way a stock kernel expects to find them.

pub mod acpi;
pub mod api;
pub mod arch;
pub mod bus;
pub mod config;
pub mod console_log;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod interrupts;
pub mod loader;
pub mod log_limit;
pub mod memory;
pub mod seccomp;
pub mod test_ceph;
pub mod test_guest;
pub mod test_mounts;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use exit::ExitReason;
pub use vm::{BootSource, Vm, VmError, VmResources};
