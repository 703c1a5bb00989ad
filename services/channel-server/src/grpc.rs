//! The channel server's gRPC edge: publish, history, handoffs and one subscription stream per
//! gateway. It converts prost ⇄ domain (with `channel_client::wire`), maps every
//! [`ServeError`] to a `Status` in one table ([`status`]), runs each gateway stream's task and
//! sends handoffs; the state it serves is the [`Shards`] behind an [`Ownership`] check.

mod handoff_send;
mod handoff_wire;
mod replicate;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use mesh_core::{ChannelEvent, ChannelId, NodeId, Ring, Ts, slot_of};
use mesh_proto::channel as pb;
use mesh_proto::channel::channel_server_server::ChannelServer as ChannelServerRpc;
use mesh_proto::channel::subscribe_request::Command;
use mesh_proto::channel::subscribe_response::Reply;
use mesh_transport::authz::{self, rpc};
use mesh_transport::{Authorizer, Caller, Role};
use ring_client::{Lease, RingWatcher};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::ServeError;
use crate::handoff::{HANDOFF_CONCURRENCY, Progress, WARMUP_TIMEOUT};
use crate::idempotency::MAX_KEY_BYTES;
use crate::members::{self, Report};
use crate::metrics::Metrics;
use crate::ownership::Ownership;
use crate::replication::PUBLISH_WAIT;
use crate::shards::{
    FactSink, GatewayStream, Published, Shards, StreamReply, history_limit, now_micros,
};
use crate::store::Limits;
use channel_client::wire::{event_from_proto, event_to_proto, opt_ts, ts_str};

pub use channel_client::{GATEWAY_ID_HEADER, MAX_HANDOFF_MESSAGE};

/// The one table from the domain's errors to gRPC statuses: the code each refusal carries,
/// with its message as the caller reads it.
pub fn status(error: ServeError) -> Status {
    let message = error.to_string();
    match error {
        ServeError::NoLease(_)
        | ServeError::Warming { .. }
        | ServeError::RingBehind { .. }
        | ServeError::ShuttingDown
        | ServeError::ReplicationBehind
        | ServeError::ReplicationTimeout
        | ServeError::ReplicationRefused(_) => Status::unavailable(message),
        ServeError::WrongOwner { .. } | ServeError::NotFollower { .. } => {
            Status::failed_precondition(message)
        }
        ServeError::FellBehind | ServeError::FellBehindOnReply | ServeError::FellBehindOnMove => {
            Status::resource_exhausted(message)
        }
        ServeError::StreamClosed => Status::cancelled(message),
    }
}

/// A request that does not decode.
fn invalid(error: impl ToString) -> Status {
    Status::invalid_argument(error.to_string())
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
    /// Each channel's window of idempotency keys.
    pub window: crate::idempotency::Bounds,
    /// Where its metrics are registered.
    pub telemetry: mesh_telemetry::Telemetry,
    /// Refuses a handoff from a node that is not its sender or not named by the ring (the
    /// authorization table was checked before).
    pub authorizer: Authorizer,
    /// Bytes per second one catch-up of a new follower sends at most.
    pub catch_up_rate: u64,
    /// The channel policies in force: history bounds and publish rates.
    pub policies: mesh_core::policy::SharedPolicies,
    /// Where the channel webhooks go ([`mesh_hooks::Webhooks::disabled`]: nowhere).
    pub webhooks: mesh_hooks::Webhooks,
    /// Bounds of the member accounting, and the grace before a departure counts.
    pub members: members::Bounds,
}

