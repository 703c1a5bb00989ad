//! The presence server's gRPC service: gateway sessions (the leased reports and the watches),
//! queries, the grace-period ticker, and following the presence ring.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::Stream;
use mesh_core::{ChannelId, NodeId, Ring, SLOT_COUNT, Slot, TeamId, UserId};
use mesh_proto::presence as pb;
use mesh_proto::presence::gateway_message::Kind;
use ring_client::RingWatcher;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::quota::{Quotas, Refusal};
use crate::state::{Notices, Presence, SessionId};

/// Messages queued to one gateway session; a gateway that falls this far behind is cut off
/// (it reconnects and sends a fresh snapshot).
pub const SESSION_QUEUE: usize = 4096;
/// How often due changes (aways past their grace, the end of warming) are published.
const TICK: Duration = Duration::from_millis(100);

/// The presence service; cheap to clone.
#[derive(Debug, Clone)]
pub struct PresenceService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<Presence>,
    /// Connection counts of the teams this server owns.
    quotas: Mutex<Quotas>,
    /// Each live gateway session's outgoing queue.
    sessions: Mutex<HashMap<SessionId, mpsc::Sender<Result<pb::ServerMessage, Status>>>>,
    next_session: AtomicU64,
    gateway_lease: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

fn user_presence(items: Vec<(UserId, bool)>) -> pb::ServerMessage {
    pb::ServerMessage {
        acquired: Vec::new(),
        users: items
            .into_iter()
            .map(|(user, active)| pb::UserPresence {
                user: user.to_string(),
                active,
            })
            .collect(),
    }
}

/// Valid user ids of `raw`; the others are skipped (gateways only send ids they validated).
fn users(raw: &[String]) -> Vec<UserId> {
    raw.iter().filter_map(|u| UserId::new(u).ok()).collect()
}

impl PresenceService {
    /// A service for presence-ring node `node`; its ticker and ring follower run on `tracker`
    /// until `cancel`.
    pub fn start(
        node: NodeId,
        ring: RingWatcher,
        grace: Duration,
        gateway_lease: Duration,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let service = PresenceService {
            inner: Arc::new(Inner {
                state: Mutex::new(Presence::new(grace)),
                quotas: Mutex::new(Quotas::default()),
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                gateway_lease,
                tracker: tracker.clone(),
                cancel: cancel.clone(),
            }),
        };
        tracker.spawn(service.clone().ticker());
        tracker.spawn(service.clone().follow(node, ring));
        service
    }

    fn state(&self) -> MutexGuard<'_, Presence> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn quotas(&self) -> MutexGuard<'_, Quotas> {
        self.inner.quotas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (open gateway sessions, users tracked), for the metrics.
    pub fn counts(&self) -> (usize, usize) {
        let sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        (sessions, self.state().len())
    }

    /// Answers one `Acquire` of `session`: counted here, one at a time, for every gateway.
    fn acquire(&self, session: SessionId, a: &pb::Acquire) {
        let outcome = match (TeamId::new(&a.team), UserId::new(&a.user)) {
            _ if self.state().warming(Instant::now()) => Err(Refusal::Warming),
            (Ok(team), Ok(user)) => self.quotas().acquire(
                session,
                a.request,
                &team,
                &user,
                a.team_limit,
                a.user_limit,
                Instant::now(),
            ),
            // Gateways send only ids they validated; refuse rather than count garbage.
            _ => Err(Refusal::Team),
        };
        let reply = pb::ServerMessage {
            users: Vec::new(),
            acquired: vec![pb::Acquired {
                request: a.request,
                granted: outcome.is_ok(),
                refused: outcome
                    .err()
                    .map(|r| r.as_str().to_string())
                    .unwrap_or_default(),
            }],
        };
        let sent = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&session)
            .map(|tx| tx.try_send(Ok(reply)).is_ok());
        if sent == Some(false) {
            // The gateway does not hear the grant and times out: take it back, and cut the
            // session off as any session this far behind.
            if outcome.is_ok()
                && let (Ok(team), Ok(user)) = (TeamId::new(&a.team), UserId::new(&a.user))
            {
                self.quotas().release(session, &team, &user);
            }
            tracing::warn!(session, "gateway session fell behind; cutting it off");
            self.end_session(session);
        }
    }

    /// Sends each session its changes; a session whose queue is full is cut off.
    fn deliver(&self, notices: Notices) {
        if notices.is_empty() {
            return;
        }
        let mut overflowed = Vec::new();
        {
            let sessions = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (session, items) in notices {
                if let Some(tx) = sessions.get(&session)
                    && tx.try_send(Ok(user_presence(items))).is_err()
                {
                    overflowed.push(session);
                }
            }
        }
        for session in overflowed {
            tracing::warn!(session, "gateway session fell behind; cutting it off");
            self.end_session(session);
        }
    }

