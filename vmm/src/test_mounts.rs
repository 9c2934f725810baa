//! For the tests of every crate that must show a program a host file of their own (a
//! resolver configuration, a hosts file) without touching the host's: the calling thread
//! gets a mount namespace of its own, and what it starts inherits it.

use std::ffi::CString;
use std::path::Path;

/// Bind-mounts a file holding `text` (kept in `dir`) over `target`, in a private mount
/// namespace of the calling thread's own, made on the first call. Needs root.
pub fn own_file_in_own_mount_namespace(dir: &Path, target: &str, text: &str) {
    // SAFETY: unshare and mount change only this thread's mount namespace; every string is
    // NUL-terminated and outlives the call.
    unsafe {
        // A second call finds the namespace made (unsharing again would only nest it).
        if libc::unshare(libc::CLONE_NEWNS) == 0 {
            let private = libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
            assert_eq!(private, 0, "{}", std::io::Error::last_os_error());
        }
    }
    let file = dir.join(target.trim_start_matches('/').replace('/', "-"));
    std::fs::write(&file, text).expect("write the file to show");
    let source = CString::new(file.as_os_str().as_encoded_bytes()).expect("a path without NUL");
    let target = CString::new(target).expect("a path without NUL");
    // SAFETY: as above.
    let bound = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(bound, 0, "needs root: {}", std::io::Error::last_os_error());
}
