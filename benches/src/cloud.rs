//! Control-plane benchmark: `POST /vms` (run-instance) latency and the placement rate of
//! stratus-orchestrator under many concurrent requests against many node agents, on SQLite
//! or PostgreSQL. The node agents run with `hypervisor = "none"` (VMs are recorded and
//! reported, never started), so the benchmark measures the orchestrator, its database and
//! the agents' API, not guests booting. Everything else is real: the Marketplace lookup of
//! every request, quotas, leases, jobs, placement under the node's row lock, the agents'
//! admission.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::measure::percentile;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Database {
    Sqlite,
    Postgres,
}

pub struct Options {
    pub orchestrator: PathBuf,
    pub agent: PathBuf,
    pub marketplace: PathBuf,
    pub agents: usize,
    pub requests: usize,
    pub database: Database,
    pub dir: PathBuf,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub database: String,
    pub agents: usize,
    pub requests: usize,
    pub accepted: usize,
    pub refused: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// All accepted VMs Running, from the first request.
    pub all_running_s: f64,
    pub placements_per_s: f64,
}

/// Processes this benchmark started, killed when it ends.
#[derive(Default)]
pub(crate) struct Children(pub(crate) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn wait_listening(port: u16, what: &str) -> Result<()> {
    let start = Instant::now();
    while !crate::listening(port) {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "{what} did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn run(program: &str, args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A throw-away PostgreSQL server (as the `postgres` user when run as root).
struct Postgres {
    data: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    fn command(bin: &Path, program: &str) -> Command {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(program));
            c
        } else {
            Command::new(bin.join(program))
        }
    }

    fn start(dir: &Path) -> Result<Postgres> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed (Debian package postgresql)")?
            .filter_map(|e| {
                let e = e.ok()?;
                Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin")))
            })
            .collect();
        versions.sort();
        let bin = versions.pop().context("no PostgreSQL version installed")?.1;
        let home = dir.join("postgres");
        std::fs::create_dir_all(&home)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            run(
                "chown",
                &["postgres:postgres", home.to_str().unwrap_or_default()],
                dir,
            )?;
        }
        let data = home.join("data");
        let port = free_port()?;
        let status = Self::command(&bin, "initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "stratus", "--auth=trust", "-E", "UTF8"])
            .stdout(Stdio::null())
            .status()?;
        ensure!(status.success(), "initdb failed");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=200",
            home.display()
        );
        let status = Self::command(&bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &options, "-l"])
            .arg(home.join("server.log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .status()?;
        ensure!(status.success(), "pg_ctl start failed");
        let pg = Postgres { data, bin, port };
        let status = Command::new(pg.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "stratus",
                "cloud",
            ])
            .status()?;
        ensure!(status.success(), "createdb failed");
        Ok(pg)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Self::command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

const TOKEN: &str = "bench-agent-token-0123456789";
const ADMIN_PASSWORD: &str = "bench-admin-password";

fn start_agents(opts: &Options, children: &mut Children) -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    for i in 0..opts.agents {
        let dir = opts.dir.join(format!("agent-{i}"));
        std::fs::create_dir_all(&dir)?;
        let token = dir.join("token");
        std::fs::write(&token, TOKEN)?;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
        let port = free_port()?;
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\nstate_dir = \"{}\"\n\
                 run_dir = \"{}\"\nhypervisor = \"none\"\n\n[capacity]\ncpus = 64\n\
                 memory_mib = 65536\nmemory_reserve_mib = 0\n",
                token.display(),
                dir.join("state").display(),
                dir.join("run").display()
            ),
        )?;
        children.0.push(
            Command::new(&opts.agent)
                .arg("--config")
                .arg(&config)
                .arg("--allow-no-vm-hypervisor")
                .env("STRATUS_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting stratus-nodeagent")?,
        );
        ports.push(port);
    }
    for port in &ports {
        wait_listening(*port, "a node agent")?;
    }
    Ok(ports)
}

