//! The ring: channel ids hash onto a fixed number of slots; the ring manager assigns slots to
//! channel servers and publishes the assignment under an epoch number.
//!
//! The hash is XXH3-64 (seed 0) of the channel id's UTF-8 bytes, modulo [`SLOT_COUNT`]. XXH3 has
//! a frozen specification and implementations in every language (Python: `xxhash.xxh3_64`), so
//! every process and every release agrees on a channel's slot. Moving channels between servers
//! means moving whole slots, never rehashing: [`Ring::rebalanced`] moves the fewest slots that
//! leave every server with a fair share.
//!
//! A ring history (every epoch one ring manager, or its successors resuming its state, ever
//! published) is named by a random generation id. Followers accept a newer epoch of their
//! generation, or the first assignment of another generation: a deliberate reset, such as a
//! ring manager restarted without its state ([`Ring::supersedes`]).

use std::collections::HashMap;

use crate::ids::{ChannelId, NodeId};

/// How many slots the ring has. Fixed forever: changing it would move almost every channel.
pub const SLOT_COUNT: usize = 4096;

/// A slot number, `0..SLOT_COUNT`.
pub type Slot = u16;

/// The slot a channel hashes to: `xxh3_64(id) % SLOT_COUNT`.
pub fn slot_of(channel: &ChannelId) -> Slot {
    (xxhash_rust::xxh3::xxh3_64(channel.as_str().as_bytes()) % SLOT_COUNT as u64) as Slot
}

/// A channel server that owns slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingNode {
    /// Its stable id.
    pub id: NodeId,
    /// The gRPC address ("host:port") admin servers and gateways dial.
    pub addr: String,
}

/// A move of channel state that comes with an epoch: `to` waits (up to a timeout) for `from`'s
/// state of the slots that moved between them before serving those slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub from: NodeId,
    pub to: NodeId,
}

/// Why a published ring is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the ring has {got} slots, expected {SLOT_COUNT}")]
    SlotCount { got: usize },
    #[error("slot {slot} names node index {index}, but the ring has {nodes} nodes")]
    BadOwner {
        slot: usize,
        index: u32,
        nodes: usize,
    },
    #[error("node {0} appears twice")]
    DuplicateNode(NodeId),
    #[error("the ring has followers for {got} slots, expected {SLOT_COUNT} or none")]
    FollowerCount { got: usize },
    #[error(
        "slot {slot} names follower {index}, which is its owner, repeated, or past the {nodes} nodes"
    )]
    BadFollower {
        slot: usize,
        index: u32,
        nodes: usize,
    },
}

/// One epoch's assignment of every slot to a channel server.
///
/// Invariant: either there are no nodes and no slot is owned, or every slot is owned by exactly
/// one of `nodes`. A channel therefore has exactly one owning channel server per epoch.
///
/// Each slot may also have *followers* (replication): other nodes of the ring, distinct and
/// never the slot's owner, that hold a copy of its channels. The owner (the *primary*) sends
/// each event to them before acknowledging it; when the owner is declared down, a follower is
/// promoted ([`Ring::with_promotion`]) and serves the slot with its history intact.
#[derive(Clone, PartialEq, Eq)]
pub struct Ring {
    /// The ring history this ring belongs to; 0: unknown (rings of older ring managers).
    generation: u64,
    epoch: u64,
    /// Sorted by id.
    nodes: Vec<RingNode>,
    /// `owners[slot]` indexes `nodes`; empty when `nodes` is.
    owners: Vec<u16>,
    /// `followers[slot]` indexes `nodes`: the slot's followers, in promotion order; empty (no
    /// follower anywhere) or one entry per slot.
    followers: Vec<Vec<u16>>,
    /// State moves that come with this epoch (drains and replacements of live nodes).
    handoffs: Vec<Handoff>,
}

impl std::fmt::Debug for Ring {
    /// Compact: the epoch, each node with its slot count, and the handoffs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let followed = self.slots_followed(&n.id);
                format!("{}@{}:{}+{followed}", n.id, n.addr, self.slots_owned(&n.id))
            })
            .collect();
        f.debug_struct("Ring")
            .field("generation", &self.generation)
            .field("epoch", &self.epoch)
            .field("nodes", &nodes)
            .field("handoffs", &self.handoffs)
            .finish()
    }
}

impl Ring {
    /// The ring before any channel server registered: epoch 0, nothing owned.
    pub fn empty() -> Self {
        Ring {
            generation: 0,
            epoch: 0,
            nodes: Vec::new(),
            owners: Vec::new(),
            followers: Vec::new(),
            handoffs: Vec::new(),
        }
    }

