//! Nodes (hypervisor hosts, each with its node agent): registered by admins, polled for
//! capacity and health, and reconciled: what each agent reports about its VMs is folded
//! into the VMs' states here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyConnection;
use stratus_nodeagent::api::types::VmState as AgentVmState;

use crate::agent_client::AgentClient;
use crate::api::types::{NodeAdd, NodeState, NodeView, VmState};
use crate::db::{self, Db, DbError};
use crate::jobs::{self, Action};
use crate::{placement, vms, Cloud};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node '{0}' is registered already")]
    Exists(String),
    #[error("no node '{0}'")]
    Unknown(String),
    #[error("'{0}' is not a valid node name: use 1 to 64 letters, digits, '.', '_' or '-', not dots alone")]
    BadName(String),
    #[error("'{0}' is not a node agent URL (http://HOST:PORT or https://HOST:PORT)")]
    BadUrl(String),
    #[error("the node agent token must not be empty")]
    EmptyToken,
    #[error("node '{name}' still holds {vms} VM(s)")]
    HasVms { name: String, vms: i64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for NodeError {
    fn from(e: sqlx::Error) -> Self {
        NodeError::Db(e.into())
    }
}

#[derive(Clone, sqlx::FromRow)]
pub struct NodeRow {
    pub id: i64,
    pub name: String,
    pub url: String,
    pub token: String,
    pub state: String,
    pub health: String,
    pub cpu_total: i64,
    pub memory_total_mib: i64,
    pub running_vms: i64,
    pub load_1m: f64,
    pub disk_free_bytes: i64,
    pub agent_state: Option<String>,
    pub agent_version: Option<String>,
    pub hypervisor: Option<String>,
    pub hostname: Option<String>,
    pub attributes: String,
    pub last_seen: Option<String>,
    pub last_error: Option<String>,
    pub created: String,
}

/// Everything but the agent's token, which a logged row must not carry.
impl std::fmt::Debug for NodeRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRow")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("url", &self.url)
            .field("state", &self.state)
            .field("health", &self.health)
            .field("cpu_total", &self.cpu_total)
            .field("memory_total_mib", &self.memory_total_mib)
            .field("running_vms", &self.running_vms)
            .field("agent_state", &self.agent_state)
            .field("last_seen", &self.last_seen)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

const NODE_COLUMNS: &str = "id, name, url, token, state, health, cpu_total, memory_total_mib, \
    running_vms, load_1m, disk_free_bytes, agent_state, agent_version, hypervisor, hostname, \
    attributes, last_seen, last_error, created";

impl NodeRow {
    pub fn client(&self, http: &reqwest::Client) -> AgentClient {
        AgentClient::new(http.clone(), &self.url, &self.token)
    }

    pub fn attributes(&self) -> BTreeMap<String, String> {
        serde_json::from_str(&self.attributes).unwrap_or_default()
    }
}

pub async fn all(conn: &mut AnyConnection) -> Result<Vec<NodeRow>, DbError> {
    Ok(sqlx::query_as::<_, NodeRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"
    )))
    .fetch_all(&mut *conn)
    .await?)
}

pub async fn load(conn: &mut AnyConnection, id: i64) -> Result<NodeRow, DbError> {
    sqlx::query_as::<_, NodeRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::Corrupt {
        what: "vms.node_id",
        value: id.to_string(),
    })
}

/// The node's row, locked until the caller's transaction ends (PostgreSQL).
pub async fn load_locked(db: &Db, conn: &mut AnyConnection, id: i64) -> Result<NodeRow, DbError> {
    sqlx::query_as::<_, NodeRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1{}",
        db.for_update()
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::Corrupt {
        what: "vms.node_id",
        value: id.to_string(),
    })
}

fn valid_name(name: &str) -> bool {
    crate::names::valid(name, &['.', '_', '-'])
}

