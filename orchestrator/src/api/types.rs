//! The orchestrator's wire types: served here, imported by the `stratus` CLI and the web
//! console.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::instance_types::InstanceType;
pub use crate::networks::Lease;
pub use crate::users::{Role, UserInfo};

/// `POST /vms`: what `stratus-run-instance` sends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The image's 27-character Marketplace identifier.
    pub image: String,
    /// An instance type (default m1.small).
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Overrides of the type's vCPUs, memory and swap.
    #[serde(default)]
    pub cpu: Option<u8>,
    #[serde(default)]
    pub ram_mib: Option<u64>,
    #[serde(default)]
    pub swap_mib: Option<u64>,
    /// Also the guest's hostname: letters, digits, '-' and '.'. Default `one-<id>`, as in
    /// StratusLab.
    #[serde(default)]
    pub name: Option<String>,
    /// The SSH public key put in the context.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Context pairs (`--context K=V#K2=V2`, `--context-file`).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    /// `one` (default), `cloud-init` or `nocloud`.
    #[serde(default)]
    pub context_method: Option<String>,
    /// cloud-init user data.
    #[serde(default)]
    pub user_data: Option<String>,
    /// The network to lease an address on (default `public` when the cloud has one;
    /// `--local-ip`/`--private-ip` choose the others).
    #[serde(default)]
    pub network: Option<String>,
    /// A particular address of that network (`--address`).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub address: Option<Ipv4Addr>,
    /// Marketplace images attached read-only (`--readonly-disk`), cached on the node.
    #[serde(default)]
    pub readonly_disks: Vec<String>,
    /// Persistent volumes attached at boot (`--persistent-disk`), by UUID: each must be
    /// the caller's (or public) and attached to no other VM.
    #[serde(default)]
    pub persistent_disks: Vec<String>,
    /// A volatile disk of this many GiB (`--volatile-disk`).
    #[serde(default)]
    pub volatile_disk_gib: Option<u64>,
    /// Node requirements (`--vm-requirements`), e.g. `hypervisor = "kvm" & cpu_free >= 4`.
    #[serde(default)]
    pub requirements: Option<String>,
}

/// StratusLab's VM states (title-case, as `stratus-describe-instance` shows them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VmState {
    /// Accepted, waiting for a node.
    Pending,
    /// On its node: image, disks, context and network being prepared.
    Prolog,
    Boot,
    Running,
    /// A graceful shutdown is under way.
    Shutdown,
    /// The VM has ended; its node resources are being released.
    Epilog,
    Done,
    Failed,
    /// Its node does not answer.
    Unknown,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "Pending",
            VmState::Prolog => "Prolog",
            VmState::Boot => "Boot",
            VmState::Running => "Running",
            VmState::Shutdown => "Shutdown",
            VmState::Epilog => "Epilog",
            VmState::Done => "Done",
            VmState::Failed => "Failed",
            VmState::Unknown => "Unknown",
        }
    }

    pub fn parse(text: &str) -> Option<VmState> {
        [
            VmState::Pending,
            VmState::Prolog,
            VmState::Boot,
            VmState::Running,
            VmState::Shutdown,
            VmState::Epilog,
            VmState::Done,
            VmState::Failed,
            VmState::Unknown,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Done and Failed are final.
    pub fn is_final(self) -> bool {
        matches!(self, VmState::Done | VmState::Failed)
    }
}

/// One state change of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmEvent {
    pub at: String,
    pub state: VmState,
    pub reason: Option<String>,
}

/// A VM as users see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub id: i64,
    pub name: String,
    pub owner: String,
    pub state: VmState,
    /// Why it is in that state (a refusal, a failure, the guest powering off…).
    pub reason: Option<String>,
    pub instance_type: String,
    pub cpu: i64,
    pub ram_mib: i64,
    pub swap_mib: i64,
    pub image: String,
    /// The node it runs on (shown to admins only).
    pub node: Option<String>,
    pub leases: Vec<Lease>,
    /// Whether it still holds quota, addresses and node room.
    pub holds_resources: bool,
    pub created: String,
    pub updated: String,
    /// Every state change, oldest first (`GET /vms/{id}` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<VmEvent>,
}

/// `POST /vms` (201), `POST /vms/{id}/kill|shutdown` (202): the VM and the job working on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmAccepted {
    pub vm: VmView,
    pub job: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<VmView>,
    /// All VMs the caller may see (the list is one page of them).
    pub count: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Success,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: i64,
    pub vm: i64,
    /// deploy | kill | shutdown | epilog
    pub action: String,
    pub state: JobState,
    pub progress: i64,
    pub attempts: i64,
    pub error: Option<String>,
    pub created: String,
    pub updated: String,
}

/// `POST /nodes` (admins).
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeAdd {
    pub name: String,
    /// The agent's base URL, e.g. `http://node1.example.org:8776`.
    pub url: String,
    /// The agent's bearer token.
    pub token: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Enabled,
    Disabled,
    Maintenance,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Enabled => "enabled",
            NodeState::Disabled => "disabled",
            NodeState::Maintenance => "maintenance",
        }
    }
}

/// `PUT /nodes/{name}/state` (admins).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeStateRequest {
    pub state: NodeState,
}

/// A node as StratusLab's host table shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: i64,
    pub name: String,
    pub url: String,
    pub state: NodeState,
    /// new (never polled), up, down.
    pub health: String,
    /// VMs placed here that hold resources (RVM).
    pub running_vms: i64,
    /// vCPUs: total (TCPU), free (FCPU), allocated (ACPU).
    pub cpu_total: i64,
    pub cpu_free: i64,
    pub cpu_allocated: i64,
    /// Memory in MiB: total, free, allocated.
    pub memory_total_mib: i64,
    pub memory_free_mib: i64,
    pub memory_allocated_mib: i64,
    pub load_1m: f64,
    pub disk_free_bytes: i64,
    pub hypervisor: Option<String>,
    pub agent_version: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub last_seen: Option<String>,
    pub last_error: Option<String>,
}

/// `POST /users` (admins): the password, or the hash of it the user made with
/// `stratus-hash-password` (one of the two).
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserAdd {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    #[serde(default = "default_role")]
    pub role: Role,
}

fn default_role() -> Role {
    Role::User
}

/// `PUT /users/{name}/quotas` (admins): absent = the cloud's default.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaUpdate {
    #[serde(default)]
    pub cpu: Option<i64>,
    #[serde(default)]
    pub memory_mib: Option<i64>,
    #[serde(default)]
    pub vms: Option<i64>,
}

/// `GET /quotas`: the caller's limits (0 = none) and use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QuotaView {
    pub user: String,
    pub cpu: i64,
    pub cpu_used: i64,
    pub memory_mib: i64,
    pub memory_used_mib: i64,
    pub vms: i64,
    pub vms_used: i64,
}

/// `GET /networks` (admins): each network with its leases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkView {
    pub name: String,
    pub kind: String,
    pub addresses: i64,
    pub free: i64,
    pub leases: Vec<LeaseHolder>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseHolder {
    pub ip: String,
    pub mac: String,
    pub vm: i64,
}

/// Every error: `{"error": "<reason>"}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}
