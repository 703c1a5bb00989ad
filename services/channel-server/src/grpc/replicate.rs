//! Replication over gRPC. As a slot's owner: one link per follower (a task holding one
//! `Replicate` stream, resending what was not acknowledged after a reconnect), and catch-ups
//! that fill a new follower's copy, throttled. As a follower: taking replicated events and
//! catch-ups, only from the owner of the slot in this node's ring (fencing).

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::Stream;
use mesh_core::{NodeId, Ring, RingNode, Slot, slot_of};
use mesh_proto::channel as pb;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_transport::authz::rpc;
use mesh_transport::{Caller, Role};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::{ChannelService, MAX_HANDOFF_MESSAGE, handoff_wire, invalid, status};
use crate::error::ServeError;
use crate::handoff::HANDOFF_CHUNK;
use crate::replication::{
    BATCH, CATCH_UP_GIVE_UP, CATCH_UP_RETRY, CATCH_UP_SLOTS, CONNECT_TIMEOUT, LINK_QUEUE,
    LINK_RETRY, LinkId, MAX_IN_FLIGHT, Replicated, followers_of,
};
use crate::shards::Replicator;
use channel_client::wire::{event_from_proto, event_to_proto};

/// Acknowledgements a follower queues to one primary's stream.
const ACK_QUEUE: usize = 1024;
/// Batches queued to one link's stream and not yet taken by the transport.
const BATCH_QUEUE: usize = 64;

/// The replies of a follower's side of one `Replicate` stream.
pub(super) type AckStream = Pin<Box<dyn Stream<Item = Result<pb::ReplicateAck, Status>> + Send>>;
/// The chunks of an owner's side of one catch-up.
pub(super) type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::CatchUpChunk, Status>> + Send>>;

/// An event on its way to one or more followers, in its protobuf form (made once).
#[derive(Debug)]
struct Outbound {
    shard: usize,
    id: u64,
    entry: pb::ReplicatedEvent,
}

/// A link to one follower: its queue, and what ends its task.
#[derive(Debug)]
struct Link {
    id: LinkId,
    tx: mpsc::Sender<Arc<Outbound>>,
    cancel: CancellationToken,
}

/// Every link this node holds, by follower.
#[derive(Debug, Default)]
pub(super) struct Links {
    map: Mutex<HashMap<NodeId, Link>>,
    next: AtomicU64,
}

impl Links {
    fn map(&self) -> MutexGuard<'_, HashMap<NodeId, Link>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The shards' [`Replicator`]: queues events on this service's links, starting a link the
/// first time a follower is named.
pub(super) struct LinkSender<'a>(pub(super) &'a ChannelService);

impl Replicator for LinkSender<'_> {
    fn replicate(
        &self,
        followers: &[&RingNode],
        entry: &Replicated,
    ) -> Result<Vec<(NodeId, LinkId)>, ServeError> {
        let out = Arc::new(Outbound {
            shard: entry.shard,
            id: entry.id,
            entry: pb::ReplicatedEvent {
                seq: 0,
                event: Some(event_to_proto(&entry.event)),
                idempotency_key: entry.key.as_deref().unwrap_or_default().to_string(),
                seen_micros: entry.seen_micros,
            },
        });
        let service = self.0;
        let queues: Vec<(NodeId, LinkId, mpsc::Sender<Arc<Outbound>>)> = {
            let mut links = service.inner.links.map();
            followers
                .iter()
                .map(|f| {
                    let link = links
                        .entry(f.id.clone())
                        .or_insert_with(|| service.start_link(f.id.clone()));
                    (f.id.clone(), link.id, link.tx.clone())
                })
                .collect()
        };
        // All or none: a full queue refuses the event before any follower has it.
        let mut permits = Vec::with_capacity(queues.len());
        for (_, _, tx) in &queues {
            permits.push(
                tx.try_reserve()
                    .map_err(|_| ServeError::ReplicationBehind)?,
            );
        }
        for permit in permits {
            permit.send(out.clone());
        }
        Ok(queues.into_iter().map(|(id, link, _)| (id, link)).collect())
    }
}

