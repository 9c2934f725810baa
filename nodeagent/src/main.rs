//! `stratus-nodeagent`: the per-host daemon (a systemd service).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;
use clap::{Parser, ValueEnum};
use stratus_nodeagent::api::{router, AppState};
use stratus_nodeagent::config::{AgentConfig, Hypervisor};
use stratus_nodeagent::images::Images;
use stratus_nodeagent::metrics::Metrics;
use stratus_nodeagent::vms::VmManager;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Runs this host's VMs for the Stratus orchestrator.
#[derive(Parser, Debug)]
#[command(name = "stratus-nodeagent", version)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(short, long, default_value = "/etc/stratus/nodeagent.toml")]
    config: PathBuf,
    /// Check the configuration (and the token file), print it with its defaults, and exit.
    #[arg(long)]
    check_config: bool,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Allow `hypervisor = "none"` (benchmarks of the control plane: VMs are recorded and
    /// reported, never started).
    #[arg(long)]
    allow_no_vm_hypervisor: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stratus-nodeagent: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = AgentConfig::load(&cli.config)?;
    let token = config.read_token()?;
    let tls = config
        .tls
        .as_ref()
        .map(stratus_nodeagent::tls::server_config)
        .transpose()?;
    if config.hypervisor == Hypervisor::None {
        anyhow::ensure!(
            cli.allow_no_vm_hypervisor,
            "hypervisor = \"none\" starts no VMs (it is for benchmarks of the control plane); \
             run with --allow-no-vm-hypervisor if that is what you want"
        );
        tracing::warn!("hypervisor \"none\": VMs are recorded and reported but never started");
    }
    if cli.check_config {
        print!(
            "{}",
            toml::to_string(&config).context("cannot print the configuration")?
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(serve(Arc::new(config), token, tls))
}

async fn serve(
    config: Arc<AgentConfig>,
    token: String,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let vms = VmManager::recover(config.clone(), metrics.clone()).await?;
    let images = Arc::new(Images::new(vms.image_cache(), &config.image_cache_dir()));
    let state = Arc::new(AppState {
        images,
        marketplace_endpoint: config.marketplace_endpoint.clone(),
        vms,
        token,
        shutdown_timeout: Duration::from_secs(config.shutdown_timeout_s),
        metrics,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let app = router(state);
    match tls {
        None => {
            tracing::info!("listening on http://{}", config.listen);
            axum::serve(listener, app)
                .with_graceful_shutdown(stop_signal())
                .await
                .context("the API server failed")?;
        }
        Some(tls) => {
            tracing::info!("listening on https://{}", config.listen);
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                stop_signal().await;
                stopper.graceful_shutdown(Some(Duration::from_secs(10)));
            });
            let listener = listener
                .into_std()
                .context("cannot hand the listening socket to the TLS server")?;
            axum_server::from_tcp_rustls(listener, RustlsConfig::from_config(tls))
                .context("cannot serve TLS on the listening socket")?
                .handle(handle)
                .serve(app.into_make_service())
                .await
                .context("the API server failed")?;
        }
    }
    // The VMs go on: each VMM is in a process group of its own, and the next start of the
    // agent adopts them.
    tracing::info!("stopping; the VMs keep running");
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
