//! This gateway's place in its region: it reports itself to the ring manager about every half
//! second, and when its region drains it fails its health check, sends `rtm.connect` callers to
//! the nearest healthy region (with resume cursors), and says goodbye to its clients in paced
//! batches — lame duck, no reconnect storm. The same reports bring the token revocation list:
//! revoked tokens are refused, and connections holding them closed (4003).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_core::{ChannelId, Ts, UserId};
use mesh_proto::ring::GatewayReport;
use mesh_proto::ring::ring_manager_client::RingManagerClient;

use crate::Shared;
use crate::hub::{CloseReason, Closer, ConnId};

/// How often the gateway reports itself.
const REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// How often a draining gateway says goodbye to its next batch.
const DRAIN_TICK: Duration = Duration::from_millis(100);
/// How long a goodbye'd connection's cursors wait for its reconnect.
const HANDOVER_TTL: Duration = Duration::from_secs(60);
/// The most goodbye'd connections whose cursors are kept.
const MAX_HANDOVERS: usize = 200_000;
/// How long one report or forwarded `rtm.connect` may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The most revoked tokens a gateway holds (the ring manager holds at most as many; more
/// here only after a ring manager restart, from two generations).
pub const MAX_REVOKED: usize = 200_000;

/// A goodbye'd connection's cursors, and when it left.
type Handover = (Vec<(ChannelId, Ts)>, Instant);

/// The region's drain state as this gateway knows it, and the connections it can close.
#[derive(Debug, Default)]
pub struct RegionState {
    draining: AtomicBool,
    rate: AtomicU32,
    redirect: Mutex<Vec<String>>,
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

impl RegionState {
    /// Whether the region drains.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Base URLs of healthy gateways to send clients to, nearest first.
    pub fn redirect(&self) -> Vec<String> {
        lock(&self.redirect).clone()
    }

    /// The HTTP client for forwarded `rtm.connect` calls (pooled connections, one per gateway).
    pub fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            reqwest::Client::builder()
                .no_proxy()
                .timeout(CALL_TIMEOUT)
                .build()
                .unwrap_or_default()
        })
    }

    pub fn register(&self, conn: ConnId, closer: Arc<Closer>) {
        lock(&self.conns).insert(conn, closer.clone());
        // A revocation that arrived between the upgrade's check and now found no closer.
        let jti = lock(&self.conn_jtis).get(&conn).cloned();
        if jti.is_some_and(|j| self.is_revoked(&j)) && closer.close(CloseReason::Revoked) {
            tracing::info!(conn, "closing a connection whose token was revoked");
        }
    }

    pub fn unregister(&self, conn: ConnId) {
        lock(&self.conns).remove(&conn);
        lock(&self.conn_jtis).remove(&conn);
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
    fn revocations_held(&self) -> (u64, u64) {
        let revoked = lock(&self.revoked);
        (revoked.generation, revoked.version)
    }

    /// Adds a directive's revocations and closes the open connections they name.
    fn apply_revocations(&self, directive: &mesh_proto::ring::GatewayDirective) {
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
                && closer.close(CloseReason::Revoked)
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
    fn close_batch(&self, n: usize) -> usize {
        let conns = lock(&self.conns);
        let mut closed = 0;
        for closer in conns.values() {
            if closed == n {
                break;
            }
            if closer.reason.set(CloseReason::Drain).is_ok() {
                closer.token.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Reports this gateway until it stops, and drains it while its region drains.
pub async fn run(shared: Arc<Shared>, gateway: String) {
    let region = &shared.region_state;
    let mut client: Option<RingManagerClient<tonic::transport::Channel>> = None;
    let mut report = tokio::time::interval(REPORT_INTERVAL);
    let mut tick = tokio::time::interval(DRAIN_TICK);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = report.tick() => {
                let (revocations_generation, revocations_version) = region.revocations_held();
                let request = GatewayReport {
                    revocations_generation,
                    revocations_version,
                    gateway: gateway.clone(),
                    region: shared.region.clone(),
                    url: shared.http_url.clone(),
                    connections: shared.connections.load(Ordering::Relaxed),
                };
                if client.is_none() {
                    client = connect(&shared).await;
                }
                let Some(c) = client.as_mut() else { continue };
                match tokio::time::timeout(CALL_TIMEOUT, c.report_gateway(request)).await {
                    Ok(Ok(directive)) => {
                        let directive = directive.into_inner();
                        region.apply_revocations(&directive);
                        let was = region.draining.swap(directive.draining, Ordering::Relaxed);
                        if was != directive.draining {
                            tracing::info!(draining = directive.draining, rate = directive.rate, redirect = ?directive.redirect, "region drain state changed");
                        }
                        region.rate.store(directive.rate, Ordering::Relaxed);
                        *lock(&region.redirect) = directive.redirect;
                    }
                    // The ring manager is away: keep the last directive (static stability).
                    _ => client = None,
                }
            }
            _ = tick.tick() => {
                if region.draining() && !region.redirect().is_empty() {
                    let per_tick = (region.rate.load(Ordering::Relaxed) as usize / 10).max(1);
                    region.close_batch(per_tick);
                }
            }
        }
    }
}

async fn connect(shared: &Shared) -> Option<RingManagerClient<tonic::transport::Channel>> {
    let endpoint = shared.ring_source.endpoint().await.ok()?;
    let channel = mesh_transport::endpoint(&endpoint)
        .ok()?
        .connect_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .ok()?;
    Some(RingManagerClient::new(channel))
}

/// Renders cursors as the `cursors` parameter: `C1:TS1,C2:TS2`.
pub fn cursors_param(cursors: &[(ChannelId, Ts)]) -> String {
    cursors
        .iter()
        .map(|(c, ts)| format!("{c}:{ts}"))
        .collect::<Vec<_>>()
        .join(",")
}
