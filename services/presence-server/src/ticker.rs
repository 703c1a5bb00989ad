//! The presence server's two background loops: the ticker that publishes due changes (aways
//! past their grace, the end of warming), and the follower of the presence ring that keeps only
//! the users this node owns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::{NodeId, Ring};
use ring_client::RingWatcher;
use tokio_util::sync::CancellationToken;

use crate::sessions::{Outbound, Sessions};

/// How often due changes (aways past their grace, the end of warming) are published.
const TICK: Duration = Duration::from_millis(100);

/// Publishes due changes every [`TICK`] until `cancel`.
pub async fn tick<M: Outbound>(sessions: Arc<Sessions<M>>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        sessions.tick(Instant::now());
    }
}

/// Follows `ring` until `cancel`: keeps only the users `node` owns, warming up after gaining
/// some.
pub async fn follow_ring<M: Outbound>(
    sessions: Arc<Sessions<M>>,
    node: NodeId,
    ring: RingWatcher,
    cancel: CancellationToken,
) {
    let mut before: Option<Arc<Ring>> = None;
    ring.on_each_change(cancel, |ring| {
        sessions.follow_ring(&node, before.as_deref(), &ring, Instant::now());
        before = Some(ring);
    })
    .await;
}
