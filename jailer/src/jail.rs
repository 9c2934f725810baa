//! The jail itself: the mount namespace the VMM sees, its device nodes, and the user it
//! runs as. Everything here runs in the jailer's single-threaded child, before `exec`.

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, chown, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

use crate::spec::JailSpec;

/// Where the host keeps shared libraries: a dynamically linked VMM needs its loader and
/// libraries (libiscsi, and librbd which it opens at run time). They are shown read-only.
const LIBRARY_DIRS: [&str; 4] = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"];

/// Device nodes every VMM needs: (path in the jail, major, minor, mode, owned by the VM).
const BASE_DEVICES: [(&str, u64, u64, u32, bool); 6] = [
    ("null", 1, 3, 0o666, false),
    ("zero", 1, 5, 0o666, false),
    ("random", 1, 8, 0o666, false),
    ("urandom", 1, 9, 0o666, false),
    ("kvm", 10, 232, 0o660, true),
    ("net/tun", 10, 200, 0o666, false),
];

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot {what} {path}: {source}")]
    Path {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot {what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("{0} is not a block device")]
    NotADevice(PathBuf),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

fn path_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailError {
    let path = path.to_owned();
    move |source| JailError::Path { what, path, source }
}

/// `path` of the host, under the jail's root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// An empty file or directory for a mount to cover, never following a symlink.
pub(crate) fn make_mount_point(target: &Path, directory: bool) -> Result<(), JailError> {
    if directory {
        return fs::create_dir_all(target).map_err(path_error("create", target));
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(path_error("create", parent))?;
    }
    // Already there (a file shown before, perhaps read-only, which cannot be opened for
    // writing): mounted over as it is. A link planted in its place still fails below.
    if fs::symlink_metadata(target).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    match OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(target)
    {
        Ok(_) => Ok(()),
        // A mount point left by an earlier start of the same VM.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) => Err(path_error("create", target)(e)),
    }
}

/// What a bind mount in the jail holds: the VMM's shared libraries, or data it only opens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holds {
    Libraries,
    Data,
}

/// Shows host `path` in the jail. Only that one mount: whatever is mounted below it on
/// the host stays out (a restricting remount covers one mount, and a submount would keep
/// its own write, exec or device rights). Nothing on a data mount can be executed.
fn bind(root: &Path, path: &Path, read_only: bool, holds: Holds) -> Result<(), JailError> {
    let meta = fs::metadata(path).map_err(path_error("find", path))?;
    let target = inside(root, path);
    make_mount_point(&target, meta.is_dir())?;
    mount(
        Some(path),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(format!("bind {} into the jail", path.display())))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    if holds == Holds::Data {
        flags |= MsFlags::MS_NOEXEC;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(sys(format!("restrict {} in the jail", path.display())))
}

/// A node at `target` for the host device `path` (whose metadata is `meta`), owned by the
/// VM's user.
pub(crate) fn copy_device(
    meta: &fs::Metadata,
    path: &Path,
    target: &Path,
    uid: Uid,
    gid: Gid,
) -> Result<(), JailError> {
    // Disks only: a character device (a tty, /dev/kmsg, a SCSI generic node) given as a
    // disk by mistake or by a link would hand the VM's user the host's device.
    if !meta.file_type().is_block_device() {
        return Err(JailError::NotADevice(path.to_owned()));
    }
    make_node(target, SFlag::S_IFBLK, meta.rdev(), 0o660)?;
    chown(target, Some(uid), Some(gid)).map_err(sys(format!("chown {}", target.display())))
}

fn make_node(target: &Path, kind: SFlag, dev: libc::dev_t, mode: u32) -> Result<(), JailError> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(path_error("create", parent))?;
    }
    let _ = fs::remove_file(target);
    mknod(target, kind, Mode::from_bits_truncate(mode), dev)
        .map_err(sys(format!("make the device node {}", target.display())))?;
    // mknod's mode is cut by the umask.
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        target,
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::NoFollowSymlink,
    )
    .or_else(|_| {
        fs::set_permissions(target, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    })
    .map_err(sys(format!("chmod {}", target.display())))
}

