//! Node agent benchmarks: create-to-running and delete latency of real VMs (the real
//! `stratus-nodeagent` running `stratus-vmm` processes with a tiny guest on this host's
//! `/dev/kvm`), the agent's own memory with 0 and 100 VMs, and how long an image already in
//! the cache takes to become a VM's copy-on-write root, for a small and a large image.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::measure::percentile;
use serde_json::json;
use stratus_vmm::devices::virtio::block::io::qcow2::create_overlay;
use stratus_vmm::devices::virtio::block::io::ImageFormat;
use stratus_vmm::test_guest::{guest_code, tiny_vmlinux, Guest};

pub struct Options {
    pub agent: PathBuf,
    pub vmm: PathBuf,
    pub vms: usize,
    pub concurrency: usize,
    pub big_gib: u64,
    pub dir: PathBuf,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub vms: usize,
    pub concurrency: usize,
    pub create_p50_ms: f64,
    pub create_p99_ms: f64,
    pub delete_p50_ms: f64,
    pub delete_p99_ms: f64,
    pub agent_rss_0_vms_kib: u64,
    pub agent_rss_100_vms_kib: u64,
    /// Cache hit → CoW root ready: (image size, p50 ms, p99 ms).
    pub cow_root: Vec<(String, f64, f64)>,
}

pub(crate) const TOKEN: &str = "bench-agent-token-0123456789";

pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

pub(crate) fn agent_call(
    client: &reqwest::blocking::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<()> {
    let mut request = client
        .request(method, format!("{base}{path}"))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        request = request.json(b);
    }
    let response = request.send()?;
    ensure!(
        response.status().is_success(),
        "{path}: {} {}",
        response.status(),
        response.text().unwrap_or_default()
    );
    Ok(())
}

/// Runs `count` jobs, `concurrency` at a time; returns each one's time in ms, sorted.
fn timed(
    count: usize,
    concurrency: usize,
    job: impl Fn(usize) -> Result<()> + Sync,
) -> Result<Vec<f64>> {
    let next = AtomicUsize::new(0);
    let mut times = std::thread::scope(|s| -> Result<Vec<f64>> {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                s.spawn(|| -> Result<Vec<f64>> {
                    let mut times = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(times);
                        }
                        let start = Instant::now();
                        job(i)?;
                        times.push(start.elapsed().as_secs_f64() * 1000.0);
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(
                w.join()
                    .map_err(|_| anyhow::anyhow!("a worker panicked"))??,
            );
        }
        Ok(all)
    })?;
    times.sort_by(f64::total_cmp);
    Ok(times)
}

fn lifecycle(opts: &Options) -> Result<(Vec<f64>, Vec<f64>, u64, u64)> {
    let dir = opts.dir.join("agent");
    let kernel = dir.join("vmlinux");
    let (agent, base) = start_agent(&opts.agent, &opts.vmm, &dir)?;
    std::fs::write(&kernel, tiny_vmlinux(&guest_code(Guest::Halt)))?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let rss_0 = rss_kib(agent.0.id())?;
    lifecycle_on(opts, &agent, &base, &client, &kernel, rss_0)
}

/// A node agent of its own in `dir` (room for any number of VMs), and its URL.
pub(crate) fn start_agent(agent: &Path, vmm: &Path, dir: &Path) -> Result<(Killed, String)> {
    std::fs::create_dir_all(dir)?;
    let token = dir.join("token");
    std::fs::write(&token, TOKEN)?;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\nstate_dir = \"{}\"\n\
             run_dir = \"{}\"\nvmm_binary = \"{}\"\nallow_file_locations = true\n\n[capacity]\ncpus = 1024\n\
             memory_mib = 1048576\nmemory_reserve_mib = 0\n",
            token.display(),
            dir.join("state").display(),
            dir.join("run").display(),
            vmm.display()
        ),
    )?;
    let agent = Killed(
        Command::new(agent)
            .arg("--config")
            .arg(&config)
            .env("STRATUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting stratus-nodeagent")?,
    );
    let start = Instant::now();
    while !crate::listening(port) {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the agent did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((agent, format!("http://127.0.0.1:{port}")))
}