pub async fn add(db: &Db, node: &NodeAdd) -> Result<i64, NodeError> {
    if !valid_name(&node.name) {
        return Err(NodeError::BadName(node.name.clone()));
    }
    let url_ok = (node.url.starts_with("http://") || node.url.starts_with("https://"))
        && reqwest::Url::parse(&node.url).is_ok_and(|u| u.host().is_some());
    if !url_ok {
        return Err(NodeError::BadUrl(node.url.clone()));
    }
    let token = node.token.trim();
    if token.is_empty() {
        return Err(NodeError::EmptyToken);
    }
    let mut tx = db.pool.begin().await?;
    let exists: Option<(i64,)> = sqlx::query_as("SELECT id FROM nodes WHERE name = $1")
        .bind(&node.name)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_some() {
        return Err(NodeError::Exists(node.name.clone()));
    }
    let id = db::next_id(&mut tx, "node").await?;
    sqlx::query(
        "INSERT INTO nodes (id, name, url, token, state, health, created) \
         VALUES ($1, $2, $3, $4, 'enabled', 'new', $5)",
    )
    .bind(id)
    .bind(&node.name)
    .bind(node.url.trim_end_matches('/'))
    .bind(token)
    .bind(db::now())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Removes a node that holds no VMs.
pub async fn remove(db: &Db, name: &str) -> Result<(), NodeError> {
    let mut tx = db.pool.begin().await?;
    // Locked as placement locks it: a VM being placed here meanwhile is either counted
    // below or finds the node gone.
    let row: Option<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM nodes WHERE name = $1{}",
        db.for_update()
    )))
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id,)) = row else {
        return Err(NodeError::Unknown(name.to_owned()));
    };
    let (vms,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM vms WHERE node_id = $1 AND holds = 1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
    if vms > 0 {
        return Err(NodeError::HasVms {
            name: name.to_owned(),
            vms,
        });
    }
    sqlx::query("DELETE FROM nodes WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    // The ended VMs it ran keep their records, without a node that no longer exists.
    sqlx::query("UPDATE vms SET node_id = NULL WHERE node_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn set_state(db: &Db, name: &str, state: NodeState) -> Result<(), NodeError> {
    let changed = sqlx::query("UPDATE nodes SET state = $1 WHERE name = $2")
        .bind(state.as_str())
        .bind(name)
        .execute(&db.pool)
        .await?
        .rows_affected();
    if changed == 0 {
        return Err(NodeError::Unknown(name.to_owned()));
    }
    Ok(())
}

pub async fn views(db: &Db) -> Result<Vec<NodeView>, NodeError> {
    let mut conn = db.pool.acquire().await?;
    let mut out = Vec::new();
    for node in all(&mut conn).await? {
        let room = placement::room(&mut conn, node).await?;
        let n = &room.node;
        let state = match n.state.as_str() {
            "enabled" => NodeState::Enabled,
            "disabled" => NodeState::Disabled,
            "maintenance" => NodeState::Maintenance,
            other => {
                return Err(DbError::Corrupt {
                    what: "nodes.state",
                    value: other.to_owned(),
                }
                .into())
            }
        };
        out.push(NodeView {
            id: n.id,
            name: n.name.clone(),
            url: n.url.clone(),
            state,
            health: n.health.clone(),
            running_vms: room.vms,
            cpu_total: n.cpu_total,
            cpu_free: room.cpu_free(),
            cpu_allocated: room.cpu_used,
            memory_total_mib: n.memory_total_mib,
            memory_free_mib: room.memory_free_mib(),
            memory_allocated_mib: room.memory_used_mib,
            load_1m: n.load_1m,
            disk_free_bytes: n.disk_free_bytes,
            hypervisor: n.hypervisor.clone(),
            agent_version: n.agent_version.clone(),
            attributes: n.attributes(),
            last_seen: n.last_seen.clone(),
            last_error: n.last_error.clone(),
        });
    }
    Ok(out)
}

/// Polls every node now and then, for as long as the process runs.
pub async fn poller(cloud: Arc<Cloud>) {
    let every = Duration::from_secs(cloud.config.poll_interval_s);
    loop {
        if let Err(e) = poll_all(&cloud).await {
            tracing::error!("cannot poll the nodes: {e}");
        }
        tokio::time::sleep(every).await;
    }
}

pub async fn poll_all(cloud: &Cloud) -> Result<(), DbError> {
    let nodes = {
        let mut conn = cloud.db.pool.acquire().await?;
        all(&mut conn).await?
    };
    let polls = nodes.into_iter().map(|node| poll(cloud, node));
    for result in futures_util::future::join_all(polls).await {
        result?;
    }
    Ok(())
}

/// One node: its capacity and health, then its VMs.
async fn poll(cloud: &Cloud, node: NodeRow) -> Result<(), DbError> {
    let client = node.client(&cloud.agents);
    let asked = db::now();
    let answer = async {
        let host = client.host().await?;
        let vms = client.vms().await?;
        Ok::<_, crate::agent_client::AgentError>((host, vms))
    }
    .await;
    let (host, list) = match answer {
        Ok(a) => a,
        Err(e) => return node_silent(cloud, &node, &e.with_causes()).await,
    };
    sqlx::query(
        "UPDATE nodes SET health = 'up', cpu_total = $1, memory_total_mib = $2, running_vms = $3, \
         load_1m = $4, disk_free_bytes = $5, agent_state = $6, agent_version = $7, \
         hypervisor = $8, hostname = $9, last_seen = $10, last_error = NULL WHERE id = $11",
    )
    .bind(host.cpu_total as i64)
    .bind(host.memory_total_mib as i64)
    .bind(host.running_vms as i64)
    .bind(host.load_1m)
    .bind(host.state_disk_free_bytes as i64)
    .bind(
        serde_json::to_value(host.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned)),
    )
    .bind(&host.agent_version)
    .bind(&host.hypervisor)
    .bind(&host.hostname)
    .bind(db::now())
    .bind(node.id)
    .execute(&cloud.db.pool)
    .await?;
    cloud.metrics.node_polled(&node.name, true);
    let reported: HashMap<String, _> = list.vms.into_iter().map(|v| (v.id.clone(), v)).collect();
    remove_orphans(cloud, &node, &client, reported.keys(), &asked).await?;
    reconcile(cloud, &node, &asked, |id| {
        Some(match reported.get(id) {
            None => Report::Missing,
            Some(v) => match v.state {
                AgentVmState::Stopped => Report::Stopped,
                AgentVmState::Failed => Report::Failed(
                    v.exit
                        .as_ref()
                        .map(|e| e.reason.clone())
                        .unwrap_or_else(|| "the VMM failed".into()),
                ),
                _ => Report::Alive,
            },
        })
    })
    .await
}

/// Removes from the node the VMs the cloud does not have there: released or forgotten
/// ones, and the copy a worker made before another one, which had taken its job over,
/// placed the VM elsewhere. VMs a job is working on, or that changed since the node was
/// asked, are left for the next poll.
async fn remove_orphans<'a>(
    cloud: &Cloud,
    node: &NodeRow,
    client: &crate::agent_client::AgentClient,
    reported: impl Iterator<Item = &'a String>,
    asked: &str,
) -> Result<(), DbError> {
    let mut orphans = Vec::new();
    {
        let mut conn = cloud.db.pool.acquire().await?;
        for id in reported {
            // Ids that are not numbers were not made by an orchestrator.
            let Ok(vm) = id.parse::<i64>() else {
                continue;
            };
            let row: Option<(Option<i64>, i64, String)> =
                sqlx::query_as("SELECT node_id, holds, updated FROM vms WHERE id = $1")
                    .bind(vm)
                    .fetch_optional(&mut *conn)
                    .await?;
            let theirs = match &row {
                Some((placed, holds, updated)) => {
                    (*placed == Some(node.id) && *holds == 1) || updated.as_str() >= asked
                }
                None => false,
            };
            // A job working on the VM right now may be placing it here; a queued one
            // (waiting for room) is not.
            let (working,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE vm_id = $1 AND state = 'running'")
                    .bind(vm)
                    .fetch_one(&mut *conn)
                    .await?;
            if theirs || working > 0 {
                continue;
            }
            orphans.push(id.clone());
        }
    }
    for id in orphans {
        tracing::warn!(node = %node.name, "VM {id} is on the node but not the cloud's there: removing it");
        let killed = client.kill(&id).await;
        if let Err(e) = killed.as_ref() {
            if !matches!(e.status(), Some(404 | 409)) {
                tracing::warn!(node = %node.name, "cannot stop orphan VM {id}: {e}");
                continue;
            }
        }
        if let Err(e) = client.delete(&id).await {
            tracing::warn!(node = %node.name, "cannot remove orphan VM {id}: {e}");
        }
    }
    Ok(())
}

/// What a node's agent says about one VM.
enum Report {
    Alive,
    Stopped,
    Failed(String),
    Missing,
}

async fn node_silent(cloud: &Cloud, node: &NodeRow, error: &str) -> Result<(), DbError> {
    tracing::warn!(node = %node.name, "{error}");
    cloud.metrics.node_polled(&node.name, false);
    let deadline = db::timestamp(
        chrono::Utc::now() - chrono::Duration::seconds(cloud.config.node_timeout_s as i64),
    );
    let down = node
        .last_seen
        .as_deref()
        .is_none_or(|seen| *seen < *deadline);
    sqlx::query("UPDATE nodes SET last_error = $1, health = $2 WHERE id = $3")
        .bind(error)
        .bind(if down { "down" } else { node.health.as_str() })
        .bind(node.id)
        .execute(&cloud.db.pool)
        .await?;
    if down {
        reconcile(cloud, node, &db::now(), |_| None).await?;
    }
    Ok(())
}

/// Folds the node's reports into the states of its VMs that no job is working on.
/// `report(id)` is None when the node does not answer. VMs changed since `asked` (when
/// the node was asked) are left for the next poll: the report may predate the change.
async fn reconcile(
    cloud: &Cloud,
    node: &NodeRow,
    asked: &str,
    report: impl Fn(&str) -> Option<Report>,
) -> Result<(), DbError> {
    let mut tx = cloud.db.pool.begin().await?;
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT v.id, v.state, v.owner FROM vms v WHERE v.node_id = $1 AND v.holds = 1 \
         AND v.updated < $2 AND v.state IN ('Running', 'Boot', 'Unknown') AND NOT EXISTS \
         (SELECT 1 FROM jobs j WHERE j.vm_id = v.id AND j.state IN ('queued', 'running'))",
    )
    .bind(node.id)
    .bind(asked)
    .fetch_all(&mut *tx)
    .await?;
    let mut queued = false;
    for (id, state, owner) in rows {
        let state = VmState::parse(&state).unwrap_or(VmState::Unknown);
        match report(&id.to_string()) {
            None if state != VmState::Unknown => {
                vms::set_state(
                    &mut tx,
                    id,
                    VmState::Unknown,
                    Some(&format!("node {} does not answer", node.name)),
                )
                .await?;
            }
            None => {}
            Some(Report::Alive) if state != VmState::Running => {
                vms::set_state(&mut tx, id, VmState::Running, Some("its node answers")).await?;
            }
            Some(Report::Alive) => {}
            Some(Report::Stopped) => {
                vms::set_state(&mut tx, id, VmState::Epilog, Some("the guest powered off")).await?;
                jobs::enqueue(&mut tx, id, Action::Epilog, &owner).await?;
                queued = true;
            }
            Some(Report::Failed(reason)) => {
                vms::set_state(&mut tx, id, VmState::Failed, Some(&reason)).await?;
                jobs::enqueue(&mut tx, id, Action::Epilog, &owner).await?;
                queued = true;
            }
            Some(Report::Missing) => {
                vms::set_state(
                    &mut tx,
                    id,
                    VmState::Failed,
                    Some(&format!("node {} no longer has the VM", node.name)),
                )
                .await?;
                jobs::enqueue(&mut tx, id, Action::Epilog, &owner).await?;
                queued = true;
            }
        }
    }
    tx.commit().await?;
    if queued {
        cloud.jobs_queued.notify_waiters();
    }
    Ok(())
}
