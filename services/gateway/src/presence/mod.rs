//! The gateway's side of presence: it tells each user's presence server when the user's local
//! connections come and go, watches a user there once however many local clients watch them,
//! and pushes presence changes only to the local clients that watch that user.
//!
//! One session (a gRPC stream) per presence server; it starts with a snapshot of everything
//! this gateway reports to that server, and a fresh snapshot follows every ring change, so a
//! presence server that takes over users rebuilds them from the gateways' reports.
//!
//! By idea: [`reports`] counts the users connected here, [`watchers`] keeps the local watchers,
//! [`caps`] the connections held under team and user caps, [`session`] runs one stream to one
//! presence server. This module routes what they say to the presence ring.

mod caps;
mod reports;
mod session;
mod watchers;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use mesh_core::{ChannelId, NodeId, Ring, TeamId, UserId};
use mesh_proto::presence as pb;
use mesh_proto::presence::gateway_message::Kind;
use mesh_telemetry::prometheus::IntCounter;
use presence_client::{Presence, owner, owner_of};
use ring_client::RingWatcher;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::outbox::ConnSink;
use crate::vocab::ConnId;
use caps::Caps;
pub use caps::Refused;
use reports::{Reports, unix_ms};
use session::{CALL_TIMEOUT, SESSION_QUEUE};
use watchers::Watchers;
pub(crate) use watchers::visible;

#[derive(Debug, Default)]
struct State {
    reports: Reports,
    watchers: Watchers,
    caps: Caps,
    /// One session per presence server.
    sessions: HashMap<NodeId, mpsc::Sender<Kind>>,
}

impl State {
    /// Everything gateway `gateway` of `region` reports to `node` under `ring`.
    fn snapshot(
        &self,
        (gateway, region): (&str, &str),
        ring: &Ring,
        node: &NodeId,
    ) -> pb::Snapshot {
        let mine = |u: &UserId| owner(ring, u).is_some_and(|(n, _)| &n == node);
        let team_is_mine =
            |team: &TeamId| owner_of(ring, &ChannelId::from(team)).is_some_and(|(n, _)| &n == node);
        pb::Snapshot {
            gateway: gateway.to_string(),
            online: self
                .reports
                .online
                .iter()
                .filter(|(u, _)| mine(u))
                .map(|(u, here)| user_online(u, Some(here)))
                .collect(),
            manual: self
                .reports
                .manual
                .iter()
                .filter(|(u, _)| mine(u))
                .map(|(u, (away, at))| pb::Manual {
                    user: u.to_string(),
                    away: *away,
                    set_at_ms: *at,
                })
                .collect(),
            watched: self
                .watchers
                .users()
                .filter(|u| mine(u))
                .map(ToString::to_string)
                .collect(),
            teams: self
                .caps
                .held()
                .filter(|(team, ..)| team_is_mine(team))
                .map(|(team, user, n)| pb::TeamConnections {
                    team: team.to_string(),
                    user: user.to_string(),
                    connections: n,
                })
                .collect(),
            left: self
                .reports
                .recently_left()
                .filter(|(u, _)| mine(u))
                .map(|(u, left_ms)| pb::UserLeft {
                    user: u.to_string(),
                    left_ms,
                })
                .collect(),
            pending_acquires: self
                .caps
                .pending()
                .filter(|(_, team)| team_is_mine(team))
                .map(|(request, _)| request)
                .collect(),
            region: region.to_string(),
        }
    }

    /// The presence servers that own one of our users or teams under `ring`, with their
    /// addresses.
    fn owners(&self, ring: &Ring) -> HashMap<NodeId, String> {
        let users: HashSet<&UserId> = self
            .reports
            .online
            .keys()
            .chain(self.reports.manual.keys())
            .chain(self.watchers.users())
            .collect();
        users
            .into_iter()
            .filter_map(|u| owner(ring, u))
            .chain(
                self.caps
                    .held()
                    .filter_map(|(team, ..)| owner_of(ring, &ChannelId::from(team))),
            )
            .collect()
    }
}

/// What is reported of `user`'s connections here (`None`: none left): the count, the team,
/// and each connection (the oldest [`reports::MAX_DETAILED`]).
fn user_online(user: &UserId, here: Option<&reports::Here>) -> pb::UserOnline {
    pb::UserOnline {
        user: user.to_string(),
        connections: here.map_or(0, |h| h.connections),
        team: here.map(|h| h.team.to_string()).unwrap_or_default(),
        online_since_ms: here.map_or(0, |h| h.since_ms),
        left_ms: 0,
        details: here
            .iter()
            .flat_map(|h| h.conns.iter().take(reports::MAX_DETAILED))
            .map(|c| pb::ConnectionDetail {
                conn: c.id,
                team: c.team.to_string(),
                connected_at_ms: c.at_ms,
            })
            .collect(),
    }
}