/// A Marketplace with one signed entry (the image itself is never fetched: the agents
/// start no VMs). Returns the image's identifier.
fn start_marketplace(opts: &Options, children: &mut Children) -> Result<(u16, String)> {
    // A CA the Marketplace trusts and the endorser certificate it issued.
    let pki = opts.dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    stratus_images::test_pki::TestPki::make(
        &pki,
        "StratusLab",
        "Bench Endorser",
        "bench@stratus.test",
        30,
    )?;
    let token = "bench-upload-token";
    let token_file = pki.join("upload-token");
    std::fs::write(&token_file, token)?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let port = free_port()?;
    children.0.push(
        Command::new(&opts.marketplace)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db")
            .arg(format!("sqlite://{}", opts.dir.join("market.db").display()))
            .arg("--trusted-cas")
            .arg(pki.join("ca.pem"))
            .arg("--upload-token-file")
            .arg(&token_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting stratus-marketplace")?,
    );
    wait_listening(port, "the Marketplace")?;
    let image = opts.dir.join("image.img");
    std::fs::write(&image, vec![0x5au8; 1 << 20])?;
    let signer = stratus_images::dsig::Signer::from_pem(
        &std::fs::read_to_string(pki.join("endorser.key"))?,
        &std::fs::read_to_string(pki.join("endorser.pem"))?,
    )?;
    let mut entry = stratus_images::ops::build(
        &image,
        stratus_images::ops::endorser_of(&signer)?,
        "machine",
    )?;
    entry.locations = vec![format!("file://{}", image.display())];
    let xml = stratus_images::ops::sign(&entry, &signer, &Default::default())?;
    let response = reqwest::blocking::Client::new()
        .post(format!("http://127.0.0.1:{port}/metadata"))
        .bearer_auth(token)
        .header("content-type", "application/rdf+xml")
        .body(xml)
        .send()?;
    ensure!(
        response.status().is_success(),
        "the Marketplace refused the entry: {}",
        response.text().unwrap_or_default()
    );
    Ok((port, entry.identifier.to_string()))
}

/// A stratus-orchestrator of the benchmark's, listening on a free port of 127.0.0.1 with
/// the benchmark's admin password; `settings` is the rest of its configuration. Returns
/// its base URL once it listens.
pub(crate) fn start_orchestrator(
    binary: &Path,
    dir: &Path,
    settings: &str,
    children: &mut Children,
) -> Result<String> {
    let port = free_port()?;
    let password = dir.join("admin-password");
    std::fs::write(&password, ADMIN_PASSWORD)?;
    let config = dir.join("orchestrator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_password_file = \"{}\"\n{settings}",
            password.display()
        ),
    )?;
    children.0.push(
        Command::new(binary)
            .arg("--config")
            .arg(&config)
            .env("STRATUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("orchestrator.log"))?)
            .spawn()
            .context("starting stratus-orchestrator")?,
    );
    wait_listening(port, "the orchestrator")?;
    Ok(format!("http://127.0.0.1:{port}"))
}

/// One request as the admin: the JSON answer, or the status and the answer as the error.
pub(crate) fn admin_call(
    client: &reqwest::blocking::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut request = client
        .request(method, format!("{base}{path}"))
        .basic_auth("admin", Some(ADMIN_PASSWORD));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send()?;
    let status = response.status();
    let value: Value = response.json().unwrap_or(Value::Null);
    ensure!(status.is_success(), "{path}: {status} {value}");
    Ok(value)
}

pub fn bench(opts: &Options) -> Result<Report> {
    std::fs::create_dir_all(&opts.dir)?;
    let mut children = Children::default();
    let agent_ports = start_agents(opts, &mut children)?;
    let (market_port, image) = start_marketplace(opts, &mut children)?;
    let postgres = match opts.database {
        Database::Postgres => Some(Postgres::start(&opts.dir)?),
        Database::Sqlite => None,
    };
    let database = match &postgres {
        Some(pg) => format!("postgres://stratus@127.0.0.1:{}/cloud", pg.port),
        None => format!("sqlite://{}", opts.dir.join("cloud.db").display()),
    };
    let base = start_orchestrator(
        &opts.orchestrator,
        &opts.dir,
        &format!(
            "database = \"{database}\"\n\
             marketplace_endpoint = \"http://127.0.0.1:{market_port}\"\n\
             poll_interval_s = 10\nnode_timeout_s = 120\n\n\
             [quotas]\ncpu = 0\nmemory_mib = 0\nvms = 0\n"
        ),
        &mut children,
    )?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(opts.requests)
        .build()?;
    let admin = |method, path: &str, body| admin_call(&client, &base, method, path, body);
    for (i, agent) in agent_ports.iter().enumerate() {
        admin(
            reqwest::Method::POST,
            "/nodes",
            Some(
                json!({"name": format!("node-{i}"), "url": format!("http://127.0.0.1:{agent}"), "token": TOKEN}),
            ),
        )?;
    }
    admin(
        reqwest::Method::POST,
        "/users",
        Some(json!({"name": "bench", "password": "bench-password"})),
    )?;

    // Every request at once, from its own thread.
    let barrier = Arc::new(Barrier::new(opts.requests));
    let start = Instant::now();
    let threads: Vec<_> = (0..opts.requests)
        .map(|_| {
            let barrier = barrier.clone();
            let client = client.clone();
            let url = format!("{base}/vms");
            let image = image.clone();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    let sent = Instant::now();
                    let status = client
                        .post(url)
                        .basic_auth("bench", Some("bench-password"))
                        .json(&json!({"image": image, "instance_type": "t1.micro"}))
                        .send()
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    (status, sent.elapsed().as_secs_f64() * 1000.0)
                })
        })
        .collect::<std::io::Result<_>>()?;
    let mut latencies = Vec::new();
    let mut accepted = 0;
    for t in threads {
        let (status, ms) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a request thread panicked"))?;
        latencies.push(ms);
        if status == 201 {
            accepted += 1;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let all_running = loop {
        let list = admin(reqwest::Method::GET, "/vms?limit=1000", None)?;
        let vms = list["vms"].as_array().cloned().unwrap_or_default();
        let running = vms.iter().filter(|v| v["state"] == "Running").count();
        let failed = vms.iter().filter(|v| v["state"] == "Failed").count();
        if failed > 0 {
            bail!(
                "{failed} VMs failed: {}",
                vms.iter()
                    .find(|v| v["state"] == "Failed")
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            );
        }
        if running == accepted {
            break start.elapsed();
        }
        ensure!(
            start.elapsed() < Duration::from_secs(1800),
            "only {running} of {accepted} VMs running after 30 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(children);
    drop(postgres);
    Ok(Report {
        database: format!("{:?}", opts.database).to_lowercase(),
        agents: opts.agents,
        requests: opts.requests,
        accepted,
        refused: opts.requests - accepted,
        latency_p50_ms: percentile(&latencies, 50.0),
        latency_p99_ms: percentile(&latencies, 99.0),
        latency_max_ms: latencies.last().copied().unwrap_or(0.0),
        all_running_s: all_running.as_secs_f64(),
        placements_per_s: accepted as f64 / all_running.as_secs_f64(),
    })
}
