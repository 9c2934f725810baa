//! `stratus-jailer enter`: shows one more host path to the VMM of a running jail, for a
//! disk hot-plugged after the VMM started. The path is cloned as a detached mount on the
//! host (`open_tree`), then attached at the same path inside the jail's mount namespace
//! (`setns` + `move_mount`), the way systemd binds into a running container.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sched::{setns, CloneFlags};
use nix::unistd::{Gid, Uid};

use crate::jail::{self, JailError};
use crate::spec::{EnterSpec, SpecError};

// From <linux/mount.h>; the libc crate has the system call numbers but not these.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("jailer {0} has no VMM (it ended, or it is not a jailer)")]
    NoVmm(u32),
    #[error("jailer {0} is still setting up its jail")]
    StillStarting(u32),
    #[error("process {0} is not in a jail of its own: refusing to change the host's mounts")]
    NotJailed(u32),
    #[error(
        "process {0} is not a stratus-jailer running a jail (it ended, and its pid was reused?)"
    )]
    NotAJailer(u32),
    #[error("name one of --bind, --bind-ro or --device")]
    NothingToShow,
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot {what}: {source}")]
    Sys {
        what: &'static str,
        source: nix::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EnterError {
    let path = path.to_owned();
    move |source| EnterError::Io { what, path, source }
}

/// How long `enter` waits for a jail that is still being set up.
const SETUP_WAIT: Duration = Duration::from_secs(10);

/// Refuses a `--pid` that is not a jailer's `run`: a jailer that ended may have had its pid
/// reused by a process whose child has a mount namespace of its own (a container, a
/// sandboxed service), whose mounts `enter` would then change.
fn check_jailer(pid: u32) -> Result<(), EnterError> {
    let own =
        fs::read_link("/proc/self/exe").map_err(io_error("read", Path::new("/proc/self/exe")))?;
    let theirs =
        fs::read_link(format!("/proc/{pid}/exe")).map_err(|_| EnterError::NotAJailer(pid))?;
    // A jailer started before an upgrade runs a binary since replaced.
    let name = |exe: &Path| {
        exe.file_name().map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_owned()
        })
    };
    // Empty in the instant of its exec, before the new program's arguments are in place.
    let deadline = Instant::now() + SETUP_WAIT;
    let cmdline = loop {
        let cmdline =
            fs::read(format!("/proc/{pid}/cmdline")).map_err(|_| EnterError::NotAJailer(pid))?;
        if !cmdline.is_empty() || Instant::now() >= deadline {
            break cmdline;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let runs_a_jail = cmdline.split(|b| *b == 0).nth(1) == Some(b"run".as_slice());
    if name(&own) != name(&theirs) || !runs_a_jail {
        return Err(EnterError::NotAJailer(pid));
    }
    Ok(())
}

/// The VMM: the jailer's only child, once it runs the VMM. Until its `exec` it is still
/// building the jail, and a mount made then would land outside the jail's root.
fn vmm_of(jailer: u32) -> Result<u32, EnterError> {
    let children = PathBuf::from(format!("/proc/{jailer}/task/{jailer}/children"));
    let identity = |pid: u32| {
        fs::metadata(format!("/proc/{pid}/exe"))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        let child: Option<u32> = fs::read_to_string(&children)
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
        let child = child.ok_or(EnterError::NoVmm(jailer))?;
        let jailer_exe = identity(jailer).ok_or(EnterError::NoVmm(jailer))?;
        if identity(child).is_some_and(|exe| exe != jailer_exe) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            return Err(EnterError::StillStarting(jailer));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn c_path(path: &Path) -> Result<CString, EnterError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| EnterError::Io {
        what: "name",
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })
}

/// A detached copy of the mount of `path` alone (not what is mounted below it, as the
/// jail's own binds), with the restrictions of a data bind already on it.
fn clone_tree(path: &Path, read_only: bool) -> Result<OwnedFd, EnterError> {
    let c = c_path(path)?;
    // SAFETY: open_tree reads a NUL-terminated path that lives for the call and returns a
    // new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io_error("clone the mount of", path)(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: the descriptor was just returned to us and nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr_set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
    if read_only {
        attr_set |= MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let empty = c"";
    // SAFETY: mount_setattr reads `attr` (of the size passed) and an empty path; both
    // live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io_error("restrict the mount of", path)(
            io::Error::last_os_error(),
        ));
    }
    Ok(tree)
}

