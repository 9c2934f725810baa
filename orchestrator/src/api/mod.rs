//! The REST API (axum) that the `stratus` CLI and the web console use. Requests are
//! authenticated with HTTP Basic (the user's name and password) before any body is read;
//! bodies are capped; unknown fields are refused with the field named; every error is
//! `{"error": "<reason>"}`. `/openapi.json` is generated from the handlers below.

mod cimi;
mod disks;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::OpenApi;

pub use stratus_nodeagent::api::Refusal;
use stratus_nodeagent::api::{json, read_json_capped};

use self::types::*;
use crate::jobs::Action;
use crate::networks::NetworkError;
use crate::nodes::NodeError;
use crate::quotas::QuotaError;
use crate::users::{Principal, UserError};
use crate::vms::VmError;
use crate::{nodes, quotas, users, vms, Cloud};

/// Run requests are a few KiB; user data is capped at 32 KiB.
pub const MAX_BODY: usize = 128 * 1024;
/// Largest page of a list.
pub const MAX_PAGE: i64 = 1000;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "stratus-orchestrator",
        description = "The Stratus cloud: VMs, nodes, users, quotas, networks"
    ),
    paths(
        run_vm,
        list_vms,
        get_vm,
        kill_vm,
        shutdown_vm,
        delete_vm,
        get_console,
        get_job,
        list_types,
        get_quotas,
        list_nodes,
        add_node,
        remove_node,
        put_node_state,
        list_users,
        add_user,
        delete_user,
        put_user_quotas,
        list_networks,
        disks::list_disks,
        disks::create_disk,
        disks::get_disk,
        disks::update_disk,
        disks::delete_disk,
        disks::derive_disk,
        disks::list_mounts,
        disks::attach_disk,
        disks::detach_disk,
        disks::list_pools
    ),
    components(schemas(
        RunRequest,
        VmState,
        VmEvent,
        VmView,
        VmAccepted,
        VmList,
        Lease,
        JobState,
        JobView,
        InstanceType,
        QuotaView,
        NodeAdd,
        NodeState,
        NodeStateRequest,
        NodeView,
        Role,
        UserAdd,
        UserInfo,
        QuotaUpdate,
        NetworkView,
        LeaseHolder,
        ErrorBody,
        crate::pdisk::VolumeCreate,
        crate::pdisk::VolumeUpdate,
        crate::pdisk::VolumeView,
        crate::pdisk::MountView,
        crate::pdisk::MountRequest,
        crate::pdisk::MountAccepted,
        crate::pdisk::PoolView,
        crate::pdisk::Visibility,
        crate::pdisk::VolumeKind
    ))
)]
pub struct ApiDoc;

pub fn router(cloud: Arc<Cloud>) -> Router {
    let authenticated = Router::new()
        .route("/vms", post(run_vm).get(list_vms))
        .route("/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/vms/{id}/kill", post(kill_vm))
        .route("/vms/{id}/shutdown", post(shutdown_vm))
        .route("/vms/{id}/console", get(get_console))
        .route("/jobs/{id}", get(get_job))
        .route("/types", get(list_types))
        .route("/quotas", get(get_quotas))
        .route("/nodes", get(list_nodes).post(add_node))
        .route("/nodes/{name}", axum::routing::delete(remove_node))
        .route("/nodes/{name}/state", put(put_node_state))
        .route("/users", get(list_users).post(add_user))
        .route("/users/{name}", axum::routing::delete(delete_user))
        .route("/users/{name}/quotas", put(put_user_quotas))
        .route("/networks", get(list_networks))
        .route("/disks", get(disks::list_disks).post(disks::create_disk))
        .route("/pools", get(disks::list_pools))
        .route("/disks/", get(disks::list_disks).post(disks::create_disk))
        .route(
            "/disks/{uuid}",
            get(disks::get_disk)
                .post(disks::derive_disk)
                .put(disks::update_disk)
                .delete(disks::delete_disk),
        )
        .route(
            "/disks/{uuid}/mounts",
            get(disks::list_mounts).post(disks::attach_disk),
        )
        .route(
            "/disks/{uuid}/mounts/{vm}",
            axum::routing::delete(disks::detach_disk),
        )
        .route("/metrics", get(get_metrics))
        .route("/cimi/machine", get(cimi::machines))
        .route("/cimi/machine/{id}", get(cimi::one_machine))
        .route(
            "/cimi/machineConfiguration",
            get(cimi::machine_configurations),
        )
        .route("/cimi/job", get(cimi::jobs_collection))
        .route("/cimi/job/{id}", get(cimi::one_job))
        .layer(middleware::map_response(
            stratus_vmm::api::json_error_bodies,
        ))
        .layer(middleware::from_fn_with_state(cloud.clone(), authenticate));
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/cimi", get(cimi::cloud_entry_point))
        .merge(authenticated)
        .merge(crate::web::router(cloud.clone()))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(cloud.clone(), observe))
        .with_state(cloud)
}

