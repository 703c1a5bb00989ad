//! A node's membership in a ring, as channel servers and presence servers hold it: register,
//! hold the lease, and — when the ring manager revokes it (the node was declared down) —
//! register again as a standby, as a new incarnation.

use std::time::Duration;

use mesh_proto::ring::{RegisterRequest, RegisterResponse};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lease::{Lease, LeaseEnd};
use crate::source::{RingSource, register};

/// How long a node keeps trying to register before giving up.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Registers `request` with the ring manager `source` leads to, then holds its lease on a task
/// of `tracker` until `cancel`. `Ok(None)` if cancelled before registering.
pub async fn join(
    source: &RingSource,
    request: RegisterRequest,
    lease: Lease,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Option<()>, crate::Error> {
    let registered = tokio::select! {
        _ = cancel.cancelled() => return Ok(None),
        r = register(source, request.clone(), REGISTER_TIMEOUT) => r?,
    };
    tracker.spawn(hold(
        source.clone(),
        request,
        registered,
        lease,
        cancel.clone(),
    ));
    Ok(Some(()))
}

/// Holds the lease; when it is revoked, registers again as a standby and holds that one.
async fn hold(
    source: RingSource,
    mut request: RegisterRequest,
    mut reply: RegisterResponse,
    lease: Lease,
    cancel: CancellationToken,
) {
    loop {
        let interval = Duration::from_millis(u64::from(reply.heartbeat_interval_ms.max(1)));
        let length = Duration::from_millis(u64::from(reply.lease_ms.max(1)));
        let end = lease
            .hold(
                &source,
                &request.node_id,
                reply.incarnation,
                interval,
                length,
                &cancel,
            )
            .await;
        if end == LeaseEnd::Cancelled {
            return;
        }
        request.standby = true;
        loop {
            let attempt = tokio::select! {
                _ = cancel.cancelled() => return,
                r = register(&source, request.clone(), REGISTER_TIMEOUT) => r,
            };
            match attempt {
                Ok(next) => {
                    tracing::info!(
                        incarnation = next.incarnation,
                        "registered again as a standby"
                    );
                    lease.reset();
                    reply = next;
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "registering again failed; retrying"),
            }
        }
    }
}
