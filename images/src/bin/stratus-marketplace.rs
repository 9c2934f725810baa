//! `stratus-marketplace`: the Marketplace REST server (signed image metadata entries).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use stratus_images::marketplace::{router, Store};

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
    let store = Store::open(&args.db)
        .await
        .with_context(|| format!("opening the database {}", args.db))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, db = %args.db, "marketplace serving");
    axum::serve(listener, router(store.clone()))
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