/// The most channels one `ListChannels` page holds.
const MAX_LIST_LIMIT: u32 = 1000;
/// The page size when `ListChannels` asks for 0.
const DEFAULT_LIST_LIMIT: u32 = 100;
/// How often departures are checked against the grace, at most.
const EXPIRE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The channel server's gRPC service; cheap to clone.
#[derive(Debug, Clone)]
pub struct ChannelService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ownership: Ownership,
    shards: Shards<pb::SubscribeResponse>,
    gateway_queue: usize,
    metrics: Metrics,
    authorizer: Authorizer,
    /// Which epochs' outgoing handoffs are all confirmed (drain progress).
    progress: Mutex<Progress>,
    /// Handoff attempts in flight at once.
    handoff_slots: Semaphore,
    /// Replication links to the followers of this node's slots.
    links: replicate::Links,
    /// Bytes per second one catch-up sends at most.
    catch_up_rate: u64,
    /// The channel policies in force (publish rates here; history bounds in the stores).
    policies: mesh_core::policy::SharedPolicies,
    /// Each channel's publish-rate bucket, on its owner.
    rates: crate::rates::ChannelRates,
    /// Client messages refused over their channel's rate.
    rate_limited: mesh_telemetry::prometheus::IntCounter,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Inner {
    /// Sets the gauges read at scrape time from the live state.
    fn update_gauges(&self) {
        let m = &self.metrics;
        let counts = self.shards.counts();
        let ring = self.ownership.ring().current();
        m.subscriptions.set(counts.subscriptions as i64);
        m.channels.set(counts.channels as i64);
        m.gateway_streams.set(counts.streams as i64);
        m.queued_replies.set(counts.queued as i64);
        m.ring_epoch.set(ring.epoch() as i64);
        m.slots_owned
            .set(ring.slots_owned(self.ownership.node()) as i64);
        m.lease_serving
            .set(i64::from(self.ownership.lease().is_serving()));
        m.replication_pending.set(self.shards.pending() as i64);
        m.slots_followed
            .set(ring.slots_followed(self.ownership.node()) as i64);
        m.slots_catching_up.set(self.ownership.catching_up() as i64);
        let (entries, known, dropped) = self.shards.member_counts();
        m.member_entries.set(entries as i64);
        m.members_known.set(known as i64);
        m.member_reports_dropped.set(dropped as i64);
    }
}

/// Replies on a gateway's stream in their protobuf form.
impl StreamReply for pb::SubscribeResponse {
    /// The event with the fan-out time and the current span's trace context on it.
    fn event(event: &ChannelEvent) -> Self {
        let mut proto = event_to_proto(event);
        proto.published_micros = now_micros();
        mesh_telemetry::propagation::inject_map(&mut proto.trace_context);
        pb::SubscribeResponse {
            reply: Some(Reply::Events(pb::Events {
                events: vec![proto],
            })),
        }
    }

    fn subscribed(channel: &ChannelId, head: Option<Ts>, complete_after: Option<Ts>) -> Self {
        pb::SubscribeResponse {
            reply: Some(Reply::Subscribed(pb::Subscribed {
                channel: channel.to_string(),
                head_ts: ts_str(head),
                complete_after_ts: ts_str(complete_after),
            })),
        }
    }

    fn gap(channel: &ChannelId, complete_after: Ts) -> Self {
        pb::SubscribeResponse {
            reply: Some(Reply::Gap(pb::HistoryGap {
                channel: channel.to_string(),
                complete_after_ts: complete_after.to_string(),
            })),
        }
    }

    fn refused(channel: &ChannelId, epoch: u64, reason: &str) -> Self {
        refused_name(channel.to_string(), epoch, reason)
    }
}

