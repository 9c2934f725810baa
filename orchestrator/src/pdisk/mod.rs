//! pdisk, StratusLab's persistent disk service, as part of the orchestrator: volumes that
//! outlive VMs, owned by users, private or public, attached to at most one VM at a time —
//! at deploy time or while the VM runs (the node agent's hot-plug).
//!
//! A volume is a row first: it is made `creating`, its storage is made, then it is
//! `available`; deleting goes `deleting` → storage removed → row removed. Whoever moves a
//! row into one of those passing states holds it while it works ([`hold`]); what a killed
//! orchestrator left in between is finished by any replica once its hold has lapsed
//! ([`recover`], at start and then periodically). Attach and
//! detach on a running VM are jobs of that VM, run in order with its other jobs.

pub mod file;
pub mod hold;
pub mod iscsi;
pub mod rbd;
pub mod roots;
pub mod types;

use std::path::{Path, PathBuf};

use sqlx::AnyConnection;
use stratus_vmm::devices::virtio::block::io::ImageFormat;

use crate::api::types::VmState;
use crate::db::{self, Db, DbError};
use crate::jobs::{self, Action};
use crate::nodes;
use crate::users::Principal;
use crate::vms::{self, VmError};
use crate::Cloud;
use hold::{Fence, Hold};
pub use types::*;

