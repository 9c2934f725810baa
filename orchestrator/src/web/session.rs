//! Web console logins: a random token in an HttpOnly, SameSite=Strict cookie, its SHA-256
//! in the database (so every replica knows the session and a stolen database copy logs
//! nobody in), and a per-session CSRF token every state-changing request must send back.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::Engine;
use chrono::{Duration, Utc};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::db::{self, Db, DbError};
use crate::users::{Principal, Role};

/// The session cookie's name.
pub const COOKIE: &str = "stratus_session";
/// The login form's double-submit cookie: a login form posted from another site cannot
/// know it, so nobody can log a victim into the attacker's account.
pub const LOGIN_COOKIE: &str = "stratus_login";
/// A login lasts a working day; then the user logs in again.
pub const LIFETIME: Duration = Duration::hours(12);

/// The logged-in user of a request and their session's CSRF token.
#[derive(Clone, Debug)]
pub struct WebUser {
    pub principal: Principal,
    pub csrf: String,
    token_hash: String,
}

/// 32 random bytes, URL-safe.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `given` is `expected`, in constant time.
pub fn same_token(given: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Starts a session for `user` (whose password was just checked); returns the cookie's
/// token. Expired sessions of everyone are swept on the way.
pub async fn start(db: &Db, user: &str) -> Result<String, DbError> {
    let now = Utc::now();
    sqlx::query("DELETE FROM web_sessions WHERE expires < $1")
        .bind(db::timestamp(now))
        .execute(&db.pool)
        .await?;
    let token = random_token();
    sqlx::query(
        "INSERT INTO web_sessions (token_hash, user_name, csrf, created, expires)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(hash(&token))
    .bind(user)
    .bind(random_token())
    .bind(db::timestamp(now))
    .bind(db::timestamp(now + LIFETIME))
    .execute(&db.pool)
    .await?;
    Ok(token)
}

/// The live session of this cookie token, with the user's current role (a deleted user's
/// sessions are gone with them).
pub async fn find(db: &Db, token: &str) -> Result<Option<WebUser>, DbError> {
    let token_hash = hash(token);
    let row: Option<(String, String, String)> = sqlx::query_as(
        "SELECT s.user_name, s.csrf, u.role FROM web_sessions s
         JOIN users u ON u.name = s.user_name
         WHERE s.token_hash = $1 AND s.expires > $2",
    )
    .bind(&token_hash)
    .bind(db::now())
    .fetch_optional(&db.pool)
    .await?;
    let Some((name, csrf, role)) = row else {
        return Ok(None);
    };
    let role = match role.as_str() {
        "admin" => Role::Admin,
        "user" => Role::User,
        other => {
            return Err(DbError::Corrupt {
                what: "users.role",
                value: other.to_owned(),
            })
        }
    };
    Ok(Some(WebUser {
        principal: Principal { name, role },
        csrf,
        token_hash,
    }))
}

/// Logs out: the session is gone from every replica at once.
pub async fn end(db: &Db, user: &WebUser) -> Result<(), DbError> {
    sqlx::query("DELETE FROM web_sessions WHERE token_hash = $1")
        .bind(&user.token_hash)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// The value of cookie `name` in a request's `Cookie` headers; none when the name comes
/// twice. Without the `__Host-` prefix (plain HTTP), a site on a sibling subdomain can set
/// a cookie of the same name beside ours, and browsers send the one with the longer path
/// first: taking the first would log the user in as whoever planted it.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

/// The name cookie `name` goes by. Over HTTPS it carries the `__Host-` prefix: browsers
/// then take it only from this very host, with `Secure` and `Path=/`, so a site on a
/// sibling subdomain cannot plant its own login token or session beside ours.
pub fn cookie_name(name: &str, secure: bool) -> String {
    if secure {
        format!("__Host-{name}")
    } else {
        name.to_owned()
    }
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, for the whole console; `Secure` when
/// the console is reached over HTTPS (`console_secure_cookies`).
pub fn set_cookie(name: &str, value: &str, max_age_s: i64, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; Max-Age={max_age_s}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name_and_tokens_compared_whole() {
        let mut headers = axum::http::HeaderMap::new();
        headers.append(
            "cookie",
            "a=1; stratus_session_x=no; stratus_session=yes"
                .parse()
                .unwrap(),
        );
        headers.append("cookie", "b=2".parse().unwrap());
        assert_eq!(cookie(&headers, COOKIE), Some("yes"));
        assert_eq!(cookie(&headers, "b"), Some("2"));
        assert_eq!(cookie(&headers, "c"), None);
        headers.append("cookie", "stratus_session=planted".parse().unwrap());
        assert_eq!(
            cookie(&headers, COOKIE),
            None,
            "a name sent twice is not taken"
        );
        assert_eq!(cookie(&headers, "b"), Some("2"));
        assert!(same_token("abc", "abc"));
        assert!(!same_token("ab", "abc"));
        assert!(
            !same_token("", ""),
            "an empty expected token matches nothing"
        );
        let a = random_token();
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_token());
        assert!(set_cookie(COOKIE, &a, 60, true).ends_with("HttpOnly; SameSite=Strict; Secure"));
        assert_eq!(cookie_name(COOKIE, true), "__Host-stratus_session");
        assert_eq!(cookie_name(COOKIE, false), COOKIE);
    }
}
