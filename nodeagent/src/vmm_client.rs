//! A VMM's control API (its Unix socket) as a typed client. The request and response types
//! are stratus-vmm's own, so a change on either side is a compile error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use stratus_vmm::api::{CountersReport, DiskInfo, VmInfo as VmmInfo};
use stratus_vmm::devices::virtio::block::BlockConfig;

/// How long one call to a VMM may take; a VMM that does not answer in time is treated as
/// gone for that call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest answer read from a VMM. Its answers are a few KiB; a compromised VMM could
/// otherwise stream gigabytes into the agent's memory within the timeout (counters are
/// read on every listing of the host's VMs).
const MAX_ANSWER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VmmClientError {
    #[error("cannot reach the VMM at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM at {socket} did not answer within {CALL_TIMEOUT:?}")]
    Timeout { socket: PathBuf },
    #[error("talking to the VMM at {socket}: {source}")]
    Http {
        socket: PathBuf,
        source: hyper::Error,
    },
    #[error("reading the answer of the VMM at {socket}: {source}")]
    Answer {
        socket: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the VMM refused {what} ({status}): {reason}")]
    Refused {
        what: String,
        status: StatusCode,
        reason: String,
    },
    #[error("the VMM's answer to {what} is not what the agent expects: {source}")]
    Decode {
        what: String,
        source: serde_json::Error,
    },
}

impl VmmClientError {
    /// The VMM answered 409: the request conflicts with the VM's state.
    pub fn is_conflict(&self) -> bool {
        matches!(self, VmmClientError::Refused { status, .. } if *status == StatusCode::CONFLICT)
    }

    /// The VMM answered 400: what the agent passed on from its caller (a hot-plugged disk's
    /// settings) is wrong, which the caller can fix.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, VmmClientError::Refused { status, .. } if *status == StatusCode::BAD_REQUEST)
    }
}

#[derive(Clone, Debug)]
pub struct VmmClient {
    socket: PathBuf,
    peer_uid: Option<u32>,
}

impl VmmClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VmmClient {
            socket: socket.into(),
            peer_uid: None,
        }
    }

    /// Talks only to a VMM running as `uid`. A jailed VMM owns the directory of its socket
    /// and could put a link to another service's socket in its place; the kernel's record
    /// of who listens on the other end cannot be forged.
    pub fn with_peer_uid(mut self, uid: u32) -> Self {
        self.peer_uid = Some(uid);
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, VmmClientError> {
        let what = format!("{method} {path}");
        let request = async {
            let connect_error = |source| VmmClientError::Connect {
                socket: self.socket.clone(),
                source,
            };
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(connect_error)?;
            if let Some(expected) = self.peer_uid {
                let peer = stream.peer_cred().map_err(connect_error)?.uid();
                if peer != expected {
                    return Err(connect_error(std::io::Error::other(format!(
                        "the socket's server runs as uid {peer}, not as the VM's user {expected}"
                    ))));
                }
            }
            let http = |source| VmmClientError::Http {
                socket: self.socket.clone(),
                source,
            };
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(http)?;
            tokio::spawn(connection);
            let body =
                match body {
                    Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|source| {
                        VmmClientError::Decode {
                            what: what.clone(),
                            source,
                        }
                    })?),
                    None => Bytes::new(),
                };
            let request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, "localhost")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .expect("a request built from valid parts");
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|source| VmmClientError::Answer {
                    socket: self.socket.clone(),
                    source,
                })?
                .to_bytes();
            if !status.is_success() {
                let reason = serde_json::from_slice::<stratus_vmm::api::ErrorBody>(&bytes)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
                return Err(VmmClientError::Refused {
                    what: what.clone(),
                    status,
                    reason,
                });
            }
            serde_json::from_slice(&bytes).map_err(|source| VmmClientError::Decode {
                what: what.clone(),
                source,
            })
        };
        tokio::time::timeout(CALL_TIMEOUT, request)
            .await
            .map_err(|_| VmmClientError::Timeout {
                socket: self.socket.clone(),
            })?
    }

    pub async fn info(&self) -> Result<VmmInfo, VmmClientError> {
        self.call(Method::GET, "/vm", None::<&()>).await
    }

    pub async fn counters(&self) -> Result<CountersReport, VmmClientError> {
        self.call(Method::GET, "/vm/counters", None::<&()>).await
    }

    async fn action(&self, action: &str) -> Result<VmmInfo, VmmClientError> {
        self.call(
            Method::PUT,
            "/vm/actions",
            Some(&serde_json::json!({ "action": action })),
        )
        .await
    }

    /// The hard stop: the VMM ends at once (exit status 6).
    pub async fn stop(&self) -> Result<VmmInfo, VmmClientError> {
        self.action("stop").await
    }

    /// The ACPI power button.
    pub async fn press_power_button(&self) -> Result<VmmInfo, VmmClientError> {
        self.action("shutdown").await
    }

    pub async fn pause(&self) -> Result<VmmInfo, VmmClientError> {
        self.action("pause").await
    }

    pub async fn resume(&self) -> Result<VmmInfo, VmmClientError> {
        self.action("resume").await
    }

    /// Hot-plugs a disk (its `id` must be set).
    pub async fn add_disk(&self, disk: &BlockConfig) -> Result<DiskInfo, VmmClientError> {
        self.call(Method::PUT, "/vm/disks", Some(disk)).await
    }

    /// Asks the guest to eject a disk; the VMM drops it once the guest has.
    pub async fn remove_disk(&self, id: &str) -> Result<DiskInfo, VmmClientError> {
        self.call(Method::DELETE, &format!("/vm/disks/{id}"), None::<&()>)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A VMM that answers with more than any real answer holds is cut off, not buffered.
    #[tokio::test]
    async fn an_endless_answer_is_refused_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        content-length: 1073741824\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b' '; 64 * 1024];
            // Until the client hangs up.
            while stream.write_all(&chunk).await.is_ok() {}
        });
        let e = VmmClient::new(&socket).info().await.unwrap_err();
        assert!(matches!(e, VmmClientError::Answer { .. }), "{e}");
        assert!(e.to_string().contains("length limit exceeded"), "{e}");
    }
}
