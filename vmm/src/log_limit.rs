//! A cap on log lines a guest can cause at will. What a guest does wrong (a broken ring, a
//! BAR put where it cannot be mapped, a write to the boot-progress port) is worth a line
//! in the VMM's log, but a guest doing it in a loop must not fill the host's disk with it:
//! each call site gets `PER_MINUTE` lines a minute, and the first line of the next minute
//! says how many were left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines one call site may log in a minute.
pub const PER_MINUTE: u64 = 10;

/// One call site's count (see [`rate_limited`]).
pub struct LogLimit {
    minute: AtomicU64,
    logged: AtomicU64,
    left_out: AtomicU64,
}

impl LogLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        LogLimit {
            minute: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out before this one)` when this line may be logged.
    pub fn allow(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        self.allow_in(START.get_or_init(Instant::now).elapsed().as_secs() / 60)
    }

    fn allow_in(&self, minute: u64) -> Option<u64> {
        let seen = self.minute.load(Ordering::Relaxed);
        if seen != minute
            && self
                .minute
                .compare_exchange(seen, minute, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < PER_MINUTE {
            Some(self.left_out.swap(0, Ordering::Relaxed))
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::event!` for lines a guest causes, capped per call site (see the module).
macro_rules! rate_limited {
    ($level:expr, $($event:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new();
        if let Some(left_out) = LIMIT.allow() {
            if left_out > 0 {
                tracing::event!($level, "{left_out} more lines like the next were left out");
            }
            tracing::event!($level, $($event)+);
        }
    }};
}
pub(crate) use rate_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_logs_a_few_lines_a_minute_and_then_says_how_many_it_left_out() {
        let limit = LogLimit::new();
        let allowed: Vec<Option<u64>> = (0..1000).map(|_| limit.allow_in(7)).collect();
        assert_eq!(allowed.iter().flatten().count() as u64, PER_MINUTE);
        assert!(allowed.iter().flatten().all(|left_out| *left_out == 0));
        assert_eq!(limit.allow_in(8), Some(1000 - PER_MINUTE));
        assert_eq!(limit.allow_in(8), Some(0));
    }
}