fn lifecycle_on(
    opts: &Options,
    agent: &Killed,
    base: &str,
    client: &reqwest::blocking::Client,
    kernel: &Path,
    rss_0: u64,
) -> Result<(Vec<f64>, Vec<f64>, u64, u64)> {
    let base = base.to_owned();
    let spec = json!({"vcpus": 1, "memory_mib": 64, "boot": {"kernel": kernel}});
    // The first hundred, then the agent's memory, then the rest.
    let first = opts.vms.min(100);
    let mut creates = timed(first, opts.concurrency, |i| {
        agent_call(
            client,
            &base,
            reqwest::Method::PUT,
            &format!("/vms/b{i}"),
            Some(&spec),
        )
    })?;
    let rss_100 = rss_kib(agent.0.id())?;
    creates.extend(timed(opts.vms - first, opts.concurrency, |i| {
        agent_call(
            client,
            &base,
            reqwest::Method::PUT,
            &format!("/vms/b{}", i + first),
            Some(&spec),
        )
    })?);
    creates.sort_by(f64::total_cmp);
    let deletes = timed(opts.vms, opts.concurrency, |i| {
        agent_call(
            client,
            &base,
            reqwest::Method::POST,
            &format!("/vms/b{i}/kill"),
            None,
        )?;
        agent_call(
            client,
            &base,
            reqwest::Method::DELETE,
            &format!("/vms/b{i}"),
            None,
        )
    })?;
    Ok((creates, deletes, rss_0, rss_100))
}

/// A bootable image of `size` (a sparse ext4 filesystem with the tiny guest as its kernel)
/// and its entry.
fn bootable_image(dir: &Path, name: &str, size: &str) -> Result<stratus_images::Metadata> {
    let tree = dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(tree.join("boot"))?;
    std::fs::write(
        tree.join("boot/vmlinuz-6.1.0-99-amd64"),
        tiny_vmlinux(&guest_code(Guest::Halt)),
    )?;
    let image = dir.join(format!("{name}.img"));
    let status = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg(size)
        .stdout(Stdio::null())
        .status()
        .context("running mke2fs")?;
    ensure!(status.success(), "mke2fs failed");
    let endorser = stratus_images::Endorser {
        email: "bench@stratus.test".into(),
        subject: "CN=Bench".into(),
        issuer: "CN=Bench CA".into(),
    };
    let mut entry = stratus_images::ops::build(&image, endorser, "machine")?;
    entry.locations = vec![format!("file://{}", image.display())];
    Ok(entry)
}

/// An image already in the cache → the VM's root overlay, as the agent does it for every
/// VM after the first: the cache's check of its copy and boot files, then the overlay.
fn cow_root(opts: &Options, name: &str, size: &str) -> Result<(String, f64, f64)> {
    let dir = opts.dir.join(format!("cow-{name}"));
    std::fs::create_dir_all(&dir)?;
    let entry = bootable_image(&dir, name, size)?;
    let cache = Arc::new(
        stratus_images::cache::ImageCache::new(
            dir.join("cache"),
            stratus_images::policy::Policy::default(),
        )?
        .allowing_file_locations(true),
    );
    // The first VM fills the cache (download, verification, kernel extraction).
    cache.prepare_boot(&entry, &mut |_| {})?;
    let mut times = Vec::new();
    for i in 0..20 {
        let start = Instant::now();
        let (base, _info) = cache.prepare_boot(&entry, &mut |_| {})?;
        create_overlay(
            &dir.join(format!("root-{i}.qcow2")),
            &base,
            ImageFormat::Raw,
        )?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok((
        size.to_owned(),
        percentile(&times, 50.0),
        percentile(&times, 99.0),
    ))
}

pub fn bench(opts: &Options) -> Result<Report> {
    let (creates, deletes, rss_0, rss_100) = lifecycle(opts)?;
    let big = format!("{}G", opts.big_gib);
    let cow = vec![
        cow_root(opts, "small", "10M")?,
        cow_root(opts, "big", &big)?,
    ];
    Ok(Report {
        vms: opts.vms,
        concurrency: opts.concurrency,
        create_p50_ms: percentile(&creates, 50.0),
        create_p99_ms: percentile(&creates, 99.0),
        delete_p50_ms: percentile(&deletes, 50.0),
        delete_p99_ms: percentile(&deletes, 99.0),
        agent_rss_0_vms_kib: rss_0,
        agent_rss_100_vms_kib: rss_100,
        cow_root: cow,
    })
}
