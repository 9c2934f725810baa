//! Who works on a volume while it is `creating` or `deleting`. Several replicas share one
//! database, and any of them may be killed mid-way, so a passing state alone does not say
//! whether its storage is being made (or removed) right now or was left half-done.
//!
//! The row's `updated` stamp says it: whoever moves a row into a passing state holds it
//! with the stamp it wrote, and renews the stamp every [`HEARTBEAT`] while it works. A row
//! whose stamp is older than [`ABANDONED`] was left: anyone may take it over, by replacing
//! exactly that stamp — so of two replicas (or a restart and a deployment) one wins, and
//! nobody remakes a snapshot a running VM writes to while its maker still finishes it.

use std::future::Future;
use std::time::Duration;

use sqlx::AnyConnection;

use super::{VolumeError, VolumeRow};
use crate::db::{self, Db, DbError};

/// How often the holder of a passing row shows that it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a passing row may go without a sign of life before another takes it over.
pub const ABANDONED: Duration = Duration::from_secs(30);

/// The right to finish a volume's passing state: the stamp its holder last wrote.
#[derive(Debug)]
pub struct Hold {
    uuid: String,
    stamp: String,
}

/// Whether the row's holder has stopped showing signs of life.
pub fn abandoned(updated: &str) -> bool {
    let Ok(updated) = db::parse_time("updated", updated) else {
        return true;
    };
    chrono::Utc::now()
        .signed_duration_since(updated)
        .to_std()
        .is_ok_and(|age| age > ABANDONED)
}

impl Hold {
    /// The hold of whoever just wrote `stamp` into the row (with its passing state).
    pub fn new(uuid: &str, stamp: String) -> Hold {
        Hold {
            uuid: uuid.to_owned(),
            stamp,
        }
    }

    /// Takes over `row`, in a passing state, from a holder that has stopped showing signs
    /// of life. `None` while it is alive, or when another took it over first.
    pub async fn take_over(
        conn: &mut AnyConnection,
        row: &VolumeRow,
    ) -> Result<Option<Hold>, DbError> {
        if !abandoned(&row.updated) {
            return Ok(None);
        }
        let stamp = db::now();
        let taken = sqlx::query(
            "UPDATE volumes SET updated = $1 WHERE uuid = $2 AND state = $3 AND updated = $4",
        )
        .bind(&stamp)
        .bind(&row.uuid)
        .bind(&row.state)
        .bind(&row.updated)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok((taken == 1).then(|| Hold::new(&row.uuid, stamp)))
    }

    /// Runs `work` on the volume while renewing the hold. [`VolumeError::TakenOver`] if
    /// the hold was lost meanwhile (this replica stalled for longer than [`ABANDONED`]):
    /// the volume is another's to finish then, and `work`'s result must be left alone.
    pub async fn keep_while<T>(
        &mut self,
        db: &Db,
        work: impl Future<Output = Result<T, VolumeError>>,
    ) -> Result<T, VolumeError> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                // A stall between the last renewal and the end is caught by `finish`.
                done = &mut work => return done,
                _ = tokio::time::sleep(HEARTBEAT) => match self.renew(db).await {
                    Ok(true) => {}
                    Ok(false) => return Err(self.lost()),
                    // The work goes on (dropping it would not stop a copy's thread); the
                    // next renewal may get through, and `finish` checks the hold at the end.
                    Err(e) => tracing::warn!(volume = %self.uuid, error = %e, "cannot renew the hold"),
                },
            }
        }
    }

    /// Ends the passing state: the row becomes `state`, if this is still its holder.
    pub async fn finish(
        &mut self,
        conn: &mut AnyConnection,
        state: &str,
    ) -> Result<(), VolumeError> {
        self.turn(conn, state).await
    }

    /// Removes the row, if this is still its holder.
    pub async fn forget(&self, conn: &mut AnyConnection) -> Result<(), VolumeError> {
        let removed = sqlx::query(
            "DELETE FROM volumes WHERE uuid = $1 AND updated = $2 \
             AND state IN ('creating', 'deleting')",
        )
        .bind(&self.uuid)
        .bind(&self.stamp)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if removed == 1 {
            Ok(())
        } else {
            Err(self.lost())
        }
    }

    /// Moves the held row to `state` if this is still its holder, and keeps holding it
    /// (another passing state: a failed creation turning `deleting`).
    pub async fn turn(&mut self, conn: &mut AnyConnection, state: &str) -> Result<(), VolumeError> {
        let stamp = db::now();
        let turned = sqlx::query(
            "UPDATE volumes SET state = $1, updated = $2 WHERE uuid = $3 AND updated = $4 \
             AND state IN ('creating', 'deleting')",
        )
        .bind(state)
        .bind(&stamp)
        .bind(&self.uuid)
        .bind(&self.stamp)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if turned == 1 {
            self.stamp = stamp;
            Ok(())
        } else {
            Err(self.lost())
        }
    }

    async fn renew(&mut self, db: &Db) -> Result<bool, DbError> {
        let stamp = db::now();
        let renewed = sqlx::query(
            "UPDATE volumes SET updated = $1 WHERE uuid = $2 AND updated = $3 \
             AND state IN ('creating', 'deleting')",
        )
        .bind(&stamp)
        .bind(&self.uuid)
        .bind(&self.stamp)
        .execute(&db.pool)
        .await?
        .rows_affected();
        if renewed == 1 {
            self.stamp = stamp;
        }
        Ok(renewed == 1)
    }

    fn lost(&self) -> VolumeError {
        VolumeError::TakenOver(self.uuid.clone())
    }
}