/// StratusLab's limits.
pub const MAX_SIZE_GIB: i64 = 1024;
pub const MAX_TAG_CHARS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no disk {0}")]
    NotFound(String),
    /// StratusLab's text for another user's disk (`uuid` is in the request already).
    #[error("Not enough rights to {action} disk")]
    NotYours { action: &'static str, uuid: String },
    #[error("{0}")]
    Conflict(String),
    #[error(
        "volume quota exceeded (Quota: {quota} GiB, Used: {used} GiB, Requested: {requested} GiB)."
    )]
    Quota {
        quota: i64,
        used: i64,
        requested: i64,
    },
    #[error("the volume storage failed: {0}")]
    Storage(#[source] std::io::Error),
    #[error("cannot cache image {identifier} in pdisk: {source}")]
    Image {
        identifier: String,
        #[source]
        source: stratus_images::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Vm(#[from] VmError),
    /// This replica stalled while it worked on the volume, and another one took the work
    /// over (and finishes it).
    #[error("disk {0} was taken over by another orchestrator while this one stalled")]
    TakenOver(String),
}

impl From<sqlx::Error> for VolumeError {
    fn from(e: sqlx::Error) -> Self {
        VolumeError::Db(e.into())
    }
}

/// Where volumes live: pools of sparse files in a directory, which nodes open at the
/// same path; of the same kind of files exported over iSCSI by this host's tgtd, which
/// nodes' VMMs log in to; or of images in a Ceph pool, which nodes' VMMs open through
/// librbd. A new volume goes to the pool its request names, else the default pool; a
/// volume stays where it was made and its location says which pool that is, so a cloud
/// that changes its configuration keeps serving the volumes it has as long as their pools
/// stay configured.
pub struct Storage {
    pools: Vec<Pool>,
    /// Indexes into `pools`.
    default: usize,
    roots: usize,
}

pub struct Pool {
    pub name: String,
    pub backend: PoolBackend,
}

pub enum PoolBackend {
    File(file::FileBackend),
    /// The exported LUNs' files live in the second's directory.
    Iscsi(iscsi::IscsiExport, file::FileBackend),
    Rbd(rbd::RbdPool),
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("volume pool '{pool}': cannot open {dir}: {source}")]
    Dir {
        pool: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume pool '{pool}': {source}")]
    Rbd {
        pool: String,
        #[source]
        source: rbd::RbdError,
    },
}

/// Where one volume lives, read from its location.
enum Backing<'a> {
    File(&'a std::path::Path),
    Iscsi(&'a iscsi::IscsiExport, &'a file::FileBackend),
    Rbd(&'a rbd::RbdPool, &'a str),
}

/// What a new volume's storage starts with.
#[derive(Clone, Copy, Debug)]
enum Content<'a> {
    /// Zeros: a volume a user created.
    Empty,
    /// A copy-on-write snapshot of the volume at this location (a LIVE of an ORIGIN).
    SnapshotOf(&'a str),
    /// A full, independent copy of the volume at this location (an ORIGIN rebased from a
    /// LIVE), which reads through the file at the second location if it is a LIVE on the
    /// file pool.
    CopyOf(&'a str, Option<&'a str>),
}

/// A file volume's qcow2 overlay (a LIVE) cannot be the ORIGIN of another.
fn no_overlay_of_overlay(source: &str) -> VolumeError {
    VolumeError::Conflict(format!(
        "the volume at {source} is itself a snapshot: rebase it into an ORIGIN first"
    ))
}

/// A failed copy: refused (a header naming an unexpected file) or broken storage.
fn copy_error(e: stratus_vmm::devices::virtio::block::io::DiskError) -> VolumeError {
    use stratus_vmm::devices::virtio::block::io::DiskError;
    match e {
        DiskError::Flatten { ref source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            VolumeError::Conflict(e.to_string())
        }
        e => storage_error(e),
    }
}

fn storage_error(e: impl std::error::Error + Send + Sync + 'static) -> VolumeError {
    VolumeError::Storage(std::io::Error::other(e))
}

impl Storage {
    /// The pools the configuration describes (checked by `Config::load`), or `None` if the
    /// cloud has no volumes.
    pub fn open(config: &crate::config::Config) -> Result<Option<Storage>, StorageError> {
        let configured = config.all_volume_pools();
        // Replicas on this host change one tgtd in turn, and so do this process's pools.
        let tgtadm_lock = configured
            .iter()
            .find(|p| p.iscsi.is_some())
            .and_then(|p| p.dir.as_ref())
            .map(|dir| dir.join(".tgtadm.lock"));
        let mut pools: Vec<Pool> = Vec::new();
        for pool in configured {
            let name = pool.name.clone();
            let open_dir = |dir: &Path| {
                file::FileBackend::open(dir).map_err(|source| StorageError::Dir {
                    pool: name.clone(),
                    dir: dir.to_owned(),
                    source,
                })
            };
            let backend = match (pool.dir.as_deref(), pool.iscsi, pool.rbd) {
                (_, _, Some(rbd)) => {
                    PoolBackend::Rbd(rbd::RbdPool::new(rbd).map_err(|source| {
                        StorageError::Rbd {
                            pool: name.clone(),
                            source,
                        }
                    })?)
                }
                (Some(dir), Some(iscsi), None) => {
                    let mut export = iscsi::IscsiExport::new(iscsi);
                    if let Some(lock) = &tgtadm_lock {
                        export = export.with_lock_file(lock.clone());
                    }
                    let first_export = pools.iter().find_map(|p| match &p.backend {
                        PoolBackend::Iscsi(export, _) => Some(export),
                        _ => None,
                    });
                    if let Some(first) = first_export {
                        export = export.sharing_changes_with(first);
                    }
                    PoolBackend::Iscsi(export, open_dir(dir)?)
                }
                (Some(dir), None, None) => PoolBackend::File(open_dir(dir)?),
                // Refused by `Config::load`.
                (None, _, None) => continue,
            };
            pools.push(Pool { name, backend });
        }
        let index_of = |name: Option<String>| {
            name.and_then(|name| pools.iter().position(|p| p.name == name))
                .unwrap_or(0)
        };
        let default = index_of(config.default_volume_pool_name());
        let roots = index_of(config.root_volume_pool_name());
        Ok((!pools.is_empty()).then_some(Storage {
            pools,
            default,
            roots,
        }))
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The pool a new volume goes to: the one named, else the default pool.
    pub fn pool_for(&self, name: Option<&str>) -> Result<&Pool, VolumeError> {
        let Some(name) = name else {
            return Ok(&self.pools[self.default]);
        };
        self.pools.iter().find(|p| p.name == name).ok_or_else(|| {
            VolumeError::BadRequest(format!(
                "no volume pool '{name}' (this cloud has: {})",
                self.pools
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The pool of image ORIGINs and VM roots (`root_volume_pool`).
    pub fn root_pool(&self) -> &Pool {
        &self.pools[self.roots]
    }

    /// Where Marketplace images are downloaded before they become ORIGINs: beside the root
    /// pool's files, or (an RBD root pool) in the first pool that has a directory.
    pub fn staging_dir(&self) -> Option<PathBuf> {
        std::iter::once(self.root_pool())
            .chain(&self.pools)
            .find_map(|p| p.files())
            .map(file::FileBackend::staging_dir)
    }

    fn iscsi_exports(&self) -> impl Iterator<Item = &iscsi::IscsiExport> {
        self.pools.iter().filter_map(|p| match &p.backend {
            PoolBackend::Iscsi(export, _) => Some(export),
            _ => None,
        })
    }

    /// The RBD pool a volume at `location` is in.
    pub fn rbd_at<'a>(&'a self, location: &'a str) -> Option<&'a rbd::RbdPool> {
        match self.backing(location) {
            Ok(Backing::Rbd(pool, _)) => Some(pool),
            _ => None,
        }
    }

    fn backing<'a>(&'a self, location: &'a str) -> Result<Backing<'a>, VolumeError> {
        let missing = |what: &str| {
            VolumeError::Conflict(format!(
                "volume at {location} is {what}, but no such pool is configured"
            ))
        };
        if location.starts_with("iscsi://") {
            self.pools
                .iter()
                .find_map(|p| match &p.backend {
                    PoolBackend::Iscsi(export, files) if export.owns(location) => {
                        Some(Backing::Iscsi(export, files))
                    }
                    _ => None,
                })
                .ok_or_else(|| missing("on iSCSI"))
        } else if let Some(image) = rbd::RbdPool::image_at(location) {
            let ceph_pool = image.split_once('/').map(|(pool, _)| pool);
            self.pools
                .iter()
                .find_map(|p| match &p.backend {
                    PoolBackend::Rbd(pool) if Some(pool.config().pool.as_str()) == ceph_pool => {
                        Some(Backing::Rbd(pool, image))
                    }
                    _ => None,
                })
                .ok_or_else(|| missing("on Ceph RBD"))
        } else {
            let path = Path::new(location);
            let in_a_file_pool = self.pools.iter().any(|p| match &p.backend {
                PoolBackend::File(files) => path.starts_with(files.dir()),
                _ => false,
            });
            in_a_file_pool
                .then_some(Backing::File(path))
                .ok_or_else(|| missing("a file"))
        }
    }

    /// Forgets what the volume at `location` kept for its snapshots when it last was an
    /// ORIGIN (an RBD image's base snapshot): it may have been written since.
    async fn forget_base(&self, uuid: &str, location: &str) -> Result<(), VolumeError> {
        match self.backing(location)? {
            Backing::Rbd(pool, image) => pool.drop_base(image).await.map_err(|e| match e {
                rbd::RbdError::InUse(_) => VolumeError::Conflict(format!("disk {uuid}: {e}")),
                e => storage_error(e),
            }),
            // Their snapshots read the file itself.
            Backing::File(_) | Backing::Iscsi(..) => Ok(()),
        }
    }

    /// Where a volume derived from the one at `source` (a `snapshot` or a rebase) goes.
    fn location_beside(
        &self,
        source: &str,
        uuid: &str,
        snapshot: bool,
    ) -> Result<String, VolumeError> {
        match self.backing(source)? {
            Backing::Rbd(..) => rbd::RbdPool::location_beside(source, uuid)
                .ok_or_else(|| VolumeError::Conflict(format!("{source} names no RBD image"))),
            Backing::File(path) => {
                if snapshot && file::format_of(source) == ImageFormat::Qcow2 {
                    return Err(no_overlay_of_overlay(source));
                }
                Ok(file::FileBackend::location_beside(path, uuid, snapshot)
                    .to_string_lossy()
                    .into_owned())
            }
            Backing::Iscsi(export, _) => Ok(export.url(uuid)),
        }
    }

    /// The file behind the iSCSI volume at `location`.
    fn lun_file(&self, location: &str) -> Result<PathBuf, VolumeError> {
        match self.backing(location)? {
            Backing::Iscsi(export, files) => export
                .uuid_at(location)
                .map(|uuid| files.location(uuid))
                .ok_or_else(|| VolumeError::Conflict(format!("{location} names no LUN"))),
            _ => Err(VolumeError::Conflict(format!("{location} is not on iSCSI"))),
        }
    }

    /// Makes the volume's storage; done again after a crash, it keeps existing data.
    async fn make(
        &self,
        uuid: &str,
        location: &str,
        size_gib: u64,
        content: Content<'_>,
        fence: Fence,
    ) -> Result<(), VolumeError> {
        match self.backing(location)? {
            Backing::File(path) => match content {
                Content::Empty => {
                    file::FileBackend::create(path, size_gib).map_err(VolumeError::Storage)
                }
                Content::SnapshotOf(origin) => {
                    if file::format_of(origin) == ImageFormat::Qcow2 {
                        return Err(no_overlay_of_overlay(origin));
                    }
                    file::FileBackend::snapshot(path, Path::new(origin)).map_err(storage_error)
                }
                Content::CopyOf(source, source_backing) => {
                    let (path, source) = (path.to_owned(), PathBuf::from(source));
                    let source_backing = source_backing.map(PathBuf::from);
                    // A copy of up to a TiB: off the async threads.
                    tokio::task::spawn_blocking(move || {
                        file::FileBackend::copy(&path, &source, source_backing.as_deref(), &fence)
                    })
                    .await
                    .map_err(storage_error)?
                    .map_err(copy_error)
                }
            },
            // Exported only while attached (see `prepare`). tgtd serves raw files only, so
            // a snapshot or a rebase is a sparse copy of its source's file: independent of
            // it, but made in time that grows with the data the source holds.
            Backing::Iscsi(_, files) => {
                let path = files.location(uuid);
                let source = match content {
                    Content::Empty => {
                        return file::FileBackend::create(&path, size_gib)
                            .map_err(VolumeError::Storage)
                    }
                    Content::SnapshotOf(source) | Content::CopyOf(source, _) => {
                        self.lun_file(source)?
                    }
                };
                tokio::task::spawn_blocking(move || {
                    file::FileBackend::copy(&path, &source, None, &fence)
                })
                .await
                .map_err(storage_error)?
                .map_err(copy_error)
            }
            Backing::Rbd(pool, image) => {
                let source_image = |source: &str| {
                    rbd::RbdPool::image_at(source)
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            VolumeError::Conflict(format!("{source} is not on the RBD pool"))
                        })
                };
                match content {
                    Content::Empty => pool.create(image, size_gib).await,
                    Content::SnapshotOf(source) => {
                        pool.clone_of(&source_image(source)?, image).await
                    }
                    Content::CopyOf(source, _) => pool.copy_of(&source_image(source)?, image).await,
                }
                .map_err(storage_error)
            }
        }
    }

    /// Removes the volume's storage; done again, it does nothing.
    async fn remove(&self, uuid: &str, location: &str) -> Result<(), VolumeError> {
        match self.backing(location)? {
            Backing::File(path) => file::FileBackend::delete(path).map_err(VolumeError::Storage),
            Backing::Iscsi(export, files) => {
                export.unexport(uuid).await.map_err(storage_error)?;
                file::FileBackend::delete(&files.location(uuid)).map_err(VolumeError::Storage)
            }
            Backing::Rbd(pool, image) => pool.delete(image).await.map_err(|e| match e {
                rbd::RbdError::InUse(_) => VolumeError::Conflict(format!("disk {uuid}: {e}")),
                e => storage_error(e),
            }),
        }
    }

    /// Makes sure `node` can reach the volume now, and that this cloud still has the
    /// volume's storage configured. An iSCSI volume is exported to that node alone, and
    /// `volume` gets the node's login.
    pub async fn prepare(
        &self,
        db: &Db,
        volume: &mut NodeDisk,
        node: &nodes::NodeRow,
    ) -> Result<(), VolumeError> {
        if let Backing::Iscsi(..) = self.backing(&volume.location)? {
            let initiator = node_initiator(node.id, &node.name);
            let login = self
                .export_to(
                    db,
                    &volume.uuid,
                    &volume.location,
                    &initiator,
                    volume.read_only,
                )
                .await?;
            volume.iscsi_login = Some(login);
        }
        Ok(())
    }

    async fn export_to(
        &self,
        db: &Db,
        uuid: &str,
        location: &str,
        initiator: &str,
        read_only: bool,
    ) -> Result<IscsiLogin, VolumeError> {
        let Backing::Iscsi(export, files) = self.backing(location)? else {
            return Err(VolumeError::Conflict(format!("{location} is not on iSCSI")));
        };
        let secret = chap_secret(db, uuid).await?;
        let user = iscsi::IscsiExport::chap_user(uuid);
        let access = iscsi::Access {
            initiator,
            user: user.clone(),
            secret: &secret,
            read_only,
        };
        export
            .export(uuid, &files.location(uuid), &access)
            .await
            .map_err(storage_error)?;
        Ok(IscsiLogin {
            initiator: initiator.to_owned(),
            user,
            secret: stratus_nodeagent::api::types::ChapSecret::new(secret),
        })
    }

    /// Withdraws what `prepare` opened: the volume's target and CHAP account, once its VM
    /// lets go of it. The secret the node was given dies with them: the next attach makes
    /// a new one.
    pub async fn withdraw(&self, db: &Db, volume: &NodeDisk) -> Result<(), VolumeError> {
        self.withdraw_uuid(db, &volume.uuid, &volume.location).await
    }

    async fn withdraw_uuid(&self, db: &Db, uuid: &str, location: &str) -> Result<(), VolumeError> {
        if let Backing::Iscsi(export, _) = self.backing(location)? {
            export.unexport(uuid).await.map_err(storage_error)?;
            sqlx::query("UPDATE volumes SET chap_secret = NULL WHERE uuid = $1")
                .bind(uuid)
                .execute(&db.pool)
                .await?;
        }
        Ok(())
    }
}

impl Pool {
    /// `file`, `iscsi` or `rbd`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            PoolBackend::File(_) => "file",
            PoolBackend::Iscsi(..) => "iscsi",
            PoolBackend::Rbd(_) => "rbd",
        }
    }

    /// What nodes are given for a new volume here: the file's path, the LUN's URL or the
    /// image's `rbd:` name.
    pub fn location(&self, uuid: &str) -> String {
        match &self.backend {
            PoolBackend::File(files) => files.location(uuid).to_string_lossy().into_owned(),
            PoolBackend::Iscsi(export, _) => export.url(uuid),
            PoolBackend::Rbd(pool) => pool.location(uuid),
        }
    }

    /// The directory of its files (file and iSCSI pools).
    pub fn files(&self) -> Option<&file::FileBackend> {
        match &self.backend {
            PoolBackend::File(files) | PoolBackend::Iscsi(_, files) => Some(files),
            PoolBackend::Rbd(_) => None,
        }
    }
}

/// The name a node's VMMs log in to iSCSI targets with: unique per node (its id), and
/// readable (its name, in the characters iSCSI names allow).
pub fn node_initiator(node_id: i64, name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '-') => c,
            _ => '-',
        })
        .collect();
    format!("iqn.2026-12.eu.stratuslab.node:{node_id}-{name}")
}

/// The volume's CHAP secret, made on first use: 128 random bits, in hex so that tgtadm
/// never mistakes it for an option.
async fn chap_secret(db: &Db, uuid: &str) -> Result<String, VolumeError> {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    let fresh: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Two replicas preparing at once: the first secret written is the one both use.
    sqlx::query("UPDATE volumes SET chap_secret = $1 WHERE uuid = $2 AND chap_secret IS NULL")
        .bind(&fresh)
        .bind(uuid)
        .execute(&db.pool)
        .await?;
    // Only for a volume that stays: one being deleted gets no new way in.
    let found: Option<(Option<String>,)> =
        sqlx::query_as("SELECT chap_secret FROM volumes WHERE uuid = $1 AND state = 'available'")
            .bind(uuid)
            .fetch_optional(&db.pool)
            .await?;
    match found {
        Some((Some(secret),)) => Ok(secret),
        _ => Err(VolumeError::Conflict(format!(
            "disk {uuid} is not available (being made or deleted)"
        ))),
    }
}

/// `GET /pools`: every configured pool with its storage's space and its volumes.
pub async fn pools(cloud: &Cloud) -> Result<Vec<PoolView>, VolumeError> {
    let storage = cloud.volumes.as_ref().ok_or_else(no_storage)?;
    let held: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT pool, CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(size_gib), 0) AS BIGINT) \
         FROM volumes GROUP BY pool",
    )
    .fetch_all(&cloud.db.pool)
    .await?;
    let mut out = Vec::new();
    for (index, pool) in storage.pools().iter().enumerate() {
        let (location, space, used) = match &pool.backend {
            PoolBackend::File(files) | PoolBackend::Iscsi(_, files) => {
                let dir = files.dir().to_owned();
                let (space, used) = tokio::task::spawn_blocking(move || {
                    (
                        stratus_nodeagent::host::filesystem_space(&dir),
                        file::FileBackend::allocated(&dir),
                    )
                })
                .await
                .map_err(storage_error)?;
                let space = match space {
                    (0, _) => Err(format!(
                        "cannot read the space of {}",
                        files.dir().display()
                    )),
                    sizes => Ok(sizes),
                };
                let location = match &pool.backend {
                    PoolBackend::Iscsi(export, _) => export.portal().to_owned(),
                    _ => files.dir().display().to_string(),
                };
                (location, space, used.ok())
            }
            PoolBackend::Rbd(rbd) => {
                let space = rbd
                    .space()
                    .await
                    .map(|(stored, free)| (stored + free, free))
                    .map_err(|e| e.to_string());
                let used = rbd.used().await.ok();
                (rbd.config().pool.clone(), space, used)
            }
        };
        let (volumes, provisioned_gib) = held
            .iter()
            .find(|(name, ..)| *name == pool.name)
            .map(|(_, n, gib)| (*n, *gib))
            .unwrap_or((0, 0));
        let (total_bytes, free_bytes, error) = match space {
            Ok((total, free)) => (Some(total), Some(free), None),
            Err(e) => (None, None, Some(e)),
        };
        out.push(PoolView {
            name: pool.name.clone(),
            kind: pool.kind().to_owned(),
            default: index == storage.default,
            location,
            total_bytes,
            free_bytes,
            used_bytes: used,
            error,
            volumes,
            provisioned_gib,
        });
    }
    Ok(out)
}

