//! The SRE operations on the membership (`ctl drain-node`, `ctl replace-node`, `ctl add-node`):
//! each checks that it applies, changes the ring in a new epoch (with the handoffs of channel
//! state it needs) and returns that ring, or says why it was refused ([`MembershipError`]).
//!
//! On a replicated ring, drain and replace move primaries by promotion: each of the node's
//! slots goes to its first follower, which already holds the slot's history, with a handoff
//! named from the (live) old owner to each new owner, so that whatever the follower may lack
//! arrives too (the new owner merges the two).

use std::sync::Arc;
use std::time::Instant;

use mesh_core::{Handoff, NodeId, Ring, RingNode};

use crate::membership::{Membership, MembershipError, NodeState};

impl Membership {
    /// `id`'s state, if it is registered.
    fn state_of(&self, id: &NodeId) -> Result<NodeState, MembershipError> {
        self.member(id)
            .map(|m| m.state)
            .ok_or_else(|| MembershipError::NoSuchNode(id.clone()))
    }

    /// Refuses unless `id` is active.
    fn check_active(&self, id: &NodeId) -> Result<(), MembershipError> {
        match self.state_of(id)? {
            NodeState::Active => Ok(()),
            state => Err(MembershipError::NotActive(id.clone(), state)),
        }
    }

    /// Marks `id` draining until it has handed off `epoch`'s moves.
    fn start_draining(&mut self, id: &NodeId, epoch: u64) {
        if let Some(m) = self.member_mut(id) {
            m.state = NodeState::Draining;
            m.drain_epoch = epoch;
        }
    }

    /// `ctl drain-node`: moves `id`'s slots to the other active nodes, with handoff (on a
    /// replicated ring each to its first follower, else rebalanced); `id` drains, and becomes
    /// a standby once it has handed them off.
    pub fn drain(&mut self, id: &NodeId) -> Result<Arc<Ring>, MembershipError> {
        self.check_active(id)?;
        let survivors: Vec<RingNode> = self
            .active_nodes()
            .into_iter()
            .filter(|n| &n.id != id)
            .collect();
        if survivors.is_empty() {
            return Err(MembershipError::LastActiveNode(id.clone()));
        }
        let (next, cause) = match self.promoted(id, None) {
            Some(next) => (
                next,
                format!("{id} drained (its slots promoted to their followers)"),
            ),
            None => (self.ring().rebalanced(&survivors), format!("{id} drained")),
        };
        let handoffs = next.moves_from(self.ring());
        self.start_draining(id, next.epoch());
        Ok(self.publish(next.with_handoffs(handoffs), &cause))
    }

    /// On a replicated ring, the next epoch without `id`, each of its slots promoted to its
    /// first follower, `standby` joining (see [`Ring::with_promotion`]); `None` on a ring
    /// without followers, or if `id` is not on it.
    fn promoted(&self, id: &NodeId, standby: Option<RingNode>) -> Option<Ring> {
        if !self.ring().is_replicated() {
            return None;
        }
        self.ring().with_promotion(id, standby)
    }

    /// `ctl replace-node`: hands `id`'s slots to a standby live at `now` (with handoff, since
    /// `id` is alive). On a replicated ring, each slot goes to its first follower instead
    /// (with a handoff from `id`), and the standby joins to receive follower places.
    pub fn replace(&mut self, id: &NodeId, now: Instant) -> Result<Arc<Ring>, MembershipError> {
        self.check_active(id)?;
        let (standby, addr) = self
            .pick_standby(now)
            .ok_or(MembershipError::NoStandbyToReplace)?;
        let joining = RingNode {
            id: standby.clone(),
            addr: addr.clone(),
        };
        if let Some(next) = self.promoted(id, Some(joining)) {
            self.join_as_follower(&standby, next.epoch());
            self.start_draining(id, next.epoch());
            let cause = format!(
                "{id} replaced: its slots promoted to their followers; standby {standby} joins as a follower"
            );
            let handoffs = next.moves_from(self.ring());
            return Ok(self.publish(next.with_handoffs(handoffs), &cause));
        }
        let next = self
            .ring()
            .with_takeover(
                id,
                RingNode {
                    id: standby.clone(),
                    addr,
                },
            )
            .ok_or_else(|| MembershipError::OwnsNoSlots(id.clone()))?;
        if let Some(m) = self.member_mut(&standby) {
            m.state = NodeState::Active;
        }
        self.start_draining(id, next.epoch());
        let cause = format!("{id} replaced by standby {standby}");
        let handoffs = vec![Handoff {
            from: id.clone(),
            to: standby,
        }];
        Ok(self.publish(next.with_handoffs(handoffs), &cause))
    }

