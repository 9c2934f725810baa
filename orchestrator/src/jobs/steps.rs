//! What each job does. Every step reads the VM's row afresh and is safe to run again from
//! the start after a crash: the node agent's create is idempotent, and kill/delete of what
//! is gone already succeed.

use std::time::Duration;

use stratus_nodeagent::api::types::{
    AttachDisk, BootSpec, ContextSpec, DiskSource, DiskSpec, NicSpec, VmSpec,
    VmState as AgentVmState,
};
use stratus_nodeagent::vms::ROOT_DISK_ID;

use super::{Action, Claimed, Outcome};
use crate::agent_client::AgentError;
use crate::api::types::VmState;
use crate::db::DbError;
use crate::networks::{self, Lease};
use crate::pdisk::{self, NodeDisk};
use crate::placement::{self, Requirements, Reservation};
use crate::vms::{self, Deployment, VmError, VmRow};
use crate::{nodes, Cloud};

/// After this many attempts a node that does not answer a create gives up the VM.
const MAX_DEPLOY_ATTEMPTS: i64 = 5;
/// Tries of a hot-plug job (2 s apart) before it gives up.
const MAX_HOTPLUG_ATTEMPTS: i64 = 30;
/// How long a VM waits for room before placement is tried again.
const NO_ROOM_RETRY: Duration = Duration::from_secs(2);
/// How often a deployment looks whether its image's ORIGIN has been filled.
const ORIGIN_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Volume(#[from] pdisk::VolumeError),
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        StepError::Db(e.into())
    }
}

pub async fn run(cloud: &Cloud, job: &Claimed) -> Result<Outcome, StepError> {
    let row = {
        let mut conn = cloud.db.pool.acquire().await?;
        match vms::load(&mut conn, job.vm).await {
            Ok(row) => row,
            Err(VmError::NotFound(_)) => return Ok(Outcome::Failed("the VM is gone".into())),
            Err(e) => return Err(e.into()),
        }
    };
    if row.holds == 0 {
        // Released already (an earlier run of this job got that far).
        return Ok(Outcome::Done);
    }
    match job.action {
        Action::Deploy => deploy(cloud, job, row).await,
        Action::Kill => stop(cloud, row, false).await,
        Action::Shutdown => stop(cloud, row, true).await,
        Action::Epilog => epilog(cloud, row).await,
        Action::Attach => hotplug(cloud, job, row, true).await,
        Action::Detach => hotplug(cloud, job, row, false).await,
    }
}

fn backoff(attempts: i64) -> Duration {
    Duration::from_secs(1 << attempts.clamp(0, 5))
}

async fn set_state(
    cloud: &Cloud,
    vm: i64,
    state: VmState,
    reason: Option<&str>,
) -> Result<(), StepError> {
    let mut conn = cloud.db.pool.acquire().await?;
    vms::set_state(&mut conn, vm, state, reason).await?;
    Ok(())
}

/// Fails the VM and queues the epilog that undoes what was made for it (on its node, and
/// its quota, addresses and disks) in one commit: failed, then killed before the release,
/// it would hold them for good, as a failed VM's deploy is over.
async fn fail(cloud: &Cloud, row: &VmRow, why: &str) -> Result<(), StepError> {
    let mut tx = cloud.db.pool.begin().await?;
    vms::set_state(&mut tx, row.id, VmState::Failed, Some(why)).await?;
    super::enqueue(&mut tx, row.id, Action::Epilog, &row.owner).await?;
    tx.commit().await?;
    Ok(())
}

/// Releases the VM's quota, addresses and node room; `state` is its final state (None:
/// keep the one it has, e.g. Failed with its reason).
async fn release(cloud: &Cloud, vm: i64, state: Option<(VmState, &str)>) -> Result<(), StepError> {
    let volumes = {
        let mut conn = cloud.db.pool.acquire().await?;
        let mut volumes =
            pdisk::disks_of(&mut conn, vm, &["attached", "attaching", "detaching"]).await?;
        volumes.extend(
            pdisk::roots::root_of(&mut conn, vm)
                .await?
                .map(|(root, _)| root),
        );
        volumes
    };
    // The VM is gone from its node: its ways in go while its mounts still hold the volumes
    // (so no other VM can have them yet); a pass of `pdisk::reexport` puts back what a
    // failed commit leaves mounted, and withdraws what fails here.
    if let Some(storage) = &cloud.volumes {
        for volume in &volumes {
            if let Err(e) = storage.withdraw(&cloud.db, volume).await {
                tracing::warn!(volume = %volume.uuid, error = %e, "cannot withdraw");
            }
        }
    }
    let mut tx = cloud.db.pool.begin().await?;
    vms::release(&mut tx, vm, state).await?;
    tx.commit().await?;
    cloud.metrics.vm_released.inc();
    Ok(())
}

