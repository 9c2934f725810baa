//! stratus-nodeagent: the per-host daemon that runs the host's VMs for the orchestrator —
//! one stratus-vmm process per VM, driven through its control API — and prepares what they
//! need on the node (disks, networking).

pub mod api;
pub mod config;
pub mod host;
pub mod images;
pub mod metrics;
pub mod network;
pub mod networks;
pub mod supervisor;
pub mod tls;
pub mod vmm_client;
pub mod vms;
