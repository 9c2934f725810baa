//! The node agents' HTTP API as a typed client. The types are the agent's own
//! (`stratus_nodeagent::api::types`), so a change on the wire is a compile error here.

use std::time::Duration;

use stratus_nodeagent::api::types::{AttachDisk, ErrorBody, HostInfo, VmInfo, VmList, VmSpec};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("node agent {url} does not answer: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("node agent {url} refused ({status}): {reason}")]
    Refused {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("node agent {url} answered something unreadable: {source}")]
    BadAnswer {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl AgentError {
    /// The message with every cause under it (a TLS failure's reason is three levels
    /// down in reqwest's errors), for operators reading a node's last error.
    pub fn with_causes(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            let line = e.to_string();
            if !text.contains(&line) {
                text.push_str(": ");
                text.push_str(&line);
            }
            cause = e.source();
        }
        text
    }

    /// The HTTP status the agent answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Calls one node agent. Cheap to clone; connections are pooled.
#[derive(Clone, Debug)]
pub struct AgentClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// How long one call may take. Creating a VM may download its image first.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const CREATE_TIMEOUT: Duration = Duration::from_secs(3600);

impl AgentClient {
    pub fn new(http: reqwest::Client, base: &str, token: &str) -> AgentClient {
        AgentClient {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<reqwest::Response, AgentError> {
        let response = request
            .bearer_auth(&self.token)
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| AgentError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let reason = match response.json::<ErrorBody>().await {
            Ok(body) => body.error,
            Err(_) => status.canonical_reason().unwrap_or("error").to_owned(),
        };
        Err(AgentError::Refused {
            url: self.base.clone(),
            status: status.as_u16(),
            reason,
        })
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, AgentError> {
        response
            .json()
            .await
            .map_err(|source| AgentError::BadAnswer {
                url: self.base.clone(),
                source,
            })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn host(&self) -> Result<HostInfo, AgentError> {
        let r = self
            .send(self.http.get(self.url("/host")), CALL_TIMEOUT)
            .await?;
        self.read(r).await
    }

    pub async fn vms(&self) -> Result<VmList, AgentError> {
        let r = self
            .send(self.http.get(self.url("/vms")), CALL_TIMEOUT)
            .await?;
        self.read(r).await
    }

    /// The VM, or None if the agent does not know it.
    pub async fn vm(&self, id: &str) -> Result<Option<VmInfo>, AgentError> {
        match self
            .send(self.http.get(self.url(&format!("/vms/{id}"))), CALL_TIMEOUT)
            .await
        {
            Ok(r) => Ok(Some(self.read(r).await?)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates and starts the VM (idempotent: the same spec again answers with the VM).
    pub async fn put_vm(&self, id: &str, spec: &VmSpec) -> Result<VmInfo, AgentError> {
        let r = self
            .send(
                self.http.put(self.url(&format!("/vms/{id}"))).json(spec),
                CREATE_TIMEOUT,
            )
            .await?;
        self.read(r).await
    }

    pub async fn kill(&self, id: &str) -> Result<VmInfo, AgentError> {
        let r = self
            .send(
                self.http.post(self.url(&format!("/vms/{id}/kill"))),
                CALL_TIMEOUT,
            )
            .await?;
        self.read(r).await
    }

    /// Presses the power button; the agent stops the VM hard after `timeout`.
    pub async fn shutdown(&self, id: &str, timeout: Duration) -> Result<VmInfo, AgentError> {
        let r = self
            .send(
                self.http
                    .post(self.url(&format!("/vms/{id}/shutdown?timeout={}", timeout.as_secs()))),
                CALL_TIMEOUT,
            )
            .await?;
        self.read(r).await
    }

    /// Removes an ended VM's node resources; a VM the agent does not know is gone already.
    pub async fn delete(&self, id: &str) -> Result<(), AgentError> {
        match self
            .send(
                self.http.delete(self.url(&format!("/vms/{id}"))),
                CALL_TIMEOUT,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Hot-plugs a disk; answers when the guest has it.
    pub async fn attach_disk(
        &self,
        id: &str,
        disk: &str,
        attach: &AttachDisk,
    ) -> Result<VmInfo, AgentError> {
        let r = self
            .send(
                self.http
                    .put(self.url(&format!("/vms/{id}/disks/{disk}")))
                    .json(attach),
                CREATE_TIMEOUT,
            )
            .await?;
        self.read(r).await
    }

    /// Unplugs a hot-plugged disk; answers when the guest has let it go.
    pub async fn detach_disk(&self, id: &str, disk: &str) -> Result<VmInfo, AgentError> {
        let r = self
            .send(
                self.http
                    .delete(self.url(&format!("/vms/{id}/disks/{disk}"))),
                CREATE_TIMEOUT,
            )
            .await?;
        self.read(r).await
    }

    pub async fn console(&self, id: &str, bytes: u64) -> Result<Vec<u8>, AgentError> {
        let r = self
            .send(
                self.http
                    .get(self.url(&format!("/vms/{id}/console?bytes={bytes}"))),
                CALL_TIMEOUT,
            )
            .await?;
        r.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|source| AgentError::BadAnswer {
                url: self.base.clone(),
                source,
            })
    }
}
