//! A whole cloud on this host for the tests: a real Marketplace (`stratus-marketplace`)
//! holding signed entries for bootable images whose kernel is a tiny test guest, real node
//! agents (`stratus-nodeagent`, each with its own state directory and port) running real
//! `stratus-vmm` processes on `/dev/kvm`, and the real `stratus-orchestrator` binary.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use stratus_vmm::test_guest::{guest_code, tiny_vmlinux, Guest};

pub mod postgres;

pub const DEADLINE: Duration = Duration::from_secs(90);
pub const AGENT_TOKEN: &str = "agent-token-0123456789";
/// What uploads to the test Marketplace carry.
pub const MARKETPLACE_TOKEN: &str = "marketplace-token-0123456789";
pub const ADMIN_PASSWORD: &str = "admin-password-42";

/// A binary of this workspace, built once per test process if missing or stale. Every
/// binary comes from one `cargo build --workspace --bins --examples`, the feature
/// resolution of `cargo test --workspace`: after the workspace's test build it is a no-op,
/// where `-p <package>` would compile the package and its dependencies again with other
/// features (and the nested scripts would then compile them a third time).
pub fn workspace_binary(bin: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Only the environment a shell would give it: the variables cargo sets for this
        // test would make build scripts think their inputs changed and rebuild half the
        // workspace, over and over.
        let mut build = Command::new(cargo);
        build.env_clear();
        for keep in [
            "PATH",
            "HOME",
            "CARGO_HOME",
            "RUSTUP_HOME",
            "RUSTUP_TOOLCHAIN",
            "CARGO_TARGET_DIR",
            // Part of what cargo compares: without them every unit would be compiled again.
            "CARGO_INCREMENTAL",
            "RUSTFLAGS",
        ] {
            if let Some(v) = std::env::var_os(keep) {
                build.env(keep, v);
            }
        }
        let status = build
            .args(["build", "--quiet", "--workspace", "--bins", "--examples"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cannot build the workspace's binaries");
    });
    dir.join(bin)
}

/// Runs `command` with `stdin` as its input, and waits for its output.
pub fn output_with_stdin(command: &mut Command, stdin: &str) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether something listens at `addr`. A connect to a port nobody listens on can connect
/// the socket to itself (TCP simultaneous open, when the kernel picks that very port as
/// the source port): that is not a listener.
fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
}

fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str) {
    let start = Instant::now();
    while !listening(addr) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited: {status}");
        }
        assert!(start.elapsed() < DEADLINE, "{what} did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP/1.1 exchange; returns the status and the body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut headers = vec![("Content-Type", content_type)];
    if let Some(auth) = auth {
        headers.push(("Authorization", auth));
    }
    let answer = http_with(addr, method, path, &headers, body);
    (answer.status, answer.body)
}

/// An HTTP answer with its headers (names lower-case).
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 exchange with the given request headers.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (e.g. 401, 413) before reading all of a large body.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer to {method} {path}"));
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = response[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 2 + size + 2..];
    }
}

pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A node agent offering `cpus` vCPUs and `memory_mib`.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    config: PathBuf,
    child: Option<Child>,
    cgroup_parent: String,
}

