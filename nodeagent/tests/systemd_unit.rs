//! The packaged systemd unit passes `systemd-analyze verify` (the machines here do not run
//! systemd, so it is checked, not started) and keeps the promises the agent relies on.

use std::process::Command;

const UNIT: &str = include_str!("../../packaging/stratus-nodeagent.service");

#[test]
fn the_unit_verifies_and_lets_vms_outlive_an_agent_restart() {
    for line in [
        "KillMode=process",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
    ] {
        assert!(UNIT.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("stratus-nodeagent.service");
    std::fs::write(
        &unit,
        UNIT.replace(
            "/usr/bin/stratus-nodeagent",
            env!("CARGO_BIN_EXE_stratus-nodeagent"),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze (install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("stratus-nodeagent.service"))
        .collect();
    assert!(complaints.is_empty(), "{stderr}");
}
