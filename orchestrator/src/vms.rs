//! VMs as the cloud keeps them: run requests checked and written to the database (with
//! their quota, lease and first job in one transaction), state changes recorded with their
//! time and reason, and the users' kill/shutdown/delete requests.

use sqlx::AnyConnection;
use stratus_contextualizer::{Context, ContextMethod};
use stratus_images::Metadata;

use crate::api::types::{RunRequest, VmAccepted, VmEvent, VmList, VmState, VmView};
use crate::db::{self, DbError};
use crate::instance_types::{self, MAX_CPU, MAX_RAM_MIB, MAX_SWAP_MIB};
use crate::jobs::{self, Action};
use crate::marketplace::{self, MarketplaceError};
use crate::networks::{self, NetworkError};
use crate::placement::Requirements;
use crate::quotas::{self, QuotaError};
use crate::users::Principal;
use crate::Cloud;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    BadRequest(String),
    #[error("VM {0} belongs to another user")]
    NotYours(i64),
    #[error("no VM {0}")]
    NotFound(i64),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error(transparent)]
    Marketplace(#[from] MarketplaceError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Db(#[from] DbError),
    /// A persistent volume of the request cannot be attached.
    #[error(transparent)]
    Volume(Box<crate::pdisk::VolumeError>),
}

impl From<crate::pdisk::VolumeError> for VmError {
    fn from(e: crate::pdisk::VolumeError) -> Self {
        VmError::Volume(Box::new(e))
    }
}

impl From<sqlx::Error> for VmError {
    fn from(e: sqlx::Error) -> Self {
        VmError::Db(e.into())
    }
}

/// What a run request becomes once checked: kept with the VM (as JSON) so the job that
/// deploys it needs nothing else, whichever replica runs it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Deployment {
    pub request: RunRequest,
    pub context_method: String,
    /// The Marketplace entry chosen at request time.
    pub image: Metadata,
    /// The entries of the read-only disks, in the request's order.
    #[serde(default)]
    pub readonly_images: Vec<Metadata>,
}

/// One row of `vms`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct VmRow {
    pub id: i64,
    pub owner: String,
    pub name: String,
    pub state: String,
    pub reason: Option<String>,
    pub instance_type: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub swap_mib: i64,
    pub image: String,
    pub request: String,
    pub node_id: Option<i64>,
    pub holds: i64,
    pub created: String,
    pub updated: String,
}

pub const VM_COLUMNS: &str = "id, owner, name, state, reason, instance_type, vcpus, memory_mib, \
                              swap_mib, image, request, node_id, holds, created, updated";

impl VmRow {
    pub fn state(&self) -> Result<VmState, DbError> {
        VmState::parse(&self.state).ok_or_else(|| DbError::Corrupt {
            what: "vms.state",
            value: self.state.clone(),
        })
    }

    /// The VM as users see it, with what the caller looked up beside the row.
    fn to_view(
        &self,
        node: Option<String>,
        leases: Vec<networks::Lease>,
        history: Vec<VmEvent>,
    ) -> Result<VmView, DbError> {
        Ok(VmView {
            id: self.id,
            name: self.name.clone(),
            owner: self.owner.clone(),
            state: self.state()?,
            reason: self.reason.clone(),
            instance_type: self.instance_type.clone(),
            cpu: self.vcpus,
            ram_mib: self.memory_mib,
            swap_mib: self.swap_mib,
            image: self.image.clone(),
            node,
            leases,
            holds_resources: self.holds == 1,
            created: self.created.clone(),
            updated: self.updated.clone(),
            history,
        })
    }

    pub fn deployment(&self) -> Result<Deployment, DbError> {
        serde_json::from_str(&self.request).map_err(|_| DbError::Corrupt {
            what: "vms.request",
            value: format!("VM {}", self.id),
        })
    }
}

const MAX_NAME: usize = 64;
const MAX_CONTEXT_PAIRS: usize = 128;
const MAX_USER_DATA: usize = 32 * 1024;
const MAX_VOLATILE_GIB: u64 = 1024;
const MAX_READONLY_DISKS: usize = 4;
/// Persistent volumes attached at boot (StratusLab's guests name them vda…vdz).
const MAX_PERSISTENT_DISKS: usize = 16;

/// A request's values after defaults and limits.
struct Checked {
    instance_type: String,
    cpu: u8,
    ram_mib: u64,
    swap_mib: u64,
    network: Option<String>,
    context_method: String,
}

