//! The job queue in the database and the workers that carry jobs out.
//!
//! A job is claimed with a lease (a deadline its worker keeps pushing forward while it
//! works). A replica that dies stops renewing its leases; once one runs out, any replica
//! claims the job again and redoes it: every step is idempotent towards the node agent
//! (`PUT /vms/{id}` with the same spec, kill and delete of what is gone already are no-ops).
//! One VM's jobs run one at a time, in order.

mod steps;

use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyConnection;

use crate::api::types::{JobState, JobView};
use crate::db::{self, DbError};
use crate::Cloud;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Place the VM and have its node start it.
    Deploy,
    /// Stop it at once, then release it.
    Kill,
    /// Press its power button, stop it hard after the timeout, then release it.
    Shutdown,
    /// It has ended on its own: release its node resources.
    Epilog,
    /// Hot-plug its volumes that are being attached.
    Attach,
    /// Unplug its volumes that are being detached.
    Detach,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Kill => "kill",
            Action::Shutdown => "shutdown",
            Action::Epilog => "epilog",
            Action::Attach => "attach",
            Action::Detach => "detach",
        }
    }

    fn parse(text: &str) -> Option<Action> {
        [
            Action::Deploy,
            Action::Kill,
            Action::Shutdown,
            Action::Epilog,
            Action::Attach,
            Action::Detach,
        ]
        .into_iter()
        .find(|a| a.as_str() == text)
    }
}

/// How often an idle worker looks for jobs queued by other replicas.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// How long a claim holds without renewal; it is renewed three times as often.
fn lease(cloud: &Cloud) -> Duration {
    Duration::from_secs(cloud.config.job_lease_s)
}

fn later(d: Duration) -> String {
    db::timestamp(chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default())
}

/// Queues `action` for `vm` inside the caller's transaction.
pub async fn enqueue(
    conn: &mut AnyConnection,
    vm: i64,
    action: Action,
    owner: &str,
) -> Result<i64, DbError> {
    let id = db::next_id(conn, "job").await?;
    let now = db::now();
    sqlx::query(
        "INSERT INTO jobs (id, vm_id, action, state, owner, not_before, created, updated) \
         VALUES ($1, $2, $3, 'queued', $4, $5, $5, $5)",
    )
    .bind(id)
    .bind(vm)
    .bind(action.as_str())
    .bind(owner)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// Whether `vm` has a queued or running job of one of these kinds.
pub async fn has_open(
    conn: &mut AnyConnection,
    vm: i64,
    actions: &[Action],
) -> Result<bool, DbError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT action FROM jobs WHERE vm_id = $1 AND state IN ('queued', 'running')",
    )
    .bind(vm)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .any(|(a,)| Action::parse(a).is_some_and(|a| actions.contains(&a))))
}

/// The newest open job of `vm`.
pub async fn open_job(conn: &mut AnyConnection, vm: i64) -> Result<Option<i64>, DbError> {
    let row: Option<(i64,)> = sqlx::query_as(
        "SELECT id FROM jobs WHERE vm_id = $1 AND state IN ('queued', 'running') \
         ORDER BY id DESC LIMIT 1",
    )
    .bind(vm)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(id,)| id))
}

/// Fails `vm`'s queued (not yet claimed) jobs of kind `action`.
pub async fn cancel_queued(
    conn: &mut AnyConnection,
    vm: i64,
    action: Action,
    why: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE jobs SET state = 'failed', error = $1, updated = $2 \
         WHERE vm_id = $3 AND action = $4 AND state = 'queued'",
    )
    .bind(why)
    .bind(db::now())
    .bind(vm)
    .bind(action.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: i64,
    vm_id: i64,
    action: String,
    state: String,
    owner: String,
    progress: i64,
    attempts: i64,
    error: Option<String>,
    created: String,
    updated: String,
}

const JOB_COLUMNS: &str =
    "id, vm_id, action, state, owner, progress, attempts, error, created, updated";

impl JobRow {
    fn view(self) -> Result<(JobView, String), DbError> {
        let state = match self.state.as_str() {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "success" => JobState::Success,
            "failed" => JobState::Failed,
            other => {
                return Err(DbError::Corrupt {
                    what: "jobs.state",
                    value: other.to_owned(),
                })
            }
        };
        Ok((
            JobView {
                id: self.id,
                vm: self.vm_id,
                action: self.action,
                state,
                progress: self.progress,
                attempts: self.attempts,
                error: self.error,
                created: self.created,
                updated: self.updated,
            },
            self.owner,
        ))
    }
}

