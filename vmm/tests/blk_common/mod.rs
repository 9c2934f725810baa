//! Helpers shared by the virtio-blk test files: descriptor chains, a deterministic random
//! source, and QEMU's image tools as the independent judge of qcow2 images.
#![allow(dead_code)]

#[path = "../support/binary.rs"]
pub mod binary;
pub mod guest;
#[path = "../support/virtq.rs"]
mod virtq;
pub use virtq::chain;

use std::ffi::OsStr;
use std::path::Path;

/// xorshift64*: deterministic and good enough to spread offsets and sizes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Runs a tool that must succeed; returns its standard output.
pub fn tool<S: AsRef<OsStr> + std::fmt::Debug>(program: &str, args: &[S]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` must find no corruption and no leaked clusters.
pub fn qemu_img_check(image: &Path) {
    tool(
        "qemu-img",
        &[
            OsStr::new("check"),
            "-f".as_ref(),
            "qcow2".as_ref(),
            image.as_os_str(),
        ],
    );
}

/// The qcow2 image passes `qemu-img check` and `qemu-img compare` finds it identical to
/// `expected` (written next to it as a raw file).
pub fn assert_qcow2_holds(image: &Path, expected: &[u8], scratch: &Path) {
    qemu_img_check(image);
    let raw = scratch.join("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    tool(
        "qemu-img",
        &[
            OsStr::new("compare"),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    );
}

/// Puts the calling thread under the virtio-blk queue worker's seccomp filter (kill).
pub fn confine_as_worker() {
    use stratus_vmm::seccomp::{self, Mode, ThreadKind};
    seccomp::set_mode(Mode::Kill);
    seccomp::confine(ThreadKind::BlockWorker).expect("seccomp filter");
}