/// A gateway's member counts as the accounting reads them; entries with a bad id are skipped.
fn reports(members: Vec<pb::MemberCount>) -> Vec<Report> {
    members
        .into_iter()
        .filter_map(|m| {
            Some(Report {
                user: mesh_core::UserId::new(&m.user).ok()?,
                team: match m.team.as_str() {
                    "" => None,
                    team => Some(mesh_core::TeamId::new(team).ok()?),
                },
                conns: m.connections,
                since_ms: m.since_ms,
                announced: m.announced,
            })
        })
        .collect()
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

impl ChannelService {
    /// A service following `ring`; its tasks are tracked by `tracker` and end with `cancel`.
    pub fn new(
        config: ServiceConfig,
        ring: RingWatcher,
        lease: Lease,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let metrics = Metrics::new(&config.telemetry);
        let shards = Shards::new(config.limits, metrics.clone(), mesh_core::ts::stamp_micros);
        shards.set_window(config.window);
        shards.set_policies(&config.policies);
        let rate_limited = config.telemetry.counter(
            "channelmesh_channel_publishes_rate_limited_total",
            "Client messages refused (RESOURCE_EXHAUSTED) over their channel's publish rate (its policy).",
        );
        shards.set_member_bounds(config.members);
        if config.webhooks.is_enabled() {
            let webhooks = config.webhooks.clone();
            shards.set_fact_sink(FactSink(Box::new(move |fact| {
                webhooks.emit(crate::hooks::event(fact))
            })));
        }
        let service = ChannelService {
            inner: Arc::new(Inner {
                ownership: Ownership::new(config.node, ring, lease),
                shards,
                gateway_queue: config.gateway_queue.max(1),
                metrics,
                authorizer: config.authorizer,
                progress: Mutex::new(Progress::default()),
                handoff_slots: Semaphore::new(HANDOFF_CONCURRENCY),
                links: replicate::Links::default(),
                catch_up_rate: config.catch_up_rate,
                policies: config.policies,
                rates: crate::rates::ChannelRates::default(),
                rate_limited,
                cancel,
                tracker,
            }),
        };
        let follower = service.clone();
        // The ring before this node registers (registration comes after the service): the
        // first ring naming this registration is then followed as a change, whenever the task
        // gets to run.
        let first = service.inner.ownership.ring().current();
        service.inner.tracker.spawn(follower.follow_ring(first));
        let expiring = service.clone();
        let every = std::time::Duration::from_millis(config.members.grace_ms / 4).min(EXPIRE_EVERY);
        service.inner.tracker.spawn(async move {
            let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = expiring.inner.cancel.cancelled() => break,
                    _ = tick.tick() => expiring.inner.shards.expire_members(),
                }
            }
        });
        let weak = Arc::downgrade(&service.inner);
        config.telemetry.on_scrape(move || {
            if let Some(inner) = weak.upgrade() {
                inner.update_gauges();
            }
        });
        service
    }

    /// On every new ring after `first` (the one found at start): drop subscriptions and
    /// history of slots this node no longer owns, telling the subscribed gateways the channel
    /// moved. A process starts holding nothing: slots `first` already gives this node (an
    /// earlier incarnation's, not yet retired) are not held, and followed ones are to fill.
    async fn follow_ring(self, first: Arc<Ring>) {
        let (ring, cancel) = (
            self.inner.ownership.ring().clone(),
            self.inner.cancel.clone(),
        );
        let mut previous = first;
        let ownership = &self.inner.ownership;
        let stale: Vec<mesh_core::Slot> = (0..mesh_core::SLOT_COUNT as mesh_core::Slot)
            .filter(|&slot| previous.owns(ownership.node(), slot))
            .collect();
        ownership.start_from(&previous, &stale);
        self.ask_fills();
        let asking = self.clone();
        self.inner.tracker.spawn(asking.keep_asking());
        ring.on_each_change(cancel, |ring| {
            self.apply_ring(&previous, &ring);
            previous = ring;
        })
        .await;
    }

    /// Follows a new ring: slots gained through a handoff wait for it (until their warm-up
    /// runs out); slots lost through a handoff have their state sent to the new owner (each
    /// on its own task, with its own deadline per attempt, retried until confirmed); every
    /// other lost slot is dropped; the gateways subscribed to moved channels are told so.
    ///
    /// Replication: a slot this node followed in sync is promoted with its history; events
    /// waiting for followers go to the followers the ring names now (or fail, for slots gone
    /// elsewhere); new followers of this node's slots are filled in the background.
    fn apply_ring(&self, previous: &Ring, ring: &Ring) {
        let ownership = &self.inner.ownership;
        let unknown = ownership.gain(previous, ring);
        ownership.follow_replicas(previous, ring);
        let sends = self
            .inner
            .shards
            .follow_ring(previous, ring, ownership.node(), &unknown);
        self.inner
            .shards
            .reroute(ring, ownership.node(), &replicate::LinkSender(self));
        self.prune_links(ring);
        self.ask_fills();
        let epoch = ring.epoch();
        self.progress(|p| p.followed(epoch, sends.len()));
        // This ring's warm-ups end at their own deadline (set just before, by `gain`); an
        // earlier ring's have a timer of their own.
        if ownership.next_warmup_deadline().is_some() {
            let deadline = tokio::time::Instant::now() + WARMUP_TIMEOUT;
            let this = self.clone();
            self.inner.tracker.spawn(async move {
                tokio::select! {
                    _ = this.inner.cancel.cancelled() => {}
                    _ = tokio::time::sleep_until(deadline) => this.end_warmups(),
                }
            });
        }
        for outgoing in sends {
            let this = self.clone();
            self.inner
                .tracker
                .spawn(async move { this.hand_off(epoch, outgoing).await });
        }
    }

    /// Handles one command of a gateway's subscription stream.
    async fn handle_command(
        &self,
        command: Command,
        stream: &mut GatewayStream<pb::SubscribeResponse>,
    ) {
        match command {
            Command::Subscribe(s) => {
                stream.set_region(&s.region);
                let mut members: std::collections::HashMap<String, Vec<Report>> = s
                    .members
                    .into_iter()
                    .map(|m| (m.channel, reports(m.members)))
                    .collect();
                for name in s.channels {
                    let channel = match ChannelId::new(&name) {
                        Ok(c) => c,
                        Err(e) => {
                            stream.send(refused_name(name, 0, &e.to_string()));
                            continue;
                        }
                    };
                    match self.inner.ownership.check(slot_of(&channel), s.epoch).await {
                        Err(refusal) => {
                            let epoch = self.inner.ownership.ring().current().epoch();
                            let reason = refusal.to_string();
                            stream.send(StreamReply::refused(&channel, epoch, &reason));
                        }
                        Ok(_) => {
                            let delivered = s.last_ts.get(&name).and_then(|t| Ts::parse(t).ok());
                            let reports = members.remove(&name).unwrap_or_default();
                            self.inner
                                .shards
                                .subscribe(stream, &channel, delivered, &reports);
                            // Its clock is past what this gateway delivered: publishes may
                            // come, even while a takeover settles.
                            self.inner
                                .ownership
                                .resubscribed(channel.as_str(), slot_of(&channel));
                        }
                    }
                }
            }
            Command::Members(m) => {
                for changed in m.channels {
                    let Ok(channel) = ChannelId::new(&changed.channel) else {
                        continue;
                    };
                    let reports = reports(changed.members);
                    self.inner.shards.update_members(stream, &channel, &reports);
                }
            }
            Command::Unsubscribe(u) => {
                for name in u.channels {
                    let Ok(channel) = ChannelId::new(&name) else {
                        continue;
                    };
                    self.inner.shards.unsubscribe(stream, &channel);
                }
            }
        }
    }

    /// A handoff from `from` for `epoch` is taken only from `from` itself, and only if the
    /// ring names a handoff from it to this node in that epoch.
    async fn check_handoff(
        &self,
        caller: &Caller,
        from: &NodeId,
        epoch: u64,
    ) -> Result<(), Status> {
        let refuse = |why: String| self.inner.authorizer.refuse(caller, rpc::HANDOFF, &why);
        if !caller.is(&[Role::ChannelServer], from.as_str()) {
            return Err(refuse(format!(
                "a channel server hands off only as itself, not as {from}"
            )));
        }
        let ownership = &self.inner.ownership;
        if !ownership.expects_handoff(from, epoch).await {
            return Err(refuse(format!(
                "the ring names no handoff from {from} to {} in epoch {epoch}",
                ownership.node()
            )));
        }
        Ok(())
    }

    /// Publish, inside its span, up to its followers' acknowledgement: the event gets its ts
    /// and is stored and fanned out (no follower), or sent to the slot's followers (see
    /// [`Shards::publish_once`]); [`finish`] waits for them.
    async fn begin_publish(&self, req: pb::PublishRequest) -> Result<Begun, Status> {
        let key = match req.idempotency_key.as_str() {
            "" => None,
            key if key.len() > MAX_KEY_BYTES => {
                return Err(invalid(format!(
                    "idempotency_key is longer than {MAX_KEY_BYTES} bytes"
                )));
            }
            key => Some(key),
        };
        let event = req.event.ok_or_else(|| invalid("event is required"))?;
        let mut event = event_from_proto(event).map_err(invalid)?;
        let (ownership, slot) = (&self.inner.ownership, slot_of(&event.channel));
        ownership.check(slot, req.epoch).await.map_err(status)?;
        ownership
            .check_settled(slot, event.channel.as_str())
            .map_err(status)?;
        self.check_rate(&event)?;
        let route = || {
            let ring = ownership.ring().current();
            crate::ownership::owns(&ring, ownership.node(), slot).map(|()| ring)
        };
        let published = self
            .inner
            .shards
            .publish_once(&mut event, key, route, &replicate::LinkSender(self))
            .map_err(status)?;
        Ok(match published {
            Published::Done { .. } => Begun::Done(event.ts),
            Published::Waiting { reply, .. } => Begun::Waiting(reply),
        })
    }

    /// Refuses a client's message over its channel's publish rate (the channel's policy) with
    /// `RESOURCE_EXHAUSTED`. The admin API's publishes (no origin connection) and typing
    /// indicators are not counted. A retry of a publish counts again.
    fn check_rate(&self, event: &mesh_core::ChannelEvent) -> Result<(), Status> {
        let client_message =
            event.origin.is_some() && matches!(event.body, mesh_core::EventBody::Message { .. });
        if !client_message {
            return Ok(());
        }
        let Some(rate) = self
            .inner
            .policies
            .for_channel(event.channel.as_str())
            .publish_rate
        else {
            return Ok(());
        };
        if self.inner.rates.admit(&event.channel, rate, Instant::now()) {
            return Ok(());
        }
        self.inner.rate_limited.inc();
        Err(Status::resource_exhausted(format!(
            "rate_limited: channel {} takes {} messages a second (burst {})",
            event.channel, rate.per_second, rate.burst
        )))
    }

    /// Publish: [`ChannelService::begin_publish`], then [`finish`].
    async fn publish_event(
        &self,
        req: pb::PublishRequest,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let begun = self.begin_publish(req).await?;
        finish(begun).await.map(Response::new)
    }
}

