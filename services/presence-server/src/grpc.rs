//! The presence server's gRPC edge: one leased session stream per gateway (its reports in,
//! presence changes and connection answers out) and queries. It converts prost ⇄ domain and
//! maps every error to a `Status` in one table ([`status`]); the sessions and the presence
//! state live in [`Sessions`], the background loops in `ticker`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use mesh_core::{NodeId, TeamId, UserId};
use mesh_proto::presence as pb;
use mesh_proto::presence::gateway_message::Kind;
use mesh_transport::authz::{self, rpc};
use mesh_transport::{Authorizer, Caller, Role};
use ring_client::RingWatcher;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::quota::Refusal;
use crate::sessions::{Acquire, Outbound, QueryError, Report, SESSION_QUEUE, Sessions};
use crate::state::{ConnDetail, Connection, Notice, Online};

/// The most connections of one user taken from one report (gateways send at most 1,000).
const MAX_DETAILS: usize = 1_000;
use crate::ticker;

/// The one table from the presence server's errors to gRPC statuses.
pub fn status(error: QueryError) -> Status {
    match error {
        QueryError::BadUser { .. } => Status::invalid_argument(error.to_string()),
    }
}

/// The presence service; cheap to clone.
#[derive(Debug, Clone)]
pub struct PresenceService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    sessions: Arc<Sessions<pb::ServerMessage>>,
    /// Refuses a session whose gateway is not the caller (the table was checked before).
    authorizer: Authorizer,
    gateway_lease: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Messages to a gateway session in their protobuf form.
impl Outbound for pb::ServerMessage {
    fn presence(items: Vec<Notice>) -> Self {
        pb::ServerMessage {
            acquired: Vec::new(),
            users: items.into_iter().map(user_presence).collect(),
        }
    }

    fn acquired(request: u64, outcome: Result<(), Refusal>) -> Self {
        pb::ServerMessage {
            users: Vec::new(),
            acquired: vec![pb::Acquired {
                request,
                granted: outcome.is_ok(),
                refused: outcome
                    .err()
                    .map(|r| r.as_str().to_string())
                    .unwrap_or_default(),
            }],
        }
    }
}

/// The protobuf form of a user's presence ("" for a team not known).
fn user_presence(notice: Notice) -> pb::UserPresence {
    pb::UserPresence {
        user: notice.user.to_string(),
        active: notice.active,
        team: notice.team.map(|t| t.to_string()).unwrap_or_default(),
    }
}

/// A gateway's report of a user's connections; `None` when the user id does not parse. A team
/// that does not parse (or is "", from a gateway that does not say) is no team.
fn online(o: &pb::UserOnline) -> Option<Online> {
    Some(Online {
        user: UserId::new(&o.user).ok()?,
        connections: o.connections,
        team: TeamId::new(&o.team).ok(),
        details: o
            .details
            .iter()
            .take(MAX_DETAILS)
            .map(|d| ConnDetail {
                team: TeamId::new(&d.team).ok(),
                connected_at_ms: d.connected_at_ms,
            })
            .collect(),
        since_ms: o.online_since_ms,
        left_ms: o.left_ms,
    })
}

/// The protobuf form of a connection, as `Connections` lists it.
fn connection_info(c: Connection) -> pb::ConnectionInfo {
    pb::ConnectionInfo {
        gateway: c.gateway,
        region: c.region,
        team: c.team.map(|t| t.to_string()).unwrap_or_default(),
        connected_at_ms: c.connected_at_ms,
    }
}

/// Valid user ids of `raw`; the others are skipped (gateways only send ids they validated).
fn users(raw: &[String]) -> Vec<UserId> {
    raw.iter().filter_map(|u| UserId::new(u).ok()).collect()
}

