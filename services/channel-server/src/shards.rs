//! The channel server's state apart from the wire: channels split into shards by slot, each
//! shard holding its channels' store and the gateway streams subscribed to them.
//!
//! A shard's lock is held while an event is appended and queued to every subscribed gateway,
//! and while a `Subscribed` reply is queued, so each gateway receives a channel's events in ts
//! order and after its `Subscribed`. The lock is never held across an await. Replies are of a
//! type the edge chooses ([`StreamReply`]), built once under the lock and cloned per gateway.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use mesh_core::{ChannelEvent, ChannelId, NodeId, Ring, Slot, Ts, slot_of};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::ServeError;
use crate::handoff::{self, Outgoing};
use crate::metrics::Metrics;
use crate::store::{HistoryPage, Limits, Snapshot, Store};

/// Shards of channel state; a power of two that divides the slot count.
const SHARDS: usize = 16;
/// The most events one history call returns.
pub const MAX_HISTORY_LIMIT: u32 = 1000;
/// The history limit when a call asks for 0.
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;

/// The events a history call returns when it asks for `asked` (0: the default).
pub fn history_limit(asked: u32) -> usize {
    let limit = match asked {
        0 => DEFAULT_HISTORY_LIMIT,
        n => n.min(MAX_HISTORY_LIMIT),
    };
    limit as usize
}

/// Microseconds since the Unix epoch by the wall clock (0 before it): the shards' clock, moved
/// by the clock-skew test hook when one is set ([`mesh_core::ts::skewed`]).
pub fn now_micros() -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    mesh_core::ts::skewed(wall)
}

/// A reply queued on a gateway's subscription stream, in the edge's own form.
pub trait StreamReply: Clone + Send + 'static {
    /// One event, just published (its ts assigned unless it is transient).
    fn event(event: &ChannelEvent) -> Self;
    /// `channel` is subscribed; `head` is its newest ts.
    fn subscribed(channel: &ChannelId, head: Option<Ts>) -> Self;
    /// `channel` is not (or no longer) served here, as of `epoch`.
    fn refused(channel: &ChannelId, epoch: u64, reason: &str) -> Self;
}

/// Ends one gateway stream, with the reason the gateway receives.
#[derive(Debug, Clone)]
pub struct StreamEnd {
    token: CancellationToken,
    reason: Arc<OnceLock<ServeError>>,
}

impl StreamEnd {
    /// Ends the stream for `reason` (the first reason given is the one the gateway reads).
    pub fn end(&self, reason: ServeError) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Resolves once the stream is to end.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// Waits for the end and says why: the reason given, or shutdown when the server's own
    /// cancellation ended it.
    pub async fn ended(self) -> ServeError {
        self.token.cancelled().await;
        self.reason
            .get()
            .cloned()
            .unwrap_or(ServeError::ShuttingDown)
    }
}

/// A gateway's subscription stream, as the shards see it.
#[derive(Debug, Clone)]
struct Subscriber<R> {
    stream: u64,
    tx: mpsc::Sender<R>,
    /// Ends the stream; its reason says why.
    end: StreamEnd,
}

impl<R> Subscriber<R> {
    /// Queues a reply to one of the gateway's commands; a full queue ends the stream.
    fn send_control(&self, reply: R) {
        if self.tx.try_send(reply).is_err() {
            self.end.end(ServeError::FellBehindOnReply);
        }
    }
}

/// One open gateway stream, owned by the task that reads its commands.
#[derive(Debug)]
pub struct GatewayStream<R> {
    sub: Subscriber<R>,
    /// The channels it subscribed.
    subscribed: HashSet<ChannelId>,
}

impl<R> GatewayStream<R> {
    /// The stream's number, for logs.
    pub fn id(&self) -> u64 {
        self.sub.stream
    }

    /// What ends the stream.
    pub fn end(&self) -> &StreamEnd {
        &self.sub.end
    }

    /// Queues a reply to one of the gateway's commands; a full queue ends the stream.
    pub fn send(&self, reply: R) {
        self.sub.send_control(reply);
    }
}

