//! `stratus-orchestrator`: the cloud's entry point (`serve`), and the admin's commands on
//! its database (users, nodes).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stratus_orchestrator::api::types::NodeAdd;
use stratus_orchestrator::config::Config;
use stratus_orchestrator::db::Db;
use stratus_orchestrator::users::{self, Role, Secret};
use stratus_orchestrator::{api, jobs, networks, nodes, Cloud};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The Stratus cloud's orchestrator.
#[derive(Parser, Debug)]
#[command(name = "stratus-orchestrator", version)]
struct Cli {
    /// The configuration file (TOML); without it, every default.
    #[arg(short, long, default_value = "/etc/stratus/orchestrator.toml")]
    config: PathBuf,
    /// Check the configuration, print it with its defaults, and exit.
    #[arg(long)]
    check_config: bool,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the API and work the cloud's jobs (the default).
    Serve,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage pdisk's storage.
    #[command(subcommand)]
    Pdisk(PdiskCommand),
}

#[derive(Subcommand, Debug)]
enum PdiskCommand {
    /// Delete the image ORIGINs (`root_volumes`) that no VM root or other volume needs;
    /// the next VM of such an image fetches it again.
    EvictOrigins,
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add a user; the password is read from --password-file or the first line of stdin,
    /// unless --password-hash gives the hash the user made with stratus-hash-password.
    Add {
        name: String,
        #[arg(long)]
        admin: bool,
        #[arg(long, conflicts_with = "password_hash")]
        password_file: Option<PathBuf>,
        /// The line stratus-hash-password printed for the user (or a StratusLab bcrypt hash).
        #[arg(long, value_name = "HASH")]
        password_hash: Option<String>,
    },
    /// Set a user's password (from --password-file or the first line of stdin, or
    /// --password-hash).
    Passwd {
        name: String,
        #[arg(long, conflicts_with = "password_hash")]
        password_file: Option<PathBuf>,
        /// The line stratus-hash-password printed for the user (or a StratusLab bcrypt hash).
        #[arg(long, value_name = "HASH")]
        password_hash: Option<String>,
    },
    /// Delete a user who holds no VMs.
    Del { name: String },
    /// List users.
    List,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Register a node agent by its URL.
    Add {
        url: String,
        /// The file holding the agent's bearer token.
        #[arg(long)]
        token_file: PathBuf,
        /// Default: the URL's host.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a node that holds no VMs.
    Remove { name: String },
    /// List nodes.
    List,
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
            eprintln!("stratus-orchestrator: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = if cli.config.exists() {
        Config::load(&cli.config)?
    } else {
        anyhow::ensure!(
            cli.config == Path::new("/etc/stratus/orchestrator.toml"),
            "no config file {}",
            cli.config.display()
        );
        Config::default()
    };
    if cli.check_config {
        config.server_tls()?;
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
    runtime.block_on(async move {
        let db = Db::open(&config.database)
            .await
            .with_context(|| format!("database {}", config.database))?;
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(db, config).await,
            Command::User(c) => user_command(&db, c).await,
            Command::Node(c) => node_command(&db, c).await,
            Command::Pdisk(PdiskCommand::EvictOrigins) => {
                let mut cloud = Cloud::new(db, Arc::new(config.clone()), None)?;
                cloud.volumes = stratus_orchestrator::pdisk::Storage::open(&config)?;
                anyhow::ensure!(cloud.volumes.is_some(), "this cloud has no volume storage");
                for uuid in stratus_orchestrator::pdisk::roots::evict_unused(&cloud).await? {
                    println!("evicted {uuid}");
                }
                Ok(())
            }
        }
    })
}

fn read_secret(file: Option<&Path>, what: &str) -> anyhow::Result<String> {
    let text = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the {what} from {}", f.display()))?,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .with_context(|| format!("cannot read the {what} from stdin"))?;
            line
        }
    };
    let secret = text.lines().next().unwrap_or("").to_owned();
    anyhow::ensure!(!secret.is_empty(), "the {what} is empty");
    Ok(secret)
}

/// The hash if one was given, else the password read from the file or standard input.
fn given_secret(password_file: Option<&Path>, hash: Option<String>) -> anyhow::Result<Secret> {
    Ok(match hash {
        Some(hash) => Secret::Hash(hash),
        None => Secret::Password(read_secret(password_file, "password")?),
    })
}

