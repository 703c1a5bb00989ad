//! Gateway sessions, apart from the wire: each open session's bounded queue, what a session
//! reports (applied to the presence state and the team quotas), and what goes back to it —
//! presence changes of the users it watches and answers to its connection requests. A session
//! whose queue is full is cut off: it reconnects and sends a fresh snapshot.
//!
//! Every change of a user's published presence goes to the `presence_changed` webhook, emitted
//! under the state's lock so that each user's events are queued in the order they happened
//! (emitting never waits).
//!
//! Locks (state, quotas, queues) are taken one at a time and never across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_core::{ChannelId, IdError, NodeId, Ring, SLOT_COUNT, Slot, TeamId, UserId};
use mesh_hooks::Webhooks;
use tokio::sync::mpsc;

use crate::hooks::presence_changed;

use crate::quota::{Quotas, Refusal};
use crate::state::{Connection, Notice, Notices, Online, Presence, SessionId};

/// Messages queued to one gateway session; a gateway that falls this far behind is cut off
/// (it reconnects and sends a fresh snapshot).
pub const SESSION_QUEUE: usize = 4096;

/// Why a query is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A user id that does not parse.
    #[error("{raw}: {error}")]
    BadUser { raw: String, error: IdError },
}

/// One message of a gateway session, decoded. Ids a gateway sent that do not parse were
/// skipped (gateways send only ids they validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Everything the gateway holds, replacing what the session reported before.
    Snapshot {
        /// The gateway's name (for logs and `ListConnections`) and its region.
        gateway: String,
        region: String,
        /// Live connections per user, with the user's team.
        online: Vec<Online>,
        /// Manual settings: (user, away, set at ms).
        manual: Vec<(UserId, bool, u64)>,
        /// Connections per team and user, for the caps.
        teams: Vec<(TeamId, UserId, u32)>,
        /// Connection requests it has not heard an answer to.
        pending_acquires: Vec<u64>,
        /// Users it watches.
        watched: Vec<UserId>,
        /// Users whose last connection there closed recently, with when (Unix ms).
        left: Vec<(UserId, u64)>,
    },
    /// A user's live connections on the gateway now.
    Online(Online),
    Watch(Vec<UserId>),
    Unwatch(Vec<UserId>),
    /// A user set themselves away or back.
    Manual {
        user: UserId,
        away: bool,
        set_at_ms: u64,
    },
    /// A connection asks to fit the caps.
    Acquire(Acquire),
    /// A connection ended.
    Release {
        team: TeamId,
        user: UserId,
    },
}

/// A connection's request to fit its team's and its user's caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    /// The gateway's number for the request, echoed in the answer.
    pub request: u64,
    /// Its team and user; `None` when either id did not parse (refused as over the team cap).
    pub who: Option<(TeamId, UserId)>,
    /// The caps (0: no cap).
    pub team_limit: u32,
    pub user_limit: u32,
}

/// A message to a gateway session, in the edge's own form.
pub trait Outbound: Send + 'static {
    /// Presence changes and answers, each with the user's team when known.
    fn presence(items: Vec<Notice>) -> Self;
    /// The answer to connection request `request`.
    fn acquired(request: u64, outcome: Result<(), Refusal>) -> Self;
}

/// The gateway sessions of one presence server and the state they report into.
#[derive(Debug)]
pub struct Sessions<M> {
    state: Mutex<Presence>,
    /// Connection counts of the teams this server owns.
    quotas: Mutex<Quotas>,
    /// Each live gateway session's outgoing queue.
    queues: Mutex<HashMap<SessionId, mpsc::Sender<M>>>,
    next_session: AtomicU64,
    /// Messages queued per session before it is cut off.
    queue: usize,
    /// Where `presence_changed` events go (disabled: nowhere).
    hooks: Webhooks,
}

impl<M: Outbound> Sessions<M> {
    /// No sessions yet; users go away `grace` after their last connection; each session's
    /// queue holds `queue` messages.
    pub fn new(grace: Duration, queue: usize) -> Self {
        Sessions {
            state: Mutex::new(Presence::new(grace)),
            quotas: Mutex::new(Quotas::default()),
            queues: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            queue,
            hooks: Webhooks::disabled(),
        }
    }

    /// These sessions, telling every change of a user's presence to `hooks`.
    pub fn with_webhooks(self, hooks: Webhooks) -> Self {
        Sessions { hooks, ..self }
    }

    /// Runs `f` on the state, then emits the presence changes it made, still under the lock
    /// (so that each user's are queued in order).
    fn with_state<T>(&self, f: impl FnOnce(&mut Presence) -> T) -> T {
        let mut state = self.state();
        let out = f(&mut state);
        let changes = state.take_changes();
        if self.hooks.is_enabled() && !changes.is_empty() {
            let now = mesh_hooks::webhooks::delivery::now_ms();
            for change in &changes {
                self.hooks.emit(presence_changed(change, now));
            }
        }
        out
    }

    fn state(&self) -> MutexGuard<'_, Presence> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn quotas(&self) -> MutexGuard<'_, Quotas> {
        self.quotas.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<SessionId, mpsc::Sender<M>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (open gateway sessions, users tracked), for the metrics.
    pub fn counts(&self) -> (usize, usize) {
        let sessions = self.queues().len();
        (sessions, self.state().len())
    }

    /// Opens a session; the receiver is what its gateway reads.
    pub fn open(&self) -> (SessionId, mpsc::Receiver<M>) {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.queue);
        self.queues().insert(session, tx);
        (session, rx)
    }

