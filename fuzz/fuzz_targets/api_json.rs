//! The VMM control API's JSON bodies, read as every request type the API takes and
//! checked the way its handlers check them: `PATCH /vm/{disks,nets}/{id}` (a rate-limit
//! merge patch), `PUT /vm/actions`, `PUT /vm/disks` and `PUT /vm/nets` (a hot-plugged
//! disk or NIC), and the `--config` file, which shares their disk and NIC types.
//!
//! Beyond not panicking: a patch that applies never leaves a zero limit, limits that
//! validate make a working rate limiter, and what the API accepts encodes and decodes back
//! to itself (the configuration is handed on as JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use stratus_vmm::api::{ActionRequest, DevicePatch};
use stratus_vmm::devices::rate_limiter::{RateLimit, RateLimiter};
use stratus_vmm::devices::virtio::block::BlockConfig;
use stratus_vmm::devices::virtio::net::NetConfig;
use stratus_vmm::VmConfig;

/// Limits a device may have before a patch.
const CURRENT: [RateLimit; 3] = [
    RateLimit {
        bytes_per_sec: None,
        ops_per_sec: None,
    },
    RateLimit {
        bytes_per_sec: Some(1),
        ops_per_sec: Some(1),
    },
    RateLimit {
        bytes_per_sec: Some(u64::MAX),
        ops_per_sec: None,
    },
];

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let json = serde_json::to_vec(value).expect("an accepted body encodes");
    let again: T = serde_json::from_slice(&json).expect("an encoded body decodes");
    assert_eq!(&again, value, "JSON round trip");
}

/// A device takes its limiter's verdict on every request, whatever its size.
fn exercise(limit: RateLimit) {
    let limiter = RateLimiter::new(limit);
    for bytes in [0, 1, 512, 1 << 20, u64::MAX] {
        let _ = limiter.consume(bytes);
    }
    limiter.update(limit);
    assert_eq!(limiter.limit(), limit);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(patch) = serde_json::from_slice::<DevicePatch>(data) {
        for current in CURRENT {
            if let Ok(limit) = patch.rate_limit.apply(current) {
                assert!(
                    limit.bytes_per_sec != Some(0) && limit.ops_per_sec != Some(0),
                    "a patch set a zero limit: {limit:?}"
                );
                exercise(limit);
            }
        }
    }
    let _ = serde_json::from_slice::<ActionRequest>(data);
    if let Ok(disk) = serde_json::from_slice::<BlockConfig>(data) {
        let _ = disk.source_name();
        if VmConfig::validate_disk(&disk).is_ok() {
            exercise(disk.rate_limit);
            // Only network disks: for a file this asks the filesystem.
            if disk.iscsi.is_some() || disk.rbd.is_some() {
                let _ = disk.identity();
            }
        }
        round_trips(&disk);
    }
    if let Ok(net) = serde_json::from_slice::<NetConfig>(data) {
        if VmConfig::validate_net(&net).is_ok() {
            exercise(net.rate_limit);
        }
        round_trips(&net);
    }
    if let Ok(config) = serde_json::from_slice::<VmConfig>(data) {
        let _ = config.validate();
        round_trips(&config);
    }
});
