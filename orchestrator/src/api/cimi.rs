//! CIMI-shaped read views (DMTF CIMI, as StratusLab's `/cimi` served them): the
//! CloudEntryPoint with links to its collections, collections with `count`, resources with
//! `id` = `<type>/<id>`, `created`, `updated`, `acl` and the `operations` allowed on them.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde::Serialize;
use serde_json::{json, Value};

use super::{json, query, vm_id, PageQuery, Query_, Refusal, MAX_PAGE};
use crate::api::types::{JobState, VmState, VmView};
use crate::users::Principal;
use crate::{jobs, vms, Cloud};

const SCHEMA: &str = "http://schemas.dmtf.org/cimi/1";

fn base_uri(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        })
        .unwrap_or("localhost");
    format!("http://{host}/cimi/")
}

/// `GET /cimi`: open to everyone (StratusLab's `::ANON`).
pub(super) async fn cloud_entry_point(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
) -> Response {
    let now = crate::db::now();
    json(
        StatusCode::OK,
        &json!({
            "id": format!("{}cloudEntryPoint", base_uri(&headers)),
            "resourceURI": format!("{SCHEMA}/CloudEntryPoint"),
            "baseURI": base_uri(&headers),
            "name": "Stratus",
            "description": format!("Stratus cloud ({} replica)", cloud.replica),
            "created": now,
            "updated": now,
            "machines": {"href": "machine"},
            "machineConfigs": {"href": "machineConfiguration"},
            "jobs": {"href": "job"},
        }),
    )
}

fn machine_state(state: VmState) -> &'static str {
    match state {
        VmState::Pending | VmState::Prolog => "CREATING",
        VmState::Boot => "STARTING",
        VmState::Running => "STARTED",
        VmState::Shutdown | VmState::Epilog => "STOPPING",
        VmState::Done => "STOPPED",
        VmState::Failed | VmState::Unknown => "ERROR",
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Operation {
    rel: String,
    href: String,
}

fn machine(vm: &VmView) -> Value {
    let id = format!("machine/{}", vm.id);
    let mut operations = Vec::new();
    if vm.holds_resources && !vm.state.is_final() {
        for action in ["stop", "kill"] {
            operations.push(Operation {
                rel: format!("{SCHEMA}/action/{action}"),
                href: id.clone(),
            });
        }
    }
    if !vm.holds_resources && vm.state.is_final() {
        operations.push(Operation {
            rel: "delete".into(),
            href: id.clone(),
        });
    }
    json!({
        "id": id,
        "resourceURI": format!("{SCHEMA}/Machine"),
        "name": vm.name,
        "created": vm.created,
        "updated": vm.updated,
        "state": machine_state(vm.state),
        "cpu": vm.cpu,
        // CIMI counts memory in KB.
        "memory": vm.ram_mib * 1024,
        "acl": {"owner": {"principal": vm.owner, "type": "USER"}},
        "networkInterfaces": vm.leases.iter().map(|l| json!({
            "network": l.network, "ip": l.ip.to_string(), "mac": l.mac,
        })).collect::<Vec<_>>(),
        "operations": operations,
    })
}

/// `GET /cimi/machine`: the caller's VMs (admins: all), paginated like `/vms`.
pub(super) async fn machines(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    q: Query_<PageQuery>,
) -> Result<Response, Refusal> {
    let q = query(q)?;
    let offset = q.offset.unwrap_or(0).max(0);
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let list = vms::list(&cloud, &who, offset, limit, true).await?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "id": "machine",
            "resourceURI": format!("{SCHEMA}/MachineCollection"),
            "count": list.count,
            "machines": list.vms.iter().map(machine).collect::<Vec<_>>(),
        }),
    ))
}

pub(super) async fn one_machine(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let vm = vms::get(&cloud, &who, vm_id(&id)?).await?;
    Ok(json(StatusCode::OK, &machine(&vm)))
}

/// `GET /cimi/machineConfiguration`: the instance types.
pub(super) async fn machine_configurations(State(cloud): State<Arc<Cloud>>) -> Response {
    let configs: Vec<Value> = cloud
        .types
        .iter()
        .map(|t| {
            json!({
                "id": format!("machineConfiguration/{}", t.name),
                "resourceURI": format!("{SCHEMA}/MachineConfiguration"),
                "name": t.name,
                "cpu": t.cpu,
                "memory": t.ram_mib * 1024,
                "disks": [{"capacity": t.swap_mib * 1024, "format": "swap"}],
                "operations": [],
            })
        })
        .collect();
    json(
        StatusCode::OK,
        &json!({
            "id": "machineConfiguration",
            "resourceURI": format!("{SCHEMA}/MachineConfigurationCollection"),
            "count": configs.len(),
            "machineConfigurations": configs,
        }),
    )
}

fn cimi_job(job: &crate::api::types::JobView) -> Value {
    let state = match job.state {
        JobState::Queued => "QUEUED",
        JobState::Running => "RUNNING",
        JobState::Success => "SUCCESS",
        JobState::Failed => "FAILED",
    };
    json!({
        "id": format!("job/{}", job.id),
        "resourceURI": format!("{SCHEMA}/Job"),
        "created": job.created,
        "updated": job.updated,
        "state": state,
        "action": job.action,
        "targetResource": {"href": format!("machine/{}", job.vm)},
        "progress": job.progress,
        "statusMessage": job.error,
        "operations": [],
    })
}

/// `GET /cimi/job/{id}`.
pub(super) async fn one_job(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let id = vm_id(&id)?;
    match jobs::get(&cloud, id).await? {
        Some((job, owner)) if owner == who.name || who.is_admin() => {
            Ok(json(StatusCode::OK, &cimi_job(&job)))
        }
        Some(_) => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("job {id} belongs to another user"),
        )),
        None => Err(Refusal::new(StatusCode::NOT_FOUND, format!("no job {id}"))),
    }
}

/// `GET /cimi/job`: the caller's jobs (admins: all), newest first.
pub(super) async fn jobs_collection(
    State(cloud): State<Arc<Cloud>>,
    Extension(who): Extension<Principal>,
    q: Query_<PageQuery>,
) -> Result<Response, Refusal> {
    let q = query(q)?;
    let offset = q.offset.unwrap_or(0).max(0);
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let owner = (!who.is_admin()).then_some(who.name.as_str());
    let (count, page) = jobs::list(&cloud, owner, offset, limit).await?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "id": "job",
            "resourceURI": format!("{SCHEMA}/JobCollection"),
            "count": count,
            "jobs": page.iter().map(cimi_job).collect::<Vec<_>>(),
        }),
    ))
}
