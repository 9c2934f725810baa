//! The Marketplace REST server: signed metadata entries stored in SQLite (sqlx).
//!
//! Routes (as the StratusLab Marketplace):
//! - `POST /metadata`: a signed RDF/XML entry, from a holder of the upload token
//!   (`Authorization: Bearer`; 401 without it, 403 when uploads are off); its signature,
//!   metadata and endorser certificate are validated, the certificate against the site's
//!   trusted CAs (see [`crate::ops::validate_trusted`]); `201 Created` with `Location:
//!   /metadata/{identifier}/{email}/{created}`; `400 invalid metadata: <reason>`; an entry
//!   not newer than the latest one of the same (identifier, endorser email) gets `409`.
//! - `GET /metadata`: the latest entry per (identifier, endorser) matching the query
//!   `status=valid|expired|deprecated|all` (default `valid`: neither expired nor
//!   deprecated), `location=pdisk|web|all`, `identifier`, `email`, `created` (then that
//!   exact entry instead of the latest), `os`, `arch`, `q` (free text: every word must
//!   appear in the identifier, title, alternative, description, creator, publisher, os,
//!   version or endorser), `limit` (1–1000, default 100) and `offset`; newest first; the
//!   total count is in `X-Total-Count`. A JSON list of entries, or with `Accept:
//!   application/xml` a `<metadata>` document holding each signed `rdf:RDF` entry verbatim.
//!   `404 no metadata matching query found` when nothing matches.
//! - `GET /metadata/{identifier}/{email}/{created}`: one entry, JSON, or the signed XML
//!   with `Accept: application/xml`.
//! - `GET /endorsers`: each endorser with its number of entries and images.
//!
//! Errors are JSON `{"message": "..."}` with the matching status.

use std::str::FromStr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{QueryBuilder, Row, Sqlite};

use crate::dsig::TrustedCas;
use crate::metadata::{format_date, parse_date, Metadata};

