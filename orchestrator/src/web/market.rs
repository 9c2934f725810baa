//! The Marketplace through the console: search by endorser, OS, status and free text, one
//! entry's metadata with links to the same entry as XML and JSON, and the upload of a
//! signed entry (forwarded with the site's upload token; the Marketplace's refusal shown
//! beside the form). The browser only ever talks to the orchestrator.

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use chrono::Utc;
use serde::Deserialize;
use stratus_images::Metadata;

use super::instances::notice_text;
use super::session::WebUser;
use super::{refused, render, see_other, Nav};
use crate::api::Refusal;
use crate::Cloud;

/// What a Marketplace entry may weigh (the Marketplace's own limit).
const MAX_ENTRY: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

/// One entry as the pages list it.
pub struct EntryRow {
    pub identifier: String,
    pub title: String,
    pub kind: String,
    pub os: String,
    pub email: String,
    pub created: String,
    pub valid: String,
    /// valid | expired | deprecated
    pub status: &'static str,
    pub deprecated: Option<String>,
    /// `{identifier}/{email}/{created}`, each part URL-encoded.
    pub path: String,
    pub bytes: u64,
    pub sha1: String,
    pub description: String,
    pub locations: Vec<String>,
    pub format: String,
}

fn encode(part: &str) -> String {
    form_urlencoded::byte_serialize(part.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

impl EntryRow {
    fn of(m: &Metadata) -> EntryRow {
        let email = m.endorsement.endorser.email.trim().to_ascii_lowercase();
        let created = stratus_images::metadata::format_date(&m.endorsement.created);
        let expired = m.valid.is_some_and(|v| v < Utc::now());
        let status = if m.deprecated.is_some() {
            "deprecated"
        } else if expired {
            "expired"
        } else {
            "valid"
        };
        EntryRow {
            identifier: m.identifier.to_string(),
            title: m
                .title
                .clone()
                .or_else(|| m.alternative.clone())
                .unwrap_or_else(|| m.identifier.to_string()),
            kind: m.image_type.clone(),
            os: [&m.os, &m.os_version, &m.os_arch]
                .into_iter()
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
            path: format!(
                "{}/{}/{}",
                encode(&m.identifier.to_string()),
                encode(&email),
                encode(&created)
            ),
            email,
            created,
            valid: m
                .valid
                .map(|v| stratus_images::metadata::format_date(&v))
                .unwrap_or_default(),
            status,
            deprecated: m.deprecated.clone(),
            bytes: m.bytes,
            sha1: m
                .checksums
                .get(stratus_images::Algorithm::Sha1)
                .unwrap_or_default()
                .to_owned(),
            description: m.description.clone().unwrap_or_default(),
            locations: m.locations.clone(),
            format: m.format.map(|f| f.as_str().to_owned()).unwrap_or_default(),
        }
    }
}

/// Why the Marketplace said no: its `{"message"}` (or `{"error"}`) body, else its status.
async fn reason_of(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .or_else(|| v.get("error"))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("the Marketplace answered {status}"))
}

fn endpoint(cloud: &Cloud) -> Result<String, Refusal> {
    cloud
        .config
        .marketplace_endpoint
        .as_deref()
        .map(|e| e.trim_end_matches('/').to_owned())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "this cloud has no Marketplace configured (marketplace_endpoint)",
            )
        })
}

fn unreachable(url: &str, e: reqwest::Error) -> Refusal {
    Refusal::new(
        StatusCode::BAD_GATEWAY,
        format!("the Marketplace {url} does not answer: {e}"),
    )
}

/// Entries matching `query` (none is an empty list, not an error).
async fn find(cloud: &Cloud, query: &[(&str, &str)]) -> Result<Vec<Metadata>, Refusal> {
    let url = format!("{}/metadata", endpoint(cloud)?);
    let response = cloud
        .http
        .get(&url)
        .query(query)
        .header(header::ACCEPT, "application/json")
        .timeout(TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable(&url, e))?;
    if response.status() == StatusCode::NOT_FOUND {
        return Ok(Vec::new());
    }
    if !response.status().is_success() {
        return Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            reason_of(response).await,
        ));
    }
    response.json::<Vec<Metadata>>().await.map_err(|e| {
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("the Marketplace's list: {e}"),
        )
    })
}

