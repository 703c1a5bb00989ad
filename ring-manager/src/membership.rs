//! Membership as a state machine, without I/O: the registered channel servers, their leases,
//! the ring that assigns them slots, and the epochs it went through.
//!
//! Channel servers register (as active capacity or as standbys) and renew a lease by
//! heartbeat. A node declared down (by the failure monitor, [`crate::monitor`], or by its own
//! re-registration) loses its slots. With replication (a replication factor above 1, so every
//! slot has followers), each of its slots goes to the slot's first follower, which already
//! holds its history, and a live standby joins the ring to receive follower places. Without,
//! a live standby takes over exactly its slots, or, with no standby, they spread over the
//! survivors. Every ring published carries `factor - 1` followers per slot (as many as the
//! other nodes allow). Every change of the ring is a new epoch; the SRE operations that change
//! it on purpose are in [`crate::operations`].
//!
//! Methods change the state and record what the caller must do about it (publish each new ring
//! in order, save the state): the caller takes those with [`Membership::take_effects`] while
//! it still holds its lock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mesh_core::{NodeId, Ring, RingNode};

use crate::state_file::{Saved, SavedMember};

/// A channel server's state, as `ctl ring` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Registered as active capacity, not yet given slots; or, on a replicated ring, on the
    /// ring as a follower only (an added or replacing standby) until its copies are filled,
    /// when it takes its share of primaries.
    Joining,
    /// Owns slots.
    Active,
    /// Registered, owns nothing; replaces a failed node or is added by an operator.
    Standby,
    /// Handing its slots' state to their new owners; becomes a standby when done.
    Draining,
    /// Lost its lease. A later registration under the same id starts a new incarnation.
    Down,
}

impl NodeState {
    /// The name `ctl` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Standby => "standby",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        }
    }

    /// The state a saved name stands for (an unknown one is down).
    fn from_saved(name: &str) -> NodeState {
        match name {
            "joining" => NodeState::Joining,
            "active" => NodeState::Active,
            "standby" => NodeState::Standby,
            "draining" => NodeState::Draining,
            _ => NodeState::Down,
        }
    }
}

/// A member as the console shows it (read together with the ring it belongs to).
#[derive(Debug, Clone)]
pub struct MemberView {
    pub id: NodeId,
    pub addr: String,
    pub pid: u32,
    pub state: NodeState,
    /// Its registration: a node that re-registers gets a new one.
    pub incarnation: u64,
    /// Since its last heartbeat: the only liveness signal a node sends (heartbeats carry no
    /// load figures).
    pub since_heartbeat: Duration,
    /// Replication progress as its last heartbeat reported it: slots it follows whose copy
    /// was still being filled, counted in ring epoch `catching_up_epoch` (0, 0: nothing
    /// reported). A count for an epoch older than the current ring's is stale: shown, never
    /// acted on.
    pub catching_up: u32,
    pub catching_up_epoch: u64,
}

/// One published epoch and what it changed, for the console's history.
#[derive(Debug, Clone)]
pub struct EpochChange {
    pub epoch: u64,
    /// When it was published.
    pub at: SystemTime,
    /// Why, in words (the operation, or the dead node and who took its slots).
    pub cause: String,
    /// Slots whose owner changed.
    pub moved: usize,
    /// (from, to, slots) per pair of owners; `None` is "no owner" (the first epoch, or a ring
    /// with no active node left).
    pub moves: Vec<(Option<NodeId>, Option<NodeId>, usize)>,
}

impl EpochChange {
    /// What `next` changed from `before`, published at `at` for `cause`.
    pub fn between(before: &Ring, next: &Ring, cause: &str, at: SystemTime) -> EpochChange {
        let mut moves: BTreeMap<(Option<&NodeId>, Option<&NodeId>), usize> = BTreeMap::new();
        for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
            let (from, to) = (before.owner(s).map(|n| &n.id), next.owner(s).map(|n| &n.id));
            if from != to {
                *moves.entry((from, to)).or_default() += 1;
            }
        }
        EpochChange {
            epoch: next.epoch(),
            at,
            cause: cause.to_string(),
            moved: moves.values().sum(),
            moves: moves
                .into_iter()
                .map(|((from, to), n)| (from.cloned(), to.cloned(), n))
                .collect(),
        }
    }
}

