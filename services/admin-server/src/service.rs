//! The `channelmesh.admin.v1.Admin` service: the protobuf edge of the admin API.

use bytes::Bytes;
use channel_client::{ChannelRouter, RouteError};
use mesh_core::event::{MAX_RAW_EVENT_BYTES, MAX_TEXT_BYTES};
use mesh_core::{ChannelEvent, ChannelId, EventBody, Identity, TeamId, TokenKey, Ts, UserId};
use mesh_proto::admin as pb;
use mesh_proto::admin::admin_server::Admin;
use serde_json::Value;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Event types a publisher may not send: they are the protocol's own frames.
const RESERVED_TYPES: &[&str] = &["hello", "goodbye", "pong", "error", "reconnect_url"];
/// Lifetime of a minted token when the call asks for 0 seconds.
const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;
/// The longest lifetime MintToken grants.
const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// How long a RevokeTokens call may wait for the ring manager.
const REVOKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The admin API.
#[derive(Debug, Clone)]
pub struct AdminService {
    router: ChannelRouter,
    key: TokenKey,
    /// The presence ring, when the mesh has presence servers.
    presence: Option<ring_client::RingWatcher>,
    /// Where RevokeTokens is forwarded (the ring manager keeps the revocation list); without
    /// one, RevokeTokens answers UNIMPLEMENTED.
    ring_manager: Option<ring_client::RingSource>,
    metrics: Metrics,
}

/// The admin server's metrics (`channelmesh_admin_*`).
#[derive(Debug, Clone)]
struct Metrics {
    /// Calls by method and outcome (`ok`, or the gRPC code).
    requests: mesh_telemetry::prometheus::IntCounterVec,
    /// Routed publishes: from the call to the owning channel server's answer, retries included.
    publish_seconds: mesh_telemetry::prometheus::Histogram,
}

impl Metrics {
    fn new(telemetry: &mesh_telemetry::Telemetry) -> Self {
        Metrics {
            requests: telemetry.counter_vec(
                "channelmesh_admin_requests_total",
                "Admin API calls by method and outcome (ok, or the gRPC status code).",
                &["method", "outcome"],
            ),
            publish_seconds: telemetry.latency(
                "channelmesh_admin_publish_seconds",
                "Admin server -> channel server: a routed publish until the owner answered, retries across ring changes included.",
            ),
        }
    }

    /// Counts a call's outcome.
    fn outcome<T>(&self, method: &str, result: &Result<T, Status>) {
        let outcome = match result {
            Ok(_) => "ok".to_string(),
            Err(status) => format!("{:?}", status.code()),
        };
        self.requests.with_label_values(&[method, &outcome]).inc();
    }
}

/// The most users one `GetPresence` may ask about.
pub const MAX_PRESENCE_USERS: usize = 500;

impl AdminService {
    /// Routes through `router`; mints tokens with `key`; asks presence servers on `presence`.
    pub fn new(
        router: ChannelRouter,
        key: TokenKey,
        presence: Option<ring_client::RingWatcher>,
    ) -> Self {
        AdminService {
            router,
            key,
            presence,
            ring_manager: None,
            metrics: Metrics::new(&mesh_telemetry::Telemetry::default()),
        }
    }

    /// Registers its metrics in `telemetry` (else they are kept but not served).
    pub fn with_telemetry(mut self, telemetry: &mesh_telemetry::Telemetry) -> Self {
        self.metrics = Metrics::new(telemetry);
        self
    }

    /// Forwards RevokeTokens to the ring manager `source` leads to.
    pub fn with_ring_manager(mut self, source: ring_client::RingSource) -> Self {
        self.ring_manager = Some(source);
        self
    }

    async fn publish(&self, channel: ChannelId, body: EventBody) -> Result<Ts, Status> {
        let event = ChannelEvent {
            channel,
            ts: None,
            body,
            origin: None,
        };
        let started = std::time::Instant::now();
        let published = self.router.publish(&event).await;
        if published.is_ok() {
            let elapsed = started.elapsed().as_secs_f64();
            self.metrics.publish_seconds.observe(elapsed);
        }
        match published {
            Ok(Some(ts)) => Ok(ts),
            Ok(None) => Err(Status::internal("channel server assigned no ts")),
            Err(e) => Err(route_status(e)),
        }
    }
}

/// The one table from routing errors to gRPC statuses.
fn route_status(e: RouteError) -> Status {
    match e {
        RouteError::Invalid(m) => Status::invalid_argument(m),
        RouteError::Unavailable(m) => Status::unavailable(m),
        RouteError::Internal(m) => Status::internal(m),
    }
}

fn channel(field: &str, value: &str) -> Result<ChannelId, Status> {
    ChannelId::new(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn user(value: &str) -> Result<UserId, Status> {
    UserId::new(value).map_err(|e| Status::invalid_argument(format!("user: {e}")))
}

fn opt_team(value: &str) -> Result<Option<TeamId>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    TeamId::new(value)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("team: {e}")))
}

