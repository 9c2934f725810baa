//! The web console: StratusLab's Marketplace and storage web interfaces and the portal it
//! promised, served by the orchestrator under `/ui/`. Pages are rendered on the server
//! (askama templates, escaped by default) and work without JavaScript; the vendored htmx
//! only refreshes the parts that change (VM states, console) in place. Every page calls
//! the same functions as the REST API, so a form is refused with the API's reason.

mod admin;
mod instances;
mod market;
pub mod session;
mod volumes;

use std::sync::Arc;

use askama::Template;
use axum::body::{to_bytes, Body};
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Form, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::api::Refusal;
use crate::Cloud;
use session::WebUser;

/// Forms are a few KiB; an uploaded Marketplace entry at most 64 KiB.
const MAX_FORM: usize = 128 * 1024;

const HTMX: &[u8] = include_bytes!("static/htmx.min.js");
const STYLE: &[u8] = include_bytes!("static/style.css");

pub fn router(cloud: Arc<Cloud>) -> Router<Arc<Cloud>> {
    let logged_in = Router::new()
        .route("/ui/", get(|| async { Redirect::to("/ui/instances") }))
        .route("/ui/logout", post(logout))
        .route(
            "/ui/instances",
            get(instances::list).post(instances::launch),
        )
        .route("/ui/instances/rows", get(instances::rows))
        .route("/ui/instances/new", get(instances::launch_form))
        .route("/ui/instances/{id}", get(instances::detail))
        .route("/ui/instances/{id}/status", get(instances::status))
        .route("/ui/instances/{id}/console", get(instances::console))
        .route("/ui/instances/{id}/kill", post(instances::kill))
        .route("/ui/instances/{id}/shutdown", post(instances::shutdown))
        .route("/ui/instances/{id}/delete", post(instances::delete))
        .route("/ui/instances/{id}/attach", post(instances::attach))
        .route("/ui/instances/{id}/detach", post(instances::detach))
        .route("/ui/volumes", get(volumes::list).post(volumes::create))
        .route(
            "/ui/volumes/{uuid}",
            get(volumes::detail).post(volumes::update),
        )
        .route("/ui/volumes/{uuid}/delete", post(volumes::delete))
        .route("/ui/volumes/{uuid}/derive", post(volumes::derive))
        .route("/ui/volumes/{uuid}/attach", post(volumes::attach))
        .route("/ui/volumes/{uuid}/detach", post(volumes::detach))
        .route("/ui/marketplace", get(market::search))
        .route("/ui/marketplace/upload", post(market::upload))
        .route(
            "/ui/marketplace/entry/{identifier}/{email}/{created}",
            get(market::entry),
        )
        .route(
            "/ui/marketplace/raw/{format}/{identifier}/{email}/{created}",
            get(market::raw),
        )
        .route("/ui/admin/nodes", get(admin::nodes))
        .route("/ui/admin/nodes/{name}/state", post(admin::node_state))
        .route("/ui/admin/users", get(admin::users).post(admin::add_user))
        .route("/ui/admin/users/{name}/quotas", post(admin::user_quotas))
        .route("/ui/admin/networks", get(admin::networks))
        // Any other console address: a page (the API's fallback answers JSON).
        .route("/ui/{*rest}", any(no_such_page))
        // Set before the layer, so that the page middleware sees it and the API's own
        // (which lists the API's endpoints) does not replace it.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(cloud.clone(), logged_in));
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_form).post(login))
        .route(
            "/ui/static/htmx.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", HTMX) }),
        )
        .route(
            "/ui/static/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .merge(logged_in)
        .layer(middleware::from_fn_with_state(cloud, security_headers))
}

async fn no_such_page(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("the console has no page {}", uri.path()),
    )
        .into_response()
}

/// A link followed to a form's target, say. Plain text: `logged_in` shows it as a page.
async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
        .into_response()
}

fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        bytes,
    )
        .into_response()
}