/// Default and maximum page sizes of `GET /metadata`.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;
/// Largest `POST /metadata` body. A signed entry with its certificate is ~5–15 KiB.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// Errors of the Marketplace; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    #[error(
        "entry {identifier} endorsed by {email} created {created} is not newer than the stored entry created {latest}"
    )]
    NotNewer {
        identifier: String,
        email: String,
        created: String,
        latest: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error(
        "the entry is larger than {MAX_ENTRY_BYTES} bytes; a signed metadata entry is a few KiB"
    )]
    TooLarge,
    #[error("POST /metadata needs the Marketplace's upload token (Authorization: Bearer <token>)")]
    Unauthorized,
    #[error(
        "uploads are disabled on this Marketplace (it was started without --upload-token-file)"
    )]
    UploadsDisabled,
    #[error("cannot read the request body: {0}")]
    Body(#[source] axum::extract::rejection::BytesRejection),
    #[error("cannot read the query: {0}")]
    Query(#[source] axum::extract::rejection::QueryRejection),
    #[error("cannot read the path: {0}")]
    Path(#[source] axum::extract::rejection::PathRejection),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("invalid query parameter {name}='{value}': {reason}")]
    BadQuery {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("database {what}: {source}")]
    Database {
        what: String,
        #[source]
        source: sqlx::Error,
    },
}

impl MarketError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            MarketError::InvalidMetadata(_) | MarketError::BadQuery { .. } => {
                StatusCode::BAD_REQUEST
            }
            MarketError::NotNewer { .. } => StatusCode::CONFLICT,
            MarketError::NotFound(_) => StatusCode::NOT_FOUND,
            MarketError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            MarketError::Unauthorized => StatusCode::UNAUTHORIZED,
            MarketError::UploadsDisabled => StatusCode::FORBIDDEN,
            MarketError::Body(e) => e.status(),
            MarketError::Query(e) => e.status(),
            MarketError::Path(e) => e.status(),
            MarketError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            MarketError::Database { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

fn db(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> MarketError {
    let what = what.into();
    move |source| MarketError::Database { what, source }
}

/// Error body of every failed request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}

impl IntoResponse for MarketError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "marketplace request failed");
        } else {
            tracing::debug!(error = %self, "marketplace request refused");
        }
        (
            status,
            Json(ErrorBody {
                message: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// One stored entry.
#[derive(Clone, Debug)]
pub struct StoredEntry {
    pub metadata: Metadata,
    /// The signed RDF/XML exactly as uploaded.
    pub xml: String,
}

impl StoredEntry {
    /// `/metadata/{identifier}/{email}/{created}`.
    pub fn path(&self) -> String {
        entry_path(&self.metadata)
    }
}

/// The URL path of an entry.
pub fn entry_path(m: &Metadata) -> String {
    format!(
        "/metadata/{}/{}/{}",
        m.identifier,
        m.endorsement.endorser.email.trim().to_ascii_lowercase(),
        format_date(&m.endorsement.created)
    )
}

/// An endorser and how many entries and distinct images it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndorserSummary {
    pub email: String,
    pub subject: String,
    pub issuer: String,
    pub entries: u64,
    pub images: u64,
}

/// `GET /metadata` query (all optional; parsed and checked by [`Store::search`]).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct MetadataQuery {
    pub status: Option<String>,
    pub location: Option<String>,
    pub identifier: Option<String>,
    pub email: Option<String>,
    pub created: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    pub q: Option<String>,
    pub limit: Option<String>,
    pub offset: Option<String>,
}

/// A page of search results.
#[derive(Clone, Debug)]
pub struct Page {
    pub total: u64,
    pub entries: Vec<StoredEntry>,
}

/// The entry store (SQLite through sqlx).
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Serialises uploads so the "newer than the latest" check and the insert are atomic.
    write: Arc<tokio::sync::Mutex<()>>,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS entries (
    identifier TEXT NOT NULL,
    email TEXT NOT NULL,
    created TEXT NOT NULL,
    subject TEXT NOT NULL,
    issuer TEXT NOT NULL,
    valid_until TEXT NOT NULL,
    deprecated TEXT,
    os TEXT,
    os_arch TEXT,
    has_pdisk INTEGER NOT NULL,
    has_web INTEGER NOT NULL,
    search TEXT NOT NULL,
    json TEXT NOT NULL,
    xml TEXT NOT NULL,
    PRIMARY KEY (identifier, email, created)
)";

impl Store {
    /// Open (creating if missing) the database at `url` (`sqlite://PATH` or
    /// `sqlite::memory:`).
    pub async fn open(url: &str) -> Result<Store, MarketError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(db(format!("URL '{url}'")))?
            .create_if_missing(true);
        let memory = url.contains(":memory:");
        let pool = if memory {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(opts)
                .await
        } else {
            SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(opts.journal_mode(SqliteJournalMode::Wal))
                .await
        }
        .map_err(db(format!("open {url}")))?;
        sqlx::query(SCHEMA)
            .execute(&pool)
            .await
            .map_err(db(format!("create schema in {url}")))?;
        tracing::info!(url, "marketplace store opened");
        Ok(Store {
            pool,
            write: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Validate a signed entry (signature, metadata rules, endorser = certificate, the
    /// certificate issued by one of the `trusted` CAs) and store it; it must be newer
    /// than the latest entry of the same identifier and endorser.
    pub async fn insert_signed(
        &self,
        xml: &str,
        trusted: Arc<TrustedCas>,
    ) -> Result<StoredEntry, MarketError> {
        let text = xml.to_string();
        let validated = tokio::task::spawn_blocking(move || {
            crate::ops::validate_trusted(&text, &trusted, Utc::now())
        })
        .await
        .map_err(|e| MarketError::InvalidMetadata(format!("validation aborted: {e}")))?
        .map_err(|e| {
            MarketError::InvalidMetadata(match e {
                crate::Error::InvalidMetadata(reason) => reason,
                other => other.to_string(),
            })
        })?;
        let m = validated.metadata;
        let identifier = m.identifier.to_string();
        let email = m.endorsement.endorser.email.trim().to_ascii_lowercase();
        let created = format_date(&m.endorsement.created);
        let _guard = self.write.lock().await;
        let latest: Option<String> = sqlx::query_scalar(
            "SELECT MAX(created) FROM entries WHERE identifier = ? AND email = ?",
        )
        .bind(identifier.clone())
        .bind(email.clone())
        .fetch_one(&self.pool)
        .await
        .map_err(db("read of the latest entry"))?;
        if let Some(latest) = latest.filter(|l| *l >= created) {
            return Err(MarketError::NotNewer {
                identifier,
                email,
                created,
                latest,
            });
        }
        let search = [
            Some(identifier.as_str()),
            m.title.as_deref(),
            m.alternative.as_deref(),
            m.description.as_deref(),
            m.creator.as_deref(),
            m.publisher.as_deref(),
            m.os.as_deref(),
            m.os_version.as_deref(),
            m.version.as_deref(),
            Some(email.as_str()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("\n")
        .to_lowercase();
        sqlx::query(
            "INSERT INTO entries (identifier, email, created, subject, issuer, valid_until,
                deprecated, os, os_arch, has_pdisk, has_web, search, json, xml)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(identifier.clone())
        .bind(email.clone())
        .bind(created.clone())
        .bind(m.endorsement.endorser.subject.clone())
        .bind(m.endorsement.endorser.issuer.clone())
        .bind(format_date(&m.valid_until()))
        .bind(m.deprecated.clone())
        .bind(m.os.clone())
        .bind(m.os_arch.clone())
        .bind(m.locations.iter().any(|l| l.starts_with("pdisk:")))
        .bind(
            m.locations
                .iter()
                .any(|l| l.starts_with("http://") || l.starts_with("https://")),
        )
        .bind(search)
        .bind(m.to_json())
        .bind(xml.to_string())
        .execute(&self.pool)
        .await
        .map_err(db(format!("insert of {identifier}")))?;
        tracing::info!(%identifier, %email, %created, "metadata entry stored");
        Ok(StoredEntry {
            metadata: m,
            xml: xml.to_string(),
        })
    }

    /// One entry by identifier, endorser email and creation date (`yyyy-MM-ddTHH:mm:ssZ`).
    pub async fn get(
        &self,
        identifier: &str,
        email: &str,
        created: &str,
    ) -> Result<StoredEntry, MarketError> {
        let row = sqlx::query(
            "SELECT json, xml FROM entries WHERE identifier = ? AND email = ? AND created = ?",
        )
        .bind(identifier.to_string())
        .bind(email.trim().to_ascii_lowercase())
        .bind(created.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db(format!("read of {identifier}")))?;
        match row {
            Some(row) => entry_of(&row),
            None => Err(MarketError::NotFound(format!(
                "no metadata entry {identifier} endorsed by {email} created {created}"
            ))),
        }
    }

    /// The latest entry per (identifier, endorser) matching `q` at time `now`.
    pub async fn search(&self, q: &MetadataQuery, now: DateTime<Utc>) -> Result<Page, MarketError> {
        let limit = parse_number("limit", q.limit.as_deref(), DEFAULT_LIMIT, 1, MAX_LIMIT)?;
        let offset = parse_number("offset", q.offset.as_deref(), 0, 0, u32::MAX)?;
        let mut count = QueryBuilder::<Sqlite>::new("SELECT COUNT(*) FROM entries e WHERE ");
        filters(&mut count, q, now)?;
        let total: i64 = count
            .build_query_scalar()
            .fetch_one(&self.pool)
            .await
            .map_err(db("count of the matching entries"))?;
        let mut select = QueryBuilder::<Sqlite>::new("SELECT e.json, e.xml FROM entries e WHERE ");
        filters(&mut select, q, now)?;
        select
            .push(" ORDER BY e.created DESC, e.identifier, e.email LIMIT ")
            .push_bind(i64::from(limit))
            .push(" OFFSET ")
            .push_bind(i64::from(offset));
        let rows = select
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("search of entries"))?;
        Ok(Page {
            total: total as u64,
            entries: rows.iter().map(entry_of).collect::<Result<_, _>>()?,
        })
    }

    /// Every endorser with its number of entries and distinct images.
    pub async fn endorsers(&self) -> Result<Vec<EndorserSummary>, MarketError> {
        let rows = sqlx::query(
            "SELECT e.email, COUNT(*) AS entries, COUNT(DISTINCT e.identifier) AS images,
                (SELECT subject FROM entries x WHERE x.email = e.email ORDER BY created DESC LIMIT 1) AS subject,
                (SELECT issuer FROM entries x WHERE x.email = e.email ORDER BY created DESC LIMIT 1) AS issuer
             FROM entries e GROUP BY e.email ORDER BY e.email",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("list of endorsers"))?;
        rows.iter()
            .map(|r| {
                Ok(EndorserSummary {
                    email: r.try_get("email").map_err(db("endorser row"))?,
                    subject: r.try_get("subject").map_err(db("endorser row"))?,
                    issuer: r.try_get("issuer").map_err(db("endorser row"))?,
                    entries: r.try_get::<i64, _>("entries").map_err(db("endorser row"))? as u64,
                    images: r.try_get::<i64, _>("images").map_err(db("endorser row"))? as u64,
                })
            })
            .collect()
    }

    /// Close the database (waits for its connections).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn entry_of(row: &sqlx::sqlite::SqliteRow) -> Result<StoredEntry, MarketError> {
    let json: String = row.try_get("json").map_err(db("entry row"))?;
    let xml: String = row.try_get("xml").map_err(db("entry row"))?;
    let metadata = Metadata::from_json(&json).map_err(|e| MarketError::Database {
        what: "stored entry".into(),
        source: sqlx::Error::Decode(e.to_string().into()),
    })?;
    Ok(StoredEntry { metadata, xml })
}

fn parse_number(
    name: &'static str,
    value: Option<&str>,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, MarketError> {
    let Some(v) = value else {
        return Ok(default);
    };
    match v.trim().parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(MarketError::BadQuery {
            name,
            value: v.to_string(),
            reason: format!("not an integer from {min} to {max}"),
        }),
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Append the WHERE conditions of `q` to `b`.
fn filters(
    b: &mut QueryBuilder<Sqlite>,
    q: &MetadataQuery,
    now: DateTime<Utc>,
) -> Result<(), MarketError> {
    let now = format_date(&now);
    match non_empty(&q.created) {
        Some(created) => {
            let date = parse_date(created, "created").map_err(|e| MarketError::BadQuery {
                name: "created",
                value: created.to_string(),
                reason: e.to_string(),
            })?;
            b.push("e.created = ").push_bind(format_date(&date));
        }
        None => {
            b.push(
                "e.created = (SELECT MAX(x.created) FROM entries x \
                 WHERE x.identifier = e.identifier AND x.email = e.email)",
            );
        }
    }
    match non_empty(&q.status).unwrap_or("valid") {
        "valid" => {
            b.push(" AND e.deprecated IS NULL AND e.valid_until >= ")
                .push_bind(now);
        }
        "expired" => {
            b.push(" AND e.valid_until < ").push_bind(now);
        }
        "deprecated" => {
            b.push(" AND e.deprecated IS NOT NULL");
        }
        "all" => {}
        other => {
            return Err(MarketError::BadQuery {
                name: "status",
                value: other.to_string(),
                reason: "expected valid, expired, deprecated or all".into(),
            })
        }
    }
    match non_empty(&q.location).unwrap_or("all") {
        "pdisk" => {
            b.push(" AND e.has_pdisk = 1");
        }
        "web" => {
            b.push(" AND e.has_web = 1");
        }
        "all" => {}
        other => {
            return Err(MarketError::BadQuery {
                name: "location",
                value: other.to_string(),
                reason: "expected pdisk, web or all".into(),
            })
        }
    }
    if let Some(id) = non_empty(&q.identifier) {
        b.push(" AND e.identifier = ").push_bind(id.to_string());
    }
    if let Some(email) = non_empty(&q.email) {
        b.push(" AND e.email = ")
            .push_bind(email.to_ascii_lowercase());
    }
    if let Some(os) = non_empty(&q.os) {
        b.push(" AND lower(e.os) = ").push_bind(os.to_lowercase());
    }
    if let Some(arch) = non_empty(&q.arch) {
        b.push(" AND lower(e.os_arch) = ")
            .push_bind(arch.to_lowercase());
    }
    if let Some(text) = non_empty(&q.q) {
        for word in text.split_whitespace() {
            let escaped = word
                .to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            b.push(" AND e.search LIKE ")
                .push_bind(format!("%{escaped}%"))
                .push(" ESCAPE '\\'");
        }
    }
    Ok(())
}

/// Who may add entries: holders of the upload token, with entries signed under a trusted
/// CA. Reading needs nothing.
pub struct Uploads {
    pub trusted: Arc<TrustedCas>,
    /// `None`: nobody may upload.
    pub token: Option<String>,
}

impl Uploads {
    fn admit(&self, headers: &HeaderMap) -> Result<(), MarketError> {
        use subtle::ConstantTimeEq;
        let Some(token) = &self.token else {
            return Err(MarketError::UploadsDisabled);
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(MarketError::Unauthorized)
        }
    }
}

struct Market {
    store: Store,
    uploads: Uploads,
}

type Shared = State<Arc<Market>>;

fn wants_xml(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let xml = ["application/xml", "text/xml", "application/rdf+xml"]
        .iter()
        .filter_map(|t| accept.find(t))
        .min();
    match (xml, accept.find("application/json")) {
        (Some(x), Some(j)) => x < j,
        (Some(_), None) => true,
        _ => false,
    }
}

fn xml_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/rdf+xml; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The signed entry without its XML declaration (to embed it in a list document).
fn without_declaration(xml: &str) -> &str {
    let t = xml.trim_start();
    if t.starts_with("<?xml") {
        if let Some(end) = t.find("?>") {
            return t[end + 2..].trim_start();
        }
    }
    t
}

async fn post_metadata(
    State(market): Shared,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, MarketError> {
    // Before the entry is parsed or verified.
    market.uploads.admit(&headers)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => MarketError::TooLarge,
        _ => MarketError::Body(e),
    })?;
    let xml = std::str::from_utf8(&body)
        .map_err(|e| MarketError::InvalidMetadata(format!("the body is not UTF-8 text: {e}")))?;
    if xml.trim().is_empty() {
        return Err(MarketError::InvalidMetadata(
            "the body is empty; expected a signed RDF/XML entry".into(),
        ));
    }
    let entry = market
        .store
        .insert_signed(xml, market.uploads.trusted.clone())
        .await?;
    let location = entry.path();
    let mut resp = (StatusCode::CREATED, Json(&entry.metadata)).into_response();
    resp.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&location).map_err(|e| {
            MarketError::InvalidMetadata(format!("entry path '{location}' is not a header: {e}"))
        })?,
    );
    Ok(resp)
}

async fn list_metadata(
    State(market): Shared,
    headers: HeaderMap,
    query: Result<Query<MetadataQuery>, QueryRejection>,
) -> Result<Response, MarketError> {
    let Query(q) = query.map_err(MarketError::Query)?;
    let page = market.store.search(&q, Utc::now()).await?;
    if page.total == 0 {
        return Err(MarketError::NotFound(
            "no metadata matching query found".into(),
        ));
    }
    let mut resp = if wants_xml(&headers) {
        let mut o = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<metadata total=\"{}\" count=\"{}\">\n",
            page.total,
            page.entries.len()
        );
        for e in &page.entries {
            o.push_str(without_declaration(&e.xml));
            o.push('\n');
        }
        o.push_str("</metadata>\n");
        xml_response(StatusCode::OK, o)
    } else {
        let list: Vec<&Metadata> = page.entries.iter().map(|e| &e.metadata).collect();
        Json(list).into_response()
    };
    resp.headers_mut()
        .insert("x-total-count", HeaderValue::from(page.total));
    Ok(resp)
}

async fn get_entry(
    State(market): Shared,
    headers: HeaderMap,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Response, MarketError> {
    let Path((identifier, email, created)) = path.map_err(MarketError::Path)?;
    let entry = market.store.get(&identifier, &email, &created).await?;
    Ok(if wants_xml(&headers) {
        xml_response(StatusCode::OK, entry.xml)
    } else {
        Json(entry.metadata).into_response()
    })
}

async fn list_endorsers(State(market): Shared) -> Result<Response, MarketError> {
    Ok(Json(market.store.endorsers().await?).into_response())
}

async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> MarketError {
    MarketError::NotFound(format!("no resource {method} {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> MarketError {
    MarketError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// The Marketplace routes over `store`, to serve alone or mount in another router.
pub fn router(store: Store, uploads: Uploads) -> Router {
    Router::new()
        .route(
            "/metadata",
            get(list_metadata)
                .post(post_metadata)
                .layer(DefaultBodyLimit::max(MAX_ENTRY_BYTES)),
        )
        .route("/metadata/{identifier}/{email}/{created}", get(get_entry))
        .route("/endorsers", get(list_endorsers))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .with_state(Arc::new(Market { store, uploads }))
}
