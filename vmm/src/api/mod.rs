//! The VMM control API: HTTP/1.1 with JSON bodies on a Unix socket, one per VM, for the
//! node agent (`--api-socket`). It reports the VM and its I/O counters, hands out the
//! console's tail, changes disk and NIC rate limits, hot-plugs and unplugs disks and NICs,
//! pauses and resumes the vCPUs, presses the power button and stops the VM.
//!
//! The server runs on its own thread with a current-thread tokio runtime, so the vCPU and
//! device threads never share a scheduler with it. Handlers change the VM only through the
//! control thread (`control.rs`).

mod connection;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use axum::Extension;
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use self::connection::PassedFds;
use crate::config::{ConsoleConfig, ConsoleFile, VmConfig};
use crate::console_log;
use crate::control::{ControlHandle, VmStopping};
use crate::device_manager::DeviceError;
use crate::devices::rate_limiter::RateLimit;
use crate::devices::virtio::block::counters::BlockCountersReport;
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::worker::NetCountersReport;
use crate::devices::virtio::net::NetConfig;
use crate::exit::{ExitReason, ExitSignal};
use crate::vcpu::PauseError;
use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot create the API socket {path}: directory {dir} does not exist")]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error(
        "API socket {path} is in use by another process (is this VM already running?); \
         stop it or choose another --api-socket path"
    )]
    InUse { path: PathBuf },
    #[error(
        "refusing to create the API socket {path}: directory {dir} is writable by other users \
         and not sticky"
    )]
    UnsafeDirectory { path: PathBuf, dir: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it with the API socket")]
    NotASocket { path: PathBuf },
    #[error("cannot create the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API server: {0}")]
    Start(std::io::Error),
}

/// The socket file this process created; removed on drop unless something else has
/// replaced it since (same path, different inode).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// A bound, listening API socket. Clients that connect before `serve` are queued by the
/// kernel and answered once it runs.
#[derive(Debug)]
pub struct ApiSocket {
    listener: StdUnixListener,
    file: SocketFile,
}

impl ApiSocket {
    /// Binds `path`. A socket file nobody listens on (left by a VMM that was killed) is
    /// replaced; a live socket or any other kind of file is refused.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let bind_err = |source| ApiError::Bind {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ApiError::InUse {
                        path: path.to_owned(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!("removing stale API socket {}", path.display());
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                Err(e) => return Err(bind_err(e)),
            },
            Ok(_) => {
                return Err(ApiError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(meta) = std::fs::metadata(dir) {
            // Anyone who may create files there could swap the socket for their own.
            if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
                return Err(ApiError::UnsafeDirectory {
                    path: path.to_owned(),
                    dir: dir.to_owned(),
                });
            }
        }
        // Whoever can connect can stop the VM: the socket is born owner-only (the umask
        // applies to bind), never widened and then narrowed. Nothing else runs yet, so the
        // process-wide umask is ours to change for the call.
        // SAFETY: umask only swaps the process's file-creation mask.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = StdUnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old_mask) };
        let listener = bound.map_err(|source| {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            match dir {
                Some(dir) if source.kind() == std::io::ErrorKind::NotFound && !dir.exists() => {
                    ApiError::NoDirectory {
                        path: path.to_owned(),
                        dir: dir.to_owned(),
                    }
                }
                _ => bind_err(source),
            }
        })?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        let file = SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok(ApiSocket { listener, file })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Starts answering requests on a thread of its own.
    pub fn serve(self, state: ApiState) -> Result<ApiServer, ApiError> {
        // Built here rather than on the thread, so that failures stop start-up with a reason.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ApiError::Start)?;
        self.listener
            .set_nonblocking(true)
            .map_err(ApiError::Start)?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::UnixListener::from_std(self.listener).map_err(ApiError::Start)?
        };
        let app = router(Arc::new(state));
        tracing::info!("control API on {}", self.file.path.display());
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::confine_or_abort(crate::seccomp::ThreadKind::Api);
                runtime.block_on(connection::serve(listener, app, async move {
                    let _ = shutdown_rx.await;
                }));
                let _ = done_tx.send(());
            })
            .map_err(ApiError::Start)?;
        Ok(ApiServer {
            shutdown: Some(shutdown_tx),
            done: done_rx,
            _file: self.file,
        })
    }
}

