//! The gateway's hub: which local connections want which channel, and the one upstream
//! subscription per channel that serves them all.
//!
//! A channel is subscribed upstream once, on the channel server that owns it in the newest
//! ring, however many local connections want it; it is unsubscribed when the last one leaves.
//! Each upstream event is rendered to RTM JSON once and queued to every local subscriber.
//! The state lock is never held across an await.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use channel_client::ChannelRouter;
use mesh_core::{ChannelEvent, ChannelId, EventBody, NodeId, Ring, Ts, UserId};
use mesh_proto::channel as pb;
use mesh_proto::channel::subscribe_request::Command;
use ring_client::RingWatcher;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::GatewayMetrics;
use crate::outbox::{self, Outbox};
use crate::upstream::{self, Upstream};

/// A connection's id within its gateway.
pub type ConnId = u64;

/// The most history events one catch-up reads.
const CATCH_UP_LIMIT: u32 = 1000;
/// Pause before resubscribing after a refusal or a lost upstream.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(100);
/// Commands queued per upstream stream; a full queue restarts that stream.
const UPSTREAM_COMMAND_QUEUE: usize = 65_536;

/// A channel event rendered to RTM JSON, once per gateway, shared by every local subscriber.
#[derive(Debug)]
pub struct Rendered {
    pub channel: ChannelId,
    /// The channel's ts of the event; `None` for transient events.
    pub ts: Option<Ts>,
    pub frame: Utf8Bytes,
    /// When this gateway received it from its channel server (live events only): the start
    /// of the gateway -> socket stage.
    pub received: Option<Instant>,
}

/// What the hub queues to a connection. Two words: a fan-out writes one of these into every
/// subscriber's queue per event, so the rare kinds are boxed to keep the common one small.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A channel event.
    Event(Arc<Rendered>),
    /// A frame for this connection only, written as is.
    Frame(Box<Utf8Bytes>),
    /// A change to what the connection receives.
    Control(Box<Control>),
}

/// A change to what a connection receives.
#[derive(Debug, Clone)]
pub enum Control {
    /// The connection's user joined `channel`: start receiving it.
    Joined {
        channel: ChannelId,
        since: Option<Ts>,
    },
    /// The connection's user left `channel`.
    Left { channel: ChannelId },
    /// The history of a joined channel since the join, ready to write (see `connection`).
    CatchUp {
        channel: ChannelId,
        events: Vec<Arc<Rendered>>,
    },
    /// What a reconnecting client missed on one channel (see `resume`).
    Resume(crate::resume::Resumed),
}

impl Outbound {
    /// A frame for one connection.
    pub fn frame(frame: impl Into<Utf8Bytes>) -> Self {
        Outbound::Frame(Box::new(frame.into()))
    }

    /// A change to what one connection receives.
    pub fn control(control: Control) -> Self {
        Outbound::Control(Box::new(control))
    }

    /// The bytes this item holds for its connection alone, counted against the connection's
    /// outgoing budget. A shared event counts its frame: a slow reader keeps it alive.
    pub fn queued_bytes(&self) -> usize {
        match self {
            Outbound::Event(event) => event.frame.len(),
            Outbound::Frame(frame) => frame.len(),
            Outbound::Control(_) => 0,
        }
    }
}

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its outgoing queue was full: it does not read fast enough.
    SlowConsumer,
    /// The region drains: goodbye, with the connection's cursors kept for its reconnect.
    Drain,
    /// Its token was revoked (by `jti`): do not reconnect with it.
    Revoked,
}

/// How the hub reaches one connection.
#[derive(Debug, Clone)]
pub struct ConnSink {
    pub id: ConnId,
    pub user: UserId,
    outbox: Arc<Outbox>,
    closer: Arc<Closer>,
}

/// Closes a connection from outside its task, with a reason.
#[derive(Debug, Default)]
pub struct Closer {
    pub token: CancellationToken,
    pub reason: OnceLock<CloseReason>,
}

impl Closer {
    /// Closes the connection for `reason`, unless it is already closing; true if this call
    /// set the reason.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }
}

impl ConnSink {
    /// A sink queueing into `outbox`; `closer` ends the connection.
    pub fn new(id: ConnId, user: UserId, outbox: Arc<Outbox>, closer: Arc<Closer>) -> Self {
        ConnSink {
            id,
            user,
            outbox,
            closer,
        }
    }