    fn end_session(&self, session: SessionId) {
        let removed = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session);
        if removed.is_some() {
            self.quotas().drop_session(session);
            let notices = self.state().drop_session(session, Instant::now());
            self.deliver(notices);
        }
    }

    async fn ticker(self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let notices = self.state().tick(Instant::now());
            self.deliver(notices);
        }
    }

    /// Keeps only the users this node owns, warming up after gaining some.
    async fn follow(self, node: NodeId, ring: RingWatcher) {
        let mut before: Option<Arc<Ring>> = None;
        let cancel = self.inner.cancel.clone();
        ring.on_each_change(cancel, |ring| {
            let mine = |r: &Ring, s: Slot| r.owner(s).is_some_and(|n| n.id == node);
            let gained = (0..SLOT_COUNT as Slot)
                .any(|s| mine(&ring, s) && !before.as_ref().is_some_and(|b| mine(b, s)));
            let owned = |u: &UserId| {
                ring.owner_of(&ChannelId::from(u))
                    .is_some_and(|n| n.id == node)
            };
            self.state()
                .rebalance(owned, gained, Instant::now(), crate::WARM_UP);
            self.quotas().retain(|team| {
                ring.owner_of(&ChannelId::from(team))
                    .is_some_and(|n| n.id == node)
            });
            if gained {
                tracing::info!(epoch = ring.epoch(), "presence slots gained; warming up");
            }
            before = Some(ring);
        })
        .await;
    }

    /// Applies one message of `session`.
    fn apply(&self, session: SessionId, kind: Kind) {
        let now = Instant::now();
        let notices = match kind {
            Kind::Snapshot(s) => {
                let online = s
                    .online
                    .iter()
                    .filter_map(|o| Some((UserId::new(&o.user).ok()?, o.connections)))
                    .collect();
                let manual = s
                    .manual
                    .iter()
                    .filter_map(|m| Some((UserId::new(&m.user).ok()?, m.away, m.set_at_ms)))
                    .collect();
                let teams = s
                    .teams
                    .iter()
                    .filter_map(|t| {
                        Some((
                            TeamId::new(&t.team).ok()?,
                            UserId::new(&t.user).ok()?,
                            t.connections,
                        ))
                    })
                    .collect();
                self.quotas().replace(session, teams, &s.pending_acquires);
                tracing::debug!(session, gateway = %s.gateway, "gateway snapshot");
                self.state()
                    .snapshot(session, online, manual, users(&s.watched), now)
            }
            Kind::Online(o) => match UserId::new(&o.user) {
                Ok(user) => self.state().online(session, &user, o.connections, now),
                Err(_) => Notices::new(),
            },
            Kind::Watch(w) => {
                let answer = self.state().watch(session, &users(&w.users));
                let mut notices = Notices::new();
                if !answer.is_empty() {
                    notices.insert(session, answer);
                }
                notices
            }
            Kind::Unwatch(w) => {
                self.state().unwatch(session, &users(&w.users));
                Notices::new()
            }
            Kind::Manual(m) => match UserId::new(&m.user) {
                Ok(user) => self.state().manual(&user, m.away, m.set_at_ms, now),
                Err(_) => Notices::new(),
            },
            Kind::Heartbeat(_) => Notices::new(),
            Kind::Acquire(a) => {
                self.acquire(session, &a);
                Notices::new()
            }
            Kind::Release(r) => {
                if let (Ok(team), Ok(user)) = (TeamId::new(&r.team), UserId::new(&r.user)) {
                    self.quotas().release(session, &team, &user);
                }
                Notices::new()
            }
        };
        self.deliver(notices);
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::presence_server::Presence for PresenceService {
    type SessionStream = BoxStream<pb::ServerMessage>;

    async fn session(
        &self,
        request: Request<Streaming<pb::GatewayMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut incoming = request.into_inner();
        let session = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session, tx);
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let lease = this.inner.gateway_lease;
            loop {
                // Cancel-safe: message() loses nothing when another branch wins; we stop.
                let next = tokio::select! {
                    _ = this.inner.cancel.cancelled() => break,
                    next = tokio::time::timeout(lease, incoming.message()) => next,
                };
                match next {
                    Ok(Ok(Some(pb::GatewayMessage { kind: Some(kind) }))) => {
                        this.apply(session, kind)
                    }
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                    Err(_) => {
                        tracing::warn!(session, ?lease, "gateway session silent past its lease");
                        break;
                    }
                }
            }
            this.end_session(session);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let req = request.into_inner();
        let mut answer = Vec::with_capacity(req.users.len());
        for raw in &req.users {
            let user =
                UserId::new(raw).map_err(|e| Status::invalid_argument(format!("{raw}: {e}")))?;
            answer.push(user);
        }
        let state = self.state();
        Ok(Response::new(pb::QueryResponse {
            users: answer
                .into_iter()
                .map(|user| pb::UserPresence {
                    active: state.get(&user),
                    user: user.to_string(),
                })
                .collect(),
        }))
    }
}
