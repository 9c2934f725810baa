//! The control API end to end: the real stratus-vmm binary runs a tiny guest on /dev/kvm
//! and is driven over its Unix socket with hand-written HTTP/1.1 requests.
//!
//! The binary only boots kernels, so the guest is a minimal ELF "vmlinux" written here: one
//! PT_LOAD segment at 1 MiB and no PVH note, so the VMM enters it in 64-bit mode like any
//! vmlinux without one.

use std::io::{BufRead, Read, Write};
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stratus_vmm::test_guest::{guest_code, tiny_vmlinux, Guest};
use stratus_vmm::test_mounts::own_file_in_own_mount_namespace;

/// Generous: ring-0 guest code is emulated on a PVM host, and CI machines are slow.
const DEADLINE: Duration = Duration::from_secs(60);

/// A running stratus-vmm; killed if the test ends early.
struct Vmm {
    child: Option<Child>,
    socket: PathBuf,
    console: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, guest: Guest, extra: &[&str]) -> Vmm {
        Self::start_with(dir, guest, extra, &[])
    }

    /// `wrapper` runs the VMM (e.g. `unshare --net` for a network namespace of its own).
    fn start_with(dir: &Path, guest: Guest, extra: &[&str], wrapper: &[&str]) -> Vmm {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, tiny_vmlinux(&guest_code(guest))).unwrap();
        let socket = dir.join("api.sock");
        let console = dir.join("console.log");
        let vmm = env!("CARGO_BIN_EXE_stratus-vmm");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(vmm);
                c
            }
            None => Command::new(vmm),
        };
        let child = command
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory", "64"])
            .arg("--console")
            .arg(format!("file={},max=65536", console.display()))
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
            std::fs::read(&v.console).is_ok_and(|c| c.starts_with(b"up\n"))
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
    let (status, head, body) = http_raw(socket, method, path, body);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&body)));
    (status, json)
}

/// One request; returns the status code, the response head and the raw body.
fn http_raw(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String, Vec<u8>) {
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
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let body = response[split + 4..].to_vec();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head, body)
}

