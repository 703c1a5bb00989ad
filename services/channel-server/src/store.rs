//! A channel server's channel state: ts clocks and bounded history, with idle channels evicted
//! least-recently-used first when the whole store passes its memory budget.
//!
//! Pure data structure: no I/O, no locks; `shards.rs` wraps one store per shard in its lock.

mod packed;

use std::collections::VecDeque;

use lru::LruCache;
use mesh_core::policy::SharedPolicies;
use mesh_core::{ChannelId, EventBody, SLOT_COUNT, Slot, Ts, TsClock, slot_of};

use crate::idempotency::{self, Seen, Window};
use packed::Packed;

/// Default: events kept per channel.
pub const DEFAULT_HISTORY_EVENTS: usize = 100;
/// Default: bytes of events kept per channel.
pub const DEFAULT_HISTORY_BYTES: usize = 256 * 1024;
/// Default: bytes of history across all channels of one store.
pub const DEFAULT_TOTAL_BYTES: usize = 1024 * 1024 * 1024;

// The two costs below are what a channel server's heap (glibc malloc) measured, so the total
// budget means RSS. `channelmesh bench channel-memory --channels 1000000 --events 10` with
// texts of a mean 60 B spread as chat is: +1,320 MiB RSS, 1,384 B per channel, where these
// count 10 x (60 + 19 + 40) + 192 = 1,382 B. A dhat profile (20,000 channels) accounts for it:
// each event's body block (its text, its user and team ids and 3 B of tag and lengths, rounded
// up to the allocator's 16 B with an 8 B header), its 24 B ring slot; per channel the LRU node
// (88 B, 96 as allocated), the id's `Arc<str>` (48 B as allocated), ~19 B of hash table and the
// ring's block header. Texts all of one size count low (every text 200 B: 2,782 B counted,
// 3,156 B measured per channel): the blocks a growing ring frees fit no later body and stay
// empty, where mixed sizes reuse them (a ring sized to the bound up front measured the same
// mix within 4 B per channel).

/// Fixed cost counted per stored event on top of its packed body: its ring slot (ts and box,
/// 24 B) and the allocator's header and rounding of the body's block (8 B plus 8 B on average).
const EVENT_OVERHEAD: usize = 40;
/// Fixed cost counted per channel: its LRU node, its id, its hash-table entry, the ring's block
/// header and the ring's spare slots while it grows.
const CHANNEL_OVERHEAD: usize = 192;

/// A store's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Events kept per channel; older ones are dropped first.
    pub history_events: usize,
    /// Bytes kept per channel (each event's packed body plus a fixed overhead; roughly its
    /// [`EventBody::heap_size`] plus ~45 B).
    pub history_bytes: usize,
    /// Bytes across all channels; past it, least-recently-used channels are evicted whole.
    pub total_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            history_events: DEFAULT_HISTORY_EVENTS,
            history_bytes: DEFAULT_HISTORY_BYTES,
            total_bytes: DEFAULT_TOTAL_BYTES,
        }
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub ts: Ts,
    pub body: EventBody,
}

#[derive(Debug)]
struct Channel {
    clock: TsClock,
    /// Oldest first. Its capacity grows toward the history bound and never past it, so a full
    /// history carries no slack.
    events: VecDeque<Packed>,
    /// Bytes of `events` as counted (the channel's own overhead is counted only in the store's
    /// total).
    bytes: usize,
    /// The newest ts dropped from `events` to stay within the bounds, or below which this
    /// store knows it lacks events (a floor raised by [`Store::raise_floor`]): the channel's
    /// history is complete only after it.
    trimmed: Ts,
    /// Recent idempotency keys and their ts (`None` until a publish carries one).
    recent: Option<Box<Window>>,
}

impl Channel {
    fn new(clock: TsClock, trimmed: Ts) -> Self {
        Channel {
            clock,
            events: VecDeque::new(),
            bytes: 0,
            trimmed,
            recent: None,
        }
    }

    /// Appends `event`, then drops the oldest events until within `limits`; returns the bytes
    /// freed.
    fn push(&mut self, event: Packed, limits: &Limits) -> usize {
        let mut freed = 0;
        // Make room first, so a full ring is reused rather than grown past the bound.
        while !self.events.is_empty() && self.events.len() >= limits.history_events {
            freed += self.pop_oldest();
        }
        if self.events.len() == self.events.capacity() {
            let want = (self.events.capacity() * 2)
                .max(4)
                .min(limits.history_events.max(1));
            self.events
                .reserve_exact(want.saturating_sub(self.events.len()).max(1));
        }
        self.bytes += event.counted();
        self.events.push_back(event);
        while self.events.len() > limits.history_events
            || (self.bytes > limits.history_bytes && self.events.len() > 1)
        {
            freed += self.pop_oldest();
        }
        freed
    }

