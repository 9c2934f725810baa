//! Instances: the list (states refresh in place), the launch form, one VM's page (state
//! history, console tail, kill / shutdown / delete, volumes attached and detached).

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Form};
use serde::Deserialize;

use super::session::WebUser;
use super::{fragment, number_field, refused, render, see_other, Nav};
use crate::api::types::{InstanceType, RunRequest, VmState, VmView};
use crate::api::Refusal;
use crate::jobs::Action;
use crate::pdisk::VolumeView;
use crate::{pdisk, vms, Cloud};

/// How much of the console the page shows.
const CONSOLE_TAIL: u64 = 16 * 1024;

#[derive(Deserialize)]
pub struct Seen {
    seen: Option<String>,
}

#[derive(Deserialize)]
pub struct Notice {
    pub notice: Option<String>,
}

/// What a redirect after a successful action tells the next page (a fixed set, so a link
/// cannot make the console say anything else).
pub fn notice_text(code: Option<&str>) -> Option<&'static str> {
    Some(match code? {
        "launched" => "The instance was accepted; it starts on a node now.",
        "kill" => "The instance is being killed.",
        "shutdown" => "The guest was asked to power off.",
        "deleted" => "The instance's record was deleted.",
        "attach" => "The volume is being attached.",
        "detach" => "The volume is being detached.",
        "created" => "The volume was created.",
        "updated" => "The volume was updated.",
        "derived" => "The volume was made from the one it names as its base.",
        "uploaded" => "The entry was accepted by the Marketplace.",
        "user" => "The user was added.",
        "quotas" => "The quotas were saved.",
        "node" => "The node's state was changed.",
        _ => return None,
    })
}

#[derive(Template)]
#[template(path = "instances.html")]
struct ListPage {
    nav: Nav,
    notice: Option<&'static str>,
    vms: Vec<VmView>,
    version: String,
}

#[derive(Template)]
#[template(path = "instance_rows.html")]
struct Rows {
    nav: Nav,
    vms: Vec<VmView>,
    version: String,
}

async fn my_vms(cloud: &Cloud, user: &WebUser) -> Result<Vec<VmView>, Refusal> {
    Ok(
        vms::list(cloud, &user.principal, 0, crate::api::MAX_PAGE, true)
            .await
            .map_err(Refusal::from)?
            .vms,
    )
}

pub async fn list(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Query(q): Query<Notice>,
) -> Response {
    match my_vms(&cloud, &user).await {
        Ok(vms) => render(
            StatusCode::OK,
            &ListPage {
                nav: Nav::new(&user, "instances"),
                notice: notice_text(q.notice.as_deref()),
                vms,
                version: String::new(),
            },
        ),
        Err(e) => refused(&user, e),
    }
}

pub async fn rows(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Query(q): Query<Seen>,
) -> Response {
    match my_vms(&cloud, &user).await {
        Ok(vms) => fragment(q.seen.as_deref(), |version| Rows {
            nav: Nav::new(&user, "instances"),
            vms: vms.clone(),
            version: version.to_owned(),
        }),
        Err(e) => refused(&user, e),
    }
}

/// The launch form's fields, as typed (so a refused form comes back as the user left it).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LaunchForm {
    #[serde(default)]
    image: String,
    #[serde(default)]
    instance_type: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    public_key: String,
    /// `KEY=VALUE` lines.
    #[serde(default)]
    context: String,
    #[serde(default)]
    volatile_disk_gib: String,
    /// Checked volumes (one `volume` field each).
    #[serde(default)]
    volume: Vec<String>,
}

#[derive(Template)]
#[template(path = "launch.html")]
struct LaunchPage {
    nav: Nav,
    form: LaunchForm,
    types: Vec<InstanceType>,
    volumes: Vec<VolumeView>,
    images: Vec<(String, String)>,
    error: Option<String>,
}

#[derive(Deserialize)]
pub struct LaunchQuery {
    image: Option<String>,
}

/// The user's volumes no VM holds (what can be attached at launch or hot-plugged).
fn free_volumes(volumes: &[VolumeView], user: &WebUser) -> Vec<VolumeView> {
    volumes
        .iter()
        .filter(|v| v.owner == user.principal.name && v.mounts.is_empty() && v.state == "available")
        .cloned()
        .collect()
}

/// The volumes the user may see (none when the cloud keeps no volumes).
async fn visible_volumes(cloud: &Cloud, user: &WebUser) -> Result<Vec<VolumeView>, Refusal> {
    if cloud.volumes.is_none() {
        return Ok(Vec::new());
    }
    Ok(pdisk::list(cloud, &user.principal).await?)
}

