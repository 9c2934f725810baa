//! run-instance, describe-instance, kill-instance, shutdown-instance, connect-instance.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use stratus_contextualizer::{parse_context_arg, parse_context_file};
use stratus_orchestrator::api::types::{
    InstanceType, RunRequest, VmAccepted, VmList, VmState, VmView,
};

use crate::config::Source;
use crate::output::{batch_exit, print_json};
use crate::session::Session;
use crate::Common;

/// StratusLab's default type, marked `*` by `--list-types`.
const DEFAULT_TYPE: &str = "m1.small";

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The image: its 27-character Marketplace identifier.
    #[arg(required_unless_present = "list_types")]
    pub image: Option<String>,
    /// The SSH public key put into the machine (default ~/.ssh/id_rsa.pub).
    #[arg(short, long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The instance type.
    #[arg(short = 't', long = "type", value_name = "TYPE")]
    pub instance_type: Option<String>,
    /// List the instance types (the selected one marked with *).
    #[arg(short = 'l', long)]
    pub list_types: bool,
    /// vCPUs, instead of the type's.
    #[arg(long)]
    pub cpu: Option<u8>,
    /// Memory in MiB, instead of the type's.
    #[arg(long, value_name = "MiB")]
    pub ram: Option<u64>,
    /// Swap in MiB, instead of the type's.
    #[arg(long, value_name = "MiB")]
    pub swap: Option<u64>,
    /// Context pairs: 'KEY=VALUE#KEY2=VALUE2'.
    #[arg(long, value_name = "PAIRS")]
    pub context: Vec<String>,
    /// A file of KEY=VALUE lines (as stratus-prepare-context writes).
    #[arg(long, value_name = "FILE")]
    pub context_file: Option<PathBuf>,
    /// one (HEPiX CD, default), cloud-init or nocloud.
    #[arg(long, value_name = "METHOD")]
    pub context_method: Option<String>,
    /// cloud-init parts 'mime,file#mime,file' ("" = your SSH key only).
    #[arg(long, value_name = "PAIRS")]
    pub cloud_init: Option<String>,
    /// A requirement on the node, e.g. 'cpu_free >= 4'.
    #[arg(long, value_name = "EXPR")]
    pub vm_requirements: Option<String>,
    /// How many machines.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub number: u32,
    /// An address on the local network instead of the public one.
    #[arg(long, conflicts_with = "private_ip")]
    pub local_ip: bool,
    /// An address on the private network instead of the public one.
    #[arg(long)]
    pub private_ip: bool,
    /// This address (on the chosen network).
    #[arg(long, value_name = "IP")]
    pub address: Option<Ipv4Addr>,
    /// A volatile disk of this many GiB.
    #[arg(long, value_name = "GiB")]
    pub volatile_disk: Option<u64>,
    /// A Marketplace image attached read-only (repeatable).
    #[arg(long, value_name = "MARKETPLACE_ID")]
    pub readonly_disk: Vec<String>,
    /// A persistent volume attached at boot.
    #[arg(long, value_name = "UUID")]
    pub persistent_disk: Vec<String>,
    /// The machine's name (default one-<id>).
    #[arg(long, value_name = "NAME")]
    pub vm_name: Option<String>,
    /// Also write 'ID, IP' lines to this file (for kill-instance -i).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Wait until the machines run (at most 600 seconds, or as many as --wait=SECONDS says).
    // Only with '=': `--wait IMAGE` would take the image for the seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "600"
    )]
    pub wait: Option<u64>,
    /// Save the machine as a new image when it stops (not available in Stratus yet).
    #[arg(long)]
    pub save: bool,
    /// A VNC console port (Stratus machines have a serial console instead).
    #[arg(long, value_name = "PORT")]
    pub vnc_port: Option<u16>,
    /// The VNC console's listen address (see --vnc-port).
    #[arg(long, value_name = "IP")]
    pub vnc_listen: Option<String>,
    /// What --save would put in the new image's metadata: taken so that StratusLab's
    /// --save command lines reach the --save refusal, not an unknown-option error.
    #[arg(long, hide = true, requires = "save")]
    pub author: Option<String>,
    #[arg(long, hide = true, requires = "save")]
    pub author_email: Option<String>,
    #[arg(long, hide = true, requires = "save")]
    pub image_version: Option<String>,
    #[arg(long, hide = true, requires = "save")]
    pub title: Option<String>,
    #[arg(long, hide = true, requires = "save")]
    pub comment: Option<String>,
    /// StratusLab's switch for images given by URL, which Stratus does not take: Marketplace
    /// images are always looked up by the cloud. Taken so that scripts keep working.
    #[arg(long, hide = true)]
    pub no_check_image_url: bool,
    /// StratusLab's switch for qcow2 images: Stratus reads the format from the image.
    #[arg(long, hide = true)]
    pub qcow_disk_format: bool,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// Machine ids (default: all of yours that have not ended).
    pub ids: Vec<String>,
    /// StratusLab's "addresses, no reverse DNS": Stratus always shows addresses.
    #[arg(short = 'n', hide = true)]
    pub numeric: bool,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// Machine ids.
    #[arg(required_unless_present = "input")]
    pub ids: Vec<String>,
    /// Read the ids from a file ('ID' or 'ID, IP' per line, as run-instance -o writes).
    #[arg(short = 'i', long = "input", value_name = "FILE")]
    pub input: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ShutdownArgs {
    #[command(flatten)]
    pub stop: StopArgs,
    /// Save the machine's disk as a new image (not available in Stratus yet).
    #[arg(long)]
    pub save: bool,
}

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// The machine's id.
    pub id: String,
    /// A command to run instead of an interactive shell.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// The SSH public key whose private key logs in (default: as run-instance).
    #[arg(short, long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