fn check(cloud: &Cloud, r: &RunRequest) -> Result<Checked, VmError> {
    let bad = |m: String| Err(VmError::BadRequest(m));
    let type_name = r
        .instance_type
        .clone()
        .unwrap_or_else(|| instance_types::DEFAULT_TYPE.to_owned());
    let Some(t) = cloud.types.iter().find(|t| t.name == type_name) else {
        let known: Vec<&str> = cloud.types.iter().map(|t| t.name.as_str()).collect();
        return bad(format!(
            "unknown instance type '{type_name}' (known: {})",
            known.join(", ")
        ));
    };
    let cpu = r.cpu.unwrap_or(t.cpu);
    let ram_mib = r.ram_mib.unwrap_or(t.ram_mib);
    let swap_mib = r.swap_mib.unwrap_or(t.swap_mib);
    if cpu == 0 || cpu > MAX_CPU {
        return bad(format!("cpu must be between 1 and {MAX_CPU}"));
    }
    if !(16..=MAX_RAM_MIB).contains(&ram_mib) {
        return bad(format!("ram must be between 16 and {MAX_RAM_MIB} MiB"));
    }
    if swap_mib > MAX_SWAP_MIB {
        return bad(format!("swap must be at most {MAX_SWAP_MIB} MiB"));
    }
    if let Some(name) = &r.name {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
        if !ok {
            return bad(format!(
                "the VM name must be 1 to {MAX_NAME} letters, digits, '-' or '.': it is the guest's hostname"
            ));
        }
    }
    let context_method = r.context_method.clone().unwrap_or_else(|| "one".into());
    if !matches!(context_method.as_str(), "one" | "cloud-init" | "nocloud") {
        return bad(format!(
            "unknown context method '{context_method}' (one, cloud-init or nocloud)"
        ));
    }
    if r.context.len() > MAX_CONTEXT_PAIRS {
        return bad(format!("at most {MAX_CONTEXT_PAIRS} context pairs"));
    }
    if r.user_data
        .as_ref()
        .is_some_and(|u| u.len() > MAX_USER_DATA)
    {
        return bad(format!("user data is limited to {MAX_USER_DATA} bytes"));
    }
    // The node's contextualizer refuses what it cannot hand the guest (a key a shell cannot
    // take, a name that is no hostname); checked here with its rules, the user hears why
    // at once instead of finding the VM failed on its node after the 201.
    let mut context = Context::new("one-0", r.name.as_deref().unwrap_or("one-0"))
        .with_pairs(r.context.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(key) = &r.public_key {
        context = context.with_public_key(key.as_str());
    }
    if let Some(data) = &r.user_data {
        context = context.with_user_data(data.as_bytes().to_vec());
    }
    // Built and thrown away: what only the method's format refuses (user data that does
    // not decode, or does not fit its disk) is refused here too.
    context_method
        .parse::<ContextMethod>()
        .and_then(|method| stratus_contextualizer::build_context_image(&context, method))
        .map_err(|e| VmError::BadRequest(format!("context: {e}")))?;
    if let Some(gib) = r.volatile_disk_gib {
        if gib == 0 || gib > MAX_VOLATILE_GIB {
            return bad(format!(
                "the volatile disk must be 1 to {MAX_VOLATILE_GIB} GiB"
            ));
        }
    }
    if r.readonly_disks.len() > MAX_READONLY_DISKS {
        return bad(format!("at most {MAX_READONLY_DISKS} read-only disks"));
    }
    if r.persistent_disks.len() > MAX_PERSISTENT_DISKS {
        return bad(format!("at most {MAX_PERSISTENT_DISKS} persistent disks"));
    }
    let mut volumes = std::collections::BTreeSet::new();
    for uuid in &r.persistent_disks {
        let uuid =
            crate::pdisk::parse_uuid(uuid).map_err(|e| VmError::BadRequest(e.to_string()))?;
        if !volumes.insert(uuid.clone()) {
            return bad(format!("disk {uuid} is given twice"));
        }
    }
    if let Some(expr) = &r.requirements {
        Requirements::parse(expr).map_err(VmError::BadRequest)?;
    }
    let network = match &r.network {
        Some(n) => {
            if !cloud.config.networks.iter().any(|c| &c.name == n) {
                return bad(format!("no network '{n}' in this cloud"));
            }
            Some(n.clone())
        }
        None => cloud
            .config
            .networks
            .iter()
            .find(|c| c.name == "public")
            .map(|c| c.name.clone()),
    };
    if r.address.is_some() && network.is_none() {
        return bad("an address needs a network, and this cloud has none".into());
    }
    Ok(Checked {
        instance_type: type_name,
        cpu,
        ram_mib,
        swap_mib,
        network,
        context_method,
    })
}

/// Checks a run request, looks its image up, and records the VM (Pending), its lease and
/// its deploy job in one transaction. Nothing is half-made on a refusal.
pub async fn create(
    cloud: &Cloud,
    who: &Principal,
    request: RunRequest,
) -> Result<VmAccepted, VmError> {
    let checked = check(cloud, &request)?;
    let image = marketplace::resolve(
        &cloud.http,
        cloud.config.marketplace_endpoint.as_deref(),
        cloud.policy.as_ref(),
        &request.image,
    )
    .await?;
    let mut readonly_images = Vec::with_capacity(request.readonly_disks.len());
    for id in &request.readonly_disks {
        readonly_images.push(
            marketplace::resolve(
                &cloud.http,
                cloud.config.marketplace_endpoint.as_deref(),
                cloud.policy.as_ref(),
                id,
            )
            .await?,
        );
    }
    let deployment = Deployment {
        request: request.clone(),
        context_method: checked.context_method.clone(),
        image,
        readonly_images,
    };
    let stored = serde_json::to_string(&deployment)
        .map_err(|e| VmError::BadRequest(format!("cannot store the request: {e}")))?;
    let db = &cloud.db;
    let mut tx = db.pool.begin().await?;
    quotas::admit(
        db,
        &mut tx,
        &cloud.config.quotas,
        &who.name,
        i64::from(checked.cpu),
        checked.ram_mib as i64,
    )
    .await?;
    let id = db::next_id(&mut tx, "vm").await?;
    let now = db::now();
    let name = request.name.clone().unwrap_or_else(|| format!("one-{id}"));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO vms ({VM_COLUMNS}) VALUES ($1, $2, $3, $4, NULL, $5, $6, $7, $8, $9, $10, NULL, 1, $11, $11)"
    )))
    .bind(id)
    .bind(&who.name)
    .bind(&name)
    .bind(VmState::Pending.as_str())
    .bind(&checked.instance_type)
    .bind(i64::from(checked.cpu))
    .bind(checked.ram_mib as i64)
    .bind(checked.swap_mib as i64)
    .bind(&request.image)
    .bind(&stored)
    .bind(&now)
    .execute(&mut *tx)
    .await?;
    record_event(&mut tx, id, VmState::Pending, Some("accepted")).await?;
    if let Some(network) = &checked.network {
        networks::allocate(db, &mut tx, network, id, request.address).await?;
    }
    crate::pdisk::take_at_deploy(db, &mut tx, who, id, &request.persistent_disks).await?;
    let job = jobs::enqueue(&mut tx, id, Action::Deploy, &who.name).await?;
    let row = load(&mut tx, id).await?;
    let vm = view(&mut tx, &row, who.is_admin(), false).await?;
    tx.commit().await?;
    cloud.jobs_queued.notify_waiters();
    cloud.metrics.vm_requests.inc();
    Ok(VmAccepted { vm, job })
}

