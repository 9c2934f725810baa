//! VM root disks from pdisk (`root_volumes`), as StratusLab made them: a Marketplace image
//! is fetched once into an ORIGIN volume owned by the service, and each VM boots its own
//! LIVE copy-on-write snapshot of it, owned by the VM's user. When the VM ends, its
//! snapshot is quarantined (owned by the service, stamped with the time) and the collector
//! deletes it once `quarantine_period_s` has passed — the stamp is in the database, so a
//! restarted orchestrator collects what its predecessor quarantined.
//!
//! Roots live in the root pool (`root_volume_pool`, else the default pool): on an RBD pool
//! the ORIGIN is an RBD image with a protected snapshot and each LIVE a clone of it, which
//! the nodes' VMMs open through librbd; on a file pool each LIVE is a qcow2 overlay the
//! nodes open with its ORIGIN by path; on an iSCSI pool each LIVE is a sparse copy of the
//! ORIGIN's file, exported to the VM's node alone while the VM runs. Images are downloaded
//! into a pool's directory either way. Nodes still take the kernel and initrd from
//! their own copy of the image.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyConnection;
use stratus_images::Metadata;
use stratus_vmm::devices::virtio::block::io::qcow2::flatten_to_raw_while;
use stratus_vmm::devices::virtio::block::io::ImageFormat;

use super::hold::{Fence, Hold};
use super::{
    delete_unchecked, finish_create, finish_delete, insert_creating, load, load_locked,
    storage_error, undo_create, Content, MountedRow, NewVolume, NodeDisk, Refused, Visibility,
    VolumeError, VolumeKind, VolumeRow, MAX_SIZE_GIB, MOUNTED_SELECT, VOLUME_COLUMNS,
};
use crate::db;
use crate::vms::VmRow;
use crate::Cloud;

/// The owner of ORIGINs and quarantined snapshots: no user can have this name (user names
/// have no `:`), so nobody but admins sees or touches them.
pub const SERVICE_OWNER: &str = "pdisk:service";

/// The guest-visible name pdisk gives a VM's root in its mounts (attached volumes count
/// `vda` upwards and `vdz` downwards).
pub const ROOT_DEVICE: &str = "root";

const ORIGIN_KINDS: &str = "('MACHINE_IMAGE_ORIGIN', 'DATA_IMAGE_ORIGIN')";

/// A VM's root, or why its deployment has to wait.
pub enum Root {
    Ready(NodeDisk),
    /// Another deployment is filling the image's ORIGIN.
    Waiting(String),
}

