//! The `channelmesh.admin.v1.Admin` service: the protobuf edge of the admin API. It checks each
//! request with `requests`, routes it, converts the answer, and maps every [`AdminError`] to a
//! `Status` in one table ([`status`]); a status the ring manager answers a forwarded
//! RevokeTokens or DisconnectUser with is relayed as it is. Connection and channel management
//! (DisconnectUser, ListConnections, ChannelInfo, ListChannels, Broadcast) is in [`manage`].

mod manage;
mod stream;

use std::sync::Arc;

use channel_client::{ChannelRouter, RouteError};
use mesh_core::{ChannelEvent, ChannelId, EventBody, Identity, Ts};
use mesh_proto::admin as pb;
use mesh_proto::admin::admin_server::Admin;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::AdminError;
use crate::mint::Minter;
use crate::requests::{self, channel, user};

use manage::RING_MANAGER_TIMEOUT;

/// The one table from the admin server's errors to gRPC statuses; the message is the error's.
pub fn status(error: AdminError) -> Status {
    let message = error.to_string();
    match error {
        AdminError::BadId { .. }
        | AdminError::BadSince(_)
        | AdminError::MissingText
        | AdminError::IdempotencyKeyTooLong
        | AdminError::TextTooLong
        | AdminError::EventTooLarge
        | AdminError::InvalidJson(_)
        | AdminError::NotAnObject
        | AdminError::NoEventType
        | AdminError::ReservedType(_)
        | AdminError::TooManyUsers
        | AdminError::NoJtis
        | AdminError::NoChannels
        | AdminError::TooManyChannels
        | AdminError::DuplicateChannel(_)
        | AdminError::MessageAndEvent
        | AdminError::BadPageToken
        | AdminError::ZeroId
        | AdminError::NoBody
        | AdminError::Route(RouteError::Invalid(_)) => Status::invalid_argument(message),
        AdminError::NoPresenceServers
        | AdminError::NoPresenceServerYet
        | AdminError::PresenceUnanswered(_)
        | AdminError::ConnectionsUnanswered(_)
        | AdminError::Route(RouteError::Unavailable(_))
        | AdminError::RingManager(_)
        | AdminError::RingManagerTimeout => Status::unavailable(message),
        AdminError::Route(RouteError::Internal(_)) | AdminError::NoTs | AdminError::Mint(_) => {
            Status::internal(message)
        }
        AdminError::NoRingManager => Status::unimplemented(message),
        AdminError::Route(RouteError::RateLimited(_)) => Status::resource_exhausted(message),
    }
}

/// The admin API.
#[derive(Debug, Clone)]
pub struct AdminService {
    router: ChannelRouter,
    minter: Minter,
    /// The presence ring, when the mesh has presence servers.
    presence: Option<ring_client::RingWatcher>,
    /// Channels to presence servers, reused across `GetPresence` calls.
    presence_channels: Arc<presence_client::Pool>,
    /// Where RevokeTokens and DisconnectUser are forwarded (the ring manager keeps the
    /// revocation and disconnect lists); without one, they answer UNIMPLEMENTED.
    ring_manager: Option<ring_client::RingSource>,
    metrics: Metrics,
    /// Where PublishStream's tasks go, and what ends them.
    tasks: Tasks,
}

