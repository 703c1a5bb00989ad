//! The gateway's side of presence: it tells each user's presence server when the user's local
//! connections come and go, watches a user there once however many local clients watch them,
//! and pushes presence changes only to the local clients that watch that user.
//!
//! One session (a gRPC stream) per presence server; it starts with a snapshot of everything
//! this gateway reports to that server, and a fresh snapshot follows every ring change, so a
//! presence server that takes over users rebuilds them from the gateways' reports.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use mesh_core::{ChannelId, NodeId, Ring, TeamId, UserId};
use mesh_proto::presence as pb;
use mesh_proto::presence::gateway_message::Kind;
use mesh_proto::presence::presence_client::PresenceClient;
use ring_client::RingWatcher;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{ConnId, ConnSink, Outbound};

/// Messages queued to one presence session; past it the session restarts from a snapshot.
const SESSION_QUEUE: usize = 4096;
/// How long one connect or query to a presence server may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Unanswered `Acquire`s are forgotten after this.
const PENDING_FORGET: Duration = Duration::from_secs(30);
/// The first and the longest pause between reconnects to a presence server.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A local client that watches users.
#[derive(Debug)]
struct Watcher {
    sink: ConnSink,
    /// It connected with `batch_presence_aware=1`.
    batch: bool,
    watching: HashSet<UserId>,
}

#[derive(Debug, Default)]
struct State {
    /// Live local connections per user.
    online: HashMap<UserId, u32>,
    /// The last manual setting relayed per user: (away, set at ms).
    manual: HashMap<UserId, (bool, u64)>,
    /// Local connections watching each user.
    watchers: HashMap<UserId, HashSet<ConnId>>,
    conns: HashMap<ConnId, Watcher>,
    /// The last presence heard per watched user.
    known: HashMap<UserId, bool>,
    /// One session per presence server.
    sessions: HashMap<NodeId, mpsc::Sender<Kind>>,
    /// Connections granted by teams' presence servers and not yet released, per (team, user).
    held: HashMap<(TeamId, UserId), u32>,
    /// `Acquire`s waiting for their answer, by request number: when they were asked, for
    /// whom, and who waits (if anyone still does).
    pending: HashMap<u64, Pending>,
    next_request: u64,
}

type Pending = (
    Instant,
    TeamId,
    UserId,
    oneshot::Sender<Result<(), Refused>>,
);

/// Why a team's presence server did not grant a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The team is at its cap.
    Team,
    /// The user is at their cap.
    User,
    /// The count is not available right now (a takeover, or no answer in time): retry.
    Retry,
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
    ring: RingWatcher,
    state: Mutex<State>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

use presence_client::{owner, owner_of};

