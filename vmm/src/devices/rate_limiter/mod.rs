//! Token-bucket rate limiting for device I/O: a bandwidth bucket (bytes) and an operations
//! bucket, each refilled continuously over one second. A device that runs out of tokens
//! stops taking requests and arms a timerfd for when enough will be back, instead of
//! polling. Limits can change at run time (through the VMM API); the workers sharing a
//! limiter are woken when they do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Limits per second; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default)]
    pub bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub ops_per_sec: Option<u64>,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}

#[derive(Debug)]
struct TokenBucket {
    /// Tokens per second; also the bucket size (one second of burst).
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.last = now;
    }

    /// Time until `amount` tokens are there. Requests larger than the bucket only wait
    /// for a full bucket: they could never run otherwise.
    fn wait_for(&self, amount: u64) -> Duration {
        let need = (amount as f64).min(self.rate as f64);
        if self.tokens >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / self.rate as f64)
        }
    }
}

#[derive(Debug)]
struct State {
    /// What the buckets were made from, for reporting.
    limit: RateLimit,
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Workers to wake when the limits change; dropped workers fall out on the next change.
    watchers: Vec<Weak<EventFd>>,
}

#[derive(Debug)]
struct Shared {
    /// Mirrors `state.limit.is_unlimited()` so that unlimited devices (most of them) pay
    /// one atomic load per request instead of a lock.
    unlimited: AtomicBool,
    state: Mutex<State>,
}

/// Shared by every queue of a device, and by the VMM API that changes its limits at run
/// time; cheap to clone. A device always has one, unlimited when nothing is configured.
#[derive(Clone, Debug)]
pub struct RateLimiter(Arc<Shared>);