    /// Queues without waiting; a full queue (in items or bytes) closes the connection as a
    /// slow consumer: the fan-out never waits for one client.
    pub fn push(&self, item: Outbound) -> bool {
        match self.outbox.push(item) {
            Ok(()) => true,
            Err(outbox::Refused::Full) => {
                self.slow_consumer();
                false
            }
            Err(outbox::Refused::Closed) => false,
        }
    }

    fn slow_consumer(&self) {
        if self.closer.close(CloseReason::SlowConsumer) {
            tracing::info!(conn = self.id, user = %self.user, "closing slow consumer");
        }
    }
}

/// An item for a channel's subscribers: all but `skip`, the connection it came from.
#[derive(Debug)]
struct Ready {
    item: Outbound,
    skip: Option<ConnId>,
}

/// A live event waiting for a catch-up: the event, its rendered frame, and when it arrived.
type Buffered = (ChannelEvent, Option<Utf8Bytes>, Option<Instant>);

/// Local state of one channel.
#[derive(Debug, Default)]
struct LocalChannel {
    conns: HashMap<ConnId, ConnSink>,
    /// The channel server the subscription was sent to.
    upstream: Option<NodeId>,
    /// That channel server confirmed it: every later event of the channel reaches us.
    active: bool,
    /// Connections waiting for `active`.
    waiters: Vec<oneshot::Sender<()>>,
    /// The newest ts delivered.
    last_ts: Option<Ts>,
    /// Set while the channel catches up from history after a resubscription: live events
    /// wait here, so clients get the missed ones first, in ts order, without duplicates.
    catching_up: Option<Vec<Buffered>>,
}

#[derive(Debug, Default)]
struct State {
    channels: HashMap<ChannelId, LocalChannel>,
    upstreams: HashMap<NodeId, Upstream>,
}

