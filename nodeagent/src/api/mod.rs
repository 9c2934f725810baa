//! The agent's HTTP API (axum), for the orchestrator. Every request carries the bearer
//! token (checked before any body is read); bodies are capped; unknown fields are refused
//! with the field named; every error is `{"error": "<reason>"}`. The OpenAPI document at
//! `/openapi.json` is generated from the handlers below.

pub mod types;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use self::types::*;
use crate::images::{ImageError, Images};
use crate::metrics::Metrics;
use crate::networks::NetworkError;
use crate::vms::{VmError, VmManager};

/// VM specs are a few KiB at most.
pub const MAX_BODY: usize = 256 * 1024;

pub struct AppState {
    pub vms: Arc<VmManager>,
    pub images: Arc<Images>,
    /// Where `POST /images {"identifier": …}` looks entries up.
    pub marketplace_endpoint: Option<String>,
    pub token: String,
    pub shutdown_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "stratus-nodeagent",
        description = "One hypervisor host's VMs, for the orchestrator"
    ),
    paths(
        put_vm,
        list_vms,
        get_vm,
        delete_vm,
        kill_vm,
        shutdown_vm,
        pause_vm,
        resume_vm,
        get_console,
        get_host,
        put_host_state,
        list_images,
        get_image,
        prefetch_image,
        delete_image
    ),
    components(schemas(
        VmSpec,
        BootSpec,
        DiskSpec,
        DiskSource,
        VmState,
        VmExit,
        VmInfo,
        VmList,
        HostState,
        HostStateRequest,
        HostInfo,
        ImageState,
        ImageInfo,
        ImageList,
        PrefetchRequest,
        ErrorBody
    ))
)]
pub struct ApiDoc;

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/vms", get(list_vms))
        .route("/vms/{id}", put(put_vm).get(get_vm).delete(delete_vm))
        .route("/vms/{id}/kill", post(kill_vm))
        .route("/vms/{id}/shutdown", post(shutdown_vm))
        .route("/vms/{id}/pause", post(pause_vm))
        .route("/vms/{id}/resume", post(resume_vm))
        .route("/vms/{id}/console", get(get_console))
        .route(
            "/vms/{id}/disks/{disk}",
            put(attach_disk).delete(detach_disk),
        )
        .route("/images", get(list_images).post(prefetch_image))
        .route("/images/{id}", get(get_image).delete(delete_image))
        .route("/host", get(get_host))
        .route("/host/state", put(put_host_state))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(get_metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::map_response(
            stratus_vmm::api::json_error_bodies,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    api.with_state(state)
}

/// An HTTP status and a reason, sent as `{"error": reason}`: the error shape of every
/// Stratus HTTP API (the orchestrator's too).
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What the caller is told (the web console shows it beside the form).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, axum::Json(ErrorBody { error: self.reason })).into_response()
    }
}

