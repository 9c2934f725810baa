//! Runs the real stratus-vmm binary, for tests of what it does with its command line.

/// Runs stratus-vmm with `args`; returns its exit code and standard error.
pub fn vmm(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stratus-vmm"))
        .args(args)
        .env("STRATUS_LOG", "off")
        .output()
        .expect("run stratus-vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