/// How a node's VMM opens the volume at `location`. An RBD volume comes with its pool's
/// cluster configuration and credentials as the nodes have them; a LIVE on a file pool
/// with its ORIGIN's file (`backing`).
pub fn node_source(
    storage: Option<&Storage>,
    volume: &NodeDisk,
) -> stratus_nodeagent::api::types::DiskSource {
    let rbd = storage.and_then(|s| s.rbd_at(&volume.location));
    use stratus_nodeagent::api::types::DiskSource;
    let (location, backing) = (&volume.location, volume.base_location.as_deref());
    if let Some(portal_and_lun) = location.strip_prefix("iscsi://") {
        let login = volume.iscsi_login.as_ref();
        DiskSource::Iscsi {
            url: match login {
                Some(login) => format!("iscsi://{}@{portal_and_lun}", login.user),
                None => location.to_owned(),
            },
            initiator: login.map(|l| l.initiator.clone()),
            secret_file: None,
            chap_secret: login.map(|l| l.secret.clone()),
            timeout_secs: None,
        }
    } else if let Some(image) = rbd::RbdPool::image_at(location) {
        let config = rbd.map(rbd::RbdPool::config);
        DiskSource::Rbd {
            image: image.to_owned(),
            conf: config.map(|c| c.conf.clone()),
            id: config.map(|c| c.id.clone()),
            keyring: config.map(|c| c.keyring.clone()),
            timeout_secs: None,
        }
    } else {
        let format = file::format_of(location);
        DiskSource::File {
            path: location.into(),
            format,
            backing: match format {
                ImageFormat::Qcow2 => backing.map(PathBuf::from).into_iter().collect(),
                ImageFormat::Raw => Vec::new(),
            },
        }
    }
}

/// One row of `volumes`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct VolumeRow {
    pub uuid: String,
    pub owner: String,
    pub tag: String,
    pub size_gib: i64,
    pub visibility: String,
    pub kind: String,
    pub identifier: Option<String>,
    pub seed: i64,
    pub base_uuid: Option<String>,
    pub quarantine: Option<String>,
    pub pool: String,
    pub state: String,
    pub location: String,
    pub created: String,
    pub updated: String,
}

const VOLUME_COLUMNS: &str = "uuid, owner, tag, size_gib, visibility, kind, identifier, seed, \
    base_uuid, quarantine, pool, state, location, created, updated";

#[derive(Clone, Debug, sqlx::FromRow)]
struct MountRow {
    vm_id: i64,
    device: String,
    hotplugged: i64,
    state: String,
    created: String,
}

/// A volume id as StratusLab made them (a UUID), normalised to lower case.
pub fn parse_uuid(text: &str) -> Result<String, VolumeError> {
    uuid::Uuid::parse_str(text.trim())
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| VolumeError::BadRequest(format!("'{text}' is not a disk UUID")))
}

fn check_tag(tag: &str) -> Result<(), VolumeError> {
    if tag.chars().count() > MAX_TAG_CHARS {
        return Err(VolumeError::BadRequest(format!(
            "the tag is longer than {MAX_TAG_CHARS} characters"
        )));
    }
    if tag.chars().any(char::is_control) {
        return Err(VolumeError::BadRequest(
            "the tag contains control characters".into(),
        ));
    }
    Ok(())
}

async fn load(conn: &mut AnyConnection, uuid: &str) -> Result<VolumeRow, VolumeError> {
    load_with(conn, uuid, "").await
}

/// The volume's row, locked until the transaction ends (PostgreSQL; SQLite has one
/// writer): attach and delete of one volume take their turns.
async fn load_locked(
    db: &crate::db::Db,
    conn: &mut AnyConnection,
    uuid: &str,
) -> Result<VolumeRow, VolumeError> {
    load_with(conn, uuid, db.for_update()).await
}

