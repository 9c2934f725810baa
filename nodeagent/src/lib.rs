//! stratus-nodeagent
