//! stratus-benches