pub fn vm_id(text: &str) -> anyhow::Result<i64> {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .with_context(|| format!("'{text}' is not a machine id (a positive number)"))
}

/// The first address of a machine, with its network.
fn first_address(vm: &VmView) -> Option<(&str, Ipv4Addr)> {
    vm.leases.first().map(|l| (l.network.as_str(), l.ip))
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn list_types(session: &Session, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let mut types: Vec<InstanceType> = session.cloud()?.get("/types")?;
    // The user's own types, as run-instance takes them: before the cloud's of that name.
    for (name, (cpu, ram_mib, swap_mib)) in session.file.instance_types()? {
        types.retain(|t| t.name != name);
        types.push(InstanceType {
            name,
            cpu,
            ram_mib,
            swap_mib,
        });
    }
    types.sort_by(|a, b| a.name.cmp(&b.name));
    if session.common.json {
        print_json(&types)?;
        return Ok(ExitCode::SUCCESS);
    }
    let selected = args.instance_type.as_deref().unwrap_or(DEFAULT_TYPE);
    let mut out = String::from("  Type             CPU       RAM      SWAP\n");
    for t in &types {
        let mark = if t.name == selected { '*' } else { ' ' };
        out.push_str(&format!(
            "{mark} {:<15} {} CPU {:>7} MB {:>7} MB\n",
            t.name, t.cpu, t.ram_mib, t.swap_mib
        ));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// The run request, checked and assembled before anything is sent.
fn run_request(session: &Session, args: &RunArgs) -> anyhow::Result<RunRequest> {
    let image = args.image.as_deref().unwrap_or_default().trim();
    let is_identifier = image.len() == 27
        && image
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !is_identifier {
        if image.contains("://") {
            bail!(
                "images by URL are not available in Stratus yet: publish the image's metadata \
                 in the Marketplace and give its identifier"
            );
        }
        if image.len() == 36 && image.bytes().filter(|b| *b == b'-').count() == 4 {
            bail!("booting from a persistent volume ({image}) is not available in Stratus yet");
        }
        bail!("'{image}' is not a Marketplace image identifier (27 characters: A-Z a-z 0-9 _ -)");
    }
    if args.save {
        bail!("saving machines as images (--save) is not available in Stratus yet");
    }
    if args.vnc_port.is_some() || args.vnc_listen.is_some() {
        bail!(
            "Stratus machines have no VNC console: their serial console is shown by \
             the web console and GET /vms/<id>/console"
        );
    }
    if args.number == 0 || args.number > 100 {
        bail!("-n/--number must be between 1 and 100");
    }
    if args.number > 1 && !args.persistent_disk.is_empty() {
        bail!(
            "a persistent disk is attached to one VM: it cannot be used with -n/--number above 1"
        );
    }
    if args.number > 1 && args.address.is_some() {
        bail!("--address gives one address: it cannot be used with -n/--number above 1");
    }
    // Keys are merged as the guest sees them, upper-cased: a later pair replaces an earlier
    // one of the same name in any case (the file, then each --context, then --cloud-init).
    let mut context: BTreeMap<String, String> = BTreeMap::new();
    let mut merge = |pairs: Vec<(String, String)>| {
        for (key, value) in pairs {
            context.insert(key.to_ascii_uppercase(), value);
        }
    };
    if let Some(file) = &args.context_file {
        let bytes = std::fs::read(file)
            .with_context(|| format!("cannot read the context file {}", file.display()))?;
        merge(parse_context_file(&bytes)?);
    }
    for pairs in &args.context {
        merge(parse_context_arg(pairs)?);
    }
    let (key_file, key_source) = session.public_key_file(args.key.as_deref())?;
    let public_key = match std::fs::read_to_string(&key_file) {
        Ok(text) => Some(text.trim().to_owned()).filter(|k| !k.is_empty()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && key_source == Source::Default => {
            // Said at every verbosity: a machine nobody can log in to is worth a line.
            eprintln!(
                "  [WARNING] no SSH key file {}: the machine gets no key for root",
                key_file.display()
            );
            None
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the SSH key file {}", key_file.display()))
        }
    };
    if let Some(parts) = &args.cloud_init {
        let key = public_key.is_some().then_some(key_file.as_path());
        let prepared = stratus_contextualizer::prepare_context(parts, key)?;
        merge(prepared.pairs());
    }
    // A context file from prepare-context names its method; an explicit option wins.
    let from_context = context.remove("CONTEXT_METHOD");
    let context_method = match &args.context_method {
        Some(m) => Some(m.clone()),
        None => from_context.or(session.setting("default_context_method", None)?),
    };
    if let Some(m) = &context_method {
        m.parse::<stratus_contextualizer::ContextMethod>()?;
    }
    let network = if args.local_ip {
        Some("local".to_owned())
    } else if args.private_ip {
        Some("private".to_owned())
    } else {
        None
    };
    // A type of the user's own (`[instance_types]`) travels as explicit sizes.
    let (mut instance_type, mut cpu, mut ram_mib, mut swap_mib) =
        (args.instance_type.clone(), args.cpu, args.ram, args.swap);
    if let Some(name) = &args.instance_type {
        if let Some((c, r, s)) = session.file.instance_type(name)? {
            instance_type = None;
            cpu = cpu.or(Some(c));
            ram_mib = ram_mib.or(Some(r));
            swap_mib = swap_mib.or(Some(s));
        }
    }
    Ok(RunRequest {
        image: image.to_owned(),
        instance_type,
        cpu,
        ram_mib,
        swap_mib,
        name: args.vm_name.clone(),
        public_key,
        context,
        context_method,
        user_data: None,
        network,
        address: args.address,
        readonly_disks: args.readonly_disk.clone(),
        persistent_disks: args.persistent_disk.clone(),
        volatile_disk_gib: args.volatile_disk,
        requirements: args.vm_requirements.clone(),
    })
}

pub fn run_instance(common: &Common, args: RunArgs) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    if args.list_types {
        return list_types(&session, &args);
    }
    let request = run_request(&session, &args)?;
    let cloud = session.cloud()?;
    let talk = common.quiet == 0 && !common.json;
    let mut started: Vec<VmView> = Vec::new();
    let mut lines = String::new();
    for n in 1..=args.number {
        let accepted: VmAccepted = match cloud.post("/vms", Some(&request)) {
            Ok(a) => a,
            Err(e) => {
                // Those started are still listed, so kill-instance -i can find them.
                if let (Some(path), false) = (&args.output, lines.is_empty()) {
                    let _ = std::fs::write(path, &lines);
                }
                return stopped_part_way(common, &started, e.into());
            }
        };
        // The banner waits for the cloud's first yes, so a refusal is one error line.
        if talk && n == 1 {
            println!(" :::::::::::::::::::::::::");
            println!(" :: Starting machine(s) ::");
            println!(" :::::::::::::::::::::::::");
            let plural = if args.number == 1 { "" } else { "s" };
            println!(" :: Starting {} machine{plural}", args.number);
        }
        let vm = accepted.vm;
        let address = first_address(&vm);
        let ip = address.map(|(_, ip)| ip.to_string()).unwrap_or_default();
        lines.push_str(&format!("{}, {ip}\n", vm.id));
        if talk {
            println!(" :: Machine {n} (vm ID: {})", vm.id);
            match address {
                Some((network, ip)) => println!(" \t{} ip: {ip}", capitalised(network)),
                None => println!(" \tno address"),
            }
        } else if !common.json {
            println!("{}, {ip}", vm.id);
        }
        started.push(vm);
    }
    if let Some(path) = &args.output {
        std::fs::write(path, &lines)
            .with_context(|| format!("cannot write the machine list to {}", path.display()))?;
    }
    if let Some(seconds) = args.wait {
        for at in 0..started.len() {
            match wait_running(&cloud, started[at].id, Duration::from_secs(seconds), talk) {
                Ok(vm) => started[at] = vm,
                Err(e) => return stopped_part_way(common, &started, e),
            }
        }
    }
    if common.json {
        print_json(&started)?;
    } else if talk {
        println!(" :: Done!");
    }
    Ok(ExitCode::SUCCESS)
}

/// A run that failed after starting some machines: with --json they are still printed (as
/// the lines printed so far show them otherwise), for the caller to wait for or kill.
fn stopped_part_way(
    common: &Common,
    started: &[VmView],
    error: anyhow::Error,
) -> anyhow::Result<ExitCode> {
    if common.json && !started.is_empty() {
        print_json(&started)?;
    }
    Err(error)
}

/// Polls a machine until it runs; a machine that fails or ends first is an error.
fn wait_running(
    cloud: &crate::client::Service,
    id: i64,
    limit: Duration,
    talk: bool,
) -> anyhow::Result<VmView> {
    let start = Instant::now();
    let terminal = talk && std::io::stderr().is_terminal();
    let mut last: Option<VmState> = None;
    loop {
        let vm: VmView = cloud.get(&format!("/vms/{id}"))?;
        if terminal && last != Some(vm.state) {
            eprintln!(
                " :: Machine {id}: {} ({} s)",
                vm.state.as_str(),
                start.elapsed().as_secs()
            );
        }
        last = Some(vm.state);
        match vm.state {
            VmState::Running => return Ok(vm),
            s if s.is_final() || s == VmState::Epilog || s == VmState::Shutdown => bail!(
                "machine {id} is {} instead of Running{}",
                s.as_str(),
                vm.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
            _ => {}
        }
        if start.elapsed() > limit {
            bail!(
                "machine {id} is still {} after {} s{}",
                vm.state.as_str(),
                limit.as_secs(),
                vm.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// StratusLab's table: `id state vcpu memory cpu% host/ip name`, columns as wide as
/// their widest cell.
pub fn instance_table(vms: &[VmView]) -> String {
    let rows: Vec<[String; 7]> = vms
        .iter()
        .map(|vm| {
            [
                vm.id.to_string(),
                vm.state.as_str().to_owned(),
                vm.cpu.to_string(),
                // Memory in KiB, as OpenNebula reported it.
                (vm.ram_mib * 1024).to_string(),
                // Guest CPU use is not measured yet.
                "-".to_owned(),
                // A cell is never empty: `awk '{print $7}'` still finds the name.
                first_address(vm)
                    .map(|(_, ip)| ip.to_string())
                    .unwrap_or_else(|| "-".to_owned()),
                vm.name.clone(),
            ]
        })
        .collect();
    crate::output::table(
        ["id", "state", "vcpu", "memory", "cpu%", "host/ip", "name"],
        // StratusLab's header, even with no machine to show.
        [3, 9, 4, 9, 4, 23, 0],
        &rows,
    )
}

/// `-vvv` on one machine: every attribute, then its history.
fn attributes(vm: &VmView) -> String {
    let mut out = String::new();
    let mut field = |k: &str, v: String| out.push_str(&format!("{k:<16}{v}\n"));
    field("id", vm.id.to_string());
    field("name", vm.name.clone());
    field("owner", vm.owner.clone());
    field("state", vm.state.as_str().into());
    field("reason", vm.reason.clone().unwrap_or_default());
    field("type", vm.instance_type.clone());
    field("vcpu", vm.cpu.to_string());
    field("ram_mib", vm.ram_mib.to_string());
    field("swap_mib", vm.swap_mib.to_string());
    field("image", vm.image.clone());
    field("node", vm.node.clone().unwrap_or_default());
    for l in &vm.leases {
        field("address", format!("{} {} ({})", l.ip, l.mac, l.network));
    }
    field("created", vm.created.clone());
    field("updated", vm.updated.clone());
    for e in &vm.history {
        field(
            "history",
            format!(
                "{} {}{}",
                e.at,
                e.state.as_str(),
                e.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        );
    }
    out
}

/// Every VM the caller may see, page after page: the cloud answers with at most a page of
/// them, newest first. A VM made meanwhile shifts the pages: one seen twice counts once.
fn every_vm<E>(mut page_at: impl FnMut(i64) -> Result<VmList, E>) -> Result<Vec<VmView>, E> {
    let mut vms = std::collections::BTreeMap::new();
    let mut offset = 0;
    loop {
        let page = page_at(offset)?;
        let got = page.vms.len() as i64;
        offset += got;
        for vm in page.vms {
            vms.entry(vm.id).or_insert(vm);
        }
        if got == 0 || offset >= page.count {
            return Ok(vms.into_values().collect());
        }
    }
}

pub fn describe(common: &Common, args: DescribeArgs) -> anyhow::Result<ExitCode> {
    let ids: Vec<i64> = args
        .ids
        .iter()
        .map(|t| vm_id(t))
        .collect::<anyhow::Result<_>>()?;
    let session = Session::load(common)?;
    let cloud = session.cloud()?;
    let mut vms: Vec<VmView> = if ids.is_empty() {
        // As StratusLab's (OpenNebula's list): machines that have ended are left out.
        every_vm(|offset| cloud.get(&format!("/vms?offset={offset}&done=false")))?
    } else {
        ids.iter()
            .map(|id| cloud.get(&format!("/vms/{id}")))
            .collect::<Result<_, _>>()?
    };
    vms.sort_by_key(|vm| vm.id);
    if common.json {
        print_json(&vms)?;
    } else if common.verbose >= 3 && vms.len() == 1 {
        print!("{}", attributes(&vms[0]));
    } else if common.quiet > 0 {
        for vm in &vms {
            println!("{} {}", vm.id, vm.state.as_str());
        }
    } else {
        print!("{}", instance_table(&vms));
    }
    Ok(ExitCode::SUCCESS)
}

pub enum Stop {
    Kill,
    Shutdown,
}

fn ids_of(args: &StopArgs) -> anyhow::Result<Vec<i64>> {
    let mut texts: Vec<String> = args.ids.clone();
    if let Some(file) = &args.input {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read machine ids from {}", file.display()))?;
        texts.extend(
            text.lines()
                .map(|l| l.split(',').next().unwrap_or_default().trim().to_owned())
                .filter(|l| !l.is_empty()),
        );
    }
    if texts.is_empty() {
        bail!("no machine id given");
    }
    texts.iter().map(|t| vm_id(t)).collect()
}

pub fn stop(common: &Common, args: StopArgs, how: Stop) -> anyhow::Result<ExitCode> {
    let ids = ids_of(&args)?;
    let session = Session::load(common)?;
    let cloud = session.cloud()?;
    let action = match how {
        Stop::Kill => "kill",
        Stop::Shutdown => "shutdown",
    };
    let mut done = Vec::new();
    let mut failures = 0;
    for id in ids {
        match cloud.post::<(), VmAccepted>(&format!("/vms/{id}/{action}"), None) {
            Ok(accepted) => done.push(accepted),
            Err(e) => {
                // The others are still stopped: one refusal does not stop the batch.
                eprintln!("  [ERROR] machine {id}: {e}");
                failures += 1;
            }
        }
    }
    if common.json {
        print_json(&done)?;
    } else if common.verbose > 0 {
        for a in &done {
            println!(
                " :: Machine {} ({action} requested, job {})",
                a.vm.id, a.job
            );
        }
    }
    Ok(batch_exit(failures))
}

pub fn shutdown(common: &Common, args: ShutdownArgs) -> anyhow::Result<ExitCode> {
    if args.save {
        bail!("saving machines as images (--save) is not available in Stratus yet");
    }
    stop(common, args.stop, Stop::Shutdown)
}

/// The ssh command line that logs into `ip` as root with the private key beside `public`.
pub fn ssh_command(public: &std::path::Path, ip: Ipv4Addr, command: &[String]) -> Vec<String> {
    let mut argv = vec!["ssh".to_owned()];
    let private = public.with_extension("");
    if public.extension().is_some_and(|e| e == "pub") && private.exists() {
        argv.extend(["-i".to_owned(), private.display().to_string()]);
    }
    // Addresses are reused by the next machine, with new host keys: remembering them
    // would make every later connection fail.
    argv.extend(
        [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
        ]
        .map(str::to_owned),
    );
    argv.push(format!("root@{ip}"));
    argv.extend(command.iter().cloned());
    argv
}

pub fn connect(common: &Common, args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let id = vm_id(&args.id)?;
    let session = Session::load(common)?;
    let vm: VmView = session.cloud()?.get(&format!("/vms/{id}"))?;
    if vm.state != VmState::Running {
        bail!("machine {id} is {}, not Running", vm.state.as_str());
    }
    let Some((_, ip)) = first_address(&vm) else {
        bail!("machine {id} has no network address");
    };
    let (key, _) = session.public_key_file(args.key.as_deref())?;
    let argv = ssh_command(&key, ip, &args.command);
    tracing::info!(?argv, "connecting");
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_orchestrator::api::types::Lease;

    fn vm(id: i64, state: VmState, ip: Option<&str>) -> VmView {
        VmView {
            id,
            name: format!("one-{id}"),
            owner: "alice".into(),
            state,
            reason: None,
            instance_type: "m1.small".into(),
            cpu: 1,
            ram_mib: 128,
            swap_mib: 0,
            image: "x".into(),
            node: None,
            leases: ip
                .map(|ip| {
                    vec![Lease {
                        network: "public".into(),
                        ip: ip.parse().unwrap(),
                        mac: "02:00:00:00:00:01".into(),
                    }]
                })
                .unwrap_or_default(),
            holds_resources: true,
            created: String::new(),
            updated: String::new(),
            history: Vec::new(),
        }
    }

    #[test]
    fn the_empty_table_is_stratuslabs_header() {
        assert_eq!(
            instance_table(&[]),
            "id  state     vcpu memory    cpu% host/ip                 name\n"
        );
    }

    #[test]
    fn columns_grow_with_their_cells() {
        let t = instance_table(&[
            vm(165, VmState::Running, Some("198.18.0.10")),
            vm(1660, VmState::Pending, None),
        ]);
        assert_eq!(
            t,
            "id   state     vcpu memory    cpu% host/ip                 name\n\
             165  Running   1    131072    -    198.18.0.10             one-165\n\
             1660 Pending   1    131072    -    -                       one-1660\n"
        );
        // Every row has all seven fields, for the scripts that split them.
        assert!(t.lines().all(|l| l.split_whitespace().count() == 7), "{t}");
    }

    #[test]
    fn ssh_uses_the_private_key_beside_the_public_one() {
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("id_ed25519.pub");
        std::fs::write(&public, "ssh-ed25519 AAAA").unwrap();
        let ip: Ipv4Addr = "198.18.0.5".parse().unwrap();
        let argv = ssh_command(&public, ip, &["hostname".into()]);
        assert_eq!(argv[0], "ssh");
        assert!(
            !argv.contains(&"-i".to_owned()),
            "no private key yet: {argv:?}"
        );
        std::fs::write(dir.path().join("id_ed25519"), "private").unwrap();
        let argv = ssh_command(&public, ip, &["hostname".into()]);
        assert_eq!(
            argv[1..3],
            [
                "-i".to_owned(),
                dir.path().join("id_ed25519").display().to_string()
            ]
        );
        assert_eq!(
            argv[argv.len() - 2..],
            ["root@198.18.0.5".to_owned(), "hostname".to_owned()]
        );
    }

    #[test]
    fn machine_ids_are_positive_numbers() {
        assert_eq!(vm_id(" 42 ").unwrap(), 42);
        for bad in ["0", "-1", "abc", ""] {
            assert!(vm_id(bad)
                .unwrap_err()
                .to_string()
                .contains("is not a machine id"));
        }
    }

    /// The cloud pages its VM list (1000 at most): all pages are read, and a VM made
    /// between two reads (which shifts the newest-first pages by one) is listed once.
    #[test]
    fn every_vm_is_read_page_after_page() {
        let mut all: Vec<i64> = (1..=2500).rev().collect();
        let mut asked = Vec::new();
        let vms = every_vm(|offset| {
            asked.push(offset);
            if offset == 1000 {
                all.insert(0, 2501);
            }
            let page: Vec<VmView> = all
                .iter()
                .skip(offset as usize)
                .take(1000)
                .map(|&id| vm(id, VmState::Running, None))
                .collect();
            Ok::<_, ()>(VmList {
                vms: page,
                count: all.len() as i64,
            })
        })
        .unwrap();
        let ids: Vec<i64> = vms.iter().map(|v| v.id).collect();
        assert_eq!(ids, (1..=2500).collect::<Vec<_>>(), "asked at {asked:?}");
    }
}
