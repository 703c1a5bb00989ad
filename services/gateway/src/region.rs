//! This gateway's place in its region: it reports itself to the ring manager about every half
//! second, and when its region drains it fails its health check, sends `rtm.connect` callers to
//! the nearest healthy region (with resume cursors), and says goodbye to its clients in paced
//! batches — lame duck, no reconnect storm.

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
        lock(&self.conns).insert(conn, closer);
    }

    pub fn unregister(&self, conn: ConnId) {
        lock(&self.conns).remove(&conn);
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
                let request = GatewayReport {
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
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
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
