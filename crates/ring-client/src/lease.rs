//! A channel server's lease: heartbeats to the ring manager, and whether the server may serve.
//!
//! Each reply renews the lease until the *sending* time of the heartbeat it answers plus the
//! lease length, which is shorter than the silence after which the ring manager suspects the
//! node: a node therefore stops serving before anyone can take its slots (fencing).
//!
//! Static stability: when the ring manager cannot be reached at all (its connection is refused
//! or fails), nobody can reassign slots either, so the node keeps serving on the last ring it
//! knows. A lapsed lease with the ring manager reachable, or a revoked one, stops it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_proto::ring::Heartbeat;
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use tokio_stream::wrappers::IntervalStream;
use tokio_util::sync::CancellationToken;

use crate::source::RingSource;

/// How long one connect to the ring manager may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between reconnects of the lease stream.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Heartbeats remembered for matching replies to their sending time.
const SENT_LOG: usize = 64;

/// What the node may do now.
#[derive(Debug, Default)]
struct LeaseState {
    /// Serving is allowed until then.
    valid_until: Option<Instant>,
    /// The ring manager cannot be reached: keep serving on the last ring (static stability).
    unreachable: bool,
    /// The ring manager declared this incarnation down.
    revoked: bool,
}

/// A lease held by one incarnation of a channel server; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    state: Arc<Mutex<LeaseState>>,
    handed_off_epoch: Arc<AtomicU64>,
}

/// How a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnd {
    /// The ring manager revoked it: register again, as a new incarnation.
    Revoked,
    /// The server is shutting down.
    Cancelled,
}

impl Lease {
    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the node may serve traffic now.
    pub fn is_serving(&self) -> bool {
        let s = self.state();
        !s.revoked && (s.unreachable || s.valid_until.is_some_and(|t| Instant::now() < t))
    }

    /// Why the node may not serve, for error messages.
    pub fn why_not_serving(&self) -> &'static str {
        let s = self.state();
        if s.revoked {
            "lease revoked: this node was declared down"
        } else {
            "lease lapsed: no word from the ring manager"
        }
    }

    /// Starts afresh for a new incarnation: not serving until its first renewal.
    pub fn reset(&self) {
        *self.state() = LeaseState::default();
    }

    /// Reports that every outgoing handoff of `epoch` is done (drain progress).
    pub fn handed_off(&self, epoch: u64) {
        self.handed_off_epoch.fetch_max(epoch, Ordering::Relaxed);
    }

    /// Holds the lease of `node`'s `incarnation` with the ring manager `source` leads to until
    /// it is revoked or `cancel` fires, reconnecting (and finding the leader again) as needed.
    pub async fn hold(
        &self,
        source: &RingSource,
        node: &str,
        incarnation: u64,
        interval: Duration,
        lease: Duration,
        cancel: &CancellationToken,
    ) -> LeaseEnd {
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                r = self.session(source, node, incarnation, interval, lease, cancel) => r,
            };
            match result {
                Ok(()) => return LeaseEnd::Revoked,
                Err(unreachable) => {
                    if unreachable {
                        let mut s = self.state();
                        if !s.unreachable {
                            tracing::warn!(%source, "ring manager unreachable; serving on the last ring");
                        }
                        s.unreachable = true;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            }
        }
    }

    /// One lease stream. `Ok` when revoked; `Err(unreachable)` when the stream could not be
    /// opened (`true`: the ring manager is not there) or ended.
    async fn session(
        &self,
        source: &RingSource,
        node: &str,
        incarnation: u64,
        interval: Duration,
        lease: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), bool> {
        // The request stream is driven by the transport's own task: it must end by itself when
        // this session does (returns, is dropped, or the server shuts down), or the ring manager
        // would keep hearing heartbeats from a node that stopped.
        let session = cancel.child_token();
        let _end_heartbeats = session.clone().drop_guard();
        // No leader to be found (or Consul unreachable) counts as an unreachable ring manager:
        // nobody can reassign slots then either.
        let endpoint = source.endpoint().await.map_err(|_| true)?;
        let channel = mesh_transport::endpoint(&endpoint)
            .map_err(|_| true)?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|_| true)?;
        let sent: Arc<Mutex<VecDeque<(u64, Instant)>>> = Arc::default();
        let log = sent.clone();
        let handed_off = self.handed_off_epoch.clone();
        let node = node.to_string();
        let mut seq = 0u64;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeats = IntervalStream::new(ticker)
            .take_until(session.cancelled_owned())
            .map(move |_| {
                seq += 1;
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                if log.len() == SENT_LOG {
                    log.pop_front();
                }
                log.push_back((seq, Instant::now()));
                Heartbeat {
                    node_id: node.clone(),
                    incarnation,
                    seq,
                    handed_off_epoch: handed_off.load(Ordering::Relaxed),
                }
            });
        let mut replies = RingManagerClient::new(channel)
            .lease(heartbeats)
            .await
            .map_err(|s| s.code() == tonic::Code::Unavailable)?
            .into_inner();
        while let Some(reply) = replies.message().await.map_err(|_| false)? {
            if !reply.valid {
                tracing::warn!(incarnation, "the ring manager revoked this node's lease");
                let mut s = self.state();
                s.revoked = true;
                s.valid_until = None;
                return Ok(());
            }
            let sent_at = sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(s, _)| *s == reply.seq)
                .map(|(_, t)| *t);
            if let Some(sent_at) = sent_at {
                let mut s = self.state();
                s.valid_until = Some(sent_at + lease);
                s.unreachable = false;
            }
        }
        Err(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_lease_does_not_serve_until_renewed() {
        let lease = Lease::default();
        assert!(!lease.is_serving());
        lease.state().valid_until = Some(Instant::now() + Duration::from_secs(60));
        assert!(lease.is_serving());
        lease.state().valid_until = Some(Instant::now() - Duration::from_millis(1));
        assert!(
            !lease.is_serving(),
            "a lapsed lease with the ring manager reachable fences"
        );
        lease.state().unreachable = true;
        assert!(
            lease.is_serving(),
            "static stability: no ring manager, keep serving"
        );
        lease.state().revoked = true;
        assert!(!lease.is_serving(), "a revoked lease always fences");
    }
}
