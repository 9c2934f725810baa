//! pdisk's routes: `/disks/…`, with StratusLab's paths (a trailing slash on the collection
//! is accepted, and a mount may be named `<uuid>_<vm>` as StratusLab's pdisk named it).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::{admin_only, json, read_json, ErrorBody, Refusal};
use crate::pdisk::{
    self, MountAccepted, MountRequest, PoolView, VolumeCreate, VolumeUpdate, VolumeView,
};
use crate::users::Principal;
use crate::Cloud;

/// The caller's volumes and the public ones (admins: all).
#[utoipa::path(get, path = "/disks", responses((status = 200, body = Vec<VolumeView>)))]
pub async fn list_disks(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
) -> Result<Response, Refusal> {
    Ok(json(StatusCode::OK, &pdisk::list(&cloud, &who).await?))
}

/// Creates a volume (`stratus-create-volume`).
#[utoipa::path(post, path = "/disks", request_body = VolumeCreate,
    responses((status = 201, body = VolumeView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_disk(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    body: Body,
) -> Result<Response, Refusal> {
    let request: VolumeCreate = read_json(body).await?;
    // In a task of its own: a client that hangs up does not cut the creation in half.
    let created = tokio::spawn(async move { pdisk::create(&cloud, &who, request).await })
        .await
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(json(StatusCode::CREATED, &created))
}

#[utoipa::path(get, path = "/disks/{uuid}", params(("uuid" = String, Path)),
    responses((status = 200, body = VolumeView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_disk(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(uuid): Path<String>,
) -> Result<Response, Refusal> {
    Ok(json(
        StatusCode::OK,
        &pdisk::get(&cloud, &who, &uuid).await?,
    ))
}

/// Changes a volume's tag, visibility or type (`stratus-update-volume`).
#[utoipa::path(put, path = "/disks/{uuid}", params(("uuid" = String, Path)), request_body = VolumeUpdate,
    responses((status = 200, body = VolumeView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_disk(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(uuid): Path<String>,
    body: Body,
) -> Result<Response, Refusal> {
    let request: VolumeUpdate = read_json(body).await?;
    Ok(json(
        StatusCode::OK,
        &pdisk::update(&cloud, &who, &uuid, request).await?,
    ))
}

/// StratusLab's snapshot and rebase: on an ORIGIN, a new LIVE copy-on-write snapshot of
/// it; on a LIVE, a new ORIGIN holding its data. The new volume is the caller's.
#[utoipa::path(post, path = "/disks/{uuid}", params(("uuid" = String, Path)),
    responses((status = 201, body = VolumeView), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn derive_disk(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(uuid): Path<String>,
) -> Result<Response, Refusal> {
    // In a task of its own: a client that hangs up does not cut the copy in half.
    let made = tokio::spawn(async move { pdisk::derive(&cloud, &who, &uuid).await })
        .await
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(json(StatusCode::CREATED, &made))
}

/// Deletes a volume and its data; refused while it is attached.
#[utoipa::path(delete, path = "/disks/{uuid}", params(("uuid" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn delete_disk(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(uuid): Path<String>,
) -> Result<Response, Refusal> {
    // In a task of its own: a client that hangs up does not cut the deletion in half.
    tokio::spawn(async move { pdisk::delete(&cloud, &who, &uuid).await })
        .await
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Where the volume is attached.
#[utoipa::path(get, path = "/disks/{uuid}/mounts", params(("uuid" = String, Path)),
    responses((status = 200, body = Vec<pdisk::MountView>), (status = 404, body = ErrorBody)))]
pub async fn list_mounts(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(uuid): Path<String>,
) -> Result<Response, Refusal> {
    Ok(json(
        StatusCode::OK,
        &pdisk::get(&cloud, &who, &uuid).await?.mounts,
    ))
}

/// Hot-plugs the volume into a running VM of the caller's (`stratus-attach-volume`): 202
/// with the job doing it; 409 naming the VM that has it already.
#[utoipa::path(post, path = "/disks/{uuid}/mounts", params(("uuid" = String, Path)), request_body = MountRequest,
    responses((status = 202, body = MountAccepted), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn attach_disk(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(uuid): Path<String>,
    body: Body,
) -> Result<Response, Refusal> {
    let request: MountRequest = read_json(body).await?;
    Ok(json(
        StatusCode::ACCEPTED,
        &pdisk::attach(&cloud, &who, &uuid, request.vm_id).await?,
    ))
}

/// Unplugs a hot-plugged volume from its VM (`stratus-detach-volume`): 202 with the job.
#[utoipa::path(delete, path = "/disks/{uuid}/mounts/{vm}", params(("uuid" = String, Path), ("vm" = String, Path)),
    responses((status = 202, body = MountAccepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn detach_disk(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path((uuid, mount)): Path<(String, String)>,
) -> Result<Response, Refusal> {
    let vm = mount
        .rsplit('_')
        .next()
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("'{mount}' names no VM (a VM id, or <uuid>_<vm id>)"),
            )
        })?;
    Ok(json(
        StatusCode::ACCEPTED,
        &pdisk::detach(&cloud, &who, &uuid, vm).await?,
    ))
}

/// (Admins) pdisk's pools: the space their storage has and the volumes on each.
#[utoipa::path(get, path = "/pools",
    responses((status = 200, body = Vec<PoolView>), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn list_pools(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    Ok(json(StatusCode::OK, &pdisk::pools(&cloud).await?))
}
