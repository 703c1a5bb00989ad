//! What every connection of a gateway shares, and nothing more: the hub, the channel router,
//! presence, the region state, the limits, the typing coalescer, the metrics, and the
//! gateway's task tracker and shutdown.

use std::sync::Arc;

use channel_client::ChannelRouter;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::limits::{Limits, TypingCoalescer};
use crate::metrics::GatewayMetrics;
use crate::presence::PresenceHub;
use crate::region::state::RegionState;

/// The gateway's side of every connection.
#[derive(Debug)]
pub struct ConnectionContext {
    /// Subscribes a connection's channels and fans their events out to it.
    pub hub: Hub,
    /// Publishes clients' messages; reads history for catch-ups and resumes.
    pub router: ChannelRouter,
    /// Presence, when the mesh has presence servers.
    pub presence: Option<PresenceHub>,
    /// The region's drain state and revocations: it closes connections from outside, and
    /// keeps the cursors of those it said goodbye to.
    pub region: Arc<RegionState>,
    /// What one client may do.
    pub limits: Limits,
    /// The channel policies in force (read-only channels, typing) and the file's team caps.
    pub policies: mesh_core::policy::SharedPolicies,
    /// Coalesces typing indicators across the gateway's connections.
    pub typing: TypingCoalescer,
    /// The gateway's metrics.
    pub metrics: Arc<GatewayMetrics>,
    /// Tracks the tasks a connection starts (catch-ups, resumes, publishes' replies).
    pub tracker: TaskTracker,
    /// The gateway's shutdown: connections say goodbye and close.
    pub cancel: CancellationToken,
}

#[cfg(test)]
impl ConnectionContext {
    /// A context for unit tests: default limits, no presence, and a ring that stays empty (its
    /// ring manager is nowhere), so nothing is subscribed or published upstream. Needs a tokio
    /// runtime.
    pub(crate) fn for_tests() -> Arc<Self> {
        use ring_client::{RingSource, RingWatcher};
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let nowhere = RingSource::Direct("http://127.0.0.1:9".into());
        let ring = RingWatcher::spawn(nowhere, &tracker, cancel.clone());
        let router = ChannelRouter::new(ring.clone(), &tracker, cancel.clone());
        let metrics = GatewayMetrics::new(&mesh_telemetry::Telemetry::new(&[]));
        let hub = Hub::new(
            "gw-test".into(),
            "test".into(),
            ring,
            router.clone(),
            metrics.clone(),
            tracker.clone(),
            cancel.clone(),
        );
        let limits = Limits::default();
        let typing = TypingCoalescer::new(limits.typing_interval, std::num::NonZeroUsize::MIN);
        Arc::new(ConnectionContext {
            hub,
            router,
            presence: None,
            region: Arc::default(),
            policies: Default::default(),
            limits,
            typing,
            metrics,
            tracker,
            cancel,
        })
    }
}
