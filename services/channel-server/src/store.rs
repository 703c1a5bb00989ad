//! A channel server's channel state: ts clocks and bounded history, with idle channels evicted
//! least-recently-used first when the whole store passes its memory budget.
//!
//! Pure data structure: no I/O, no locks; the service wraps it in shards.

use std::collections::VecDeque;

use lru::LruCache;
use mesh_core::{ChannelId, EventBody, SLOT_COUNT, Slot, Ts, TsClock, slot_of};

/// Default: events kept per channel.
pub const DEFAULT_HISTORY_EVENTS: usize = 100;
/// Default: bytes of events kept per channel.
pub const DEFAULT_HISTORY_BYTES: usize = 256 * 1024;
/// Default: bytes of history across all channels of one store.
pub const DEFAULT_TOTAL_BYTES: usize = 1024 * 1024 * 1024;

/// Fixed cost counted per stored event on top of its heap size (ts, enum, deque slot).
const EVENT_OVERHEAD: usize = 96;
/// Fixed cost counted per channel (id, LRU node, clock, deque header).
const CHANNEL_OVERHEAD: usize = 160;

/// A store's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Events kept per channel; older ones are dropped first.
    pub history_events: usize,
    /// Bytes kept per channel (as counted by [`EventBody::heap_size`] plus a fixed overhead).
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
    /// Each event with the bytes it counts for.
    events: VecDeque<(Stored, usize)>,
    /// Bytes of `events` (the channel's own overhead is counted only in the store's total).
    bytes: usize,
    /// The newest ts dropped from `events` to stay within the bounds.
    trimmed: Ts,
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
        }
    }

    /// Assigns `body` the channel's next ts at wall-clock `now_micros`, stores it, and returns
    /// the ts.
    pub fn append(&mut self, channel: &ChannelId, body: EventBody, now_micros: u64) -> Ts {
        let size = body.heap_size() + EVENT_OVERHEAD;
        let floor = self.slot_floor[usize::from(slot_of(channel))];
        let mut created = false;
        let state = self.channels.get_or_insert_mut(channel.clone(), || {
            created = true;
            Channel {
                clock: TsClock::starting_after(floor),
                events: VecDeque::new(),
                bytes: 0,
                trimmed: Ts::default(),
            }
        });
        let ts = state.clock.next(now_micros);
        state.events.push_back((Stored { ts, body }, size));
        state.bytes += size;
        let mut freed = 0;
        while state.events.len() > self.limits.history_events
            || (state.bytes > self.limits.history_bytes && state.events.len() > 1)
        {
            if let Some((e, s)) = state.events.pop_front() {
                state.bytes -= s;
                state.trimmed = e.ts;
                freed += s;
            }
        }
        if created {
            self.total_bytes += CHANNEL_OVERHEAD;
        }
        self.total_bytes = self.total_bytes + size - freed;
        self.evict_over_budget(channel);
        ts
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

    fn forget(&mut self, id: &ChannelId, state: &Channel) {
        let floor = &mut self.slot_floor[usize::from(slot_of(id))];
        *floor = (*floor).max(state.clock.last());
        self.total_bytes -= state.bytes + CHANNEL_OVERHEAD;
    }

    /// The channel's newest ts, without touching its recency.
    pub fn head(&self, channel: &ChannelId) -> Option<Ts> {
        self.channels
            .peek(channel)
            .and_then(|c| c.events.back())
            .map(|(e, _)| e.ts)
    }

    /// Up to `limit` events strictly after `since` (all retained events when `None`).
    pub fn history(&mut self, channel: &ChannelId, since: Option<Ts>, limit: usize) -> HistoryPage {
        let floor = self.slot_floor[usize::from(slot_of(channel))];
        let Some(state) = self.channels.get(channel) else {
            return HistoryPage {
                complete_after: floor,
                ..HistoryPage::default()
            };
        };
        let start = match since {
            Some(since) => state.events.partition_point(|(e, _)| e.ts <= since),
            None => 0,
        };
        let events: Vec<Stored> = state
            .events
            .iter()
            .skip(start)
            .take(limit)
            .map(|(e, _)| e.clone())
            .collect();
        HistoryPage {
            has_more: state.events.len() - start > events.len(),
            oldest: state.events.front().map(|(e, _)| e.ts),
            complete_after: floor.max(state.trimmed),
            events,
        }
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
                taken.push(Snapshot {
                    last_ts: state.clock.last(),
                    trimmed: state.trimmed,
                    events: state.events.into_iter().map(|(e, _)| e).collect(),
                    channel: id,
                });
            }
        }
        taken
    }

    /// Takes in a channel handed over by its previous owner: its clock continues after both
    /// owners' last ts, and its history is the union of both, in ts order, within the bounds.
    pub fn absorb(&mut self, snapshot: Snapshot) {
        let Snapshot {
            channel,
            last_ts,
            events,
            trimmed,
        } = snapshot;
        let floor = self.slot_floor[usize::from(slot_of(&channel))];
        let mut merged: Vec<Stored> = events;
        let mut clock = TsClock::starting_after(floor.max(last_ts));
        let mut trimmed = trimmed;
        if let Some(existing) = self.channels.pop(&channel) {
            trimmed = trimmed.max(existing.trimmed);
            self.forget(&channel, &existing);
            clock = TsClock::starting_after(clock.last().max(existing.clock.last()));
            merged.extend(existing.events.into_iter().map(|(e, _)| e));
            merged.sort_by_key(|e| e.ts);
            merged.dedup_by_key(|e| e.ts);
        }
        let mut state = Channel {
            clock,
            events: VecDeque::new(),
            bytes: 0,
            trimmed,
        };
        for event in merged {
            let size = event.body.heap_size() + EVENT_OVERHEAD;
            state.bytes += size;
            state.events.push_back((event, size));
        }
        while state.events.len() > self.limits.history_events
            || (state.bytes > self.limits.history_bytes && state.events.len() > 1)
        {
            if let Some((e, s)) = state.events.pop_front() {
                state.bytes -= s;
                state.trimmed = e.ts;
            }
        }
        self.total_bytes += state.bytes + CHANNEL_OVERHEAD;
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
        let a = store.append(&c("C1"), msg("a"), 1_000);
        let b = store.append(&c("C1"), msg("b"), 1_000);
        let x = store.append(&c("C2"), msg("x"), 1_000);
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
            store.append(&c("C1"), msg(&format!("m{i}")), 1_000 + i);
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
        store.append(&c("C1"), msg(&"x".repeat(300)), 2_000);
        assert_eq!(store.history(&c("C1"), None, 100).events.len(), 1);
    }

    #[test]
    fn history_pages_after_since() {
        let mut store = Store::new(Limits::default());
        let ts: Vec<Ts> = (0..5)
            .map(|i| store.append(&c("C1"), msg("m"), 10 + i))
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
        let first = store.append(&c("C0"), msg("a"), 5_000_000);
        for i in 1..10 {
            store.append(&c(&format!("C{i}")), msg("a"), 1_000);
        }
        assert!(store.evictions() > 0);
        assert!(store.total_bytes() <= limits.total_bytes);
        assert_eq!(
            store.head(&c("C0")),
            None,
            "the least recently used went first"
        );
        // C0 comes back with a wall clock behind its old ts: still after it.
        assert!(store.append(&c("C0"), msg("b"), 1_000) > first);
    }

    #[test]
    fn a_handed_over_channel_keeps_its_history_and_its_clock() {
        let mut old = Store::new(Limits::default());
        let a = old.append(&c("C1"), msg("a"), 5_000);
        let b = old.append(&c("C1"), msg("b"), 5_000);
        old.append(&c("C2"), msg("x"), 5_000);
        let slot = slot_of(&c("C1"));
        let mut taken = old.take_slots(|s| s == slot);
        assert_eq!(taken.len(), 1);
        assert_eq!(old.head(&c("C1")), None);
        let mut new = Store::new(Limits::default());
        // The new owner already took a post during the move, with an earlier wall clock.
        let early = new.append(&c("C1"), msg("early"), 4_000);
        new.absorb(taken.remove(0));
        let ts: Vec<Ts> = new
            .history(&c("C1"), None, 10)
            .events
            .iter()
            .map(|e| e.ts)
            .collect();
        assert_eq!(ts, vec![early, a, b]);
        assert!(
            new.append(&c("C1"), msg("c"), 1) > b,
            "the clock continues after the old owner's"
        );
    }

    #[test]
    fn dropping_slots_forgets_their_channels() {
        let mut store = Store::new(Limits::default());
        store.append(&c("C1"), msg("a"), 1);
        store.append(&c("C2"), msg("a"), 1);
        let slot = slot_of(&c("C1"));
        assert_eq!(store.drop_slots(|s| s == slot), 1);
        assert_eq!(store.len(), 1);
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
                let ts = store.append(&c(&id), msg(&text), now);
                let entry = model.entry(id.clone()).or_default();
                if let Some((last, _)) = entry.last() { prop_assert!(ts > *last); }
                entry.push((ts, text));
                if entry.len() > 5 { entry.remove(0); }
                let got: Vec<(Ts, String)> = store.history(&c(&id), None, 100).events.into_iter()
                    .map(|e| match e.body { EventBody::Message { text, .. } => (e.ts, text), _ => unreachable!() })
                    .collect();
                prop_assert_eq!(&got, entry);
            }
            let expected: usize = model.values().map(|v| CHANNEL_OVERHEAD + v.iter().map(|(_, t)| t.len() + 2 + EVENT_OVERHEAD).sum::<usize>()).sum();
            prop_assert_eq!(store.total_bytes(), expected);
        }
    }
}