    /// Ends `session` (its gateway closed it, went silent, or fell behind): what it held is
    /// free, its users go away after the grace, and its watchers hear of what changes.
    pub fn end(&self, session: SessionId, now: Instant) {
        let removed = self.queues().remove(&session);
        if removed.is_some() {
            self.quotas().drop_session(session);
            let notices = self.with_state(|s| s.drop_session(session, now));
            self.deliver(notices, now);
        }
    }

    /// Sends each session its changes; a session whose queue is full is cut off.
    fn deliver(&self, notices: Notices, now: Instant) {
        if notices.is_empty() {
            return;
        }
        let mut overflowed = Vec::new();
        {
            let queues = self.queues();
            for (session, items) in notices {
                if let Some(tx) = queues.get(&session)
                    && tx.try_send(M::presence(items)).is_err()
                {
                    overflowed.push(session);
                }
            }
        }
        for session in overflowed {
            tracing::warn!(session, "gateway session fell behind; cutting it off");
            self.end(session, now);
        }
    }

    /// Publishes what is due at `now`: aways past their grace, the end of warming.
    pub fn tick(&self, now: Instant) {
        let notices = self.with_state(|s| s.tick(now));
        self.deliver(notices, now);
    }

    /// Applies one message of `session`.
    pub fn apply(&self, session: SessionId, report: Report, now: Instant) {
        let notices = match report {
            Report::Snapshot {
                gateway,
                region,
                online,
                manual,
                teams,
                pending_acquires,
                watched,
                left,
            } => {
                self.quotas().replace(session, teams, &pending_acquires);
                tracing::debug!(session, %gateway, "gateway snapshot");
                self.with_state(|s| {
                    let mut notices = s.snapshot(session, online, manual, watched, now);
                    s.name_session(session, gateway, region);
                    for (session, items) in s.recently_left(&left, now) {
                        notices.entry(session).or_default().extend(items);
                    }
                    notices
                })
            }
            Report::Online(online) => self.with_state(|s| s.online(session, &online, now)),
            Report::Watch(users) => {
                let answer = self.state().watch(session, &users);
                let mut notices = Notices::new();
                if !answer.is_empty() {
                    notices.insert(session, answer);
                }
                notices
            }
            Report::Unwatch(users) => {
                self.state().unwatch(session, &users);
                Notices::new()
            }
            Report::Manual {
                user,
                away,
                set_at_ms,
            } => self.with_state(|s| s.manual(&user, away, set_at_ms, now)),
            Report::Acquire(acquire) => {
                self.acquire(session, &acquire, now);
                Notices::new()
            }
            Report::Release { team, user } => {
                self.quotas().release(session, &team, &user);
                Notices::new()
            }
        };
        self.deliver(notices, now);
    }

    /// Answers one `Acquire` of `session`: counted here, one at a time, for every gateway.
    fn acquire(&self, session: SessionId, a: &Acquire, now: Instant) {
        let outcome = match &a.who {
            _ if self.state().warming(now) => Err(Refusal::Warming),
            Some((team, user)) => self.quotas().acquire(
                session,
                a.request,
                team,
                user,
                a.team_limit,
                a.user_limit,
                now,
            ),
            // Gateways send only ids they validated; refuse rather than count garbage.
            None => Err(Refusal::Team),
        };
        let sent = self
            .queues()
            .get(&session)
            .map(|tx| tx.try_send(M::acquired(a.request, outcome)).is_ok());
        if sent == Some(false) {
            // The gateway does not hear the grant and times out: take it back, and cut the
            // session off as any session this far behind.
            if outcome.is_ok()
                && let Some((team, user)) = &a.who
            {
                self.quotas().release(session, team, user);
            }
            tracing::warn!(session, "gateway session fell behind; cutting it off");
            self.end(session, now);
        }
    }

    /// Keeps only the users (and teams) `node` owns on `ring`, warming up from `now` if it
    /// gained slots since `before`.
    pub fn follow_ring(&self, node: &NodeId, before: Option<&Ring>, ring: &Ring, now: Instant) {
        let mine = |r: &Ring, s: Slot| r.owner(s).is_some_and(|n| &n.id == node);
        let gained =
            (0..SLOT_COUNT as Slot).any(|s| mine(ring, s) && !before.is_some_and(|b| mine(b, s)));
        self.with_state(|state| state.rebalance(|s| mine(ring, s), gained, now, crate::WARM_UP));
        self.quotas().retain(|team| {
            ring.owner_of(&ChannelId::from(team))
                .is_some_and(|n| &n.id == node)
        });
        if gained {
            tracing::info!(epoch = ring.epoch(), "presence slots gained; warming up");
        }
    }

    /// `user`'s (a raw id) live connections as the gateways report them, oldest first.
    pub fn connections(&self, user: &str) -> Result<Vec<Connection>, QueryError> {
        let user = UserId::new(user).map_err(|error| QueryError::BadUser {
            raw: user.to_string(),
            error,
        })?;
        Ok(self.state().connections(&user))
    }

    /// The presence of each of `users` (as raw ids), as watchers know it, with their teams.
    pub fn query(&self, users: &[String]) -> Result<Vec<Notice>, QueryError> {
        let mut parsed = Vec::with_capacity(users.len());
        for raw in users {
            let user = UserId::new(raw).map_err(|error| QueryError::BadUser {
                raw: raw.clone(),
                error,
            })?;
            parsed.push(user);
        }
        let state = self.state();
        Ok(parsed.iter().map(|user| state.get(user)).collect())
    }
}

#[cfg(test)]
mod tests;
