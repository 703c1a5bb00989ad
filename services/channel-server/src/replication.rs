//! Replication as plain decisions: what an event waiting for its followers carries, which
//! followed slots are still being filled (and so cannot be promoted with their history), and
//! which new followers this node, as a slot's owner, must fill. The edge (`grpc/replicate.rs`)
//! runs the links to followers, the catch-ups and the follower's side; the shards hold the
//! waiting events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::{ChannelEvent, NodeId, Ring, RingNode, SLOT_COUNT, Slot};

/// A replication link to one follower, as numbered by its primary.
pub type LinkId = u64;

/// Events of one shard that may wait for their followers at once: past it, publishes are
/// refused (`replication_behind`, which routers retry) until followers catch up.
pub const MAX_PENDING_PER_SHARD: usize = 4096;
/// Events one link holds sent but not yet acknowledged (resent after a reconnect).
pub const MAX_IN_FLIGHT: usize = 8192;
/// Events queued to one link and not yet sent.
pub const LINK_QUEUE: usize = 16_384;
/// Events per replication batch.
pub const BATCH: usize = 256;
/// How long a publish waits for its followers before it is answered `UNAVAILABLE`
/// (`replication_timeout`): shorter than a router's attempt (2 s), which then retries with the
/// same idempotency key and waits for the same event.
pub const PUBLISH_WAIT: Duration = Duration::from_millis(1500);
/// Pause before a link dials its follower again after a failure.
pub const LINK_RETRY: Duration = Duration::from_millis(100);
/// How long one connection attempt of a link or catch-up may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Slots copied and sent together in a catch-up.
pub const CATCH_UP_SLOTS: usize = 16;
/// Pause between attempts of a catch-up that failed.
pub const CATCH_UP_RETRY: Duration = Duration::from_millis(500);
/// How long a catch-up is retried before it is given up (the follower then stays behind, and
/// says so in its heartbeats, until a later ring names it again).
pub const CATCH_UP_GIVE_UP: Duration = Duration::from_secs(120);
/// Default: bytes per second one catch-up sends at most.
pub const DEFAULT_CATCH_UP_RATE: u64 = 64 * 1024 * 1024;

/// An event sent to its slot's followers and waiting for them.
#[derive(Debug, Clone)]
pub struct Replicated {
    /// Unique per channel server.
    pub id: u64,
    /// The shard it waits in.
    pub shard: usize,
    /// With the ts its primary gave it.
    pub event: ChannelEvent,
    /// Its publish's idempotency key.
    pub key: Option<Arc<str>>,
    /// When the primary saw it (microseconds since the Unix epoch).
    pub seen_micros: u64,
}

/// A follower's view of the slots it follows: which copies are still being filled by their
/// owner (a copy in sync holds every event its owner acknowledged). Only a slot followed in
/// sync is promoted with its history; one still being filled is taken over as from a node that
/// died (its history marked incomplete). The follower, which alone knows what this process
/// holds, asks the owners to fill what it lacks.
#[derive(Debug, Default)]
pub struct Replicas {
    /// Followed slots whose copy is still being filled.
    catching_up: BTreeSet<Slot>,
    /// Slots whose catch-up ended, with the epoch it was sent in (a catch-up can beat the
    /// ring that names it here).
    filled: HashMap<Slot, u64>,
    /// Slots a catch-up is asked for right now.
    asked: BTreeSet<Slot>,
}

impl Replicas {
    /// This process starts following `ring`: it holds nothing yet, so every slot `node` follows
    /// there is to be filled.
    pub fn start(&mut self, ring: &Ring, node: &NodeId) {
        for slot in 0..SLOT_COUNT as Slot {
            if ring.follows(node, slot) {
                self.catching_up.insert(slot);
            }
        }
    }