/// Valid machine images for the launch form: (identifier, what to show).
pub async fn machine_images(cloud: &Cloud) -> Vec<(String, String)> {
    find(cloud, &[("status", "valid"), ("limit", "200")])
        .await
        .unwrap_or_default()
        .iter()
        .filter(|m| m.image_type == "machine")
        .map(|m| {
            let row = EntryRow::of(m);
            (row.identifier, format!("{} ({})", row.title, row.os))
        })
        .collect()
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct SearchForm {
    #[serde(default)]
    q: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    notice: Option<String>,
}

#[derive(Template)]
#[template(path = "marketplace.html")]
struct SearchPage {
    nav: Nav,
    notice: Option<&'static str>,
    form: SearchForm,
    /// (email, chosen)
    endorsers: Vec<(String, bool)>,
    /// (status, chosen)
    statuses: Vec<(&'static str, bool)>,
    entries: Vec<EntryRow>,
    error: Option<String>,
    upload_error: Option<String>,
    uploads: bool,
}

async fn endorsers(cloud: &Cloud) -> Vec<String> {
    let Ok(base) = endpoint(cloud) else {
        return Vec::new();
    };
    let Ok(response) = cloud
        .http
        .get(format!("{base}/endorsers"))
        .header(header::ACCEPT, "application/json")
        .timeout(TIMEOUT)
        .send()
        .await
    else {
        return Vec::new();
    };
    response
        .json::<Vec<serde_json::Value>>()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.get("email")?.as_str().map(str::to_owned))
        .collect()
}

async fn search_page(
    cloud: &Cloud,
    user: &WebUser,
    status: StatusCode,
    form: SearchForm,
    upload_error: Option<String>,
) -> Response {
    let wanted = match form.status.as_str() {
        "" => "valid",
        s @ ("valid" | "expired" | "deprecated" | "all") => s,
        _ => "valid",
    };
    let mut query = vec![("status", wanted), ("limit", "100")];
    for (key, value) in [("q", &form.q), ("email", &form.email), ("os", &form.os)] {
        if !value.trim().is_empty() {
            query.push((key, value.trim()));
        }
    }
    let (entries, error) = match find(cloud, &query).await {
        Ok(found) => (found.iter().map(EntryRow::of).collect(), None),
        Err(e) => (Vec::new(), Some(e.reason().to_owned())),
    };
    render(
        status,
        &SearchPage {
            nav: Nav::new(user, "marketplace"),
            notice: notice_text(form.notice.as_deref()),
            endorsers: endorsers(cloud)
                .await
                .into_iter()
                .map(|e| {
                    let chosen = e == form.email;
                    (e, chosen)
                })
                .collect(),
            statuses: ["valid", "expired", "deprecated", "all"]
                .into_iter()
                .map(|s| (s, s == wanted))
                .collect(),
            entries,
            error,
            upload_error,
            uploads: cloud.config.marketplace_upload_token_file.is_some(),
            form,
        },
    )
}

pub async fn search(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Query(form): Query<SearchForm>,
) -> Response {
    search_page(&cloud, &user, StatusCode::OK, form, None).await
}

#[derive(Template)]
#[template(path = "entry.html")]
struct EntryPage {
    nav: Nav,
    notice: Option<&'static str>,
    entry: EntryRow,
}

/// `GET {marketplace}/metadata/{identifier}/{email}/{created}` as `accept`.
async fn fetch_entry(
    cloud: &Cloud,
    (identifier, email, created): &(String, String, String),
    accept: &str,
) -> Result<reqwest::Response, Refusal> {
    if !crate::marketplace::valid_identifier(identifier) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("'{identifier}' is not a Marketplace image identifier"),
        ));
    }
    let mut url = reqwest::Url::parse(&endpoint(cloud)?).map_err(|e| {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("marketplace_endpoint is not a URL: {e}"),
        )
    })?;
    url.path_segments_mut()
        .map_err(|()| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "marketplace_endpoint cannot have a path",
            )
        })?
        .pop_if_empty()
        .extend(["metadata", identifier, email, created]);
    let response = cloud
        .http
        .get(url.clone())
        .header(header::ACCEPT, accept)
        .timeout(TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable(url.as_str(), e))?;
    if !response.status().is_success() {
        let status = if response.status() == StatusCode::NOT_FOUND {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::BAD_GATEWAY
        };
        return Err(Refusal::new(status, reason_of(response).await));
    }
    Ok(response)
}