/// The report a gateway's message makes; `None` for a heartbeat, or for a message about an id
/// that does not parse (except an acquire, which is answered).
fn report(kind: Kind) -> Option<Report> {
    Some(match kind {
        Kind::Snapshot(s) => Report::Snapshot {
            online: s.online.iter().filter_map(online).collect(),
            manual: s
                .manual
                .iter()
                .filter_map(|m| Some((UserId::new(&m.user).ok()?, m.away, m.set_at_ms)))
                .collect(),
            teams: s
                .teams
                .iter()
                .filter_map(|t| {
                    Some((
                        TeamId::new(&t.team).ok()?,
                        UserId::new(&t.user).ok()?,
                        t.connections,
                    ))
                })
                .collect(),
            watched: users(&s.watched),
            pending_acquires: s.pending_acquires,
            left: s
                .left
                .iter()
                .filter_map(|l| Some((UserId::new(&l.user).ok()?, l.left_ms)))
                .collect(),
            gateway: s.gateway,
            region: s.region,
        },
        Kind::Online(o) => Report::Online(online(&o)?),
        Kind::Watch(w) => Report::Watch(users(&w.users)),
        Kind::Unwatch(w) => Report::Unwatch(users(&w.users)),
        Kind::Manual(m) => Report::Manual {
            user: UserId::new(&m.user).ok()?,
            away: m.away,
            set_at_ms: m.set_at_ms,
        },
        Kind::Heartbeat(_) => return None,
        Kind::Acquire(a) => Report::Acquire(Acquire {
            request: a.request,
            who: TeamId::new(&a.team).ok().zip(UserId::new(&a.user).ok()),
            team_limit: a.team_limit,
            user_limit: a.user_limit,
        }),
        Kind::Release(r) => Report::Release {
            team: TeamId::new(&r.team).ok()?,
            user: UserId::new(&r.user).ok()?,
        },
    })
}

impl PresenceService {
    /// A service for presence-ring node `node`; its ticker and ring follower run on `tracker`
    /// until `cancel`; presence changes also go to `hooks` (`presence_changed`). `authorizer` refuses a session opened as another gateway (the one its
    /// server's layer uses, so that refusals are counted together).
    pub fn start(
        node: NodeId,
        ring: RingWatcher,
        (grace, gateway_lease): (Duration, Duration),
        authorizer: Authorizer,
        hooks: mesh_hooks::Webhooks,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let sessions = Arc::new(Sessions::new(grace, SESSION_QUEUE).with_webhooks(hooks));
        // It owns the users of the ring it has now (none, before the first): a gateway that
        // hears of a newer ring first is not answered from half the reports.
        sessions.follow_ring(&node, None, &ring.current(), Instant::now());
        tracker.spawn(ticker::tick(sessions.clone(), cancel.clone()));
        tracker.spawn(ticker::follow_ring(
            sessions.clone(),
            node,
            ring,
            cancel.clone(),
        ));
        PresenceService {
            inner: Arc::new(Inner {
                sessions,
                authorizer,
                gateway_lease,
                tracker: tracker.clone(),
                cancel,
            }),
        }
    }

    /// `caller` may send a snapshot as gateway `gateway` only if its certificate names it.
    fn as_gateway(&self, caller: &Caller, gateway: &str) -> Result<(), Status> {
        if caller.is(&[Role::Gateway], gateway) {
            return Ok(());
        }
        let why =
            format!("a gateway opens presence sessions only as itself, not as gateway {gateway:?}");
        Err(self.inner.authorizer.refuse(caller, rpc::SESSION, &why))
    }

