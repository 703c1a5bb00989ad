//! Who may call the gateway's Slack API now: the caller's address (the peer, or what a trusted
//! proxy says it forwarded), the rates per address and per user of `rtm.connect` and of the
//! other methods, and the request body, read under a size cap and a deadline.
//!
//! An address is checked before the body is read and the token checked, so a flood without
//! a valid token costs the gateway one map lookup per call; a user after the token is.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use futures::StreamExt;
use mesh_core::UserId;

use crate::limits::{Cidr, KeyedBuckets, Limits, address_key};
use crate::metrics::GatewayMetrics;

/// Users, and addresses, each per-key limit remembers (about 150 bytes each: some 2.5 MiB a
/// table at the bound; `limits::KeyedBuckets` says what happens there).
pub const RATE_KEYS: NonZeroUsize = match NonZeroUsize::new(16_384) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

/// The header a proxy names the client in: the client first, each proxy appending the address
/// it heard from.
const FORWARDED_FOR: &str = "x-forwarded-for";

/// The Slack methods the gateway serves, for their limits and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `rtm.connect` (and `rtm.start`).
    Connect,
    AuthTest,
    GetPresence,
    SetPresence,
}

impl Method {
    /// The method's name, as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Method::Connect => "rtm.connect",
            Method::AuthTest => "auth.test",
            Method::GetPresence => "users.getPresence",
            Method::SetPresence => "users.setPresence",
        }
    }
}

/// Why a call is refused before its handler does anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The caller's address is over its rate: `ratelimited`.
    AddressRate,
    /// The caller's user is over their rate: `ratelimited`.
    UserRate,
    /// The body is larger than the cap: HTTP 413.
    BodyTooLarge,
    /// The body did not arrive within the deadline: HTTP 408, and the connection is closed.
    BodyTimeout,
    /// The body broke off (the client reset the connection): HTTP 400.
    BodyBroken,
}

/// The TCP peer of a request, as the listener saw it (`None` when it was not served by the
/// gateway's listener, as in a unit test).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0),
        ))
    }
}

/// The per-address and per-user limits of the Slack methods, and how bodies are read.
#[derive(Debug)]
pub struct Gate {
    connects_by_user: KeyedBuckets<UserId>,
    connects_by_addr: KeyedBuckets<IpAddr>,
    calls_by_user: KeyedBuckets<UserId>,
    calls_by_addr: KeyedBuckets<IpAddr>,
    trusted_proxies: Vec<Cidr>,
    body_bytes: usize,
    body_timeout: Duration,
    metrics: Arc<GatewayMetrics>,
}

impl Gate {
    /// The gate `limits` describe, counting its refusals in `metrics`.
    pub fn new(limits: &Limits, metrics: Arc<GatewayMetrics>) -> Self {
        Gate {
            connects_by_user: KeyedBuckets::new(limits.connects_per_user, RATE_KEYS),
            connects_by_addr: KeyedBuckets::new(limits.connects_per_addr, RATE_KEYS),
            calls_by_user: KeyedBuckets::new(limits.api_calls_per_user, RATE_KEYS),
            calls_by_addr: KeyedBuckets::new(limits.api_calls_per_addr, RATE_KEYS),
            trusted_proxies: limits.trusted_proxies.clone(),
            body_bytes: limits.request_body_bytes,
            body_timeout: limits.request_body_timeout,
            metrics,
        }
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy; then the
    /// rightmost `X-Forwarded-For` entry that is not a trusted proxy (entries left of it were
    /// written by the client and prove nothing). Without a peer (not served by the listener),
    /// 0.0.0.0.
    pub fn client(&self, peer: Peer, headers: &HeaderMap) -> IpAddr {
        let Some(peer) = peer.0 else {
            return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        };
        let trusted = |ip: IpAddr| self.trusted_proxies.iter().any(|c| c.contains(ip));
        let mut client = peer.ip();
        if !trusted(client) {
            return client;
        }
        // Every X-Forwarded-For header, in order, as one list; read from the right.
        let hops: Vec<&str> = headers
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.into_iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                // Garbage in the list: the last proxy that vouched is as far as it goes.
                break;
            };
            client = ip;
            if !trusted(ip) {
                break;
            }
        }
        client
    }

    /// Counts a call of `method` from `client` against the address's rate.
    pub fn by_address(&self, method: Method, client: IpAddr) -> Result<(), Refusal> {
        let buckets = match method {
            Method::Connect => &self.connects_by_addr,
            _ => &self.calls_by_addr,
        };
        if buckets.take(address_key(client), Instant::now()) {
            return Ok(());
        }
        tracing::debug!(%client, method = method.name(), "refused a call: over the address's rate");
        self.count(method, "address_rate");
        Err(Refusal::AddressRate)
    }

    /// Counts a call of `method` by `user` against the user's rate.
    pub fn by_user(&self, method: Method, user: &UserId) -> Result<(), Refusal> {
        let buckets = match method {
            Method::Connect => &self.connects_by_user,
            _ => &self.calls_by_user,
        };
        if buckets.take(user.clone(), Instant::now()) {
            return Ok(());
        }
        tracing::debug!(%user, method = method.name(), "refused a call: over the user's rate");
        self.count(method, "user_rate");
        Err(Refusal::UserRate)
    }

    fn count(&self, method: Method, reason: &str) {
        match method {
            Method::Connect => self.metrics.connect_refused(reason),
            _ => self.metrics.api_refused(method.name(), reason),
        }
    }

    /// Reads `body` whole: at most the cap, within the deadline. A body that says it is
    /// larger than the cap is refused before a byte of it is read.
    pub async fn body(&self, body: Body) -> Result<Bytes, Refusal> {
        let refused = |refusal: Refusal, reason: &str| {
            self.metrics.body_refused(reason);
            refusal
        };
        if body.size_hint().lower() > self.body_bytes as u64 {
            return Err(refused(Refusal::BodyTooLarge, "too_large"));
        }
        let read = async {
            let mut stream = body.into_data_stream();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|_| Refusal::BodyBroken)?;
                if bytes.len() + chunk.len() > self.body_bytes {
                    return Err(Refusal::BodyTooLarge);
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(Bytes::from(bytes))
        };
        match tokio::time::timeout(self.body_timeout, read).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(Refusal::BodyTooLarge)) => Err(refused(Refusal::BodyTooLarge, "too_large")),
            Ok(Err(other)) => Err(other),
            Err(_) => Err(refused(Refusal::BodyTimeout, "timeout")),
        }
    }

    /// (table, keys remembered) of each per-key limit, for the metrics.
    pub fn keys(&self) -> [(&'static str, usize); 4] {
        [
            ("connects_by_user", self.connects_by_user.len()),
            ("connects_by_addr", self.connects_by_addr.len()),
            ("calls_by_user", self.calls_by_user.len()),
            ("calls_by_addr", self.calls_by_addr.len()),
        ]
    }
}

