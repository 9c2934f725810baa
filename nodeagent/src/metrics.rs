//! `GET /metrics`: Prometheus text exposition of the agent (VMs by state, VMM exits, API
//! latency) and of every running VM's devices (the VMMs' counters, read when scraped).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::vms::VmManager;

type Labels = Vec<(String, String)>;

fn request_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    requests: Family<Labels, Histogram, fn() -> Histogram>,
    /// VMM exits by the VMM's exit status ("signal" when it had none).
    exits: Mutex<BTreeMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::new_with_constructor(request_histogram),
            exits: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A request method as a metric label. Clients may send any token as a method, before
/// they are authenticated: labelled as sent, each new one added a series for good.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let labels = vec![
            ("method".to_owned(), method.to_owned()),
            ("route".to_owned(), route.to_owned()),
            ("status".to_owned(), status.to_string()),
        ];
        self.requests
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn vmm_exited(&self, code: Option<i32>) {
        let key = code.map_or("none".to_owned(), |c| c.to_string());
        *self
            .exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert(0) += 1;
    }

    pub async fn render(&self, vms: &VmManager) -> String {
        let mut registry = Registry::with_prefix("stratus_nodeagent");
        registry.register(
            "api_request_duration_seconds",
            "API request latency",
            self.requests.clone(),
        );

        let by_state = Family::<Labels, Gauge>::default();
        let host = vms.host_info();
        for (state, count) in &host.vms_by_state {
            by_state
                .get_or_create(&vec![("state".to_owned(), state.clone())])
                .set(*count as i64);
        }
        registry.register("vms", "VMs on this host by state", by_state);

        let exits = Family::<Labels, Counter>::default();
        for (code, count) in self.exits.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            exits
                .get_or_create(&vec![("code".to_owned(), code.clone())])
                .inc_by(*count);
        }
        registry.register(
            "vmm_exits",
            "VMM processes that ended, by exit status",
            exits,
        );

        let capacity = Family::<Labels, Gauge>::default();
        for (what, value) in [
            ("cpu_total", host.cpu_total),
            ("cpu_allocated", host.cpu_allocated),
            ("memory_total_mib", host.memory_total_mib),
            ("memory_allocated_mib", host.memory_allocated_mib),
        ] {
            capacity
                .get_or_create(&vec![("what".to_owned(), what.to_owned())])
                .set(value as i64);
        }
        registry.register(
            "capacity",
            "What the host offers and has handed out",
            capacity,
        );

        let disk_ops = Family::<Labels, Counter>::default();
        let disk_bytes = Family::<Labels, Counter>::default();
        let disk_errors = Family::<Labels, Counter>::default();
        let net_frames = Family::<Labels, Counter>::default();
        let net_bytes = Family::<Labels, Counter>::default();
        let net_dropped = Family::<Labels, Counter>::default();
        for info in vms.list().await {
            let Some(counters) = info.counters else {
                continue;
            };
            for (disk, c) in counters.disks {
                let labels = |op: &str| {
                    vec![
                        ("vm".to_owned(), info.id.clone()),
                        ("disk".to_owned(), disk.clone()),
                        ("op".to_owned(), op.to_owned()),
                    ]
                };
                for (op, ops, bytes) in [
                    ("read", c.read_ops, c.read_bytes),
                    ("write", c.write_ops, c.write_bytes),
                    ("flush", c.flush_ops, 0),
                    ("discard", c.discard_ops, c.discard_bytes),
                    ("write_zeroes", c.write_zeroes_ops, c.write_zeroes_bytes),
                ] {
                    disk_ops.get_or_create(&labels(op)).inc_by(ops);
                    disk_bytes.get_or_create(&labels(op)).inc_by(bytes);
                }
                disk_errors
                    .get_or_create(&vec![
                        ("vm".to_owned(), info.id.clone()),
                        ("disk".to_owned(), disk.clone()),
                    ])
                    .inc_by(c.errors);
            }
            for (nic, c) in counters.nets {
                let labels = |dir: &str| {
                    vec![
                        ("vm".to_owned(), info.id.clone()),
                        ("nic".to_owned(), nic.clone()),
                        ("direction".to_owned(), dir.to_owned()),
                    ]
                };
                net_frames.get_or_create(&labels("rx")).inc_by(c.rx_frames);
                net_frames.get_or_create(&labels("tx")).inc_by(c.tx_frames);
                net_bytes.get_or_create(&labels("rx")).inc_by(c.rx_bytes);
                net_bytes.get_or_create(&labels("tx")).inc_by(c.tx_bytes);
                net_dropped
                    .get_or_create(&labels("rx"))
                    .inc_by(c.rx_dropped);
                net_dropped
                    .get_or_create(&labels("tx"))
                    .inc_by(c.tx_dropped);
            }
        }
        registry.register("vm_disk_requests", "Disk requests completed", disk_ops);
        registry.register("vm_disk_bytes", "Disk bytes moved", disk_bytes);
        registry.register("vm_disk_errors", "Disk requests failed", disk_errors);
        registry.register("vm_nic_frames", "NIC frames", net_frames);
        registry.register("vm_nic_bytes", "NIC bytes", net_bytes);
        registry.register("vm_nic_dropped_frames", "NIC frames dropped", net_dropped);

        let mut text = String::new();
        if let Err(e) = encode(&mut text, &registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        text
    }
}
