//! The control API end to end: the real stratus-vmm binary runs a tiny guest on /dev/kvm
//! and is driven over its Unix socket with hand-written HTTP/1.1 requests.
//!
//! The binary only boots kernels, so the guest is a minimal ELF "vmlinux" written here: one
//! PT_LOAD segment at 1 MiB and no PVH note, so the VMM enters it in 64-bit mode like any
//! vmlinux without one.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const LOAD_ADDR: u64 = 0x10_0000;
/// Generous: ring-0 guest code is emulated on a PVM host, and CI machines are slow.
const DEADLINE: Duration = Duration::from_secs(60);

/// Long-mode code: print `up\n` on COM1, then either halt forever (the in-kernel LAPIC
/// keeps HLT inside KVM, so the guest stays running without spinning) or power off.
fn guest_code(power_off: bool) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"up\n" {
        code.extend([0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    if power_off {
        // ACPI S5 through the sleep control register: mov dx, 0x600; mov al, 0x34; out
        code.extend([0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee]);
    }
    code.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp back to hlt
    code
}

/// An ELF64 executable holding `code` at `LOAD_ADDR`, entry at its first byte.
fn tiny_vmlinux(code: &[u8]) -> Vec<u8> {
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

/// A running stratus-vmm; killed if the test ends early.
struct Vmm {
    child: Option<Child>,
    socket: PathBuf,
    console: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, power_off: bool, extra: &[&str]) -> Vmm {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, tiny_vmlinux(&guest_code(power_off))).unwrap();
        let socket = dir.join("api.sock");
        let console = dir.join("console.log");
        let child = Command::new(env!("CARGO_BIN_EXE_stratus-vmm"))
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory", "64"])
            .arg("--console")
            .arg(&console)
            .arg("--api-socket")
            .arg(&socket)
            .args(extra)
            .env("STRATUS_LOG", "stratus_vmm=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run stratus-vmm");
        Vmm {
            child: Some(child),
            socket,
            console,
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    /// Polls until `ready` holds; fails if the VMM exits first or the deadline passes.
    fn wait_for(&mut self, what: &str, mut ready: impl FnMut(&Vmm) -> bool) {
        let start = Instant::now();
        while !ready(self) {
            if let Some(status) = self.child().try_wait().unwrap() {
                panic!("stratus-vmm exited ({status}) before {what}");
            }
            assert!(start.elapsed() < DEADLINE, "no {what} within {DEADLINE:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the API answers and the guest has printed, so the VM really runs.
    fn wait_until_running(&mut self) {
        self.wait_for("API socket", |v| UnixStream::connect(&v.socket).is_ok());
        self.wait_for("guest output", |v| {
            std::fs::read(&v.console).is_ok_and(|c| c == b"up\n")
        });
    }

    /// Waits for the process to exit; returns its status code and standard error.
    fn wait_exit(&mut self) -> (i32, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child().try_wait().unwrap() {
                break status;
            }
            assert!(start.elapsed() < DEADLINE, "no exit within {DEADLINE:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        let mut pipe = self.child().stderr.take().unwrap();
        pipe.read_to_string(&mut stderr).unwrap();
        (status.code().unwrap_or(-1), stderr)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One request on its own connection; returns the status code and the JSON body.
fn http(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut stream = UnixStream::connect(socket).expect("connect to the API socket");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, json)
}

fn error_text(response: &Value) -> &str {
    response["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{response}"))
}

#[test]
fn the_api_reports_the_vm_changes_disk_limits_refuses_bad_requests_and_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // A socket file left by a VMM that was killed: replaced, not refused.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("api.sock")).unwrap());
    let disk_spec = format!("path={},bps=1048576", disk.display());
    let mut vmm = Vmm::start(dir.path(), false, &["--disk", &disk_spec]);
    vmm.wait_until_running();
    let socket = vmm.socket.clone();

    let (status, vm) = http(&socket, "GET", "/vm", None);
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["vcpus"], 1);
    assert_eq!(vm["memory_mib"], 64);
    assert_eq!(vm["kernel"], dir.path().join("vmlinux").to_str().unwrap());
    assert_eq!(vm["nets"], json!([]));
    assert_eq!(
        vm["disks"],
        json!([{
            "index": 0,
            "path": disk.to_str().unwrap(),
            "read_only": false,
            "rate_limit": {"bytes_per_sec": 1048576, "ops_per_sec": null}
        }])
    );

    // A second VMM for the same socket gives up; the first keeps it.
    let second = Command::new(env!("CARGO_BIN_EXE_stratus-vmm"))
        .args(["--kernel", "/nonexistent/vmlinux", "--api-socket"])
        .arg(&socket)
        .env("STRATUS_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("is in use by another process"), "{err}");
    assert_eq!(http(&socket, "GET", "/vm", None).0, 200);

    let (status, disk0) = http(
        &socket,
        "PATCH",
        "/vm/disks/0",
        Some(&json!({"rate_limit": {"ops_per_sec": 200}})),
    );
    assert_eq!(status, 200, "{disk0}");
    assert_eq!(
        disk0["rate_limit"],
        json!({"bytes_per_sec": 1048576, "ops_per_sec": 200})
    );
    let (status, disk0) = http(
        &socket,
        "PATCH",
        "/vm/disks/0",
        Some(&json!({"rate_limit": {"bytes_per_sec": null}})),
    );
    assert_eq!(status, 200, "{disk0}");
    let (_, vm) = http(&socket, "GET", "/vm", None);
    assert_eq!(
        vm["disks"][0]["rate_limit"],
        json!({"bytes_per_sec": null, "ops_per_sec": 200}),
        "GET /vm shows the limits now in force"
    );

    let (status, e) = http(
        &socket,
        "PATCH",
        "/vm/disks/0",
        Some(&json!({"rate_limit": {"bytes_per_sec": 0}})),
    );
    assert_eq!(status, 400);
    assert!(error_text(&e).contains("positive number"), "{e}");
    let (status, e) = http(
        &socket,
        "PATCH",
        "/vm/disks/0",
        Some(&json!({"rate_limit": {"iops": 5}})),
    );
    assert_eq!(status, 400);
    assert!(error_text(&e).contains("unknown field `iops`"), "{e}");
    let (status, e) = http(
        &socket,
        "PATCH",
        "/vm/disks/1",
        Some(&json!({"rate_limit": {}})),
    );
    assert_eq!(status, 404);
    assert!(error_text(&e).contains("no disk 1"), "{e}");
    let (status, e) = http(
        &socket,
        "PATCH",
        "/vm/nets/0",
        Some(&json!({"rate_limit": {}})),
    );
    assert_eq!(status, 404);
    assert!(error_text(&e).contains("this VM has no nets"), "{e}");
    let (status, e) = http(&socket, "GET", "/v1/vm", None);
    assert_eq!(status, 404);
    assert!(error_text(&e).contains("no endpoint GET /v1/vm"), "{e}");
    let (status, e) = http(&socket, "POST", "/vm/actions", None);
    assert_eq!(status, 405);
    assert!(error_text(&e).contains("POST is not allowed"), "{e}");
    let (status, e) = http(
        &socket,
        "PUT",
        "/vm/actions",
        Some(&json!({"action": "pause"})),
    );
    assert_eq!(status, 400);
    assert!(error_text(&e).contains("unknown variant `pause`"), "{e}");
    let (_, vm) = http(&socket, "GET", "/vm", None);
    assert_eq!(
        vm["disks"][0]["rate_limit"],
        json!({"bytes_per_sec": null, "ops_per_sec": 200}),
        "refused requests changed nothing"
    );

    let (status, vm) = http(
        &socket,
        "PUT",
        "/vm/actions",
        Some(&json!({"action": "stop"})),
    );
    assert_eq!(status, 202, "{vm}");
    assert_eq!(vm["state"], "stopping");
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, 6, "{stderr}");
    assert!(stderr.contains("VM stopped from outside"), "{stderr}");
    assert!(!socket.exists(), "the socket is removed on exit");
}

#[test]
fn a_guest_that_powers_off_by_itself_also_takes_the_socket_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(dir.path(), true, &[]);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("guest powered off"), "{stderr}");
    assert_eq!(std::fs::read(&vmm.console).unwrap(), b"up\n");
    assert!(!vmm.socket.exists());
}

#[test]
fn sigterm_stops_the_vm_in_order_like_an_api_stop() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let overlay = dir.path().join("vm.qcow2");
    stratus_vmm::devices::virtio::block::io::qcow2::create_overlay(
        &overlay,
        &base,
        stratus_vmm::devices::virtio::block::io::ImageFormat::Raw,
    )
    .unwrap();
    let disk = format!("path={},format=qcow2", overlay.display());
    let mut vmm = Vmm::start(dir.path(), false, &["--disk", &disk]);
    vmm.wait_until_running();
    let pid = vmm.child().id() as libc::pid_t;
    // SAFETY: signals our own child process, which is still running (not yet reaped).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, 6, "{stderr}");
    assert!(stderr.contains("signal 15 received"), "{stderr}");
    // The devices were taken down, not abandoned: the qcow2 image was flushed and closed.
    assert!(
        stderr.contains(&format!("qcow2 image {} closed", overlay.display())),
        "{stderr}"
    );
    assert!(!vmm.socket.exists(), "the socket is removed on exit");
}