/// A job and the user it works for.
pub async fn get(cloud: &Cloud, id: i64) -> Result<Option<(JobView, String)>, DbError> {
    let job = sqlx::query_as::<_, JobRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&cloud.db.pool)
    .await?;
    job.map(JobRow::view).transpose()
}

/// One page of the jobs of `owner` (None: everyone's), newest first, and how many there
/// are in all.
pub async fn list(
    cloud: &Cloud,
    owner: Option<&str>,
    offset: i64,
    limit: i64,
) -> Result<(i64, Vec<JobView>), DbError> {
    let mut conn = cloud.db.pool.acquire().await?;
    let (filter, first) = match owner {
        Some(_) => (" WHERE owner = $1", 2),
        None => ("", 1),
    };
    let mut count = sqlx::query_as::<_, (i64,)>(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM jobs{filter}"
    )));
    let mut page = sqlx::query_as::<_, JobRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs{filter} ORDER BY id DESC LIMIT ${first} OFFSET ${}",
        first + 1
    )));
    if let Some(o) = owner {
        count = count.bind(o);
        page = page.bind(o);
    }
    let (count,) = count.fetch_one(&mut *conn).await?;
    let rows = page.bind(limit).bind(offset).fetch_all(&mut *conn).await?;
    let jobs = rows
        .into_iter()
        .map(|r| r.view().map(|(v, _)| v))
        .collect::<Result<_, _>>()?;
    Ok((count, jobs))
}

/// A job this replica holds.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: i64,
    pub vm: i64,
    pub action: Action,
    pub attempts: i64,
}

/// Claims the oldest runnable job whose VM has no other job running or ahead of it.
async fn claim(cloud: &Cloud) -> Result<Option<Claimed>, DbError> {
    let db = &cloud.db;
    let now = db::now();
    let mut tx = db.pool.begin().await?;
    // Jobs waiting behind another job of their VM are left out here, so a run of them
    // can never hide the runnable ones behind them.
    let candidates: Vec<(i64, i64, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT j.id, j.vm_id, j.action, j.attempts FROM jobs j \
         WHERE ((j.state = 'queued' AND j.not_before <= $1) \
                OR (j.state = 'running' AND j.lease_until < $1)) \
         AND NOT EXISTS (SELECT 1 FROM jobs b WHERE b.vm_id = j.vm_id AND b.id <> j.id AND \
             ((b.state = 'running' AND b.lease_until >= $1) \
              OR (b.state IN ('queued', 'running') AND b.id < j.id))) \
         ORDER BY j.id LIMIT 16{}",
        db.skip_locked()
    )))
    .bind(&now)
    .fetch_all(&mut *tx)
    .await?;
    for (id, vm, action, attempts) in candidates {
        // The VM's row serialises claims of its jobs across replicas.
        let locked: Option<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM vms WHERE id = $1{}",
            db.skip_locked()
        )))
        .bind(vm)
        .fetch_optional(&mut *tx)
        .await?;
        if locked.is_none() {
            continue;
        }
        let (blocking,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM jobs WHERE vm_id = $1 AND id <> $2 AND \
             ((state = 'running' AND lease_until >= $3) OR (state = 'queued' AND id < $2))",
        )
        .bind(vm)
        .bind(id)
        .bind(&now)
        .fetch_one(&mut *tx)
        .await?;
        if blocking > 0 {
            continue;
        }
        let Some(action) = Action::parse(&action) else {
            sqlx::query("UPDATE jobs SET state = 'failed', error = $1 WHERE id = $2")
                .bind(format!("unknown action '{action}'"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            continue;
        };
        sqlx::query(
            "UPDATE jobs SET state = 'running', claimed_by = $1, lease_until = $2, \
             attempts = attempts + 1, updated = $3 WHERE id = $4",
        )
        .bind(&cloud.replica)
        .bind(later(lease(cloud)))
        .bind(&now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(Some(Claimed {
            id,
            vm,
            action,
            attempts: attempts + 1,
        }));
    }
    tx.commit().await?;
    Ok(None)
}

/// Pushes the job's lease forward while this replica works on it.
async fn renew(cloud: &Cloud, job: i64) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND state = 'running' AND claimed_by = $3",
    )
    .bind(later(lease(cloud)))
    .bind(job)
    .bind(&cloud.replica)
    .execute(&cloud.db.pool)
    .await?;
    Ok(())
}

