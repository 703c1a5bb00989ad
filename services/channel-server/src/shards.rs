//! The channel server's state apart from the wire: channels split into shards by slot, each
//! shard holding its channels' store and the gateway streams subscribed to them.
//!
//! A shard's lock is held while an event is appended and queued to every subscribed gateway,
//! and while a `Subscribed` reply is queued, so each gateway receives a channel's events in ts
//! order and after its `Subscribed`. The lock is never held across an await. Replies are of a
//! type the edge chooses ([`StreamReply`]), built once under the lock and cloned per gateway.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use mesh_core::{ChannelEvent, ChannelId, NodeId, Ring, RingNode, SLOT_COUNT, Slot, Ts, slot_of};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::ServeError;
use crate::handoff::{self, Outgoing};
use crate::members::{self, Fact, Members, Report, Source, Summary};
use crate::metrics::Metrics;
use crate::replication::{LinkId, MAX_PENDING_PER_SHARD, Replicated};
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

/// Microseconds since the Unix epoch by the wall clock (0 before it).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A reply queued on a gateway's subscription stream, in the edge's own form.
pub trait StreamReply: Clone + Send + 'static {
    /// One event, just published (its ts assigned unless it is transient).
    fn event(event: &ChannelEvent) -> Self;
    /// `channel` is subscribed; `head` is its newest ts, its history complete only after
    /// `complete_after` (`None`: complete from its start).
    fn subscribed(channel: &ChannelId, head: Option<Ts>, complete_after: Option<Ts>) -> Self;
    /// `channel`'s history floor jumped to `complete_after`: events at or before it may be
    /// missing here, so a gateway that delivered less must tell its clients of a gap.
    fn gap(channel: &ChannelId, complete_after: Ts) -> Self;
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
    /// The gateway and its region, as its members are accounted.
    source: Source,
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

    /// The gateway's region, as it said in its subscriptions.
    pub fn set_region(&mut self, region: &str) {
        if !region.is_empty() && *self.source.region != *region {
            self.source.region = Arc::from(region);
        }
    }
}

#[derive(Debug)]
struct Shard<R> {
    store: Store,
    /// Gateways subscribed to each channel.
    subs: HashMap<ChannelId, Vec<Subscriber<R>>>,
    /// Events given a ts and sent to their slot's followers, not yet acknowledged by all of
    /// them, in ts order per channel: each is stored, fanned out and answered once it and
    /// every event before it here are acknowledged (or dropped when refused).
    pending: VecDeque<Pending<R>>,
    /// The idempotency keys of `pending`, so that a retry finds what it waits for.
    pending_keys: PendingKeys,
    /// Who is subscribed to its channels across gateways (slots this node owns only).
    members: Members,
}

/// An event waiting for its followers.
#[derive(Debug)]
struct Pending<R> {
    entry: Replicated,
    /// Its reply to subscribed gateways, made when it was published (in the publish's span,
    /// so the delivery joins the publisher's trace).
    reply: R,
    /// Links to the followers it was queued on, by follower.
    sent: Vec<(NodeId, LinkId)>,
    /// Those of them that have not acknowledged it yet.
    awaiting: Vec<LinkId>,
    /// Publishers waiting for its ts (a retry with the same key waits too).
    waiters: Vec<oneshot::Sender<Result<Ts, ServeError>>>,
}

/// The idempotency keys of a shard's waiting events (at most one per channel and key: a retry
/// joins the first), each with the event's id. A keyed publish looks its key up here instead of
/// walking every waiting event: under a replication backlog (up to
/// [`crate::replication::MAX_PENDING_PER_SHARD`] waiting) the walk cost each publish thousands
/// of comparisons, and slowed most when the shard was furthest behind.
#[derive(Debug, Default)]
struct PendingKeys(HashMap<ChannelId, HashMap<Arc<str>, u64>>);

impl PendingKeys {
    fn get(&self, channel: &ChannelId, key: &str) -> Option<u64> {
        self.0.get(channel)?.get(key).copied()
    }

