//! A channel's window of recent idempotency keys: each key a publish carried, with the ts it
//! was given, so that a retried publish (the router's own retry after a timeout, later a web
//! app's or a client's re-send) is answered with the original ts instead of becoming a second
//! event.
//!
//! Pure data: no I/O, no locks, no clock of its own (callers pass the wall clock in
//! microseconds). Bounded twice: at most [`Bounds::keys`] keys per channel, the oldest dropped
//! first, and each key for [`Bounds::age`] after it was first seen. Expired keys leave when the
//! channel's window is next used, or with the channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::Ts;

/// Default: how long a key is remembered after it was first seen.
pub const DEFAULT_AGE: Duration = Duration::from_secs(5 * 60);
/// Default: keys remembered per channel; past it the oldest is forgotten first.
pub const DEFAULT_KEYS: usize = 1000;
/// The longest key taken, in bytes (a UUID is 36).
pub const MAX_KEY_BYTES: usize = 256;
/// Bytes counted per key on top of the key itself: its `Arc`'s header and the allocator's
/// rounding, its hash-table entry and its place in the order.
const KEY_OVERHEAD: usize = 96;
/// Bytes counted per window: its box, table and queue headers.
const WINDOW_OVERHEAD: usize = 96;

/// A window's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Keys kept per channel (0: none, idempotency off).
    pub keys: usize,
    /// How long a key is kept after it was first seen.
    pub age: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            keys: DEFAULT_KEYS,
            age: DEFAULT_AGE,
        }
    }
}

/// One remembered key: its publish's ts, and when the channel's owner first saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub key: Arc<str>,
    pub ts: Ts,
    /// Wall clock, microseconds since the Unix epoch.
    pub seen_micros: u64,
}

/// The recent keys of one channel.
#[derive(Debug, Default)]
pub struct Window {
    /// Oldest first.
    order: VecDeque<Seen>,
    /// The same keys, for lookup. Hashed with foldhash, seeded per process, rather than
    /// SipHash: every publish looks its key up, stores it and drops the oldest, and SipHash
    /// was most of that. The keys come from authenticated callers (the admin API's web app,
    /// the mesh's own routers), and a per-process seed keeps them from choosing collisions.
    ts: HashMap<Arc<str>, Ts, foldhash::fast::RandomState>,
    /// Bytes of the keys as counted ([`KEY_OVERHEAD`] plus the key each).
    bytes: usize,
}

impl Window {
    /// The ts `key` was given, if it is in the window at `now_micros`.
    pub fn get(&mut self, key: &str, now_micros: u64, bounds: &Bounds) -> Option<Ts> {
        self.expire(now_micros, bounds);
        self.ts.get(key).copied()
    }

    /// Remembers that `key` was given `ts` at `now_micros` (a key already there keeps its first
    /// ts), dropping what is past the bounds.
    pub fn insert(&mut self, key: &str, ts: Ts, now_micros: u64, bounds: &Bounds) {
        self.remember(
            Seen {
                key: Arc::from(key),
                ts,
                seen_micros: now_micros,
            },
            bounds,
        );
        self.expire(now_micros, bounds);
    }

    /// Adds `seen` at the new end unless its key is there already, then keeps the newest
    /// [`Bounds::keys`].
    fn remember(&mut self, seen: Seen, bounds: &Bounds) {
        if bounds.keys == 0 || self.ts.contains_key(&seen.key) {
            return;
        }
        self.ts.insert(seen.key.clone(), seen.ts);
        self.bytes += KEY_OVERHEAD + seen.key.len();
        self.order.push_back(seen);
        while self.order.len() > bounds.keys {
            self.pop_oldest();
        }
    }

    /// Drops the keys seen more than [`Bounds::age`] before `now_micros`.
    pub fn expire(&mut self, now_micros: u64, bounds: &Bounds) {
        let cutoff = now_micros.saturating_sub(bounds.age.as_micros() as u64);
        while self.order.front().is_some_and(|s| s.seen_micros < cutoff) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(seen) = self.order.pop_front() {
            self.ts.remove(&seen.key);
            self.bytes -= KEY_OVERHEAD + seen.key.len();
        }
    }