async fn user_command(db: &Db, command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add {
            name,
            admin,
            password_file,
            password_hash,
        } => {
            let secret = given_secret(password_file.as_deref(), password_hash)?;
            let role = if admin { Role::Admin } else { Role::User };
            users::add(db, &name, secret, role).await?;
            println!("added user {name} ({})", role.stratuslab_name());
        }
        UserCommand::Passwd {
            name,
            password_file,
            password_hash,
        } => {
            let secret = given_secret(password_file.as_deref(), password_hash)?;
            users::set_password(db, &name, secret).await?;
            println!("password of {name} changed");
        }
        UserCommand::Del { name } => {
            users::delete(db, &name).await?;
            println!("deleted user {name}");
        }
        UserCommand::List => {
            for u in users::list(db).await? {
                println!("{}\t{}", u.name, u.role.stratuslab_name());
            }
        }
    }
    Ok(())
}

async fn node_command(db: &Db, command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::Add {
            url,
            token_file,
            name,
        } => {
            let token = read_secret(Some(&token_file), "node agent token")?;
            let name = match name {
                Some(n) => n,
                None => reqwest::Url::parse(&url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .with_context(|| format!("'{url}' is not a URL"))?,
            };
            nodes::add(
                db,
                &NodeAdd {
                    name: name.clone(),
                    url,
                    token,
                },
            )
            .await?;
            println!("added node {name}");
        }
        NodeCommand::Remove { name } => {
            nodes::remove(db, &name).await?;
            println!("removed node {name}");
        }
        NodeCommand::List => {
            println!("ID NAME RVM TCPU FCPU ACPU TMEM FMEM AMEM STAT");
            for n in nodes::views(db).await? {
                println!(
                    "{} {} {} {} {} {} {} {} {} {}",
                    n.id,
                    n.name,
                    n.running_vms,
                    n.cpu_total,
                    n.cpu_free,
                    n.cpu_allocated,
                    n.memory_total_mib,
                    n.memory_free_mib,
                    n.memory_allocated_mib,
                    if n.health == "up" {
                        n.state.as_str()
                    } else {
                        n.health.as_str()
                    }
                );
            }
        }
    }
    Ok(())
}

async fn serve(db: Db, config: Config) -> anyhow::Result<()> {
    networks::sync(&db, &config.networks)
        .await
        .context("cannot record the configured networks")?;
    let admin_password = match &config.admin_password_file {
        Some(f) => Some(read_secret(Some(f), "admin password")?),
        None => None,
    };
    if let Some(generated) = users::ensure_admin(&db, admin_password).await? {
        // Shown once: the database keeps only its hash.
        eprintln!("stratus-orchestrator: created user 'admin' with password: {generated}");
    }
    let policy = match &config.image_policy {
        Some(p) => Some(
            stratus_images::policy::Policy::load(p)
                .with_context(|| format!("image policy {}", p.display()))?,
        ),
        None => None,
    };
    let listen = config.listen;
    // Checked before anything starts: a bad certificate or key stops the orchestrator.
    let tls = config.server_tls()?;
    let volumes = stratus_orchestrator::pdisk::Storage::open(&config)?;
    let mut cloud = Cloud::new(db, Arc::new(config), policy)?;
    cloud.volumes = volumes;
    let cloud = Arc::new(cloud);
    stratus_orchestrator::pdisk::recover(&cloud)
        .await
        .context("cannot finish the volume changes a previous run left")?;
    stratus_orchestrator::pdisk::reexport(&cloud)
        .await
        .context("cannot export the iSCSI volumes")?;
    tokio::spawn(stratus_orchestrator::pdisk::keep_exported(cloud.clone()));
    tokio::spawn(stratus_orchestrator::pdisk::keep_recovering(cloud.clone()));
    if cloud.volumes.is_some() {
        tokio::spawn(stratus_orchestrator::pdisk::roots::collector(cloud.clone()));
    }
    jobs::start_workers(&cloud);
    tokio::spawn(nodes::poller(cloud.clone()));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let app = api::router(cloud.clone());
    match tls {
        None => {
            tracing::info!(replica = %cloud.replica, "listening on http://{listen}");
            axum::serve(listener, app)
                .with_graceful_shutdown(stop_signal())
                .await
                .context("the API server failed")?;
        }
        Some(tls) => {
            tracing::info!(replica = %cloud.replica, "listening on https://{listen}");
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                stop_signal().await;
                stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            });
            let listener = listener
                .into_std()
                .context("cannot hand the listening socket to the TLS server")?;
            axum_server::from_tcp_rustls(
                listener,
                axum_server::tls_rustls::RustlsConfig::from_config(tls),
            )
            .context("cannot serve TLS on the listening socket")?
            .handle(handle)
            .serve(app.into_make_service())
            .await
            .context("the API server failed")?;
        }
    }
    tracing::info!("stopping; unfinished jobs are taken up by the next start or another replica");
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