impl PresenceHub {
    /// Presence for gateway `gateway`, following the presence ring `ring`.
    pub fn new(
        gateway: String,
        ring: RingWatcher,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let hub = PresenceHub {
            inner: Arc::new(Inner {
                gateway,
                ring,
                state: Mutex::new(State::default()),
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
        self.inner
            .tracker
            .spawn(self.clone().run_session(node, addr, rx));
        tx
    }

    /// Everything this gateway reports to `node` under `ring`.
    fn snapshot(&self, state: &State, ring: &Ring, node: &NodeId) -> pb::Snapshot {
        let mine = |u: &UserId| owner(ring, u).is_some_and(|(n, _)| &n == node);
        pb::Snapshot {
            gateway: self.inner.gateway.clone(),
            online: state
                .online
                .iter()
                .filter(|(u, _)| mine(u))
                .map(|(u, n)| pb::UserOnline {
                    user: u.to_string(),
                    connections: *n,
                })
                .collect(),
            manual: state
                .manual
                .iter()
                .filter(|(u, _)| mine(u))
                .map(|(u, (away, at))| pb::Manual {
                    user: u.to_string(),
                    away: *away,
                    set_at_ms: *at,
                })
                .collect(),
            watched: state
                .watchers
                .keys()
                .filter(|u| mine(u))
                .map(ToString::to_string)
                .collect(),
            teams: state
                .held
                .iter()
                .filter(|((team, _), _)| {
                    owner_of(ring, &ChannelId::from(team)).is_some_and(|(n, _)| &n == node)
                })
                .map(|((team, user), n)| pb::TeamConnections {
                    team: team.to_string(),
                    user: user.to_string(),
                    connections: *n,
                })
                .collect(),
            pending_acquires: state
                .pending
                .iter()
                .filter(|(_, (_, team, ..))| {
                    owner_of(ring, &ChannelId::from(team)).is_some_and(|(n, _)| &n == node)
                })
                .map(|(request, _)| *request)
                .collect(),
        }
    }

    /// After a ring change: a fresh snapshot to every presence server that owns one of our
    /// users; sessions to servers that own none of them end.
    fn resync(&self, ring: &Ring) {
        let mut state = self.state();
        let users: HashSet<UserId> = state
            .online
            .keys()
            .chain(state.manual.keys())
            .chain(state.watchers.keys())
            .cloned()
            .collect();
        let owners: HashMap<NodeId, String> = users
            .iter()
            .filter_map(|u| owner(ring, u))
            .chain(
                state
                    .held
                    .keys()
                    .filter_map(|(team, _)| owner_of(ring, &ChannelId::from(team))),
            )
            .collect();
        state.sessions.retain(|node, _| owners.contains_key(node));
        for (node, addr) in owners {
            let snapshot = self.snapshot(&state, ring, &node);
            match state.sessions.get(&node) {
                Some(tx) if tx.try_send(Kind::Snapshot(snapshot)).is_ok() => {}
                _ => {
                    state.sessions.remove(&node);
                    let _ = self.start_session(&mut state, node, addr);
                }
            }
        }
    }

    /// One session with presence server `node`, reconnecting until its queue is dropped
    /// (the server no longer owns any of our users) or the gateway stops.
    async fn run_session(self, node: NodeId, addr: String, mut rx: mpsc::Receiver<Kind>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let outcome = tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                o = self.session_once(&node, &addr, &mut rx) => o,
            };
            match outcome {
                SessionEnd::Dropped => return,
                SessionEnd::Broken(why) => {
                    tracing::debug!(%node, %addr, %why, retry_in = ?backoff, "presence session interrupted");
                }
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            // A ring change that moved all our users elsewhere dropped this session's queue.
            if rx.is_closed() {
                return;
            }
        }
    }

    async fn session_once(
        &self,
        node: &NodeId,
        addr: &str,
        rx: &mut mpsc::Receiver<Kind>,
    ) -> SessionEnd {
        let endpoint = match mesh_transport::endpoint(addr) {
            Ok(e) => e.connect_timeout(CALL_TIMEOUT).tcp_nodelay(true),
            Err(e) => return SessionEnd::Broken(e.to_string()),
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Broken(e.to_string()),
        };
        // The outgoing stream: a snapshot first (built with every queued delta discarded, as
        // the snapshot already holds them), then deltas and heartbeats.
        let (out_tx, out_rx) = mpsc::channel::<pb::GatewayMessage>(SESSION_QUEUE);
        {
            let state = self.state();
            // Deltas are in the snapshot; questions are not: they follow it.
            let mut acquires = Vec::new();
            while let Ok(kind) = rx.try_recv() {
                if let Kind::Acquire(a) = kind {
                    acquires.push(a);
                }
            }
            let ring = self.inner.ring.current();
            let snapshot = self.snapshot(&state, &ring, node);
            let _ = out_tx.try_send(pb::GatewayMessage {
                kind: Some(Kind::Snapshot(snapshot)),
            });
            for a in acquires {
                let _ = out_tx.try_send(pb::GatewayMessage {
                    kind: Some(Kind::Acquire(a)),
                });
            }
        }
        let mut incoming = match PresenceClient::new(channel)
            .session(ReceiverStream::new(out_rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => return SessionEnd::Broken(status.to_string()),
        };
        tracing::debug!(%node, %addr, "presence session open");
        let mut heartbeat = tokio::time::interval(presence_heartbeat());
        loop {
            tokio::select! {
                // Cancel-safe: recv loses nothing when another branch wins.
                item = rx.recv() => {
                    let Some(kind) = item else { return SessionEnd::Dropped };
                    if out_tx.send(pb::GatewayMessage { kind: Some(kind) }).await.is_err() {
                        return SessionEnd::Broken("outgoing stream closed".into());
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = pb::GatewayMessage { kind: Some(Kind::Heartbeat(pb::Heartbeat {})) };
                    if out_tx.send(beat).await.is_err() {
                        return SessionEnd::Broken("outgoing stream closed".into());
                    }
                }
                // Cancel-safe: message() loses nothing when another branch wins.
                message = incoming.message() => match message {
                    Ok(Some(message)) => self.on_server(message),
                    Ok(None) => return SessionEnd::Broken("the presence server ended the session".into()),
                    Err(status) => return SessionEnd::Broken(status.to_string()),
                },
            }
        }
    }

    /// Presence from a server: remember it, and tell the local watchers what changed.
    fn on_server(&self, message: pb::ServerMessage) {
        let mut state = self.state();
        for answer in message.acquired {
            let Some((_, team, user, waiting)) = state.pending.remove(&answer.request) else {
                continue;
            };
            let outcome = match (answer.granted, answer.refused.as_str()) {
                (true, _) => Ok(()),
                (false, "team") => Err(Refused::Team),
                (false, "user") => Err(Refused::User),
                (false, _) => Err(Refused::Retry),
            };
            if outcome.is_ok() {
                // Held from the moment the grant is heard: snapshots from now on count it.
                *state.held.entry((team.clone(), user.clone())).or_default() += 1;
            }
            if let Err(Ok(())) = waiting.send(outcome) {
                // Granted after the caller gave up waiting: hand it back.
                tracing::debug!(
                    request = answer.request,
                    "releasing a late connection grant"
                );
                self.release_locked(&mut state, &team, &user);
            }
        }
        let mut changed: Vec<(UserId, bool)> = Vec::new();
        for p in message.users {
            let Ok(user) = UserId::new(&p.user) else {
                continue;
            };
            if !state.watchers.contains_key(&user) {
                continue;
            }
            if state.known.insert(user.clone(), p.active) != Some(p.active) {
                changed.push((user, p.active));
            }
        }
        push_to_watchers(&state, &changed);
    }

    /// (users watched on presence servers, users online here, open presence sessions), for
    /// `/stats`.
    pub fn counts(&self) -> (usize, usize, usize) {
        let state = self.state();
        (
            state.watchers.len(),
            state.online.len(),
            state.sessions.len(),
        )
    }

    /// A connection of `sink.user` opened (after `hello`).
    pub fn connected(&self, sink: &ConnSink, batch: bool) {
        let mut state = self.state();
        state.conns.insert(
            sink.id,
            Watcher {
                sink: sink.clone(),
                batch,
                watching: HashSet::new(),
            },
        );
        let n = state.online.entry(sink.user.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            let online = pb::UserOnline {
                user: sink.user.to_string(),
                connections: 1,
            };
            self.send(&mut state, &sink.user, Kind::Online(online));
        }
    }

    /// Connection `conn` of `user` closed.
    pub fn disconnected(&self, conn: ConnId, user: &UserId) {
        let mut state = self.state();
        if let Some(watcher) = state.conns.remove(&conn) {
            let watching: Vec<UserId> = watcher.watching.into_iter().collect();
            self.unwatch(&mut state, conn, &watching);
        }
        let Some(n) = state.online.get_mut(user) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            state.online.remove(user);
            state.manual.remove(user);
            let online = pb::UserOnline {
                user: user.to_string(),
                connections: 0,
            };
            self.send(&mut state, user, Kind::Online(online));
        }
    }

    /// `presence_sub`: `conn` now watches exactly `ids`. Newly watched users' known presence is
    /// pushed at once; the others' comes from their presence servers.
    pub fn subscribe(&self, conn: ConnId, ids: Vec<UserId>) {
        let mut state = self.state();
        let Some(watcher) = state.conns.get_mut(&conn) else {
            return;
        };
        let new: HashSet<UserId> = ids.into_iter().collect();
        let old = std::mem::replace(&mut watcher.watching, new.clone());
        let gone: Vec<UserId> = old.difference(&new).cloned().collect();
        let added: Vec<UserId> = new.difference(&old).cloned().collect();
        self.unwatch(&mut state, conn, &gone);
        let mut first = Vec::new();
        let mut known = Vec::new();
        for user in added {
            let watchers = state.watchers.entry(user.clone()).or_default();
            watchers.insert(conn);
            if watchers.len() == 1 {
                first.push(user);
            } else if let Some(active) = state.known.get(&user) {
                known.push((user, *active));
            }
        }
        if let Some(watcher) = state.conns.get(&conn) {
            push_frames(watcher, &known);
        }
        // Watch once per user on this gateway, grouped by presence server.
        for user in first {
            let watch = pb::Watch {
                users: vec![user.to_string()],
            };
            self.send(&mut state, &user, Kind::Watch(watch));
        }
    }

    fn unwatch(&self, state: &mut State, conn: ConnId, users: &[UserId]) {
        for user in users {
            let Some(watchers) = state.watchers.get_mut(user) else {
                continue;
            };
            watchers.remove(&conn);
            if watchers.is_empty() {
                state.watchers.remove(user);
                state.known.remove(user);
                let unwatch = pb::Watch {
                    users: vec![user.to_string()],
                };
                self.send(state, user, Kind::Unwatch(unwatch));
            }
        }
    }

    /// `users.setPresence`: `away`, or back to automatic, for every connection of `user`.
    pub fn set_manual(&self, user: &UserId, away: bool) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut state = self.state();
        // Kept while the user is connected here (and until then), so that snapshots carry it.
        state.manual.insert(user.clone(), (away, at));
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
            state.next_request += 1;
            let request = state.next_request;
            // Questions a lost session never answered are forgotten after a while.
            let now = Instant::now();
            state
                .pending
                .retain(|_, (asked, ..)| now.duration_since(*asked) < PENDING_FORGET);
            state
                .pending
                .insert(request, (now, team.clone(), user.clone(), tx));
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
        let key = (team.clone(), user.clone());
        if let Some(n) = state.held.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                state.held.remove(&key);
            }
        }
        let release = pb::Release {
            team: team.to_string(),
            user: user.to_string(),
        };
        self.send_to(state, &ChannelId::from(team), Kind::Release(release));
    }