/// Why a registration or an SRE operation ([`crate::operations`]) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// A registration without an address to dial.
    #[error("addr is required")]
    NoAddr,
    #[error("no node {0}")]
    NoSuchNode(NodeId),
    #[error("{0} is {state}, not active", state = .1.as_str())]
    NotActive(NodeId, NodeState),
    #[error("{0} is {state}, not a standby", state = .1.as_str())]
    NotStandby(NodeId, NodeState),
    #[error("{0} is the last active node: add one first")]
    LastActiveNode(NodeId),
    #[error("no live standby to replace it with")]
    NoStandbyToReplace,
    #[error("no live standby to add")]
    NoStandbyToAdd,
    #[error("{0} owns no slots")]
    OwnsNoSlots(NodeId),
}

/// A registered channel server.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    /// The address other services dial, `host:port`.
    pub(crate) addr: String,
    pub(crate) pid: u32,
    pub(crate) state: NodeState,
    /// Its registration; heartbeats of another one are refused.
    pub(crate) incarnation: u64,
    /// When its lease was last renewed.
    pub(crate) last_heartbeat: Instant,
    /// Its lease stream ended: probe at once.
    pub(crate) stream_closed: bool,
    /// A probe is in flight.
    pub(crate) probing: bool,
    /// For a draining node: the epoch whose handoffs it must finish.
    pub(crate) drain_epoch: u64,
    /// Replication progress its last heartbeat reported (not saved): followed slots still
    /// being filled, and the ring epoch it counted them in.
    pub(crate) catching_up: u32,
    pub(crate) catching_up_epoch: u64,
    /// For a node joining a replicated ring as a follower: the epoch that gave it follower
    /// places. Once it reports no followed slot catching up, counted in this epoch or a later
    /// one, it takes its share of primaries ([`Membership::lead_followed`]).
    pub(crate) follow_epoch: u64,
}

impl Member {
    fn new(addr: String, pid: u32, state: NodeState, incarnation: u64, now: Instant) -> Self {
        Member {
            addr,
            pid,
            state,
            incarnation,
            last_heartbeat: now,
            stream_closed: false,
            probing: false,
            drain_epoch: 0,
            catching_up: 0,
            catching_up_epoch: 0,
            follow_epoch: 0,
        }
    }
}

/// What the holder of the state must do after a change, in order.
#[derive(Debug, Clone, Default)]
pub struct Effects {
    /// Each new ring, oldest first: publish every one.
    pub published: Vec<Arc<Ring>>,
    /// The ring or a member's state changed: save the state (and tell the console).
    pub changed: bool,
}

/// The members, their leases and the ring. Cloned before a change, so that a change whose
/// state cannot be saved is undone whole.
#[derive(Debug, Clone)]
pub struct Membership {
    /// Every registered node, whatever its state, by id.
    members: BTreeMap<NodeId, Member>,
    /// The incarnation the next registration gets (never reused, saved with the state).
    next_incarnation: u64,
    /// The current ring.
    ring: Arc<Ring>,
    /// A standby silent for this long (or whose stream ended) is not live.
    suspect_after: Duration,
    /// The last `history_len` epochs published, oldest first.
    history: VecDeque<EpochChange>,
    history_len: usize,
    /// What the holder must do about the changes since it last looked.
    effects: Effects,
    /// Since when the ring manager hears fewer than half of its live members (not saved): it
    /// is the one cut off, and judges nobody until it hears them again (`monitor`).
    pub(crate) deaf_since: Option<Instant>,
    /// How many nodes hold each slot (owner and followers); 1: no followers.
    replication_factor: usize,
}

impl Membership {
    /// No members, the empty ring at epoch 0 of a new ring generation; remembers the last
    /// `history_len` epochs.
    pub fn new(suspect_after: Duration, history_len: usize) -> Self {
        Membership {
            members: BTreeMap::new(),
            next_incarnation: 1,
            ring: Arc::new(Ring::empty().with_generation(new_generation())),
            suspect_after,
            history: VecDeque::with_capacity(history_len),
            history_len,
            effects: Effects::default(),
            deaf_since: None,
            replication_factor: 1,
        }
    }

