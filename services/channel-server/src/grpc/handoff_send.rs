//! Sending handoffs until their new owners confirm them: one task per new owner, each attempt
//! with its own deadline and a bounded number at once, retried (to the slot's owner now if the
//! new owner died), and the drain progress that counts only confirmed ones; and ending the
//! warm-ups of slots whose handoff did not arrive, after marking their history incomplete.

use std::time::Instant;

use mesh_core::{NodeId, RingNode, slot_of};

use super::{ChannelService, handoff_wire};
use crate::handoff::{HANDOFF_GIVE_UP, HANDOFF_RETRY_PAUSE, Outgoing, Progress};

impl ChannelService {
    /// Updates the handoff progress and reports it with the lease's heartbeats.
    pub(super) fn progress(&self, update: impl FnOnce(&mut Progress)) {
        let mut progress = self
            .inner
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        update(&mut progress);
        self.inner
            .ownership
            .lease()
            .handed_off(progress.handed_off());
    }

    /// Slots whose warm-up ran out serve without their handoff, after their history floor
    /// jumped to now (resumes from before it get `history_gap`, subscribed gateways are told).
    pub(super) fn end_warmups(&self) {
        let ownership = &self.inner.ownership;
        let due = ownership.warmup_due(tokio::time::Instant::now());
        if due.is_empty() {
            return;
        }
        tracing::warn!(
            slots = due.len(),
            "handoff did not arrive in time; serving without it, history marked incomplete"
        );
        self.inner.shards.mark_unknown(&due);
        ownership.release(&due);
    }

    /// Sends one handoff of `epoch` until its new owner confirms it. The state stays here
    /// meanwhile. Each attempt has its own deadline and at most [`HANDOFF_CONCURRENCY`] run at
    /// once. After a failure, each channel (and slot floor) goes to its slot's owner in the
    /// current ring (the new owner may have died and its slots moved on), or back into this
    /// node's shards if the slot came back. A handoff still failing after [`HANDOFF_GIVE_UP`],
    /// or refused (`PERMISSION_DENIED`: the receiver did not follow the ring that named it and
    /// serves those slots as taken over, their history marked incomplete), is abandoned,
    /// loudly: its epoch is not reported handed off ([`Progress`]).
    pub(super) async fn hand_off(self, epoch: u64, outgoing: Outgoing) {
        let started = Instant::now();
        let node = self.inner.ownership.node().clone();
        let first = outgoing.to.clone();
        // What is not yet confirmed, by the node to send it to.
        let mut parcels = vec![outgoing];
        loop {
            let mut failed = Vec::new();
            let mut refused = false;
            for parcel in parcels {
                let permit = tokio::select! {
                    _ = self.inner.cancel.cancelled() => return,
                    permit = self.inner.handoff_slots.acquire() => permit,
                };
                let sent = handoff_wire::send(&node, epoch, &parcel).await;
                drop(permit);
                let outcome = if sent.is_ok() { "ok" } else { "failed" };
                self.inner
                    .metrics
                    .handoffs_sent
                    .with_label_values(&[outcome])
                    .inc();
                let (to, channels) = (&parcel.to, parcel.snapshots.len());
                match sent {
                    Ok(()) => tracing::info!(%to, channels, epoch, "handoff confirmed"),
                    Err(e) => {
                        tracing::warn!(%to, error = %e, epoch, channels, "handoff failed; keeping the state");
                        refused |= e.code() == tonic::Code::PermissionDenied;
                        failed.push(parcel);
                    }
                }
            }
            if failed.is_empty() {
                self.progress(|p| p.confirmed(epoch));
                return;
            }
            if refused || started.elapsed() > HANDOFF_GIVE_UP {
                let channels: usize = failed.iter().map(|p| p.snapshots.len()).sum();
                self.inner
                    .metrics
                    .handoffs_sent
                    .with_label_values(&["abandoned"])
                    .inc();
                tracing::error!(
                    epoch,
                    channels,
                    "handoff abandoned: its channels' history is lost and the epoch is not reported handed off"
                );
                self.progress(|p| p.abandoned(epoch));
                return;
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(HANDOFF_RETRY_PAUSE) => {}
            }
            parcels = self.retarget(&first, failed);
        }
    }

    /// Where handoffs that failed go next: each channel and slot floor to its slot's owner in
    /// the current ring, back into this node's shards if that is this node, and the
    /// handoff's first new owner `first` again (even with nothing, to end its warm-up) while
    /// it is on the ring. Without an owner (an empty ring) a channel waits for the next try.
    fn retarget(&self, first: &NodeId, failed: Vec<Outgoing>) -> Vec<Outgoing> {
        let ring = self.inner.ownership.ring().current();
        let node = self.inner.ownership.node();
        let mut parcels: Vec<Outgoing> = Vec::new();
        let parcel = |parcels: &mut Vec<Outgoing>, owner: &RingNode| -> usize {
            match parcels.iter().position(|p| p.to == owner.id) {
                Some(i) => i,
                None => {
                    parcels.push(Outgoing {
                        to: owner.id.clone(),
                        addr: owner.addr.clone(),
                        snapshots: Vec::new(),
                        floors: Vec::new(),
                        members: Vec::new(),
                    });
                    parcels.len() - 1
                }
            }
        };
        if let Some(n) = ring.nodes().iter().find(|n| &n.id == first) {
            parcel(&mut parcels, n);
        }
        let mut unowned = Vec::new();
        for failed in failed {
            for snapshot in failed.snapshots {
                match ring.owner(slot_of(&snapshot.channel)) {
                    Some(owner) if &owner.id == node => self.inner.shards.absorb(snapshot),
                    Some(owner) => {
                        let i = parcel(&mut parcels, owner);
                        parcels[i].snapshots.push(snapshot);
                    }
                    None => unowned.push(snapshot),
                }
            }
            for (channel, reports) in failed.members {
                match ring.owner(slot_of(&channel)) {
                    Some(owner) if &owner.id == node => {
                        self.inner.shards.adopt_members(&channel, &reports)
                    }
                    Some(owner) => {
                        let i = parcel(&mut parcels, owner);
                        parcels[i].members.push((channel, reports));
                    }
                    None => {}
                }
            }
            for (slot, floor) in failed.floors {
                match ring.owner(slot) {
                    Some(owner) if &owner.id == node => self.inner.shards.absorb_floor(slot, floor),
                    Some(owner) => {
                        let i = parcel(&mut parcels, owner);
                        parcels[i].floors.push((slot, floor));
                    }
                    None => {}
                }
            }
        }
        if !unowned.is_empty() {
            parcels.push(Outgoing {
                to: first.clone(),
                addr: String::new(),
                snapshots: unowned,
                floors: Vec::new(),
                members: Vec::new(),
            });
        }
        parcels
    }
}
