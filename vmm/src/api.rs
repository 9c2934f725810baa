//! The VMM control API: HTTP/1.1 with JSON bodies on a Unix socket, one per VM, for the
//! node agent (`--api-socket`). It reports the VM, changes disk and NIC rate limits while
//! the guest runs, and stops the VM.
//!
//! The server runs on its own thread with a current-thread tokio runtime, so the vCPU and
//! device threads never share a scheduler with it; handlers only touch limiter handles and
//! the exit signal, which are built for use from any thread.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::VmConfig;
use crate::devices::rate_limiter::{RateLimit, RateLimiter};
use crate::devices::virtio::net::device::NetRateLimiters;
use crate::exit::{ExitReason, ExitSignal};
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
        let listener = StdUnixListener::bind(path).map_err(|source| {
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
        // Whoever can connect can stop the VM: owner only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
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
                let served = runtime.block_on(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = shutdown_rx.await;
                        })
                        .await
                });
                if let Err(e) = served {
                    tracing::error!("the API server stopped: {e}");
                }
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

/// A disk as the API sees it.
#[derive(Clone, Debug)]
pub struct DiskEntry {
    pub path: PathBuf,
    pub read_only: bool,
    pub limiter: RateLimiter,
}

/// A NIC as the API sees it.
#[derive(Clone, Debug)]
pub struct NetEntry {
    pub tap: String,
    pub mac: String,
    pub limiters: NetRateLimiters,
}

/// What the handlers work on: the VM's shape and handles into the running devices.
#[derive(Clone)]
pub struct ApiState {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    /// Indexed as in the configuration.
    pub disks: Vec<DiskEntry>,
    pub nets: Vec<NetEntry>,
    pub exit: ExitSignal,
}

impl ApiState {
    pub fn new(config: &VmConfig, vm: &Vm) -> Self {
        ApiState {
            vcpus: config.cpus,
            memory_mib: config.memory_mib,
            kernel: config.kernel.clone(),
            disks: config
                .disks
                .iter()
                .zip(vm.disk_rate_limiters())
                .map(|(disk, limiter)| DiskEntry {
                    path: disk.path.clone(),
                    read_only: disk.read_only,
                    limiter,
                })
                .collect(),
            nets: config
                .nets
                .iter()
                .zip(vm.net_rate_limiters())
                .map(|(net, limiters)| NetEntry {
                    tap: net.tap.clone(),
                    mac: net.mac.clone(),
                    limiters,
                })
                .collect(),
            exit: vm.exit_signal(),
        }
    }

    fn disk_info(&self, index: usize) -> DiskInfo {
        let disk = &self.disks[index];
        DiskInfo {
            index,
            path: disk.path.clone(),
            read_only: disk.read_only,
            rate_limit: disk.limiter.limit(),
        }
    }

    fn net_info(&self, index: usize) -> NetInfo {
        let net = &self.nets[index];
        NetInfo {
            index,
            tap: net.tap.clone(),
            mac: net.mac.clone(),
            rate_limit: net.limiters.limit(),
        }
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            state: if self.exit.is_requested() {
                VmState::Stopping
            } else {
                VmState::Running
            },
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            disks: (0..self.disks.len()).map(|i| self.disk_info(i)).collect(),
            nets: (0..self.nets.len()).map(|i| self.net_info(i)).collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    /// A stop reason was raised; the process is about to exit.
    Stopping,
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
    pub index: usize,
    pub path: PathBuf,
    pub read_only: bool,
    pub rate_limit: RateLimit,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    pub index: usize,
    pub tap: String,
    pub mac: String,
    /// Applied to each direction separately, as in the configuration.
    pub rate_limit: RateLimit,
}

/// Body of `PATCH /vm/disks/{index}` and `PATCH /vm/nets/{index}`.
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
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Bodies are a few dozen bytes; anything near this is a mistake.
const MAX_BODY: usize = 64 * 1024;

const PATCH_SHAPE: &str = r#"{"rate_limit": {"bytes_per_sec": N|null, "ops_per_sec": N|null}}"#;
const ACTION_SHAPE: &str = r#"{"action": "stop"}"#;

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/vm", get(get_vm))
        .route("/vm/disks/{index}", patch(patch_disk))
        .route("/vm/nets/{index}", patch(patch_net))
        .route("/vm/actions", put(put_action))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state)
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

fn device_index(kind: &str, raw: &str, count: usize) -> Result<usize, Refusal> {
    match raw.parse::<usize>() {
        Ok(index) if index < count => Ok(index),
        _ if count == 0 => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("no {kind} {raw}: this VM has no {kind}s"),
        )),
        _ => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "no {kind} {raw}: this VM's {kind}s are numbered 0 to {}",
                count - 1
            ),
        )),
    }
}