async fn launch_page(
    cloud: &Cloud,
    user: &WebUser,
    status: StatusCode,
    form: LaunchForm,
    error: Option<String>,
) -> Response {
    let images = super::market::machine_images(cloud).await;
    let volumes = match visible_volumes(cloud, user).await {
        Ok(all) => free_volumes(&all, user),
        Err(e) => return refused(user, e),
    };
    render(
        status,
        &LaunchPage {
            nav: Nav::new(user, "instances"),
            form,
            types: cloud.types.clone(),
            volumes,
            images,
            error,
        },
    )
}

pub async fn launch_form(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Query(q): Query<LaunchQuery>,
) -> Response {
    let form = LaunchForm {
        image: q.image.unwrap_or_default(),
        ..Default::default()
    };
    launch_page(&cloud, &user, StatusCode::OK, form, None).await
}

/// The form as the API's request; a field the API could not even parse is refused here
/// with the field named.
fn run_request(form: &LaunchForm) -> Result<RunRequest, Refusal> {
    let bad = |reason: String| Refusal::new(StatusCode::BAD_REQUEST, reason);
    let mut context = BTreeMap::new();
    for (n, line) in form.context.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(bad(format!(
                "context line {}: '{line}' is not KEY=VALUE",
                n + 1
            )));
        };
        context.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    let volatile = match number_field("volatile disk (GiB)", &form.volatile_disk_gib)? {
        Some(v) if v < 0 => return Err(bad("volatile disk (GiB) must be 1 or more".into())),
        Some(v) => Some(v as u64),
        None => None,
    };
    let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    Ok(RunRequest {
        image: form.image.trim().to_owned(),
        instance_type: text(&form.instance_type),
        name: text(&form.name),
        public_key: text(&form.public_key),
        context,
        volatile_disk_gib: volatile,
        persistent_disks: form.volume.clone(),
        ..Default::default()
    })
}

pub async fn launch(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    body: axum::body::Bytes,
) -> Response {
    // `volume` may repeat, which serde_urlencoded's maps cannot hold: collect by hand.
    let mut form = LaunchForm::default();
    for (k, v) in form_urlencoded::parse(&body) {
        let v = v.into_owned();
        match k.as_ref() {
            "image" => form.image = v,
            "instance_type" => form.instance_type = v,
            "name" => form.name = v,
            "public_key" => form.public_key = v,
            "context" => form.context = v,
            "volatile_disk_gib" => form.volatile_disk_gib = v,
            "volume" => form.volume.push(v),
            _ => {}
        }
    }
    let request = match run_request(&form) {
        Ok(r) => r,
        Err(e) => {
            return launch_page(&cloud, &user, e.status(), form, Some(e.reason().to_owned())).await
        }
    };
    match vms::create(&cloud, &user.principal, request).await {
        Ok(accepted) => see_other(&format!("/ui/instances/{}?notice=launched", accepted.vm.id)),
        Err(e) => {
            let e = Refusal::from(e);
            launch_page(&cloud, &user, e.status(), form, Some(e.reason().to_owned())).await
        }
    }
}

fn vm_id(text: &str) -> Result<i64, Refusal> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| Refusal::new(StatusCode::BAD_REQUEST, format!("'{text}' is not a VM id")))
}

async fn load_vm(cloud: &Cloud, user: &WebUser, id: &str) -> Result<VmView, Refusal> {
    Ok(vms::get(cloud, &user.principal, vm_id(id)?).await?)
}

#[derive(Template)]
#[template(path = "instance.html")]
struct DetailPage {
    nav: Nav,
    notice: Option<&'static str>,
    vm: VmView,
    mounted: Vec<VolumeView>,
    attachable: Vec<VolumeView>,
    console: String,
    version: String,
    console_version: String,
}

#[derive(Template)]
#[template(path = "instance_status.html")]
struct StatusFragment {
    nav: Nav,
    vm: VmView,
    mounted: Vec<VolumeView>,
    version: String,
}

#[derive(Template)]
#[template(path = "instance_console.html")]
struct ConsoleFragment {
    vm: VmView,
    console: String,
    console_version: String,
}

/// The VM's volumes (those mounted on it).
fn mounted_on(volumes: &[VolumeView], vm: i64) -> Vec<VolumeView> {
    volumes
        .iter()
        .filter(|v| v.mounts.iter().any(|m| m.vm_id == vm))
        .cloned()
        .collect()
}

/// The console's last bytes as text; a VM without a console yet has none.
async fn console_text(cloud: &Cloud, user: &WebUser, vm: &VmView) -> String {
    if matches!(vm.state, VmState::Pending | VmState::Done | VmState::Failed) {
        return String::new();
    }
    match vms::console(cloud, &user.principal, vm.id, CONSOLE_TAIL).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!(
            "(the console cannot be read: {})",
            Refusal::from(e).reason()
        ),
    }
}