    /// This membership, placing `factor - 1` followers per slot on every ring it publishes
    /// from now on (at least 1: no followers, which is what [`Membership::new`] starts with).
    /// A resumed ring keeps the followers it was saved with until its next change.
    pub fn with_replication_factor(mut self, factor: usize) -> Self {
        self.replication_factor = factor.max(1);
        self
    }

    /// How many nodes hold each slot (owner and followers); 1: no followers.
    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// The state `saved` describes, at `now`: every member gets one suspicion period from
    /// `now` to resume its lease. A member with an invalid id is dropped; an invalid ring is
    /// refused. State saved before rings had generations (0) gets one, kept from now on (its
    /// followers, holding rings without one, go by epochs, which continue).
    pub fn resume(
        saved: &Saved,
        now: Instant,
        suspect_after: Duration,
        history_len: usize,
    ) -> Result<Self, String> {
        let mut ring = saved.ring()?;
        if ring.generation() == 0 {
            ring = ring.with_generation(new_generation());
            tracing::info!(
                generation = ring.generation(),
                "the saved ring has no generation (saved by an older ring manager); it gets one"
            );
        }
        let members = saved
            .members
            .iter()
            .filter_map(|m| {
                let state = NodeState::from_saved(&m.state);
                let mut member = Member::new(m.addr.clone(), m.pid, state, m.incarnation, now);
                // A follower still joining must report its copies filled in the resumed
                // ring (the epoch that gave it its places is not saved).
                member.follow_epoch = ring.epoch();
                Some((NodeId::new(&m.id).ok()?, member))
            })
            .collect();
        Ok(Membership {
            members,
            next_incarnation: saved.next_incarnation,
            ring: Arc::new(ring),
            ..Membership::new(suspect_after, history_len)
        })
    }

    /// The state as saved (state file or Consul KV).
    pub fn saved(&self) -> Saved {
        let (epoch, nodes, slot_owner, slot_followers) = Saved::ring_parts(&self.ring);
        Saved {
            generation: self.ring.generation(),
            epoch,
            nodes,
            slot_owner,
            slot_followers,
            members: self
                .members
                .iter()
                .map(|(id, m)| SavedMember {
                    id: id.to_string(),
                    addr: m.addr.clone(),
                    pid: m.pid,
                    state: m.state.as_str().to_string(),
                    incarnation: m.incarnation,
                })
                .collect(),
            next_incarnation: self.next_incarnation,
            ..Saved::default()
        }
    }

    /// What the changes since the last call require of the caller.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// The current ring.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Members and their states, sorted by id.
    pub fn members(&self) -> Vec<(NodeId, NodeState)> {
        self.members
            .iter()
            .map(|(id, m)| (id.clone(), m.state))
            .collect()
    }

    /// Every member as seen at `now`, sorted by id.
    pub fn views(&self, now: Instant) -> Vec<MemberView> {
        self.members
            .iter()
            .map(|(id, m)| MemberView {
                id: id.clone(),
                addr: m.addr.clone(),
                pid: m.pid,
                state: m.state,
                incarnation: m.incarnation,
                since_heartbeat: now.saturating_duration_since(m.last_heartbeat),
                catching_up: m.catching_up,
                catching_up_epoch: m.catching_up_epoch,
            })
            .collect()
    }

    /// The recent epochs, newest first.
    pub fn history(&self) -> Vec<EpochChange> {
        self.history.iter().rev().cloned().collect()
    }