/// One request sent with `fd` attached (SCM_RIGHTS), as the node agent hands a VMM the
/// TAP of a hot-plugged NIC.
fn http_with_fd(socket: &Path, path: &str, body: &Value, fd: RawFd) -> (u16, Value) {
    let stream = UnixStream::connect(socket).expect("connect to the API socket");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    send_with_fd(&stream, path, body, fd, "close");
    let mut response = Vec::new();
    (&stream).read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

/// A PUT with `fd` attached, the connection left as `connection` says.
fn send_with_fd(stream: &UnixStream, path: &str, body: &Value, fd: RawFd, connection: &str) {
    let body = body.to_string();
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: request.as_ptr() as *mut libc::c_void,
        iov_len: request.len(),
    };
    // SAFETY: msghdr is plain data; the iovec, the control buffer and the descriptor array
    // written into it live until sendmsg returns; CMSG_* stay within the control buffer.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        let sent = libc::sendmsg(stream.as_raw_fd(), &msg, 0);
        assert_eq!(
            sent,
            request.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

/// The status of the next answer on a kept-alive connection (its body read and dropped).
fn read_status(stream: &UnixStream) -> u16 {
    let mut reader = std::io::BufReader::new(stream);
    let mut head = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = n.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Whether the VMM holds a descriptor attached to the TAP `name` (tun's fdinfo names it).
fn holds_tap(vmm: &mut Vmm, name: &str) -> bool {
    let pid = vmm.child().id();
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .any(|info| info.lines().any(|l| l == format!("iff:\t{name}")))
}

/// A TAP in a network namespace of its own; the namespace lives until the sender is
/// dropped (its thread waits on it).
fn tap_in_own_netns(name: &str) -> (OwnedFd, std::sync::mpsc::Sender<()>) {
    let (fd_tx, fd_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let name = name.to_owned();
    std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq-sized struct that lives for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        fd_tx.send(OwnedFd::from(file)).unwrap();
        let _ = done_rx.recv();
    });
    (fd_rx.recv().unwrap(), done_tx)
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
    let mut vmm = Vmm::start(dir.path(), Guest::Halt, &["--disk", &disk_spec]);
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
            "id": "disk0",
            "index": 0,
            "slot": 1,
            "path": disk.to_str().unwrap(),
            "read_only": false,
            "serial": null,
            "rate_limit": {"bytes_per_sec": 1048576, "ops_per_sec": null},
            "driver_ready": false,
            "state": "active"
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
        "/vm/disks/disk0",
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
        "/vm/disks/disk0",
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
        "/vm/disks/disk0",
        Some(&json!({"rate_limit": {"bytes_per_sec": 0}})),
    );
    assert_eq!(status, 400);
    assert!(error_text(&e).contains("positive number"), "{e}");
    let (status, e) = http(
        &socket,
        "PATCH",
        "/vm/disks/disk0",
        Some(&json!({"rate_limit": {"iops": 5}})),
    );
    assert_eq!(status, 400);
    assert!(error_text(&e).contains("unknown field `iops`"), "{e}");
    let (status, e) = http(
        &socket,
        "PATCH",
        "/vm/disks/disk1",
        Some(&json!({"rate_limit": {}})),
    );
    assert_eq!(status, 404);
    assert!(error_text(&e).contains("no disk 'disk1'"), "{e}");
    let (status, e) = http(
        &socket,
        "PATCH",
        "/vm/nets/0",
        Some(&json!({"rate_limit": {}})),
    );
    assert_eq!(status, 404);
    assert!(error_text(&e).contains("no NIC '0'"), "{e}");
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
        Some(&json!({"action": "reboot"})),
    );
    assert_eq!(status, 400);
    assert!(error_text(&e).contains("unknown variant `reboot`"), "{e}");
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
    let status = dir.path().join("vm.status");
    let status_arg = status.to_str().unwrap().to_owned();
    let mut vmm = Vmm::start(dir.path(), Guest::PowerOff, &["--status-file", &status_arg]);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("guest powered off"), "{stderr}");
    // For a supervisor that is not the VMM's parent.
    let written: Value = serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
    assert_eq!(written, json!({"code": 0, "reason": "guest powered off"}));
    // A configuration error is recorded too.
    let second = Command::new(env!("CARGO_BIN_EXE_stratus-vmm"))
        .args([
            "--kernel",
            "/nonexistent/vmlinux",
            "--status-file",
            &status_arg,
        ])
        .env("STRATUS_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let written: Value = serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
    assert_eq!(written["code"], 1);
    assert!(
        written["reason"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/vmlinux"),
        "{written}"
    );
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
    let mut vmm = Vmm::start(dir.path(), Guest::Halt, &["--disk", &disk]);
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

fn console_len(vmm: &Vmm) -> usize {
    std::fs::metadata(&vmm.console).map_or(0, |m| m.len() as usize)
}

/// Open descriptors (other than sockets: API connections come and go) and threads of the
/// VMM process, to show a refused request left nothing.
fn process_resources(vmm: &mut Vmm) -> (usize, usize) {
    let fds = fd_targets(vmm)
        .iter()
        .filter(|t| !t.to_string_lossy().starts_with("socket:"))
        .count();
    let pid = vmm.child().id();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    (fds, threads)
}

fn fd_targets(vmm: &mut Vmm) -> Vec<PathBuf> {
    let pid = vmm.child().id();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect()
}

fn action(socket: &Path, action: &str) -> (u16, Value) {
    http(
        socket,
        "PUT",
        "/vm/actions",
        Some(&json!({ "action": action })),
    )
}

#[test]
fn pause_stops_the_guest_resume_restarts_it_and_the_power_button_powers_it_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(dir.path(), Guest::EventLoop, &[]);
    vmm.wait_until_running();
    let socket = vmm.socket.clone();
    vmm.wait_for("dots from the guest", |v| console_len(v) > 5);
    // Every thread of the running VMM is under its seccomp filter (mode 2).
    let pid = vmm.child().id();
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap();
        // KVM's own kernel worker lives in the process's thread group.
        if name.starts_with("kvm-") {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        assert!(status.contains("Seccomp:\t2"), "{name}: {status}");
        names.push(name.trim().to_owned());
    }
    names.sort();
    assert_eq!(
        names,
        ["api", "rtc", "stop-signals", "stratus-vmm", "vcpu0"]
    );

    let (status, vm) = action(&socket, "pause");
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["state"], "paused");
    let (status, e) = action(&socket, "pause");
    assert_eq!(status, 409);
    assert!(error_text(&e).contains("already paused"), "{e}");
    let (_, vm) = http(&socket, "GET", "/vm", None);
    assert_eq!(vm["state"], "paused");
    let paused_at = console_len(&vmm);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(console_len(&vmm), paused_at, "a paused guest printed");

    let (status, vm) = action(&socket, "resume");
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["state"], "running");
    let (status, e) = action(&socket, "resume");
    assert_eq!(status, 409);
    assert!(error_text(&e).contains("not paused"), "{e}");
    vmm.wait_for("dots after resume", |v| console_len(v) > paused_at + 2);

    // The console's tail, as the guest wrote it.
    let (status, _, tail) = http_raw(&socket, "GET", "/vm/console?bytes=3", None);
    assert_eq!(status, 200);
    assert_eq!(tail, b"...");
    let (status, _, all) = http_raw(&socket, "GET", "/vm/console?bytes=1048576", None);
    assert_eq!(status, 200);
    assert!(all.starts_with(b"up\n."), "{:?}", &all[..all.len().min(10)]);
    for bad in ["bytes=0", "bytes=1048577", "bytes=many", "lines=3"] {
        let (status, e) = http(&socket, "GET", &format!("/vm/console?{bad}"), None);
        assert_eq!(status, 400, "{bad}: {e}");
    }

    // The guest powers off when it sees the button: a clean exit, status 0.
    let (status, vm) = action(&socket, "shutdown");
    assert_eq!(status, 202, "{vm}");
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("guest powered off"), "{stderr}");
}