/// A 500: the reason is logged and sent.
fn internal(e: impl std::fmt::Display) -> Refusal {
    tracing::error!("{e}");
    Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

impl From<crate::pdisk::VolumeError> for Refusal {
    fn from(e: crate::pdisk::VolumeError) -> Self {
        use crate::pdisk::VolumeError;
        let status = match &e {
            VolumeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            VolumeError::NotFound(_) => StatusCode::NOT_FOUND,
            VolumeError::NotYours { .. } | VolumeError::Quota { .. } => StatusCode::FORBIDDEN,
            VolumeError::Conflict(_) | VolumeError::TakenOver(_) => StatusCode::CONFLICT,
            VolumeError::Vm(_) => {
                let VolumeError::Vm(vm) = e else {
                    return internal(e);
                };
                return vm.into();
            }
            // The Marketplace or the image failed, not the request.
            VolumeError::Image { .. } => StatusCode::BAD_GATEWAY,
            VolumeError::Storage(_) | VolumeError::Db(_) => return internal(e),
        };
        Refusal::new(status, e.to_string())
    }
}

impl From<VmError> for Refusal {
    fn from(e: VmError) -> Self {
        let status = match &e {
            VmError::Volume(_) => {
                let VmError::Volume(v) = e else {
                    return internal(e);
                };
                return (*v).into();
            }
            VmError::BadRequest(_) => StatusCode::BAD_REQUEST,
            VmError::NotYours(_) => StatusCode::FORBIDDEN,
            VmError::NotFound(_) => StatusCode::NOT_FOUND,
            VmError::Conflict(_) => StatusCode::CONFLICT,
            VmError::Quota(QuotaError::Exceeded { .. }) => StatusCode::FORBIDDEN,
            VmError::Quota(QuotaError::NoUser(_)) => StatusCode::FORBIDDEN,
            VmError::Marketplace(m) if m.is_users() => StatusCode::BAD_REQUEST,
            VmError::Marketplace(_) => StatusCode::BAD_GATEWAY,
            VmError::Network(
                NetworkError::Unknown(_)
                | NetworkError::NotInNetwork { .. }
                | NetworkError::Config { .. },
            ) => StatusCode::BAD_REQUEST,
            VmError::Network(NetworkError::InUse { .. } | NetworkError::Exhausted(_)) => {
                StatusCode::CONFLICT
            }
            VmError::Network(NetworkError::Db(_))
            | VmError::Quota(QuotaError::Db(_))
            | VmError::Db(_) => return internal(e),
        };
        Refusal::new(status, e.to_string())
    }
}

impl From<NodeError> for Refusal {
    fn from(e: NodeError) -> Self {
        let status = match &e {
            NodeError::Exists(_) | NodeError::HasVms { .. } => StatusCode::CONFLICT,
            NodeError::Unknown(_) => StatusCode::NOT_FOUND,
            NodeError::BadName(_) | NodeError::BadUrl(_) | NodeError::EmptyToken => {
                StatusCode::BAD_REQUEST
            }
            NodeError::Db(_) => return internal(e),
        };
        Refusal::new(status, e.to_string())
    }
}

impl From<UserError> for Refusal {
    fn from(e: UserError) -> Self {
        let status = match &e {
            UserError::Exists(_) | UserError::HasVms { .. } | UserError::HasVolumes { .. } => {
                StatusCode::CONFLICT
            }
            UserError::Unknown(_) => StatusCode::NOT_FOUND,
            UserError::BadName(_) | UserError::EmptyPassword | UserError::BadHash { .. } => {
                StatusCode::BAD_REQUEST
            }
            UserError::Hash(_) | UserError::Db(_) => return internal(e),
        };
        Refusal::new(status, e.to_string())
    }
}

impl From<crate::db::DbError> for Refusal {
    fn from(e: crate::db::DbError) -> Self {
        internal(e)
    }
}

impl From<QuotaError> for Refusal {
    fn from(e: QuotaError) -> Self {
        Refusal::from(VmError::from(e))
    }
}

fn admin_only(who: &Principal) -> Result<(), Refusal> {
    if who.is_admin() {
        Ok(())
    } else {
        Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "only administrators (::ADMIN) may do this; {} is {}",
                who.name,
                who.role.stratuslab_name()
            ),
        ))
    }
}

