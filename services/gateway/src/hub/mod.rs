//! The gateway's hub: which local connections want which channel, and the one upstream
//! subscription per channel that serves them all.
//!
//! A channel is subscribed upstream once, on the channel server that owns it in the newest
//! ring, however many local connections want it; it is unsubscribed when the last one leaves.
//! Each upstream event is rendered to RTM JSON once and queued to every local subscriber.
//! The state lock is never held across an await. The bookkeeping is in [`state`]; this module
//! does the sending, the fan-out and the catch-ups.

mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use channel_client::ChannelRouter;
use mesh_core::{ChannelEvent, ChannelId, EventBody, NodeId, Ring, Ts};
use mesh_proto::channel as pb;
use mesh_proto::channel::subscribe_request::Command;
use ring_client::RingWatcher;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::history;
use crate::metrics::GatewayMetrics;
use crate::outbox::{self, ConnSink};
use crate::upstream::{self, Downstream};
use crate::vocab::{ConnId, Control, Outbound, Rendered};
use state::{LocalChannel, Reported, State, Unsubscribes};

/// Pause before resubscribing after a refusal or a lost upstream.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(100);
/// How long member changes gather before they go upstream: a burst of connects and
/// disconnects is one report per channel and user.
const MEMBERS_FLUSH: Duration = Duration::from_millis(50);
/// Commands queued per upstream stream; a full queue restarts that stream.
const UPSTREAM_COMMAND_QUEUE: usize = 65_536;

/// An item for a channel's subscribers: all but `skip`, the connection it came from.
#[derive(Debug)]
struct Ready {
    item: Outbound,
    skip: Option<ConnId>,
}