    /// Inserts `event` in ts order among the events held (a replica's late arrival), unless
    /// one with its ts is there or it is older than what was trimmed; then drops the oldest
    /// until within `limits`. Returns the bytes freed, or `None` when it was not stored.
    fn insert(&mut self, event: Packed, limits: &Limits) -> Option<usize> {
        if event.ts <= self.trimmed {
            return None;
        }
        let at = self.events.partition_point(|e| e.ts < event.ts);
        if self.events.get(at).is_some_and(|e| e.ts == event.ts) {
            return None;
        }
        self.bytes += event.counted();
        self.events.insert(at, event);
        let mut freed = 0;
        while self.events.len() > limits.history_events.max(1)
            || (self.bytes > limits.history_bytes && self.events.len() > 1)
        {
            freed += self.pop_oldest();
        }
        Some(freed)
    }

    fn pop_oldest(&mut self) -> usize {
        let Some(event) = self.events.pop_front() else {
            return 0;
        };
        let size = event.counted();
        self.bytes -= size;
        // Never lowered: a raised floor (`Store::raise_floor`) can be above older events a
        // late handoff merged in.
        self.trimmed = self.trimmed.max(event.ts);
        size
    }

    fn unpacked(&self) -> impl Iterator<Item = Stored> + '_ {
        self.events.iter().filter_map(Packed::unpack)
    }
}

/// Bytes `state`'s window of idempotency keys counts against the budget.
fn recent_bytes(state: &Channel) -> usize {
    state.recent.as_ref().map_or(0, |w| w.counted())
}

/// `state` of `channel` as it leaves for (or is copied to) another node.
fn snapshot(channel: &ChannelId, state: &Channel) -> Snapshot {
    Snapshot {
        channel: channel.clone(),
        last_ts: state.clock.last(),
        trimmed: state.trimmed,
        recent: state
            .recent
            .as_ref()
            .map(|w| w.entries())
            .unwrap_or_default(),
        events: state.unpacked().collect(),
    }
}

/// A channel's state on its way to a new owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub channel: ChannelId,
    /// The newest ts handed out for the channel.
    pub last_ts: Ts,
    /// Retained history, oldest first.
    pub events: Vec<Stored>,
    /// The newest ts dropped from its history.
    pub trimmed: Ts,
    /// Its recent idempotency keys, oldest first.
    pub recent: Vec<Seen>,
}

/// One page of a channel's history.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryPage {
    /// Oldest first, all strictly after the `since` asked for.
    pub events: Vec<Stored>,
    /// The oldest ts still held for the channel.
    pub oldest: Option<Ts>,
    /// More events follow the last one returned.
    pub has_more: bool,
    /// The history is complete after this ts: events at or before it may be gone (trimmed,
    /// evicted, or lost with a channel server that died). A reader whose cursor is older has a
    /// gap.
    pub complete_after: Ts,
}

/// Channels, their clocks and histories.
#[derive(Debug)]
pub struct Store {
    limits: Limits,
    channels: LruCache<ChannelId, Channel>,
    total_bytes: usize,
    /// Per slot, the newest ts of any channel evicted or dropped from it: a channel that comes
    /// back starts its clock after this, so ts never repeat or go back within a channel.
    slot_floor: Vec<Ts>,
    evictions: u64,
    /// Each channel's window of idempotency keys.
    window: idempotency::Bounds,
    /// Channel policies: each channel's own history bounds, within `limits`.
    policies: SharedPolicies,
    /// The wall clock in microseconds, for `history_max_age`.
    clock: fn() -> u64,
}

impl Store {
    /// An empty store.
    pub fn new(limits: Limits) -> Self {
        Store {
            limits,
            channels: LruCache::unbounded(),
            total_bytes: 0,
            slot_floor: vec![Ts::default(); SLOT_COUNT],
            evictions: 0,
            window: idempotency::Bounds::default(),
            policies: SharedPolicies::default(),
            clock: mesh_core::ts::stamp_micros,
        }
    }

    /// Bounds each channel's history by its policy too, as `policies` say at each trim (a
    /// store or a read of the channel), with ages by `clock` (microseconds).
    pub fn set_policies(&mut self, policies: SharedPolicies, clock: fn() -> u64) {
        self.policies = policies;
        self.clock = clock;
    }