impl AdminService {
    /// PostMessage, inside its span.
    async fn post(
        &self,
        req: pb::PostMessageRequest,
    ) -> Result<Response<pb::PostMessageResponse>, Status> {
        let channel = channel("channel", &req.channel)?;
        if req.text.is_empty() {
            return Err(Status::invalid_argument("text: message text is missing"));
        }
        if req.text.len() > MAX_TEXT_BYTES {
            return Err(Status::invalid_argument(format!(
                "text: msg_too_long (over {MAX_TEXT_BYTES} bytes)"
            )));
        }
        let body = EventBody::Message {
            user: user(&req.user)?,
            text: req.text,
            team: opt_team(&req.team)?,
        };
        let ts = self.publish(channel, body).await?;
        Ok(Response::new(pb::PostMessageResponse {
            ts: ts.to_string(),
        }))
    }

    /// PublishEvent, inside its span.
    async fn publish_raw(
        &self,
        req: pb::PublishEventRequest,
    ) -> Result<Response<pb::PublishEventResponse>, Status> {
        let channel = channel("channel", &req.channel)?;
        if req.event_json.len() > MAX_RAW_EVENT_BYTES {
            return Err(Status::invalid_argument(format!(
                "event_json: over {MAX_RAW_EVENT_BYTES} bytes"
            )));
        }
        let value: Value = serde_json::from_str(&req.event_json)
            .map_err(|e| Status::invalid_argument(format!("event_json: invalid JSON: {e}")))?;
        let kind = match value.get("type") {
            Some(Value::String(kind)) if !kind.is_empty() => kind.clone(),
            _ if !value.is_object() => {
                return Err(Status::invalid_argument(
                    "event_json: must be a JSON object",
                ));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "event_json: needs a string \"type\"",
                ));
            }
        };
        if RESERVED_TYPES.contains(&kind.as_str()) {
            return Err(Status::invalid_argument(format!(
                "event_json: type {kind:?} is reserved for the protocol"
            )));
        }
        let body = EventBody::Raw {
            kind,
            json: Bytes::from(req.event_json),
        };
        let ts = self.publish(channel, body).await?;
        Ok(Response::new(pb::PublishEventResponse {
            ts: ts.to_string(),
        }))
    }

    /// JoinChannel, inside its span.
    async fn join(
        &self,
        req: pb::JoinChannelRequest,
    ) -> Result<Response<pb::JoinChannelResponse>, Status> {
        let channel = channel("channel", &req.channel)?;
        let user = user(&req.user)?;
        let team = opt_team(&req.team)?;
        // The channel first: its members see the join, and its ts is where the user's
        // connections start reading the channel.
        let ts = self
            .publish(
                channel.clone(),
                EventBody::MemberJoined {
                    user: user.clone(),
                    team,
                },
            )
            .await?;
        self.publish(
            ChannelId::from(&user),
            EventBody::ChannelJoined {
                channel,
                since: Some(ts),
            },
        )
        .await?;
        Ok(Response::new(pb::JoinChannelResponse {
            ts: ts.to_string(),
        }))
    }

    /// LeaveChannel, inside its span.
    async fn leave(
        &self,
        req: pb::LeaveChannelRequest,
    ) -> Result<Response<pb::LeaveChannelResponse>, Status> {
        let channel = channel("channel", &req.channel)?;
        let user = user(&req.user)?;
        // The user first: their connections stop reading before the channel hears of it.
        self.publish(
            ChannelId::from(&user),
            EventBody::ChannelLeft {
                channel: channel.clone(),
            },
        )
        .await?;
        let ts = self
            .publish(channel, EventBody::MemberLeft { user })
            .await?;
        Ok(Response::new(pb::LeaveChannelResponse {
            ts: ts.to_string(),
        }))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn post_message(
        &self,
        request: Request<pb::PostMessageRequest>,
    ) -> Result<Response<pb::PostMessageResponse>, Status> {
        // One post, one trace: the caller's trace context (if it sent one) is the parent, and
        // the channel server and every gateway join it.
        let span = tracing::debug_span!("admin.PostMessage", channel = %request.get_ref().channel);
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        let result = self.post(request.into_inner()).instrument(span).await;
        self.metrics.outcome("PostMessage", &result);
        result
    }

    async fn publish_event(
        &self,
        request: Request<pb::PublishEventRequest>,
    ) -> Result<Response<pb::PublishEventResponse>, Status> {
        let span = tracing::debug_span!("admin.PublishEvent", channel = %request.get_ref().channel);
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        let result = self
            .publish_raw(request.into_inner())
            .instrument(span)
            .await;
        self.metrics.outcome("PublishEvent", &result);
        result
    }

    async fn join_channel(
        &self,
        request: Request<pb::JoinChannelRequest>,
    ) -> Result<Response<pb::JoinChannelResponse>, Status> {
        let span = tracing::debug_span!("admin.JoinChannel", channel = %request.get_ref().channel);
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        let result = self.join(request.into_inner()).instrument(span).await;
        self.metrics.outcome("JoinChannel", &result);
        result
    }

    async fn leave_channel(
        &self,
        request: Request<pb::LeaveChannelRequest>,
    ) -> Result<Response<pb::LeaveChannelResponse>, Status> {
        let span = tracing::debug_span!("admin.LeaveChannel", channel = %request.get_ref().channel);
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        let result = self.leave(request.into_inner()).instrument(span).await;
        self.metrics.outcome("LeaveChannel", &result);
        result
    }

    async fn get_presence(
        &self,
        request: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        let req = request.into_inner();
        if req.users.len() > MAX_PRESENCE_USERS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_PRESENCE_USERS} users per call"
            )));
        }
        let users = req
            .users
            .iter()
            .map(|u| UserId::new(u).map_err(|e| Status::invalid_argument(format!("users: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(ring) = &self.presence else {
            return Err(Status::unavailable("this mesh has no presence servers"));
        };
        let ring = ring.current();
        if ring.nodes().is_empty() {
            return Err(Status::unavailable("no presence server is on the ring yet"));
        }
        let answer = presence_client::lookup(&ring, &users).await;
        Ok(Response::new(pb::GetPresenceResponse {
            users: answer
                .into_iter()
                .map(|(user, active)| pb::UserPresence {
                    user: user.to_string(),
                    presence: if active { "active" } else { "away" }.to_string(),
                })
                .collect(),
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let req = request.into_inner();
        let channel = channel("channel", &req.channel)?;
        let since = if req.since_ts.is_empty() {
            None
        } else {
            Some(
                Ts::parse(&req.since_ts)
                    .map_err(|e| Status::invalid_argument(format!("since_ts: {e}")))?,
            )
        };
        let page = self
            .router
            .history(&channel, since, req.limit)
            .await
            .map_err(route_status)?;
        Ok(Response::new(pb::HistoryResponse {
            events: page
                .events
                .iter()
                .filter_map(|event| {
                    Some(pb::HistoryEvent {
                        ts: event.ts?.to_string(),
                        event_json: mesh_rtm::render(event)?,
                    })
                })
                .collect(),
            oldest_ts: page.oldest.map(|t| t.to_string()).unwrap_or_default(),
            has_more: page.has_more,
        }))
    }

    async fn mint_token(
        &self,
        request: Request<pb::MintTokenRequest>,
    ) -> Result<Response<pb::MintTokenResponse>, Status> {
        let req = request.into_inner();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL_SECS,
            n => n.min(MAX_TOKEN_TTL_SECS),
        };
        let identity = Identity {
            user: user(&req.user)?,
            team: TeamId::new(&req.team)
                .map_err(|e| Status::invalid_argument(format!("team: {e}")))?,
            name: (!req.name.is_empty()).then_some(req.name),
            channels: req
                .channels
                .iter()
                .map(|c| channel("channels", c))
                .collect::<Result<_, _>>()?,
            expires_at: now + ttl,
            jti: Some(new_jti()),
        };
        let token = self
            .key
            .mint(&identity, now)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::MintTokenResponse {
            token,
            jti: identity.jti.unwrap_or_default(),
            expires_at: identity.expires_at,
        }))
    }

    async fn revoke_tokens(
        &self,
        request: Request<pb::RevokeTokensRequest>,
    ) -> Result<Response<pb::RevokeTokensResponse>, Status> {
        use mesh_proto::ring::ring_manager_client::RingManagerClient;
        let Some(source) = &self.ring_manager else {
            return Err(Status::unimplemented(
                "this admin server does not know the ring manager",
            ));
        };
        let req = request.into_inner();
        if req.jtis.is_empty() {
            return Err(Status::invalid_argument("jtis: at least one"));
        }
        let forwarded = mesh_proto::ring::RevokeTokensRequest {
            jtis: req
                .jtis
                .into_iter()
                .map(|t| mesh_proto::ring::RevokedToken {
                    jti: t.jti,
                    expires_at: t.expires_at,
                })
                .collect(),
        };
        let call = async {
            let endpoint = source
                .endpoint()
                .await
                .map_err(|e| Status::unavailable(format!("ring manager: {e}")))?;
            let channel = mesh_transport::endpoint(&endpoint)
                .map_err(|e| Status::unavailable(format!("ring manager: {e}")))?
                .connect()
                .await
                .map_err(|e| Status::unavailable(format!("ring manager: {e}")))?;
            let mut client = RingManagerClient::new(channel);
            client.revoke_tokens(forwarded).await
        };
        let reply = tokio::time::timeout(REVOKE_TIMEOUT, call)
            .await
            .map_err(|_| Status::unavailable("ring manager did not answer in time"))??
            .into_inner();
        Ok(Response::new(pb::RevokeTokensResponse {
            version: reply.version,
            held: reply.held,
        }))
    }
}

/// A fresh token id: 128 random bits, hex.
fn new_jti() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