    /// Bytes the window counts against its store's budget (0 when it holds no key: an empty
    /// window is dropped).
    pub fn counted(&self) -> usize {
        match self.order.is_empty() {
            true => 0,
            false => WINDOW_OVERHEAD + self.bytes,
        }
    }

    /// Keys held, expired or not.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Every key held, oldest first (for a handoff).
    pub fn entries(&self) -> Vec<Seen> {
        self.order.iter().cloned().collect()
    }

    /// This window joined with `other`'s keys (a handed-over channel's), in the order first
    /// seen, within [`Bounds::keys`] (the expired leave on the next use).
    pub fn merge(&mut self, other: Vec<Seen>, bounds: &Bounds) {
        let mut all: Vec<Seen> = self.order.drain(..).chain(other).collect();
        self.ts.clear();
        self.bytes = 0;
        all.sort_by_key(|s| s.seen_micros);
        for seen in all {
            self.remember(seen, bounds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000;

    fn bounds(keys: usize, age_secs: u64) -> Bounds {
        Bounds {
            keys,
            age: Duration::from_secs(age_secs),
        }
    }

    fn ts(micros: u64) -> Ts {
        Ts::from_micros(micros)
    }

    #[test]
    fn the_same_key_answers_the_same_ts() {
        let b = Bounds::default();
        let mut w = Window::default();
        assert_eq!(w.get("k1", SECOND, &b), None);
        w.insert("k1", ts(5), SECOND, &b);
        w.insert("k2", ts(6), SECOND, &b);
        assert_eq!(w.get("k1", 2 * SECOND, &b), Some(ts(5)));
        // Seen again: the first ts stays.
        w.insert("k1", ts(9), 2 * SECOND, &b);
        assert_eq!(w.get("k1", 2 * SECOND, &b), Some(ts(5)));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn at_most_the_newest_keys_are_kept() {
        let b = bounds(3, 300);
        let mut w = Window::default();
        for i in 0..5u64 {
            w.insert(&format!("k{i}"), ts(i + 1), SECOND, &b);
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.counted(), WINDOW_OVERHEAD + 3 * (KEY_OVERHEAD + 2));
        assert_eq!(w.get("k0", SECOND, &b), None);
        assert_eq!(w.get("k1", SECOND, &b), None);
        assert_eq!(w.get("k4", SECOND, &b), Some(ts(5)));
        // Off: nothing is kept.
        let mut off = Window::default();
        off.insert("k", ts(1), SECOND, &bounds(0, 300));
        assert!(off.is_empty());
    }

    #[test]
    fn keys_expire_after_the_age() {
        let b = bounds(100, 300);
        let mut w = Window::default();
        w.insert("old", ts(1), 10 * SECOND, &b);
        w.insert("new", ts(2), 200 * SECOND, &b);
        assert_eq!(w.get("old", 310 * SECOND, &b), Some(ts(1)), "300 s exactly");
        assert_eq!(w.get("old", 311 * SECOND, &b), None);
        assert_eq!(w.get("new", 311 * SECOND, &b), Some(ts(2)));
        assert_eq!(w.len(), 1, "the expired key left");
        assert_eq!(w.get("new", 501 * SECOND, &b), None);
        assert!(w.is_empty());
        assert_eq!(w.counted(), 0);
    }

    #[test]
    fn a_merged_window_keeps_both_owners_keys_in_the_order_seen() {
        let b = bounds(3, 300);
        let mut w = Window::default();
        w.insert("a", ts(1), SECOND, &b);
        w.insert("c", ts(3), 3 * SECOND, &b);
        let mut old = Window::default();
        old.insert("b", ts(2), 2 * SECOND, &b);
        old.insert("z", ts(0), 0, &b);
        old.insert("a", ts(7), 2 * SECOND, &b);
        w.merge(old.entries(), &b);
        // Four distinct keys, three kept: the oldest seen ("z") goes.
        assert_eq!(w.len(), 3);
        assert_eq!(w.get("z", 4 * SECOND, &b), None);
        assert_eq!(w.get("a", 4 * SECOND, &b), Some(ts(1)));
        assert_eq!(w.get("b", 4 * SECOND, &b), Some(ts(2)));
        assert_eq!(w.get("c", 4 * SECOND, &b), Some(ts(3)));
    }
}
