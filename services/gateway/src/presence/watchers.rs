//! Local watchers: which of this gateway's connections watch which users (`presence_sub`), the
//! presence last heard of each watched user, and the `presence_change` frames that tell them.
//! A user is watched on their presence server once, however many local connections watch them.

use std::collections::{HashMap, HashSet};

use axum::extract::ws::Utf8Bytes;
use mesh_core::UserId;

use crate::outbox::ConnSink;
use crate::vocab::{ConnId, Outbound};

/// A local client that watches users.
#[derive(Debug)]
struct Watcher {
    sink: ConnSink,
    /// It connected with `batch_presence_aware=1`.
    batch: bool,
    watching: HashSet<UserId>,
}

/// Every local watcher, by connection and by watched user.
#[derive(Debug, Default)]
pub(super) struct Watchers {
    /// Local connections watching each user.
    by_user: HashMap<UserId, HashSet<ConnId>>,
    conns: HashMap<ConnId, Watcher>,
    /// The last presence heard per watched user.
    known: HashMap<UserId, bool>,
}

impl Watchers {
    /// Users watched by at least one local connection.
    pub(super) fn users(&self) -> impl Iterator<Item = &UserId> {
        self.by_user.keys()
    }

    /// How many users are watched.
    pub(super) fn len(&self) -> usize {
        self.by_user.len()
    }

    /// A connection opened; `batch`: it takes the batch form of `presence_change`.
    pub(super) fn connected(&mut self, sink: &ConnSink, batch: bool) {
        self.conns.insert(
            sink.id,
            Watcher {
                sink: sink.clone(),
                batch,
                watching: HashSet::new(),
            },
        );
    }

    /// Connection `conn` closed; returns the users nobody here watches any more.
    pub(super) fn disconnected(&mut self, conn: ConnId) -> Vec<UserId> {
        match self.conns.remove(&conn) {
            Some(watcher) => {
                let watching: Vec<UserId> = watcher.watching.into_iter().collect();
                self.unwatch(conn, &watching)
            }
            None => Vec::new(),
        }
    }

    /// `presence_sub`: `conn` now watches exactly `ids`. Newly watched users' known presence
    /// is pushed to it at once. Returns the users to watch on their presence servers (nobody
    /// here watched them) and those to unwatch (nobody here watches them any more).
    pub(super) fn subscribe(
        &mut self,
        conn: ConnId,
        ids: Vec<UserId>,
    ) -> (Vec<UserId>, Vec<UserId>) {
        let Some(watcher) = self.conns.get_mut(&conn) else {
            return (Vec::new(), Vec::new());
        };
        let new: HashSet<UserId> = ids.into_iter().collect();
        let old = std::mem::replace(&mut watcher.watching, new.clone());
        let gone: Vec<UserId> = old.difference(&new).cloned().collect();
        let added: Vec<UserId> = new.difference(&old).cloned().collect();
        let unwatched = self.unwatch(conn, &gone);
        let mut first = Vec::new();
        let mut known = Vec::new();
        for user in added {
            let watchers = self.by_user.entry(user.clone()).or_default();
            watchers.insert(conn);
            if watchers.len() == 1 {
                first.push(user);
            } else if let Some(active) = self.known.get(&user) {
                known.push((user, *active));
            }
        }
        self.answer(conn, &known);
        (first, unwatched)
    }

    /// Takes `conn` off `users`' watchers; returns those left with none.
    fn unwatch(&mut self, conn: ConnId, users: &[UserId]) -> Vec<UserId> {
        let mut last = Vec::new();
        for user in users {
            let Some(watchers) = self.by_user.get_mut(user) else {
                continue;
            };
            watchers.remove(&conn);
            if watchers.is_empty() {
                self.by_user.remove(user);
                self.known.remove(user);
                last.push(user.clone());
            }
        }
        last
    }

    /// Presence heard from a presence server: remembered for the users watched here, and
    /// pushed to their watchers where it changed.
    pub(super) fn heard(&mut self, presence: impl IntoIterator<Item = (UserId, bool)>) {
        let mut changed: Vec<(UserId, bool)> = Vec::new();
        for (user, active) in presence {
            if !self.by_user.contains_key(&user) {
                continue;
            }
            if self.known.insert(user.clone(), active) != Some(active) {
                changed.push((user, active));
            }
        }
        self.push_to_watchers(&changed);
    }

    /// Writes `items` to watcher `conn`, if it is still connected.
    pub(super) fn answer(&self, conn: ConnId, items: &[(UserId, bool)]) {
        if let Some(watcher) = self.conns.get(&conn) {
            push_frames(watcher, items);
        }
    }

    /// Tells each local watcher of the changed users, rendering each frame once per form.
    fn push_to_watchers(&self, changed: &[(UserId, bool)]) {
        if changed.is_empty() {
            return;
        }
        // Per connection, the changes it watches.
        let mut per_conn: HashMap<ConnId, Vec<(UserId, bool)>> = HashMap::new();
        for (user, active) in changed {
            for conn in self.by_user.get(user).into_iter().flatten() {
                per_conn
                    .entry(*conn)
                    .or_default()
                    .push((user.clone(), *active));
            }
        }
        // Rendered once per gateway: per (user, presence) for the single form, per set of
        // changes for the batch form.
        let mut single: HashMap<(UserId, bool), Utf8Bytes> = HashMap::new();
        let mut batches: HashMap<Vec<(UserId, bool)>, Vec<Utf8Bytes>> = HashMap::new();
        for (conn, items) in per_conn {
            let Some(watcher) = self.conns.get(&conn) else {
                continue;
            };
            if watcher.batch {
                let frames = batches
                    .entry(items.clone())
                    .or_insert_with(|| batch_frames(&items));
                for frame in frames.iter() {
                    watcher.sink.push(Outbound::frame(frame.clone()));
                }
            } else {
                for item in items {
                    let frame = single
                        .entry(item.clone())
                        .or_insert_with(|| {
                            Utf8Bytes::from(mesh_rtm::presence_change(&item.0, item.1))
                        })
                        .clone();
                    watcher.sink.push(Outbound::frame(frame));
                }
            }
        }
    }
}

