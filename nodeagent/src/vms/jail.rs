//! What the agent prepares so that a VM's VMM can run in its jail (`stratus-jailer`): the
//! host paths the VMM may see, the files it may write handed to the VM's own user, the
//! secrets it reads copied where only that user can read them, and the jailer's command.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use stratus_jailer::{CgroupLimits, EnterSpec, JailSpec};

use crate::config::JailerConfig;

#[derive(Debug, thiserror::Error)]
pub enum JailPrepError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{0} is not readable by the VM's user: make it world-readable (it is not the VM's \
         own, so the agent does not hand it over)"
    )]
    Unreadable(PathBuf),
    #[error("all {0} VM users of jailer.uid_base..+uid_count are taken")]
    NoUid(u32),
    #[error("{what}: {reason}")]
    Jailer { what: String, reason: String },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailPrepError {
    let path = path.to_owned();
    move |source| JailPrepError::Io { what, path, source }
}

/// The lowest VM user of the configured range that no VM of this host has.
pub fn free_uid(
    config: &JailerConfig,
    taken: impl IntoIterator<Item = u32>,
) -> Result<u32, JailPrepError> {
    let taken: BTreeSet<u32> = taken.into_iter().collect();
    (config.uid_base..config.uid_base + config.uid_count)
        .find(|uid| !taken.contains(uid))
        .ok_or(JailPrepError::NoUid(config.uid_count))
}

/// Where, in the VMM's directory, copies of its secrets go.
const SECRETS: &str = "secrets";

/// The VMM's secrets directory, opened without following a link: the VMM owns the
/// directory around it and could have put a link to anywhere at that name, through which
/// root would create, hand over and remove files. Every use goes through this descriptor.
fn open_secrets(vmm_dir: &Path) -> Result<fs::File, JailPrepError> {
    let secrets = vmm_dir.join(SECRETS);
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&secrets)
        .map_err(io_error("open", &secrets))
}

/// `name` inside the directory `dir` is open on, whatever its path has become since.
fn within(dir: &fs::File, name: &str) -> PathBuf {
    use std::os::unix::io::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

/// Removes the copies of a disk's secrets from the VMM's directory (never through a link
/// the VMM put there).
pub fn forget_secrets(vmm_dir: &Path, disk_id: &str) {
    let Ok(dir) = open_secrets(vmm_dir) else {
        return;
    };
    for kind in ["secret", "keyring", "conf"] {
        let _ = fs::remove_file(within(&dir, &format!("{disk_id}.{kind}")));
    }
}

/// Hands `path` to the VM's user without following a link planted in its place.
pub fn give(path: &Path, uid: u32, mode: u32) -> Result<(), JailPrepError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).map_err(io_error("chown", path))?;
    let meta = fs::symlink_metadata(path).map_err(io_error("inspect", path))?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io_error("chmod", path))?;
    }
    Ok(())
}

/// One VM's jail as it is being put together for a start of its VMM.
pub struct JailPlan {
    uid: u32,
    vm_dir: PathBuf,
    binds: BTreeSet<PathBuf>,
    binds_ro: BTreeSet<PathBuf>,
    devices: BTreeSet<PathBuf>,
}

impl JailPlan {
    /// The VM's directory is the VMM's, read and write; what it writes lives in
    /// `vmm_dir`, which becomes the VM user's.
    pub fn new(uid: u32, vm_dir: &Path, vmm_dir: &Path) -> Result<JailPlan, JailPrepError> {
        fs::create_dir_all(vmm_dir).map_err(io_error("create", vmm_dir))?;
        give(vmm_dir, uid, 0o700)?;
        // The VM's user goes through it to its files; it lists nothing there.
        fs::set_permissions(vm_dir, fs::Permissions::from_mode(0o711))
            .map_err(io_error("chmod", vm_dir))?;
        let mut binds = BTreeSet::new();
        binds.insert(vm_dir.to_owned());
        Ok(JailPlan {
            uid,
            vm_dir: vm_dir.to_owned(),
            binds,
            binds_ro: BTreeSet::new(),
            devices: BTreeSet::new(),
        })
    }

    /// One of the VM's own disks (its overlay, a volume attached to it alone): a host
    /// device is recreated in the jail for the VM's user; a file becomes the VM user's,
    /// and a read-only one is shown read-only.
    pub fn share(&mut self, path: &Path, read_only: bool) -> Result<(), JailPrepError> {
        if path.starts_with("/dev") {
            self.devices.insert(path.to_owned());
            return Ok(());
        }
        give(path, self.uid, 0o600)?;
        self.bind(path, read_only);
        Ok(())
    }

    /// A file the VM only reads and that is not its own (a kernel named in its spec): it
    /// must be readable by everyone, or already be the VM user's.
    pub fn share_readable(&mut self, path: &Path) -> Result<(), JailPrepError> {
        let meta = fs::metadata(path).map_err(io_error("inspect", path))?;
        if meta.mode() & 0o004 == 0 && meta.uid() != self.uid {
            return Err(JailPrepError::Unreadable(path.to_owned()));
        }
        self.bind(path, true);
        Ok(())
    }