/// The VM's root snapshot, made now if it has none: a retried deployment (after a crash,
/// or on another node) finds the one made before, with what the guest wrote to it.
pub async fn ensure(cloud: &Cloud, vm: &VmRow, image: &Metadata) -> Result<Root, VolumeError> {
    let mut conn = cloud.db.pool.acquire().await?;
    if let Some((disk, state)) = root_of(&mut conn, vm.id).await? {
        if state == "creating" {
            // A crash came between the row and the overlay: made again (never used yet)
            // once its maker's hold has lapsed — never while a maker may still finish it.
            let making =
                || Root::Waiting(format!("the root snapshot of VM {} is being made", vm.id));
            let live = load(&mut conn, &disk.uuid).await?;
            let Some(mut hold) = Hold::take_over(&mut conn, &live).await? else {
                return Ok(making());
            };
            let origin = disk.base_location.clone().unwrap_or_default();
            // finish_create takes a connection of its own (SQLite's pool has one).
            drop(conn);
            let made = finish_create(
                cloud,
                &mut hold,
                &live.uuid,
                live.size_gib,
                &live.location,
                Content::SnapshotOf(&origin),
            )
            .await;
            return match made {
                Ok(()) => Ok(Root::Ready(disk)),
                Err(VolumeError::TakenOver(_)) => Ok(making()),
                Err(e) => Err(e),
            };
        }
        return Ok(Root::Ready(disk));
    }
    drop(conn);
    let origin = match origin_of(cloud, image).await? {
        Ok(origin) => origin,
        Err(why) => return Ok(Root::Waiting(why)),
    };
    let uuid = uuid::Uuid::new_v4().hyphenated().to_string();
    let storage = cloud.volumes.as_ref().ok_or_else(super::no_storage)?;
    let location = storage.location_beside(&origin.location, &uuid, true)?;
    let identifier = format!("snapshot:{}", origin.uuid);
    let mut tx = cloud.db.pool.begin().await?;
    // Locked, as a delete locks it: an eviction of the ORIGIN either sees this snapshot or
    // has marked the ORIGIN deleting before it is read here.
    if load_locked(&cloud.db, &mut tx, &origin.uuid).await?.state != "available" {
        return Ok(Root::Waiting(format!(
            "image {} is being evicted from pdisk",
            image.identifier
        )));
    }
    let hold = insert_creating(
        &mut tx,
        &NewVolume {
            uuid: &uuid,
            owner: &vm.owner,
            tag: "",
            size_gib: origin.size_gib,
            visibility: Visibility::Private,
            kind: VolumeKind::MachineImageLive,
            identifier: Some(&identifier),
            base_uuid: Some(&origin.uuid),
            pool: &origin.pool,
            location: &location,
        },
    )
    .await?;
    let Some(mut hold) = hold else {
        return Err(VolumeError::Conflict(format!("disk {uuid} exists already")));
    };
    sqlx::query(
        "INSERT INTO mounts (volume_uuid, vm_id, device, hotplugged, state, read_only, job, created) \
         VALUES ($1, $2, $3, 0, 'attached', 0, NULL, $4)",
    )
    .bind(&uuid)
    .bind(vm.id)
    .bind(ROOT_DEVICE)
    .bind(db::now())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let made = finish_create(
        cloud,
        &mut hold,
        &uuid,
        origin.size_gib,
        &location,
        Content::SnapshotOf(&origin.location),
    )
    .await;
    match made {
        Ok(()) => {}
        // The one that took it over finishes it; the next attempt finds it.
        Err(VolumeError::TakenOver(_)) => {
            return Ok(Root::Waiting(format!(
                "the root snapshot of VM {} is being made",
                vm.id
            )))
        }
        Err(e) => {
            // Unmounted as it turns `deleting`: a kill between the two would leave a
            // snapshot that no VM has, which a restart would finish for nobody.
            let mut tx = cloud.db.pool.begin().await?;
            sqlx::query("DELETE FROM mounts WHERE volume_uuid = $1")
                .bind(&uuid)
                .execute(&mut *tx)
                .await?;
            hold.turn(&mut tx, "deleting").await?;
            tx.commit().await?;
            if let Err(e) = finish_delete(cloud, hold, &uuid, &location, Refused::Retry).await {
                tracing::warn!(volume = %uuid, error = %e, "cannot remove a failed root snapshot yet");
            }
            return Err(e);
        }
    }
    let mut conn = cloud.db.pool.acquire().await?;
    match root_of(&mut conn, vm.id).await? {
        Some((disk, _)) => Ok(Root::Ready(disk)),
        None => Err(VolumeError::Conflict(format!(
            "the root snapshot of VM {} vanished while it was made",
            vm.id
        ))),
    }
}

/// The VM's root snapshot as its node opens it, and the volume's state.
pub async fn root_of(
    conn: &mut AnyConnection,
    vm: i64,
) -> Result<Option<(NodeDisk, String)>, VolumeError> {
    let mounted = sqlx::query_as::<_, MountedRow>(sqlx::AssertSqlSafe(format!(
        "{MOUNTED_SELECT} WHERE m.vm_id = $1 AND m.device = $2"
    )))
    .bind(vm)
    .bind(ROOT_DEVICE)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(mounted) = mounted else {
        return Ok(None);
    };
    let state = load(conn, &mounted.volume_uuid).await?.state;
    Ok(Some((mounted.into_node_disk(), state)))
}