/// How the node agent sees a persistent volume: where its VMM opens it, and a serial the
/// guest can find it by (`/dev/disk/by-id/virtio-<first 20 characters of the UUID>`).
fn volume_disk(cloud: &Cloud, volume: &NodeDisk) -> (String, AttachDisk) {
    (
        pdisk::disk_id(&volume.uuid),
        AttachDisk {
            source: pdisk::node_source(cloud.volumes.as_ref(), volume),
            read_only: volume.read_only,
            serial: Some(volume.uuid.chars().take(20).collect()),
        },
    )
}

/// The node agent's spec for the VM.
fn spec_of(
    cloud: &Cloud,
    row: &VmRow,
    deployment: &Deployment,
    leases: &[Lease],
    root: Option<&NodeDisk>,
    volumes: &[NodeDisk],
) -> VmSpec {
    let request = &deployment.request;
    let mut disks = Vec::new();
    if let Some(root) = root {
        disks.push(DiskSpec {
            id: ROOT_DISK_ID.into(),
            source: pdisk::node_source(cloud.volumes.as_ref(), root),
            read_only: false,
            // Found in the guest like any volume: /dev/disk/by-id/virtio-<UUID's start>.
            serial: Some(root.uuid.chars().take(20).collect()),
        });
    }
    if row.swap_mib > 0 {
        disks.push(DiskSpec {
            id: "swap".into(),
            source: DiskSource::Volatile {
                size_gib: (row.swap_mib as u64).div_ceil(1024),
            },
            read_only: false,
            serial: Some("swap".into()),
        });
    }
    if let Some(size_gib) = request.volatile_disk_gib {
        disks.push(DiskSpec {
            id: "volatile".into(),
            source: DiskSource::Volatile { size_gib },
            read_only: false,
            serial: Some("volatile".into()),
        });
    }
    for (i, image) in deployment.readonly_images.iter().enumerate() {
        disks.push(DiskSpec {
            id: format!("readonly{i}"),
            source: DiskSource::Image {
                entry: Box::new(image.clone()),
            },
            read_only: true,
            serial: Some(format!("readonly-{i}")),
        });
    }
    for volume in volumes {
        let (id, disk) = volume_disk(cloud, volume);
        disks.push(DiskSpec {
            id,
            source: disk.source,
            read_only: disk.read_only,
            serial: disk.serial,
        });
    }
    let vcpus = row.vcpus.clamp(1, 255) as u8;
    // A queue pair per vCPU: in the nested benchmark two pairs for two vCPUs carried the
    // guest's transmit at 6× one pair's rate (README, "Nested virtio-net").
    let queues = u16::from(vcpus).min(stratus_vmm::devices::virtio::net::MAX_QUEUE_PAIRS);
    let nics = leases
        .iter()
        .enumerate()
        .map(|(i, lease)| NicSpec {
            id: format!("eth{i}"),
            network: lease.network.clone(),
            mac: lease.mac.clone(),
            ip: lease.ip,
            hostname: Some(row.name.clone()),
            queues,
        })
        .collect();
    VmSpec {
        vcpus,
        memory_mib: row.memory_mib.max(1) as u64,
        boot: BootSpec {
            kernel: None,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            image: Some(deployment.image.clone()),
        },
        disks,
        nics,
        context: Some(ContextSpec {
            method: deployment.context_method.clone(),
            hostname: Some(row.name.clone()),
            public_key: request.public_key.clone(),
            pairs: request.context.clone(),
            user_data: request.user_data.clone(),
        }),
    }
}