impl Agent {
    pub fn start(cpus: u32, memory_mib: u64, extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{AGENT_TOKEN}\n")).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("agent.toml");
        // The agent starts its VMMs through the jailer beside the VMM.
        workspace_binary("stratus-jailer");
        // Tests run agents in parallel with the same VM ids: cgroups of their own.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let cgroup_parent = format!(
            "stratus-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ntoken_file = \"{}\"\nstate_dir = \"{}\"\nrun_dir = \"{}\"\n\
                 vmm_binary = \"{}\"\nshutdown_timeout_s = 30\nallow_file_locations = true\n{extra}\n[capacity]\ncpus = {cpus}\n\
                 memory_mib = {memory_mib}\nmemory_reserve_mib = 0\n\n[jailer]\ncgroup_parent = \"{cgroup_parent}\"\n",
                token.display(),
                dir.path().join("state").display(),
                dir.path().join("run").display(),
                workspace_binary("stratus-vmm").display(),
            ),
        )
        .unwrap();
        let mut agent = Agent {
            dir,
            addr,
            config,
            child: None,
            cgroup_parent,
        };
        agent.launch();
        agent
    }

    pub fn launch(&mut self) {
        let mut child = Command::new(workspace_binary("stratus-nodeagent"))
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run stratus-nodeagent");
        wait_listening(self.addr, &mut child, "the node agent");
        self.child = Some(child);
    }

    /// kill -9, as a crash would (its VMs run on).
    pub fn crash(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn call(&self, method: &str, path: &str) -> (u16, Value) {
        let (status, body) = http(
            self.addr,
            method,
            path,
            Some(&format!("Bearer {AGENT_TOKEN}")),
            "application/json",
            b"",
        );
        (status, parse(&body))
    }

    pub fn call_with(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let (status, body) = http(
            self.addr,
            method,
            path,
            Some(&format!("Bearer {AGENT_TOKEN}")),
            "application/json",
            body.to_string().as_bytes(),
        );
        (status, parse(&body))
    }

    /// The ids of the VMs this agent has.
    pub fn vm_ids(&self) -> Vec<String> {
        let (_, list) = self.call("GET", "/vms");
        list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The VMMs outlive their agent on purpose; the test's end is theirs too.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.dir.path().display().to_string()])
            .status();
        // Killed jailers leave their VMs' cgroups behind.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for root in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/cpu",
        ] {
            let parent = std::path::Path::new(root).join(&self.cgroup_parent);
            while parent.exists() {
                for vm in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                    if vm.path().is_dir() {
                        let _ = std::fs::remove_dir(vm.path());
                    }
                }
                if std::fs::remove_dir(&parent).is_ok() || std::time::Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

pub fn parse(body: &[u8]) -> Value {
    if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    }
}

/// The Marketplace with signed entries for bootable test images.
pub struct Marketplace {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Child,
}

impl Marketplace {
    pub fn start() -> Marketplace {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        stratus_images::test_pki::TestPki::make(
            &pki,
            "StratusLab",
            "Jane Endorser",
            "jane@stratus.test",
            30,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let token = dir.path().join("upload-token");
        std::fs::write(&token, format!("{MARKETPLACE_TOKEN}\n")).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = Command::new(workspace_binary("stratus-marketplace"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--db")
            .arg(format!(
                "sqlite://{}",
                dir.path().join("market.db").display()
            ))
            .arg("--trusted-cas")
            .arg(pki.join("ca.pem"))
            .arg("--upload-token-file")
            .arg(&token)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run stratus-marketplace");
        wait_listening(addr, &mut child, "the Marketplace");
        Marketplace { dir, addr, child }
    }

    /// The disk image file of the (one) image published so far.
    pub fn image_file(&self) -> PathBuf {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "img"))
            .unwrap()
    }

    /// The file holding the upload token.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("upload-token")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes a bootable image whose kernel is `guest` (a bare ext4 filesystem with
    /// `/boot/vmlinuz-…`) and returns its Marketplace identifier. `tweak` may change the
    /// entry before it is signed.
    pub fn publish(
        &self,
        guest: Guest,
        tweak: impl FnOnce(&mut stratus_images::Metadata),
    ) -> String {
        let name = format!("{guest:?}-{}", free_port());
        let tree = self.dir.path().join(format!("{name}-tree"));
        std::fs::create_dir_all(tree.join("boot")).unwrap();
        std::fs::write(
            tree.join("boot/vmlinuz-6.1.0-99-amd64"),
            tiny_vmlinux(&guest_code(guest)),
        )
        .unwrap();
        // A different file each time, so each entry has its own identifier.
        std::fs::write(tree.join("stamp"), &name).unwrap();
        let image = self.dir.path().join(format!("{name}.img"));
        run(
            "mke2fs",
            &[
                "-q",
                "-t",
                "ext4",
                "-d",
                tree.to_str().unwrap(),
                image.to_str().unwrap(),
                "16M",
            ],
            self.dir.path(),
        );
        let pki = self.dir.path().join("pki");
        let signer = stratus_images::dsig::Signer::from_pem(
            &std::fs::read_to_string(pki.join("endorser.key")).unwrap(),
            &std::fs::read_to_string(pki.join("endorser.pem")).unwrap(),
        )
        .unwrap();
        let endorser = stratus_images::ops::endorser_of(&signer).unwrap();
        let mut entry = stratus_images::ops::build(&image, endorser, "machine").unwrap();
        entry.locations = vec![format!("file://{}", image.display())];
        tweak(&mut entry);
        let xml = stratus_images::ops::sign(&entry, &signer, &Default::default()).unwrap();
        let (status, body) = http(
            self.addr,
            "POST",
            "/metadata",
            Some(&format!("Bearer {MARKETPLACE_TOKEN}")),
            "application/rdf+xml",
            xml.as_bytes(),
        );
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
        entry.identifier.to_string()
    }
}

impl Drop for Marketplace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The orchestrator, on SQLite in its own directory (or on `database`).
pub struct Orchestrator {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub config: PathBuf,
    child: Option<Child>,
}

/// Which database a test's cloud keeps its truth in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A cloud's database: a SQLite file in the orchestrator's directory, or a throw-away
/// PostgreSQL server that replicas share.
pub struct Database {
    pub url: Option<String>,
    _server: Option<postgres::Postgres>,
}

impl Database {
    pub fn new(backend: Backend) -> Database {
        match backend {
            Backend::Sqlite => Database {
                url: None,
                _server: None,
            },
            Backend::Postgres => {
                let server = postgres::Postgres::start();
                Database {
                    url: Some(server.url()),
                    _server: Some(server),
                }
            }
        }
    }
}

impl Orchestrator {
    pub fn start(marketplace: &Marketplace, extra: &str) -> Orchestrator {
        Self::start_with(marketplace, &Database::new(Backend::Sqlite), extra)
    }

    /// An orchestrator (a replica, when several share a PostgreSQL database).
    pub fn start_with(marketplace: &Marketplace, database: &Database, extra: &str) -> Orchestrator {
        let dir = tempfile::tempdir().unwrap();
        let url = database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("cloud.db").display()));
        Self::start_on(marketplace, &url, extra, dir)
    }

    pub fn start_on(
        marketplace: &Marketplace,
        database: &str,
        extra: &str,
        dir: tempfile::TempDir,
    ) -> Orchestrator {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let password = dir.path().join("admin-password");
        std::fs::write(&password, ADMIN_PASSWORD).unwrap();
        let config = dir.path().join("orchestrator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ndatabase = \"{database}\"\nmarketplace_endpoint = \"{}\"\n\
                 admin_password_file = \"{}\"\npoll_interval_s = 1\nnode_timeout_s = 3\n\
                 shutdown_timeout_s = 10\nvolume_dir = \"{}\"\n{extra}",
                marketplace.url(),
                password.display(),
                dir.path().join("volumes").display()
            ),
        )
        .unwrap();
        let mut o = Orchestrator {
            dir,
            addr,
            config,
            child: None,
        };
        o.launch();
        o
    }

    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("orchestrator.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_stratus-orchestrator"))
            .arg("--config")
            .arg(&self.config)
            .env("STRATUS_LOG", "stratus_orchestrator=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run stratus-orchestrator");
        wait_listening(self.addr, &mut child, "the orchestrator");
        self.child = Some(child);
    }

    /// kill -9, as a crash would.
    pub fn crash(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The admin's command line on the same database.
    pub fn admin_command(&self, args: &[&str], stdin: &str) -> (bool, String) {
        let out = output_with_stdin(
            Command::new(env!("CARGO_BIN_EXE_stratus-orchestrator"))
                .arg("--config")
                .arg(&self.config)
                .args(args),
            stdin,
        );
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The rest of the first line of VM `vm`'s console that starts with `start`, once
    /// there is one (as `user` reads the console).
    pub fn wait_console_line(&self, user: (&str, &str), vm: i64, start: &str) -> String {
        let asked = std::time::Instant::now();
        loop {
            let (_, console) =
                self.call_as(user, "GET", &format!("/vms/{vm}/console?bytes=65536"), None);
            let console = console.as_str().unwrap_or_default().to_owned();
            // Whole lines only: the guest may be half-way through printing the last one.
            let whole_line = console
                .split_inclusive('\n')
                .filter_map(|l| l.strip_suffix('\n'))
                .map(|l| l.strip_suffix('\r').unwrap_or(l))
                .find(|l| l.starts_with(start));
            if let Some(line) = whole_line {
                return line[start.len()..].to_owned();
            }
            assert!(
                asked.elapsed() < DEADLINE,
                "VM {vm} printed no '{start}': {console}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn call_as(
        &self,
        user: (&str, &str),
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, body) = http(
            self.addr,
            method,
            path,
            Some(&basic(user.0, user.1)),
            "application/json",
            body.as_bytes(),
        );
        (status, parse(&body))
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.call_as(("admin", ADMIN_PASSWORD), method, path, body)
    }

    pub fn add_node(&self, name: &str, agent: &Agent) {
        let (status, body) = self.admin(
            "POST",
            "/nodes",
            Some(&json!({"name": name, "url": agent.url(), "token": AGENT_TOKEN})),
        );
        assert_eq!(status, 201, "{body}");
    }

    /// Adds a user with `password` and returns their credentials.
    pub fn add_user(
        &self,
        name: &'static str,
        password: &'static str,
    ) -> (&'static str, &'static str) {
        let (status, body) = self.admin(
            "POST",
            "/users",
            Some(&json!({"name": name, "password": password})),
        );
        assert_eq!(status, 201, "{body}");
        (name, password)
    }

    /// Polls the VM until `done(vm)`; panics with the VM after the deadline.
    pub fn wait_vm(&self, id: i64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let (status, vm) = self.admin("GET", &format!("/vms/{id}"), None);
            assert_eq!(status, 200, "{vm}");
            if done(&vm) {
                return vm;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "VM {id} never became {what}: {vm}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_state(&self, id: i64, state: &str) -> Value {
        self.wait_vm(id, state, |vm| vm["state"] == state)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("orchestrator.log")).unwrap_or_default()
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn error(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

/// The root disk of a VM's spec on its node.
pub fn root_on_node(on_node: &Value) -> Value {
    on_node["spec"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "root")
        .unwrap_or_else(|| panic!("no root disk on the node: {on_node}"))
        .clone()
}

/// The first `n` bytes of an RBD image (`POOL/IMAGE`) as `rbd export` reads them, in hex.
pub fn rbd_head_hex(
    cluster: &stratus_vmm::test_ceph::CephCluster,
    image: &str,
    n: usize,
) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "rbd -c '{}' export --no-progress {image} - 2>/dev/null | head -c {n} | od -An -tx1 -v",
            cluster.conf().display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect()
}
