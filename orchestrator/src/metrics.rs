//! `GET /metrics`: Prometheus text exposition of one replica (API latency, placements,
//! job latency by action and outcome, node polls) and of the cloud as the database holds
//! it (VMs by state, nodes by health), read when scraped.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::db::{Db, DbError};
use crate::jobs::Outcome;

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    requests: Family<Labels, Histogram, fn() -> Histogram>,
    jobs: Family<Labels, Histogram, fn() -> Histogram>,
    polls: Family<Labels, Counter>,
    pub vm_requests: Counter,
    pub placements: Counter,
    pub vm_released: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::new_with_constructor(latency_histogram),
            jobs: Family::new_with_constructor(latency_histogram),
            polls: Family::default(),
            vm_requests: Counter::default(),
            placements: Counter::default(),
            vm_released: Counter::default(),
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&labels(&[
                ("method", method),
                ("route", route),
                ("status", &status.to_string()),
            ]))
            .observe(took.as_secs_f64());
    }

    pub fn observe_job(&self, action: &str, outcome: &Outcome, took: Duration) {
        let outcome = match outcome {
            Outcome::Done => "success",
            Outcome::Failed(_) => "failed",
            Outcome::Retry(..) => "retry",
            Outcome::Wait(..) => "wait",
        };
        self.jobs
            .get_or_create(&labels(&[("action", action), ("outcome", outcome)]))
            .observe(took.as_secs_f64());
    }

    pub fn node_polled(&self, node: &str, answered: bool) {
        self.polls
            .get_or_create(&labels(&[
                ("node", node),
                ("answered", if answered { "true" } else { "false" }),
            ]))
            .inc();
    }

    pub async fn render(&self, db: &Db) -> Result<String, DbError> {
        let mut registry = Registry::with_prefix("stratus_orchestrator");
        registry.register(
            "api_request_duration_seconds",
            "API request latency",
            self.requests.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Job run time by action and outcome",
            self.jobs.clone(),
        );
        registry.register("node_polls", "Node agent polls", self.polls.clone());
        registry.register(
            "vm_requests",
            "Run requests accepted by this replica",
            self.vm_requests.clone(),
        );
        registry.register(
            "placements",
            "VMs started on a node by this replica",
            self.placements.clone(),
        );
        registry.register(
            "vm_releases",
            "VMs whose node resources this replica released",
            self.vm_released.clone(),
        );

        let by_state = Family::<Labels, Gauge>::default();
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM vms GROUP BY state")
                .fetch_all(&db.pool)
                .await?;
        for (state, count) in rows {
            by_state
                .get_or_create(&labels(&[("state", &state)]))
                .set(count);
        }
        registry.register("vms", "VMs of the cloud by state", by_state);

        let nodes = Family::<Labels, Gauge>::default();
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT state, health, COUNT(*) FROM nodes GROUP BY state, health")
                .fetch_all(&db.pool)
                .await?;
        for (state, health, count) in rows {
            nodes
                .get_or_create(&labels(&[("state", &state), ("health", &health)]))
                .set(count);
        }
        registry.register("nodes", "Nodes by state and health", nodes);

        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &registry);
        Ok(text)
    }
}