async fn load_with(
    conn: &mut AnyConnection,
    uuid: &str,
    lock: &str,
) -> Result<VolumeRow, VolumeError> {
    sqlx::query_as::<_, VolumeRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes WHERE uuid = $1{lock}"
    )))
    .bind(uuid)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| VolumeError::NotFound(uuid.to_owned()))
}

/// The volume, if `who` may see it: their own, public ones, or any for admins.
async fn load_visible(
    conn: &mut AnyConnection,
    who: &Principal,
    uuid: &str,
    action: &'static str,
) -> Result<VolumeRow, VolumeError> {
    let row = load(conn, uuid).await?;
    check_visible(&row, who, action)?;
    Ok(row)
}

fn check_visible(
    row: &VolumeRow,
    who: &Principal,
    action: &'static str,
) -> Result<(), VolumeError> {
    if row.owner != who.name && row.visibility != "public" && !who.is_admin() {
        return Err(VolumeError::NotYours {
            action,
            uuid: row.uuid.clone(),
        });
    }
    Ok(())
}

/// The volume, if `who` may change it: their own, or any for admins.
async fn load_owned(
    conn: &mut AnyConnection,
    who: &Principal,
    uuid: &str,
    action: &'static str,
) -> Result<VolumeRow, VolumeError> {
    let row = load(conn, uuid).await?;
    if row.owner != who.name && !who.is_admin() {
        return Err(VolumeError::NotYours {
            action,
            uuid: uuid.to_owned(),
        });
    }
    Ok(row)
}

async fn mounts_of_volume(
    conn: &mut AnyConnection,
    uuid: &str,
) -> Result<Vec<MountRow>, VolumeError> {
    Ok(sqlx::query_as::<_, MountRow>(
        "SELECT vm_id, device, hotplugged, state, created FROM mounts \
         WHERE volume_uuid = $1",
    )
    .bind(uuid)
    .fetch_all(&mut *conn)
    .await?)
}

/// The volumes that need `uuid`'s data: its LIVE snapshots, and rebases of it still being
/// made.
async fn snapshots_of(conn: &mut AnyConnection, uuid: &str) -> Result<Vec<String>, VolumeError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT uuid FROM volumes WHERE base_uuid = $1 \
         AND (kind IN ('MACHINE_IMAGE_LIVE', 'DATA_IMAGE_LIVE') OR state = 'creating' \
         OR location LIKE '%.qcow2') \
         ORDER BY created, uuid",
    )
    .bind(uuid)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(u,)| u).collect())
}

async fn view(conn: &mut AnyConnection, row: VolumeRow) -> Result<VolumeView, VolumeError> {
    let mounts: Vec<MountView> = mounts_of_volume(conn, &row.uuid)
        .await?
        .into_iter()
        .map(|m| MountView {
            vm_id: m.vm_id,
            device: m.device,
            hotplugged: m.hotplugged != 0,
            state: m.state,
            since: m.created,
        })
        .collect();
    // StratusLab counted an ORIGIN's snapshots, any other volume's mounts.
    let count = if VolumeKind::from_name(&row.kind).is_some_and(VolumeKind::is_origin) {
        snapshots_of(conn, &row.uuid).await?.len() as i64
    } else {
        mounts.len() as i64
    };
    Ok(VolumeView {
        count,
        uuid: row.uuid,
        owner: row.owner,
        tag: row.tag,
        size_gib: row.size_gib,
        visibility: row.visibility,
        kind: row.kind,
        identifier: row.identifier,
        seed: row.seed != 0,
        base_uuid: row.base_uuid,
        quarantine: row.quarantine,
        state: row.state,
        pool: row.pool,
        mounts,
        hidden_mounts: 0,
        created: row.created,
        updated: row.updated,
    })
}

/// GiB of volumes `owner` holds; the root snapshots of their VMs are the VM quota's.
async fn used_gib(conn: &mut AnyConnection, owner: &str) -> Result<i64, VolumeError> {
    let (used,): (i64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(size_gib), 0) AS BIGINT) FROM volumes WHERE owner = $1 \
         AND uuid NOT IN (SELECT volume_uuid FROM mounts WHERE device = $2)",
    )
    .bind(owner)
    .bind(roots::ROOT_DEVICE)
    .fetch_one(&mut *conn)
    .await?;
    Ok(used)
}

fn no_storage() -> VolumeError {
    VolumeError::Conflict(
        "this cloud has no volume storage (set volume_dir, [volume_rbd] or [[volume_pools]])"
            .into(),
    )
}

/// Locks the owner's row, which serialises their creations so the quota holds under
/// races, and checks that `size_gib` more fits in it.
async fn reserve(
    cloud: &Cloud,
    tx: &mut AnyConnection,
    who: &Principal,
    size_gib: i64,
) -> Result<(), VolumeError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT name FROM users WHERE name = $1{}",
        cloud.db.for_update()
    )))
    .bind(&who.name)
    .fetch_optional(&mut *tx)
    .await?;
    let quota = cloud.config.quotas.volume_gib;
    if quota > 0 {
        let used = used_gib(tx, &who.name).await?;
        if used + size_gib > quota {
            return Err(VolumeError::Quota {
                quota,
                used,
                requested: size_gib,
            });
        }
    }
    Ok(())
}

/// A volume's row before its storage exists.
struct NewVolume<'a> {
    uuid: &'a str,
    owner: &'a str,
    tag: &'a str,
    size_gib: i64,
    visibility: Visibility,
    kind: VolumeKind,
    identifier: Option<&'a str>,
    base_uuid: Option<&'a str>,
    pool: &'a str,
    location: &'a str,
}

/// Inserts the row, held by the caller; `None` if a unique index had a row for it already
/// (the one ORIGIN of a Marketplace image).
async fn insert_creating(
    tx: &mut AnyConnection,
    new: &NewVolume<'_>,
) -> Result<Option<Hold>, VolumeError> {
    let stamp = db::now();
    let inserted = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO volumes ({VOLUME_COLUMNS}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, 0, $8, NULL, $9, 'creating', $10, $11, $11) \
         ON CONFLICT DO NOTHING"
    )))
    .bind(new.uuid)
    .bind(new.owner)
    .bind(new.tag)
    .bind(new.size_gib)
    .bind(new.visibility.as_str())
    .bind(new.kind.as_str())
    .bind(new.identifier)
    .bind(new.base_uuid)
    .bind(new.pool)
    .bind(new.location)
    .bind(&stamp)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok((inserted == 1).then(|| Hold::new(new.uuid, stamp)))
}

/// Makes the storage of a volume whose row is `creating`, and shows the volume. A failure
/// undoes both, so a failed creation neither lingers nor counts against the quota.
async fn make_and_show(
    cloud: &Cloud,
    mut hold: Hold,
    uuid: &str,
    size_gib: i64,
    location: &str,
    content: Content<'_>,
) -> Result<VolumeView, VolumeError> {
    if let Err(e) = finish_create(cloud, &mut hold, uuid, size_gib, location, content).await {
        if !matches!(e, VolumeError::TakenOver(_)) {
            undo_create(cloud, hold, uuid, location).await;
        }
        return Err(e);
    }
    let mut conn = cloud.db.pool.acquire().await?;
    let row = load(&mut conn, uuid).await?;
    view(&mut conn, row).await
}

pub async fn create(
    cloud: &Cloud,
    who: &Principal,
    request: VolumeCreate,
) -> Result<VolumeView, VolumeError> {
    if !(1..=MAX_SIZE_GIB).contains(&request.size_gib) {
        return Err(VolumeError::BadRequest(format!(
            "the size must be between 1 and {MAX_SIZE_GIB} GiB, not {}",
            request.size_gib
        )));
    }
    let tag = request.tag.unwrap_or_default();
    check_tag(&tag)?;
    let storage = cloud.volumes.as_ref().ok_or_else(no_storage)?;
    let pool = storage.pool_for(request.pool.as_deref())?;
    let uuid = uuid::Uuid::new_v4().hyphenated().to_string();
    let location = pool.location(&uuid);
    let mut tx = cloud.db.pool.begin().await?;
    reserve(cloud, &mut tx, who, request.size_gib).await?;
    let new = NewVolume {
        uuid: &uuid,
        owner: &who.name,
        tag: &tag,
        size_gib: request.size_gib,
        visibility: request.visibility.unwrap_or(Visibility::Private),
        kind: request.kind.unwrap_or(VolumeKind::DataImageRawReadWrite),
        identifier: None,
        base_uuid: None,
        pool: &pool.name,
        location: &location,
    };
    let Some(hold) = insert_creating(&mut tx, &new).await? else {
        return Err(VolumeError::Conflict(format!(
            "disk {} exists already",
            new.uuid
        )));
    };
    tx.commit().await?;
    make_and_show(
        cloud,
        hold,
        &uuid,
        request.size_gib,
        &location,
        Content::Empty,
    )
    .await
}

