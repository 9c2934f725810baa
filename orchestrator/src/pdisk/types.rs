//! pdisk's wire types: served by the orchestrator, imported by the CLI.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Private,
    Public,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Public => "public",
        }
    }
}

/// StratusLab's six volume types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VolumeKind {
    MachineImageOrigin,
    MachineImageLive,
    DataImageOrigin,
    DataImageLive,
    DataImageRawReadonly,
    DataImageRawReadWrite,
}

impl VolumeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::MachineImageOrigin => "MACHINE_IMAGE_ORIGIN",
            VolumeKind::MachineImageLive => "MACHINE_IMAGE_LIVE",
            VolumeKind::DataImageOrigin => "DATA_IMAGE_ORIGIN",
            VolumeKind::DataImageLive => "DATA_IMAGE_LIVE",
            VolumeKind::DataImageRawReadonly => "DATA_IMAGE_RAW_READONLY",
            VolumeKind::DataImageRawReadWrite => "DATA_IMAGE_RAW_READ_WRITE",
        }
    }

    const ALL: [VolumeKind; 6] = [
        VolumeKind::MachineImageOrigin,
        VolumeKind::MachineImageLive,
        VolumeKind::DataImageOrigin,
        VolumeKind::DataImageLive,
        VolumeKind::DataImageRawReadonly,
        VolumeKind::DataImageRawReadWrite,
    ];

    /// The kind [`as_str`](Self::as_str) names.
    pub fn from_name(name: &str) -> Option<VolumeKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// An image that snapshots are taken of: attached read-only, so they stay true to it.
    pub fn is_origin(self) -> bool {
        matches!(
            self,
            VolumeKind::MachineImageOrigin | VolumeKind::DataImageOrigin
        )
    }

    pub fn is_live(self) -> bool {
        matches!(
            self,
            VolumeKind::MachineImageLive | VolumeKind::DataImageLive
        )
    }

    /// The kind of a snapshot of this ORIGIN (or of this LIVE's siblings).
    pub fn live(self) -> VolumeKind {
        match self {
            VolumeKind::MachineImageOrigin | VolumeKind::MachineImageLive => {
                VolumeKind::MachineImageLive
            }
            _ => VolumeKind::DataImageLive,
        }
    }

    /// The kind of the ORIGIN a rebase of this LIVE makes.
    pub fn origin(self) -> VolumeKind {
        match self {
            VolumeKind::MachineImageOrigin | VolumeKind::MachineImageLive => {
                VolumeKind::MachineImageOrigin
            }
            _ => VolumeKind::DataImageOrigin,
        }
    }
}

/// `POST /disks` (`stratus-create-volume`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    /// 1 to 1024.
    pub size_gib: i64,
    /// At most 40 characters.
    #[serde(default)]
    pub tag: Option<String>,
    /// private (default) or public.
    #[serde(default)]
    pub visibility: Option<Visibility>,
    /// Default DATA_IMAGE_RAW_READ_WRITE.
    #[serde(default, rename = "type")]
    pub kind: Option<VolumeKind>,
    /// The pool to make it in (`GET /pools`); default: the cloud's default pool.
    #[serde(default)]
    pub pool: Option<String>,
}

/// `PUT /disks/{uuid}` (`stratus-update-volume`): absent fields are kept.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeUpdate {
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub visibility: Option<Visibility>,
    #[serde(default, rename = "type")]
    pub kind: Option<VolumeKind>,
}

/// Where a volume is attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MountView {
    pub vm_id: i64,
    /// The guest device StratusLab named it by (`vda`…, `vdz` downwards when hot-plugged).
    pub device: String,
    pub hotplugged: bool,
    /// attaching | attached | detaching
    pub state: String,
    pub since: String,
}

/// A volume as `stratus-describe-volumes` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeView {
    pub uuid: String,
    pub owner: String,
    pub tag: String,
    pub size_gib: i64,
    pub visibility: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub identifier: Option<String>,
    pub seed: bool,
    pub base_uuid: Option<String>,
    pub quarantine: Option<String>,
    /// creating | available | deleting
    pub state: String,
    /// The pool it is kept in (`GET /pools`).
    pub pool: String,
    /// As StratusLab counted: an ORIGIN's LIVE snapshots, any other volume's mounts (0 or
    /// 1: a volume is attached to one VM at a time).
    pub count: i64,
    /// The mounts the asker may see: all of them for the volume's owner and admins, those
    /// on the asker's own VMs for other users of a public volume.
    pub mounts: Vec<MountView>,
    /// Mounts on other users' VMs, left out of `mounts` for this asker.
    #[serde(default)]
    pub hidden_mounts: i64,
    pub created: String,
    pub updated: String,
}

/// `POST /disks/{uuid}/mounts` (`stratus-attach-volume`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    pub vm_id: i64,
}

/// An attach or detach accepted: the job that carries it out on the VM's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MountAccepted {
    pub uuid: String,
    pub vm_id: i64,
    pub device: String,
    pub job: i64,
}

/// One configured storage pool: what its storage holds and has free, and the volumes on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    /// What volumes name it by (their `pool`).
    pub name: String,
    /// `file`, `iscsi` or `rbd`.
    pub kind: String,
    /// Whether new volumes go here when their request names no pool.
    pub default: bool,
    /// The directory (file, iSCSI), the portal (iSCSI) or the Ceph pool (rbd).
    pub location: String,
    /// The storage's size and free space in bytes (for RBD: what the pool stores plus what
    /// Ceph can still place in it); absent when the storage did not answer (`error` says
    /// why).
    pub total_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
    /// What the volumes' data takes (thin volumes: what was written): the files' allocated
    /// blocks, or `rbd du`'s used size.
    pub used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub volumes: i64,
    /// The volumes' sizes together (thin: what they may grow to, not what they use).
    pub provisioned_gib: i64,
}

/// A volume as the node agent gets it.
#[derive(Clone, Debug)]
pub struct NodeDisk {
    pub uuid: String,
    pub device: String,
    /// The volume's file, its LUN's `iscsi://` URL or its image's `rbd:` name.
    pub location: String,
    /// Its base volume's location (a LIVE's ORIGIN, which a file-pool LIVE reads through).
    pub base_location: Option<String>,
    pub read_only: bool,
    /// How the node logs in to the volume's iSCSI target: set by `Storage::prepare` for
    /// the node the VM is on.
    pub iscsi_login: Option<IscsiLogin>,
}

/// A node's way in to one iSCSI volume: its initiator name and the volume's CHAP account.
#[derive(Clone, Debug)]
pub struct IscsiLogin {
    pub initiator: String,
    pub user: String,
    pub secret: stratus_nodeagent::api::types::ChapSecret,
}
