//! The `stratus-*` commands as users type them: through their links, with a configuration
//! file in a home directory of their own, against a real cloud (Marketplace, node agent,
//! orchestrator) running tiny guests on this host's `/dev/kvm`.

mod common;
#[path = "../../nodeagent/tests/support/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{json, Value};
use stratus_vmm::test_guest::Guest;

struct User {
    home: tempfile::TempDir,
    bin: PathBuf,
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl User {
    /// A home directory with the `stratus-*` links on its PATH and an SSH key.
    fn new() -> User {
        let home = tempfile::tempdir().unwrap();
        let bin = home.path().join("bin");
        let status = Command::new(env!("CARGO_BIN_EXE_stratus"))
            .arg("install-links")
            .arg(&bin)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
        std::fs::write(
            home.path().join(".ssh/id_ed25519.pub"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlicesKey alice@laptop\n",
        )
        .unwrap();
        std::fs::write(home.path().join(".ssh/id_ed25519"), "private\n").unwrap();
        User { home, bin }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }

    fn config(&self, text: &str) {
        std::fs::create_dir_all(self.path(".stratuslab")).unwrap();
        std::fs::write(self.path(".stratuslab/stratuslab-user.cfg"), text).unwrap();
    }

    fn run_with(&self, command: &str, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
        let out = output_with_stdin(
            Command::new(self.bin.join(command))
                .args(args)
                .env_clear()
                .env("PATH", format!("{}:/usr/bin:/bin", self.bin.display()))
                .env("HOME", self.home.path())
                .envs(env.iter().copied())
                .current_dir(self.home.path()),
            stdin,
        );
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }

    fn run(&self, command: &str, args: &[&str]) -> Output {
        self.run_with(command, args, &[], "")
    }

    /// A command that must succeed; its standard output.
    fn ok(&self, command: &str, args: &[&str]) -> String {
        let out = self.run(command, args);
        assert_eq!(
            out.code, 0,
            "{command} {args:?} failed:\n{}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// A command that must fail with one `[ERROR]` line; that line's message.
    fn error(&self, command: &str, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run_with(command, args, env, "");
        assert_eq!(
            out.code, 1,
            "{command} {args:?}: {}{}",
            out.stdout, out.stderr
        );
        assert_eq!(out.stdout, "", "{command} {args:?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{command} {args:?}: {}", out.stderr);
        lines[0]
            .strip_prefix("  [ERROR] ")
            .unwrap_or_else(|| panic!("not an [ERROR] line: {}", out.stderr))
            .to_owned()
    }
}

fn in_own_network_namespace() {
    // SAFETY: unshare changes only this thread's network namespace.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "needs root"
    );
    run("ip", &["link", "set", "lo", "up"], Path::new("/"));
}

/// A cloud with one node whose `public` network has a bridge and addresses.
fn cloud() -> (Marketplace, Agent, Orchestrator) {
    let (market, agent, cloud, _) = cloud_on(Backend::Sqlite);
    (market, agent, cloud)
}

fn cloud_on(backend: Backend) -> (Marketplace, Agent, Orchestrator, Database) {
    in_own_network_namespace();
    let market = Marketplace::start();
    let agent = Agent::start(
        4,
        4096,
        "\n[[networks]]\nname = \"public\"\nbridge = \"stclibr\"\nsubnet = \"198.18.9.0/24\"\n\
         address = \"198.18.9.1\"\n",
    );
    let database = Database::new(backend);
    let cloud = Orchestrator::start_with(
        &market,
        &database,
        "[[networks]]\nname = \"public\"\nkind = \"public\"\n\
         addresses = [\"198.18.9.10\", \"198.18.9.11\", \"198.18.9.12\", \"198.18.9.13\"]\n",
    );
    cloud.add_node("node-1", &agent);
    cloud.add_user("alice", "alice-password");
    (market, agent, cloud, database)
}

fn user_config(cloud: &Orchestrator, market: &Marketplace, user: &User) -> String {
    format!(
        "[default]\nselected_section = test-cloud\nendpoint_timeout = 5\n\n\
         [test-cloud]\nendpoint = http://{}\nmarketplace_endpoint = {}\n\
         username = alice\npassword = alice-password\nuser_public_key_file = {}\n",
        cloud.addr,
        market.url(),
        user.path(".ssh/id_ed25519.pub").display()
    )
}

fn vm_count(cloud: &Orchestrator) -> i64 {
    let (status, list) = cloud.admin("GET", "/vms", None);
    assert_eq!(status, 200, "{list}");
    list["count"].as_i64().unwrap()
}

#[test]
fn the_tutorial_through_the_stratus_links() {
    let (market, agent, cloud) = cloud();
    let image = market.publish(Guest::EventLoop, |_| {});
    let user = User::new();

    // copy-config writes the commented reference, readable by its owner only, once.
    let out = user.ok("stratus-copy-config", &[]);
    let file = user.path(".stratuslab/stratuslab-user.cfg");
    assert_eq!(
        out,
        format!(" :: Configuration template written to {}\n", file.display())
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains("#endpoint_timeout = 5"));
    let e = user.error("stratus-copy-config", &[], &[]);
    assert_eq!(
        e,
        format!(
            "{} exists already: edit it, or give --force to replace it",
            file.display()
        )
    );
    user.config(&user_config(&cloud, &market, &user));

    // Nothing yet.
    assert_eq!(
        user.ok("stratus-describe-instance", &[]),
        "id  state     vcpu memory    cpu% host/ip                 name\n"
    );
    let images = user.ok("stratus-list-images", &[]);
    assert!(images.starts_with("identifier "), "{images}");
    assert!(images.contains(&image), "{images}");

    // The types, the selected one marked.
    // As StratusLab's guide types it: long options may be shortened.
    let types = user.ok("stratus-run-instance", &["--list-type"]);
    assert_eq!(
        types,
        "  Type             CPU       RAM      SWAP\n\
         \x20 c1.medium       2 CPU    1536 MB    1536 MB\n\
         \x20 c1.xlarge       4 CPU    6144 MB    6144 MB\n\
         \x20 m1.large        2 CPU    6144 MB    6144 MB\n\
         \x20 m1.medium       1 CPU    3072 MB    3072 MB\n\
         * m1.small        1 CPU    1536 MB    1536 MB\n\
         \x20 m1.xlarge       4 CPU    8192 MB    8192 MB\n\
         \x20 t1.micro        1 CPU     512 MB     512 MB\n"
    );
    let types = user.ok("stratus-run-instance", &["-l", "-t", "t1.micro"]);
    assert!(types.contains("* t1.micro "), "{types}");
    assert!(types.contains("  m1.small "), "{types}");
    // The user's own types are listed with the cloud's, and replace one of the same name.
    user.config(&format!(
        "{}[instance_types]\nm1.huge = 8, 16384, 0\nt1.micro = 1, 256, 0\n",
        user_config(&cloud, &market, &user)
    ));
    let types = user.ok("stratus-run-instance", &["-l", "-t", "m1.huge"]);
    assert!(
        types.contains("* m1.huge         8 CPU   16384 MB       0 MB\n"),
        "{types}"
    );
    assert!(
        types.contains("  t1.micro        1 CPU     256 MB       0 MB\n"),
        "{types}"
    );
    assert_eq!(types.lines().count(), 9, "{types}");
    user.config(&user_config(&cloud, &market, &user));

    // One machine, StratusLab's banner, the address the cloud leased.
    let out = user.ok(
        "stratus-run-instance",
        &[
            "-t",
            "t1.micro",
            "--context",
            "GREETING=hi#ROLE=worker",
            // A later pair replaces an earlier one, in any case: the guest upper-cases keys.
            "--context",
            "greeting=hello",
            &image,
        ],
    );
    let (_, list) = cloud.admin("GET", "/vms", None);
    let first = &list["vms"][0];
    let id = first["id"].as_i64().unwrap();
    let ip = first["leases"][0]["ip"].as_str().unwrap().to_owned();
    assert_eq!(
        out,
        format!(
            " :::::::::::::::::::::::::\n :: Starting machine(s) ::\n :::::::::::::::::::::::::\n\
             \x20:: Starting 1 machine\n :: Machine 1 (vm ID: {id})\n \tPublic ip: {ip}\n :: Done!\n"
        )
    );
    assert_eq!(first["owner"], "alice");
    assert_eq!(first["instance_type"], "t1.micro");
    cloud.wait_state(id, "Running");
    let (_, on_node) = agent.call("GET", &format!("/vms/{id}"));
    let context = &on_node["spec"]["context"];
    assert_eq!(context["pairs"]["GREETING"], "hello", "{on_node}");
    assert_eq!(context["pairs"]["ROLE"], "worker");
    assert_eq!(
        context["public_key"],
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlicesKey alice@laptop"
    );

    // -q: "ID, IP"; -o keeps the same lines for kill-instance -i; --wait returns running.
    let out = user.ok(
        "stratus-run-instance",
        &[
            "-q",
            "-t",
            "t1.micro",
            "-o",
            "machines.txt",
            "--wait=60",
            &image,
        ],
    );
    let (second, second_ip) = out.trim_end().split_once(", ").unwrap();
    let second: i64 = second.parse().unwrap();
    assert_eq!(out, format!("{second}, {second_ip}\n"));
    assert_eq!(
        std::fs::read_to_string(user.path("machines.txt")).unwrap(),
        out
    );
    assert_eq!(
        cloud.admin("GET", &format!("/vms/{second}"), None).1["state"],
        "Running"
    );

    // describe-instance: the table, one machine, every attribute, JSON.
    let table = user.ok("stratus-describe-instance", &[]);
    assert_eq!(
        table,
        format!(
            "id  state     vcpu memory    cpu% host/ip                 name\n\
             {id:<3} Running   1    524288    -    {ip:<23} one-{id}\n\
             {second:<3} Running   1    524288    -    {second_ip:<23} one-{second}\n"
        )
    );
    let one = user.ok("stratus-describe-instance", &[&id.to_string()]);
    assert_eq!(one.lines().count(), 2, "{one}");
    let all = user.ok("stratus-describe-instance", &["-vvv", &id.to_string()]);
    assert!(all.contains("state           Running\n"), "{all}");
    assert!(all.contains(&format!("address         {ip} ")), "{all}");
    assert!(all.contains(" Pending"), "the history is shown: {all}");
    let json: Value =
        serde_json::from_str(&user.ok("stratus-describe-instance", &["--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert_eq!(json[0]["id"], id);
    assert_eq!(json[0]["state"], "Running");

    // connect-instance runs ssh as root on the machine's address with the user's key.
    std::fs::write(
        user.bin.join("ssh"),
        format!(
            "#!/bin/sh\necho \"$@\" > {}\necho guest-says-hi\n",
            user.path("ssh-args").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        user.bin.join("ssh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = user.ok("stratus-connect-instance", &[&id.to_string(), "hostname"]);
    assert_eq!(out, "guest-says-hi\n");
    let args = std::fs::read_to_string(user.path("ssh-args")).unwrap();
    assert_eq!(
        args.trim_end(),
        format!(
            "-i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
             -o ConnectTimeout=10 root@{ip} hostname",
            user.path(".ssh/id_ed25519").display()
        )
    );

    // Commands Stratus does not do yet say so.
    let e = user.error("stratus-run-cluster", &[], &[]);
    assert_eq!(e, "running clusters is not available in Stratus yet");
    let e = user.error(
        "stratus-shutdown-instance",
        &["--save", &id.to_string()],
        &[],
    );
    assert_eq!(
        e,
        "saving machines as images (--save) is not available in Stratus yet"
    );

    // Shut one down, kill the other from the -o file: both end Done, and say nothing.
    assert_eq!(user.ok("stratus-shutdown-instance", &[&id.to_string()]), "");
    assert_eq!(
        user.ok("stratus-kill-instance", &["-i", "machines.txt"]),
        ""
    );
    cloud.wait_state(id, "Done");
    cloud.wait_state(second, "Done");
    // Listed by id; left out of the list of all (as StratusLab's list left out ended
    // machines, which would otherwise pile up there for ever).
    let table = user.ok(
        "stratus-describe-instance",
        &[&id.to_string(), &second.to_string()],
    );
    assert!(table.contains(&format!("{id:<3} Done ")), "{table}");
    assert!(table.contains(&format!("{second:<3} Done ")), "{table}");
    let table = user.ok("stratus-describe-instance", &[]);
    let listed: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        !listed.contains(&id.to_string().as_str())
            && !listed.contains(&second.to_string().as_str()),
        "{table}"
    );
    let (status, all) = cloud.call_as(("alice", "alice-password"), "GET", "/vms", None);
    assert_eq!(status, 200, "{all}");
    assert!(
        all["vms"].as_array().unwrap().iter().any(|v| v["id"] == id),
        "the API lists them all by default: {all}"
    );

    // Killing an ended machine is refused by the cloud, with its reason, and exits 1.
    let out = user.run("stratus-kill-instance", &[&id.to_string()]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.starts_with(&format!("  [ERROR] machine {id}: ")),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_input_is_one_error_line_and_creates_nothing() {
    let (market, _agent, cloud) = cloud();
    let image = market.publish(Guest::Halt, |_| {});
    let user = User::new();
    user.config(&user_config(&cloud, &market, &user));
    let run = "stratus-run-instance";

    let e = user.error(run, &["-t", "m9.giant", &image], &[]);
    assert!(e.contains("m9.giant"), "{e}");
    let e = user.error(run, &["AAAAAAAAAAAAAAAAAAAAAAAAAAA"], &[]);
    assert!(e.contains("AAAAAAAAAAAAAAAAAAAAAAAAAAA"), "{e}");
    let e = user.error(run, &["not-an-image"], &[]);
    assert_eq!(
        e,
        "'not-an-image' is not a Marketplace image identifier (27 characters: A-Z a-z 0-9 _ -)"
    );
    let e = user.error(run, &["--context", "no equals sign", &image], &[]);
    assert!(e.contains("no equals sign"), "{e}");
    let e = user.error(run, &["--key", "/nonexistent.pub", &image], &[]);
    assert!(
        e.starts_with("cannot read the SSH key file /nonexistent.pub"),
        "{e}"
    );
    let e = user.error(
        run,
        &[
            "--persistent-disk",
            "1d2c3b4a-0000-4000-8000-000000000000",
            &image,
        ],
        &[],
    );
    assert_eq!(e, "no disk 1d2c3b4a-0000-4000-8000-000000000000");
    let e = user.error(run, &["--persistent-disk", "not-a-uuid", &image], &[]);
    assert_eq!(e, "'not-a-uuid' is not a disk UUID");
    let e = user.error(run, &["-p", "wrong", &image], &[]);
    assert!(e.to_lowercase().contains("password"), "{e}");
    let e = user.error("stratus-describe-instance", &["abc"], &[]);
    assert_eq!(e, "'abc' is not a machine id (a positive number)");
    let e = user.error("stratus-describe-instance", &["999"], &[]);
    assert!(e.contains("999"), "{e}");

    // A service that accepts connections but never answers: endpoint_timeout applies.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let e = user.error(
        run,
        &[&image],
        &[
            ("STRATUSLAB_ENDPOINT", &endpoint),
            ("STRATUSLAB_ENDPOINT_TIMEOUT", "1"),
        ],
    );
    assert_eq!(
        e,
        format!("{endpoint} did not answer within 1 s (endpoint_timeout)")
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // Nobody listening.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let e = user.error(run, &["--endpoint", &closed, &image], &[]);
    assert!(e.starts_with(&format!("cannot reach {closed}")), "{e}");
    // A host alone, as StratusLab's configurations give it, is reached over HTTPS.
    let host_only = format!("127.0.0.1:{}", free_port());
    let e = user.error(run, &["--endpoint", &host_only, &image], &[]);
    assert!(
        e.starts_with(&format!("cannot reach https://{host_only}")),
        "{e}"
    );
    // A usage error is an [ERROR] line as well, clap's usage hints below it.
    let out = user.run_with(run, &["--bogus", &image], &[], "");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("  [ERROR] unexpected argument '--bogus' found\n"),
        "{}",
        out.stderr
    );
    // StratusLab's --save command line (its tutorial's) reaches the --save refusal.
    let e = user.error(
        run,
        &[
            "--save",
            "--type",
            "m1.small",
            "--comment",
            "manual test image",
            "--author",
            "Joe Builder",
            "--author-email",
            "builder@example.org",
            "--image-version=2.0",
            &image,
        ],
        &[],
    );
    assert!(e.contains("(--save) is not available"), "{e}");
    // Without a key file the machine would get no key: said at every verbosity.
    user.config(&user_config(&cloud, &market, &user).replace("user_public_key_file", "unused_key"));
    let out = user.run_with(run, &["--context-method", "pigeon", &image], &[], "");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].starts_with("  [WARNING] no SSH key file "),
        "{}",
        out.stderr
    );
    assert!(lines[1].starts_with("  [ERROR] "), "{}", out.stderr);
    user.config(&user_config(&cloud, &market, &user));

    assert_eq!(vm_count(&cloud), 0, "nothing was created");

    // Precedence: the command line beats the environment, which beats the file.
    user.config(&user_config(&cloud, &market, &user).replace("alice-password", "stale"));
    let e = user.error("stratus-describe-instance", &[], &[]);
    assert!(e.to_lowercase().contains("password"), "{e}");
    let env = [("STRATUSLAB_PASSWORD", "alice-password")];
    let out = user.run_with("stratus-describe-instance", &[], &env, "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let e = user.error("stratus-describe-instance", &["-p", "stale"], &env);
    assert!(e.to_lowercase().contains("password"), "{e}");
    // A section that does not exist, chosen by the environment.
    let e = user.error(
        "stratus-describe-instance",
        &[],
        &[("STRATUSLAB_USER_CONFIG_SECTION", "elsewhere")],
    );
    assert!(
        e.ends_with("has no section [elsewhere] (selected by STRATUSLAB_USER_CONFIG_SECTION)"),
        "{e}"
    );
    // No password anywhere and no terminal to ask on.
    user.config(&user_config(&cloud, &market, &user).replace("password = alice-password\n", ""));
    let e = user.error("stratus-describe-instance", &[], &[]);
    assert!(
        e.starts_with("no password for alice: give -p/--password"),
        "{e}"
    );
}

#[test]
fn metadata_is_built_signed_validated_uploaded_and_deprecated() {
    let market = Marketplace::start();
    let user = User::new();
    let pki = market.dir.path().join("pki");
    // The endorser's key pair, from the configuration file this time.
    user.config(&format!(
        "[default]\nmarketplace_endpoint = {}\npem_certificate = {}\npem_key = {}\n\
         marketplace_token_file = {}\n",
        market.url(),
        pki.join("endorser.pem").display(),
        pki.join("endorser.key").display(),
        market.token_file().display()
    ));
    let image = user.path("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    user.ok(
        "stratus-build-metadata",
        &[
            image.to_str().unwrap(),
            "--os",
            "Debian",
            "--os-version",
            "12",
            "--title",
            "A test disk",
            "--location",
            "http://198.18.0.1/disk.img",
            "-o",
            "entry.xml",
        ],
    );
    // Unsigned: not valid yet.
    let out = user.run("stratus-validate-metadata", &["entry.xml"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stderr.starts_with("  [ERROR] entry.xml: "),
        "{}",
        out.stderr
    );
    assert_eq!(
        user.ok("stratus-sign-metadata", &["entry.xml"]),
        " :: Signed entry.xml\n"
    );
    let valid = user.ok("stratus-validate-metadata", &["entry.xml"]);
    assert!(valid.starts_with("entry.xml: valid (image "), "{valid}");
    let identifier = valid
        .split("image ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(identifier.len(), 27);
    let up = user.ok("stratus-upload-metadata", &["entry.xml"]);
    assert!(
        up.starts_with(&format!(
            "UPLOADED entry.xml {}/metadata/{identifier}/",
            market.url()
        )),
        "{up}"
    );

    let listed = user.ok("stratus-list-images", &[]);
    assert!(
        listed.contains(&identifier) && listed.contains("Debian 12"),
        "{listed}"
    );
    let shown = user.ok("stratus-show-image", &[&identifier]);
    assert!(shown.contains("title         A test disk\n"), "{shown}");
    assert_eq!(
        user.ok("stratus-search-image", &["-q", "test disk"]),
        format!("{identifier}\n")
    );

    assert_eq!(
        user.ok(
            "stratus-deprecate-metadata",
            &[&identifier, "--reason", "superseded"]
        ),
        format!("DEPRECATED {identifier}\n")
    );
    assert_eq!(user.ok("stratus-list-images", &[]), "No image to show\n");
    let shown = user.ok("stratus-show-image", &[&identifier]);
    assert!(shown.contains("deprecated    superseded\n"), "{shown}");
    let json: Value =
        serde_json::from_str(&user.ok("stratus-list-images", &["--json", "--status", "all"]))
            .unwrap();
    assert_eq!(json[0]["deprecated"], "superseded");
}

#[test]
fn local_commands_hash_prepare_and_install() {
    let user = User::new();
    let out = user.run_with("stratus-hash-password", &[], &[], "s3cret\n");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let hash = out.stdout.trim_end();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    use argon2::PasswordVerifier;
    let parsed = argon2::PasswordHash::new(hash).unwrap();
    assert!(argon2::Argon2::default()
        .verify_password(b"s3cret", &parsed)
        .is_ok());
    assert!(argon2::Argon2::default()
        .verify_password(b"other", &parsed)
        .is_err());

    std::fs::write(user.path("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    let key = user.path(".ssh/id_ed25519.pub");
    user.config(&format!(
        "[default]\nuser_public_key_file = {}\n",
        key.display()
    ));
    let out = user.ok("stratus-prepare-context", &["x-shellscript,run.sh"]);
    assert_eq!(out, " :: Context written to cloud-init.txt\n");
    let text = std::fs::read_to_string(user.path("cloud-init.txt")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = |f| {
        std::fs::metadata(user.path(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(
        mode("cloud-init.txt"),
        0o600,
        "user data may hold credentials"
    );
    let keys: Vec<&str> = text.lines().map(|l| l.split('=').next().unwrap()).collect();
    assert_eq!(keys[0], "CONTEXT_METHOD");
    assert!(text.starts_with("CONTEXT_METHOD=cloud-init\n"), "{text}");
    assert_eq!(
        keys.len(),
        3,
        "the method, the key and the user data: {text}"
    );
    let e = user.error("stratus-prepare-context", &["nocomma"], &[]);
    assert!(e.contains("nocomma"), "{e}");

    let bash = user.ok("stratus", &["completion", "bash"]);
    assert!(
        bash.contains("run-instance") && bash.contains("--list-types"),
        "completion"
    );
    user.ok("stratus", &["man", "man"]);
    let page = std::fs::read_to_string(user.path("man/stratus-run-instance.1")).unwrap();
    assert!(page.contains("list\\-types"), "{page}");
    // Every link is the same program under a StratusLab name.
    for name in [
        "stratus-run-instance",
        "stratus-describe-volumes",
        "stratus-hash-password",
    ] {
        let target = std::fs::read_link(user.bin.join(name)).unwrap();
        assert!(target.ends_with("stratus"), "{name} → {}", target.display());
    }
    // Links are remade; a file that is not a link is left alone.
    user.ok("stratus", &["install-links", user.bin.to_str().unwrap()]);
    std::fs::remove_file(user.bin.join("stratus-list-users")).unwrap();
    std::fs::write(user.bin.join("stratus-list-users"), "mine").unwrap();
    let e = user.error(
        "stratus",
        &["install-links", user.bin.to_str().unwrap()],
        &[],
    );
    assert_eq!(
        e,
        format!(
            "{} exists and is not a link: not replaced",
            user.bin.join("stratus-list-users").display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(user.bin.join("stratus-list-users")).unwrap(),
        "mine"
    );
    // copy-config --force replaces a readable file with one only its owner may read.
    let cfg = user.path(".stratuslab/stratuslab-user.cfg");
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    user.ok("stratus-copy-config", &["--force"]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cfg).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(std::fs::read_to_string(&cfg)
        .unwrap()
        .contains("#endpoint_timeout = 5"));

    let help = user.ok("stratus-describe-instance", &["--help"]);
    assert!(help.contains("Usage: stratus describe-instance"), "{help}");
    let version = user.ok("stratus-run-instance", &["--version"]);
    assert!(version.starts_with("stratus"), "{version}");
}

/// The lines of a describe-volumes block but its creation time.
fn without_created(block: &str) -> String {
    block
        .lines()
        .filter(|l| !l.starts_with("\tcreated: "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn volumes_are_created_attached_and_detached_through_the_stratus_links() {
    volumes_through_the_links(Backend::Sqlite);
}

/// The same with PostgreSQL deciding the attach race.
#[test]
fn volumes_are_created_attached_and_detached_on_postgres() {
    volumes_through_the_links(Backend::Postgres);
}

/// Runs a t1.micro of `image` with the volume attached at boot; the VM's id.
fn run_with_volume(user: &User, image: &str, volume: &str) -> i64 {
    run_with_volumes(user, image, &[volume])
}

/// Runs a t1.micro of `image` with these volumes attached at boot; the VM's id.
fn run_with_volumes(user: &User, image: &str, volumes: &[&str]) -> i64 {
    let mut args = vec!["-q", "-t", "t1.micro", "--wait=60"];
    for volume in volumes {
        args.extend(["--persistent-disk", volume]);
    }
    args.push(image);
    let out = user.ok("stratus-run-instance", &args);
    out.split(',').next().unwrap().parse().unwrap()
}

/// What the disk-stamp guest of VM `vm` printed for the disk with `volume`'s serial, once
/// it has: `what` is "read" (sector 0's first 32 bytes as found) or "wrote" (its stamp,
/// as read back after a flush).
fn stamp_of(cloud: &Orchestrator, vm: i64, volume: &str, what: &str) -> String {
    let start = format!("disk {} {what} ", &volume[..20]);
    cloud.wait_console_line(("alice", "alice-password"), vm, &start)
}

/// A persistent volume keeps what a VM's guest wrote: one VM stamps it, is killed, and a
/// second VM's guest reads the stamp back. Returns the stamp (hex), for a look at the
/// storage itself.
fn data_outlives_its_vm(cloud: &Orchestrator, user: &User, image: &str, volume: &str) -> String {
    let first = run_with_volume(user, image, volume);
    let stamp = stamp_of(cloud, first, volume, "wrote");
    // "stamp " and the guest's time-stamp counter.
    assert!(stamp.starts_with("7374616d7020"), "{stamp}");
    user.ok("stratus-kill-instance", &[&first.to_string()]);
    cloud.wait_state(first, "Done");
    let second = run_with_volume(user, image, volume);
    assert_eq!(stamp_of(cloud, second, volume, "read"), stamp);
    let restamped = stamp_of(cloud, second, volume, "wrote");
    assert_ne!(restamped, stamp, "each boot writes its own stamp");
    user.ok("stratus-kill-instance", &[&second.to_string()]);
    cloud.wait_state(second, "Done");
    restamped
}

/// `volume`, attached to VM `vm` at boot as vda, is shown mounted there and cannot be
/// deleted; its describe block.
fn held_by(user: &User, volume: &str, vm: i64) -> String {
    let shown = user.ok("stratus-describe-volumes", &[volume]);
    assert!(
        shown.contains(&format!("\tmount: VM {vm} on /dev/vda since ")),
        "{shown}"
    );
    let e = user.error("stratus-delete-volume", &[volume], &[]);
    assert_eq!(
        e,
        format!("Service error: disk {volume} is attached to VM {vm}: detach it first")
    );
    shown
}

/// The first `n` bytes of a file, in hex.
fn head_hex(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap();
    bytes[..n].iter().map(|b| format!("{b:02x}")).collect()
}

/// The disk of the node agent's VM spec that is `volume` (its serial).
fn volume_on_node(on_node: &Value, volume: &str) -> Value {
    on_node["spec"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["serial"] == volume[..20])
        .unwrap_or_else(|| panic!("no volume {volume} in {on_node}"))
        .clone()
}

fn volumes_through_the_links(backend: Backend) {
    use std::os::unix::fs::MetadataExt;
    let (market, agent, cloud, _database) = cloud_on(backend);
    let image = market.publish(Guest::EventLoop, |_| {});
    cloud.add_user("bob", "bob-password");
    let user = User::new();
    user.config(&user_config(&cloud, &market, &user));
    let bob = ["-u", "bob", "-p", "bob-password"];

    // What one VM's guest writes, the next VM's guest reads; the file holds it.
    let stamping = market.publish(Guest::DiskStamp, |_| {});
    let kept = user.ok("stratus-create-volume", &["-s", "1", "-t", "kept"]);
    let kept = kept.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    let stamp = data_outlives_its_vm(&cloud, &user, &stamping, &kept);
    let kept_file = cloud.dir.path().join("volumes").join(format!("{kept}.img"));
    assert_eq!(head_hex(&kept_file, 32), stamp);
    user.ok("stratus-delete-volume", &[&kept]);

    assert_eq!(
        user.ok("stratus-describe-volumes", &[]),
        "No disk to show\n"
    );
    let out = user.ok("stratus-create-volume", &["-s", "2", "-t", "my data"]);
    let data = out.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    assert_eq!(out, format!("DISK {data}\n"));
    let file = cloud.dir.path().join("volumes").join(format!("{data}.img"));
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), 2 << 30);
    assert!(
        meta.blocks() < 64,
        "a new volume allocates nothing: {} blocks",
        meta.blocks()
    );
    assert_eq!(
        without_created(&user.ok("stratus-describe-volumes", &[])),
        format!(
            ":: DISK {data}\n\tcount: 0\n\towner: alice\n\ttag: my data\n\tsize: 2\n\
             \tvisibility: private\n\ttype: DATA_IMAGE_RAW_READ_WRITE\n\tstate: available\n\tpool: file\n"
        )
    );
    assert_eq!(
        user.ok(
            "stratus-update-volume",
            &[&data, "--public", "-t", "shared"]
        ),
        format!("DISK {data}\n")
    );
    let shown = user.ok(
        "stratus-describe-volumes",
        &["-f", "tag:^sha", "-f", "visibility:public"],
    );
    assert!(shown.starts_with(&format!(":: DISK {data}\n")), "{shown}");
    assert_eq!(
        user.ok("stratus-describe-volumes", &["-f", "tag:^zzz"]),
        "No disk to show\n"
    );
    let boot = user.ok("stratus-create-volume", &["--size", "1", "--tag", "boot"]);
    let boot = boot.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    // pdisk_endpoint, when set, is where the volume commands go (the orchestrator, here,
    // reached through it while --endpoint names nobody), and only they.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let pdisk = format!("http://{}", cloud.addr);
    let shown = user.ok(
        "stratus-describe-volumes",
        &["--endpoint", &closed, "--pdisk-endpoint", &pdisk, &boot],
    );
    assert!(shown.starts_with(&format!(":: DISK {boot}\n")), "{shown}");
    let e = user.error(
        "stratus-describe-volumes",
        &[&boot],
        &[("STRATUSLAB_PDISK_ENDPOINT", &closed)],
    );
    assert!(e.starts_with(&format!("cannot reach {closed}")), "{e}");
    user.ok("stratus-describe-instance", &["--pdisk-endpoint", &closed]);

    // Bad input and other users' volumes.
    let e = user.error("stratus-create-volume", &["-s", "0"], &[]);
    assert_eq!(e, "the size must be between 1 and 1024 GiB, not 0");
    let e = user.error("stratus-create-volume", &["-s", "1025"], &[]);
    assert_eq!(e, "the size must be between 1 and 1024 GiB, not 1025");
    let e = user.error(
        "stratus-create-volume",
        &["-s", "1", "-t", &"x".repeat(41)],
        &[],
    );
    assert_eq!(e, "the tag is longer than 40 characters");
    let e = user.error("stratus-describe-volumes", &["nope"], &[]);
    assert_eq!(e, "'nope' is not a disk UUID");
    let e = user.error("stratus-describe-volumes", &["-f", "colour:red"], &[]);
    assert!(
        e.starts_with("filter 'colour:red': no field 'colour'"),
        "{e}"
    );
    let e = user.error(
        "stratus-delete-volume",
        &[&boot, "-u", "bob", "-p", "bob-password"],
        &[],
    );
    assert_eq!(e, "Service error: Not enough rights to delete disk");
    // Ids are checked before any request: a path in one would make another request.
    let e = user.error("stratus-delete-volume", &["x/mounts/5"], &[]);
    assert_eq!(e, "'x/mounts/5' is not a disk UUID");
    // One refusal in a batch does not stop the others; the batch fails.
    let spare = user.ok("stratus-create-volume", &["-s", "1", "-t", "spare"]);
    let spare = spare.trim().strip_prefix("DISK ").unwrap().to_owned();
    let missing = "00000000-0000-4000-8000-000000000000";
    let out = user.run("stratus-delete-volume", &[missing, &spare]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, format!("DELETED {spare}\n"), "{}", out.stderr);
    assert!(
        out.stderr.starts_with("  [ERROR] Service error: "),
        "{}",
        out.stderr
    );
    let seen_by_bob = user.ok(
        "stratus-describe-volumes",
        &[&["-q"][..], &bob[..]].concat(),
    );
    assert_eq!(
        seen_by_bob,
        format!("{data}\n"),
        "bob sees the public volume only"
    );

    // Attached at boot: the node gets the file; the volume is held.
    let vm = run_with_volume(&user, &image, &boot);
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    let disk = volume_on_node(&on_node, &boot);
    assert_eq!(
        disk["source"]["file"]["path"],
        cloud
            .dir
            .path()
            .join("volumes")
            .join(format!("{boot}.img"))
            .display()
            .to_string()
    );
    let shown = held_by(&user, &boot, vm);
    assert!(shown.contains("\tcount: 1\n"), "{shown}");
    let e = user.error(
        "stratus-detach-volume",
        &["-i", &vm.to_string(), &boot],
        &[],
    );
    assert_eq!(e, format!("DISK {boot}: Disk have not been hot-plugged"));

    // -n 2 with room for one more machine (alice runs one): the second is refused; with
    // --json the first is still printed, for the caller to kill.
    let (status, _) = cloud.admin("PUT", "/users/alice/quotas", Some(&json!({"vms": 2})));
    assert_eq!(status, 200);
    let out = user.run(
        "stratus-run-instance",
        &["--json", "-n", "2", "-t", "t1.micro", &image],
    );
    let (status, _) = cloud.admin("PUT", "/users/alice/quotas", Some(&json!({})));
    assert_eq!(status, 200);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.starts_with("  [ERROR] "), "{}", out.stderr);
    let started: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", out.stdout, out.stderr));
    assert_eq!(started.as_array().map(Vec::len), Some(1), "{started}");
    let first = started[0]["id"].as_i64().unwrap();
    user.ok("stratus-kill-instance", &[&first.to_string()]);
    cloud.wait_state(first, "Done");

    // Hot-plugged into the running VM, and out again.
    assert_eq!(
        user.ok("stratus-attach-volume", &["-i", &vm.to_string(), &data]),
        format!("ATTACHED {data} in VM {vm} on /dev/vdz\n")
    );
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    assert_eq!(
        on_node["attached"].as_array().unwrap().len(),
        1,
        "{on_node}"
    );
    assert_eq!(on_node["attached"][0]["serial"], data[..20]);

    // 100 attach requests for one volume at once: one wins, the others name the holder.
    let other = run_with_volumes(&user, &image, &[]);
    let spare = user.ok("stratus-create-volume", &["-s", "1"]);
    let spare = spare.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    let alice = ("alice", "alice-password");
    one_of_100_attaches_wins(&cloud, &spare, vm, other);

    // A delete and an attach of one volume at once: one of them, never both.
    for _ in 0..8 {
        let contested = user.ok("stratus-create-volume", &["-s", "1"]);
        let contested = contested
            .strip_prefix("DISK ")
            .unwrap()
            .trim_end()
            .to_owned();
        let barrier = std::sync::Barrier::new(2);
        let ((deleted, why_not_deleted), (attached, why_not_attached)) = std::thread::scope(|s| {
            let delete = s.spawn(|| {
                barrier.wait();
                cloud.call_as(alice, "DELETE", &format!("/disks/{contested}"), None)
            });
            let attach = s.spawn(|| {
                barrier.wait();
                cloud.call_as(
                    alice,
                    "POST",
                    &format!("/disks/{contested}/mounts"),
                    Some(&serde_json::json!({ "vm_id": other })),
                )
            });
            (delete.join().unwrap(), attach.join().unwrap())
        });
        let (status, shown) = cloud.call_as(alice, "GET", &format!("/disks/{contested}"), None);
        match (deleted, attached) {
            (204, 404 | 409) => assert_eq!(status, 404, "deleted, yet {shown}"),
            (409, 202) => {
                assert!(
                    error(&why_not_deleted).contains(&format!("attached to VM {other}")),
                    "{why_not_deleted}"
                );
                assert_eq!(shown["mounts"][0]["vm_id"], other, "{shown}");
                unplug_and_delete(&cloud, &contested, other);
            }
            outcome => panic!(
                "delete {} and attach {}: {why_not_deleted} {why_not_attached}",
                outcome.0, outcome.1
            ),
        }
    }

    assert_eq!(
        user.ok("stratus-detach-volume", &["-i", &vm.to_string(), &data]),
        format!("DETACHED {data} from VM {vm} on /dev/vdz\n")
    );
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    let serials: Vec<&Value> = on_node["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["serial"])
        .collect();
    assert!(!serials.contains(&&Value::from(&data[..20])), "{on_node}");
    assert!(user
        .ok("stratus-describe-volumes", &[&data])
        .contains("\tcount: 0\n"));

    // Another user's public volume is theirs to read only, and its owner can take it back.
    let as_bob = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(bob.iter())
            .map(|a| a.to_string())
            .collect()
    };
    let bobs = user.ok(
        "stratus-run-instance",
        &as_bob(&["-q", "-t", "t1.micro", "--wait=60", &image])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let bobs: i64 = bobs.split(',').next().unwrap().parse().unwrap();
    let attach = as_bob(&["-i", &bobs.to_string(), &data]);
    assert_eq!(
        user.ok(
            "stratus-attach-volume",
            &attach.iter().map(String::as_str).collect::<Vec<_>>()
        ),
        format!("ATTACHED {data} in VM {bobs} on /dev/vdz\n")
    );
    let (_, on_node) = agent.call("GET", &format!("/vms/{bobs}"));
    assert_eq!(on_node["attached"][0]["read_only"], true, "{on_node}");
    assert_eq!(
        user.ok("stratus-detach-volume", &["-i", &bobs.to_string(), &data]),
        format!("DETACHED {data} from VM {bobs} on /dev/vdz\n")
    );
    // Made private while on Bob's VM: Bob can still take it off his VM, not attach it again.
    let alice = ("alice", "alice-password");
    let bob_api = ("bob", "bob-password");
    let detach_path = format!("/disks/{data}/mounts/{bobs}");
    let mount = serde_json::json!({ "vm_id": bobs });
    let bob_attaches = || {
        cloud.call_as(
            bob_api,
            "POST",
            &format!("/disks/{data}/mounts"),
            Some(&mount),
        )
    };
    // On Alice's VM, it is in use for Bob, on a VM he is not told.
    user.ok("stratus-attach-volume", &["-i", &vm.to_string(), &data]);
    wait_mount_state(&cloud, alice, &data, "attached");
    let (status, e) = bob_attaches();
    assert_eq!(status, 409, "{e}");
    assert_eq!(error(&e), format!("disk {data} is attached to another VM"));
    let (_, seen) = cloud.call_as(bob_api, "GET", &format!("/disks/{data}"), None);
    assert_eq!(
        (&seen["count"], &seen["mounts"]),
        (&json!(1), &json!([])),
        "{seen}"
    );
    user.ok("stratus-detach-volume", &["-i", &vm.to_string(), &data]);
    wait_mount_state(&cloud, alice, &data, "none");
    let (status, e) = bob_attaches();
    assert_eq!(status, 202, "{e}");
    wait_mount_state(&cloud, alice, &data, "attached");
    // Its mount on his own VM is Bob's to see.
    let (_, seen) = cloud.call_as(bob_api, "GET", &format!("/disks/{data}/mounts"), None);
    assert_eq!(seen[0]["vm_id"], json!(bobs), "{seen}");
    // Which VM has it is told to Bob (his VM) and Alice (her volume).
    let to_alices = serde_json::json!({ "vm_id": vm });
    for (asker, to) in [(bob_api, &mount), (alice, &to_alices)] {
        let (status, e) = cloud.call_as(asker, "POST", &format!("/disks/{data}/mounts"), Some(to));
        assert_eq!(status, 409, "{e}");
        assert_eq!(error(&e), format!("disk {data} is attached to VM {bobs}"));
    }
    let private = serde_json::json!({ "visibility": "private" });
    let (status, e) = cloud.call_as(alice, "PUT", &format!("/disks/{data}"), Some(&private));
    assert_eq!(status, 200, "{e}");
    let (status, e) = cloud.call_as(bob_api, "DELETE", &detach_path, None);
    assert_eq!(status, 202, "{e}");
    wait_mount_state(&cloud, alice, &data, "none");
    let (status, e) = bob_attaches();
    assert_eq!(status, 403, "{e}");
    assert_eq!(error(&e), "Not enough rights to attach disk");
    let public = serde_json::json!({ "visibility": "public" });
    let (status, e) = cloud.call_as(alice, "PUT", &format!("/disks/{data}"), Some(&public));
    assert_eq!(status, 200, "{e}");
    // Its owner takes it back from the VM that holds it only: of another user's VM it is
    // not on, it learns nothing (not even the VM's state).
    let (status, e) = cloud.call_as(alice, "DELETE", &detach_path, None);
    assert_eq!(status, 403, "{e}");
    assert_eq!(error(&e), format!("VM {bobs} belongs to another user"));
    // A user who still owns volumes is not deleted (a new user of that name would own them).
    let create = as_bob(&["-s", "1"]);
    let bobs_volume = user.ok(
        "stratus-create-volume",
        &create.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let bobs_volume = bobs_volume
        .strip_prefix("DISK ")
        .unwrap()
        .trim_end()
        .to_owned();
    let kill = as_bob(&[&bobs.to_string()]);
    user.ok(
        "stratus-kill-instance",
        &kill.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    cloud.wait_state(bobs, "Done");
    let (status, body) = cloud.admin("DELETE", "/users/bob", None);
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        error(&body),
        "cannot delete user 'bob': they still own 1 volume(s); delete them first"
    );
    let delete = as_bob(&[&bobs_volume]);
    user.ok(
        "stratus-delete-volume",
        &delete.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(cloud.admin("DELETE", "/users/bob", None).0, 204);
    // A new "bob" starts afresh: the old one's VMs, histories and jobs went with him.
    let new_bob = cloud.add_user("bob", "another-password");
    assert_eq!(cloud.call_as(new_bob, "GET", "/vms", None).1["count"], 0);
    let (status, old) = cloud.call_as(new_bob, "GET", &format!("/vms/{bobs}"), None);
    assert_eq!(status, 404, "{old}");
    assert_eq!(cloud.admin("DELETE", "/users/bob", None).0, 204);

    // When the VMs end, their volumes are free; deleting them removes their files.
    user.ok(
        "stratus-kill-instance",
        &[&vm.to_string(), &other.to_string()],
    );
    cloud.wait_state(vm, "Done");
    cloud.wait_state(other, "Done");
    assert!(user
        .ok("stratus-describe-volumes", &[&boot])
        .contains("\tcount: 0\n"));
    assert_eq!(
        user.ok("stratus-delete-volume", &[&boot, &data, &spare]),
        format!("DELETED {boot}\nDELETED {data}\nDELETED {spare}\n")
    );
    assert!(!file.exists());
    assert_eq!(
        user.ok("stratus-describe-volumes", &[]),
        "No disk to show\n"
    );
}

/// A new 1 GiB MACHINE_IMAGE_ORIGIN volume of `user`'s.
fn new_origin(cloud: &Orchestrator, user: (&str, &str)) -> String {
    let body = serde_json::json!({"size_gib": 1, "type": "MACHINE_IMAGE_ORIGIN"});
    let (status, origin) = cloud.call_as(user, "POST", "/disks", Some(&body));
    assert_eq!(status, 201, "{origin}");
    origin["uuid"].as_str().unwrap().to_owned()
}

/// `POST /disks/{origin}`: a LIVE snapshot as StratusLab described it.
fn live_snapshot(cloud: &Orchestrator, user: (&str, &str), origin: &str) -> String {
    let (status, live) = cloud.call_as(user, "POST", &format!("/disks/{origin}"), None);
    assert_eq!(status, 201, "{live}");
    assert_eq!(live["type"], "MACHINE_IMAGE_LIVE", "{live}");
    assert_eq!(live["identifier"], format!("snapshot:{origin}"), "{live}");
    assert_eq!(live["base_uuid"], origin, "{live}");
    assert_eq!(live["state"], "available", "{live}");
    live["uuid"].as_str().unwrap().to_owned()
}

/// The first MiB of what the disk image at `path` reads as (qemu-img's view, not ours).
fn disk_head(path: &Path, format: &str) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("qemu-img")
        .args(["dd", "-f", format, "-O", "raw", "bs=1M", "count=1"])
        .arg(format!("if={}", path.display()))
        .arg(format!("of={}", out.path().display()))
        .status()
        .expect("qemu-img (install qemu-utils)");
    assert!(status.success(), "qemu-img dd {}", path.display());
    std::fs::read(out.path()).unwrap()
}

/// StratusLab's `POST /disks/{uuid}` on the file pool: an ORIGIN's LIVE snapshot is a
/// qcow2 overlay beside it that names it and holds no data of its own; writes to it never
/// reach the ORIGIN; jailed VMMs open it at boot and by hot-plug with the ORIGIN shown
/// read-only beside it; the ORIGIN cannot go while the LIVE needs it; a LIVE is rebased
/// into a raw ORIGIN of its own, but not when its header names any file but its ORIGIN.
#[test]
fn origins_have_live_snapshots_and_lives_are_rebased_on_a_file_pool() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let (market, agent, cloud) = cloud();
    let image = market.publish(Guest::EventLoop, |_| {});
    let user = User::new();
    user.config(&user_config(&cloud, &market, &user));
    let alice = ("alice", "alice-password");
    let pool = cloud.dir.path().join("volumes");
    let set_type = |uuid: &str, kind: &str| {
        let body = serde_json::json!({ "type": kind });
        let (status, e) = cloud.call_as(alice, "PUT", &format!("/disks/{uuid}"), Some(&body));
        assert_eq!(status, 200, "{e}");
    };

    let origin = new_origin(&cloud, alice);
    let origin_file = pool.join(format!("{origin}.img"));
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&origin_file)
        .unwrap()
        .write_all_at(&data, 4096)
        .unwrap();
    let origin_head = disk_head(&origin_file, "raw");

    // The snapshot: an overlay naming the ORIGIN, no data of its own.
    let live = live_snapshot(&cloud, alice, &origin);
    let live_file = pool.join(format!("{live}.qcow2"));
    // Shown and found by its identifier, as StratusLab's tutorial finds a saved image's disk.
    let shown = user.ok("stratus-describe-volumes", &[&live]);
    assert!(
        shown.contains(&format!(
            "\ttag: \n\tidentifier: snapshot:{origin}\n\tsize: 1\n"
        )),
        "{shown}"
    );
    let filter = format!("identifier:^snapshot:{origin}$");
    assert_eq!(
        user.ok("stratus-describe-volumes", &["-q", "-f", &filter]),
        format!("{live}\n")
    );
    // -q lists nothing at all when nothing matches.
    assert_eq!(
        user.ok(
            "stratus-describe-volumes",
            &["-q", "-f", "identifier:^nothing$"]
        ),
        ""
    );
    let info: Value = serde_json::from_slice(
        &Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(&live_file)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(info["virtual-size"], 1u64 << 30, "{info}");
    assert_eq!(info["backing-filename"], format!("{origin}.img"), "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    let allocated = std::fs::metadata(&live_file).unwrap().blocks() * 512;
    assert!(
        allocated < 1 << 20,
        "a new LIVE holds tables only: {allocated} bytes"
    );
    assert_eq!(disk_head(&live_file, "qcow2"), origin_head);
    let (_, shown) = cloud.call_as(alice, "GET", &format!("/disks/{origin}"), None);
    assert_eq!(shown["count"], 1, "an ORIGIN counts its snapshots: {shown}");
    // A snapshot of a snapshot would chain overlays: refused with the way out.
    set_type(&live, "MACHINE_IMAGE_ORIGIN");
    let (status, e) = cloud.call_as(alice, "POST", &format!("/disks/{live}"), None);
    assert_eq!(status, 409, "{e}");
    assert!(error(&e).contains("rebase it into an ORIGIN first"), "{e}");
    // Whatever its type says, the overlay still needs its ORIGIN.
    let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{origin}"), None);
    assert_eq!(status, 409, "{e}");
    assert!(error(&e).contains(&live), "{e}");
    set_type(&live, "MACHINE_IMAGE_LIVE");

    // Written through the LIVE: the ORIGIN keeps its data, and cannot go while the LIVE
    // needs it.
    let written = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 128k"])
        .arg(&live_file)
        .status()
        .unwrap();
    assert!(written.success());
    let live_head = disk_head(&live_file, "qcow2");
    assert_ne!(live_head, origin_head);
    assert_eq!(disk_head(&origin_file, "raw"), origin_head);
    let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{origin}"), None);
    assert_eq!(status, 409, "{e}");
    assert!(error(&e).contains(&live), "{e}");

    // Jailed VMMs open the LIVE with its ORIGIN: at boot, and hot-plugged beside the
    // ORIGIN itself (read-only).
    let first = run_with_volume(&user, &image, &live);
    let (_, on_node) = agent.call("GET", &format!("/vms/{first}"));
    let disk = volume_on_node(&on_node, &live);
    assert_eq!(disk["read_only"], false, "{disk}");
    assert_eq!(disk["source"]["file"]["format"], "qcow2", "{disk}");
    assert_eq!(
        disk["source"]["file"]["backing"],
        serde_json::json!([origin_file.display().to_string()]),
        "{disk}"
    );
    let (status, e) = cloud.call_as(alice, "POST", &format!("/disks/{live}"), None);
    assert_eq!(status, 409, "{e}");
    assert!(error(&e).contains("detach it"), "{e}");
    // Nor does it become an ORIGIN (whose snapshots are not checked for writers) while a
    // guest writes it.
    let body = serde_json::json!({ "type": "MACHINE_IMAGE_ORIGIN" });
    let (status, e) = cloud.call_as(alice, "PUT", &format!("/disks/{live}"), Some(&body));
    assert_eq!(status, 409, "{e}");
    assert!(
        error(&e).contains(&format!(
            "attached to VM {first}: detach it before changing its type"
        )),
        "{e}"
    );
    user.ok("stratus-kill-instance", &[&first.to_string()]);
    cloud.wait_state(first, "Done");
    // Given another type, the ORIGIN is still never written while a LIVE reads through it.
    set_type(&origin, "DATA_IMAGE_RAW_READ_WRITE");
    let second = run_with_volume(&user, &image, &origin);
    let (_, on_node) = agent.call("GET", &format!("/vms/{second}"));
    assert_eq!(volume_on_node(&on_node, &origin)["read_only"], true);
    assert_eq!(
        user.ok("stratus-attach-volume", &["-i", &second.to_string(), &live]),
        format!("ATTACHED {live} in VM {second} on /dev/vdz\n")
    );
    let (_, on_node) = agent.call("GET", &format!("/vms/{second}"));
    assert_eq!(on_node["state"], "running", "{on_node}");
    assert_eq!(
        on_node["attached"][0]["source"]["file"]["format"], "qcow2",
        "{on_node}"
    );
    user.ok("stratus-detach-volume", &["-i", &second.to_string(), &live]);
    user.ok("stratus-kill-instance", &[&second.to_string()]);
    cloud.wait_state(second, "Done");
    assert_eq!(
        disk_head(&origin_file, "raw"),
        origin_head,
        "the VMs never wrote it"
    );
    set_type(&origin, "MACHINE_IMAGE_ORIGIN");

    // The rebase: a raw ORIGIN with the LIVE's data, sparse.
    let (status, rebased) = cloud.call_as(alice, "POST", &format!("/disks/{live}"), None);
    assert_eq!(status, 201, "{rebased}");
    assert_eq!(rebased["type"], "MACHINE_IMAGE_ORIGIN", "{rebased}");
    assert_eq!(rebased["base_uuid"], live.as_str(), "{rebased}");
    let rebased = rebased["uuid"].as_str().unwrap().to_owned();
    let rebased_file = pool.join(format!("{rebased}.img"));
    assert_eq!(std::fs::metadata(&rebased_file).unwrap().len(), 1 << 30);
    assert!(std::fs::metadata(&rebased_file).unwrap().blocks() * 512 < 1 << 20);
    assert_eq!(disk_head(&rebased_file, "raw"), live_head);

    // A LIVE whose header was rewritten (by a VMM that could write it) to name a host
    // file: its rebase is refused, nothing made.
    let second_live = live_snapshot(&cloud, alice, &origin);
    // Two snapshots of one ORIGIN share its identifier: only one may be made an ORIGIN.
    set_type(&live, "MACHINE_IMAGE_ORIGIN");
    let body = serde_json::json!({ "type": "DATA_IMAGE_ORIGIN" });
    let (status, e) = cloud.call_as(alice, "PUT", &format!("/disks/{second_live}"), Some(&body));
    assert_eq!(status, 409, "{e}");
    assert!(
        error(&e).contains(&format!("an ORIGIN of snapshot:{origin} exists already")),
        "{e}"
    );
    set_type(&live, "MACHINE_IMAGE_LIVE");
    let rewritten = Command::new("qemu-img")
        .args([
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/hostname",
        ])
        .arg(pool.join(format!("{second_live}.qcow2")))
        .status()
        .unwrap();
    assert!(rewritten.success());
    let before: usize = std::fs::read_dir(&pool).unwrap().count();
    let (status, e) = cloud.call_as(alice, "POST", &format!("/disks/{second_live}"), None);
    assert_eq!(status, 409, "{e}");
    assert!(error(&e).contains("/etc/hostname"), "{e}");
    assert_eq!(
        std::fs::read_dir(&pool).unwrap().count(),
        before,
        "nothing made"
    );
    let (_, all) = cloud.call_as(alice, "GET", "/disks", None);
    assert_eq!(all.as_array().unwrap().len(), 4, "{all}");

    // The admins' view of the pool: its filesystem's size as df has it, and these volumes.
    let (status, e) = cloud.call_as(alice, "GET", "/pools", None);
    assert_eq!(status, 403, "{e}");
    let (status, pools) = cloud.admin("GET", "/pools", None);
    assert_eq!(status, 200, "{pools}");
    assert_eq!(pools.as_array().unwrap().len(), 1, "{pools}");
    let file_pool = &pools[0];
    assert_eq!(file_pool["name"], "file", "{pools}");
    assert_eq!(file_pool["location"], pool.to_str().unwrap(), "{pools}");
    assert_eq!(file_pool["volumes"], 4, "{pools}");
    assert_eq!(file_pool["provisioned_gib"], 4, "{pools}");
    let df = run(
        "df",
        &["-B1", "--output=size", pool.to_str().unwrap()],
        Path::new("/"),
    );
    let size: u64 = df.lines().nth(1).unwrap().trim().parse().unwrap();
    assert_eq!(file_pool["total_bytes"], size, "{pools} vs df {df}");
    let free = file_pool["free_bytes"].as_u64().unwrap();
    assert!(free > 0 && free <= size, "{pools}");
    let allocated: u64 = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum();
    assert!(allocated > 0);
    assert_eq!(file_pool["used_bytes"], allocated, "{pools}");

    // Everything goes, the LIVEs first.
    for uuid in [&live, &second_live, &origin, &rebased] {
        let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{uuid}"), None);
        assert_eq!(status, 204, "{uuid}: {e}");
    }
    assert_eq!(std::fs::read_dir(&pool).unwrap().count(), 0, "files left");
}

/// `--json` on every command that talks to a service: one JSON document with the API's
/// field names; `-q`: identifiers only.
#[test]
fn every_command_speaks_json_and_quiet() {
    let (market, _agent, cloud) = cloud();
    let image = market.publish(Guest::EventLoop, |_| {});
    let user = User::new();
    user.config(&user_config(&cloud, &market, &user));
    let json = |command: &str, args: &[&str]| -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = user.ok(command, &all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command} --json: {e}: {out}"))
    };

    assert_eq!(
        json("stratus-describe-instance", &[]),
        serde_json::json!([])
    );
    assert_eq!(user.ok("stratus-describe-instance", &["-q"]), "");
    let types = json("stratus-run-instance", &["--list-types"]);
    assert_eq!(types.as_array().unwrap().len(), 7);
    assert_eq!(types[0]["name"], "c1.medium");
    assert_eq!(types[0]["ram_mib"], 1536);

    let started = json(
        "stratus-run-instance",
        // The image right after a bare --wait is the image (the wait its default).
        &["-t", "t1.micro", "--wait", &image],
    );
    let vm = started[0]["id"].as_i64().unwrap();
    assert_eq!(started[0]["state"], "Running");
    assert_eq!(started[0]["instance_type"], "t1.micro");
    assert_eq!(started[0]["leases"][0]["network"], "public");
    assert_eq!(
        user.ok("stratus-describe-instance", &["-q"]),
        format!("{vm} Running\n")
    );
    let one = json("stratus-describe-instance", &[&vm.to_string()]);
    assert_eq!(one[0]["history"][0]["state"], "Pending");

    let images = json("stratus-list-images", &[]);
    assert_eq!(images[0]["identifier"], image);
    assert_eq!(
        user.ok("stratus-list-images", &["-q"]),
        format!("{image}\n")
    );
    assert_eq!(json("stratus-show-image", &[&image])["identifier"], image);

    let volume = json("stratus-create-volume", &["-s", "1", "-t", "j"]);
    let uuid = volume["uuid"].as_str().unwrap().to_owned();
    assert_eq!(volume["size_gib"], 1);
    assert_eq!(volume["type"], "DATA_IMAGE_RAW_READ_WRITE");
    assert_eq!(
        json("stratus-update-volume", &[&uuid, "--public"])["visibility"],
        "public"
    );
    assert_eq!(
        user.ok("stratus-describe-volumes", &["-q"]),
        format!("{uuid}\n")
    );
    let attached = json("stratus-attach-volume", &["-i", &vm.to_string(), &uuid]);
    assert_eq!(attached[0]["device"], "vdz");
    assert_eq!(attached[0]["vm_id"], vm);
    let listed = json("stratus-describe-volumes", &[]);
    assert_eq!(listed[0]["mounts"][0]["vm_id"], vm);
    assert_eq!(listed[0]["mounts"][0]["hotplugged"], true);
    let detached = json("stratus-detach-volume", &["-i", &vm.to_string(), &uuid]);
    assert_eq!(detached[0]["uuid"], uuid);
    assert_eq!(
        json("stratus-delete-volume", &[&uuid]),
        serde_json::json!([uuid])
    );

    let killed = json("stratus-kill-instance", &[&vm.to_string()]);
    assert_eq!(killed[0]["vm"]["id"], vm);
    assert!(killed[0]["job"].as_i64().unwrap() > 0);
    cloud.wait_state(vm, "Done");

    // The administrators' views.
    let admin = ["-u", "admin", "-p", ADMIN_PASSWORD];
    let nodes: Value = serde_json::from_str(&user.ok(
        "stratus-describe-nodes",
        &[&["--json"][..], &admin[..]].concat(),
    ))
    .unwrap();
    assert_eq!(nodes[0]["name"], "node-1");
    assert_eq!(nodes[0]["cpu_total"], 4);
    let table = user.ok("stratus-describe-nodes", &admin);
    assert!(table.starts_with("ID NAME   RVM TCPU FCPU ACPU TMEM FMEM AMEM STAT\n1  node-1 0   4    4    0    4096 4096 0    on\n"), "{table}");
    let users: Value = serde_json::from_str(&user.ok(
        "stratus-list-users",
        &[&["--json"][..], &admin[..]].concat(),
    ))
    .unwrap();
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "alice"]);
    let e = user.error("stratus-describe-nodes", &[], &[]);
    assert_eq!(
        e,
        "only administrators (::ADMIN) may do this; alice is ::USER"
    );
}

/// A tgtd of the test's own (scripts/iscsi-target.sh), stopped when dropped.
struct Tgtd {
    dir: tempfile::TempDir,
}

impl Tgtd {
    fn script(args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/iscsi-target.sh"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "iscsi-target.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start() -> Tgtd {
        let dir = tempfile::tempdir().unwrap();
        Self::script(&["start", dir.path().to_str().unwrap()]);
        Tgtd { dir }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Killed and started again on the same ports: it has forgotten every target.
    fn restart(&self) {
        Self::script(&["restart", self.dir.path().to_str().unwrap()]);
    }

    /// `[volume_iscsi]` for an orchestrator exporting through this tgtd.
    fn pool_settings(&self) -> String {
        format!(
            "[volume_iscsi]\nportal = \"127.0.0.1:{}\"\ncontrol_port = {}\n",
            self.read("port"),
            self.read("control")
        )
    }

    fn targets(&self) -> String {
        self.show("target")
    }

    fn accounts(&self) -> String {
        self.show("account")
    }

    /// The volume's target goes right after its VM's release is committed.
    fn wait_withdrawn(&self, volume: &str) {
        let ended = std::time::Instant::now();
        while self.targets().contains(volume) {
            assert!(
                ended.elapsed() < std::time::Duration::from_secs(15),
                "still exported after the VM ended: {}",
                self.targets()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn tid_of(&self, target: &str) -> String {
        let shown = self.targets();
        let line = shown
            .lines()
            .find(|l| l.starts_with("Target ") && l.ends_with(target))
            .unwrap_or_else(|| panic!("no {target} in {shown}"));
        line["Target ".len()..line.find(':').unwrap()].to_owned()
    }

    fn adm(&self, args: &[&str]) {
        let out = Command::new("tgtadm")
            .args(["-C", &self.read("control"), "--lld", "iscsi"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tgtadm {args:?}: {out:?}");
    }

    fn show(&self, mode: &str) -> String {
        let out = Command::new("tgtadm")
            .args([
                "-C",
                &self.read("control"),
                "--lld",
                "iscsi",
                "--op",
                "show",
            ])
            .args(["--mode", mode])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/iscsi-target.sh"))
            .args(["stop", self.dir.path().to_str().unwrap()])
            .status();
    }
}

/// A cloud whose volumes are on the RBD pool of `cluster`, with a node, alice and an
/// image; `user` is alice's command line.
struct RbdCloud {
    _market: Marketplace,
    agent: Agent,
    cloud: Orchestrator,
    _database: Database,
    alice: (&'static str, &'static str),
    image: String,
    user: User,
}

impl RbdCloud {
    fn start(cluster: &stratus_vmm::test_ceph::CephCluster) -> RbdCloud {
        let market = Marketplace::start();
        let agent = Agent::start(4, 4096, "");
        let database = Database::new(Backend::Sqlite);
        let cloud = Orchestrator::start_with(
            &market,
            &database,
            &format!(
                "[volume_rbd]\nconf = \"{}\"\nid = \"stratus\"\nkeyring = \"{}\"\n",
                cluster.conf().display(),
                cluster.keyring().display()
            ),
        );
        cloud.add_node("node-1", &agent);
        let alice = cloud.add_user("alice", "alice-password");
        let image = market.publish(Guest::EventLoop, |_| {});
        let user = User::new();
        user.config(&user_config(&cloud, &market, &user));
        RbdCloud {
            _market: market,
            agent,
            cloud,
            _database: database,
            alice,
            image,
            user,
        }
    }
}

/// pdisk's RBD pool: volumes are thin images in a Ceph pool (a throw-away cluster here);
/// nodes get the image's name with the cluster's configuration and client credentials and
/// the VMM opens it through librbd, at boot and by hot-plug. Ceph keeping an image (it has
/// a snapshot) refuses the delete with Ceph's reason and leaves the volume usable.
#[test]
fn volumes_on_an_rbd_pool_are_images_the_vmm_opens() {
    let cluster = stratus_vmm::test_ceph::CephCluster::start();
    let RbdCloud {
        _market: market,
        agent,
        cloud,
        _database,
        alice,
        image: _,
        user,
    } = RbdCloud::start(&cluster);

    let out = user.ok("stratus-create-volume", &["-s", "2", "-t", "on rbd"]);
    let data = out.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    let info: Value =
        serde_json::from_str(&cluster.rbd(&["info", "--format", "json", &format!("rbd/{data}")]))
            .unwrap();
    assert_eq!(info["size"], 2u64 << 30, "{info}");
    assert!(
        !cloud
            .dir
            .path()
            .join("volumes")
            .join(format!("{data}.img"))
            .exists(),
        "an RBD volume has no file"
    );

    // At boot: the node gets the image with the credentials, and the VMM only starts if
    // librbd opened it.
    let stamping = market.publish(Guest::DiskStamp, |_| {});
    let vm = run_with_volume(&user, &stamping, &data);
    stamp_of(&cloud, vm, &data, "wrote");
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    assert_eq!(on_node["state"], "running", "{on_node}");
    let disk = volume_on_node(&on_node, &data);
    assert_eq!(
        disk["source"]["rbd"],
        serde_json::json!({
            "image": format!("rbd/{data}"),
            "conf": cluster.conf(),
            "id": "stratus",
            "keyring": cluster.keyring(),
        }),
        "{disk}"
    );
    let disk_id = disk["id"].as_str().unwrap();
    assert!(
        on_node["counters"]["disks"][disk_id].is_object(),
        "the VMM has the image as a disk: {on_node}"
    );

    // Hot-plugged and unplugged while the VM runs.
    let spare = user.ok("stratus-create-volume", &["-s", "1"]);
    let spare = spare.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    assert_eq!(
        user.ok("stratus-attach-volume", &["-i", &vm.to_string(), &spare]),
        format!("ATTACHED {spare} in VM {vm} on /dev/vdz\n")
    );
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    assert_eq!(on_node["attached"][0]["serial"], spare[..20], "{on_node}");
    assert_eq!(
        on_node["attached"][0]["source"]["rbd"]["image"],
        format!("rbd/{spare}"),
        "{on_node}"
    );
    // The guest finds it on its bus, reads it and writes it.
    stamp_of(&cloud, vm, &spare, "wrote");
    assert_eq!(
        user.ok("stratus-detach-volume", &["-i", &vm.to_string(), &spare]),
        format!("DETACHED {spare} from VM {vm} on /dev/vdz\n")
    );

    // Ceph keeps an image with a snapshot: the delete is refused with its reason and the
    // volume stays usable; without the snapshot it goes.
    cluster.rbd(&["snap", "create", &format!("rbd/{spare}@kept")]);
    let e = user.error("stratus-delete-volume", &[&spare], &[]);
    assert!(e.contains("image has snapshots"), "{e}");
    let (status, volume) = cloud.call_as(alice, "GET", &format!("/disks/{spare}"), None);
    assert_eq!(status, 200, "{volume}");
    assert_eq!(volume["state"], "available", "{volume}");
    cluster.rbd(&["snap", "purge", "--no-progress", &format!("rbd/{spare}")]);
    assert_eq!(
        user.ok("stratus-delete-volume", &[&spare]),
        format!("DELETED {spare}\n")
    );
    assert!(!cluster
        .try_rbd(&["info", &format!("rbd/{spare}")])
        .status
        .success());

    user.ok("stratus-kill-instance", &[&vm.to_string()]);
    cloud.wait_state(vm, "Done");
    let stamp = data_outlives_its_vm(&cloud, &user, &stamping, &data);
    assert_eq!(rbd_head_hex(&cluster, &format!("rbd/{data}"), 32), stamp);
    assert_eq!(
        user.ok("stratus-delete-volume", &[&data]),
        format!("DELETED {data}\n")
    );
    assert!(!cluster
        .try_rbd(&["info", &format!("rbd/{data}")])
        .status
        .success());
}

/// The first MiB of an RBD image, hashed as `rbd export` reads it (what the tests write
/// lies there; a whole export would read the empty rest of the GiB too).
fn rbd_head_sha256(cluster: &stratus_vmm::test_ceph::CephCluster, image: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "rbd -c '{}' export --no-progress {image} - 2>/dev/null | head -c 1048576 | sha256sum",
            cluster.conf().display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// StratusLab's `POST /disks/{uuid}` on the RBD pool: an ORIGIN's LIVE snapshot is a clone
/// made without copying (no data used), writes to it never reach the ORIGIN, the ORIGIN
/// cannot go while the LIVE needs it and is attached read-only; a LIVE is rebased into an
/// ORIGIN of its own (a full copy, no parent) only while no VM has it.
#[test]
fn origins_have_live_snapshots_and_lives_are_rebased_on_an_rbd_pool() {
    let cluster = stratus_vmm::test_ceph::CephCluster::start();
    let RbdCloud {
        _market,
        agent,
        cloud,
        _database,
        alice,
        image,
        user,
    } = RbdCloud::start(&cluster);
    let bench = |image: &str, bytes: &str| {
        cluster.rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4096",
            "--io-threads",
            "1",
            "--io-pattern",
            "seq",
            "--io-total",
            bytes,
            image,
        ]);
    };

    let origin = new_origin(&cloud, alice);
    bench(&format!("rbd/{origin}"), "64K");
    let origin_sum = rbd_head_sha256(&cluster, &format!("rbd/{origin}"));

    // A plain data volume has neither snapshots nor rebases.
    let (_, data) = cloud.call_as(
        alice,
        "POST",
        "/disks",
        Some(&serde_json::json!({"size_gib": 1})),
    );
    let data = data["uuid"].as_str().unwrap().to_owned();
    let (status, e) = cloud.call_as(alice, "POST", &format!("/disks/{data}"), None);
    assert_eq!(status, 409, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("only ORIGIN volumes have snapshots"),
        "{e}"
    );

    // The snapshot: a clone of the ORIGIN's base snapshot, holding no data of its own.
    let live = live_snapshot(&cloud, alice, &origin);
    let info: Value =
        serde_json::from_str(&cluster.rbd(&["info", "--format", "json", &format!("rbd/{live}")]))
            .unwrap();
    assert_eq!(info["parent"]["image"], origin.as_str(), "{info}");
    assert_eq!(info["parent"]["snapshot"], "stratus-base", "{info}");
    let du: Value =
        serde_json::from_str(&cluster.rbd(&["du", "--format", "json", &format!("rbd/{live}")]))
            .unwrap();
    assert_eq!(du["images"][0]["used_size"], 0, "{du}");
    assert_eq!(
        rbd_head_sha256(&cluster, &format!("rbd/{live}")),
        origin_sum
    );
    let (_, shown) = cloud.call_as(alice, "GET", &format!("/disks/{origin}"), None);
    assert_eq!(shown["count"], 1, "an ORIGIN counts its snapshots: {shown}");

    // Written through the LIVE: the ORIGIN keeps its data, and cannot go while the LIVE
    // needs it.
    bench(&format!("rbd/{live}"), "128K");
    let live_sum = rbd_head_sha256(&cluster, &format!("rbd/{live}"));
    assert_ne!(live_sum, origin_sum);
    assert_eq!(
        rbd_head_sha256(&cluster, &format!("rbd/{origin}")),
        origin_sum
    );
    let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{origin}"), None);
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains(&live), "{e}");

    // On a VM: the ORIGIN only read-only; the LIVE is not rebased while attached.
    let vm = run_with_volume(&user, &image, &origin);
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    let disk = volume_on_node(&on_node, &origin);
    assert_eq!(disk["read_only"], true, "{disk}");
    user.ok("stratus-attach-volume", &["-i", &vm.to_string(), &live]);
    let (status, e) = cloud.call_as(alice, "POST", &format!("/disks/{live}"), None);
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("detach it"), "{e}");
    user.ok("stratus-detach-volume", &["-i", &vm.to_string(), &live]);
    user.ok("stratus-kill-instance", &[&vm.to_string()]);
    cloud.wait_state(vm, "Done");

    // The rebase: a new ORIGIN with the LIVE's data and no parent.
    let (status, rebased) = cloud.call_as(alice, "POST", &format!("/disks/{live}"), None);
    assert_eq!(status, 201, "{rebased}");
    assert_eq!(rebased["type"], "MACHINE_IMAGE_ORIGIN", "{rebased}");
    assert_eq!(rebased["base_uuid"], live.as_str(), "{rebased}");
    let rebased = rebased["uuid"].as_str().unwrap().to_owned();
    let info: Value = serde_json::from_str(&cluster.rbd(&[
        "info",
        "--format",
        "json",
        &format!("rbd/{rebased}"),
    ]))
    .unwrap();
    assert!(info.get("parent").is_none(), "{info}");
    assert_eq!(
        rbd_head_sha256(&cluster, &format!("rbd/{rebased}")),
        live_sum
    );

    // The admins' view of the pool, from Ceph: what it stores (the data written above)
    // and can still take, and the four volumes on it.
    let (status, pools) = cloud.admin("GET", "/pools", None);
    assert_eq!(status, 200, "{pools}");
    let rbd_pool = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "rbd")
        .unwrap_or_else(|| panic!("no rbd pool in {pools}"));
    assert_eq!(rbd_pool["location"], "rbd", "{pools}");
    assert_eq!(rbd_pool["volumes"], 4, "{pools}");
    assert_eq!(rbd_pool["provisioned_gib"], 4, "{pools}");
    let du: Value =
        serde_json::from_str(&cluster.rbd(&["du", "--format", "json", "-p", "rbd"])).unwrap();
    assert!(du["total_used_size"].as_u64().unwrap() > 0, "{du}");
    assert_eq!(
        rbd_pool["used_bytes"], du["total_used_size"],
        "{pools} vs {du}"
    );
    // The throw-away cluster runs no ceph-mgr, which answers `ceph df`: the pool's space
    // is unknown, and says why.
    assert!(rbd_pool["total_bytes"].is_null(), "{pools}");
    assert!(
        rbd_pool["error"]
            .as_str()
            .unwrap_or("")
            .contains("ceph-mgr"),
        "{pools}"
    );

    // Made writable, written once no snapshot reads through it (no longer attached
    // read-only), and made an ORIGIN again: its next snapshot holds its new data, not
    // what it held when it last was an ORIGIN.
    let set_type = |kind: &str| {
        cloud.call_as(
            alice,
            "PUT",
            &format!("/disks/{origin}"),
            Some(&serde_json::json!({"type": kind})),
        )
    };
    let (status, e) = set_type("DATA_IMAGE_RAW_READ_WRITE");
    assert_eq!(status, 200, "{e}");
    let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{live}"), None);
    assert_eq!(status, 204, "{e}");
    bench(&format!("rbd/{origin}"), "192K");
    let rewritten_sum = rbd_head_sha256(&cluster, &format!("rbd/{origin}"));
    assert_ne!(rewritten_sum, origin_sum);
    let (status, e) = set_type("MACHINE_IMAGE_ORIGIN");
    assert_eq!(status, 200, "{e}");
    let second_live = live_snapshot(&cloud, alice, &origin);
    assert_eq!(
        rbd_head_sha256(&cluster, &format!("rbd/{second_live}")),
        rewritten_sum
    );

    // Everything goes, the LIVE first; the ORIGIN's base snapshot with it.
    for uuid in [&second_live, &origin, &rebased, &data] {
        let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{uuid}"), None);
        assert_eq!(status, 204, "{uuid}: {e}");
    }
    assert_eq!(cluster.rbd(&["ls", "rbd"]).trim(), "", "images left");
}

/// pdisk's iSCSI pool: volumes are LUNs of this host's tgtd, exported only while a VM has
/// them, only to its node's initiator name and only with the volume's own CHAP account,
/// which the node alone is given; the VMM logs in itself. A restarted tgtd serves the
/// attached volumes again as soon as pdisk's reconciliation passes.
#[test]
fn volumes_on_an_iscsi_pool_are_luns_the_vmm_logs_in_to() {
    use std::os::unix::fs::PermissionsExt;
    in_own_network_namespace();
    let tgtd = Tgtd::start();
    let market = Marketplace::start();
    let agent = Agent::start(4, 4096, "");
    let database = Database::new(Backend::Sqlite);
    let cloud = Orchestrator::start_with(&market, &database, &tgtd.pool_settings());
    cloud.add_node("node-1", &agent);
    cloud.add_user("alice", "alice-password");
    let user = User::new();
    user.config(&user_config(&cloud, &market, &user));

    // Made: a file in the pool, and no target yet: nobody may log in to it.
    let out = user.ok("stratus-create-volume", &["-s", "1", "-t", "on iscsi"]);
    let data = out.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    let target = format!("iqn.2026-12.eu.stratuslab.pdisk:{data}");
    assert!(!tgtd.targets().contains(&target), "{}", tgtd.targets());
    let file = cloud.dir.path().join("volumes").join(format!("{data}.img"));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 30);

    // At boot: the target admits the node's initiator with the volume's CHAP account; the
    // node gets both, and the VMM only starts if it logged in.
    let stamping = market.publish(Guest::DiskStamp, |_| {});
    let vm = run_with_volume(&user, &stamping, &data);
    stamp_of(&cloud, vm, &data, "wrote");
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    assert_eq!(on_node["state"], "running", "{on_node}");
    let port = tgtd.read("port");
    let disk = volume_on_node(&on_node, &data);
    let source = &disk["source"]["iscsi"];
    assert_eq!(
        source["url"],
        format!("iscsi://pdisk-{data}@127.0.0.1:{port}/{target}/1"),
        "{disk}"
    );
    let initiator = source["initiator"].as_str().unwrap().to_owned();
    assert!(
        initiator.starts_with("iqn.2026-12.eu.stratuslab.node:") && initiator.ends_with("-node-1"),
        "{initiator}"
    );
    assert!(
        source.get("chap_secret").is_none(),
        "the API shows no secret: {disk}"
    );
    let target_shown = target_section(&tgtd.targets(), &target);
    assert!(
        target_shown.contains(&format!("pdisk-{data}")) && target_shown.contains(&initiator),
        "{target_shown}"
    );
    let disk_id = disk["id"].as_str().unwrap();
    assert!(
        on_node["counters"]["disks"][disk_id].is_object(),
        "the VMM has the LUN as a disk: {on_node}"
    );
    // The node keeps the secret in the VM's record, which only root reads.
    let record = agent
        .dir
        .path()
        .join("state/vms")
        .join(format!("{vm}.json"));
    let mode = std::fs::metadata(&record).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", record.display());
    let recorded: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let secret = recorded["spec"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["serial"] == data[..20])
        .and_then(|d| d["source"]["iscsi"]["chap_secret"].as_str())
        .unwrap_or_else(|| panic!("no secret in {recorded}"))
        .to_owned();
    assert_eq!(secret.len(), 32, "{secret}");

    // Anyone else is turned away: without the CHAP account, or with it but under another
    // initiator name (tgtd takes any number of sessions, so these would get in otherwise).
    let probe = |id: &str, source: Value| {
        let mut spec = on_node["spec"].clone();
        spec["nics"] = serde_json::json!([]);
        for d in spec["disks"].as_array_mut().unwrap() {
            if d["serial"] == data[..20] {
                d["source"] = serde_json::json!({ "iscsi": source });
            }
        }
        let (status, body) = agent.call_with("PUT", &format!("/vms/{id}"), &spec);
        assert_eq!(status, 201, "{body}");
        let asked = std::time::Instant::now();
        let failed = loop {
            let (_, vm) = agent.call("GET", &format!("/vms/{id}"));
            if vm["state"] != "starting" {
                break vm;
            }
            assert!(asked.elapsed() < std::time::Duration::from_secs(20), "{vm}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert_eq!(failed["state"], "failed", "{id} got in: {failed}");
        let reason = failed["exit"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("cannot log in"), "{reason}");
        assert_eq!(agent.call("DELETE", &format!("/vms/{id}")).0, 204);
    };
    probe(
        "probe-no-chap",
        serde_json::json!({
            "url": format!("iscsi://127.0.0.1:{port}/{target}/1"),
            "initiator": initiator,
            "timeout_secs": 2,
        }),
    );
    probe(
        "probe-other-node",
        serde_json::json!({
            "url": format!("iscsi://pdisk-{data}@127.0.0.1:{port}/{target}/1"),
            "initiator": "iqn.2026-12.eu.stratuslab.node:99-intruder",
            "chap_secret": secret,
            "timeout_secs": 2,
        }),
    );
    assert_eq!(
        agent.call("GET", &format!("/vms/{vm}")).1["state"],
        "running"
    );

    // tgtd restarted: it has forgotten every target and account; pdisk exports the
    // attached volume again, as it was, within seconds (the running VM's VMM reconnects
    // well within its timeout) — and nothing else.
    let spare = user.ok("stratus-create-volume", &["-s", "1"]);
    let spare = spare.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    tgtd.restart();
    let restarted = std::time::Instant::now();
    while !target_section(&tgtd.targets(), &target).contains(&initiator) {
        assert!(
            restarted.elapsed() < std::time::Duration::from_secs(30),
            "not exported again: {}",
            tgtd.targets()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(target_section(&tgtd.targets(), &target).contains(&format!("pdisk-{data}")));
    assert!(!tgtd.targets().contains(&spare), "{}", tgtd.targets());

    // A hot-plug exports its volume first; a detach withdraws it.
    tgtd.restart();
    assert_eq!(
        user.ok("stratus-attach-volume", &["-i", &vm.to_string(), &spare]),
        format!("ATTACHED {spare} in VM {vm} on /dev/vdz\n")
    );
    let spare_target = format!("pdisk:{spare}");
    assert!(
        target_section(&tgtd.targets(), &spare_target).contains(&initiator),
        "{}",
        tgtd.targets()
    );
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    assert_eq!(on_node["attached"][0]["serial"], spare[..20], "{on_node}");
    // The guest finds it on its bus, reads it and writes it.
    stamp_of(&cloud, vm, &spare, "wrote");
    assert!(
        on_node["attached"][0]["source"]["iscsi"]
            .get("chap_secret")
            .is_none(),
        "{on_node}"
    );
    assert_eq!(
        user.ok("stratus-detach-volume", &["-i", &vm.to_string(), &spare]),
        format!("DETACHED {spare} from VM {vm} on /dev/vdz\n")
    );
    // Withdrawn with its account: the secret the node had opens nothing any more.
    assert!(!tgtd.targets().contains(&spare), "{}", tgtd.targets());
    assert!(!tgtd.accounts().contains(&spare), "{}", tgtd.accounts());
    // A read-only mount gets a read-only LUN, whatever the node's VMM would do.
    let alice = ("alice", "alice-password");
    set_type(&cloud, &spare, "DATA_IMAGE_RAW_READONLY");
    user.ok("stratus-attach-volume", &["-i", &vm.to_string(), &spare]);
    let shown = target_section(&tgtd.targets(), &spare_target);
    assert!(shown.contains("Readonly: Yes"), "{shown}");
    cloud.wait_console_line(alice, vm, &format!("disk {} read-only", &spare[..20]));
    user.ok("stratus-detach-volume", &["-i", &vm.to_string(), &spare]);
    assert!(!tgtd.targets().contains(&spare), "{}", tgtd.targets());

    // What a crash or a hand could leave: another initiator admitted to the attached
    // volume, a target for a volume no VM has. The next pass puts both right.
    let restarted = std::time::Instant::now();
    while !target_section(&tgtd.targets(), &target).contains(&initiator) {
        assert!(restarted.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let tid = tgtd.tid_of(&target);
    tgtd.adm(&[
        "--op",
        "bind",
        "--mode",
        "target",
        "--tid",
        &tid,
        "-Q",
        "iqn.2026-12.test:intruder",
    ]);
    tgtd.adm(&[
        "--op",
        "new",
        "--mode",
        "target",
        "--tid",
        "9",
        "-T",
        &spare_target_iqn(&spare),
    ]);
    tgtd.adm(&[
        "--op", "bind", "--mode", "target", "--tid", "9", "-I", "ALL",
    ]);
    assert!(tgtd.targets().contains("intruder") && tgtd.targets().contains(&spare));
    let planted = std::time::Instant::now();
    while tgtd.targets().contains("intruder") || tgtd.targets().contains(&spare) {
        assert!(
            planted.elapsed() < std::time::Duration::from_secs(30),
            "not put right: {}",
            tgtd.targets()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(target_section(&tgtd.targets(), &target).contains(&initiator));

    user.ok("stratus-kill-instance", &[&vm.to_string()]);
    cloud.wait_state(vm, "Done");
    tgtd.wait_withdrawn(&data);

    // The next VM reads what the last one wrote, through the target made for it.
    let stamp = data_outlives_its_vm(&cloud, &user, &stamping, &data);
    assert_eq!(head_hex(&file, 32), stamp);
    tgtd.wait_withdrawn(&data);

    // Deleted: the file goes from the pool, the CHAP account from tgtd.
    assert_eq!(
        user.ok("stratus-delete-volume", &[&spare]),
        format!("DELETED {spare}\n")
    );
    assert!(!cloud
        .dir
        .path()
        .join("volumes")
        .join(format!("{spare}.img"))
        .exists());
    assert_eq!(
        user.ok("stratus-delete-volume", &[&data]),
        format!("DELETED {data}\n")
    );
    assert!(!file.exists());
    assert!(!tgtd.accounts().contains(&data), "{}", tgtd.accounts());
}

/// 100 attach requests for `spare` at once, to VMs `vm` and `other` in turn: exactly one
/// wins, the others get 409 naming the holder, whose id is returned.
fn one_of_100_attaches_wins(cloud: &Orchestrator, spare: &str, vm: i64, other: i64) -> i64 {
    let alice = ("alice", "alice-password");
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let target = if i % 2 == 0 { vm } else { other };
                s.spawn(move || {
                    cloud.call_as(
                        alice,
                        "POST",
                        &format!("/disks/{spare}/mounts"),
                        Some(&serde_json::json!({ "vm_id": target })),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    let holder = winners[0]["vm_id"].as_i64().unwrap();
    for (status, body) in answers.iter().filter(|(s, _)| *s != 202) {
        assert_eq!(*status, 409, "{body}");
        assert_eq!(
            error(body),
            format!("disk {spare} is attached to VM {holder}")
        );
    }
    holder
}

/// Waits until volume `uuid`'s mount is in `state` (`none`: it has no mount).
fn wait_mount_state(cloud: &Orchestrator, owner: (&str, &str), uuid: &str, state: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, shown) = cloud.call_as(owner, "GET", &format!("/disks/{uuid}"), None);
        let now = shown["mounts"][0]["state"]
            .as_str()
            .unwrap_or("none")
            .to_owned();
        if now == state {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{shown}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Unplugs `volume` from VM `vm` once its attach job is done, then deletes it once the
/// detach is.
fn unplug_and_delete(cloud: &Orchestrator, volume: &str, vm: i64) {
    let alice = ("alice", "alice-password");
    let started = std::time::Instant::now();
    let unplug = format!("/disks/{volume}/mounts/{vm}");
    while cloud.call_as(alice, "DELETE", &unplug, None).0 != 202 {
        assert!(started.elapsed().as_secs() < 60, "{volume}: never attached");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    while cloud
        .call_as(alice, "DELETE", &format!("/disks/{volume}"), None)
        .0
        != 204
    {
        assert!(started.elapsed().as_secs() < 60, "{volume}: never detached");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// StratusLab's volume rules, the same on every pool: the describe block, update and
/// filters, another user's delete refused with StratusLab's text and their view limited to
/// public volumes, a volume attached at boot held against deletes, and 100 attaches of one
/// volume at once with exactly one winner.
fn pdisk_rules_hold_on(cloud: &Orchestrator, user: &User, image: &str, other: i64, pool: &str) {
    let bob = ["-u", "bob", "-p", "bob-password"];
    let create = |args: &[&str]| {
        let out = user.ok("stratus-create-volume", &[args, &["--pool", pool]].concat());
        out.strip_prefix("DISK ").unwrap().trim_end().to_owned()
    };
    let in_pool = format!("pool:^{pool}$");
    let data = create(&["-s", "2", "-t", "my data"]);
    assert_eq!(
        without_created(&user.ok("stratus-describe-volumes", &[&data])),
        format!(
            ":: DISK {data}\n\tcount: 0\n\towner: alice\n\ttag: my data\n\tsize: 2\n\
             \tvisibility: private\n\ttype: DATA_IMAGE_RAW_READ_WRITE\n\tstate: available\n\
             \tpool: {pool}\n"
        )
    );
    user.ok(
        "stratus-update-volume",
        &[&data, "--public", "-t", "shared"],
    );
    let shown = user.ok(
        "stratus-describe-volumes",
        &[
            "-q",
            "-f",
            "tag:^sha",
            "-f",
            "visibility:public",
            "-f",
            &in_pool,
        ],
    );
    assert_eq!(shown, format!("{data}\n"));
    let boot = create(&["-s", "1", "-t", "boot"]);
    let e = user.error(
        "stratus-delete-volume",
        &[&[&boot[..]][..], &bob].concat(),
        &[],
    );
    assert_eq!(e, "Service error: Not enough rights to delete disk");
    let seen_by_bob = user.ok(
        "stratus-describe-volumes",
        &[&["-q", "-f", &in_pool][..], &bob[..]].concat(),
    );
    assert_eq!(
        seen_by_bob,
        format!("{data}\n"),
        "bob sees the public one only"
    );

    let vm = run_with_volume(user, image, &boot);
    held_by(user, &boot, vm);

    let spare = create(&["-s", "1"]);
    let holder = one_of_100_attaches_wins(cloud, &spare, vm, other);
    unplug_and_delete(cloud, &spare, holder);
    user.ok("stratus-kill-instance", &[&vm.to_string()]);
    cloud.wait_state(vm, "Done");
    assert_eq!(
        user.ok("stratus-delete-volume", &[&boot, &data]),
        format!("DELETED {boot}\nDELETED {data}\n")
    );
}

/// The rules of `pdisk_rules_hold_on` on an iSCSI pool (a real tgtd) and an RBD pool (a
/// throw-away Ceph cluster) of one cloud; the file pool's are in
/// `volumes_through_the_links`.
#[test]
fn pdisk_rules_hold_on_iscsi_and_rbd_pools() {
    in_own_network_namespace();
    let tgtd = Tgtd::start();
    let cluster = stratus_vmm::test_ceph::CephCluster::start();
    let market = Marketplace::start();
    let image = market.publish(Guest::EventLoop, |_| {});
    let agent = Agent::start(4, 4096, "");
    let database = Database::new(Backend::Sqlite);
    let cloud = Orchestrator::start_with(
        &market,
        &database,
        &format!(
            "{}[volume_rbd]\nconf = \"{}\"\nid = \"stratus\"\nkeyring = \"{}\"\n",
            tgtd.pool_settings(),
            cluster.conf().display(),
            cluster.keyring().display()
        ),
    );
    cloud.add_node("node-1", &agent);
    cloud.add_user("alice", "alice-password");
    cloud.add_user("bob", "bob-password");
    let user = User::new();
    user.config(&user_config(&cloud, &market, &user));
    let other = run_with_volumes(&user, &image, &[]);
    for pool in ["iscsi", "rbd"] {
        pdisk_rules_hold_on(&cloud, &user, &image, other, pool);
    }
    assert_eq!(cluster.rbd(&["ls", "rbd"]).trim(), "", "images left");
    assert!(!tgtd.targets().contains("pdisk:"), "{}", tgtd.targets());
}

/// Gives alice's volume one of StratusLab's types.
fn set_type(cloud: &Orchestrator, volume: &str, kind: &str) {
    let (status, updated) = cloud.call_as(
        ("alice", "alice-password"),
        "PUT",
        &format!("/disks/{volume}"),
        Some(&serde_json::json!({ "type": kind })),
    );
    assert_eq!(status, 200, "{updated}");
}

/// Makes alice's volume a DATA_IMAGE_ORIGIN and takes a LIVE snapshot of it; the LIVE.
fn live_snapshot_of(cloud: &Orchestrator, volume: &str) -> Value {
    let alice = ("alice", "alice-password");
    set_type(cloud, volume, "DATA_IMAGE_ORIGIN");
    let (status, live) = cloud.call_as(alice, "POST", &format!("/disks/{volume}"), None);
    assert_eq!(status, 201, "{live}");
    live
}

/// Several pools of each kind, named in the configuration: a volume goes to the pool its
/// request names (else the default pool) and stays there; an unknown pool is refused with
/// the names there are; two iSCSI pools on one tgtd export and withdraw only their own
/// targets, and a VM logs in to LUNs of both.
#[test]
fn volumes_go_to_the_pool_their_request_names() {
    in_own_network_namespace();
    let tgtd = Tgtd::start();
    let market = Marketplace::start();
    let agent = Agent::start(4, 4096, "");
    let database = Database::new(Backend::Sqlite);
    let pools_dir = tempfile::tempdir().unwrap();
    let (scratch, san) = (
        pools_dir.path().join("scratch"),
        pools_dir.path().join("san"),
    );
    let (port, control) = (tgtd.read("port"), tgtd.read("control"));
    let cloud = Orchestrator::start_with(
        &market,
        &database,
        &format!(
            "default_volume_pool = \"scratch\"\n\
             [volume_iscsi]\nportal = \"127.0.0.1:{port}\"\ncontrol_port = {control}\n\
             [[volume_pools]]\nname = \"scratch\"\ndir = \"{}\"\n\
             [[volume_pools]]\nname = \"san\"\ndir = \"{}\"\n\
             [volume_pools.iscsi]\nportal = \"127.0.0.1:{port}\"\ncontrol_port = {control}\n\
             iqn_prefix = \"iqn.2026-12.eu.stratuslab.san\"\n",
            scratch.display(),
            san.display()
        ),
    );
    cloud.add_node("node-1", &agent);
    cloud.add_user("alice", "alice-password");
    let user = User::new();
    user.config(&user_config(&cloud, &market, &user));
    let alice = ("alice", "alice-password");
    let create = |args: &[&str]| {
        let out = user.ok("stratus-create-volume", args);
        out.strip_prefix("DISK ").unwrap().trim_end().to_owned()
    };
    let pool_of = |uuid: &str| {
        let (status, v) = cloud.call_as(alice, "GET", &format!("/disks/{uuid}"), None);
        assert_eq!(status, 200, "{v}");
        v["pool"].as_str().unwrap().to_owned()
    };

    let on_default = create(&["-s", "1"]);
    assert_eq!(pool_of(&on_default), "scratch");
    assert!(scratch.join(format!("{on_default}.img")).is_file());
    let on_file = create(&["-s", "1", "--pool", "file"]);
    assert_eq!(pool_of(&on_file), "file");
    let volume_dir = cloud.dir.path().join("volumes");
    assert!(volume_dir.join(format!("{on_file}.img")).is_file());
    let on_iscsi = create(&["-s", "1", "--pool", "iscsi"]);
    let on_san = create(&["-s", "1", "--pool", "san"]);
    assert_eq!(
        (pool_of(&on_iscsi), pool_of(&on_san)),
        ("iscsi".into(), "san".into())
    );
    assert!(volume_dir.join(format!("{on_iscsi}.img")).is_file());
    assert!(san.join(format!("{on_san}.img")).is_file());

    // Refused before anything is made, with the pools there are.
    let (_, before) = cloud.call_as(alice, "GET", "/disks", None);
    let e = user.error(
        "stratus-create-volume",
        &["-s", "1", "--pool", "nowhere"],
        &[],
    );
    assert!(
        e.contains("no volume pool 'nowhere'") && e.contains("file, iscsi, scratch, san"),
        "{e}"
    );
    let (_, after) = cloud.call_as(alice, "GET", "/disks", None);
    assert_eq!(before, after);

    // A snapshot stays in its origin's pool.
    let live = live_snapshot_of(&cloud, &on_default);
    assert_eq!(live["pool"], "scratch", "{live}");
    let live_uuid = live["uuid"].as_str().unwrap();
    assert!(scratch.join(format!("{live_uuid}.qcow2")).is_file());

    let (status, pools) = cloud.admin("GET", "/pools", None);
    assert_eq!(status, 200, "{pools}");
    let shown: Vec<(String, String, bool, i64)> = pools
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["kind"].as_str().unwrap().to_owned(),
                p["default"].as_bool().unwrap(),
                p["volumes"].as_i64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("file", "file", false, 1),
        ("iscsi", "iscsi", false, 1),
        ("scratch", "file", true, 2),
        ("san", "iscsi", false, 1),
    ];
    assert_eq!(
        shown,
        expected.map(|(n, k, d, v)| (n.to_owned(), k.to_owned(), d, v)),
        "{pools}"
    );

    // One VM with a LUN of each iSCSI pool: both exported to its node, each under its
    // pool's name; the reconciliation passes of each pool leave the other's alone.
    let stamping = market.publish(Guest::DiskStamp, |_| {});
    let vm = run_with_volumes(&user, &stamping, &[&on_iscsi, &on_san]);
    stamp_of(&cloud, vm, &on_iscsi, "wrote");
    stamp_of(&cloud, vm, &on_san, "wrote");
    let san_target = format!("iqn.2026-12.eu.stratuslab.san:{on_san}");
    let iscsi_target = format!("iqn.2026-12.eu.stratuslab.pdisk:{on_iscsi}");
    // Longer than a pass (10 s): a pass that took the other pool's target for a stray
    // would have withdrawn it by now.
    std::thread::sleep(std::time::Duration::from_secs(12));
    let shown = tgtd.targets();
    assert!(
        target_section(&shown, &san_target).contains(&format!("pdisk-{on_san}")),
        "{shown}"
    );
    assert!(
        target_section(&shown, &iscsi_target).contains(&format!("pdisk-{on_iscsi}")),
        "{shown}"
    );
    assert_eq!(
        agent.call("GET", &format!("/vms/{vm}")).1["state"],
        "running"
    );
    user.ok("stratus-kill-instance", &[&vm.to_string()]);
    cloud.wait_state(vm, "Done");
    tgtd.wait_withdrawn(&on_san);
    tgtd.wait_withdrawn(&on_iscsi);

    for uuid in [live_uuid, &on_default, &on_file, &on_iscsi, &on_san] {
        let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{uuid}"), None);
        assert_eq!(status, 204, "{uuid}: {e}");
    }
    assert!(!san.join(format!("{on_san}.img")).exists());
    assert!(!scratch.join(format!("{on_default}.img")).exists());
}

/// The iSCSI pool makes snapshots and rebases as sparse copies of the source's file (tgtd
/// serves raw files only): a LIVE starts with its ORIGIN's data, a guest's writes to it
/// never reach the ORIGIN, a rebase keeps the LIVE's data. With `root_volume_pool` on it,
/// each VM boots such a copy of the image's ORIGIN, exported to its node alone while it
/// runs, then quarantined and collected.
#[test]
fn snapshots_rebases_and_vm_roots_on_an_iscsi_pool() {
    in_own_network_namespace();
    let tgtd = Tgtd::start();
    let market = Marketplace::start();
    let stamping = market.publish(Guest::DiskStamp, |_| {});
    let image_head = head_hex(&market.image_file(), 32);
    let agent = Agent::start(4, 4096, "");
    let database = Database::new(Backend::Sqlite);
    let cloud = Orchestrator::start_with(
        &market,
        &database,
        &format!(
            "root_volumes = true\nroot_volume_pool = \"iscsi\"\nquarantine_period_s = 2\n\
             allow_file_image_locations = true\n{}",
            tgtd.pool_settings()
        ),
    );
    cloud.add_node("node-1", &agent);
    cloud.add_user("alice", "alice-password");
    let user = User::new();
    user.config(&user_config(&cloud, &market, &user));
    let alice = ("alice", "alice-password");
    let lun_file = |uuid: &str| cloud.dir.path().join("volumes").join(format!("{uuid}.img"));
    let lun_head = |uuid: &str| head_hex(&lun_file(uuid), 32);
    let disks = || {
        let (status, all) = cloud.admin("GET", "/disks", None);
        assert_eq!(status, 200, "{all}");
        all.as_array().unwrap().clone()
    };

    // A VM's root: a copy of the image's ORIGIN, logged in to like any iSCSI volume.
    let vm = run_with_volumes(&user, &stamping, &[]);
    let all = disks();
    let of_type = |kind: &str| {
        all.iter()
            .find(|d| d["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind}: {all:?}"))["uuid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (origin, root) = (
        of_type("MACHINE_IMAGE_ORIGIN"),
        of_type("MACHINE_IMAGE_LIVE"),
    );
    let (_, on_node) = agent.call("GET", &format!("/vms/{vm}"));
    let root_source = &root_on_node(&on_node)["source"]["iscsi"];
    assert!(
        root_source["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("pdisk:{root}/1")),
        "{root_source}"
    );
    assert!(root_source["initiator"].is_string(), "{root_source}");
    assert_eq!(stamp_of(&cloud, vm, &root, "read"), image_head);
    let root_stamp = stamp_of(&cloud, vm, &root, "wrote");
    assert_eq!(lun_head(&root), root_stamp);
    assert_eq!(lun_head(&origin), image_head, "the ORIGIN is untouched");
    let root_target = format!("pdisk:{root}");
    assert!(tgtd.targets().contains(&root_target), "{}", tgtd.targets());
    assert!(!tgtd.targets().contains(&origin), "{}", tgtd.targets());
    user.ok("stratus-kill-instance", &[&vm.to_string()]);
    cloud.wait_state(vm, "Done");
    tgtd.wait_withdrawn(&root);
    let ended = std::time::Instant::now();
    while lun_file(&root).exists() {
        assert!(
            ended.elapsed() < std::time::Duration::from_secs(30),
            "the quarantined root is never collected: {}",
            cloud.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(lun_head(&origin), image_head);

    // A user's ORIGIN and its LIVE snapshot: the LIVE starts with the ORIGIN's data and
    // keeps its own; its rebase keeps the LIVE's.
    let out = user.ok("stratus-create-volume", &["-s", "1"]);
    let data = out.strip_prefix("DISK ").unwrap().trim_end().to_owned();
    let first = run_with_volume(&user, &stamping, &data);
    let origin_stamp = stamp_of(&cloud, first, &data, "wrote");
    user.ok("stratus-kill-instance", &[&first.to_string()]);
    cloud.wait_state(first, "Done");
    tgtd.wait_withdrawn(&data);
    let live = live_snapshot_of(&cloud, &data);
    assert_eq!(
        (&live["type"], &live["pool"], &live["base_uuid"]),
        (
            &Value::from("DATA_IMAGE_LIVE"),
            &Value::from("iscsi"),
            &Value::from(data.as_str())
        ),
        "{live}"
    );
    let live = live["uuid"].as_str().unwrap().to_owned();
    assert_eq!(lun_head(&live), origin_stamp);
    let second = run_with_volume(&user, &stamping, &live);
    assert_eq!(stamp_of(&cloud, second, &live, "read"), origin_stamp);
    let live_stamp = stamp_of(&cloud, second, &live, "wrote");
    assert_ne!(live_stamp, origin_stamp);
    assert_eq!(lun_head(&live), live_stamp);
    assert_eq!(lun_head(&data), origin_stamp, "the ORIGIN is untouched");
    user.ok("stratus-kill-instance", &[&second.to_string()]);
    cloud.wait_state(second, "Done");
    tgtd.wait_withdrawn(&live);
    let (status, rebased) = cloud.call_as(alice, "POST", &format!("/disks/{live}"), None);
    assert_eq!(status, 201, "{rebased}");
    assert_eq!(rebased["type"], "DATA_IMAGE_ORIGIN", "{rebased}");
    let rebased = rebased["uuid"].as_str().unwrap().to_owned();
    assert_eq!(lun_head(&rebased), live_stamp);
    // Copies are sparse: a 1 GiB volume holding a few stamped sectors allocates little.
    {
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(lun_file(&rebased)).unwrap().blocks();
        assert!(blocks < 1024, "{blocks} blocks");
    }
    for uuid in [&live, &rebased, &data] {
        let (status, e) = cloud.call_as(alice, "DELETE", &format!("/disks/{uuid}"), None);
        assert_eq!(status, 204, "{uuid}: {e}");
        assert!(!lun_file(uuid).exists());
    }
}

fn spare_target_iqn(uuid: &str) -> String {
    format!("iqn.2026-12.eu.stratuslab.pdisk:{uuid}")
}

/// One target's part of `tgtadm --op show --mode target`.
fn target_section(shown: &str, target: &str) -> String {
    shown
        .split("Target ")
        .find(|section| section.lines().next().is_some_and(|l| l.ends_with(target)))
        .unwrap_or_default()
        .to_owned()
}

/// An orchestrator serving HTTPS (`[tls]`) with a certificate of the site's own CA: the
/// commands trust it through `ca_file` (option, environment or file) and nothing else, and
/// the web console's cookies are then host-only and `Secure`.
#[test]
fn an_https_cloud_is_reached_through_the_sites_own_ca() {
    let files = tempfile::tempdir().unwrap();
    let site = pki::pki("Stratus site CA", &["localhost"]);
    let (ca, cert, key) = (
        files.path().join("site-ca.pem"),
        files.path().join("cloud.crt"),
        files.path().join("cloud.key"),
    );
    std::fs::write(&ca, &site.ca_pem).unwrap();
    std::fs::write(&cert, &site.chain_pem).unwrap();
    std::fs::write(&key, &site.key_pem).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let market = Marketplace::start();
    let cloud = Orchestrator::start(
        &market,
        &format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let endpoint = format!("https://localhost:{}", cloud.addr.port());
    let user = User::new();
    let config = format!(
        "[default]\nendpoint = {endpoint}\nusername = admin\npassword = {ADMIN_PASSWORD}\n"
    );
    user.config(&config);
    let describe = "stratus-describe-instance";
    let e = user.error(describe, &[], &[]);
    assert!(e.contains("certificate"), "{e}");
    let ca_arg = ca.to_str().unwrap();
    assert_eq!(user.run(describe, &["--ca-file", ca_arg]).code, 0);
    assert_eq!(
        user.run_with(describe, &[], &[("STRATUSLAB_CA_FILE", ca_arg)], "")
            .code,
        0
    );
    user.config(&format!("{config}ca_file = {ca_arg}\n"));
    assert_eq!(user.run(describe, &[]).code, 0);
    // Another CA's bundle does not do, and a file that is no bundle is said to be one.
    let other = files.path().join("other-ca.pem");
    std::fs::write(
        &other,
        pki::pki("Somebody else's CA", &["localhost"]).ca_pem,
    )
    .unwrap();
    let e = user.error(describe, &["--ca-file", other.to_str().unwrap()], &[]);
    assert!(e.contains("certificate"), "{e}");
    let e = user.error(describe, &["--ca-file", key.to_str().unwrap()], &[]);
    assert!(e.contains("no usable CA certificate"), "{e}");

    // The console over HTTPS: host-only, Secure cookies without console_secure_cookies.
    let client = reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(stratus_orchestrator::tls::client_config(Some(&ca)).unwrap())
        .build()
        .unwrap();
    let page = client.get(format!("{endpoint}/ui/login")).send().unwrap();
    assert_eq!(page.status(), 200);
    let set = page.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.starts_with("__Host-stratus_login=") && set.ends_with("; Secure"),
        "{set}"
    );
    assert_eq!(
        page.headers()["strict-transport-security"],
        "max-age=31536000"
    );
}