    /// `ctl add-node`: makes standby `id` (or, with `None`, any standby live at `now`) active,
    /// taking a fair share of slots from the others. With a replication factor above 1 (and a
    /// ring with an owner) it first joins the ring owning nothing, to receive follower places;
    /// it takes its share of primaries, on slots it follows, once it reports its copies filled
    /// ([`Membership::lead_followed`]).
    pub fn add(&mut self, id: Option<&NodeId>, now: Instant) -> Result<Arc<Ring>, MembershipError> {
        let id = match id {
            Some(id) => match self.state_of(id)? {
                NodeState::Standby => id.clone(),
                state => return Err(MembershipError::NotStandby(id.clone(), state)),
            },
            None => {
                self.pick_standby(now)
                    .ok_or(MembershipError::NoStandbyToAdd)?
                    .0
            }
        };
        if self.replication_factor() > 1 {
            let addr = self.member(&id).map(|m| m.addr.clone()).unwrap_or_default();
            let node = RingNode {
                id: id.clone(),
                addr,
            };
            if let Some(next) = crate::placement::joined(self.ring(), node) {
                self.join_as_follower(&id, next.epoch());
                let cause = format!(
                    "{id} joins as a follower; it takes its share of primaries once its copies are filled"
                );
                return Ok(self.publish(next, &cause));
            }
        }
        Ok(self.activate(&id))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::membership::tests::{SUSPECT, assert_followers, id, replicated, state, with_nodes};

    /// The handoffs `ring` names, as (from, to) pairs sorted.
    fn handoff_pairs(ring: &Ring) -> Vec<(NodeId, NodeId)> {
        let mut pairs: Vec<(NodeId, NodeId)> = ring
            .handoffs()
            .iter()
            .map(|h| (h.from.clone(), h.to.clone()))
            .collect();
        pairs.sort();
        pairs
    }

    /// Checks that `after` gave each of `node`'s slots in `before` to the slot's first
    /// follower and moved no other slot.
    fn promoted(before: &Ring, after: &Ring, node: &str) {
        for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
            let expected = if before.owns(&id(node), s) {
                before.followers(s).next()
            } else {
                before.owner(s)
            };
            assert_eq!(after.owner(s), expected, "slot {s}");
        }
    }

    #[test]
    fn on_a_replicated_ring_drain_moves_each_slot_to_its_follower_with_handoffs() {
        let now = Instant::now();
        let mut m = replicated(&["a", "b", "c"], &[], 2, now);
        let before = m.ring().clone();
        let ring = m.drain(&id("b")).unwrap();
        promoted(&before, &ring, "b");
        assert!(ring.nodes().iter().all(|n| n.id != id("b")));
        assert_eq!(
            handoff_pairs(&ring),
            [(id("b"), id("a")), (id("b"), id("c"))],
            "from the live old owner to each new owner"
        );
        assert_followers(&ring, 2);
        assert_eq!(state(&m, "b"), NodeState::Draining);
        assert_eq!(
            m.history()[0].cause,
            "b drained (its slots promoted to their followers)"
        );
        assert!(m.heartbeat(&id("b"), 2, ring.epoch(), now));
        assert_eq!(state(&m, "b"), NodeState::Standby);
    }

