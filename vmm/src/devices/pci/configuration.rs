//! Type 0 configuration space (4 KiB, so ECAM sees the extended space), BARs and
//! capabilities. Writes only change bits a device declared writable.

pub const CONFIG_SPACE_SIZE: usize = 4096;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
pub const NUM_BARS: usize = 6;

const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAPABILITY_LIST_REG: usize = 13;
const INTERRUPT_LINE_REG: usize = 15;
const FIRST_CAPABILITY_OFFSET: usize = 0x40;
/// Standard (non-extended) capabilities live below this offset.
const CAPABILITY_SPACE_END: usize = 0x100;

pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES_LIST: u32 = 1 << 4;

/// Identity of a function, written once at creation.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Class, subclass, programming interface.
    pub class_code: (u8, u8, u8),
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigurationError {
    #[error("BAR {0} is already in use or out of range")]
    BarInUse(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes, or exceeds 2 GiB")]
    BarSize(u64),
    #[error("BAR address {addr:#x} is not aligned to its size {size:#x}")]
    BarAlignment { addr: u64, size: u64 },
    #[error("no room left for a {0}-byte capability")]
    CapabilitySpaceFull(usize),
}

#[derive(Clone, Copy, Debug, Default)]
struct Bar {
    size: u64,
}

pub struct PciConfiguration {
    registers: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: [Bar; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    pub fn new(header: PciHeader) -> Self {
        let mut registers = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        registers[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        // A firmware would have enabled decoding; stock kernels keep what they find.
        registers[COMMAND_REG] = u32::from(COMMAND_MEMORY_SPACE);
        writable[COMMAND_REG] = u32::from(
            COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
        );
        let (class, subclass, prog_if) = header.class_code;
        registers[2] = u32::from(class) << 24
            | u32::from(subclass) << 16
            | u32::from(prog_if) << 8
            | u32::from(header.revision);
        registers[11] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        // Interrupt line is scratch space for the OS; pin stays 0 (no INTx, MSI-X only).
        writable[INTERRUPT_LINE_REG] = 0xff;
        PciConfiguration {
            registers,
            writable,
            bars: [Bar::default(); NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY_OFFSET,
        }
    }

    pub fn read_reg(&self, reg: usize) -> u32 {
        self.registers.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` inside register `reg`.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg >= NUM_REGS || offset as usize + data.len() > 4 {
            return;
        }
        let shift = offset * 8;
        let (value, mask) = match data.len() {
            1 => (u32::from(data[0]), 0xffu32),
            2 => (u32::from(u16::from_le_bytes([data[0], data[1]])), 0xffff),
            4 => (
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                0xffff_ffff,
            ),
            _ => return,
        };
        let mask = (mask << shift) & self.writable[reg];
        self.registers[reg] = (self.registers[reg] & !mask) | ((value << shift) & mask);
    }

    pub fn command(&self) -> u16 {
        self.registers[COMMAND_REG] as u16
    }

    pub fn memory_decoding(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    /// Declares a 32-bit non-prefetchable memory BAR at `addr`.
    pub fn add_memory_bar(
        &mut self,
        bar: usize,
        addr: u64,
        size: u64,
    ) -> Result<(), ConfigurationError> {
        if bar >= NUM_BARS || self.bars[bar].size != 0 {
            return Err(ConfigurationError::BarInUse(bar));
        }
        if !size.is_power_of_two() || !(16..=1 << 31).contains(&size) {
            return Err(ConfigurationError::BarSize(size));
        }
        if !addr.is_multiple_of(size) || addr + size > 1 << 32 {
            return Err(ConfigurationError::BarAlignment { addr, size });
        }
        self.bars[bar].size = size;
        self.registers[BAR0_REG + bar] = addr as u32;
        // Sizing works by itself: writing all ones reads back as the size mask.
        self.writable[BAR0_REG + bar] = !(size as u32 - 1);
        Ok(())
    }

    pub fn bar_size(&self, bar: usize) -> u64 {
        self.bars.get(bar).map_or(0, |b| b.size)
    }

    pub fn bar_address(&self, bar: usize) -> Option<u64> {
        let b = self.bars.get(bar)?;
        (b.size != 0).then(|| u64::from(self.registers[BAR0_REG + bar] & !0xf))
    }

    /// Where the BAR is decoded right now: only while memory decoding is on.
    pub fn bar_mapping(&self, bar: usize) -> Option<u64> {
        if self.memory_decoding() {
            self.bar_address(bar)
        } else {
            None
        }
    }

    /// Appends a capability (`body` starts after the ID and next-pointer bytes); `writable`
    /// is a byte mask over the whole capability, including those two bytes.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigurationError> {
        let len = body.len() + 2;
        let offset = self.next_capability;
        if offset + len > CAPABILITY_SPACE_END {
            return Err(ConfigurationError::CapabilitySpaceFull(len));
        }
        let mut bytes = vec![id, 0];
        bytes.extend_from_slice(body);
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(offset + i, *b);
            if writable.get(i).copied().unwrap_or(0) != 0 {
                let reg = (offset + i) / 4;
                self.writable[reg] |= u32::from(writable[i]) << (((offset + i) % 4) * 8);
            }
        }
        match self.last_capability {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.registers[CAPABILITY_LIST_REG] = offset as u32;
                self.registers[COMMAND_REG] |= STATUS_CAPABILITIES_LIST << 16;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + len + 3) & !3;
        Ok(offset)
    }

    pub fn byte(&self, offset: usize) -> u8 {
        (self.registers[offset / 4] >> ((offset % 4) * 8)) as u8
    }

    pub fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.registers[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: (0x01, 0x80, 0x00),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    #[test]
    fn identity_registers_are_read_only() {
        let mut cfg = PciConfiguration::new(header());
        assert_eq!(cfg.read_reg(0), 0x1042_1af4);
        cfg.write_reg(0, 0, &[0, 0, 0, 0]);
        assert_eq!(cfg.read_reg(0), 0x1042_1af4);
        assert_eq!(cfg.read_reg(2) >> 8, 0x01_8000);
        assert_eq!(cfg.read_reg(11), 0x0040_1af4);
    }

    #[test]
    fn bar_sizing_returns_the_size_mask_and_the_address_can_move() {
        let mut cfg = PciConfiguration::new(header());
        cfg.add_memory_bar(0, 0xc000_0000, 0x8000).unwrap();
        assert_eq!(cfg.bar_mapping(0), Some(0xc000_0000));
        cfg.write_reg(BAR0_REG, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(cfg.read_reg(BAR0_REG), 0xffff_8000);
        cfg.write_reg(BAR0_REG, 0, &0xc001_0000u32.to_le_bytes());
        assert_eq!(cfg.bar_address(0), Some(0xc001_0000));
        // Turning memory decoding off unmaps the BAR.
        cfg.write_reg(COMMAND_REG, 0, &[0, 0]);
        assert_eq!(cfg.bar_mapping(0), None);
        // Unused BARs stay zero whatever is written.
        cfg.write_reg(BAR0_REG + 1, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(cfg.read_reg(BAR0_REG + 1), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut cfg = PciConfiguration::new(header());
        assert_eq!(
            cfg.add_memory_bar(0, 0xc000_0000, 0x3000),
            Err(ConfigurationError::BarSize(0x3000))
        );
        assert!(matches!(
            cfg.add_memory_bar(0, 0xc000_1000, 0x8000),
            Err(ConfigurationError::BarAlignment { .. })
        ));
        cfg.add_memory_bar(0, 0xc000_0000, 0x8000).unwrap();
        assert_eq!(
            cfg.add_memory_bar(0, 0xc001_0000, 0x8000),
            Err(ConfigurationError::BarInUse(0))
        );
        assert_eq!(
            cfg.add_memory_bar(6, 0xc001_0000, 0x8000),
            Err(ConfigurationError::BarInUse(6))
        );
    }

    #[test]
    fn capabilities_form_a_linked_list_with_status_bit() {
        let mut cfg = PciConfiguration::new(header());
        let first = cfg.add_capability(0x11, &[0; 10], &[]).unwrap();
        let second = cfg
            .add_capability(0x09, &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .unwrap();
        assert_eq!(cfg.read_reg(CAPABILITY_LIST_REG) & 0xff, first as u32);
        assert_ne!(
            cfg.read_reg(COMMAND_REG) & (STATUS_CAPABILITIES_LIST << 16),
            0
        );
        assert_eq!(cfg.byte(first), 0x11);
        assert_eq!(cfg.byte(first + 1) as usize, second);
        assert_eq!(cfg.byte(second), 0x09);
        assert_eq!(cfg.byte(second + 1), 0);
        assert_eq!(second % 4, 0);
    }

    #[test]
    fn capability_writable_mask_limits_writes() {
        let mut cfg = PciConfiguration::new(header());
        let off = cfg
            .add_capability(0x11, &[0x07, 0x00], &[0, 0, 0, 0xc0])
            .unwrap();
        cfg.write_reg(off / 4, 2, &[0xff, 0xff]);
        assert_eq!(cfg.byte(off + 2), 0x07);
        assert_eq!(cfg.byte(off + 3), 0xc0);
    }
}
