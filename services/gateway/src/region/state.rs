//! What this gateway knows of its region, as the ring manager's directives say it: whether the
//! region drains (and where to send clients meanwhile), the revoked tokens, the web app's
//! disconnect orders; and what it can do
//! about it: the open connections it can close, the cursors of goodbye'd connections kept for
//! their reconnect. State only: the report task talks to the ring manager.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_core::{ChannelId, TeamId, Ts, UserId};
use mesh_proto::ring::GatewayDirective;
use mesh_telemetry::prometheus::IntCounter;
use reqwest::Url;

use super::allow::RedirectAllow;
use super::disconnects::{Disconnects, Order};

use crate::close::{Close, Closer};
use crate::vocab::ConnId;

/// How long a goodbye'd connection's cursors wait for its reconnect.
const HANDOVER_TTL: Duration = Duration::from_secs(60);
/// The most goodbye'd connections whose cursors are kept.
const MAX_HANDOVERS: usize = 200_000;
/// How long one report or forwarded `rtm.connect` may take.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The most revoked tokens a gateway holds (the ring manager holds at most as many; more
/// here only after a ring manager restart, from two generations).
pub const MAX_REVOKED: usize = 200_000;

/// The most refused redirect targets logged (each once): reports are not a way to fill a log.
const MAX_WARNED_TARGETS: usize = 1_000;

/// A goodbye'd connection's cursors, and when it left.
type Handover = (Vec<(ChannelId, Ts)>, Instant);

/// The region's drain state as this gateway knows it, and the connections it can close.
#[derive(Debug, Default)]
pub struct RegionState {
    draining: AtomicBool,
    rate: AtomicU32,
    redirect: Mutex<Vec<String>>,
    /// Where `rtm.connect` may be forwarded (`--redirect-allow`), and what is refused.
    allow: RedirectAllow,
    refused: Option<IntCounter>,
    warned: Mutex<HashSet<String>>,
    /// Open connections, to say goodbye to.
    conns: Mutex<HashMap<ConnId, Arc<Closer>>>,
    /// Cursors of connections that said goodbye, per user, oldest first.
    handover: Mutex<HashMap<UserId, VecDeque<Handover>>>,
    handovers: Mutex<usize>,
    /// The client that forwards `rtm.connect` to the healthy region, built once.
    http: std::sync::OnceLock<reqwest::Client>,
    /// Revoked tokens, as the ring manager's directives bring them.
    revoked: Mutex<Revoked>,
    /// The `jti` of each open connection's token, for closing revoked ones.
    conn_jtis: Mutex<HashMap<ConnId, String>>,
    /// The web app's disconnect orders, and each connection's user and team to match them.
    disconnects: Mutex<Disconnects>,
}

/// The revocation list a gateway holds.
#[derive(Debug, Default)]
struct Revoked {
    /// The ring manager generation and version it is up to date with.
    generation: u64,
    version: u64,
    /// jti -> expires_at (Unix seconds).
    jtis: HashMap<String, u64>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Closes connection `conn` for disconnect `order`, with its reason text.
fn disconnect(conn: ConnId, closer: &Closer, order: &Order) {
    if closer.close_saying(order.close(), Some(&order.reason)) {
        tracing::info!(conn, user = %order.user, reconnect = order.reconnect, "closing a connection the web app disconnected");
    }
}

impl RegionState {
    /// A region state that forwards `rtm.connect` only to gateways `allow` allows, counting in
    /// `refused` the targets it skips. (`Default`: no redirects, nothing counted.)
    pub fn new(allow: RedirectAllow, refused: IntCounter) -> Self {
        RegionState {
            allow,
            refused: Some(refused),
            ..RegionState::default()
        }
    }

    /// Whether the region drains.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Base URLs of healthy gateways to send clients to, nearest first.
    pub fn redirect(&self) -> Vec<String> {
        lock(&self.redirect).clone()
    }

    /// Where to forward `rtm.connect` now: the `rtm.connect` URLs of the directive's gateways
    /// that `--redirect-allow` allows, nearest first. Each target refused is counted, and
    /// logged at warn the first time. With no allowlist redirects are off: nothing is
    /// considered, counted or logged (the gateway said so at start).
    pub fn redirect_to(&self) -> Vec<Url> {
        let mut urls = Vec::new();
        if self.allow.is_empty() {
            return urls;
        }
        for target in self.redirect() {
            match self.allow.connect_url(&target) {
                Some(url) => urls.push(url),
                None => self.refuse(&target),
            }
        }
        urls
    }

