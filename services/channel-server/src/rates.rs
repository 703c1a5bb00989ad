//! Each channel's publish rate (its policy's `publish_rate`), counted here on the channel's
//! owner so that it holds however many gateways its clients post through. Only clients'
//! messages count (events with an origin connection): the admin API's publishes and typing
//! indicators do not. A bucket lives on the node that owns the channel now; a move starts the
//! channel's bucket full on its new owner.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use mesh_core::ChannelId;
use mesh_core::policy::PublishRate;
use mesh_core::rate::TokenBucket;

/// The most channels whose buckets are remembered at once. Past it, full buckets (which
/// remember nothing) are dropped; if every one is in use, all are, and channels start full
/// again (logged): the bound holds memory, at the cost of one burst per channel.
pub const MAX_BUCKETS: usize = 100_000;

/// Publish-rate buckets per channel.
#[derive(Debug, Default)]
pub struct ChannelRates {
    buckets: Mutex<HashMap<ChannelId, TokenBucket>>,
}

impl ChannelRates {
    /// Whether one more client message to `channel` fits its `rate` at `now` (taking a token
    /// if so). A channel whose rate changed (a reload) starts a full bucket of the new one.
    pub fn admit(&self, channel: &ChannelId, rate: PublishRate, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(channel) && buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= MAX_BUCKETS {
                tracing::warn!(
                    buckets = MAX_BUCKETS,
                    "too many channels over their publish rate at once; every channel's rate starts over"
                );
                buckets.clear();
            }
        }
        let bucket = buckets
            .entry(channel.clone())
            .or_insert_with(|| TokenBucket::per_second(rate.per_second, rate.burst, now));
        if !bucket.is_for(rate.per_second, rate.burst) {
            *bucket = TokenBucket::per_second(rate.per_second, rate.burst, now);
        }
        bucket.take(now)
    }

    /// Channels with a bucket now.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no channel has a bucket.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_channel_takes_its_burst_then_its_rate_and_a_new_rate_starts_full() {
        let rates = ChannelRates::default();
        let (c1, c2) = (ChannelId::new("C1").unwrap(), ChannelId::new("C2").unwrap());
        let rate = PublishRate {
            per_second: 1.0,
            burst: 3,
        };
        let start = Instant::now();
        for _ in 0..3 {
            assert!(rates.admit(&c1, rate, start));
        }
        assert!(!rates.admit(&c1, rate, start));
        // Another channel has its own bucket.
        assert!(rates.admit(&c2, rate, start));
        assert!(rates.admit(&c1, rate, start + Duration::from_millis(1100)));
        assert!(!rates.admit(&c1, rate, start + Duration::from_millis(1100)));
        let faster = PublishRate {
            per_second: 10.0,
            burst: 1,
        };
        assert!(rates.admit(&c1, faster, start + Duration::from_millis(1100)));
        assert_eq!(rates.len(), 2);
    }
}