/// One `X-Forwarded-For` entry: an address, perhaps with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn gate(limits: Limits) -> Gate {
        let telemetry = mesh_telemetry::Telemetry::new(&[("gateway", "g"), ("region", "r")]);
        Gate::new(&limits, GatewayMetrics::new(&telemetry))
    }

    fn peer(s: &str) -> Peer {
        Peer(Some(SocketAddr::new(s.parse().unwrap(), 4711)))
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let gate = gate(Limits::default());
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(gate.client(peer("192.0.2.1"), &headers), ip("192.0.2.1"));
        assert_eq!(
            gate.client(Peer(None), &headers),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_a_forged_entry_is_passed_over() {
        let gate = gate(Limits {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..Limits::default()
        });
        // Envoy appended the client; the client's own entry on the left proves nothing.
        let headers = forwarded(&["1.1.1.1, 203.0.113.9"]);
        assert_eq!(gate.client(peer("10.0.0.5"), &headers), ip("203.0.113.9"));
        // Through two trusted hops (a draining gateway forwarding what Envoy told it).
        let headers = forwarded(&["1.1.1.1", "203.0.113.9, 10.0.0.7"]);
        assert_eq!(gate.client(peer("10.0.0.5"), &headers), ip("203.0.113.9"));
        // Garbage stops at the last proxy that vouched; no header: the proxy itself.
        let headers = forwarded(&["203.0.113.9, nonsense, 10.0.0.7"]);
        assert_eq!(gate.client(peer("10.0.0.5"), &headers), ip("10.0.0.7"));
        assert_eq!(
            gate.client(peer("10.0.0.5"), &HeaderMap::new()),
            ip("10.0.0.5")
        );
        assert_eq!(parse_hop(" [2001:db8::1]:80 "), Some(ip("2001:db8::1")));
    }

    #[test]
    fn addresses_and_users_are_limited_each_on_their_own() {
        let gate = gate(Limits {
            connects_per_addr: 1,
            connects_per_user: 1,
            ..Limits::default()
        });
        let burst = crate::limits::BURST_SECS as usize;
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let admitted = (0..50)
            .filter(|_| gate.by_address(Method::Connect, a).is_ok())
            .count();
        assert_eq!(admitted, burst);
        assert_eq!(
            gate.by_address(Method::Connect, a),
            Err(Refusal::AddressRate)
        );
        assert!(gate.by_address(Method::Connect, b).is_ok());
        // The other methods have their own buckets.
        assert!(gate.by_address(Method::AuthTest, a).is_ok());
        let u1 = UserId::new("U1").unwrap();
        while gate.by_user(Method::Connect, &u1).is_ok() {}
        assert_eq!(gate.by_user(Method::Connect, &u1), Err(Refusal::UserRate));
        assert!(
            gate.by_user(Method::Connect, &UserId::new("U2").unwrap())
                .is_ok()
        );
        assert!(gate.by_user(Method::GetPresence, &u1).is_ok());
        assert_eq!(gate.keys()[0], ("connects_by_user", 2));
    }

    #[tokio::test]
    async fn bodies_are_read_under_the_cap() {
        let gate = gate(Limits {
            request_body_bytes: 8,
            ..Limits::default()
        });
        assert_eq!(
            gate.body(Body::from("12345678")).await.unwrap(),
            Bytes::from_static(b"12345678")
        );
        assert_eq!(
            gate.body(Body::from("123456789")).await,
            Err(Refusal::BodyTooLarge)
        );
        // A body that does not say its length, over the cap as it streams.
        let chunks = futures::stream::iter(["12345", "6789"].map(Ok::<_, std::io::Error>));
        assert_eq!(
            gate.body(Body::from_stream(chunks)).await,
            Err(Refusal::BodyTooLarge)
        );
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_refused() {
        let gate = gate(Limits {
            request_body_timeout: Duration::from_millis(50),
            ..Limits::default()
        });
        let never = futures::stream::pending::<Result<Bytes, std::io::Error>>();
        assert_eq!(
            gate.body(Body::from_stream(never)).await,
            Err(Refusal::BodyTimeout)
        );
    }
}