pub async fn load(conn: &mut AnyConnection, id: i64) -> Result<VmRow, VmError> {
    sqlx::query_as::<_, VmRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {VM_COLUMNS} FROM vms WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(VmError::NotFound(id))
}

/// The VM, if `who` may change it (or whoever owns it, with `any_owner`), its row locked
/// until the transaction ends (PostgreSQL; SQLite has one writer).
pub async fn load_for_update(
    db: &crate::db::Db,
    conn: &mut AnyConnection,
    who: &Principal,
    id: i64,
    any_owner: bool,
) -> Result<VmRow, VmError> {
    let row = sqlx::query_as::<_, VmRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {VM_COLUMNS} FROM vms WHERE id = $1{}",
        db.for_update()
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(VmError::NotFound(id))?;
    if row.owner != who.name && !who.is_admin() && !any_owner {
        return Err(VmError::NotYours(id));
    }
    Ok(row)
}

/// The VM, if `who` may see it.
async fn load_for(conn: &mut AnyConnection, who: &Principal, id: i64) -> Result<VmRow, VmError> {
    let row = load(conn, id).await?;
    if row.owner != who.name && !who.is_admin() {
        return Err(VmError::NotYours(id));
    }
    Ok(row)
}

/// Records a state change and its reason (the VM row and its history).
pub async fn set_state(
    conn: &mut AnyConnection,
    id: i64,
    state: VmState,
    reason: Option<&str>,
) -> Result<(), DbError> {
    sqlx::query("UPDATE vms SET state = $1, reason = $2, updated = $3 WHERE id = $4")
        .bind(state.as_str())
        .bind(reason)
        .bind(db::now())
        .bind(id)
        .execute(&mut *conn)
        .await?;
    record_event(conn, id, state, reason).await
}

