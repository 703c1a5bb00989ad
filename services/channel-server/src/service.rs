//! The channel server's gRPC service: publish, history, and one subscription stream per gateway.
//!
//! State is split into shards by slot; a shard's lock is held while an event is appended and
//! queued to every subscribed gateway, so each gateway receives a channel's events in ts order.
//! The lock is never held across an await.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use mesh_core::{ChannelId, NodeId, Ring, SLOT_COUNT, Slot, Ts, slot_of};
use mesh_proto::channel as pb;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_proto::channel::channel_server_server::ChannelServer as ChannelServerRpc;
use mesh_proto::channel::subscribe_request::Command;
use mesh_proto::channel::subscribe_response::Reply;
use ring_client::{Lease, RingWatcher};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::store::{Limits, Snapshot, Store, Stored};
use channel_client::wire::{event_from_proto, event_to_proto, opt_ts, ts_str};

/// Shards of channel state; a power of two that divides the slot count.
const SHARDS: usize = 16;
/// How long a call naming a newer epoch waits for this server's ring to catch up.
const RING_CATCH_UP: Duration = Duration::from_secs(1);
/// The most events one history call returns.
pub const MAX_HISTORY_LIMIT: u32 = 1000;
/// The history limit when a call asks for 0.
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;

/// How long a new owner waits for a handoff before serving the moved slots without it.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(2);
/// Channels per handoff message.
const HANDOFF_CHUNK: usize = 64;
pub use channel_client::{GATEWAY_ID_HEADER, MAX_HANDOFF_MESSAGE};

/// A gateway's subscription stream, as the shards see it.
#[derive(Debug, Clone)]
struct Subscriber {
    stream: u64,
    tx: mpsc::Sender<pb::SubscribeResponse>,
    /// Ends the stream; `reason` says why.
    end: StreamEnd,
}

/// Ends one gateway stream, with the status the gateway receives.
#[derive(Debug, Clone)]
struct StreamEnd {
    token: CancellationToken,
    reason: Arc<OnceLock<Status>>,
}

impl StreamEnd {
    fn end(&self, status: Status) {
        let _ = self.reason.set(status);
        self.token.cancel();
    }
}

#[derive(Debug)]
struct Shard {
    store: Store,
    /// Gateways subscribed to each channel.
    subs: HashMap<ChannelId, Vec<Subscriber>>,
}

