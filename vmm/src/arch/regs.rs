//! Initial vCPU state: segments, page tables, control registers, MSRs, FPU and LAPIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_GDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START};
use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot structures into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the vCPU {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Which mode the boot vCPU starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with the first GiB identity mapped (Linux 64-bit boot protocol).
    Long64,
    /// 32-bit protected mode, paging off (PVH).
    Protected32,
    /// Real mode at CS:IP = 0:entry (test guests).
    Real,
}

/// Packs a GDT entry from flags, base and limit (the layout the CPU expects).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    if granularity == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: (table_index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    Ok(())
}

/// Identity-maps the low 4 GiB with 2 MiB pages: the kernel, its boot data and the 32-bit
/// MMIO hole (ECAM, BARs) are all reachable before the kernel builds its own tables.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    for gib in 0..4u64 {
        let directory = PDE_START + gib * 0x1000;
        mem.write_obj(directory | 0x03, GuestAddress(PDPTE_START + gib * 8))?;
        for i in 0..512u64 {
            let frame = (gib << 30) | (i << 21);
            mem.write_obj(frame | 0x83, GuestAddress(directory + i * 8))?;
        }
    }
    Ok(())
}

/// Sets segments and control registers for `mode`; writes the GDT (and page tables for
/// long mode) into guest memory.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("special registers"))?;
    match mode {
        EntryMode::Real => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        EntryMode::Long64 | EntryMode::Protected32 => {
            let code_flags = if mode == EntryMode::Long64 {
                0xa09b
            } else {
                0xc09b
            };
            let gdt = [
                gdt_entry(0, 0, 0),
                gdt_entry(code_flags, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x808b, 0, 0xfffff),
            ];
            write_gdt(mem, &gdt)?;
            let code = segment_from_gdt(gdt[1], 1);
            let data = segment_from_gdt(gdt[2], 2);
            let tss = segment_from_gdt(gdt[3], 3);
            sregs.gdt.base = BOOT_GDT_START;
            sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = tss;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE;
            sregs.cr4 = 0;
            sregs.efer = 0;
            if mode == EntryMode::Long64 {
                write_identity_page_tables(mem)?;
                sregs.cr3 = PML4_START;
                sregs.cr4 |= X86_CR4_PAE;
                sregs.cr0 |= X86_CR0_PG;
                sregs.efer |= EFER_LME | EFER_LMA;
            }
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("special registers"))
}

/// General registers at entry. `boot_info` is the zero page (RSI) or PVH start info (RBX).
pub fn setup_regs(
    vcpu: &VcpuFd,
    mode: EntryMode,
    entry: u64,
    boot_info: u64,
) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Long64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info;
        }
        EntryMode::Protected32 => regs.rbx = boot_info,
        EntryMode::Real => {}
    }
    vcpu.set_regs(&regs).map_err(kvm_err("general registers"))
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("FPU state"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Architectural reset values the kernel expects to find (it does not clear them itself).
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Kvm {
        what: "MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err("MSRs"))?;
    if written != entries.len() {
        return Err(RegsError::Kvm {
            what: "MSRs (not all accepted)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT and LINT1 as NMI: the virtual-wire setup a PC firmware leaves behind.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("local APIC"))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(kvm_err("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.l, 1);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.present, 1);
        assert_eq!(code.type_, 0xb);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.l, 0);
        assert_eq!(data.selector, 16);
        // The GDT words the PVM findings list for a working long-mode guest.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn delivery_mode_replaces_only_mode_bits() {
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        assert_eq!(with_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }
}