    /// Whether a draining gateway has somewhere to send its clients: an allowed target.
    pub(super) fn has_redirect(&self) -> bool {
        let targets = lock(&self.redirect);
        targets.iter().any(|t| self.allow.connect_url(t).is_some())
    }

    fn refuse(&self, target: &str) {
        if let Some(refused) = &self.refused {
            refused.inc();
        }
        let mut warned = lock(&self.warned);
        if warned.len() < MAX_WARNED_TARGETS && warned.insert(target.to_string()) {
            tracing::warn!(%target, "not forwarding rtm.connect to a gateway that is not on --redirect-allow");
        }
    }

    /// The HTTP client for forwarded `rtm.connect` calls (pooled connections, one per gateway).
    /// It follows no HTTP redirect: only the allowed URL is ever called.
    pub fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(CALL_TIMEOUT)
                .build()
                .unwrap_or_default()
        })
    }

    /// Connection `conn` is open and can be closed through `closer` (it is closed at once if
    /// its token was revoked meanwhile).
    pub fn register(&self, conn: ConnId, closer: Arc<Closer>) {
        lock(&self.conns).insert(conn, closer.clone());
        // A revocation that arrived between the upgrade's check and now found no closer.
        let jti = lock(&self.conn_jtis).get(&conn).cloned();
        if jti.is_some_and(|j| self.is_revoked(&j)) && closer.close(Close::Revoked) {
            tracing::info!(conn, "closing a connection whose token was revoked");
        }
        // A disconnect that arrived while it was opening found no closer either.
        let pending = lock(&self.disconnects).pending_for(conn).cloned();
        if let Some(order) = pending {
            disconnect(conn, &closer, &order);
        }
    }

    /// Connection `conn` ended.
    pub fn unregister(&self, conn: ConnId) {
        lock(&self.conns).remove(&conn);
        lock(&self.conn_jtis).remove(&conn);
        lock(&self.disconnects).closed(conn);
    }

    /// Notes the user and team of connection `conn` as its WebSocket opens (before it
    /// registers), so that a disconnect order arriving from now on closes it.
    pub fn track_user(&self, conn: ConnId, user: UserId, team: TeamId) {
        lock(&self.disconnects).opened(conn, user, team, Instant::now());
    }

    /// The (generation, version) of the disconnect orders taken, for the report.
    pub(super) fn disconnects_held(&self) -> (u64, u64) {
        lock(&self.disconnects).held()
    }

    /// Takes a directive's disconnect orders and closes the open connections they match.
    fn apply_disconnects(&self, directive: &GatewayDirective) {
        let orders = directive
            .disconnects
            .iter()
            .filter_map(Order::from_proto)
            .collect();
        let held = (
            directive.disconnects_generation,
            directive.disconnects_version,
        );
        let doomed = lock(&self.disconnects).take(held, orders, Instant::now());
        if doomed.is_empty() {
            return;
        }
        let conns = lock(&self.conns);
        for (conn, order) in doomed {
            if let Some(closer) = conns.get(&conn) {
                disconnect(conn, closer, &order);
            }
        }
    }

    /// Notes the `jti` of connection `conn`'s token (before it registers), so that revoking it
    /// closes the connection.
    pub fn track_jti(&self, conn: ConnId, jti: String) {
        lock(&self.conn_jtis).insert(conn, jti);
    }

    /// Whether the token `jti` is revoked (and not yet expired).
    pub fn is_revoked(&self, jti: &str) -> bool {
        lock(&self.revoked)
            .jtis
            .get(jti)
            .is_some_and(|&expires_at| expires_at > unix_now())
    }

    /// How many revoked tokens this gateway holds.
    pub fn revoked_count(&self) -> usize {
        lock(&self.revoked).jtis.len()
    }

    /// The (generation, version) of the revocation list held, for the report.
    pub(super) fn revocations_held(&self) -> (u64, u64) {
        let revoked = lock(&self.revoked);
        (revoked.generation, revoked.version)
    }

    /// Takes in a directive of the ring manager: the drain state, its pace and where to send
    /// clients, and the revocations.
    pub(super) fn apply(&self, directive: &GatewayDirective) {
        self.apply_revocations(directive);
        self.apply_disconnects(directive);
        let was = self.draining.swap(directive.draining, Ordering::Relaxed);
        if was != directive.draining {
            tracing::info!(draining = directive.draining, rate = directive.rate, redirect = ?directive.redirect, "region drain state changed");
        }
        self.rate.store(directive.rate, Ordering::Relaxed);
        *lock(&self.redirect) = directive.redirect.clone();
    }

    /// Goodbyes per second while draining.
    pub(super) fn rate(&self) -> u32 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Adds a directive's revocations and closes the open connections they name.
    fn apply_revocations(&self, directive: &GatewayDirective) {
        let now = unix_now();
        let mut added = Vec::new();
        {
            let mut revoked = lock(&self.revoked);
            revoked.generation = directive.revocations_generation;
            revoked.version = directive.revocations_version;
            if directive.revoked.is_empty() {
                return;
            }
            if revoked.jtis.len() + directive.revoked.len() > MAX_REVOKED {
                revoked.jtis.retain(|_, expires_at| *expires_at > now);
            }
            for entry in &directive.revoked {
                if entry.expires_at <= now {
                    continue;
                }
                if revoked.jtis.len() >= MAX_REVOKED && !revoked.jtis.contains_key(&entry.jti) {
                    tracing::warn!(
                        held = revoked.jtis.len(),
                        "revocation list full; dropping a revocation"
                    );
                    continue;
                }
                let expiry = revoked.jtis.entry(entry.jti.clone()).or_insert(0);
                *expiry = (*expiry).max(entry.expires_at);
                added.push(entry.jti.as_str());
            }
        }
        if added.is_empty() {
            return;
        }
        let added: std::collections::HashSet<&str> = added.into_iter().collect();
        let doomed: Vec<ConnId> = lock(&self.conn_jtis)
            .iter()
            .filter(|(_, jti)| added.contains(jti.as_str()))
            .map(|(conn, _)| *conn)
            .collect();
        let conns = lock(&self.conns);
        for conn in doomed {
            if let Some(closer) = conns.get(&conn)
                && closer.close(Close::Revoked)
            {
                tracing::info!(conn, "closing a connection whose token was revoked");
            }
        }
    }

    /// Keeps a goodbye'd connection's cursors for its user's next `rtm.connect`.
    pub fn hand_over(&self, user: UserId, cursors: Vec<(ChannelId, Ts)>) {
        let now = Instant::now();
        let mut map = lock(&self.handover);
        let mut count = lock(&self.handovers);
        if *count >= MAX_HANDOVERS {
            map.retain(|_, q| {
                q.retain(|(_, at)| now.duration_since(*at) < HANDOVER_TTL);
                !q.is_empty()
            });
            *count = map.values().map(VecDeque::len).sum();
            if *count >= MAX_HANDOVERS {
                return;
            }
        }
        map.entry(user).or_default().push_back((cursors, now));
        *count += 1;
    }

    /// The cursors of `user`'s oldest goodbye'd connection, if any is waiting.
    pub fn take_handover(&self, user: &UserId) -> Option<Vec<(ChannelId, Ts)>> {
        let mut map = lock(&self.handover);
        let queue = map.get_mut(user)?;
        let mut found = None;
        while let Some((cursors, at)) = queue.pop_front() {
            *lock(&self.handovers) -= 1;
            if at.elapsed() < HANDOVER_TTL {
                found = Some(cursors);
                break;
            }
        }
        if queue.is_empty() {
            map.remove(user);
        }
        found
    }

    /// Says goodbye to up to `n` connections.
    pub(super) fn close_batch(&self, n: usize) -> usize {
        let conns = lock(&self.conns);
        let mut closed = 0;
        for closer in conns.values() {
            if closed == n {
                break;
            }
            if closer.close(Close::Draining) {
                closed += 1;
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::ring::RevokedToken;

    use super::*;

    fn revoke(jtis: &[&str], expires_at: u64) -> GatewayDirective {
        GatewayDirective {
            revoked: jtis
                .iter()
                .map(|jti| RevokedToken {
                    jti: jti.to_string(),
                    expires_at,
                })
                .collect(),
            revocations_generation: 7,
            revocations_version: 3,
            ..GatewayDirective::default()
        }
    }

    #[test]
    fn a_revocation_closes_the_connections_holding_the_token() {
        let region = RegionState::default();
        let (a, b) = (Arc::new(Closer::default()), Arc::new(Closer::default()));
        region.track_jti(1, "j1".into());
        region.track_jti(2, "j2".into());
        region.register(1, a.clone());
        region.register(2, b.clone());
        region.apply(&revoke(&["j1"], unix_now() + 60));
        assert_eq!(a.reason(), Some(Close::Revoked));
        assert_eq!(b.reason(), None);
        assert!(region.is_revoked("j1") && !region.is_revoked("j2"));
        assert_eq!(region.revocations_held(), (7, 3));
        // A connection that registers after its token was revoked is closed at once.
        let c = Arc::new(Closer::default());
        region.track_jti(3, "j1".into());
        region.register(3, c.clone());
        assert_eq!(c.reason(), Some(Close::Revoked));
        // Expired revocations are not taken.
        region.apply(&revoke(&["j2"], unix_now().saturating_sub(1)));
        assert_eq!(b.reason(), None);
        assert_eq!(region.revoked_count(), 1);
    }

    #[test]
    fn a_disconnect_order_closes_the_users_open_and_opening_connections_with_its_reason() {
        use mesh_proto::ring::DisconnectOrder;
        let region = RegionState::default();
        let (u1, u2) = (UserId::new("U1").unwrap(), UserId::new("U2").unwrap());
        let (t1, t2) = (TeamId::new("T1").unwrap(), TeamId::new("T2").unwrap());
        let closers: Vec<Arc<Closer>> = (0..4).map(|_| Arc::new(Closer::default())).collect();
        region.track_user(0, u1.clone(), t1.clone());
        region.track_user(1, u1.clone(), t2.clone());
        region.track_user(2, u2.clone(), t1.clone());
        // Connection 3 is still opening (tracked, not registered) when the order comes.
        region.track_user(3, u1.clone(), t1.clone());
        for (conn, closer) in closers.iter().take(3).enumerate() {
            region.register(conn as ConnId, closer.clone());
        }
        region.apply(&GatewayDirective {
            disconnects: vec![DisconnectOrder {
                user: "U1".into(),
                team: "T1".into(),
                reason: "account suspended".into(),
                reconnect: false,
                issued_at_ms: 1,
            }],
            disconnects_generation: 9,
            disconnects_version: 4,
            ..GatewayDirective::default()
        });
        assert_eq!(region.disconnects_held(), (9, 4));
        let closed = Some(Close::Disconnected { reconnect: false });
        assert_eq!(closers[0].reason(), closed);
        assert_eq!(closers[0].text(), Some("account suspended"));
        assert_eq!(closers[1].reason(), None, "another team's connection stays");
        assert_eq!(closers[2].reason(), None, "another user's connection stays");
        region.register(3, closers[3].clone());
        assert_eq!(closers[3].reason(), closed, "closed as it registers");
        // A connection opened after the order is not touched.
        let later = Arc::new(Closer::default());
        region.track_user(4, u1, t1);
        region.register(4, later.clone());
        assert_eq!(later.reason(), None);
    }

    #[test]
    fn a_drain_says_goodbye_in_batches_to_connections_still_open() {
        let region = RegionState::default();
        let closers: Vec<Arc<Closer>> = (0..5).map(|_| Arc::new(Closer::default())).collect();
        for (conn, closer) in closers.iter().enumerate() {
            region.register(conn as ConnId, closer.clone());
        }
        region.apply(&GatewayDirective {
            draining: true,
            rate: 20,
            redirect: vec!["http://elsewhere".into()],
            ..GatewayDirective::default()
        });
        assert!(region.draining());
        assert_eq!((region.rate(), region.redirect().len()), (20, 1));
        // One already closing is not counted again.
        closers[0].close(Close::QueueOverflow);
        region.unregister(4);
        assert_eq!(region.close_batch(2), 2);
        assert_eq!(region.close_batch(2), 1);
        assert_eq!(region.close_batch(2), 0);
        let reasons: Vec<Option<Close>> = closers.iter().map(|c| c.reason()).collect();
        assert_eq!(reasons[0], Some(Close::QueueOverflow));
        assert!(reasons[1..4].iter().all(|r| *r == Some(Close::Draining)));
        assert_eq!(reasons[4], None);
        region.apply(&GatewayDirective::default());
        assert!(!region.draining() && region.redirect().is_empty());
    }

    #[test]
    fn handed_over_cursors_wait_for_their_users_oldest_first() {
        let region = RegionState::default();
        let user = UserId::new("U1").unwrap();
        let cursor = |ts: &str| vec![(ChannelId::new("C1").unwrap(), Ts::parse(ts).unwrap())];
        region.hand_over(user.clone(), cursor("1700000000.000001"));
        region.hand_over(user.clone(), cursor("1700000000.000002"));
        assert_eq!(
            region.take_handover(&user),
            Some(cursor("1700000000.000001"))
        );
        assert_eq!(
            region.take_handover(&user),
            Some(cursor("1700000000.000002"))
        );
        assert_eq!(region.take_handover(&user), None);
        assert_eq!(*lock(&region.handovers), 0);
    }
}
