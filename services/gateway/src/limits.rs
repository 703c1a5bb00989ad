//! What one client may do to a gateway, and the arithmetic that enforces it.
//!
//! Every limit here is configurable (`channelmesh gateway --help`) and listed in docs/rtm.md
//! ("Limits as a client sees them") with the error or close code it answers with.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use mesh_core::{ChannelId, TeamId, UserId};

/// Publishes one connection may have in flight at once, however small: bounds the
/// bookkeeping (a future each) a client of tiny frames can make the gateway hold.
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 4096;

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
    /// Bytes of client frames (messages, typing) one connection may have being published and
    /// not yet answered; once they reach it the gateway stops reading the connection's socket
    /// until answers come (TCP then holds the client back). At most
    /// [`MAX_PUBLISHES_IN_FLIGHT`] publishes are in flight whatever their size.
    pub publish_bytes: usize,
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
    /// `rtm.connect` calls per second one user (the token's subject) may make, with bursts of
    /// [`BURST_SECS`] seconds' worth; past it `ratelimited`. 0 turns the limit off.
    pub connects_per_user: u32,
    /// `rtm.connect` calls per second from one client address (an IPv6 client's /64), the
    /// same way; counted before the token is checked.
    pub connects_per_addr: u32,
    /// Calls per second of the other Slack methods (`auth.test`, `users.getPresence`,
    /// `users.setPresence`) one user may make, the same way.
    pub api_calls_per_user: u32,
    /// Calls per second of those methods from one client address, the same way.
    pub api_calls_per_addr: u32,
    /// The largest request body accepted, in bytes; a larger one gets HTTP 413.
    pub request_body_bytes: usize,
    /// How long a client may take to send a request's body once its headers are in
    /// (slowloris on bodies); past it HTTP 408 and the connection is closed.
    pub request_body_timeout: Duration,
    /// Proxies whose `X-Forwarded-For` names the client (the region's Envoys, and the
    /// gateways that forward `rtm.connect` while their region drains). Anyone else is the
    /// client themselves, whatever the header says.
    pub trusted_proxies: Vec<Cidr>,
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
            publish_bytes: 1 << 20,
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
            connects_per_user: 2,
            connects_per_addr: 100,
            api_calls_per_user: 10,
            api_calls_per_addr: 200,
            request_body_bytes: 64 * 1024,
            request_body_timeout: Duration::from_secs(10),
            trusted_proxies: Vec::new(),
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

    /// The connection cap of `team` (0: none) given the policy file's cap for it (`file`, which
    /// replaces the flags' as `--team-limit` does) and the token's `team_max_connections`
    /// claim (`claimed`), which can only lower it: the smallest cap that applies wins.
    pub fn team_cap_with(&self, team: &TeamId, file: Option<u32>, claimed: Option<u32>) -> u32 {
        let configured = file.unwrap_or_else(|| self.team_cap(team));
        match (configured, claimed.filter(|&c| c > 0)) {
            (0, claimed) => claimed.unwrap_or(0),
            (configured, Some(claimed)) => configured.min(claimed),
            (configured, None) => configured,
        }
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

/// The token bucket every limit here uses.
pub use mesh_core::rate::TokenBucket;

/// A keyed limit's burst, in seconds of its rate: a user or an address that was quiet may do
/// this many seconds' worth at once (every device of a user reconnecting after a drain, an
/// office behind one address coming back).
pub const BURST_SECS: u32 = 10;

/// Token buckets by key (a user, a client address): `rate` a second and bursts of
/// [`BURST_SECS`] seconds' worth per key, for at most `capacity` keys (each about 150 bytes).
///
/// At the bound the least recently used key's bucket is forgotten: that key starts again with
/// a full bucket. So the bound can only loosen the limit for a key that was quiet longest (and
/// a bucket idle for [`BURST_SECS`] is full anyway, so forgetting it changes nothing); it never
/// refuses anyone more. Hammering from more keys than the bound is what the per-gateway rate
/// (`handshakes_per_sec`) is for.
#[derive(Debug)]
pub struct KeyedBuckets<K: Hash + Eq> {
    rate: u32,
    buckets: Mutex<LruCache<K, TokenBucket>>,
}

impl<K: Hash + Eq> KeyedBuckets<K> {
    /// Buckets of `rate` a second (0: no limit, nothing is remembered) for `capacity` keys.
    pub fn new(rate: u32, capacity: NonZeroUsize) -> Self {
        KeyedBuckets {
            rate,
            buckets: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// Takes one token from `key`'s bucket at `now`; false if it has none.
    pub fn take(&self, key: K, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.rate.saturating_mul(BURST_SECS));
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets
            .get_or_insert_mut(key, || TokenBucket::new(rate, burst, now))
            .take(now)
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key a client address is limited by: an IPv4 address as it is (an IPv4-mapped IPv6
/// address as its IPv4 address), an IPv6 address by its /64, the block one subscriber gets.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

/// A block of addresses, `10.0.0.0/8` or one address (`192.0.2.7`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let (addr, prefix) = match raw.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (raw, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{raw}: not an address or ADDRESS/BITS"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{raw}: the prefix must be 0 to {max} bits"))?,
        };
        Ok(Cidr { net, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
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
    fn the_smallest_team_cap_wins_and_the_file_replaces_the_flags() {
        let team = TeamId::new("T1").unwrap();
        let limits = Limits {
            team_connections: 100,
            ..Limits::default()
        };
        assert_eq!(limits.team_cap_with(&team, None, None), 100);
        assert_eq!(limits.team_cap_with(&team, None, Some(5)), 5);
        assert_eq!(limits.team_cap_with(&team, None, Some(500)), 100);
        // The file's cap replaces the flags' (raising it too), the claim still lowers it.
        assert_eq!(limits.team_cap_with(&team, Some(300), None), 300);
        assert_eq!(limits.team_cap_with(&team, Some(300), Some(7)), 7);
        // 0 in the file uncaps the team; a claim then caps it alone. A claim of 0 is none.
        assert_eq!(limits.team_cap_with(&team, Some(0), None), 0);
        assert_eq!(limits.team_cap_with(&team, Some(0), Some(9)), 9);
        assert_eq!(limits.team_cap_with(&team, None, Some(0)), 100);
        assert_eq!(Limits::default().team_cap_with(&team, None, Some(3)), 3);
    }

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
    fn keyed_buckets_limit_each_key_alone() {
        let start = Instant::now();
        let buckets = KeyedBuckets::new(2, NonZeroUsize::MIN.saturating_add(7));
        let burst = (2 * BURST_SECS) as usize;
        assert_eq!((0..100).filter(|_| buckets.take("a", start)).count(), burst);
        // Another key has its own bucket.
        assert!(buckets.take("b", start));
        // Half a second later: one more for "a".
        let later = start + Duration::from_millis(500);
        assert_eq!((0..10).filter(|_| buckets.take("a", later)).count(), 1);
        assert_eq!(buckets.len(), 2);
    }

    #[test]
    fn at_the_bound_the_quietest_key_is_forgotten_and_comes_back_full() {
        let now = Instant::now();
        let buckets = KeyedBuckets::new(1, NonZeroUsize::MIN.saturating_add(1));
        while buckets.take("a", now) {}
        assert!(buckets.take("b", now));
        assert_eq!(buckets.len(), 2);
        // "c" pushes out "a", the least recently used: "a" is refused no more.
        assert!(buckets.take("c", now));
        assert_eq!(buckets.len(), 2);
        assert!(buckets.take("a", now));
    }

    #[test]
    fn a_zero_rate_remembers_nobody() {
        let buckets = KeyedBuckets::new(0, NonZeroUsize::MIN);
        let now = Instant::now();
        assert!((0..1000).all(|i| buckets.take(i, now)));
        assert!(buckets.is_empty());
    }

    #[test]
    fn addresses_are_keyed_by_ipv4_and_by_ipv6_slash_64() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.200.1.1")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("10.1.2.3").contains(ip("10.1.2.3")));
        assert!(!c("10.1.2.3").contains(ip("10.1.2.4")));
        assert!(c("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(c("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
        assert!(c("fd00::/8").contains(ip("fd12::1")));
        assert!(!c("fd00::/8").contains(ip("10.0.0.1")));
        assert!(c("::/0").contains(ip("2001:db8::1")));
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("::1").to_string(), "::1/128");
        for bad in ["10.0.0.0/33", "nope", "::/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_this_process_fd_limit() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
