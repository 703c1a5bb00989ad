//! A node's membership in a ring, as channel servers and presence servers hold it: register,
//! hold the lease, and — when the ring manager revokes it (the node was declared down) —
//! register again as a standby, as a new incarnation; or, when the ring manager's ring was
//! reset meanwhile (another generation: e.g. it restarted without its state), as it first did,
//! since the old ring's roles mean nothing in the new history.

use std::time::Duration;

use mesh_proto::ring::{RegisterRequest, RegisterResponse};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lease::{Lease, LeaseEnd, Witnesses};
use crate::own_thread;
use crate::source::{RingSource, generation, register};

/// How long a node keeps trying to register before giving up.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the lease's tasks get to end once the service is cancelled (they end at once on
/// the token; this bounds a stuck one).
const LEASE_THREAD_GRACE: Duration = Duration::from_secs(1);

/// Registers `request` with the ring manager `source` leads to, then holds its lease until
/// `cancel`, on a thread of its own ([`crate::own_thread`]): a heartbeat never waits behind the
/// service's work (a ring change's resubscriptions, a burst of publishes). With `witnesses`,
/// the decisions while the lease is lapsed ([`Lease::decide_while_lapsed`]) run there too. The
/// tasks are tracked by `tracker`. `Ok(None)` if cancelled before registering.
pub async fn join(
    source: &RingSource,
    request: RegisterRequest,
    lease: Lease,
    witnesses: Option<Witnesses>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Option<()>, crate::Error> {
    let registered = tokio::select! {
        _ = cancel.cancelled() => return Ok(None),
        r = register(source, request.clone(), REGISTER_TIMEOUT) => r?,
    };
    let runtime = own_thread::runtime("ring-lease", cancel.clone(), LEASE_THREAD_GRACE);
    if let Some(witnesses) = witnesses {
        let (lease, cancel) = (lease.clone(), cancel.clone());
        runtime.spawn(
            tracker.track_future(async move { lease.decide_while_lapsed(witnesses, cancel).await }),
        );
    }
    runtime.spawn(tracker.track_future(hold(
        source.clone(),
        request,
        registered,
        lease,
        cancel.clone(),
    )));
    Ok(Some(()))
}

/// Holds the lease; when it is revoked, registers again as a standby (or as first registered,
/// after a reset: [`role_after_revocation`]) and holds that one.
async fn hold(
    source: RingSource,
    mut request: RegisterRequest,
    mut reply: RegisterResponse,
    lease: Lease,
    cancel: CancellationToken,
) {
    let first_standby = request.standby;
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
        let now = tokio::select! {
            _ = cancel.cancelled() => return,
            g = generation(&source) => g.ok(),
        };
        request.standby = role_after_revocation(first_standby, reply.generation, now);
        if !request.standby {
            tracing::warn!(
                joined = reply.generation,
                now = ?now,
                "the ring manager's ring was reset (a new generation); registering as at start"
            );
        }
        loop {
            let attempt = tokio::select! {
                _ = cancel.cancelled() => return,
                r = register(&source, request.clone(), REGISTER_TIMEOUT) => r,
            };
            match attempt {
                Ok(next) => {
                    tracing::info!(
                        incarnation = next.incarnation,
                        standby = request.standby,
                        "registered again"
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

/// Whether a node whose lease was revoked registers again as a standby: yes (it was declared
/// down, and its slots went to others), unless the ring manager's generation `now` is another
/// than the one it joined (`joined`): a reset ring, in which it takes the role it started
/// with (`first_standby`). An unknown generation (0, or the ring manager unreachable) is no
/// evidence of a reset.
fn role_after_revocation(first_standby: bool, joined: u64, now: Option<u64>) -> bool {
    match now {
        Some(now) if now != 0 && joined != 0 && now != joined => first_standby,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_node_comes_back_as_a_standby_unless_the_ring_was_reset() {
        // Declared down in the same history: a standby, whatever it started as.
        assert!(role_after_revocation(false, 7, Some(7)));
        // Another generation: as it started.
        assert!(!role_after_revocation(false, 7, Some(9)));
        assert!(role_after_revocation(true, 7, Some(9)));
        // No evidence of a reset.
        for now in [None, Some(0)] {
            assert!(role_after_revocation(false, 7, now));
        }
        assert!(role_after_revocation(false, 0, Some(9)));
    }
}