pub async fn detail(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(id): Path<String>,
    Query(q): Query<Notice>,
) -> Response {
    let vm = match load_vm(&cloud, &user, &id).await {
        Ok(vm) => vm,
        Err(e) => return refused(&user, e),
    };
    let volumes = match visible_volumes(&cloud, &user).await {
        Ok(volumes) => volumes,
        Err(e) => return refused(&user, e),
    };
    let mounted = mounted_on(&volumes, vm.id);
    let attachable = if vm.state == VmState::Running && vm.owner == user.principal.name {
        free_volumes(&volumes, &user)
    } else {
        Vec::new()
    };
    let console = console_text(&cloud, &user, &vm).await;
    render(
        StatusCode::OK,
        &DetailPage {
            nav: Nav::new(&user, "instances"),
            notice: notice_text(q.notice.as_deref()),
            vm,
            mounted,
            attachable,
            console,
            version: String::new(),
            console_version: String::new(),
        },
    )
}

pub async fn status(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(id): Path<String>,
    Query(q): Query<Seen>,
) -> Response {
    let vm = match load_vm(&cloud, &user, &id).await {
        Ok(vm) => vm,
        Err(e) => return refused(&user, e),
    };
    let mounted = match visible_volumes(&cloud, &user).await {
        Ok(volumes) => mounted_on(&volumes, vm.id),
        Err(e) => return refused(&user, e),
    };
    fragment(q.seen.as_deref(), |version| StatusFragment {
        nav: Nav::new(&user, "instances"),
        vm: vm.clone(),
        mounted: mounted.clone(),
        version: version.to_owned(),
    })
}

pub async fn console(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(id): Path<String>,
    Query(q): Query<Seen>,
) -> Response {
    let vm = match load_vm(&cloud, &user, &id).await {
        Ok(vm) => vm,
        Err(e) => return refused(&user, e),
    };
    let console = console_text(&cloud, &user, &vm).await;
    fragment(q.seen.as_deref(), |version| ConsoleFragment {
        vm: vm.clone(),
        console: console.clone(),
        console_version: version.to_owned(),
    })
}

async fn stop(cloud: &Cloud, user: &WebUser, id: &str, action: Action, notice: &str) -> Response {
    let done = match vm_id(id) {
        Ok(id) => vms::request_stop(cloud, &user.principal, id, action)
            .await
            .map_err(Refusal::from)
            .map(|_| id),
        Err(e) => Err(e),
    };
    match done {
        Ok(id) => see_other(&format!("/ui/instances/{id}?notice={notice}")),
        Err(e) => refused(user, e),
    }
}

pub async fn kill(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(id): Path<String>,
) -> Response {
    stop(&cloud, &user, &id, Action::Kill, "kill").await
}

pub async fn shutdown(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(id): Path<String>,
) -> Response {
    stop(&cloud, &user, &id, Action::Shutdown, "shutdown").await
}

pub async fn delete(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(id): Path<String>,
) -> Response {
    let done = match vm_id(&id) {
        Ok(id) => vms::delete_record(&cloud, &user.principal, id)
            .await
            .map_err(Refusal::from),
        Err(e) => Err(e),
    };
    match done {
        Ok(()) => see_other("/ui/instances?notice=deleted"),
        Err(e) => refused(&user, e),
    }
}

#[derive(Deserialize)]
pub struct VolumeChoice {
    #[serde(default)]
    volume: String,
}

pub async fn attach(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(id): Path<String>,
    Form(form): Form<VolumeChoice>,
) -> Response {
    mount_from_page(&cloud, &user, &id, &form.volume, true).await
}

pub async fn detach(
    State(cloud): State<Arc<Cloud>>,
    Extension(user): Extension<WebUser>,
    Path(id): Path<String>,
    Form(form): Form<VolumeChoice>,
) -> Response {
    mount_from_page(&cloud, &user, &id, &form.volume, false).await
}

async fn mount_from_page(
    cloud: &Cloud,
    user: &WebUser,
    id: &str,
    volume: &str,
    attach: bool,
) -> Response {
    let done = async {
        let vm = vm_id(id)?;
        super::mount(cloud, user, volume, vm, attach).await?;
        Ok::<_, Refusal>(vm)
    };
    match done.await {
        Ok(vm) => see_other(&format!(
            "/ui/instances/{vm}?notice={}",
            if attach { "attach" } else { "detach" }
        )),
        Err(e) => refused(user, e),
    }
}