#[test]
fn a_guest_that_ignores_the_power_button_keeps_running_and_stop_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(dir.path(), Guest::Halt, &[]);
    vmm.wait_until_running();
    let socket = vmm.socket.clone();
    for _ in 0..3 {
        assert_eq!(action(&socket, "shutdown").0, 202);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (_, vm) = http(&socket, "GET", "/vm", None);
    assert_eq!(vm["state"], "running");
    // Paused, then stopped: the stop does not wait for a resume.
    assert_eq!(action(&socket, "pause").0, 200);
    assert_eq!(action(&socket, "stop").0, 202);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, 6, "{stderr}");
}

/// A hot-plugged iSCSI disk whose portal only DNS could name: the lookup runs under the
/// main thread's seccomp filter (glibc sends its two queries with one `sendmmsg`) and ends
/// as the request's error, not as a SIGSYS for the whole VM. The resolver is this test's
/// own: `nameserver 127.0.0.1`, where nothing answers, and a hosts file without the name.
#[test]
fn a_portal_name_only_dns_could_resolve_fails_the_request_not_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    own_file_in_own_mount_namespace(
        dir.path(),
        "/etc/resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    );
    own_file_in_own_mount_namespace(dir.path(), "/etc/hosts", "127.0.0.1 localhost\n");
    let mut vmm = Vmm::start(dir.path(), Guest::EventLoop, &[]);
    vmm.wait_until_running();
    let url = "iscsi://portal.stratus.invalid:3260/iqn.2026-12.eu.stratuslab.test:dns/1";
    let body = json!({"id": "dns", "iscsi": {"url": url, "timeout_secs": 1}});
    let (status, e) = http(&vmm.socket, "PUT", "/vm/disks", Some(&body));
    assert!((400..600).contains(&status), "{status} {e}");
    assert!(error_text(&e).contains(url), "{e}");
    assert!(vmm.child().try_wait().unwrap().is_none(), "the VMM died");
    let (status, vm) = http(&vmm.socket, "GET", "/vm", None);
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["disks"], json!([]), "{vm}");
}