/// How one stream of a link ended.
enum Ended {
    /// Cancelled, or the link was dropped: the task ends.
    Stop,
    /// The stream broke: dial again and resend what was not acknowledged.
    Reconnect,
}

impl ChannelService {
    /// A new link to `follower`, its task started.
    fn start_link(&self, follower: NodeId) -> Link {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let id = self.inner.links.next.fetch_add(1, Ordering::Relaxed) + 1;
        let cancel = self.inner.cancel.child_token();
        let this = self.clone();
        let token = cancel.clone();
        self.inner
            .tracker
            .spawn(async move { this.run_link(follower, id, rx, token).await });
        Link { id, tx, cancel }
    }

    /// Ends the links to nodes that follow none of this node's slots in `ring` (after the
    /// waiting events were rerouted).
    pub(super) fn prune_links(&self, ring: &Ring) {
        let keep = followers_of(ring, self.inner.ownership.node());
        self.inner.links.map().retain(|node, link| {
            let kept = keep.contains(node);
            if !kept {
                link.cancel.cancel();
            }
            kept
        });
    }

    /// One link's task: dials the follower, sends queued events in batches, takes its
    /// acknowledgements, and after a broken stream dials again and resends every event not yet
    /// acknowledged (a follower stores each ts once).
    async fn run_link(
        self,
        follower: NodeId,
        link: LinkId,
        mut rx: mpsc::Receiver<Arc<Outbound>>,
        cancel: CancellationToken,
    ) {
        let mut in_flight: VecDeque<(u64, Arc<Outbound>)> = VecDeque::new();
        let mut next_seq = 1u64;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let ring = self.inner.ownership.ring().current();
            let addr = ring
                .nodes()
                .iter()
                .find(|n| n.id == follower)
                .map(|n| n.addr.clone());
            let opened = match addr {
                Some(addr) => self.open_link(&addr).await,
                None => Err(Status::unavailable("the follower is not on the ring")),
            };
            let ended = match opened {
                Ok((btx, acks)) => {
                    let mut stream = LinkStream {
                        btx,
                        acks,
                        unsent: 0,
                    };
                    self.pump(
                        link,
                        &mut stream,
                        &mut rx,
                        &mut in_flight,
                        &mut next_seq,
                        &cancel,
                    )
                    .await
                }
                Err(e) => {
                    tracing::debug!(%follower, error = %e, "replication link could not open");
                    Ended::Reconnect
                }
            };
            match ended {
                Ended::Stop => return,
                Ended::Reconnect => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(LINK_RETRY) => {}
                    }
                }
            }
        }
    }

    /// Opens a `Replicate` stream to `addr`: the queue its batches go into, and its
    /// acknowledgements.
    async fn open_link(
        &self,
        addr: &str,
    ) -> Result<
        (
            mpsc::Sender<pb::ReplicateBatch>,
            Streaming<pb::ReplicateAck>,
        ),
        Status,
    > {
        let channel = dial(addr).await?;
        let (btx, brx) = mpsc::channel(BATCH_QUEUE);
        let mut client = ChannelServerClient::new(channel);
        let call = client.replicate(ReceiverStream::new(brx));
        let acks = tokio::time::timeout(CONNECT_TIMEOUT, call)
            .await
            .map_err(|_| Status::deadline_exceeded("replication stream did not open"))??
            .into_inner();
        Ok((btx, acks))
    }

    /// Runs one stream of a link until it breaks or the link ends.
    async fn pump(
        &self,
        link: LinkId,
        stream: &mut LinkStream,
        rx: &mut mpsc::Receiver<Arc<Outbound>>,
        in_flight: &mut VecDeque<(u64, Arc<Outbound>)>,
        next_seq: &mut u64,
        cancel: &CancellationToken,
    ) -> Ended {
        let from = self.inner.ownership.node().to_string();
        let mut taken: Vec<Arc<Outbound>> = Vec::with_capacity(BATCH);
        loop {
            // Send what fits without waiting: first what this stream has not sent yet.
            while stream.btx.capacity() > 0 && stream.unsent < in_flight.len() {
                let epoch = self.inner.ownership.ring().current().epoch();
                let entries: Vec<pb::ReplicatedEvent> = in_flight
                    .range(stream.unsent..)
                    .take(BATCH)
                    .map(|(seq, out)| pb::ReplicatedEvent {
                        seq: *seq,
                        ..out.entry.clone()
                    })
                    .collect();
                stream.unsent += entries.len();
                let batch = pb::ReplicateBatch {
                    from_node: from.clone(),
                    epoch,
                    entries,
                };
                if stream.btx.try_send(batch).is_err() {
                    return Ended::Reconnect;
                }
            }
            let room = stream.btx.capacity() > 0 && in_flight.len() < MAX_IN_FLIGHT;
            tokio::select! {
                _ = cancel.cancelled() => return Ended::Stop,
                ack = stream.acks.message() => match ack {
                    Ok(Some(ack)) => self.take_ack(link, ack, in_flight, &mut stream.unsent),
                    Ok(None) => return Ended::Reconnect,
                    Err(e) => {
                        tracing::debug!(error = %e, "replication stream broke");
                        return Ended::Reconnect;
                    }
                },
                n = rx.recv_many(&mut taken, BATCH), if room => {
                    if n == 0 {
                        return Ended::Stop;
                    }
                    for out in taken.drain(..) {
                        in_flight.push_back((*next_seq, out));
                        *next_seq += 1;
                    }
                }
                // The transport took batches: look again.
                _ = tokio::time::sleep(Duration::from_millis(20)), if !room => {}
            }
        }
    }

    /// A follower's acknowledgement: the events it stored or refused leave `in_flight`, and the
    /// shards commit what every follower now has.
    fn take_ack(
        &self,
        link: LinkId,
        ack: pb::ReplicateAck,
        in_flight: &mut VecDeque<(u64, Arc<Outbound>)>,
        unsent: &mut usize,
    ) {
        let refused_seqs: HashSet<u64> = ack.refused_seqs.iter().copied().collect();
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        while in_flight
            .front()
            .is_some_and(|(seq, _)| *seq <= ack.acked_seq)
        {
            let Some((seq, out)) = in_flight.pop_front() else {
                break;
            };
            *unsent = unsent.saturating_sub(1);
            if refused_seqs.contains(&seq) {
                refused.push((out.shard, out.id));
            } else {
                acked.push((out.shard, out.id));
            }
        }
        let m = &self.inner.metrics;
        m.replicated_out
            .with_label_values(&["acked"])
            .inc_by(acked.len() as u64);
        self.inner.shards.acked(link, &acked);
        if !refused.is_empty() {
            m.replicated_out
                .with_label_values(&["refused"])
                .inc_by(refused.len() as u64);
            tracing::warn!(events = refused.len(), reason = %ack.reason, "follower refused replicated events");
            self.inner.shards.refused(&refused, &ack.reason);
        }
    }

    /// A follower's side of one `Replicate` stream: each batch is checked entry by entry
    /// (the sender as itself, then fencing per slot), stored, and acknowledged.
    pub(super) fn serve_replicate(
        &self,
        caller: Caller,
        mut batches: Streaming<pb::ReplicateBatch>,
    ) -> AckStream {
        let (tx, rx) = mpsc::channel(ACK_QUEUE);
        let (this, cancel) = (self.clone(), self.inner.cancel.clone());
        self.inner.tracker.spawn(async move {
            loop {
                // Cancel-safe: message() loses nothing when the other branch wins; we stop.
                let next = tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = batches.message() => next,
                };
                let Ok(Some(batch)) = next else { break };
                let ack = this.take_batch(&caller, batch).await;
                let stop = ack.is_err();
                let sent = tokio::select! {
                    _ = cancel.cancelled() => break,
                    sent = tx.send(ack) => sent,
                };
                if stop || sent.is_err() {
                    break;
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    /// Checks and stores one batch; its acknowledgement.
    async fn take_batch(
        &self,
        caller: &Caller,
        batch: pb::ReplicateBatch,
    ) -> Result<pb::ReplicateAck, Status> {
        let from = self.sender(caller, rpc::REPLICATE, &batch.from_node)?;
        let mut ack = pb::ReplicateAck::default();
        let mut checked: HashMap<Slot, Result<(), ServeError>> = HashMap::new();
        for entry in batch.entries {
            ack.acked_seq = ack.acked_seq.max(entry.seq);
            let event = match entry.event.map(event_from_proto) {
                Some(Ok(event)) if event.ts.is_some() => event,
                Some(Err(e)) => {
                    ack.refused_seqs.push(entry.seq);
                    ack.reason = e.to_string();
                    continue;
                }
                _ => {
                    ack.refused_seqs.push(entry.seq);
                    ack.reason = "a replicated event needs its ts".into();
                    continue;
                }
            };
            let slot = slot_of(&event.channel);
            if let std::collections::hash_map::Entry::Vacant(unchecked) = checked.entry(slot) {
                let ownership = &self.inner.ownership;
                unchecked.insert(ownership.check_follower(&from, slot, batch.epoch).await);
            }
            if let Some(Err(refusal)) = checked.get(&slot) {
                ack.refused_seqs.push(entry.seq);
                ack.reason = refusal.to_string();
                continue;
            }
            let key = Some(entry.idempotency_key.as_str()).filter(|k| !k.is_empty());
            self.inner.shards.apply(&event, key, entry.seen_micros);
        }
        Ok(ack)
    }

    /// The node a replication or catch-up call comes from: named in the message and the same
    /// as the caller's certificate says.
    fn sender(&self, caller: &Caller, path: &str, named: &str) -> Result<NodeId, Status> {
        let from = NodeId::new(named).map_err(invalid)?;
        if !caller.is(&[Role::ChannelServer], from.as_str()) {
            return Err(self.inner.authorizer.refuse(
                caller,
                path,
                &format!("a channel server replicates only as itself, not as {from}"),
            ));
        }
        Ok(from)
    }

    /// Asks again, every [`CATCH_UP_RETRY`], for the followed slots still being filled that no
    /// catch-up is asking for (one that ended early, or whose owner changed), until shutdown.
    pub(super) async fn keep_asking(self) {
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(CATCH_UP_RETRY) => {}
            }
            if self.inner.ownership.catching_up() > 0 {
                self.ask_fills();
            }
        }
    }

    /// Asks the owners of the followed slots still being filled (and not asked for yet) to
    /// fill them, one task per owner.
    pub(super) fn ask_fills(&self) {
        let ring = self.inner.ownership.ring().current();
        for (owner, slots) in self.inner.ownership.to_ask(&ring) {
            let this = self.clone();
            self.inner.tracker.spawn(async move {
                this.ask_fill(owner.id, &slots).await;
                this.inner.ownership.answered(&slots);
            });
        }
    }

    /// A follower asks `owner` to fill `slots` and merges what comes, retried until every slot
    /// is filled, or the ring no longer names `owner` and this node for it, or
    /// [`CATCH_UP_GIVE_UP`] passed.
    async fn ask_fill(&self, owner: NodeId, slots: &[Slot]) {
        let started = Instant::now();
        let ownership = &self.inner.ownership;
        let me = ownership.node().clone();
        loop {
            let ring = ownership.ring().current();
            let left: Vec<Slot> = slots
                .iter()
                .copied()
                .filter(|&s| {
                    ownership.is_catching_up(s) && ring.owns(&owner, s) && ring.follows(&me, s)
                })
                .collect();
            let Some(addr) = ring.nodes().iter().find(|n| n.id == owner) else {
                return;
            };
            if left.is_empty() {
                return;
            }
            match self
                .fill_from(&owner, &addr.addr, ring.epoch(), &left)
                .await
            {
                Ok(n) => {
                    self.inner
                        .metrics
                        .catch_up_slots
                        .with_label_values(&["filled"])
                        .inc_by(u64::from(n));
                    tracing::info!(%owner, slots = n, asked = left.len(), "copy filled by the slots' owner");
                    if n as usize == left.len() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(%owner, error = %e, "catch-up failed; asking again"),
            }
            if started.elapsed() > CATCH_UP_GIVE_UP {
                tracing::error!(%owner, slots = left.len(), "catch-up given up: this copy stays behind until the ring changes");
                return;
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(CATCH_UP_RETRY) => {}
            }
        }
    }

    /// One catch-up from `owner`: each chunk's channels are merged into this node's copy (only
    /// while `owner` owns their slots in this node's ring, and it follows them), and each slot
    /// done counts as filled. The number of slots filled.
    async fn fill_from(
        &self,
        owner: &NodeId,
        addr: &str,
        epoch: u64,
        slots: &[Slot],
    ) -> Result<u32, Status> {
        let channel = dial(addr).await?;
        let mut client =
            ChannelServerClient::new(channel).max_decoding_message_size(MAX_HANDOFF_MESSAGE);
        let request = pb::CatchUpRequest {
            follower: self.inner.ownership.node().to_string(),
            epoch,
            slots: slots.iter().map(|&s| u32::from(s)).collect(),
        };
        let mut chunks = tokio::time::timeout(CONNECT_TIMEOUT, client.catch_up(request))
            .await
            .map_err(|_| Status::deadline_exceeded("catch-up did not start"))??
            .into_inner();
        let ownership = &self.inner.ownership;
        let mut checked: HashSet<Slot> = HashSet::new();
        let mut filled = 0u32;
        loop {
            let chunk = tokio::select! {
                _ = self.inner.cancel.cancelled() => return Err(Status::cancelled("shutting down")),
                chunk = chunks.message() => chunk?,
            };
            let Some(chunk) = chunk else { break };
            let mut check = async |slot: Slot| -> Result<(), Status> {
                if !checked.contains(&slot) {
                    let fenced = ownership.check_follower(owner, slot, chunk.epoch).await;
                    fenced.map_err(status)?;
                    checked.insert(slot);
                }
                Ok(())
            };
            for state in chunk.channels {
                let snapshot = handoff_wire::snapshot_from_proto(state).map_err(invalid)?;
                check(slot_of(&snapshot.channel)).await?;
                self.inner.shards.absorb(snapshot);
            }
            for floor in &chunk.slot_floors {
                let (slot, ts) = handoff_wire::floor_from_proto(floor).map_err(invalid)?;
                check(slot).await?;
                self.inner.shards.absorb_floor(slot, ts);
            }
            for &slot in &chunk.done_slots {
                let slot = Slot::try_from(slot)
                    .ok()
                    .filter(|s| slots.contains(s))
                    .ok_or_else(|| invalid(format!("slot {slot} was not asked for")))?;
                check(slot).await?;
                ownership.filled(slot, chunk.epoch);
                filled += 1;
            }
        }
        Ok(filled)
    }

    /// An owner's side of a catch-up: checks that the asking follower (as itself) follows the
    /// slots it asks for and that this node owns them, in this node's ring; waits for their
    /// handoffs here, if any; then streams their channels, at most at the catch-up rate.
    pub(super) async fn serve_catch_up(
        &self,
        caller: Caller,
        request: pb::CatchUpRequest,
    ) -> Result<ChunkStream, Status> {
        let follower = self.sender(&caller, rpc::CATCH_UP, &request.follower)?;
        let ownership = &self.inner.ownership;
        // The owner's side of fencing: only a follower this node's ring names, of a slot this
        // node serves now. A slot that fails (moved, still waiting for its handoff here, not
        // followed by the asker in this ring) is left out, not filled: the follower asks again.
        let mut slots = Vec::with_capacity(request.slots.len());
        let mut refusal = None;
        for &slot in &request.slots {
            let slot = Slot::try_from(slot)
                .ok()
                .filter(|s| usize::from(*s) < mesh_core::SLOT_COUNT)
                .ok_or_else(|| invalid(format!("no slot {slot}")))?;
            let ring = match ownership.check(slot, request.epoch).await {
                Ok(ring) => ring,
                Err(e @ (ServeError::Warming { .. } | ServeError::WrongOwner { .. })) => {
                    refusal = Some(e);
                    continue;
                }
                Err(e) => return Err(status(e)),
            };
            if !ring.follows(&follower, slot) {
                refusal = Some(ServeError::NotFollower {
                    slot,
                    from: ownership.node().clone(),
                    node: follower.clone(),
                    epoch: ring.epoch(),
                });
                continue;
            }
            slots.push(slot);
        }
        if let Some(refusal) = refusal.filter(|_| slots.is_empty()) {
            return Err(status(refusal));
        }
        // Slots of one shard together: each copy walks one shard.
        slots.sort_by_key(|&s| (usize::from(s) % 16, s));
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let from = this.inner.ownership.node().to_string();
            let epoch = this.inner.ownership.ring().current().epoch();
            let rate = this.inner.catch_up_rate.max(1) as f64;
            let started = Instant::now();
            let mut bytes = 0u64;
            for group in slots.chunks(CATCH_UP_SLOTS) {
                let (snapshots, floors) = this.inner.shards.copy_slots(group);
                let mut chunks: Vec<pb::CatchUpChunk> = snapshots
                    .chunks(HANDOFF_CHUNK)
                    .map(|chunk| pb::CatchUpChunk {
                        from_node: from.clone(),
                        epoch,
                        channels: chunk.iter().map(handoff_wire::snapshot_to_proto).collect(),
                        ..Default::default()
                    })
                    .collect();
                chunks.push(pb::CatchUpChunk {
                    from_node: from.clone(),
                    epoch,
                    channels: Vec::new(),
                    done_slots: group.iter().map(|&s| u32::from(s)).collect(),
                    slot_floors: floors
                        .iter()
                        .map(|(slot, ts)| pb::SlotFloor {
                            slot: u32::from(*slot),
                            ts: ts.to_string(),
                        })
                        .collect(),
                });
                for chunk in chunks {
                    let size = chunk.encoded_len() as u64;
                    bytes += size;
                    this.inner.metrics.catch_up_bytes.inc_by(size);
                    let sent = tokio::select! {
                        _ = this.inner.cancel.cancelled() => return,
                        sent = tx.send(Ok(chunk)) => sent,
                    };
                    if sent.is_err() {
                        return;
                    }
                    // At most `rate` bytes per second since the start.
                    let due = Duration::from_secs_f64(bytes as f64 / rate);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::select! {
                            _ = this.inner.cancel.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                this.inner
                    .metrics
                    .catch_up_slots
                    .with_label_values(&["sent"])
                    .inc_by(group.len() as u64);
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// A connection to the channel server at `addr`, within [`CONNECT_TIMEOUT`].
async fn dial(addr: &str) -> Result<tonic::transport::Channel, Status> {
    mesh_transport::endpoint(addr)
        .map_err(|e| Status::internal(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))
}

/// One open stream of a link.
struct LinkStream {
    btx: mpsc::Sender<pb::ReplicateBatch>,
    acks: Streaming<pb::ReplicateAck>,
    /// Index in the link's in-flight events of the first one this stream has not sent.
    unsent: usize,
}
