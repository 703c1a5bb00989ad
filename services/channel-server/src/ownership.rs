//! Whether this channel server may serve a slot now: it holds its lease, is not waiting for the
//! slot's handoff, and owns the slot in the caller's epoch or a newer one.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mesh_core::{NodeId, Ring, Slot};
use ring_client::lease::SERVING_WAIT;
use ring_client::{Lease, RingWatcher};

use crate::error::ServeError;
use crate::handoff::{TAKEOVER_SETTLE, WARMUP_TIMEOUT, Warming};
use crate::replication::Replicas;

/// How long a call naming a newer epoch waits for this server's ring to catch up.
const RING_CATCH_UP: Duration = Duration::from_secs(1);

/// Whether `node` owns `slot` in `ring`; if not, who does.
pub fn owns(ring: &Ring, node: &NodeId, slot: Slot) -> Result<(), ServeError> {
    if ring.owns(node, slot) {
        return Ok(());
    }
    let owner = ring
        .owner(slot)
        .map(|n| n.id.to_string())
        .unwrap_or_default();
    Err(ServeError::WrongOwner {
        slot,
        owner,
        epoch: ring.epoch(),
        node: node.clone(),
    })
}

/// This node's right to serve: its id, the ring it follows, its lease, and the slots it waits
/// for handoffs of.
#[derive(Debug)]
pub struct Ownership {
    node: NodeId,
    ring: RingWatcher,
    /// Serving is allowed only under a valid lease (fencing).
    lease: Lease,
    warming: Mutex<Warming>,
    /// The followed slots still being filled.
    replicas: Mutex<Replicas>,
    /// The newest epoch whose ring this node has followed ([`Ownership::gain`]): nothing is
    /// served by a ring before what it gains is known (its handoffs awaited, its takeovers
    /// settling), however early the ring itself arrived.
    applied: tokio::sync::watch::Sender<u64>,
}

impl Ownership {
    /// Node `node` following `ring`, serving under `lease`.
    pub fn new(node: NodeId, ring: RingWatcher, lease: Lease) -> Self {
        Ownership {
            node,
            ring,
            lease,
            warming: Mutex::new(Warming::default()),
            replicas: Mutex::new(Replicas::default()),
            applied: tokio::sync::watch::Sender::new(0),
        }
    }

    /// This node's id on the ring.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The ring it follows.
    pub fn ring(&self) -> &RingWatcher {
        &self.ring
    }

    /// Its lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    fn warming(&self) -> MutexGuard<'_, Warming> {
        self.warming.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn replicas(&self) -> MutexGuard<'_, Replicas> {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that this node takes replication (or a catch-up) of `slot` from `from`, which
    /// sends under `epoch`: it holds its lease (or serves on evidence, as [`Ownership::check`]
    /// waits for), and in its ring — waited for a little when `epoch` is newer — `from` owns
    /// the slot and this node follows it. A deposed primary is refused here once this node has
    /// seen the ring that deposed it (fencing).
    pub async fn check_follower(
        &self,
        from: &NodeId,
        slot: Slot,
        epoch: u64,
    ) -> Result<(), ServeError> {
        let ring = self.leased_ring(epoch).await?;
        if ring.owns(from, slot) && ring.follows(&self.node, slot) {
            return Ok(());
        }
        Err(ServeError::NotFollower {
            slot,
            from: from.clone(),
            node: self.node.clone(),
            epoch: ring.epoch(),
        })
    }

    /// Follows a new ring's followed slots (see [`Replicas::follow`]); returns how many are
    /// still being filled, as reported with the lease's heartbeats.
    pub fn follow_replicas(&self, previous: &Ring, ring: &Ring) -> usize {
        let mut replicas = self.replicas();
        replicas.follow(previous, ring, &self.node);
        let behind = replicas.catching_up();
        self.lease.catching_up(ring.epoch(), behind);
        behind
    }

    /// The owner filled `slot` in `epoch`'s catch-up; returns how many followed slots are
    /// still being filled.
    pub fn filled(&self, slot: Slot, epoch: u64) -> usize {
        let mut replicas = self.replicas();
        replicas.filled(slot, epoch);
        let behind = replicas.catching_up();
        self.lease
            .catching_up(self.ring.current().epoch().max(epoch), behind);
        behind
    }

    /// Followed slots still being filled.
    pub fn catching_up(&self) -> usize {
        self.replicas().catching_up()
    }

    /// Whether `slot` waits for a handoff here.
    pub fn is_warming(&self, slot: Slot) -> bool {
        self.warming().waiting_for(slot).is_some()
    }

