//! A token bucket: `burst` tokens, refilled at `per_second`. The per-connection frame rate
//! and the per-address connect rate both use it. Time is tokio's, so paused-time tests
//! drive it.

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst);
        TokenBucket { tokens: burst, burst, per_second: f64::from(per_second), refilled: now }
    }

    /// Refills to `now`; true when the bucket is full again (its owner has been idle).
    pub(crate) fn refill(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled = now;
        self.tokens >= self.burst
    }

    /// Refills to `now`, then takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