    fn bind(&mut self, path: &Path, read_only: bool) {
        if path.starts_with(&self.vm_dir) {
            // Already there with the VM's directory.
            return;
        }
        if read_only {
            if !self.binds.contains(path) {
                self.binds_ro.insert(path.to_owned());
            }
        } else {
            self.binds_ro.remove(path);
            self.binds.insert(path.to_owned());
        }
    }

    /// A file of the agent's image cache (a public image, its kernel or initrd): made
    /// readable by every VM's user, then shown read-only.
    pub fn share_public(&mut self, path: &Path) -> Result<(), JailPrepError> {
        let meta = fs::metadata(path).map_err(io_error("inspect", path))?;
        if meta.mode() & 0o004 == 0 {
            fs::set_permissions(
                path,
                fs::Permissions::from_mode(meta.mode() & 0o7777 | 0o444),
            )
            .map_err(io_error("chmod", path))?;
        }
        self.share_readable(path)
    }

    /// A host file the VMM only reads, shown as it is if it exists (name resolution for
    /// network disks, Ceph's configuration directory).
    pub fn share_if_present(&mut self, path: &Path) {
        if path.exists() && !self.binds.contains(path) {
            self.binds_ro.insert(path.to_owned());
        }
    }

    /// A copy of a secret (CHAP secret, Ceph keyring) that only the VM's user may read,
    /// inside the VMM's directory; the VMM is pointed at the copy.
    pub fn private_copy(
        &self,
        source: &Path,
        vmm_dir: &Path,
        name: &str,
    ) -> Result<PathBuf, JailPrepError> {
        let secrets = vmm_dir.join(SECRETS);
        match fs::symlink_metadata(&secrets) {
            Ok(meta) if meta.is_dir() => {}
            // A link (or anything else) the VMM put in its place: gone, not followed.
            Ok(_) => {
                fs::remove_file(&secrets).map_err(io_error("remove", &secrets))?;
                fs::create_dir(&secrets).map_err(io_error("create", &secrets))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&secrets).map_err(io_error("create", &secrets))?
            }
            Err(e) => return Err(io_error("inspect", &secrets)(e)),
        }
        let dir = open_secrets(vmm_dir)?;
        std::os::unix::fs::fchown(&dir, Some(self.uid), Some(self.uid))
            .map_err(io_error("chown", &secrets))?;
        dir.set_permissions(fs::Permissions::from_mode(0o700))
            .map_err(io_error("chmod", &secrets))?;
        let copy = secrets.join(name);
        let bytes = fs::read(source).map_err(io_error("read", source))?;
        // A fresh file every time: the directory is the VMM's, and whatever it left
        // under this name must not be written through.
        let _ = fs::remove_file(within(&dir, name));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(within(&dir, name))
            .map_err(io_error("create", &copy))?;
        io::Write::write_all(&mut file, &bytes).map_err(io_error("write", &copy))?;
        std::os::unix::fs::fchown(&file, Some(self.uid), Some(self.uid))
            .map_err(io_error("chown", &copy))?;
        file.set_permissions(fs::Permissions::from_mode(0o400))
            .map_err(io_error("chmod", &copy))?;
        Ok(copy)
    }

    /// The jailer's command line for this VM, running `vmm` with `args`.
    pub fn into_spec(
        self,
        config: &JailerConfig,
        id: &str,
        root: PathBuf,
        memory_mib: u64,
        vcpus: u32,
        command: Vec<String>,
    ) -> JailSpec {
        JailSpec {
            id: id.to_owned(),
            uid: self.uid,
            gid: self.uid,
            root,
            binds: self.binds.into_iter().collect(),
            binds_ro: self.binds_ro.into_iter().collect(),
            devices: self.devices.into_iter().collect(),
            no_cgroup: !config.cgroups,
            cgroup: cgroup_limits(config, Some((memory_mib, vcpus))),
            command,
        }
    }
}

/// The cgroup limits of a VM of `memory_mib` and `vcpus` (none: only to find its cgroup).
pub fn cgroup_limits(config: &JailerConfig, size: Option<(u64, u32)>) -> CgroupLimits {
    CgroupLimits {
        parent: config.cgroup_parent.clone(),
        root: config.cgroup_root.clone(),
        memory_max: size.map(|(mib, _)| (mib + config.memory_overhead_mib) << 20),
        pids_max: size.map(|_| config.pids_max),
        // The vCPUs' time, and one CPU more for the VMM's device and API threads.
        cpu_millis: size.map(|(_, vcpus)| (u64::from(vcpus) + 1) * 1000),
    }
}

/// Removes what a jail left on the host when its jailer could not clean up (it was killed):
/// its cgroup and its root's mount points.
pub fn clean_up(config: &JailerConfig, id: &str, root: &Path) {
    let cgroup = stratus_jailer::cgroup::VmCgroup::existing(&cgroup_limits(config, None), id);
    if let Err(e) = cgroup.remove() {
        tracing::warn!("VM {id}: {e}");
    }
    if let Err(e) = fs::remove_dir_all(root) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(
                "VM {id}: cannot remove the jail root {}: {e}",
                root.display()
            );
        }
    }
}