/// The running server. `shutdown` (or dropping it) removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    done: mpsc::Receiver<()>,
    _file: SocketFile,
}

impl ApiServer {
    /// Stops accepting connections and lets responses in progress finish (the answer to a
    /// stop request must reach the client before the process exits), waiting at most
    /// `grace`.
    pub fn shutdown(mut self, grace: Duration) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if self.done.recv_timeout(grace).is_err() {
            tracing::warn!("API connections still open after {grace:?}; exiting anyway");
        }
    }
}

/// What the handlers work on: the VM's fixed shape, and the control thread for the rest.
#[derive(Clone)]
pub struct ApiState {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub console: Option<ConsoleFile>,
    pub control: ControlHandle,
    pub exit: ExitSignal,
}

impl ApiState {
    pub fn new(config: &VmConfig, vm: &Vm) -> Self {
        ApiState {
            vcpus: config.cpus,
            memory_mib: config.memory_mib,
            kernel: config.kernel.clone(),
            console: match &config.console {
                ConsoleConfig::File(file) => Some(file.clone()),
                _ => None,
            },
            control: vm.control(),
            exit: vm.exit_signal(),
        }
    }

    /// The VM as it is now. Once the control thread has stopped serving (the VMM is on its
    /// way out) only the fixed shape is known.
    async fn info(&self) -> VmInfo {
        let devices = self
            .control
            .call(|c| (c.state(), c.devices.disks(), c.devices.nets()))
            .await;
        match devices {
            Ok((state, disks, nets)) => VmInfo {
                state,
                disks,
                nets,
                ..self.info_without_devices()
            },
            Err(_) => self.info_without_devices(),
        }
    }

    /// What is known without the control thread: a VM on its way out.
    fn info_without_devices(&self) -> VmInfo {
        VmInfo {
            state: VmState::Stopping,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            disks: Vec::new(),
            nets: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    /// The vCPUs are stopped outside guest code (`pause`); devices keep their state.
    Paused,
    /// A stop reason was raised; the process is about to exit.
    Stopping,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Active,
    /// The guest was asked to eject it and has not yet.
    Removing,
}

/// `GET /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub disks: Vec<DiskInfo>,
    pub nets: Vec<NetInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// What the API calls the disk (`PATCH /vm/disks/{id}`).
    pub id: String,
    /// Order in which the disk was added (configuration order for disks given at start).
    pub index: usize,
    /// PCI slot on bus 0.
    pub slot: u8,
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: Option<String>,
    pub rate_limit: RateLimit,
    /// A guest driver has set the disk up and it serves requests.
    pub driver_ready: bool,
    pub state: DeviceState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    pub id: String,
    pub index: usize,
    pub slot: u8,
    pub tap: String,
    pub mac: String,
    /// Applied to each direction separately, as in the configuration.
    pub rate_limit: RateLimit,
    /// A guest driver has set the NIC up.
    pub driver_ready: bool,
    pub state: DeviceState,
}

/// `GET /vm/counters`: per device id, totals since the device was added.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersReport {
    pub disks: BTreeMap<String, BlockCountersReport>,
    pub nets: BTreeMap<String, NetCountersReport>,
}

/// Body of `PATCH /vm/disks/{id}` and `PATCH /vm/nets/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    pub rate_limit: RateLimitPatch,
}

/// JSON merge-patch semantics: a field left out keeps its value, `null` removes that
/// limit, a number sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPatch {
    #[serde(default, deserialize_with = "present")]
    pub bytes_per_sec: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub ops_per_sec: Option<Option<u64>>,
}

/// Tells `null` (Some(None)) from a missing field (None, through `default`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