/// How a job step ended.
pub enum Outcome {
    Done,
    Failed(String),
    /// Try again after this long (a node that does not answer); counts as an attempt.
    Retry(Duration, String),
    /// Look again after this long (no room anywhere yet); waiting is not failing, so the
    /// job's attempts start again from zero.
    Wait(Duration, String),
}

async fn finish(cloud: &Cloud, job: &Claimed, outcome: &Outcome) -> Result<(), DbError> {
    let now = db::now();
    let (sql, error, not_before) = match outcome {
        Outcome::Done => (
            "UPDATE jobs SET state = 'success', progress = 100, error = $1, updated = $2, \
             not_before = $3 WHERE id = $4 AND claimed_by = $5",
            None,
            now.clone(),
        ),
        Outcome::Failed(e) => (
            "UPDATE jobs SET state = 'failed', error = $1, updated = $2, not_before = $3 \
             WHERE id = $4 AND claimed_by = $5",
            Some(e.clone()),
            now.clone(),
        ),
        Outcome::Retry(after, e) => (
            "UPDATE jobs SET state = 'queued', error = $1, updated = $2, not_before = $3, \
             lease_until = NULL, claimed_by = NULL WHERE id = $4 AND claimed_by = $5",
            Some(e.clone()),
            later(*after),
        ),
        Outcome::Wait(after, e) => (
            "UPDATE jobs SET state = 'queued', error = $1, updated = $2, not_before = $3, \
             lease_until = NULL, claimed_by = NULL, attempts = 0 WHERE id = $4 AND claimed_by = $5",
            Some(e.clone()),
            later(*after),
        ),
    };
    sqlx::query(sql)
        .bind(error)
        .bind(&now)
        .bind(not_before)
        .bind(job.id)
        .bind(&cloud.replica)
        .execute(&cloud.db.pool)
        .await?;
    Ok(())
}

/// The task renewing a claim; it stops with the step, however the step ends.
struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One worker: claims jobs and carries them out until the process ends.
async fn worker(cloud: Arc<Cloud>) {
    loop {
        let job = match claim(&cloud).await {
            Ok(Some(job)) => job,
            Ok(None) => {
                let _ = tokio::time::timeout(IDLE_POLL, cloud.jobs_queued.notified()).await;
                continue;
            }
            Err(e) => {
                tracing::error!("cannot claim a job: {e}");
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
        };
        tracing::debug!(
            job = job.id,
            vm = job.vm,
            action = job.action.as_str(),
            "claimed"
        );
        let started = std::time::Instant::now();
        let renewing = {
            let cloud = cloud.clone();
            let id = job.id;
            Renewal(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease(&cloud) / 3).await;
                    if let Err(e) = renew(&cloud, id).await {
                        tracing::warn!(job = id, "cannot renew the job's lease: {e}");
                    }
                }
            }))
        };
        let outcome = steps::run(&cloud, &job).await;
        drop(renewing);
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => Outcome::Retry(Duration::from_secs(2), e.to_string()),
        };
        match &outcome {
            Outcome::Done => tracing::info!(
                job = job.id,
                vm = job.vm,
                action = job.action.as_str(),
                "done"
            ),
            Outcome::Failed(e) => tracing::warn!(
                job = job.id,
                vm = job.vm,
                action = job.action.as_str(),
                "failed: {e}"
            ),
            Outcome::Retry(after, e) | Outcome::Wait(after, e) => tracing::info!(
                job = job.id,
                vm = job.vm,
                action = job.action.as_str(),
                "again in {after:?}: {e}"
            ),
        }
        cloud
            .metrics
            .observe_job(job.action.as_str(), &outcome, started.elapsed());
        if let Err(e) = finish(&cloud, &job, &outcome).await {
            tracing::error!(job = job.id, "cannot record the job's end: {e}");
        }
        // A finished job may unblock the VM's next one.
        cloud.jobs_queued.notify_waiters();
    }
}

/// Starts this replica's job workers.
pub fn start_workers(cloud: &Arc<Cloud>) {
    for _ in 0..cloud.config.job_workers {
        tokio::spawn(worker(cloud.clone()));
    }
}
