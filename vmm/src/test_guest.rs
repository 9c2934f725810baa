//! Tiny guests for tests that run the real `stratus-vmm` binary on a `/dev/kvm` that cannot
//! boot stock kernels (this project's machines): a few bytes of long-mode code in a minimal
//! ELF "vmlinux" (one PT_LOAD segment at 1 MiB, no PVH note, so the VMM enters it in 64-bit
//! mode like any vmlinux without one). Used by the VMM's and the node agent's tests.

/// Where the code is loaded (and entered).
pub const LOAD_ADDR: u64 = 0x10_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// Prints `up` and halts for good (HLT stays inside KVM: no spinning).
    Halt,
    /// Prints `up` and powers off through ACPI S5.
    PowerOff,
    /// Prints `up` and resets through the i8042 (a guest reboot: exit status 7).
    Reboot,
    /// Prints `up`, then loops doing what a stock guest's ACPI drivers do: powers off when
    /// the Generic Event Device reports the power button, ejects every slot the hot-plug
    /// registers ask it to, and prints a `.` every few thousand rounds (so a paused guest
    /// is seen to stop).
    EventLoop,
}

pub const ROUNDS_PER_DOT: u32 = 4000;

/// Long-mode code for `guest`.
pub fn guest_code(guest: Guest) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"up\n" {
        code.extend([0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    match guest {
        Guest::Halt => code.extend([0xf4, 0xeb, 0xfd]), // hlt; jmp back to hlt
        Guest::PowerOff => {
            // ACPI S5 through the sleep control register: mov dx, 0x600; mov al, 0x34; out
            code.extend([0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd]);
        }
        Guest::Reboot => {
            // mov al, 0xfe; out 0x64, al (keyboard controller reset); then halt.
            code.extend([0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
        }
        Guest::EventLoop => {
            let n = ROUNDS_PER_DOT.to_le_bytes();
            let event_loop: Vec<u8> = [
                &[0xb9][..],
                &n,                        // 0: mov ecx, N
                &[0x66, 0xba, 0x10, 0x06], // 5: loop: mov dx, 0x610 (GED events)
                &[0xec],                   // 9: in al, dx
                &[0xa8, 0x02],             // 10: test al, power button
                &[0x75, 0x20],             // 12: jnz poweroff (46)
                &[0x66, 0xba, 0x24, 0x06], // 14: mov dx, 0x624 (PCID)
                &[0xed],                   // 18: in eax, dx
                &[0x85, 0xc0],             // 19: test eax, eax
                &[0x74, 0x05],             // 21: jz 28
                &[0x66, 0xba, 0x28, 0x06], // 23: mov dx, 0x628 (B0EJ)
                &[0xef],                   // 27: out dx, eax: eject them
                &[0xff, 0xc9],             // 28: dec ecx
                &[0x75, 0xe5],             // 30: jnz loop
                &[0xb9],
                &n,                        // 32: mov ecx, N
                &[0x66, 0xba, 0xf8, 0x03], // 37: mov dx, 0x3f8
                &[0xb0, b'.', 0xee],       // 41: mov al, '.'; out dx, al
                &[0xeb, 0xd7],             // 44: jmp loop
                &[0x66, 0xba, 0x00, 0x06], // 46: poweroff: mov dx, 0x600
                &[0xb0, 0x34, 0xee],       // 50: mov al, S5|SLP_EN; out dx, al
                &[0xf4, 0xeb, 0xfd],       // 53: hlt; jmp hlt
            ]
            .concat();
            assert_eq!(event_loop.len(), 56);
            code.extend(event_loop);
        }
    }
    code
}

/// An ELF64 executable holding `code` at `LOAD_ADDR`, entry at its first byte.
pub fn tiny_vmlinux(code: &[u8]) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let headers = EHDR + PHDR;
    let size = headers + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend(b"\x7fELF");
    elf.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, System V
    elf.extend([0; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend((LOAD_ADDR + headers).to_le_bytes()); // entry
    elf.extend(EHDR.to_le_bytes()); // program headers follow the ELF header
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes());
    elf.extend((EHDR as u16).to_le_bytes());
    elf.extend((PHDR as u16).to_le_bytes());
    elf.extend(1u16.to_le_bytes());
    elf.extend([0; 6]); // section header size, count, string index
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    elf.extend(0u64.to_le_bytes()); // from file offset 0 ...
    elf.extend(LOAD_ADDR.to_le_bytes()); // ... to 1 MiB (virtual and physical)
    elf.extend(LOAD_ADDR.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    assert_eq!(elf.len() as u64, headers);
    elf.extend(code);
    elf
}