    /// Drops `channel`'s oldest events past its policy's `history_max_events`, and those older
    /// than its `history_max_age`; the history is then complete only after them.
    fn trim_by_policy(&mut self, channel: &ChannelId) {
        let policy = self.policies.for_channel(channel.as_str());
        if policy.history_max_events.is_none() && policy.history_max_age.is_none() {
            return;
        }
        let Some(state) = self.channels.peek_mut(channel) else {
            return;
        };
        let max = policy.history_max_events.unwrap_or(usize::MAX);
        let cutoff = policy.history_max_age.map(|age| {
            let age = u64::try_from(age.as_micros()).unwrap_or(u64::MAX);
            (self.clock)().saturating_sub(age)
        });
        let mut freed = 0;
        while let Some(oldest) = state.events.front() {
            let too_old = cutoff.is_some_and(|cutoff| oldest.ts.as_micros() < cutoff);
            if state.events.len() <= max && !too_old {
                break;
            }
            freed += state.pop_oldest();
        }
        self.total_bytes -= freed;
    }

    /// Keeps each channel's idempotency keys within `bounds`.
    pub fn set_window(&mut self, bounds: idempotency::Bounds) {
        self.window = bounds;
    }

    /// [`Store::append`], once per idempotency `key`: a key in the channel's window is answered
    /// with the ts its publish was given, and nothing is stored. Returns the ts and whether the
    /// event was appended.
    pub fn append_once(
        &mut self,
        channel: &ChannelId,
        body: &EventBody,
        now_micros: u64,
        key: Option<&str>,
    ) -> (Ts, bool) {
        if let Some(ts) = key.and_then(|key| self.seen(channel, key, now_micros)) {
            return (ts, false);
        }
        let ts = self.next_ts(channel, now_micros);
        self.store_event(channel, ts, body, key, now_micros);
        (ts, true)
    }

    /// Runs `f` on `channel`'s window (made first when `create`; `None` when there is none, or
    /// no such channel), counting what it adds or frees against the budget. A window left
    /// empty is dropped.
    fn in_window<T>(
        &mut self,
        channel: &ChannelId,
        create: bool,
        f: impl FnOnce(&mut Window, &idempotency::Bounds) -> T,
    ) -> Option<T> {
        let state = self.channels.peek_mut(channel)?;
        if state.recent.is_none() && !create {
            return None;
        }
        let window = state.recent.get_or_insert_default();
        let before = window.counted();
        let out = f(window, &self.window);
        let after = window.counted();
        if after == 0 {
            state.recent = None;
        }
        self.total_bytes = self.total_bytes + after - before;
        Some(out)
    }

    /// Assigns `body` the channel's next ts at wall-clock `now_micros`, stores a copy of it
    /// (packed in one allocation), and returns the ts.
    pub fn append(&mut self, channel: &ChannelId, body: &EventBody, now_micros: u64) -> Ts {
        let ts = self.next_ts(channel, now_micros);
        self.store_event(channel, ts, body, None, now_micros);
        ts
    }

    /// The ts `key` was given in `channel`'s window at `now_micros`, if it is there.
    pub fn seen(&mut self, channel: &ChannelId, key: &str, now_micros: u64) -> Option<Ts> {
        self.in_window(channel, false, |w, bounds| w.get(key, now_micros, bounds))
            .flatten()
    }

    /// Gives `channel` its next ts at wall-clock `now_micros` without storing an event: the
    /// event is stored by [`Store::store_event`] once its followers have it.
    pub fn next_ts(&mut self, channel: &ChannelId, now_micros: u64) -> Ts {
        let (state, created) = self.channel_mut(channel);
        let ts = state.clock.next(now_micros);
        if created {
            self.total_bytes += CHANNEL_OVERHEAD;
            self.evict_over_budget(channel);
        }
        ts
    }

    /// `channel`'s state, made (its clock after its slot's floor) if it was not held; whether
    /// it was made.
    fn channel_mut(&mut self, channel: &ChannelId) -> (&mut Channel, bool) {
        let floor = self.slot_floor[usize::from(slot_of(channel))];
        let mut created = false;
        let state = self.channels.get_or_insert_mut(channel.clone(), || {
            created = true;
            Channel::new(TsClock::starting_after(floor), Ts::default())
        });
        (state, created)
    }

    /// Stores `body` at `ts` in `channel`'s history, in ts order (an event already there at
    /// `ts`, or older than what was trimmed, is not stored twice), with its idempotency `key`
    /// seen at `seen_micros`; the channel's clock is raised to at least `ts`. The primary
    /// stores an event its [`Store::next_ts`] gave once replicated; a follower stores what its
    /// primary replicated.
    pub fn store_event(
        &mut self,
        channel: &ChannelId,
        ts: Ts,
        body: &EventBody,
        key: Option<&str>,
        seen_micros: u64,
    ) {
        let limits = self.limits;
        let (state, created) = self.channel_mut(channel);
        if state.clock.last() < ts {
            state.clock = TsClock::starting_after(ts);
        }
        let event = Packed::pack(ts, body);
        let size = event.counted();
        let freed = match state.events.back() {
            None => Some(state.push(event, &limits)),
            Some(last) if last.ts < ts => Some(state.push(event, &limits)),
            Some(_) => state.insert(event, &limits),
        };
        if created {
            self.total_bytes += CHANNEL_OVERHEAD;
        }
        if let Some(freed) = freed {
            self.total_bytes = self.total_bytes + size - freed;
        }
        self.trim_by_policy(channel);
        if let Some(key) = key
            && self.window.keys > 0
        {
            self.in_window(channel, true, |w, bounds| {
                w.insert(key, ts, seen_micros, bounds)
            });
        }
        self.evict_over_budget(channel);
    }

