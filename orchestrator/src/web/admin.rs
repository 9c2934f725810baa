//! Administrators' pages: nodes (capacity, load, health; enable and disable), users and
//! their quotas, networks and who holds their addresses. Everyone else gets the API's 403.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Form};
use serde::Deserialize;

use super::instances::{notice_text, Notice};
use super::session::WebUser;
use super::{number_field, refused, render, see_other, Nav};
use crate::api::types::{NetworkView, NodeState, NodeView, Role, UserInfo};
use crate::api::Refusal;
use crate::{nodes, users, Cloud};

fn admins_only(user: &WebUser) -> Result<(), Refusal> {
    if user.principal.is_admin() {
        Ok(())
    } else {
        Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "only administrators (::ADMIN) may see this page; {} is {}",
                user.principal.name,
                user.principal.role.stratuslab_name()
            ),
        ))
    }
}

#[derive(Template)]
#[template(path = "admin_nodes.html")]
struct NodesPage {
    nav: Nav,
    notice: Option<&'static str>,
    nodes: Vec<NodeView>,
}

pub async fn nodes(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Query(q): Query<Notice>,
) -> Response {
    let found = match admins_only(&user) {
        Ok(()) => nodes::views(&cloud.db).await.map_err(Refusal::from),
        Err(e) => Err(e),
    };
    match found {
        Ok(nodes) => render(
            StatusCode::OK,
            &NodesPage {
                nav: Nav::new(&user, "nodes"),
                notice: notice_text(q.notice.as_deref()),
                nodes,
            },
        ),
        Err(e) => refused(&user, e),
    }
}

#[derive(Deserialize)]
pub struct NodeStateForm {
    #[serde(default)]
    state: String,
}

pub async fn node_state(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(name): Path<String>,
    Form(form): Form<NodeStateForm>,
) -> Response {
    let state = match form.state.as_str() {
        "enabled" => Ok(NodeState::Enabled),
        "disabled" => Ok(NodeState::Disabled),
        "maintenance" => Ok(NodeState::Maintenance),
        other => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("'{other}' is not a node state: enabled, disabled or maintenance"),
        )),
    };
    let done = match (admins_only(&user), state) {
        (Ok(()), Ok(state)) => nodes::set_state(&cloud.db, &name, state)
            .await
            .map_err(Refusal::from),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    match done {
        Ok(()) => see_other("/ui/admin/nodes?notice=node"),
        Err(e) => refused(&user, e),
    }
}

#[derive(Clone, Default, Deserialize)]
pub struct UserForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    password_hash: String,
    #[serde(default)]
    role: String,
}

#[derive(Template)]
#[template(path = "admin_users.html")]
struct UsersPage {
    nav: Nav,
    notice: Option<&'static str>,
    users: Vec<UserInfo>,
    form: UserForm,
    error: Option<String>,
}

async fn users_page(
    cloud: &Cloud,
    user: &WebUser,
    status: StatusCode,
    notice: Option<&'static str>,
    form: UserForm,
    error: Option<String>,
) -> Response {
    let found = match admins_only(user) {
        Ok(()) => users::list(&cloud.db).await.map_err(Refusal::from),
        Err(e) => Err(e),
    };
    match found {
        Ok(users) => render(
            status,
            &UsersPage {
                nav: Nav::new(user, "users"),
                notice,
                users,
                form: UserForm {
                    // A refused form comes back without the password.
                    password: String::new(),
                    ..form
                },
                error,
            },
        ),
        Err(e) => refused(user, e),
    }
}

pub async fn users(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Query(q): Query<Notice>,
) -> Response {
    let notice = notice_text(q.notice.as_deref());
    users_page(
        &cloud,
        &user,
        StatusCode::OK,
        notice,
        UserForm::default(),
        None,
    )
    .await
}

pub async fn add_user(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Form(form): Form<UserForm>,
) -> Response {
    if let Err(e) = admins_only(&user) {
        return refused(&user, e);
    }
    let role = match form.role.as_str() {
        "admin" => Ok(Role::Admin),
        "" | "user" => Ok(Role::User),
        other => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("'{other}' is not a role: user or admin"),
        )),
    };
    let secret = match (form.password.as_str(), form.password_hash.trim()) {
        (password, "") if !password.is_empty() => Ok(users::Secret::Password(password.to_owned())),
        ("", hash) if !hash.is_empty() => Ok(users::Secret::Hash(hash.to_owned())),
        _ => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "give either a password or the hash of one (from stratus-hash-password)",
        )),
    };
    let done = match (role, secret) {
        (Ok(role), Ok(secret)) => users::add(&cloud.db, form.name.trim(), secret, role)
            .await
            .map_err(Refusal::from),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    match done {
        Ok(()) => see_other("/ui/admin/users?notice=user"),
        Err(e) => {
            let reason = e.reason().to_owned();
            users_page(&cloud, &user, e.status(), None, form, Some(reason)).await
        }
    }
}

#[derive(Deserialize)]
pub struct QuotaForm {
    #[serde(default)]
    cpu: String,
    #[serde(default)]
    memory_mib: String,
    #[serde(default)]
    vms: String,
}

pub async fn user_quotas(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(name): Path<String>,
    Form(form): Form<QuotaForm>,
) -> Response {
    let done = async {
        admins_only(&user)?;
        let cpu = number_field("vCPUs", &form.cpu)?;
        let memory = number_field("memory (MiB)", &form.memory_mib)?;
        let vms = number_field("VMs", &form.vms)?;
        if [cpu, memory, vms].iter().flatten().any(|v| *v < 0) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "quotas are 0 (no limit) or more",
            ));
        }
        users::set_quotas(&cloud.db, &name, cpu, memory, vms)
            .await
            .map_err(Refusal::from)
    }
    .await;
    match done {
        Ok(()) => see_other("/ui/admin/users?notice=quotas"),
        Err(e) => {
            let reason = e.reason().to_owned();
            users_page(
                &cloud,
                &user,
                e.status(),
                None,
                UserForm::default(),
                Some(reason),
            )
            .await
        }
    }
}

#[derive(Template)]
#[template(path = "admin_networks.html")]
struct NetworksPage {
    nav: Nav,
    networks: Vec<NetworkView>,
}

pub async fn networks(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
) -> Response {
    let found = match admins_only(&user) {
        Ok(()) => crate::api::network_views(&cloud).await,
        Err(e) => Err(e),
    };
    match found {
        Ok(networks) => render(
            StatusCode::OK,
            &NetworksPage {
                nav: Nav::new(&user, "networks"),
                networks,
            },
        ),
        Err(e) => refused(&user, e),
    }
}
