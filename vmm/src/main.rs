//! stratus-vmm: one process per VM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use stratus_vmm::config::{parse_disk, parse_net, ConsoleConfig, VmConfig};
use stratus_vmm::{Vm, VmResources};

/// Boot a Linux kernel directly on KVM with virtio-pci devices.
#[derive(Parser, Debug)]
#[command(name = "stratus-vmm", version)]
struct Cli {
    /// JSON VM configuration (same fields as the flags); excludes the other VM flags.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory", "disk", "net", "console"])]
    config: Option<PathBuf>,
    /// Kernel: uncompressed ELF vmlinux or bzImage.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// virtio-blk disk: path=FILE[,ro=on|off][,serial=ID]; repeat for more disks.
    #[arg(long)]
    disk: Vec<String>,
    /// virtio-net NIC on a TAP device: tap=NAME,mac=02:00:…; repeat for more NICs.
    #[arg(long)]
    net: Vec<String>,
    /// Serial console: stdout, off, or a file to append to.
    #[arg(long, default_value = "stdout")]
    console: String,
}

fn config_from_cli(cli: Cli) -> anyhow::Result<VmConfig> {
    if let Some(path) = cli.config {
        return Ok(VmConfig::from_json_file(&path)?);
    }
    let disks = cli
        .disk
        .iter()
        .map(|spec| parse_disk(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let nets = cli
        .net
        .iter()
        .map(|spec| parse_net(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let config = VmConfig {
        kernel: cli.kernel.context("--kernel is required")?,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        cpus: cli.cpus,
        memory_mib: cli.memory,
        disks,
        nets,
        console: cli.console.parse::<ConsoleConfig>()?,
    };
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let start = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = config_from_cli(cli)
        .and_then(|config| Ok(VmResources::from_config(&config)?))
        .and_then(|resources| Ok(Vm::build(resources, start)?));
    let vm = match result {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("stratus-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    let reason = vm.run();
    let code = reason.exit_code();
    eprintln!("stratus-vmm: {reason}");
    ExitCode::from(code as u8)
}