async fn record_event(
    conn: &mut AnyConnection,
    id: i64,
    state: VmState,
    reason: Option<&str>,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO vm_events (vm_id, seq, at, state, reason) \
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_events WHERE vm_id = $1), $2, $3, $4)",
    )
    .bind(id)
    .bind(db::now())
    .bind(state.as_str())
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn view(
    conn: &mut AnyConnection,
    row: &VmRow,
    admin: bool,
    with_history: bool,
) -> Result<VmView, VmError> {
    let node = match (admin, row.node_id) {
        (true, Some(node)) => {
            sqlx::query_as::<_, (String,)>("SELECT name FROM nodes WHERE id = $1")
                .bind(node)
                .fetch_optional(&mut *conn)
                .await?
                .map(|(n,)| n)
        }
        _ => None,
    };
    let history = if with_history {
        let rows: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT at, state, reason FROM vm_events WHERE vm_id = $1 ORDER BY seq")
                .bind(row.id)
                .fetch_all(&mut *conn)
                .await?;
        rows.into_iter()
            .map(|(at, state, reason)| {
                let state = VmState::parse(&state).ok_or(DbError::Corrupt {
                    what: "vm_events.state",
                    value: state.clone(),
                })?;
                Ok(VmEvent { at, state, reason })
            })
            .collect::<Result<Vec<_>, DbError>>()?
    } else {
        Vec::new()
    };
    let leases = networks::leases_of(conn, row.id).await?;
    Ok(row.to_view(node, leases, history)?)
}

pub async fn get(cloud: &Cloud, who: &Principal, id: i64) -> Result<VmView, VmError> {
    let mut conn = cloud.db.pool.acquire().await?;
    let row = load_for(&mut conn, who, id).await?;
    view(&mut conn, &row, who.is_admin(), true).await
}

