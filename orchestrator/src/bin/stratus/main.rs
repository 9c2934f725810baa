//! `stratus`: the StratusLab user's command line. `stratus run-instance …` and
//! `stratus-run-instance …` (a link named so) are the same command; every StratusLab user
//! command has its name. Errors print `  [ERROR] <message>` and exit 1.

mod client;
mod config;
mod images;
mod instances;
mod local;
mod nodes;
mod output;
mod session;
mod volumes;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};

/// Options every command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// More output (repeat for more: -vvv).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less output (-q prints only identifiers).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub quiet: u8,
    /// The configuration file (default ~/.stratuslab/stratuslab-user.cfg).
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The configuration section laid over [default].
    #[arg(
        short = 'S',
        long = "user-config-section",
        global = true,
        value_name = "SECTION"
    )]
    pub section: Option<String>,
    /// Your user name on the cloud.
    #[arg(short, long, global = true)]
    pub username: Option<String>,
    /// Your password (asked for when only the user name is given).
    #[arg(short, long, global = true)]
    pub password: Option<String>,
    /// The orchestrator's URL.
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint: Option<String>,
    /// The persistent disk service's URL.
    #[arg(long, global = true, value_name = "URL")]
    pub pdisk_endpoint: Option<String>,
    /// The Marketplace's URL.
    #[arg(long, global = true, value_name = "URL")]
    pub marketplace_endpoint: Option<String>,
    /// File holding the Marketplace's upload token (for uploading and deprecating entries).
    #[arg(long, global = true, value_name = "FILE")]
    pub marketplace_token_file: Option<PathBuf>,
    /// Seconds to wait for a service (default 5).
    #[arg(long, global = true, value_name = "SECONDS")]
    pub endpoint_timeout: Option<String>,
    /// PEM bundle of the CA(s) that sign the cloud endpoint's certificate, for a site with
    /// its own CA (default: the system's trusted roots).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Your certificate (PEM) for signing metadata.
    #[arg(long = "pem-cert", global = true, value_name = "FILE")]
    pub pem_cert: Option<PathBuf>,
    /// Your private key (PEM) for signing metadata.
    #[arg(long = "pem-key", global = true, value_name = "FILE")]
    pub pem_key: Option<PathBuf>,
    /// Machine-readable output (JSON with stable field names) instead of StratusLab's text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The Stratus cloud's command line (StratusLab's `stratus-*` commands).
#[derive(Parser, Debug)]
// Long options may be shortened while they stay unambiguous, as StratusLab's optparse
// allowed (its own guide types `--list-type`).
#[command(
    name = "stratus",
    version,
    propagate_version = true,
    infer_long_args = true
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest command's options costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start machines from a Marketplace image.
    RunInstance(instances::RunArgs),
    /// Show your machines (all of them, or those given).
    DescribeInstance(instances::DescribeArgs),
    /// Stop machines at once ("pull the plug") and release their resources.
    KillInstance(instances::StopArgs),
    /// Ask machines to power off cleanly (hard stop after the cloud's timeout).
    ShutdownInstance(instances::ShutdownArgs),
    /// Log into a machine with SSH (as root, with your key), or run a command on it.
    ConnectInstance(instances::ConnectArgs),
    /// List the Marketplace's images.
    ListImages(images::ListArgs),
    /// Search the Marketplace's images by free text.
    SearchImage(images::SearchArgs),
    /// Show one Marketplace entry.
    ShowImage(images::ShowArgs),
    /// Describe an image file as a Marketplace entry (unsigned).
    BuildMetadata(images::BuildArgs),
    /// Sign a Marketplace entry with your certificate.
    SignMetadata(images::SignArgs),
    /// Check a signed Marketplace entry (rules, signature, endorser).
    ValidateMetadata(images::ValidateArgs),
    /// Upload signed entries to the Marketplace.
    UploadMetadata(images::UploadArgs),
    /// Deprecate an image with a newer signed entry saying why.
    DeprecateMetadata(images::DeprecateArgs),
    /// Create a persistent volume.
    CreateVolume(volumes::CreateArgs),
    /// Show persistent volumes, where they are attached and since when.
    DescribeVolumes(volumes::DescribeArgs),
    /// Change a volume's tag, visibility or type.
    UpdateVolume(volumes::UpdateArgs),
    /// Delete volumes and their data.
    DeleteVolume(volumes::DeleteArgs),
    /// Hot-plug volumes into a running machine.
    AttachVolume(volumes::MountArgs),
    /// Unplug hot-plugged volumes from a running machine.
    DetachVolume(volumes::MountArgs),
    /// Turn `mime,file` pairs into a cloud-init context file for --context-file.
    PrepareContext(local::PrepareContextArgs),
    /// Write a commented reference configuration file.
    CopyConfig(local::CopyConfigArgs),
    /// Hash a password the way the cloud stores it (for administrators).
    HashPassword(local::HashPasswordArgs),
    /// Show the cloud's nodes with their capacity and load (administrators).
    DescribeNodes,
    /// Show the cloud's users and their quotas (administrators).
    ListUsers,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// Write a man page for every command into a directory.
    Man { dir: PathBuf },
    /// Make `stratus-<command>` links to this program for every command, in a directory.
    InstallLinks { dir: PathBuf },
    #[command(flatten)]
    NotYet(NotYet),
}

