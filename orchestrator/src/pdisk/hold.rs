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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyConnection;
use tokio::time::Instant;

use super::{VolumeError, VolumeRow};
use crate::db::{self, Db, DbError};

/// How often the holder of a passing row shows that it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a passing row may go without a sign of life before another takes it over.
pub const ABANDONED: Duration = Duration::from_secs(30);
/// How soon a renewal that failed is tried again: waiting a whole heartbeat left one more
/// try before the hold lapsed, so a database away for a little over ten seconds cost the
/// work under way.
const RENEWAL_RETRY: Duration = Duration::from_secs(1);

/// How far the replicas' clocks may be apart: a holder stops touching the storage this
/// long before its row could look abandoned to another replica.
const CLOCK_MARGIN: Duration = Duration::from_secs(5);

/// The right to finish a volume's passing state: the stamp its holder last wrote.
#[derive(Debug)]
pub struct Hold {
    uuid: String,
    stamp: String,
    /// When the hold stops protecting work by this host's monotonic clock: ABANDONED after
    /// the stamp was taken, less CLOCK_MARGIN.
    lapses: Instant,
}

/// Tells work on the volume that runs off the async threads (a copy's thread, which a
/// lost hold cannot drop) whether it may still write the storage. It may until the hold
/// would lapse had it not been renewed since, and no longer once the hold is lost: a
/// holder that stalls or cannot reach the database stops writing before another replica
/// may take the volume over and make it anew beside it. (A write already under way when
/// the hold lapses still lands: only the storage itself could refuse it.)
#[derive(Clone, Debug)]
pub struct Fence(Arc<FenceState>);

#[derive(Debug)]
struct FenceState {
    start: std::time::Instant,
    /// Milliseconds after `start` until which the work may write; 0 once revoked.
    until_ms: AtomicU64,
}

impl Fence {
    fn until(lapses: Instant) -> Fence {
        // Not yet revoked (0) until `extend` sets when it lapses.
        let fence = Fence(Arc::new(FenceState {
            start: std::time::Instant::now(),
            until_ms: AtomicU64::new(u64::MAX),
        }));
        fence.extend(lapses);
        fence
    }

    /// Whether the work may write the volume's storage now. Once it says no, it says no
    /// for good: a renewal that gets through a moment after the lapse does not undo a
    /// copy's stop.
    pub fn holds(&self) -> bool {
        let now_ms = self.0.start.elapsed().as_millis() as u64;
        if now_ms < self.0.until_ms.load(Ordering::Acquire) {
            return true;
        }
        self.revoke();
        false
    }

    fn extend(&self, lapses: Instant) {
        let until = lapses.into_std().saturating_duration_since(self.0.start);
        let until = until.as_millis() as u64;
        // A revoked fence stays revoked.
        let _ = self
            .0
            .until_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now != 0).then_some(until)
            });
    }

    fn revoke(&self) {
        self.0.until_ms.store(0, Ordering::Release);
    }
}

