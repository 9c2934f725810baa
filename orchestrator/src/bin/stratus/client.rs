//! The orchestrator's and the Marketplace's HTTP APIs as the CLI calls them: Basic
//! authentication, `endpoint_timeout`, and every refusal turned into its `{"error"}` reason.

use std::path::Path;
use std::time::Duration;

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{endpoint} did not answer within {seconds} s (endpoint_timeout)")]
    Timeout { endpoint: String, seconds: u64 },
    #[error("cannot reach {endpoint}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    /// The service's own reason (`{"error": …}`).
    #[error("{reason}")]
    Refused { status: StatusCode, reason: String },
    #[error("{endpoint} answered {status} with something that is not its API's answer")]
    BadAnswer {
        endpoint: String,
        status: StatusCode,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error("cannot set up the HTTP client")]
    Setup(#[source] reqwest::Error),
    #[error("cannot set up TLS")]
    Tls(#[source] stratus_orchestrator::tls::TlsError),
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } | ClientError::BadAnswer { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

/// One service endpoint, with the caller's credentials when it needs them.
pub struct Service {
    http: Client,
    base: String,
    credentials: Option<(String, String)>,
    bearer: Option<String>,
    timeout: Duration,
}

impl Service {
    pub fn new(
        base: &str,
        credentials: Option<(String, String)>,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Service, ClientError> {
        let tls = stratus_orchestrator::tls::client_config(ca_file).map_err(ClientError::Tls)?;
        let http = Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("stratus/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Setup)?;
        // StratusLab's configurations name hosts alone (`endpoint = cloud.example.org`),
        // which its client reached over HTTPS.
        let base = base.trim_end_matches('/');
        let base = match base.contains("://") {
            true => base.to_owned(),
            false => format!("https://{base}"),
        };
        Ok(Service {
            http,
            base,
            credentials,
            bearer: None,
            timeout,
        })
    }

    /// Requests carry `Authorization: Bearer <token>` (the Marketplace's upload token).
    pub fn with_bearer(mut self, token: String) -> Service {
        self.bearer = Some(token);
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match (&self.credentials, &self.bearer) {
            (Some((user, password)), _) => builder.basic_auth(user, Some(password)),
            (None, Some(token)) => builder.bearer_auth(token),
            (None, None) => builder,
        }
    }

    fn send(&self, builder: RequestBuilder) -> Result<Response, ClientError> {
        let response = builder.send().map_err(|source| self.transport(source))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().map_err(|source| self.transport(source))?;
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            error: String,
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(ClientError::Refused {
                status,
                reason: e.error,
            }),
            Err(source) => Err(ClientError::BadAnswer {
                endpoint: self.base.clone(),
                status,
                source: Some(source),
            }),
        }
    }

    fn transport(&self, source: reqwest::Error) -> ClientError {
        if source.is_timeout() {
            ClientError::Timeout {
                endpoint: self.base.clone(),
                seconds: self.timeout.as_secs(),
            }
        } else {
            ClientError::Unreachable {
                endpoint: self.base.clone(),
                source,
            }
        }
    }

    fn decode<T: DeserializeOwned>(&self, response: Response) -> Result<T, ClientError> {
        let status = response.status();
        let body = response.bytes().map_err(|source| self.transport(source))?;
        serde_json::from_slice(&body).map_err(|source| ClientError::BadAnswer {
            endpoint: self.base.clone(),
            status,
            source: Some(source),
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, path))?;
        self.decode(response)
    }

    pub fn get_with<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, path).query(query))?;
        self.decode(response)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let mut builder = self.request(reqwest::Method::POST, path);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        let response = self.send(builder)?;
        self.decode(response)
    }

    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let response = self.send(self.request(reqwest::Method::PUT, path).json(body))?;
        self.decode(response)
    }

    /// A DELETE answered with no body.
    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send(self.request(reqwest::Method::DELETE, path))?;
        Ok(())
    }

    /// A DELETE answered with a JSON body.
    pub fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(self.request(reqwest::Method::DELETE, path))?;
        self.decode(response)
    }

    /// POSTs a document as-is (signed Marketplace entries must not be re-encoded).
    pub fn post_document(
        &self,
        path: &str,
        content_type: &str,
        body: String,
    ) -> Result<Option<String>, ClientError> {
        let response = self.send(
            self.request(reqwest::Method::POST, path)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body),
        )?;
        Ok(response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned))
    }
}