/// StratusLab commands that Stratus does not do yet: they say so and fail.
#[derive(Subcommand, Debug)]
pub enum NotYet {
    /// Not available in Stratus yet: start a batch cluster.
    RunCluster(Ignored),
    /// Not available in Stratus yet: save a modified machine as a new image.
    CreateImage(Ignored),
    /// Not available in Stratus yet: upload an image file to the cloud's storage.
    UploadImage(Ignored),
}

#[derive(Args, Debug)]
pub struct Ignored {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

impl NotYet {
    fn what(&self) -> &'static str {
        match self {
            NotYet::RunCluster(_) => "running clusters",
            NotYet::CreateImage(_) => "saving machines as images",
            NotYet::UploadImage(_) => "uploading images to the cloud's storage",
        }
    }
}

/// Every command a `stratus-<name>` link may stand for.
pub fn command_names() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .filter(|n| !matches!(n.as_str(), "completion" | "man" | "install-links" | "help"))
        .collect()
}

/// `stratus-run-instance ARGS` → `stratus run-instance ARGS`.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("stratus")
        .to_owned();
    if let Some(command) = called.strip_prefix("stratus-") {
        if command_names().iter().any(|n| n == command) {
            args.splice(0..1, ["stratus".into(), command.into()]);
        }
    }
    args
}

fn main() -> ExitCode {
    let args = arguments();
    let called_as = args
        .get(1)
        .and_then(|a| a.to_str())
        .map(|c| format!("stratus-{c}"))
        .unwrap_or_else(|| "stratus".into());
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        // --help and --version are printed as clap has them; a usage error is an
        // `[ERROR]` line like every other failure, with clap's usage hints below it.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let text = rendered.strip_prefix("error: ").unwrap_or(&rendered);
            let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
            eprintln!("  [ERROR] {first}");
            if !rest.trim().is_empty() {
                eprintln!("{}", rest.trim_end());
            }
            return ExitCode::from(1);
        }
    };
    let level = match cli.common.verbose {
        // A failure is one `[ERROR]` line with its whole chain of causes: libraries' own
        // error logs (rustls' verifier on an untrusted certificate) would say it twice.
        0 => "off",
        1 => "warn",
        2 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .without_time()
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain, so the cause an operator needs (refused connection, missing
            // file) is on the line.
            eprintln!("  [ERROR] {e:#}");
            tracing::debug!(command = %called_as, "failed");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let common = cli.common;
    match cli.command {
        Command::RunInstance(a) => instances::run_instance(&common, a),
        Command::DescribeInstance(a) => instances::describe(&common, a),
        Command::KillInstance(a) => instances::stop(&common, a, instances::Stop::Kill),
        Command::ShutdownInstance(a) => instances::shutdown(&common, a),
        Command::ConnectInstance(a) => instances::connect(&common, a),
        Command::ListImages(a) => images::list(&common, a),
        Command::SearchImage(a) => images::search(&common, a),
        Command::ShowImage(a) => images::show(&common, a),
        Command::BuildMetadata(a) => images::build(&common, a),
        Command::SignMetadata(a) => images::sign(&common, a),
        Command::ValidateMetadata(a) => images::validate(&common, a),
        Command::UploadMetadata(a) => images::upload(&common, a),
        Command::DeprecateMetadata(a) => images::deprecate(&common, a),
        Command::CreateVolume(a) => volumes::create(&common, a),
        Command::DescribeVolumes(a) => volumes::describe(&common, a),
        Command::UpdateVolume(a) => volumes::update(&common, a),
        Command::DeleteVolume(a) => volumes::delete(&common, a),
        Command::AttachVolume(a) => volumes::attach(&common, a, true),
        Command::DetachVolume(a) => volumes::attach(&common, a, false),
        Command::PrepareContext(a) => local::prepare_context(&common, a),
        Command::CopyConfig(a) => local::copy_config(&common, a),
        Command::HashPassword(a) => local::hash_password(&common, a),
        Command::DescribeNodes => nodes::describe_nodes(&common),
        Command::ListUsers => nodes::list_users(&common),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "stratus",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => local::man_pages(&dir),
        Command::InstallLinks { dir } => local::install_links(&dir),
        Command::NotYet(what) => {
            anyhow::bail!("{} is not available in Stratus yet", what.what())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_stratuslab_user_command_has_its_name() {
        let names = command_names();
        for c in [
            "run-instance",
            "run-cluster",
            "describe-instance",
            "connect-instance",
            "kill-instance",
            "shutdown-instance",
            "create-volume",
            "delete-volume",
            "describe-volumes",
            "attach-volume",
            "detach-volume",
            "update-volume",
            "upload-image",
            "create-image",
            "build-metadata",
            "sign-metadata",
            "validate-metadata",
            "upload-metadata",
            "deprecate-metadata",
            "list-images",
            "show-image",
            "search-image",
            "prepare-context",
            "copy-config",
            "hash-password",
        ] {
            assert!(names.iter().any(|n| n == c), "{c} missing from {names:?}");
        }
    }
}
