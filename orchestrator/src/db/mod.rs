//! The cloud's truth: one database, SQLite (a file, zero set-up, one orchestrator) or
//! PostgreSQL (several replicas). Both run the same migrations and the same queries through
//! sqlx's `Any` driver; the few places where their SQL differs (row locks) ask
//! [`Db::backend`].

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::any::AnyPoolOptions;
use sqlx::AnyConnection;
use sqlx::{AnyPool, Executor};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://…")]
    Url(String),
    #[error("cannot open the database: {0}")]
    Open(#[source] sqlx::Error),
    #[error("cannot bring the database schema up to date: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("the database holds a bad value in {what}: {value:?}")]
    Corrupt { what: &'static str, value: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Db {
    /// Opens (creating a SQLite file if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
            let url = if rest.contains('?') {
                url.to_owned()
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(DbError::Url(url.to_owned()));
        };
        let options = match backend {
            // One connection: SQLite has one writer, and a single connection makes every
            // transaction serial, so check-then-write sequences need no row locks and no
            // transaction ever fails on a lock upgrade.
            Backend::Sqlite => AnyPoolOptions::new().max_connections(1).after_connect(
                |conn: &mut AnyConnection, _| {
                    Box::pin(async move {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                        Ok(())
                    })
                },
            ),
            Backend::Postgres => AnyPoolOptions::new().max_connections(16),
        };
        let pool = options
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .map_err(DbError::Open)?;
        MIGRATOR.run(&pool).await.map_err(DbError::Migrate)?;
        Ok(Db { pool, backend })
    }

    /// ` FOR UPDATE` where rows can be locked (PostgreSQL); SQLite's single connection
    /// already serialises every transaction.
    pub fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// ` FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas claiming work pass each other's
    /// rows by instead of waiting for them.
    pub fn skip_locked(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

/// The next value of a named counter (VM, job and node ids), inside the caller's
/// transaction.
pub async fn next_id(conn: &mut AnyConnection, counter: &str) -> Result<i64, DbError> {
    let (value,): (i64,) =
        sqlx::query_as("UPDATE counters SET value = value + 1 WHERE name = $1 RETURNING value")
            .bind(counter)
            .fetch_one(&mut *conn)
            .await?;
    Ok(value)
}

/// Times are stored as fixed-width RFC 3339 text in UTC, so text order is time order.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn now() -> String {
    timestamp(Utc::now())
}

pub fn parse_time(what: &'static str, value: &str) -> Result<DateTime<Utc>, DbError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| DbError::Corrupt {
            what,
            value: value.to_owned(),
        })
}
