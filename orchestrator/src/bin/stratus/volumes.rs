//! The persistent volume commands (pdisk): create-volume, describe-volumes, update-volume,
//! delete-volume, attach-volume, detach-volume.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use stratus_orchestrator::api::types::{JobState, JobView};
use stratus_orchestrator::pdisk::parse_uuid;
use stratus_orchestrator::pdisk::{
    MountAccepted, MountRequest, Visibility, VolumeCreate, VolumeKind, VolumeUpdate, VolumeView,
};

use crate::client::Service;
use crate::instances::vm_id;
use crate::output::{batch_exit, print_json};
use crate::session::Session;
use crate::Common;

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Size in GiB (1 to 1024).
    #[arg(short, long, value_name = "GiB")]
    pub size: i64,
    /// A tag to find it by (at most 40 characters).
    #[arg(short, long)]
    pub tag: Option<String>,
    /// Only you may use it (the default).
    #[arg(long, conflicts_with = "public")]
    pub private: bool,
    /// Every user may use it.
    #[arg(long)]
    pub public: bool,
    /// The storage pool to make it in (default: the cloud's default pool).
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// Volumes (default: all you may see).
    pub uuids: Vec<String>,
    /// Only volumes whose FIELD matches REGEX (repeatable), e.g. tag:^data
    #[arg(short, long, value_name = "FIELD:REGEX")]
    pub filter: Vec<String>,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    pub uuid: String,
    #[arg(short, long)]
    pub tag: Option<String>,
    #[arg(long, conflicts_with = "public")]
    pub private: bool,
    #[arg(long)]
    pub public: bool,
    /// One of StratusLab's six types, e.g. DATA_IMAGE_RAW_READONLY.
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[arg(required = true)]
    pub uuids: Vec<String>,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The running machine.
    #[arg(short = 'i', long = "instance", value_name = "VM-ID")]
    pub instance: String,
    #[arg(required = true)]
    pub uuids: Vec<String>,
    /// Seconds to wait for the guest (default 300).
    #[arg(long, default_value_t = 300)]
    pub wait: u64,
}

fn visibility(private: bool, public: bool) -> Option<Visibility> {
    match (private, public) {
        (_, true) => Some(Visibility::Public),
        (true, _) => Some(Visibility::Private),
        _ => None,
    }
}

pub fn create(common: &Common, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let created: VolumeView = session.pdisk()?.post(
        "/disks",
        Some(&VolumeCreate {
            size_gib: args.size,
            tag: args.tag,
            visibility: visibility(args.private, args.public),
            kind: None,
            pool: args.pool,
        }),
    )?;
    if common.json {
        print_json(&created)?;
    } else {
        println!("DISK {}", created.uuid);
    }
    Ok(ExitCode::SUCCESS)
}

/// StratusLab's block for one volume.
pub fn volume_block(v: &VolumeView) -> String {
    let mut out = format!(":: DISK {}\n", v.uuid);
    let mut field = |k: &str, val: String| out.push_str(&format!("\t{k}: {val}\n"));
    field("count", v.count.to_string());
    field("owner", v.owner.clone());
    field("tag", v.tag.clone());
    // StratusLab's tutorial finds a saved image's disk by it.
    if let Some(identifier) = &v.identifier {
        field("identifier", identifier.clone());
    }
    field("size", v.size_gib.to_string());
    field("visibility", v.visibility.clone());
    field("type", v.kind.clone());
    field("state", v.state.clone());
    field("pool", v.pool.clone());
    field("created", v.created.clone());
    for m in &v.mounts {
        field(
            "mount",
            format!(
                "VM {} on /dev/{} since {} ({}{})",
                m.vm_id,
                m.device,
                m.since,
                m.state,
                if m.hotplugged { ", hot-plugged" } else { "" }
            ),
        );
    }
    out
}

fn field_of(v: &VolumeView, name: &str) -> Option<String> {
    Some(match name {
        "uuid" => v.uuid.clone(),
        "owner" => v.owner.clone(),
        "tag" => v.tag.clone(),
        "size" => v.size_gib.to_string(),
        "visibility" => v.visibility.clone(),
        "type" => v.kind.clone(),
        "state" => v.state.clone(),
        "pool" => v.pool.clone(),
        "count" => v.count.to_string(),
        "identifier" => v.identifier.clone().unwrap_or_default(),
        "seed" => v.seed.to_string(),
        "quarantine" => v.quarantine.clone().unwrap_or_default(),
        _ => return None,
    })
}