/// `POST /disks/{uuid}`, as StratusLab's pdisk answered it: on an ORIGIN, a new LIVE
/// copy-on-write snapshot of it (identifier `snapshot:<origin>`, made in constant time);
/// on a LIVE, a rebase into a new ORIGIN that holds the LIVE's data on its own. Either is
/// a new private volume of the caller's, counted in their quota; the source is unchanged.
pub async fn derive(cloud: &Cloud, who: &Principal, uuid: &str) -> Result<VolumeView, VolumeError> {
    let uuid = parse_uuid(uuid)?;
    let storage = cloud.volumes.as_ref().ok_or_else(no_storage)?;
    let new_uuid = uuid::Uuid::new_v4().hyphenated().to_string();
    let mut tx = cloud.db.pool.begin().await?;
    let visible = load_visible(&mut tx, who, &uuid, "snapshot").await?;
    // The user's row before the volume's, in the order a run request with this volume
    // locks them: the other order deadlocked the two (PostgreSQL aborted one, a 500).
    reserve(cloud, &mut tx, who, visible.size_gib).await?;
    let source = load_locked(&cloud.db, &mut tx, &uuid).await?;
    if source.size_gib != visible.size_gib {
        return Err(VolumeError::Conflict(format!(
            "disk {uuid} changed meanwhile: try again"
        )));
    }
    if source.state != "available" {
        return Err(VolumeError::Conflict(format!(
            "disk {uuid} is {}, not available",
            source.state
        )));
    }
    let kind = VolumeKind::from_name(&source.kind);
    let (new_kind, identifier, snapshot) = match kind {
        Some(kind) if kind.is_origin() => (kind.live(), Some(format!("snapshot:{uuid}")), true),
        Some(kind) if kind.is_live() => {
            // A copy of a disk a guest is writing would be torn.
            if let Some(m) = mounts_of_volume(&mut tx, &uuid).await?.first() {
                let holder = holder_for(&mut tx, who, &source, m.vm_id).await?;
                return Err(VolumeError::Conflict(format!(
                    "disk {uuid} is attached to {holder}: detach it before rebasing it"
                )));
            }
            (kind.origin(), None, false)
        }
        _ => {
            return Err(VolumeError::Conflict(format!(
                "disk {uuid} is {}: only ORIGIN volumes have snapshots and only LIVE ones are \
                 rebased",
                source.kind
            )))
        }
    };
    let location = storage.location_beside(&source.location, &new_uuid, snapshot)?;
    let source_backing = file_backing(&mut tx, &source).await?;
    let new = NewVolume {
        uuid: &new_uuid,
        owner: &who.name,
        tag: "",
        size_gib: source.size_gib,
        visibility: Visibility::Private,
        kind: new_kind,
        identifier: identifier.as_deref(),
        base_uuid: Some(&uuid),
        pool: &source.pool,
        location: &location,
    };
    let Some(hold) = insert_creating(&mut tx, &new).await? else {
        return Err(VolumeError::Conflict(format!(
            "disk {} exists already",
            new.uuid
        )));
    };
    tx.commit().await?;
    let content = if snapshot {
        Content::SnapshotOf(&source.location)
    } else {
        Content::CopyOf(&source.location, source_backing.as_deref())
    };
    make_and_show(cloud, hold, &new_uuid, source.size_gib, &location, content).await
}

/// The file a volume reads through: its ORIGIN's, if it is a LIVE on the file pool.
async fn file_backing(
    conn: &mut AnyConnection,
    row: &VolumeRow,
) -> Result<Option<String>, VolumeError> {
    let on_file =
        !row.location.starts_with("iscsi://") && rbd::RbdPool::image_at(&row.location).is_none();
    if !on_file || file::format_of(&row.location) != ImageFormat::Qcow2 {
        return Ok(None);
    }
    let base = row.base_uuid.as_deref().ok_or_else(|| {
        VolumeError::Conflict(format!("disk {} is a snapshot of no ORIGIN", row.uuid))
    })?;
    Ok(Some(load(conn, base).await?.location))
}

/// Makes the storage of a held `creating` volume, then makes it `available`.
async fn finish_create(
    cloud: &Cloud,
    hold: &mut Hold,
    uuid: &str,
    size_gib: i64,
    location: &str,
    content: Content<'_>,
) -> Result<(), VolumeError> {
    let backend = cloud.volumes.as_ref().ok_or_else(no_storage)?;
    hold.keep_while(&cloud.db, |fence| {
        backend.make(uuid, location, size_gib as u64, content, fence)
    })
    .await?;
    let mut conn = cloud.db.pool.acquire().await?;
    hold.finish(&mut conn, "available").await
}

/// Undoes a held creation that failed: the row turns `deleting` before its storage is
/// removed (a kill in between leaves the removal to [`recover`], never a row without its
/// storage that a restart would make again), then goes. What cannot be removed now stays
/// `deleting`, for a later pass.
async fn undo_create(cloud: &Cloud, mut hold: Hold, uuid: &str, location: &str) {
    let undone = async {
        let mut conn = cloud.db.pool.acquire().await?;
        hold.turn(&mut conn, "deleting").await?;
        drop(conn);
        finish_delete(cloud, hold, uuid, location, Refused::Retry).await
    };
    if let Err(e) = undone.await {
        tracing::warn!(volume = %uuid, %location, error = %e, "cannot undo its creation yet");
    }
}

pub async fn list(cloud: &Cloud, who: &Principal) -> Result<Vec<VolumeView>, VolumeError> {
    let mut conn = cloud.db.pool.acquire().await?;
    let rows = if who.is_admin() {
        sqlx::query_as::<_, VolumeRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY created, uuid"
        )))
        .fetch_all(&mut *conn)
        .await?
    } else {
        sqlx::query_as::<_, VolumeRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE owner = $1 OR visibility = 'public' \
             ORDER BY created, uuid"
        )))
        .bind(&who.name)
        .fetch_all(&mut *conn)
        .await?
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let view = view(&mut conn, row).await?;
        out.push(seen_by(&mut conn, view, who).await?);
    }
    Ok(out)
}

pub async fn get(cloud: &Cloud, who: &Principal, uuid: &str) -> Result<VolumeView, VolumeError> {
    let uuid = parse_uuid(uuid)?;
    let mut conn = cloud.db.pool.acquire().await?;
    let row = load_visible(&mut conn, who, &uuid, "see").await?;
    let view = view(&mut conn, row).await?;
    seen_by(&mut conn, view, who).await
}

/// Which VMs a volume is on is its owner's business (and the admins'): the other users a
/// public volume is shown to see how many use it, and its mounts on VMs of their own.
async fn seen_by(
    conn: &mut AnyConnection,
    mut view: VolumeView,
    who: &Principal,
) -> Result<VolumeView, VolumeError> {
    if who.is_admin() || who.name == view.owner || view.mounts.is_empty() {
        return Ok(view);
    }
    let theirs: Vec<(i64,)> = sqlx::query_as(
        "SELECT m.vm_id FROM mounts m JOIN vms v ON v.id = m.vm_id \
         WHERE m.volume_uuid = $1 AND v.owner = $2",
    )
    .bind(&view.uuid)
    .bind(&who.name)
    .fetch_all(&mut *conn)
    .await?;
    let all = view.mounts.len();
    view.mounts
        .retain(|m| theirs.iter().any(|(id,)| *id == m.vm_id));
    view.hidden_mounts = (all - view.mounts.len()) as i64;
    Ok(view)
}

/// The VM holding volume `row`, as `who` may be told of it: by its id to admins, the
/// volume's owner and the VM's, as "another VM" to the users a public volume is shown to.
async fn holder_for(
    conn: &mut AnyConnection,
    who: &Principal,
    row: &VolumeRow,
    vm: i64,
) -> Result<String, VolumeError> {
    let vm_owner: Option<(String,)> = sqlx::query_as("SELECT owner FROM vms WHERE id = $1")
        .bind(vm)
        .fetch_optional(&mut *conn)
        .await?;
    let named = who.is_admin()
        || row.owner == who.name
        || vm_owner.is_some_and(|(owner,)| owner == who.name);
    Ok(match named {
        true => format!("VM {vm}"),
        false => "another VM".to_owned(),
    })
}