/// The hub; cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    gateway: String,
    /// This gateway's region, told to channel servers with its subscriptions.
    region: String,
    ring: RingWatcher,
    /// Reads history to catch up a resubscribed channel.
    router: ChannelRouter,
    state: Mutex<State>,
    reconcile_scheduled: AtomicBool,
    /// A report of member changes is due.
    flush_scheduled: AtomicBool,
    metrics: Arc<GatewayMetrics>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Hub {
    /// A hub for gateway `gateway` of `region` following `ring`, counting into `metrics`.
    pub fn new(
        gateway: String,
        region: String,
        ring: RingWatcher,
        router: ChannelRouter,
        metrics: Arc<GatewayMetrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let hub = Hub {
            inner: Arc::new(Inner {
                gateway,
                region,
                ring,
                router,
                state: Mutex::new(State::default()),
                reconcile_scheduled: AtomicBool::new(false),
                flush_scheduled: AtomicBool::new(false),
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
        let (waiting, to_subscribe) = state.join(sink, channels);
        self.subscribe_locked(&mut state, &ring, to_subscribe);
        let changed = !state.dirty.is_empty();
        drop(state);
        if changed {
            self.schedule_flush();
        }
        waiting
    }

    /// Removes connection `conn` from each channel, unsubscribing channels nobody wants.
    pub fn leave(&self, conn: ConnId, channels: &[ChannelId]) {
        let mut state = self.state();
        let unsubscribe = state.leave(conn, channels);
        self.unsubscribe_locked(&mut state, unsubscribe);
        let changed = !state.dirty.is_empty();
        drop(state);
        if changed {
            self.schedule_flush();
        }
    }

    /// Reports member changes upstream a little later, all of them at once.
    fn schedule_flush(&self) {
        if self.inner.flush_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let hub = self.clone();
        self.inner.tracker.spawn(async move {
            tokio::select! {
                _ = hub.inner.cancel.cancelled() => {}
                _ = tokio::time::sleep(MEMBERS_FLUSH) => {
                    hub.inner.flush_scheduled.store(false, Ordering::Release);
                    hub.flush_members();
                }
            }
        });
    }

    /// Sends every channel's member changes to the channel server it is subscribed on.
    fn flush_members(&self) {
        let mut state = self.state();
        for (node, changes) in state.take_changes() {
            let channels = changes
                .into_iter()
                .map(|(channel, reported)| channel_members(&channel, reported))
                .collect();
            self.send_locked(
                &mut state,
                &node,
                Command::Members(pb::Members { channels }),
            );
        }
    }

    /// Sends subscribes for `channels` (not yet sent anywhere) to their owners in `ring`.
    fn subscribe_locked(&self, state: &mut State, ring: &Ring, channels: Vec<ChannelId>) {
        for (node, (addr, channels)) in state.assign(ring, channels) {
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
            // What this gateway delivered on each: the owner's clock goes past it.
            let last_ts = channels
                .iter()
                .filter_map(|name| {
                    let channel = ChannelId::new(name).ok()?;
                    let last = state.channels.get(&channel)?.last_ts?;
                    Some((name.clone(), last.to_string()))
                })
                .collect();
            // Who is subscribed here, channel by channel: the owner accounts for it.
            let mut resumption = false;
            let mut members = Vec::new();
            for name in &channels {
                let Ok(channel) = ChannelId::new(name) else {
                    continue;
                };
                let set = state.full_set(&channel);
                resumption |= set.iter().any(|m| m.announced);
                if !set.is_empty() {
                    members.push(channel_members(&channel, set));
                }
            }
            let command = Command::Subscribe(pb::Subscribe {
                epoch: ring.epoch(),
                channels,
                last_ts,
                region: self.inner.region.clone(),
                members,
                resumption,
            });
            self.send_locked(state, &node, command);
        }
    }

    /// Sends `unsubscribe`, per channel server.
    fn unsubscribe_locked(&self, state: &mut State, unsubscribe: Unsubscribes) {
        for (node, channels) in unsubscribe {
            self.send_locked(
                state,
                &node,
                Command::Unsubscribe(pb::Unsubscribe { channels }),
            );
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
            state.lose(node);
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
            // Directives go to every subscriber of the channel they came on, each connection
            // honouring only those on its own user's channel (`Delivery::on_control`).
            (EventBody::ChannelJoined { channel, since }, _) => {
                Outbound::control(Control::Joined {
                    channel: channel.clone(),
                    since: *since,
                    on: event.channel.clone(),
                })
            }
            (EventBody::ChannelLeft { channel }, _) => Outbound::control(Control::Left {
                channel: channel.clone(),
                on: event.channel.clone(),
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

    /// `node` confirmed `channel`, whose newest ts there is `head`, its history complete
    /// only after `complete_after`. If that floor is past what this gateway delivered, its
    /// connections are told `history_gap`. If the head is past it (events went to the new
    /// owner while the channel moved), catch up from its history first.
    pub fn subscribed(
        &self,
        node: &NodeId,
        channel: &ChannelId,
        head: Option<Ts>,
        complete_after: Option<Ts>,
    ) {
        let mut state = self.state();
        let Some(local) = state.channels.get_mut(channel) else {
            return;
        };
        if local.upstream.as_ref() != Some(node) {
            return;
        }
        local.announced();
        if let Some(floor) = complete_after {
            self.tell_gap(local, channel, floor);
        }
        if let Some(last) = local.confirmed(head) {
            let (hub, node, channel) = (self.clone(), node.clone(), channel.clone());
            self.inner.tracker.spawn(async move {
                let history = history::read(&hub.inner.router, &channel, Some(last)).await;
                hub.caught_up(&node, &channel, history);
            });
        }
    }

    /// `node` says `channel`'s history floor jumped to `floor`: connections that had less
    /// are told `history_gap`.
    pub fn gap(&self, node: &NodeId, channel: &ChannelId, floor: Ts) {
        let mut state = self.state();
        let Some(local) = state.channels.get_mut(channel) else {
            return;
        };
        if local.upstream.as_ref() == Some(node) {
            self.tell_gap(local, channel, floor);
        }
    }

    /// If this gateway delivered `channel` only up to before `floor` (events at or before it
    /// may be gone where they were kept), tells every connection of the channel whose cursor
    /// is below it `history_gap`.
    fn tell_gap(&self, local: &LocalChannel, channel: &ChannelId, floor: Ts) {
        let Some(delivered) = local.last_ts.filter(|last| *last < floor) else {
            return;
        };
        tracing::warn!(%channel, %delivered, %floor, "history floor jumped past what this gateway delivered; telling its connections history_gap");
        let gap = Outbound::control(Control::Gap {
            channel: channel.clone(),
            floor,
            delivered,
        });
        for sink in local.conns.values() {
            if sink.outbox.push_all(std::iter::once(&gap)).1 == Err(outbox::Refused::Full) {
                sink.slow_consumer();
                self.inner.metrics.queue_drops.inc();
            }
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
        // Not read whole: the connections hear they may have missed something.
        let unread = Ts::from_micros(u64::MAX);
        let missed = match history {
            Ok(history) => {
                if history.has_more {
                    tracing::warn!(%channel, "more missed events than one catch-up reads");
                    self.tell_gap(local, channel, unread);
                }
                tracing::info!(%channel, events = history.events.len(), "caught up after resubscribing");
                self.inner
                    .metrics
                    .catch_ups
                    .with_label_values(&["ok"])
                    .inc();
                history.events
            }
            Err(e) => {
                self.inner
                    .metrics
                    .catch_ups
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(%channel, error = %e, "catching up failed; delivering live events only");
                self.tell_gap(local, channel, unread);
                Vec::new()
            }
        };
        let missed = missed.into_iter().map(|event| {
            let frame = mesh_rtm::render(&event).map(Utf8Bytes::from);
            (event, frame, None)
        });
        for (event, frame, received) in
            history::merge(local.last_ts, missed, waiting, |(event, ..)| event.ts)
        {
            self.fan_out(local, &event, frame, received);
        }
        local.activate();
    }

    /// `node` refused `channel` (it does not own it in its epoch, or it moved away).
    pub fn refused(&self, node: &NodeId, channel: &str, reason: &str) {
        let Ok(channel) = ChannelId::new(channel) else {
            return;
        };
        let mut state = self.state();
        if let Some(local) = state.channels.get_mut(&channel)
            && local.detach(node)
        {
            tracing::debug!(%node, %channel, reason, "subscription refused; will resubscribe");
            drop(state);
            self.schedule_reconcile();
        }
    }

    /// `node`'s stream ended: its channels resubscribe after a pause.
    pub fn upstream_lost(&self, node: &NodeId) {
        self.state().lose(node);
        self.schedule_reconcile();
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
        let (to_subscribe, unsubscribe) = state.moved(ring);
        self.unsubscribe_locked(&mut state, unsubscribe);
        // Streams to nodes that left the ring and serve nothing are closed.
        state.close_departed(ring);
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

    /// The newest ts this gateway delivered on `channel` (a new connection's starting cursor).
    pub fn last_ts(&self, channel: &ChannelId) -> Option<Ts> {
        self.state().channels.get(channel).and_then(|c| c.last_ts)
    }

    /// Channels currently wanted by at least one local connection.
    pub fn channel_count(&self) -> usize {
        self.state().channels.len()
    }

    /// Upstream streams open.
    pub fn upstream_count(&self) -> usize {
        self.state().upstreams.len()
    }
}

/// `channel`'s members as the channel server reads them.
fn channel_members(channel: &ChannelId, reported: Vec<Reported>) -> pb::ChannelMembers {
    pb::ChannelMembers {
        channel: channel.to_string(),
        members: reported
            .into_iter()
            .map(|m| pb::MemberCount {
                user: m.user.to_string(),
                team: m.team.map(|t| t.to_string()).unwrap_or_default(),
                connections: m.conns,
                announced: m.announced,
                since_ms: m.since_ms,
            })
            .collect(),
    }
}

/// What the upstream streams say reaches the hub.
impl Downstream for Hub {
    fn gateway(&self) -> &str {
        Hub::gateway(self)
    }

    fn metrics(&self) -> &GatewayMetrics {
        Hub::metrics(self)
    }

    fn deliver_batch(&self, from: &NodeId, batch: Vec<ChannelEvent>, received: Instant) {
        Hub::deliver_batch(self, from, batch, received);
    }

    fn subscribed(
        &self,
        node: &NodeId,
        channel: &ChannelId,
        head: Option<Ts>,
        complete_after: Option<Ts>,
    ) {
        Hub::subscribed(self, node, channel, head, complete_after);
    }

    fn gap(&self, node: &NodeId, channel: &ChannelId, floor: Ts) {
        Hub::gap(self, node, channel, floor);
    }

    fn refused(&self, node: &NodeId, channel: &str, reason: &str) {
        Hub::refused(self, node, channel, reason);
    }

    fn upstream_lost(&self, node: &NodeId) {
        Hub::upstream_lost(self, node);
    }
}