fn make_dev(root: &Path, spec: &JailSpec) -> Result<(), JailError> {
    let uid = Uid::from_raw(spec.uid);
    let gid = Gid::from_raw(spec.gid);
    let dev = root.join("dev");
    make_mount_point(&dev, true)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=64k,nr_inodes=256"),
    )
    .map_err(sys("mount the jail's /dev"))?;
    for (name, major, minor, mode, owned) in BASE_DEVICES {
        let target = dev.join(name);
        make_node(&target, SFlag::S_IFCHR, makedev(major, minor), mode)?;
        if owned {
            chown(&target, Some(uid), Some(gid))
                .map_err(sys(format!("chown {}", target.display())))?;
        }
    }
    for device in &spec.devices {
        let meta = fs::metadata(device).map_err(path_error("find", device))?;
        copy_device(&meta, device, &inside(root, device), uid, gid)?;
    }
    Ok(())
}

/// Builds the jail's mount namespace and makes it the process's root. The host's mounts
/// stay out of it: only the spec's paths, the library directories, a private /dev and
/// this PID namespace's /proc are there.
pub fn enter(spec: &JailSpec) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC)
        .map_err(sys("unshare the mount and IPC namespaces"))?;
    // Nothing done here may reach the host's mount table.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("make the mounts private"))?;
    let root = &spec.root;
    mount(
        Some(root.as_path()),
        root.as_path(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(format!("bind the jail root {}", root.display())))?;
    for dir in LIBRARY_DIRS {
        if Path::new(dir).is_dir() {
            bind(root, Path::new(dir), true, Holds::Libraries)?;
        }
    }
    for path in &spec.binds {
        bind(root, path, false, Holds::Data)?;
    }
    for path in &spec.binds_ro {
        bind(root, path, true, Holds::Data)?;
    }
    make_dev(root, spec)?;
    let proc_dir = root.join("proc");
    make_mount_point(&proc_dir, true)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("mount the jail's /proc"))?;

    chdir(root.as_path()).map_err(sys(format!("enter {}", root.display())))?;
    match pivot_root(".", ".") {
        // The old root ends up on top of the new one and is detached.
        Ok(()) => umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the host's root"))?,
        // A host running from its initramfs (rootfs) cannot pivot away from it: the jail
        // is moved over it and becomes the root by chroot, as runc does there. Without
        // capabilities the VMM cannot leave a chroot, and the host's root is no longer
        // reachable from the namespace's "/".
        Err(nix::Error::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(sys("move the jail over the host's initramfs root"))?;
            nix::unistd::chroot(".").map_err(sys("chroot into the jail"))?;
        }
        Err(e) => return Err(sys("pivot_root into the jail")(e)),
    }
    chdir("/").map_err(sys("chdir /"))?;
    // The mount points of the root itself: nothing the VMM writes goes there.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(sys("make the jail root read-only"))
}

/// Becomes the VM's user with no capabilities left, not even in the bounding set, and
/// with no way to gain any back through `exec`.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let last_cap: u64 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in 0..=last_cap {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and changes only this
        // thread's bounding set; an unknown number fails with EINVAL, which is ignored.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    let gid = Gid::from_raw(gid);
    let uid = Uid::from_raw(uid);
    setgroups(&[gid]).map_err(sys("set the supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(sys("set the group"))?;
    // From root to another user: the permitted, effective and ambient sets are emptied.
    setresuid(uid, uid, uid).map_err(sys("set the user"))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("set no_new_privs"))?;
    Ok(())
}

/// The VMM binary, opened on the host before the jail hides it.
pub fn open_program(path: &Path) -> Result<OwnedFd, JailError> {
    let file = File::open(path).map_err(path_error("open", path))?;
    Ok(file.into())
}

pub fn c_string(s: &OsStr) -> CString {
    // Arguments come from the command line, which cannot hold NUL bytes.
    CString::new(s.as_bytes()).unwrap_or_default()
}

/// Runs the program opened as `program` with `args` (args[0] included) and the current
/// environment; returns only on failure.
pub fn exec(program: &OwnedFd, args: &[String]) -> JailError {
    let argv: Vec<CString> = args.iter().map(|a| c_string(OsStr::new(a))).collect();
    let envp: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut pair = k.as_bytes().to_vec();
            pair.push(b'=');
            pair.extend_from_slice(v.as_bytes());
            CString::new(pair).unwrap_or_default()
        })
        .collect();
    let fd = program.as_raw_fd();
    match nix::unistd::fexecve(program, &argv, &envp) {
        Ok(never) => match never {},
        Err(source) => JailError::Sys {
            what: format!(
                "execute {} (descriptor {fd})",
                args.first().map(String::as_str).unwrap_or("")
            ),
            source,
        },
    }
}