    /// The ring to check a call against, once this node may serve at all: its lease holds (a
    /// lapsed lease waits a little for the decision on static stability, or a renewal, rather
    /// than failing the call while it is being made), and the ring is at least `epoch` (waited
    /// for a little).
    async fn leased_ring(&self, epoch: u64) -> Result<Arc<Ring>, ServeError> {
        self.lease
            .wait_serving(SERVING_WAIT)
            .await
            .map_err(ServeError::NoLease)?;
        let ring = self.ring.current();
        if epoch <= ring.epoch() {
            return Ok(ring);
        }
        self.ring
            .wait_for_epoch(epoch, RING_CATCH_UP)
            .await
            .map_err(|_| ServeError::RingBehind {
                known: ring.epoch(),
                asked: epoch,
            })
    }

    /// Checks that this node may serve `slot` for a caller that routed by `epoch`, waiting a
    /// little for a newer ring than it knows; returns the ring it checked against.
    pub async fn check(&self, slot: Slot, epoch: u64) -> Result<Arc<Ring>, ServeError> {
        let ring = self.leased_ring(epoch).await?;
        self.wait_applied(ring.epoch()).await?;
        let waiting = self.warming().waiting_for(slot);
        if let Some(from) = waiting {
            return Err(ServeError::Warming { slot, from });
        }
        owns(&ring, &self.node, slot)?;
        Ok(ring)
    }