    /// (open gateway sessions, users tracked), for the metrics.
    pub fn counts(&self) -> (usize, usize) {
        self.inner.sessions.counts()
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
        let caller = authz::caller(&request);
        let mut incoming = request.into_inner();
        let lease = self.inner.gateway_lease;
        // A session is one gateway's: it opens with that gateway's snapshot, naming it, before
        // anything is applied (the gateway sends it with the call).
        let first = match tokio::time::timeout(lease, incoming.message()).await {
            Ok(Ok(Some(pb::GatewayMessage {
                kind: Some(Kind::Snapshot(snapshot)),
            }))) => {
                self.as_gateway(&caller, &snapshot.gateway)?;
                Kind::Snapshot(snapshot)
            }
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "a presence session opens with the gateway's snapshot",
                ));
            }
            Ok(Ok(None)) => return Err(Status::cancelled("the gateway ended the session")),
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no snapshot within the gateway lease",
                ));
            }
        };
        let (session, rx) = self.inner.sessions.open();
        // A later snapshot naming another gateway ends the session with its refusal.
        let (refused_tx, refused_rx) = tokio::sync::oneshot::channel::<Status>();
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let mut next_kind = Some(first);
            loop {
                let kind = match next_kind.take() {
                    Some(kind) => kind,
                    None => {
                        // Cancel-safe: message() loses nothing when another branch wins; we
                        // stop.
                        let next = tokio::select! {
                            _ = this.inner.cancel.cancelled() => break,
                            next = tokio::time::timeout(lease, incoming.message()) => next,
                        };
                        match next {
                            Ok(Ok(Some(pb::GatewayMessage { kind: Some(kind) }))) => kind,
                            Ok(Ok(Some(_))) => continue,
                            Ok(Ok(None)) | Ok(Err(_)) => break,
                            Err(_) => {
                                tracing::warn!(
                                    session,
                                    ?lease,
                                    "gateway session silent past its lease"
                                );
                                break;
                            }
                        }
                    }
                };
                if let Kind::Snapshot(snapshot) = &kind
                    && let Err(refused) = this.as_gateway(&caller, &snapshot.gateway)
                {
                    let _ = refused_tx.send(refused);
                    break;
                }
                if let Some(report) = report(kind) {
                    this.inner.sessions.apply(session, report, Instant::now());
                }
            }
            this.inner.sessions.end(session, Instant::now());
        });
        let refused = futures::stream::once(refused_rx)
            .filter_map(|r| futures::future::ready(r.ok().map(Err)));
        let stream = ReceiverStream::new(rx).map(Ok).chain(refused);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let req = request.into_inner();
        let answer = self.inner.sessions.query(&req.users).map_err(status)?;
        Ok(Response::new(pb::QueryResponse {
            users: answer.into_iter().map(user_presence).collect(),
        }))
    }

    async fn connections(
        &self,
        request: Request<pb::ConnectionsRequest>,
    ) -> Result<Response<pb::ConnectionsResponse>, Status> {
        let req = request.into_inner();
        let answer = self.inner.sessions.connections(&req.user).map_err(status)?;
        Ok(Response::new(pb::ConnectionsResponse {
            connections: answer.into_iter().map(connection_info).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_bad_user_in_a_query_is_an_invalid_argument_naming_it() {
        let error = UserId::new("").unwrap_err();
        let status = status(QueryError::BadUser {
            raw: String::new(),
            error: error.clone(),
        });
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), format!(": {error}"));
    }

    #[test]
    fn unparsable_ids_are_skipped_but_an_acquire_is_answered() {
        let online = Kind::Online(pb::UserOnline {
            user: "not valid".into(),
            connections: 1,
            team: "T1".into(),
            ..Default::default()
        });
        assert_eq!(report(online), None);
        // A team that does not parse, or none, is no team; the report still counts.
        for team in ["", "not a team"] {
            let online = Kind::Online(pb::UserOnline {
                user: "U1".into(),
                connections: 1,
                team: team.into(),
                details: vec![pb::ConnectionDetail {
                    conn: 4,
                    team: team.into(),
                    connected_at_ms: 9,
                }],
                ..Default::default()
            });
            let want = Online {
                user: UserId::new("U1").unwrap(),
                connections: 1,
                team: None,
                details: vec![ConnDetail {
                    team: None,
                    connected_at_ms: 9,
                }],
                since_ms: 0,
                left_ms: 0,
            };
            assert_eq!(report(online), Some(Report::Online(want)));
        }
        let acquire = Kind::Acquire(pb::Acquire {
            request: 7,
            team: String::new(),
            user: "U1".into(),
            team_limit: 1,
            user_limit: 1,
        });
        assert_eq!(
            report(acquire),
            Some(Report::Acquire(Acquire {
                request: 7,
                who: None,
                team_limit: 1,
                user_limit: 1,
            }))
        );
    }
}
