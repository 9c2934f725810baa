//! The web console against a whole cloud on this host (real Marketplace, node agent,
//! `stratus-vmm` tiny guests, orchestrator): its pages over plain HTTP (no JavaScript:
//! sessions, CSRF, the API's reasons for bad input, one user's things hidden from
//! another), and in a real browser (Debian's headless chromium through chromedriver).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use stratus_vmm::test_guest::Guest;

/// A browser-less visitor of the console: its session cookie and CSRF token.
struct Visitor {
    addr: SocketAddr,
    cookie: String,
    csrf: String,
}

fn unescape(html: &str) -> String {
    html.replace("&#60;", "<")
        .replace("&#62;", ">")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
        .replace("&#38;", "&")
}

/// The text of the first element carrying `id="…"` (no nested tags expected).
fn element_text(html: &str, id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let start = at + html[at..].find('>')? + 1;
    let end = start + html[start..].find('<')?;
    Some(unescape(&html[start..end]))
}

/// The id of the VM a launch form's answer redirects to.
fn launched_vm(answer: &Answer) -> i64 {
    answer
        .header("location")
        .and_then(|l| l.strip_prefix("/ui/instances/"))
        .and_then(|l| l.split('?').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no VM in {:?}", answer.header("location")))
}

/// The value of the first `name="csrf"` hidden field.
fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    html[at..at + html[at..].find('"').unwrap()].to_owned()
}

fn cookie_value(answer: &Answer, name: &str) -> Option<String> {
    answer
        .headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .filter_map(|(_, v)| v.split(';').next())
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn form(fields: &[(&str, &str)]) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
        .into_bytes()
}

impl Visitor {
    fn log_in(addr: SocketAddr, user: &str, password: &str) -> Visitor {
        let page = http_with(addr, "GET", "/ui/login", &[], b"");
        assert_eq!(page.status, 200);
        let login_cookie = cookie_value(&page, "stratus_login").expect("a login cookie");
        let csrf = csrf_of(&page.text());
        let answer = http_with(
            addr,
            "POST",
            "/ui/login",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Cookie", &format!("stratus_login={login_cookie}")),
            ],
            &form(&[
                ("user", user),
                ("password", password),
                ("csrf", &csrf),
                ("next", "/ui/volumes"),
            ]),
        );
        assert_eq!(answer.status, 303, "{}", answer.text());
        assert_eq!(answer.header("location"), Some("/ui/volumes"));
        let set = answer
            .headers
            .iter()
            .find(|(k, v)| k == "set-cookie" && v.starts_with("stratus_session="))
            .map(|(_, v)| v.clone())
            .expect("a session cookie");
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let cookie = cookie_value(&answer, "stratus_session").unwrap();
        let mut visitor = Visitor {
            addr,
            cookie,
            csrf: String::new(),
        };
        let page = visitor.get("/ui/instances");
        assert_eq!(page.status, 200);
        visitor.csrf = csrf_of(&page.text());
        visitor
    }

    fn get(&self, path: &str) -> Answer {
        http_with(
            self.addr,
            "GET",
            path,
            &[("Cookie", &format!("stratus_session={}", self.cookie))],
            b"",
        )
    }

    /// A form post as the console's own page sends it (with the session's CSRF token).
    fn post(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let mut fields = fields.to_vec();
        fields.push(("csrf", &self.csrf));
        self.post_raw(path, &fields, &[])
    }

    fn post_raw(&self, path: &str, fields: &[(&str, &str)], extra: &[(&str, &str)]) -> Answer {
        let cookie = format!("stratus_session={}", self.cookie);
        let mut headers = vec![
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", cookie.as_str()),
        ];
        headers.extend_from_slice(extra);
        http_with(self.addr, "POST", path, &headers, &form(fields))
    }
}

fn the_cloud(market: &Marketplace) -> (Agent, Orchestrator) {
    let agent = Agent::start(4, 4096, "");
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("cloud.db").display());
    // A second pool beside `volume_dir`: the volume form offers the choice.
    let extra = format!(
        "marketplace_upload_token_file = \"{}\"\n\
         [[volume_pools]]\nname = \"scratch\"\ndir = \"{}\"\n",
        market.token_file().display(),
        dir.path().join("scratch").display()
    );
    let cloud = Orchestrator::start_on(market, &database, &extra, dir);
    cloud.add_node("node-a", &agent);
    (agent, cloud)
}