/// The service's long-lived tasks (one per PublishStream) and their cancellation.
#[derive(Debug, Clone, Default)]
struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// The admin server's metrics (`channelmesh_admin_*`).
#[derive(Debug, Clone)]
struct Metrics {
    /// Calls by method and outcome (`ok`, or the gRPC code).
    requests: mesh_telemetry::prometheus::IntCounterVec,
    /// Routed publishes: from the call to the owning channel server's answer, retries included.
    publish_seconds: mesh_telemetry::prometheus::Histogram,
    /// PublishStreams open now.
    streams: mesh_telemetry::prometheus::IntGauge,
    /// Requests read from PublishStreams and not answered yet.
    stream_unanswered: mesh_telemetry::prometheus::IntGauge,
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
            streams: telemetry.gauge(
                "channelmesh_admin_publish_streams",
                "PublishStreams open now.",
            ),
            stream_unanswered: telemetry.gauge(
                "channelmesh_admin_publish_stream_unanswered",
                "Requests read from PublishStreams and not answered yet.",
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

impl AdminService {
    /// Routes through `router`; mints tokens with `minter`; asks presence servers on
    /// `presence`.
    pub fn new(
        router: ChannelRouter,
        minter: Minter,
        presence: Option<ring_client::RingWatcher>,
    ) -> Self {
        AdminService {
            router,
            minter,
            presence,
            presence_channels: Arc::default(),
            ring_manager: None,
            metrics: Metrics::new(&mesh_telemetry::Telemetry::default()),
            tasks: Tasks::default(),
        }
    }

    /// Puts its streams' tasks on `tracker`, ending them with `cancel` (else on a tracker of
    /// its own, never cancelled).
    pub fn with_tasks(mut self, tracker: &TaskTracker, cancel: CancellationToken) -> Self {
        self.tasks = Tasks {
            tracker: tracker.clone(),
            cancel,
        };
        self
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

    async fn publish(&self, channel: ChannelId, body: EventBody) -> Result<Ts, AdminError> {
        self.publish_once(channel, body, None).await
    }

    /// [`AdminService::publish`], once per idempotency `key` (the channel server's form).
    async fn publish_once(
        &self,
        channel: ChannelId,
        body: EventBody,
        key: Option<String>,
    ) -> Result<Ts, AdminError> {
        let event = ChannelEvent {
            channel,
            ts: None,
            body,
            origin: None,
        };
        let started = std::time::Instant::now();
        let published = match &key {
            Some(key) => self.router.publish_keyed(&event, key).await,
            None => self.router.publish(&event).await,
        };
        if published.is_ok() {
            let elapsed = started.elapsed().as_secs_f64();
            self.metrics.publish_seconds.observe(elapsed);
        }
        match published {
            Ok(Some(ts)) => Ok(ts),
            Ok(None) => Err(AdminError::NoTs),
            Err(e) => Err(AdminError::Route(e)),
        }
    }

    /// Runs one call of `method` inside `span`, counting its outcome.
    async fn traced<T>(
        &self,
        method: &str,
        span: tracing::Span,
        call: impl Future<Output = Result<T, AdminError>>,
    ) -> Result<Response<T>, Status> {
        let result = call
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(status);
        self.metrics.outcome(method, &result);
        result
    }

    /// PostMessage, inside its span.
    async fn post(
        &self,
        req: pb::PostMessageRequest,
    ) -> Result<pb::PostMessageResponse, AdminError> {
        let channel = channel("channel", &req.channel)?;
        let body = requests::message(&req.user, req.text, &req.team)?;
        let key = requests::idempotency_key(&req.idempotency_key)?;
        let ts = self.publish_once(channel, body, key).await?;
        Ok(pb::PostMessageResponse { ts: ts.to_string() })
    }

    /// PublishEvent, inside its span.
    async fn publish_raw(
        &self,
        req: pb::PublishEventRequest,
    ) -> Result<pb::PublishEventResponse, AdminError> {
        let channel = channel("channel", &req.channel)?;
        let body = requests::raw_event(req.event_json)?;
        let key = requests::idempotency_key(&req.idempotency_key)?;
        let ts = self.publish_once(channel, body, key).await?;
        Ok(pb::PublishEventResponse { ts: ts.to_string() })
    }

    /// JoinChannel, inside its span.
    async fn join(
        &self,
        req: pb::JoinChannelRequest,
    ) -> Result<pb::JoinChannelResponse, AdminError> {
        let channel = channel("channel", &req.channel)?;
        let user = user(&req.user)?;
        let team = requests::opt_team(&req.team)?;
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
        Ok(pb::JoinChannelResponse { ts: ts.to_string() })
    }

    /// LeaveChannel, inside its span.
    async fn leave(
        &self,
        req: pb::LeaveChannelRequest,
    ) -> Result<pb::LeaveChannelResponse, AdminError> {
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
        Ok(pb::LeaveChannelResponse { ts: ts.to_string() })
    }

    async fn presence(
        &self,
        req: pb::GetPresenceRequest,
    ) -> Result<pb::GetPresenceResponse, AdminError> {
        let users = requests::presence_users(&req.users)?;
        let Some(ring) = &self.presence else {
            return Err(AdminError::NoPresenceServers);
        };
        let ring = ring.current();
        if ring.nodes().is_empty() {
            return Err(AdminError::NoPresenceServerYet);
        }
        // The web app's own call: every user's presence, whatever their team.
        let answer = presence_client::lookup(&self.presence_channels, &ring, &users).await;
        let unanswered: Vec<String> = answer
            .iter()
            .filter(|p| !p.answered)
            .map(|p| p.user.to_string())
            .collect();
        if !unanswered.is_empty() {
            return Err(AdminError::PresenceUnanswered(unanswered));
        }
        Ok(pb::GetPresenceResponse {
            users: answer
                .into_iter()
                .map(|p| pb::UserPresence {
                    user: p.user.to_string(),
                    presence: if p.active { "active" } else { "away" }.to_string(),
                })
                .collect(),
        })
    }

    async fn read_history(
        &self,
        req: pb::HistoryRequest,
    ) -> Result<pb::HistoryResponse, AdminError> {
        let channel = channel("channel", &req.channel)?;
        let since = requests::since(&req.since_ts)?;
        let page = self
            .router
            .history(&channel, since, req.limit)
            .await
            .map_err(AdminError::Route)?;
        Ok(pb::HistoryResponse {
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
            complete_after_ts: page
                .complete_after
                .map(|t| t.to_string())
                .unwrap_or_default(),
        })
    }

    fn mint(&self, req: pb::MintTokenRequest) -> Result<pb::MintTokenResponse, AdminError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ttl = requests::token_ttl(req.ttl_seconds);
        let identity = Identity {
            user: user(&req.user)?,
            team: requests::team(&req.team)?,
            name: (!req.name.is_empty()).then_some(req.name),
            channels: req
                .channels
                .iter()
                .map(|c| channel("channels", c))
                .collect::<Result<_, _>>()?,
            expires_at: now + ttl,
            jti: None,
        };
        let minted = self.minter.mint(identity, now).map_err(AdminError::Mint)?;
        Ok(pb::MintTokenResponse {
            token: minted.token,
            jti: minted.jti,
            expires_at: minted.expires_at,
        })
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
        self.traced("PostMessage", span, self.post(request.into_inner()))
            .await
    }

    async fn publish_event(
        &self,
        request: Request<pb::PublishEventRequest>,
    ) -> Result<Response<pb::PublishEventResponse>, Status> {
        let span = tracing::debug_span!("admin.PublishEvent", channel = %request.get_ref().channel);
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        self.traced("PublishEvent", span, self.publish_raw(request.into_inner()))
            .await
    }

    async fn join_channel(
        &self,
        request: Request<pb::JoinChannelRequest>,
    ) -> Result<Response<pb::JoinChannelResponse>, Status> {
        let span = tracing::debug_span!("admin.JoinChannel", channel = %request.get_ref().channel);
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        self.traced("JoinChannel", span, self.join(request.into_inner()))
            .await
    }

    async fn leave_channel(
        &self,
        request: Request<pb::LeaveChannelRequest>,
    ) -> Result<Response<pb::LeaveChannelResponse>, Status> {
        let span = tracing::debug_span!("admin.LeaveChannel", channel = %request.get_ref().channel);
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        self.traced("LeaveChannel", span, self.leave(request.into_inner()))
            .await
    }

    async fn get_presence(
        &self,
        request: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        let answer = self.presence(request.into_inner()).await;
        answer.map(Response::new).map_err(status)
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let page = self.read_history(request.into_inner()).await;
        page.map(Response::new).map_err(status)
    }

    async fn mint_token(
        &self,
        request: Request<pb::MintTokenRequest>,
    ) -> Result<Response<pb::MintTokenResponse>, Status> {
        let minted = self.mint(request.into_inner());
        minted.map(Response::new).map_err(status)
    }

    async fn disconnect_user(
        &self,
        request: Request<pb::DisconnectUserRequest>,
    ) -> Result<Response<pb::DisconnectUserResponse>, Status> {
        let span = tracing::debug_span!("admin.DisconnectUser", user = %request.get_ref().user);
        let result = self
            .disconnect(request.into_inner())
            .instrument(span)
            .await
            .map(Response::new);
        self.metrics.outcome("DisconnectUser", &result);
        result
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let span = tracing::debug_span!("admin.ListConnections", user = %request.get_ref().user);
        let call = self.list_connections_of(request.into_inner());
        self.traced("ListConnections", span, call).await
    }

    async fn list_channels(
        &self,
        request: Request<pb::ListChannelsRequest>,
    ) -> Result<Response<pb::ListChannelsResponse>, Status> {
        let span = tracing::debug_span!("admin.ListChannels");
        self.traced("ListChannels", span, self.list(request.into_inner()))
            .await
    }

    async fn channel_info(
        &self,
        request: Request<pb::ChannelInfoRequest>,
    ) -> Result<Response<pb::ChannelInfoResponse>, Status> {
        let span = tracing::debug_span!("admin.ChannelInfo", channel = %request.get_ref().channel);
        self.traced("ChannelInfo", span, self.info(request.into_inner()))
            .await
    }

    async fn broadcast(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Result<Response<pb::BroadcastResponse>, Status> {
        let span = tracing::debug_span!(
            "admin.Broadcast",
            channels = request.get_ref().channels.len()
        );
        mesh_telemetry::propagation::set_parent_from_metadata(&span, request.metadata());
        self.traced("Broadcast", span, self.broadcast_to(request.into_inner()))
            .await
    }

    type PublishStreamStream = stream::ReplyStream;

    async fn publish_stream(
        &self,
        request: Request<tonic::Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        Ok(Response::new(self.publish_stream_of(request.into_inner())))
    }

    async fn revoke_tokens(
        &self,
        request: Request<pb::RevokeTokensRequest>,
    ) -> Result<Response<pb::RevokeTokensResponse>, Status> {
        if self.ring_manager.is_none() {
            return Err(status(AdminError::NoRingManager));
        }
        let req = request.into_inner();
        if req.jtis.is_empty() {
            return Err(status(AdminError::NoJtis));
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
            let mut client = self.ring_manager().await?;
            // The ring manager's own answer, refusals included, is relayed as it is.
            client.revoke_tokens(forwarded).await
        };
        let reply = tokio::time::timeout(RING_MANAGER_TIMEOUT, call)
            .await
            .map_err(|_| status(AdminError::RingManagerTimeout))??
            .into_inner();
        Ok(Response::new(pb::RevokeTokensResponse {
            version: reply.version,
            held: reply.held,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{TokenError, TsError, UserId};
    use tonic::Code;

    #[test]
    fn every_error_has_its_code_and_message() {
        let id = UserId::new("").unwrap_err();
        let cases = [
            (
                AdminError::BadId {
                    field: "channels",
                    error: id.clone(),
                },
                Code::InvalidArgument,
                format!("channels: {id}"),
            ),
            (
                AdminError::BadSince(TsError),
                Code::InvalidArgument,
                format!("since_ts: {TsError}"),
            ),
            (
                AdminError::MissingText,
                Code::InvalidArgument,
                "text: message text is missing".into(),
            ),
            (
                AdminError::IdempotencyKeyTooLong,
                Code::InvalidArgument,
                "idempotency_key: over 128 bytes".into(),
            ),
            (
                AdminError::TextTooLong,
                Code::InvalidArgument,
                "text: msg_too_long (over 16384 bytes)".into(),
            ),
            (
                AdminError::EventTooLarge,
                Code::InvalidArgument,
                "event_json: over 65536 bytes".into(),
            ),
            (
                AdminError::InvalidJson("EOF while parsing".into()),
                Code::InvalidArgument,
                "event_json: invalid JSON: EOF while parsing".into(),
            ),
            (
                AdminError::NotAnObject,
                Code::InvalidArgument,
                "event_json: must be a JSON object".into(),
            ),
            (
                AdminError::NoEventType,
                Code::InvalidArgument,
                "event_json: needs a string \"type\"".into(),
            ),
            (
                AdminError::ReservedType("hello".into()),
                Code::InvalidArgument,
                "event_json: type \"hello\" is reserved for the protocol".into(),
            ),
            (
                AdminError::TooManyUsers,
                Code::InvalidArgument,
                "at most 500 users per call".into(),
            ),
            (
                AdminError::NoJtis,
                Code::InvalidArgument,
                "jtis: at least one".into(),
            ),
            (
                AdminError::NoChannels,
                Code::InvalidArgument,
                "channels: at least one".into(),
            ),
            (
                AdminError::TooManyChannels,
                Code::InvalidArgument,
                "channels: at most 1000 per call".into(),
            ),
            (
                AdminError::DuplicateChannel("C1".into()),
                Code::InvalidArgument,
                "channels: C1 is listed twice".into(),
            ),
            (
                AdminError::MessageAndEvent,
                Code::InvalidArgument,
                "event_json: give a message (user and text) or an event, not both".into(),
            ),
            (
                AdminError::BadPageToken,
                Code::InvalidArgument,
                "page_token: not a token this API gave".into(),
            ),
            (
                AdminError::ZeroId,
                Code::InvalidArgument,
                "id: 0 is reserved for the stream's first reply".into(),
            ),
            (
                AdminError::NoBody,
                Code::InvalidArgument,
                "body: a post or an event is required".into(),
            ),
            (
                AdminError::ConnectionsUnanswered("U1".into()),
                Code::Unavailable,
                "connections of U1 unknown: their presence server did not answer in time".into(),
            ),
            (
                AdminError::Route(RouteError::Invalid("bad event".into())),
                Code::InvalidArgument,
                "bad event".into(),
            ),
            (
                AdminError::NoPresenceServers,
                Code::Unavailable,
                "this mesh has no presence servers".into(),
            ),
            (
                AdminError::NoPresenceServerYet,
                Code::Unavailable,
                "no presence server is on the ring yet".into(),
            ),
            (
                AdminError::PresenceUnanswered(vec!["U1".into(), "U2".into()]),
                Code::Unavailable,
                "presence unknown for U1, U2: their presence server did not answer in time".into(),
            ),
            (
                AdminError::Route(RouteError::Unavailable("no owner".into())),
                Code::Unavailable,
                "no owner".into(),
            ),
            (
                AdminError::RingManager("no leader".into()),
                Code::Unavailable,
                "ring manager: no leader".into(),
            ),
            (
                AdminError::RingManagerTimeout,
                Code::Unavailable,
                "ring manager did not answer in time".into(),
            ),
            (
                AdminError::Route(RouteError::Internal("boom".into())),
                Code::Internal,
                "boom".into(),
            ),
            (
                AdminError::NoTs,
                Code::Internal,
                "channel server assigned no ts".into(),
            ),
            (
                AdminError::Mint(TokenError::Malformed("x".into())),
                Code::Internal,
                TokenError::Malformed("x".into()).to_string(),
            ),
            (
                AdminError::NoRingManager,
                Code::Unimplemented,
                "this admin server does not know the ring manager".into(),
            ),
        ];
        for (error, code, message) in cases {
            let status = status(error);
            assert_eq!((status.code(), status.message()), (code, message.as_str()));
        }
    }
}
