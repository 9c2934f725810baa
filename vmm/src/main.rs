//! stratus-vmm: one process per VM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use stratus_vmm::api::{ApiServer, ApiSocket, ApiState};
use stratus_vmm::config::{parse_disk, parse_net, ConsoleConfig, VmConfig};
use stratus_vmm::exit::{ExitReason, ExitSignal, ExitStatusFile};
use stratus_vmm::{seccomp, Vm, VmResources};

/// Boot a Linux kernel directly on KVM with virtio-pci devices.
#[derive(Parser, Debug)]
#[command(name = "stratus-vmm", version)]
struct Cli {
    /// JSON VM configuration (same fields as the flags); excludes the other VM flags.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory", "disk", "net", "console", "api_socket", "pci_slots"])]
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
    /// virtio-blk disk: path=FILE[,id=NAME][,format=raw|qcow2][,ro=on|off][,serial=ID]
    /// [,cache=writeback|none][,engine=io_uring|sync][,bps=N][,iops=N]; repeat for more disks.
    #[arg(long)]
    disk: Vec<String>,
    /// virtio-net NIC on a TAP device: tap=NAME,mac=02:00:…[,id=NAME][,fd=N][,bps=N][,pps=N];
    /// repeat for more NICs.
    #[arg(long)]
    net: Vec<String>,
    /// Serial console: stdout, off, or file=PATH[,max=BYTES] (a capped log, rotated once
    /// to PATH.1; 8 MiB by default).
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Serve the control API (HTTP/JSON: GET /vm, PUT /vm/actions, GET /vm/counters,
    /// GET /vm/console, PUT /vm/disks, PATCH|DELETE /vm/disks/ID, PUT /vm/nets,
    /// PATCH|DELETE /vm/nets/ID) on this Unix socket; removed on exit.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// On exit, write the exit code and reason here as JSON (`{"code": N, "reason": …}`),
    /// for a supervisor that cannot wait for this process. Allowed with --config.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// PCI slots kept free for disks and NICs hot-plugged through the API.
    #[arg(long, default_value_t = stratus_vmm::device_manager::DEFAULT_SPARE_SLOTS)]
    pci_slots: u8,
    /// What a thread's forbidden system call does: kill the VMM (SIGSYS), only log it
    /// (kernel log), or no filters at all. Allowed with --config.
    #[arg(long, value_enum, default_value_t = seccomp::Mode::Kill)]
    seccomp: seccomp::Mode,
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
        api_socket: cli.api_socket,
        pci_slots: cli.pci_slots,
    };
    config.validate()?;
    Ok(config)
}

/// How long the answers still being written (the stop request's own) may delay the exit.
const API_GRACE: Duration = Duration::from_secs(2);

/// Everything before the guest runs; any error here is a configuration error (status 1).
fn prepare(cli: Cli, start: Instant) -> anyhow::Result<(Vm, Option<ApiServer>)> {
    let config = config_from_cli(cli)?;
    // Bound before the VM is built: a second VMM started for the same socket gives up
    // before touching KVM or the disks. Clients that connect meanwhile wait in the backlog.
    let socket = config
        .api_socket
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()?;
    let resources = VmResources::from_config(&config)?;
    let vm = Vm::build(resources, start)?;
    let server = socket
        .map(|socket| socket.serve(ApiState::new(&config, &vm)))
        .transpose()?;
    Ok((vm, server))
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
    // Before any thread exists: every thread confines itself as it starts.
    seccomp::set_mode(cli.seccomp);
    let status_file = cli.status_file.clone();
    let finish = |code: i32, reason: &str| {
        if let Some(path) = &status_file {
            let status = ExitStatusFile {
                code,
                reason: reason.to_owned(),
            };
            if let Err(e) = status.write(path) {
                eprintln!("stratus-vmm: cannot write {}: {e}", path.display());
            }
        }
        ExitCode::from(code as u8)
    };
    raise_file_limit();
    // Blocked before any thread exists, so every thread inherits the mask and the signals
    // wait for the thread that turns them into an orderly stop.
    let stop_signals = block_stop_signals();
    let (vm, api) = match prepare(cli, start) {
        Ok(ready) => ready,
        Err(e) => {
            eprintln!("stratus-vmm: error: {e}");
            return finish(1, &format!("error: {e}"));
        }
    };
    spawn_stop_on_signal(stop_signals, vm.exit_signal());
    // Set-up is done; from here on the guest drives the VMM.
    if let Err(e) = seccomp::confine(seccomp::ThreadKind::Main) {
        eprintln!("stratus-vmm: error: {e}");
        return finish(1, &format!("error: {e}"));
    }
    let reason = vm.run();
    if let Some(api) = api {
        api.shutdown(API_GRACE);
    }
    eprintln!("stratus-vmm: {reason}");
    finish(reason.exit_code(), &reason.to_string())
}

/// Disks, NICs, io_uring rings, eventfds and API connections all take descriptors: take
/// the hard limit the host allows rather than the default soft one.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct given, which lives for the call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// SIGTERM and SIGINT, blocked in the calling thread (and in threads it creates later).
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// A stop signal ends the VM the way an API stop does: vCPUs stopped, devices dropped in
/// order (so a qcow2 disk writes its metadata), exit status 6.
fn spawn_stop_on_signal(set: libc::sigset_t, exit: ExitSignal) {
    let spawned = std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            seccomp::confine_or_abort(seccomp::ThreadKind::Signals);
            let mut signal = 0;
            // SAFETY: `set` is an initialised signal set and `signal` a valid out pointer;
            // the signals in it are blocked in every thread, so sigwait receives them.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                eprintln!("stratus-vmm: signal {signal} received, stopping the VM");
                exit.request(ExitReason::Stopped);
            }
        });
    if let Err(e) = spawned {
        eprintln!("stratus-vmm: warning: cannot watch for SIGTERM/SIGINT: {e}");
    }
}