/// Rates of 0 mean unlimited here; the configuration and the API refuse them earlier.
fn normalise(limit: RateLimit) -> RateLimit {
    RateLimit {
        bytes_per_sec: limit.bytes_per_sec.filter(|r| *r > 0),
        ops_per_sec: limit.ops_per_sec.filter(|r| *r > 0),
    }
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self::new_at(limit, Instant::now())
    }

    fn new_at(limit: RateLimit, now: Instant) -> Self {
        let limit = normalise(limit);
        RateLimiter(Arc::new(Shared {
            unlimited: AtomicBool::new(limit.is_unlimited()),
            state: Mutex::new(State {
                limit,
                bytes: limit.bytes_per_sec.map(|r| TokenBucket::new(r, now)),
                ops: limit.ops_per_sec.map(|r| TokenBucket::new(r, now)),
                watchers: Vec::new(),
            }),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().expect("rate limiter lock poisoned")
    }

    /// The limits in force.
    pub fn limit(&self) -> RateLimit {
        self.lock().limit
    }

    /// True while no limit is set: callers may skip measuring their requests.
    pub fn is_unlimited(&self) -> bool {
        self.0.unlimited.load(Ordering::Acquire)
    }

    /// Replaces the limits (at run time); buckets start full. Every watcher is woken, so
    /// a queue throttled under the old limits need not wait for its old deadline.
    pub fn update(&self, limit: RateLimit) {
        self.update_at(limit, Instant::now())
    }

    fn update_at(&self, limit: RateLimit, now: Instant) {
        let limit = normalise(limit);
        let mut state = self.lock();
        state.limit = limit;
        state.bytes = limit.bytes_per_sec.map(|r| TokenBucket::new(r, now));
        state.ops = limit.ops_per_sec.map(|r| TokenBucket::new(r, now));
        self.0
            .unlimited
            .store(limit.is_unlimited(), Ordering::Release);
        state.watchers.retain(|w| match w.upgrade() {
            Some(wake) => {
                // A full counter (EAGAIN) already means "woken".
                let _ = wake.write(1);
                true
            }
            None => false,
        });
    }

    /// Has `wake` written to whenever the limits change. The limiter keeps only a weak
    /// reference: dropping the event is enough to stop watching.
    pub fn watch(&self, wake: &Arc<EventFd>) {
        let mut state = self.lock();
        state.watchers.retain(|w| w.strong_count() > 0);
        state.watchers.push(Arc::downgrade(wake));
    }

    /// Takes one operation of `bytes` if both buckets allow it; otherwise takes nothing and
    /// says how long to wait.
    pub fn consume(&self, bytes: u64) -> Result<(), Duration> {
        if self.is_unlimited() {
            return Ok(());
        }
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut guard = self.lock();
        let b = &mut *guard;
        let mut wait = Duration::ZERO;
        if let Some(bucket) = b.bytes.as_mut() {
            bucket.refill(now);
            wait = wait.max(bucket.wait_for(bytes));
        }
        if let Some(bucket) = b.ops.as_mut() {
            bucket.refill(now);
            wait = wait.max(bucket.wait_for(1));
        }
        if !wait.is_zero() {
            // A minimum wait keeps a starved device from re-arming a timer every microsecond.
            return Err(wait.max(Duration::from_millis(1)));
        }
        if let Some(bucket) = b.bytes.as_mut() {
            bucket.tokens -= (bytes as f64).min(bucket.rate as f64);
        }
        if let Some(bucket) = b.ops.as_mut() {
            bucket.tokens -= 1.0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_blocks() {
        let l = RateLimiter::new(RateLimit::default());
        for _ in 0..10_000 {
            assert!(l.consume(1 << 20).is_ok());
        }
    }

    #[test]
    fn bandwidth_bucket_allows_one_second_then_waits_for_refill() {
        let t0 = Instant::now();
        let l = RateLimiter::new_at(
            RateLimit {
                bytes_per_sec: Some(4096),
                ops_per_sec: None,
            },
            t0,
        );
        assert!(l.consume_at(2048, t0).is_ok());
        assert!(l.consume_at(2048, t0).is_ok());
        let wait = l.consume_at(1024, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.25).abs() < 0.01, "{wait:?}");
        // A quarter second later exactly 1024 tokens are back.
        assert!(l.consume_at(1024, t0 + Duration::from_millis(251)).is_ok());
        assert!(l.consume_at(1024, t0 + Duration::from_millis(251)).is_err());
    }

    #[test]
    fn ops_bucket_limits_requests_whatever_their_size() {
        let t0 = Instant::now();
        let l = RateLimiter::new_at(
            RateLimit {
                bytes_per_sec: None,
                ops_per_sec: Some(10),
            },
            t0,
        );
        for _ in 0..10 {
            assert!(l.consume_at(1, t0).is_ok());
        }
        let wait = l.consume_at(1, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 0.01);
        assert!(l
            .consume_at(1 << 30, t0 + Duration::from_millis(101))
            .is_ok());
    }

    #[test]
    fn oversized_requests_wait_for_a_full_bucket_and_a_refused_one_takes_nothing() {
        let t0 = Instant::now();
        let l = RateLimiter::new_at(
            RateLimit {
                bytes_per_sec: Some(1000),
                ops_per_sec: Some(100),
            },
            t0,
        );
        assert!(
            l.consume_at(10_000, t0).is_ok(),
            "a full bucket lets a huge request through"
        );
        assert!(l.consume_at(10, t0).is_err());
        // Refused requests took no ops tokens: after a second both buckets are full again.
        assert!(l.consume_at(1000, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn update_replaces_the_limits() {
        let l = RateLimiter::new(RateLimit {
            bytes_per_sec: Some(1),
            ops_per_sec: None,
        });
        assert!(l.consume(1).is_ok());
        assert!(l.consume(1).is_err());
        l.update(RateLimit::default());
        assert!(l.consume(1 << 20).is_ok());
    }

    #[test]
    fn update_goes_from_unlimited_to_limited_and_back_through_a_clone() {
        let t0 = Instant::now();
        let device = RateLimiter::new_at(RateLimit::default(), t0);
        // The API holds a clone; its updates are what the device's queues see.
        let api = device.clone();
        assert!(device.is_unlimited());
        assert_eq!(device.limit(), RateLimit::default());
        for _ in 0..1000 {
            assert!(device.consume_at(1 << 30, t0).is_ok());
        }

        let limited = RateLimit {
            bytes_per_sec: Some(1000),
            ops_per_sec: Some(2),
        };
        api.update_at(limited, t0);
        assert!(!device.is_unlimited());
        assert_eq!(device.limit(), limited);
        // Buckets start full: two operations, then the ops bucket is empty.
        assert!(device.consume_at(10, t0).is_ok());
        assert!(device.consume_at(10, t0).is_ok());
        let wait = device.consume_at(10, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 0.01, "{wait:?}");
        assert!(
            device.consume(10).is_err(),
            "consume() checks the limit too"
        );

        api.update_at(RateLimit::default(), t0);
        assert!(device.is_unlimited());
        assert_eq!(device.limit(), RateLimit::default());
        assert!(device.consume_at(1 << 30, t0).is_ok());
        assert!(device.consume(1 << 30).is_ok());
    }

    #[test]
    fn an_update_restarts_with_full_buckets_and_zero_means_unlimited() {
        let t0 = Instant::now();
        let l = RateLimiter::new_at(
            RateLimit {
                bytes_per_sec: Some(100),
                ops_per_sec: None,
            },
            t0,
        );
        assert!(l.consume_at(100, t0).is_ok());
        assert!(l.consume_at(1, t0).is_err());
        let raised = RateLimit {
            bytes_per_sec: Some(1000),
            ops_per_sec: None,
        };
        l.update_at(raised, t0);
        assert!(l.consume_at(1000, t0).is_ok());
        assert!(l.consume_at(1, t0).is_err());
        l.update_at(
            RateLimit {
                bytes_per_sec: Some(0),
                ops_per_sec: Some(0),
            },
            t0,
        );
        assert!(l.is_unlimited());
        assert_eq!(l.limit(), RateLimit::default());
    }

    #[test]
    fn updates_wake_every_live_watcher_and_forget_dropped_ones() {
        let l = RateLimiter::new(RateLimit::default());
        let a = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let b = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        l.watch(&a);
        l.watch(&b);
        assert!(a.read().is_err(), "nothing changed yet");
        l.update(RateLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(5),
        });
        assert_eq!(a.read().unwrap(), 1);
        assert_eq!(b.read().unwrap(), 1);
        drop(b);
        l.update(RateLimit::default());
        assert_eq!(a.read().unwrap(), 1);
        assert_eq!(l.lock().watchers.len(), 1, "the dropped watcher is gone");
    }
}
