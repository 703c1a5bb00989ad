//! Following the ring: a watch over the ring manager's stream (or Consul KV) that reconnects by
//! itself, and finding the ring manager to register with.
//!
//! Routers (admin servers, gateways, channel servers) read the latest ring from a
//! `watch::Receiver`; while the ring manager is unreachable they keep the last ring they saw.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::Ring;
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use mesh_proto::ring::{GetRingRequest, RegisterRequest, RegisterResponse, WatchRingRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::consul_ring::ConsulRing;
use crate::convert::ring_from_proto;

/// The first and the longest pause between reconnects to the ring manager.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long one connect attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a service finds the ring and the ring manager.
#[derive(Debug, Clone)]
pub enum RingSource {
    /// The embedded ring manager at this gRPC endpoint (e.g. `http://127.0.0.1:50050`): it
    /// publishes the ring by a watch stream.
    Direct(String),
    /// Consul: the ring in KV, followed by blocking queries; the leading ring manager's endpoint
    /// in its lock key.
    Consul(ConsulRing),
}

impl RingSource {
    /// The gRPC endpoint of the ring manager to talk to now.
    pub async fn endpoint(&self) -> Result<String, Error> {
        match self {
            RingSource::Direct(endpoint) => Ok(endpoint.clone()),
            RingSource::Consul(ring) => ring
                .leader()
                .await?
                .map(|l| l.endpoint)
                .ok_or(Error::NoLeader),
        }
    }
}

impl std::fmt::Display for RingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingSource::Direct(endpoint) => f.write_str(endpoint),
            RingSource::Consul(ring) => write!(f, "consul {} ({})", ring.consul.url(), ring.prefix),
        }
    }
}

/// A live view of the ring published by a ring manager.
#[derive(Debug, Clone)]
pub struct RingWatcher {
    rx: watch::Receiver<Arc<Ring>>,
}

impl RingWatcher {
    /// Starts following the ring from `source` on a task tracked by `tracker` that ends with
    /// `cancel`.
    pub fn spawn(source: RingSource, tracker: &TaskTracker, cancel: CancellationToken) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Ring::empty()));
        match source {
            RingSource::Direct(endpoint) => tracker.spawn(follow(endpoint, tx, cancel)),
            RingSource::Consul(ring) => tracker.spawn(crate::consul_ring::follow(ring, tx, cancel)),
        };
        RingWatcher { rx }
    }

    /// The latest ring.
    pub fn current(&self) -> Arc<Ring> {
        self.rx.borrow().clone()
    }

    /// A receiver that wakes on every new ring.
    pub fn receiver(&self) -> watch::Receiver<Arc<Ring>> {
        self.rx.clone()
    }

    /// Waits until the ring satisfies `pred`, at most `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl FnMut(&Arc<Ring>) -> bool,
    ) -> Result<Arc<Ring>, Error> {
        let mut rx = self.rx.clone();
        match tokio::time::timeout(timeout, rx.wait_for(pred)).await {
            Ok(Ok(ring)) => Ok(ring.clone()),
            Ok(Err(_)) => Err(Error::Timeout(format!("{what}: ring watch closed"))),
            Err(_) => Err(Error::Timeout(format!("{what} within {timeout:?}"))),
        }
    }

    /// Calls `f` with each ring published since this watcher was created (the latest one
    /// whenever several came at once), until `cancel` fires.
    pub async fn on_each_change(&self, cancel: CancellationToken, mut f: impl FnMut(Arc<Ring>)) {
        let mut rx = self.rx.clone();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let ring = rx.borrow_and_update().clone();
            f(ring);
        }
    }

    /// Waits for a ring of at least epoch `epoch`.
    pub async fn wait_for_epoch(&self, epoch: u64, timeout: Duration) -> Result<Arc<Ring>, Error> {
        self.wait_for(timeout, &format!("ring epoch {epoch}"), |r| {
            r.epoch() >= epoch
        })
        .await
    }
}