#[test]
fn disks_are_hot_plugged_and_leave_only_when_the_guest_ejects_them() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str| {
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        path
    };
    let boot = make("boot.img");
    let data1 = make("data1.img");
    let data2 = make("data2.img");
    let boot_spec = format!("id=boot,path={},serial=boot-disk", boot.display());
    let mut vmm = Vmm::start(
        dir.path(),
        Guest::EventLoop,
        &["--disk", &boot_spec, "--pci-slots", "1"],
    );
    vmm.wait_until_running();
    let socket = vmm.socket.clone();

    let (status, disk) = http(
        &socket,
        "PUT",
        "/vm/disks",
        Some(
            &json!({"id": "data1", "path": data1, "serial": "data-1", "rate_limit": {"ops_per_sec": 100}}),
        ),
    );
    assert_eq!(status, 201, "{disk}");
    assert_eq!(disk["id"], "data1");
    assert_eq!(disk["slot"], 2);
    assert_eq!(disk["state"], "active");
    assert_eq!(disk["serial"], "data-1");
    assert_eq!(disk["rate_limit"]["ops_per_sec"], 100);
    let (_, vm) = http(&socket, "GET", "/vm", None);
    let ids: Vec<&str> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["boot", "data1"]);
    let (status, counters) = http(&socket, "GET", "/vm/counters", None);
    assert_eq!(status, 200, "{counters}");
    assert_eq!(counters["disks"]["data1"]["read_ops"], 0);
    assert!(counters["disks"]["boot"].is_object(), "{counters}");
    assert_eq!(counters["nets"], json!({}));

    // Refused requests leave nothing behind: no slot, no open file, no thread.
    let before = process_resources(&mut vmm);
    let refusals = [
        (
            json!({"id": "data1", "path": data2}),
            409,
            "already attached",
        ),
        (
            json!({"id": "other", "path": data1}),
            409,
            "already attached as disk 'data1'",
        ),
        (
            json!({"id": "x", "path": dir.path().join("missing.img")}),
            400,
            "missing.img",
        ),
        (
            json!({"id": "x", "path": dir.path().join("missing.img")}),
            400,
            "No such file",
        ),
        (json!({"path": data2}), 400, "needs an id"),
        (
            json!({"id": "bad/id", "path": data2}),
            400,
            "not a valid device id",
        ),
        (
            json!({"id": "x", "path": data2, "size": 1}),
            400,
            "unknown field `size`",
        ),
        (
            json!({"id": "x", "path": data2, "serial": "012345678901234567890"}),
            400,
            "longer than 20 bytes",
        ),
        (
            json!({"id": "data2", "path": data2}),
            409,
            "no free PCI slot",
        ),
    ];
    for (body, want, text) in refusals {
        let (status, e) = http(&socket, "PUT", "/vm/disks", Some(&body));
        assert_eq!(status, want, "{body}: {e}");
        assert!(error_text(&e).contains(text), "{body}: {e}");
    }
    assert_eq!(process_resources(&mut vmm), before);
    let (_, vm) = http(&socket, "GET", "/vm", None);
    assert_eq!(vm["disks"].as_array().unwrap().len(), 2);

    let (status, e) = http(&socket, "DELETE", "/vm/disks/nope", None);
    assert_eq!(status, 404, "{e}");
    let (status, disk) = http(&socket, "DELETE", "/vm/disks/data1", None);
    assert_eq!(status, 202, "{disk}");
    assert_eq!(disk["state"], "removing");
    vmm.wait_for("the guest to eject data1", |v| {
        let (_, vm) = http(&v.socket, "GET", "/vm", None);
        vm["disks"].as_array().unwrap().len() == 1
    });
    assert!(
        !fd_targets(&mut vmm).contains(&data1),
        "the ejected disk's file is closed"
    );
    let (status, _) = http(
        &socket,
        "PATCH",
        "/vm/disks/data1",
        Some(&json!({"rate_limit": {}})),
    );
    assert_eq!(status, 404);

    // The slot is free again, and disks given at start come out the same way.
    let (status, disk) = http(
        &socket,
        "PUT",
        "/vm/disks",
        Some(&json!({"id": "data2", "path": data2})),
    );
    assert_eq!(status, 201, "{disk}");
    assert_eq!(disk["slot"], 2);
    let (status, _) = http(&socket, "DELETE", "/vm/disks/boot", None);
    assert_eq!(status, 202);
    vmm.wait_for("the guest to eject the boot disk", |v| {
        let (_, vm) = http(&v.socket, "GET", "/vm", None);
        vm["disks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["id"] != "boot")
    });
    assert!(!fd_targets(&mut vmm).contains(&boot));
    assert_eq!(action(&socket, "stop").0, 202);
    assert_eq!(vmm.wait_exit().0, 6);
}

