//! Boot information handed to the kernel: the e820 map, the Linux zero page and PVH start info.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    ACPI_END, ACPI_START, CMDLINE_START, EBDA_START, HIMEM_START, MMIO32_HOLE_START, PCI_ECAM_SIZE,
    PCI_ECAM_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map: conventional memory, the ACPI area, RAM and the ECAM window.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    // Linux only trusts MCFG when the ECAM window is reserved in the firmware's map.
    const { assert!(PCI_ECAM_START >= MMIO32_HOLE_START) };
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    map
}

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the memory map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
    #[error("cannot write boot information into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// Writes the zero page for the Linux 64-bit boot protocol.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<&Initrd>,
    rsdp_addr: u64,
) -> Result<(), BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// Writes `hvm_start_info` and its memory map for the PVH entry point.
///
/// PVH has no initrd field of its own: the initrd is passed as the first module.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<&Initrd>,
    rsdp_addr: u64,
) -> Result<u64, BootParamsError> {
    let map = e820_map(mem);
    let mut memmap = Vec::with_capacity(map.len() * 24);
    for entry in &map {
        memmap.extend_from_slice(&entry.addr.to_le_bytes());
        memmap.extend_from_slice(&entry.size.to_le_bytes());
        memmap.extend_from_slice(&entry.kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&memmap, GuestAddress(PVH_MEMMAP_START))?;

    // One module entry (paddr, size, cmdline_paddr, reserved) placed after the memory map.
    let modlist_addr = PVH_MEMMAP_START + memmap.len() as u64;
    let nr_modules = if let Some(initrd) = initrd {
        let mut module = Vec::with_capacity(32);
        module.extend_from_slice(&initrd.addr.to_le_bytes());
        module.extend_from_slice(&initrd.size.to_le_bytes());
        module.extend_from_slice(&0u64.to_le_bytes());
        module.extend_from_slice(&0u64.to_le_bytes());
        mem.write_slice(&module, GuestAddress(modlist_addr))?;
        1u32
    } else {
        0
    };

    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC_VALUE.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&nr_modules.to_le_bytes());
    info.extend_from_slice(&(if nr_modules > 0 { modlist_addr } else { 0 }).to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&rsdp_addr.to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(PVH_INFO_START))?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;

    #[test]
    fn e820_reports_low_memory_ram_and_reserved_windows() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(128 << 20)).unwrap();
        let map = e820_map(&mem);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert!(map.contains(&E820Entry {
            addr: HIMEM_START,
            size: (128 << 20) - HIMEM_START,
            kind: E820_RAM
        }));
        assert!(map
            .iter()
            .any(|e| e.addr == PCI_ECAM_START && e.kind == E820_RESERVED));
    }

    #[test]
    fn zero_page_holds_header_magic_cmdline_and_initrd() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(128 << 20)).unwrap();
        let initrd = Initrd {
            addr: 0x400_0000,
            size: 0x1234,
        };
        write_zero_page(&mem, None, 42, Some(&initrd), ACPI_START).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
        assert_eq!({ params.hdr.header }, 0x5372_6448);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.ramdisk_image }, 0x400_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(params.e820_entries as usize, e820_map(&mem).len());
    }

    #[test]
    fn pvh_start_info_has_magic_module_and_memmap() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(128 << 20)).unwrap();
        let initrd = Initrd {
            addr: 0x400_0000,
            size: 0x1000,
        };
        let addr = write_pvh_start_info(&mem, Some(&initrd), ACPI_START).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let nr_modules: u32 = mem.read_obj(GuestAddress(addr + 12)).unwrap();
        assert_eq!(nr_modules, 1);
        let modlist: u64 = mem.read_obj(GuestAddress(addr + 16)).unwrap();
        let module_addr: u64 = mem.read_obj(GuestAddress(modlist)).unwrap();
        assert_eq!(module_addr, 0x400_0000);
        let rsdp: u64 = mem.read_obj(GuestAddress(addr + 32)).unwrap();
        assert_eq!(rsdp, ACPI_START);
        let entries: u32 = mem.read_obj(GuestAddress(addr + 48)).unwrap();
        assert_eq!(entries as usize, e820_map(&mem).len());
    }
}