    fn insert(&mut self, entry: &Replicated) {
        if let Some(key) = &entry.key {
            self.0
                .entry(entry.event.channel.clone())
                .or_default()
                .insert(key.clone(), entry.id);
        }
    }

    /// Forgets `entry`'s key (when it is the one the key names).
    fn remove(&mut self, entry: &Replicated) {
        let Some(key) = &entry.key else { return };
        let Some(keys) = self.0.get_mut(&entry.event.channel) else {
            return;
        };
        if keys.get(key) == Some(&entry.id) {
            keys.remove(key);
            if keys.is_empty() {
                self.0.remove(&entry.event.channel);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.values().map(HashMap::len).sum()
    }
}

impl<R> Shard<R> {
    /// The waiting event of `channel` published under `key`, if any.
    fn waiting_mut(&mut self, channel: &ChannelId, key: &str) -> Option<&mut Pending<R>> {
        let id = self.pending_keys.get(channel, key)?;
        // Waiting events are in id order: numbered as they are queued, and kept in order.
        let at = self
            .pending
            .binary_search_by_key(&id, |p| p.entry.id)
            .ok()?;
        self.pending.get_mut(at)
    }
}

impl<R> Pending<R> {
    /// Tells every waiter `outcome`.
    fn answer(self, outcome: Result<Ts, ServeError>) {
        for waiter in self.waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

/// Where a publish stands once [`Shards::publish_once`] returned.
#[derive(Debug)]
pub enum Published {
    /// Stored and fanned out (or, when not `fresh`, answered from the idempotency window).
    Done { fresh: bool },
    /// Sent to the slot's followers: the ts (or why it failed) comes once they acknowledged
    /// it. `fresh` is false for a retry of a publish still waiting.
    Waiting {
        fresh: bool,
        reply: oneshot::Receiver<Result<Ts, ServeError>>,
    },
}

/// Queues events to a slot's followers (the edge's replication links).
pub trait Replicator {
    /// Queues `entry` on the link to each of `followers`, to all or none (a link whose queue
    /// is full refuses it: [`ServeError::ReplicationBehind`]); returns each follower's link.
    /// Called under the shard lock, so a channel's events are queued in ts order.
    fn replicate(
        &self,
        followers: &[&RingNode],
        entry: &Replicated,
    ) -> Result<Vec<(NodeId, LinkId)>, ServeError>;
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

/// The replicator of rings without followers: never asked.
struct NoFollowers;

impl Replicator for NoFollowers {
    fn replicate(
        &self,
        _: &[&RingNode],
        _: &Replicated,
    ) -> Result<Vec<(NodeId, LinkId)>, ServeError> {
        Err(ServeError::ReplicationBehind)
    }
}

/// One channel's head, history and live subscribers (`ChannelInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub head: Option<Ts>,
    pub history_length: usize,
    pub oldest: Option<Ts>,
    /// Complete only after this ts (`None`: from its start).
    pub complete_after: Option<Ts>,
    pub live: Summary,
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
    /// Numbers the events sent to followers.
    next_pending: AtomicU64,
    /// Every open gateway stream's queue, for the queue-depth gauge.
    streams: Mutex<HashMap<u64, mpsc::Sender<R>>>,
    metrics: Metrics,
    /// The wall clock in microseconds ([`now_micros`] but in tests).
    clock: fn() -> u64,
    /// Where the members' facts go (the webhooks), told under the shard lock so that a
    /// channel's facts keep their order; none until set.
    facts: OnceLock<FactSink>,
}

/// Takes the facts of channel accounting (queues them, never waits).
pub struct FactSink(pub Box<dyn Fn(Fact) + Send + Sync>);

impl std::fmt::Debug for FactSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FactSink")
    }
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
                        pending: VecDeque::new(),
                        pending_keys: PendingKeys::default(),
                        members: {
                            // Learning who belongs is for offline messages: with a sink only.
                            let mut members = Members::new(members::Bounds::default());
                            members.set_learning(false);
                            members
                        },
                    })
                })
                .collect(),
            next_stream: AtomicU64::new(1),
            next_pending: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            metrics,
            clock,
            facts: OnceLock::new(),
        }
    }

    /// Sends the members' facts to `sink` from now on (once; later calls are ignored).
    pub fn set_fact_sink(&self, sink: FactSink) {
        let _ = self.facts.set(sink);
        for mut shard in self.each_shard() {
            shard.members.set_learning(true);
        }
    }

    /// Keeps the member accounting within `bounds` (the total split over the shards).
    pub fn set_member_bounds(&self, bounds: members::Bounds) {
        let per_shard = members::Bounds {
            total_entries: (bounds.total_entries / SHARDS).max(1),
            known_total: (bounds.known_total / SHARDS).max(1),
            ..bounds
        };
        for mut shard in self.each_shard() {
            shard.members.set_bounds(per_shard);
        }
    }

    /// Tells the fact sink `facts`, in order (called under the lock of their shard).
    fn tell(&self, facts: Vec<Fact>) {
        if facts.is_empty() {
            return;
        }
        self.metrics.member_facts.inc_by(facts.len() as u64);
        if let Some(sink) = self.facts.get() {
            for fact in facts {
                (sink.0)(fact);
            }
        }
    }

    /// The wall clock in milliseconds.
    fn now_ms(&self) -> u64 {
        (self.clock)() / 1000
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
        gateway: &str,
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
            source: Source {
                stream: sub.stream,
                gateway: Arc::from(gateway),
                region: Arc::from(""),
            },
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
        // Its members leave after the grace (a reconnecting gateway resubscribes before).
        self.streams().remove(&stream.sub.stream);
        stream.sub.end.end(ServeError::StreamClosed);
    }

    /// Subscribes `stream` to `channel` (once, however often asked) and queues its
    /// `Subscribed` reply with the channel's head and history floor, both under the shard
    /// lock: every event published after it follows it on the stream. `delivered`: the newest
    /// ts the gateway delivered on the channel, which the channel's clock and history floor
    /// are raised past ([`Store::raise_floor`]); when they jump, the gateways already
    /// subscribed are told (a gap). The caller checked ownership.
    pub fn subscribe(
        &self,
        stream: &mut GatewayStream<R>,
        channel: &ChannelId,
        delivered: Option<Ts>,
        reports: &[Report],
    ) {
        let mut shard = self.shard(channel);
        let mut facts = Vec::new();
        let now = self.now_ms();
        shard
            .members
            .subscribe(&stream.source, channel, reports, now, &mut facts);
        self.tell(facts);
        if let Some(floor) = delivered.and_then(|ts| shard.store.raise_floor(channel, ts)) {
            tracing::info!(%channel, %floor, "a gateway delivered past this channel's clock; its floor jumps");
            self.metrics.floor_jumps.inc();
            shard.fan_out(channel, &R::gap(channel, floor), &self.metrics);
        }
        if stream.subscribed.insert(channel.clone()) {
            shard
                .subs
                .entry(channel.clone())
                .or_default()
                .push(stream.sub.clone());
        }
        let complete_after =
            Some(shard.store.complete_after(channel)).filter(|t| *t != Ts::default());
        let reply = R::subscribed(channel, shard.store.head(channel), complete_after);
        // Queued under the shard lock: every event published after it follows it on the
        // stream.
        stream.sub.send_control(reply);
    }

    /// `stream`'s members of `channel` changed (absolute counts); only for a channel it
    /// subscribed here.
    pub fn update_members(
        &self,
        stream: &GatewayStream<R>,
        channel: &ChannelId,
        reports: &[Report],
    ) {
        if !stream.subscribed.contains(channel) {
            return;
        }
        let mut shard = self.shard(channel);
        let mut facts = Vec::new();
        let now = self.now_ms();
        shard
            .members
            .update(stream.sub.stream, channel, reports, now, &mut facts);
        self.tell(facts);
    }

    /// Departures whose grace ran out count now (`member_removed`, `channel_vacated`).
    pub fn expire_members(&self) {
        let now = self.now_ms();
        for mut shard in self.each_shard() {
            let mut facts = Vec::new();
            shard.members.expire(now, &mut facts);
            self.tell(facts);
        }
    }

    /// `channel`'s head, history and live subscribers. The caller checked ownership.
    pub fn channel_info(&self, channel: &ChannelId) -> ChannelInfo {
        let shard = self.shard(channel);
        let (history_length, oldest) = shard.store.extent(channel);
        ChannelInfo {
            head: shard.store.head(channel),
            history_length,
            oldest,
            complete_after: Some(shard.store.complete_after(channel))
                .filter(|t| *t != Ts::default()),
            live: shard.members.summary(channel),
        }
    }

    /// Channels with live subscribers, of slots `owned` says this node owns, matching
    /// `wanted`, in id order after `after`: at most `limit`, and whether more match.
    pub fn list_channels(
        &self,
        owned: impl Fn(Slot) -> bool,
        wanted: impl Fn(&ChannelId) -> bool,
        team: Option<&str>,
        after: &str,
        limit: usize,
    ) -> (Vec<(ChannelId, Summary)>, bool) {
        let mut found: Vec<(ChannelId, Summary)> = Vec::new();
        for shard in self.each_shard() {
            for channel in shard.members.live() {
                if channel.as_str() <= after
                    || !owned(slot_of(channel))
                    || !wanted(channel)
                    || team.is_some_and(|t| !shard.members.has_team(channel, t))
                {
                    continue;
                }
                found.push((channel.clone(), shard.members.summary(channel)));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > limit;
        found.truncate(limit);
        (found, more)
    }

    /// Gateway × channel × user entries accounted, users known to belong to channels, and
    /// reports not counted for a bound.
    pub fn member_counts(&self) -> (usize, usize, u64) {
        self.each_shard()
            .fold((0, 0, 0), |(entries, known, dropped), shard| {
                (
                    entries + shard.members.entries(),
                    known + shard.members.known(),
                    dropped + shard.members.dropped,
                )
            })
    }

    /// Unsubscribes `stream` from `channel`, if it was subscribed.
    pub fn unsubscribe(&self, stream: &mut GatewayStream<R>, channel: &ChannelId) {
        if stream.subscribed.remove(channel) {
            self.remove_subscriber(channel, stream.sub.stream);
        }
    }

    fn remove_subscriber(&self, channel: &ChannelId, stream: u64) {
        let mut shard = self.shard(channel);
        let now = self.now_ms();
        shard.members.unsubscribe(stream, channel, now);
        if let Some(subs) = shard.subs.get_mut(channel) {
            subs.retain(|s| s.stream != stream);
            if subs.is_empty() {
                shard.subs.remove(channel);
            }
        }
    }

    /// Publishes `event` on a slot with no followers: unless it is transient, appends it
    /// (setting its ts), then queues it to every subscribed gateway, under one shard lock. The
    /// caller checked ownership (which may wait for a handoff); `still_owned` checks it again
    /// under the lock, so that a ring change that moved the slot since is either seen here (the
    /// event is refused) or applied by [`Shards::follow_ring`] after it (the event goes with
    /// the slot's state): never an event stored and acknowledged on a slot this node no longer
    /// owns.
    pub fn publish(
        &self,
        event: &mut ChannelEvent,
        still_owned: impl FnOnce() -> Result<(), ServeError>,
    ) -> Result<(), ServeError> {
        let route = || still_owned().map(|()| Arc::new(Ring::empty()));
        self.publish_once(event, None, route, &NoFollowers)
            .map(|_| ())
    }

    /// Publishes `event` once per idempotency `key`: a persisted event whose key is in its
    /// channel's window gets the ts its first publish was given and is neither stored nor
    /// queued again (counted as deduplicated); one whose first publish still waits for its
    /// followers waits with it. `route` checks ownership under the shard lock (see
    /// [`Shards::publish`]) and gives the ring whose followers of the slot get the event.
    ///
    /// With no follower (and nothing of the shard waiting for one) the event is stored and
    /// fanned out here. Otherwise it gets its ts now, goes to every follower through
    /// `replicator`, and is stored, fanned out and answered only once all of them
    /// acknowledged it ([`Shards::acked`]): an event a gateway delivered or a publisher was
    /// told about survives its primary's crash on the follower promoted in its place.
    pub fn publish_once(
        &self,
        event: &mut ChannelEvent,
        key: Option<&str>,
        route: impl FnOnce() -> Result<Arc<Ring>, ServeError>,
        replicator: &impl Replicator,
    ) -> Result<Published, ServeError> {
        let slot = slot_of(&event.channel);
        let index = usize::from(slot) % SHARDS;
        let mut shard = self.shards[index].lock().unwrap_or_else(|e| e.into_inner());
        let ring = route()?;
        if event.body.is_transient() {
            self.metrics.published(&event.body);
            let reply = R::event(event);
            shard.fan_out(&event.channel, &reply, &self.metrics);
            return Ok(Published::Done { fresh: true });
        }
        let now = (self.clock)();
        if let Some(key) = key {
            if let Some(ts) = shard.store.seen(&event.channel, key, now) {
                event.ts = Some(ts);
                self.metrics.publishes_deduplicated.inc();
                return Ok(Published::Done { fresh: false });
            }
            if let Some(first) = shard.waiting_mut(&event.channel, key) {
                event.ts = first.entry.event.ts;
                let (tx, rx) = oneshot::channel();
                first.waiters.push(tx);
                self.metrics.publishes_deduplicated.inc();
                return Ok(Published::Waiting {
                    fresh: false,
                    reply: rx,
                });
            }
        }
        let followers: Vec<&RingNode> = ring.followers(slot).collect();
        if followers.is_empty() && shard.pending.is_empty() {
            let ts = shard.store.next_ts(&event.channel, now);
            shard
                .store
                .store_event(&event.channel, ts, &event.body, key, now);
            event.ts = Some(ts);
            self.metrics.published(&event.body);
            let reply = R::event(event);
            shard.fan_out(&event.channel, &reply, &self.metrics);
            self.committed(&mut shard, event);
            return Ok(Published::Done { fresh: true });
        }
        if shard.pending.len() >= MAX_PENDING_PER_SHARD {
            return Err(ServeError::ReplicationBehind);
        }
        let ts = shard.store.next_ts(&event.channel, now);
        event.ts = Some(ts);
        let entry = Replicated {
            id: self.next_pending.fetch_add(1, Ordering::Relaxed),
            shard: index,
            event: event.clone(),
            key: key.map(Arc::from),
            seen_micros: now,
        };
        let sent = if followers.is_empty() {
            Vec::new()
        } else {
            replicator.replicate(&followers, &entry)?
        };
        let (tx, rx) = oneshot::channel();
        shard.pending_keys.insert(&entry);
        shard.pending.push_back(Pending {
            reply: R::event(event),
            entry,
            awaiting: sent.iter().map(|(_, link)| *link).collect(),
            sent,
            waiters: vec![tx],
        });
        self.commit_ready(&mut shard);
        Ok(Published::Waiting {
            fresh: true,
            reply: rx,
        })
    }

    /// An event is stored (acknowledged): the members hear of it.
    fn committed(&self, shard: &mut Shard<R>, event: &ChannelEvent) {
        let mut facts = Vec::new();
        let hooks = self.facts.get().is_some();
        shard.members.committed(event, hooks, &mut facts);
        self.tell(facts);
    }

    /// Stores, fans out and answers the shard's waiting events from the oldest on, as long as
    /// each has been acknowledged by all its followers.
    fn commit_ready(&self, shard: &mut Shard<R>) {
        while shard.pending.front().is_some_and(|p| p.awaiting.is_empty()) {
            let Some(done) = shard.pending.pop_front() else {
                break;
            };
            shard.pending_keys.remove(&done.entry);
            let Replicated {
                event,
                key,
                seen_micros,
                ..
            } = &done.entry;
            let Some(ts) = event.ts else { continue };
            shard.store.store_event(
                &event.channel,
                ts,
                &event.body,
                key.as_deref(),
                *seen_micros,
            );
            self.metrics.published(&event.body);
            shard.fan_out(&event.channel, &done.reply, &self.metrics);
            self.committed(shard, &done.entry.event);
            done.answer(Ok(ts));
        }
    }

    /// `link`'s follower acknowledged the events `ids` (by shard): those every follower has
    /// acknowledged are stored, fanned out and answered, in order.
    pub fn acked(&self, link: LinkId, ids: &[(usize, u64)]) {
        self.each_pending(ids, |shard, ids| {
            // Both in id order (a shard's events are numbered as they are queued): one walk.
            let mut ids = ids.iter().peekable();
            for p in shard.pending.iter_mut() {
                while ids.next_if(|&&id| id < p.entry.id).is_some() {}
                if ids.next_if(|&&id| id == p.entry.id).is_some() {
                    p.awaiting.retain(|l| *l != link);
                }
                if ids.peek().is_none() {
                    break;
                }
            }
        });
    }

    /// `link`'s follower refused the events `ids` (its ring says this node may not replicate
    /// them to it): they fail with `why`, and are neither stored here nor delivered.
    pub fn refused(&self, ids: &[(usize, u64)], why: &str) {
        self.each_pending(ids, |shard, ids| {
            let ids: HashSet<u64> = ids.iter().copied().collect();
            let mut kept = VecDeque::with_capacity(shard.pending.len());
            for p in shard.pending.drain(..) {
                if ids.contains(&p.entry.id) {
                    shard.pending_keys.remove(&p.entry);
                    p.answer(Err(ServeError::ReplicationRefused(why.to_string())));
                } else {
                    kept.push_back(p);
                }
            }
            shard.pending = kept;
        });
    }

    /// Runs `f` on each shard named in `ids` with that shard's ids, then commits what is ready.
    fn each_pending(&self, ids: &[(usize, u64)], mut f: impl FnMut(&mut Shard<R>, &[u64])) {
        let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); SHARDS];
        for &(shard, id) in ids {
            if let Some(list) = by_shard.get_mut(shard) {
                list.push(id);
            }
        }
        for list in &mut by_shard {
            list.sort_unstable();
        }
        for (index, ids) in by_shard.iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let mut shard = self.shards[index].lock().unwrap_or_else(|e| e.into_inner());
            f(&mut shard, ids);
            self.commit_ready(&mut shard);
        }
    }

    /// Follows a new ring for the waiting events: those of slots this node no longer owns
    /// fail (their publishers retry on the new owner, under the same idempotency key); the
    /// others stop waiting for followers the ring dropped and go to the followers it added.
    pub fn reroute(&self, ring: &Ring, node: &NodeId, replicator: &impl Replicator) {
        for mut guard in self.each_shard() {
            let shard = &mut *guard;
            if shard.pending.is_empty() {
                continue;
            }
            let mut kept = VecDeque::with_capacity(shard.pending.len());
            for mut p in shard.pending.drain(..) {
                let slot = slot_of(&p.entry.event.channel);
                if let Err(refusal) = crate::ownership::owns(ring, node, slot) {
                    shard.pending_keys.remove(&p.entry);
                    p.answer(Err(refusal));
                    continue;
                }
                let followers: Vec<&RingNode> = ring.followers(slot).collect();
                let dropped: Vec<LinkId> = p
                    .sent
                    .iter()
                    .filter(|(id, _)| !followers.iter().any(|f| &f.id == id))
                    .map(|(_, link)| *link)
                    .collect();
                p.sent.retain(|(_, link)| !dropped.contains(link));
                p.awaiting.retain(|link| !dropped.contains(link));
                let added: Vec<&RingNode> = followers
                    .into_iter()
                    .filter(|f| !p.sent.iter().any(|(id, _)| id == &f.id))
                    .collect();
                if !added.is_empty() {
                    match replicator.replicate(&added, &p.entry) {
                        Ok(links) => {
                            p.awaiting.extend(links.iter().map(|(_, link)| *link));
                            p.sent.extend(links);
                        }
                        Err(refusal) => {
                            shard.pending_keys.remove(&p.entry);
                            p.answer(Err(refusal));
                            continue;
                        }
                    }
                }
                kept.push_back(p);
            }
            shard.pending = kept;
            self.commit_ready(shard);
        }
    }

    /// Stores an event the slot's primary replicated here (a follower's copy), with its
    /// idempotency key as the primary saw it. The caller checked that it follows the slot.
    pub fn apply(&self, event: &ChannelEvent, key: Option<&str>, seen_micros: u64) {
        let Some(ts) = event.ts else { return };
        self.shard(&event.channel).store.store_event(
            &event.channel,
            ts,
            &event.body,
            key,
            seen_micros,
        );
        self.metrics.replicated_in.inc();
    }

    /// Copies of the channels of `slots` and the slots' floors, for a follower's catch-up.
    pub fn copy_slots(&self, slots: &[Slot]) -> (Vec<Snapshot>, Vec<(Slot, Ts)>) {
        let wanted: HashSet<Slot> = slots.iter().copied().collect();
        let mut snapshots = Vec::new();
        let mut floors = Vec::new();
        for (index, shard) in self.each_shard().enumerate() {
            if !wanted.iter().any(|s| usize::from(*s) % SHARDS == index) {
                continue;
            }
            snapshots.extend(shard.store.copy_slots(|slot| wanted.contains(&slot)));
            for &slot in slots.iter().filter(|s| usize::from(**s) % SHARDS == index) {
                let floor = shard.store.slot_floor(slot);
                if floor != Ts::default() {
                    floors.push((slot, floor));
                }
            }
        }
        (snapshots, floors)
    }

    /// Events waiting for their followers, over all shards.
    pub fn pending(&self) -> usize {
        self.each_shard().map(|s| s.pending.len()).sum()
    }

    /// Idempotency keys of waiting events, over all shards (for tests).
    #[cfg(test)]
    pub(crate) fn pending_keys(&self) -> usize {
        self.each_shard().map(|s| s.pending_keys.len()).sum()
    }

    /// Keeps every channel's idempotency keys within `bounds`.
    pub fn set_window(&self, bounds: crate::idempotency::Bounds) {
        for mut shard in self.each_shard() {
            shard.store.set_window(bounds);
        }
    }

    /// Bounds each channel's history by its policy too (`history_max_events`,
    /// `history_max_age`), as `policies` say at each trim.
    pub fn set_policies(&self, policies: &mesh_core::policy::SharedPolicies) {
        for mut shard in self.each_shard() {
            shard.store.set_policies(policies.clone(), self.clock);
        }
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

    /// Takes in a moved channel's live members from its previous owner ([`Members::adopt`]).
    pub fn adopt_members(&self, channel: &ChannelId, reports: &[Report]) {
        let now = self.now_ms();
        self.shard(channel).members.adopt(channel, reports, now);
    }

    /// Takes in a moved slot's floor from its previous owner: its channels evicted there lost
    /// their history up to `floor`.
    pub fn absorb_floor(&self, slot: Slot, floor: Ts) {
        let index = usize::from(slot) % SHARDS;
        let mut shard = self.shards[index].lock().unwrap_or_else(|e| e.into_inner());
        shard.store.mark_unknown_before(slot, floor);
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
        self.mark_unknown(unknown);
        let handoff_to = |slot: Slot| handoff::new_owner(previous, ring, node, slot);
        let mut taken: HashMap<NodeId, Vec<Snapshot>> = HashMap::new();
        let mut floors: HashMap<NodeId, Vec<(Slot, Ts)>> = HashMap::new();
        let mut handed_members: HashMap<NodeId, Vec<(ChannelId, Vec<Report>)>> = HashMap::new();
        let mut moved = 0usize;
        let mut dropped = 0usize;
        for (index, mut shard) in self.each_shard().enumerate() {
            // The slots' floors go too (read before taking raises them with the channels
            // handed over), so the new owner's history does not claim what was evicted here.
            for slot in (index..SLOT_COUNT).step_by(SHARDS).map(|s| s as Slot) {
                let floor = shard.store.slot_floor(slot);
                if floor != Ts::default()
                    && let Some(to) = handoff_to(slot)
                {
                    floors.entry(to.id.clone()).or_default().push((slot, floor));
                }
            }
            // A slot handed off that this node goes on following keeps its copy here.
            let follows = |slot: Slot| ring.follows(node, slot);
            let handed = shard
                .store
                .take_slots(|slot| handoff_to(slot).is_some() && !follows(slot))
                .into_iter()
                .chain(
                    shard
                        .store
                        .copy_slots(|slot| handoff_to(slot).is_some() && follows(slot)),
                );
            for snapshot in handed {
                if let Some(to) = handoff_to(slot_of(&snapshot.channel)) {
                    taken.entry(to.id.clone()).or_default().push(snapshot);
                }
            }
            dropped += shard
                .store
                .drop_slots(|slot| !ring.owns(node, slot) && !follows(slot));
            let mut facts = Vec::new();
            let live = shard
                .members
                .drop_channels(|c| !ring.owns(node, slot_of(c)), &mut facts);
            self.tell(facts);
            for (channel, reports) in live {
                if let Some(to) = handoff_to(slot_of(&channel)) {
                    handed_members
                        .entry(to.id.clone())
                        .or_default()
                        .push((channel, reports));
                }
            }
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
            %node,
            epoch = ring.epoch(),
            slots = ring.slots_owned(node),
            moved_subscriptions = moved,
            dropped_channels = dropped,
            handing_off_channels = taken.values().map(Vec::len).sum::<usize>(),
            "channel server follows new ring"
        );
        // Ring watches give the latest ring: a handoff named by a ring this node never saw is
        // not sent, and its new owner serves those slots with their history marked incomplete.
        let skipped = ring.epoch().saturating_sub(previous.epoch() + 1);
        if skipped > 0 && ring.generation() == previous.generation() && dropped > 0 {
            tracing::warn!(
                %node,
                from = previous.epoch(),
                epoch = ring.epoch(),
                skipped,
                dropped_channels = dropped,
                "followed a ring past epochs this node never saw; channels of slots it lost without a handoff named in this ring were dropped (a skipped ring may have named one: their new owner marks their history incomplete)"
            );
        }
        handoff::outgoing(ring, node, taken, floors, handed_members)
    }

    /// Nothing of `slots` before now is known here (taken over from a node that died, or a
    /// handoff that did not arrive in time): their history floor jumps to now, and every
    /// gateway subscribed to one of their channels is told (a gap).
    pub fn mark_unknown(&self, slots: &[Slot]) {
        if slots.is_empty() {
            return;
        }
        let now = Ts::from_micros((self.clock)());
        let marked: HashSet<Slot> = slots.iter().copied().collect();
        for mut shard in self.each_shard() {
            for &slot in slots {
                shard.store.mark_unknown_before(slot, now);
            }
            let told: Vec<ChannelId> = shard
                .subs
                .keys()
                .filter(|c| marked.contains(&slot_of(c)))
                .cloned()
                .collect();
            for channel in told {
                let floor = shard.store.complete_after(&channel);
                shard.fan_out(&channel, &R::gap(&channel, floor), &self.metrics);
            }
        }
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