    /// Rebuilds a ring from its published parts, checking the invariant (no followers).
    pub fn from_parts(
        epoch: u64,
        nodes: Vec<RingNode>,
        owners: Vec<u32>,
    ) -> Result<Self, RingError> {
        Ring::from_replicated_parts(epoch, nodes, owners, Vec::new())
    }

    /// Rebuilds a ring from its published parts with each slot's followers (`followers[slot]`
    /// indexes `nodes`, like `owners`; empty: no followers), checking the invariant.
    pub fn from_replicated_parts(
        epoch: u64,
        mut nodes: Vec<RingNode>,
        owners: Vec<u32>,
        followers: Vec<Vec<u32>>,
    ) -> Result<Self, RingError> {
        if nodes.is_empty() && owners.is_empty() {
            return Ok(Ring {
                generation: 0,
                epoch,
                nodes,
                owners: Vec::new(),
                followers: Vec::new(),
                handoffs: Vec::new(),
            });
        }
        if owners.len() != SLOT_COUNT {
            return Err(RingError::SlotCount { got: owners.len() });
        }
        if !followers.is_empty() && followers.len() != SLOT_COUNT {
            return Err(RingError::FollowerCount {
                got: followers.len(),
            });
        }
        // Re-sort the nodes by id, remapping indexes, so that equal rings compare equal.
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        order.sort_by(|&a, &b| nodes[a].id.cmp(&nodes[b].id));
        let mut remap = vec![0u16; nodes.len()];
        for (new, &old) in order.iter().enumerate() {
            remap[old] = new as u16;
        }
        let mut sorted: Vec<RingNode> = Vec::with_capacity(nodes.len());
        for &old in &order {
            sorted.push(nodes[old].clone());
        }
        nodes = sorted;
        for pair in nodes.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(RingError::DuplicateNode(pair[0].id.clone()));
            }
        }
        let mut mapped = Vec::with_capacity(SLOT_COUNT);
        for (slot, &index) in owners.iter().enumerate() {
            let Some(&new) = remap.get(index as usize) else {
                return Err(RingError::BadOwner {
                    slot,
                    index,
                    nodes: nodes.len(),
                });
            };
            mapped.push(new);
        }
        let mut mapped_followers = Vec::with_capacity(followers.len());
        for (slot, list) in followers.into_iter().enumerate() {
            let mut out: Vec<u16> = Vec::with_capacity(list.len());
            for index in list {
                let bad = RingError::BadFollower {
                    slot,
                    index,
                    nodes: nodes.len(),
                };
                let Some(&new) = remap.get(index as usize) else {
                    return Err(bad);
                };
                if new == mapped[slot] || out.contains(&new) {
                    return Err(bad);
                }
                out.push(new);
            }
            mapped_followers.push(out);
        }
        Ok(Ring {
            generation: 0,
            epoch,
            nodes,
            owners: mapped,
            followers: mapped_followers,
            handoffs: Vec::new(),
        })
    }

    /// The epoch: every change of ownership makes a new, larger one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The ring history this ring belongs to (0: unknown, as in rings of older ring managers).
    /// The rings derived from it ([`Ring::rebalanced`], [`Ring::with_takeover`]) keep it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This ring, as a ring of history `generation`.
    pub fn with_generation(mut self, generation: u64) -> Ring {
        self.generation = generation;
        self
    }

    /// Whether a follower holding `current` takes this ring instead — the acceptance rule
    /// every follower of the ring applies:
    /// - another generation (both known): a deliberate reset, taken whatever its epoch, once
    ///   it assigns slots (a new history's empty first ring would only take away the slots
    ///   everyone still serves by; its first assignment follows within a registration);
    /// - the same generation, or either unknown (0, older ring managers): only a higher epoch.
    pub fn supersedes(&self, current: &Ring) -> bool {
        let reset = self.generation != 0
            && current.generation != 0
            && self.generation != current.generation;
        if reset {
            !self.nodes.is_empty()
        } else {
            self.epoch > current.epoch
        }
    }

    /// The channel servers, sorted by id.
    pub fn nodes(&self) -> &[RingNode] {
        &self.nodes
    }

    /// `owners()[slot]` is the index in [`Ring::nodes`] of the slot's owner (empty if no nodes).
    pub fn owners(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.owners.iter().map(|&i| u32::from(i))
    }

    /// The node that owns `slot`, if any node does.
    pub fn owner(&self, slot: Slot) -> Option<&RingNode> {
        let index = *self.owners.get(usize::from(slot))?;
        self.nodes.get(usize::from(index))
    }

    /// The node that owns `channel`.
    pub fn owner_of(&self, channel: &ChannelId) -> Option<&RingNode> {
        self.owner(slot_of(channel))
    }

    /// Whether `node` owns `slot` in this epoch.
    pub fn owns(&self, node: &NodeId, slot: Slot) -> bool {
        self.owner(slot).is_some_and(|n| &n.id == node)
    }

    /// How many slots `node` owns.
    pub fn slots_owned(&self, node: &NodeId) -> usize {
        match self.nodes.iter().position(|n| &n.id == node) {
            Some(index) => self
                .owners
                .iter()
                .filter(|&&o| usize::from(o) == index)
                .count(),
            None => 0,
        }
    }

    /// `slot`'s followers, in promotion order (none without replication).
    pub fn followers(&self, slot: Slot) -> impl Iterator<Item = &RingNode> + '_ {
        self.followers
            .get(usize::from(slot))
            .into_iter()
            .flatten()
            .filter_map(|&i| self.nodes.get(usize::from(i)))
    }

    /// Whether `node` follows `slot` (holds a copy of its channels) in this epoch.
    pub fn follows(&self, node: &NodeId, slot: Slot) -> bool {
        self.followers(slot).any(|n| &n.id == node)
    }

    /// How many slots `node` follows.
    pub fn slots_followed(&self, node: &NodeId) -> usize {
        (0..SLOT_COUNT as Slot)
            .filter(|&s| self.follows(node, s))
            .count()
    }

    /// Whether any slot has a follower.
    pub fn is_replicated(&self) -> bool {
        self.followers.iter().any(|f| !f.is_empty())
    }

    /// Per slot, the indexes in [`Ring::nodes`] of its followers (empty when no slot has any):
    /// the published form.
    pub fn follower_parts(&self) -> Vec<Vec<u32>> {
        self.followers
            .iter()
            .map(|f| f.iter().map(|&i| u32::from(i)).collect())
            .collect()
    }

    /// This ring with every slot given `factor - 1` followers (as many as the other nodes
    /// allow; `factor` 1 or less: none). A follower `previous` gave a slot stays while it is
    /// on this ring, is not the slot's owner, and follows no more than its share of that
    /// owner's slots; the rest go to the nodes following fewest of that owner's slots (then
    /// fewest slots overall, then lowest id). So each owner's slots are followed evenly by every
    /// other node — one node's death spreads its slots evenly over the survivors — and a ring
    /// change moves few followers (each move is a copy to fill).
    pub fn with_followers(mut self, previous: &Ring, factor: usize) -> Ring {
        let n = self.nodes.len();
        let want = factor.saturating_sub(1).min(n.saturating_sub(1));
        if want == 0 || self.owners.is_empty() {
            self.followers = Vec::new();
            return self;
        }
        let index_of: HashMap<&NodeId, u16> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| (&node.id, i as u16))
            .collect();
        // pair[owner][follower]: how many of owner's slots follower follows.
        let mut pair = vec![vec![0usize; n]; n];
        let mut total = vec![0usize; n];
        let mut owned = vec![0usize; n];
        for &o in &self.owners {
            owned[usize::from(o)] += 1;
        }
        // Each other node's share of an owner's follower places, rounded up.
        let share = |o: usize| (owned[o] * want).div_ceil(n - 1);
        let mut followers: Vec<Vec<u16>> = vec![Vec::new(); SLOT_COUNT];
        for (slot, list) in followers.iter_mut().enumerate() {
            let o = usize::from(self.owners[slot]);
            for kept in previous.followers(slot as Slot) {
                let Some(&f) = index_of.get(&kept.id) else {
                    continue;
                };
                let fi = usize::from(f);
                if fi == o || list.contains(&f) || list.len() == want {
                    continue;
                }
                if pair[o][fi] < share(o) {
                    pair[o][fi] += 1;
                    total[fi] += 1;
                    list.push(f);
                }
            }
        }
        for (slot, list) in followers.iter_mut().enumerate() {
            let o = usize::from(self.owners[slot]);
            while list.len() < want {
                let pick = (0..n)
                    .filter(|&c| c != o && !list.contains(&(c as u16)))
                    .min_by_key(|&c| (pair[o][c], total[c], c));
                let Some(c) = pick else { break };
                pair[o][c] += 1;
                total[c] += 1;
                list.push(c as u16);
            }
        }
        self.followers = followers;
        self
    }

    /// The next epoch's ring without `dead`: each of its slots goes to the slot's first
    /// follower (which holds the slot's history), a slot without one to `standby` if given,
    /// else to the node owning fewest. `standby`, if given, joins the ring (owning only those
    /// slots). Followers are not assigned: give them with [`Ring::with_followers`]. `None` if
    /// `dead` is not on the ring or `standby` already is.
    pub fn with_promotion(&self, dead: &NodeId, standby: Option<RingNode>) -> Option<Ring> {
        let dead_index = self.nodes.iter().position(|n| &n.id == dead)?;
        if let Some(s) = &standby
            && self.nodes.iter().any(|n| n.id == s.id)
        {
            return None;
        }
        let mut nodes: Vec<RingNode> = self
            .nodes
            .iter()
            .filter(|n| &n.id != dead)
            .cloned()
            .collect();
        nodes.extend(standby.clone());
        if nodes.is_empty() {
            return Some(Ring {
                generation: self.generation,
                epoch: self.epoch + 1,
                nodes,
                owners: Vec::new(),
                followers: Vec::new(),
                handoffs: Vec::new(),
            });
        }
        let index_of: HashMap<&NodeId, u32> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (&n.id, i as u32))
            .collect();
        let mut owners: Vec<u32> = vec![u32::MAX; SLOT_COUNT];
        let mut owned = vec![0usize; nodes.len()];
        let mut orphans = Vec::new();
        for slot in 0..SLOT_COUNT as Slot {
            let owner = usize::from(self.owners[usize::from(slot)]);
            let heir = if owner == dead_index {
                self.followers(slot).find(|f| &f.id != dead).map(|f| &f.id)
            } else {
                Some(&self.nodes[owner].id)
            };
            match heir.and_then(|id| index_of.get(id)) {
                Some(&i) => {
                    owners[usize::from(slot)] = i;
                    owned[i as usize] += 1;
                }
                None => orphans.push(slot),
            }
        }
        let standby_index = standby.as_ref().and_then(|s| index_of.get(&s.id)).copied();
        for slot in orphans {
            let i = match standby_index {
                Some(i) => i as usize,
                None => (0..owned.len()).min_by_key(|&i| (owned[i], i)).unwrap_or(0),
            };
            owners[usize::from(slot)] = i as u32;
            owned[i] += 1;
        }
        Ring::from_parts(self.epoch + 1, nodes, owners)
            .ok()
            .map(|ring| ring.with_generation(self.generation))
    }

    /// The next epoch's ring in which `new` takes over exactly the slots of `old` (a standby
    /// replacing a failed or retired node): no other slot moves. `None` if `old` owns no slots
    /// or `new` already owns some. The ring has no followers: give them with
    /// [`Ring::with_followers`].
    pub fn with_takeover(&self, old: &NodeId, new: RingNode) -> Option<Ring> {
        let old_index = self.nodes.iter().position(|n| &n.id == old)?;
        if self.nodes.iter().any(|n| n.id == new.id) {
            return None;
        }
        let mut nodes = self.nodes.clone();
        nodes[old_index] = new;
        let owners = self.owners.iter().map(|&i| u32::from(i)).collect();
        // Re-sorting by id (from_parts) keeps equal rings equal; the parts are valid.
        Ring::from_parts(self.epoch + 1, nodes, owners)
            .ok()
            .map(|ring| ring.with_generation(self.generation))
    }

    /// The next epoch's ring over exactly `members`, moving as few slots as possible.
    ///
    /// Every member ends with `SLOT_COUNT / n` or one more slot (the extra ones go to the
    /// members that hold the most already). Slots of nodes that are no longer members go first
    /// to members below their share; then members above their share give up their
    /// highest-numbered slots. So adding one node to N moves only onto the new node, about
    /// `SLOT_COUNT / (N + 1)` slots, and removing a node moves only that node's slots. The ring
    /// has no followers: give them with [`Ring::with_followers`].
    pub fn rebalanced(&self, members: &[RingNode]) -> Ring {
        let mut nodes: Vec<RingNode> = members.to_vec();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|a, b| a.id == b.id);
        let epoch = self.epoch + 1;
        if nodes.is_empty() {
            return Ring {
                generation: self.generation,
                epoch,
                nodes,
                owners: Vec::new(),
                followers: Vec::new(),
                handoffs: Vec::new(),
            };
        }
        let index_of: HashMap<&NodeId, usize> =
            nodes.iter().enumerate().map(|(i, n)| (&n.id, i)).collect();

        // Who keeps what, before balancing.
        let mut held: Vec<Vec<Slot>> = vec![Vec::new(); nodes.len()];
        let mut pool: Vec<Slot> = Vec::new();
        for slot in 0..SLOT_COUNT as Slot {
            match self.owner(slot).and_then(|n| index_of.get(&n.id)) {
                Some(&i) => held[i].push(slot),
                None => pool.push(slot),
            }
        }

        // Shares: the extra slots go to the members already holding the most (ties by id).
        let n = nodes.len();
        let (base, extra) = (SLOT_COUNT / n, SLOT_COUNT % n);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| held[b].len().cmp(&held[a].len()).then(a.cmp(&b)));
        let mut quota = vec![base; n];
        for &i in order.iter().take(extra) {
            quota[i] += 1;
        }

        for (slots, &q) in held.iter_mut().zip(&quota) {
            while slots.len() > q {
                if let Some(slot) = slots.pop() {
                    pool.push(slot);
                }
            }
        }
        pool.sort_unstable();
        let mut pool = pool.into_iter();
        for (slots, &q) in held.iter_mut().zip(&quota) {
            while slots.len() < q {
                match pool.next() {
                    Some(slot) => slots.push(slot),
                    None => break,
                }
            }
        }

        let mut owners = vec![0u16; SLOT_COUNT];
        for (i, slots) in held.iter().enumerate() {
            for &slot in slots {
                owners[usize::from(slot)] = i as u16;
            }
        }
        Ring {
            generation: self.generation,
            epoch,
            nodes,
            owners,
            followers: Vec::new(),
            handoffs: Vec::new(),
        }
    }

    /// Whether both rings have the same epoch and the same owner and followers for every slot
    /// (handoffs, which only describe how the epoch was reached, are not compared).
    pub fn same_assignment(&self, other: &Ring) -> bool {
        self.epoch == other.epoch
            && (0..SLOT_COUNT as Slot).all(|s| {
                self.owner(s) == other.owner(s) && self.followers(s).eq(other.followers(s))
            })
    }

    /// This ring with `handoffs` attached.
    pub fn with_handoffs(mut self, handoffs: Vec<Handoff>) -> Ring {
        self.handoffs = handoffs;
        self
    }

    /// The state moves that come with this epoch.
    pub fn handoffs(&self) -> &[Handoff] {
        &self.handoffs
    }

    /// For each node that gains slots from `previous` to this ring, the nodes it gains them
    /// from: the handoffs of an epoch that moves state from every live old owner.
    pub fn moves_from(&self, previous: &Ring) -> Vec<Handoff> {
        let mut moves: Vec<Handoff> = Vec::new();
        for slot in 0..SLOT_COUNT as Slot {
            if let (Some(old), Some(new)) = (previous.owner(slot), self.owner(slot))
                && old.id != new.id
                && !moves.iter().any(|m| m.from == old.id && m.to == new.id)
            {
                moves.push(Handoff {
                    from: old.id.clone(),
                    to: new.id.clone(),
                });
            }
        }
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Computed independently with Python's `xxhash.xxh3_64_intdigest(id) % 4096`.
    const PINNED_SLOTS: [Slot; 3] = [87, 787, 3381];

    fn node(i: usize) -> RingNode {
        RingNode {
            id: NodeId::new(&format!("cs-{i}")).unwrap(),
            addr: format!("127.0.0.1:{}", 9000 + i),
        }
    }

    fn ring_of(n: usize) -> Ring {
        let members: Vec<RingNode> = (0..n).map(node).collect();
        // Grow one node at a time, as a cluster does.
        (1..=n).fold(Ring::empty(), |ring, k| ring.rebalanced(&members[..k]))
    }

    /// For each slot, the owner's id, or None.
    fn owner_ids(ring: &Ring) -> Vec<Option<NodeId>> {
        (0..SLOT_COUNT as Slot)
            .map(|s| ring.owner(s).map(|n| n.id.clone()))
            .collect()
    }

    fn assert_balanced(ring: &Ring) {
        let n = ring.nodes().len();
        for node in ring.nodes() {
            let owned = ring.slots_owned(&node.id);
            assert!(
                owned == SLOT_COUNT / n || owned == SLOT_COUNT / n + 1,
                "{} owns {owned} of {SLOT_COUNT} with {n} nodes",
                node.id
            );
        }
    }

    #[test]
    fn slot_hash_is_stable() {
        // XXH3-64's published value for empty input, then pinned slots: these must never change.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        let c = |s: &str| slot_of(&ChannelId::new(s).unwrap());
        assert_eq!([c("C024BE91L"), c("general"), c("U0G9QF9C6")], PINNED_SLOTS);
    }

    #[test]
    fn empty_ring_owns_nothing() {
        let ring = Ring::empty();
        assert_eq!(ring.epoch(), 0);
        assert!(ring.owner(0).is_none());
    }

    #[test]
    fn first_node_takes_everything() {
        let ring = ring_of(1);
        assert_eq!(ring.epoch(), 1);
        assert_eq!(ring.slots_owned(&node(0).id), SLOT_COUNT);
    }

    #[test]
    fn takeover_moves_exactly_the_old_nodes_slots_to_the_new_one() {
        let before = ring_of(3);
        let standby = node(9);
        let after = before.with_takeover(&node(1).id, standby.clone()).unwrap();
        assert_eq!(after.epoch(), before.epoch() + 1);
        for slot in 0..SLOT_COUNT as Slot {
            let (was, now) = (before.owner(slot).unwrap(), after.owner(slot).unwrap());
            if was.id == node(1).id {
                assert_eq!(now, &standby);
            } else {
                assert_eq!(now, was);
            }
        }
        assert!(
            before.with_takeover(&node(7).id, node(8)).is_none(),
            "not a member"
        );
        assert!(
            before.with_takeover(&node(1).id, node(2)).is_none(),
            "already a member"
        );
    }

    #[test]
    fn from_parts_round_trips_and_validates() {
        let ring = ring_of(3);
        let rebuilt = Ring::from_parts(
            ring.epoch(),
            ring.nodes().iter().rev().cloned().collect(),
            ring.owners().map(|i| 2 - i).collect(),
        )
        .unwrap();
        assert_eq!(rebuilt, ring);
        assert_eq!(
            Ring::from_parts(1, vec![node(0)], vec![0; 3]),
            Err(RingError::SlotCount { got: 3 })
        );
        assert!(matches!(
            Ring::from_parts(1, vec![node(0)], vec![1; SLOT_COUNT]),
            Err(RingError::BadOwner { .. })
        ));
        assert!(matches!(
            Ring::from_parts(1, vec![node(0), node(0)], vec![0; SLOT_COUNT]),
            Err(RingError::DuplicateNode(_))
        ));
    }

    #[test]
    fn derived_rings_keep_their_generation() {
        let ring = Ring::empty()
            .with_generation(7)
            .rebalanced(&[node(0), node(1)]);
        assert_eq!(ring.generation(), 7);
        let taken = ring.with_takeover(&node(1).id, node(2)).unwrap();
        assert_eq!(taken.generation(), 7);
        assert_eq!(taken.rebalanced(&[]).generation(), 7);
        assert_eq!(Ring::empty().generation(), 0);
    }

    #[test]
    fn a_follower_takes_a_higher_epoch_or_another_generations_assignment() {
        let a = |epoch: u64, nodes: usize| {
            let members: Vec<RingNode> = (0..nodes).map(node).collect();
            let ring = Ring::from_parts(epoch, Vec::new(), Vec::new()).unwrap();
            let ring = if nodes == 0 {
                ring
            } else {
                Ring::from_parts(epoch - 1, Vec::new(), Vec::new())
                    .unwrap()
                    .rebalanced(&members)
            };
            assert_eq!(ring.epoch(), epoch);
            ring
        };
        let (gen_a, gen_b) = (11, 22);
        let current = a(40, 3).with_generation(gen_a);
        // Within a generation: only a higher epoch.
        assert!(a(41, 3).with_generation(gen_a).supersedes(&current));
        assert!(!a(40, 2).with_generation(gen_a).supersedes(&current));
        assert!(!a(3, 2).with_generation(gen_a).supersedes(&current));
        // Another generation: a reset, taken at any epoch once it assigns slots.
        assert!(a(1, 1).with_generation(gen_b).supersedes(&current));
        assert!(a(90, 1).with_generation(gen_b).supersedes(&current));
        assert!(!a(0, 0).with_generation(gen_b).supersedes(&current));
        // Generation 0 (an older ring manager's ring, or a follower that has seen none):
        // today's rule, epoch only.
        assert!(!a(3, 2).supersedes(&current));
        assert!(a(41, 2).supersedes(&current));
        let old = a(40, 3);
        assert!(!a(3, 2).with_generation(gen_b).supersedes(&old));
        assert!(a(41, 2).with_generation(gen_b).supersedes(&old));
        assert!(a(1, 1).with_generation(gen_b).supersedes(&Ring::empty()));
        assert!(
            !Ring::empty()
                .with_generation(gen_b)
                .supersedes(&Ring::empty())
        );
    }

    /// For each owner, how many of its slots each other node follows.
    fn follow_counts(ring: &Ring) -> HashMap<(NodeId, NodeId), usize> {
        let mut counts = HashMap::new();
        for slot in 0..SLOT_COUNT as Slot {
            let owner = ring.owner(slot).unwrap().id.clone();
            for f in ring.followers(slot) {
                *counts.entry((owner.clone(), f.id.clone())).or_default() += 1;
            }
        }
        counts
    }

    #[test]
    fn followers_are_other_nodes_spread_evenly_over_each_owners_slots() {
        for (n, factor) in [(2, 2), (3, 2), (5, 2), (4, 3), (7, 3)] {
            let ring = ring_of(n).with_followers(&Ring::empty(), factor);
            assert!(ring.is_replicated());
            for slot in 0..SLOT_COUNT as Slot {
                let owner = &ring.owner(slot).unwrap().id;
                let followers: Vec<&NodeId> = ring.followers(slot).map(|f| &f.id).collect();
                assert_eq!(followers.len(), factor - 1, "slot {slot}");
                assert!(!followers.contains(&owner), "slot {slot}: owner follows");
                assert!(ring.follows(followers[0], slot));
            }
            for owner in ring.nodes() {
                let owned = ring.slots_owned(&owner.id);
                let share = (owned * (factor - 1)).div_ceil(n - 1);
                for other in ring.nodes().iter().filter(|o| o.id != owner.id) {
                    let c = follow_counts(&ring)
                        .get(&(owner.id.clone(), other.id.clone()))
                        .copied()
                        .unwrap_or(0);
                    assert!(
                        c + 1 >= share && c <= share,
                        "n={n}: {} follows {c} of {}'s {owned}",
                        other.id,
                        owner.id
                    );
                }
            }
        }
        let single = ring_of(1).with_followers(&Ring::empty(), 2);
        assert!(!single.is_replicated(), "one node has nobody to follow it");
        assert!(!ring_of(3).with_followers(&Ring::empty(), 1).is_replicated());
    }

    #[test]
    fn a_ring_change_keeps_the_followers_it_can() {
        let members: Vec<RingNode> = (0..4).map(node).collect();
        let three = ring_of(3).with_followers(&Ring::empty(), 2);
        let four = three.rebalanced(&members).with_followers(&three, 2);
        let kept = (0..SLOT_COUNT as Slot)
            .filter(|&s| {
                three.owner(s) == four.owner(s) && three.followers(s).eq(four.followers(s))
            })
            .count();
        let unmoved = (0..SLOT_COUNT as Slot)
            .filter(|&s| three.owner(s) == four.owner(s))
            .count();
        // A new node takes a share of the follower places too: about a quarter move.
        assert!(kept * 2 > unmoved, "kept {kept} of {unmoved}");
        assert_eq!(
            four.clone().with_followers(&four, 2),
            four,
            "stable when nothing changes"
        );
    }

    #[test]
    fn a_dead_nodes_slots_go_to_their_followers_evenly() {
        let ring = ring_of(4).with_followers(&Ring::empty(), 2);
        let dead = node(2).id;
        let next = ring.with_promotion(&dead, None).unwrap();
        assert_eq!(next.epoch(), ring.epoch() + 1);
        assert!(next.nodes().iter().all(|n| n.id != dead));
        let mut gained: HashMap<NodeId, usize> = HashMap::new();
        for slot in 0..SLOT_COUNT as Slot {
            let was = ring.owner(slot).unwrap();
            let now = next.owner(slot).unwrap();
            if was.id == dead {
                assert_eq!(Some(now), ring.followers(slot).next(), "slot {slot}");
                *gained.entry(now.id.clone()).or_default() += 1;
            } else {
                assert_eq!(now, was);
            }
        }
        let dead_slots = ring.slots_owned(&dead);
        for (id, n) in &gained {
            assert!(
                n.abs_diff(dead_slots / 3) <= 1,
                "{id} gained {n} of {dead_slots}"
            );
        }
        // With a standby: it joins, owning nothing the followers could take.
        let standby = node(9);
        let with = ring.with_promotion(&dead, Some(standby.clone())).unwrap();
        assert_eq!(with.slots_owned(&standby.id), 0);
        assert!(with.nodes().contains(&standby));
        let refilled = with.with_followers(&ring, 2);
        assert!(
            refilled.slots_followed(&standby.id) > 0,
            "the standby follows"
        );
        // Without followers, the standby takes the dead node's slots.
        let bare = ring_of(3);
        let taken = bare
            .with_promotion(&node(1).id, Some(standby.clone()))
            .unwrap();
        assert_eq!(
            taken.slots_owned(&standby.id),
            bare.slots_owned(&node(1).id)
        );
        assert!(
            ring.with_promotion(&node(7).id, None).is_none(),
            "not a member"
        );
        assert!(
            ring.with_promotion(&dead, Some(node(1))).is_none(),
            "already a member"
        );
    }

    #[test]
    fn followers_round_trip_through_parts_and_are_checked() {
        let ring = ring_of(3).with_followers(&Ring::empty(), 3);
        let rebuilt = Ring::from_replicated_parts(
            ring.epoch(),
            ring.nodes().iter().rev().cloned().collect(),
            ring.owners().map(|i| 2 - i).collect(),
            ring.follower_parts()
                .into_iter()
                .map(|f| f.into_iter().map(|i| 2 - i).collect())
                .collect(),
        )
        .unwrap();
        assert_eq!(rebuilt, ring);
        assert!(rebuilt.same_assignment(&ring));
        assert!(!ring_of(3).same_assignment(&ring), "followers are compared");
        let owners: Vec<u32> = ring.owners().collect();
        let mut bad = ring.follower_parts();
        bad[5] = vec![owners[5]];
        assert!(matches!(
            Ring::from_replicated_parts(1, ring.nodes().to_vec(), owners.clone(), bad),
            Err(RingError::BadFollower { slot: 5, .. })
        ));
        assert_eq!(
            Ring::from_replicated_parts(1, ring.nodes().to_vec(), owners, vec![vec![]; 3]),
            Err(RingError::FollowerCount { got: 3 })
        );
    }

    /// Every N from 1 to 64: adding one node moves a fair share, and only onto the new node.
    #[test]
    fn adding_a_node_moves_a_fair_share_only_onto_it() {
        let members: Vec<RingNode> = (0..=64).map(node).collect();
        let mut before = Ring::empty().rebalanced(&members[..1]);
        for n in 1..=64 {
            let after = before.rebalanced(&members[..=n]);
            assert_balanced(&after);
            let (old, new) = (owner_ids(&before), owner_ids(&after));
            let newcomer = &members[n].id;
            let moved: Vec<usize> = (0..SLOT_COUNT).filter(|&s| old[s] != new[s]).collect();
            for &s in &moved {
                assert_eq!(
                    new[s].as_ref(),
                    Some(newcomer),
                    "N={n}: slot {s} moved elsewhere"
                );
            }
            let share = SLOT_COUNT / (n + 1);
            assert!(
                moved.len() == share || moved.len() == share + 1,
                "N={n}: moved {} slots, fair share is {share}",
                moved.len()
            );
            assert_eq!(after.epoch(), before.epoch() + 1);
            before = after;
        }
    }

    /// Every N from 2 to 64, removing the first, a middle and the last node: only the removed
    /// node's slots move.
    #[test]
    fn removing_a_node_moves_only_its_slots() {
        let members: Vec<RingNode> = (0..64).map(node).collect();
        let mut before = Ring::empty();
        for n in 1..=64 {
            before = before.rebalanced(&members[..n]);
            if n < 2 {
                continue;
            }
            for victim in [0, n / 2, n - 1] {
                let survivors: Vec<RingNode> = members[..n]
                    .iter()
                    .filter(|m| m.id != members[victim].id)
                    .cloned()
                    .collect();
                let after = before.rebalanced(&survivors);
                assert_balanced(&after);
                let (old, new) = (owner_ids(&before), owner_ids(&after));
                let gone = &members[victim].id;
                for s in 0..SLOT_COUNT {
                    if old[s] != new[s] {
                        assert_eq!(
                            old[s].as_ref(),
                            Some(gone),
                            "N={n}: slot {s} of a survivor moved"
                        );
                    }
                    assert_ne!(new[s].as_ref(), Some(gone));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a naive model: any sequence of membership changes keeps the ring balanced,
        /// every slot owned by a member, and moves no more slots than the model's lower bound
        /// (slots of departed nodes plus each member's excess over its new share).
        #[test]
        fn random_membership_changes_stay_balanced_and_minimal(
            steps in proptest::collection::vec(proptest::collection::btree_set(0usize..12, 1..12), 1..12)
        ) {
            let mut ring = Ring::empty();
            for members in steps {
                let members: Vec<RingNode> = members.into_iter().map(node).collect();
                let next = ring.rebalanced(&members);
                assert_balanced(&next);
                let (old, new) = (owner_ids(&ring), owner_ids(&next));
                let member_ids: Vec<&NodeId> = members.iter().map(|m| &m.id).collect();
                for owner in new.iter() {
                    prop_assert!(owner.as_ref().is_some_and(|o| member_ids.contains(&o)));
                }
                let moved = (0..SLOT_COUNT).filter(|&s| old[s].is_some() && old[s] != new[s]).count();
                let orphaned = (0..SLOT_COUNT)
                    .filter(|&s| old[s].as_ref().is_some_and(|o| !member_ids.contains(&o)))
                    .count();
                let excess: usize = members.iter().map(|m| {
                    ring.slots_owned(&m.id).saturating_sub(next.slots_owned(&m.id))
                }).sum();
                prop_assert_eq!(moved, orphaned + excess);
                ring = next;
            }
        }
    }
}