    /// The member `id`, if registered.
    pub(crate) fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members.get(id)
    }

    /// The member `id`, to change (the operations and the monitor do).
    pub(crate) fn member_mut(&mut self, id: &NodeId) -> Option<&mut Member> {
        self.members.get_mut(id)
    }

    /// Every member, sorted by id.
    pub(crate) fn members_iter(&self) -> impl Iterator<Item = (&NodeId, &Member)> {
        self.members.iter()
    }

    /// Every member, to change, sorted by id.
    pub(crate) fn members_mut(&mut self) -> impl Iterator<Item = (&NodeId, &mut Member)> {
        self.members.iter_mut()
    }

    /// Notes a change of a member's state that publishes no ring.
    pub(crate) fn changed(&mut self) {
        self.effects.changed = true;
    }

    /// Adds (or re-announces) a channel server at `now`; returns the epoch it joined in and
    /// its incarnation, or refuses a registration without an address. An active registration
    /// takes a fair share of slots in a new epoch; a standby waits. A re-registration of an id
    /// whose earlier incarnation is not down first retires that incarnation as if it had died.
    pub fn register(
        &mut self,
        id: NodeId,
        addr: String,
        pid: u32,
        standby: bool,
        now: Instant,
    ) -> Result<(u64, u64), MembershipError> {
        if addr.is_empty() {
            return Err(MembershipError::NoAddr);
        }
        if self
            .members
            .get(&id)
            .is_some_and(|m| m.state != NodeState::Down)
        {
            tracing::warn!(node = %id, "node re-registered; retiring its earlier incarnation");
            self.declare_down(&id, "re-registered", now);
        }
        // A standby waits to take over a dead node's slots; once every active node is gone
        // (declared down with no standby left) there is nobody to take over from, and a mesh of
        // standbys would serve nothing until an operator noticed: the first to register
        // serves. Not on a ring that never had an owner (a mesh still starting).
        let standby = if standby && self.ring.epoch() > 0 && self.active_nodes().is_empty() {
            tracing::warn!(
                node = %id,
                "no active node left: a standby registering takes every slot (add nodes back \
                 with `ctl add-node`)"
            );
            false
        } else {
            standby
        };
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let state = if standby {
            NodeState::Standby
        } else {
            NodeState::Joining
        };
        let member = Member::new(addr.clone(), pid, state, incarnation, now);
        self.members.insert(id.clone(), member);
        let epoch = if standby {
            tracing::info!(node = %id, %addr, "standby node registered");
            self.changed();
            self.ring.epoch()
        } else {
            let ring = self.activate(&id);
            tracing::info!(node = %id, %addr, epoch = ring.epoch(), "node registered");
            ring.epoch()
        };
        Ok((epoch, incarnation))
    }

    /// Renews `id`'s lease at `now`; false if that incarnation is no longer valid. A draining
    /// node that has handed off its drain's epoch becomes a standby.
    pub fn heartbeat(
        &mut self,
        id: &NodeId,
        incarnation: u64,
        handed_off_epoch: u64,
        now: Instant,
    ) -> bool {
        if !self.renew(id, incarnation, now) {
            return false;
        }
        if self.drain_done(id, handed_off_epoch)
            && let Some(member) = self.members.get_mut(id)
        {
            member.state = NodeState::Standby;
            tracing::info!(node = %id, "drain complete; node is a standby");
            self.changed();
        }
        true
    }

    /// Whether `id` drains and has handed off its drain's epoch (`handed_off_epoch`): its next
    /// heartbeat makes it a standby.
    pub fn drain_done(&self, id: &NodeId, handed_off_epoch: u64) -> bool {
        self.members
            .get(id)
            .is_some_and(|m| m.state == NodeState::Draining && handed_off_epoch >= m.drain_epoch)
    }

    /// Renews `id`'s lease at `now`, and nothing else (no state to save); false if that
    /// incarnation is no longer valid.
    pub fn renew(&mut self, id: &NodeId, incarnation: u64, now: Instant) -> bool {
        let Some(member) = self.members.get_mut(id) else {
            return false;
        };
        if member.incarnation != incarnation || member.state == NodeState::Down {
            return false;
        }
        member.last_heartbeat = now;
        member.stream_closed = false;
        true
    }

    /// Notes the replication progress `id` (of `incarnation`) reported: `catching_up` followed
    /// slots still being filled, counted in ring epoch `epoch`. Not saved: the next heartbeat
    /// says it again.
    pub fn report_progress(&mut self, id: &NodeId, incarnation: u64, catching_up: u32, epoch: u64) {
        if let Some(member) = self.members.get_mut(id)
            && member.incarnation == incarnation
        {
            member.catching_up = catching_up;
            member.catching_up_epoch = epoch;
        }
    }

    /// Gives up on `probe`'s suspect being probed (its answer could not be acted on): the next
    /// look at the leases probes it again.
    pub(crate) fn unprobe(&mut self, id: &NodeId, incarnation: u64) {
        if let Some(member) = self.members.get_mut(id)
            && member.incarnation == incarnation
        {
            member.probing = false;
        }
    }

    /// `id`'s lease stream (of `incarnation`) ended: the monitor probes it at once.
    pub fn lease_ended(&mut self, id: &NodeId, incarnation: u64) {
        if let Some(member) = self.members.get_mut(id)
            && member.incarnation == incarnation
            && member.state != NodeState::Down
        {
            member.stream_closed = true;
        }
    }

    /// The active nodes, and the nodes joining the ring as followers, sorted by id: the
    /// nodes a rebalanced ring is over.
    pub(crate) fn active_nodes(&self) -> Vec<RingNode> {
        self.members
            .iter()
            .filter(|(id, m)| {
                m.state == NodeState::Active
                    || (m.state == NodeState::Joining
                        && self.ring.nodes().iter().any(|n| &n.id == *id))
            })
            .map(|(id, m)| RingNode {
                id: id.clone(),
                addr: m.addr.clone(),
            })
            .collect()
    }

    /// A live standby at `now` to take over, preferring the lowest id.
    pub(crate) fn pick_standby(&self, now: Instant) -> Option<(NodeId, String)> {
        self.members
            .iter()
            .find(|(_, m)| {
                m.state == NodeState::Standby
                    && !m.stream_closed
                    && now.duration_since(m.last_heartbeat) < self.suspect_after
            })
            .map(|(id, m)| (id.clone(), m.addr.clone()))
    }

    /// Makes `id` active, taking a fair share of slots from the others (with handoffs).
    pub(crate) fn activate(&mut self, id: &NodeId) -> Arc<Ring> {
        if let Some(m) = self.members.get_mut(id) {
            m.state = NodeState::Active;
        }
        let next = self.ring.rebalanced(&self.active_nodes());
        let handoffs = next.moves_from(&self.ring);
        let cause = format!("{id} joined the active nodes");
        self.publish(next.with_handoffs(handoffs), &cause)
    }

    /// Declares `id` down at `now` and moves its slots. On a replicated ring: each to the
    /// slot's first follower, a live standby joining to receive follower places (and any slot
    /// no follower could take). Without followers: to a live standby, else spread over the
    /// survivors. No handoff is named: the node is dead.
    pub fn declare_down(&mut self, id: &NodeId, why: &str, now: Instant) {
        let Some(member) = self.members.get_mut(id) else {
            return;
        };
        let owned = matches!(
            member.state,
            NodeState::Active | NodeState::Draining | NodeState::Joining
        );
        member.state = NodeState::Down;
        member.probing = false;
        tracing::warn!(node = %id, why, "node declared down");
        let on_ring = self.ring.nodes().iter().any(|n| &n.id == id);
        if !owned || !on_ring || (!self.ring.is_replicated() && self.ring.slots_owned(id) == 0) {
            self.changed();
            return;
        }
        if self.ring.is_replicated() {
            self.promote_followers(id, why, now);
            return;
        }
        if let Some((standby, addr)) = self.pick_standby(now)
            && let Some(next) = self.ring.with_takeover(
                id,
                RingNode {
                    id: standby.clone(),
                    addr,
                },
            )
        {
            if let Some(m) = self.members.get_mut(&standby) {
                m.state = NodeState::Active;
            }
            tracing::info!(dead = %id, %standby, "standby takes over the dead node's slots");
            let cause = format!("{id} down ({why}); standby {standby} takes its slots");
            self.publish(next, &cause);
            return;
        }
        let next = self.ring.rebalanced(&self.active_nodes());
        let cause = format!("{id} down ({why}); its slots spread over the survivors");
        self.publish(next, &cause);
    }

    /// Declares dead `id`'s slots promoted to their first followers in a new epoch, a live
    /// standby at `now` joining the ring as active capacity (owning only the slots no follower
    /// could take, usually none) to receive follower places.
    fn promote_followers(&mut self, id: &NodeId, why: &str, now: Instant) {
        let standby = self
            .pick_standby(now)
            .map(|(id, addr)| RingNode { id, addr });
        let Some(next) = self.ring.with_promotion(id, standby.clone()) else {
            // Not on the ring after all (checked by the caller): nothing to move.
            self.changed();
            return;
        };
        let mut cause = format!("{id} down ({why}); its slots promoted to their followers");
        if let Some(standby) = &standby {
            self.join_as_follower(&standby.id, next.epoch());
            cause.push_str(&format!("; standby {} joins as a follower", standby.id));
        }
        tracing::info!(dead = %id, standby = ?standby.as_ref().map(|s| &s.id), "followers take over the dead node's slots");
        self.publish(next, &cause);
    }

    /// Marks `id` joining the ring as a follower in `epoch`: it takes its share of primaries
    /// once its copies are filled (a node the same ring gives slots is active at once).
    pub(crate) fn join_as_follower(&mut self, id: &NodeId, epoch: u64) {
        if let Some(m) = self.members.get_mut(id) {
            m.state = NodeState::Joining;
            m.follow_epoch = epoch;
        }
    }

    /// Whether `id` joins the ring as a follower and has reported every slot it follows filled,
    /// counted in the epoch that gave it its places or a later one (a count for an older epoch
    /// says nothing about them).
    pub fn ready_to_lead(&self, id: &NodeId) -> bool {
        self.members.get(id).is_some_and(|m| {
            m.state == NodeState::Joining
                && m.follow_epoch > 0
                && m.catching_up == 0
                && m.catching_up_epoch >= m.follow_epoch
                && self.ring.nodes().iter().any(|n| &n.id == id)
        })
    }

    /// If `id` is [ready to lead](Membership::ready_to_lead): a new epoch in which it owns its
    /// fair share of slots, taken first among those it follows (it holds their history), with
    /// handoffs from their live old owners; it is active from then on.
    pub fn lead_followed(&mut self, id: &NodeId) -> Option<Arc<Ring>> {
        if !self.ready_to_lead(id) {
            return None;
        }
        let Some(next) = crate::placement::lead_followed(&self.ring, id) else {
            // Nothing to gain (a ring of many nodes): it is active as it is.
            if let Some(m) = self.members.get_mut(id) {
                m.state = NodeState::Active;
            }
            self.changed();
            return None;
        };
        if let Some(m) = self.members.get_mut(id) {
            m.state = NodeState::Active;
        }
        let handoffs = next.moves_from(&self.ring);
        let led = next.slots_owned(id);
        let cause = format!("{id} caught up: it leads {led} slots, promoted where it followed");
        Some(self.publish(next.with_handoffs(handoffs), &cause))
    }

    /// Makes `next` the ring — with `factor - 1` followers per slot, kept from the current
    /// ring where they can be — remembers and logs what changed, and has the caller publish
    /// it. A joining node that owns slots in it is active.
    pub(crate) fn publish(&mut self, next: Ring, why: &str) -> Arc<Ring> {
        let next = next.with_followers(&self.ring, self.replication_factor);
        for (id, m) in self.members.iter_mut() {
            if m.state == NodeState::Joining && next.slots_owned(id) > 0 {
                m.state = NodeState::Active;
            }
        }
        let change = EpochChange::between(&self.ring, &next, why, SystemTime::now());
        tracing::info!(
            epoch = next.epoch(),
            moved_slots = change.moved,
            why,
            "new ring epoch"
        );
        self.history.push_back(change);
        while self.history.len() > self.history_len {
            self.history.pop_front();
        }
        let next = Arc::new(next);
        self.ring = next.clone();
        self.effects.published.push(next.clone());
        self.effects.changed = true;
        next
    }
}

/// A new ring generation id: random (from the OS's seed of the standard library's hasher keys),
/// never 0, which means "unknown".
fn new_generation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .max(1)
}

#[cfg(test)]
pub(crate) mod tests;