async fn get_vm(State(api): State<Arc<ApiState>>) -> Response {
    json(StatusCode::OK, &api.info())
}

async fn patch_disk(
    State(api): State<Arc<ApiState>>,
    UrlPath(index): UrlPath<String>,
    body: Body,
) -> Result<Response, Refusal> {
    let index = device_index("disk", &index, api.disks.len())?;
    let patch: DevicePatch = read_json(body, PATCH_SHAPE).await?;
    let limiter = &api.disks[index].limiter;
    let limit = patch
        .rate_limit
        .apply(limiter.limit())
        .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))?;
    limiter.update(limit);
    tracing::info!("disk {index}: rate limit set to {limit:?} through the API");
    Ok(json(StatusCode::OK, &api.disk_info(index)))
}

async fn patch_net(
    State(api): State<Arc<ApiState>>,
    UrlPath(index): UrlPath<String>,
    body: Body,
) -> Result<Response, Refusal> {
    let index = device_index("net", &index, api.nets.len())?;
    let patch: DevicePatch = read_json(body, PATCH_SHAPE).await?;
    let limiters = &api.nets[index].limiters;
    let limit = patch
        .rate_limit
        .apply(limiters.limit())
        .map_err(|reason| Refusal::new(StatusCode::BAD_REQUEST, reason))?;
    limiters.update(limit);
    tracing::info!("net {index}: rate limit set to {limit:?} through the API");
    Ok(json(StatusCode::OK, &api.net_info(index)))
}

async fn put_action(State(api): State<Arc<ApiState>>, body: Body) -> Result<Response, Refusal> {
    let request: ActionRequest = read_json(body, ACTION_SHAPE).await?;
    match request.action {
        Action::Stop => {
            tracing::info!("stop requested through the API");
            // The main thread wakes, stops the vCPUs and shuts this server down gracefully,
            // so this answer is still delivered.
            api.exit.request(ExitReason::Stopped);
            Ok(json(StatusCode::ACCEPTED, &api.info()))
        }
    }
}

