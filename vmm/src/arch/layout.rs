//! Guest physical address map (x86_64).
//!
//! Low memory holds the boot structures; RAM runs from 1 MiB up to the 32-bit MMIO hole at
//! 3 GiB and continues above 4 GiB. The hole holds the PCI windows, ECAM, IOAPIC and LAPIC.

/// GDT used for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Zero page (`struct boot_params`) for the Linux 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH `hvm_start_info` and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4, PDPT and four page directories (identity map of the low 4 GiB, up to 0xefff).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Top of conventional memory reported to the guest; the EBDA follows.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM above this address is relocated above 4 GiB.
pub const MMIO32_HOLE_START: u64 = 0xc000_0000;
pub const MMIO32_HOLE_SIZE: u64 = (1 << 32) - MMIO32_HOLE_START;
/// 32-bit window for PCI BARs.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM) for bus 0.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Guest RAM above the hole starts here.
pub const RAM_64BIT_START: u64 = 1 << 32;

/// Legacy I/O ports.
pub const SERIAL_PORT_COM1: u16 = 0x3f8;
pub const SERIAL_IRQ_COM1: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const DEBUG_PORT: u16 = 0x80;
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// ACPI hardware-reduced sleep control/status and reset registers (one byte each).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// ACPI Generic Event Device: one byte of pending events (read clears), and its interrupt.
pub const GED_PORT: u16 = 0x610;
pub const GED_IRQ: u32 = 5;
/// ACPI PCI hot-plug registers: slots up (u32), slots down (u32), slots ejected (u32).
pub const PCI_HOTPLUG_PORT: u16 = 0x620;
/// QEMU-compatible pvpanic port; Linux's pvpanic driver binds to ACPI id QEMU0001.
pub const PVPANIC_PORT: u16 = 0x505;

/// First GSI handed to MSI-X vectors (GSIs below are IOAPIC pins).
pub const MSI_GSI_START: u32 = 24;
pub const IOAPIC_PINS: u32 = 24;
