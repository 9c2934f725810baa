//! The orchestrator end to end: the real binary on SQLite, driving real node agents that
//! run real `stratus-vmm` processes with tiny guests on this host's `/dev/kvm`, booted
//! from signed entries of a real Marketplace.

mod common;
#[path = "../../nodeagent/tests/support/pki.rs"]
mod pki;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use stratus_vmm::test_guest::Guest;

fn states(vm: &Value) -> Vec<String> {
    vm["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_owned())
        .collect()
}

fn run_vm(cloud: &Orchestrator, user: (&str, &str), request: Value) -> i64 {
    let (status, accepted) = cloud.call_as(user, "POST", "/vms", Some(&request));
    assert_eq!(status, 201, "{accepted}");
    accepted["vm"]["id"].as_i64().unwrap()
}

#[test]
fn a_vm_lives_its_whole_life_through_the_cloud_on_sqlite() {
    a_vm_lives_its_whole_life(Backend::Sqlite);
}

#[test]
fn a_vm_lives_its_whole_life_through_the_cloud_on_postgres() {
    a_vm_lives_its_whole_life(Backend::Postgres);
}

fn a_vm_lives_its_whole_life(backend: Backend) {
    let market = Marketplace::start();
    let image = market.publish(Guest::EventLoop, |_| {});
    let a = Agent::start(4, 4096, "");
    let b = Agent::start(4, 4096, "");
    let database = Database::new(backend);
    let cloud = Orchestrator::start_with(&market, &database, "");
    cloud.add_node("node-a", &a);
    cloud.add_node("node-b", &b);
    let alice = cloud.add_user("alice", "alice-password");
    let bob = cloud.add_user("bob", "bob-password");

    let request = json!({"image": image, "instance_type": "t1.micro",
        "context": {"GREETING": "hello"}, "public_key": "ssh-ed25519 AAAA alice"});
    let (status, accepted) = cloud.call_as(alice, "POST", "/vms", Some(&request));
    assert_eq!(status, 201, "{accepted}");
    assert_eq!(accepted["vm"]["state"], "Pending");
    let id = accepted["vm"]["id"].as_i64().unwrap();
    assert_eq!(accepted["vm"]["name"], format!("one-{id}"));
    assert_eq!(accepted["vm"]["owner"], "alice");

    let vm = cloud.wait_state(id, "Running");
    let node = vm["node"].as_str().unwrap().to_owned();
    let agent = if node == "node-a" { &a } else { &b };
    assert!(agent.vm_ids().contains(&id.to_string()), "{node}");
    // The node got the VM as the request and the type say.
    let (_, on_node) = agent.call("GET", &format!("/vms/{id}"));
    assert_eq!(on_node["state"], "running");
    assert_eq!(on_node["spec"]["vcpus"], 1);
    assert_eq!(on_node["spec"]["memory_mib"], 512);
    assert_eq!(
        on_node["spec"]["disks"][0],
        json!({"id": "swap", "source": {"volatile": {"size_gib": 1}}, "read_only": false, "serial": "swap"})
    );
    assert_eq!(on_node["spec"]["context"]["pairs"]["GREETING"], "hello");
    assert_eq!(
        on_node["spec"]["context"]["public_key"],
        "ssh-ed25519 AAAA alice"
    );
    assert_eq!(
        on_node["spec"]["boot"]["image"]["identifier"], image,
        "the Marketplace entry goes to the node"
    );

    // Alice sees her VM (not its node); Bob sees nothing of it and cannot touch it.
    let (status, mine) = cloud.call_as(alice, "GET", &format!("/vms/{id}"), None);
    assert_eq!(status, 200);
    assert!(mine["node"].is_null(), "{mine}");
    let (status, e) = cloud.call_as(bob, "GET", &format!("/vms/{id}"), None);
    assert_eq!(status, 403);
    assert_eq!(error(&e), format!("VM {id} belongs to another user"));
    let (status, e) = cloud.call_as(bob, "POST", &format!("/vms/{id}/kill"), None);
    assert_eq!(status, 403, "{e}");
    assert_eq!(cloud.call_as(bob, "GET", "/vms", None).1["count"], 0);
    assert_eq!(cloud.call_as(alice, "GET", "/vms", None).1["count"], 1);

    // The CIMI views: the entry point is open to all, the collections are the caller's.
    let (status, body) = http(cloud.addr, "GET", "/cimi", None, "application/json", b"");
    assert_eq!(status, 200);
    let entry = parse(&body);
    assert_eq!(
        entry["resourceURI"],
        "http://schemas.dmtf.org/cimi/1/CloudEntryPoint"
    );
    assert_eq!(entry["machines"]["href"], "machine");
    let (_, machines) = cloud.call_as(alice, "GET", "/cimi/machine", None);
    assert_eq!(machines["count"], 1, "{machines}");
    assert_eq!(machines["machines"][0]["id"], format!("machine/{id}"));
    assert_eq!(machines["machines"][0]["state"], "STARTED");
    assert_eq!(machines["machines"][0]["memory"], 512 * 1024);
    assert_eq!(
        cloud.call_as(bob, "GET", "/cimi/machine", None).1["count"],
        0
    );
    assert_eq!(
        cloud
            .call_as(bob, "GET", &format!("/cimi/machine/{id}"), None)
            .0,
        403
    );
    let (_, configs) = cloud.call_as(bob, "GET", "/cimi/machineConfiguration", None);
    assert_eq!(configs["count"], 7);

    // The console comes from the node.
    let (status, console) = cloud.call_as(
        alice,
        "GET",
        &format!("/vms/{id}/console?bytes=1048576"),
        None,
    );
    assert_eq!(status, 200);
    assert!(console.as_str().unwrap().starts_with("up\n"), "{console}");

    let (status, killed) = cloud.call_as(alice, "POST", &format!("/vms/{id}/kill"), None);
    assert_eq!(status, 202, "{killed}");
    let vm = cloud.wait_state(id, "Done");
    assert_eq!(vm["holds_resources"], false);
    assert_eq!(vm["reason"], "killed");
    assert_eq!(
        states(&vm),
        ["Pending", "Prolog", "Running", "Epilog", "Done"],
        "{vm}"
    );
    assert!(agent.vm_ids().is_empty(), "the node forgot it");
    let (status, e) = cloud.call_as(alice, "POST", &format!("/vms/{id}/kill"), None);
    assert_eq!(status, 409);
    assert_eq!(error(&e), format!("VM {id} is Done already"));
    // The job that did it is there to see.
    let job = killed["job"].as_i64().unwrap();
    let (status, j) = cloud.call_as(alice, "GET", &format!("/jobs/{job}"), None);
    assert_eq!(status, 200);
    assert_eq!(j["state"], "success");
    assert_eq!(j["action"], "kill");
    assert_eq!(
        cloud.call_as(bob, "GET", &format!("/jobs/{job}"), None).0,
        403
    );
    let (_, cimi_jobs) = cloud.call_as(alice, "GET", "/cimi/job", None);
    assert_eq!(cimi_jobs["count"], 2, "deploy and kill: {cimi_jobs}");
    assert_eq!(cimi_jobs["jobs"][0]["id"], format!("job/{job}"));
    assert_eq!(cimi_jobs["jobs"][0]["state"], "SUCCESS");
    assert_eq!(
        cimi_jobs["jobs"][0]["targetResource"]["href"],
        format!("machine/{id}")
    );

    assert_eq!(
        cloud.call_as(bob, "DELETE", &format!("/vms/{id}"), None).0,
        403
    );
    assert_eq!(
        cloud
            .call_as(alice, "DELETE", &format!("/vms/{id}"), None)
            .0,
        204
    );
    assert_eq!(
        cloud.call_as(alice, "GET", &format!("/vms/{id}"), None).0,
        404
    );
}

#[test]
fn placement_spreads_obeys_requirements_and_shutdowns_are_graceful() {
    let market = Marketplace::start();
    let looping = market.publish(Guest::EventLoop, |_| {});
    let powers_off = market.publish(Guest::PowerOff, |_| {});
    let a = Agent::start(4, 4096, "");
    let b = Agent::start(4, 4096, "");
    let cloud = Orchestrator::start(&market, "");
    cloud.add_node("node-a", &a);
    cloud.add_node("node-b", &b);
    let alice = cloud.add_user("alice", "alice-password");

    // Spread: the second VM goes to the other node.
    let request = json!({"image": looping, "instance_type": "t1.micro"});
    let first = run_vm(&cloud, alice, request.clone());
    let n1 = cloud.wait_state(first, "Running")["node"].clone();
    let second = run_vm(&cloud, alice, request.clone());
    let n2 = cloud.wait_state(second, "Running")["node"].clone();
    assert_ne!(n1, n2, "spread over both nodes");

    // A graceful shutdown: the guest handles the power button.
    let (status, _) = cloud.call_as(alice, "POST", &format!("/vms/{first}/shutdown"), None);
    assert_eq!(status, 202);
    let vm = cloud.wait_state(first, "Done");
    assert_eq!(vm["reason"], "shut down");
    assert!(states(&vm).contains(&"Shutdown".to_owned()), "{vm}");

    // A guest that powers off by itself is Done once its node resources are released.
    let gone = run_vm(
        &cloud,
        alice,
        json!({"image": powers_off, "instance_type": "t1.micro"}),
    );
    let vm = cloud.wait_vm(gone, "Done", |vm| vm["state"] == "Done");
    let history = vm["history"].as_array().unwrap();
    assert!(
        history
            .iter()
            .any(|e| e["state"] == "Epilog" && e["reason"] == "the guest powered off"),
        "{vm}"
    );
    assert_eq!(vm["holds_resources"], false);

    // A read-only disk from another Marketplace image, cached on the node.
    let with_disk = run_vm(
        &cloud,
        alice,
        json!({"image": looping, "instance_type": "t1.micro", "readonly_disks": [powers_off]}),
    );
    let vm = cloud.wait_state(with_disk, "Running");
    let agent = if vm["node"] == "node-a" { &a } else { &b };
    let (_, on_node) = agent.call("GET", &format!("/vms/{with_disk}"));
    let disk = &on_node["spec"]["disks"][1];
    assert_eq!(disk["id"], "readonly0", "{on_node}");
    assert_eq!(disk["read_only"], true);
    assert_eq!(disk["source"]["image"]["entry"]["identifier"], powers_off);
    let pid = on_node["pid"].as_u64().unwrap();
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(
        cmdline.contains(&format!(
            "id=readonly0,path={}",
            agent
                .dir
                .path()
                .join("state/images")
                .join(&powers_off)
                .display()
        )) && cmdline.contains("ro=on,serial=readonly-0"),
        "{cmdline}"
    );
    let (status, e) = cloud.call_as(
        alice,
        "POST",
        "/vms",
        Some(&json!({"image": looping, "readonly_disks": ["AAAAAAAAAAAAAAAAAAAAAAAAAAA"]})),
    );
    assert_eq!(status, 400, "{e}");
    assert!(
        error(&e).contains("no Marketplace entry for image AAAA"),
        "{e}"
    );
    assert_eq!(
        cloud
            .call_as(alice, "POST", &format!("/vms/{with_disk}/kill"), None)
            .0,
        202
    );
    cloud.wait_state(with_disk, "Done");

    // Requirements pick the node; impossible ones leave the VM waiting, with the reason.
    let mut wanted = request.clone();
    wanted["requirements"] = json!(r#"name = "node-b" & cpu_free >= 1"#);
    let on_b = run_vm(&cloud, alice, wanted);
    assert_eq!(cloud.wait_state(on_b, "Running")["node"], "node-b");
    let mut impossible = request.clone();
    impossible["requirements"] = json!(r#"name = "nowhere""#);
    let waiting = run_vm(&cloud, alice, impossible);
    let vm = cloud.wait_vm(waiting, "refused by every node", |vm| {
        vm["reason"]
            .as_str()
            .is_some_and(|r| r.contains("does not meet the requirements"))
    });
    assert_eq!(vm["state"], "Pending");
    let (status, _) = cloud.call_as(alice, "POST", &format!("/vms/{waiting}/kill"), None);
    assert_eq!(status, 202);
    assert_eq!(
        cloud.wait_state(waiting, "Done")["reason"],
        "killed before it was placed"
    );

    // A disabled node gets no new VMs.
    let (status, _) = cloud.admin(
        "PUT",
        "/nodes/node-a/state",
        Some(&json!({"state": "disabled"})),
    );
    assert_eq!(status, 200);
    for _ in 0..2 {
        let id = run_vm(&cloud, alice, request.clone());
        assert_eq!(cloud.wait_state(id, "Running")["node"], "node-b");
    }
    let (_, nodes) = cloud.admin("GET", "/nodes", None);
    let a_row = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-a")
        .unwrap();
    assert_eq!(a_row["state"], "disabled");
    assert_eq!(a_row["health"], "up");
    assert_eq!(a_row["cpu_total"], 4);
}

#[test]
fn quotas_and_bad_requests_are_refused_with_reasons_and_nothing_is_made_on_sqlite() {
    quotas_and_bad_requests(Backend::Sqlite);
}

#[test]
fn quotas_and_bad_requests_are_refused_with_reasons_and_nothing_is_made_on_postgres() {
    quotas_and_bad_requests(Backend::Postgres);
}

fn quotas_and_bad_requests(backend: Backend) {
    let market = Marketplace::start();
    let image = market.publish(Guest::Halt, |_| {});
    let a = Agent::start(8, 8192, "");
    let database = Database::new(backend);
    let cloud = Orchestrator::start_with(&market, &database, "");
    cloud.add_node("node-a", &a);
    let alice = cloud.add_user("alice", "alice-password");
    let bob = cloud.add_user("bob", "bob-password");
    let micro = json!({"image": image, "instance_type": "t1.micro"});

    let (status, _) = cloud.admin("PUT", "/users/alice/quotas", Some(&json!({"cpu": 2})));
    assert_eq!(status, 200);
    let (status, _) = cloud.admin(
        "PUT",
        "/users/bob/quotas",
        Some(&json!({"memory_mib": 1000, "vms": 5})),
    );
    assert_eq!(status, 200);
    run_vm(&cloud, alice, micro.clone());
    run_vm(&cloud, alice, micro.clone());
    let (status, e) = cloud.call_as(alice, "POST", "/vms", Some(&micro));
    assert_eq!(status, 403);
    assert_eq!(
        error(&e),
        "CPU quota exceeded (Quota: 2, Used: 2, Requested: 1)."
    );
    run_vm(&cloud, bob, micro.clone());
    let (status, e) = cloud.call_as(bob, "POST", "/vms", Some(&micro));
    assert_eq!(status, 403);
    assert_eq!(
        error(&e),
        "Memory quota exceeded (Quota: 1000, Used: 512, Requested: 512)."
    );
    let (_, q) = cloud.call_as(alice, "GET", "/quotas", None);
    assert_eq!(
        (
            q["cpu"].as_i64(),
            q["cpu_used"].as_i64(),
            q["vms_used"].as_i64()
        ),
        (Some(2), Some(2), Some(2))
    );

    // Who is asking.
    let (status, body) = http(cloud.addr, "GET", "/vms", None, "application/json", b"");
    assert_eq!(status, 401);
    assert!(error(&parse(&body)).contains("log in"));
    let (status, e) = cloud.call_as(("alice", "wrong"), "GET", "/vms", None);
    assert_eq!((status, error(&e)), (401, "wrong user name or password"));
    let (status, e) = cloud.call_as(alice, "GET", "/nodes", None);
    assert_eq!(status, 403);
    assert!(error(&e).contains("::ADMIN"), "{e}");
    // Another site's page, in a browser that remembers alice's Basic login: a form posted
    // to her VM, or a request the browser marks cross-site, changes nothing.
    let (_, mine) = cloud.call_as(alice, "GET", "/vms", None);
    let victim = mine["vms"][0]["id"].as_i64().unwrap();
    cloud.wait_state(victim, "Running");
    let login = basic("alice", "alice-password");
    let kill = format!("/vms/{victim}/kill");
    for headers in [
        vec![
            ("Authorization", login.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        vec![
            ("Authorization", login.as_str()),
            ("Content-Type", "text/plain;charset=UTF-8"),
        ],
        vec![
            ("Authorization", login.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        // A fetch without a body from a plain-HTTP site: no Sec-Fetch-Site, no content
        // type, only its Origin.
        vec![
            ("Authorization", login.as_str()),
            ("Origin", "http://198.18.0.66:8080"),
        ],
        vec![("Authorization", login.as_str()), ("Origin", "null")],
    ] {
        let answer = http_with(cloud.addr, "POST", &kill, &headers, b"");
        assert_eq!(answer.status, 403, "{headers:?}: {}", answer.text());
        assert!(
            answer
                .text()
                .contains("refused as a possible cross-site request"),
            "{}",
            answer.text()
        );
    }
    let (_, vm) = cloud.call_as(alice, "GET", &format!("/vms/{victim}"), None);
    assert_eq!(vm["state"], "Running", "{vm}");

    // What is asked.
    let carol = cloud.add_user("carol", "carol-password");
    for (request, status, needle) in [
        (
            json!({"image": image, "instance_type": "x9.giant"}),
            400,
            "unknown instance type 'x9.giant'",
        ),
        (
            json!({"image": "not-an-id"}),
            400,
            "not a Marketplace image identifier",
        ),
        (
            json!({"image": "AAAAAAAAAAAAAAAAAAAAAAAAAAA"}),
            400,
            "no Marketplace entry for image AAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ),
        (
            json!({"image": image, "colour": "red"}),
            400,
            "unknown field `colour`",
        ),
        (json!({"image": image, "cpu": 0}), 400, "cpu must be"),
        (
            json!({"image": image, "network": "dmz"}),
            400,
            "no network 'dmz'",
        ),
        (
            json!({"image": image, "context_method": "carrier-pigeon"}),
            400,
            "unknown context method",
        ),
        // What the node's contextualizer would refuse is refused before the 201.
        (
            json!({"image": image, "context": {"my-key": "x"}}),
            400,
            "invalid context key `my-key`",
        ),
        (
            json!({"image": image, "context": {"PATH": "/tmp"}}),
            400,
            "PATH",
        ),
        (
            json!({"image": image, "context": {"Key": "a", "KEY": "b"}}),
            400,
            "given twice",
        ),
        (
            json!({"image": image, "context": {"uid": "0"}}),
            400,
            "context key `uid` is reserved",
        ),
        (
            json!({"image": image, "context": {"BIG": "x".repeat(65 * 1024)}}),
            400,
            "values are limited to 65536 bytes",
        ),
        // What only the method's format refuses, too.
        (
            json!({"image": image, "context_method": "cloud-init",
                   "context": {"CLOUD_INIT_USER_DATA": "not base64!"}}),
            400,
            "is not valid base64",
        ),
        (
            json!({"image": image, "name": "my_vm"}),
            400,
            "the guest's hostname",
        ),
        (json!({"image": image, "name": "-lead"}), 400, "-lead"),
        (
            json!({"image": image, "requirements": "cpu_free >> 2"}),
            400,
            "number or",
        ),
        (
            json!({"image": image, "volatile_disk_gib": 5000}),
            400,
            "volatile disk",
        ),
    ] {
        let (got, e) = cloud.call_as(carol, "POST", "/vms", Some(&request));
        assert_eq!(got, status, "{request}: {e}");
        assert!(error(&e).contains(needle), "{request}: {e}");
    }
    // A deprecated image is refused with the endorser's reason.
    let old = market.publish(Guest::Halt, |e| {
        e.deprecated = Some("superseded by a newer release".into())
    });
    let (status, e) = cloud.call_as(carol, "POST", "/vms", Some(&json!({"image": old})));
    assert_eq!(status, 400, "{e}");
    assert!(error(&e).contains("superseded by a newer release"), "{e}");
    let huge = vec![b'x'; 200 * 1024];
    let (status, _) = http(
        cloud.addr,
        "POST",
        "/vms",
        Some(&basic(carol.0, carol.1)),
        "application/json",
        &huge,
    );
    assert_eq!(status, 413);
    let (status, e) = cloud.call_as(carol, "GET", "/vms/abc", None);
    assert_eq!((status, error(&e)), (400, "'abc' is not a VM id"));
    let (status, e) = cloud.call_as(carol, "GET", "/vms/999", None);
    assert_eq!((status, error(&e)), (404, "no VM 999"));
    // axum's own rejection of a path that is not UTF-8 comes in the API's error shape.
    let (status, e) = cloud.call_as(carol, "GET", "/disks/%FF", None);
    assert_eq!(status, 400, "{e}");
    assert!(
        error(&e).contains("UTF-8") || error(&e).contains("\\xFF"),
        "{e}"
    );
    let (status, e) = cloud.call_as(carol, "GET", "/nowhere", None);
    assert_eq!(status, 404);
    assert!(error(&e).contains("no endpoint /nowhere"));
    // None of that made a VM.
    assert_eq!(cloud.admin("GET", "/vms", None).1["count"], 3);
    assert_eq!(cloud.call_as(carol, "GET", "/vms", None).1["count"], 0);

    // The OpenAPI document describes the API.
    let (status, body) = http(
        cloud.addr,
        "GET",
        "/openapi.json",
        None,
        "application/json",
        b"",
    );
    assert_eq!(status, 200);
    let doc = parse(&body);
    assert!(doc["paths"]["/vms"]["post"].is_object());
    assert!(doc["components"]["schemas"]["RunRequest"].is_object());
    // Methods anyone may invent, before logging in: one label for all of them, not a new
    // series in the metrics (and the server's memory) for each.
    for i in 0..20 {
        let method = format!("INVENTED{i}");
        let (status, _) = http(cloud.addr, &method, "/vms", None, "application/json", b"");
        assert!((400..500).contains(&status), "{method}: {status}");
    }
    // The admin's metrics.
    let (status, metrics) = cloud.admin("GET", "/metrics", None);
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("stratus_orchestrator_vms"), "{metrics}");
    assert!(!metrics.contains("INVENTED"), "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
}

#[test]
fn the_admins_command_line_manages_users_and_nodes() {
    let market = Marketplace::start();
    let a = Agent::start(
        2,
        2048,
        &format!("marketplace_endpoint = \"{}\"\n", market.url()),
    );
    // The agent prefetches an image by its identifier, looked up in the Marketplace, and
    // by the URL of its entry.
    let image = market.publish(Guest::Halt, |_| {});
    let (status, info) = a.call_with("POST", "/images", &json!({"identifier": image}));
    assert_eq!(status, 202, "{info}");
    let start = std::time::Instant::now();
    while a.call("GET", &format!("/images/{image}")).1["state"] != "ready" {
        assert!(start.elapsed() < DEADLINE);
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("{}/metadata?identifier={image}", market.url());
    let (status, info) = a.call_with("POST", "/images", &json!({"url": url}));
    assert_eq!((status, &info["state"]), (200, &json!("ready")), "{info}");

    let cloud = Orchestrator::start(&market, "");
    let (ok, out) = cloud.admin_command(&["user", "add", "dave"], "dave-password\n");
    assert!(ok, "{out}");
    assert_eq!(
        cloud
            .call_as(("dave", "dave-password"), "GET", "/vms", None)
            .0,
        200
    );
    let (ok, out) = cloud.admin_command(&["user", "add", "dave"], "x\n");
    assert!(!ok);
    assert!(out.contains("user 'dave' already exists"), "{out}");
    // A name of dots alone would be '.' or '..' in the console's URLs.
    for name in [".", ".."] {
        let (ok, out) = cloud.admin_command(&["user", "add", name], "x\n");
        assert!(!ok);
        assert!(out.contains("not a valid user name"), "{out}");
        let (status, e) = cloud.admin(
            "POST",
            "/nodes",
            Some(&json!({"name": name, "url": "http://127.0.0.1:1", "token": "t"})),
        );
        assert_eq!(status, 400, "{e}");
        assert!(error(&e).contains("not a valid node name"), "{e}");
    }
    let (ok, _) = cloud.admin_command(&["user", "passwd", "dave"], "new-password\n");
    assert!(ok);
    assert_eq!(
        cloud
            .call_as(("dave", "dave-password"), "GET", "/vms", None)
            .0,
        401
    );
    assert_eq!(
        cloud
            .call_as(("dave", "new-password"), "GET", "/vms", None)
            .0,
        200
    );
    // StratusLab's way: the user hashes their password and the administrator stores the
    // hash, never learning the password.
    let hashed = output_with_stdin(
        std::process::Command::new(env!("CARGO_BIN_EXE_stratus")).arg("hash-password"),
        "daves-own-password\n",
    );
    assert!(hashed.status.success());
    let hashed = String::from_utf8(hashed.stdout).unwrap();
    let (ok, out) = cloud.admin_command(
        &[
            "user",
            "passwd",
            "dave",
            "--password-hash",
            hashed.trim_end(),
        ],
        "",
    );
    assert!(ok, "{out}");
    let dave = |password| cloud.call_as(("dave", password), "GET", "/vms", None).0;
    assert_eq!(
        (dave("new-password"), dave("daves-own-password")),
        (401, 200)
    );
    // A StratusLab user's bcrypt hash (OpenBSD's test vector, password "U*U"), through the API.
    let bcrypt = "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW";
    let (status, e) = cloud.admin(
        "POST",
        "/users",
        Some(&json!({"name": "erin", "password_hash": bcrypt})),
    );
    assert_eq!(status, 201, "{e}");
    assert_eq!(cloud.call_as(("erin", "U*U"), "GET", "/vms", None).0, 200);
    assert_eq!(cloud.call_as(("erin", "U*V"), "GET", "/vms", None).0, 401);
    // A hash whose every check would take 4 GiB is refused, as are two secrets or none.
    let costly = hashed.trim_end().replacen("m=19456", "m=4194304", 1);
    for (body, reason) in [
        (
            json!({"name": "frank", "password_hash": costly}),
            "m=4194304",
        ),
        (
            json!({"name": "frank", "password": "x", "password_hash": bcrypt}),
            "either",
        ),
        (json!({"name": "frank"}), "either"),
    ] {
        let (status, e) = cloud.admin("POST", "/users", Some(&body));
        assert_eq!(status, 400, "{e}");
        assert!(error(&e).contains(reason), "{e}");
    }
    let (ok, out) = cloud.admin_command(&["user", "add", "frank", "--password-hash", "s3cret"], "");
    assert!(!ok);
    assert!(out.contains("not a password hash"), "{out}");
    let token = cloud.dir.path().join("agent-token");
    std::fs::write(&token, AGENT_TOKEN).unwrap();
    let (ok, out) = cloud.admin_command(
        &[
            "node",
            "add",
            &a.url(),
            "--token-file",
            token.to_str().unwrap(),
            "--name",
            "n1",
        ],
        "",
    );
    assert!(ok, "{out}");
    let (ok, out) = cloud.admin_command(
        &[
            "node",
            "add",
            "ftp://x",
            "--token-file",
            token.to_str().unwrap(),
        ],
        "",
    );
    assert!(!ok);
    assert!(out.contains("not a node agent URL"), "{out}");
    // The running orchestrator polls the node it did not register itself.
    let start = std::time::Instant::now();
    loop {
        let (_, nodes) = cloud.admin("GET", "/nodes", None);
        if nodes[0]["health"] == "up" {
            assert_eq!(nodes[0]["cpu_total"], 2);
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{nodes}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out) = cloud.admin_command(&["node", "list"], "");
    assert!(ok);
    assert!(
        out.starts_with(
            "ID NAME RVM TCPU FCPU ACPU TMEM FMEM AMEM STAT\n1 n1 0 2 2 0 2048 2048 0 enabled"
        ),
        "{out}"
    );
    // A node whose VMs have ended can go; their records stay, without a node (the console
    // of such a VM answered 500 once its node was gone).
    let dave = ("dave", "daves-own-password");
    let powers_off = market.publish(Guest::PowerOff, |_| {});
    let vm = run_vm(
        &cloud,
        dave,
        json!({"image": powers_off, "instance_type": "t1.micro"}),
    );
    cloud.wait_vm(vm, "Done and released", |vm| {
        vm["state"] == "Done" && vm["holds_resources"] == false
    });
    let (ok, out) = cloud.admin_command(&["node", "remove", "n1"], "");
    assert!(ok, "{out}");
    let (status, done) = cloud.call_as(dave, "GET", &format!("/vms/{vm}"), None);
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "Done");
    let (status, e) = cloud.call_as(dave, "GET", &format!("/vms/{vm}/console"), None);
    assert_eq!(status, 409, "{e}");
    assert!(error(&e).contains("not on a node"), "{e}");
    let (ok, _) = cloud.admin_command(&["user", "del", "dave"], "");
    assert!(ok);
    assert_eq!(
        cloud
            .call_as(("dave", "daves-own-password"), "GET", "/vms", None)
            .0,
        401
    );
}

#[test]
fn a_node_that_stops_answering_has_its_vms_unknown_until_it_is_back() {
    let market = Marketplace::start();
    let image = market.publish(Guest::EventLoop, |_| {});
    let mut a = Agent::start(4, 4096, "");
    let b = Agent::start(4, 4096, "");
    let cloud = Orchestrator::start(&market, "");
    cloud.add_node("node-a", &a);
    let alice = cloud.add_user("alice", "alice-password");
    let request = json!({"image": image, "instance_type": "t1.micro"});
    let id = run_vm(&cloud, alice, request.clone());
    assert_eq!(cloud.wait_state(id, "Running")["node"], "node-a");
    cloud.add_node("node-b", &b);

    a.crash();
    let vm = cloud.wait_state(id, "Unknown");
    assert_eq!(vm["reason"], "node node-a does not answer");
    // Its console cannot be read; the node's address is for administrators only.
    let console = format!("/vms/{id}/console");
    let (status, e) = cloud.call_as(alice, "GET", &console, None);
    assert_eq!(status, 409, "{e}");
    assert_eq!(
        error(&e),
        format!("VM {id}'s console cannot be read now: its host does not answer")
    );
    let (status, e) = cloud.admin("GET", &console, None);
    assert_eq!(status, 409, "{e}");
    assert!(error(&e).contains(&a.addr.to_string()), "{e}");
    // New VMs go elsewhere meanwhile.
    let other = run_vm(&cloud, alice, request.clone());
    assert_eq!(cloud.wait_state(other, "Running")["node"], "node-b");

    // The agent comes back (its VM ran on), and so does the VM.
    a.launch();
    let vm = cloud.wait_state(id, "Running");
    assert_eq!(vm["reason"], "its node answers");
    let (status, _) = cloud.call_as(alice, "POST", &format!("/vms/{id}/kill"), None);
    assert_eq!(status, 202);
    cloud.wait_state(id, "Done");
    assert!(a.vm_ids().is_empty());

    // A VM on a node that the cloud does not have there is removed by the poller; VMs
    // whose ids no orchestrator makes are left alone.
    let kernel = a.dir.path().join("vmlinux");
    std::fs::write(
        &kernel,
        stratus_vmm::test_guest::tiny_vmlinux(&stratus_vmm::test_guest::guest_code(Guest::Halt)),
    )
    .unwrap();
    let spec = json!({"vcpus": 1, "memory_mib": 64, "boot": {"kernel": kernel}});
    for id in ["9999", "not-the-clouds"] {
        let (status, body) = a.call_with("PUT", &format!("/vms/{id}"), &spec);
        assert_eq!(status, 201, "{body}");
    }
    let start = std::time::Instant::now();
    while a.vm_ids().contains(&"9999".to_owned()) {
        assert!(start.elapsed() < DEADLINE, "{:?}", a.vm_ids());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(a.vm_ids(), ["not-the-clouds"]);

    // Node A filled up behind the cloud's back: it refuses the next VM with 409, and the
    // VM goes to the next candidate.
    for i in 0..3 {
        let (status, body) = a.call_with("PUT", &format!("/vms/foreign-{i}"), &spec);
        assert_eq!(status, 201, "{body}");
    }
    let moved = run_vm(&cloud, alice, request.clone());
    let vm = cloud.wait_state(moved, "Running");
    assert_eq!(vm["node"], "node-b", "{vm}");
    assert!(
        vm["history"].as_array().unwrap().iter().any(|e| e["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("node node-a refused it"))),
        "{vm}"
    );
}

/// A node agent serving HTTPS with a certificate of `pki`, and the URL the cloud reaches it by.
fn https_agent(pki: &pki::Pki, dir: &std::path::Path) -> (Agent, String) {
    let cert = dir.join(format!("{}.crt", free_port()));
    let key = cert.with_extension("key");
    std::fs::write(&cert, &pki.chain_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let agent = Agent::start(
        4,
        4096,
        &format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let url = format!("https://localhost:{}", agent.addr.port());
    (agent, url)
}

#[test]
fn agents_on_https_are_trusted_through_the_sites_ca_only() {
    let files = tempfile::tempdir().unwrap();
    let site = pki::pki("Stratus site CA", &["localhost"]);
    let ca = files.path().join("site-ca.pem");
    std::fs::write(&ca, &site.ca_pem).unwrap();
    let market = Marketplace::start();
    let image = market.publish(Guest::EventLoop, |_| {});
    let (_trusted, trusted_url) = https_agent(&site, files.path());
    let stranger = pki::pki("Somebody else's CA", &["localhost"]);
    let (_untrusted, untrusted_url) = https_agent(&stranger, files.path());
    let cloud = Orchestrator::start(&market, &format!("agent_ca_file = \"{}\"\n", ca.display()));
    for (name, url) in [("trusted", &trusted_url), ("untrusted", &untrusted_url)] {
        let (status, body) = cloud.admin(
            "POST",
            "/nodes",
            Some(&json!({"name": name, "url": url, "token": AGENT_TOKEN})),
        );
        assert_eq!(status, 201, "{body}");
    }
    let start = std::time::Instant::now();
    loop {
        let (_, nodes) = cloud.admin("GET", "/nodes", None);
        let node = |name: &str| {
            nodes
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["name"] == name)
                .unwrap()
                .clone()
        };
        let (good, bad) = (node("trusted"), node("untrusted"));
        // The reason a node is silent names the certificate, not just "does not answer".
        if good["health"] == "up" && bad["last_error"].is_string() {
            assert_ne!(bad["health"], "up", "{bad}");
            let error = bad["last_error"].as_str().unwrap();
            assert!(error.contains("UnknownIssuer"), "{error}");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{nodes}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let alice = cloud.add_user("alice", "alice-password");
    let id = run_vm(
        &cloud,
        alice,
        json!({"image": image, "instance_type": "t1.micro"}),
    );
    assert_eq!(cloud.wait_state(id, "Running")["node"], "trusted");
    let (status, _) = cloud.call_as(alice, "POST", &format!("/vms/{id}/kill"), None);
    assert_eq!(status, 202);
    cloud.wait_state(id, "Done");

    // A CA file that holds no certificate stops the orchestrator with the reason.
    let mut cloud = cloud;
    cloud.crash();
    std::fs::write(&ca, "nothing here\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stratus-orchestrator"))
        .arg("--config")
        .arg(&cloud.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("holds no usable CA certificate"),
        "{stderr}"
    );
}

/// Runs the test body in a network namespace of its own (the agents' bridges and DHCP
/// servers live there, and so does everything the body starts).
fn in_own_network_namespace() {
    // SAFETY: unshare changes only this thread's network namespace.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "needs root"
    );
    run(
        "ip",
        &["link", "set", "lo", "up"],
        std::path::Path::new("/"),
    );
}

fn agent_network(bridge: &str, address: &str) -> String {
    format!(
        "\n[[networks]]\nname = \"public\"\nbridge = \"{bridge}\"\nsubnet = \"198.18.7.0/24\"\n\
         address = \"{address}\"\n"
    )
}

#[test]
fn concurrent_runs_never_overcommit_a_node_or_share_an_address_and_survive_a_crash() {
    concurrent_runs(Backend::Sqlite);
}

/// The same with two orchestrator replicas on one PostgreSQL database: requests go to
/// both, and one of them is killed while it works; the other finishes its jobs.
#[test]
fn two_replicas_on_postgres_share_the_work_and_survive_one_being_killed() {
    concurrent_runs(Backend::Postgres);
}

fn concurrent_runs(backend: Backend) {
    in_own_network_namespace();
    let market = Marketplace::start();
    let image = market.publish(Guest::EventLoop, |_| {});
    // Each node has room for three t1.micro VMs.
    let a = Agent::start(3, 8192, &agent_network("stbra", "198.18.7.1"));
    let b = Agent::start(3, 8192, &agent_network("stbrb", "198.18.7.2"));
    let addresses: Vec<String> = (10..30).map(|i| format!("198.18.7.{i}")).collect();
    let config = format!(
        "job_lease_s = 3\n[[networks]]\nname = \"public\"\nkind = \"public\"\naddresses = {}\n",
        serde_json::to_string(&addresses).unwrap()
    );
    let database = Database::new(backend);
    let replicas = if backend == Backend::Postgres { 2 } else { 1 };
    let mut clouds: Vec<Orchestrator> = (0..replicas)
        .map(|_| Orchestrator::start_with(&market, &database, &config))
        .collect();
    let cloud = &clouds[0];
    cloud.add_node("node-a", &a);
    cloud.add_node("node-b", &b);
    let users = [
        cloud.add_user("u1", "password-1"),
        cloud.add_user("u2", "password-2"),
        cloud.add_user("u3", "password-3"),
    ];
    for (name, _) in users {
        let (status, _) = cloud.admin(
            "PUT",
            &format!("/users/{name}/quotas"),
            Some(&json!({"cpu": 4})),
        );
        assert_eq!(status, 200);
    }

    // 30 requests at once, 10 per user: 4 each fit the quota; 6 of the 12 fit the nodes.
    let request = json!({"image": image, "instance_type": "t1.micro"});
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..30)
            .map(|i| {
                let user = users[i % 3];
                let replica = &clouds[i % clouds.len()];
                let request = &request;
                s.spawn(move || replica.call_as(user, "POST", "/vms", Some(request)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let accepted: Vec<i64> = answers
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, a)| a["vm"]["id"].as_i64().unwrap())
        .collect();
    for (status, body) in &answers {
        if *status != 201 {
            assert_eq!(*status, 403, "{body}");
            assert!(
                error(body).starts_with("CPU quota exceeded (Quota: 4, Used: 4, Requested: 1).")
            );
        }
    }
    assert_eq!(accepted.len(), 12);
    // A crash while the deploys are under way loses none of them (on PostgreSQL the other
    // replica goes on meanwhile).
    let last = clouds.len() - 1;
    clouds[last].crash();
    clouds[last].launch();
    let cloud = &clouds[0];

    // Six run, six wait for room; every address is leased once.
    let start = std::time::Instant::now();
    let (running, waiting) = loop {
        let (_, list) = cloud.admin("GET", "/vms", None);
        let vms = list["vms"].as_array().unwrap().clone();
        let running: Vec<Value> = vms
            .iter()
            .filter(|v| v["state"] == "Running")
            .cloned()
            .collect();
        let waiting: Vec<Value> = vms
            .iter()
            .filter(|v| {
                v["state"] == "Pending"
                    && v["reason"].as_str().is_some_and(|r| {
                        r.contains("no node can take it") || r.contains("filled up meanwhile")
                    })
            })
            .cloned()
            .collect();
        if running.len() == 6 && waiting.len() == 6 {
            break (running, waiting);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{list}\nnode-a: {}\nnode-b: {}\n{}",
            a.call("GET", "/vms").1,
            b.call("GET", "/vms").1,
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for vm in &running {
        *per_node
            .entry(vm["node"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        [3, 3],
        "{per_node:?}"
    );
    assert_eq!(a.vm_ids().len() + b.vm_ids().len(), 6);
    let leases: Vec<String> = running
        .iter()
        .chain(&waiting)
        .map(|v| v["leases"][0]["ip"].as_str().unwrap().to_owned())
        .collect();
    let distinct: BTreeSet<&String> = leases.iter().collect();
    assert_eq!(distinct.len(), 12, "{leases:?}");
    for vm in &running {
        let id = vm["id"].as_i64().unwrap();
        let agent = if vm["node"] == "node-a" { &a } else { &b };
        let (_, on_node) = agent.call("GET", &format!("/vms/{id}"));
        assert_eq!(on_node["spec"]["nics"][0]["ip"], vm["leases"][0]["ip"]);
        assert_eq!(on_node["spec"]["nics"][0]["mac"], vm["leases"][0]["mac"]);
    }

    // Killing three running VMs makes room for three waiting ones.
    for vm in &running[..3] {
        let owner = users.iter().find(|u| u.0 == vm["owner"]).unwrap();
        let (status, _) = cloud.call_as(*owner, "POST", &format!("/vms/{}/kill", vm["id"]), None);
        assert_eq!(status, 202);
    }
    for vm in &running[..3] {
        cloud.wait_state(vm["id"].as_i64().unwrap(), "Done");
    }
    let start = std::time::Instant::now();
    loop {
        let (_, list) = cloud.admin("GET", "/vms", None);
        let n = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] == "Running")
            .count();
        if n == 6 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Another user's address is refused without naming the VM that holds it: asking for
    // each address in turn would otherwise map the cloud's VMs to their addresses.
    let asker = users.iter().find(|u| u.0 == running[0]["owner"]).unwrap();
    // Another user's VM, running or waiting: each user has 4 of the 12.
    let held = running[3..]
        .iter()
        .chain(&waiting)
        .find(|v| v["owner"] != running[0]["owner"])
        .unwrap();
    let ip = held["leases"][0]["ip"].as_str().unwrap();
    let mut wanted = request.clone();
    wanted["address"] = ip.into();
    let (status, e) = cloud.call_as(*asker, "POST", "/vms", Some(&wanted));
    assert_eq!(status, 409, "{e}");
    assert_eq!(
        error(&e),
        format!("address {ip} on network 'public' is in use"),
        "{e}"
    );

    // Kill everything, and crash an orchestrator while it works: the restarted one (on
    // SQLite) or the other replica (on PostgreSQL) finishes every accepted request.
    for id in &accepted {
        let (_, vm) = cloud.admin("GET", &format!("/vms/{id}"), None);
        if vm["holds_resources"] == true {
            let (status, e) = cloud.admin("POST", &format!("/vms/{id}/kill"), None);
            assert_eq!(status, 202, "{e}");
        }
    }
    clouds[0].crash();
    if backend == Backend::Sqlite {
        clouds[0].launch();
    } else {
        clouds.remove(0);
    }
    let cloud = &clouds[0];
    for id in &accepted {
        let vm = cloud.wait_state(*id, "Done");
        assert_eq!(vm["holds_resources"], false);
    }
    assert!(a.vm_ids().is_empty() && b.vm_ids().is_empty());
    let (_, networks) = cloud.admin("GET", "/networks", None);
    assert_eq!(networks[0]["free"], 20, "{networks}");
    assert_eq!(networks[0]["leases"], json!([]));
}

/// The volumes the admin sees, by UUID.
fn all_disks(cloud: &Orchestrator) -> BTreeMap<String, Value> {
    let (status, all) = cloud.admin("GET", "/disks", None);
    assert_eq!(status, 200, "{all}");
    all.as_array()
        .unwrap()
        .iter()
        .map(|d| (d["uuid"].as_str().unwrap().to_owned(), d.clone()))
        .collect()
}

/// StratusLab's VM roots (`root_volumes`): the Marketplace image is fetched once into an
/// ORIGIN volume owned by the service, holding the image's bytes; each VM boots its own
/// LIVE snapshot of it, owned by the VM's user and handed to the node as its root; when a
/// VM ends its snapshot is quarantined and then deleted once the quarantine period is
/// over — also when the orchestrator was killed in between — while the ORIGIN stays.
#[test]
fn vm_roots_are_live_snapshots_quarantined_then_collected_on_sqlite() {
    vm_roots_are_live_snapshots_quarantined_then_collected(Backend::Sqlite);
}

#[test]
fn vm_roots_are_live_snapshots_quarantined_then_collected_on_postgres() {
    vm_roots_are_live_snapshots_quarantined_then_collected(Backend::Postgres);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first `n` bytes of what a qcow2 overlay reads as (through its backing file).
fn qcow2_head_hex(path: &std::path::Path, n: usize) -> String {
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", &format!("read -v 0 {n}")])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // "00000000:  73 74 61 6d ...  stamp..." lines: the hex columns only.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(":  "))
        .flat_map(|(_, rest)| rest.split_whitespace().take(16).collect::<Vec<_>>())
        .filter(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .take(n)
        .collect()
}

fn vm_roots_are_live_snapshots_quarantined_then_collected(backend: Backend) {
    let market = Marketplace::start();
    let image = market.publish(Guest::DiskStamp, |_| {});
    let image_file = market.image_file();
    let agent = Agent::start(4, 4096, "");
    let database = Database::new(backend);
    let mut cloud = Orchestrator::start_with(
        &market,
        &database,
        "root_volumes = true\nquarantine_period_s = 3\nallow_file_image_locations = true\n",
    );
    cloud.add_node("node-1", &agent);
    let alice = cloud.add_user("alice", "alice-password");
    let pool = cloud.dir.path().join("volumes");

    let request = json!({"image": image, "instance_type": "t1.micro"});
    let first = run_vm(&cloud, alice, request.clone());
    let second = run_vm(&cloud, alice, request);
    cloud.wait_state(first, "Running");
    cloud.wait_state(second, "Running");

    let disks = all_disks(&cloud);
    let origins: Vec<&Value> = disks
        .values()
        .filter(|d| d["type"] == "MACHINE_IMAGE_ORIGIN")
        .collect();
    assert_eq!(origins.len(), 1, "one ORIGIN per image: {disks:?}");
    let origin = origins[0]["uuid"].as_str().unwrap().to_owned();
    assert_eq!(origins[0]["identifier"], image.as_str());
    assert_eq!(origins[0]["owner"], "pdisk:service");
    assert_eq!(origins[0]["count"], 2, "{:?}", origins[0]);
    let origin_file = pool.join(format!("{origin}.img"));
    let original = std::fs::read(&image_file).unwrap();
    assert_eq!(std::fs::read(&origin_file).unwrap(), original);
    assert!(
        !pool.join(".images").join(&image).exists(),
        "the download is not kept beside the ORIGIN"
    );

    // Each VM has its own snapshot as its root, which its node opens from the pool.
    let mut roots = BTreeMap::new();
    for vm in [first, second] {
        let live = disks
            .values()
            .find(|d| d["mounts"][0]["vm_id"] == vm)
            .unwrap_or_else(|| panic!("no root for VM {vm}: {disks:?}"));
        assert_eq!(live["type"], "MACHINE_IMAGE_LIVE", "{live}");
        assert_eq!(live["owner"], "alice", "{live}");
        assert_eq!(live["base_uuid"], origin.as_str(), "{live}");
        assert_eq!(live["identifier"], format!("snapshot:{origin}"), "{live}");
        assert_eq!(live["mounts"][0]["device"], "root", "{live}");
        let uuid = live["uuid"].as_str().unwrap().to_owned();
        let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
        let root = root_on_node(&on_node);
        let live_file = pool.join(format!("{uuid}.qcow2"));
        assert_eq!(
            root["source"]["file"]["path"],
            live_file.to_str().unwrap(),
            "{root}"
        );
        assert_eq!(
            root["source"]["file"]["backing"][0],
            origin_file.to_str().unwrap(),
            "{root}"
        );
        assert_eq!(root["read_only"], false, "{root}");
        // The guest reads the image through its snapshot and writes its own stamp there.
        let found = cloud.wait_console_line(alice, vm, &format!("disk {} read ", &uuid[..20]));
        assert_eq!(found, hex(&original[..32]));
        let stamp = cloud.wait_console_line(alice, vm, &format!("disk {} wrote ", &uuid[..20]));
        assert_eq!(qcow2_head_hex(&live_file, 32), stamp);
        roots.insert(vm, (uuid, live_file));
    }
    // Copy-on-write: the guests' writes never reached the ORIGIN.
    assert_eq!(std::fs::read(&origin_file).unwrap(), original);
    // Alice sees her roots, not the service's ORIGIN; they are not hers to delete while
    // her VMs run, and do not count against her volume quota.
    let (_, mine) = cloud.call_as(alice, "GET", "/disks", None);
    assert_eq!(mine.as_array().unwrap().len(), 2, "{mine}");
    let (first_root, first_file) = roots[&first].clone();
    let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{first_root}"), None);
    assert_eq!(status, 409, "{e}");
    let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{origin}"), None);
    assert_eq!(status, 403, "{e}");

    // Alice shares her first root while its VM runs: Bob can see it.
    let bob = cloud.add_user("bob", "bob-password");
    let (status, e) = cloud.call_as(
        alice,
        "PUT",
        &format!("/disks/{first_root}"),
        Some(&json!({"visibility": "public"})),
    );
    assert_eq!(status, 200, "{e}");
    let (status, seen) = cloud.call_as(bob, "GET", &format!("/disks/{first_root}"), None);
    assert_eq!(status, 200, "{seen}");
    // How many use it, not whose VMs they are: that is Alice's business.
    assert_eq!(
        (&seen["count"], &seen["mounts"], &seen["hidden_mounts"]),
        (&json!(1), &json!([]), &json!(1)),
        "{seen}"
    );
    let (_, listed) = cloud.call_as(bob, "GET", "/disks", None);
    let listed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["uuid"] == first_root.as_str());
    assert_eq!(listed.unwrap()["mounts"], json!([]), "{listed:?}");
    let (_, own) = cloud.call_as(alice, "GET", &format!("/disks/{first_root}"), None);
    assert_eq!(own["mounts"][0]["vm_id"], json!(first), "{own}");
    assert_eq!(own["hidden_mounts"], json!(0), "{own}");

    // The first VM ends: its root is quarantined (the service's now, and private), then
    // collected.
    let (status, killed) = cloud.call_as(alice, "POST", &format!("/vms/{first}/kill"), None);
    assert_eq!(status, 202, "{killed}");
    cloud.wait_state(first, "Done");
    let quarantined = &all_disks(&cloud)[&first_root];
    assert_eq!(quarantined["owner"], "pdisk:service", "{quarantined}");
    assert!(quarantined["quarantine"].is_string(), "{quarantined}");
    assert_eq!(quarantined["visibility"], "private", "{quarantined}");
    let (status, e) = cloud.call_as(bob, "GET", &format!("/disks/{first_root}"), None);
    assert_eq!(status, 403, "{e}");
    assert_eq!(quarantined["mounts"], json!([]), "{quarantined}");
    let (_, mine) = cloud.call_as(alice, "GET", "/disks", None);
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    // Killed before the period is over: the next orchestrator collects it.
    cloud.crash();
    std::thread::sleep(Duration::from_secs(3));
    cloud.launch();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while all_disks(&cloud).contains_key(&first_root) {
        assert!(
            std::time::Instant::now() < deadline,
            "the quarantined root was never collected\n{}",
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!first_file.exists(), "{}", first_file.display());

    // Exactly the expired one went: the running VM's root, the ORIGIN and its bytes stay.
    let (second_root, second_file) = roots[&second].clone();
    let disks = all_disks(&cloud);
    assert!(disks.contains_key(&second_root), "{disks:?}");
    assert_eq!(disks[&origin]["count"], 1, "{disks:?}");
    assert!(second_file.exists());
    assert_eq!(std::fs::read(&origin_file).unwrap(), original);
    assert_eq!(cloud.wait_state(second, "Running")["state"], "Running");

    // The admin evicts unused ORIGINs: not while a VM's root needs it, then at once.
    let (ok, out) = cloud.admin_command(&["pdisk", "evict-origins"], "");
    assert!(ok, "{out}");
    assert!(!out.contains(&origin), "{out}");
    assert!(origin_file.exists());
    let (status, killed) = cloud.call_as(alice, "POST", &format!("/vms/{second}/kill"), None);
    assert_eq!(status, 202, "{killed}");
    cloud.wait_state(second, "Done");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while all_disks(&cloud).contains_key(&second_root) {
        assert!(std::time::Instant::now() < deadline, "{}", cloud.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out) = cloud.admin_command(&["pdisk", "evict-origins"], "");
    assert!(ok, "{out}");
    let evicted: Vec<&str> = out.lines().filter(|l| l.starts_with("evicted ")).collect();
    assert_eq!(evicted, [format!("evicted {origin}")], "{out}");
    assert!(all_disks(&cloud).is_empty());
    assert!(!origin_file.exists());
}

/// With an RBD pool, roots are Ceph's: the ORIGIN an image imported from the Marketplace
/// image, each VM's root a clone of its protected snapshot that the VMM opens through
/// librbd; the guest's writes stay in the clone; the quarantined clone is collected, and
/// the evicted ORIGIN leaves nothing in the pool.
#[test]
fn vm_roots_on_an_rbd_pool_are_clones_of_the_origin() {
    let cluster = stratus_vmm::test_ceph::CephCluster::start();
    let market = Marketplace::start();
    let image = market.publish(Guest::DiskStamp, |_| {});
    let image_file = market.image_file();
    let original = std::fs::read(&image_file).unwrap();
    let agent = Agent::start(4, 4096, "");
    let database = Database::new(Backend::Sqlite);
    let cloud = Orchestrator::start_with(
        &market,
        &database,
        &format!(
            "root_volumes = true\nquarantine_period_s = 2\nallow_file_image_locations = true\n\
             [volume_rbd]\nconf = \"{}\"\nid = \"stratus\"\nkeyring = \"{}\"\n",
            cluster.conf().display(),
            cluster.keyring().display()
        ),
    );
    cloud.add_node("node-1", &agent);
    let alice = cloud.add_user("alice", "alice-password");
    let rbd_head = |image: &str| rbd_head_hex(&cluster, &format!("rbd/{image}"), 32);

    let vm = run_vm(
        &cloud,
        alice,
        json!({"image": image, "instance_type": "t1.micro"}),
    );
    cloud.wait_state(vm, "Running");
    let disks = all_disks(&cloud);
    let origin = disks
        .values()
        .find(|d| d["type"] == "MACHINE_IMAGE_ORIGIN")
        .unwrap_or_else(|| panic!("no ORIGIN: {disks:?}"));
    let origin_uuid = origin["uuid"].as_str().unwrap().to_owned();
    let live = disks
        .values()
        .find(|d| d["type"] == "MACHINE_IMAGE_LIVE")
        .unwrap_or_else(|| panic!("no root: {disks:?}"));
    let live_uuid = live["uuid"].as_str().unwrap().to_owned();
    assert_eq!(live["base_uuid"], origin_uuid.as_str(), "{live}");
    let info: Value = serde_json::from_str(&cluster.rbd(&[
        "info",
        "--format",
        "json",
        &format!("rbd/{live_uuid}"),
    ]))
    .unwrap();
    assert_eq!(
        info["parent"]["image"],
        origin_uuid.as_str(),
        "a clone: {info}"
    );
    assert_eq!(rbd_head(&origin_uuid), hex(&original[..32]));

    // The node opens the clone through librbd; the guest reads the image through it and
    // writes its stamp into it alone.
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    let root = root_on_node(&on_node);
    assert_eq!(
        root["source"]["rbd"]["image"],
        format!("rbd/{live_uuid}"),
        "{root}"
    );
    let found = cloud.wait_console_line(alice, vm, &format!("disk {} read ", &live_uuid[..20]));
    assert_eq!(found, hex(&original[..32]));
    let stamp = cloud.wait_console_line(alice, vm, &format!("disk {} wrote ", &live_uuid[..20]));
    assert_eq!(rbd_head(&live_uuid), stamp);
    assert_eq!(rbd_head(&origin_uuid), hex(&original[..32]));
    assert!(
        !cloud
            .dir
            .path()
            .join("volumes")
            .join(".images")
            .join(&image)
            .exists(),
        "the download is not kept"
    );

    // Ended: quarantined, then collected; the ORIGIN is evicted once nothing needs it.
    let (status, killed) = cloud.call_as(alice, "POST", &format!("/vms/{vm}/kill"), None);
    assert_eq!(status, 202, "{killed}");
    cloud.wait_state(vm, "Done");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while all_disks(&cloud).contains_key(&live_uuid) {
        assert!(std::time::Instant::now() < deadline, "{}", cloud.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!cluster
        .try_rbd(&["info", &format!("rbd/{live_uuid}")])
        .status
        .success());
    let (ok, out) = cloud.admin_command(&["pdisk", "evict-origins"], "");
    assert!(ok, "{out}");
    assert!(out.contains(&format!("evicted {origin_uuid}")), "{out}");
    assert!(!cluster
        .try_rbd(&["info", &format!("rbd/{origin_uuid}")])
        .status
        .success());
}

/// An ORIGIN whose filler died without a trace (another replica, killed mid-download, so
/// no restart undid it): once its row has shown no sign of life for 30 s, the next
/// deployment of its image takes it over — removes the half-made file and row — and fills
/// a new one, instead of waiting for it forever.
#[test]
fn an_abandoned_origin_fill_is_taken_over() {
    let market = Marketplace::start();
    let image = market.publish(Guest::EventLoop, |_| {});
    let agent = Agent::start(4, 4096, "");
    let cloud = Orchestrator::start(
        &market,
        "root_volumes = true\nallow_file_image_locations = true\n",
    );
    cloud.add_node("node-1", &agent);
    let alice = cloud.add_user("alice", "alice-password");
    let pool = cloud.dir.path().join("volumes");
    let stale = "00000000-0000-4000-8000-00000000abcd";
    let stale_file = pool.join(format!("{stale}.img"));
    std::fs::write(&stale_file, b"half a download").unwrap();
    let db = format!("sqlite://{}", cloud.dir.path().join("cloud.db").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
        sqlx::query(
            "INSERT INTO volumes (uuid, owner, tag, size_gib, visibility, kind, identifier, \
             seed, base_uuid, quarantine, pool, state, location, created, updated) VALUES \
             ($1, 'pdisk:service', '', 1, 'private', 'MACHINE_IMAGE_ORIGIN', $2, 0, NULL, \
             NULL, 'file', 'creating', $3, $4, $4)",
        )
        .bind(stale)
        .bind(&image)
        .bind(stale_file.to_str().unwrap())
        .bind("2026-01-01T00:00:00.000000Z")
        .execute(&mut conn)
        .await
        .unwrap();
    });

    let vm = run_vm(
        &cloud,
        alice,
        json!({"image": image, "instance_type": "t1.micro"}),
    );
    cloud.wait_state(vm, "Running");
    let disks = all_disks(&cloud);
    assert!(!disks.contains_key(stale), "{disks:?}");
    assert!(!stale_file.exists());
    let origin = disks
        .values()
        .find(|d| d["type"] == "MACHINE_IMAGE_ORIGIN")
        .unwrap_or_else(|| panic!("no ORIGIN: {disks:?}"));
    assert_eq!(origin["identifier"], image.as_str(), "{origin}");
    assert_eq!(origin["state"], "available", "{origin}");
    // Taken over by the deployment, or by the orchestrator's own pass over what was left.
    let log = cloud.log();
    assert!(
        log.contains("an abandoned ORIGIN fill is started again")
            || log
                .lines()
                .any(|l| l.contains(stale) && l.contains("was=creating") && l.contains("finished")),
        "{log}"
    );
}

/// Volumes that another replica is making or removing right now (their rows `creating` or
/// `deleting`, stamped moments ago) are left to it by an orchestrator that starts up: it
/// must not make a VM's snapshot again from scratch under the replica that is finishing
/// it, nor remove a file another replica is still deleting. Once a row's stamp is older
/// than a holder would let it get, the running orchestrator finishes it.
#[test]
fn volumes_another_replica_is_working_on_are_left_to_it_until_its_hold_lapses() {
    let market = Marketplace::start();
    let mut cloud = Orchestrator::start(&market, "");
    let alice = cloud.add_user("alice", "alice-password");
    let (status, origin) = cloud.call_as(
        alice,
        "POST",
        "/disks",
        Some(&json!({"size_gib": 1, "type": "MACHINE_IMAGE_ORIGIN"})),
    );
    assert_eq!(status, 201, "{origin}");
    let origin = origin["uuid"].as_str().unwrap().to_owned();
    let pool = cloud.dir.path().join("volumes");
    let making = "00000000-0000-4000-8000-00000000beef";
    let making_file = pool.join(format!("{making}.qcow2"));
    let removing = "00000000-0000-4000-8000-00000000dead";
    let removing_file = pool.join(format!("{removing}.img"));
    let in_progress = b"what the other replica has written so far";
    std::fs::write(&making_file, in_progress).unwrap();
    std::fs::write(&removing_file, in_progress).unwrap();
    // Stamped 5 s ago: within a live holder's renewals, lapsing 25 s from now.
    let stamp = (chrono::Utc::now() - chrono::Duration::seconds(5))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let db = format!("sqlite://{}", cloud.dir.path().join("cloud.db").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
        for (uuid, kind, base, state, file) in [
            (
                making,
                "MACHINE_IMAGE_LIVE",
                Some(origin.as_str()),
                "creating",
                &making_file,
            ),
            (
                removing,
                "DATA_IMAGE_RAW_READ_WRITE",
                None,
                "deleting",
                &removing_file,
            ),
        ] {
            sqlx::query(
                "INSERT INTO volumes (uuid, owner, tag, size_gib, visibility, kind, identifier, \
                 seed, base_uuid, quarantine, pool, state, location, created, updated) VALUES \
                 ($1, 'alice', '', 1, 'private', $2, NULL, 0, $3, NULL, 'file', $4, $5, $6, $6)",
            )
            .bind(uuid)
            .bind(kind)
            .bind(base)
            .bind(state)
            .bind(file.to_str().unwrap())
            .bind(&stamp)
            .execute(&mut conn)
            .await
            .unwrap();
        }
    });

    cloud.crash();
    cloud.launch();
    let disks = all_disks(&cloud);
    assert_eq!(disks[making]["state"], "creating", "{disks:?}");
    assert_eq!(disks[removing]["state"], "deleting", "{disks:?}");
    assert_eq!(std::fs::read(&making_file).unwrap(), in_progress);
    assert_eq!(std::fs::read(&removing_file).unwrap(), in_progress);
    // Nor may a user change them meanwhile (the stamp is the holder's).
    let (status, e) = cloud.call_as(
        alice,
        "PUT",
        &format!("/disks/{making}"),
        Some(&json!({"tag": "mine"})),
    );
    assert_eq!(status, 409, "{e}");
    assert_eq!(
        e["error"],
        format!("disk {making} is creating; try again in a moment")
    );

    // Their holder never comes back: finished by the running orchestrator.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let disks = all_disks(&cloud);
        if disks[making]["state"] == "available" && !disks.contains_key(removing) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{disks:?}\n{}",
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!removing_file.exists());
    let overlay = std::fs::read(&making_file).unwrap();
    assert_eq!(&overlay[..4], b"QFI\xfb", "made again as a qcow2 overlay");
}