    /// The slots to ask a catch-up for now, by their owner in `ring`: those still being filled
    /// and not asked for already (they count as asked from here on).
    pub fn to_ask(&mut self, ring: &Ring) -> Vec<(RingNode, Vec<Slot>)> {
        let mut by_owner: BTreeMap<&NodeId, (&RingNode, Vec<Slot>)> = BTreeMap::new();
        for &slot in &self.catching_up {
            if self.asked.contains(&slot) {
                continue;
            }
            if let Some(owner) = ring.owner(slot) {
                by_owner
                    .entry(&owner.id)
                    .or_insert_with(|| (owner, Vec::new()))
                    .1
                    .push(slot);
            }
        }
        let asks: Vec<(RingNode, Vec<Slot>)> = by_owner
            .into_values()
            .map(|(owner, slots)| (owner.clone(), slots))
            .collect();
        for (_, slots) in &asks {
            self.asked.extend(slots.iter().copied());
        }
        asks
    }

    /// A catch-up asked for `slots` ended (filled or not): they may be asked for again.
    pub fn answered(&mut self, slots: &[Slot]) {
        for slot in slots {
            self.asked.remove(slot);
        }
    }

    /// Whether `slot` is still being filled (a catch-up asking for it goes on).
    pub fn is_catching_up(&self, slot: Slot) -> bool {
        self.catching_up.contains(&slot)
    }

    /// Follows a new ring: a slot `node` follows now that it did not hold in `previous` (see
    /// [`holds`]) is being filled (unless its catch-up for this epoch already came); a slot it
    /// stopped following is forgotten.
    pub fn follow(&mut self, previous: &Ring, ring: &Ring, node: &NodeId) {
        for slot in 0..SLOT_COUNT as Slot {
            if !ring.follows(node, slot) {
                self.catching_up.remove(&slot);
                continue;
            }
            let held = holds(previous, ring, node, slot);
            let filled = self.filled.get(&slot).is_some_and(|&e| e >= ring.epoch());
            if !held && !filled {
                self.catching_up.insert(slot);
            }
        }
        self.filled.retain(|_, epoch| *epoch >= ring.epoch());
    }

    /// The owner sent the whole of `slot` in `epoch`'s catch-up.
    pub fn filled(&mut self, slot: Slot, epoch: u64) {
        self.catching_up.remove(&slot);
        let at = self.filled.entry(slot).or_default();
        *at = (*at).max(epoch);
    }

    /// Whether this node's copy of `slot` holds every event its owner acknowledged.
    pub fn in_sync(&self, slot: Slot) -> bool {
        !self.catching_up.contains(&slot)
    }

    /// Followed slots still being filled.
    pub fn catching_up(&self) -> usize {
        self.catching_up.len()
    }
}

/// Whether `follower`, a follower of `slot` in `ring`, holds the slot's channels already from
/// `previous`, the ring it followed just before: `ring` is the very next epoch (no ring it did
/// not see came between, in which it might have been dropped and missed events), and it owned
/// the slot there, or followed it under the same owner. A follower whose owner changed is
/// filled again by the new owner: it may have been catching up from the old one.
pub fn holds(previous: &Ring, ring: &Ring, follower: &NodeId, slot: Slot) -> bool {
    let next = previous.epoch() + 1 == ring.epoch() && previous.generation() == ring.generation();
    let same_owner = previous.owner(slot).map(|n| &n.id) == ring.owner(slot).map(|n| &n.id);
    next && (previous.owns(follower, slot) || (same_owner && previous.follows(follower, slot)))
}