#[test]
fn nics_are_hot_plugged_and_unplugged_in_the_vmm_s_own_network_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start_with(dir.path(), Guest::EventLoop, &[], &["unshare", "--net"]);
    vmm.wait_until_running();
    let socket = vmm.socket.clone();
    let nic = json!({"id": "n1", "tap": "sttap1", "mac": "02:00:c6:12:00:33"});
    let (status, info) = http(&socket, "PUT", "/vm/nets", Some(&nic));
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["tap"], "sttap1");
    assert_eq!(info["state"], "active");
    let (status, e) = http(&socket, "PUT", "/vm/nets", Some(&nic));
    assert_eq!(status, 409, "{e}");
    for (body, text) in [
        (
            json!({"id": "n2", "tap": "sttap2", "mac": "01:00:c6:12:00:33"}),
            "unicast",
        ),
        (
            json!({"id": "n2", "tap": "sttap2", "mac": "02:00:c6:12:00:34", "fd": 3}),
            "name the TAP",
        ),
        (
            json!({"tap": "sttap2", "mac": "02:00:c6:12:00:34"}),
            "needs an id",
        ),
        (
            json!({"id": "n2", "tap": "a-name-longer-than-ifnamsiz", "mac": "02:00:c6:12:00:34"}),
            "TAP",
        ),
    ] {
        let (status, e) = http(&socket, "PUT", "/vm/nets", Some(&body));
        assert_eq!(status, 400, "{body}: {e}");
        assert!(error_text(&e).contains(text), "{body}: {e}");
    }
    // A TAP descriptor passed with the request, from another network namespace.
    let (tap, _netns) = tap_in_own_netns("stpass");
    let passed = json!({"id": "passed", "tap": "stpass", "mac": "02:00:c6:12:00:35"});
    let (status, info) = http_with_fd(&socket, "/vm/nets", &passed, tap.as_raw_fd());
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["tap"], "stpass");
    // Anything but a TAP is refused, and nothing is added.
    let file = std::fs::File::open(dir.path().join("vmlinux")).unwrap();
    let fake = json!({"id": "fake", "tap": "nothing", "mac": "02:00:c6:12:00:36"});
    let (status, e) = http_with_fd(&socket, "/vm/nets", &fake, file.as_raw_fd());
    assert_eq!(status, 400, "{e}");
    assert!(error_text(&e).contains("not an open /dev/net/tun"), "{e}");
    let (_, vm) = http(&socket, "GET", "/vm", None);
    let ids: Vec<&str> = vm["nets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["n1", "passed"]);
    assert!(holds_tap(&mut vmm, "stpass"));
    // Refused, a request closes the descriptor it brought even while its connection stays
    // open: the connection's next NIC got that TAP under its own TAP's name.
    let (left, _left_netns) = tap_in_own_netns("stleft");
    let kept = UnixStream::connect(&socket).unwrap();
    kept.set_read_timeout(Some(DEADLINE)).unwrap();
    let bad = json!({"id": "left", "tap": "stleft", "mac": "01:00:c6:12:00:37"});
    send_with_fd(&kept, "/vm/nets", &bad, left.as_raw_fd(), "keep-alive");
    assert_eq!(read_status(&kept), 400);
    drop(left);
    assert!(
        !holds_tap(&mut vmm, "stleft"),
        "the refused request's TAP is kept"
    );
    drop(kept);
    assert_eq!(http(&socket, "DELETE", "/vm/nets/passed", None).0, 202);

    let (status, info) = http(
        &socket,
        "PATCH",
        "/vm/nets/n1",
        Some(&json!({"rate_limit": {"bytes_per_sec": 1000000}})),
    );
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["rate_limit"]["bytes_per_sec"], 1_000_000);
    let (_, counters) = http(&socket, "GET", "/vm/counters", None);
    assert_eq!(counters["nets"]["n1"]["tx_frames"], 0, "{counters}");
    assert_eq!(http(&socket, "DELETE", "/vm/nets/n1", None).0, 202);
    vmm.wait_for("the guest to eject n1", |v| {
        let (_, vm) = http(&v.socket, "GET", "/vm", None);
        vm["nets"].as_array().unwrap().is_empty()
    });
    assert_eq!(http(&socket, "DELETE", "/vm/nets/n1", None).0, 404);
    assert_eq!(action(&socket, "stop").0, 202);
    assert_eq!(vmm.wait_exit().0, 6);
}

#[test]
fn idle_clients_are_capped_and_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(dir.path(), Guest::Halt, &[]);
    vmm.wait_until_running();
    let socket = vmm.socket.clone();
    let sockets = |vmm: &mut Vmm| {
        fd_targets(vmm)
            .iter()
            .filter(|t| t.to_string_lossy().starts_with("socket:"))
            .count()
    };
    // The listener and the VMM's own (tokio's signal handling holds a socket pair).
    let before = sockets(&mut vmm);
    // Clients that connect and never send a request.
    let idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = sockets(&mut vmm) - before;
    // 32 connections served at once; the rest wait in the backlog.
    assert!(held <= 32, "the VMM holds {held} connections");
    // The head-read deadline closes them, so a real request still gets through.
    let start = Instant::now();
    let (status, _) = http(&socket, "GET", "/vm", None);
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    let mut first = &idle[0];
    first.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 64];
    let n = first.read(&mut buf).unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        n == 0 || answer.contains("408"),
        "an idle client got {answer:?}"
    );
}