/// Why a request that would change something looks made by another site's page: a browser
/// that once logged in here resends its Basic credentials on its own, also with a form
/// another site submits (which needs no CORS preflight when its type is one a form sends).
fn cross_site(request: &Request) -> Option<&'static str> {
    if request.method().is_safe() {
        return None;
    }
    let headers = request.headers();
    if headers
        .get("sec-fetch-site")
        .is_some_and(|site| !matches!(site.as_bytes(), b"same-origin" | b"none"))
    {
        return Some("the browser says another site's page made this request");
    }
    // Browsers send Sec-Fetch-Site to HTTPS and loopback sites only, and a cross-site
    // fetch without a body has no content type to refuse; it does carry its Origin.
    if from_another_origin(headers) {
        return Some("the request comes from another site's page (its Origin is not this host)");
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match content_type.as_deref() {
        Some("application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain") => {
            Some("a form's content type (the API takes JSON, Content-Type: application/json)")
        }
        _ => None,
    }
}

/// Whether a browser says the request was made by a page of another origin than this
/// host (as the browser sees it: behind a proxy, perhaps in X-Forwarded-Host). Requests
/// without `Origin` (the CLI's, curl's) are not.
pub(crate) fn from_another_origin(headers: &axum::http::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let origin = origin.to_str().unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    let ours = [header::HOST.as_str(), "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| headers.get(name))
        .filter_map(|h| h.to_str().ok())
        .any(|host| !host.is_empty() && host == origin_host);
    !ours
}

/// HTTP Basic, checked before anything else of the request is looked at.
async fn authenticate(
    State(cloud): State<Arc<Cloud>>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(why) = cross_site(&request) {
        return Refusal::new(
            StatusCode::FORBIDDEN,
            format!("refused as a possible cross-site request: {why}"),
        )
        .into_response();
    }
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    let refused = |reason: &str| {
        let mut response = Refusal::new(StatusCode::UNAUTHORIZED, reason).into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"stratus\""),
        );
        response
    };
    let Some((user, password)) = credentials else {
        return refused(
            "log in: HTTP Basic authentication with your Stratus user name and password",
        );
    };
    match cloud.auth.check(&cloud.db, &user, &password).await {
        Ok(Some(principal)) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Ok(None) => refused("wrong user name or password"),
        Err(e) => internal(e).into_response(),
    }
}

/// Request latency, by route, for `/metrics`.
async fn observe(State(cloud): State<Arc<Cloud>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = stratus_nodeagent::metrics::method_label(request.method());
    let start = Instant::now();
    let response = next.run(request).await;
    cloud
        .metrics
        .observe_request(method, &route, response.status().as_u16(), start.elapsed());
    response
}

async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, Refusal> {
    read_json_capped(body, MAX_BODY).await
}

fn vm_id(text: &str) -> Result<i64, Refusal> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| Refusal::new(StatusCode::BAD_REQUEST, format!("'{text}' is not a VM id")))
}

type Query_<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn query<T>(q: Query_<T>) -> Result<T, Refusal> {
    q.map(|Query(q)| q)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.body_text()))
}

/// Starts a VM from a Marketplace image: checked, written down (Pending) and queued; the
/// job places it and has its node start it.
#[utoipa::path(post, path = "/vms", request_body = RunRequest,
    responses(
        (status = 201, description = "accepted (Pending), with the job that deploys it", body = VmAccepted),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "a quota would be exceeded", body = ErrorBody),
        (status = 409, description = "no free address", body = ErrorBody),
        (status = 502, description = "the Marketplace does not answer", body = ErrorBody)))]
async fn run_vm(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    body: Body,
) -> Result<Response, Refusal> {
    let request: RunRequest = read_json(body).await?;
    let accepted = vms::create(&cloud, &who, request).await?;
    Ok(json(StatusCode::CREATED, &accepted))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    /// Skip this many (default 0).
    offset: Option<i64>,
    /// At most this many (default and maximum 1000).
    limit: Option<i64>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct VmListQuery {
    /// Skip this many (default 0).
    offset: Option<i64>,
    /// At most this many (default and maximum 1000).
    limit: Option<i64>,
    /// Whether VMs that have ended (`Done`) are listed too (default true).
    done: Option<bool>,
}

/// The caller's VMs (admins: all VMs), newest first.
#[utoipa::path(get, path = "/vms", params(VmListQuery), responses((status = 200, body = VmList)))]
async fn list_vms(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    q: Query_<VmListQuery>,
) -> Result<Response, Refusal> {
    let q = query(q)?;
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(MAX_PAGE);
    if offset < 0 || !(1..=MAX_PAGE).contains(&limit) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("offset must be 0 or more and limit between 1 and {MAX_PAGE}"),
        ));
    }
    Ok(json(
        StatusCode::OK,
        &vms::list(&cloud, &who, offset, limit, q.done.unwrap_or(true)).await?,
    ))
}

