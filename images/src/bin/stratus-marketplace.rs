//! `stratus-marketplace`: the Marketplace REST server (signed image metadata entries).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use stratus_images::dsig::TrustedCas;
use stratus_images::marketplace::{router, Store, Uploads};

/// Serve the StratusLab Marketplace API: POST/GET /metadata, GET /endorsers.
#[derive(Debug, Parser)]
#[command(name = "stratus-marketplace", version)]
struct Args {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:9204")]
    listen: SocketAddr,
    /// Database URL (`sqlite://PATH`; the file is created if missing).
    #[arg(long, default_value = "sqlite://marketplace.db")]
    db: String,
    /// PEM bundle of the CAs whose endorser certificates this Marketplace accepts (a grid
    /// site: its IGTF CAs). Entries signed with any other certificate are refused.
    #[arg(long)]
    trusted_cas: PathBuf,
    /// File (mode 0600) holding the token uploads must carry (`Authorization: Bearer`).
    /// Without it the Marketplace is read-only.
    #[arg(long)]
    upload_token_file: Option<PathBuf>,
}

/// The upload token, from a file only its owner may read.
fn read_token(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read the upload token file {}", path.display()))?
        .mode();
    anyhow::ensure!(
        mode & 0o077 == 0,
        "the upload token file {} is readable by other users (mode {:o}); chmod 600 it",
        path.display(),
        mode & 0o777
    );
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the upload token file {}", path.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "the upload token file {} is empty",
        path.display()
    );
    Ok(token)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let trusted = TrustedCas::load(&args.trusted_cas)
        .with_context(|| format!("--trusted-cas {}", args.trusted_cas.display()))?;
    let token = args
        .upload_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    if token.is_none() {
        tracing::warn!("no --upload-token-file: the Marketplace is read-only");
    }
    let store = Store::open(&args.db)
        .await
        .with_context(|| format!("opening the database {}", args.db))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, db = %args.db, "marketplace serving");
    let uploads = Uploads {
        trusted: Arc::new(trusted),
        token,
    };
    axum::serve(listener, router(store.clone(), uploads))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    store.close().await;
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}
