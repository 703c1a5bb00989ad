//! Handoffs of channel state on planned moves, as plain decisions: which gained slots wait for
//! whose state (warming), which lost slots go to which new owner, and what each handoff of an
//! epoch carries. The edge (`grpc.rs`) sends and receives them over gRPC; the shards take and
//! absorb the channels' snapshots.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use mesh_core::{NodeId, Ring, RingNode, SLOT_COUNT, Slot};
use tokio::time::Instant;

use crate::store::Snapshot;

/// How long a new owner waits for a handoff before serving the moved slots without it.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(2);
/// Channels per handoff message.
pub const HANDOFF_CHUNK: usize = 64;
/// How many handoffs to this node, named by the rings it followed, are remembered: a handoff
/// is accepted only from a sender a ring named (`Warming::expected`).
const EXPECTED_HANDOFFS: usize = 256;

/// Slots this node gained in a handoff epoch and does not serve until the old owner's state
/// arrives (or [`HANDOFF_TIMEOUT`] passes).
#[derive(Debug, Default)]
pub struct Warming {
    /// Per waiting slot: the node its state comes from, and until when to wait.
    slots: HashMap<Slot, (NodeId, Instant)>,
    /// Handoffs already received, by (from, epoch): a handoff can beat the ring to this node.
    done: HashSet<(NodeId, u64)>,
    /// The latest handoffs to this node the rings it followed named, by (from, epoch), at
    /// most [`EXPECTED_HANDOFFS`].
    expected: VecDeque<(NodeId, u64)>,
}

impl Warming {
    /// The node `slot` waits for a handoff from at `now`, if it still waits. A wait past its
    /// deadline ends for every slot of that node: they serve without its state.
    pub fn waiting_for(&mut self, slot: Slot, now: Instant) -> Option<NodeId> {
        let (from, deadline) = self.slots.get(&slot)?.clone();
        if now < deadline {
            return Some(from);
        }
        tracing::warn!(slot, %from, "handoff did not arrive in time; serving without it");
        self.slots.retain(|_, (f, _)| f != &from);
        None
    }

    /// Follows a new ring: each slot `node` gains through a handoff not yet received waits for
    /// it until `deadline`. Returns the slots gained without a handoff: taken over from a node
    /// that died, their channels' history died with it.
    pub fn gain(
        &mut self,
        previous: &Ring,
        ring: &Ring,
        node: &NodeId,
        deadline: Instant,
    ) -> Vec<Slot> {
        for h in ring.handoffs().iter().filter(|h| &h.to == node) {
            if self.expected.len() == EXPECTED_HANDOFFS {
                self.expected.pop_front();
            }
            self.expected.push_back((h.from.clone(), ring.epoch()));
        }
        let mut unknown = Vec::new();
        for slot in 0..SLOT_COUNT as Slot {
            if !ring.owns(node, slot) || previous.owns(node, slot) {
                continue;
            }
            let Some(old) = previous.owner(slot) else {
                continue;
            };
            let handed = ring
                .handoffs()
                .iter()
                .any(|h| h.from == old.id && &h.to == node);
            if handed && !self.done.contains(&(old.id.clone(), ring.epoch())) {
                self.slots.insert(slot, (old.id.clone(), deadline));
            } else if !handed {
                unknown.push(slot);
            }
        }
        unknown
    }

    /// Whether a ring this node followed named a handoff from `from` to it in `epoch`.
    pub fn expected(&self, from: &NodeId, epoch: u64) -> bool {
        self.expected.iter().any(|(f, e)| f == from && *e == epoch)
    }

    /// The whole handoff `from` sent for `epoch` arrived: its slots serve.
    pub fn received(&mut self, from: &NodeId, epoch: u64) {
        self.slots.retain(|_, (f, _)| f != from);
        self.done.insert((from.clone(), epoch));
    }
}

/// The node `node` hands `slot` to in `ring`'s epoch, if it does: it owned the slot in
/// `previous`, another node owns it now, and `ring` names a handoff between the two.
pub fn new_owner<'r>(
    previous: &Ring,
    ring: &'r Ring,
    node: &NodeId,
    slot: Slot,
) -> Option<&'r RingNode> {
    let to = ring.owner(slot)?;
    let handed = ring
        .handoffs()
        .iter()
        .any(|h| &h.from == node && h.to == to.id);
    (previous.owns(node, slot) && &to.id != node && handed).then_some(to)
}

/// One handoff to send: to whom, at which address, with which channels.
#[derive(Debug)]
pub struct Outgoing {
    pub to: NodeId,
    pub addr: String,
    pub snapshots: Vec<Snapshot>,
}

/// The handoffs `node` sends in `ring`'s epoch, given the snapshots `taken` for each new owner:
/// one for every handoff the ring names from `node`, even with no channels (the new owner waits
/// for its end).
pub fn outgoing(
    ring: &Ring,
    node: &NodeId,
    mut taken: HashMap<NodeId, Vec<Snapshot>>,
) -> Vec<Outgoing> {
    ring.handoffs()
        .iter()
        .filter(|h| &h.from == node)
        .filter_map(|h| {
            let addr = ring.nodes().iter().find(|n| n.id == h.to)?.addr.clone();
            Some(Outgoing {
                to: h.to.clone(),
                addr,
                snapshots: taken.remove(&h.to).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
