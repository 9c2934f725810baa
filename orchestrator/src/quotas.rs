//! Per-user quotas on vCPUs, memory and VM count, checked inside the transaction that
//! creates the VM (the user's row is locked first on PostgreSQL; SQLite's single connection
//! serialises creates), so concurrent requests can never pass a quota together.

use sqlx::AnyConnection;

use crate::api::types::QuotaView;
use crate::config::QuotaConfig;
use crate::db::{Db, DbError};

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// StratusLab's words, e.g. `CPU quota exceeded (Quota: 20, Used: 19, Requested: 2).`
    #[error("{what} quota exceeded (Quota: {quota}, Used: {used}, Requested: {requested}).")]
    Exceeded {
        what: &'static str,
        quota: i64,
        used: i64,
        requested: i64,
    },
    #[error("no user '{0}'")]
    NoUser(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for QuotaError {
    fn from(e: sqlx::Error) -> Self {
        QuotaError::Db(e.into())
    }
}

/// A user's limits (0: none) and what their VMs hold now.
pub async fn usage(
    db: &Db,
    conn: &mut AnyConnection,
    defaults: &QuotaConfig,
    user: &str,
    lock: bool,
) -> Result<QuotaView, QuotaError> {
    let row: Option<(Option<i64>, Option<i64>, Option<i64>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT cpu_quota, memory_quota_mib, vm_quota FROM users WHERE name = $1{}",
            if lock { db.for_update() } else { "" }
        )))
        .bind(user)
        .fetch_optional(&mut *conn)
        .await?;
    let Some((cpu, memory, vms)) = row else {
        return Err(QuotaError::NoUser(user.to_owned()));
    };
    // PostgreSQL's SUM of BIGINT is NUMERIC: cast it back for both databases.
    let (cpu_used, memory_used, vms_used): (i64, i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(vcpus), 0) AS BIGINT), CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT), \
         COUNT(*) FROM vms WHERE owner = $1 AND holds = 1",
    )
    .bind(user)
    .fetch_one(&mut *conn)
    .await?;
    Ok(QuotaView {
        user: user.to_owned(),
        cpu: cpu.unwrap_or(defaults.cpu),
        cpu_used,
        memory_mib: memory.unwrap_or(defaults.memory_mib),
        memory_used_mib: memory_used,
        vms: vms.unwrap_or(defaults.vms),
        vms_used,
    })
}

/// Refuses a new VM of `cpu` vCPUs and `memory_mib` that would exceed one of the user's
/// quotas. Call inside the creating transaction.
pub async fn admit(
    db: &Db,
    conn: &mut AnyConnection,
    defaults: &QuotaConfig,
    user: &str,
    cpu: i64,
    memory_mib: i64,
) -> Result<(), QuotaError> {
    let u = usage(db, conn, defaults, user, true).await?;
    for (what, quota, used, requested) in [
        ("CPU", u.cpu, u.cpu_used, cpu),
        ("Memory", u.memory_mib, u.memory_used_mib, memory_mib),
        ("VM", u.vms, u.vms_used, 1),
    ] {
        if quota > 0 && used + requested > quota {
            return Err(QuotaError::Exceeded {
                what,
                quota,
                used,
                requested,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_stratuslabs() {
        let e = QuotaError::Exceeded {
            what: "CPU",
            quota: 20,
            used: 19,
            requested: 2,
        };
        assert_eq!(
            e.to_string(),
            "CPU quota exceeded (Quota: 20, Used: 19, Requested: 2)."
        );
    }
}
