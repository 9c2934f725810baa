//! Users, their password hashes (Argon2id) and roles. StratusLab's roles: `::ADMIN` (sees
//! and controls everything), `::USER` (any authenticated user: their own VMs and volumes),
//! `::ANON` (nobody logged in: nothing but the entry point).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::db::{Db, DbError};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user '{0}' already exists")]
    Exists(String),
    #[error("no user '{0}'")]
    Unknown(String),
    #[error("'{0}' is not a valid user name: use 1 to 64 letters, digits, '.', '_', '-' or '@', not dots alone")]
    BadName(String),
    #[error("the password must not be empty")]
    EmptyPassword,
    #[error("cannot hash the password: {0}")]
    Hash(argon2::password_hash::Error),
    #[error("{reason}: give the line `stratus-hash-password` printed (Argon2 `$argon2id$...`, or StratusLab's bcrypt `$2b$...`)")]
    BadHash { reason: String },
    #[error("cannot delete user '{user}': they still have {vms} VM(s); kill them first")]
    HasVms { user: String, vms: i64 },
    /// A new user of the same name would otherwise own them.
    #[error("cannot delete user '{user}': they still own {volumes} volume(s); delete them first")]
    HasVolumes { user: String, volumes: i64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for UserError {
    fn from(e: sqlx::Error) -> Self {
        UserError::Db(e.into())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    fn parse(text: &str) -> Result<Role, DbError> {
        match text {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            other => Err(DbError::Corrupt {
                what: "users.role",
                value: other.to_owned(),
            }),
        }
    }

    /// StratusLab's name for the role.
    pub fn stratuslab_name(self) -> &'static str {
        match self {
            Role::Admin => "::ADMIN",
            Role::User => "::USER",
        }
    }
}

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

fn valid_name(name: &str) -> bool {
    crate::names::valid(name, &['.', '_', '-', '@'])
}

pub fn hash_password(password: &str) -> Result<String, UserError> {
    if password.is_empty() {
        return Err(UserError::EmptyPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(UserError::Hash)
}

/// What an administrator gives for an account: the password itself, or the hash the user
/// made with `stratus-hash-password` so that the administrator never learns the password.
#[derive(Clone, Debug)]
pub enum Secret {
    Password(String),
    Hash(String),
}

impl Secret {
    fn stored_hash(&self) -> Result<String, UserError> {
        match self {
            Secret::Password(password) => hash_password(password),
            Secret::Hash(hash) => checked_hash(hash.trim()).map(str::to_owned),
        }
    }
}

/// The most a given hash may make a login check cost: the hash comes from the user, and
/// every wrong password pays for it again (four checks run at once).
const MAX_ARGON2_MEMORY_KIB: u32 = 64 * 1024;
const MAX_ARGON2_PASSES: u32 = 10;
const MAX_ARGON2_LANES: u32 = 4;
const MAX_BCRYPT_COST: u32 = 14;

/// Checks that a given hash is one a login can be verified against, at a bounded cost.
fn checked_hash(hash: &str) -> Result<&str, UserError> {
    let bad = |reason: String| UserError::BadHash { reason };
    if is_bcrypt(hash) {
        let parts: bcrypt::HashParts = hash
            .parse()
            .map_err(|e| bad(format!("not a bcrypt hash ({e})")))?;
        if parts.get_cost() > MAX_BCRYPT_COST {
            return Err(bad(format!(
                "bcrypt cost {} is more than {MAX_BCRYPT_COST}",
                parts.get_cost()
            )));
        }
        return Ok(hash);
    }
    let parsed = PasswordHash::new(hash).map_err(|e| bad(format!("not a password hash ({e})")))?;
    if argon2::Algorithm::try_from(parsed.algorithm).is_err() {
        return Err(bad(format!("'{}' is not an Argon2 hash", parsed.algorithm)));
    }
    let params = argon2::Params::try_from(&parsed)
        .map_err(|e| bad(format!("its Argon2 parameters are invalid ({e})")))?;
    if parsed.hash.is_none() {
        return Err(bad("it holds no hash".to_owned()));
    }
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB
        || params.t_cost() > MAX_ARGON2_PASSES
        || params.p_cost() > MAX_ARGON2_LANES
    {
        return Err(bad(format!(
            "its Argon2 cost (m={}, t={}, p={}) is more than m={MAX_ARGON2_MEMORY_KIB}, \
             t={MAX_ARGON2_PASSES}, p={MAX_ARGON2_LANES}",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        )));
    }
    Ok(hash)
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|prefix| hash.starts_with(prefix))
}

/// Whether `password` is the one `stored` was made from.
fn verify(password: &str, stored: &str) -> bool {
    if is_bcrypt(stored) {
        return bcrypt::verify(password, stored).unwrap_or(false);
    }
    PasswordHash::new(stored)
        .map(|parsed| {
            // The parameters are the hash's own: Argon2::default() only names the algorithm.
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A password for a new account: 18 random bytes, URL-safe base64.
pub fn generate_password() -> String {
    let mut bytes = [0u8; 18];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub async fn add(db: &Db, name: &str, secret: Secret, role: Role) -> Result<(), UserError> {
    if !valid_name(name) {
        return Err(UserError::BadName(name.to_owned()));
    }
    let hash = secret.stored_hash()?;
    // One statement: two replicas adding the same name at once (a look first, then the
    // insert) gave the second a primary-key error, a 500, instead of "exists".
    let added = sqlx::query(
        "INSERT INTO users (name, password_hash, role, created) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(hash)
    .bind(role.as_str())
    .bind(crate::db::now())
    .execute(&db.pool)
    .await?
    .rows_affected();
    if added == 0 {
        return Err(UserError::Exists(name.to_owned()));
    }
    Ok(())
}

pub async fn set_password(db: &Db, name: &str, secret: Secret) -> Result<(), UserError> {
    let hash = secret.stored_hash()?;
    let changed = sqlx::query("UPDATE users SET password_hash = $1 WHERE name = $2")
        .bind(hash)
        .bind(name)
        .execute(&db.pool)
        .await?
        .rows_affected();
    if changed == 0 {
        return Err(UserError::Unknown(name.to_owned()));
    }
    // Whoever knew the old password may be logged in to the web console.
    sqlx::query("DELETE FROM web_sessions WHERE user_name = $1")
        .bind(name)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Deletes a user who holds no VMs (their Done VMs' records go with them).
pub async fn delete(db: &Db, name: &str) -> Result<(), UserError> {
    let mut tx = db.pool.begin().await?;
    // The user's row first: a run request admitted meanwhile (it locks the row too) either
    // committed before, and is counted below, or waits and then finds no user.
    let locked: Option<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT name FROM users WHERE name = $1{}",
        db.for_update()
    )))
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    if locked.is_none() {
        return Err(UserError::Unknown(name.to_owned()));
    }
    // A VM still being worked on counts too: its records go below.
    let (vms,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM vms WHERE owner = $1 AND (holds = 1 OR id IN \
         (SELECT vm_id FROM jobs WHERE state IN ('queued', 'running')))",
    )
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    if vms > 0 {
        return Err(UserError::HasVms {
            user: name.to_owned(),
            vms,
        });
    }
    let (volumes,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM volumes WHERE owner = $1")
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
    if volumes > 0 {
        return Err(UserError::HasVolumes {
            user: name.to_owned(),
            volumes,
        });
    }
    let gone = sqlx::query("DELETE FROM users WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if gone == 0 {
        return Err(UserError::Unknown(name.to_owned()));
    }
    // A new user of the same name must not inherit these logins, nor the old one's VMs,
    // their histories and jobs (every VM left holds nothing: counted above).
    sqlx::query("DELETE FROM web_sessions WHERE user_name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM vm_events WHERE vm_id IN (SELECT id FROM vms WHERE owner = $1)")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM jobs WHERE owner = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM vms WHERE owner = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserInfo {
    pub name: String,
    pub role: Role,
    /// Quotas of their own (absent: the cloud's defaults).
    pub cpu_quota: Option<i64>,
    pub memory_quota_mib: Option<i64>,
    pub vm_quota: Option<i64>,
    pub created: String,
}

/// One row of `users`, without its hash.
#[derive(sqlx::FromRow)]
struct UserRow {
    name: String,
    role: String,
    cpu_quota: Option<i64>,
    memory_quota_mib: Option<i64>,
    vm_quota: Option<i64>,
    created: String,
}

pub async fn list(db: &Db) -> Result<Vec<UserInfo>, UserError> {
    let rows: Vec<UserRow> = sqlx::query_as(
        "SELECT name, role, cpu_quota, memory_quota_mib, vm_quota, created FROM users ORDER BY name",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter()
        .map(|u| {
            Ok(UserInfo {
                role: Role::parse(&u.role)?,
                name: u.name,
                cpu_quota: u.cpu_quota,
                memory_quota_mib: u.memory_quota_mib,
                vm_quota: u.vm_quota,
                created: u.created,
            })
        })
        .collect()
}

pub async fn set_quotas(
    db: &Db,
    name: &str,
    cpu: Option<i64>,
    memory_mib: Option<i64>,
    vms: Option<i64>,
) -> Result<(), UserError> {
    let changed = sqlx::query(
        "UPDATE users SET cpu_quota = $1, memory_quota_mib = $2, vm_quota = $3 WHERE name = $4",
    )
    .bind(cpu)
    .bind(memory_mib)
    .bind(vms)
    .bind(name)
    .execute(&db.pool)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(UserError::Unknown(name.to_owned()));
    }
    Ok(())
}

/// On a database without users: creates `admin` with the given password or a made-up
/// one, which is returned so it can be shown once.
pub async fn ensure_admin(db: &Db, password: Option<String>) -> Result<Option<String>, UserError> {
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users")
        .fetch_one(&db.pool)
        .await?;
    if count > 0 {
        return Ok(None);
    }
    let generated = password.is_none();
    let password = password.unwrap_or_else(generate_password);
    match add(db, "admin", Secret::Password(password.clone()), Role::Admin).await {
        // Another replica made it first.
        Err(UserError::Exists(_)) => Ok(None),
        Err(e) => Err(e),
        Ok(()) => Ok(generated.then_some(password)),
    }
}

/// Checks user names and passwords. Argon2 is slow on purpose; a successful check is
/// remembered for a minute (keyed by a hash of the name, the password and the stored hash,
/// so a password change ends it at once).
pub struct Authenticator {
    /// Argon2 is meant to be slow and takes 19 MiB (a given hash up to 64): at most this
    /// many checks at once, so a flood of wrong passwords cannot take the whole machine.
    checks: tokio::sync::Semaphore,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    /// One Argon2 check at a time per credential: concurrent requests with the same
    /// credentials wait for the first one's verdict instead of each paying for it.
    verifying: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
}

/// A credential's place in `Authenticator::verifying`, given up when its check ends or is
/// dropped half-way (a client that hangs up): the entry goes with the last check that
/// waits on it, so the map holds only checks under way.
struct Turn<'a> {
    verifying: &'a Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    key: [u8; 32],
    /// Taken in `drop`, under the map's lock.
    mutex: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl<'a> Turn<'a> {
    fn take(
        verifying: &'a Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
        key: [u8; 32],
    ) -> Turn<'a> {
        let mutex = verifying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        Turn {
            verifying,
            key,
            mutex: Some(mutex),
        }
    }

    async fn lock(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.mutex.as_ref()?.lock().await)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut verifying = self.verifying.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mine) = self.mutex.take() else {
            return;
        };
        let ours = verifying
            .get(&self.key)
            .is_some_and(|m| Arc::ptr_eq(m, &mine));
        // Let go under the map's lock, where clones are made: two checks ending at once
        // cannot both see the other still there and both leave the entry.
        drop(mine);
        if ours
            && verifying
                .get(&self.key)
                .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            verifying.remove(&self.key);
        }
    }
}

/// What a login for a name no account has is checked against.
fn unknown_user_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password("no account has this password").unwrap_or_default())
        .clone()
}

const REMEMBER: Duration = Duration::from_secs(60);
const CONCURRENT_CHECKS: usize = 4;

impl Default for Authenticator {
    fn default() -> Self {
        Authenticator {
            checks: tokio::sync::Semaphore::new(CONCURRENT_CHECKS),
            verified: Mutex::default(),
            verifying: Mutex::default(),
        }
    }
}

impl Authenticator {
    pub async fn check(
        &self,
        db: &Db,
        name: &str,
        password: &str,
    ) -> Result<Option<Principal>, UserError> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT password_hash, role FROM users WHERE name = $1")
                .bind(name)
                .fetch_optional(&db.pool)
                .await?;
        let Some((stored, role)) = row else {
            // Checked all the same, against a hash of nothing: answered at once, a wrong
            // name would tell itself apart from a wrong password by its speed.
            self.verify_slowly(password, None).await;
            return Ok(None);
        };
        let role = Role::parse(&role)?;
        let key: [u8; 32] = Sha256::new()
            .chain_update(name.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .chain_update([0])
            .chain_update(stored.as_bytes())
            .finalize()
            .into();
        let principal = Principal {
            name: name.to_owned(),
            role,
        };
        if self.remembers(&key) {
            return Ok(Some(principal));
        }
        let turn = Turn::take(&self.verifying, key);
        let _turn = turn.lock().await;
        if self.remembers(&key) {
            return Ok(Some(principal));
        }
        let ok = self.verify_slowly(password, Some(stored)).await;
        if ok {
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, Instant::now());
        }
        Ok(ok.then_some(principal))
    }

    /// An Argon2 (or bcrypt) check against `stored` (None: a name no account has), off
    /// the async threads, when one of the slots for them is free.
    async fn verify_slowly(&self, password: &str, stored: Option<String>) -> bool {
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            let known = stored.is_some();
            let stored = stored.unwrap_or_else(unknown_user_hash);
            verify(&password, &stored) && known
        })
        .await
        .unwrap_or(false)
    }

    /// Whether these credentials passed a check less than a minute ago.
    fn remembers(&self, key: &[u8; 32]) -> bool {
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        verified.retain(|_, at| at.elapsed() < REMEMBER);
        verified.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db_with_alice(dir: &std::path::Path) -> Db {
        let db = Db::open(&format!("sqlite:{}", dir.join("db").display()))
            .await
            .unwrap();
        add(&db, "alice", Secret::Password("right".into()), Role::User)
            .await
            .unwrap();
        db
    }

    /// Whether a check of these credentials ends within 100 ms (given up otherwise).
    async fn answered_soon(auth: &Authenticator, db: &Db, name: &str, password: &str) -> bool {
        let check = auth.check(db, name, password);
        tokio::time::timeout(Duration::from_millis(100), check)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_name_is_added_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_alice(dir.path()).await;
        let again = add(&db, "alice", Secret::Password("other".into()), Role::Admin).await;
        assert!(matches!(again, Err(UserError::Exists(_))), "{again:?}");
        let auth = Authenticator::default();
        assert!(auth.check(&db, "alice", "right").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_check_given_up_half_way_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_alice(dir.path()).await;
        let auth = Authenticator::default();
        // Every slot busy: the check waits for one, and its client hangs up there.
        let busy = auth.checks.acquire_many(CONCURRENT_CHECKS as u32).await;
        assert!(
            !answered_soon(&auth, &db, "alice", "wrong").await,
            "the check was still waiting"
        );
        assert!(
            auth.verifying.lock().unwrap().is_empty(),
            "a check that ended left its place behind"
        );
        drop(busy);
        assert!(auth.check(&db, "alice", "right").await.unwrap().is_some());
        assert!(auth.check(&db, "alice", "wrong").await.unwrap().is_none());
        assert!(auth.verifying.lock().unwrap().is_empty());
        // Two checks of one credential: whichever ends last takes the entry away.
        for first_ends_first in [true, false] {
            let a = Turn::take(&auth.verifying, [7; 32]);
            let b = Turn::take(&auth.verifying, [7; 32]);
            let (first, last) = if first_ends_first { (a, b) } else { (b, a) };
            drop(first);
            assert_eq!(auth.verifying.lock().unwrap().len(), 1);
            drop(last);
            assert!(auth.verifying.lock().unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn a_name_no_account_has_is_checked_like_a_wrong_password() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_alice(dir.path()).await;
        let auth = Authenticator::default();
        let busy = auth.checks.acquire_many(CONCURRENT_CHECKS as u32).await;
        // It waits for a check slot as a wrong password does, rather than answer at once
        // (which told names that have accounts from names that have none).
        for name in ["alice", "mallory"] {
            assert!(
                !answered_soon(&auth, &db, name, "right").await,
                "{name} was answered without a check"
            );
        }
        drop(busy);
        assert!(auth.check(&db, "mallory", "right").await.unwrap().is_none());
        assert!(auth
            .check(&db, "mallory", "no account has this password")
            .await
            .unwrap()
            .is_none());
    }

    #[test]
    fn names_are_checked_and_passwords_hashed_with_a_salt() {
        assert!(valid_name("alice@example.org"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(65)));
        let a = hash_password("secret").unwrap();
        let b = hash_password("secret").unwrap();
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$"));
        assert!(matches!(hash_password(""), Err(UserError::EmptyPassword)));
        assert_eq!(generate_password().len(), 24);
    }

    #[test]
    fn a_given_hash_is_taken_when_a_login_can_be_checked_against_it_at_a_bounded_cost() {
        let ours = hash_password("s3cret").unwrap();
        let stored = Secret::Hash(format!(" {ours}\n")).stored_hash().unwrap();
        assert_eq!(stored, ours, "the line as printed, trimmed");
        assert!(verify("s3cret", &stored) && !verify("other", &stored));

        // OpenBSD's bcrypt test vector, as StratusLab's hashes were made.
        let bcrypt = "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW";
        assert_eq!(
            Secret::Hash(bcrypt.to_owned()).stored_hash().unwrap(),
            bcrypt
        );
        assert!(verify("U*U", bcrypt) && !verify("U*V", bcrypt));

        let refused = |hash: &str| match Secret::Hash(hash.to_owned()).stored_hash() {
            Err(UserError::BadHash { reason }) => reason,
            other => panic!("{hash}: {other:?}"),
        };
        let salt_and_hash = ours.rsplitn(3, '$').take(2).collect::<Vec<_>>();
        let (hash, salt) = (salt_and_hash[0], salt_and_hash[1]);
        let reason = refused(&format!("$argon2id$v=19$m=4194304,t=1,p=1${salt}${hash}"));
        assert!(reason.contains("m=4194304"), "{reason}");
        let reason = refused(&format!("$argon2id$v=19$m=19456,t=1000,p=1${salt}${hash}"));
        assert!(reason.contains("t=1000"), "{reason}");
        let reason = refused("$2b$31$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW");
        assert!(reason.contains("cost 31"), "{reason}");
        assert!(refused("$2b$05$short").contains("bcrypt"));
        assert!(refused("s3cret").contains("not a password hash"));
        let reason = refused(&format!("$pbkdf2-sha256$i=1000${salt}${hash}"));
        assert!(reason.contains("not an Argon2 hash"), "{reason}");
        assert!(refused(&format!("$argon2id$v=19$m=19456,t=2,p=1${salt}")).contains("no hash"));
    }
}