impl Shard {
    /// Queues `reply` to every subscriber of `channel`. A gateway whose queue is full has
    /// fallen behind: its stream is ended (it resubscribes), never blocking the others.
    fn fan_out(&mut self, channel: &ChannelId, reply: &pb::SubscribeResponse, metrics: &Metrics) {
        let Some(subs) = self.subs.get_mut(channel) else {
            return;
        };
        subs.retain(|sub| match sub.tx.try_send(reply.clone()) {
            Ok(()) => {
                metrics.fanned_out.inc();
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics.streams_fallen_behind.inc();
                tracing::warn!(stream = sub.stream, %channel, "gateway fell behind; ending its stream");
                sub.end.end(Status::resource_exhausted(
                    "gateway fell behind its subscription queue; resubscribe",
                ));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if subs.is_empty() {
            self.subs.remove(channel);
        }
    }
}

/// Configuration of the channel service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// This node's id on the ring.
    pub node: NodeId,
    /// History bounds (the total is split evenly over the shards).
    pub limits: Limits,
    /// Responses queued per gateway stream before the gateway counts as fallen behind.
    pub gateway_queue: usize,
    /// Where its metrics are registered.
    pub telemetry: mesh_telemetry::Telemetry,
}

/// The channel server's state and gRPC service.
#[derive(Debug, Clone)]
pub struct ChannelService {
    inner: Arc<Inner>,
}

/// Slots this node gained in a handoff epoch and does not serve until the old owner's state
/// arrives (or [`HANDOFF_TIMEOUT`] passes).
#[derive(Debug, Default)]
struct Warming {
    /// Per waiting slot: the node its state comes from, and until when to wait.
    slots: HashMap<Slot, (NodeId, tokio::time::Instant)>,
    /// Handoffs already received, by (from, epoch): a handoff can beat the ring to this node.
    done: HashSet<(NodeId, u64)>,
}

#[derive(Debug)]
struct Inner {
    node: NodeId,
    ring: RingWatcher,
    /// Serving is allowed only under a valid lease (fencing).
    lease: Lease,
    warming: Mutex<Warming>,
    shards: Vec<Mutex<Shard>>,
    gateway_queue: usize,
    next_stream: AtomicU64,
    /// Every open gateway stream's queue, for the queue-depth gauge.
    streams: Mutex<HashMap<u64, mpsc::Sender<pb::SubscribeResponse>>>,
    metrics: Metrics,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Inner {
    /// Sets the gauges read at scrape time from the live state.
    fn update_gauges(&self) {
        let m = &self.metrics;
        let (mut subscriptions, mut channels) = (0usize, 0usize);
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            subscriptions += shard.subs.values().map(Vec::len).sum::<usize>();
            channels += shard.store.len();
        }
        let (streams, queued) = {
            let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            let queued: usize = streams
                .values()
                .map(|tx| tx.max_capacity() - tx.capacity())
                .sum();
            (streams.len(), queued)
        };
        let ring = self.ring.current();
        m.subscriptions.set(subscriptions as i64);
        m.channels.set(channels as i64);
        m.gateway_streams.set(streams as i64);
        m.queued_replies.set(queued as i64);
        m.ring_epoch.set(ring.epoch() as i64);
        m.slots_owned.set(ring.slots_owned(&self.node) as i64);
        m.lease_serving.set(i64::from(self.lease.is_serving()));
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl ChannelService {
    /// A service following `ring`; its tasks are tracked by `tracker` and end with `cancel`.
    pub fn new(
        config: ServiceConfig,
        ring: RingWatcher,
        lease: Lease,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let per_shard = Limits {
            total_bytes: (config.limits.total_bytes / SHARDS).max(1),
            ..config.limits
        };
        let service = ChannelService {
            inner: Arc::new(Inner {
                node: config.node,
                ring,
                lease,
                warming: Mutex::new(Warming::default()),
                shards: (0..SHARDS)
                    .map(|_| {
                        Mutex::new(Shard {
                            store: Store::new(per_shard),
                            subs: HashMap::new(),
                        })
                    })
                    .collect(),
                gateway_queue: config.gateway_queue.max(1),
                next_stream: AtomicU64::new(1),
                streams: Mutex::new(HashMap::new()),
                metrics: Metrics::new(&config.telemetry),
                cancel,
                tracker,
            }),
        };
        let follower = service.clone();
        service.inner.tracker.spawn(follower.follow_ring());
        let weak = Arc::downgrade(&service.inner);
        config.telemetry.on_scrape(move || {
            if let Some(inner) = weak.upgrade() {
                inner.update_gauges();
            }
        });
        service
    }

    fn shard(&self, channel: &ChannelId) -> MutexGuard<'_, Shard> {
        let index = usize::from(slot_of(channel)) % SHARDS;
        // A panic while holding a shard lock is a bug that already took the task down; the
        // state it guards stays consistent per operation, so keep serving.
        self.inner.shards[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that this node may serve `slot`: it holds its lease, owns the slot in the
    /// caller's epoch or a newer one, and is not waiting for the slot's handoff.
    async fn check_owner(&self, slot: Slot, epoch: u64) -> Result<Arc<Ring>, Status> {
        if !self.inner.lease.is_serving() {
            return Err(Status::unavailable(format!(
                "no_lease: {}",
                self.inner.lease.why_not_serving()
            )));
        }
        if let Some(from) = self.warming_from(slot) {
            return Err(Status::unavailable(format!(
                "slot_warming: waiting for slot {slot}'s state from {from}"
            )));
        }
        let mut ring = self.inner.ring.current();
        if epoch > ring.epoch() {
            ring = self
                .inner
                .ring
                .wait_for_epoch(epoch, RING_CATCH_UP)
                .await
                .map_err(|_| {
                    Status::unavailable(format!(
                        "ring_behind: this channel server knows epoch {}, caller routed by {epoch}",
                        ring.epoch()
                    ))
                })?;
        }
        if ring.owns(&self.inner.node, slot) {
            Ok(ring)
        } else {
            let owner = ring
                .owner(slot)
                .map(|n| n.id.to_string())
                .unwrap_or_default();
            Err(Status::failed_precondition(format!(
                "wrong_owner: slot {slot} belongs to {owner:?} in epoch {}, not to {}",
                ring.epoch(),
                self.inner.node
            )))
        }
    }

    /// On every new ring: drop subscriptions and history of slots this node no longer owns,
    /// telling the subscribed gateways the channel moved.
    async fn follow_ring(self) {
        let (ring, cancel) = (self.inner.ring.clone(), self.inner.cancel.clone());
        let mut previous = ring.current();
        ring.on_each_change(cancel, |ring| {
            self.apply_ring(&previous, &ring);
            previous = ring;
        })
        .await;
    }

    /// The node this slot waits for a handoff from, if it waits.
    fn warming_from(&self, slot: Slot) -> Option<NodeId> {
        let mut warming = self.inner.warming.lock().unwrap_or_else(|e| e.into_inner());
        let (from, deadline) = warming.slots.get(&slot)?.clone();
        if tokio::time::Instant::now() < deadline {
            return Some(from);
        }
        tracing::warn!(slot, %from, "handoff did not arrive in time; serving without it");
        warming.slots.retain(|_, (f, _)| f != &from);
        None
    }

    /// Follows a new ring: slots gained through a handoff wait for it; slots lost through a
    /// handoff have their state sent to the new owner; every other lost slot is dropped; the
    /// gateways subscribed to moved channels are told so.
    fn apply_ring(&self, previous: &Ring, ring: &Ring) {
        let node = &self.inner.node;
        let mut unknown = Vec::new();
        {
            let mut warming = self.inner.warming.lock().unwrap_or_else(|e| e.into_inner());
            let deadline = tokio::time::Instant::now() + HANDOFF_TIMEOUT;
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
                if handed && !warming.done.contains(&(old.id.clone(), ring.epoch())) {
                    warming.slots.insert(slot, (old.id.clone(), deadline));
                } else if !handed {
                    // Taken over from a node that died: its channels' history died with it.
                    unknown.push(slot);
                }
            }
        }
        // The new owner of a slot this node hands off in this epoch.
        let handoff_to = |slot: Slot| {
            let to = ring.owner(slot)?;
            let handed = ring
                .handoffs()
                .iter()
                .any(|h| &h.from == node && h.to == to.id);
            (previous.owns(node, slot) && &to.id != node && handed).then_some(to)
        };
        if !unknown.is_empty() {
            let now = Ts::from_micros(now_micros());
            for shard in &self.inner.shards {
                let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                for &slot in &unknown {
                    shard.store.mark_unknown_before(slot, now);
                }
            }
        }
        let mut outgoing: HashMap<NodeId, Vec<Snapshot>> = HashMap::new();
        let mut moved = 0usize;
        let mut dropped = 0usize;
        for shard in &self.inner.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for snapshot in shard.store.take_slots(|slot| handoff_to(slot).is_some()) {
                if let Some(to) = handoff_to(slot_of(&snapshot.channel)) {
                    outgoing.entry(to.id.clone()).or_default().push(snapshot);
                }
            }
            dropped += shard.store.drop_slots(|slot| !ring.owns(node, slot));
            let lost: Vec<ChannelId> = shard
                .subs
                .keys()
                .filter(|c| !ring.owns(node, slot_of(c)))
                .cloned()
                .collect();
            for channel in lost {
                if let Some(subs) = shard.subs.remove(&channel) {
                    let reply = refused(&channel, ring.epoch(), "moved");
                    for sub in subs {
                        if sub.tx.try_send(reply.clone()).is_err() {
                            sub.end
                                .end(Status::resource_exhausted("gateway fell behind"));
                        }
                    }
                    moved += 1;
                }
            }
        }
        tracing::info!(
            epoch = ring.epoch(),
            slots = ring.slots_owned(node),
            moved_subscriptions = moved,
            dropped_channels = dropped,
            handing_off_channels = outgoing.values().map(Vec::len).sum::<usize>(),
            "channel server follows new ring"
        );
        let sends: Vec<(NodeId, String, Vec<Snapshot>)> = ring
            .handoffs()
            .iter()
            .filter(|h| &h.from == node)
            .filter_map(|h| {
                let addr = ring.nodes().iter().find(|n| n.id == h.to)?.addr.clone();
                Some((
                    h.to.clone(),
                    addr,
                    outgoing.remove(&h.to).unwrap_or_default(),
                ))
            })
            .collect();
        let (this, epoch) = (self.clone(), ring.epoch());
        self.inner.tracker.spawn(async move {
            for (to, addr, snapshots) in sends {
                let count = snapshots.len();
                match this.send_handoff(&addr, epoch, snapshots).await {
                    Ok(()) => {
                        this.inner.metrics.handoffs_sent.with_label_values(&["ok"]).inc();
                        tracing::info!(%to, channels = count, epoch, "handoff sent")
                    }
                    Err(e) => {
                        this.inner.metrics.handoffs_sent.with_label_values(&["failed"]).inc();
                        tracing::warn!(%to, error = %e, epoch, "handoff failed; the new owner serves after its timeout")
                    }
                }
            }
            this.inner.lease.handed_off(epoch);
        });
    }

    /// Streams `snapshots` to the channel server at `addr`, then `done`.
    async fn send_handoff(
        &self,
        addr: &str,
        epoch: u64,
        snapshots: Vec<Snapshot>,
    ) -> Result<(), Status> {
        let channel = mesh_transport::endpoint(addr)
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let from = self.inner.node.to_string();
        let mut chunks: Vec<pb::HandoffChunk> = snapshots
            .chunks(HANDOFF_CHUNK)
            .map(|chunk| pb::HandoffChunk {
                from_node: from.clone(),
                epoch,
                channels: chunk.iter().map(snapshot_to_proto).collect(),
                done: false,
            })
            .collect();
        chunks.push(pb::HandoffChunk {
            from_node: from,
            epoch,
            channels: Vec::new(),
            done: true,
        });
        let mut client =
            ChannelServerClient::new(channel).max_encoding_message_size(MAX_HANDOFF_MESSAGE);
        let call = client.handoff(futures::stream::iter(chunks));
        tokio::time::timeout(HANDOFF_TIMEOUT, call)
            .await
            .map_err(|_| Status::deadline_exceeded("handoff took too long"))??;
        Ok(())
    }

    /// Handles one command of a gateway's subscription stream.
    async fn handle_command(
        &self,
        command: Command,
        sub: &Subscriber,
        subscribed: &mut HashSet<ChannelId>,
    ) {
        match command {
            Command::Subscribe(s) => {
                for name in s.channels {
                    let channel = match ChannelId::new(&name) {
                        Ok(c) => c,
                        Err(e) => {
                            let reply = refused_name(name, 0, &e.to_string());
                            self.send_control(sub, reply);
                            continue;
                        }
                    };
                    match self.check_owner(slot_of(&channel), s.epoch).await {
                        Err(status) => {
                            let epoch = self.inner.ring.current().epoch();
                            self.send_control(sub, refused(&channel, epoch, status.message()));
                        }
                        Ok(_) => {
                            let mut shard = self.shard(&channel);
                            if subscribed.insert(channel.clone()) {
                                shard
                                    .subs
                                    .entry(channel.clone())
                                    .or_default()
                                    .push(sub.clone());
                            }
                            let reply = pb::SubscribeResponse {
                                reply: Some(Reply::Subscribed(pb::Subscribed {
                                    channel: channel.to_string(),
                                    head_ts: ts_str(shard.store.head(&channel)),
                                })),
                            };
                            // Queued under the shard lock: every event published after it
                            // follows it on the stream.
                            self.send_control(sub, reply);
                        }
                    }
                }
            }
            Command::Unsubscribe(u) => {
                for name in u.channels {
                    let Ok(channel) = ChannelId::new(&name) else {
                        continue;
                    };
                    if subscribed.remove(&channel) {
                        self.remove_subscriber(&channel, sub.stream);
                    }
                }
            }
        }
    }

    fn send_control(&self, sub: &Subscriber, reply: pb::SubscribeResponse) {
        if sub.tx.try_send(reply).is_err() {
            sub.end.end(Status::resource_exhausted(
                "gateway fell behind its subscription queue",
            ));
        }
    }

    fn remove_subscriber(&self, channel: &ChannelId, stream: u64) {
        let mut shard = self.shard(channel);
        if let Some(subs) = shard.subs.get_mut(channel) {
            subs.retain(|s| s.stream != stream);
            if subs.is_empty() {
                shard.subs.remove(channel);
            }
        }
    }
}

impl ChannelService {
    /// Publish, inside its span: appends the event and queues it to every subscribed gateway,
    /// with the fan-out time and this span's trace context on it.
    async fn publish_event(
        &self,
        req: pb::PublishRequest,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let event = req
            .event
            .ok_or_else(|| Status::invalid_argument("event is required"))?;
        let mut event =
            event_from_proto(event).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.check_owner(slot_of(&event.channel), req.epoch).await?;
        {
            let mut shard = self.shard(&event.channel);
            if !event.body.is_transient() {
                event.ts = Some(
                    shard
                        .store
                        .append(&event.channel, &event.body, now_micros()),
                );
            }
            let mut proto = event_to_proto(&event);
            proto.published_micros = now_micros();
            mesh_telemetry::propagation::inject_map(&mut proto.trace_context);
            let reply = pb::SubscribeResponse {
                reply: Some(Reply::Events(pb::Events {
                    events: vec![proto],
                })),
            };
            shard.fan_out(&event.channel, &reply, &self.inner.metrics);
        }
        self.inner.metrics.published(&event.body);
        Ok(Response::new(pb::PublishResponse {
            ts: ts_str(event.ts),
        }))
    }
}

fn refused(channel: &ChannelId, epoch: u64, reason: &str) -> pb::SubscribeResponse {
    refused_name(channel.to_string(), epoch, reason)
}

fn refused_name(channel: String, epoch: u64, reason: &str) -> pb::SubscribeResponse {
    pb::SubscribeResponse {
        reply: Some(Reply::Refused(pb::Refused {
            channel,
            epoch,
            reason: reason.to_string(),
        })),
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

/// Replies queued to one publish stream's caller.
const PUBLISH_STREAM_QUEUE: usize = 1024;

#[tonic::async_trait]
impl ChannelServerRpc for ChannelService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("channel.Publish", node = %self.inner.node);
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        let req = request.into_inner();
        let result = self.publish_event(req).instrument(span).await;
        if result.is_ok() {
            let elapsed = started.elapsed().as_secs_f64();
            self.inner.metrics.publish_seconds.observe(elapsed);
        }
        result
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let req = request.into_inner();
        let channel =
            ChannelId::new(&req.channel).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let since = opt_ts(&req.since_ts).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let limit = match req.limit {
            0 => DEFAULT_HISTORY_LIMIT,
            n => n.min(MAX_HISTORY_LIMIT),
        };
        self.check_owner(slot_of(&channel), req.epoch).await?;
        let page = self
            .shard(&channel)
            .store
            .history(&channel, since, limit as usize);
        let outcome = if page.events.is_empty() {
            "empty"
        } else {
            "hit"
        };
        self.inner
            .metrics
            .history_reads
            .with_label_values(&[outcome])
            .inc();
        Ok(Response::new(pb::HistoryResponse {
            events: page
                .events
                .into_iter()
                .map(|stored| {
                    event_to_proto(&mesh_core::ChannelEvent {
                        channel: channel.clone(),
                        ts: Some(stored.ts),
                        body: stored.body,
                        origin: None,
                    })
                })
                .collect(),
            oldest_ts: ts_str(page.oldest),
            complete_after_ts: ts_str(
                (page.complete_after != Ts::default()).then_some(page.complete_after),
            ),
            has_more: page.has_more,
        }))
    }

    async fn handoff(
        &self,
        request: Request<Streaming<pb::HandoffChunk>>,
    ) -> Result<Response<pb::HandoffAck>, Status> {
        let mut chunks = request.into_inner();
        let mut received = 0u32;
        while let Some(chunk) = chunks.message().await? {
            let from = NodeId::new(&chunk.from_node)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            for state in chunk.channels {
                let snapshot = snapshot_from_proto(state)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                self.shard(&snapshot.channel).store.absorb(snapshot);
                self.inner.metrics.handoff_channels_received.inc();
                received += 1;
            }
            if chunk.done {
                let mut warming = self.inner.warming.lock().unwrap_or_else(|e| e.into_inner());
                warming.slots.retain(|_, (f, _)| f != &from);
                warming.done.insert((from.clone(), chunk.epoch));
                tracing::info!(%from, epoch = chunk.epoch, channels = received, "handoff received");
            }
        }
        Ok(Response::new(pb::HandoffAck { channels: received }))
    }

    type SubscribeStream = SubscribeStream;
    type PublishStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::PublishStreamReply, Status>> + Send>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(PUBLISH_STREAM_QUEUE);
        let (this, cancel) = (self.clone(), self.inner.cancel.clone());
        // One request at a time, in order: a caller's events to one channel keep their order.
        self.inner.tracker.spawn(async move {
            loop {
                // Cancel-safe: message() loses nothing when the other branch wins; we stop.
                let next = tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = incoming.message() => next,
                };
                let Ok(Some(request)) = next else { break };
                let started = Instant::now();
                let span = tracing::debug_span!("channel.Publish", node = %this.inner.node);
                mesh_telemetry::propagation::set_parent_from_map(&span, &request.trace_context);
                let result = match request.publish {
                    Some(publish) => this.publish_event(publish).instrument(span).await,
                    None => Err(Status::invalid_argument("publish is required")),
                };
                let reply = match result {
                    Ok(reply) => {
                        this.inner
                            .metrics
                            .publish_seconds
                            .observe(started.elapsed().as_secs_f64());
                        pb::PublishStreamReply {
                            id: request.id,
                            ts: reply.into_inner().ts,
                            code: 0,
                            message: String::new(),
                        }
                    }
                    Err(status) => pb::PublishStreamReply {
                        id: request.id,
                        ts: String::new(),
                        code: status.code() as i32,
                        message: status.message().to_string(),
                    },
                };
                // The caller reads its replies as they come; a full queue waits for it.
                let sent = tokio::select! {
                    _ = cancel.cancelled() => break,
                    sent = tx.send(Ok(reply)) => sent,
                };
                if sent.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<SubscribeStream>, Status> {
        let gateway = request
            .metadata()
            .get(GATEWAY_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_string();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(self.inner.gateway_queue);
        let end = StreamEnd {
            token: self.inner.cancel.child_token(),
            reason: Arc::new(OnceLock::new()),
        };
        let sub = Subscriber {
            stream: self.inner.next_stream.fetch_add(1, Ordering::Relaxed),
            tx,
            end: end.clone(),
        };
        tracing::info!(%gateway, stream = sub.stream, "gateway subscription stream opened");
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sub.stream, sub.tx.clone());
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let mut subscribed = HashSet::new();
            loop {
                // Cancel-safe: `message()` loses nothing when the other branch wins, and the
                // stream is dropped right after.
                let next = tokio::select! {
                    _ = sub.end.token.cancelled() => break,
                    next = inbound.message() => next,
                };
                match next {
                    Ok(Some(pb::SubscribeRequest {
                        command: Some(command),
                    })) => {
                        this.handle_command(command, &sub, &mut subscribed).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%gateway, error = %e, "gateway stream ended with an error");
                        break;
                    }
                }
            }
            for channel in subscribed {
                this.remove_subscriber(&channel, sub.stream);
            }
            this.inner
                .streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&sub.stream);
            sub.end.end(Status::cancelled("subscription stream closed"));
            tracing::info!(%gateway, stream = sub.stream, "gateway subscription stream closed");
        });
        let events = ReceiverStream::new(rx).map(Ok);
        let ended = futures::stream::once(async move {
            end.token.cancelled().await;
            Err(end
                .reason
                .get()
                .cloned()
                .unwrap_or_else(|| Status::unavailable("channel server shutting down")))
        });
        let stream = futures::stream::select(events, ended);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn snapshot_to_proto(snapshot: &Snapshot) -> pb::ChannelState {
    pb::ChannelState {
        channel: snapshot.channel.to_string(),
        last_ts: snapshot.last_ts.to_string(),
        trimmed_ts: ts_str((snapshot.trimmed != Ts::default()).then_some(snapshot.trimmed)),
        events: snapshot
            .events
            .iter()
            .map(|stored| {
                event_to_proto(&mesh_core::ChannelEvent {
                    channel: snapshot.channel.clone(),
                    ts: Some(stored.ts),
                    body: stored.body.clone(),
                    origin: None,
                })
            })
            .collect(),
    }
}

fn snapshot_from_proto(
    state: pb::ChannelState,
) -> Result<Snapshot, channel_client::wire::WireError> {
    let channel = ChannelId::new(&state.channel)?;
    let last_ts = Ts::parse(&state.last_ts)?;
    let events = state
        .events
        .into_iter()
        .filter_map(|e| match event_from_proto(e) {
            Ok(mesh_core::ChannelEvent {
                ts: Some(ts), body, ..
            }) => Some(Ok(Stored { ts, body })),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Snapshot {
        channel,
        last_ts,
        trimmed: channel_client::wire::opt_ts(&state.trimmed_ts)?.unwrap_or_default(),
        events,
    })
}