#[derive(Debug)]
struct Shard<R> {
    store: Store,
    /// Gateways subscribed to each channel.
    subs: HashMap<ChannelId, Vec<Subscriber<R>>>,
}

impl<R: Clone> Shard<R> {
    /// Queues `reply` to every subscriber of `channel`. A gateway whose queue is full has
    /// fallen behind: its stream is ended (it resubscribes), never blocking the others.
    fn fan_out(&mut self, channel: &ChannelId, reply: &R, metrics: &Metrics) {
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
                sub.end.end(ServeError::FellBehind);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if subs.is_empty() {
            self.subs.remove(channel);
        }
    }
}

/// What the shards hold, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Channel subscriptions (a channel subscribed by two gateways counts twice).
    pub subscriptions: usize,
    /// Channels held.
    pub channels: usize,
    /// Open gateway streams.
    pub streams: usize,
    /// Replies queued on them and not yet sent.
    pub queued: usize,
}

/// Every channel this node holds, in shards, and the gateway streams subscribed to them.
#[derive(Debug)]
pub struct Shards<R> {
    shards: Vec<Mutex<Shard<R>>>,
    next_stream: AtomicU64,
    /// Every open gateway stream's queue, for the queue-depth gauge.
    streams: Mutex<HashMap<u64, mpsc::Sender<R>>>,
    metrics: Metrics,
    /// The wall clock in microseconds ([`now_micros`] but in tests).
    clock: fn() -> u64,
}