impl RateLimitPatch {
    /// The limit after the patch. 0 is refused, as `--disk bps=0` is: it would read as
    /// "no bandwidth at all" but means "unlimited" to the limiter.
    pub fn apply(&self, current: RateLimit) -> Result<RateLimit, String> {
        let field = |name: &str, patch: Option<Option<u64>>, now: Option<u64>| match patch {
            Some(Some(0)) => Err(format!(
                "rate_limit.{name} must be a positive number per second, or null for no \
                 limit; 0 is not allowed"
            )),
            Some(value) => Ok(value),
            None => Ok(now),
        };
        Ok(RateLimit {
            bytes_per_sec: field("bytes_per_sec", self.bytes_per_sec, current.bytes_per_sec)?,
            ops_per_sec: field("ops_per_sec", self.ops_per_sec, current.ops_per_sec)?,
        })
    }
}

/// Body of `PUT /vm/actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// End the VM now; the VMM exits with status 6.
    Stop,
    /// Press the ACPI power button; a guest that handles it powers off (exit status 0).
    Shutdown,
    /// Stop the vCPUs outside guest code; devices keep their state.
    Pause,
    Resume,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Bodies are a few hundred bytes; anything near this is a mistake.
const MAX_BODY: usize = 64 * 1024;

const PATCH_SHAPE: &str = r#"{"rate_limit": {"bytes_per_sec": N|null, "ops_per_sec": N|null}}"#;
const ACTION_SHAPE: &str = r#"{"action": "stop"|"shutdown"|"pause"|"resume"}"#;
const DISK_SHAPE: &str = r#"{"id": "...", "path": "...", "format": "raw"|"qcow2", "read_only": bool, "serial": "...", "cache": "writeback"|"none", "engine": "io_uring"|"sync", "rate_limit": {...}}"#;
const NET_SHAPE: &str =
    r#"{"id": "...", "tap": "...", "mac": "02:00:...", "queues": 1, "rate_limit": {...}}"#;

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/vm", get(get_vm))
        .route("/vm/actions", put(put_action))
        .route("/vm/counters", get(get_counters))
        .route("/vm/console", get(get_console))
        .route("/vm/disks", put(put_disk))
        .route("/vm/disks/{id}", patch(patch_disk).delete(delete_disk))
        .route("/vm/nets", put(put_net))
        .route("/vm/nets/{id}", patch(patch_net).delete(delete_net))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_error_bodies))
        .with_state(state)
}

/// What an error answer's body says (its trimmed text), or its status's name when it says
/// nothing readable.
pub async fn error_reason(status: StatusCode, body: Body) -> String {
    let text = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    match std::str::from_utf8(&text).map(str::trim) {
        Ok(text) if !text.is_empty() => text.to_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    }
}

/// What axum answers by itself (an extractor's rejection, as for a path that is not
/// UTF-8) is plain text; every Stratus API answers errors as `{"error": reason}`, which
/// its clients parse. Layered on the API routers of the VMM, the node agent and the
/// orchestrator (not on the web console, whose errors are pages).
pub async fn json_error_bodies(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let reason = error_reason(status, body).await;
    let mut answer = json(status, &ErrorBody { error: reason });
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the response: {e}"),
        )
        .into_response(),
    }
}

/// A request the API will not carry out: an HTTP status and a reason the caller can act
/// on, sent as `{"error": reason}`.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.reason };
        let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

async fn read_json<T: DeserializeOwned>(body: Body, shape: &str) -> Result<T, Refusal> {
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}; expected {shape}"),
        )
    })
}

impl From<VmStopping> for Refusal {
    fn from(e: VmStopping) -> Self {
        Refusal::new(StatusCode::CONFLICT, e.to_string())
    }
}

impl From<DeviceError> for Refusal {
    fn from(e: DeviceError) -> Self {
        let status = if e.is_not_found() {
            StatusCode::NOT_FOUND
        } else if e.is_conflict() {
            StatusCode::CONFLICT
        } else if e.is_bad_request() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        // The whole chain: "cannot open disk image /x: No such file or directory".
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !reason.contains(&text) {
                reason = format!("{reason}: {text}");
            }
            source = s.source();
        }
        Refusal::new(status, reason)
    }
}

