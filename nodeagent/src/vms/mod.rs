//! The host's VMs: created from a spec, started as stratus-vmm processes, watched until they
//! end, and found again after the agent itself was restarted or killed.
//!
//! The records on disk are the host's truth. A record is written before anything else is
//! done for a VM (so a crash leaves something to finish), and again at every change of
//! state. Capacity is reserved under one lock when a VM is admitted, so concurrent creates
//! never hand out more than the host offers.

pub mod jail;
pub mod record;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use stratus_vmm::device_manager::{DEFAULT_SPARE_SLOTS, MAX_SLOT};
use stratus_vmm::devices::virtio::block::BlockConfig;
use tokio::sync::Notify;

use self::jail::{JailPlan, JailPrepError};
use self::record::{RecordError, VmRecord};
use stratus_contextualizer::{Context, ContextMethod};
use stratus_images::cache::ImageCache;
use stratus_images::policy::Policy;
use stratus_vmm::devices::virtio::block::io::iscsi::{IscsiSource, IscsiUrl, DEFAULT_TIMEOUT_SECS};
use stratus_vmm::devices::virtio::block::io::qcow2::create_overlay;
use stratus_vmm::devices::virtio::block::io::rbd::{
    RbdName, RbdSource, DEFAULT_TIMEOUT_SECS as RBD_DEFAULT_TIMEOUT_SECS,
};
use stratus_vmm::devices::virtio::block::io::ImageFormat as VmmImageFormat;

use crate::api::types::{
    ChapSecret, ContextSpec, DiskSource, DiskSpec, HostInfo, HostState, VmExit, VmInfo, VmSpec,
    VmState,
};
use crate::config::AgentConfig;
use crate::host::{self, Capacity};
use crate::metrics::Metrics;
use crate::networks::{tap_name, NetworkError, Networks};
use crate::supervisor::{self, Ended, SupervisorError, VmmLaunch, VmmProcess};
use crate::vmm_client::{VmmClient, VmmClientError};

/// Longest a VM's id may be (it names files and a socket).
const MAX_ID_LEN: usize = 64;
/// How long a new VMM has to answer on its API socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `kill` waits for the VMM to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(15);
/// Exit status of a guest reboot: the agent starts the VM again.
const EXIT_REBOOT: i32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM '{0}' on this host")]
    NotFound(String),
    #[error("'{0}' is not a valid VM id: use 1 to {MAX_ID_LEN} letters, digits, '.', '_' or '-', not starting with '.' nor ending in \".json\"")]
    BadId(String),
    #[error("invalid VM spec: {0}")]
    BadSpec(String),
    #[error("VM '{0}' exists with a different spec; delete it first or use another id")]
    SpecConflict(String),
    #[error("{0}")]
    DiskConflict(String),
    #[error("this host is {0:?} and takes no new VMs")]
    HostNotEnabled(HostState),
    #[error(
        "not enough capacity: the VM needs {cpu} vCPUs and {memory_mib} MiB; the host has \
         {cpu_free} vCPUs and {memory_free_mib} MiB free of {cpu_total} and {memory_total_mib}"
    )]
    NoCapacity {
        cpu: u64,
        memory_mib: u64,
        cpu_free: u64,
        memory_free_mib: u64,
        cpu_total: u64,
        memory_total_mib: u64,
    },
    #[error("VM '{id}' is {state:?}; {what}")]
    WrongState {
        id: String,
        state: VmState,
        what: &'static str,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Vmm(#[from] VmmClientError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Image(#[from] stratus_images::Error),
    #[error(transparent)]
    Jail(#[from] JailPrepError),
}

/// A VM's changing part.
#[derive(Clone, Debug)]
struct Status {
    state: VmState,
    pid: Option<u32>,
    pid_start_time: Option<u64>,
    exit: Option<VmExit>,
    restarts: u32,
    /// The agent asked the VMM to end (kill or shutdown): its exit is not a failure.
    stop_requested: bool,
    /// Disks hot-plugged since creation.
    attached: Vec<DiskSpec>,
    /// Disk ids being hot-plugged now: a second attach of the same id is refused rather
    /// than sharing (and, on failure, deleting) the first one's files.
    attaching: std::collections::BTreeSet<String>,
    /// When this agent last started the VM's VMM, and how many guest reboots in a row came
    /// sooner than `QUICK_REBOOT` after a start (not recorded: a restart begins afresh).
    started: Option<std::time::Instant>,
    quick_reboots: u32,
    /// The guest rebooted and its next VMM waits (a reboot loop's back-off): there is no
    /// VMM to ask anything, and a kill or shutdown ends the VM where it waits.
    waiting_to_restart: bool,
    /// A delete is removing the VM's files; it leaves the map last.
    deleting: bool,
    /// The create that made it (or the agent finishing one cut short) is still starting it:
    /// a repeated create waits for the outcome rather than answer for a VM that may be
    /// about to vanish (a failed create takes it out of the map) or fail.
    creating: bool,
}

impl Status {
    /// A VM in `state` that this agent has done nothing to yet.
    fn new(state: VmState) -> Self {
        Status {
            state,
            pid: None,
            pid_start_time: None,
            exit: None,
            restarts: 0,
            stop_requested: false,
            attached: Vec::new(),
            attaching: Default::default(),
            started: None,
            quick_reboots: 0,
            waiting_to_restart: false,
            deleting: false,
            creating: false,
        }
    }
}

/// Held by the create under way; dropped however the create ends (a failed one took the
/// VM out of the map, or marked it failed, first), it lets a repeated create waiting for
/// the outcome look again rather than wait for good. A panic half-way leaves the VM
/// failed, not Starting for good with no VMM.
struct CreateUnderWay {
    vm: Arc<Vm>,
    manager: Arc<VmManager>,
}

impl Drop for CreateUnderWay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.manager.mark_ended(
                &self.vm,
                VmState::Failed,
                VmExit {
                    code: None,
                    reason: "the node agent failed while it started the VM".to_owned(),
                    at: chrono::Utc::now(),
                },
            );
        }
        self.vm.status().creating = false;
        self.vm.changed.notify_waiters();
    }
}

/// A create or a delete is under way: what a repeated create answers depends on it.
fn passing(s: &Status) -> bool {
    s.creating || s.deleting
}

/// Sets the state of a VM that has not ended; returns whether it had not.
fn set_state_if_active(vm: &Vm, state: VmState) -> bool {
    set_state_if_active_locked(&mut vm.status(), state)
}

fn set_state_if_active_locked(s: &mut Status, state: VmState) -> bool {
    if !s.state.is_active() {
        return false;
    }
    s.state = state;
    true
}

/// A guest that reboots sooner than this after its VMM started is in a reboot loop.
const QUICK_REBOOT: Duration = Duration::from_secs(10);
/// Quick reboots restarted at once; later ones wait 1, 2, 4 … up to 60 s.
const QUICK_REBOOTS_FREE: u32 = 3;

/// How long to wait before starting a guest again after its `quick`-th quick reboot in a
/// row: a guest that panics at boot and reboots (`panic=1`) would otherwise have its VMM
/// made anew as fast as the host can, jail and context disk included.
fn reboot_backoff(quick: u32) -> Duration {
    match quick.checked_sub(QUICK_REBOOTS_FREE + 1) {
        None => Duration::ZERO,
        Some(n) => Duration::from_secs(1u64 << n.min(6)).min(Duration::from_secs(60)),
    }
}

pub struct Vm {
    id: String,
    spec: VmSpec,
    created: chrono::DateTime<chrono::Utc>,
    dir: PathBuf,
    socket: PathBuf,
    /// The user and group its jailed VMM runs as; kept for the VM's whole life.
    jail_uid: OnceLock<u32>,
    status: Mutex<Status>,
    /// Held while the VM's record is written or removed: a state change saved as a delete
    /// removes the record (the VMM ended, and the orchestrator deleted the VM at once)
    /// would otherwise write the record back after it was removed, and the deleted VM
    /// return at the agent's next start.
    record: Mutex<()>,
    /// Woken at every change of status.
    changed: Notify,
}

impl Vm {
    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> VmState {
        self.status().state
    }

    fn client(&self) -> VmmClient {
        let client = VmmClient::new(&self.socket);
        match self.jail_uid.get() {
            Some(uid) => client.with_peer_uid(*uid),
            None => client,
        }
    }

    fn record(&self) -> VmRecord {
        let s = self.status();
        VmRecord {
            id: self.id.clone(),
            spec: self.spec.clone(),
            state: s.state,
            pid: s.pid,
            pid_start_time: s.pid_start_time,
            exit: s.exit.clone(),
            restarts: s.restarts,
            created: self.created,
            attached: s.attached.clone(),
            jail_uid: self.jail_uid.get().copied(),
        }
    }

    fn info(&self) -> VmInfo {
        let s = self.status();
        let mut spec = self.spec.clone();
        let mut attached = s.attached.clone();
        for disk in spec.disks.iter_mut().chain(attached.iter_mut()) {
            if let DiskSource::Iscsi { chap_secret, .. } = &mut disk.source {
                *chap_secret = None;
            }
        }
        VmInfo {
            id: self.id.clone(),
            state: s.state,
            spec,
            attached,
            pid: s.pid.filter(|_| s.state.is_active()),
            exit: s.exit.clone(),
            restarts: s.restarts,
            created: self.created,
            counters: None,
        }
    }