/// The image's ORIGIN, filled from the Marketplace entry's location if this cloud has none
/// yet; `Err(why)` while another deployment is filling it.
async fn origin_of(
    cloud: &Cloud,
    image: &Metadata,
) -> Result<Result<VolumeRow, String>, VolumeError> {
    let identifier = image.identifier.to_string();
    let query = format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes WHERE identifier = $1 AND kind IN {ORIGIN_KINDS}"
    );
    let busy = || format!("waiting for image {identifier} to be cached in pdisk");
    let mut conn = cloud.db.pool.acquire().await?;
    let found = sqlx::query_as::<_, VolumeRow>(sqlx::AssertSqlSafe(query))
        .bind(&identifier)
        .fetch_optional(&mut *conn)
        .await?;
    match found {
        Some(origin) if origin.state == "available" => return Ok(Ok(origin)),
        Some(origin) if origin.state == "creating" => {
            // Its filler died (another replica, killed): taken over, removed, made anew
            // by the next attempt.
            if let Some(mut hold) = Hold::take_over(&mut conn, &origin).await? {
                hold.turn(&mut conn, "deleting").await?;
                // The removal takes a connection of its own (SQLite's pool has one).
                drop(conn);
                tracing::warn!(image = %identifier, volume = %origin.uuid,
                    "an abandoned ORIGIN fill is started again");
                finish_delete(cloud, hold, &origin.uuid, &origin.location, Refused::Retry).await?;
            }
            return Ok(Err(busy()));
        }
        Some(origin) if origin.state == "deleting" => {
            // An eviction or a takeover that stopped half-way: finished here.
            if let Some(hold) = Hold::take_over(&mut conn, &origin).await? {
                drop(conn);
                finish_delete(cloud, hold, &origin.uuid, &origin.location, Refused::Retry).await?;
            }
            return Ok(Err(busy()));
        }
        Some(_) => return Ok(Err(busy())),
        None => {}
    }
    let storage = cloud.volumes.as_ref().ok_or_else(super::no_storage)?;
    let root_pool = storage.root_pool();
    let staging = storage.staging_dir().ok_or_else(|| {
        VolumeError::Conflict(
            "root_volumes needs a pool with a directory to download images to".into(),
        )
    })?;
    let size_gib = image.bytes.div_ceil(1 << 30).max(1);
    if size_gib > MAX_SIZE_GIB as u64 {
        return Err(VolumeError::BadRequest(format!(
            "image {identifier} has {} bytes: pdisk volumes hold at most {MAX_SIZE_GIB} GiB",
            image.bytes
        )));
    }
    let uuid = uuid::Uuid::new_v4().hyphenated().to_string();
    let location = root_pool.location(&uuid);
    // StratusLab tagged an image's ORIGIN with the image's title, cut to a tag's length.
    let tag: String = (image.title.as_deref().unwrap_or(""))
        .chars()
        .filter(|c| !c.is_control())
        .take(super::MAX_TAG_CHARS)
        .collect();
    let hold = insert_creating(
        &mut conn,
        &NewVolume {
            uuid: &uuid,
            owner: SERVICE_OWNER,
            tag: &tag,
            size_gib: size_gib as i64,
            visibility: Visibility::Private,
            kind: VolumeKind::MachineImageOrigin,
            identifier: Some(&identifier),
            base_uuid: None,
            pool: &root_pool.name,
            location: &location,
        },
    )
    .await?;
    let Some(mut hold) = hold else {
        // The unique index let another deployment's row in first.
        return Ok(Err(busy()));
    };
    drop(conn);
    let policy = cloud.policy.clone().unwrap_or_default();
    let follow_files = cloud.config.allow_file_image_locations;
    let entry = image.clone();
    // An RBD ORIGIN is imported from a raw file made beside the downloads.
    let rbd = match &root_pool.backend {
        super::PoolBackend::Rbd(rbd) => Some(rbd),
        _ => None,
    };
    let dest = match &root_pool.backend {
        super::PoolBackend::Rbd(_) => staging.join(format!("{uuid}.raw")),
        super::PoolBackend::Iscsi(_, files) => files.location(&uuid),
        super::PoolBackend::File(_) => std::path::PathBuf::from(&location),
    };
    let (dest_ref, location_ref) = (&dest, &location);
    let fill = |fence: Fence| async move {
        let (dest, location) = (dest_ref, location_ref);
        let into = dest.clone();
        tokio::task::spawn_blocking(move || {
            fill(&staging, policy, follow_files, &entry, &into, &fence)
        })
        .await
        .map_err(storage_error)??;
        if let (Some(rbd), Some(image)) = (rbd, super::rbd::RbdPool::image_at(location)) {
            let imported = rbd.import(dest, image).await.map_err(storage_error);
            let _ = std::fs::remove_file(dest);
            imported?;
        }
        Ok::<_, VolumeError>(())
    };
    // Held while it runs: others wait for this fill rather than take it over.
    let filled = match hold.keep_while(&cloud.db, fill).await {
        Ok(()) => {
            let mut conn = cloud.db.pool.acquire().await?;
            hold.finish(&mut conn, "available").await
        }
        Err(e) => Err(e),
    };
    match filled {
        Ok(()) => {}
        Err(VolumeError::TakenOver(_)) => {
            // Taken over while this fill was stalled: the one that took it removes what
            // was made here, and the next attempt fills a new ORIGIN.
            let _ = std::fs::remove_file(&dest);
            return Ok(Err(busy()));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&dest);
            undo_create(cloud, hold, &uuid, &location).await;
            return Err(e);
        }
    }
    tracing::info!(image = %identifier, volume = %uuid, "image cached in pdisk");
    let mut conn = cloud.db.pool.acquire().await?;
    Ok(Ok(load(&mut conn, &uuid).await?))
}