impl<R: StreamReply> Shards<R> {
    /// Empty shards within `limits` (the total is split evenly over the shards), counting in
    /// `metrics`, giving ts by `clock`.
    pub fn new(limits: Limits, metrics: Metrics, clock: fn() -> u64) -> Self {
        let per_shard = Limits {
            total_bytes: (limits.total_bytes / SHARDS).max(1),
            ..limits
        };
        Shards {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        store: Store::new(per_shard),
                        subs: HashMap::new(),
                    })
                })
                .collect(),
            next_stream: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            metrics,
            clock,
        }
    }

    fn shard(&self, channel: &ChannelId) -> MutexGuard<'_, Shard<R>> {
        let index = usize::from(slot_of(channel)) % SHARDS;
        // A panic while holding a shard lock is a bug that already took the task down; the
        // state it guards stays consistent per operation, so keep serving.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn each_shard(&self) -> impl Iterator<Item = MutexGuard<'_, Shard<R>>> {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<u64, mpsc::Sender<R>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a gateway stream whose replies queue up to `queue` deep; it ends with `cancel`.
    /// The receiver is what the gateway reads.
    pub fn open_stream(
        &self,
        queue: usize,
        cancel: &CancellationToken,
    ) -> (GatewayStream<R>, mpsc::Receiver<R>) {
        let (tx, rx) = mpsc::channel(queue);
        let sub = Subscriber {
            stream: self.next_stream.fetch_add(1, Ordering::Relaxed),
            tx,
            end: StreamEnd {
                token: cancel.child_token(),
                reason: Arc::new(OnceLock::new()),
            },
        };
        self.streams().insert(sub.stream, sub.tx.clone());
        let stream = GatewayStream {
            sub,
            subscribed: HashSet::new(),
        };
        (stream, rx)
    }

    /// Closes a gateway stream: its subscriptions go, and it ends as closed.
    pub fn close_stream(&self, stream: GatewayStream<R>) {
        for channel in &stream.subscribed {
            self.remove_subscriber(channel, stream.sub.stream);
        }
        self.streams().remove(&stream.sub.stream);
        stream.sub.end.end(ServeError::StreamClosed);
    }

    /// Subscribes `stream` to `channel` (once, however often asked) and queues its
    /// `Subscribed` reply with the channel's head, both under the shard lock: every event
    /// published after it follows it on the stream. The caller checked ownership.
    pub fn subscribe(&self, stream: &mut GatewayStream<R>, channel: &ChannelId) {
        let mut shard = self.shard(channel);
        if stream.subscribed.insert(channel.clone()) {
            shard
                .subs
                .entry(channel.clone())
                .or_default()
                .push(stream.sub.clone());
        }
        let reply = R::subscribed(channel, shard.store.head(channel));
        // Queued under the shard lock: every event published after it follows it on the
        // stream.
        stream.sub.send_control(reply);
    }

    /// Unsubscribes `stream` from `channel`, if it was subscribed.
    pub fn unsubscribe(&self, stream: &mut GatewayStream<R>, channel: &ChannelId) {
        if stream.subscribed.remove(channel) {
            self.remove_subscriber(channel, stream.sub.stream);
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

    /// Publishes `event`: unless it is transient, appends it (setting its ts), then queues it
    /// to every subscribed gateway, under one shard lock. The caller checked ownership (which
    /// may wait for a handoff); `still_owned` checks it again under the lock, so that a ring
    /// change that moved the slot since is either seen here (the event is refused) or applied
    /// by [`Shards::follow_ring`] after it (the event goes with the slot's state): never an
    /// event stored and acknowledged on a slot this node no longer owns.
    pub fn publish(
        &self,
        event: &mut ChannelEvent,
        still_owned: impl FnOnce() -> Result<(), ServeError>,
    ) -> Result<(), ServeError> {
        let mut shard = self.shard(&event.channel);
        still_owned()?;
        if !event.body.is_transient() {
            event.ts = Some(
                shard
                    .store
                    .append(&event.channel, &event.body, (self.clock)()),
            );
        }
        let reply = R::event(event);
        shard.fan_out(&event.channel, &reply, &self.metrics);
        Ok(())
    }

    /// Up to `limit` events of `channel` strictly after `since`, counted as a hit or empty
    /// read. The caller checked ownership.
    pub fn history(&self, channel: &ChannelId, since: Option<Ts>, limit: usize) -> HistoryPage {
        let page = self.shard(channel).store.history(channel, since, limit);
        let outcome = if page.events.is_empty() {
            "empty"
        } else {
            "hit"
        };
        self.metrics
            .history_reads
            .with_label_values(&[outcome])
            .inc();
        page
    }

    /// Takes in a channel handed over by its previous owner.
    pub fn absorb(&self, snapshot: Snapshot) {
        self.shard(&snapshot.channel).store.absorb(snapshot);
    }

    /// Follows a new ring: nothing before now is known of the `unknown` slots; channels of
    /// slots `node` hands off are taken for their new owners, those of every other lost slot
    /// are dropped, and the gateways subscribed to moved channels are told so. Returns the
    /// handoffs to send.
    pub fn follow_ring(
        &self,
        previous: &Ring,
        ring: &Ring,
        node: &NodeId,
        unknown: &[Slot],
    ) -> Vec<Outgoing> {
        if !unknown.is_empty() {
            let now = Ts::from_micros((self.clock)());
            for mut shard in self.each_shard() {
                for &slot in unknown {
                    shard.store.mark_unknown_before(slot, now);
                }
            }
        }
        let handoff_to = |slot: Slot| handoff::new_owner(previous, ring, node, slot);
        let mut taken: HashMap<NodeId, Vec<Snapshot>> = HashMap::new();
        let mut moved = 0usize;
        let mut dropped = 0usize;
        for mut shard in self.each_shard() {
            for snapshot in shard.store.take_slots(|slot| handoff_to(slot).is_some()) {
                if let Some(to) = handoff_to(slot_of(&snapshot.channel)) {
                    taken.entry(to.id.clone()).or_default().push(snapshot);
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
                    let reply = R::refused(&channel, ring.epoch(), "moved");
                    for sub in subs {
                        if sub.tx.try_send(reply.clone()).is_err() {
                            sub.end.end(ServeError::FellBehindOnMove);
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
            handing_off_channels = taken.values().map(Vec::len).sum::<usize>(),
            "channel server follows new ring"
        );
        handoff::outgoing(ring, node, taken)
    }

    /// What the shards hold now.
    pub fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for shard in self.each_shard() {
            counts.subscriptions += shard.subs.values().map(Vec::len).sum::<usize>();
            counts.channels += shard.store.len();
        }
        let streams = self.streams();
        counts.queued = streams
            .values()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .sum();
        counts.streams = streams.len();
        counts
    }
}

#[cfg(test)]
mod tests;
