//! The agent's wire types: served here, imported by the orchestrator.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
pub use stratus_vmm::devices::virtio::block::io::ImageFormat;
use utoipa::ToSchema;

fn is_raw(format: &ImageFormat) -> bool {
    *format == ImageFormat::Raw
}

/// Everything a VM is made of. `PUT /vms/{id}` with the same spec again is a no-op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub boot: BootSpec,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// The context disk the guest reads its key, hostname and pairs from.
    #[serde(default)]
    pub context: Option<ContextSpec>,
}

/// What goes on the VM's context disk (made on the node by stratus-contextualizer and
/// attached read-only as the disk `context`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContextSpec {
    /// `one` (HEPiX CD, StratusLab's default), `cloud-init` (StratusLab's VFAT disk) or
    /// `nocloud` (cloud-init's NoCloud seed).
    #[serde(default = "default_context_method")]
    pub method: String,
    /// Default: the VM's id.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The user's SSH public key.
    #[serde(default)]
    pub public_key: Option<String>,
    /// The user's context pairs (`--context K=V`).
    #[serde(default)]
    pub pairs: BTreeMap<String, String>,
    /// cloud-init user data.
    #[serde(default)]
    pub user_data: Option<String>,
}

fn default_context_method() -> String {
    "one".into()
}

/// A NIC on one of the host's networks, with the address the orchestrator leased for it:
/// the agent makes its TAP on the network's bridge and has DHCP answer its MAC with `ip`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub id: String,
    /// A network of the agent's configuration (`public`, `local`, `private`, …).
    pub network: String,
    /// StratusLab's convention is `02:00` followed by the four bytes of the address.
    pub mac: String,
    #[schema(value_type = String)]
    pub ip: std::net::Ipv4Addr,
    /// The name DHCP gives the guest (default: the VM's id).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Queue pairs, at most the VM's vCPUs (up to 16): more than one makes the TAP
    /// multi-queue, so the guest spreads its traffic over that many vCPUs and VMM threads.
    #[serde(default = "one_queue", skip_serializing_if = "is_one_queue")]
    pub queues: u16,
}

fn one_queue() -> u16 {
    1
}

fn is_one_queue(queues: &u16) -> bool {
    *queues == 1
}

/// How the VM boots: a kernel on this host, or a Marketplace image (its kernel and initrd
/// are found inside it, and its root disk is a copy-on-write overlay on the cached image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// A kernel on this host (ELF vmlinux or bzImage).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (for an image, after its `root=UUID=…`).
    #[serde(default)]
    pub cmdline: String,
    /// The Marketplace entry (JSON form) of the image to boot; the node caches the image
    /// once (checked against the site policy, its size and every checksum). The VM's root
    /// is a copy-on-write overlay of it made on this node, unless `disks` has one with id
    /// `root`: then that disk (a snapshot the cloud keeps) is the root, and the image gives
    /// only the kernel, the initrd and the root filesystem's UUID.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub image: Option<stratus_images::Metadata>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The disk's name in the VMM (and in `PUT/DELETE /vms/{id}/disks/{disk}`).
    pub id: String,
    pub source: DiskSource,
    #[serde(default)]
    pub read_only: bool,
    /// What the guest reads as the disk's serial (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DiskSource {
    /// A file or block device on this host that outlives the VM (a persistent volume):
    /// raw, or a qcow2 overlay (a pdisk LIVE snapshot) that reads through the files in
    /// `backing`, which the VMM is shown read-only and which must be all its header names.
    File {
        #[schema(value_type = String)]
        path: PathBuf,
        #[serde(default, skip_serializing_if = "is_raw")]
        #[schema(value_type = String, example = "raw")]
        format: ImageFormat,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schema(value_type = Vec<String>)]
        backing: Vec<PathBuf>,
    },
    /// A sparse raw disk of this many GiB made on the node for this VM and deleted with it.
    Volatile { size_gib: u64 },
    /// An iSCSI LUN the VMM logs in to itself (no kernel initiator on the node), as
    /// `iscsi://[USER@]HOST[:PORT]/TARGET-IQN/LUN`. The CHAP secret of the URL's user is
    /// either in `secret_file` on this host (mode 0600) or, as pdisk hands out a volume's
    /// own credentials, `chap_secret`: kept in the VM's record (mode 0600) and a file the
    /// VMM alone reads, and never shown by the API.
    Iscsi {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initiator: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        secret_file: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        chap_secret: Option<ChapSecret>,
        /// Seconds a request may wait for the target before the guest gets an I/O error.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u32>,
    },
    /// A Ceph RBD image (`POOL/IMAGE`, or `POOL/IMAGE@SNAP`, read-only) the VMM opens
    /// itself through librbd, with the cluster's `conf` and the client `id`/`keyring` on
    /// this host.
    Rbd {
        image: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        conf: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        keyring: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u32>,
    },
    /// A Marketplace image (its entry, JSON form), cached once on this host and attached
    /// read-only (StratusLab's `--readonly-disk`).
    Image {
        #[schema(value_type = Object)]
        entry: Box<stratus_images::Metadata>,
    },
}

