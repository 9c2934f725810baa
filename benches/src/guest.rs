//! A minimal ELF64 "kernel" with a Xen PVH entry note, so that stratus-vmm and QEMU boot
//! exactly the same guest: it prints one byte on COM1, then asks to power off through
//! stratus-vmm's ACPI sleep register and through QEMU's isa-debug-exit port, then halts.

/// Where the code is loaded and entered (32-bit protected mode, paging off).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// The byte the guest prints first: its arrival marks the first guest instructions.
pub const READY_BYTE: u8 = b'S';
/// QEMU's isa-debug-exit port used by the benchmark (`-device isa-debug-exit,iobase=0xf4`).
pub const QEMU_EXIT_PORT: u16 = 0xf4;

fn out_byte(code: &mut Vec<u8>, port: u16, value: u8) {
    let [lo, hi] = port.to_le_bytes();
    code.extend([0x66, 0xba, lo, hi]); // mov dx, port
    code.extend([0xb0, value]); // mov al, value
    code.push(0xee); // out dx, al
}

/// The guest's code. With `power_off == false` it halts after printing (memory benchmark).
pub fn guest_code(power_off: bool) -> Vec<u8> {
    let mut code = vec![0xfa]; // cli: nothing may wake the final hlt
    out_byte(&mut code, 0x3f8, READY_BYTE);
    if power_off {
        out_byte(&mut code, 0x600, 0x34); // ACPI S5 (stratus-vmm)
        out_byte(&mut code, QEMU_EXIT_PORT, 0); // isa-debug-exit (QEMU)
    }
    code.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp back to hlt
    code
}

/// Wraps `code` in an ELF64 executable with one PT_LOAD and a PT_NOTE carrying
/// XEN_ELFNOTE_PHYS32_ENTRY.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const CODE_OFFSET: usize = 0x1000;
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend(4u32.to_le_bytes()); // descsz (32-bit entry)
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend((LOAD_ADDR as u32).to_le_bytes());
    let note_offset = EHDR + 2 * PHDR;

    let mut elf = Vec::with_capacity(CODE_OFFSET + code.len());
    elf.extend(b"\x7fELF");
    elf.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, System V
    elf.extend([0u8; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(62u16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend(LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend((EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    elf.extend((EHDR as u16).to_le_bytes());
    elf.extend((PHDR as u16).to_le_bytes());
    elf.extend(2u16.to_le_bytes()); // e_phnum
    elf.extend(64u16.to_le_bytes()); // e_shentsize
    elf.extend(0u16.to_le_bytes()); // e_shnum
    elf.extend(0u16.to_le_bytes()); // e_shstrndx

    let phdr = |elf: &mut Vec<u8>,
                p_type: u32,
                flags: u32,
                offset: u64,
                addr: u64,
                size: u64,
                align: u64| {
        elf.extend(p_type.to_le_bytes());
        elf.extend(flags.to_le_bytes());
        elf.extend(offset.to_le_bytes());
        elf.extend(addr.to_le_bytes()); // p_vaddr
        elf.extend(addr.to_le_bytes()); // p_paddr
        elf.extend(size.to_le_bytes()); // p_filesz
        elf.extend(size.to_le_bytes()); // p_memsz
        elf.extend(align.to_le_bytes());
    };
    phdr(
        &mut elf,
        1,
        5,
        CODE_OFFSET as u64,
        LOAD_ADDR,
        code.len() as u64,
        0x1000,
    );
    phdr(&mut elf, 4, 4, note_offset as u64, 0, note.len() as u64, 4);
    elf.extend(&note);
    elf.resize(CODE_OFFSET, 0);
    elf.extend(code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_has_a_load_segment_at_the_entry_and_a_pvh_note() {
        let elf = pvh_elf(&guest_code(true));
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(
            u64::from_le_bytes(elf[24..32].try_into().unwrap()),
            LOAD_ADDR
        );
        let note = &elf[64 + 2 * 56..];
        assert_eq!(&note[12..16], b"Xen\0");
        assert_eq!(
            u32::from_le_bytes(note[16..20].try_into().unwrap()),
            LOAD_ADDR as u32
        );
        assert_eq!(elf[0x1000], 0xfa);
    }
}