impl From<VmError> for Refusal {
    fn from(e: VmError) -> Self {
        let status = match &e {
            VmError::NotFound(_) => StatusCode::NOT_FOUND,
            VmError::BadId(_) | VmError::BadSpec(_) => StatusCode::BAD_REQUEST,
            VmError::SpecConflict(_)
            | VmError::DiskConflict(_)
            | VmError::HostNotEnabled(_)
            | VmError::NoCapacity { .. }
            | VmError::WrongState { .. } => StatusCode::CONFLICT,
            VmError::Vmm(v) if v.is_conflict() => StatusCode::CONFLICT,
            VmError::Vmm(v) if v.is_bad_request() => StatusCode::BAD_REQUEST,
            VmError::Network(NetworkError::Unknown(..) | NetworkError::BadNic { .. }) => {
                StatusCode::BAD_REQUEST
            }
            VmError::Network(
                NetworkError::MacInUse { .. }
                | NetworkError::IpInUse { .. }
                | NetworkError::TapNameTaken { .. },
            ) => StatusCode::CONFLICT,
            VmError::Network(_) => StatusCode::INTERNAL_SERVER_ERROR,
            VmError::Image(e) if e.root().is_refusal() => StatusCode::BAD_REQUEST,
            VmError::Image(_) => StatusCode::BAD_GATEWAY,
            VmError::Vmm(_) => StatusCode::BAD_GATEWAY,
            VmError::Jail(crate::vms::jail::JailPrepError::Unreadable(_)) => {
                StatusCode::BAD_REQUEST
            }
            VmError::Jail(crate::vms::jail::JailPrepError::NoUid(_)) => StatusCode::CONFLICT,
            VmError::Record(_) | VmError::Supervisor(_) | VmError::Io { .. } | VmError::Jail(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Refusal::new(status, e.to_string())
    }
}

impl From<ImageError> for Refusal {
    fn from(e: ImageError) -> Self {
        let status = match &e {
            ImageError::BadIdentifier(_)
            | ImageError::NoMarketplace
            | ImageError::EntryUrl { .. } => StatusCode::BAD_REQUEST,
            ImageError::NotFound(_) | ImageError::NoEntry { .. } => StatusCode::NOT_FOUND,
            ImageError::InUse { .. } | ImageError::Downloading(_) => StatusCode::CONFLICT,
            ImageError::Entry { .. } => StatusCode::BAD_GATEWAY,
            ImageError::Image(e)
                if matches!(e.root(), stratus_images::Error::InvalidMetadata(_)) =>
            {
                StatusCode::BAD_REQUEST
            }
            ImageError::Image(_) | ImageError::Remove { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal::new(status, e.to_string())
    }
}

/// Runs a change to a VM to its end even if the client hangs up: axum drops a handler's
/// future when its connection closes, which would leave the change half-made (a create
/// holding capacity with no VMM behind it).
async fn to_completion<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, VmError>> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::spawn(change)
        .await
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(Refusal::from)
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

/// The bearer token, compared in constant time, before anything else of the request is
/// looked at.
async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        g.len() == state.token.len()
            && g.bytes()
                .zip(state.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok {
        let mut response = Refusal::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <token from the agent's token_file>)",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    next.run(request).await
}

/// Request latency, by route, for `/metrics`.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = crate::metrics::method_label(request.method());
    let start = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .observe_request(method, &route, response.status().as_u16(), start.elapsed());
    response
}

async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, Refusal> {
    read_json_capped(body, MAX_BODY).await
}

/// A JSON request body of at most `max` bytes: 413 beyond it, 400 naming what is wrong
/// (an unknown field, a missing one, a bad value).
pub async fn read_json_capped<T: DeserializeOwned>(body: Body, max: usize) -> Result<T, Refusal> {
    let bytes = axum::body::to_bytes(body, max).await.map_err(|e| {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("cannot read the request body (at most {max} bytes): {e}"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

/// Creates and starts a VM; the same id and spec again is answered 200 with the VM.
#[utoipa::path(put, path = "/vms/{id}", request_body = VmSpec,
    params(("id" = String, Path, description = "the VM's id")),
    responses(
        (status = 201, description = "created and started", body = VmInfo),
        (status = 200, description = "already there with this spec", body = VmInfo),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "another spec under this id, no capacity, or the host takes no VMs", body = ErrorBody)))]
async fn put_vm(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, Refusal> {
    let spec: VmSpec = read_json(body).await?;
    let vms = state.vms.clone();
    let (info, created) = to_completion(async move { vms.create(&id, spec).await }).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &info))
}

#[utoipa::path(get, path = "/vms", responses((status = 200, body = VmList)))]
async fn list_vms(State(state): State<Arc<AppState>>) -> Response {
    json(
        StatusCode::OK,
        &VmList {
            vms: state.vms.list().await,
        },
    )
}

#[utoipa::path(get, path = "/vms/{id}", params(("id" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody)))]
async fn get_vm(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    Ok(json(StatusCode::OK, &state.vms.info_of(&id).await?))
}

/// Removes an ended VM and everything the agent made for it (never persistent volumes).
#[utoipa::path(delete, path = "/vms/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, description = "the VM still runs", body = ErrorBody)))]
async fn delete_vm(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let vm = state.vms.get(&id)?;
    let vms = state.vms.clone();
    to_completion(async move { vms.delete(&vm).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Ends the VM at once (the VMM's hard stop, SIGKILL if it does not answer).
#[utoipa::path(post, path = "/vms/{id}/kill", params(("id" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn kill_vm(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let vm = state.vms.get(&id)?;
    let vms = state.vms.clone();
    let info = to_completion(async move { vms.kill(&vm).await }).await?;
    Ok(json(StatusCode::OK, &info))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ShutdownQuery {
    /// Seconds before a hard stop (default: the agent's shutdown_timeout_s).
    timeout: Option<u64>,
}

/// Presses the VM's ACPI power button; a guest that has not powered off after `timeout`
/// seconds is stopped hard.
#[utoipa::path(post, path = "/vms/{id}/shutdown", params(("id" = String, Path), ShutdownQuery),
    responses((status = 202, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn shutdown_vm(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<ShutdownQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Refusal> {
    let Query(query) = query.map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let timeout = query
        .timeout
        .map(Duration::from_secs)
        .unwrap_or(state.shutdown_timeout);
    let vm = state.vms.get(&id)?;
    Ok(json(StatusCode::ACCEPTED, &{
        let vms = state.vms.clone();
        to_completion(async move { vms.shutdown(&vm, timeout).await }).await?
    }))
}

#[utoipa::path(post, path = "/vms/{id}/pause", params(("id" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 409, body = ErrorBody)))]
async fn pause_vm(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let vm = state.vms.get(&id)?;
    Ok(json(StatusCode::OK, &state.vms.pause(&vm).await?))
}

#[utoipa::path(post, path = "/vms/{id}/resume", params(("id" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 409, body = ErrorBody)))]
async fn resume_vm(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let vm = state.vms.get(&id)?;
    Ok(json(StatusCode::OK, &state.vms.resume(&vm).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    /// How many bytes from the end (default 64 KiB, at most 1 MiB).
    bytes: Option<u64>,
}

/// The last bytes of the VM's serial console (also after it ended).
#[utoipa::path(get, path = "/vms/{id}/console", params(("id" = String, Path), ConsoleQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
async fn get_console(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Refusal> {
    let Query(query) = query.map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let bytes = query.bytes.unwrap_or(64 << 10);
    let max = stratus_vmm::console_log::MAX_TAIL_BYTES;
    if bytes == 0 || bytes > max {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("bytes must be between 1 and {max}"),
        ));
    }
    let vm = state.vms.get(&id)?;
    let tail = state.vms.console(&vm, bytes)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        tail,
    )
        .into_response())
}

/// Hot-plugs a disk (a persistent volume by path, or a new volatile disk) into the running
/// VM; answers once the VMM has put it on the bus and told the guest.
#[utoipa::path(put, path = "/vms/{id}/disks/{disk}", request_body = AttachDisk,
    params(("id" = String, Path), ("disk" = String, Path)),
    responses((status = 201, body = VmInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "the VM does not run, has a disk of that id, or has no free slot", body = ErrorBody)))]
async fn attach_disk(
    State(state): State<Arc<AppState>>,
    Path((id, disk)): Path<(String, String)>,
    body: Body,
) -> Result<Response, Refusal> {
    let attach: AttachDisk = read_json(body).await?;
    let vm = state.vms.get(&id)?;
    let spec = DiskSpec {
        id: disk,
        source: attach.source,
        read_only: attach.read_only,
        serial: attach.serial,
    };
    Ok(json(StatusCode::CREATED, &{
        let vms = state.vms.clone();
        to_completion(async move { vms.attach(&vm, spec).await }).await?
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct DetachQuery {
    /// Seconds to wait for the guest to let go of the disk (default 30).
    timeout: Option<u64>,
}

/// Unplugs a hot-plugged disk; answers once the guest has let go of it (409 if it has not
/// within `timeout`; the request stands and the disk goes when the guest ejects it).
#[utoipa::path(delete, path = "/vms/{id}/disks/{disk}",
    params(("id" = String, Path), ("disk" = String, Path), DetachQuery),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn detach_disk(
    State(state): State<Arc<AppState>>,
    Path((id, disk)): Path<(String, String)>,
    query: Result<Query<DetachQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Refusal> {
    let Query(query) = query.map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let timeout = Duration::from_secs(query.timeout.unwrap_or(30));
    let vm = state.vms.get(&id)?;
    Ok(json(StatusCode::OK, &{
        let vms = state.vms.clone();
        to_completion(async move { vms.detach(&vm, &disk, timeout).await }).await?
    }))
}

#[utoipa::path(get, path = "/host", responses((status = 200, body = HostInfo)))]
async fn get_host(State(state): State<Arc<AppState>>) -> Response {
    json(StatusCode::OK, &state.vms.host_info())
}

/// Enables the host, or stops it taking new VMs (disabled, maintenance).
#[utoipa::path(put, path = "/host/state", request_body = HostStateRequest,
    responses((status = 200, body = HostInfo), (status = 400, body = ErrorBody)))]
async fn put_host_state(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, Refusal> {
    let request: HostStateRequest = read_json(body).await?;
    state.vms.set_host_state(request.state)?;
    Ok(json(StatusCode::OK, &state.vms.host_info()))
}

/// The images in this host's cache, and those on their way.
#[utoipa::path(get, path = "/images", responses((status = 200, body = ImageList)))]
async fn list_images(State(state): State<Arc<AppState>>) -> Response {
    let images = state
        .images
        .identifiers()
        .into_iter()
        .filter_map(|id| {
            let used_by = state.vms.vms_using(&id);
            state.images.info(&id, used_by).ok()
        })
        .collect();
    json(StatusCode::OK, &ImageList { images })
}

/// One image: downloading (with the bytes written so far), ready, or failed (why).
#[utoipa::path(get, path = "/images/{id}", params(("id" = String, Path)),
    responses((status = 200, body = ImageInfo), (status = 404, body = ErrorBody)))]
async fn get_image(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let used_by = state.vms.vms_using(&id);
    Ok(json(StatusCode::OK, &state.images.info(&id, used_by)?))
}

/// Fetches an image into the cache ahead of the VMs that will need it: by its entry, the
/// URL of its entry, or its identifier. One download per image however many ask.
#[utoipa::path(post, path = "/images", request_body = PrefetchRequest,
    responses((status = 202, description = "on its way", body = ImageInfo),
        (status = 200, description = "cached already", body = ImageInfo),
        (status = 400, body = ErrorBody),
        (status = 404, description = "the Marketplace has no such entry", body = ErrorBody),
        (status = 502, body = ErrorBody)))]
async fn prefetch_image(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, Refusal> {
    let request: PrefetchRequest = read_json(body).await?;
    let entry = match (request.entry, request.url, request.identifier) {
        (Some(entry), None, None) => *entry,
        (None, Some(url), None) => fetch(url).await?,
        (None, None, Some(id)) => {
            if id.parse::<stratus_images::Identifier>().is_err() {
                return Err(ImageError::BadIdentifier(id).into());
            }
            let Some(endpoint) = &state.marketplace_endpoint else {
                return Err(ImageError::NoMarketplace.into());
            };
            let url = format!(
                "{}/metadata?identifier={id}",
                endpoint.trim_end_matches('/')
            );
            // A URL made from the agent's own configuration is not the caller's mistake.
            fetch(url).await.map_err(|e| match e {
                ImageError::EntryUrl { url, source } => ImageError::Entry {
                    url,
                    reason: format!("the agent's marketplace_endpoint is not a URL: {source}"),
                },
                e => e,
            })?
        }
        _ => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "give exactly one of entry, url and identifier",
            ))
        }
    };
    let id = entry.identifier.to_string();
    let started = state.images.prefetch(entry)?;
    let info = state.images.info(&id, state.vms.vms_using(&id))?;
    let status = if started || info.state == ImageState::Downloading {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &info))
}

async fn fetch(url: String) -> Result<stratus_images::Metadata, ImageError> {
    let task_url = url.clone();
    tokio::task::spawn_blocking(move || crate::images::fetch_entry(&task_url))
        .await
        .unwrap_or_else(|e| {
            Err(ImageError::Entry {
                url,
                reason: format!("the fetch stopped: {e}"),
            })
        })
}

/// Removes an image no VM needs (and its extracted kernel and initrd).
#[utoipa::path(delete, path = "/images/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, description = "a VM uses it, or it is being downloaded", body = ErrorBody)))]
async fn delete_image(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let used_by = state.vms.vms_using(&id);
    state.images.remove(&id, used_by)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn openapi() -> Response {
    json(StatusCode::OK, &ApiDoc::openapi())
}

async fn get_metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.vms).await;
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

const ENDPOINTS: &str =
    "PUT|GET|DELETE /vms/{id}, GET /vms, POST /vms/{id}/kill|shutdown|pause|resume, \
GET /vms/{id}/console, GET|POST /images, GET|DELETE /images/{id}, GET /host, PUT /host/state, \
GET /openapi.json, GET /metrics";

async fn not_found(uri: axum::http::Uri) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("no endpoint {}; the API has {ENDPOINTS}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Refusal {
    Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; the API has {ENDPOINTS}",
            uri.path()
        ),
    )
}