#[test]
fn pages_render_without_javascript_and_refuse_what_the_api_refuses() {
    let market = Marketplace::start();
    let image = market.publish(Guest::EventLoop, |_| {});
    let (_agent, cloud) = the_cloud(&market);
    let alice = cloud.add_user("alice", "alice-password");
    cloud.add_user("bob", "bob-password");
    let addr = cloud.addr;

    // Nobody logged in: every page sends the browser to the login form, and back after.
    let anonymous = http_with(addr, "GET", "/ui/volumes", &[], b"");
    assert_eq!(anonymous.status, 303);
    assert_eq!(
        anonymous.header("location"),
        Some("/ui/login?next=%2Fui%2Fvolumes")
    );
    assert_eq!(
        http_with(addr, "GET", "/", &[], b"").header("location"),
        Some("/ui/")
    );
    // A login form posted without the login page's cookie (from another site) is refused,
    // and so is a wrong password.
    let page = http_with(addr, "GET", "/ui/login", &[], b"");
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'self'"));
    // Pages are never kept by the browser (a logged-out shared machine's Back button).
    assert_eq!(page.header("cache-control"), Some("no-store"));
    // Plain HTTP: no promise of HTTPS to come (that is the HTTPS console's, in cli.rs).
    assert_eq!(page.header("strict-transport-security"), None);
    let token = csrf_of(&page.text());
    let forged = http_with(
        addr,
        "POST",
        "/ui/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &form(&[
            ("user", "alice"),
            ("password", "alice-password"),
            ("csrf", &token),
        ]),
    );
    assert_eq!(forged.status, 403);
    assert!(cookie_value(&forged, "stratus_session").is_none());
    let login_cookie = format!(
        "stratus_login={}",
        cookie_value(&page, "stratus_login").unwrap()
    );
    let wrong = http_with(
        addr,
        "POST",
        "/ui/login",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &login_cookie),
        ],
        &form(&[("user", "alice"), ("password", "guess"), ("csrf", &token)]),
    );
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    assert_eq!(
        element_text(&wrong.text(), "error").unwrap(),
        "wrong user name or password"
    );
    // Token and cookie match, but the browser says another site posted the form: a
    // planted login cookie cannot log the visitor in to someone else's account.
    let planted = http_with(
        addr,
        "POST",
        "/ui/login",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &login_cookie),
            ("Origin", "http://198.18.0.66"),
        ],
        &form(&[
            ("user", "alice"),
            ("password", "alice-password"),
            ("csrf", &token),
        ]),
    );
    assert_eq!(planted.status, 403, "{}", planted.text());
    assert!(cookie_value(&planted, "stratus_session").is_none());

    let a = Visitor::log_in(addr, "alice", "alice-password");
    let b = Visitor::log_in(addr, "bob", "bob-password");
    assert_eq!(
        a.get("/ui/volumes").header("cache-control"),
        Some("no-store")
    );
    assert_eq!(
        a.get("/ui/static/style.css").header("cache-control"),
        Some("public, max-age=3600")
    );

    // State-changing posts without the session's token, with another session's token, or
    // from a foreign origin change nothing.
    for (fields, extra) in [
        (vec![("size_gib", "1")], vec![]),
        (vec![("size_gib", "1"), ("csrf", b.csrf.as_str())], vec![]),
        (
            vec![("size_gib", "1"), ("csrf", a.csrf.as_str())],
            vec![("Origin", "http://evil.example")],
        ),
        (
            vec![("size_gib", "1")],
            vec![("X-CSRF-Token", b.csrf.as_str())],
        ),
    ] {
        let refused = a.post_raw("/ui/volumes", &fields, &extra);
        assert_eq!(refused.status, 403, "{}", refused.text());
        let reason = element_text(&refused.text(), "error").unwrap();
        assert!(
            reason.contains("CSRF") || reason.contains("another site"),
            "{reason}"
        );
    }
    let (_, listed) = cloud.call_as(alice, "GET", "/disks", None);
    assert_eq!(listed, json!([]), "a refused form created a volume");

    // Bad input: the API's status and reason, beside the form as the user left it.
    for (size, tag) in [
        ("0", "zero"),
        ("2048", "huge"),
        ("1", &"t".repeat(41) as &str),
    ] {
        let (status, api) = cloud.call_as(
            alice,
            "POST",
            "/disks",
            Some(&json!({"size_gib": size.parse::<i64>().unwrap(), "tag": tag})),
        );
        let page = a.post("/ui/volumes", &[("size_gib", size), ("tag", tag)]);
        assert_eq!(page.status, status, "{}", page.text());
        assert_eq!(element_text(&page.text(), "error").unwrap(), error(&api));
        assert!(page.text().contains(&format!("value=\"{tag}\"")));
    }
    let page = a.post("/ui/volumes", &[("size_gib", "ten")]);
    assert_eq!(page.status, 400);
    assert_eq!(
        element_text(&page.text(), "error").unwrap(),
        "size (GiB): 'ten' is not a whole number"
    );
    let (status, api) = cloud.call_as(alice, "POST", "/vms", Some(&json!({"image": "nope"})));
    let page = a.post("/ui/instances", &[("image", "nope")]);
    assert_eq!((page.status, status), (400, 400));
    assert_eq!(element_text(&page.text(), "error").unwrap(), error(&api));

    // A volume made through the form is the API's volume.
    let made = a.post(
        "/ui/volumes",
        &[("size_gib", "1"), ("tag", "results <2026>")],
    );
    assert_eq!(made.status, 303, "{}", made.text());
    let location = made.header("location").unwrap().to_owned();
    let uuid = location
        .strip_prefix("/ui/volumes/")
        .and_then(|l| l.strip_suffix("?notice=created"))
        .unwrap()
        .to_owned();
    let (status, volume) = cloud.call_as(alice, "GET", &format!("/disks/{uuid}"), None);
    assert_eq!(status, 200);
    assert_eq!(volume["tag"], "results <2026>");
    assert_eq!(volume["pool"], "file", "the default pool");
    // The form offers the pools, the default chosen; an unknown one gets the API's reason.
    let listing = a.get("/ui/volumes").text();
    assert!(
        listing.contains("<option value=\"file\" selected>file (file)</option>")
            && listing.contains("<option value=\"scratch\">scratch (file)</option>"),
        "{listing}"
    );
    let made = a.post("/ui/volumes", &[("size_gib", "1"), ("pool", "scratch")]);
    assert_eq!(made.status, 303, "{}", made.text());
    let (_, all) = cloud.call_as(alice, "GET", "/disks", None);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|v| v["pool"] == "scratch"),
        "{all}"
    );
    let (status, api) = cloud.call_as(
        alice,
        "POST",
        "/disks",
        Some(&json!({"size_gib": 1, "pool": "elsewhere"})),
    );
    let page = a.post("/ui/volumes", &[("size_gib", "1"), ("pool", "elsewhere")]);
    assert_eq!((page.status, status), (400, 400), "{api}");
    assert_eq!(element_text(&page.text(), "error").unwrap(), error(&api));
    // Scripts send the token in a header instead of the form.
    let renamed = a.post_raw(
        &format!("/ui/volumes/{uuid}"),
        &[("tag", "results <2026>"), ("visibility", "private")],
        &[
            ("X-CSRF-Token", &a.csrf),
            ("Origin", &format!("http://{addr}")),
        ],
    );
    assert_eq!(renamed.status, 303, "{}", renamed.text());
    let page = a.get(&location).text();
    assert!(!page.contains("results <2026>"), "tags are escaped");
    assert!(unescape(&page).contains("results <2026>"));
    assert_eq!(
        element_text(&page, "notice").unwrap(),
        "The volume was created."
    );

    // A VM launched through the form reaches Running; its page shows it with no script.
    let launched = a.post(
        "/ui/instances",
        &[
            ("image", &image),
            ("instance_type", "t1.micro"),
            ("context", "GREETING=hello\n"),
        ],
    );
    assert_eq!(launched.status, 303, "{}", launched.text());
    let vm = launched_vm(&launched);
    cloud.wait_state(vm, "Running");
    let page = a.get(&format!("/ui/instances/{vm}")).text();
    assert_eq!(element_text(&page, "vm-state").unwrap(), "Running");
    let list = a.get("/ui/instances").text();
    assert!(list.contains(&format!("id=\"vm-{vm}\"")));
    // The polled fragment: 204 while nothing changed, so the page keeps the focus.
    let status = a.get(&format!("/ui/instances/{vm}/status?seen=")).text();
    let at = status.find("\"seen\": \"").unwrap() + 9;
    let version = &status[at..at + 24];
    assert_eq!(
        a.get(&format!("/ui/instances/{vm}/status?seen={version}"))
            .status,
        204
    );

    // Bob sees none of it, and cannot act on it.
    let bobs_list = b.get("/ui/instances").text();
    assert!(!bobs_list.contains(&format!("id=\"vm-{vm}\"")));
    assert!(!b.get("/ui/volumes").text().contains(&uuid));
    for path in [format!("/ui/instances/{vm}"), format!("/ui/volumes/{uuid}")] {
        let page = b.get(&path);
        assert_eq!(page.status, 403, "{path}");
    }
    let killed = b.post(&format!("/ui/instances/{vm}/kill"), &[]);
    assert_eq!(killed.status, 403);
    assert_eq!(b.get("/ui/admin/nodes").status, 403);
    assert_eq!(cloud.wait_state(vm, "Running")["state"], "Running");

    // Attach and detach through the volume page.
    let attached = a.post(
        &format!("/ui/volumes/{uuid}/attach"),
        &[("vm", &vm.to_string())],
    );
    assert_eq!(attached.status, 303, "{}", attached.text());
    let start = Instant::now();
    loop {
        let (_, v) = cloud.call_as(alice, "GET", &format!("/disks/{uuid}"), None);
        if v["mounts"][0]["state"] == "attached" {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "never attached: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let page = a.get(&format!("/ui/volumes/{uuid}")).text();
    assert!(element_text(&page, "volume-mounts").is_some());
    assert!(page.contains(&format!(
        "href=\"/ui/instances/{vm}\">VM {vm}</a> as vdz, attached since"
    )));
    // Made public while Alice's VM holds it: Bob sees that it is in use, not which VM has
    // it, and gets no Attach form that could only be refused.
    let (status, e) = cloud.call_as(
        alice,
        "PUT",
        &format!("/disks/{uuid}"),
        Some(&json!({"visibility": "public"})),
    );
    assert_eq!(status, 200, "{e}");
    // Bob has a running VM of his own, which the Attach form would offer.
    let bobs = b.post(
        "/ui/instances",
        &[("image", &image), ("instance_type", "t1.micro")],
    );
    assert_eq!(bobs.status, 303, "{}", bobs.text());
    let bobs_vm = launched_vm(&bobs);
    cloud.wait_state(bobs_vm, "Running");
    let bobs_view = b.get(&format!("/ui/volumes/{uuid}")).text();
    assert_eq!(
        element_text(&bobs_view, "volume-mounts").unwrap(),
        "another user's VM"
    );
    assert!(element_text(&bobs_view, "in-use").is_some(), "{bobs_view}");
    assert!(!bobs_view.contains("id=\"attach\""));
    assert!(!bobs_view.contains(&format!("VM {vm}")));
    let bobs_list = b.get("/ui/volumes").text();
    assert!(bobs_list.contains(&uuid) && bobs_list.contains("another user's VM"));
    let killed = b.post(&format!("/ui/instances/{bobs_vm}/kill"), &[]);
    assert_eq!(killed.status, 303, "{}", killed.text());
    // Alice, its owner, sees her VM holding it.
    let alices_view = a.get(&format!("/ui/volumes/{uuid}")).text();
    assert!(alices_view.contains(&format!("VM {vm}</a> as vdz")));
    let (status, e) = cloud.call_as(
        alice,
        "PUT",
        &format!("/disks/{uuid}"),
        Some(&json!({"visibility": "private"})),
    );
    assert_eq!(status, 200, "{e}");
    // Deleting a mounted volume: the API's 409 and reason.
    let (status, api) = cloud.call_as(alice, "DELETE", &format!("/disks/{uuid}"), None);
    let page = a.post(&format!("/ui/volumes/{uuid}/delete"), &[]);
    assert_eq!((page.status, status), (409, 409));
    assert_eq!(element_text(&page.text(), "error").unwrap(), error(&api));
    let detached = a.post(&format!("/ui/instances/{vm}/detach"), &[("volume", &uuid)]);
    assert_eq!(detached.status, 303, "{}", detached.text());
    let start = Instant::now();
    loop {
        let (_, v) = cloud.call_as(alice, "GET", &format!("/disks/{uuid}"), None);
        if v["mounts"] == json!([]) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "never detached: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Snapshots from the volume page: an ORIGIN's LIVE, then that LIVE's rebase; a plain
    // volume offers neither and is refused as the API refuses it.
    let page = a.get(&format!("/ui/volumes/{uuid}")).text();
    assert!(
        !page.contains("id=\"derive\""),
        "a data volume has no snapshot"
    );
    let (status, api) = cloud.call_as(alice, "POST", &format!("/disks/{uuid}"), None);
    let refused = a.post(&format!("/ui/volumes/{uuid}/derive"), &[]);
    assert_eq!((refused.status, status), (409, 409));
    assert_eq!(element_text(&refused.text(), "error").unwrap(), error(&api));
    let (_, origin) = cloud.call_as(
        alice,
        "POST",
        "/disks",
        Some(&json!({"size_gib": 1, "type": "MACHINE_IMAGE_ORIGIN"})),
    );
    let origin = origin["uuid"].as_str().unwrap().to_owned();
    let page = a.get(&format!("/ui/volumes/{origin}")).text();
    assert_eq!(
        element_text(&page, "derive").unwrap(),
        "Make a LIVE snapshot"
    );
    let mut made_from = origin.clone();
    for (kind, next_button) in [
        ("MACHINE_IMAGE_LIVE", Some("Rebase into a new ORIGIN")),
        ("MACHINE_IMAGE_ORIGIN", Some("Make a LIVE snapshot")),
    ] {
        let derived = a.post(&format!("/ui/volumes/{made_from}/derive"), &[]);
        assert_eq!(derived.status, 303, "{}", derived.text());
        let location = derived.header("location").unwrap().to_owned();
        let new = location
            .strip_prefix("/ui/volumes/")
            .and_then(|l| l.strip_suffix("?notice=derived"))
            .unwrap()
            .to_owned();
        let (_, volume) = cloud.call_as(alice, "GET", &format!("/disks/{new}"), None);
        assert_eq!(volume["type"], kind, "{volume}");
        assert_eq!(volume["base_uuid"], made_from.as_str(), "{volume}");
        let page = a.get(&location).text();
        assert_eq!(element_text(&page, "volume-base").unwrap(), made_from);
        assert_eq!(element_text(&page, "derive").as_deref(), next_button);
        made_from = new;
    }
    // The ORIGIN now has a snapshot (its `count`), and no mount: nothing holds it, and
    // Alice may attach it to her running VM.
    let (_, seen) = cloud.call_as(alice, "GET", &format!("/disks/{origin}"), None);
    assert_eq!(
        (seen["count"].as_i64(), seen["hidden_mounts"].as_i64()),
        (Some(1), Some(0))
    );
    let page = a.get(&format!("/ui/volumes/{origin}")).text();
    assert_eq!(element_text(&page, "volume-mounts").unwrap(), "nothing");
    assert!(page.contains("id=\"attach\""), "{page}");

    // Marketplace: search, the entry's page, its XML and JSON.
    let found = a
        .get("/ui/marketplace?email=jane%40stratus.test&status=all")
        .text();
    assert!(found.contains(&image), "{found}");
    let at = found.find("/ui/marketplace/entry/").unwrap();
    let entry_path = &found[at..at + found[at..].find('"').unwrap()];
    let entry = a.get(entry_path);
    assert_eq!(entry.status, 200);
    assert_eq!(
        element_text(&entry.text(), "entry-identifier").unwrap(),
        image
    );
    let raw = entry_path.replace("/entry/", "/raw/xml/");
    let xml = a.get(&raw);
    assert_eq!(xml.status, 200);
    assert!(xml
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(xml.header("x-content-type-options"), Some("nosniff"));
    assert!(xml.text().contains("Signature") && xml.text().contains(&image));
    assert!(xml
        .header("content-security-policy")
        .unwrap()
        .ends_with("sandbox"));
    let raw = entry_path.replace("/entry/", "/raw/json/");
    let json_entry: Value = serde_json::from_slice(&a.get(&raw).body).unwrap();
    assert_eq!(json_entry["identifier"], image);

    // The administrator's pages: nodes enabled and disabled, users and quotas, networks.
    let admin = Visitor::log_in(addr, "admin", ADMIN_PASSWORD);
    let nodes = admin.get("/ui/admin/nodes").text();
    assert!(nodes.contains("id=\"node-node-a\""), "{nodes}");
    for state in ["disabled", "enabled"] {
        let changed = admin.post("/ui/admin/nodes/node-a/state", &[("state", state)]);
        assert_eq!(changed.status, 303, "{}", changed.text());
        let (_, views) = cloud.admin("GET", "/nodes", None);
        assert_eq!(views[0]["state"], state);
    }
    // A form the handler cannot read (the state twice) and a path that is not UTF-8 are
    // shown as the console's error page with axum's reason, not as plain text.
    let unreadable = admin.post(
        "/ui/admin/nodes/node-a/state",
        &[("state", "disabled"), ("state", "maintenance")],
    );
    assert_eq!(unreadable.status, 422, "{}", unreadable.text());
    let reason = element_text(&unreadable.text(), "error").expect("the error page");
    assert!(reason.contains("duplicate field `state`"), "{reason}");
    let not_utf8 = admin.get("/ui/instances/%FF");
    assert_eq!(not_utf8.status, 400, "{}", not_utf8.text());
    assert!(
        element_text(&not_utf8.text(), "error").is_some(),
        "{}",
        not_utf8.text()
    );
    // A link followed to a form's target: a page says so (not the API's JSON), with `Allow`.
    let wrong_method = admin.get("/ui/instances/1/kill");
    assert_eq!(wrong_method.status, 405, "{}", wrong_method.text());
    let reason = element_text(&wrong_method.text(), "error").expect("the error page");
    assert!(reason.contains("GET is not allowed"), "{reason}");
    assert_eq!(wrong_method.header("allow"), Some("POST"));
    let missing = admin.get("/ui/no/such/page");
    assert_eq!(missing.status, 404, "{}", missing.text());
    let reason = element_text(&missing.text(), "error").expect("the error page");
    assert!(reason.contains("/ui/no/such/page"), "{reason}");
    assert!(wrong_method
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
    assert_eq!(cloud.admin("GET", "/nodes", None).1[0]["state"], "enabled");
    let (status, api) = cloud.admin(
        "POST",
        "/users",
        Some(&json!({"name": "bad name", "password": "x"})),
    );
    let page = admin.post(
        "/ui/admin/users",
        &[("name", "bad name"), ("password", "x")],
    );
    assert_eq!((page.status, status), (400, 400));
    assert_eq!(element_text(&page.text(), "error").unwrap(), error(&api));
    let added = admin.post(
        "/ui/admin/users",
        &[
            ("name", "carol"),
            ("password", "carol-password"),
            ("role", "user"),
        ],
    );
    assert_eq!(added.status, 303, "{}", added.text());
    let quotas = admin.post(
        "/ui/admin/users/carol/quotas",
        &[("cpu", "4"), ("memory_mib", ""), ("vms", "2")],
    );
    assert_eq!(quotas.status, 303, "{}", quotas.text());
    let (_, users) = cloud.admin("GET", "/users", None);
    let carol = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "carol")
        .unwrap();
    assert_eq!(
        (
            &carol["cpu_quota"],
            &carol["memory_quota_mib"],
            &carol["vm_quota"]
        ),
        (&json!(4), &Value::Null, &json!(2))
    );
    let (status, api) = cloud.admin("PUT", "/users/carol/quotas", Some(&json!({"cpu": -1})));
    let page = admin.post("/ui/admin/users/carol/quotas", &[("cpu", "-1")]);
    assert_eq!((page.status, status), (400, 400));
    assert_eq!(element_text(&page.text(), "error").unwrap(), error(&api));
    assert_eq!(admin.get("/ui/admin/networks").status, 200);
    // Carol can log in to the console with the password the administrator gave her.
    Visitor::log_in(addr, "carol", "carol-password");
    // Dan gave the administrator only the hash stratus-hash-password made of his.
    let hash = stratus_orchestrator::users::hash_password("dan-password").unwrap();
    let added = admin.post(
        "/ui/admin/users",
        &[("name", "dan"), ("password", ""), ("password_hash", &hash)],
    );
    assert_eq!(added.status, 303, "{}", added.text());
    Visitor::log_in(addr, "dan", "dan-password");
    let neither = admin.post("/ui/admin/users", &[("name", "erin"), ("password", "")]);
    assert_eq!(neither.status, 400, "{}", neither.text());
    let reason = element_text(&neither.text(), "error").unwrap();
    assert!(reason.contains("either a password or the hash"), "{reason}");

    // Kill through the page; logging out ends the session everywhere.
    let killed = a.post(&format!("/ui/instances/{vm}/kill"), &[]);
    assert_eq!(killed.status, 303);
    cloud.wait_state(vm, "Done");
    assert_eq!(a.post("/ui/logout", &[]).status, 303);
    assert_eq!(a.get("/ui/instances").status, 303);
}

// Behind HTTPS (`console_secure_cookies`) the cookies are `__Host-` ones, which browsers
// take only from this host, Secure and for the whole site; the console reads them by that
// name alone.
#[test]
fn over_https_the_console_s_cookies_are_host_only() {
    let market = Marketplace::start();
    let cloud = Orchestrator::start(&market, "console_secure_cookies = true\n");
    let addr = cloud.addr;
    let page = http_with(addr, "GET", "/ui/login", &[], b"");
    let set = page
        .headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.clone())
        .expect("a login cookie");
    assert!(set.starts_with("__Host-stratus_login="), "{set}");
    assert!(
        set.contains("; Path=/;") && set.ends_with("; Secure"),
        "{set}"
    );
    let login_cookie = cookie_value(&page, "__Host-stratus_login").unwrap();
    let log_in = |cookie: &str| {
        http_with(
            addr,
            "POST",
            "/ui/login",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Cookie", cookie),
            ],
            &form(&[
                ("user", "admin"),
                ("password", ADMIN_PASSWORD),
                ("csrf", &csrf_of(&page.text())),
            ]),
        )
    };
    assert_eq!(
        log_in(&format!("stratus_login={login_cookie}")).status,
        403,
        "the name without its prefix, as a sibling site could set it"
    );
    let answer = log_in(&format!("__Host-stratus_login={login_cookie}"));
    assert_eq!(answer.status, 303, "{}", answer.text());
    let session = cookie_value(&answer, "__Host-stratus_session").expect("a session cookie");
    let get = |cookie: String| http_with(addr, "GET", "/ui/instances", &[("Cookie", &cookie)], b"");
    assert_eq!(get(format!("__Host-stratus_session={session}")).status, 200);
    assert_eq!(get(format!("stratus_session={session}")).status, 303);
}

/// chromedriver on a free port, killed with the test.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's chromium, headless, through WebDriver.
struct Browser {
    runtime: tokio::runtime::Runtime,
    client: fantoccini::Client,
    base: String,
    shots: PathBuf,
    _driver: Driver,
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).unwrap().to_path_buf()
        });
    let dir = target.join("web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Browser {
    /// Chromium now and then dies as it starts on a loaded machine ("DevToolsActivePort
    /// file doesn't exist"): the session is asked for again, from a fresh chromedriver and
    /// profile, before the test gives up with the last reason.
    fn start(base: String) -> Browser {
        let mut last = None;
        for attempt in 1..=3 {
            match Self::try_start(&base) {
                Ok(browser) => return browser,
                Err(e) => {
                    eprintln!("chromium session, attempt {attempt}: {e}");
                    last = Some(e);
                }
            }
        }
        panic!("start a chromium session: {last:?}");
    }

    fn try_start(base: &str) -> Result<Browser, fantoccini::error::NewSessionError> {
        let chromedriver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromedriver is not installed: run scripts/install-deps.sh scripts/test-packages.txt");
        let port = free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run chromedriver");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let driver = Driver {
            child,
            port,
            _profile: profile,
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--no-proxy-server",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ]}),
        );
        let client = runtime.block_on(
            fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            )
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.port)),
        )?;
        Ok(Browser {
            runtime,
            client,
            base: base.to_owned(),
            shots: screenshot_dir(),
            _driver: driver,
        })
    }

    fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
    ) -> T {
        self.runtime
            .block_on(f)
            .unwrap_or_else(|e| panic!("browser: {e}"))
    }

    fn goto(&self, path: &str) {
        self.run(self.client.goto(&format!("{}{path}", self.base)));
    }

    fn path(&self) -> String {
        let url = self.run(self.client.current_url());
        format!(
            "{}{}",
            url.path(),
            url.query().map(|q| format!("?{q}")).unwrap_or_default()
        )
    }

    fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.run(
            self.client
                .wait()
                .at_most(DEADLINE)
                .for_element(fantoccini::Locator::Css(css)),
        )
    }

    fn fill(&self, css: &str, text: &str) {
        let field = self.find(css);
        self.run(field.clear());
        self.run(field.send_keys(text));
    }

    fn click(&self, css: &str) {
        self.on_element(css, |element| async move { element.click().await })
    }

    fn text(&self, css: &str) -> String {
        self.on_element(css, |element| async move { element.text().await })
    }

    /// Runs `action` on the element. htmx swaps the refreshing parts of a page every 2–3 s,
    /// so the element found can be gone by the time `action` reaches it: then it is found
    /// again (a click on a gone element did nothing, so it is safe to repeat).
    fn on_element<T, F>(&self, css: &str, action: impl Fn(fantoccini::elements::Element) -> F) -> T
    where
        F: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
    {
        let start = Instant::now();
        loop {
            match self.runtime.block_on(action(self.find(css))) {
                Ok(value) => return value,
                Err(e) if e.is_stale_element_reference() && start.elapsed() < DEADLINE => {}
                Err(e) => panic!("browser: {e}"),
            }
        }
    }

    fn has(&self, css: &str) -> bool {
        !self
            .run(self.client.find_all(fantoccini::Locator::Css(css)))
            .is_empty()
    }

    fn script(&self, js: &str) -> Value {
        self.run(self.client.execute(js, vec![]))
    }

    /// Waits (without touching the page) until `check` holds.
    fn wait_until(&self, what: &str, check: impl Fn(&Browser) -> bool) {
        let start = Instant::now();
        while !check(self) {
            assert!(
                start.elapsed() < DEADLINE,
                "the page never showed {what}: {}",
                self.path()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn shot(&self, name: &str) {
        let png = self.run(self.client.screenshot());
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    fn log_in(&self, user: &str, password: &str) {
        self.goto("/ui/instances");
        assert!(
            self.path().starts_with("/ui/login?next="),
            "{}",
            self.path()
        );
        self.fill("#user", user);
        self.fill("#password", password);
        self.click("#login");
        self.wait_until("the instances page", |b| b.path() == "/ui/instances");
        assert_eq!(self.text("#whoami"), user);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.runtime.block_on(client.close());
    }
}

#[test]
fn a_user_works_the_cloud_in_a_real_browser() {
    let market = Marketplace::start();
    let image = market.publish(Guest::EventLoop, |_| {});
    let (_agent, cloud) = the_cloud(&market);
    let alice = cloud.add_user("alice", "alice-password");
    cloud.add_user("bob", "bob-password");
    let browser = Browser::start(format!("http://{}", cloud.addr));

    browser.goto("/ui/login");
    browser.shot("01-login");
    // The first Tab lands on the skip link: the page is usable from the keyboard.
    browser.run(browser.find("body").send_keys("\u{E004}"));
    assert_eq!(
        browser.script("return document.activeElement.className"),
        "skip"
    );
    browser.log_in("alice", "alice-password");
    browser.shot("02-instances-empty");

    // Launch from the Marketplace entry's "Launch it" link, through the form.
    browser.goto("/ui/marketplace");
    browser.run(browser.find("#email").select_by_value("jane@stratus.test"));
    browser.click("#search button");
    browser.wait_until("the search result", |b| {
        b.has("#entries a[href^='/ui/marketplace/entry/']")
    });
    browser.shot("03-marketplace");
    browser.click("#entries a[href^='/ui/marketplace/entry/']");
    assert_eq!(browser.text("#entry-identifier"), image);
    browser.shot("04-entry");
    browser.click("#launch-this");
    assert_eq!(
        browser.run(browser.find("#image").prop("value")).as_deref(),
        Some(image.as_str())
    );
    browser.run(browser.find("#instance_type").select_by_value("t1.micro"));
    browser.fill("#name", "web-vm");
    browser.shot("05-launch");
    browser.click("#launch button[type=submit]");
    browser.wait_until("the instance page", |b| {
        b.path().contains("?notice=launched")
    });
    let vm: i64 = browser.path()["/ui/instances/".len()..]
        .split('?')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Pending → Running on the same page: a mark left in the page survives (no reload).
    browser.script("window.stratusMark = 42;");
    browser.wait_until("Running", |b| b.text("#vm-state") == "Running");
    assert_eq!(browser.script("return window.stratusMark"), json!(42));
    assert!(browser.text("#vm-history").contains("Running"));
    browser.shot("06-instance-running");

    // A volume: created, attached from its page, detached from the VM's page.
    browser.goto("/ui/volumes");
    browser.fill("#size_gib", "0");
    browser.click("#create-volume button");
    let (_, api) = cloud.call_as(alice, "POST", "/disks", Some(&json!({"size_gib": 0})));
    assert_eq!(browser.text("#error"), error(&api));
    browser.shot("07-volume-refused");
    browser.fill("#size_gib", "1");
    browser.fill("#tag", "web-data");
    browser.click("#create-volume button");
    browser.wait_until("the new volume", |b| b.path().ends_with("?notice=created"));
    let uuid = browser.text("#volume-uuid");
    browser.run(browser.find("#vm").select_by_value(&vm.to_string()));
    browser.click("#attach");
    browser.wait_until("the attach notice", |b| {
        b.path().ends_with("?notice=attach")
    });
    browser.goto(&format!("/ui/instances/{vm}"));
    browser.wait_until("the volume attached", |b| {
        b.text("#vm-volumes").contains("attached since")
    });
    browser.shot("08-volume-attached");
    browser.click("#vm-volumes button.detach");
    browser.wait_until("the detach notice", |b| {
        b.path().ends_with("?notice=detach")
    });
    browser.wait_until("the volume gone", |b| {
        b.text("#vm-volumes") == "None attached."
    });
    let (_, v) = cloud.call_as(alice, "GET", &format!("/disks/{uuid}"), None);
    assert_eq!(v["mounts"], json!([]));
    browser.goto("/ui/volumes");
    browser.shot("09-volumes");

    // The entry's XML, as the Marketplace signed it.
    browser.goto("/ui/marketplace?status=all");
    browser.click("#entries a[href^='/ui/marketplace/entry/']");
    browser.click("#as-xml");
    browser.wait_until("the XML", |b| {
        b.path().starts_with("/ui/marketplace/raw/xml/")
    });
    let source = browser.run(browser.client.source());
    assert!(
        source.contains(&image) && source.contains("Signature"),
        "{source}"
    );

    // A bad entry uploaded: the Marketplace's reason beside the form.
    let bad = tempfile::Builder::new().suffix(".xml").tempfile().unwrap();
    std::fs::write(bad.path(), "<rdf:RDF>not signed</rdf:RDF>").unwrap();
    browser.goto("/ui/marketplace");
    browser.run(
        browser
            .find("#entry")
            .send_keys(bad.path().to_str().unwrap()),
    );
    browser.click("#upload button");
    let reason = browser.text("#upload-error");
    assert!(!reason.is_empty());
    browser.shot("10-upload-refused");

    // On a phone-sized screen nothing spills sideways (tables scroll in their box).
    browser.run(browser.client.set_window_size(390, 844));
    browser.goto("/ui/instances");
    assert_eq!(
        browser.script("return document.documentElement.scrollWidth <= window.innerWidth"),
        json!(true)
    );
    browser.shot("11-instances-narrow");
    browser.run(browser.client.set_window_size(1280, 900));

    // Another user sees none of alice's things.
    browser.click(".logout button");
    browser.wait_until("the login page", |b| b.path() == "/ui/login");
    browser.log_in("bob", "bob-password");
    assert!(!browser.has(&format!("#vm-{vm}")));
    browser.goto("/ui/volumes");
    assert!(!browser.run(browser.client.source()).contains(&uuid));
    browser.goto(&format!("/ui/instances/{vm}"));
    assert!(
        browser.text("#error").contains("belongs to another user"),
        "{}",
        browser.text("#error")
    );
    browser.shot("12-other-user");
}
