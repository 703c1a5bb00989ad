//! Pooled gRPC channels to presence servers, by address: a lookup reuses the channel (and its
//! HTTP/2 connection) of the lookups before it instead of dialling a server each time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use tonic::transport::Channel;

/// The most presence servers a pool keeps a channel to; past it the least recently used
/// channel is closed. More than a presence ring has servers (with standbys).
pub const MAX_CHANNELS: usize = 64;
/// A channel unused for this long is closed (its server probably left the ring).
pub const IDLE: Duration = Duration::from_secs(300);
/// How long dialling a presence server may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A channel and when it was last handed out.
#[derive(Debug)]
struct Pooled {
    channel: Channel,
    used: Instant,
}

/// Channels to presence servers by address, at most [`MAX_CHANNELS`], each closed after
/// [`IDLE`] unused. Made by the process's transport (`mesh_transport::endpoint`: TLS with the
/// process's identity where it has one); a channel reconnects by itself after its server
/// restarts.
#[derive(Debug)]
pub struct Pool {
    channels: Mutex<LruCache<String, Pooled>>,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        let cap = std::num::NonZeroUsize::new(MAX_CHANNELS).unwrap_or(std::num::NonZeroUsize::MIN);
        Pool {
            channels: Mutex::new(LruCache::new(cap)),
        }
    }

    /// The channel to the presence server at `addr` (`host:port`), made on first use; it
    /// connects when first called. Must be called inside a Tokio runtime.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        self.channel_at(addr, Instant::now())
    }

    fn channel_at(&self, addr: &str, now: Instant) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        while channels
            .peek_lru()
            .is_some_and(|(_, p)| now.saturating_duration_since(p.used) >= IDLE)
        {
            channels.pop_lru();
        }
        if let Some(pooled) = channels.get_mut(addr) {
            pooled.used = now;
            return Ok(pooled.channel.clone());
        }
        let channel = mesh_transport::endpoint(addr)?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_lazy();
        let pooled = Pooled {
            channel: channel.clone(),
            used: now,
        };
        channels.put(addr.to_string(), pooled);
        Ok(channel)
    }

    /// Channels held now.
    pub fn len(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether the pool holds no channel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_channel_per_address_closed_when_idle_or_past_the_bound() {
        let pool = Pool::new();
        let start = Instant::now();
        for _ in 0..10 {
            pool.channel_at("127.0.0.1:1", start).unwrap();
        }
        pool.channel_at("127.0.0.1:2", start).unwrap();
        assert_eq!(pool.len(), 2);
        // Port 2 is used again later; port 1 lies idle and is closed at the next hand-out.
        let later = start + IDLE / 2;
        pool.channel_at("127.0.0.1:2", later).unwrap();
        pool.channel_at("127.0.0.1:2", start + IDLE).unwrap();
        assert_eq!(pool.len(), 1);
        // Past the bound, the least recently used goes.
        for port in 0..MAX_CHANNELS + 10 {
            pool.channel_at(&format!("127.0.0.1:{}", 1000 + port), later)
                .unwrap();
        }
        assert_eq!(pool.len(), MAX_CHANNELS);
    }
}
