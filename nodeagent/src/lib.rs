//! stratus-nodeagent: the per-host agent that prepares what a VM needs on its node.

pub mod network;