impl From<PauseError> for Refusal {
    fn from(e: PauseError) -> Self {
        Refusal::new(StatusCode::CONFLICT, e.to_string())
    }
}

async fn get_vm(State(api): State<Arc<ApiState>>) -> Response {
    json(StatusCode::OK, &api.info().await)
}

async fn get_counters(State(api): State<Arc<ApiState>>) -> Result<Response, Refusal> {
    let report = api
        .control
        .call(|c| CountersReport {
            disks: c.devices.disk_counters().into_iter().collect(),
            nets: c.devices.net_counters().into_iter().collect(),
        })
        .await?;
    Ok(json(StatusCode::OK, &report))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    bytes: Option<u64>,
}

/// The console's last `bytes` bytes (default 64 KiB, at most 1 MiB), as the guest wrote
/// them.
async fn get_console(State(api): State<Arc<ApiState>>, uri: Uri) -> Result<Response, Refusal> {
    let query: ConsoleQuery =
        serde_urlencoded::from_str(uri.query().unwrap_or("")).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("bad query: {e}; expected ?bytes=N"),
            )
        })?;
    let bytes = query.bytes.unwrap_or(64 << 10);
    if bytes == 0 || bytes > console_log::MAX_TAIL_BYTES {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "bytes must be between 1 and {}",
                console_log::MAX_TAIL_BYTES
            ),
        ));
    }
    let Some(console) = api.console.clone() else {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "this VM's console does not go to a file; start it with --console file=PATH",
        ));
    };
    let tail = tokio::task::spawn_blocking(move || console_log::tail(&console.path, bytes))
        .await
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        tail,
    )
        .into_response())
}

async fn patch_disk(
    State(api): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
    body: Body,
) -> Result<Response, Refusal> {
    let patch: DevicePatch = read_json(body, PATCH_SHAPE).await?;
    let info = api
        .control
        .call(move |c| {
            let limit = patched_limit(&patch, c.devices.disk(&id)?.rate_limit)?;
            tracing::info!("disk '{id}': rate limit set to {limit:?} through the API");
            Ok::<_, Refusal>(c.devices.set_disk_limit(&id, limit)?)
        })
        .await??;
    Ok(json(StatusCode::OK, &info))
}

async fn patch_net(
    State(api): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
    body: Body,
) -> Result<Response, Refusal> {
    let patch: DevicePatch = read_json(body, PATCH_SHAPE).await?;
    let info = api
        .control
        .call(move |c| {
            let limit = patched_limit(&patch, c.devices.net(&id)?.rate_limit)?;
            tracing::info!("NIC '{id}': rate limit set to {limit:?} through the API");
            Ok::<_, Refusal>(c.devices.set_net_limit(&id, limit)?)
        })
        .await??;
    Ok(json(StatusCode::OK, &info))
}

fn patched_limit(patch: &DevicePatch, current: RateLimit) -> Result<RateLimit, Refusal> {
    patch
        .rate_limit
        .apply(current)
        .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))
}

/// Hot-plugs a disk: 201 once the device is on the bus and the guest has been told.
async fn put_disk(State(api): State<Arc<ApiState>>, body: Body) -> Result<Response, Refusal> {
    let config: BlockConfig = read_json(body, DISK_SHAPE).await?;
    if config.id.is_none() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("a hot-plugged disk needs an id; expected {DISK_SHAPE}"),
        ));
    }
    VmConfig::validate_disk(&config)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let info = api
        .control
        .call(move |c| c.devices.add_disk(config, true))
        .await??;
    Ok(json(StatusCode::CREATED, &info))
}