fn attach_tree(tree: &OwnedFd, target: &Path) -> Result<(), EnterError> {
    let c = c_path(target)?;
    let empty = c"";
    // SAFETY: move_mount reads two NUL-terminated paths that live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io_error("attach the mount at", target)(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn remount_root(read_only: bool) -> Result<(), EnterError> {
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, "/", None::<&str>, flags, None::<&str>).map_err(|source| EnterError::Sys {
        what: "remount the jail root",
        source,
    })
}

/// Shows the spec's path in the jail of the VMM that jailer `spec.pid` runs.
pub fn enter(spec: &EnterSpec) -> Result<(), EnterError> {
    spec.validate()?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    check_jailer(spec.pid)?;
    let vmm = vmm_of(spec.pid)?;
    let ours = fs::metadata("/proc/self/ns/mnt")
        .map_err(io_error("read", Path::new("/proc/self/ns/mnt")))?;
    let ns_path = PathBuf::from(format!("/proc/{vmm}/ns/mnt"));
    let theirs = fs::metadata(&ns_path).map_err(io_error("read", &ns_path))?;
    if ours.ino() == theirs.ino() && ours.dev() == theirs.dev() {
        return Err(EnterError::NotJailed(vmm));
    }
    let namespace = File::open(&ns_path).map_err(io_error("open", &ns_path))?;
    // The VMM's own root: the namespace's, or a chroot in it (a host on an initramfs).
    let root_path = PathBuf::from(format!("/proc/{vmm}/root"));
    let jail_root = File::open(&root_path).map_err(io_error("open", &root_path))?;
    let enter_namespace = || {
        setns(&namespace, CloneFlags::CLONE_NEWNS).map_err(|source| EnterError::Sys {
            what: "enter the jail's mount namespace",
            source,
        })?;
        nix::unistd::fchdir(&jail_root)
            .and_then(|()| nix::unistd::chroot("."))
            .map_err(|source| EnterError::Sys {
                what: "enter the jail's root",
                source,
            })
    };
    if let Some(device) = &spec.device {
        // Read on the host; made in the jail's own /dev, a tmpfs the root may write.
        let meta = fs::metadata(device).map_err(io_error("find", device))?;
        enter_namespace()?;
        jail::copy_device(
            &meta,
            device,
            device,
            Uid::from_raw(spec.uid),
            Gid::from_raw(spec.gid),
        )?;
        return Ok(());
    }
    let (path, read_only) = match (&spec.bind, &spec.bind_ro) {
        (Some(path), None) => (path, false),
        (None, Some(path)) => (path, true),
        _ => return Err(EnterError::NothingToShow),
    };
    let source = fs::metadata(path).map_err(io_error("find", path))?;
    let tree = clone_tree(path, read_only)?;
    enter_namespace()?;
    // Shown read-only already (a file every network disk needs, a backing image shared
    // by several disks): the request adds nothing, and mounts do not pile up.
    let shown = fs::metadata(path)
        .is_ok_and(|inside| inside.dev() == source.dev() && inside.ino() == source.ino());
    let shown_read_only = shown
        && nix::sys::statvfs::statvfs(path).is_ok_and(|mount| {
            mount
                .flags()
                .contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
        });
    if read_only && shown_read_only {
        return Ok(());
    }
    let directory = source.is_dir();
    remount_root(false)?;
    let attached = jail::make_mount_point(path, directory)
        .map_err(EnterError::from)
        .and_then(|()| attach_tree(&tree, path));
    remount_root(true)?;
    attached
}
