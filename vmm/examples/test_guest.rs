//! Writes one of the project's tiny test guests as a vmlinux the VMM boots:
//! `test_guest OUT halt|power-off|reboot|event-loop|disk-stamp`. Used by nested tests that need a VM
//! whose life they drive, not a Linux guest.

use stratus_vmm::test_guest::{guest_code, tiny_vmlinux, Guest};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, kind] = args.as_slice() else {
        anyhow::bail!("usage: test_guest OUT halt|power-off|reboot|event-loop|disk-stamp");
    };
    let guest = match kind.as_str() {
        "halt" => Guest::Halt,
        "power-off" => Guest::PowerOff,
        "reboot" => Guest::Reboot,
        "event-loop" => Guest::EventLoop,
        "disk-stamp" => Guest::DiskStamp,
        other => anyhow::bail!("unknown test guest '{other}'"),
    };
    std::fs::write(out, tiny_vmlinux(&guest_code(guest)))?;
    Ok(())
}
