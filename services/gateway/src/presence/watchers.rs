//! Local watchers: which of this gateway's connections watch which users (`presence_sub`), the
//! presence last heard of each watched user, and the `presence_change` frames that tell them.
//! A user is watched on their presence server once, however many local connections watch them.
//!
//! A client sees the presence of its own user and of its team's users only ([`visible`]): a
//! user of another team, or whose team the presence servers do not know, is left out of every
//! answer and change, exactly as a user who does not exist (docs/rtm.md, "Presence").

use std::collections::{HashMap, HashSet};

use axum::extract::ws::Utf8Bytes;
use mesh_core::{TeamId, UserId};
use presence_client::Presence;

use crate::outbox::ConnSink;
use crate::vocab::{ConnId, Outbound};

/// A local client that watches users.
#[derive(Debug)]
struct Watcher {
    sink: ConnSink,
    /// Its user's team: whose presence it may see.
    team: TeamId,
    /// It connected with `batch_presence_aware=1`.
    batch: bool,
    watching: HashSet<UserId>,
}

/// What was last heard of a watched user.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    active: bool,
    team: Option<TeamId>,
}

/// Every local watcher, by connection and by watched user.
#[derive(Debug, Default)]
pub(super) struct Watchers {
    /// Local connections watching each user.
    by_user: HashMap<UserId, HashSet<ConnId>>,
    conns: HashMap<ConnId, Watcher>,
    /// The last presence heard per watched user.
    known: HashMap<UserId, Known>,
    /// Answers and changes left out since last taken (see [`Watchers::take_withheld`]).
    withheld: u64,
}

