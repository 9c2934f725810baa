//! The administrators' views: describe-nodes (StratusLab's host table) and list-users.

use std::process::ExitCode;

use stratus_orchestrator::api::types::{NodeView, UserInfo};

use crate::output::{print_json, table};
use crate::session::Session;
use crate::Common;

pub fn node_table(nodes: &[NodeView]) -> String {
    let rows: Vec<[String; 10]> = nodes
        .iter()
        .map(|n| {
            let state = match (n.state.as_str(), n.health.as_str()) {
                ("enabled", "up") => "on".to_owned(),
                ("enabled", health) => health.to_owned(),
                (state, _) => state.to_owned(),
            };
            [
                n.id.to_string(),
                n.name.clone(),
                n.running_vms.to_string(),
                n.cpu_total.to_string(),
                n.cpu_free.to_string(),
                n.cpu_allocated.to_string(),
                n.memory_total_mib.to_string(),
                n.memory_free_mib.to_string(),
                n.memory_allocated_mib.to_string(),
                state,
            ]
        })
        .collect();
    table(
        [
            "ID", "NAME", "RVM", "TCPU", "FCPU", "ACPU", "TMEM", "FMEM", "AMEM", "STAT",
        ],
        [0; 10],
        &rows,
    )
}

pub fn describe_nodes(common: &Common) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let nodes: Vec<NodeView> = session.cloud()?.get("/nodes")?;
    if common.json {
        print_json(&nodes)?;
    } else {
        print!("{}", node_table(&nodes));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list_users(common: &Common) -> anyhow::Result<ExitCode> {
    let session = Session::load(common)?;
    let users: Vec<UserInfo> = session.cloud()?.get("/users")?;
    if common.json {
        print_json(&users)?;
        return Ok(ExitCode::SUCCESS);
    }
    let quota = |q: Option<i64>| q.map(|q| q.to_string()).unwrap_or_else(|| "default".into());
    let rows: Vec<[String; 6]> = users
        .iter()
        .map(|u| {
            [
                u.name.clone(),
                u.role.stratuslab_name().to_owned(),
                quota(u.cpu_quota),
                quota(u.memory_quota_mib),
                quota(u.vm_quota),
                u.created.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            ["NAME", "ROLE", "CPU", "MEMORY_MIB", "VMS", "CREATED"],
            [0; 6],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}