/// One page of the VMs `who` may see, newest first.
pub async fn list(
    cloud: &Cloud,
    who: &Principal,
    offset: i64,
    limit: i64,
    with_done: bool,
) -> Result<VmList, VmError> {
    let mut conn = cloud.db.pool.acquire().await?;
    let owner = (!who.is_admin()).then(|| who.name.clone());
    let conditions: Vec<&str> = [
        owner.as_ref().map(|_| "owner = $1"),
        (!with_done).then_some("state <> 'Done'"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let count_sql = format!("SELECT COUNT(*) FROM vms{filter}");
    let mut count = sqlx::query_as::<_, (i64,)>(sqlx::AssertSqlSafe(count_sql));
    if let Some(o) = &owner {
        count = count.bind(o);
    }
    let (count,) = count.fetch_one(&mut *conn).await?;
    let n = if owner.is_some() { 2 } else { 1 };
    let page_sql = format!(
        "SELECT {VM_COLUMNS} FROM vms{filter} ORDER BY id DESC LIMIT ${n} OFFSET ${}",
        n + 1
    );
    let mut page = sqlx::query_as::<_, VmRow>(sqlx::AssertSqlSafe(page_sql));
    if let Some(o) = &owner {
        page = page.bind(o);
    }
    let rows = page.bind(limit).bind(offset).fetch_all(&mut *conn).await?;
    // The page's leases and node names in two queries, not two per VM.
    let (Some(first), Some(last)) = (rows.last(), rows.first()) else {
        return Ok(VmList {
            vms: Vec::new(),
            count,
        });
    };
    let leases: Vec<(i64, String, String, String)> = sqlx::query_as(
        "SELECT vm_id, network, ip, mac FROM addresses WHERE vm_id >= $1 AND vm_id <= $2 \
         ORDER BY network, seq",
    )
    .bind(first.id)
    .bind(last.id)
    .fetch_all(&mut *conn)
    .await?;
    let mut leases_of: std::collections::HashMap<i64, Vec<networks::Lease>> =
        std::collections::HashMap::new();
    for (vm, network, ip, mac) in leases {
        let ip = ip.parse().map_err(|_| DbError::Corrupt {
            what: "addresses.ip",
            value: ip.clone(),
        })?;
        leases_of
            .entry(vm)
            .or_default()
            .push(networks::Lease { network, ip, mac });
    }
    let node_names: std::collections::HashMap<i64, String> = if who.is_admin() {
        sqlx::query_as::<_, (i64, String)>("SELECT id, name FROM nodes")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
    } else {
        Default::default()
    };
    let vms = rows
        .iter()
        .map(|row| {
            row.to_view(
                row.node_id.and_then(|n| node_names.get(&n).cloned()),
                leases_of.remove(&row.id).unwrap_or_default(),
                Vec::new(),
            )
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    Ok(VmList { vms, count })
}

/// `kill` (at once) or `shutdown` (graceful): queues the job that does it. A VM still
/// waiting for a node is simply withdrawn.
pub async fn request_stop(
    cloud: &Cloud,
    who: &Principal,
    id: i64,
    action: Action,
) -> Result<VmAccepted, VmError> {
    let db = &cloud.db;
    let mut tx = db.pool.begin().await?;
    // Lock the VM so a job claim and this request see each other.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM vms WHERE id = $1{}",
        db.for_update()
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let row = load_for(&mut tx, who, id).await?;
    let state = row.state()?;
    if state.is_final() || row.holds == 0 {
        return Err(VmError::Conflict(format!(
            "VM {id} is {} already",
            state.as_str()
        )));
    }
    if jobs::has_open(
        &mut tx,
        id,
        &[Action::Kill, Action::Shutdown, Action::Epilog],
    )
    .await?
    {
        let job = jobs::open_job(&mut tx, id).await?.unwrap_or_default();
        let vm = view(&mut tx, &row, who.is_admin(), false).await?;
        tx.commit().await?;
        return Ok(VmAccepted { vm, job });
    }
    // A deploy or hot-plug that has not started is withdrawn rather than run and undone
    // (its volumes are freed with the VM).
    for queued in [Action::Deploy, Action::Attach, Action::Detach] {
        jobs::cancel_queued(&mut tx, id, queued, "withdrawn by a kill or shutdown").await?;
    }
    let job = jobs::enqueue(&mut tx, id, action, &who.name).await?;
    let row = load(&mut tx, id).await?;
    let vm = view(&mut tx, &row, who.is_admin(), false).await?;
    tx.commit().await?;
    cloud.jobs_queued.notify_waiters();
    Ok(VmAccepted { vm, job })
}

/// Forgets a Done or Failed VM whose node resources are released.
pub async fn delete_record(cloud: &Cloud, who: &Principal, id: i64) -> Result<(), VmError> {
    let mut tx = cloud.db.pool.begin().await?;
    let row = load_for(&mut tx, who, id).await?;
    if row.holds == 1 || !row.state()?.is_final() {
        return Err(VmError::Conflict(format!(
            "VM {id} is {}: only a Done or Failed VM whose node resources are released can be deleted",
            row.state
        )));
    }
    for sql in [
        "DELETE FROM vm_events WHERE vm_id = $1",
        "DELETE FROM jobs WHERE vm_id = $1",
        "DELETE FROM vms WHERE id = $1",
    ] {
        sqlx::query(sql).bind(id).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Ends a VM's hold on quota, addresses and node room; `state` is its final state and
/// reason (None: it keeps the one it has, e.g. Failed and why).
pub async fn release(
    conn: &mut AnyConnection,
    id: i64,
    state: Option<(VmState, &str)>,
) -> Result<(), VmError> {
    networks::release(conn, id).await?;
    crate::pdisk::release(conn, id).await?;
    sqlx::query("UPDATE vms SET holds = 0, updated = $1 WHERE id = $2")
        .bind(db::now())
        .bind(id)
        .execute(&mut *conn)
        .await?;
    if let Some((state, reason)) = state {
        set_state(conn, id, state, Some(reason)).await?;
    }
    Ok(())
}

/// The console tail of a VM, from its node.
pub async fn console(
    cloud: &Cloud,
    who: &Principal,
    id: i64,
    bytes: u64,
) -> Result<Vec<u8>, VmError> {
    let (row, node) = {
        let mut conn = cloud.db.pool.acquire().await?;
        let row = load_for(&mut conn, who, id).await?;
        let node = match row.node_id {
            Some(n) => Some(crate::nodes::load(&mut conn, n).await?),
            None => None,
        };
        (row, node)
    };
    let Some(node) = node else {
        return Err(VmError::Conflict(format!(
            "VM {} has no console: it is not on a node",
            row.id
        )));
    };
    node.client(&cloud.agents)
        .console(&row.id.to_string(), bytes)
        .await
        .map_err(|e| {
            tracing::warn!(
                "VM {id}'s console cannot be read from node {}: {e}",
                node.name
            );
            // The node's address is the administrators' to know, as the VM's node is.
            VmError::Conflict(match who.is_admin() {
                true => format!("VM {id}'s console cannot be read: {e}"),
                false => format!("VM {id}'s console cannot be read now: its host does not answer"),
            })
        })
}