const ENDPOINTS: &str = "GET /vm, PATCH /vm/disks/{index}, PATCH /vm/nets/{index}, PUT /vm/actions";

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
    use tower::ServiceExt;

    fn state() -> ApiState {
        ApiState {
            vcpus: 2,
            memory_mib: 256,
            kernel: "/boot/vmlinux".into(),
            disks: vec![
                DiskEntry {
                    path: "/d0.img".into(),
                    read_only: false,
                    limiter: RateLimiter::new(RateLimit::default()),
                },
                DiskEntry {
                    path: "/d1.img".into(),
                    read_only: true,
                    limiter: RateLimiter::new(RateLimit {
                        bytes_per_sec: Some(1 << 20),
                        ops_per_sec: None,
                    }),
                },
            ],
            nets: vec![NetEntry {
                tap: "tap0".into(),
                mac: "02:00:c6:12:00:0a".into(),
                limiters: NetRateLimiters::new(RateLimit::default()),
            }],
            exit: ExitSignal::new(),
        }
    }

    fn call(state: &ApiState, method: &str, path: &str, body: &str) -> (StatusCode, Response) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let app = router(Arc::new(state.clone()));
        let response = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(app.oneshot(request))
            .unwrap();
        (response.status(), response)
    }

    fn body<T: DeserializeOwned>(response: Response) -> T {
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(response.into_body(), MAX_BODY))
            .unwrap();
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)))
    }

    fn error_of(state: &ApiState, method: &str, path: &str, req: &str) -> (StatusCode, String) {
        let (status, response) = call(state, method, path, req);
        (status, body::<ErrorBody>(response).error)
    }

    #[test]
    fn get_vm_reports_the_shape_and_current_limits() {
        let s = state();
        let (status, response) = call(&s, "GET", "/vm", "");
        assert_eq!(status, StatusCode::OK);
        let info: VmInfo = body(response);
        assert_eq!(info.state, VmState::Running);
        assert_eq!((info.vcpus, info.memory_mib), (2, 256));
        assert_eq!(info.kernel, PathBuf::from("/boot/vmlinux"));
        assert_eq!(info.disks.len(), 2);
        assert_eq!(info.disks[1].index, 1);
        assert!(info.disks[1].read_only);
        assert_eq!(info.disks[1].rate_limit.bytes_per_sec, Some(1 << 20));
        assert_eq!(info.nets[0].tap, "tap0");
        assert!(info.nets[0].rate_limit.is_unlimited());
    }

    #[test]
    fn patching_a_disk_merges_into_its_limits_and_reaches_the_device_handle() {
        let s = state();
        let (status, response) = call(
            &s,
            "PATCH",
            "/vm/disks/1",
            r#"{"rate_limit": {"ops_per_sec": 100}}"#,
        );
        assert_eq!(status, StatusCode::OK);
        let disk: DiskInfo = body(response);
        let want = RateLimit {
            bytes_per_sec: Some(1 << 20),
            ops_per_sec: Some(100),
        };
        assert_eq!(disk.rate_limit, want, "an omitted field keeps its value");
        assert_eq!(s.disks[1].limiter.limit(), want);
        let (status, _) = call(
            &s,
            "PATCH",
            "/vm/disks/1",
            r#"{"rate_limit": {"bytes_per_sec": null}}"#,
        );
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            s.disks[1].limiter.limit(),
            RateLimit {
                bytes_per_sec: None,
                ops_per_sec: Some(100)
            },
            "null removes that limit"
        );
        assert!(
            s.disks[0].limiter.is_unlimited(),
            "other disks are untouched"
        );
    }

    #[test]
    fn patching_a_nic_sets_both_directions() {
        let s = state();
        let (status, response) = call(
            &s,
            "PATCH",
            "/vm/nets/0",
            r#"{"rate_limit": {"bytes_per_sec": 125000000, "ops_per_sec": 10000}}"#,
        );
        assert_eq!(status, StatusCode::OK);
        let net: NetInfo = body(response);
        let want = RateLimit {
            bytes_per_sec: Some(125_000_000),
            ops_per_sec: Some(10_000),
        };
        assert_eq!(net.rate_limit, want);
        assert_eq!(s.nets[0].limiters.rx.limit(), want);
        assert_eq!(s.nets[0].limiters.tx.limit(), want);
        let (status, _) = call(
            &s,
            "PATCH",
            "/vm/nets/0",
            r#"{"rate_limit": {"bytes_per_sec": null, "ops_per_sec": null}}"#,
        );
        assert_eq!(status, StatusCode::OK);
        assert!(s.nets[0].limiters.rx.is_unlimited());
        assert!(s.nets[0].limiters.tx.is_unlimited());
    }

    #[test]
    fn bad_patches_are_refused_with_a_reason_and_change_nothing() {
        let s = state();
        let before = s.disks[1].limiter.limit();
        for (body, expect) in [
            (
                r#"{"rate_limit": {"bytes_per_sec": 0}}"#,
                "0 is not allowed",
            ),
            (r#"{"rate_limit": {"ops_per_sec": -5}}"#, "invalid value"),
            (r#"{"rate_limit": {"bps": 5}}"#, "unknown field `bps`"),
            (r#"{"rate_limit": {}, "x": 1}"#, "unknown field `x`"),
            (r#"{}"#, "missing field `rate_limit`"),
            ("", "expected {\"rate_limit\""),
            ("not json", "invalid request body"),
        ] {
            let (status, reason) = error_of(&s, "PATCH", "/vm/disks/1", body);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reason}");
            assert!(reason.contains(expect), "{body}: {reason}");
        }
        assert_eq!(s.disks[1].limiter.limit(), before);
        let (status, reason) = error_of(
            &s,
            "PATCH",
            "/vm/nets/0",
            r#"{"rate_limit": {"ops_per_sec": 0}}"#,
        );
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(reason.contains("rate_limit.ops_per_sec"), "{reason}");
    }

    #[test]
    fn unknown_devices_paths_and_methods_get_json_errors() {
        let mut s = state();
        let patch = r#"{"rate_limit": {}}"#;
        let (status, reason) = error_of(&s, "PATCH", "/vm/disks/2", patch);
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(reason.contains("numbered 0 to 1"), "{reason}");
        let (status, _) = error_of(&s, "PATCH", "/vm/disks/first", patch);
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, reason) = error_of(&s, "PATCH", "/vm/nets/1", patch);
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(reason.contains("numbered 0 to 0"), "{reason}");
        s.nets.clear();
        let (_, reason) = error_of(&s, "PATCH", "/vm/nets/0", patch);
        assert!(reason.contains("this VM has no nets"), "{reason}");
        let (status, reason) = error_of(&s, "GET", "/vms", "");
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(reason.contains("GET /vm,"), "{reason}");
        let (status, reason) = error_of(&s, "DELETE", "/vm", "");
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(reason.contains("DELETE is not allowed on /vm"), "{reason}");
        let (status, _) = error_of(&s, "GET", "/vm/disks/0", "");
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn stop_raises_the_api_exit_reason_and_other_actions_are_refused() {
        let s = state();
        let (status, reason) = error_of(&s, "PUT", "/vm/actions", r#"{"action": "reboot"}"#);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(reason.contains("unknown variant `reboot`"), "{reason}");
        assert!(!s.exit.is_requested());
        let (status, response) = call(&s, "PUT", "/vm/actions", r#"{"action": "stop"}"#);
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(body::<VmInfo>(response).state, VmState::Stopping);
        assert_eq!(
            s.exit.wait_timeout(Duration::ZERO),
            Some(ExitReason::Stopped)
        );
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
    }
}