    /// Writes a CHAP secret given inline where only this host's root reads it (the agent
    /// hands a jailed VMM its own copy); the VMM takes secrets from files only, so they
    /// never show in its command line.
    fn write_chap_secret(&self, disk_id: &str, secret: &str) -> Result<PathBuf, VmError> {
        let path = self.dir.join(format!("{disk_id}.chap"));
        record::write_private(&path, secret.as_bytes()).map_err(|source| VmError::Io {
            what: format!("cannot write the CHAP secret of disk '{disk_id}'"),
            source,
        })?;
        Ok(path)
    }

    /// What the VMM itself writes (its socket, status and console): the only directory
    /// a jailed VMM may write in, so the agent reads nothing there through a link.
    fn vmm_dir(&self) -> PathBuf {
        self.dir.join("vmm")
    }

    fn console_path(&self) -> PathBuf {
        self.vmm_dir().join("console.log")
    }

    fn status_file(&self) -> PathBuf {
        self.vmm_dir().join("status.json")
    }

    /// The VMM's (and its jailer's) standard error, opened by the agent.
    fn log_path(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    fn volatile_path(&self, disk_id: &str) -> PathBuf {
        self.dir.join(format!("volatile-{disk_id}.img"))
    }

    /// Waits until `done` holds for the status, or `timeout` passes; returns whether it held.
    async fn wait_until(&self, timeout: Duration, done: impl Fn(&Status) -> bool) -> bool {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if done(&self.status()) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// What one start of a VM's VMM boots.
struct BootFiles {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    root_overlay: Option<PathBuf>,
    /// The image the root overlay reads through to.
    root_base: Option<PathBuf>,
}

pub struct VmManager {
    images: Arc<ImageCache>,
    config: Arc<AgentConfig>,
    metrics: Arc<Metrics>,
    networks: Networks,
    capacity: Capacity,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    host_state: Mutex<HostState>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        // The VM's directory sits beside the records (`<id>.json`).
        && !id.ends_with(".json")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn validate_spec(spec: &VmSpec) -> Result<(), VmError> {
    let bad = |reason: String| Err(VmError::BadSpec(reason));
    if spec.vcpus == 0 || spec.vcpus > stratus_vmm::config::MAX_VCPUS {
        return bad(format!(
            "vcpus must be between 1 and {}, not {}",
            stratus_vmm::config::MAX_VCPUS,
            spec.vcpus
        ));
    }
    if spec.memory_mib < stratus_vmm::memory::MIN_MEMORY_MIB {
        return bad(format!(
            "memory_mib must be at least {}, not {}",
            stratus_vmm::memory::MIN_MEMORY_MIB,
            spec.memory_mib
        ));
    }
    match (&spec.boot.kernel, &spec.boot.image) {
        (Some(_), None) => {}
        (None, Some(image)) => {
            if spec.boot.initrd.is_some() {
                return bad(
                    "an image brings its own initrd; boot.initrd is for boot.kernel".into(),
                );
            }
            image
                .check_usable(chrono::Utc::now())
                .map_err(|e| VmError::BadSpec(format!("image: {e}")))?;
        }
        _ => {
            return bad(
                "boot needs either kernel (a file on this host) or image (a Marketplace entry)"
                    .into(),
            )
        }
    }
    let root = spec.disks.iter().find(|d| d.id == ROOT_DISK_ID);
    if let (Some(root), Some(_)) = (root, &spec.boot.image) {
        // The cloud keeps this VM's root (a pdisk snapshot of the image): it replaces the
        // overlay this node would make, so the guest must be able to write it.
        if root.read_only
            || matches!(
                root.source,
                DiskSource::Image { .. } | DiskSource::Volatile { .. }
            )
        {
            return bad(format!(
                "disk '{ROOT_DISK_ID}' is the image's root: a writable file, iSCSI or RBD disk"
            ));
        }
    }
    for path in spec.boot.kernel.iter().chain(spec.boot.initrd.iter()) {
        if !path.is_absolute() {
            return bad(format!("boot paths must be absolute: {}", path.display()));
        }
        if !path.is_file() {
            return bad(format!("{} does not exist on this host", path.display()));
        }
    }
    if let Some(context) = &spec.context {
        // Built once here and thrown away: what only the method's format refuses (user data
        // that does not decode or does not fit) is then a 400 at the create, not a failed
        // start.
        build_context("validation", context)
            .and_then(|(ctx, method)| stratus_contextualizer::build_context_image(&ctx, method))
            .map_err(|e| VmError::BadSpec(format!("context: {e}")))?;
    }
    let mut ids = std::collections::HashSet::new();
    // The agent holds one owner per MAC and per address of a network: a second NIC with
    // either would replace the first's, whose anti-spoofing rules would still let its
    // TAP send as an address the agent then gives another VM.
    let mut macs = std::collections::HashSet::new();
    let mut addresses = std::collections::HashSet::new();
    for nic in &spec.nics {
        if !valid_id(&nic.id) || !ids.insert(nic.id.as_str()) {
            return bad(format!("NIC id '{}' is not valid or used twice", nic.id));
        }
        if !macs.insert(nic.mac.to_ascii_lowercase()) {
            return bad(format!(
                "NIC '{}': MAC {} is given to two NICs",
                nic.id, nic.mac
            ));
        }
        if !addresses.insert((nic.network.as_str(), nic.ip)) {
            return bad(format!(
                "NIC '{}': address {} of network '{}' is given to two NICs",
                nic.id, nic.ip, nic.network
            ));
        }
        let limit = u16::from(spec.vcpus).min(stratus_vmm::devices::virtio::net::MAX_QUEUE_PAIRS);
        if nic.queues == 0 || nic.queues > limit {
            return bad(format!(
                "NIC '{}': queues must be between 1 and {limit} (the VM's vCPUs, at most 16), not {}",
                nic.id, nic.queues
            ));
        }
    }
    if spec.context.is_some() {
        ids.insert(CONTEXT_DISK_ID);
    }
    for disk in &spec.disks {
        if !ids.insert(disk.id.as_str()) {
            return bad(format!("disk id '{}' is used twice", disk.id));
        }
        validate_disk(disk)?;
    }
    // Every disk and NIC takes one of the VMM's PCI slots, and the VMM keeps some free for
    // hot-plugging: a VM with more would be taken here and fail as its VMM started.
    let overlay = spec.boot.image.is_some() && root.is_none();
    let devices = spec.disks.len()
        + spec.nics.len()
        + usize::from(spec.context.is_some())
        + usize::from(overlay);
    let room = usize::from(MAX_SLOT - DEFAULT_SPARE_SLOTS);
    if devices > room {
        return bad(format!(
            "{devices} disks and NICs (the context disk and the image's root included): a VM \
             starts with at most {room}, keeping {DEFAULT_SPARE_SLOTS} PCI slots for \
             hot-plugged ones"
        ));
    }
    Ok(())
}

/// Makes the file at `path` under another name, then renames it into place: a kill in
/// the middle leaves no half-made file at `path` (a restart reuses a file found there).
fn make_whole(path: &Path, make: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    make(&partial)?;
    std::fs::rename(&partial, path)
}

/// The disk id of an image's root overlay.
pub const ROOT_DISK_ID: &str = "root";

/// The disk id the context disk gets.
pub const CONTEXT_DISK_ID: &str = "context";

fn build_context(
    vm_id: &str,
    spec: &ContextSpec,
) -> Result<(Context, ContextMethod), stratus_contextualizer::ContextError> {
    let method: ContextMethod = spec.method.parse()?;
    let mut context = Context::new(vm_id, spec.hostname.as_deref().unwrap_or(vm_id))
        .with_pairs(spec.pairs.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(key) = &spec.public_key {
        context = context.with_public_key(key.as_str());
    }
    if let Some(data) = &spec.user_data {
        context = context.with_user_data(data.as_bytes().to_vec());
    }
    context.validate()?;
    Ok((context, method))
}

/// Whether texts and paths can go into a VMM `--disk` flag: commas would split it, and a
/// path must be UTF-8 to be written there at all.
fn fits_disk_flag(texts: &[Option<&str>], paths: &[&Option<PathBuf>]) -> bool {
    let paths = paths.iter().filter_map(|p| p.as_ref()).map(|p| p.to_str());
    texts
        .iter()
        .copied()
        .chain(paths.map(|p| p.or(Some(","))))
        .flatten()
        .all(|t| !t.contains(','))
}

/// A network disk's timeout, when given, is at least a second.
fn check_timeout(disk: &DiskSpec, timeout_secs: Option<u32>) -> Result<(), VmError> {
    if timeout_secs == Some(0) {
        return Err(VmError::BadSpec(format!(
            "disk '{}': timeout_secs must be at least 1",
            disk.id
        )));
    }
    Ok(())
}

/// What a VMM needs to find iSCSI portals and Ceph monitors given by name.
const NAME_RESOLUTION_FILES: [&str; 3] = ["/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf"];

fn validate_disk(disk: &DiskSpec) -> Result<(), VmError> {
    let bad = |reason: String| Err(VmError::BadSpec(reason));
    if !valid_id(&disk.id) {
        return bad(format!("disk id '{}' is not valid", disk.id));
    }
    if disk.serial.as_ref().is_some_and(|s| s.len() > 20) {
        return bad(format!(
            "disk '{}': serial is longer than 20 bytes",
            disk.id
        ));
    }
    match &disk.source {
        DiskSource::File {
            path,
            format,
            backing,
        } => {
            for file in std::iter::once(path).chain(backing) {
                if !file.is_absolute() {
                    return bad(format!(
                        "disk '{}': {} is not an absolute path",
                        disk.id,
                        file.display()
                    ));
                }
                if !file.exists() {
                    return bad(format!(
                        "disk '{}': {} does not exist on this host",
                        disk.id,
                        file.display()
                    ));
                }
            }
            if *format == VmmImageFormat::Raw && !backing.is_empty() {
                return bad(format!(
                    "disk '{}': a raw disk reads through no backing file (format qcow2?)",
                    disk.id
                ));
            }
            Ok(())
        }
        DiskSource::Volatile { size_gib } if *size_gib == 0 || *size_gib > 1024 => bad(format!(
            "disk '{}': size_gib must be between 1 and 1024",
            disk.id
        )),
        DiskSource::Image { .. } if !disk.read_only => bad(format!(
            "disk '{}': a Marketplace image disk is attached read-only (set read_only)",
            disk.id
        )),
        DiskSource::Image { entry } => entry
            .check()
            .map_err(|e| VmError::BadSpec(format!("disk '{}': {e}", disk.id))),
        DiskSource::Iscsi {
            url,
            secret_file,
            chap_secret,
            timeout_secs,
            initiator,
        } => {
            let parsed = IscsiUrl::parse(url)
                .map_err(|e| VmError::BadSpec(format!("disk '{}': {e}", disk.id)))?;
            if !fits_disk_flag(&[Some(url), initiator.as_deref()], &[secret_file]) {
                return bad(format!(
                    "disk '{}': the iSCSI source may not contain commas",
                    disk.id
                ));
            }
            if secret_file.is_some() && chap_secret.is_some() {
                return bad(format!(
                    "disk '{}': give the CHAP secret as secret_file or as chap_secret, not both",
                    disk.id
                ));
            }
            if parsed.user.is_some() != (secret_file.is_some() || chap_secret.is_some()) {
                return bad(format!(
                    "disk '{}': a CHAP user in the URL and its secret (secret_file or \
                     chap_secret) go together",
                    disk.id
                ));
            }
            if let Some(secret) = chap_secret.as_ref().map(ChapSecret::expose) {
                // RFC 7143 wants CHAP secrets of at least 96 bits; libiscsi takes up to 255 bytes.
                if secret.len() < 12 || secret.len() > 255 || secret.chars().any(char::is_control) {
                    return bad(format!(
                        "disk '{}': chap_secret must be 12 to 255 printable characters",
                        disk.id
                    ));
                }
            }
            check_timeout(disk, *timeout_secs)
        }
        DiskSource::Rbd {
            image,
            conf,
            id,
            keyring,
            timeout_secs,
        } => {
            RbdName::parse(image)
                .map_err(|e| VmError::BadSpec(format!("disk '{}': {e}", disk.id)))?;
            if id.as_deref() == Some("") || !fits_disk_flag(&[id.as_deref()], &[conf, keyring]) {
                return bad(format!(
                    "disk '{}': the RBD client id and paths may not contain commas",
                    disk.id
                ));
            }
            check_timeout(disk, *timeout_secs)
        }
        _ => Ok(()),
    }
}

/// A jailed VMM sees only the files a disk names: Ceph's own defaults (the keyring
/// `ceph.conf` points at, /etc/ceph's admin keyring) are out of its reach.
fn check_jailed_rbd(disk_id: &str, rbd: &RbdSource) -> Result<(), VmError> {
    if rbd.keyring.is_none() {
        return Err(VmError::BadSpec(format!(
            "disk '{disk_id}': the VMM runs jailed and reads only the files the disk names: \
             give the Ceph client's keyring (and its id unless it is client.admin)"
        )));
    }
    Ok(())
}

/// Where the VMM reads a secret of disk `disk_id`: a jailed VMM from its own copy.
fn vmm_secret(
    jail: &Option<JailPlan>,
    path: &Path,
    vmm_dir: &Path,
    disk_id: &str,
    kind: &str,
) -> Result<PathBuf, VmError> {
    match jail {
        Some(jail) => Ok(jail.private_copy(path, vmm_dir, &format!("{disk_id}.{kind}"))?),
        None => Ok(path.to_owned()),
    }
}

/// The exit as the VMM reported it (status file), or as the process was seen to end.
fn describe_exit(ended: Ended, status_file: &Path, log: &Path) -> VmExit {
    let written = stratus_vmm::exit::ExitStatusFile::read(status_file).ok();
    let code = ended.code.or(written.as_ref().map(|w| w.code));
    let reason = match (written, ended.signal) {
        (Some(w), _) => w.reason,
        (None, Some(signal)) if signal == libc::SIGSYS => format!(
            "the VMM was killed by signal {signal} (SIGSYS): one of its threads made a system \
             call its seccomp filter forbids (the kernel log names it); a guest may have \
             attacked it, or the VMM needs a call its filter lacks"
        ),
        (None, Some(signal)) => format!("the VMM was killed by signal {signal}"),
        (None, None) if ended.code == Some(stratus_jailer::run::SETUP_FAILED) => {
            // The jailer's own line in the log the agent opened for it.
            let said = std::fs::read_to_string(log).ok().and_then(|text| {
                text.lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("stratus-jailer: ").map(str::to_owned))
            });
            format!(
                "the VMM's jail could not be set up: {}",
                said.as_deref().unwrap_or("(no reason in the VM's vmm.log)")
            )
        }
        (None, None) if ended.code.is_some() => "the VMM exited without a reason".into(),
        (None, None) => "the VMM ended while the agent was not watching it (no exit status)".into(),
    };
    VmExit {
        code,
        reason,
        at: chrono::Utc::now(),
    }
}

impl VmManager {
    /// Loads the records and takes every VM back: running VMMs are adopted, VMs whose VMM
    /// ended meanwhile get their end state, and creates that were cut short are started
    /// again, in the background.
    pub async fn recover(
        config: Arc<AgentConfig>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<VmManager>, VmError> {
        let networks = Networks::start(&config.networks).await?;
        let policy = match &config.image_policy {
            Some(path) => Policy::load(path)?,
            None => Policy::default(),
        };
        let images = Arc::new(
            ImageCache::new(config.image_cache_dir(), policy)?
                .allowing_file_locations(config.allow_file_locations),
        );
        let io = |what: &str, source| VmError::Io {
            what: what.to_owned(),
            source,
        };
        std::fs::create_dir_all(config.vms_dir())
            .map_err(|e| io("cannot create the VM directory", e))?;
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| io("cannot create the run directory", e))?;
        let host_state = read_host_state(&config.state_dir);
        let manager = Arc::new(VmManager {
            images,
            metrics,
            networks,
            capacity: Capacity::from_config(&config.capacity),
            config,
            vms: Mutex::new(BTreeMap::new()),
            host_state: Mutex::new(host_state),
        });
        // Every VM is known before any is taken back: one recorded without its jail user
        // (by an earlier agent, which recorded it only with the VMM started) chooses one
        // now, and must see every user already recorded.
        let records: Vec<(Arc<Vm>, VmRecord)> = record::load_all(&manager.config.vms_dir())?
            .into_iter()
            .map(|record| (manager.know(&record), record))
            .collect();
        for (vm, record) in records {
            manager.take_back(vm, record).await;
        }
        Ok(manager)
    }

    /// `hypervisor = "none"`: VMs are recorded and reported, never started.
    fn no_vm(&self) -> bool {
        self.config.hypervisor == crate::config::Hypervisor::None
    }

    /// Ends a VM of the no-VM hypervisor, which has nothing to stop.
    fn end_without_vmm(&self, vm: &Vm) {
        {
            let mut s = vm.status();
            s.state = VmState::Stopped;
            s.exit = Some(VmExit {
                code: Some(0),
                reason: "stopped (hypervisor \"none\" runs no VMM)".into(),
                at: chrono::Utc::now(),
            });
        }
        vm.changed.notify_waiters();
        self.save(vm);
    }

    fn vms(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_vm(
        &self,
        id: &str,
        spec: VmSpec,
        status: Status,
        created: chrono::DateTime<chrono::Utc>,
        jail_uid: Option<u32>,
    ) -> Arc<Vm> {
        let dir = self.config.vms_dir().join(id);
        let jail = OnceLock::new();
        if let Some(uid) = jail_uid {
            let _ = jail.set(uid);
        }
        Arc::new(Vm {
            id: id.to_owned(),
            spec,
            created,
            socket: dir.join("vmm").join("api.sock"),
            dir,
            jail_uid: jail,
            status: Mutex::new(status),
            record: Mutex::new(()),
            changed: Notify::new(),
        })
    }

    /// The binary the agent starts for a VM: the jailer, which starts the VMM, or the VMM.
    fn launch_binary(&self) -> PathBuf {
        match self.jailed() {
            true => self.config.jailer_binary(),
            false => self.config.vmm_binary.clone(),
        }
    }

    fn jailed(&self) -> bool {
        self.config.jailer.enabled && !self.no_vm()
    }

    /// The VM's own user: chosen when the VM is created, or for a VM an earlier agent
    /// recorded without one, the first time it is needed (the lowest free one).
    fn jail_uid(&self, vm: &Vm) -> Result<u32, VmError> {
        if let Some(uid) = vm.jail_uid.get() {
            return Ok(*uid);
        }
        // Chosen and taken under the map's lock, as a new VM's is: a create meanwhile (a
        // cut-short create finishes while the API serves) would otherwise take it too.
        let vms = self.vms();
        let uid = self.free_jail_uid(&vms)?;
        Ok(*vm.jail_uid.get_or_init(|| uid))
    }

    /// The lowest jail user none of `vms` runs as.
    fn free_jail_uid(&self, vms: &BTreeMap<String, Arc<Vm>>) -> Result<u32, VmError> {
        let taken = vms.values().filter_map(|v| v.jail_uid.get().copied());
        Ok(jail::free_uid(&self.config.jailer, taken)?)
    }

    /// A recorded VM, in the map as the record left it.
    fn know(&self, record: &VmRecord) -> Arc<Vm> {
        let status = Status {
            pid: record.pid,
            pid_start_time: record.pid_start_time,
            exit: record.exit.clone(),
            restarts: record.restarts,
            attached: record.attached.clone(),
            ..Status::new(record.state)
        };
        let vm = self.new_vm(
            &record.id,
            record.spec.clone(),
            status,
            record.created,
            record.jail_uid,
        );
        self.vms().insert(record.id.clone(), vm.clone());
        vm
    }

    async fn take_back(self: &Arc<Self>, vm: Arc<Vm>, record: VmRecord) {
        if self.no_vm() {
            return;
        }
        // TAPs and leases live until the VM is deleted; make sure they are all there.
        let nics = self.plug_nics(&vm).await;
        if let Err(e) = &nics {
            tracing::error!("VM {}: cannot restore its NICs: {e}", vm.id);
        }
        if !record.state.is_active() {
            return;
        }
        // The VMM serving the VM's socket is the VM's, whatever the record says about pids
        // (a jailed one is watched through its jailer), if it runs as the VM's own user:
        // the socket lives where a jailed VMM writes, and a link it put there could name
        // another process's.
        // SAFETY: geteuid has no side effects.
        let agent_uid = unsafe { libc::geteuid() };
        let vmm_uid = vm.jail_uid.get().copied().unwrap_or(agent_uid);
        let peer = supervisor::socket_peer(&vm.socket)
            .filter(|&(_, uid)| uid == vmm_uid)
            .map(|(pid, _)| pid)
            .map(
                |pid| match (vm.jail_uid.get(), supervisor::parent_pid(pid)) {
                    (Some(_), Some(jailer)) if record.pid == Some(jailer) => jailer,
                    _ => pid,
                },
            );
        // One started just before the agent died, with its pid not saved, may not serve
        // its socket yet: starting another would run the VM twice.
        let launched = match peer {
            Some(_) => None,
            None => supervisor::launched_for(&self.launch_binary(), &vm.socket),
        };
        let adopted = peer
            .or(launched)
            .or(record.pid)
            .and_then(|pid| Some((pid, supervisor::process_start_time(pid)?)))
            .filter(|(pid, start)| {
                peer == Some(*pid)
                    || launched == Some(*pid)
                    || record.pid_start_time == Some(*start)
            })
            .and_then(|(pid, start)| Some((pid, start, VmmProcess::adopt(pid, start)?)));
        match adopted {
            Some((pid, start, process)) => {
                tracing::info!("VM {}: adopted its running VMM (pid {pid})", vm.id);
                let stopping = {
                    let mut s = vm.status();
                    s.pid = Some(pid);
                    s.pid_start_time = Some(start);
                    if s.state == VmState::Starting {
                        s.state = VmState::Running;
                    }
                    // A shutdown under way when the agent went down: its hard stop is due
                    // again (after the agent's default wait, its own is not recorded).
                    s.stop_requested = s.state == VmState::Stopping;
                    s.stop_requested
                };
                self.save(&vm);
                self.watch(vm.clone(), process);
                if stopping {
                    let timeout = Duration::from_secs(self.config.shutdown_timeout_s);
                    self.stop_if_still_running_after(vm, timeout);
                }
            }
            None if record.state == VmState::Starting && record.pid.is_none() => {
                // A VM started without its TAP or its lease would run with no network. It
                // stays, failed, with what it holds, until it is deleted (as a VM whose
                // start fails here does); its create, had it failed, would have left nothing.
                if let Err(e) = nics {
                    self.mark_ended(
                        &vm,
                        VmState::Failed,
                        VmExit {
                            code: None,
                            reason: format!("cannot plug its NICs: {e}"),
                            at: chrono::Utc::now(),
                        },
                    );
                    return;
                }
                tracing::info!("VM {}: finishing a create cut short", vm.id);
                // In the background: its image may take minutes to download, and an agent
                // whose API did not answer meanwhile would look down. A create of it
                // repeated meanwhile waits for the outcome, as it does for any create.
                vm.status().creating = true;
                let manager = self.clone();
                tokio::spawn(async move {
                    let _under_way = CreateUnderWay {
                        vm: vm.clone(),
                        manager: manager.clone(),
                    };
                    if let Err(e) = manager.start(&vm).await {
                        manager.mark_ended(
                            &vm,
                            VmState::Failed,
                            VmExit {
                                code: None,
                                reason: format!("cannot start the VMM: {e}"),
                                at: chrono::Utc::now(),
                            },
                        );
                    }
                });
            }
            None => {
                let exit = describe_exit(
                    Ended {
                        code: None,
                        signal: None,
                    },
                    &vm.status_file(),
                    &vm.log_path(),
                );
                tracing::info!(
                    "VM {}: its VMM ended while the agent was down: {}",
                    vm.id,
                    exit.reason
                );
                self.vmm_ended(&vm, exit).await;
            }
        }
    }

    fn save(&self, vm: &Vm) {
        let _writing = vm.record.lock().unwrap_or_else(|e| e.into_inner());
        // Its delete has the last word (a failed delete saves again when it gives up).
        if vm.status().deleting {
            return;
        }
        if let Err(e) = record::save(&self.config.vms_dir(), &vm.record()) {
            tracing::error!("{e}");
        }
    }

    pub fn get(&self, id: &str) -> Result<Arc<Vm>, VmError> {
        self.vms()
            .get(id)
            .cloned()
            .ok_or_else(|| VmError::NotFound(id.to_owned()))
    }

    /// The VM as the API shows it, with the VMM's counters while it runs.
    pub async fn info(&self, vm: &Vm) -> VmInfo {
        let mut info = vm.info();
        if matches!(info.state, VmState::Running | VmState::Paused) && !self.no_vm() {
            info.counters = vm.client().counters().await.ok();
        }
        info
    }

    pub async fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<Arc<Vm>> = self.vms().values().cloned().collect();
        let mut infos = Vec::with_capacity(vms.len());
        for vm in vms {
            infos.push(self.info(&vm).await);
        }
        infos
    }

    fn allocated(vms: &BTreeMap<String, Arc<Vm>>) -> (u64, u64) {
        vms.values()
            .filter(|vm| vm.state().is_active())
            .fold((0u64, 0u64), |(cpu, mem), vm| {
                let cpu = cpu.saturating_add(u64::from(vm.spec.vcpus));
                (cpu, mem.saturating_add(vm.spec.memory_mib))
            })
    }

    /// Creates and starts a VM. The same id and spec again answers with the VM as it is
    /// (`false`: nothing was created).
    pub async fn create(
        self: &Arc<Self>,
        id: &str,
        spec: VmSpec,
    ) -> Result<(VmInfo, bool), VmError> {
        if !valid_id(id) {
            return Err(VmError::BadId(id.to_owned()));
        }
        validate_spec(&spec)?;
        for nic in &spec.nics {
            self.networks.check(nic, id)?;
        }
        let vm = loop {
            // Its create may yet fail, or its delete succeed: either takes it out of the
            // map. Once that is settled, it is answered for or made anew.
            let settling = {
                let mut vms = self.vms();
                let Some(existing) = vms.get(id) else {
                    break self.insert_new(&mut vms, id, spec)?;
                };
                if existing.spec != spec {
                    return Err(VmError::SpecConflict(id.to_owned()));
                }
                if !passing(&existing.status()) {
                    return Ok((existing.info(), false));
                }
                existing.clone()
            };
            let changed = settling.changed.notified();
            // Looked at again once the wake-up is registered, so a change in between is
            // not missed; the map is looked at again after any change.
            if self
                .vms()
                .get(id)
                .is_some_and(|v| Arc::ptr_eq(v, &settling))
                && passing(&settling.status())
            {
                changed.await;
            }
        };
        let under_way = CreateUnderWay {
            vm: vm.clone(),
            manager: self.clone(),
        };
        // The record goes first: from here a crash leaves a create to finish.
        if let Err(e) = record::save(&self.config.vms_dir(), &vm.record()) {
            self.vms().remove(id);
            return Err(e.into());
        }
        if self.no_vm() {
            vm.status().state = VmState::Running;
            self.save(&vm);
            drop(under_way);
            return Ok((self.info(&vm).await, true));
        }
        let started = match self.plug_nics(&vm).await {
            Ok(()) => self.start(&vm).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            self.unplug_nics(&vm).await;
            self.roll_back(&vm);
            return Err(e);
        }
        // Waiters go on before the VMM's counters are asked for.
        drop(under_way);
        Ok((self.info(&vm).await, true))
    }

    /// A new VM in the map, Starting, if the host takes it.
    fn insert_new(
        &self,
        vms: &mut BTreeMap<String, Arc<Vm>>,
        id: &str,
        spec: VmSpec,
    ) -> Result<Arc<Vm>, VmError> {
        let host_state = *self.host_state.lock().unwrap_or_else(|e| e.into_inner());
        if host_state != HostState::Enabled {
            return Err(VmError::HostNotEnabled(host_state));
        }
        let (cpu_used, mem_used) = Self::allocated(vms);
        let (cpu, memory_mib) = (u64::from(spec.vcpus), spec.memory_mib);
        let cap = self.capacity;
        // memory_mib has no upper bound of its own: a huge one must not wrap around.
        if cpu_used.saturating_add(cpu) > cap.cpu_total
            || mem_used.saturating_add(memory_mib) > cap.memory_total_mib
        {
            return Err(VmError::NoCapacity {
                cpu,
                memory_mib,
                cpu_free: cap.cpu_total.saturating_sub(cpu_used),
                memory_free_mib: cap.memory_total_mib.saturating_sub(mem_used),
                cpu_total: cap.cpu_total,
                memory_total_mib: cap.memory_total_mib,
            });
        }
        let status = Status {
            creating: true,
            ..Status::new(VmState::Starting)
        };
        // Chosen here, under the lock and before the first record: a VM is never
        // recorded (nor its VMM started) without the user it runs as.
        let jail_uid = match self.jailed() {
            true => Some(self.free_jail_uid(vms)?),
            false => None,
        };
        let vm = self.new_vm(id, spec, status, chrono::Utc::now(), jail_uid);
        vms.insert(id.to_owned(), vm.clone());
        Ok(vm)
    }

    async fn plug_nics(&self, vm: &Vm) -> Result<(), VmError> {
        // A jailed VMM opens its TAPs by name as its own user: they must be its.
        let owner = match self.jailed() && !vm.spec.nics.is_empty() {
            true => Some(self.jail_uid(vm)?),
            false => None,
        };
        for (index, nic) in vm.spec.nics.iter().enumerate() {
            self.networks.plug(&vm.id, index, nic, owner).await?;
        }
        Ok(())
    }

    async fn unplug_nics(&self, vm: &Vm) {
        for (index, nic) in vm.spec.nics.iter().enumerate() {
            self.networks.unplug(&vm.id, index, nic).await;
        }
    }

    /// Undoes a create that could not start: nothing of the VM is left.
    fn roll_back(&self, vm: &Vm) {
        let _ = std::fs::remove_dir_all(&vm.dir);
        if let Err(e) = record::remove(&self.config.vms_dir(), &vm.id) {
            tracing::error!("{e}");
        }
        // Last, as a delete does: until here a create of the same id is refused.
        self.vms().remove(&vm.id);
    }

    /// Makes the VM's files (idempotent) and starts its VMM; returns once the VMM answers
    /// on its socket, or has already ended.
    async fn start(self: &Arc<Self>, vm: &Arc<Vm>) -> Result<(), VmError> {
        let io = |what: String| move |source| VmError::Io { what, source };
        std::fs::create_dir_all(&vm.dir)
            .map_err(io(format!("cannot create {}", vm.dir.display())))?;
        let boot = self.boot_files(vm).await?;
        let vmm_dir = vm.vmm_dir();
        std::fs::create_dir_all(&vmm_dir)
            .map_err(io(format!("cannot create {}", vmm_dir.display())))?;
        let mut jail = match self.jailed() {
            true => Some(JailPlan::new(self.jail_uid(vm)?, &vm.dir, &vmm_dir)?),
            false => None,
        };
        let mut args = vec![
            "--kernel".to_owned(),
            boot.kernel.display().to_string(),
            "--cmdline".to_owned(),
            boot.cmdline,
            "--cpus".to_owned(),
            vm.spec.vcpus.to_string(),
            "--memory".to_owned(),
            vm.spec.memory_mib.to_string(),
            "--console".to_owned(),
            format!(
                "file={},max={}",
                vm.console_path().display(),
                self.config.console_max_bytes
            ),
            "--api-socket".to_owned(),
            vm.socket.display().to_string(),
            "--status-file".to_owned(),
            vm.status_file().display().to_string(),
        ];
        if let Some(jail) = &mut jail {
            let from_cache = vm.spec.boot.image.is_some();
            for read_only in std::iter::once(&boot.kernel)
                .chain(&boot.initrd)
                .chain(&boot.root_base)
            {
                match from_cache {
                    true => jail.share_public(read_only)?,
                    false => jail.share_readable(read_only)?,
                }
            }
            if let Some(overlay) = &boot.root_overlay {
                jail.share(overlay, false)?;
            }
        }
        if let Some(initrd) = &boot.initrd {
            args.extend(["--initrd".to_owned(), initrd.display().to_string()]);
        }
        if let Some(root) = &boot.root_overlay {
            args.extend([
                "--disk".to_owned(),
                format!("id={ROOT_DISK_ID},path={},format=qcow2", root.display()),
            ]);
        }
        let attached = vm.status().attached.clone();
        for disk in vm.spec.disks.iter().chain(&attached) {
            let config = self.block_config(vm, disk).await?;
            let mut spec = match (&config.iscsi, &config.rbd) {
                (_, Some(rbd)) => {
                    if jail.is_some() {
                        check_jailed_rbd(&disk.id, rbd)?;
                    }
                    // id= is the Ceph client on an rbd: disk; the device's is device-id=.
                    let mut spec = format!("rbd:{},device-id={}", rbd.image, disk.id);
                    match &rbd.conf {
                        Some(conf) => {
                            let conf = vmm_secret(&jail, conf, &vmm_dir, &disk.id, "conf")?;
                            spec.push_str(&format!(",conf={}", conf.display()));
                        }
                        None => {
                            if let Some(jail) = &mut jail {
                                jail.share_if_present(Path::new("/etc/ceph"));
                            }
                        }
                    }
                    if let Some(id) = &rbd.id {
                        spec.push_str(&format!(",id={id}"));
                    }
                    if let Some(keyring) = &rbd.keyring {
                        let keyring = vmm_secret(&jail, keyring, &vmm_dir, &disk.id, "keyring")?;
                        spec.push_str(&format!(",keyring={}", keyring.display()));
                    }
                    spec.push_str(&format!(",timeout={}", rbd.timeout_secs));
                    spec
                }
                (Some(iscsi), None) => {
                    let mut spec = format!("{},id={}", iscsi.url, disk.id);
                    if let Some(initiator) = &iscsi.initiator {
                        spec.push_str(&format!(",initiator={initiator}"));
                    }
                    if let Some(path) = &iscsi.secret_file {
                        let path = vmm_secret(&jail, path, &vmm_dir, &disk.id, "secret")?;
                        spec.push_str(&format!(",secret-file={}", path.display()));
                    }
                    spec.push_str(&format!(",timeout={}", iscsi.timeout_secs));
                    spec
                }
                (None, None) => {
                    if let Some(jail) = &mut jail {
                        // A cached image is shared by VMs: never handed to one of them.
                        match &disk.source {
                            DiskSource::Image { .. } => jail.share_public(&config.path)?,
                            DiskSource::File { backing, .. } => {
                                jail.share(&config.path, disk.read_only)?;
                                // An ORIGIN's LIVE snapshots may be on several VMs at once.
                                for file in backing {
                                    jail.share_public(file)?;
                                }
                            }
                            _ => jail.share(&config.path, disk.read_only)?,
                        }
                    }
                    format!("id={},path={}", disk.id, config.path.display())
                }
            };
            if config.iscsi.is_some() || config.rbd.is_some() {
                if let Some(jail) = &mut jail {
                    // Monitors and portals may be given by name.
                    for file in NAME_RESOLUTION_FILES {
                        jail.share_if_present(Path::new(file));
                    }
                }
            }
            if config.format == VmmImageFormat::Qcow2 {
                spec.push_str(",format=qcow2");
            }
            if disk.read_only {
                spec.push_str(",ro=on");
            }
            if let Some(serial) = &disk.serial {
                spec.push_str(&format!(",serial={serial}"));
            }
            args.extend(["--disk".to_owned(), spec]);
        }
        if let Some(context) = &vm.spec.context {
            let path = vm.dir.join("context.img");
            let (ctx, method) = build_context(&vm.id, context)
                .map_err(|e| VmError::BadSpec(format!("context: {e}")))?;
            stratus_contextualizer::write_context_disk(&ctx, method, &path).map_err(|e| {
                VmError::Io {
                    what: format!("cannot write the context disk {}", path.display()),
                    source: std::io::Error::other(e),
                }
            })?;
            if jail.is_some() {
                // The context may carry secrets of the user's: the VM's user only.
                jail::give(&path, self.jail_uid(vm)?, 0o400)?;
            }
            args.extend([
                "--disk".to_owned(),
                format!("id={CONTEXT_DISK_ID},path={},ro=on", path.display()),
            ]);
        }
        for (index, nic) in vm.spec.nics.iter().enumerate() {
            let mut net = format!(
                "id={},tap={},mac={}",
                nic.id,
                tap_name(&vm.id, index),
                nic.mac
            );
            if nic.queues > 1 {
                net.push_str(&format!(",queues={}", nic.queues));
            }
            args.extend(["--net".to_owned(), net]);
        }
        // Disks hot-plugged since the VM was created come with its later starts (a guest
        // reboot, a create finished after a crash), in slots its first start kept free:
        // only what is left of those is kept free now, or the VMM would refuse to start.
        let devices = args
            .iter()
            .filter(|a| *a == "--disk" || *a == "--net")
            .count();
        let spare = usize::from(MAX_SLOT)
            .saturating_sub(devices)
            .min(usize::from(DEFAULT_SPARE_SLOTS));
        args.extend(["--pci-slots".to_owned(), spare.to_string()]);
        let _ = std::fs::remove_file(vm.status_file());
        let launch = match jail {
            Some(jail) => {
                let mut command = vec![self.config.vmm_binary.display().to_string()];
                command.extend(args);
                let spec = jail.into_spec(
                    &self.config.jailer,
                    &vm.id,
                    self.config.jail_root(&vm.id),
                    vm.spec.memory_mib,
                    u32::from(vm.spec.vcpus),
                    command,
                );
                VmmLaunch {
                    vmm_binary: self.launch_binary(),
                    args: spec.to_args(),
                    log: vm.log_path(),
                }
            }
            None => VmmLaunch {
                vmm_binary: self.launch_binary(),
                args,
                log: vm.log_path(),
            },
        };
        let process = VmmProcess::spawn(&launch)?;
        let pid = process.pid();
        let stop_requested = {
            let mut s = vm.status();
            s.pid = pid;
            s.pid_start_time = pid.and_then(supervisor::process_start_time);
            s.state = VmState::Starting;
            s.exit = None;
            s.started = Some(std::time::Instant::now());
            s.stop_requested
        };
        // A kill that came while the VMM was being restarted (guest reboot) may have
        // signalled the process that just ended: it applies to this one.
        if stop_requested {
            if let (Some(pid), Some(start)) = (pid, pid.and_then(supervisor::process_start_time)) {
                supervisor::signal_if_same(pid, start, libc::SIGKILL);
            }
        }
        self.save(vm);
        self.watch(vm.clone(), process);
        // Ready once the VMM answers on its socket (it binds it before building the VM).
        let client = vm.client();
        let ready = async {
            loop {
                if !vm.state().is_active() {
                    return;
                }
                if client.info().await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(START_TIMEOUT, ready).await.is_err() {
            tracing::warn!(
                "VM {}: the VMM did not answer within {START_TIMEOUT:?}",
                vm.id
            );
        }
        {
            let mut s = vm.status();
            if s.state == VmState::Starting {
                s.state = VmState::Running;
            }
        }
        self.save(vm);
        vm.changed.notify_waiters();
        Ok(())
    }

    /// Watches the VMM until it ends, then records how.
    fn watch(self: &Arc<Self>, vm: Arc<Vm>, process: VmmProcess) {
        let manager = self.clone();
        tokio::spawn(async move {
            let ended = process.wait().await;
            let exit = describe_exit(ended, &vm.status_file(), &vm.log_path());
            manager.vmm_ended(&vm, exit).await;
        });
    }

    /// What a jail left when its jailer could not clean up (it was killed): done before
    /// the VM's next start, which makes the same cgroup and root again.
    async fn clean_up_jail(&self, vm: &Vm) {
        let config = self.config.jailer.clone();
        let id = vm.id.clone();
        let root = self.config.jail_root(&vm.id);
        let _ = tokio::task::spawn_blocking(move || jail::clean_up(&config, &id, &root)).await;
    }

    async fn vmm_ended(self: &Arc<Self>, vm: &Arc<Vm>, exit: VmExit) {
        if self.jailed() {
            self.clean_up_jail(vm).await;
        }
        let stop_requested = vm.status().stop_requested;
        if exit.code == Some(EXIT_REBOOT) && !stop_requested {
            let backoff = {
                let mut s = vm.status();
                s.restarts += 1;
                let quick = s.started.is_some_and(|t| t.elapsed() < QUICK_REBOOT);
                s.quick_reboots = if quick { s.quick_reboots + 1 } else { 0 };
                reboot_backoff(s.quick_reboots)
            };
            if backoff.is_zero() {
                tracing::info!("VM {}: the guest rebooted; starting it again", vm.id);
            } else {
                tracing::warn!(
                    "VM {}: the guest keeps rebooting at once; starting it again in {backoff:?}",
                    vm.id
                );
                // A kill or shutdown meanwhile ends it here: there is no VMM to stop.
                vm.status().waiting_to_restart = true;
                let stopped = vm.wait_until(backoff, |s| s.stop_requested).await;
                vm.status().waiting_to_restart = false;
                if stopped {
                    self.mark_ended(
                        vm,
                        VmState::Stopped,
                        VmExit {
                            code: exit.code,
                            reason: "stopped while waiting to start again after a reboot".into(),
                            at: chrono::Utc::now(),
                        },
                    );
                    return;
                }
            }
            // Its TAPs and leases first: after an agent restart with its network gone from
            // the configuration, the VM would come back with none.
            let restarted = match self.plug_nics(vm).await {
                Ok(()) => Box::pin(self.start(vm)).await,
                Err(e)
                    if vm
                        .spec
                        .nics
                        .iter()
                        .any(|nic| self.networks.check(nic, &vm.id).is_err()) =>
                {
                    Err(e)
                }
                // A passing failure (netlink, nft) leaves its TAP from before on its bridge.
                Err(e) => {
                    tracing::warn!("VM {}: cannot plug its NICs again: {e}", vm.id);
                    Box::pin(self.start(vm)).await
                }
            };
            if let Err(e) = restarted {
                self.mark_ended(
                    vm,
                    VmState::Failed,
                    VmExit {
                        code: None,
                        reason: format!("cannot restart the VMM after a guest reboot: {e}"),
                        at: chrono::Utc::now(),
                    },
                );
            }
            return;
        }
        let state = match exit.code {
            Some(0) | Some(6) => VmState::Stopped,
            _ if stop_requested => VmState::Stopped,
            _ => VmState::Failed,
        };
        tracing::info!("VM {}: {} ({:?})", vm.id, exit.reason, state);
        self.metrics.vmm_exited(exit.code);
        self.mark_ended(vm, state, exit);
    }

    fn mark_ended(&self, vm: &Vm, state: VmState, exit: VmExit) {
        {
            let mut s = vm.status();
            s.state = state;
            s.exit = Some(exit);
            s.pid = None;
            s.pid_start_time = None;
        }
        self.save(vm);
        vm.changed.notify_waiters();
    }

    fn require_active(vm: &Vm, what: &'static str) -> Result<(), VmError> {
        let state = vm.state();
        if state.is_active() {
            Ok(())
        } else {
            Err(VmError::WrongState {
                id: vm.id.clone(),
                state,
                what,
            })
        }
    }

    /// What the VMM boots: the kernel given, or the image's (cached once on this host) with
    /// a copy-on-write root overlay made for this VM (kept across restarts).
    async fn boot_files(&self, vm: &Vm) -> Result<BootFiles, VmError> {
        let boot = &vm.spec.boot;
        let Some(image) = &boot.image else {
            return Ok(BootFiles {
                kernel: boot.kernel.clone().unwrap_or_default(),
                initrd: boot.initrd.clone(),
                cmdline: boot.cmdline.clone(),
                root_overlay: None,
                root_base: None,
            });
        };
        let cache = self.images.clone();
        let entry = image.clone();
        let (base, info) =
            tokio::task::spawn_blocking(move || cache.prepare_boot(&entry, &mut |_| {}))
                .await
                .map_err(|e| VmError::Io {
                    what: "the image preparation failed".into(),
                    source: std::io::Error::other(e),
                })??;
        let cmdline = [info.root_arg(), boot.cmdline.clone()]
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if vm.spec.disks.iter().any(|d| d.id == ROOT_DISK_ID) {
            // The root comes with the spec (a snapshot the cloud keeps): the image gives
            // the kernel, the initrd and the root filesystem's UUID only.
            return Ok(BootFiles {
                kernel: info.kernel,
                initrd: info.initrd,
                cmdline,
                root_overlay: None,
                root_base: None,
            });
        }
        let overlay = vm.dir.join("root.qcow2");
        if !overlay.exists() {
            let format = match image.format {
                Some(stratus_images::ImageFormat::Qcow2) => VmmImageFormat::Qcow2,
                _ => VmmImageFormat::Raw,
            };
            make_whole(&overlay, |at| {
                create_overlay(at, &base, format).map_err(std::io::Error::other)
            })
            .map_err(|source| VmError::Io {
                what: format!("cannot create the root overlay {}", overlay.display()),
                source,
            })?;
        }
        Ok(BootFiles {
            kernel: info.kernel,
            initrd: info.initrd,
            cmdline,
            root_overlay: Some(overlay),
            root_base: Some(base),
        })
    }

    /// The VMM's view of `disk`; a volatile disk's file is made here (sparse) if missing,
    /// and an image disk's image is fetched into the cache if it is not there.
    async fn block_config(&self, vm: &Vm, disk: &DiskSpec) -> Result<BlockConfig, VmError> {
        let mut config = BlockConfig::new("");
        match &disk.source {
            DiskSource::File { path, format, .. } => {
                config.path = path.clone();
                config.format = *format;
            }
            DiskSource::Rbd {
                image,
                conf,
                id,
                keyring,
                timeout_secs,
            } => {
                config.rbd = Some(RbdSource {
                    image: image.clone(),
                    conf: conf.clone(),
                    id: id.clone(),
                    keyring: keyring.clone(),
                    timeout_secs: timeout_secs.unwrap_or(RBD_DEFAULT_TIMEOUT_SECS),
                })
            }
            DiskSource::Iscsi {
                url,
                initiator,
                secret_file,
                chap_secret,
                timeout_secs,
            } => {
                let secret_file = match chap_secret {
                    Some(secret) => Some(vm.write_chap_secret(&disk.id, secret.expose())?),
                    None => secret_file.clone(),
                };
                config.iscsi = Some(IscsiSource {
                    url: url.clone(),
                    initiator: initiator.clone(),
                    secret_file,
                    timeout_secs: timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS),
                })
            }
            DiskSource::Image { entry } => {
                if entry.format == Some(stratus_images::ImageFormat::Qcow2) {
                    config.format = VmmImageFormat::Qcow2;
                }
                let cache = self.images.clone();
                let entry = entry.clone();
                config.path = tokio::task::spawn_blocking(move || cache.get(&entry, &mut |_| {}))
                    .await
                    .map_err(|e| VmError::Io {
                        what: "the image download failed".into(),
                        source: std::io::Error::other(e),
                    })??
            }
            DiskSource::Volatile { size_gib } => {
                let path = vm.volatile_path(&disk.id);
                if !path.exists() {
                    let io = |source| VmError::Io {
                        what: format!("cannot create {}", path.display()),
                        source,
                    };
                    std::fs::create_dir_all(&vm.dir).map_err(io)?;
                    make_whole(&path, |at| {
                        std::fs::File::create(at)?.set_len(size_gib << 30)
                    })
                    .map_err(io)?;
                }
                config.path = path
            }
        }
        config.id = Some(disk.id.clone());
        config.read_only = disk.read_only;
        config.serial = disk.serial.clone();
        Ok(config)
    }

    /// Hot-plugs a disk into the running VM; answers once the VMM has it on the bus and
    /// has told the guest (`driver_ready` in the VMM's view shows when the guest took it).
    pub async fn attach(&self, vm: &Arc<Vm>, disk: DiskSpec) -> Result<VmInfo, VmError> {
        Self::require_active(vm, "only a running VM takes a disk")?;
        validate_disk(&disk)?;
        {
            let mut status = vm.status();
            let taken = vm
                .spec
                .disks
                .iter()
                .chain(status.attached.iter())
                .any(|d| d.id == disk.id);
            if taken || !status.attaching.insert(disk.id.clone()) {
                return Err(VmError::DiskConflict(format!(
                    "VM '{}' already has a disk '{}'",
                    vm.id, disk.id
                )));
            }
        }
        let plugged = async {
            let mut config = self.block_config(vm, &disk).await?;
            if let Some(uid) = vm.jail_uid.get() {
                self.show_to_jail(vm, *uid, &disk, &mut config).await?;
            }
            vm.client().add_disk(&config).await?;
            Ok::<_, VmError>(())
        };
        let plugged = plugged.await;
        if plugged.is_err() {
            // A refused disk leaves nothing behind: no scratch file, no copy of a secret.
            // Removed while the id is still reserved, so no new attempt's files go too.
            Self::forget_disk_files(vm, &disk);
        }
        {
            let mut status = vm.status();
            status.attaching.remove(&disk.id);
            if plugged.is_ok() {
                status.attached.push(disk);
            }
        }
        plugged?;
        self.save(vm);
        Ok(self.info(vm).await)
    }

    /// Removes what the agent made on the host for a hot-plugged disk the VM no longer has
    /// (detached, or refused): its volatile file and every copy of its secrets, none of
    /// which may stay on the host.
    fn forget_disk_files(vm: &Vm, disk: &DiskSpec) {
        if matches!(disk.source, DiskSource::Volatile { .. }) {
            let _ = std::fs::remove_file(vm.volatile_path(&disk.id));
        }
        let _ = std::fs::remove_file(vm.dir.join(format!("{}.chap", disk.id)));
        jail::forget_secrets(&vm.vmm_dir(), &disk.id);
    }

    /// Makes a hot-plugged disk reachable in the VM's running jail: a file or device is
    /// shown at its path; a network disk's secrets are copied where the VM's user reads
    /// them, and the VMM is pointed at the copies.
    async fn show_to_jail(
        &self,
        vm: &Vm,
        uid: u32,
        disk: &DiskSpec,
        config: &mut BlockConfig,
    ) -> Result<(), VmError> {
        let vmm_dir = vm.vmm_dir();
        if let Some(rbd) = &config.rbd {
            check_jailed_rbd(&disk.id, rbd)?;
        }
        let pid = vm.status().pid;
        let Some(pid) = pid else {
            return Err(VmError::WrongState {
                id: vm.id.clone(),
                state: vm.state(),
                what: "its VMM is not running",
            });
        };
        if config.iscsi.is_some() || config.rbd.is_some() {
            // Portals and monitors may be given by name, and a VM started without network
            // disks has no resolver files in its jail yet.
            for file in NAME_RESOLUTION_FILES.map(Path::new) {
                if file.exists() {
                    jail::show_to_running(&self.config.jailer_binary(), pid, uid, file, true)
                        .await?;
                }
            }
            let plan = Some(JailPlan::new(uid, &vm.dir, &vmm_dir)?);
            let copy = |path: &mut PathBuf, kind: &str| -> Result<(), VmError> {
                *path = vmm_secret(&plan, path, &vmm_dir, &disk.id, kind)?;
                Ok(())
            };
            if let Some(path) = config.iscsi.as_mut().and_then(|i| i.secret_file.as_mut()) {
                copy(path, "secret")?;
            }
            if let Some(rbd) = config.rbd.as_mut() {
                if let Some(path) = rbd.conf.as_mut() {
                    copy(path, "conf")?;
                }
                if let Some(path) = rbd.keyring.as_mut() {
                    copy(path, "keyring")?;
                }
            }
            return Ok(());
        }
        let path = config.path.clone();
        let path = path.as_path();
        let shared = matches!(disk.source, DiskSource::Image { .. });
        let read_only = disk.read_only || shared;
        if path.starts_with(&vm.dir) {
            // Volatile disks: made in the VM's directory, which the jail has.
            jail::give(path, uid, 0o600)?;
            return Ok(());
        }
        let mut plan = JailPlan::new(uid, &vm.dir, &vm.vmm_dir())?;
        let backing = match &disk.source {
            DiskSource::File { backing, .. } => backing.as_slice(),
            _ => &[],
        };
        for file in backing {
            plan.share_public(file)?;
            jail::show_to_running(&self.config.jailer_binary(), pid, uid, file, true).await?;
        }
        match shared {
            true => plan.share_public(path)?,
            false => plan.share(path, read_only)?,
        }
        jail::show_to_running(&self.config.jailer_binary(), pid, uid, path, read_only).await?;
        Ok(())
    }

    /// Asks the guest to let go of a hot-plugged disk; answers once it has (the VMM
    /// dropped the disk), or 409 after `timeout` if it has not.
    pub async fn detach(
        &self,
        vm: &Arc<Vm>,
        disk_id: &str,
        timeout: Duration,
    ) -> Result<VmInfo, VmError> {
        Self::require_active(vm, "a stopped VM has no disks plugged")?;
        if vm.spec.disks.iter().any(|d| d.id == disk_id) {
            return Err(VmError::DiskConflict(format!(
                "disk '{disk_id}' was given when VM '{}' was created, not hot-plugged; it stays until the VM ends",
                vm.id
            )));
        }
        let Some(disk) = vm
            .status()
            .attached
            .iter()
            .find(|d| d.id == disk_id)
            .cloned()
        else {
            return Err(VmError::NotFound(format!("{}/disks/{disk_id}", vm.id)));
        };
        let client = vm.client();
        client.remove_disk(disk_id).await?;
        let gone = async {
            loop {
                match client.info().await {
                    Ok(info) if info.disks.iter().all(|d| d.id != disk_id) => return,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        };
        if tokio::time::timeout(timeout, gone).await.is_err() {
            return Err(VmError::DiskConflict(format!(
                "the guest of VM '{}' has not let go of disk '{disk_id}' within {timeout:?}; it is still being removed",
                vm.id
            )));
        }
        vm.status().attached.retain(|d| d.id != disk_id);
        Self::forget_disk_files(vm, &disk);
        self.save(vm);
        Ok(self.info(vm).await)
    }

    /// Ends the VM at once; returns when its VMM is gone.
    pub async fn kill(self: &Arc<Self>, vm: &Arc<Vm>) -> Result<VmInfo, VmError> {
        Self::require_active(vm, "there is nothing to kill")?;
        if self.no_vm() {
            self.end_without_vmm(vm);
            return Ok(self.info(vm).await);
        }
        if self.end_while_waiting_to_restart(vm).await {
            return Ok(self.info(vm).await);
        }
        vm.status().stop_requested = true;
        // Wakes a reboot back-off that began since the look above.
        vm.changed.notify_waiters();
        if let Err(e) = vm.client().stop().await {
            // A VMM that does not answer is ended by signal.
            tracing::warn!("VM {}: {e}; sending SIGKILL", vm.id);
            let s = vm.status().clone();
            if let (Some(pid), Some(start)) = (s.pid, s.pid_start_time) {
                supervisor::signal_if_same(pid, start, libc::SIGKILL);
            }
        }
        if !vm.wait_until(KILL_TIMEOUT, |s| !s.state.is_active()).await {
            let s = vm.status().clone();
            if let (Some(pid), Some(start)) = (s.pid, s.pid_start_time) {
                supervisor::signal_if_same(pid, start, libc::SIGKILL);
            }
            vm.wait_until(KILL_TIMEOUT, |s| !s.state.is_active()).await;
        }
        Ok(self.info(vm).await)
    }

    /// Presses the power button; after `timeout` a guest that has not powered off is
    /// stopped hard. Returns at once.
    pub async fn shutdown(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        timeout: Duration,
    ) -> Result<VmInfo, VmError> {
        Self::require_active(vm, "there is nothing to shut down")?;
        if self.no_vm() {
            self.end_without_vmm(vm);
            return Ok(self.info(vm).await);
        }
        // A guest between two VMMs has no power button; it is off already.
        if self.end_while_waiting_to_restart(vm).await {
            return Ok(self.info(vm).await);
        }
        vm.client().press_power_button().await?;
        // A guest may power off before this line: its watcher has ended the VM, which
        // must not be made Stopping again (it would stay so, with no VMM to stop).
        let still_running = {
            let mut s = vm.status();
            s.stop_requested = true;
            set_state_if_active_locked(&mut s, VmState::Stopping)
        };
        if still_running {
            self.save(vm);
            self.stop_if_still_running_after(vm.clone(), timeout);
        }
        Ok(self.info(vm).await)
    }

    /// Ends a VM whose guest rebooted and waits for its next VMM (the reboot back-off
    /// ends it on `stop_requested`); false when it has a VMM, which must be asked instead.
    async fn end_while_waiting_to_restart(&self, vm: &Vm) -> bool {
        {
            let mut s = vm.status();
            if !s.waiting_to_restart {
                return false;
            }
            s.stop_requested = true;
        }
        vm.changed.notify_waiters();
        vm.wait_until(KILL_TIMEOUT, |s| !s.state.is_active()).await;
        true
    }

    /// Stops the VM hard if it has not ended after `timeout` (a shutdown's second step).
    fn stop_if_still_running_after(self: &Arc<Self>, vm: Arc<Vm>, timeout: Duration) {
        let manager = self.clone();
        tokio::spawn(async move {
            if !vm.wait_until(timeout, |s| !s.state.is_active()).await {
                tracing::info!("VM {}: no power-off after {timeout:?}; stopping it", vm.id);
                if let Err(e) = manager.kill(&vm).await {
                    tracing::error!("VM {}: {e}", vm.id);
                }
            }
        });
    }

    pub async fn pause(&self, vm: &Arc<Vm>) -> Result<VmInfo, VmError> {
        Self::require_active(vm, "only a running VM can be paused")?;
        if !self.no_vm() {
            vm.client().pause().await?;
        }
        // The VM may have ended while its VMM answered: that end stands.
        if !set_state_if_active(vm, VmState::Paused) {
            return Err(VmError::WrongState {
                id: vm.id.clone(),
                state: vm.state(),
                what: "it ended while being paused",
            });
        }
        self.save(vm);
        Ok(self.info(vm).await)
    }

    pub async fn resume(&self, vm: &Arc<Vm>) -> Result<VmInfo, VmError> {
        Self::require_active(vm, "only a paused VM can be resumed")?;
        if !self.no_vm() {
            vm.client().resume().await?;
        }
        if !set_state_if_active(vm, VmState::Running) {
            return Err(VmError::WrongState {
                id: vm.id.clone(),
                state: vm.state(),
                what: "it ended while being resumed",
            });
        }
        self.save(vm);
        Ok(self.info(vm).await)
    }

    /// The console's last `bytes` bytes (also after the VM ended).
    pub fn console(&self, vm: &Vm, bytes: u64) -> Result<Vec<u8>, VmError> {
        stratus_vmm::console_log::tail(&vm.console_path(), bytes).map_err(|e| VmError::Io {
            what: "cannot read the console".into(),
            source: std::io::Error::other(e),
        })
    }

    /// Forgets an ended VM and removes what the agent made for it (volatile disks,
    /// console, socket, record). Persistent volumes (file disks) are never touched.
    pub async fn delete(&self, vm: &Vm) -> Result<(), VmError> {
        {
            let mut s = vm.status();
            let refused = |what| VmError::WrongState {
                id: vm.id.clone(),
                state: s.state,
                what,
            };
            if s.state.is_active() {
                return Err(refused("kill or shut it down first"));
            }
            if s.deleting {
                return Err(refused("it is being deleted"));
            }
            s.deleting = true;
        }
        // The id stays taken until everything is gone: a create of the same id meanwhile
        // would have its directory and record removed by this delete.
        let result = self.remove_files(vm).await;
        match &result {
            Ok(()) => {
                self.vms().remove(&vm.id);
                // `deleting` stays: a late save of the ended VM must not write it back.
                vm.changed.notify_waiters();
            }
            Err(_) => {
                vm.status().deleting = false;
                vm.changed.notify_waiters();
                // What changed while the delete was under way was not saved.
                self.save(vm);
            }
        }
        result
    }

    async fn remove_files(&self, vm: &Vm) -> Result<(), VmError> {
        self.unplug_nics(vm).await;
        if let Err(e) = std::fs::remove_dir_all(&vm.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("VM {}: cannot remove {}: {e}", vm.id, vm.dir.display());
            }
        }
        if self.jailed() {
            self.clean_up_jail(vm).await;
        }
        let _removing = vm.record.lock().unwrap_or_else(|e| e.into_inner());
        record::remove(&self.config.vms_dir(), &vm.id)?;
        Ok(())
    }

    pub fn set_host_state(&self, state: HostState) -> Result<(), VmError> {
        write_host_state(&self.config.state_dir, state).map_err(|source| VmError::Io {
            what: "cannot record the host state".into(),
            source,
        })?;
        *self.host_state.lock().unwrap_or_else(|e| e.into_inner()) = state;
        Ok(())
    }

    pub fn host_info(&self) -> HostInfo {
        let vms = self.vms();
        let (cpu_allocated, memory_allocated_mib) = Self::allocated(&vms);
        let mut vms_by_state = BTreeMap::new();
        for vm in vms.values() {
            let state = serde_json::to_value(vm.state())
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            *vms_by_state.entry(state).or_insert(0) += 1;
        }
        let running_vms = vms.values().filter(|vm| vm.state().is_active()).count();
        let (disk_total, disk_free) = host::filesystem_space(&self.config.state_dir);
        HostInfo {
            hostname: host::hostname(),
            state: *self.host_state.lock().unwrap_or_else(|e| e.into_inner()),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            running_vms,
            vms_by_state,
            cpu_total: self.capacity.cpu_total,
            cpu_allocated,
            cpu_free: self.capacity.cpu_total.saturating_sub(cpu_allocated),
            memory_total_mib: self.capacity.memory_total_mib,
            memory_allocated_mib,
            memory_free_mib: self
                .capacity
                .memory_total_mib
                .saturating_sub(memory_allocated_mib),
            load_1m: host::load_1m(),
            state_disk_total_bytes: disk_total,
            state_disk_free_bytes: disk_free,
            hypervisor: host::hypervisor(),
        }
    }

    /// The host's image cache.
    pub fn image_cache(&self) -> Arc<ImageCache> {
        self.images.clone()
    }

    /// The VMs (not deleted) whose root overlay or disks need image `id`.
    pub fn vms_using(&self, id: &str) -> Vec<String> {
        self.vms()
            .values()
            .filter(|vm| {
                let boot = vm.spec.boot.image.iter().map(|m| &m.identifier);
                let disks: Vec<DiskSpec> = vm
                    .spec
                    .disks
                    .iter()
                    .chain(vm.status().attached.iter())
                    .cloned()
                    .collect();
                boot.chain(disks.iter().filter_map(|d| match &d.source {
                    DiskSource::Image { entry } => Some(&entry.identifier),
                    _ => None,
                }))
                .any(|i| i.as_str() == id)
            })
            .map(|vm| vm.id.clone())
            .collect()
    }

    /// The full info of one VM, by id.
    pub async fn info_of(&self, id: &str) -> Result<VmInfo, VmError> {
        let vm = self.get(id)?;
        Ok(self.info(&vm).await)
    }
}

fn host_state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("host-state.json")
}

fn read_host_state(state_dir: &Path) -> HostState {
    std::fs::read(host_state_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(HostState::Enabled)
}

fn write_host_state(state_dir: &Path, state: HostState) -> std::io::Result<()> {
    let path = host_state_path(state_dir);
    let tmp = state_dir.join(".host-state.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&state).map_err(std::io::Error::other)?,
    )?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file the agent reuses at a restart is never one a kill left half-made: until it
    /// is whole it is under another name, which the next attempt starts afresh.
    #[test]
    fn disk_files_appear_only_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratch.img");
        let failed = make_whole(&path, |at| {
            std::fs::write(at, b"half")?;
            Err(std::io::Error::other("killed here"))
        });
        assert!(failed.is_err());
        assert!(!path.exists(), "nothing at the final name");
        make_whole(&path, |at| {
            assert_eq!(
                std::fs::metadata(at).ok().map(|m| m.len()),
                None,
                "started afresh"
            );
            std::fs::File::create(at)?.set_len(1 << 20)
        })
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }

    #[test]
    fn quick_reboots_past_the_first_few_wait_longer_each_time_up_to_a_minute() {
        let waits: Vec<u64> = (0..=12).map(|n| reboot_backoff(n).as_secs()).collect();
        assert_eq!(waits, [0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
