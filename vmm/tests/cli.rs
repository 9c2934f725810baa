//! The stratus-vmm binary refuses bad input with a clear message and a non-zero status,
//! before any guest runs.

#[path = "support/binary.rs"]
mod binary;

use binary::vmm;

#[test]
fn missing_kernel_is_named() {
    let (code, err) = vmm(&["--kernel", "/nonexistent/vmlinux", "--console", "off"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot open kernel /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_no_kernel_is_refused() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), b"just text, not a kernel").unwrap();
    let (code, err) = vmm(&["--kernel", f.path().to_str().unwrap(), "--console", "off"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is neither an ELF vmlinux nor a bzImage"),
        "{err}"
    );
}

#[test]
fn missing_disk_is_named() {
    let kernel = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kernel.path(), b"\x7fELF").unwrap();
    let (code, err) = vmm(&[
        "--kernel",
        kernel.path().to_str().unwrap(),
        "--disk",
        "path=/nonexistent/disk.img",
        "--console",
        "off",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}

#[test]
fn a_raw_file_given_as_qcow2_is_refused() {
    let kernel = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kernel.path(), b"\x7fELF").unwrap();
    let disk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(disk.path(), vec![0u8; 65536]).unwrap();
    let spec = format!("path={},format=qcow2", disk.path().display());
    let (code, err) = vmm(&[
        "--kernel",
        kernel.path().to_str().unwrap(),
        "--disk",
        &spec,
        "--console",
        "off",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot open qcow2 image"), "{err}");
    assert!(err.contains(&disk.path().display().to_string()), "{err}");
}

#[test]
fn bad_flags_are_refused_with_the_reason() {
    let (code, err) = vmm(&["--kernel", "/k", "--memory", "16", "--console", "off"]);
    assert_eq!(code, 1);
    assert!(err.contains("too small: at least 64 MiB"), "{err}");
    let (code, err) = vmm(&["--kernel", "/k", "--cpus", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("--cpus must be between 1 and"), "{err}");
    let (code, err) = vmm(&["--kernel", "/k", "--disk", "path=/x,aio=native"]);
    assert_eq!(code, 1);
    assert!(err.contains("no option 'aio'"), "{err}");
    let (code, err) = vmm(&["--kernel", "/k", "--memory", "99999999"]);
    assert_eq!(code, 1);
    assert!(err.contains("exceeds this host's RAM"), "{err}");
}

#[test]
fn config_file_errors_are_named() {
    let (code, err) = vmm(&["--config", "/nonexistent/vm.json"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read config file /nonexistent/vm.json"),
        "{err}"
    );
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), b"{\"kernel\": 5}").unwrap();
    let (code, err) = vmm(&["--config", f.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a valid VM configuration"), "{err}");
    let (code, err) = vmm(&["--config", f.path().to_str().unwrap(), "--cpus", "2"]);
    assert_eq!(code, 2, "clap usage error: {err}");
}

#[test]
fn a_net_descriptor_that_is_no_tap_is_refused() {
    let kernel = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kernel.path(), b"\x7fELF").unwrap();
    // Descriptor 0 is stdin, never a TAP.
    let (code, err) = vmm(&[
        "--kernel",
        kernel.path().to_str().unwrap(),
        "--memory",
        "64",
        "--net",
        "tap=tap9,mac=02:00:c6:12:00:0a,fd=0",
        "--console",
        "off",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("descriptor 0 is not an open /dev/net/tun (TAP) descriptor"),
        "{err}"
    );
    let (code, err) = vmm(&["--kernel", "/k", "--net", "tap=t,mac=ff:00:00:00:00:01"]);
    assert_eq!(code, 1);
    assert!(err.contains("unicast"), "{err}");
}

#[test]
fn an_api_socket_in_a_missing_directory_is_refused() {
    let kernel = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kernel.path(), b"\x7fELF").unwrap();
    let (code, err) = vmm(&[
        "--kernel",
        kernel.path().to_str().unwrap(),
        "--console",
        "off",
        "--api-socket",
        "/nonexistent/stratus/vm.sock",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "cannot create the API socket /nonexistent/stratus/vm.sock: \
             directory /nonexistent/stratus does not exist"
        ),
        "{err}"
    );
    // The socket belongs in the JSON file when there is one.
    let (code, err) = vmm(&["--config", "/vm.json", "--api-socket", "/tmp/vm.sock"]);
    assert_eq!(code, 2, "clap usage error: {err}");
}

#[test]
fn an_api_socket_path_taken_by_another_file_is_refused_and_kept() {
    let taken = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(taken.path(), b"not a socket").unwrap();
    let (code, err) = vmm(&[
        "--kernel",
        "/k",
        "--api-socket",
        taken.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read(taken.path()).unwrap(), b"not a socket");
}

#[test]
fn a_vm_that_fails_to_build_leaves_no_api_socket_behind() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (code, err) = vmm(&[
        "--kernel",
        "/nonexistent/vmlinux",
        "--console",
        "off",
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot open kernel"), "{err}");
    assert!(!socket.exists(), "no socket is left behind");
}