/// Nothing of the console may be framed by or load from other sites.
async fn security_headers(
    State(cloud): State<Arc<Cloud>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    // Reached over HTTPS: the browser is to come back that way only, so that a network
    // that strips TLS from a later visit cannot show a look-alike login page.
    if cloud.config.secure_cookies() {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    // A handler may have set a stricter one (the Marketplace's raw XML is sandboxed).
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self'; \
                 frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
            ),
        );
    }
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    // Pages show a user's VMs, their guests' consoles and the session's CSRF token: none
    // is kept by the browser (after a logout, Back on a shared machine showed them again).
    // The static assets say otherwise themselves.
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// What every page's navigation needs.
pub struct Nav {
    pub user: String,
    pub admin: bool,
    pub csrf: String,
    /// The section to highlight.
    pub here: &'static str,
}

impl Nav {
    pub fn new(user: &WebUser, here: &'static str) -> Nav {
        Nav {
            user: user.principal.name.clone(),
            admin: user.principal.is_admin(),
            csrf: user.csrf.clone(),
            here,
        }
    }
}

/// A page or fragment, or a 500 if a template cannot render (a bug, logged).
pub fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!("web console template: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page cannot be rendered; the orchestrator's log says why",
            )
                .into_response()
        }
    }
}

/// A fragment that htmx polls: 204 (htmx keeps what it shows, and the focus stays where
/// the user left it) when the browser already has this version.
pub fn fragment<T: Template>(seen: Option<&str>, make: impl Fn(&str) -> T) -> Response {
    let draft = match make("").render() {
        Ok(html) => html,
        Err(e) => {
            tracing::error!("web console template: {e}");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let version: String = Sha256::digest(draft.as_bytes())[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if seen == Some(version.as_str()) {
        return StatusCode::NO_CONTENT.into_response();
    }
    render(StatusCode::OK, &make(&version))
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub nav: Nav,
    pub status: u16,
    pub reason: String,
}

/// A refusal shown as a page, with the API's status and reason.
pub fn refused(user: &WebUser, refusal: Refusal) -> Response {
    let status = refusal.status();
    render(
        status,
        &ErrorPage {
            nav: Nav::new(user, ""),
            status: status.as_u16(),
            reason: refusal.reason().to_owned(),
        },
    )
}

/// After a successful POST: the browser GETs the result (a reload does not post again).
pub fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// Logged-in users only; every state-changing request also proves it comes from one of our
/// pages (its session's CSRF token, in the form or the `X-CSRF-Token` header) and, when
/// the browser names its origin, from this host.
async fn logged_in(State(cloud): State<Arc<Cloud>>, request: Request, next: Next) -> Response {
    let name = session::cookie_name(session::COOKIE, cloud.config.secure_cookies());
    let token = session::cookie(request.headers(), &name).map(str::to_owned);
    let user = match token {
        Some(token) => match session::find(&cloud.db, &token).await {
            Ok(user) => user,
            Err(e) => {
                tracing::error!("web session lookup: {e}");
                return (StatusCode::INTERNAL_SERVER_ERROR, "the database failed").into_response();
            }
        },
        None => None,
    };
    let Some(user) = user else {
        return to_login(&request);
    };
    let request = if request.method() == Method::GET || request.method() == Method::HEAD {
        request
    } else {
        match checked_origin(request, &user.csrf).await {
            Ok(request) => request,
            Err(refusal) => return refused(&user, refusal),
        }
    };
    let mut request = request;
    request.extensions_mut().insert(user.clone());
    plain_errors_as_pages(&user, next.run(request).await).await
}

/// What axum answers by itself — a form or query a handler cannot read, a path that is
/// not UTF-8 — is plain text; the console shows it as its own error page instead.
async fn plain_errors_as_pages(user: &WebUser, response: Response) -> Response {
    let status = response.status();
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !plain || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let reason = stratus_vmm::api::error_reason(status, response.into_body()).await;
    refused(user, Refusal::new(status, reason))
}

fn to_login(request: &Request) -> Response {
    if request.headers().contains_key("hx-request") {
        // htmx follows this instead of swapping a login form into a table cell.
        return (
            StatusCode::UNAUTHORIZED,
            [("hx-redirect", "/ui/login")],
            "log in again",
        )
            .into_response();
    }
    let back = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| request.method() == Method::GET && p.starts_with("/ui/"))
        .unwrap_or("/ui/");
    Redirect::to(&format!(
        "/ui/login?next={}",
        form_urlencoded::byte_serialize(back.as_bytes()).collect::<String>()
    ))
    .into_response()
}

/// The request again, body included, if it carries `csrf` (form field or header) and no
/// foreign `Origin`.
async fn checked_origin(request: Request, csrf: &str) -> Result<Request, Refusal> {
    let forbidden = |why: &str| Refusal::new(StatusCode::FORBIDDEN, why);
    if crate::api::from_another_origin(request.headers()) {
        return Err(forbidden(
            "this form was sent from another site; use the console's own pages",
        ));
    }
    if let Some(given) = request.headers().get("x-csrf-token") {
        return if session::same_token(given.to_str().unwrap_or(""), csrf) {
            Ok(request)
        } else {
            Err(forbidden(
                "the request's CSRF token is wrong; reload the page",
            ))
        };
    }
    let (parts, body) = request.into_parts();
    let bytes = to_bytes(body, MAX_FORM).await.map_err(|_| {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the form is larger than {} KiB", MAX_FORM / 1024),
        )
    })?;
    let given = form_token(&parts.headers, &bytes).await;
    if !session::same_token(given.as_deref().unwrap_or(""), csrf) {
        return Err(forbidden(
            "the form has no valid CSRF token (it did not come from this console's page); \
             reload the page and send it again",
        ));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// The `csrf` field of a URL-encoded or multipart form.
async fn form_token(headers: &HeaderMap, body: &axum::body::Bytes) -> Option<String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/x-www-form-urlencoded") {
        return form_urlencoded::parse(body)
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.into_owned());
    }
    if content_type.starts_with("multipart/form-data") {
        let request = Request::builder()
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body.clone()))
            .ok()?;
        let mut form = axum::extract::Multipart::from_request(request, &())
            .await
            .ok()?;
        while let Ok(Some(field)) = form.next_field().await {
            if field.name() == Some("csrf") {
                return field.text().await.ok();
            }
        }
    }
    None
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    next: String,
    user: String,
    error: Option<String>,
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Only paths of the console itself: `next` must not send the user to another site.
fn safe_next(next: Option<&str>) -> String {
    // Visible ASCII only: it goes into a Location header, where a control character or a
    // raw UTF-8 byte would be refused after the login had succeeded.
    next.filter(|n| {
        n.starts_with("/ui/")
            && !n.starts_with("//")
            && !n.contains('\\')
            && n.bytes().all(|b| b.is_ascii_graphic())
    })
    .unwrap_or("/ui/")
    .to_owned()
}

