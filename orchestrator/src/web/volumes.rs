//! Volumes: the list with where each is mounted and since when (what StratusLab's storage
//! page showed and its CLI could not), create, edit tag and visibility, attach to one of
//! the user's running VMs, detach, delete.

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
use crate::api::types::{VmState, VmView};
use crate::api::Refusal;
use crate::pdisk::{self, Visibility, VolumeCreate, VolumeKind, VolumeUpdate, VolumeView};
use crate::{vms, Cloud};

#[derive(Clone, Debug, Default, Deserialize)]
pub struct VolumeForm {
    #[serde(default)]
    size_gib: String,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    visibility: String,
    #[serde(default)]
    pool: String,
}

/// A pool as the creation form offers it.
struct PoolChoice {
    name: String,
    kind: &'static str,
    default: bool,
}

#[derive(Template)]
#[template(path = "volumes.html")]
struct ListPage {
    nav: Nav,
    notice: Option<&'static str>,
    enabled: bool,
    volumes: Vec<VolumeView>,
    pools: Vec<PoolChoice>,
    form: VolumeForm,
    error: Option<String>,
}

async fn list_page(
    cloud: &Cloud,
    user: &WebUser,
    status: StatusCode,
    notice: Option<&'static str>,
    form: VolumeForm,
    error: Option<String>,
) -> Response {
    let volumes = if cloud.volumes.is_some() {
        match pdisk::list(cloud, &user.principal).await {
            Ok(v) => v,
            Err(e) => return refused(user, e.into()),
        }
    } else {
        Vec::new()
    };
    render(
        status,
        &ListPage {
            nav: Nav::new(user, "volumes"),
            notice,
            enabled: cloud.volumes.is_some(),
            volumes,
            pools: pool_choices(cloud),
            form,
            error,
        },
    )
}

fn pool_choices(cloud: &Cloud) -> Vec<PoolChoice> {
    let Some(storage) = &cloud.volumes else {
        return Vec::new();
    };
    let default = storage.pool_for(None).map(|p| p.name.clone()).ok();
    storage
        .pools()
        .iter()
        .map(|p| PoolChoice {
            name: p.name.clone(),
            kind: p.kind(),
            default: default.as_deref() == Some(p.name.as_str()),
        })
        .collect()
}

pub async fn list(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Query(q): Query<Notice>,
) -> Response {
    let notice = notice_text(q.notice.as_deref());
    list_page(
        &cloud,
        &user,
        StatusCode::OK,
        notice,
        VolumeForm::default(),
        None,
    )
    .await
}

fn visibility(text: &str) -> Result<Option<Visibility>, Refusal> {
    match text.trim() {
        "" => Ok(None),
        "private" => Ok(Some(Visibility::Private)),
        "public" => Ok(Some(Visibility::Public)),
        other => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("visibility: '{other}' is neither private nor public"),
        )),
    }
}

fn tag(text: &str) -> Option<String> {
    Some(text.trim().to_owned()).filter(|t| !t.is_empty())
}

pub async fn create(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Form(form): Form<VolumeForm>,
) -> Response {
    let request = (|| {
        Ok::<_, Refusal>(VolumeCreate {
            // An empty size is the API's missing field: refused by pdisk's own range check.
            size_gib: number_field("size (GiB)", &form.size_gib)?.unwrap_or(0),
            tag: tag(&form.tag),
            visibility: visibility(&form.visibility)?,
            kind: None,
            pool: Some(form.pool.trim().to_owned()).filter(|p| !p.is_empty()),
        })
    })();
    let created = match request {
        Ok(request) => {
            let who = user.principal.clone();
            let cloud2 = cloud.clone();
            // In a task of its own, as the API does: a browser that goes away does not
            // cut the creation in half.
            tokio::spawn(async move { pdisk::create(&cloud2, &who, request).await })
                .await
                .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
                .and_then(|r| r.map_err(Refusal::from))
        }
        Err(e) => Err(e),
    };
    match created {
        Ok(v) => see_other(&format!("/ui/volumes/{}?notice=created", v.uuid)),
        Err(e) => {
            let reason = e.reason().to_owned();
            list_page(&cloud, &user, e.status(), None, form, Some(reason)).await
        }
    }
}

#[derive(Template)]
#[template(path = "volume.html")]
struct DetailPage {
    nav: Nav,
    notice: Option<&'static str>,
    volume: VolumeView,
    mine: bool,
    /// StratusLab's `POST /disks/{uuid}`: an ORIGIN is snapshotted, a LIVE rebased.
    origin: bool,
    live: bool,
    running: Vec<VmView>,
    error: Option<String>,
}

