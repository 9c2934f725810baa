//! Per-disk I/O counters, shared by all of a disk's queue workers and read by the VMM API
//! (`GET /vm/counters`), which the node agent turns into metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Default, Debug)]
pub struct BlockCounters {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    flush_ops: AtomicU64,
    discard_ops: AtomicU64,
    discard_bytes: AtomicU64,
    write_zeroes_ops: AtomicU64,
    write_zeroes_bytes: AtomicU64,
    errors: AtomicU64,
    throttled_us: AtomicU64,
}

/// What a finished request did, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountedOp {
    Read(u64),
    Write(u64),
    Flush,
    Discard(u64),
    WriteZeroes(u64),
}

/// `GET /vm/counters`, per disk: totals since the device was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCountersReport {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub discard_ops: u64,
    pub discard_bytes: u64,
    pub write_zeroes_ops: u64,
    pub write_zeroes_bytes: u64,
    /// Requests that failed (refused as malformed, or failed by the disk).
    pub errors: u64,
    /// Time the rate limiter held requests back, summed over queues.
    pub throttled_us: u64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl BlockCounters {
    pub fn completed(&self, op: CountedOp) {
        match op {
            CountedOp::Read(bytes) => {
                add(&self.read_ops, 1);
                add(&self.read_bytes, bytes);
            }
            CountedOp::Write(bytes) => {
                add(&self.write_ops, 1);
                add(&self.write_bytes, bytes);
            }
            CountedOp::Flush => add(&self.flush_ops, 1),
            CountedOp::Discard(bytes) => {
                add(&self.discard_ops, 1);
                add(&self.discard_bytes, bytes);
            }
            CountedOp::WriteZeroes(bytes) => {
                add(&self.write_zeroes_ops, 1);
                add(&self.write_zeroes_bytes, bytes);
            }
        }
    }

    pub fn failed(&self) {
        add(&self.errors, 1);
    }

    pub fn throttled_for(&self, time: Duration) {
        add(&self.throttled_us, time.as_micros() as u64);
    }

    pub fn report(&self) -> BlockCountersReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockCountersReport {
            read_ops: get(&self.read_ops),
            read_bytes: get(&self.read_bytes),
            write_ops: get(&self.write_ops),
            write_bytes: get(&self.write_bytes),
            flush_ops: get(&self.flush_ops),
            discard_ops: get(&self.discard_ops),
            discard_bytes: get(&self.discard_bytes),
            write_zeroes_ops: get(&self.write_zeroes_ops),
            write_zeroes_bytes: get(&self.write_zeroes_bytes),
            errors: get(&self.errors),
            throttled_us: get(&self.throttled_us),
        }
    }
}