async fn login_form(
    State(cloud): State<Arc<Cloud>>,
    query: Result<axum::extract::Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let next = query.ok().and_then(|q| q.0.next);
    login_page(&cloud, StatusCode::OK, safe_next(next.as_deref()), "", None)
}

fn login_page(
    cloud: &Cloud,
    status: StatusCode,
    next: String,
    user: &str,
    error: Option<String>,
) -> Response {
    let csrf = session::random_token();
    let mut response = render(
        status,
        &LoginPage {
            csrf: csrf.clone(),
            next,
            user: user.to_owned(),
            error,
        },
    );
    add_cookie(&mut response, cloud, session::LOGIN_COOKIE, &csrf, 3600);
    response
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: Option<String>,
}

async fn login(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return login_page(
            &cloud,
            StatusCode::BAD_REQUEST,
            "/ui/".into(),
            "",
            Some("send the login form (user and password)".into()),
        );
    };
    let next = safe_next(form.next.as_deref());
    let name = session::cookie_name(session::LOGIN_COOKIE, cloud.config.secure_cookies());
    let expected = session::cookie(&headers, &name).unwrap_or("");
    // The token pair alone trusts whoever can set our cookies; the browser's Origin, when
    // it names one, must be this host too.
    if !session::same_token(&form.csrf, expected) || crate::api::from_another_origin(&headers) {
        return login_page(
            &cloud,
            StatusCode::FORBIDDEN,
            next,
            &form.user,
            Some("the login form has expired or came from another site; log in again".into()),
        );
    }
    match cloud
        .auth
        .check(&cloud.db, &form.user, &form.password)
        .await
    {
        Ok(Some(principal)) => match session::start(&cloud.db, &principal.name).await {
            Ok(token) => {
                let mut response = see_other(&next);
                let lifetime = session::LIFETIME.num_seconds();
                add_cookie(&mut response, &cloud, session::COOKIE, &token, lifetime);
                add_cookie(&mut response, &cloud, session::LOGIN_COOKIE, "", 0);
                response
            }
            Err(e) => {
                tracing::error!("web session start: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, "the database failed").into_response()
            }
        },
        Ok(None) => login_page(
            &cloud,
            StatusCode::UNAUTHORIZED,
            next,
            &form.user,
            Some("wrong user name or password".into()),
        ),
        Err(e) => {
            tracing::error!("web login: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "the database failed").into_response()
        }
    }
}

async fn logout(State(cloud): State<Arc<Cloud>>, Extension(user): Extension<WebUser>) -> Response {
    if let Err(e) = session::end(&cloud.db, &user).await {
        tracing::error!("web logout: {e}");
    }
    let mut response = see_other("/ui/login");
    add_cookie(&mut response, &cloud, session::COOKIE, "", 0);
    response
}

/// Attaches (hot-plug) or detaches a volume, as `POST|DELETE /disks/{uuid}/mounts` do.
pub async fn mount(
    cloud: &Cloud,
    user: &WebUser,
    uuid: &str,
    vm: i64,
    attach: bool,
) -> Result<crate::pdisk::MountAccepted, Refusal> {
    Ok(if attach {
        crate::pdisk::attach(cloud, &user.principal, uuid, vm).await?
    } else {
        crate::pdisk::detach(cloud, &user.principal, uuid, vm).await?
    })
}

/// Sets (or, with `max_age_s` 0, removes) one of the console's cookies on `response`.
fn add_cookie(response: &mut Response, cloud: &Cloud, name: &str, value: &str, max_age_s: i64) {
    let secure = cloud.config.secure_cookies();
    let name = session::cookie_name(name, secure);
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&name, value, max_age_s, secure)) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// A form's number field: empty is absent; anything else must be a whole number.
pub fn number_field(name: &str, text: &str) -> Result<Option<i64>, Refusal> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<i64>().map(Some).map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{name}: '{text}' is not a whole number"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_sends_users_back_only_into_the_console() {
        assert_eq!(safe_next(Some("/ui/volumes")), "/ui/volumes");
        assert_eq!(safe_next(Some("https://evil.example/")), "/ui/");
        assert_eq!(safe_next(Some("//evil.example/ui/")), "/ui/");
        assert_eq!(safe_next(Some("/ui/\\evil")), "/ui/");
        assert_eq!(safe_next(None), "/ui/");
        assert_eq!(safe_next(Some("/ui/\n")), "/ui/");
        assert_eq!(safe_next(Some("/ui/\u{7f}")), "/ui/");
        assert_eq!(safe_next(Some("/ui/é")), "/ui/");
        assert_eq!(safe_next(Some("/ui/a b")), "/ui/");
        assert_eq!(
            safe_next(Some("/ui/vms?page=2&x=%C3%A9")),
            "/ui/vms?page=2&x=%C3%A9"
        );
    }

    #[test]
    fn number_fields_name_the_field_when_refused() {
        assert_eq!(number_field("size", " 12 ").unwrap(), Some(12));
        assert_eq!(number_field("size", "").unwrap(), None);
        let e = number_field("size", "ten").unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.reason(), "size: 'ten' is not a whole number");
    }
}