/// One VM with its state history.
#[utoipa::path(get, path = "/vms/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = VmView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_vm(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    Ok(json(
        StatusCode::OK,
        &vms::get(&cloud, &who, vm_id(&id)?).await?,
    ))
}

/// Pulls the plug (StratusLab's kill-instance).
#[utoipa::path(post, path = "/vms/{id}/kill", params(("id" = i64, Path)),
    responses((status = 202, body = VmAccepted), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn kill_vm(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let accepted = vms::request_stop(&cloud, &who, vm_id(&id)?, Action::Kill).await?;
    Ok(json(StatusCode::ACCEPTED, &accepted))
}

/// Asks the guest to power off (ACPI), then stops it hard after the cloud's timeout.
#[utoipa::path(post, path = "/vms/{id}/shutdown", params(("id" = i64, Path)),
    responses((status = 202, body = VmAccepted), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn shutdown_vm(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let accepted = vms::request_stop(&cloud, &who, vm_id(&id)?, Action::Shutdown).await?;
    Ok(json(StatusCode::ACCEPTED, &accepted))
}

/// Forgets a Done or Failed VM whose node resources are released.
#[utoipa::path(delete, path = "/vms/{id}", params(("id" = i64, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn delete_vm(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    vms::delete_record(&cloud, &who, vm_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    /// How many bytes from the end (default 64 KiB, at most 1 MiB).
    bytes: Option<u64>,
}

/// The last bytes of the VM's serial console, from its node.
#[utoipa::path(get, path = "/vms/{id}/console", params(("id" = i64, Path), ConsoleQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn get_console(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    q: Query_<ConsoleQuery>,
) -> Result<Response, Refusal> {
    let bytes = query(q)?.bytes.unwrap_or(64 << 10);
    if bytes == 0 || bytes > 1 << 20 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bytes must be between 1 and 1048576",
        ));
    }
    let tail = vms::console(&cloud, &who, vm_id(&id)?, bytes).await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        tail,
    )
        .into_response())
}

/// A job's state and progress.
#[utoipa::path(get, path = "/jobs/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = JobView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_job(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let id = vm_id(&id)?;
    let Some((job, owner)) = crate::jobs::get(&cloud, id).await? else {
        return Err(Refusal::new(StatusCode::NOT_FOUND, format!("no job {id}")));
    };
    if owner != who.name && !who.is_admin() {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("job {id} belongs to another user"),
        ));
    }
    Ok(json(StatusCode::OK, &job))
}

/// The instance types (`stratus-run-instance --list-types`).
#[utoipa::path(get, path = "/types", responses((status = 200, body = Vec<InstanceType>)))]
async fn list_types(State(cloud): State<Arc<Cloud>>) -> Response {
    json(StatusCode::OK, &cloud.types)
}

/// The caller's quotas and what their VMs use.
#[utoipa::path(get, path = "/quotas", responses((status = 200, body = QuotaView)))]
async fn get_quotas(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
) -> Result<Response, Refusal> {
    let mut conn = cloud.db.pool.acquire().await.map_err(internal)?;
    let usage = quotas::usage(&cloud.db, &mut conn, &cloud.config.quotas, &who.name, false).await?;
    Ok(json(StatusCode::OK, &usage))
}

/// Nodes with their capacity, load and health (admins).
#[utoipa::path(get, path = "/nodes", responses((status = 200, body = Vec<NodeView>), (status = 403, body = ErrorBody)))]
async fn list_nodes(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    Ok(json(StatusCode::OK, &nodes::views(&cloud.db).await?))
}

/// Registers a node agent (admins); it is polled at once.
#[utoipa::path(post, path = "/nodes", request_body = NodeAdd,
    responses((status = 201, body = Vec<NodeView>), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_node(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    body: Body,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    let node: NodeAdd = read_json(body).await?;
    nodes::add(&cloud.db, &node).await?;
    nodes::poll_all(&cloud).await?;
    Ok(json(StatusCode::CREATED, &nodes::views(&cloud.db).await?))
}

/// Removes a node that holds no VMs (admins).
#[utoipa::path(delete, path = "/nodes/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn remove_node(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    nodes::remove(&cloud.db, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Enables a node, or stops it getting new VMs (admins).
#[utoipa::path(put, path = "/nodes/{name}/state", params(("name" = String, Path)), request_body = NodeStateRequest,
    responses((status = 200, body = Vec<NodeView>), (status = 404, body = ErrorBody)))]