/// Hot-plugs a NIC on the TAP named in the body, or on a TAP descriptor passed with the
/// request (`SCM_RIGHTS` on the same connection), which the VMM then owns.
async fn put_net(
    State(api): State<Arc<ApiState>>,
    Extension(passed): Extension<PassedFds>,
    body: Body,
) -> Result<Response, Refusal> {
    // Taken first: refused, the request closes its descriptor rather than leave it for the
    // connection's next NIC (which would get this TAP under its own TAP's name).
    let tap = passed.take();
    let config: NetConfig = read_json(body, NET_SHAPE).await?;
    if config.id.is_none() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("a hot-plugged NIC needs an id; expected {NET_SHAPE}"),
        ));
    }
    if config.fd.is_some() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "fd is only for NICs given at start (an inherited descriptor); name the TAP, or \
             pass its descriptor with the request (SCM_RIGHTS)",
        ));
    }
    VmConfig::validate_net(&config)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let info = api
        .control
        .call(move |c| c.devices.add_net(config, tap, true))
        .await??;
    Ok(json(StatusCode::CREATED, &info))
}

/// Asks the guest to eject the disk: 202; `GET /vm` shows it `removing` until it is gone.
async fn delete_disk(
    State(api): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, Refusal> {
    let info = api
        .control
        .call(move |c| c.devices.remove_disk(&id))
        .await??;
    Ok(json(StatusCode::ACCEPTED, &info))
}

async fn delete_net(
    State(api): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, Refusal> {
    let info = api
        .control
        .call(move |c| c.devices.remove_net(&id))
        .await??;
    Ok(json(StatusCode::ACCEPTED, &info))
}

/// How long a stop's answer waits for the devices' state before it goes without them.
const STOP_INFO_WAIT: Duration = Duration::from_secs(1);

async fn put_action(State(api): State<Arc<ApiState>>, body: Body) -> Result<Response, Refusal> {
    let request: ActionRequest = read_json(body, ACTION_SHAPE).await?;
    let status = match request.action {
        Action::Stop => {
            tracing::info!("stop requested through the API");
            // Requested before anything else: a control thread busy with another request
            // must not hold the stop up. The main thread wakes, stops the vCPUs and shuts
            // this server down gracefully, so this answer is still delivered.
            api.exit.request(ExitReason::Stopped);
            let mut info = match tokio::time::timeout(STOP_INFO_WAIT, api.info()).await {
                Ok(info) => info,
                Err(_) => api.info_without_devices(),
            };
            info.state = VmState::Stopping;
            return Ok(json(StatusCode::ACCEPTED, &info));
        }
        Action::Shutdown => {
            tracing::info!("power button pressed through the API");
            api.control
                .call(|c| c.press_power_button())
                .await?
                .map_err(|e| {
                    Refusal::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot press the power button: {e}"),
                    )
                })?;
            StatusCode::ACCEPTED
        }
        Action::Pause => {
            api.control.call(|c| c.pause()).await??;
            tracing::info!("VM paused through the API");
            StatusCode::OK
        }
        Action::Resume => {
            api.control.call(|c| c.resume()).await??;
            tracing::info!("VM resumed through the API");
            StatusCode::OK
        }
    };
    Ok(json(status, &api.info().await))
}

const ENDPOINTS: &str = "GET /vm, PUT /vm/actions, GET /vm/counters, GET /vm/console, \
PUT /vm/disks, PATCH|DELETE /vm/disks/{id}, PUT /vm/nets, PATCH|DELETE /vm/nets/{id}";

async fn not_found(method: Method, uri: Uri) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {method} {}; the API has {ENDPOINTS}",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Refusal {
    Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; the API has {ENDPOINTS}",
            uri.path()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rate_limit_patches_merge_and_refuse_zero() {
        let now = RateLimit {
            bytes_per_sec: Some(100),
            ops_per_sec: Some(5),
        };
        let patch: RateLimitPatch = serde_json::from_str(r#"{"ops_per_sec": null}"#).unwrap();
        assert_eq!(
            patch.apply(now).unwrap(),
            RateLimit {
                bytes_per_sec: Some(100),
                ops_per_sec: None
            }
        );
        let patch: RateLimitPatch = serde_json::from_str(r#"{"bytes_per_sec": 7}"#).unwrap();
        assert_eq!(patch.apply(now).unwrap().bytes_per_sec, Some(7));
        let patch: RateLimitPatch = serde_json::from_str(r#"{"bytes_per_sec": 0}"#).unwrap();
        assert!(patch.apply(now).unwrap_err().contains("0 is not allowed"));
        assert!(serde_json::from_str::<RateLimitPatch>(r#"{"iops": 1}"#).is_err());
    }

    #[test]
    fn axums_own_plain_errors_are_answered_in_the_api_error_shape() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let through = |response: Response| {
            runtime.block_on(async {
                let answer = json_error_bodies(response).await;
                let status = answer.status();
                let headers = answer.headers().clone();
                let body = axum::body::to_bytes(answer.into_body(), MAX_BODY)
                    .await
                    .unwrap();
                (status, headers, body)
            })
        };
        let rejection = (
            StatusCode::BAD_REQUEST,
            [(header::ALLOW, "GET")],
            "Invalid URL: Cannot parse `\\xFF` to a `String`",
        )
            .into_response();
        let (status, headers, body) = through(rejection);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(headers[header::ALLOW], "GET", "other headers are kept");
        let error: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            error.error,
            "Invalid URL: Cannot parse `\\xFF` to a `String`"
        );
        // An empty one gets its status's reason.
        let (_, _, body) = through(StatusCode::METHOD_NOT_ALLOWED.into_response());
        let error: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.error, "Method Not Allowed");
        // Our own JSON errors and every success pass untouched.
        let ours = Refusal::new(StatusCode::CONFLICT, "busy").into_response();
        let (status, _, body) = through(ours);
        assert_eq!(
            (status, &body[..]),
            (StatusCode::CONFLICT, &br#"{"error":"busy"}"#[..])
        );
        let (status, _, body) = through((StatusCode::OK, "plain and fine").into_response());
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"plain and fine"[..])
        );
    }

    #[test]
    fn device_errors_map_to_statuses_with_their_whole_reason() {
        let r = Refusal::from(DeviceError::NoDisk("d9".into()));
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = Refusal::from(DeviceError::DuplicateId("d1".into()));
        assert_eq!(r.status, StatusCode::CONFLICT);
        let r = Refusal::from(DeviceError::NoFreeSlot { last: 9 });
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert!(r.reason.contains("no free PCI slot"), "{}", r.reason);
        let r = Refusal::from(DeviceError::Disk {
            path: "/missing".into(),
            source: crate::devices::virtio::block::io::DiskError::Open {
                path: "/missing".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            },
        });
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.reason.contains("/missing"), "{}", r.reason);
        assert!(r.reason.contains("No such file"), "{}", r.reason);
        let r = Refusal::from(PauseError::AlreadyPaused);
        assert_eq!(r.status, StatusCode::CONFLICT);
    }

    #[test]
    fn a_live_socket_is_refused_a_stale_one_replaced_and_ours_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let live = StdUnixListener::bind(&path).unwrap();
        let e = ApiSocket::bind(&path).unwrap_err().to_string();
        assert!(e.contains("in use by another process"), "{e}");
        assert!(path.exists(), "a live socket is left alone");
        drop(live);
        // What a killed VMM leaves: a socket file no socket is bound to. The file the dropped
        // listener left would do only by luck: a process another test forks at that moment
        // holds a copy of the listener until it execs, and the socket still answers.
        std::fs::remove_file(&path).unwrap();
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: mknod reads the NUL-terminated path and creates a file; no memory is shared.
        let made = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFSOCK | 0o600, 0) };
        assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
        let socket = ApiSocket::bind(&path).expect("a stale socket is replaced");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(socket);
        assert!(!path.exists(), "the socket goes with its owner");

        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        let e = ApiSocket::bind(&file).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let e = ApiSocket::bind(&dir.path().join("missing/api.sock"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");

        // Regression: a symbolic link in the socket's place is never followed, a shared
        // directory without the sticky bit is refused, and a sticky one (like /tmp) is fine.
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(ApiSocket::bind(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ApiSocket::bind(&shared.join("api.sock"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by other users"), "{e}");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let socket = ApiSocket::bind(&shared.join("api.sock")).unwrap();
        let mode = std::fs::metadata(shared.join("api.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(socket);
    }
}