    /// Evicts least-recently-used channels (never `keep`) until under the total budget.
    fn evict_over_budget(&mut self, keep: &ChannelId) {
        while self.total_bytes > self.limits.total_bytes {
            let Some((id, _)) = self.channels.peek_lru() else {
                return;
            };
            if id == keep {
                return;
            }
            if let Some((id, state)) = self.channels.pop_lru() {
                self.forget(&id, &state);
                self.evictions += 1;
            }
        }
    }

    /// A channel leaves the store (evicted, dropped, handed off): its slot's floor keeps its
    /// last ts, so a channel that comes back continues after it and says its history is
    /// incomplete before it.
    fn forget(&mut self, id: &ChannelId, state: &Channel) {
        let floor = &mut self.slot_floor[usize::from(slot_of(id))];
        *floor = (*floor).max(state.clock.last());
        self.uncount(state);
    }

    /// A channel's bytes no longer count against the budget.
    fn uncount(&mut self, state: &Channel) {
        self.total_bytes -= state.bytes + CHANNEL_OVERHEAD + recent_bytes(state);
    }

    /// The channel's newest ts, without touching its recency.
    pub fn head(&self, channel: &ChannelId) -> Option<Ts> {
        self.channels
            .peek(channel)
            .and_then(|c| c.events.back())
            .map(|e| e.ts)
    }

    /// How many events `channel` holds and its oldest one's ts, without touching its recency.
    pub fn extent(&self, channel: &ChannelId) -> (usize, Option<Ts>) {
        self.channels.peek(channel).map_or((0, None), |c| {
            (c.events.len(), c.events.front().map(|e| e.ts))
        })
    }

    /// Up to `limit` events strictly after `since` (all retained events when `None`).
    pub fn history(&mut self, channel: &ChannelId, since: Option<Ts>, limit: usize) -> HistoryPage {
        self.trim_by_policy(channel);
        let floor = self.slot_floor[usize::from(slot_of(channel))];
        let Some(state) = self.channels.get(channel) else {
            return HistoryPage {
                complete_after: floor,
                ..HistoryPage::default()
            };
        };
        let start = match since {
            Some(since) => state.events.partition_point(|e| e.ts <= since),
            None => 0,
        };
        let taken = limit.min(state.events.len() - start);
        let events: Vec<Stored> = state
            .events
            .range(start..start + taken)
            .filter_map(Packed::unpack)
            .collect();
        HistoryPage {
            has_more: state.events.len() - start > taken,
            oldest: state.events.front().map(|e| e.ts),
            complete_after: floor.max(state.trimmed),
            events,
        }
    }

    /// The ts after which `channel`'s history here is complete: events at or before it may be
    /// gone (trimmed, evicted, lost with a node, or never handed over).
    pub fn complete_after(&self, channel: &ChannelId) -> Ts {
        let floor = self.slot_floor[usize::from(slot_of(channel))];
        self.channels
            .peek(channel)
            .map_or(floor, |c| floor.max(c.trimmed))
    }

    /// A gateway delivered `channel`'s events up to `delivered` (from this node or an earlier
    /// owner). If this store never handed out that ts, it does not know what came at or just
    /// after it either: its clock and history floor jump to just past it, so the next ts is
    /// above every ts a gateway delivered (a gateway drops those at or below its last), and
    /// the history says it is complete only after the floor (every gateway, the reporting one
    /// too, tells its connections `history_gap`). Returns the new floor when it jumped.
    pub fn raise_floor(&mut self, channel: &ChannelId, delivered: Ts) -> Option<Ts> {
        let floor = Ts::from_micros(delivered.as_micros().saturating_add(1));
        let slot_floor = self.slot_floor[usize::from(slot_of(channel))];
        if let Some(state) = self.channels.peek_mut(channel) {
            if delivered <= state.clock.last() {
                return None;
            }
            state.clock = TsClock::starting_after(floor);
            state.trimmed = state.trimmed.max(floor);
        } else {
            if delivered <= slot_floor {
                return None;
            }
            let state = Channel::new(TsClock::starting_after(floor), floor);
            self.channels.put(channel.clone(), state);
            self.total_bytes += CHANNEL_OVERHEAD;
            self.evict_over_budget(channel);
        }
        Some(self.complete_after(channel))
    }