pub async fn update(
    cloud: &Cloud,
    who: &Principal,
    uuid: &str,
    request: VolumeUpdate,
) -> Result<VolumeView, VolumeError> {
    let uuid = parse_uuid(uuid)?;
    if let Some(tag) = &request.tag {
        check_tag(tag)?;
    }
    let mut tx = cloud.db.pool.begin().await?;
    load_owned(&mut tx, who, &uuid, "update").await?;
    // Locked as an attach or a snapshot locks it, so the checks below hold until commit.
    let row = load_locked(&cloud.db, &mut tx, &uuid).await?;
    if row.state != "available" {
        // Its `updated` stamp is its maker's or remover's hold.
        return Err(VolumeError::Conflict(format!(
            "disk {uuid} is {}; try again in a moment",
            row.state
        )));
    }
    if let Some(kind) = request.kind.filter(|k| k.as_str() != row.kind) {
        // An attached volume's type said how its VM got it: made an ORIGIN while a guest
        // writes it, its snapshots would be torn copies.
        if let Some(m) = mounts_of_volume(&mut tx, &uuid).await?.first() {
            return Err(VolumeError::Conflict(format!(
                "disk {uuid} is attached to VM {}: detach it before changing its type",
                m.vm_id
            )));
        }
        let was_origin = VolumeKind::from_name(&row.kind).is_some_and(VolumeKind::is_origin);
        // An ORIGIN again, its new snapshots must hold what it holds now: it was written
        // since it last was one if no snapshot kept it read-only meanwhile.
        if !was_origin && kind.is_origin() && snapshots_of(&mut tx, &uuid).await?.is_empty() {
            let storage = cloud.volumes.as_ref().ok_or_else(no_storage)?;
            storage.forget_base(&uuid, &row.location).await?;
        }
        if let Some(identifier) = row.identifier.as_deref().filter(|_| kind.is_origin()) {
            let (origins,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM volumes WHERE identifier = $1 AND uuid <> $2 \
                 AND kind IN ('MACHINE_IMAGE_ORIGIN', 'DATA_IMAGE_ORIGIN')",
            )
            .bind(identifier)
            .bind(&uuid)
            .fetch_one(&mut *tx)
            .await?;
            if origins > 0 {
                return Err(VolumeError::Conflict(format!(
                    "an ORIGIN of {identifier} exists already: disk {uuid} cannot be another"
                )));
            }
        }
    }
    sqlx::query(
        "UPDATE volumes SET tag = $1, visibility = $2, kind = $3, updated = $4 WHERE uuid = $5",
    )
    .bind(request.tag.as_deref().unwrap_or(&row.tag))
    .bind(
        request
            .visibility
            .map(Visibility::as_str)
            .unwrap_or(&row.visibility),
    )
    .bind(request.kind.map(VolumeKind::as_str).unwrap_or(&row.kind))
    .bind(db::now())
    .bind(&uuid)
    .execute(&mut *tx)
    .await?;
    let row = load(&mut tx, &uuid).await?;
    let view = view(&mut tx, row).await?;
    tx.commit().await?;
    Ok(view)
}

pub async fn delete(cloud: &Cloud, who: &Principal, uuid: &str) -> Result<(), VolumeError> {
    let uuid = parse_uuid(uuid)?;
    {
        let mut conn = cloud.db.pool.acquire().await?;
        load_owned(&mut conn, who, &uuid, "delete").await?;
    }
    delete_unchecked(cloud, &uuid).await
}

/// Deletes a volume nothing uses, whoever owns it.
async fn delete_unchecked(cloud: &Cloud, uuid: &str) -> Result<(), VolumeError> {
    let uuid = uuid.to_owned();
    let (hold, location, was_available) = {
        let mut tx = cloud.db.pool.begin().await?;
        // Locked: an attach of this volume waits for this transaction, or this one for
        // the attach's, and the mounts are read after the lock is held — never both win.
        let row = load_locked(&cloud.db, &mut tx, &uuid).await?;
        if let Some(m) = mounts_of_volume(&mut tx, &uuid).await?.first() {
            return Err(VolumeError::Conflict(format!(
                "disk {uuid} is attached to VM {}: detach it first",
                m.vm_id
            )));
        }
        let needed_by = snapshots_of(&mut tx, &uuid).await?;
        if !needed_by.is_empty() {
            return Err(VolumeError::Conflict(format!(
                "disk {uuid} is the base of {}: delete them first",
                needed_by.join(", ")
            )));
        }
        let busy = || {
            VolumeError::Conflict(format!(
                "disk {uuid} is {}; try again in a moment",
                row.state
            ))
        };
        let hold = match row.state.as_str() {
            "available" => {
                let stamp = db::now();
                sqlx::query("UPDATE volumes SET state = 'deleting', updated = $1 WHERE uuid = $2")
                    .bind(&stamp)
                    .bind(&uuid)
                    .execute(&mut *tx)
                    .await?;
                Hold::new(&uuid, stamp)
            }
            // A delete that a crash interrupted: finished now; one under way elsewhere is
            // left to finish.
            "deleting" => Hold::take_over(&mut tx, &row).await?.ok_or_else(busy)?,
            _ => return Err(busy()),
        };
        tx.commit().await?;
        (hold, row.location, row.state == "available")
    };
    let refused = if was_available {
        Refused::Restore
    } else {
        Refused::Retry
    };
    finish_delete(cloud, hold, &uuid, &location, refused).await
}

/// What becomes of a volume whose storage refuses its removal (and keeps everything).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// It was `available` when this delete began: it is as usable as before.
    Restore,
    /// A half-made volume, or a delete begun before: it stays `deleting`, for a later
    /// pass (made `available`, a half-filled ORIGIN would be cloned).
    Retry,
}

/// Removes the storage of a held `deleting` volume, then its row.
async fn finish_delete(
    cloud: &Cloud,
    mut hold: Hold,
    uuid: &str,
    location: &str,
    refused: Refused,
) -> Result<(), VolumeError> {
    if let Some(backend) = &cloud.volumes {
        match hold
            .keep_while(&cloud.db, |_| backend.remove(uuid, location))
            .await
        {
            Ok(()) => {}
            Err(e @ VolumeError::Conflict(_)) if refused == Refused::Restore => {
                // The storage refused and kept everything (Ceph keeps an image with
                // snapshots, or one a client has open).
                let mut conn = cloud.db.pool.acquire().await?;
                hold.finish(&mut conn, "available").await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
    let mut conn = cloud.db.pool.acquire().await?;
    hold.forget(&mut conn).await
}

/// Brings tgtd in line with the mounts: every iSCSI volume a placed VM has is exported to
/// that VM's node (tgtd forgets everything when it restarts; a VM may have moved), and a
/// target no VM has any more (the orchestrator was killed between a VM's end and the
/// withdrawal) is withdrawn. Run at start and then every few seconds, so VMs running on a
/// volume find their target again well within their VMM's timeout.
///
/// Attaches and detaches run meanwhile; each change is checked against the mounts again
/// after it is made and undone if they moved under it, so a pass never leaves a target
/// open to a node that no longer has the volume, nor closed to one that does.
pub async fn reexport(cloud: &Cloud) -> Result<(), VolumeError> {
    let Some(storage) = cloud.volumes.as_ref() else {
        return Ok(());
    };
    for export in storage.iscsi_exports() {
        reexport_pool(cloud, storage, export).await?;
    }
    Ok(())
}

async fn reexport_pool(
    cloud: &Cloud,
    storage: &Storage,
    export: &iscsi::IscsiExport,
) -> Result<(), VolumeError> {
    let holders: Vec<Holder> = iscsi_holders(&cloud.db, None)
        .await?
        .into_iter()
        .filter(|holder| export.owns(&holder.location))
        .collect();
    // One look at tgtd per pass: the exports that are as they should be are left alone.
    let exported = export.exported().await.map_err(storage_error)?;
    for holder in &holders {
        let Holder {
            uuid,
            location,
            node_id,
            node,
            ..
        } = holder;
        let initiator = node_initiator(*node_id, node);
        let read_only = holder.read_only();
        let as_it_should_be = exported.iter().any(|(held, admitted)| {
            held == uuid && admitted.as_ref() == Some(&(initiator.clone(), read_only))
        });
        if as_it_should_be {
            continue;
        }
        if let Err(e) = storage
            .export_to(&cloud.db, uuid, location, &initiator, read_only)
            .await
        {
            tracing::warn!(volume = %uuid, error = %e, "cannot export it again");
            continue;
        }
        if !iscsi_holders(&cloud.db, Some(uuid)).await?.contains(holder) {
            resettle(cloud, storage, uuid, location).await;
        }
    }
    for (uuid, _) in exported {
        if holders.iter().any(|held| held.uuid == uuid) {
            continue;
        }
        let location = export.url(&uuid);
        if let Err(e) = storage.withdraw_uuid(&cloud.db, &uuid, &location).await {
            tracing::warn!(volume = %uuid, error = %e, "cannot withdraw its target");
            continue;
        }
        tracing::info!(volume = %uuid, "withdrew the target of a volume no VM has");
        if !iscsi_holders(&cloud.db, Some(&uuid)).await?.is_empty() {
            resettle(cloud, storage, &uuid, &location).await;
        }
    }
    Ok(())
}

/// The target of the volume at `location` as its mounts are now (after a pass raced an
/// attach or detach); what fails is left to the next pass.
async fn resettle(cloud: &Cloud, storage: &Storage, uuid: &str, location: &str) {
    let settled = async {
        match iscsi_holders(&cloud.db, Some(uuid)).await?.first() {
            Some(holder) => {
                let initiator = node_initiator(holder.node_id, &holder.node);
                storage
                    .export_to(
                        &cloud.db,
                        uuid,
                        &holder.location,
                        &initiator,
                        holder.read_only(),
                    )
                    .await
                    .map(|_| ())
            }
            None => storage.withdraw_uuid(&cloud.db, uuid, location).await,
        }
    };
    if let Err(e) = settled.await {
        tracing::warn!(volume = %uuid, error = %e, "cannot bring its target in line");
    }
}

/// An iSCSI volume mounted on a VM that is placed on a node.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Holder {
    uuid: String,
    location: String,
    node_id: i64,
    node: String,
    mount_read_only: i64,
    kind: String,
}

impl Holder {
    fn read_only(&self) -> bool {
        mount_read_only(self.mount_read_only, &self.kind)
    }
}

/// Whether a mount is read-only: asked so (another user's public volume), or by the
/// volume's type.
fn mount_read_only(asked: i64, kind: &str) -> bool {
    asked != 0
        || VolumeKind::from_name(kind)
            .is_some_and(|k| k == VolumeKind::DataImageRawReadonly || k.is_origin())
}

/// iSCSI volumes mounted on VMs that are placed on a node; only `uuid`'s if given.
async fn iscsi_holders(db: &Db, uuid: Option<&str>) -> Result<Vec<Holder>, VolumeError> {
    const HOLDERS: &str = "SELECT v.uuid, v.location, n.id AS node_id, n.name AS node, \
         m.read_only AS mount_read_only, v.kind FROM mounts m \
         JOIN volumes v ON v.uuid = m.volume_uuid \
         JOIN vms ON vms.id = m.vm_id JOIN nodes n ON n.id = vms.node_id \
         WHERE v.location LIKE 'iscsi://%'";
    Ok(match uuid {
        Some(uuid) => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!("{HOLDERS} AND v.uuid = $1")))
                .bind(uuid)
                .fetch_all(&db.pool)
                .await?
        }
        None => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!("{HOLDERS} ORDER BY v.uuid")))
                .fetch_all(&db.pool)
                .await?
        }
    })
}