/// A connection counted against its team's cap; dropping it releases the count.
#[derive(Debug)]
pub struct TeamSlot {
    hub: PresenceHub,
    team: TeamId,
    user: UserId,
}

impl Drop for TeamSlot {
    fn drop(&mut self) {
        self.hub.release(&self.team, &self.user);
    }
}

/// The gateway's presence state; cheap to clone.
#[derive(Debug, Clone)]
pub struct PresenceHub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    gateway: String,
    /// The gateway's region, reported with its connections.
    region: String,
    ring: RingWatcher,
    state: Mutex<State>,
    /// Channels to presence servers for queries (`lookup`), reused across calls.
    channels: presence_client::Pool,
    /// Counts the presence answers and changes withheld from clients (another team's users).
    withheld: IntCounter,
    /// Where the sessions run: a thread of their own ([`session::sessions_runtime`]).
    sessions: tokio::runtime::Handle,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl PresenceHub {
    /// Presence for gateway `gateway` of `region`, following the presence ring `ring`; what is
    /// withheld from clients is counted in `withheld`.
    pub fn new(
        (gateway, region): (String, String),
        ring: RingWatcher,
        withheld: IntCounter,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let hub = PresenceHub {
            inner: Arc::new(Inner {
                gateway,
                region,
                ring,
                state: Mutex::new(State::default()),
                channels: presence_client::Pool::new(),
                withheld,
                sessions: session::sessions_runtime(cancel.clone()),
                tracker,
                cancel,
            }),
        };
        let follower = hub.clone();
        hub.inner.tracker.spawn(async move {
            let ring = follower.inner.ring.clone();
            let cancel = follower.inner.cancel.clone();
            ring.on_each_change(cancel, |ring| follower.resync(&ring))
                .await;
        });
        hub
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts what the watchers withheld from their clients.
    fn count_withheld(&self, state: &mut State) {
        let withheld = state.watchers.take_withheld();
        if withheld > 0 {
            self.inner.withheld.inc_by(withheld);
        }
    }

    /// Sends `kind` about `user` to the user's presence server, starting a session if needed.
    fn send(&self, state: &mut State, user: &UserId, kind: Kind) {
        self.send_to(state, &ChannelId::from(user), kind);
    }

    /// Sends `kind` to the presence server owning `key` (a user's or a team's channel).
    fn send_to(&self, state: &mut State, key: &ChannelId, kind: Kind) {
        let ring = self.inner.ring.current();
        let Some((node, addr)) = owner_of(&ring, key) else {
            return; // No presence server yet: the snapshot of the first session carries it.
        };
        let kind = match state.sessions.get(&node) {
            Some(tx) => match tx.try_send(kind) {
                Ok(()) => return,
                // Full or gone: restart it; the new session starts from a snapshot.
                Err(e) => e.into_inner(),
            },
            None => kind,
        };
        let tx = self.start_session(state, node, addr);
        // The snapshot that opens the session carries every delta; a question (`Acquire`)
        // must still be asked.
        if matches!(kind, Kind::Acquire(_)) {
            let _ = tx.try_send(kind);
        }
    }

    fn start_session(&self, state: &mut State, node: NodeId, addr: String) -> mpsc::Sender<Kind> {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        state.sessions.insert(node.clone(), tx.clone());
        let cancel = self.inner.cancel.clone();
        let session = session::run(self.clone(), node, addr, rx, cancel);
        self.inner
            .sessions
            .spawn(self.inner.tracker.track_future(session));
        tx
    }

    /// After a ring change: a fresh snapshot to every presence server that owns one of our
    /// users; sessions to servers that own none of them end.
    fn resync(&self, ring: &Ring) {
        let mut state = self.state();
        let owners = state.owners(ring);
        state.sessions.retain(|node, _| owners.contains_key(node));
        for (node, addr) in owners {
            let snapshot = state.snapshot(self.me(), ring, &node);
            match state.sessions.get(&node) {
                Some(tx) if tx.try_send(Kind::Snapshot(snapshot)).is_ok() => {}
                _ => {
                    state.sessions.remove(&node);
                    let _ = self.start_session(&mut state, node, addr);
                }
            }
        }
    }

    /// (users watched on presence servers, users online here, open presence sessions), for
    /// `/stats`.
    pub fn counts(&self) -> (usize, usize, usize) {
        let state = self.state();
        (
            state.watchers.len(),
            state.reports.online.len(),
            state.sessions.len(),
        )
    }

    /// This gateway's id and region.
    fn me(&self) -> (&str, &str) {
        (&self.inner.gateway, &self.inner.region)
    }

    /// A connection of `sink.user`, of `team`, opened (after `hello`). Every connection is
    /// reported (not only the user's first), with its team and opening time.
    pub fn connected(&self, sink: &ConnSink, team: &TeamId, batch: bool) {
        let mut state = self.state();
        state.watchers.connected(sink, team, batch);
        state
            .reports
            .connected(sink.id, &sink.user, team, unix_ms());
        let online = user_online(&sink.user, state.reports.online.get(&sink.user));
        self.send(&mut state, &sink.user, Kind::Online(online));
    }

    /// Connection `conn` of `user` closed.
    pub fn disconnected(&self, conn: ConnId, user: &UserId) {
        let mut state = self.state();
        let unwatched = state.watchers.disconnected(conn);
        self.unwatch(&mut state, unwatched);
        let was_here = state.reports.online.contains_key(user);
        state.reports.disconnected(conn, user);
        if was_here {
            let mut online = user_online(user, state.reports.online.get(user));
            if online.connections == 0 {
                online.left_ms = state.reports.left_ms(user).unwrap_or_default();
            }
            self.send(&mut state, user, Kind::Online(online));
        }
    }

    /// `presence_sub`: `conn` now watches exactly `ids`. Newly watched users' known presence is
    /// pushed at once; the others' comes from their presence servers. Only users the
    /// connection may see are ever pushed to it ([`visible`]).
    pub fn subscribe(&self, conn: ConnId, ids: Vec<UserId>) {
        let mut state = self.state();
        let (first, unwatched) = state.watchers.subscribe(conn, ids);
        self.count_withheld(&mut state);
        self.unwatch(&mut state, unwatched);
        // Watch once per user on this gateway.
        for user in first {
            let watch = pb::Watch {
                users: vec![user.to_string()],
            };
            self.send(&mut state, &user, Kind::Watch(watch));
        }
    }

    /// Tells the presence servers of `users` that nobody here watches them any more.
    fn unwatch(&self, state: &mut State, users: Vec<UserId>) {
        for user in users {
            let unwatch = pb::Watch {
                users: vec![user.to_string()],
            };
            self.send(state, &user, Kind::Unwatch(unwatch));
        }
    }

    /// `users.setPresence`: `away`, or back to automatic, for every connection of `user`.
    pub fn set_manual(&self, user: &UserId, away: bool) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut state = self.state();
        state.reports.set_manual(user, away, at);
        let manual = pb::Manual {
            user: user.to_string(),
            away,
            set_at_ms: at,
        };
        self.send(&mut state, user, Kind::Manual(manual));
    }

    /// Asks the team's presence server for one more connection of `user` under the caps
    /// (0: none), waiting at most [`CALL_TIMEOUT`]. The slot it returns holds the count until
    /// dropped.
    pub async fn acquire(
        &self,
        team: &TeamId,
        user: &UserId,
        team_limit: u32,
        user_limit: u32,
    ) -> Result<TeamSlot, Refused> {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.state();
            let request = state.caps.ask(team, user, tx, Instant::now());
            let acquire = pb::Acquire {
                request,
                team: team.to_string(),
                user: user.to_string(),
                team_limit,
                user_limit,
            };
            self.send_to(&mut state, &ChannelId::from(team), Kind::Acquire(acquire));
        }
        // On a timeout the request stays pending: a grant that comes later is released.
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(TeamSlot {
                hub: self.clone(),
                team: team.clone(),
                user: user.clone(),
            }),
            Ok(Ok(Err(refused))) => Err(refused),
            Ok(Err(_)) | Err(_) => Err(Refused::Retry),
        }
    }

    /// A connection counted by [`PresenceHub::acquire`] ended.
    fn release(&self, team: &TeamId, user: &UserId) {
        let mut state = self.state();
        self.release_locked(&mut state, team, user);
    }

    fn release_locked(&self, state: &mut State, team: &TeamId, user: &UserId) {
        state.caps.release(team, user);
        let release = pb::Release {
            team: team.to_string(),
            user: user.to_string(),
        };
        self.send_to(state, &ChannelId::from(team), Kind::Release(release));
    }

    /// `presence_query`: asks the users' presence servers once and answers `conn` about those
    /// it may see.
    pub fn query(&self, conn: ConnId, ids: Vec<UserId>) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let answer = this.lookup(&ids).await;
            let mut state = this.state();
            state.watchers.answer(conn, &answer);
            this.count_withheld(&mut state);
        });
    }

    /// The presence of `ids` from their presence servers, with their teams (away, team
    /// unknown, when one cannot be asked). Unfiltered: callers show each only where
    /// [`visible`].
    pub async fn lookup(&self, ids: &[UserId]) -> Vec<Presence> {
        presence_client::lookup(&self.inner.channels, &self.inner.ring.current(), ids).await
    }

    /// One lookup counted as withheld from its caller.
    pub fn withheld(&self) {
        self.inner.withheld.inc();
    }
}