/// Places the VM (if it has no node yet) and has its node start it; a node that refuses
/// (it filled up meanwhile, or was disabled) hands it to the next candidate.
async fn deploy(cloud: &Cloud, job: &Claimed, mut row: VmRow) -> Result<Outcome, StepError> {
    let state = row.state()?;
    if state.is_final() || matches!(state, VmState::Running | VmState::Unknown) {
        return Ok(Outcome::Done);
    }
    if stop_requested(cloud, row.id).await? {
        // The kill or shutdown queued behind this job releases the VM.
        return Ok(Outcome::Done);
    }
    let deployment = row.deployment()?;
    let requirements = deployment
        .request
        .requirements
        .as_deref()
        .map(Requirements::parse)
        .transpose()
        .map_err(VmError::BadRequest)?;
    let mut root = match root_disk(cloud, job, &row, &deployment).await? {
        Ok(root) => root,
        Err(outcome) => return Ok(outcome),
    };
    let mut refused_by = Vec::new();
    loop {
        let node_id = match row.node_id {
            Some(n) => n,
            None => match place(
                cloud,
                &row,
                deployment
                    .readonly_images
                    .iter()
                    .chain([&deployment.image])
                    .map(|m| m.bytes as i64)
                    .sum(),
                requirements.as_ref(),
                &refused_by,
            )
            .await?
            {
                Ok(n) => n,
                Err(why) => {
                    if state != VmState::Pending || row.reason.as_deref() != Some(why.as_str()) {
                        set_state(cloud, row.id, VmState::Pending, Some(&why)).await?;
                    }
                    return Ok(Outcome::Wait(NO_ROOM_RETRY, why));
                }
            },
        };
        let (node, leases, mut volumes) = {
            let mut conn = cloud.db.pool.acquire().await?;
            (
                nodes::load(&mut conn, node_id).await?,
                networks::leases_of(&mut conn, row.id)
                    .await
                    .map_err(VmError::from)?,
                pdisk::disks_of(&mut conn, row.id, &["attached"]).await?,
            )
        };
        if let Some(storage) = &cloud.volumes {
            for volume in root.iter_mut().chain(&mut volumes) {
                if let Err(e) = storage.prepare(&cloud.db, volume, &node).await {
                    let why = format!("volume {} cannot be served: {e}", volume.uuid);
                    // Retried like a node that does not answer; a volume the storage can
                    // never serve (its pool is gone) fails the VM at once.
                    let permanent = matches!(e, pdisk::VolumeError::Conflict(_));
                    if permanent || job.attempts >= MAX_DEPLOY_ATTEMPTS {
                        fail(cloud, &row, &why).await?;
                        return Ok(Outcome::Failed(why));
                    }
                    return Ok(Outcome::Retry(backoff(job.attempts), why));
                }
            }
        }
        let spec = spec_of(cloud, &row, &deployment, &leases, root.as_ref(), &volumes);
        let client = node.client(&cloud.agents);
        match client.put_vm(&row.id.to_string(), &spec).await {
            Ok(info) => {
                let placed = {
                    let mut conn = cloud.db.pool.acquire().await?;
                    vms::load(&mut conn, row.id).await?.node_id
                };
                if placed != Some(node_id) {
                    // A worker that took this job over placed the VM elsewhere meanwhile:
                    // this copy is the duplicate, and that worker records the VM's state.
                    let id = row.id.to_string();
                    let _ = tolerate_gone(client.kill(&id).await);
                    let _ = client.delete(&id).await;
                    return Ok(Outcome::Done);
                }
                if info.state == AgentVmState::Starting {
                    set_state(cloud, row.id, VmState::Boot, None).await?;
                }
                set_state(
                    cloud,
                    row.id,
                    VmState::Running,
                    Some(&format!("running on {}", node.name)),
                )
                .await?;
                cloud.metrics.placements.inc();
                return Ok(Outcome::Done);
            }
            Err(AgentError::Refused {
                status: 409,
                reason,
                ..
            }) => {
                let why = format!("node {} refused it: {reason}", node.name);
                let mut tx = cloud.db.pool.begin().await?;
                // Only if it is still placed there: a worker that took this job over may
                // have moved it meanwhile.
                let unplaced =
                    sqlx::query("UPDATE vms SET node_id = NULL WHERE id = $1 AND node_id = $2")
                        .bind(row.id)
                        .bind(node_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                if unplaced == 1 {
                    vms::set_state(&mut tx, row.id, VmState::Pending, Some(&why)).await?;
                }
                tx.commit().await?;
                refused_by.push(node_id);
                row = {
                    let mut conn = cloud.db.pool.acquire().await?;
                    vms::load(&mut conn, row.id).await?
                };
            }
            Err(AgentError::Refused { status, reason, .. }) if (400..500).contains(&status) => {
                // The node cannot make this VM (its image, context, network): it is the
                // request's fault, and another node would refuse it too.
                let why = format!("node {} cannot start it: {reason}", node.name);
                fail(cloud, &row, &why).await?;
                return Ok(Outcome::Failed(why));
            }
            Err(e) => {
                if job.attempts >= MAX_DEPLOY_ATTEMPTS {
                    // The node may have made part of it: the epilog undoes that once the
                    // node answers again.
                    let why = format!("gave up after {} attempts: {e}", job.attempts);
                    fail(cloud, &row, &why).await?;
                    return Ok(Outcome::Failed(why));
                }
                return Ok(Outcome::Retry(backoff(job.attempts), e.to_string()));
            }
        }
    }
}

/// The VM's root snapshot when pdisk keeps roots (`root_volumes`), made before the VM is
/// placed (the image may have to be fetched first); or what the deploy job does instead.
async fn root_disk(
    cloud: &Cloud,
    job: &Claimed,
    row: &VmRow,
    deployment: &Deployment,
) -> Result<Result<Option<NodeDisk>, Outcome>, StepError> {
    if !cloud.config.root_volumes {
        return Ok(Ok(None));
    }
    match pdisk::roots::ensure(cloud, row, &deployment.image).await {
        Ok(pdisk::roots::Root::Ready(disk)) => Ok(Ok(Some(disk))),
        Ok(pdisk::roots::Root::Waiting(why)) => Ok(Err(Outcome::Wait(ORIGIN_RETRY, why))),
        Err(e) => {
            let why = format!("no root disk: {e}");
            // A refused image (policy, checksums, size) or storage that cannot hold it
            // stays so; a Marketplace or a disk that failed may do better next time.
            let permanent = matches!(
                e,
                pdisk::VolumeError::Conflict(_) | pdisk::VolumeError::BadRequest(_)
            );
            if permanent || job.attempts >= MAX_DEPLOY_ATTEMPTS {
                fail(cloud, row, &why).await?;
                return Ok(Err(Outcome::Failed(why)));
            }
            Ok(Err(Outcome::Retry(backoff(job.attempts), why)))
        }
    }
}

/// Whether the user asked for the VM to end while its deploy waited.
async fn stop_requested(cloud: &Cloud, vm: i64) -> Result<bool, StepError> {
    let mut conn = cloud.db.pool.acquire().await?;
    Ok(super::has_open(&mut conn, vm, &[Action::Kill, Action::Shutdown]).await?)
}

/// Takes room for the VM on the best candidate node and records it there (Prolog).
/// The inner error says why no node could take it.
async fn place(
    cloud: &Cloud,
    row: &VmRow,
    image_bytes: i64,
    requirements: Option<&Requirements>,
    refused_by: &[i64],
) -> Result<Result<i64, String>, StepError> {
    let db = &cloud.db;
    let mut tx = db.pool.begin().await?;
    let (fit, refusals) = placement::candidates(
        &mut tx,
        row.vcpus,
        row.memory_mib,
        image_bytes,
        requirements,
        cloud.config.rank,
        refused_by,
    )
    .await?;
    let fitted = !fit.is_empty();
    for room in fit {
        match placement::reserve(db, &mut tx, room.node.id, row.id, row.vcpus, row.memory_mib)
            .await?
        {
            Reservation::Taken => {
                vms::set_state(
                    &mut tx,
                    row.id,
                    VmState::Prolog,
                    Some(&format!("placed on {}", room.node.name)),
                )
                .await?;
                tx.commit().await?;
                return Ok(Ok(room.node.id));
            }
            Reservation::PlacedElsewhere(node) => {
                tx.commit().await?;
                return Ok(Ok(node));
            }
            Reservation::Full => {}
        }
    }
    tx.commit().await?;
    if fitted {
        return Ok(Err(
            "every node that had room for it filled up meanwhile".into()
        ));
    }
    Ok(Err(refusals.to_string()))
}

/// Kill (at once) or shutdown (power button, then a hard stop after the timeout), then
/// the node's resources are released and the VM is Done.
async fn stop(cloud: &Cloud, row: VmRow, graceful: bool) -> Result<Outcome, StepError> {
    let what = if graceful { "shut down" } else { "killed" };
    let Some(node_id) = row.node_id else {
        release(
            cloud,
            row.id,
            Some((VmState::Done, &format!("{what} before it was placed"))),
        )
        .await?;
        return Ok(Outcome::Done);
    };
    let node = {
        let mut conn = cloud.db.pool.acquire().await?;
        nodes::load(&mut conn, node_id).await?
    };
    let client = node.client(&cloud.agents);
    let id = row.id.to_string();
    if graceful {
        if row.state()? != VmState::Shutdown {
            set_state(cloud, row.id, VmState::Shutdown, Some("shutdown requested")).await?;
        }
        let timeout = Duration::from_secs(cloud.config.shutdown_timeout_s);
        if let Err(e) = tolerate_gone(client.shutdown(&id, timeout).await) {
            return Ok(Outcome::Retry(Duration::from_secs(2), e.to_string()));
        }
        // The node stops it hard after the timeout; allow for that and a little more.
        let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(30);
        loop {
            match client.vm(&id).await {
                Ok(Some(info)) if info.state.is_active() => {}
                Ok(_) => break,
                Err(e) => return Ok(Outcome::Retry(Duration::from_secs(2), e.to_string())),
            }
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // Also after a shutdown: a guest that outlived the deadline is stopped now.
    if let Err(e) = tolerate_gone(client.kill(&id).await) {
        return Ok(Outcome::Retry(Duration::from_secs(2), e.to_string()));
    }
    set_state(cloud, row.id, VmState::Epilog, Some(what)).await?;
    if let Err(e) = client.delete(&id).await {
        return Ok(Outcome::Retry(Duration::from_secs(2), e.to_string()));
    }
    release(cloud, row.id, Some((VmState::Done, what))).await?;
    Ok(Outcome::Done)
}

/// A kill or shutdown of a VM that has ended or that the node does not know is no error.
fn tolerate_gone<T>(result: Result<T, AgentError>) -> Result<(), AgentError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.status(), Some(404 | 409)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The VM ended on its own (powered off, failed, lost): release what the node holds for
/// it. A Failed VM stays Failed with its reason.
async fn epilog(cloud: &Cloud, row: VmRow) -> Result<Outcome, StepError> {
    let state = row.state()?;
    if let Some(node_id) = row.node_id {
        let node = {
            let mut conn = cloud.db.pool.acquire().await?;
            nodes::load(&mut conn, node_id).await?
        };
        let client = node.client(&cloud.agents);
        let id = row.id.to_string();
        let cleaned = async {
            if let Some(info) = client.vm(&id).await? {
                if info.state.is_active() {
                    tolerate_gone(client.kill(&id).await)?;
                }
            }
            client.delete(&id).await
        }
        .await;
        if let Err(e) = cleaned {
            return Ok(Outcome::Retry(Duration::from_secs(5), e.to_string()));
        }
    }
    if state == VmState::Failed {
        release(cloud, row.id, None).await?;
    } else {
        release(
            cloud,
            row.id,
            Some((VmState::Done, "its node resources are released")),
        )
        .await?;
    }
    Ok(Outcome::Done)
}

/// Hot-plugs the VM's volumes being attached, or unplugs those being detached. A retry
/// after a crash finds what the node did already (the VM's hot-plugged disks).
async fn hotplug(
    cloud: &Cloud,
    job: &Claimed,
    row: VmRow,
    attach: bool,
) -> Result<Outcome, StepError> {
    let pending = {
        let mut conn = cloud.db.pool.acquire().await?;
        pdisk::disks_of_job(&mut conn, row.id, job.id).await?
    };
    if pending.is_empty() {
        return Ok(Outcome::Done);
    }
    let state = row.state()?;
    let node_id = match row.node_id {
        Some(n) if state == VmState::Running => n,
        _ => {
            let why = format!("VM {} is {}, not Running", row.id, state.as_str());
            let mut tx = cloud.db.pool.begin().await?;
            for volume in &pending {
                // An attach that cannot happen is undone; a detach of a VM that is not
                // running needs nothing: its volumes are released when it ends.
                if attach {
                    pdisk::settle(&mut tx, &volume.uuid, false).await?;
                }
            }
            tx.commit().await?;
            return Ok(Outcome::Failed(why));
        }
    };
    let node = {
        let mut conn = cloud.db.pool.acquire().await?;
        nodes::load(&mut conn, node_id).await?
    };
    let client = node.client(&cloud.agents);
    let id = row.id.to_string();
    // A node or guest that never answers must not hold the VM's later jobs (a kill) forever:
    // after this many tries the volume stays with the VM, which may have it.
    let (held, vm_id) = (&pending, row.id);
    let retry = |why: String| async move {
        if job.attempts < MAX_HOTPLUG_ATTEMPTS {
            return Ok::<_, StepError>(Outcome::Retry(Duration::from_secs(2), why));
        }
        let mut conn = cloud.db.pool.acquire().await?;
        for volume in held {
            pdisk::keep_attached(&mut conn, &volume.uuid).await?;
        }
        Ok(Outcome::Failed(format!(
            "gave up after {} attempts ({why}): the volume stays with VM {vm_id}; detach it \
             again or it is freed when the VM ends",
            job.attempts
        )))
    };
    let plugged: Vec<String> = match client.vm(&id).await {
        Ok(Some(info)) => info.attached.into_iter().map(|d| d.id).collect(),
        Ok(None) => Vec::new(),
        Err(e) => return retry(e.to_string()).await,
    };
    for volume in &pending {
        let mut volume = volume.clone();
        if attach {
            if let Some(storage) = &cloud.volumes {
                if let Err(e) = storage.prepare(&cloud.db, &mut volume, &node).await {
                    return retry(e.to_string()).await;
                }
            }
        }
        let volume = &volume;
        let (disk, spec) = volume_disk(cloud, volume);
        let result = if attach {
            if plugged.contains(&disk) {
                Ok(())
            } else {
                client.attach_disk(&id, &disk, &spec).await.map(|_| ())
            }
        } else if plugged.contains(&disk) {
            client.detach_disk(&id, &disk).await.map(|_| ())
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {
                // The node let go: its way in goes before the volume is free for another.
                if let (false, Some(storage)) = (attach, &cloud.volumes) {
                    if let Err(e) = storage.withdraw(&cloud.db, volume).await {
                        return retry(e.to_string()).await;
                    }
                }
                let mut conn = cloud.db.pool.acquire().await?;
                pdisk::settle(&mut conn, &volume.uuid, attach).await?;
            }
            // The guest has not let go yet: the node keeps the request; look again.
            Err(AgentError::Refused { status: 409, .. }) if !attach => {
                return retry(format!("the guest has not released {} yet", volume.device)).await;
            }
            Err(AgentError::Refused { status, reason, .. }) if (400..500).contains(&status) => {
                let why = format!(
                    "node {} cannot {} disk {}: {reason}",
                    node.name,
                    if attach { "attach" } else { "detach" },
                    volume.uuid
                );
                if let (true, Some(storage)) = (attach, &cloud.volumes) {
                    if let Err(e) = storage.withdraw(&cloud.db, volume).await {
                        // reexport withdraws it once the mount is gone.
                        tracing::warn!(volume = %volume.uuid, error = %e, "cannot withdraw");
                    }
                }
                let mut conn = cloud.db.pool.acquire().await?;
                if attach {
                    pdisk::settle(&mut conn, &volume.uuid, false).await?;
                } else {
                    pdisk::keep_attached(&mut conn, &volume.uuid).await?;
                }
                return Ok(Outcome::Failed(why));
            }
            Err(e) => return retry(e.to_string()).await,
        }
    }
    Ok(Outcome::Done)
}