/// Keeps tgtd in line with the mounts (see [`reexport`]).
pub async fn keep_exported(cloud: std::sync::Arc<Cloud>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        if let Err(e) = reexport(&cloud).await {
            tracing::warn!(error = %e, "cannot check the iSCSI exports");
        }
    }
}

/// Finishes what stopped half-way: every `creating` or `deleting` volume whose holder has
/// shown no sign of life for [`hold::ABANDONED`] (a killed replica, this one before a
/// restart) is taken over and finished. Rows still held are left to their holder — with
/// several replicas, one starting up must not remake the snapshot another is making.
pub async fn recover(cloud: &Cloud) -> Result<(), VolumeError> {
    let rows = sqlx::query_as::<_, VolumeRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes WHERE state IN ('creating', 'deleting')"
    )))
    .fetch_all(&cloud.db.pool)
    .await?;
    for row in rows {
        let hold = {
            let mut conn = cloud.db.pool.acquire().await?;
            Hold::take_over(&mut conn, &row).await?
        };
        let Some(mut hold) = hold else {
            continue;
        };
        let location = &row.location;
        let result = if row.state == "creating" {
            // A snapshot or a rebase is made again from its source.
            let source = match &row.base_uuid {
                Some(base) => {
                    let mut conn = cloud.db.pool.acquire().await?;
                    let source = match load(&mut conn, base).await {
                        Ok(source) => file_backing(&mut conn, &source)
                            .await
                            .map(|backing| (source.location, backing)),
                        Err(e) => Err(e),
                    };
                    Some(source)
                }
                None => None,
            };
            match source {
                // An image's ORIGIN half-filled: undone; the deployment that needs it fills
                // it again from the Marketplace entry.
                None if row.identifier.is_some() => {
                    let mut conn = cloud.db.pool.acquire().await?;
                    match hold.turn(&mut conn, "deleting").await {
                        Ok(()) => {
                            drop(conn);
                            finish_delete(cloud, hold, &row.uuid, location, Refused::Retry).await
                        }
                        Err(e) => Err(e),
                    }
                }
                None => {
                    let content = Content::Empty;
                    finish_create(cloud, &mut hold, &row.uuid, row.size_gib, location, content)
                        .await
                }
                Some(Err(e)) => Err(e),
                Some(Ok((source, backing))) => {
                    let live = VolumeKind::from_name(&row.kind).is_some_and(VolumeKind::is_live);
                    let content = if live {
                        Content::SnapshotOf(&source)
                    } else {
                        Content::CopyOf(&source, backing.as_deref())
                    };
                    finish_create(cloud, &mut hold, &row.uuid, row.size_gib, location, content)
                        .await
                }
            }
        } else {
            finish_delete(cloud, hold, &row.uuid, location, Refused::Retry).await
        };
        match result {
            Ok(()) => tracing::info!(volume = %row.uuid, was = %row.state, "finished"),
            Err(e) => tracing::warn!(volume = %row.uuid, error = %e, "cannot finish it yet"),
        }
    }
    sweep_staging(cloud).await
}

/// Recovers, for as long as the orchestrator runs, what replicas that died (or this one,
/// before a restart) left half-done once their holds lapse.
pub async fn keep_recovering(cloud: std::sync::Arc<Cloud>) {
    loop {
        tokio::time::sleep(hold::HEARTBEAT).await;
        if let Err(e) = recover(&cloud).await {
            tracing::warn!(error = %e, "cannot finish the volume changes left half-done");
        }
    }
}

/// Removes the raw files RBD ORIGINs are imported from that a killed fill left behind
/// (those of fills still running elsewhere, whose rows are `creating`, stay).
async fn sweep_staging(cloud: &Cloud) -> Result<(), VolumeError> {
    let Some(staging) = cloud.volumes.as_ref().and_then(Storage::staging_dir) else {
        return Ok(());
    };
    // Listed before the rows are read: a fill inserts its row before it makes its file,
    // so a file listed here whose fill is under way has its row in what is read below.
    let Ok(entries) = std::fs::read_dir(staging) else {
        return Ok(());
    };
    let entries: Vec<_> = entries.flatten().collect();
    let filling: Vec<(String,)> =
        sqlx::query_as("SELECT uuid FROM volumes WHERE state = 'creating'")
            .fetch_all(&cloud.db.pool)
            .await?;
    for entry in entries {
        let path = entry.path();
        let Some(uuid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".raw"))
        else {
            continue;
        };
        if !filling.iter().any(|(f,)| f == uuid) {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(file = %path.display(), "removed a killed fill's file"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot remove it"),
            }
        }
    }
    Ok(())
}

/// The next free guest device of a VM: from `vda` up for disks attached at boot, from
/// `vdz` down for hot-plugged ones (as StratusLab's pdisk counted).
async fn next_device(
    conn: &mut AnyConnection,
    vm: i64,
    hotplug: bool,
) -> Result<String, VolumeError> {
    let taken: Vec<(String,)> = sqlx::query_as("SELECT device FROM mounts WHERE vm_id = $1")
        .bind(vm)
        .fetch_all(&mut *conn)
        .await?;
    let letters: Vec<char> = if hotplug {
        ('a'..='z').rev().collect()
    } else {
        ('a'..='z').collect()
    };
    letters
        .into_iter()
        .map(|c| format!("vd{c}"))
        .find(|d| !taken.iter().any(|(t,)| t == d))
        .ok_or_else(|| VolumeError::Conflict(format!("VM {vm} has no free disk slot")))
}

