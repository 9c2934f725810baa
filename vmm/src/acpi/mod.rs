//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced, with sleep and reset registers so the
//! guest can power off and reboot), DSDT (PCI root bridge, COM1, CMOS RTC, pvpanic, S5), MADT
//! and MCFG.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, EISAName, Name, Path, ResourceTemplate,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::*;
use crate::devices::legacy::cmos;
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"STRTUS";
const OEM_TABLE_ID: [u8; 8] = *b"STRATUSV";
const OEM_REVISION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(u64),
    #[error("cannot write ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT's AML: the PCI host bridge and its windows, pvpanic and the S5 sleep state.
pub fn dsdt_aml() -> Vec<u8> {
    // The AML builders borrow their children, so each object is built and serialised in
    // one statement.
    let mut bytes = Vec::new();
    let zero = aml::ZERO;
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &zero),
            &Name::new("_SEG".into(), &zero),
            &Name::new("_UID".into(), &zero),
            &Name::new("_BBN".into(), &zero),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &AddressSpace::new_bus_number(0u16, 0u16),
                    &aml::IO::new(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_ADDRESS_PORT, 1, 8),
                    &AddressSpace::new_io(0u16, 0x0cf7u16, None),
                    &AddressSpace::new_io(0x0d00u16, 0xffffu16, None),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        PCI_MMIO32_START as u32,
                        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut bytes);
    let pvpanic_hid: aml::AmlStr = "QEMU0001";
    aml::Device::new(
        "_SB_.PVPN".into(),
        vec![
            &Name::new("_HID".into(), &pvpanic_hid),
            &Name::new("_UID".into(), &zero),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1)]),
            ),
        ],
    )
    .to_aml_bytes(&mut bytes);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &zero),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &aml::IO::new(SERIAL_PORT_COM1, SERIAL_PORT_COM1, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, SERIAL_IRQ_COM1),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut bytes);
    // The CMOS clock, so the guest's rtc_cmos driver binds to it through PNP; the FADT
    // names its century byte and leaves IAPC_BOOT_ARCH's "no CMOS RTC" flag clear.
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0B00")),
            &Name::new("_UID".into(), &zero),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &aml::IO::new(cmos::INDEX_PORT, cmos::INDEX_PORT, 1, cmos::PORTS as u8),
                    &aml::Interrupt::new(true, true, false, false, cmos::IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut bytes);
    let five: u8 = 5;
    Name::new(
        Path::new("_S5_"),
        &aml::Package::new(vec![&five, &zero, &zero, &zero]),
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt() -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&dsdt_aml());
    table.update_checksum();
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    builder.sleep_control_reg = io_byte(ACPI_SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io_byte(ACPI_SLEEP_STATUS_PORT);
    builder.reset_reg = io_byte(ACPI_RESET_PORT);
    builder.reset_value = ACPI_RESET_VALUE;
    builder.century = cmos::CENTURY;
    builder.hypervisor_vendor_identity = u64::from_le_bytes(*b"STRATUS\0").into();
    to_bytes(&builder.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut table = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.write_u32(36, LAPIC_START as u32);
    // PCAT_COMPAT: the in-kernel 8259 pair exists and must be masked by the guest.
    table.write_u32(40, 1);
    for id in 0..vcpus {
        // Processor local APIC: type 0, length 8, uid, APIC id, flags (enabled).
        table.append_slice(&[0, 8, id, id]);
        table.append_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    table.append_slice(&[1, 12, vcpus, 0]);
    table.append_slice(&(IOAPIC_START as u32).to_le_bytes());
    table.append_slice(&0u32.to_le_bytes());
    // Local APIC NMI on LINT1 for all processors: type 4, length 6, uid 0xff, flags, LINT#.
    table.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    table.update_checksum();
    table.as_slice().to_vec()
}

fn mcfg() -> Vec<u8> {
    let mut table = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.add_ecam(PCI_ECAM_START, 0, 0, 0);
    to_bytes(&table)
}

/// Writes all tables into the BIOS area; returns the RSDP address.
pub fn create_acpi_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, AcpiError> {
    let align = |addr: u64| (addr + 7) & !7;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);

    // Tables after the XSDT, in the order they are placed; the XSDT has three entries.
    let after_xsdt = align(xsdt_addr + 36 + 3 * 8);
    let dsdt_bytes = dsdt();
    let dsdt_addr = after_xsdt;
    let fadt_addr = align(dsdt_addr + dsdt_bytes.len() as u64);
    let fadt_bytes = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt_bytes.len() as u64);
    let madt_bytes = madt(vcpus);
    let mcfg_addr = align(madt_addr + madt_bytes.len() as u64);
    let mcfg_bytes = mcfg();
    let end = mcfg_addr + mcfg_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt_bytes = to_bytes(&xsdt);
    debug_assert_eq!(xsdt_addr + xsdt_bytes.len() as u64, xsdt_addr + 36 + 24);

    mem.write_slice(
        &to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(rsdp_addr),
    )?;
    mem.write_slice(&xsdt_bytes, GuestAddress(xsdt_addr))?;
    mem.write_slice(&dsdt_bytes, GuestAddress(dsdt_addr))?;
    mem.write_slice(&fadt_bytes, GuestAddress(fadt_addr))?;
    mem.write_slice(&madt_bytes, GuestAddress(madt_addr))?;
    mem.write_slice(&mcfg_bytes, GuestAddress(mcfg_addr))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)) == 0
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut bytes = vec![0u8; len as usize];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(128 << 20)).unwrap();
        let rsdp = create_acpi_tables(&mem, 2).unwrap();
        let mut rsdp_bytes = [0u8; 36];
        mem.read_slice(&mut rsdp_bytes, GuestAddress(rsdp)).unwrap();
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp_bytes[..20]) && checksum_ok(&rsdp_bytes));
        let xsdt_addr = u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap());
        let xsdt = read_table(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let mut signatures = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let addr = u64::from_le_bytes(entry.try_into().unwrap());
            let table = read_table(&mem, addr);
            assert!(checksum_ok(&table), "bad checksum in {:?}", &table[..4]);
            signatures.push(table[..4].to_vec());
            if &table[..4] == b"FACP" {
                let dsdt_addr = u64::from_le_bytes(table[140..148].try_into().unwrap());
                let dsdt = read_table(&mem, dsdt_addr);
                assert_eq!(&dsdt[..4], b"DSDT");
                assert!(checksum_ok(&dsdt));
                // Hardware-reduced flag (bit 20) and the sleep control register at 0x600.
                let flags = u32::from_le_bytes(table[112..116].try_into().unwrap());
                assert_ne!(flags & (1 << 20), 0);
                // Century byte index, and IAPC_BOOT_ARCH without "no CMOS RTC" (bit 5).
                assert_eq!(table[108], cmos::CENTURY);
                assert_eq!(u16::from_le_bytes([table[109], table[110]]) & (1 << 5), 0);
                assert_eq!(
                    u64::from_le_bytes(table[248..256].try_into().unwrap()),
                    0x600
                );
            }
            if &table[..4] == b"APIC" {
                // Two processor entries with APIC ids 0 and 1.
                assert_eq!(&table[44..48], &[0, 8, 0, 0]);
                assert_eq!(&table[52..56], &[0, 8, 1, 1]);
            }
        }
        assert_eq!(
            signatures,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
    }

    #[test]
    fn dsdt_names_the_pci_root_bridge_pvpanic_and_s5() {
        let aml = dsdt_aml();
        let contains = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"PCI0"));
        assert!(contains(b"QEMU0001"));
        assert!(contains(b"_S5_"));
        // PNP0B00 as a compressed EISA id, then the RTC's I/O range at 0x70.
        assert!(contains(b"RTC_"));
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
        assert!(contains(&[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]));
        assert!(contains(b"_CRS"));
    }
}
