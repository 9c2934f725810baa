//! The API over HTTPS: the server side of the agent's `[tls]` section.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{read_private_file, ConfigError, TlsFiles};

/// The server's TLS settings from its certificate chain and key, checked to belong together.
/// Called at start and by `--check-config`, so a bad pair stops the agent before it listens.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let chain = read_chain(&files.cert_file)?;
    let key_pem = read_private_file("the TLS private key", &files.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| ConfigError::Pem {
        path: files.key_file.clone(),
        source,
    })?;
    let identity_err = |source| ConfigError::TlsIdentity {
        cert: files.cert_file.clone(),
        key: files.key_file.clone(),
        source,
    };
    // ring, not the process-wide default: the agent links one provider and says which.
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(identity_err)?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(identity_err)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        what: "the TLS certificate",
        path: path.to_owned(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ConfigError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(ConfigError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}