/// Takes `uuid` for `vm`: the one insert that decides who has it.
async fn take(
    db: &crate::db::Db,
    conn: &mut AnyConnection,
    who: &Principal,
    uuid: &str,
    vm: i64,
    hotplug: bool,
) -> Result<(VolumeRow, String), VolumeError> {
    // Checked on the locked row: a volume made private meanwhile is not taken.
    let row = load_locked(db, conn, uuid).await?;
    check_visible(&row, who, "attach")?;
    if row.state != "available" {
        return Err(VolumeError::Conflict(format!(
            "disk {uuid} is {}, not available",
            row.state
        )));
    }
    let dependents = snapshots_of(conn, uuid).await?;
    // A rebase copies the disk: a guest writing it meanwhile would tear the copy.
    if !dependents.is_empty() && VolumeKind::from_name(&row.kind).is_some_and(VolumeKind::is_live) {
        return Err(VolumeError::Conflict(format!(
            "disk {uuid} is being rebased; try again in a moment"
        )));
    }
    let device = next_device(conn, vm, hotplug).await?;
    let state = if hotplug { "attaching" } else { "attached" };
    // Another user's public volume is theirs to read, never to write; nor is a volume that
    // snapshots read through (a file-pool ORIGIN, whatever type it has been given since).
    let read_only = (row.owner != who.name && !who.is_admin()) || !dependents.is_empty();
    let inserted = sqlx::query(
        "INSERT INTO mounts (volume_uuid, vm_id, device, hotplugged, state, read_only, job, created) \
         VALUES ($1, $2, $3, $4, $5, $6, NULL, $7) ON CONFLICT (volume_uuid) DO NOTHING",
    )
    .bind(uuid)
    .bind(vm)
    .bind(&device)
    .bind(i64::from(hotplug))
    .bind(state)
    .bind(i64::from(read_only))
    .bind(db::now())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        let holder = match mounts_of_volume(conn, uuid).await?.first() {
            Some(m) => holder_for(conn, who, &row, m.vm_id).await?,
            None => "another VM".to_owned(),
        };
        return Err(VolumeError::Conflict(format!(
            "disk {uuid} is attached to {holder}"
        )));
    }
    Ok((row, device))
}

/// At deploy time (inside the run request's transaction): the VM's persistent disks.
pub async fn take_at_deploy(
    db: &crate::db::Db,
    conn: &mut AnyConnection,
    who: &Principal,
    vm: i64,
    uuids: &[String],
) -> Result<(), VolumeError> {
    for uuid in uuids {
        take(db, conn, who, &parse_uuid(uuid)?, vm, false).await?;
    }
    Ok(())
}

/// What the node agent gets for each of a VM's volumes in `state` (its root aside:
/// [`roots::root_of`]).
pub async fn disks_of(
    conn: &mut AnyConnection,
    vm: i64,
    states: &[&str],
) -> Result<Vec<NodeDisk>, VolumeError> {
    let rows: Vec<MountedRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{MOUNTED_SELECT} WHERE m.vm_id = $1 AND m.device <> $2 ORDER BY m.created, m.device"
    )))
    .bind(vm)
    .bind(roots::ROOT_DEVICE)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|m| states.contains(&m.state.as_str()))
        .map(MountedRow::into_node_disk)
        .collect())
}

/// The volume an attach or detach job was queued for.
pub async fn disks_of_job(
    conn: &mut AnyConnection,
    vm: i64,
    job: i64,
) -> Result<Vec<NodeDisk>, VolumeError> {
    let rows: Vec<MountedRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{MOUNTED_SELECT} WHERE m.vm_id = $1 AND m.job = $2"
    )))
    .bind(vm)
    .bind(job)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|m| matches!(m.state.as_str(), "attaching" | "detaching"))
        .map(MountedRow::into_node_disk)
        .collect())
}

/// A mount with what the node needs of its volume (and of the ORIGIN a LIVE reads through).
const MOUNTED_SELECT: &str = "SELECT m.volume_uuid, m.device, m.state, m.read_only, m.job, \
     v.location, v.kind, b.location AS base_location \
     FROM mounts m JOIN volumes v ON v.uuid = m.volume_uuid \
     LEFT JOIN volumes b ON b.uuid = v.base_uuid";

#[derive(sqlx::FromRow)]
struct MountedRow {
    volume_uuid: String,
    device: String,
    state: String,
    read_only: i64,
    #[allow(dead_code)]
    job: Option<i64>,
    location: String,
    kind: String,
    base_location: Option<String>,
}

impl MountedRow {
    fn into_node_disk(self) -> NodeDisk {
        NodeDisk {
            base_location: self.base_location,
            read_only: mount_read_only(self.read_only, &self.kind),
            uuid: self.volume_uuid,
            device: self.device,
            location: self.location,
            iscsi_login: None,
        }
    }
}

/// When a VM ends: its volumes are free again, its root snapshot quarantined.
pub async fn release(conn: &mut AnyConnection, vm: i64) -> Result<(), DbError> {
    roots::quarantine(conn, vm).await?;
    sqlx::query("DELETE FROM mounts WHERE vm_id = $1")
        .bind(vm)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A running VM of `who`'s, locked for the change.
async fn running_vm(
    cloud: &Cloud,
    conn: &mut AnyConnection,
    who: &Principal,
    vm: i64,
    any_owner: bool,
) -> Result<vms::VmRow, VolumeError> {
    let row = vms::load_for_update(&cloud.db, conn, who, vm, any_owner).await?;
    if row.state()? != VmState::Running {
        return Err(VolumeError::Conflict(format!(
            "VM {vm} is {}: volumes are hot-plugged into running VMs only",
            row.state
        )));
    }
    Ok(row)
}

/// `POST /disks/{uuid}/mounts`: attach to a running VM (a job of that VM).
pub async fn attach(
    cloud: &Cloud,
    who: &Principal,
    uuid: &str,
    vm: i64,
) -> Result<MountAccepted, VolumeError> {
    let uuid = parse_uuid(uuid)?;
    let mut tx = cloud.db.pool.begin().await?;
    running_vm(cloud, &mut tx, who, vm, false).await?;
    let (_, device) = take(&cloud.db, &mut tx, who, &uuid, vm, true).await?;
    let job = jobs::enqueue(&mut tx, vm, Action::Attach, &who.name).await?;
    sqlx::query("UPDATE mounts SET job = $1 WHERE volume_uuid = $2")
        .bind(job)
        .bind(&uuid)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    cloud.jobs_queued.notify_waiters();
    Ok(MountAccepted {
        uuid,
        vm_id: vm,
        device,
        job,
    })
}

/// `DELETE /disks/{uuid}/mounts/{vm}`: detach from a running VM (a job of that VM).
pub async fn detach(
    cloud: &Cloud,
    who: &Principal,
    uuid: &str,
    vm: i64,
) -> Result<MountAccepted, VolumeError> {
    let uuid = parse_uuid(uuid)?;
    let mut tx = cloud.db.pool.begin().await?;
    let volume = load(&mut tx, &uuid).await?;
    let mount = mounts_of_volume(&mut tx, &uuid)
        .await?
        .into_iter()
        .find(|m| m.vm_id == vm);
    let Some(mount) = mount else {
        load_visible(&mut tx, who, &uuid, "detach").await?;
        // Only the caller's own VM is looked at: the volume's owner learns nothing of
        // other users' VMs it is not on.
        running_vm(cloud, &mut tx, who, vm, false).await?;
        return Err(VolumeError::Conflict(format!(
            "disk {uuid} is not attached to VM {vm}"
        )));
    };
    // The VM's owner detaches what their VM holds, whoever owns the volume (it may have
    // turned private since it was attached); the volume's owner takes it back from
    // whichever VM holds it.
    match running_vm(cloud, &mut tx, who, vm, volume.owner == who.name).await {
        Ok(_) => {}
        // Neither's: a volume the caller cannot see is refused as StratusLab refused it.
        Err(e @ VolumeError::Vm(VmError::NotYours(_))) => {
            check_visible(&volume, who, "detach")?;
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    if mount.hotplugged == 0 {
        // StratusLab's words.
        return Err(VolumeError::Conflict(format!(
            "DISK {uuid}: Disk have not been hot-plugged"
        )));
    }
    if mount.state != "attached" {
        return Err(VolumeError::Conflict(format!(
            "disk {uuid} is {} on VM {vm}; try again in a moment",
            mount.state
        )));
    }
    let job = jobs::enqueue(&mut tx, vm, Action::Detach, &who.name).await?;
    sqlx::query("UPDATE mounts SET state = 'detaching', job = $1 WHERE volume_uuid = $2")
        .bind(job)
        .bind(&uuid)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    cloud.jobs_queued.notify_waiters();
    Ok(MountAccepted {
        uuid,
        vm_id: vm,
        device: mount.device,
        job,
    })
}

/// The agent's disk id for a volume: its UUID without dashes would be 32 characters;
/// the first 18 hex digits are unique enough within one VM and fit the agent's limits.
pub fn disk_id(uuid: &str) -> String {
    let hex: String = uuid.chars().filter(|c| *c != '-').take(18).collect();
    format!("v{hex}")
}

/// Keeps a volume with its VM (a detach that did not happen, an attach the node never
/// confirmed: the VM may have it, so nobody else may take it).
pub async fn keep_attached(conn: &mut AnyConnection, uuid: &str) -> Result<(), DbError> {
    sqlx::query("UPDATE mounts SET state = 'attached', job = NULL WHERE volume_uuid = $1")
        .bind(uuid)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Marks a hot-plug done or undone (by the job that carried it out).
pub async fn settle(conn: &mut AnyConnection, uuid: &str, attached: bool) -> Result<(), DbError> {
    if attached {
        keep_attached(conn, uuid).await?;
    } else {
        sqlx::query("DELETE FROM mounts WHERE volume_uuid = $1")
            .bind(uuid)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