/// Downloads the image (checked against the site policy, its size and its checksums) and
/// writes what it reads as into a sparse raw ORIGIN at `dest`; a qcow2 image naming a
/// backing file is refused.
fn fill(
    staging: &Path,
    policy: stratus_images::policy::Policy,
    follow_files: bool,
    image: &Metadata,
    dest: &Path,
    fence: &Fence,
) -> Result<(), VolumeError> {
    let failed = |source| VolumeError::Image {
        identifier: image.identifier.to_string(),
        source,
    };
    let cache = stratus_images::cache::ImageCache::new(staging, policy)
        .map_err(failed)?
        .allowing_file_locations(follow_files);
    let downloaded = cache.get(image, &mut |_| {}).map_err(failed)?;
    let format = match image.format {
        Some(stratus_images::ImageFormat::Qcow2) => ImageFormat::Qcow2,
        _ => ImageFormat::Raw,
    };
    // A fill taken over meanwhile (its ORIGIN's row and file removed) makes no file anew.
    let copied = flatten_to_raw_while(&downloaded, format, &[], dest, &|| fence.holds())
        .map_err(super::copy_error);
    // The ORIGIN holds the data now: the download is not kept twice.
    let _ = std::fs::remove_file(&downloaded);
    copied.map(|_| ())
}

/// When the VM ends: its root snapshot becomes the service's, stamped for collection, and
/// private: one its owner had made public would otherwise stay open to everyone — to attach
/// (which would hold off its collection for as long as it stayed attached) or to copy.
pub async fn quarantine(conn: &mut AnyConnection, vm: i64) -> Result<(), db::DbError> {
    let now = db::now();
    sqlx::query(
        "UPDATE volumes SET owner = $1, quarantine = $2, visibility = 'private', \
         updated = CASE WHEN state IN ('creating', 'deleting') THEN updated ELSE $2 END \
         WHERE uuid IN (SELECT volume_uuid FROM mounts WHERE vm_id = $3 AND device = $4)",
    )
    .bind(SERVICE_OWNER)
    .bind(&now)
    .bind(vm)
    .bind(ROOT_DEVICE)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deletes the quarantined snapshots whose time is up; returns how many. Each is claimed
/// in the database first, so replicas collecting at once delete each one once.
pub async fn collect(cloud: &Cloud) -> Result<usize, VolumeError> {
    let period = chrono::Duration::seconds(cloud.config.quarantine_period_s as i64);
    let cutoff = db::timestamp(chrono::Utc::now() - period);
    let due: Vec<(String,)> = sqlx::query_as(
        "SELECT uuid FROM volumes WHERE quarantine IS NOT NULL \
         AND quarantine <= $1 AND state IN ('available', 'deleting') ORDER BY quarantine",
    )
    .bind(&cutoff)
    .fetch_all(&cloud.db.pool)
    .await?;
    let mut collected = 0;
    for (uuid,) in due {
        // A volume's delete: under its row lock, refused while mounted or while a rebase
        // reads it, so replicas collecting at once delete each one once.
        match delete_unchecked(cloud, &uuid).await {
            Ok(()) => {
                tracing::info!(volume = %uuid, "quarantined snapshot collected");
                collected += 1;
            }
            Err(
                VolumeError::Conflict(_) | VolumeError::NotFound(_) | VolumeError::TakenOver(_),
            ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(collected)
}

/// Collects quarantined snapshots for as long as the orchestrator runs.
pub async fn collector(cloud: Arc<Cloud>) {
    let every = Duration::from_secs((cloud.config.quarantine_period_s / 4).clamp(1, 30));
    loop {
        match collect(&cloud).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(collected = n, "quarantine collection"),
            Err(e) => tracing::warn!(error = %e, "cannot collect quarantined snapshots"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Deletes the image ORIGINs no VM's root and no other volume needs any more (an admin's
/// command: StratusLab never evicted them); returns their UUIDs. One that a deployment
/// snapshots meanwhile stays.
pub async fn evict_unused(cloud: &Cloud) -> Result<Vec<String>, VolumeError> {
    let candidates: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT uuid FROM volumes WHERE owner = $1 AND identifier IS NOT NULL \
         AND kind IN {ORIGIN_KINDS} AND state = 'available' ORDER BY created"
    )))
    .bind(SERVICE_OWNER)
    .fetch_all(&cloud.db.pool)
    .await?;
    let mut evicted = Vec::new();
    for (uuid,) in candidates {
        match delete_unchecked(cloud, &uuid).await {
            Ok(()) => evicted.push(uuid),
            // Snapshots or a mount need it: kept.
            Err(
                VolumeError::Conflict(_) | VolumeError::NotFound(_) | VolumeError::TakenOver(_),
            ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(evicted)
}
