//! stratus-orchestrator: the cloud's entry point. Users and the `stratus-*` CLI talk to it;
//! it keeps the cloud's truth in a database (SQLite or PostgreSQL), places VMs on nodes and
//! drives the node agents. A request is written to the database first; job workers (in
//! every replica) claim it and carry it out, so any replica can be killed at any time.

pub mod agent_client;
pub mod api;
pub mod config;
pub mod db;
pub mod instance_types;
pub mod jobs;
pub mod marketplace;
pub mod metrics;
pub mod names;
pub mod networks;
pub mod nodes;
pub mod pdisk;
pub mod placement;
pub mod quotas;
pub mod tls;
pub mod users;
pub mod vms;
pub mod web;

use std::sync::Arc;

use config::Config;
use db::Db;
use instance_types::InstanceType;

/// What every request handler and job worker of one replica shares.
pub struct Cloud {
    pub db: Db,
    pub config: Arc<Config>,
    pub types: Vec<InstanceType>,
    /// Calls to the Marketplace (the system's trusted roots).
    pub http: reqwest::Client,
    /// Calls to node agents (`agent_ca_file`'s CAs for `https://` nodes).
    pub agents: reqwest::Client,
    pub policy: Option<stratus_images::policy::Policy>,
    pub auth: users::Authenticator,
    /// This replica's name in job claims.
    pub replica: String,
    /// Wakes this replica's job workers when a request queues a job.
    pub jobs_queued: tokio::sync::Notify,
    pub metrics: metrics::Metrics,
    /// pdisk's storage (`volume_dir`, `[volume_iscsi]`, `[volume_rbd]`), if the cloud has volumes.
    pub volumes: Option<pdisk::Storage>,
}

impl Cloud {
    pub fn new(
        db: Db,
        config: Arc<Config>,
        policy: Option<stratus_images::policy::Policy>,
    ) -> Result<Cloud, tls::TlsError> {
        let agents = tls::client(config.agent_ca_file.as_deref())?;
        let http = tls::client(None)?;
        Ok(Cloud {
            types: instance_types::all(&config.instance_types),
            replica: config.replica_name(),
            db,
            config,
            http,
            agents,
            policy,
            auth: users::Authenticator::default(),
            jobs_queued: tokio::sync::Notify::new(),
            metrics: metrics::Metrics::default(),
            volumes: None,
        })
    }
}
