//! Token-bucket rate limiting for device I/O: a bandwidth bucket (bytes) and an operations
//! bucket, each refilled continuously over one second. A device that runs out of tokens
//! stops taking requests and arms a timerfd for when enough will be back, instead of
//! polling.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
struct Buckets {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

/// Shared by every queue of a device; cheap to clone.
#[derive(Clone, Debug)]
pub struct RateLimiter(Arc<Mutex<Buckets>>);

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self::new_at(limit, Instant::now())
    }

    fn new_at(limit: RateLimit, now: Instant) -> Self {
        RateLimiter(Arc::new(Mutex::new(Buckets {
            bytes: limit
                .bytes_per_sec
                .filter(|r| *r > 0)
                .map(|r| TokenBucket::new(r, now)),
            ops: limit
                .ops_per_sec
                .filter(|r| *r > 0)
                .map(|r| TokenBucket::new(r, now)),
        })))
    }

    /// Replaces the limits (at run time); buckets start full.
    pub fn update(&self, limit: RateLimit) {
        let fresh = Self::new(limit);
        let buckets = std::mem::replace(
            &mut *fresh.0.lock().expect("rate limiter lock poisoned"),
            Buckets {
                bytes: None,
                ops: None,
            },
        );
        *self.0.lock().expect("rate limiter lock poisoned") = buckets;
    }

    /// Takes one operation of `bytes` if both buckets allow it; otherwise takes nothing and
    /// says how long to wait.
    pub fn consume(&self, bytes: u64) -> Result<(), Duration> {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut b = self.0.lock().expect("rate limiter lock poisoned");
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
}