/// Whether a client of user `me` in team `my_team` may see the presence of `user`, of `team`
/// (`None`: not known): its own, or that of a user of its team.
pub(crate) fn visible(me: &UserId, my_team: &TeamId, user: &UserId, team: Option<&TeamId>) -> bool {
    user == me || team == Some(my_team)
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

    /// Answers and changes left out since the last call, for the metrics.
    pub(super) fn take_withheld(&mut self) -> u64 {
        std::mem::take(&mut self.withheld)
    }

    /// A connection of a user of `team` opened; `batch`: it takes the batch form of
    /// `presence_change`.
    pub(super) fn connected(&mut self, sink: &ConnSink, team: &TeamId, batch: bool) {
        self.conns.insert(
            sink.id,
            Watcher {
                sink: sink.clone(),
                team: team.clone(),
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
            } else if let Some(k) = self.known.get(&user) {
                known.push(Presence {
                    user,
                    active: k.active,
                    team: k.team.clone(),
                    answered: true,
                });
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
    /// pushed to the watchers that may see it where it changed (or became known to them: its
    /// team was heard for the first time). A team heard once is kept when a later answer
    /// does not know it (a new presence server that has not seen the user online).
    pub(super) fn heard(&mut self, presence: impl IntoIterator<Item = Presence>) {
        let mut changed: Vec<(UserId, bool)> = Vec::new();
        for p in presence {
            if !self.by_user.contains_key(&p.user) {
                continue;
            }
            let old = self.known.get(&p.user);
            let known = Known {
                active: p.active,
                team: p.team.or_else(|| old.and_then(|k| k.team.clone())),
            };
            if old != Some(&known) {
                changed.push((p.user.clone(), known.active));
                self.known.insert(p.user, known);
            }
        }
        self.push_to_watchers(&changed);
    }

    /// Writes `items` to watcher `conn`, if it is still connected: those it may see.
    pub(super) fn answer(&mut self, conn: ConnId, items: &[Presence]) {
        let Some(watcher) = self.conns.get(&conn) else {
            return;
        };
        let (me, team) = (&watcher.sink.user, &watcher.team);
        let shown: Vec<(UserId, bool)> = items
            .iter()
            .filter(|p| visible(me, team, &p.user, p.team.as_ref()))
            .map(|p| (p.user.clone(), p.active))
            .collect();
        self.withheld += (items.len() - shown.len()) as u64;
        push_frames(watcher, &shown);
    }

    /// Tells each local watcher of the changed users it may see, rendering each frame once
    /// per form.
    fn push_to_watchers(&mut self, changed: &[(UserId, bool)]) {
        if changed.is_empty() {
            return;
        }
        // Per connection, the changes it watches and may see.
        let mut per_conn: HashMap<ConnId, Vec<(UserId, bool)>> = HashMap::new();
        for (user, active) in changed {
            let team = self.known.get(user).and_then(|k| k.team.as_ref());
            for conn in self.by_user.get(user).into_iter().flatten() {
                let Some(watcher) = self.conns.get(conn) else {
                    continue;
                };
                if !visible(&watcher.sink.user, &watcher.team, user, team) {
                    self.withheld += 1;
                    continue;
                }
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

    fn team(name: &str) -> TeamId {
        TeamId::new(name).unwrap()
    }

    /// `name` heard `active`, of team T1.
    fn heard(name: &str, active: bool) -> Presence {
        heard_of(name, active, Some("T1"))
    }

    /// `name` heard `active`, of `team`.
    fn heard_of(name: &str, active: bool, team_name: Option<&str>) -> Presence {
        Presence {
            user: user(name),
            active,
            team: team_name.map(team),
            answered: true,
        }
    }

    /// A connection of U0 (team T1) watching nothing yet, and its outbox.
    fn connect(watchers: &mut Watchers, id: ConnId, batch: bool) -> Arc<Outbox> {
        connect_as(watchers, id, "U0", "T1", batch)
    }

    /// A connection of `me`, of `my_team`, watching nothing yet, and its outbox.
    fn connect_as(
        watchers: &mut Watchers,
        id: ConnId,
        me: &str,
        my_team: &str,
        batch: bool,
    ) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(64, 1 << 20));
        let sink = ConnSink::new(id, user(me), outbox.clone(), Arc::new(Closer::default()));
        watchers.connected(&sink, &team(my_team), batch);
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
        watchers.heard([heard("U1", true)]);
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
        watchers.heard([heard("U1", true), heard("U2", true)]);
        watchers.heard([heard("U1", true)]);
        watchers.heard([heard("U1", false)]);
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
        watchers.heard([heard("U1", true), heard("U2", false), heard("U3", true)]);
        let got = frames(&a);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains(r#""presence":"active""#), "{got:?}");
        assert!(got[0].contains("U1") && got[0].contains("U3"), "{got:?}");
        assert!(got[1].contains(r#""presence":"away""#) && got[1].contains("U2"));
        // A query's answer takes the same form.
        watchers.answer(1, &[heard("U4", false)]);
        assert_eq!(
            frames(&a),
            [r#"{"presence":"away","type":"presence_change","users":["U4"]}"#]
        );
    }

    #[test]
    fn a_watcher_sees_its_own_and_its_teams_users_only() {
        let mut watchers = Watchers::default();
        let a = connect_as(&mut watchers, 1, "UA", "T1", false);
        let z = connect_as(&mut watchers, 2, "UZ", "T2", true);
        let everyone = vec![user("UA"), user("UB"), user("UZ"), user("UX")];
        watchers.subscribe(1, everyone.clone());
        watchers.subscribe(2, everyone);
        // UB of T1, UZ of T2, UX of no known team; UA's own team is known too.
        watchers.heard([
            heard_of("UA", true, Some("T1")),
            heard_of("UB", true, Some("T1")),
            heard_of("UZ", true, Some("T2")),
            heard_of("UX", true, None),
        ]);
        let got = frames(&a);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().any(|f| f.contains(r#""user":"UA""#)), "{got:?}");
        assert!(got.iter().any(|f| f.contains(r#""user":"UB""#)), "{got:?}");
        assert_eq!(
            frames(&z),
            [r#"{"presence":"active","type":"presence_change","users":["UZ"]}"#]
        );
        // Left out: UZ and UX for A; UA, UB and UX for Z.
        assert_eq!(watchers.take_withheld(), 5);
        assert_eq!(watchers.take_withheld(), 0);
        // A query's answer is filtered the same way.
        watchers.answer(1, &[heard_of("UZ", false, Some("T2")), heard("UB", false)]);
        assert_eq!(
            frames(&a),
            [r#"{"presence":"away","type":"presence_change","user":"UB"}"#]
        );
        assert_eq!(watchers.take_withheld(), 1);
        // A user's own presence is theirs to see even when their team is not known.
        let c = connect_as(&mut watchers, 3, "UX", "T3", false);
        watchers.subscribe(3, vec![user("UX")]);
        assert_eq!(
            frames(&c),
            [r#"{"presence":"active","type":"presence_change","user":"UX"}"#]
        );
    }

    #[test]
    fn a_team_heard_once_is_kept_and_a_team_newly_heard_is_told() {
        let mut watchers = Watchers::default();
        let a = connect(&mut watchers, 1, false);
        watchers.subscribe(1, vec![user("UB")]);
        // Never seen online: nothing to tell.
        watchers.heard([heard_of("UB", false, None)]);
        assert!(frames(&a).is_empty());
        // Its team heard, the same presence: now A may see it, and is told.
        watchers.heard([heard_of("UB", false, Some("T1"))]);
        assert_eq!(
            frames(&a),
            [r#"{"presence":"away","type":"presence_change","user":"UB"}"#]
        );
        watchers.heard([heard("UB", true)]);
        assert_eq!(frames(&a).len(), 1);
        // A new presence server that never saw UB online does not know its team: the team
        // heard before still holds, and the change reaches A.
        watchers.heard([heard_of("UB", false, None)]);
        assert_eq!(
            frames(&a),
            [r#"{"presence":"away","type":"presence_change","user":"UB"}"#]
        );
    }

    #[test]
    fn visible_means_oneself_or_ones_team() {
        let (me, t1) = (user("U1"), team("T1"));
        assert!(visible(&me, &t1, &user("U1"), None));
        assert!(visible(&me, &t1, &user("U2"), Some(&t1)));
        assert!(!visible(&me, &t1, &user("U2"), Some(&team("T2"))));
        assert!(!visible(&me, &t1, &user("U2"), None));
    }
}
