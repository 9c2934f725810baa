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
use crate::devices::legacy::{cmos, ged};
use crate::devices::pci::hotplug;
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

/// AML name of hot-pluggable slot `n` under `\_SB_.PCI0`.
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The PCI hot-plug part of `\_SB_.PCI0`: slots 1..=`last_slot` with `_ADR`, `_SUN` and
/// `_EJ0` (which writes the slot's bit to `B0EJ`), and `PCNT`, which the GED calls to
/// notify the slots in `PCIU` (device check: rescan) and `PCID` (eject request).
fn pci_hotplug_aml(last_slot: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    let port = u64::from(PCI_HOTPLUG_PORT);
    let len = hotplug::LEN;
    aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemIO, &port, &len)
        .to_aml_bytes(&mut bytes);
    aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    )
    .to_aml_bytes(&mut bytes);
    let b0ej = Path::new("B0EJ");
    for slot in 1..=last_slot {
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        let bit = 1u32 << slot;
        let store = aml::Store::new(&b0ej, &bit);
        aml::Device::new(
            slot_name(slot).as_str().into(),
            vec![
                &Name::new("_ADR".into(), &adr),
                &Name::new("_SUN".into(), &sun),
                &aml::Method::new("_EJ0".into(), 1, false, vec![&store]),
            ],
        )
        .to_aml_bytes(&mut bytes);
    }
    // DVNT(slots, type): Notify(Sxx, type) for every slot bit set in `slots`.
    let mut body = Vec::new();
    for slot in 1..=last_slot {
        let bit = 1u32 << slot;
        let target = Path::new(&slot_name(slot));
        let test = aml::And::new(&aml::ZERO, &aml::Arg(0), &bit);
        let notify = aml::Notify::new(&target, &aml::Arg(1));
        aml::If::new(&test, vec![&notify]).to_aml_bytes(&mut body);
    }
    let body = RawBytes(body);
    aml::Method::new("DVNT".into(), 2, false, vec![&body]).to_aml_bytes(&mut bytes);
    let device_check: u8 = 1;
    let eject_request: u8 = 3;
    let pciu = Path::new("PCIU");
    let pcid = Path::new("PCID");
    let up = aml::MethodCall::new("DVNT".into(), vec![&pciu, &device_check]);
    let down = aml::MethodCall::new("DVNT".into(), vec![&pcid, &eject_request]);
    aml::Method::new("PCNT".into(), 0, true, vec![&up, &down]).to_aml_bytes(&mut bytes);
    bytes
}

/// The Generic Event Device and the power button it notifies.
fn ged_aml() -> Vec<u8> {
    let mut bytes = Vec::new();
    let zero = aml::ZERO;
    let hid: aml::AmlStr = "ACPI0013";
    let port = u64::from(GED_PORT);
    let len = ged::LEN;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat = Path::new("GDAT");
    let local0 = aml::Local(0);
    let read = aml::Store::new(&local0, &gdat);
    let hotplug_bit = ged::EVENT_PCI_HOTPLUG;
    let button_bit = ged::EVENT_POWER_BUTTON;
    let is_hotplug = aml::And::new(&aml::ZERO, &local0, &hotplug_bit);
    let pcnt = aml::MethodCall::new(r"\_SB_.PCI0.PCNT".into(), vec![]);
    let on_hotplug = aml::If::new(&is_hotplug, vec![&pcnt]);
    let is_button = aml::And::new(&aml::ZERO, &local0, &button_bit);
    let pwrb = Path::new(r"\_SB_.PWRB");
    let pressed: u8 = 0x80;
    let notify = aml::Notify::new(&pwrb, &pressed);
    let on_button = aml::If::new(&is_button, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &on_hotplug, &on_button]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &zero),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, GED_IRQ,
                )]),
            ),
            &region,
            &field,
            &evt,
        ],
    )
    .to_aml_bytes(&mut bytes);
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &zero),
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

/// Already-serialised AML objects, spliced in where a builder wants one child.
struct RawBytes(Vec<u8>);

impl Aml for RawBytes {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The DSDT's AML: the PCI host bridge and its windows with hot-pluggable slots 1 to
/// `last_slot`, COM1, the CMOS RTC, pvpanic, the Generic Event Device with the power
/// button, and the S5 sleep state.
pub fn dsdt_aml(last_slot: u8) -> Vec<u8> {
    // The AML builders borrow their children, so each object is built and serialised in
    // one statement.
    let mut bytes = Vec::new();
    let zero = aml::ZERO;
    let hotplug = RawBytes(pci_hotplug_aml(last_slot));
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
            &hotplug,
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes.extend(ged_aml());
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

fn dsdt(last_slot: u8) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&dsdt_aml(last_slot));
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

/// Writes all tables into the BIOS area; returns the RSDP address. PCI slots 1 to
/// `last_slot` are described as hot-pluggable.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    last_slot: u8,
) -> Result<u64, AcpiError> {
    let align = |addr: u64| (addr + 7) & !7;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);

    // Tables after the XSDT, in the order they are placed; the XSDT has three entries.
    let after_xsdt = align(xsdt_addr + 36 + 3 * 8);
    let dsdt_bytes = dsdt(last_slot);
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
        let rsdp = create_acpi_tables(&mem, 2, 8).unwrap();
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
        let aml = dsdt_aml(8);
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

    /// ACPICA's disassembler reads the DSDT back; the devices and methods the guest
    /// relies on are in it.
    #[test]
    fn dsdt_disassembles_cleanly_with_iasl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsdt.dat");
        std::fs::write(&path, dsdt(12)).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .expect("run iasl (install acpica-tools)");
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "iasl -d failed: {log}");
        assert!(!log.contains("Error"), "{log}");
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        for needle in [
            "Device (_SB.PCI0)",
            "Name (_HID, EisaId (\"PNP0A08\")",
            "OperationRegion (PCST, SystemIO, 0x0620, 0x0C)",
            "PCIU,   32",
            "PCID,   32",
            "B0EJ,   32",
            "Device (S01)",
            "Device (S0C)",
            "Name (_ADR, 0x000C0000)",
            "Name (_SUN, 0x0C)",
            "Method (_EJ0, 1, NotSerialized)",
            "B0EJ = 0x1000",
            "Method (DVNT, 2, NotSerialized)",
            "Notify (S0C, Arg1)",
            "Method (PCNT, 0, Serialized)",
            "DVNT (PCIU, One)",
            "DVNT (PCID, 0x03)",
            "Device (_SB.GED)",
            "Name (_HID, \"ACPI0013\"",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n            {\n                0x00000005,",
            "OperationRegion (GDST, SystemIO, 0x0610, One)",
            "Method (_EVT, 1, Serialized)",
            "Local0 = GDAT",
            "\\_SB.PCI0.PCNT ()",
            "Notify (\\_SB.PWRB, 0x80)",
            "Device (_SB.PWRB)",
            "Name (_HID, EisaId (\"PNP0C0C\")",
            "Device (_SB.RTC)",
            "Name (_HID, EisaId (\"PNP0B00\")",
            "0x0070,             // Range Minimum",
            "0x00000008,",
            "Device (_SB.COM1)",
            "Name (_HID, \"QEMU0001\")",
            "Name (_S5, Package (0x04)",
        ] {
            assert!(dsl.contains(needle), "disassembly lacks {needle:?}:\n{dsl}");
        }
        assert!(
            !dsl.contains("Device (S0D)"),
            "slot 13 is not hot-pluggable here"
        );
    }
}