/// A CHAP secret: sent and stored as the plain string, never shown by `{:?}`, so a
/// logged request or record does not carry it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChapSecret(String);

impl ChapSecret {
    pub fn new(secret: String) -> Self {
        ChapSecret(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ChapSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChapSecret(..)")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The VMM is being started.
    Starting,
    Running,
    Paused,
    /// A shutdown or kill is under way.
    Stopping,
    /// The VMM exited: the guest powered off, or it was stopped on purpose.
    Stopped,
    /// The VMM exited with an error (guest panic, VMM error, killed from outside).
    Failed,
}

impl VmState {
    /// Whether a VMM process exists (or is about to) for a VM in this state.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

/// How the VMM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmExit {
    /// The VMM's exit status (see stratus-vmm); absent when it was killed by a signal.
    pub code: Option<i32>,
    pub reason: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// `PUT /vms/{id}/disks/{disk}`: a disk to hot-plug into the running VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachDisk {
    pub source: DiskSource,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub serial: Option<String>,
}

/// `GET /vms/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    pub id: String,
    pub state: VmState,
    pub spec: VmSpec,
    /// Disks hot-plugged since the VM was created (kept across guest reboots).
    pub attached: Vec<DiskSpec>,
    /// The VMM's process id while it runs.
    pub pid: Option<u32>,
    pub exit: Option<VmExit>,
    /// Guest reboots the agent has restarted the VM for.
    pub restarts: u32,
    pub created: chrono::DateTime<chrono::Utc>,
    /// Per-device counters from the VMM (running VMs only).
    #[schema(value_type = Option<Object>)]
    pub counters: Option<stratus_vmm::api::CountersReport>,
}

/// `GET /vms`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<VmInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Takes new VMs.
    Enabled,
    /// Takes no new VMs; running ones go on.
    Disabled,
    /// Takes no new VMs (being serviced).
    Maintenance,
}

/// `PUT /host/state`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostStateRequest {
    pub state: HostState,
}

/// `GET /host`: the columns of StratusLab's host table and a little more.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    pub hostname: String,
    pub state: HostState,
    pub agent_version: String,
    pub running_vms: usize,
    pub vms_by_state: BTreeMap<String, usize>,
    /// vCPUs the host offers (CPUs × overcommit), handed out, and free.
    pub cpu_total: u64,
    pub cpu_allocated: u64,
    pub cpu_free: u64,
    /// Guest memory (MiB) the host offers, handed out, and free.
    pub memory_total_mib: u64,
    pub memory_allocated_mib: u64,
    pub memory_free_mib: u64,
    /// 1-minute load average.
    pub load_1m: f64,
    /// The filesystem holding VM disks and records.
    pub state_disk_total_bytes: u64,
    pub state_disk_free_bytes: u64,
    /// Whether `/dev/kvm` is there, and what kind (PVM, VT-x, AMD-V).
    pub hypervisor: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Downloading,
    Ready,
    Failed,
}

/// `GET /images/{id}`: an image in the host's cache, or on its way there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    pub identifier: String,
    pub state: ImageState,
    /// The image's size (uncompressed).
    pub bytes: u64,
    /// Bytes written to the cache so far.
    pub written: u64,
    /// Why a prefetch failed.
    pub error: Option<String>,
    /// VMs whose root overlay or disks use it.
    pub used_by: Vec<String>,
}

/// `GET /images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

/// `POST /images`: what to prefetch — a Marketplace entry, the URL of one, or an
/// identifier looked up in the agent's `marketplace_endpoint`. Exactly one.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PrefetchRequest {
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub entry: Option<Box<stratus_images::Metadata>>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub identifier: Option<String>,
}

/// Every error: `{"error": "<reason>"}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chap_secret_travels_as_a_string_and_never_shows_in_debug_output() {
        let sent = r#"{"iscsi":{"url":"iscsi://pdisk-v@198.18.0.1/iqn.2026-12.test:v/1","chap_secret":"0123456789abcdef"}}"#;
        let source: DiskSource = serde_json::from_str(sent).unwrap();
        let DiskSource::Iscsi { chap_secret, .. } = &source else {
            panic!("{source:?}");
        };
        assert_eq!(
            chap_secret.as_ref().map(ChapSecret::expose),
            Some("0123456789abcdef")
        );
        assert_eq!(serde_json::to_string(&source).unwrap(), sent);
        let shown = format!("{source:?} {:?}", chap_secret);
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("ChapSecret(..)"), "{shown}");
    }
}