    /// The newest ts of any channel evicted or dropped from `slot` here (see `slot_floor`).
    pub fn slot_floor(&self, slot: Slot) -> Ts {
        self.slot_floor[usize::from(slot)]
    }

    /// Nothing of `slot` before `ts` is known here: its channels' state was lost (their
    /// previous owner died without handing them over).
    pub fn mark_unknown_before(&mut self, slot: Slot, ts: Ts) {
        let floor = &mut self.slot_floor[usize::from(slot)];
        *floor = (*floor).max(ts);
    }

    /// Drops every channel of the slots for which `lost` is true (their ownership moved away).
    pub fn drop_slots(&mut self, lost: impl Fn(Slot) -> bool) -> usize {
        let gone: Vec<ChannelId> = self
            .channels
            .iter()
            .filter(|(id, _)| lost(slot_of(id)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            if let Some(state) = self.channels.pop(id) {
                self.forget(id, &state);
            }
        }
        gone.len()
    }

    /// Removes and returns the channels of the slots for which `moved` is true, for a handoff.
    pub fn take_slots(&mut self, moved: impl Fn(Slot) -> bool) -> Vec<Snapshot> {
        let ids: Vec<ChannelId> = self
            .channels
            .iter()
            .filter(|(id, _)| moved(slot_of(id)))
            .map(|(id, _)| id.clone())
            .collect();
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(state) = self.channels.pop(&id) {
                self.forget(&id, &state);
                taken.push(snapshot(&id, &state));
            }
        }
        taken
    }

    /// Copies of the channels of the slots for which `copied` is true, held on (a follower's
    /// catch-up, or a handoff of a slot this node goes on following).
    pub fn copy_slots(&self, copied: impl Fn(Slot) -> bool) -> Vec<Snapshot> {
        self.channels
            .iter()
            .filter(|(id, _)| copied(slot_of(id)))
            .map(|(id, state)| snapshot(id, state))
            .collect()
    }

    /// Takes in a channel handed over by its previous owner: its clock continues after both
    /// owners' last ts, and its history is the union of both, in ts order, within the bounds.
    pub fn absorb(&mut self, snapshot: Snapshot) {
        let Snapshot {
            channel,
            last_ts,
            events,
            trimmed,
            recent,
        } = snapshot;
        let floor = self.slot_floor[usize::from(slot_of(&channel))];
        let mut merged: Vec<Packed> = events.iter().map(|e| Packed::pack(e.ts, &e.body)).collect();
        let mut clock = TsClock::starting_after(floor.max(last_ts));
        let mut trimmed = trimmed;
        let mut window = None;
        if let Some(mut existing) = self.channels.pop(&channel) {
            window = existing.recent.take();
            trimmed = trimmed.max(existing.trimmed);
            // Merged, not lost: the slot's floor stays where it was.
            self.uncount(&existing);
            clock = TsClock::starting_after(clock.last().max(existing.clock.last()));
            merged.extend(existing.events);
            merged.sort_by_key(|e| e.ts);
            merged.dedup_by_key(|e| e.ts);
        }
        let mut state = Channel::new(clock, trimmed);
        for event in merged {
            state.push(event, &self.limits);
        }
        if !recent.is_empty() || window.is_some() {
            let mut window = window.unwrap_or_default();
            window.merge(recent, &self.window);
            state.recent = Some(window);
        }
        self.total_bytes += state.bytes + CHANNEL_OVERHEAD + recent_bytes(&state);
        self.channels.put(channel.clone(), state);
        self.evict_over_budget(&channel);
    }

    /// Channels held.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// Whether no channel is held.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Bytes counted against the total budget.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Channels evicted for the total budget so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::UserId;
    use proptest::prelude::*;

    fn c(s: &str) -> ChannelId {
        ChannelId::new(s).unwrap()
    }

    fn msg(text: &str) -> EventBody {
        EventBody::Message {
            user: UserId::new("U1").unwrap(),
            text: text.into(),
            team: None,
        }
    }

    #[test]
    fn ts_are_unique_and_increasing_per_channel() {
        let mut store = Store::new(Limits::default());
        let a = store.append(&c("C1"), &msg("a"), 1_000);
        let b = store.append(&c("C1"), &msg("b"), 1_000);
        let x = store.append(&c("C2"), &msg("x"), 1_000);
        assert!(a < b);
        assert_eq!(x, a, "another channel has its own clock");
        assert_eq!(store.head(&c("C1")), Some(b));
    }

