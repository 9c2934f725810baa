//! stratus-orchestrator