/// The nodes `node` replicates to in `ring`: every follower of a slot it owns.
pub fn followers_of(ring: &Ring, node: &NodeId) -> BTreeSet<NodeId> {
    (0..SLOT_COUNT as Slot)
        .filter(|&slot| ring.owns(node, slot))
        .flat_map(|slot| ring.followers(slot).map(|f| f.id.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: usize) -> RingNode {
        RingNode {
            id: NodeId::new(&format!("cs-{i}")).unwrap(),
            addr: format!("127.0.0.1:{}", 9000 + i),
        }
    }

    fn ring(n: usize, previous: &Ring) -> Ring {
        let members: Vec<RingNode> = (0..n).map(node).collect();
        previous.rebalanced(&members).with_followers(previous, 2)
    }

    #[test]
    fn a_new_follower_asks_its_owners_and_an_old_one_is_in_sync() {
        let one = ring(1, &Ring::empty());
        let two = ring(2, &one);
        let (a, b) = (node(0).id, node(1).id);
        let mut replicas = Replicas::default();
        replicas.follow(&one, &two, &b);
        let followed = two.slots_followed(&b);
        assert!(followed > 0);
        assert_eq!(
            replicas.catching_up(),
            followed,
            "everything b follows is new to it"
        );
        let asks = replicas.to_ask(&two);
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].0.id, a);
        assert_eq!(asks[0].1.len(), followed);
        assert!(replicas.to_ask(&two).is_empty(), "asked once at a time");
        for &slot in &asks[0].1 {
            assert!(!replicas.in_sync(slot));
            replicas.filled(slot, two.epoch());
            assert!(replicas.in_sync(slot));
        }
        replicas.answered(&asks[0].1);
        assert_eq!(replicas.catching_up(), 0);
        // The next epoch keeps b following the same slots: in sync, nothing to ask.
        let again = two.rebalanced(&[node(0), node(1)]).with_followers(&two, 2);
        replicas.follow(&two, &again, &b);
        assert_eq!(replicas.catching_up(), 0);
        assert!(replicas.to_ask(&again).is_empty());
    }

    #[test]
    fn a_ring_seen_after_a_gap_or_at_start_is_filled_again() {
        let one = ring(1, &Ring::empty());
        let two = ring(2, &one);
        let b = node(1).id;
        let three = two.rebalanced(&[node(0), node(1)]).with_followers(&two, 2);
        let four = three
            .rebalanced(&[node(0), node(1)])
            .with_followers(&three, 2);
        let slot = (0..SLOT_COUNT as Slot)
            .find(|&s| four.follows(&b, s))
            .unwrap();
        assert!(holds(&three, &four, &b, slot));
        assert!(
            !holds(&two, &four, &b, slot),
            "epoch 3 came between, unseen"
        );
        let mut started = Replicas::default();
        started.start(&four, &b);
        assert_eq!(started.catching_up(), four.slots_followed(&b));
    }

    #[test]
    fn a_catch_up_that_beats_its_ring_counts() {
        let one = ring(1, &Ring::empty());
        let two = ring(2, &one);
        let b = node(1).id;
        let slot = (0..SLOT_COUNT as Slot)
            .find(|&s| two.follows(&b, s))
            .unwrap();
        let mut replicas = Replicas::default();
        replicas.filled(slot, two.epoch());
        replicas.follow(&one, &two, &b);
        assert!(replicas.in_sync(slot));
        assert_eq!(replicas.catching_up(), two.slots_followed(&b) - 1);
    }

    #[test]
    fn a_follower_whose_owner_changed_asks_the_new_owner() {
        let four = ring(4, &ring(3, &ring(2, &ring(1, &Ring::empty()))));
        let three_way = four.clone().with_followers(&four, 3);
        let dead = node(0).id;
        let next = three_way
            .with_promotion(&dead, None)
            .unwrap()
            .with_followers(&three_way, 3);
        // A slot of the dead node: its first follower owns it now; the second still follows.
        let slot = (0..SLOT_COUNT as Slot)
            .find(|&s| {
                three_way.owns(&dead, s) && next.followers(s).any(|f| three_way.follows(&f.id, s))
            })
            .unwrap();
        let owner = next.owner(slot).unwrap().id.clone();
        let kept = next
            .followers(slot)
            .find(|f| three_way.follows(&f.id, slot))
            .unwrap()
            .id
            .clone();
        assert!(!holds(&three_way, &next, &kept, slot));
        let mut replicas = Replicas::default();
        replicas.follow(&three_way, &next, &kept);
        assert!(!replicas.in_sync(slot));
        let asks = replicas.to_ask(&next);
        assert!(
            asks.iter()
                .any(|(o, slots)| o.id == owner && slots.contains(&slot))
        );
        assert!(followers_of(&next, &owner).contains(&kept));
    }
}