/// When a hold whose stamp is `stamp` lapses for this host (an unreadable stamp: now).
fn lapses_after(stamp: &str) -> Instant {
    let now = Instant::now();
    let Ok(at) = db::parse_time("updated", stamp) else {
        // As `abandoned` sees it.
        return now;
    };
    // A stamp from a clock ahead of this one counts as taken now.
    let age = chrono::Utc::now()
        .signed_duration_since(at)
        .to_std()
        .unwrap_or_default();
    (now + ABANDONED)
        .checked_sub(age + CLOCK_MARGIN)
        .unwrap_or(now)
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
            lapses: lapses_after(&stamp),
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

    /// Runs the work `start` makes on the volume while renewing the hold; the work gets a
    /// [`Fence`] for what it runs off the async threads. [`VolumeError::TakenOver`] if the
    /// hold was lost meanwhile (this replica stalled, or could not renew it, for longer
    /// than [`ABANDONED`]): the volume is another's to finish then, the work is dropped
    /// (an `rbd` child with it) and its threads stop at their next look at the fence.
    pub async fn keep_while<T, W>(
        &mut self,
        db: &Db,
        start: impl FnOnce(Fence) -> W,
    ) -> Result<T, VolumeError>
    where
        W: Future<Output = Result<T, VolumeError>>,
    {
        let fence = Fence::until(self.lapses);
        let work = start(fence.clone());
        tokio::pin!(work);
        let mut wait = HEARTBEAT;
        loop {
            tokio::select! {
                // A stall between the last renewal and the end is caught by `finish`.
                done = &mut work => return self.ended(&fence, done),
                _ = tokio::time::sleep(wait) => {}
            }
            let lapses = self.lapses;
            let renewed = tokio::select! {
                done = &mut work => return self.ended(&fence, done),
                renewed = tokio::time::timeout_at(lapses, self.renew(db)) => renewed,
            };
            match renewed {
                Ok(Ok(true)) => {
                    fence.extend(self.lapses);
                    wait = HEARTBEAT;
                }
                // The next renewal may get through before the hold lapses.
                Ok(Err(e)) if Instant::now() < self.lapses => {
                    tracing::warn!(volume = %self.uuid, error = %e, "cannot renew the hold");
                    wait = RENEWAL_RETRY;
                }
                _ => {
                    fence.revoke();
                    return Err(self.lost());
                }
            }
        }
    }

    /// What the held work came to: a failure after the hold lapsed (the work stopped at
    /// the fence, most likely) leaves the volume to whoever takes it over.
    fn ended<T>(&self, fence: &Fence, done: Result<T, VolumeError>) -> Result<T, VolumeError> {
        match done {
            Err(_) if !fence.holds() => Err(self.lost()),
            done => done,
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
        self.held(removed)
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
        self.held(turned)?;
        self.restamp(stamp);
        Ok(())
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
            self.restamp(stamp);
        }
        Ok(renewed == 1)
    }

    fn restamp(&mut self, stamp: String) {
        self.lapses = lapses_after(&stamp);
        self.stamp = stamp;
    }

    /// Ok when the statement guarded by the stamp changed the row: this is its holder.
    fn held(&self, rows_affected: u64) -> Result<(), VolumeError> {
        match rows_affected {
            1 => Ok(()),
            _ => Err(self.lost()),
        }
    }

    fn lost(&self) -> VolumeError {
        VolumeError::TakenOver(self.uuid.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn creating_volume(db: &Db, uuid: &str, stamp: &str) {
        sqlx::query(
            "INSERT INTO volumes (uuid, owner, tag, size_gib, visibility, kind, pool, state, \
             location, created, updated) VALUES ($1, 'alice', '', 1, 'private', \
             'DATA_IMAGE_RAW_READ_WRITE', 'default', 'creating', '/nowhere', $2, $2)",
        )
        .bind(uuid)
        .bind(stamp)
        .execute(&db.pool)
        .await
        .unwrap();
    }

    /// A database in `dir` with volume "v" being created, and the stamp of its holder.
    async fn creating_volume_in(dir: &tempfile::TempDir) -> (Db, String) {
        let db = Db::open(&format!("sqlite:{}", dir.path().join("db").display()))
            .await
            .unwrap();
        let stamp = db::now();
        creating_volume(&db, "v", &stamp).await;
        (db, stamp)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_hold_was_taken_over_stops_at_the_fence() {
        let dir = tempfile::tempdir().unwrap();
        let (db, stamp) = creating_volume_in(&dir).await;
        let mut hold = Hold::new("v", stamp);
        // Another replica took the row over, as recovery does once its stamp looks old
        // (this replica stalled): the next renewal finds it gone.
        sqlx::query("UPDATE volumes SET updated = '2001-01-01T00:00:00.000000Z'")
            .execute(&db.pool)
            .await
            .unwrap();
        let (stopped, copy_stopped) = std::sync::mpsc::channel();
        let worked = hold
            .keep_while(&db, |fence| async move {
                // A copy's thread: dropping the work does not stop it, the fence does.
                let copy = tokio::task::spawn_blocking(move || {
                    while fence.holds() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let _ = stopped.send(());
                });
                let _ = copy.await;
                Ok(())
            })
            .await;
        assert!(
            matches!(worked, Err(VolumeError::TakenOver(_))),
            "{worked:?}"
        );
        copy_stopped
            .recv_timeout(Duration::from_secs(1))
            .expect("the copy's thread went on writing after the hold was lost");
    }

    /// The database away for a while after a heartbeat: the renewal is tried again within
    /// seconds of coming back, not a whole heartbeat later, when the hold may have lapsed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renewal_that_failed_is_tried_again_soon() {
        let dir = tempfile::tempdir().unwrap();
        let (db, stamp) = creating_volume_in(&dir).await;
        let mut hold = Hold::new("v", stamp.clone());
        let started = Instant::now();
        let updated = |db: Db| async move {
            sqlx::query_scalar::<_, String>("SELECT updated FROM volumes WHERE uuid = 'v'")
                .fetch_one(&db.pool)
                .await
                .unwrap()
        };
        let worked = hold
            .keep_while(&db, |_fence| {
                let db = db.clone();
                async move {
                    // The renewal due at the heartbeat finds no table to write.
                    sqlx::query("ALTER TABLE volumes RENAME TO volumes_away")
                        .execute(&db.pool)
                        .await
                        .unwrap();
                    tokio::time::sleep_until(started + HEARTBEAT + Duration::from_millis(500))
                        .await;
                    sqlx::query("ALTER TABLE volumes_away RENAME TO volumes")
                        .execute(&db.pool)
                        .await
                        .unwrap();
                    // Renewed within a few seconds of coming back, not at the next heartbeat.
                    let deadline = started + HEARTBEAT + Duration::from_secs(5);
                    while updated(db.clone()).await == stamp {
                        assert!(
                            Instant::now() < deadline,
                            "the failed renewal was not retried"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(())
                }
            })
            .await;
        assert!(worked.is_ok(), "{worked:?}");
    }

    #[test]
    fn a_fence_lapses_before_another_replica_may_take_the_volume_over() {
        let stamped = |age: Duration| {
            let at = chrono::Utc::now() - chrono::Duration::from_std(age).unwrap();
            Fence::until(lapses_after(&db::timestamp(at)))
        };
        assert!(stamped(Duration::ZERO).holds());
        assert!(stamped(ABANDONED - CLOCK_MARGIN - Duration::from_secs(2)).holds());
        // Not renewed for ABANDONED less the clock margin: others may see it abandoned.
        assert!(!stamped(ABANDONED - CLOCK_MARGIN).holds());
        assert!(!stamped(ABANDONED * 10).holds());
        let fence = stamped(Duration::ZERO);
        fence.revoke();
        assert!(!fence.holds());
        // A renewal after the lapse does not revive it: the copy that saw it lapse stopped.
        fence.extend(Instant::now() + ABANDONED);
        assert!(!fence.holds());
        let lapsed = stamped(ABANDONED);
        assert!(!lapsed.holds());
        lapsed.extend(Instant::now() + ABANDONED);
        assert!(!lapsed.holds());
        assert!(!Fence::until(lapses_after("not a time")).holds());
    }
}
