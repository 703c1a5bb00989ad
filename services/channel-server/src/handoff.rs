//! Handoffs of channel state on planned moves, as plain decisions: which gained slots wait for
//! whose state (warming), which lost slots go to which new owner, and what each handoff of an
//! epoch carries. The edge (`grpc.rs`) sends and receives them over gRPC; the shards take and
//! absorb the channels' snapshots.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use mesh_core::{ChannelId, NodeId, Ring, RingNode, SLOT_COUNT, Slot, Ts};
use tokio::time::Instant;

use crate::members::Report;
use crate::store::Snapshot;

/// How long a new owner waits for a handoff before serving the moved slots without it (their
/// history floor then jumps to that moment: resumes across it hear `history_gap`). Shorter
/// than a router's deadline for a call (5 s), so a publish that meets a stalled handoff is
/// still served; long enough for a retry after a first attempt that stalled.
pub const WARMUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long, at most, a slot taken over from a dead node takes no publish (subscriptions and
/// history reads it serves): the gateways subscribed to its channels resubscribe here first,
/// each reporting the newest ts it delivered, so the first ts given is above them whatever this
/// node's clock says. A channel takes publishes as soon as a gateway has resubscribed to it
/// ([`Warming::resubscribed`]); the whole settle only holds channels no gateway comes back for.
/// Routers retry meanwhile.
pub const TAKEOVER_SETTLE: Duration = Duration::from_secs(1);
/// How long one attempt to send one handoff to one new owner may take.
pub const HANDOFF_SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Handoffs of one epoch sent at once.
pub const HANDOFF_CONCURRENCY: usize = 8;
/// Pause between attempts of a handoff that failed.
pub const HANDOFF_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How long a handoff that keeps failing is retried before its state is given up (its epoch is
/// then never reported handed off).
pub const HANDOFF_GIVE_UP: Duration = Duration::from_secs(60);
/// Channels per handoff message.
pub const HANDOFF_CHUNK: usize = 64;
/// How many handoffs to this node, named by the rings it followed, are remembered: a handoff
/// is accepted only from a sender a ring named (`Warming::expected`).
const EXPECTED_HANDOFFS: usize = 256;

/// Slots this node gained in a handoff epoch and does not serve until the old owner's state
/// arrives, or [`WARMUP_TIMEOUT`] passes and the slots are released ([`Warming::due`],
/// [`Warming::release`]) after their history floor was set.
#[derive(Debug, Default)]
pub struct Warming {
    /// Per waiting slot: the node its state comes from, and until when to wait.
    slots: HashMap<Slot, (NodeId, Instant)>,
    /// Handoffs already received, by (from, epoch): a handoff can beat the ring to this node.
    done: HashSet<(NodeId, u64)>,
    /// The latest handoffs to this node the rings it followed named, by (from, epoch), at
    /// most [`EXPECTED_HANDOFFS`].
    expected: VecDeque<(NodeId, u64)>,
    /// The latest senders of handoffs to any node the rings it followed named, by (from,
    /// epoch), at most [`EXPECTED_HANDOFFS`]: a sender whose new owner died forwards the
    /// state to the slot's owner now.
    senders: VecDeque<(NodeId, u64)>,
    /// Slots taken over from a dead node that take no publish yet: the dead node, and until
    /// when ([`TAKEOVER_SETTLE`]).
    settling: HashMap<Slot, (NodeId, Instant)>,
    /// Channels of settling slots a gateway has resubscribed to (reporting what it delivered):
    /// they take publishes before their slot's settle ends.
    resubscribed: HashMap<String, Slot>,
    /// Slots the ring this process started from gave it (an earlier incarnation's): gained, not
    /// kept, by the next ring that gives them ([`Warming::not_held`]).
    stale: HashSet<Slot>,
}

impl Warming {
    /// The node `slot` waits for a handoff from, if it still waits. A wait past its deadline
    /// lasts until [`Warming::release`]: the slot's history floor is set first.
    pub fn waiting_for(&self, slot: Slot) -> Option<NodeId> {
        self.slots.get(&slot).map(|(from, _)| from.clone())
    }

    /// The slots still waiting at `now` past their deadline, sorted.
    pub fn due(&self, now: Instant) -> Vec<Slot> {
        let mut due: Vec<Slot> = self
            .slots
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(&slot, _)| slot)
            .collect();
        due.sort_unstable();
        due
    }

    /// The earliest deadline of a waiting slot.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slots.values().map(|(_, deadline)| *deadline).min()
    }

    /// `slots` stop waiting: they serve without their handoff.
    pub fn release(&mut self, slots: &[Slot]) {
        for slot in slots {
            if let Some((from, _)) = self.slots.remove(slot) {
                tracing::warn!(slot, %from, "handoff did not arrive in time; serving without it");
            }
        }
    }

    /// Follows a new ring: each slot `node` gains through a handoff not yet received waits for
    /// it until `deadline`. Returns the slots gained without a handoff: taken over from a node
    /// that died, their channels' history died with it. A slot `promoted` says this node held
    /// in sync as a follower does neither: its history is here already.
    pub fn gain(
        &mut self,
        previous: &Ring,
        ring: &Ring,
        node: &NodeId,
        deadline: Instant,
        promoted: impl Fn(Slot) -> bool,
    ) -> Vec<Slot> {
        for h in ring.handoffs() {
            let named = (h.from.clone(), ring.epoch());
            if &h.to == node {
                remember(&mut self.expected, named.clone());
            }
            if !self.senders.contains(&named) {
                remember(&mut self.senders, named);
            }
        }
        let mut unknown = Vec::new();
        for slot in 0..SLOT_COUNT as Slot {
            let held = previous.owns(node, slot) && !self.stale.contains(&slot);
            if !ring.owns(node, slot) || held || promoted(slot) {
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
        self.stale.clear();
        unknown
    }

    /// This process holds nothing of `slots`, though the ring it started from gives them to it
    /// (an earlier incarnation's): the next ring counts them as gained.
    pub fn not_held(&mut self, slots: &[Slot]) {
        self.stale.extend(slots.iter().copied());
    }

    /// Whether a ring this node followed named a handoff from `from` to it in `epoch`.
    pub fn expected(&self, from: &NodeId, epoch: u64) -> bool {
        self.expected.iter().any(|(f, e)| f == from && *e == epoch)
    }

    /// Slots taken over from dead nodes (as [`Warming::gain`] returned them) take no publish
    /// until `until`.
    pub fn settle(&mut self, previous: &Ring, taken_over: &[Slot], until: Instant) {
        for &slot in taken_over {
            if let Some(old) = previous.owner(slot) {
                self.settling.insert(slot, (old.id.clone(), until));
            }
        }
    }

    /// The dead node whose slot `slot` was taken from, while it settles at `now` for
    /// `channel` (no gateway has resubscribed to it yet).
    pub fn settling(&mut self, slot: Slot, channel: &str, now: Instant) -> Option<NodeId> {
        let (from, until) = self.settling.get(&slot)?;
        if now < *until {
            return (!self.resubscribed.contains_key(channel)).then(|| from.clone());
        }
        self.settling.retain(|_, (_, until)| now < *until);
        let settling = &self.settling;
        self.resubscribed
            .retain(|_, slot| settling.contains_key(slot));
        None
    }

    /// A gateway resubscribed to `channel` of `slot` (its delivered ts already raised the
    /// channel's clock): while the slot settles, the channel takes publishes anyway.
    pub fn resubscribed(&mut self, channel: &str, slot: Slot) {
        if self.settling.contains_key(&slot) {
            self.resubscribed.insert(channel.to_string(), slot);
        }
    }

    /// Whether a ring this node followed named `from` as the sender of a handoff (to any
    /// node) in `epoch`.
    pub fn named_sender(&self, from: &NodeId, epoch: u64) -> bool {
        self.senders.iter().any(|(f, e)| f == from && *e == epoch)
    }

    /// The whole handoff `from` sent for `epoch` arrived: its slots serve.
    pub fn received(&mut self, from: &NodeId, epoch: u64) {
        self.slots.retain(|_, (f, _)| f != from);
        self.done.insert((from.clone(), epoch));
    }
}

/// Keeps `entry` among the latest [`EXPECTED_HANDOFFS`].
fn remember(list: &mut VecDeque<(NodeId, u64)>, entry: (NodeId, u64)) {
    if list.len() == EXPECTED_HANDOFFS {
        list.pop_front();
    }
    list.push_back(entry);
}

/// Which epochs' outgoing handoffs are all confirmed by their new owners (drain progress):
/// an epoch is handed off once every handoff it named from this node was acknowledged, and
/// the progress reported is the newest epoch with no unconfirmed one at or before it. An
/// abandoned handoff holds the progress back until a later epoch's handoffs are all confirmed:
/// a drain whose handoff was abandoned never completes, while one that failed long before a
/// drain does not hold that drain back.
#[derive(Debug, Default)]
pub struct Progress {
    /// Handoffs in flight, by epoch.
    pending: BTreeMap<u64, usize>,
    /// Epochs with an abandoned handoff, not yet superseded.
    abandoned: BTreeSet<u64>,
    /// The newest epoch followed.
    newest: u64,
}

impl Progress {
    /// This node followed `epoch`'s ring, which named `handoffs` from it.
    pub fn followed(&mut self, epoch: u64, handoffs: usize) {
        self.newest = self.newest.max(epoch);
        if handoffs > 0 {
            *self.pending.entry(epoch).or_default() += handoffs;
        }
    }

    /// One handoff of `epoch` ended, confirmed by its new owner or not.
    fn ended(&mut self, epoch: u64) -> bool {
        let Some(left) = self.pending.get_mut(&epoch) else {
            return false;
        };
        *left -= 1;
        if *left > 0 {
            return false;
        }
        self.pending.remove(&epoch);
        true
    }

    /// One handoff of `epoch` was confirmed by its new owner.
    pub fn confirmed(&mut self, epoch: u64) {
        if self.ended(epoch) && !self.abandoned.contains(&epoch) {
            self.abandoned.retain(|&e| e > epoch);
        }
    }

    /// One handoff of `epoch` was given up.
    pub fn abandoned(&mut self, epoch: u64) {
        self.ended(epoch);
        self.abandoned.insert(epoch);
    }

    /// The newest epoch whose handoffs, and every earlier epoch's, are all confirmed.
    pub fn handed_off(&self) -> u64 {
        let first = self.pending.keys().next().into_iter();
        match first.chain(self.abandoned.iter()).min() {
            Some(&first) => first.saturating_sub(1),
            None => self.newest,
        }
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

/// One handoff to send: to whom, at which address, with which channels, and the floors of
/// the moved slots (the newest ts of channels evicted from them: their history is gone, and
/// a channel coming back continues after it).
#[derive(Debug)]
pub struct Outgoing {
    pub to: NodeId,
    pub addr: String,
    pub snapshots: Vec<Snapshot>,
    pub floors: Vec<(Slot, Ts)>,
    /// Moved channels' live members, for the new owner to expect again.
    pub members: Vec<(ChannelId, Vec<Report>)>,
}

/// The handoffs `node` sends in `ring`'s epoch, given the snapshots `taken` and slot `floors`
/// for each new owner: one for every handoff the ring names from `node`, even with no channels
/// (the new owner waits for its end).
pub fn outgoing(
    ring: &Ring,
    node: &NodeId,
    mut taken: HashMap<NodeId, Vec<Snapshot>>,
    mut floors: HashMap<NodeId, Vec<(Slot, Ts)>>,
    mut members: HashMap<NodeId, Vec<(ChannelId, Vec<Report>)>>,
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
                floors: floors.remove(&h.to).unwrap_or_default(),
                members: members.remove(&h.to).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