impl session::Peer for PresenceHub {
    fn opening(&self, node: &NodeId, queued: &mut mpsc::Receiver<Kind>) -> Vec<Kind> {
        let state = self.state();
        // Deltas are in the snapshot; questions are not: they follow it.
        let mut acquires = Vec::new();
        while let Ok(kind) = queued.try_recv() {
            if let Kind::Acquire(a) = kind {
                acquires.push(Kind::Acquire(a));
            }
        }
        let ring = self.inner.ring.current();
        let snapshot = state.snapshot(self.me(), &ring, node);
        std::iter::once(Kind::Snapshot(snapshot))
            .chain(acquires)
            .collect()
    }

    /// Presence from a server: remember it, and tell the local watchers what changed.
    fn on_server(&self, message: pb::ServerMessage) {
        let mut state = self.state();
        for answer in message.acquired {
            let late = state
                .caps
                .answered(answer.request, answer.granted, &answer.refused);
            if let Some((team, user)) = late {
                self.release_locked(&mut state, &team, &user);
            }
        }
        let heard = message.users.into_iter().filter_map(Presence::from_proto);
        state.watchers.heard(heard);
        self.count_withheld(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_core::RingNode;

    use super::*;
    use crate::close::Closer;
    use crate::outbox::Outbox;

    fn node(name: &str) -> RingNode {
        RingNode {
            id: NodeId::new(name).unwrap(),
            addr: format!("{name}:1"),
        }
    }

    #[test]
    fn each_presence_server_gets_a_snapshot_of_its_own_users_and_teams() {
        let ring = Ring::empty().rebalanced(&[node("ps1"), node("ps2")]);
        let mut state = State::default();
        let users: Vec<UserId> = (0..32)
            .map(|i| UserId::new(&format!("U{i}")).unwrap())
            .collect();
        let team = TeamId::new("T1").unwrap();
        for (i, user) in users.iter().enumerate() {
            state
                .reports
                .connected(i as ConnId, user, &team, 100 + i as u64);
            state.reports.set_manual(user, i % 2 == 0, i as u64);
            let (tx, _) = oneshot::channel();
            let request = state.caps.ask(&team, user, tx, Instant::now());
            state.caps.answered(request, true, "");
        }
        let outbox = Arc::new(Outbox::new(64, 1 << 20));
        let sink = ConnSink::new(1, users[0].clone(), outbox, Arc::new(Closer::default()));
        state.watchers.connected(&sink, &team, false);
        state.watchers.subscribe(1, users.clone());
        let (tx, _pending) = oneshot::channel();
        let open = state.caps.ask(&team, &users[0], tx, Instant::now());

        let mut online = 0;
        for node in ["ps1", "ps2"].map(|n| NodeId::new(n).unwrap()) {
            let snapshot = state.snapshot(("gw1", "us-east"), &ring, &node);
            assert_eq!(
                (snapshot.gateway.as_str(), snapshot.region.as_str()),
                ("gw1", "us-east")
            );
            let owned = |user: &str| {
                owner(&ring, &UserId::new(user).unwrap()).is_some_and(|(n, _)| n == node)
            };
            assert!(
                snapshot
                    .online
                    .iter()
                    .all(|o| owned(&o.user) && o.connections == 1 && o.team == "T1")
            );
            // Each connection in detail: its team and when it opened.
            assert!(snapshot.online.iter().all(|o| {
                let i: u64 = o.user[1..].parse().unwrap();
                let detail = pb::ConnectionDetail {
                    conn: i,
                    team: "T1".into(),
                    connected_at_ms: 100 + i,
                };
                o.details == [detail]
            }));
            assert!(snapshot.manual.iter().all(|m| owned(&m.user)));
            assert!(snapshot.watched.iter().all(|u| owned(u)));
            assert_eq!(snapshot.online.len(), snapshot.manual.len());
            assert_eq!(snapshot.online.len(), snapshot.watched.len());
            online += snapshot.online.len();
            // The team's connections go to the team's server only, with the open question.
            let team_owner = owner_of(&ring, &ChannelId::from(&team)).map(|(n, _)| n);
            if team_owner.as_ref() == Some(&node) {
                assert_eq!(snapshot.teams.len(), users.len());
                assert_eq!(snapshot.pending_acquires, [open]);
            } else {
                assert!(snapshot.teams.is_empty() && snapshot.pending_acquires.is_empty());
            }
        }
        assert_eq!(online, users.len());
        assert_eq!(state.owners(&ring).len(), 2);
        assert!(State::default().owners(&ring).is_empty());
    }
}