    /// `presence_query`: asks the users' presence servers once and answers `conn`.
    pub fn query(&self, conn: ConnId, ids: Vec<UserId>) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let answer = this.lookup(&ids).await;
            let state = this.state();
            if let Some(watcher) = state.conns.get(&conn) {
                push_frames(watcher, &answer);
            }
        });
    }

    /// The presence of `ids` from their presence servers (away when one cannot be asked).
    pub async fn lookup(&self, ids: &[UserId]) -> Vec<(UserId, bool)> {
        presence_client::lookup(&self.inner.ring.current(), ids).await
    }
}

/// How often a session says something when there is nothing else to say.
fn presence_heartbeat() -> Duration {
    Duration::from_secs(1)
}

enum SessionEnd {
    /// The hub dropped the session's queue: it is no longer wanted.
    Dropped,
    /// The stream failed; reconnect.
    Broken(String),
}

/// Tells each local watcher of the changed users, rendering each frame once per form.
fn push_to_watchers(state: &State, changed: &[(UserId, bool)]) {
    if changed.is_empty() {
        return;
    }
    // Per connection, the changes it watches.
    let mut per_conn: HashMap<ConnId, Vec<(UserId, bool)>> = HashMap::new();
    for (user, active) in changed {
        for conn in state.watchers.get(user).into_iter().flatten() {
            per_conn
                .entry(*conn)
                .or_default()
                .push((user.clone(), *active));
        }
    }
    // Rendered once per gateway: per (user, presence) for the single form, per set of changes
    // for the batch form.
    let mut single: HashMap<(UserId, bool), Utf8Bytes> = HashMap::new();
    let mut batches: HashMap<Vec<(UserId, bool)>, Vec<Utf8Bytes>> = HashMap::new();
    for (conn, items) in per_conn {
        let Some(watcher) = state.conns.get(&conn) else {
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
                    .or_insert_with(|| Utf8Bytes::from(mesh_rtm::presence_change(&item.0, item.1)))
                    .clone();
                watcher.sink.push(Outbound::frame(frame));
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