async fn put_node_state(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    let request: NodeStateRequest = read_json(body).await?;
    nodes::set_state(&cloud.db, &name, request.state).await?;
    Ok(json(StatusCode::OK, &nodes::views(&cloud.db).await?))
}

#[utoipa::path(get, path = "/users", responses((status = 200, body = Vec<UserInfo>), (status = 403, body = ErrorBody)))]
async fn list_users(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    Ok(json(StatusCode::OK, &users::list(&cloud.db).await?))
}

#[utoipa::path(post, path = "/users", request_body = UserAdd,
    responses((status = 201, body = Vec<UserInfo>), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_user(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    body: Body,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    let user: UserAdd = read_json(body).await?;
    let secret = match (user.password, user.password_hash) {
        (Some(password), None) => users::Secret::Password(password),
        (None, Some(hash)) => users::Secret::Hash(hash),
        _ => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "give either `password` or `password_hash` (from stratus-hash-password)",
            ))
        }
    };
    users::add(&cloud.db, &user.name, secret, user.role).await?;
    Ok(json(StatusCode::CREATED, &users::list(&cloud.db).await?))
}

#[utoipa::path(delete, path = "/users/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_user(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    if name == who.name {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "you cannot delete yourself",
        ));
    }
    users::delete(&cloud.db, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Sets a user's own quotas (absent: the cloud's defaults; 0: no limit).
#[utoipa::path(put, path = "/users/{name}/quotas", params(("name" = String, Path)), request_body = QuotaUpdate,
    responses((status = 200, body = Vec<UserInfo>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn put_user_quotas(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    let q: QuotaUpdate = read_json(body).await?;
    if [q.cpu, q.memory_mib, q.vms]
        .iter()
        .flatten()
        .any(|v| *v < 0)
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "quotas are 0 (no limit) or more",
        ));
    }
    users::set_quotas(&cloud.db, &name, q.cpu, q.memory_mib, q.vms).await?;
    Ok(json(StatusCode::OK, &users::list(&cloud.db).await?))
}

/// Networks and who holds their addresses (admins).
#[utoipa::path(get, path = "/networks", responses((status = 200, body = Vec<NetworkView>), (status = 403, body = ErrorBody)))]
async fn list_networks(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    Ok(json(StatusCode::OK, &network_views(&cloud).await?))
}

/// Every network with its leases (the API's and the console's view).
pub async fn network_views(cloud: &Cloud) -> Result<Vec<NetworkView>, Refusal> {
    let pool = &cloud.db.pool;
    let networks: Vec<(String, String)> =
        sqlx::query_as("SELECT name, kind FROM networks ORDER BY name")
            .fetch_all(pool)
            .await
            .map_err(internal)?;
    let mut out = Vec::new();
    for (name, kind) in networks {
        let (addresses,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM addresses WHERE network = $1")
                .bind(&name)
                .fetch_one(pool)
                .await
                .map_err(internal)?;
        let leases: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT ip, mac, vm_id FROM addresses WHERE network = $1 AND vm_id IS NOT NULL ORDER BY seq",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .map_err(internal)?;
        out.push(NetworkView {
            free: addresses - leases.len() as i64,
            addresses,
            leases: leases
                .into_iter()
                .map(|(ip, mac, vm)| LeaseHolder { ip, mac, vm })
                .collect(),
            name,
            kind,
        });
    }
    Ok(out)
}

async fn openapi() -> Response {
    json(StatusCode::OK, &ApiDoc::openapi())
}

async fn get_metrics(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
) -> Result<Response, Refusal> {
    admin_only(&who)?;
    let text = cloud.metrics.render(&cloud.db).await?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

const ENDPOINTS: &str = "POST|GET /vms, GET|DELETE /vms/{id}, POST /vms/{id}/kill|shutdown, \
GET /vms/{id}/console, GET /jobs/{id}, GET /types, GET /quotas, GET|POST /nodes, \
DELETE /nodes/{name}, PUT /nodes/{name}/state, GET|POST /users, DELETE /users/{name}, \
PUT /users/{name}/quotas, GET /networks, GET /metrics, GET /openapi.json, GET /cimi, \
GET /cimi/machine[/{id}], GET /cimi/machineConfiguration, GET /cimi/job[/{id}]; \
the web console is at /ui/";

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
