//! Hot-plug benchmark: how long a volume takes from the node agent's
//! `PUT /vms/{id}/disks/{disk}` to the VMM having it on the guest's bus (the agent's 201)
//! and to the guest having found it, set it up and read its first sector (the disk-stamp
//! guest's console line), on the real `stratus-nodeagent` and `stratus-vmm` with a tiny
//! guest on this host's `/dev/kvm`: a raw file, and an iSCSI LUN of a throw-away tgtd on
//! loopback (the VMM logs in itself) when Debian's tgt is installed. Each disk is unplugged
//! again (the guest ejects it) before the next.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use stratus_vmm::test_guest::{guest_code, tiny_vmlinux, Guest};

use crate::agent::{agent_call, start_agent};
use crate::measure::percentile;
use crate::tgtd::Tgtd;

pub struct Options {
    pub agent: PathBuf,
    pub vmm: PathBuf,
    /// Timed hot-plugs per kind of disk.
    pub runs: usize,
    pub dir: PathBuf,
}

#[derive(Debug, serde::Serialize)]
pub struct Row {
    pub source: String,
    pub on_bus_p50_ms: f64,
    pub on_bus_max_ms: f64,
    pub in_guest_p50_ms: f64,
    pub in_guest_max_ms: f64,
}

const VM: &str = "hotplug";

fn console(client: &reqwest::blocking::Client, base: &str) -> Result<String> {
    let response = client
        .get(format!("{base}/vms/{VM}/console?bytes=1048576"))
        .bearer_auth(crate::agent::TOKEN)
        .send()?;
    ensure!(
        response.status().is_success(),
        "console: {}",
        response.status()
    );
    Ok(String::from_utf8_lossy(&response.bytes()?).into_owned())
}

/// Waits for a console line starting with `start`.
fn wait_line(client: &reqwest::blocking::Client, base: &str, start: &str) -> Result<()> {
    let asked = Instant::now();
    loop {
        let text = console(client, base)?;
        match text.lines().find_map(|l| l.strip_prefix(start)) {
            Some("failed") => bail!("the guest could not use the disk: {text}"),
            Some(_) => return Ok(()),
            None if asked.elapsed() > Duration::from_secs(60) => {
                bail!("the guest did not print '{start}': {text}")
            }
            None => {}
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn bench(opts: &Options) -> Result<Vec<Row>> {
    ensure!(opts.runs > 0, "--runs must be at least 1");
    let (_agent, base) = start_agent(&opts.agent, &opts.vmm, &opts.dir.join("agent"))?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let kernel = opts.dir.join("disk-stamp.vmlinux");
    std::fs::write(&kernel, tiny_vmlinux(&guest_code(Guest::DiskStamp)))?;
    let spec = json!({"vcpus": 1, "memory_mib": 64, "boot": {"kernel": kernel}});
    let call =
        |method, path: &str, body: Option<&Value>| agent_call(&client, &base, method, path, body);
    call(reqwest::Method::PUT, &format!("/vms/{VM}"), Some(&spec))?;
    wait_line(&client, &base, "stamped")?;

    let tgtd = Tgtd::start_if_installed(&opts.dir.join("tgtd"))?;
    let mut rows = Vec::new();
    for kind in ["file", "iscsi"] {
        if kind == "iscsi" && tgtd.is_none() {
            continue;
        }
        let (mut on_bus, mut in_guest) = (Vec::new(), Vec::new());
        for run in 0..opts.runs {
            let file = opts.dir.join(format!("{kind}-{run}.img"));
            std::fs::File::create(&file)?.set_len(64 << 20)?;
            let source = match &tgtd {
                Some(tgtd) if kind == "iscsi" => {
                    let url = tgtd.add(&format!("iqn.2026-12.bench.hotplug:{run}"), &file)?;
                    json!({"iscsi": {"url": url}})
                }
                _ => json!({"file": {"path": file}}),
            };
            let serial = format!("{kind}-{run}");
            let disk = json!({"source": source, "serial": serial});
            let start = Instant::now();
            call(
                reqwest::Method::PUT,
                &format!("/vms/{VM}/disks/d{run}"),
                Some(&disk),
            )
            .with_context(|| format!("hot-plugging {serial}"))?;
            on_bus.push(start.elapsed().as_secs_f64() * 1000.0);
            wait_line(&client, &base, &format!("disk {serial} read "))?;
            in_guest.push(start.elapsed().as_secs_f64() * 1000.0);
            call(
                reqwest::Method::DELETE,
                &format!("/vms/{VM}/disks/d{run}"),
                None,
            )?;
        }
        on_bus.sort_by(f64::total_cmp);
        in_guest.sort_by(f64::total_cmp);
        rows.push(Row {
            source: kind.to_owned(),
            on_bus_p50_ms: percentile(&on_bus, 50.0),
            on_bus_max_ms: on_bus[on_bus.len() - 1],
            in_guest_p50_ms: percentile(&in_guest, 50.0),
            in_guest_max_ms: in_guest[in_guest.len() - 1],
        });
    }
    call(reqwest::Method::POST, &format!("/vms/{VM}/kill"), None)?;
    call(reqwest::Method::DELETE, &format!("/vms/{VM}"), None)?;
    Ok(rows)
}