async fn follow(endpoint: String, tx: watch::Sender<Arc<Ring>>, cancel: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = follow_once(&endpoint, &tx, &mut backoff) => r,
        };
        if let Err(e) = result {
            tracing::warn!(%endpoint, error = %e, retry_in = ?backoff, "ring watch interrupted");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One watch session; returns when the stream ends or fails.
async fn follow_once(
    endpoint: &str,
    tx: &watch::Sender<Arc<Ring>>,
    backoff: &mut Duration,
) -> Result<(), Error> {
    let channel = mesh_transport::endpoint(endpoint)?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await?;
    let mut stream = RingManagerClient::new(channel)
        .watch_ring(WatchRingRequest {})
        .await?
        .into_inner();
    while let Some(ring) = stream.message().await? {
        *backoff = BACKOFF_MIN;
        offer(tx, ring_from_proto(ring)?);
    }
    Ok(())
}

/// Puts `next` on `tx` if it supersedes the ring there ([`Ring::supersedes`]: a higher epoch
/// of the same generation, or another generation's assignment, which replaces the ring
/// wholesale); returns whether it did. Every follower of the ring (the ring manager's stream,
/// Consul KV) decides by this.
pub(crate) fn offer(tx: &watch::Sender<Arc<Ring>>, next: Ring) -> bool {
    let current = tx.borrow().clone();
    if !next.supersedes(&current) {
        let same_history = next.generation() == current.generation()
            || next.generation() == 0
            || current.generation() == 0;
        if next.epoch() < current.epoch() && same_history {
            tracing::warn!(
                seen = current.epoch(),
                got = next.epoch(),
                "ring manager sent an older epoch; keeping the newer ring"
            );
        }
        return false;
    }
    if current.generation() != 0 && next.generation() != current.generation() {
        tracing::warn!(
            from_generation = current.generation(),
            from_epoch = current.epoch(),
            generation = next.generation(),
            epoch = next.epoch(),
            "the ring manager's ring was reset (a new generation); following the new ring"
        );
    }
    tx.send_replace(Arc::new(next));
    true
}

/// The generation of the ring the ring manager `source` leads to serves now (one attempt).
pub async fn generation(source: &RingSource) -> Result<u64, Error> {
    let endpoint = source.endpoint().await?;
    let channel = mesh_transport::endpoint(&endpoint)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CONNECT_TIMEOUT)
        .connect()
        .await?;
    let ring = RingManagerClient::new(channel)
        .get_ring(GetRingRequest {})
        .await?
        .into_inner();
    Ok(ring.generation)
}

/// Registers a channel server with the ring manager `source` leads to, retrying until it
/// answers or `timeout` passes.
pub async fn register(
    source: &RingSource,
    request: RegisterRequest,
    timeout: Duration,
) -> Result<RegisterResponse, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = async {
            let endpoint = source.endpoint().await?;
            let channel = mesh_transport::endpoint(&endpoint)?
                .connect_timeout(CONNECT_TIMEOUT)
                .connect()
                .await?;
            let reply = RingManagerClient::new(channel)
                .register(request.clone())
                .await?;
            Ok::<_, Error>(reply.into_inner())
        };
        match attempt.await {
            Ok(reply) => return Ok(reply),
            Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                tracing::warn!(%source, error = %e, "registering with the ring manager; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(generation: u64, epoch: u64, nodes: usize) -> Ring {
        let members: Vec<mesh_core::RingNode> = (0..nodes)
            .map(|i| mesh_core::RingNode {
                id: mesh_core::NodeId::new(&format!("cs-{i}")).unwrap(),
                addr: format!("127.0.0.1:{}", 7000 + i),
            })
            .collect();
        let start = epoch.saturating_sub(1);
        Ring::from_parts(start, Vec::new(), Vec::new())
            .unwrap()
            .rebalanced(&members)
            .with_generation(generation)
    }

    #[test]
    fn a_follower_takes_newer_epochs_and_a_reset_to_another_generation() {
        let (tx, rx) = watch::channel(Arc::new(Ring::empty()));
        let take = |r: Ring| offer(&tx, r);
        assert!(take(ring(7, 5, 3)));
        assert!(!take(ring(7, 4, 3)), "an older epoch of the same history");
        assert!(!take(ring(7, 5, 2)), "the same epoch");
        assert!(take(ring(7, 6, 2)));
        // The ring manager restarted without its state: a new history from epoch 1.
        assert!(!take(ring(9, 0, 0)), "the new history's empty first ring");
        assert!(take(ring(9, 1, 1)));
        assert_eq!(
            (rx.borrow().generation(), rx.borrow().epoch()),
            (9, 1),
            "replaced wholesale"
        );
        assert!(take(ring(9, 2, 2)));
        // An older ring manager's ring (no generation): epochs decide, as before.
        assert!(!take(ring(0, 1, 1)));
        assert!(take(ring(0, 3, 1)));
    }

    #[tokio::test]
    async fn a_direct_source_is_its_endpoint() {
        let source = RingSource::Direct("http://127.0.0.1:50050".into());
        assert_eq!(source.to_string(), "http://127.0.0.1:50050");
        assert_eq!(source.endpoint().await.unwrap(), "http://127.0.0.1:50050");
    }

    #[test]
    fn a_consul_source_shows_the_agent_and_prefix() {
        let ring = ConsulRing::new("http://127.0.0.1:8500", None, "cm").unwrap();
        assert_eq!(
            RingSource::Consul(ring).to_string(),
            "consul http://127.0.0.1:8500 (cm)"
        );
    }

    #[tokio::test]
    async fn a_watcher_that_hears_nothing_keeps_the_empty_ring_and_times_out() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        // Nothing listens on port 1: the watcher keeps retrying in the background.
        let watcher = RingWatcher::spawn(
            RingSource::Direct("http://127.0.0.1:1".into()),
            &tracker,
            cancel.clone(),
        );
        assert_eq!(watcher.current().epoch(), 0);
        let waited = watcher
            .wait_for_epoch(1, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(
            matches!(&waited, Error::Timeout(what) if what.contains("ring epoch 1")),
            "{waited}"
        );
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