async fn detail_page(
    cloud: &Cloud,
    user: &WebUser,
    uuid: &str,
    status: StatusCode,
    notice: Option<&'static str>,
    error: Option<String>,
) -> Response {
    let volume = match pdisk::get(cloud, &user.principal, uuid).await {
        Ok(v) => v,
        Err(e) => return refused(user, e.into()),
    };
    let running = match vms::list(cloud, &user.principal, 0, crate::api::MAX_PAGE, false).await {
        Ok(list) => list
            .vms
            .into_iter()
            .filter(|vm| vm.state == VmState::Running && vm.owner == user.principal.name)
            .collect(),
        Err(e) => return refused(user, e.into()),
    };
    render(
        status,
        &DetailPage {
            nav: Nav::new(user, "volumes"),
            notice,
            mine: volume.owner == user.principal.name || user.principal.is_admin(),
            origin: VolumeKind::from_name(&volume.kind).is_some_and(VolumeKind::is_origin),
            live: VolumeKind::from_name(&volume.kind).is_some_and(VolumeKind::is_live),
            volume,
            running,
            error,
        },
    )
}

pub async fn detail(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(uuid): Path<String>,
    Query(q): Query<Notice>,
) -> Response {
    let notice = notice_text(q.notice.as_deref());
    detail_page(&cloud, &user, &uuid, StatusCode::OK, notice, None).await
}

pub async fn update(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(uuid): Path<String>,
    Form(form): Form<VolumeForm>,
) -> Response {
    let done = match visibility(&form.visibility) {
        Ok(visibility) => {
            let request = VolumeUpdate {
                // The form always sends the tag: empty clears it.
                tag: Some(form.tag.trim().to_owned()),
                visibility,
                kind: None,
            };
            pdisk::update(&cloud, &user.principal, &uuid, request)
                .await
                .map_err(Refusal::from)
        }
        Err(e) => Err(e),
    };
    match done {
        Ok(v) => see_other(&format!("/ui/volumes/{}?notice=updated", v.uuid)),
        Err(e) => refused_on_page(&cloud, &user, &uuid, e).await,
    }
}

pub async fn delete(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(uuid): Path<String>,
) -> Response {
    let (who, cloud2, target) = (user.principal.clone(), cloud.clone(), uuid.clone());
    let done = to_the_end(async move { pdisk::delete(&cloud2, &who, &target).await }).await;
    match done {
        Ok(()) => see_other("/ui/volumes"),
        Err(e) => refused_on_page(&cloud, &user, &uuid, e).await,
    }
}

/// Runs a volume change in a task of its own, so a browser that gives up waiting does not
/// stop it halfway (a rebase copies the data).
async fn to_the_end<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, pdisk::VolumeError>> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::spawn(change)
        .await
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        .and_then(|r| r.map_err(Refusal::from))
}

/// The volume's page again, with the refusal's status and reason beside its forms.
async fn refused_on_page(cloud: &Cloud, user: &WebUser, uuid: &str, e: Refusal) -> Response {
    let reason = e.reason().to_owned();
    detail_page(cloud, user, uuid, e.status(), None, Some(reason)).await
}

/// A snapshot of an ORIGIN or a rebase of a LIVE; the new volume's page follows.
pub async fn derive(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(uuid): Path<String>,
) -> Response {
    let (who, cloud2, source) = (user.principal.clone(), cloud.clone(), uuid.clone());
    let done = to_the_end(async move { pdisk::derive(&cloud2, &who, &source).await }).await;
    match done {
        Ok(made) => see_other(&format!("/ui/volumes/{}?notice=derived", made.uuid)),
        Err(e) => refused_on_page(&cloud, &user, &uuid, e).await,
    }
}

#[derive(Deserialize)]
pub struct VmChoice {
    #[serde(default)]
    vm: String,
}

fn chosen_vm(form: &VmChoice) -> Result<i64, Refusal> {
    form.vm
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| Refusal::new(StatusCode::BAD_REQUEST, "choose one of your running VMs"))
}

pub async fn attach(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(uuid): Path<String>,
    Form(form): Form<VmChoice>,
) -> Response {
    mount_from_page(&cloud, &user, &uuid, &form, true).await
}

pub async fn detach(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(uuid): Path<String>,
    Form(form): Form<VmChoice>,
) -> Response {
    mount_from_page(&cloud, &user, &uuid, &form, false).await
}

async fn mount_from_page(
    cloud: &Cloud,
    user: &WebUser,
    uuid: &str,
    form: &VmChoice,
    attach: bool,
) -> Response {
    let done = async { super::mount(cloud, user, uuid, chosen_vm(form)?, attach).await };
    match done.await {
        Ok(m) => see_other(&format!(
            "/ui/volumes/{}?notice={}",
            m.uuid,
            if attach { "attach" } else { "detach" }
        )),
        Err(e) => refused_on_page(cloud, user, uuid, e).await,
    }
}
