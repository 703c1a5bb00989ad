//! What one client may do to a gateway, and the arithmetic that enforces it.
//!
//! Every limit here is configurable (`channelmesh gateway --help`) and listed in docs/rtm.md
//! ("Limits as a client sees them") with the error or close code it answers with.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use mesh_core::{ChannelId, TeamId, UserId};

/// The gateway's limits on clients.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Client frames (messages, typing, pings, presence) one connection may send per second,
    /// sustained; 0 turns the limit off.
    pub frames_per_sec: u32,
    /// Frames a connection may send at once above that rate.
    pub frame_burst: u32,
    /// Refused frames in a row (no frame accepted between them) after which the connection is
    /// closed with [`crate::close::codes::RATE_LIMITED`].
    pub refusals_before_close: u32,
    /// Bytes of events queued to one connection and not yet written; past it the client is a
    /// slow consumer and is closed with [`crate::close::codes::SLOW_CONSUMER`].
    pub outbound_bytes: usize,
    /// How long a write to a client may stall before it counts as a slow consumer.
    pub write_timeout: Duration,
    /// Typing indicators of one user in one channel closer together than this are coalesced
    /// into the first (clients repeat them every few seconds while the user types).
    pub typing_interval: Duration,
    /// Client connections this gateway holds; past it `rtm.connect` answers `ratelimited`.
    pub max_connections: usize,
    /// TCP connections (clients plus HTTP calls) the listener holds at once; at the cap it
    /// stops accepting until one closes, so the process never runs out of file descriptors.
    pub max_sockets: usize,
    /// `rtm.connect` calls per second the gateway takes (WebSocket upgrades are bounded by the
    /// single-use tickets those calls issue); past it
    /// `ratelimited` with `Retry-After`. 0 turns the limit off.
    pub handshakes_per_sec: u32,
    /// How long a client may take to send a request's headers (slowloris).
    pub handshake_timeout: Duration,
    /// A connection the client sent nothing on (not even a pong) for this long is closed
    /// with [`crate::close::codes::IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// The gateway pings a connection this often, so that a live client always has something
    /// to answer before the idle timeout.
    pub ping_interval: Duration,
    /// Concurrent connections per team across every gateway of every region (0: no cap),
    /// unless `team_overrides` names the team. Counted by the team's presence server.
    pub team_connections: u32,
    /// Per-team caps that replace `team_connections` (0: no cap for that team).
    pub team_overrides: HashMap<TeamId, u32>,
    /// Concurrent connections per user across every gateway (0: no cap).
    pub user_connections: u32,
    /// Whether clients may post (messages, typing) to their team's channel. Off by default:
    /// the team channel carries the server's events to the whole team, and a client post
    /// there gets error 12 (`restricted_action_read_only_channel`).
    pub team_channel_posts: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frames_per_sec: 50,
            frame_burst: 100,
            refusals_before_close: 200,
            outbound_bytes: 1 << 20,
            write_timeout: Duration::from_secs(10),
            typing_interval: Duration::from_secs(2),
            max_connections: 18_000,
            max_sockets: 19_000,
            handshakes_per_sec: 2_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            ping_interval: Duration::from_secs(30),
            team_connections: 0,
            team_overrides: HashMap::new(),
            user_connections: 0,
            team_channel_posts: false,
        }
    }
}

impl Limits {
    /// The connection cap of `team` (0: none).
    pub fn team_cap(&self, team: &TeamId) -> u32 {
        self.team_overrides
            .get(team)
            .copied()
            .unwrap_or(self.team_connections)
    }

    /// These limits with the socket caps lowered, if need be, to fit under `fd_limit` open
    /// files (the process's RLIMIT_NOFILE), leaving `reserve` for upstreams, logs and the like.
    pub fn fit_to_fd_limit(mut self, fd_limit: u64, reserve: u64) -> Self {
        let room = fd_limit.saturating_sub(reserve).max(1) as usize;
        self.max_sockets = self.max_sockets.min(room);
        self.max_connections = self.max_connections.min(self.max_sockets);
        self
    }
}

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
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(rate),
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
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Coalesces typing indicators per (user, channel) across a gateway's connections.
#[derive(Debug)]
pub struct TypingCoalescer {
    interval: Duration,
    last: Mutex<LruCache<(UserId, ChannelId), Instant>>,
}

impl TypingCoalescer {
    /// Remembers at most `capacity` (user, channel) pairs; the oldest are forgotten first,
    /// which at worst lets one extra indicator through.
    pub fn new(interval: Duration, capacity: NonZeroUsize) -> Self {
        TypingCoalescer {
            interval,
            last: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// True if `user` typing in `channel` at `now` should be published: the first in its
    /// interval.
    pub fn first_in_interval(&self, user: &UserId, channel: &ChannelId, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let key = (user.clone(), channel.clone());
        match last.get(&key) {
            Some(at) if now.saturating_duration_since(*at) < self.interval => false,
            _ => {
                last.put(key, now);
                true
            }
        }
    }
}

/// The soft limit on open files of this process, from `/proc/self/limits` (no `unsafe`
/// needed); `None` where it cannot be read.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, start);
        assert_eq!((0..8).filter(|_| bucket.take(start)).count(), 5);
        // 0.3 s later: 3 more tokens.
        let later = start + Duration::from_millis(300);
        assert_eq!((0..8).filter(|_| bucket.take(later)).count(), 3);
        // Long idle refills only to the burst.
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| bucket.take(much_later)).count(), 5);
    }

    #[test]
    fn a_zero_rate_never_refuses() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(0, 1, now);
        assert!((0..10_000).all(|_| bucket.take(now)));
    }

    #[test]
    fn socket_caps_fit_under_the_fd_limit() {
        let limits = Limits::default().fit_to_fd_limit(1024, 124);
        assert_eq!(limits.max_sockets, 900);
        assert_eq!(limits.max_connections, 900);
        let roomy = Limits::default().fit_to_fd_limit(1 << 20, 124);
        assert_eq!(roomy.max_sockets, Limits::default().max_sockets);
    }

    #[test]
    fn typing_is_coalesced_per_user_and_channel() {
        let typing =
            TypingCoalescer::new(Duration::from_secs(2), NonZeroUsize::MIN.saturating_add(15));
        let (u1, u2) = (UserId::new("U1").unwrap(), UserId::new("U2").unwrap());
        let (c1, c2) = (ChannelId::new("C1").unwrap(), ChannelId::new("C2").unwrap());
        let t0 = Instant::now();
        assert!(typing.first_in_interval(&u1, &c1, t0));
        assert!(!typing.first_in_interval(&u1, &c1, t0 + Duration::from_secs(1)));
        assert!(typing.first_in_interval(&u2, &c1, t0 + Duration::from_secs(1)));
        assert!(typing.first_in_interval(&u1, &c2, t0 + Duration::from_secs(1)));
        assert!(typing.first_in_interval(&u1, &c1, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn reads_this_process_fd_limit() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
