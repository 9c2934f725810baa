//! TLS for every HTTP client of the orchestrator and the `stratus` commands: rustls with
//! the ring provider (the one the node agent serves with), trusting either a site's own CA
//! bundle only or the system's roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA bundle {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA bundle {path} is not valid PEM: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA bundle {path} holds no usable CA certificate")]
    NoCa { path: PathBuf },
    #[error("cannot set up TLS: {source}")]
    Tls { source: rustls::Error },
    #[error("cannot make the HTTP client: {source}")]
    Client { source: reqwest::Error },
}

/// Client TLS settings: servers are checked against the CAs in `ca_file` only (a site's
/// own CA for its nodes), or against the system's trusted roots without it.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Tls { source })?;
    let mut tls = match ca_file {
        Some(path) => builder
            .with_root_certificates(read_cas(path)?)
            .with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                rustls_platform_verifier::Verifier::new(provider)
                    .map_err(|source| TlsError::Tls { source })?,
            ))
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The orchestrator's asynchronous client (see [`client_config`]).
pub fn client(ca_file: Option<&Path>) -> Result<reqwest::Client, TlsError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .tls_backend_preconfigured(client_config(ca_file)?)
        .build()
        .map_err(|source| TlsError::Client { source })
}

/// The trust anchors in a PEM bundle.
fn read_cas(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
        // A certificate webpki cannot use as an anchor counts as none, said below.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsError::NoCa {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}