/// The hub; cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    gateway: String,
    ring: RingWatcher,
    /// Reads history to catch up a resubscribed channel.
    router: ChannelRouter,
    state: Mutex<State>,
    reconcile_scheduled: AtomicBool,
    metrics: Arc<GatewayMetrics>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Hub {
    /// A hub for gateway `gateway` following `ring`, counting into `metrics`.
    pub fn new(
        gateway: String,
        ring: RingWatcher,
        router: ChannelRouter,
        metrics: Arc<GatewayMetrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let hub = Hub {
            inner: Arc::new(Inner {
                gateway,
                ring,
                router,
                state: Mutex::new(State::default()),
                reconcile_scheduled: AtomicBool::new(false),
                metrics,
                tracker,
                cancel,
            }),
        };
        hub.inner.tracker.spawn(hub.clone().follow_ring());
        hub
    }

    /// This gateway's id.
    pub fn gateway(&self) -> &str {
        &self.inner.gateway
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &GatewayMetrics {
        &self.inner.metrics
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `sink` to each channel; returns a receiver per channel whose upstream subscription
    /// is not yet confirmed (each fires once it is).
    pub fn join(&self, sink: &ConnSink, channels: &[ChannelId]) -> Vec<oneshot::Receiver<()>> {
        let ring = self.inner.ring.current();
        let mut state = self.state();
        let mut waiting = Vec::new();
        let mut to_subscribe: Vec<ChannelId> = Vec::new();
        for channel in channels {
            let local = state.channels.entry(channel.clone()).or_default();
            local.conns.insert(sink.id, sink.clone());
            if local.active {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            local.waiters.push(tx);
            waiting.push(rx);
            if local.upstream.is_none() {
                to_subscribe.push(channel.clone());
            }
        }
        self.subscribe_locked(&mut state, &ring, to_subscribe);
        waiting
    }

    /// Removes connection `conn` from each channel, unsubscribing channels nobody wants.
    pub fn leave(&self, conn: ConnId, channels: &[ChannelId]) {
        let mut state = self.state();
        let mut unsubscribe: HashMap<NodeId, Vec<String>> = HashMap::new();
        for channel in channels {
            let Some(local) = state.channels.get_mut(channel) else {
                continue;
            };
            local.conns.remove(&conn);
            if local.conns.is_empty() {
                if let Some(node) = local.upstream.take() {
                    unsubscribe
                        .entry(node)
                        .or_default()
                        .push(channel.to_string());
                }
                state.channels.remove(channel);
            }
        }
        for (node, channels) in unsubscribe {
            self.send_locked(
                &mut state,
                &node,
                Command::Unsubscribe(pb::Unsubscribe { channels }),
            );
        }
    }

    /// Sends subscribes for `channels` (not yet sent anywhere) to their owners in `ring`.
    fn subscribe_locked(&self, state: &mut State, ring: &Ring, channels: Vec<ChannelId>) {
        let mut by_node: HashMap<NodeId, (String, Vec<String>)> = HashMap::new();
        for channel in channels {
            let Some(owner) = ring.owner_of(&channel) else {
                continue; // No ring yet: the next ring reconciles it.
            };
            if let Some(local) = state.channels.get_mut(&channel) {
                local.upstream = Some(owner.id.clone());
                local.active = false;
                local.catching_up = None;
            }
            by_node
                .entry(owner.id.clone())
                .or_insert_with(|| (owner.addr.clone(), Vec::new()))
                .1
                .push(channel.to_string());
        }
        for (node, (addr, channels)) in by_node {
            if !state.upstreams.contains_key(&node) {
                let upstream = upstream::spawn(
                    self.clone(),
                    node.clone(),
                    addr,
                    UPSTREAM_COMMAND_QUEUE,
                    &self.inner.tracker,
                    self.inner.cancel.child_token(),
                );
                state.upstreams.insert(node.clone(), upstream);
            }
            let command = Command::Subscribe(pb::Subscribe {
                epoch: ring.epoch(),
                channels,
            });
            self.send_locked(state, &node, command);
        }
    }

    /// Queues a command on `node`'s stream; a full or closed queue restarts that stream.
    fn send_locked(&self, state: &mut State, node: &NodeId, command: Command) {
        let Some(upstream) = state.upstreams.get(node) else {
            return;
        };
        let request = pb::SubscribeRequest {
            command: Some(command),
        };
        if upstream.commands.try_send(request).is_err() {
            tracing::warn!(%node, "upstream command queue full or closed; restarting the stream");
            self.upstream_lost_locked(state, node);
        }
    }

    /// Rendered once each and queued to every local subscriber, under one lock of the hub:
    /// a connection gets each channel's events of the batch with one lock of its queue and
    /// one wake-up. `received`: when the batch came from the channel server.
    pub fn deliver_batch(&self, from: &NodeId, batch: Vec<ChannelEvent>, received: Instant) {
        let rendered: Vec<(ChannelEvent, Option<Utf8Bytes>)> = batch
            .into_iter()
            .map(|event| {
                let frame = mesh_rtm::render(&event).map(Utf8Bytes::from);
                (event, frame)
            })
            .collect();
        let mut state = self.state();
        // Per channel, in the order they came; `index` finds a channel's group.
        let mut groups: Vec<(ChannelId, Vec<Ready>)> = Vec::new();
        let mut index: HashMap<ChannelId, usize, foldhash::fast::RandomState> = HashMap::default();
        for (event, frame) in rendered {
            let Some(local) = state.channels.get_mut(&event.channel) else {
                continue;
            };
            if local.upstream.as_ref() != Some(from) {
                continue; // A stale stream of a channel that moved.
            }
            if let Some(buffer) = &mut local.catching_up {
                buffer.push((event, frame, Some(received)));
                continue;
            }
            let Some(ready) = self.prepare(local, &event, frame, Some(received)) else {
                continue;
            };
            match index.get(&event.channel) {
                Some(&i) => groups[i].1.push(ready),
                None => {
                    index.insert(event.channel.clone(), groups.len());
                    groups.push((event.channel, vec![ready]));
                }
            }
        }
        for (channel, ready) in groups {
            if let Some(local) = state.channels.get(&channel) {
                self.queue_all(local, &ready);
            }
        }
    }

    /// Queues one event to every local subscriber of its channel, once per ts.
    fn fan_out(
        &self,
        local: &mut LocalChannel,
        event: &ChannelEvent,
        frame: Option<Utf8Bytes>,
        received: Option<Instant>,
    ) {
        if let Some(ready) = self.prepare(local, event, frame, received) {
            self.queue_all(local, std::slice::from_ref(&ready));
        }
    }

    /// What `event` becomes for the channel's subscribers; `None` when it was delivered
    /// already (catch-up and live overlap) or has nothing to show.
    fn prepare(
        &self,
        local: &mut LocalChannel,
        event: &ChannelEvent,
        frame: Option<Utf8Bytes>,
        received: Option<Instant>,
    ) -> Option<Ready> {
        if let Some(ts) = event.ts {
            if local.last_ts.is_some_and(|last| ts <= last) {
                return None;
            }
            local.last_ts = Some(ts);
        }
        let skip = event
            .origin
            .as_ref()
            .filter(|o| o.gateway == self.inner.gateway)
            .map(|o| o.conn);
        let item = match (&event.body, frame) {
            (EventBody::ChannelJoined { channel, since }, _) => {
                Outbound::control(Control::Joined {
                    channel: channel.clone(),
                    since: *since,
                })
            }
            (EventBody::ChannelLeft { channel }, _) => Outbound::control(Control::Left {
                channel: channel.clone(),
            }),
            (_, Some(frame)) => Outbound::Event(Arc::new(Rendered {
                channel: event.channel.clone(),
                ts: event.ts,
                frame,
                received,
            })),
            (_, None) => return None,
        };
        Some(Ready { item, skip })
    }

    /// Queues `ready`, in order, to every subscriber in `local` but the one each came from.
    fn queue_all(&self, local: &LocalChannel, ready: &[Ready]) {
        let all_events = ready.iter().all(|r| matches!(r.item, Outbound::Event(_)));
        let mut delivered = 0;
        for (id, sink) in &local.conns {
            let items = ready.iter().filter(|r| r.skip != Some(*id));
            let (queued, result) = sink.outbox.push_all(items.clone().map(|r| &r.item));
            delivered += match all_events {
                true => queued,
                false => items
                    .take(queued as usize)
                    .filter(|r| matches!(r.item, Outbound::Event(_)))
                    .count() as u64,
            };
            if result == Err(outbox::Refused::Full) {
                sink.slow_consumer();
                self.inner.metrics.queue_drops.inc();
            }
        }
        self.inner.metrics.delivered.inc_by(delivered);
    }

    /// `node` confirmed `channel`, whose newest ts there is `head`. If that is past what this
    /// gateway delivered (events went to the new owner while the channel moved), catch up
    /// from its history first.
    pub fn subscribed(&self, node: &NodeId, channel: &ChannelId, head: Option<Ts>) {
        let mut state = self.state();
        let Some(local) = state.channels.get_mut(channel) else {
            return;
        };
        if local.upstream.as_ref() != Some(node) {
            return;
        }
        match (local.last_ts, head) {
            (Some(last), Some(head)) if head > last => {
                local.catching_up = Some(Vec::new());
                let (hub, node, channel) = (self.clone(), node.clone(), channel.clone());
                self.inner.tracker.spawn(async move {
                    let history = hub
                        .inner
                        .router
                        .history(&channel, Some(last), CATCH_UP_LIMIT)
                        .await;
                    hub.caught_up(&node, &channel, history);
                });
            }
            _ => Self::activate(local),
        }
    }

    /// Delivers a catch-up's history, then the live events that waited for it.
    fn caught_up(
        &self,
        node: &NodeId,
        channel: &ChannelId,
        history: Result<channel_client::router::History, channel_client::RouteError>,
    ) {
        let mut state = self.state();
        let Some(local) = state.channels.get_mut(channel) else {
            return;
        };
        if local.upstream.as_ref() != Some(node) {
            return; // Moved again meanwhile: the next subscription catches up.
        }
        let waiting = local.catching_up.take().unwrap_or_default();
        match history {
            Ok(history) => {
                if history.has_more {
                    tracing::warn!(%channel, "more missed events than one catch-up reads");
                }
                tracing::info!(%channel, events = history.events.len(), "caught up after resubscribing");
                self.inner
                    .metrics
                    .catch_ups
                    .with_label_values(&["ok"])
                    .inc();
                for event in history.events {
                    let frame = mesh_rtm::render(&event).map(Utf8Bytes::from);
                    self.fan_out(local, &event, frame, None);
                }
            }
            Err(e) => {
                self.inner
                    .metrics
                    .catch_ups
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(%channel, error = %e, "catching up failed; delivering live events only")
            }
        }
        for (event, frame, received) in waiting {
            self.fan_out(local, &event, frame, received);
        }
        Self::activate(local);
    }

    fn activate(local: &mut LocalChannel) {
        local.active = true;
        for waiter in local.waiters.drain(..) {
            let _ = waiter.send(());
        }
    }

    /// `node` refused `channel` (it does not own it in its epoch, or it moved away).
    pub fn refused(&self, node: &NodeId, channel: &str, reason: &str) {
        let Ok(channel) = ChannelId::new(channel) else {
            return;
        };
        let mut state = self.state();
        if let Some(local) = state.channels.get_mut(&channel)
            && local.upstream.as_ref() == Some(node)
        {
            tracing::debug!(%node, %channel, reason, "subscription refused; will resubscribe");
            local.upstream = None;
            local.active = false;
            drop(state);
            self.schedule_reconcile();
        }
    }

    /// `node`'s stream ended: its channels resubscribe after a pause.
    pub fn upstream_lost(&self, node: &NodeId) {
        let mut state = self.state();
        self.upstream_lost_locked(&mut state, node);
        drop(state);
        self.schedule_reconcile();
    }

    fn upstream_lost_locked(&self, state: &mut State, node: &NodeId) {
        if let Some(upstream) = state.upstreams.remove(node) {
            upstream.cancel.cancel();
        }
        for local in state.channels.values_mut() {
            if local.upstream.as_ref() == Some(node) {
                local.upstream = None;
                local.active = false;
            }
        }
    }

    fn schedule_reconcile(&self) {
        if self.inner.reconcile_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let hub = self.clone();
        self.inner.tracker.spawn(async move {
            tokio::select! {
                _ = hub.inner.cancel.cancelled() => {}
                _ = tokio::time::sleep(RESUBSCRIBE_PAUSE) => {
                    hub.inner.reconcile_scheduled.store(false, Ordering::Release);
                    hub.reconcile(&hub.inner.ring.current());
                }
            }
        });
    }

    /// Points every channel's subscription at its owner in `ring`.
    pub fn reconcile(&self, ring: &Ring) {
        let mut state = self.state();
        let mut to_subscribe = Vec::new();
        let mut unsubscribe: HashMap<NodeId, Vec<String>> = HashMap::new();
        for (channel, local) in state.channels.iter_mut() {
            let owner = ring.owner_of(channel).map(|n| &n.id);
            if local.upstream.as_ref() == owner && owner.is_some() {
                continue;
            }
            if let Some(old) = local.upstream.take() {
                unsubscribe
                    .entry(old)
                    .or_default()
                    .push(channel.to_string());
            }
            local.active = false;
            to_subscribe.push(channel.clone());
        }
        for (node, channels) in unsubscribe {
            self.send_locked(
                &mut state,
                &node,
                Command::Unsubscribe(pb::Unsubscribe { channels }),
            );
        }
        // Streams to nodes that left the ring and serve nothing are closed.
        let live: HashSet<&NodeId> = ring.nodes().iter().map(|n| &n.id).collect();
        let gone: Vec<NodeId> = state
            .upstreams
            .keys()
            .filter(|n| !live.contains(n))
            .cloned()
            .collect();
        for node in gone {
            if let Some(upstream) = state.upstreams.remove(&node) {
                upstream.cancel.cancel();
            }
        }
        if !to_subscribe.is_empty() {
            tracing::info!(
                epoch = ring.epoch(),
                channels = to_subscribe.len(),
                "resubscribing moved channels"
            );
        }
        self.subscribe_locked(&mut state, ring, to_subscribe);
    }

    async fn follow_ring(self) {
        let (ring, cancel) = (self.inner.ring.clone(), self.inner.cancel.clone());
        ring.on_each_change(cancel, |ring| self.reconcile(&ring))
            .await;
    }

    /// Channels currently wanted by at least one local connection.
    /// The newest ts this gateway delivered on `channel` (a new connection's starting cursor).
    pub fn last_ts(&self, channel: &ChannelId) -> Option<Ts> {
        self.state().channels.get(channel).and_then(|c| c.last_ts)
    }

    pub fn channel_count(&self) -> usize {
        self.state().channels.len()
    }

    /// Upstream streams open.
    pub fn upstream_count(&self) -> usize {
        self.state().upstreams.len()
    }
}
