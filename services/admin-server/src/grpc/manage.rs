//! Connection and channel management on the admin API: DisconnectUser (forwarded to the ring
//! manager, whose orders gateways follow), ListConnections (the user's presence server),
//! ChannelInfo (the channel's owner), ListChannels (every channel server, merged by
//! [`crate::listing`]) and Broadcast (many publishes through the routed publish path).

use std::time::Duration;

use futures::StreamExt;
use mesh_core::{ChannelId, TeamId, UserId};
use mesh_proto::admin as pb;
use mesh_proto::channel as channel_pb;
use mesh_proto::presence as presence_pb;
use mesh_proto::presence::presence_client::PresenceClient;
use mesh_proto::ring as ring_pb;
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{AdminService, status};
use crate::error::AdminError;
use crate::listing::{self, Page, PageToken, Summary};
use crate::requests::{self, channel, user};

/// How long a call may wait for the ring manager.
pub(super) const RING_MANAGER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a ListConnections (or DisconnectUser's count) may wait for the presence server.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(2);
/// Publishes of one Broadcast in flight at once.
const BROADCAST_PARALLEL: usize = 32;

/// The canonical name of a gRPC status code, as a Broadcast result's `error` starts with.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A Broadcast result's `error`: the status code's name and the message.
fn result_error(error: AdminError) -> String {
    let status = status(error);
    format!("{}: {}", code_name(status.code()), status.message())
}

impl AdminService {
    /// A client of the ring manager (the leader, on Consul), dialled within the call's time.
    pub(super) async fn ring_manager(&self) -> Result<RingManagerClient<Channel>, Status> {
        let Some(source) = &self.ring_manager else {
            return Err(status(AdminError::NoRingManager));
        };
        let unreachable =
            |e: &dyn std::fmt::Display| status(AdminError::RingManager(e.to_string()));
        let endpoint = source.endpoint().await.map_err(|e| unreachable(&e))?;
        let channel = mesh_transport::endpoint(&endpoint)
            .map_err(|e| unreachable(&e))?
            .connect()
            .await
            .map_err(|e| unreachable(&e))?;
        Ok(RingManagerClient::new(channel))
    }

    /// `user`'s live connections from their presence server, oldest first.
    async fn connections_of(&self, user: &UserId) -> Result<Vec<pb::Connection>, AdminError> {
        let Some(ring) = &self.presence else {
            return Err(AdminError::NoPresenceServers);
        };
        let ring = ring.current();
        let Some((_, addr)) = presence_client::owner(&ring, user) else {
            return Err(AdminError::NoPresenceServerYet);
        };
        let ask = async {
            let channel = self.presence_channels.channel(&addr).ok()?;
            let request = presence_pb::ConnectionsRequest {
                user: user.to_string(),
            };
            PresenceClient::new(channel).connections(request).await.ok()
        };
        let Ok(Some(reply)) = tokio::time::timeout(PRESENCE_TIMEOUT, ask).await else {
            return Err(AdminError::ConnectionsUnanswered(user.to_string()));
        };
        Ok(reply
            .into_inner()
            .connections
            .into_iter()
            .map(|c| pb::Connection {
                gateway: c.gateway,
                region: c.region,
                team: c.team,
                connected_at_ms: c.connected_at_ms,
            })
            .collect())
    }

    /// ListConnections, inside its span.
    pub(super) async fn list_connections_of(
        &self,
        req: pb::ListConnectionsRequest,
    ) -> Result<pb::ListConnectionsResponse, AdminError> {
        let user = user(&req.user)?;
        let connections = self.connections_of(&user).await?;
        Ok(pb::ListConnectionsResponse { connections })
    }

    /// DisconnectUser: the order goes to the ring manager (whose refusals are relayed as
    /// they are); the count is what the user's presence server lists at the same time (0 when
    /// it cannot say: the mesh has no presence servers, or it did not answer in time).
    pub(super) async fn disconnect(
        &self,
        req: pb::DisconnectUserRequest,
    ) -> Result<pb::DisconnectUserResponse, Status> {
        let user = user(&req.user).map_err(status)?;
        let team = requests::opt_team(&req.team).map_err(status)?;
        let order = ring_pb::DisconnectUsersRequest {
            orders: vec![ring_pb::DisconnectOrder {
                user: user.to_string(),
                team: req.team.clone(),
                reason: req.reason,
                reconnect: req.reconnect,
                issued_at_ms: 0,
            }],
        };
        let forward = async {
            let call = async {
                let mut client = self.ring_manager().await?;
                client.disconnect_users(order).await
            };
            tokio::time::timeout(RING_MANAGER_TIMEOUT, call)
                .await
                .map_err(|_| status(AdminError::RingManagerTimeout))?
        };
        let (forwarded, listed) = tokio::join!(forward, self.connections_of(&user));
        forwarded?;
        let connections = match listed {
            Ok(listed) => listed.iter().filter(|c| in_team(c, team.as_ref())).count(),
            Err(e) => {
                tracing::debug!(%user, error = %e, "disconnect ordered; its connections could not be counted");
                0
            }
        };
        tracing::info!(%user, team = req.team, reconnect = req.reconnect, connections, "user disconnected");
        Ok(pb::DisconnectUserResponse {
            connections: connections as u32,
        })
    }

    /// ChannelInfo, inside its span.
    pub(super) async fn info(
        &self,
        req: pb::ChannelInfoRequest,
    ) -> Result<pb::ChannelInfoResponse, AdminError> {
        let channel = channel("channel", &req.channel)?;
        let info = self
            .router
            .channel_info(&channel)
            .await
            .map_err(AdminError::Route)?;
        Ok(pb::ChannelInfoResponse {
            channel: channel.to_string(),
            last_ts: info.last_ts,
            history_length: info.history_length,
            oldest_ts: info.oldest_ts,
            complete_after_ts: info.complete_after_ts,
            subscribers: info.subscribers,
            members: info.members,
            gateways: info
                .gateways
                .into_iter()
                .map(|g| pb::GatewaySubscribers {
                    gateway: g.gateway,
                    region: g.region,
                    subscribers: g.subscribers,
                })
                .collect(),
        })
    }

    /// ListChannels, inside its span: a page from every channel server, merged.
    pub(super) async fn list(
        &self,
        req: pb::ListChannelsRequest,
    ) -> Result<pb::ListChannelsResponse, AdminError> {
        requests::channel_prefix(&req.prefix)?;
        let team = requests::opt_team(&req.team)?;
        let limit = requests::list_limit(req.limit);
        let after = PageToken::decode(&req.page_token)?;
        let ask = |team: Option<&TeamId>, after: Option<&ChannelId>, epoch| {
            channel_pb::ListChannelsRequest {
                epoch,
                prefix: req.prefix.clone(),
                team: team.map(|t| t.to_string()).unwrap_or_default(),
                after: after.map(|a| a.to_string()).unwrap_or_default(),
                limit,
            }
        };
        let after = after.map(|t| t.0);
        let answers = self
            .router
            .on_every_owner(|mut client, _, epoch| {
                let request = ask(team.as_ref(), after.as_ref(), epoch);
                async move { client.list_channels(request).await }
            })
            .await
            .map_err(AdminError::Route)?;
        let pages = answers
            .into_iter()
            .map(|a| Page {
                has_more: a.has_more,
                channels: a
                    .channels
                    .into_iter()
                    .map(|c| Summary {
                        channel: c.channel,
                        subscribers: c.subscribers,
                        members: c.members,
                    })
                    .collect(),
            })
            .collect();
        let (channels, next) = listing::merge(pages, limit as usize);
        Ok(pb::ListChannelsResponse {
            channels: channels
                .into_iter()
                .map(|s| pb::ChannelSummary {
                    channel: s.channel,
                    subscribers: s.subscribers,
                    members: s.members,
                })
                .collect(),
            next_page_token: next.map(|t| t.encode()).unwrap_or_default(),
        })
    }

    /// Broadcast, inside its span: the call's own arguments are checked whole; then each
    /// channel is published to (at most [`BROADCAST_PARALLEL`] at once) and answered on its
    /// own, in the order asked.
    pub(super) async fn broadcast_to(
        &self,
        req: pb::BroadcastRequest,
    ) -> Result<pb::BroadcastResponse, AdminError> {
        let channels = requests::broadcast_channels(&req.channels)?;
        let body = requests::broadcast_body(&req.user, req.text, &req.team, req.event_json)?;
        let key = requests::idempotency_key(&req.idempotency_key)?;
        let publishes = channels.into_iter().zip(req.channels).map(|(parsed, raw)| {
            let (body, key) = (body.clone(), key.clone());
            async move {
                let published = match parsed {
                    Ok(channel) => self.publish_once(channel, body, key).await,
                    Err(e) => Err(e),
                };
                match published {
                    Ok(ts) => pb::BroadcastResult {
                        channel: raw,
                        ts: ts.to_string(),
                        error: String::new(),
                    },
                    Err(e) => pb::BroadcastResult {
                        channel: raw,
                        ts: String::new(),
                        error: result_error(e),
                    },
                }
            }
        });
        // `buffered` keeps the order asked while running several at once.
        let results = futures::stream::iter(publishes)
            .buffered(BROADCAST_PARALLEL)
            .collect()
            .await;
        Ok(pb::BroadcastResponse { results })
    }
}

/// Whether a listed connection is of `team` (every connection when `None`).
fn in_team(c: &pb::Connection, team: Option<&TeamId>) -> bool {
    team.is_none_or(|t| c.team == t.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_error_names_the_code_as_grpc_does() {
        let e = result_error(AdminError::Route(channel_client::RouteError::Unavailable(
            "no owner".into(),
        )));
        assert_eq!(e, "UNAVAILABLE: no owner");
        let bad = channel("channels", "no good").unwrap_err();
        assert!(result_error(bad).starts_with("INVALID_ARGUMENT: channels: "));
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
    }

    #[test]
    fn a_team_scoped_count_counts_that_teams_connections() {
        let conn = |team: &str| pb::Connection {
            team: team.into(),
            ..pb::Connection::default()
        };
        let t1 = TeamId::new("T1").unwrap();
        assert!(in_team(&conn("T1"), Some(&t1)));
        assert!(!in_team(&conn("T2"), Some(&t1)));
        assert!(in_team(&conn("T2"), None));
    }
}