    /// Waits (a little) until this node has followed `epoch`'s ring: what it gains is known.
    async fn wait_applied(&self, epoch: u64) -> Result<(), ServeError> {
        if *self.applied.borrow() >= epoch {
            return Ok(());
        }
        let mut applied = self.applied.subscribe();
        match tokio::time::timeout(RING_CATCH_UP, applied.wait_for(|&e| e >= epoch)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ServeError::RingBehind {
                known: *self.applied.borrow(),
                asked: epoch,
            }),
        }
    }

    /// This node follows `ring` from the start (the ring it found before following changes):
    /// every slot it follows there is to be filled, and the `stale` slots it owns there (an
    /// earlier incarnation's) are not held: a later ring that still gives them to it gains them
    /// as from a node that died, unless a handoff brings their state.
    pub fn start_from(&self, ring: &Ring, stale: &[Slot]) {
        let mut replicas = self.replicas();
        replicas.start(ring, &self.node);
        self.lease.catching_up(ring.epoch(), replicas.catching_up());
        drop(replicas);
        self.warming().not_held(stale);
        self.applied.send_replace(ring.epoch());
    }

    /// The followed slots to ask their owners in `ring` to fill now, by owner (each counts as
    /// asked until [`Ownership::answered`]).
    pub fn to_ask(&self, ring: &Ring) -> Vec<(mesh_core::RingNode, Vec<Slot>)> {
        self.replicas().to_ask(ring)
    }

    /// A catch-up asked for `slots` ended.
    pub fn answered(&self, slots: &[Slot]) {
        self.replicas().answered(slots);
    }

    /// Whether `slot` is followed and still being filled.
    pub fn is_catching_up(&self, slot: Slot) -> bool {
        self.replicas().is_catching_up(slot)
    }

    /// Follows a new ring's gained slots (see [`Warming::gain`]); returns the slots whose
    /// history died with their previous owner, which settle before taking publishes
    /// ([`Warming::settle`]). A slot this node followed in sync is promoted: it serves at once,
    /// with its history. Call before [`Ownership::follow_replicas`].
    pub fn gain(&self, previous: &Ring, ring: &Ring) -> Vec<Slot> {
        let now = tokio::time::Instant::now();
        let promoted = {
            let replicas = self.replicas();
            move |slot: Slot| previous.follows(&self.node, slot) && replicas.in_sync(slot)
        };
        let mut warming = self.warming();
        let unknown = warming.gain(previous, ring, &self.node, now + WARMUP_TIMEOUT, promoted);
        warming.settle(previous, &unknown, now + TAKEOVER_SETTLE);
        drop(warming);
        self.applied.send_replace(ring.epoch());
        unknown
    }

    /// Refuses a publish to `channel` of `slot` while it settles after a takeover and no
    /// gateway has resubscribed to it yet (a refusal routers retry).
    pub fn check_settled(&self, slot: Slot, channel: &str) -> Result<(), ServeError> {
        let now = tokio::time::Instant::now();
        match self.warming().settling(slot, channel, now) {
            Some(from) => Err(ServeError::Warming { slot, from }),
            None => Ok(()),
        }
    }

    /// A gateway resubscribed to `channel` of `slot`, having reported what it delivered.
    pub fn resubscribed(&self, channel: &str, slot: Slot) {
        self.warming().resubscribed(channel, slot);
    }

    /// The earliest warm-up deadline of a slot still waiting for its handoff.
    pub fn next_warmup_deadline(&self) -> Option<tokio::time::Instant> {
        self.warming().next_deadline()
    }

    /// The slots whose warm-up ran out by `now` (see [`Warming::due`]).
    pub fn warmup_due(&self, now: tokio::time::Instant) -> Vec<Slot> {
        self.warming().due(now)
    }

    /// `slots` serve without their handoff: call after their history floor was set.
    pub fn release(&self, slots: &[Slot]) {
        self.warming().release(slots);
    }

    /// Whether the ring names a handoff from `from` to this node in `epoch`: the ring of that
    /// epoch (waited for a little, as a handoff can beat the ring here), or, once the ring has
    /// moved on, the handoffs this node saw named in the rings it followed. A handoff `from`
    /// was named to send in `epoch` to another node is taken too: its new owner died before
    /// confirming it, and `from` forwards the state to the slots' owner now.
    pub async fn expects_handoff(&self, from: &NodeId, epoch: u64) -> bool {
        let mut ring = self.ring.current();
        if epoch > ring.epoch() {
            match self.ring.wait_for_epoch(epoch, RING_CATCH_UP).await {
                Ok(newer) => ring = newer,
                Err(_) => return false,
            }
        }
        let named = |ring: &Ring| {
            ring.handoffs()
                .iter()
                .any(|h| &h.from == from && h.to == self.node)
        };
        let warming = self.warming();
        (ring.epoch() == epoch && named(&ring))
            || warming.expected(from, epoch)
            || warming.named_sender(from, epoch)
    }

    /// The whole handoff `from` sent for `epoch` arrived.
    pub fn received(&self, from: &NodeId, epoch: u64) {
        self.warming().received(from, epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{RingNode, SLOT_COUNT};
    use ring_client::RingSource;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    fn node(id: &str) -> RingNode {
        RingNode {
            id: NodeId::new(id).unwrap(),
            addr: format!("{id}:1"),
        }
    }

    /// A slot `a` owns in `ring` and `b` owns in `next`.
    fn moved_slot(ring: &Ring, next: &Ring, a: &NodeId, b: &NodeId) -> Slot {
        (0..SLOT_COUNT as Slot)
            .find(|&s| ring.owns(a, s) && next.owns(b, s))
            .unwrap()
    }

    #[test]
    fn the_owner_serves_and_another_node_names_it() {
        let ring = Ring::empty().rebalanced(&[node("cs-1"), node("cs-2")]);
        let (one, two) = (node("cs-1").id, node("cs-2").id);
        let slot = (0..SLOT_COUNT as Slot)
            .find(|&s| ring.owns(&one, s))
            .unwrap();
        assert_eq!(owns(&ring, &one, slot), Ok(()));
        let refused = owns(&ring, &two, slot).unwrap_err();
        assert_eq!(
            refused.to_string(),
            format!("wrong_owner: slot {slot} belongs to \"cs-1\" in epoch 1, not to cs-2")
        );
    }

    #[test]
    fn ownership_is_per_epoch() {
        let first = Ring::empty().rebalanced(&[node("cs-1"), node("cs-2")]);
        let second = first.rebalanced(&[node("cs-1"), node("cs-2"), node("cs-3")]);
        let (one, three) = (node("cs-1").id, node("cs-3").id);
        let slot = moved_slot(&first, &second, &one, &three);
        assert_eq!(owns(&first, &one, slot), Ok(()));
        assert_eq!(
            owns(&second, &one, slot),
            Err(ServeError::WrongOwner {
                slot,
                owner: "cs-3".into(),
                epoch: 2,
                node: one.clone(),
            })
        );
        assert_eq!(owns(&second, &three, slot), Ok(()));
    }

    #[test]
    fn nobody_owns_anything_on_an_empty_ring() {
        let refused = owns(&Ring::empty(), &node("cs-1").id, 7).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "wrong_owner: slot 7 belongs to \"\" in epoch 0, not to cs-1"
        );
    }

    #[tokio::test]
    async fn without_a_lease_nothing_is_served() {
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        // Nothing listens there: the ring stays empty and the lease never renews.
        let ring = RingWatcher::spawn(
            RingSource::Direct("http://127.0.0.1:1".into()),
            &tracker,
            cancel.clone(),
        );
        let ownership = Ownership::new(node("cs-1").id, ring, Lease::default());
        let refused = ownership.check(0, 0).await.unwrap_err();
        assert_eq!(
            refused.to_string(),
            "no_lease: lease lapsed: no word from the ring manager"
        );
        cancel.cancel();
    }
}