/// Shows a hot-plugged disk to the running jail of jailer `pid`.
pub async fn show_to_running(
    jailer: &Path,
    pid: u32,
    uid: u32,
    path: &Path,
    read_only: bool,
) -> Result<(), JailPrepError> {
    let mut spec = EnterSpec {
        pid,
        uid,
        gid: uid,
        bind: None,
        bind_ro: None,
        device: None,
    };
    if path.starts_with("/dev") {
        spec.device = Some(path.to_owned());
    } else if read_only {
        spec.bind_ro = Some(path.to_owned());
    } else {
        spec.bind = Some(path.to_owned());
    }
    let output = tokio::process::Command::new(jailer)
        .args(spec.to_args())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io_error("run", jailer))?;
    if output.status.success() {
        return Ok(());
    }
    Err(JailPrepError::Jailer {
        what: format!("cannot show {} to the VM's jail", path.display()),
        reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vm_gets_the_lowest_free_user_of_the_range() {
        let config = JailerConfig {
            uid_base: 1000,
            uid_count: 3,
            ..JailerConfig::default()
        };
        assert_eq!(free_uid(&config, []).unwrap(), 1000);
        assert_eq!(free_uid(&config, [1000, 1002]).unwrap(), 1001);
        assert!(matches!(
            free_uid(&config, [1000, 1001, 1002]),
            Err(JailPrepError::NoUid(3))
        ));
    }

    /// The VMM owns its directory: a link it puts at `secrets` is neither written through
    /// (root would create the copy, owned by the VM's user, wherever it points) nor
    /// removed through.
    #[test]
    fn secrets_are_never_copied_or_removed_through_a_link_the_vmm_planted() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        let vmm_dir = vm_dir.join("vmm");
        let plan = JailPlan::new(4242, &vm_dir, &vmm_dir).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, vmm_dir.join("secrets")).unwrap();
        let secret = dir.path().join("chap");
        fs::write(&secret, "s3cret").unwrap();

        let copy = plan.private_copy(&secret, &vmm_dir, "v1.secret").unwrap();
        assert_eq!(copy, vmm_dir.join("secrets").join("v1.secret"));
        let secrets = fs::symlink_metadata(vmm_dir.join("secrets")).unwrap();
        assert!(secrets.is_dir(), "the link was replaced by a directory");
        assert_eq!(secrets.uid(), 4242);
        assert_eq!(fs::read_to_string(&copy).unwrap(), "s3cret");
        let meta = fs::metadata(&copy).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (4242, 0o400));
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);

        // Forgetting a disk's secrets through a link removes nothing where it points.
        fs::write(elsewhere.join("v1.secret"), "not the VMM's").unwrap();
        fs::remove_dir_all(vmm_dir.join("secrets")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, vmm_dir.join("secrets")).unwrap();
        forget_secrets(&vmm_dir, "v1");
        assert!(elsewhere.join("v1.secret").exists());
    }

    #[test]
    fn shared_files_are_bound_by_how_the_vm_uses_them() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        let plan_dir = vm_dir.join("vmm");
        let mut plan = JailPlan::new(4242, &vm_dir, &plan_dir).unwrap();
        assert_eq!(fs::metadata(&plan_dir).unwrap().uid(), 4242);
        let image = dir.path().join("image");
        fs::write(&image, "img").unwrap();
        fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, "s").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let volume = dir.path().join("volume");
        fs::write(&volume, "v").unwrap();
        let overlay = vm_dir.join("root.qcow2");
        fs::write(&overlay, "o").unwrap();

        plan.share_readable(&image).unwrap();
        assert!(matches!(
            plan.share_readable(&secret),
            Err(JailPrepError::Unreadable(_))
        ));
        plan.share(&volume, false).unwrap();
        plan.share(&overlay, false).unwrap();
        plan.share(Path::new("/dev/sdq"), false).unwrap();
        assert_eq!(fs::metadata(&volume).unwrap().uid(), 4242);
        assert_eq!(fs::metadata(&overlay).unwrap().uid(), 4242);
        let copy = plan.private_copy(&secret, &plan_dir, "disk1").unwrap();
        let meta = fs::metadata(&copy).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (4242, 0o400));
        assert_eq!(fs::read_to_string(&copy).unwrap(), "s");

        let spec = plan.into_spec(
            &JailerConfig::default(),
            "vm-1",
            dir.path().join("root"),
            512,
            2,
            vec!["/usr/bin/stratus-vmm".into()],
        );
        spec.validate().unwrap();
        assert_eq!(spec.binds, vec![vm_dir.clone(), volume]);
        assert_eq!(spec.binds_ro, vec![image]);
        assert_eq!(spec.devices, vec![PathBuf::from("/dev/sdq")]);
        assert_eq!(spec.cgroup.memory_max, Some((512 + 256) << 20));
        assert_eq!(spec.cgroup.cpu_millis, Some(3000));
    }
}