/// Writes `items` to one watcher: one `presence_change` per user, or, for a batch-aware
/// client, one frame per presence value listing its users.
fn push_frames(watcher: &Watcher, items: &[(UserId, bool)]) {
    if watcher.batch {
        for frame in batch_frames(items) {
            watcher.sink.push(Outbound::frame(frame));
        }
    } else {
        for (user, active) in items {
            let frame = mesh_rtm::presence_change(user, *active);
            watcher.sink.push(Outbound::frame(frame));
        }
    }
}

/// The batch form of `items`: one frame per presence value, listing its users.
fn batch_frames(items: &[(UserId, bool)]) -> Vec<Utf8Bytes> {
    [true, false]
        .into_iter()
        .filter_map(|active| {
            let users: Vec<&UserId> = items
                .iter()
                .filter(|(_, a)| *a == active)
                .map(|(u, _)| u)
                .collect();
            (!users.is_empty())
                .then(|| Utf8Bytes::from(mesh_rtm::presence_change_batch(&users, active)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::close::Closer;
    use crate::outbox::Outbox;

    fn user(name: &str) -> UserId {
        UserId::new(name).unwrap()
    }

    /// A connection watching nothing yet, and its outbox.
    fn connect(watchers: &mut Watchers, id: ConnId, batch: bool) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(64, 1 << 20));
        let sink = ConnSink::new(id, user("U0"), outbox.clone(), Arc::new(Closer::default()));
        watchers.connected(&sink, batch);
        outbox
    }

    /// The frames queued to `outbox`, in order.
    fn frames(outbox: &Outbox) -> Vec<String> {
        outbox
            .take_all()
            .into_iter()
            .map(|item| match item {
                Outbound::Frame(frame) => frame.as_str().to_string(),
                other => panic!("not a frame: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_user_is_watched_once_for_every_local_watcher() {
        let mut watchers = Watchers::default();
        let (a, b) = (
            connect(&mut watchers, 1, false),
            connect(&mut watchers, 2, false),
        );
        let (first, gone) = watchers.subscribe(1, vec![user("U1"), user("U2")]);
        let mut first: Vec<String> = first.iter().map(ToString::to_string).collect();
        first.sort();
        assert_eq!((first, gone), (vec!["U1".into(), "U2".into()], vec![]));
        // The second watcher of U1 asks nothing more, and hears the known presence at once.
        watchers.heard([(user("U1"), true)]);
        assert_eq!(frames(&a).len(), 1);
        assert_eq!(watchers.subscribe(2, vec![user("U1")]), (vec![], vec![]));
        assert_eq!(
            frames(&b),
            [r#"{"presence":"active","type":"presence_change","user":"U1"}"#]
        );
        // U2 is dropped by its only watcher: unwatched. U1 still has one.
        assert_eq!(
            watchers.subscribe(1, vec![user("U1")]),
            (vec![], vec![user("U2")])
        );
        assert_eq!(watchers.disconnected(1), Vec::<UserId>::new());
        assert_eq!(watchers.disconnected(2), vec![user("U1")]);
        assert_eq!(watchers.len(), 0);
        // An unknown connection watches nothing.
        assert_eq!(watchers.subscribe(9, vec![user("U1")]), (vec![], vec![]));
        assert_eq!(watchers.disconnected(9), Vec::<UserId>::new());
    }

    #[test]
    fn only_changes_of_watched_users_are_pushed() {
        let mut watchers = Watchers::default();
        let a = connect(&mut watchers, 1, false);
        watchers.subscribe(1, vec![user("U1")]);
        watchers.heard([(user("U1"), true), (user("U2"), true)]);
        watchers.heard([(user("U1"), true)]);
        watchers.heard([(user("U1"), false)]);
        assert_eq!(
            frames(&a),
            [
                r#"{"presence":"active","type":"presence_change","user":"U1"}"#,
                r#"{"presence":"away","type":"presence_change","user":"U1"}"#,
            ]
        );
        // An unwatched user's presence is forgotten: watching again starts afresh.
        watchers.subscribe(1, vec![]);
        assert_eq!(watchers.subscribe(1, vec![user("U1")]).0, vec![user("U1")]);
        assert!(frames(&a).is_empty());
    }

    #[test]
    fn a_batch_aware_client_gets_one_frame_per_presence_value() {
        let mut watchers = Watchers::default();
        let a = connect(&mut watchers, 1, true);
        watchers.subscribe(1, vec![user("U1"), user("U2"), user("U3")]);
        watchers.heard([(user("U1"), true), (user("U2"), false), (user("U3"), true)]);
        let got = frames(&a);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains(r#""presence":"active""#), "{got:?}");
        assert!(got[0].contains("U1") && got[0].contains("U3"), "{got:?}");
        assert!(got[1].contains(r#""presence":"away""#) && got[1].contains("U2"));
        // A query's answer takes the same form.
        watchers.answer(1, &[(user("U4"), false)]);
        assert_eq!(
            frames(&a),
            [r#"{"presence":"away","type":"presence_change","users":["U4"]}"#]
        );
    }
}