pub fn describe(common: &Common, args: DescribeArgs) -> anyhow::Result<ExitCode> {
    let mut filters = Vec::new();
    for f in &args.filter {
        let (name, pattern) = f
            .split_once(':')
            .with_context(|| format!("filter '{f}' is not FIELD:REGEX"))?;
        if field_of(&placeholder(), name).is_none() {
            bail!("filter '{f}': no field '{name}' (uuid, owner, tag, identifier, size, visibility, type, state, pool, count, seed, quarantine)");
        }
        let re = regex::Regex::new(pattern)
            .with_context(|| format!("filter '{f}': not a regular expression"))?;
        filters.push((name.to_owned(), re));
    }
    let session = Session::load(common)?;
    let cloud = session.pdisk()?;
    let volumes: Vec<VolumeView> = if args.uuids.is_empty() {
        cloud.get("/disks")?
    } else {
        uuids(&args.uuids)?
            .iter()
            .map(|u| cloud.get(&format!("/disks/{u}")))
            .collect::<Result<_, _>>()?
    };
    let shown: Vec<&VolumeView> = volumes
        .iter()
        .filter(|v| {
            filters
                .iter()
                .all(|(name, re)| field_of(v, name).is_some_and(|value| re.is_match(&value)))
        })
        .collect();
    if common.json {
        print_json(&shown)?;
    } else if common.quiet > 0 {
        // Nothing at all when nothing matches: the output is a list for scripts.
        for v in shown {
            println!("{}", v.uuid);
        }
    } else if shown.is_empty() {
        println!("No disk to show");
    } else {
        for v in shown {
            print!("{}", volume_block(v));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn placeholder() -> VolumeView {
    VolumeView {
        uuid: String::new(),
        owner: String::new(),
        tag: String::new(),
        size_gib: 0,
        visibility: String::new(),
        kind: String::new(),
        identifier: None,
        seed: false,
        base_uuid: None,
        quarantine: None,
        state: String::new(),
        pool: String::new(),
        count: 0,
        mounts: Vec::new(),
        hidden_mounts: 0,
        created: String::new(),
        updated: String::new(),
    }
}

pub fn update(common: &Common, args: UpdateArgs) -> anyhow::Result<ExitCode> {
    let kind = match &args.kind {
        Some(k) => Some(
            serde_json::from_value::<VolumeKind>(serde_json::Value::String(k.to_uppercase()))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "'{k}' is not a volume type (MACHINE_IMAGE_ORIGIN, MACHINE_IMAGE_LIVE, \
                         DATA_IMAGE_ORIGIN, DATA_IMAGE_LIVE, DATA_IMAGE_RAW_READONLY, \
                         DATA_IMAGE_RAW_READ_WRITE)"
                    )
                })?,
        ),
        None => None,
    };
    let uuid = parse_uuid(&args.uuid)?;
    let session = Session::load(common)?;
    let updated: VolumeView = session.pdisk()?.put(
        &format!("/disks/{uuid}"),
        &VolumeUpdate {
            tag: args.tag,
            visibility: visibility(args.private, args.public),
            kind,
        },
    )?;
    if common.json {
        print_json(&updated)?;
    } else {
        println!("DISK {}", updated.uuid);
    }
    Ok(ExitCode::SUCCESS)
}

/// Volume ids as given, each checked to be a UUID before any request is made (a path
/// or query in one would change which request is made).
fn uuids(texts: &[String]) -> anyhow::Result<Vec<String>> {
    texts
        .iter()
        .map(|t| parse_uuid(t).map_err(anyhow::Error::from))
        .collect()
}

pub fn delete(common: &Common, args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let uuids = uuids(&args.uuids)?;
    let session = Session::load(common)?;
    let cloud = session.pdisk()?;
    let mut deleted = Vec::new();
    let mut failures = 0;
    for uuid in uuids {
        match cloud.delete(&format!("/disks/{uuid}")) {
            Ok(()) => {
                if !common.json {
                    println!("DELETED {uuid}");
                }
                deleted.push(uuid);
            }
            Err(e) => {
                eprintln!("  [ERROR] Service error: {e}");
                failures += 1;
            }
        }
    }
    if common.json {
        print_json(&deleted)?;
    }
    Ok(batch_exit(failures))
}

/// Waits for the job that hot-plugs or unplugs a volume.
fn wait_job(cloud: &Service, job: i64, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let view: JobView = cloud.get(&format!("/jobs/{job}"))?;
        match view.state {
            JobState::Success => return Ok(()),
            JobState::Failed => bail!(
                "{}",
                view.error.unwrap_or_else(|| format!("job {job} failed"))
            ),
            _ if start.elapsed() > limit => bail!(
                "job {job} is still {} after {} s{}",
                serde_json::to_value(view.state)?.as_str().unwrap_or("open"),
                limit.as_secs(),
                view.error.map(|e| format!(" ({e})")).unwrap_or_default()
            ),
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

pub fn attach(common: &Common, args: MountArgs, attach: bool) -> anyhow::Result<ExitCode> {
    let vm = vm_id(&args.instance)?;
    let session = Session::load(common)?;
    let cloud = session.pdisk()?;
    let mut done = Vec::new();
    let mut failures = 0;
    for uuid in uuids(&args.uuids)? {
        let mounted = if attach {
            cloud.post(
                &format!("/disks/{uuid}/mounts"),
                Some(&MountRequest { vm_id: vm }),
            )
        } else {
            cloud.delete_json(&format!("/disks/{uuid}/mounts/{vm}"))
        };
        let accepted: MountAccepted =
            match mounted
                .map_err(anyhow::Error::from)
                .and_then(|a: MountAccepted| {
                    wait_job(&cloud, a.job, Duration::from_secs(args.wait)).map(|()| a)
                }) {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Named, unless the cloud's own message names it (as StratusLab's did).
                    let reason = format!("{e:#}");
                    match reason.contains(&uuid) {
                        true => eprintln!("  [ERROR] {reason}"),
                        false => eprintln!("  [ERROR] DISK {uuid}: {reason}"),
                    }
                    failures += 1;
                    continue;
                }
            };
        if !common.json {
            if attach {
                println!("ATTACHED {uuid} in VM {vm} on /dev/{}", accepted.device);
            } else {
                println!("DETACHED {uuid} from VM {vm} on /dev/{}", accepted.device);
            }
        }
        done.push(accepted);
    }
    if common.json {
        print_json(&done)?;
    }
    Ok(batch_exit(failures))
}
