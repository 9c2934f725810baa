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
    /// Drives every virtio-blk device like a driver (polled) and prints, per disk, its
    /// serial with the first 32 bytes of sector 0, then writes a stamp of its own there
    /// and prints it as read back (`test_guest/disk_stamp.c` says the lines); does the
    /// same for hot-plugged disks, ejects what it is asked to, powers off on the button.
    /// Built from C with the host's `cc` when first asked for.
    DiskStamp,
}

pub const ROUNDS_PER_DOT: u32 = 4000;

/// Long-mode code for `guest`.
pub fn guest_code(guest: Guest) -> Vec<u8> {
    if guest == Guest::DiskStamp {
        return disk_stamp_code().to_vec();
    }
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
        Guest::DiskStamp => unreachable!("compiled above"),
    }
    code
}

/// Where [`tiny_vmlinux`] puts the code: right after its ELF and program headers.
const CODE_ADDR: u64 = LOAD_ADDR + 64 + 56;
/// Where the compiled program is linked: the code address rounded up to the alignment the
/// compiler gives `.text`; NOPs fill the gap, so the entry is still the first byte.
const LINK_ADDR: u64 = CODE_ADDR.next_multiple_of(16);

/// The disk-stamp guest, compiled once per process: freestanding C, linked to run at
/// `LINK_ADDR`, flattened to bytes whose first one is the entry.
fn disk_stamp_code() -> &'static [u8] {
    static CODE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "stratus-disk-stamp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the guest's build");
        let source = dir.join("disk_stamp.c");
        std::fs::write(&source, include_str!("test_guest/disk_stamp.c")).unwrap();
        let script = dir.join("guest.ld");
        std::fs::write(
            &script,
            format!(
                "ENTRY(entry)\nSECTIONS {{\n  . = {LINK_ADDR:#x};\n  .text : {{ *(.text.entry) \
                 *(.text .text.*) }}\n  .rodata : {{ *(.rodata .rodata.*) }}\n  .data : {{ \
                 *(.data .data.*) *(.bss .bss.* COMMON) }}\n  /DISCARD/ : {{ *(.note*) \
                 *(.comment) *(.eh_frame*) }}\n}}\n"
            ),
        )
        .unwrap();
        let elf = dir.join("disk_stamp.elf");
        let run = |command: &mut std::process::Command| {
            let out = command
                .output()
                .expect("cc and objcopy (gcc, binutils) build test guests");
            assert!(
                out.status.success(),
                "{command:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(std::process::Command::new("cc")
            .args([
                "-ffreestanding",
                "-fno-builtin",
                "-nostdlib",
                "-static",
                "-fno-pic",
                "-fno-pie",
                "-no-pie",
                "-O2",
                "-mno-red-zone",
                "-mgeneral-regs-only",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-Wall",
                "-Werror",
                "-Wl,--build-id=none",
                "-T",
            ])
            .arg(&script)
            .arg("-o")
            .arg(&elf)
            .arg(&source));
        let flat = dir.join("disk_stamp.bin");
        run(std::process::Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(&elf)
            .arg(&flat));
        let mut code = vec![0x90; (LINK_ADDR - CODE_ADDR) as usize]; // nop
        code.extend(std::fs::read(&flat).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        code
    })
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
