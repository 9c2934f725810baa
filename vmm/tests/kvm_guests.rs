//! Tiny guests on /dev/kvm: real mode and long mode, port I/O, MMIO through ECAM, serial
//! output, boot milestones and every way a guest can stop. On a PVM host ring-0 guest code
//! is emulated, so these guests avoid int3, cmpxchg16b and xsave.

mod common;

use common::run_guest;
use stratus_vmm::arch::regs::EntryMode;
use stratus_vmm::devices::virtio::block::BlockConfig;
use stratus_vmm::ExitReason;

const REAL_MODE_LOAD: u64 = 0x1000;
const LONG_MODE_LOAD: u64 = 0x10_0000;

/// mov dx, port
fn mov_dx(port: u16) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    vec![0x66, 0xba, lo, hi]
}

/// Real mode has no operand-size prefix for 16-bit moves.
fn mov_dx_real(port: u16) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    vec![0xba, lo, hi]
}

const OUT_DX_AL: u8 = 0xee;
const HLT_LOOP: [u8; 3] = [0xf4, 0xeb, 0xfd];

fn mov_al(value: u8) -> Vec<u8> {
    vec![0xb0, value]
}

/// ACPI S5: sleep type 5 with SLP_EN written to the sleep control register.
fn acpi_poweroff(long_mode: bool) -> Vec<u8> {
    let mut code = if long_mode {
        mov_dx(0x600)
    } else {
        mov_dx_real(0x600)
    };
    code.extend(mov_al(0x34));
    code.push(OUT_DX_AL);
    code.extend(HLT_LOOP);
    code
}

#[test]
fn real_mode_guest_prints_records_a_milestone_and_powers_off() {
    let mut code = mov_dx_real(0x3f8);
    for b in b"real\n" {
        code.extend(mov_al(*b));
        code.push(OUT_DX_AL);
    }
    // out 0x80, al: boot milestone 0x42.
    code.extend(mov_al(0x42));
    code.extend([0xe6, 0x80]);
    code.extend(acpi_poweroff(false));
    let run = run_guest(&code, REAL_MODE_LOAD, EntryMode::Real, vec![]);
    assert_eq!(run.reason, ExitReason::PowerOff);
    assert_eq!(run.reason.exit_code(), 0);
    assert_eq!(run.console, b"real\n");
    assert_eq!(
        run.milestones.iter().map(|m| m.code).collect::<Vec<_>>(),
        vec![0x42]
    );
}

#[test]
fn real_mode_guest_resets_through_the_keyboard_controller() {
    // mov al, 0xfe; out 0x64, al
    let mut code = mov_al(0xfe);
    code.extend([0xe6, 0x64]);
    code.extend(HLT_LOOP);
    let run = run_guest(&code, REAL_MODE_LOAD, EntryMode::Real, vec![]);
    assert_eq!(run.reason, ExitReason::Reset);
}

#[test]
fn long_mode_guest_reads_and_sizes_a_pci_bar_through_ecam() {
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let mut code = mov_dx(0x3f8);
    code.extend(mov_al(b'L'));
    code.push(OUT_DX_AL);
    // mov rbx, 0xE0008000 (ECAM, device 00:01.0, register 0); mov eax, [rbx]
    code.extend([0x48, 0xbb, 0x00, 0x80, 0x00, 0xe0, 0, 0, 0, 0]);
    code.extend([0x8b, 0x03]);
    // Print the four id bytes: out; then three times shr eax, 8; out.
    code.push(OUT_DX_AL);
    for _ in 0..3 {
        code.extend([0xc1, 0xe8, 0x08, OUT_DX_AL]);
    }
    // add rbx, 0x10 (BAR 0); mov dword [rbx], 0xffffffff; mov eax, [rbx]; shr eax, 8; out
    code.extend([0x48, 0x83, 0xc3, 0x10]);
    code.extend([0xc7, 0x03, 0xff, 0xff, 0xff, 0xff]);
    code.extend([0x8b, 0x03]);
    code.extend([0xc1, 0xe8, 0x08, OUT_DX_AL]);
    code.extend(acpi_poweroff(true));
    let run = run_guest(
        &code,
        LONG_MODE_LOAD,
        EntryMode::Long64,
        vec![BlockConfig::new(disk.path())],
    );
    assert_eq!(
        run.reason,
        ExitReason::PowerOff,
        "console: {:?}",
        run.console
    );
    // 'L', then vendor 0x1af4 / device 0x1042 (virtio-blk, modern), then the BAR size
    // mask byte 0x80 of 0xffff8000 (a 32 KiB BAR).
    assert_eq!(run.console, vec![b'L', 0xf4, 0x1a, 0x42, 0x10, 0x80]);
}

#[test]
fn long_mode_guest_reads_config_space_through_port_cf8() {
    let mut code = mov_dx(0xcf8);
    // mov eax, 0x80000000 (enable, bus 0, device 0, register 0); out dx, eax
    code.extend([0xb8, 0x00, 0x00, 0x00, 0x80, 0xef]);
    code.extend(mov_dx(0xcfc));
    // in eax, dx
    code.push(0xed);
    code.extend(mov_dx(0x3f8));
    code.push(OUT_DX_AL);
    code.extend([0xc1, 0xe8, 0x08, OUT_DX_AL]);
    code.extend(acpi_poweroff(true));
    let run = run_guest(&code, LONG_MODE_LOAD, EntryMode::Long64, vec![]);
    assert_eq!(run.reason, ExitReason::PowerOff);
    // Host bridge vendor 0x1b36.
    assert_eq!(run.console, vec![0x36, 0x1b]);
}

#[test]
fn pvpanic_write_ends_the_vm_as_a_guest_panic() {
    let mut code = mov_dx(0x505);
    code.extend(mov_al(1));
    code.push(OUT_DX_AL);
    code.extend(HLT_LOOP);
    let run = run_guest(&code, LONG_MODE_LOAD, EntryMode::Long64, vec![]);
    assert_eq!(run.reason, ExitReason::GuestPanic);
    assert_ne!(run.reason.exit_code(), 0);
}

#[test]
fn a_faulting_guest_without_an_idt_stops_with_a_non_zero_reason() {
    // mov rax, 0x8000000000000000 (non-canonical); mov [rax], al: #GP with no IDT.
    let mut code = vec![0x48, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0x80];
    code.extend([0x88, 0x00]);
    code.extend(HLT_LOOP);
    let run = run_guest(&code, LONG_MODE_LOAD, EntryMode::Long64, vec![]);
    assert!(
        matches!(
            run.reason,
            ExitReason::TripleFault { vcpu: 0 } | ExitReason::KvmError { vcpu: 0, .. }
        ),
        "unexpected stop: {:?}",
        run.reason
    );
    assert_ne!(run.reason.exit_code(), 0);
}