    #[test]
    fn on_a_replicated_ring_replace_promotes_followers_and_the_standby_joins_as_one() {
        let now = Instant::now();
        let mut m = replicated(&["a", "b", "c"], &["s"], 2, now);
        let before = m.ring().clone();
        let ring = m.replace(&id("a"), now).unwrap();
        promoted(&before, &ring, "a");
        assert_eq!(
            handoff_pairs(&ring),
            [(id("a"), id("b")), (id("a"), id("c"))]
        );
        assert_eq!(ring.slots_owned(&id("s")), 0);
        assert!(
            ring.slots_followed(&id("s")) > 0,
            "the standby receives follower places"
        );
        assert_followers(&ring, 2);
        assert_eq!(state(&m, "a"), NodeState::Draining);
        assert_eq!(state(&m, "s"), NodeState::Joining);
        assert_eq!(
            m.history()[0].cause,
            "a replaced: its slots promoted to their followers; standby s joins as a follower"
        );
    }

    #[test]
    fn on_a_replicated_ring_an_added_node_follows_first_and_leads_once_caught_up() {
        let now = Instant::now();
        let mut m = replicated(&["a", "b", "c"], &["s"], 2, now);
        let before = m.ring().clone();
        let joined = m.add(Some(&id("s")), now).unwrap();
        assert_eq!(joined.epoch(), before.epoch() + 1);
        assert!(
            (0..mesh_core::SLOT_COUNT as mesh_core::Slot)
                .all(|s| joined.owner(s) == before.owner(s))
        );
        assert!(joined.handoffs().is_empty());
        assert!(joined.slots_followed(&id("s")) >= mesh_core::SLOT_COUNT / 4);
        assert_followers(&joined, 2);
        assert_eq!(state(&m, "s"), NodeState::Joining);
        m.report_progress(&id("s"), 4, 0, joined.epoch());
        let led = m.lead_followed(&id("s")).unwrap();
        assert_eq!(led.slots_owned(&id("s")), mesh_core::SLOT_COUNT / 4);
        for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
            if led.owns(&id("s"), s) {
                assert!(
                    joined.follows(&id("s"), s),
                    "slot {s}: led where it followed"
                );
            }
        }
        assert_eq!(
            handoff_pairs(&led),
            [(id("a"), id("s")), (id("b"), id("s")), (id("c"), id("s"))]
        );
        assert_followers(&led, 2);
        assert_eq!(state(&m, "s"), NodeState::Active);
    }

    #[test]
    fn drain_moves_the_slots_to_the_others_with_handoffs() {
        let now = Instant::now();
        let mut m = with_nodes(&["a", "b", "c"], &[], now);
        let before = m.ring().clone();
        let ring = m.drain(&id("b")).unwrap();
        assert_eq!(ring.epoch(), before.epoch() + 1);
        assert_eq!(ring.slots_owned(&id("b")), 0);
        let mut from: Vec<&NodeId> = ring.handoffs().iter().map(|h| &h.from).collect();
        from.dedup();
        assert_eq!(from, [&id("b")], "only b's slots move");
        assert_eq!(m.take_effects().published, std::slice::from_ref(&ring));
        assert_eq!(state(&m, "b"), NodeState::Draining);
        assert_eq!(m.history()[0].cause, "b drained");
        // Draining ends when b has handed off the drain's epoch.
        assert!(m.heartbeat(&id("b"), 2, ring.epoch() - 1, now));
        assert_eq!(state(&m, "b"), NodeState::Draining);
        assert!(!m.take_effects().changed);
        assert!(m.heartbeat(&id("b"), 2, ring.epoch(), now));
        assert_eq!(state(&m, "b"), NodeState::Standby);
        assert!(m.take_effects().changed);
    }

    #[test]
    fn drain_is_refused_for_unknown_inactive_and_last_nodes() {
        let now = Instant::now();
        let mut m = with_nodes(&["a"], &["s"], now);
        let refusals = [
            (m.drain(&id("zz")), "no node zz"),
            (m.drain(&id("s")), "s is standby, not active"),
            (
                m.drain(&id("a")),
                "a is the last active node: add one first",
            ),
        ];
        for (result, message) in refusals {
            assert_eq!(result.unwrap_err().to_string(), message);
        }
        assert_eq!(m.ring().epoch(), 1, "nothing changed");
        assert!(m.take_effects().published.is_empty());
    }

    #[test]
    fn replace_hands_exactly_the_nodes_slots_to_a_standby() {
        let now = Instant::now();
        let mut m = with_nodes(&["a", "b"], &["s"], now);
        let before = m.ring().clone();
        let ring = m.replace(&id("a"), now).unwrap();
        for slot in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
            let expected = if before.owns(&id("a"), slot) {
                "s"
            } else {
                "b"
            };
            assert!(ring.owns(&id(expected), slot));
        }
        assert_eq!(
            ring.handoffs(),
            [Handoff {
                from: id("a"),
                to: id("s")
            }]
        );
        assert_eq!(state(&m, "a"), NodeState::Draining);
        assert_eq!(state(&m, "s"), NodeState::Active);
        assert_eq!(m.history()[0].cause, "a replaced by standby s");
        // Once a has handed off, it is a standby itself.
        assert!(m.heartbeat(&id("a"), 1, ring.epoch(), now));
        assert_eq!(state(&m, "a"), NodeState::Standby);
    }

    #[test]
    fn replace_is_refused_without_an_active_node_or_a_live_standby() {
        let now = Instant::now();
        let mut m = with_nodes(&["a", "b"], &["s"], now);
        assert_eq!(
            m.replace(&id("zz"), now),
            Err(MembershipError::NoSuchNode(id("zz")))
        );
        assert_eq!(
            m.replace(&id("s"), now).unwrap_err().to_string(),
            "s is standby, not active"
        );
        let err = m.replace(&id("a"), now + SUSPECT).unwrap_err();
        assert_eq!(err, MembershipError::NoStandbyToReplace);
        assert_eq!(err.to_string(), "no live standby to replace it with");
        assert!(m.take_effects().published.is_empty());
    }

    #[test]
    fn replace_is_refused_for_an_active_node_without_slots() {
        let now = Instant::now();
        let mut m = with_nodes(&["a"], &["s", "t"], now);
        // A member marked active that owns no slots, as a hand-edited state file could leave.
        m.member_mut(&id("t")).unwrap().state = NodeState::Active;
        let err = m.replace(&id("t"), now).unwrap_err();
        assert_eq!(err.to_string(), "t owns no slots");
        assert_eq!(state(&m, "s"), NodeState::Standby, "nothing changed");
    }

    #[test]
    fn add_activates_the_named_standby_or_any_live_one() {
        let now = Instant::now();
        let mut m = with_nodes(&["a"], &["s1", "s2"], now);
        let ring = m.add(Some(&id("s2")), now).unwrap();
        assert_eq!(ring.slots_owned(&id("s2")), mesh_core::SLOT_COUNT / 2);
        assert_eq!(state(&m, "s2"), NodeState::Active);
        assert_eq!(m.history()[0].cause, "s2 joined the active nodes");
        let ring = m.add(None, now + Duration::from_millis(1)).unwrap();
        assert!(ring.slots_owned(&id("s1")) > 0);
        assert_eq!(
            m.add(None, now).unwrap_err().to_string(),
            "no live standby to add"
        );
    }

    #[test]
    fn add_is_refused_for_unknown_and_non_standby_nodes() {
        let now = Instant::now();
        let mut m = with_nodes(&["a"], &["s"], now);
        assert_eq!(
            m.add(Some(&id("zz")), now).unwrap_err().to_string(),
            "no node zz"
        );
        assert_eq!(
            m.add(Some(&id("a")), now).unwrap_err().to_string(),
            "a is active, not a standby"
        );
        // A standby that is not live is still added when named; only the pick needs a live one.
        assert_eq!(
            m.add(None, now + SUSPECT),
            Err(MembershipError::NoStandbyToAdd)
        );
        assert!(m.add(Some(&id("s")), now + SUSPECT).is_ok());
    }
}