/// A publish begun: answered, or waiting for its followers.
enum Begun {
    Done(Option<Ts>),
    Waiting(tokio::sync::oneshot::Receiver<Result<Ts, ServeError>>),
}

/// A begun publish's answer: its ts once its followers acknowledged it, or
/// `replication_timeout` after [`PUBLISH_WAIT`] (the event may still be stored: a retry with
/// the same idempotency key gets its ts).
async fn finish(begun: Begun) -> Result<pb::PublishResponse, Status> {
    let ts = match begun {
        Begun::Done(ts) => ts,
        Begun::Waiting(reply) => match tokio::time::timeout(PUBLISH_WAIT, reply).await {
            Err(_) => return Err(status(ServeError::ReplicationTimeout)),
            Ok(Err(_)) => return Err(status(ServeError::ShuttingDown)),
            Ok(Ok(answer)) => Some(answer.map_err(status)?),
        },
    };
    Ok(pb::PublishResponse { ts: ts_str(ts) })
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
        let span = tracing::debug_span!("channel.Publish", node = %self.inner.ownership.node());
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
        let channel = ChannelId::new(&req.channel).map_err(invalid)?;
        let since = opt_ts(&req.since_ts).map_err(invalid)?;
        let limit = history_limit(req.limit);
        self.inner
            .ownership
            .check(slot_of(&channel), req.epoch)
            .await
            .map_err(status)?;
        let page = self.inner.shards.history(&channel, since, limit);
        Ok(Response::new(pb::HistoryResponse {
            events: page
                .events
                .into_iter()
                .map(|stored| {
                    event_to_proto(&ChannelEvent {
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

    async fn lease_status(
        &self,
        request: Request<pb::LeaseStatusRequest>,
    ) -> Result<Response<pb::LeaseStatusResponse>, Status> {
        let asking = request.into_inner().node_id;
        let ownership = &self.inner.ownership;
        let status = ownership.lease().status();
        tracing::debug!(%asking, ?status, "a peer asked about this node's lease");
        Ok(Response::new(pb::LeaseStatusResponse {
            node_id: ownership.node().to_string(),
            holds_lease: status.holds_lease,
            revoked: status.revoked,
            renewed_ms_ago: status.renewed_ago.map_or(0, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
            }),
            epoch: ownership.ring().current().epoch(),
        }))
    }

    async fn handoff(
        &self,
        request: Request<Streaming<pb::HandoffChunk>>,
    ) -> Result<Response<pb::HandoffAck>, Status> {
        let caller = authz::caller(&request);
        let mut chunks = request.into_inner();
        let mut received = 0u32;
        // The (sender, epoch) checked last: every chunk of one handoff names the same.
        let mut checked: Option<(NodeId, u64)> = None;
        while let Some(chunk) = chunks.message().await? {
            let from = NodeId::new(&chunk.from_node).map_err(invalid)?;
            let this = (from.clone(), chunk.epoch);
            if checked.as_ref() != Some(&this) {
                self.check_handoff(&caller, &from, chunk.epoch).await?;
                checked = Some(this);
            }
            for state in chunk.channels {
                let snapshot = handoff_wire::snapshot_from_proto(state).map_err(invalid)?;
                self.inner.shards.absorb(snapshot);
                self.inner.metrics.handoff_channels_received.inc();
                received += 1;
            }
            for moved in chunk.members {
                let channel = ChannelId::new(&moved.channel).map_err(invalid)?;
                self.inner
                    .shards
                    .adopt_members(&channel, &reports(moved.members));
            }
            for floor in &chunk.slot_floors {
                let (slot, ts) = handoff_wire::floor_from_proto(floor).map_err(invalid)?;
                self.inner.shards.absorb_floor(slot, ts);
            }
            if chunk.done {
                self.inner.ownership.received(&from, chunk.epoch);
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
        // Requests are begun one at a time, in order (a caller's events to one channel keep
        // their order), and answered in order as their followers acknowledge them: up to
        // PUBLISH_STREAM_QUEUE wait at once, so replication's round trip does not cap a stream.
        self.inner.tracker.spawn(async move {
            let mut waiting = FuturesOrdered::new();
            let mut open = true;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    // Cancel-safe: message() loses nothing when another branch wins.
                    next = incoming.message(), if open && waiting.len() < PUBLISH_STREAM_QUEUE => {
                        let Ok(Some(request)) = next else {
                            open = false;
                            if waiting.is_empty() {
                                break;
                            }
                            continue;
                        };
                        let started = Instant::now();
                        let span = tracing::debug_span!(
                            "channel.Publish",
                            node = %this.inner.ownership.node()
                        );
                        mesh_telemetry::propagation::set_parent_from_map(
                            &span,
                            &request.trace_context,
                        );
                        let begun = match request.publish {
                            Some(mut publish) => {
                                if publish.idempotency_key.is_empty() {
                                    publish.idempotency_key = request.idempotency_key;
                                }
                                this.begin_publish(publish).instrument(span).await
                            }
                            None => Err(invalid("publish is required")),
                        };
                        let id = request.id;
                        // Requests already received are begun without waiting on anything:
                        // the budget makes a long run of them yield to the node's other tasks.
                        tokio::task::consume_budget().await;
                        waiting.push_back(async move {
                            let result = match begun {
                                Ok(begun) => finish(begun).await,
                                Err(refusal) => Err(refusal),
                            };
                            (id, started, result)
                        });
                    }
                    Some((id, started, result)) = waiting.next(), if !waiting.is_empty() => {
                        let reply = match result {
                            Ok(reply) => {
                                this.inner
                                    .metrics
                                    .publish_seconds
                                    .observe(started.elapsed().as_secs_f64());
                                pb::PublishStreamReply {
                                    id,
                                    ts: reply.ts,
                                    code: 0,
                                    message: String::new(),
                                }
                            }
                            Err(status) => pb::PublishStreamReply {
                                id,
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
                        if sent.is_err() || (!open && waiting.is_empty()) {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReplicateStream = replicate::AckStream;

    async fn replicate(
        &self,
        request: Request<Streaming<pb::ReplicateBatch>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let caller = authz::caller(&request);
        Ok(Response::new(
            self.serve_replicate(caller, request.into_inner()),
        ))
    }

    type CatchUpStream = replicate::ChunkStream;

    async fn catch_up(
        &self,
        request: Request<pb::CatchUpRequest>,
    ) -> Result<Response<Self::CatchUpStream>, Status> {
        let caller = authz::caller(&request);
        self.serve_catch_up(caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn channel_info(
        &self,
        request: Request<pb::ChannelInfoRequest>,
    ) -> Result<Response<pb::ChannelInfoResponse>, Status> {
        let req = request.into_inner();
        let channel = ChannelId::new(&req.channel).map_err(invalid)?;
        self.inner
            .ownership
            .check(slot_of(&channel), req.epoch)
            .await
            .map_err(status)?;
        let info = self.inner.shards.channel_info(&channel);
        Ok(Response::new(pb::ChannelInfoResponse {
            last_ts: ts_str(info.head),
            history_length: info.history_length as u64,
            oldest_ts: ts_str(info.oldest),
            complete_after_ts: ts_str(info.complete_after),
            subscribers: info.live.subscribers,
            members: info.live.members,
            gateways: info
                .live
                .gateways
                .into_iter()
                .map(|(gateway, region, subscribers)| pb::GatewaySubscribers {
                    gateway,
                    region,
                    subscribers,
                })
                .collect(),
        }))
    }

    async fn list_channels(
        &self,
        request: Request<pb::ListChannelsRequest>,
    ) -> Result<Response<pb::ListChannelsResponse>, Status> {
        let req = request.into_inner();
        let ownership = &self.inner.ownership;
        let ring = ownership.ring().current();
        if req.epoch > ring.epoch() {
            return Err(status(ServeError::RingBehind {
                known: ring.epoch(),
                asked: req.epoch,
            }));
        }
        let limit = match req.limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        } as usize;
        let node = ownership.node();
        let team = Some(req.team.as_str()).filter(|t| !t.is_empty());
        let (channels, has_more) = self.inner.shards.list_channels(
            |slot| ring.owns(node, slot),
            |channel| channel.as_str().starts_with(&req.prefix),
            team,
            &req.after,
            limit,
        );
        Ok(Response::new(pb::ListChannelsResponse {
            channels: channels
                .into_iter()
                .map(|(channel, live)| pb::ChannelSummary {
                    channel: channel.to_string(),
                    subscribers: live.subscribers,
                    members: live.members,
                })
                .collect(),
            has_more,
        }))
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
        let (mut stream, rx) =
            self.inner
                .shards
                .open_stream(&gateway, self.inner.gateway_queue, &self.inner.cancel);
        let end = stream.end().clone();
        tracing::info!(%gateway, stream = stream.id(), "gateway subscription stream opened");
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            loop {
                // Cancel-safe: `message()` loses nothing when the other branch wins, and the
                // stream is dropped right after.
                let next = tokio::select! {
                    _ = stream.end().cancelled() => break,
                    next = inbound.message() => next,
                };
                match next {
                    Ok(Some(pb::SubscribeRequest {
                        command: Some(command),
                    })) => {
                        this.handle_command(command, &mut stream).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%gateway, error = %e, "gateway stream ended with an error");
                        break;
                    }
                }
            }
            let id = stream.id();
            this.inner.shards.close_stream(stream);
            tracing::info!(%gateway, stream = id, "gateway subscription stream closed");
        });
        let events = ReceiverStream::new(rx).map(Ok);
        let ended = futures::stream::once(async move { Err(status(end.ended().await)) });
        let stream = futures::stream::select(events, ended);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn every_refusal_has_its_code_and_message() {
        let node = NodeId::new("cs-2").unwrap();
        let cases = [
            (
                ServeError::NoLease("lease revoked: this node was declared down"),
                Code::Unavailable,
                "no_lease: lease revoked: this node was declared down",
            ),
            (
                ServeError::Warming {
                    slot: 12,
                    from: NodeId::new("cs-1").unwrap(),
                },
                Code::Unavailable,
                "slot_warming: waiting for slot 12's state from cs-1",
            ),
            (
                ServeError::RingBehind { known: 3, asked: 4 },
                Code::Unavailable,
                "ring_behind: this channel server knows epoch 3, caller routed by 4",
            ),
            (
                ServeError::WrongOwner {
                    slot: 12,
                    owner: "cs-1".into(),
                    epoch: 4,
                    node,
                },
                Code::FailedPrecondition,
                "wrong_owner: slot 12 belongs to \"cs-1\" in epoch 4, not to cs-2",
            ),
            (
                ServeError::FellBehind,
                Code::ResourceExhausted,
                "gateway fell behind its subscription queue; resubscribe",
            ),
            (
                ServeError::FellBehindOnReply,
                Code::ResourceExhausted,
                "gateway fell behind its subscription queue",
            ),
            (
                ServeError::FellBehindOnMove,
                Code::ResourceExhausted,
                "gateway fell behind",
            ),
            (
                ServeError::StreamClosed,
                Code::Cancelled,
                "subscription stream closed",
            ),
            (
                ServeError::ShuttingDown,
                Code::Unavailable,
                "channel server shutting down",
            ),
        ];
        for (error, code, message) in cases {
            let status = status(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
