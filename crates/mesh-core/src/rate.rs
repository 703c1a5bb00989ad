//! A token bucket: the one rate limiter of the mesh (a client's frames, handshakes, API calls
//! per user and address on the gateway; a channel's publish rate on its owner). No clock of its
//! own: callers pass `now`.

use std::time::Instant;

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; a `rate` of 0 never refuses.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self::per_second(f64::from(rate), burst, now)
    }

    /// A full bucket of `rate` tokens a second (fractions allowed); 0 never refuses.
    pub fn per_second(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: rate.max(0.0),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full at `now`: forgetting it loses nothing.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    /// Whether it was made for `rate` and `burst`.
    pub fn is_for(&self, rate: f64, burst: u32) -> bool {
        self.rate == rate && self.burst == f64::from(burst.max(1))
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_fractional_rate_refills_slowly_and_a_full_bucket_says_so() {
        let start = Instant::now();
        let mut bucket = TokenBucket::per_second(0.5, 2, start);
        assert!(bucket.is_full(start));
        assert!(bucket.take(start) && bucket.take(start));
        assert!(!bucket.take(start));
        assert!(!bucket.take(start + Duration::from_millis(1500)));
        assert!(bucket.take(start + Duration::from_millis(2100)));
        assert!(!bucket.is_full(start + Duration::from_millis(2100)));
        assert!(bucket.is_full(start + Duration::from_secs(10)));
        assert!(bucket.is_for(0.5, 2) && !bucket.is_for(1.0, 2));
    }
}