    #[test]
    fn history_is_bounded_by_count_and_bytes() {
        let limits = Limits {
            history_events: 3,
            history_bytes: 3 * (EVENT_OVERHEAD + 40),
            total_bytes: usize::MAX,
        };
        let mut store = Store::new(limits);
        for i in 0..5 {
            store.append(&c("C1"), &msg(&format!("m{i}")), 1_000 + i);
        }
        let page = store.history(&c("C1"), None, 100);
        let texts: Vec<_> = page
            .events
            .iter()
            .map(|e| match &e.body {
                EventBody::Message { text, .. } => text.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(texts, ["m2", "m3", "m4"]);
        store.append(&c("C1"), &msg(&"x".repeat(300)), 2_000);
        assert_eq!(store.history(&c("C1"), None, 100).events.len(), 1);
    }

    /// The clock of [`history_is_bounded_by_each_channels_policy`], in microseconds.
    static POLICY_CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    fn policy_clock() -> u64 {
        POLICY_CLOCK.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn history_is_bounded_by_each_channels_policy() {
        use mesh_core::policy::Policies;
        let policies = SharedPolicies::new(
            Policies::parse(
                "[[channel]]\nmatch = \"CFEW*\"\nhistory_max_events = 2\n\
                 [[channel]]\nmatch = \"COLD*\"\nhistory_max_age = 10\n",
            )
            .unwrap(),
        );
        let mut store = Store::new(Limits::default());
        store.set_policies(policies.clone(), policy_clock);
        let sec = 1_000_000;
        POLICY_CLOCK.store(100 * sec, std::sync::atomic::Ordering::Relaxed);
        for (i, channel) in ["CFEW1", "COLD1", "COTHER"].iter().enumerate() {
            for n in 0..5 {
                let at = (80 + 5 * n) * sec + i as u64;
                store.append(&c(channel), &msg(&format!("m{n}")), at);
            }
        }
        let held =
            |store: &mut Store, channel: &str| store.history(&c(channel), None, 100).events.len();
        // Two kept of CFEW1; COLD1's events of 80 s and 85 s are over 10 s old at 100 s.
        assert_eq!(held(&mut store, "CFEW1"), 2);
        assert_eq!(held(&mut store, "COLD1"), 3);
        assert_eq!(held(&mut store, "COTHER"), 5);
        let page = store.history(&c("CFEW1"), None, 100);
        // Complete only after the newest event trimmed (m2, at 90 s).
        assert_eq!(page.complete_after, Ts::from_micros(90 * sec));
        // Time passes: a read trims too.
        POLICY_CLOCK.store(106 * sec, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(held(&mut store, "COLD1"), 1);
        // A reload lowers a bound: the next read honours it; the bytes freed are uncounted.
        let before = store.total_bytes();
        policies.replace(
            Policies::parse("[[channel]]\nmatch = \"COTHER\"\nhistory_max_events = 1\n").unwrap(),
        );
        assert_eq!(held(&mut store, "COTHER"), 1);
        assert!(store.total_bytes() < before);
    }

    #[test]
    fn history_pages_after_since() {
        let mut store = Store::new(Limits::default());
        let ts: Vec<Ts> = (0..5)
            .map(|i| store.append(&c("C1"), &msg("m"), 10 + i))
            .collect();
        let page = store.history(&c("C1"), Some(ts[1]), 2);
        assert_eq!(
            page.events.iter().map(|e| e.ts).collect::<Vec<_>>(),
            &ts[2..4]
        );
        assert!(page.has_more);
        assert_eq!(page.oldest, Some(ts[0]));
        let rest = store.history(&c("C1"), Some(ts[3]), 10);
        assert_eq!(rest.events.len(), 1);
        assert!(!rest.has_more);
    }

    #[test]
    fn evicts_idle_channels_and_keeps_ts_increasing() {
        let limits = Limits {
            history_events: 10,
            history_bytes: usize::MAX,
            total_bytes: 4 * (CHANNEL_OVERHEAD + EVENT_OVERHEAD + 10),
        };
        let mut store = Store::new(limits);
        let first = store.append(&c("C0"), &msg("a"), 5_000_000);
        for i in 1..10 {
            store.append(&c(&format!("C{i}")), &msg("a"), 1_000);
        }
        assert!(store.evictions() > 0);
        assert!(store.total_bytes() <= limits.total_bytes);
        assert_eq!(
            store.head(&c("C0")),
            None,
            "the least recently used went first"
        );
        // C0 comes back with a wall clock behind its old ts: still after it.
        assert!(store.append(&c("C0"), &msg("b"), 1_000) > first);
    }

    #[test]
    fn a_handed_over_channel_keeps_its_history_and_its_clock() {
        let mut old = Store::new(Limits::default());
        let a = old.append(&c("C1"), &msg("a"), 5_000);
        let b = old.append(&c("C1"), &msg("b"), 5_000);
        old.append(&c("C2"), &msg("x"), 5_000);
        let slot = slot_of(&c("C1"));
        let mut taken = old.take_slots(|s| s == slot);
        assert_eq!(taken.len(), 1);
        assert_eq!(old.head(&c("C1")), None);
        let mut new = Store::new(Limits::default());
        // The new owner already took a post during the move, with an earlier wall clock.
        let early = new.append(&c("C1"), &msg("early"), 4_000);
        new.absorb(taken.remove(0));
        let ts: Vec<Ts> = new
            .history(&c("C1"), None, 10)
            .events
            .iter()
            .map(|e| e.ts)
            .collect();
        assert_eq!(ts, vec![early, a, b]);
        assert!(
            new.append(&c("C1"), &msg("c"), 1) > b,
            "the clock continues after the old owner's"
        );
    }

    #[test]
    fn a_copy_merged_into_a_channel_held_keeps_its_history_complete() {
        // A follower holds what was replicated live; the owner's catch-up (or handoff) of the
        // same channel merges in: nothing was lost, so nothing says so.
        let mut owner = Store::new(Limits::default());
        let a = owner.append(&c("C1"), &msg("a"), 5_000);
        let b = owner.append(&c("C1"), &msg("b"), 5_001);
        let slot = slot_of(&c("C1"));
        let copy = owner.copy_slots(|s| s == slot).remove(0);
        let mut follower = Store::new(Limits::default());
        follower.store_event(&c("C1"), b, &msg("b"), None, 5_001);
        follower.absorb(copy);
        let page = follower.history(&c("C1"), None, 10);
        let ts: Vec<Ts> = page.events.iter().map(|e| e.ts).collect();
        assert_eq!(ts, vec![a, b]);
        assert_eq!(
            page.complete_after,
            Ts::default(),
            "complete from the start"
        );
        assert_eq!(follower.complete_after(&c("C1")), Ts::default());
    }

    #[test]
    fn a_floor_raised_past_the_clock_keeps_ts_above_it_and_history_incomplete_before_it() {
        let mut store = Store::new(Limits::default());
        let first = store.append(&c("C1"), &msg("a"), 1_000);
        assert_eq!(store.raise_floor(&c("C1"), first), None, "delivered here");
        let (delivered, floor) = (Ts::from_micros(10_000), Ts::from_micros(10_001));
        assert_eq!(store.raise_floor(&c("C1"), delivered), Some(floor));
        assert_eq!(store.raise_floor(&c("C1"), delivered), None, "once");
        assert!(store.append(&c("C1"), &msg("b"), 1) > floor);
        let page = store.history(&c("C1"), None, 10);
        assert_eq!(
            page.complete_after, floor,
            "what followed it is not known here"
        );
        assert_eq!(page.events.len(), 2, "what is held stays");
        // A channel this store does not hold starts after the ts delivered.
        let elsewhere = Ts::from_micros(7);
        let floor = Ts::from_micros(8);
        assert_eq!(store.raise_floor(&c("C2"), elsewhere), Some(floor));
        assert_eq!(store.complete_after(&c("C2")), floor);
        assert!(store.append(&c("C2"), &msg("x"), 1) > floor);
    }

    #[test]
    fn a_raised_floor_is_not_lowered_by_trimming_older_events() {
        let limits = Limits {
            history_events: 2,
            ..Limits::default()
        };
        let mut store = Store::new(limits);
        let a = store.append(&c("C1"), &msg("a"), 100);
        store.append(&c("C1"), &msg("b"), 200);
        let floor = store.raise_floor(&c("C1"), Ts::from_micros(1_000)).unwrap();
        // The events held from before the floor are trimmed one by one by newer ones.
        store.append(&c("C1"), &msg("c"), 1);
        assert!(
            store
                .history(&c("C1"), None, 10)
                .events
                .iter()
                .all(|e| e.ts != a)
        );
        assert_eq!(store.complete_after(&c("C1")), floor);
    }

    #[test]
    fn dropping_slots_forgets_their_channels() {
        let mut store = Store::new(Limits::default());
        store.append(&c("C1"), &msg("a"), 1);
        store.append(&c("C2"), &msg("a"), 1);
        let slot = slot_of(&c("C1"));
        assert_eq!(store.drop_slots(|s| s == slot), 1);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_full_history_has_no_slack() {
        for bound in [1, 3, 10, 100] {
            let limits = Limits {
                history_events: bound,
                ..Limits::default()
            };
            let mut store = Store::new(limits);
            for i in 0..(2 * bound as u64 + 5) {
                store.append(&c("C1"), &msg("m"), i);
            }
            let state = store.channels.peek(&c("C1")).unwrap();
            assert_eq!(state.events.len(), bound);
            assert_eq!(state.events.capacity(), bound, "bound {bound}");
        }
    }

    #[test]
    fn a_publish_seen_before_gets_its_first_ts_and_is_stored_once() {
        let mut store = Store::new(Limits::default());
        let (first, fresh) = store.append_once(&c("C1"), &msg("a"), 1_000, Some("k1"));
        assert!(fresh);
        let (again, fresh) = store.append_once(&c("C1"), &msg("a"), 2_000, Some("k1"));
        assert_eq!((again, fresh), (first, false));
        // Another channel's window is its own; no key, no window.
        assert!(store.append_once(&c("C2"), &msg("a"), 2_000, Some("k1")).1);
        assert!(store.append_once(&c("C1"), &msg("b"), 2_000, None).1);
        assert!(store.append_once(&c("C1"), &msg("b"), 2_000, None).1);
        assert_eq!(store.history(&c("C1"), None, 10).events.len(), 3);
        // Past the window's age the key is new again.
        store.set_window(idempotency::Bounds {
            keys: 10,
            age: std::time::Duration::from_secs(1),
        });
        assert!(
            store
                .append_once(&c("C1"), &msg("a"), 1_002_000, Some("k1"))
                .1
        );
    }

    #[test]
    fn a_handed_over_channel_keeps_its_idempotency_keys() {
        let mut old = Store::new(Limits::default());
        let (ts, _) = old.append_once(&c("C1"), &msg("a"), 5_000, Some("k1"));
        let slot = slot_of(&c("C1"));
        let mut taken = old.take_slots(|s| s == slot);
        assert_eq!(taken[0].recent.len(), 1);
        let mut new = Store::new(Limits::default());
        new.absorb(taken.remove(0));
        assert_eq!(
            new.append_once(&c("C1"), &msg("a"), 6_000, Some("k1")),
            (ts, false),
            "a retry that reaches the new owner"
        );
        assert_eq!(new.history(&c("C1"), None, 10).events.len(), 1);
    }

    #[test]
    fn idempotency_keys_count_against_the_budget_until_they_go() {
        let mut store = Store::new(Limits::default());
        store.set_window(idempotency::Bounds {
            keys: 10,
            age: std::time::Duration::from_secs(1),
        });
        // What the channels hold, counted from scratch.
        let counted = |store: &Store| -> usize {
            store
                .channels
                .iter()
                .map(|(_, s)| s.bytes + CHANNEL_OVERHEAD + recent_bytes(s))
                .sum()
        };
        store.append_once(&c("C1"), &msg("a"), 1_000, None);
        let plain = store.total_bytes();
        store.append_once(&c("C2"), &msg("a"), 1_000, Some("k1"));
        store.append_once(&c("C2"), &msg("b"), 1_000, Some("k2"));
        assert_eq!(store.total_bytes(), counted(&store));
        let window = |store: &Store| recent_bytes(store.channels.peek(&c("C2")).unwrap());
        let two_keys = window(&store);
        assert!(two_keys > 0);
        // Past the age: the two keys leave, the new one stays.
        store.append_once(&c("C2"), &msg("c"), 2_000_000, Some("k3"));
        assert!(window(&store) < two_keys);
        assert_eq!(store.total_bytes(), counted(&store));
        let slot = slot_of(&c("C2"));
        store.drop_slots(|s| s == slot);
        assert_eq!(
            store.total_bytes(),
            plain,
            "the channel and its window gone"
        );
    }

    proptest! {
        /// Against a naive model (a plain Vec per channel, trimmed to the last N): the store
        /// returns the same events in the same order, and the byte count matches its contents.
        #[test]
        fn matches_a_naive_model(ops in proptest::collection::vec((0u8..4, 0usize..50, 0u64..100), 1..200)) {
            let limits = Limits { history_events: 5, history_bytes: usize::MAX, total_bytes: usize::MAX };
            let mut store = Store::new(limits);
            let mut model: std::collections::HashMap<String, Vec<(Ts, String)>> = Default::default();
            for (ch, len, now) in ops {
                let id = format!("C{ch}");
                let text = "t".repeat(len);
                let ts = store.append(&c(&id), &msg(&text), now);
                let entry = model.entry(id.clone()).or_default();
                if let Some((last, _)) = entry.last() { prop_assert!(ts > *last); }
                entry.push((ts, text));
                if entry.len() > 5 { entry.remove(0); }
                let got: Vec<(Ts, String)> = store.history(&c(&id), None, 100).events.into_iter()
                    .map(|e| match e.body { EventBody::Message { text, .. } => (e.ts, text), _ => unreachable!() })
                    .collect();
                prop_assert_eq!(&got, entry);
            }
            let counted = |t: &str| Packed::pack(Ts::default(), &msg(t)).counted();
            let expected: usize = model.values().map(|v| CHANNEL_OVERHEAD + v.iter().map(|(_, t)| counted(t)).sum::<usize>()).sum();
            prop_assert_eq!(store.total_bytes(), expected);
        }
    }
}