pub async fn entry(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(key): Path<(String, String, String)>,
    Query(q): Query<super::instances::Notice>,
) -> Response {
    let metadata = match fetch_entry(&cloud, &key, "application/json").await {
        Ok(r) => r.json::<Metadata>().await.map_err(|e| {
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                format!("the Marketplace's entry: {e}"),
            )
        }),
        Err(e) => Err(e),
    };
    match metadata {
        Ok(m) => render(
            StatusCode::OK,
            &EntryPage {
                nav: Nav::new(&user, "marketplace"),
                notice: notice_text(q.notice.as_deref()),
                entry: EntryRow::of(&m),
            },
        ),
        Err(e) => refused(&user, e),
    }
}

/// The entry as the Marketplace serves it: the signed XML, or JSON.
pub async fn raw(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path((format, identifier, email, created)): Path<(String, String, String, String)>,
) -> Response {
    let (accept, content_type) = match format.as_str() {
        // As text: XML the browser renders may carry XHTML, a page of the endorser's
        // making under the console's address.
        "xml" => ("application/rdf+xml", "text/plain; charset=utf-8"),
        "json" => ("application/json", "application/json"),
        other => {
            return refused(
                &user,
                Refusal::new(
                    StatusCode::NOT_FOUND,
                    format!("'{other}' is not a format of entries: xml or json"),
                ),
            )
        }
    };
    let body = match fetch_entry(&cloud, &(identifier, email, created), accept).await {
        Ok(r) => r.bytes().await.map_err(|e| unreachable("(entry)", e)),
        Err(e) => Err(e),
    };
    match body {
        // The entry is the endorser's text: shown in a sandbox (an origin of its own, no
        // scripts), it can never act with the user's session.
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'; sandbox",
                ),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => refused(&user, e),
    }
}

/// The signed entry of the upload form, checked by the Marketplace itself.
pub async fn upload(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    match forward_upload(&cloud, form).await {
        Ok(path) => see_other(&format!("/ui/marketplace/entry/{path}?notice=uploaded")),
        Err(e) => {
            let reason = e.reason().to_owned();
            search_page(
                &cloud,
                &user,
                e.status(),
                SearchForm::default(),
                Some(reason),
            )
            .await
        }
    }
}

async fn forward_upload(
    cloud: &Cloud,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<String, Refusal> {
    let bad = |reason: String| Refusal::new(StatusCode::BAD_REQUEST, reason);
    let Some(token_file) = &cloud.config.marketplace_upload_token_file else {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "this cloud forwards no uploads (marketplace_upload_token_file is not set); \
             publish with stratus-upload-metadata",
        ));
    };
    let mut form =
        form.map_err(|e| bad(format!("send the form with a file: {}", e.body_text())))?;
    let mut entry = None;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| bad(format!("the form cannot be read: {e}")))?
    {
        if field.name() == Some("entry") {
            let bytes = field
                .bytes()
                .await
                .map_err(|e| bad(format!("the file cannot be read: {e}")))?;
            entry = Some(bytes);
        }
    }
    let entry = entry
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("choose a signed metadata file (XML) to upload".into()))?;
    if entry.len() > MAX_ENTRY {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the entry is larger than {} KiB", MAX_ENTRY / 1024),
        ));
    }
    let token = std::fs::read_to_string(token_file).map_err(|e| {
        tracing::error!(
            "marketplace_upload_token_file {}: {e}",
            token_file.display()
        );
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "the Marketplace upload token {} cannot be read: {e}",
                token_file.display()
            ),
        )
    })?;
    let url = format!("{}/metadata", endpoint(cloud)?);
    let response = cloud
        .http
        .post(&url)
        .bearer_auth(token.trim())
        .header(header::CONTENT_TYPE, "application/rdf+xml")
        .header(header::ACCEPT, "application/json")
        .body(entry)
        .timeout(TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable(&url, e))?;
    let status = response.status();
    if !status.is_success() {
        let reason = reason_of(response).await;
        // The entry's fault is the user's (400 with the Marketplace's reason); the
        // Marketplace refusing our token is the site's.
        return Err(
            if status.is_client_error() && status != StatusCode::UNAUTHORIZED {
                Refusal::new(StatusCode::BAD_REQUEST, reason)
            } else {
                Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the Marketplace refused the upload ({status}): {reason}"),
                )
            },
        );
    }
    let created = response.json::<Metadata>().await.map_err(|e| {
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("the Marketplace's answer: {e}"),
        )
    })?;
    Ok(EntryRow::of(&created).path)
}
