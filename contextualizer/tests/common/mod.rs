//! Helpers shared by the integration tests. The external tools are required:
//! a missing tool fails the test (CI installs them from
//! scripts/test-packages.txt).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use stratus_contextualizer::{Context, ContextMethod};

/// Debian package that provides each tool, for the failure message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "xorriso" => "xorriso",
        "isoinfo" => "genisoimage",
        "mdir" | "mtype" | "mcopy" | "mlabel" => "mtools",
        "fsck.fat" => "dosfstools",
        "blkid" => "util-linux",
        "file" => "file",
        "bash" => "bash",
        "dash" => "dash",
        "python3" => "python3",
        "/usr/bin/python3" | "cloud-init" => "cloud-init",
        _ => "(see scripts/test-packages.txt)",
    }
}

/// Runs `tool args…`, failing the test when the tool is missing.
pub fn run(tool: &str, args: &[&str]) -> Output {
    run_env(tool, args, &[])
}

pub fn run_env(tool: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(tool);
    cmd.args(args).env("MTOOLS_SKIP_CHECK", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run `{tool}` ({e}); install Debian package `{}`",
            package_of(tool)
        ),
    }
}

/// Like `run`, and also fails the test on a non-zero exit.
pub fn ok(tool: &str, args: &[&str]) -> String {
    ok_env(tool, args, &[])
}

pub fn ok_env(tool: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_env(tool, args, env);
    assert!(
        out.status.success(),
        "`{tool} {}` failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}

pub fn ok_bytes(tool: &str, args: &[&str]) -> Vec<u8> {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "`{tool} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Writes the disk for `ctx` into `dir/name` and returns its path.
pub fn write_disk(dir: &Path, name: &str, ctx: &Context, method: ContextMethod) -> PathBuf {
    let path = dir.join(name);
    stratus_contextualizer::write_context_disk(ctx, method, &path).expect("context disk written");
    path
}

/// Extracts a whole ISO with its Rock Ridge names and modes.
pub fn extract_iso(iso: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    ok(
        "xorriso",
        &["-osirrox", "on", "-indev", s(iso), "-extract", "/", s(into)],
    );
}

/// `blkid -p -o export` as key/value pairs.
pub fn blkid(image: &Path) -> Vec<(String, String)> {
    ok("blkid", &["-p", "-o", "export", s(image)])
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("\\ ", " ")))
        .collect()
}

pub fn blkid_value(image: &Path, key: &str) -> Option<String> {
    blkid(image)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

pub const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ9xPrHx6b3Kq alice@example.org";
pub const KEY2: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 bob@example.org";
