//! The ring manager's gRPC side, the only module that speaks protobuf: the `RingManager`
//! service converts each request to the domain's types, calls the [`RingManager`], converts the
//! answer back, and maps every refusal to a `tonic::Status` in one table (`status`); the
//! failure monitor's health-check probe of a channel server is here too.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use mesh_core::{IdError, NodeId, Ring, TeamId, UserId};
use mesh_proto::ring as pb;
use mesh_proto::ring::ring_manager_server::{RingManager as RingManagerRpc, RingManagerServer};
use mesh_transport::authz::{self, rpc};
use mesh_transport::{Authorizer, Caller, Role};
use ring_client::convert::ring_to_proto;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::disconnects::{DisconnectError, DisconnectOrder, Disconnected};
use crate::membership::{MemberView, MembershipError};
use crate::regions::{Directive, GatewayReport, GatewayView, RegionError, RegionView, RegionsView};
use crate::revocations::{RevocationError, Revoked, RevokedToken};
use crate::server::{Beat, ChangeError, RingManager, Unsaved};

/// Lease replies queued for one node; a node that does not read them misses renewals.
const LEASE_REPLY_QUEUE: usize = 16;

/// The roles a ring node registers and holds its lease under.
const NODE_ROLES: &[Role] = &[Role::ChannelServer, Role::PresenceServer];

/// Serves `manager` on `listener` until `cancel` fires, every call checked by `authorizer`.
pub async fn serve(
    manager: RingManager,
    listener: TcpListener,
    authorizer: Authorizer,
    cancel: CancellationToken,
) -> Result<(), crate::Error> {
    tracing::info!(addr = ?listener.local_addr().ok(), "ring manager listening");
    mesh_transport::internal_server(&authorizer)?
        .add_service(RingManagerServer::new(Service {
            manager,
            authorizer,
            streams: Arc::default(),
        }))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// The failure monitor's confirming probe: a gRPC health check on the node at `addr`. Only a
/// running process answers it; a frozen one still completes TCP handshakes, so a bare connect
/// would not do.
pub async fn probe(addr: &str) -> bool {
    let Ok(endpoint) = mesh_transport::endpoint(addr) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok()
}

/// Why a call was refused, whichever part of the ring manager refused it.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    NodeId(#[from] IdError),
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    #[error(transparent)]
    Disconnect(#[from] DisconnectError),
    /// The change could not be saved, so it was not made.
    #[error(transparent)]
    Unsaved(#[from] Unsaved),
}

impl<E: Into<Refused>> From<ChangeError<E>> for Refused {
    fn from(e: ChangeError<E>) -> Self {
        match e {
            ChangeError::Refused(e) => e.into(),
            ChangeError::Unsaved(e) => Refused::Unsaved(e),
        }
    }
}

/// The one table from refusals to gRPC statuses; the message is the refusal's text.
fn status(refused: impl Into<Refused>) -> Status {
    use DisconnectError as D;
    use MembershipError as M;
    use RegionError as G;
    use RevocationError as R;
    let refused = refused.into();
    let message = refused.to_string();
    match refused {
        Refused::NodeId(_)
        | Refused::Membership(M::NoAddr)
        | Refused::Region(G::Unnamed)
        | Refused::Revocation(R::TooManyInOneCall(_) | R::BadJti)
        | Refused::Disconnect(D::NoOrders | D::TooManyInOneCall(_)) => {
            Status::invalid_argument(message)
        }
        Refused::Revocation(R::Full(_)) | Refused::Disconnect(D::Full(_)) => {
            Status::resource_exhausted(message)
        }
        // Too large for Consul: nothing changed, and it will not fit until revocations expire.
        Refused::Unsaved(Unsaved::TooLarge { .. }) => Status::resource_exhausted(message),
        // Not saved (nothing changed), or not yet written: the call may succeed later.
        Refused::Unsaved(Unsaved::File(_) | Unsaved::NotWritten(_)) => Status::unavailable(message),
        Refused::Membership(
            M::NoSuchNode(_)
            | M::NotActive(..)
            | M::NotStandby(..)
            | M::LastActiveNode(_)
            | M::NoStandbyToReplace
            | M::NoStandbyToAdd
            | M::OwnsNoSlots(_),
        )
        | Refused::Region(G::NoGateway(_) | G::NoHealthyRegion(_)) => {
            Status::failed_precondition(message)
        }
    }
}

/// A node id from a request; a malformed one is refused as an invalid argument.
fn node_id(s: &str) -> Result<NodeId, Status> {
    NodeId::new(s).map_err(status)
}

/// The protobuf form of `ring`, with the state and pid of its nodes and every member from
/// `members` (a node that is not a member shows as active).
fn ring_to_pb(ring: &Ring, members: &[MemberView]) -> pb::Ring {
    let by_id: BTreeMap<&NodeId, &MemberView> = members.iter().map(|m| (&m.id, m)).collect();
    let mut proto = ring_to_proto(ring, |id| {
        let m = by_id.get(id);
        (
            m.map_or("active", |m| m.state.as_str()).to_string(),
            m.map_or(0, |m| m.pid),
        )
    });
    proto.members = members
        .iter()
        .map(|m| pb::Member {
            id: m.id.to_string(),
            addr: m.addr.clone(),
            state: m.state.as_str().to_string(),
            pid: m.pid,
            slots: ring.slots_owned(&m.id) as u32,
            slots_followed: ring.slots_followed(&m.id) as u32,
            catching_up: m.catching_up,
        })
        .collect();
    proto
}

impl From<pb::GatewayReport> for GatewayReport {
    fn from(r: pb::GatewayReport) -> Self {
        GatewayReport {
            gateway: r.gateway,
            region: r.region,
            url: r.url,
            connections: r.connections,
            revocations: (r.revocations_generation, r.revocations_version),
            disconnects: (r.disconnects_generation, r.disconnects_version),
        }
    }
}

impl From<RevokedToken> for pb::RevokedToken {
    fn from(t: RevokedToken) -> Self {
        pb::RevokedToken {
            jti: t.jti,
            expires_at: t.expires_at,
        }
    }
}

impl From<pb::RevokedToken> for RevokedToken {
    fn from(t: pb::RevokedToken) -> Self {
        RevokedToken {
            jti: t.jti,
            expires_at: t.expires_at,
        }
    }
}

impl From<Directive> for pb::GatewayDirective {
    fn from(d: Directive) -> Self {
        pb::GatewayDirective {
            draining: d.draining,
            rate: d.rate,
            redirect: d.redirect,
            revoked: d.revocations.revoked.into_iter().map(Into::into).collect(),
            revocations_generation: d.revocations.generation,
            revocations_version: d.revocations.version,
            disconnects: d.disconnects.orders.into_iter().map(order_to_pb).collect(),
            disconnects_generation: d.disconnects.generation,
            disconnects_version: d.disconnects.version,
        }
    }
}

/// The protobuf form of a disconnect order.
fn order_to_pb(o: DisconnectOrder) -> pb::DisconnectOrder {
    pb::DisconnectOrder {
        user: o.user.to_string(),
        team: o.team.map(|t| t.to_string()).unwrap_or_default(),
        reason: o.reason,
        reconnect: o.reconnect,
        issued_at_ms: o.issued_at_ms,
    }
}

/// A disconnect order from a request (its issue time is the ring manager's to set): a user id
/// or team that does not parse is refused as an invalid argument.
fn order_from_pb(o: pb::DisconnectOrder) -> Result<DisconnectOrder, Status> {
    let team = match o.team.as_str() {
        "" => None,
        team => {
            Some(TeamId::new(team).map_err(|e| Status::invalid_argument(format!("team: {e}")))?)
        }
    };
    Ok(DisconnectOrder {
        user: UserId::new(&o.user).map_err(|e| Status::invalid_argument(format!("user: {e}")))?,
        team,
        reason: o.reason,
        reconnect: o.reconnect,
        issued_at_ms: 0,
    })
}

impl From<Disconnected> for pb::DisconnectUsersResponse {
    fn from(d: Disconnected) -> Self {
        pb::DisconnectUsersResponse {
            version: d.version,
            held: d.held,
        }
    }
}

impl From<Revoked> for pb::RevokeTokensResponse {
    fn from(r: Revoked) -> Self {
        pb::RevokeTokensResponse {
            version: r.version,
            held: r.held,
        }
    }
}

impl From<RegionsView> for pb::RegionsView {
    fn from(view: RegionsView) -> Self {
        pb::RegionsView {
            regions: view
                .regions
                .into_iter()
                .map(|r| pb::RegionView {
                    region: r.region,
                    draining: r.draining,
                    rate: r.rate,
                    connections: r.connections,
                    nearest: r.nearest,
                    gateways: r
                        .gateways
                        .into_iter()
                        .map(|g| pb::GatewayView {
                            id: g.id,
                            url: g.url,
                            connections: g.connections,
                            last_seen_ms: g.last_seen_ms,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// For a caller that got the view over gRPC, where staleness is not sent: it is computed
/// from each gateway's age.
impl From<pb::RegionsView> for RegionsView {
    fn from(view: pb::RegionsView) -> Self {
        RegionsView {
            regions: view
                .regions
                .into_iter()
                .map(|r| RegionView {
                    region: r.region,
                    draining: r.draining,
                    rate: r.rate,
                    connections: r.connections,
                    nearest: r.nearest,
                    gateways: r
                        .gateways
                        .into_iter()
                        .map(|g| GatewayView {
                            stale: GatewayView::is_stale(g.last_seen_ms),
                            id: g.id,
                            url: g.url,
                            connections: g.connections,
                            last_seen_ms: g.last_seen_ms,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The service: a [`RingManager`] behind the protobuf API.
#[derive(Debug, Clone)]
struct Service {
    manager: RingManager,
    /// Refuses a node or gateway that acts as another (the table was checked before).
    authorizer: Authorizer,
    /// Each node's latest lease stream.
    streams: Arc<LeaseStreams>,
}

/// Which lease stream of a node incarnation is its latest: only the end of that one says the
/// node lost its stream. A node redials a silent stream (say while the ring manager was
/// frozen); the end of the stream it gave up on may be read after its new stream's heartbeats,
/// and must not make the node look cut off.
#[derive(Debug, Default)]
struct LeaseStreams {
    next: std::sync::atomic::AtomicU64,
    latest: std::sync::Mutex<HashMap<(NodeId, u64), u64>>,
}

impl LeaseStreams {
    /// A new stream's number.
    fn open(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, u64), u64>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stream `stream` carried a heartbeat of `holder`: it is the holder's latest.
    fn heard(&self, holder: &(NodeId, u64), stream: u64) {
        let mut latest = self.latest();
        if latest.get(holder) != Some(&stream) {
            latest.insert(holder.clone(), stream);
        }
    }

    /// Stream `stream` of `holder` ended: whether it was the holder's latest.
    fn ended(&self, holder: &(NodeId, u64), stream: u64) -> bool {
        let mut latest = self.latest();
        if latest.get(holder) == Some(&stream) {
            latest.remove(holder);
            true
        } else {
            false
        }
    }
}

impl Service {
    /// `ring` in protobuf form, with the members as they are now.
    fn to_proto(&self, ring: &Ring) -> pb::Ring {
        ring_to_pb(ring, &self.manager.members_detail().1)
    }

    /// `caller` may call `rpc` as node `node` only if its certificate names that node, in the
    /// role this ring's nodes have.
    fn as_node(&self, caller: &Caller, rpc: &str, node: &str) -> Result<(), Status> {
        let node_role = self.manager.config().node_role;
        let roles = match &node_role {
            Some(role) => std::slice::from_ref(role),
            None => NODE_ROLES,
        };
        if caller.is(roles, node) {
            return Ok(());
        }
        if caller.is(NODE_ROLES, node) {
            let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            let why = format!("this ring's nodes are {}", roles.join(" or "));
            return Err(self.authorizer.refuse(caller, rpc, &why));
        }
        let why = format!("a node acts only as itself, not as node {node:?}");
        Err(self.authorizer.refuse(caller, rpc, &why))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RingManagerRpc for Service {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = authz::caller(&request);
        let req = request.into_inner();
        self.as_node(&caller, rpc::REGISTER, &req.node_id)?;
        let id = node_id(&req.node_id)?;
        let (epoch, incarnation, generation) = self
            .manager
            .register(id, req.addr, req.pid, req.standby)
            .map_err(status)?;
        let config = self.manager.config();
        Ok(Response::new(pb::RegisterResponse {
            epoch,
            incarnation,
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u32,
            lease_ms: config.lease.as_millis() as u32,
            generation,
        }))
    }

    type LeaseStream = BoxStream<pb::LeaseReply>;

    async fn lease(
        &self,
        request: Request<Streaming<pb::Heartbeat>>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        let caller = authz::caller(&request);
        let mut heartbeats = request.into_inner();
        let (tx, rx) = mpsc::channel(LEASE_REPLY_QUEUE);
        let (manager, this) = (self.manager.clone(), self.clone());
        let stream = self.streams.open();
        self.manager.tracker().spawn(async move {
            let mut holder: Option<(NodeId, u64)> = None;
            loop {
                // Cancel-safe: message() loses nothing when cancellation wins; we stop anyway.
                let next = tokio::select! {
                    _ = manager.cancel().cancelled() => break,
                    next = heartbeats.message() => next,
                };
                let Ok(Some(hb)) = next else {
                    break;
                };
                // A heartbeat for another node ends the stream with the refusal (when the
                // reply queue has room; the stream ends either way).
                if let Err(refused) = this.as_node(&caller, rpc::LEASE, &hb.node_id) {
                    let _ = tx.try_send(Err(refused));
                    break;
                }
                let Ok(id) = NodeId::new(&hb.node_id) else {
                    break;
                };
                let beat = Beat {
                    handed_off_epoch: hb.handed_off_epoch,
                    catching_up: hb.catching_up,
                    catching_up_epoch: hb.catching_up_epoch,
                };
                let valid = manager.heartbeat(&id, hb.incarnation, beat);
                let heard = (id, hb.incarnation);
                this.streams.heard(&heard, stream);
                holder = Some(heard);
                let reply = pb::LeaseReply {
                    seq: hb.seq,
                    valid,
                    epoch: manager.ring().epoch(),
                };
                // A full reply queue means the node is not reading: it misses renewals.
                let _ = tx.try_send(Ok(reply));
            }
            tracing::debug!(holder = ?holder, "lease stream ended");
            if let Some(holder) = holder
                && this.streams.ended(&holder, stream)
            {
                manager.lease_ended(&holder.0, holder.1);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchRingStream = BoxStream<pb::Ring>;

    async fn watch_ring(
        &self,
        _request: Request<pb::WatchRingRequest>,
    ) -> Result<Response<Self::WatchRingStream>, Status> {
        let this = self.clone();
        let stream = WatchStream::new(self.manager.subscribe())
            .map(move |ring| Ok(this.to_proto(&ring)))
            .take_until(self.manager.cancel().clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_ring(
        &self,
        _request: Request<pb::GetRingRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        Ok(Response::new(self.to_proto(&self.manager.ring())))
    }

    async fn drain_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        let id = node_id(&request.into_inner().node_id)?;
        let ring = self.manager.drain(&id).map_err(status)?;
        self.manager.stored().await.map_err(status)?;
        Ok(Response::new(self.to_proto(&ring)))
    }

    async fn replace_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        let id = node_id(&request.into_inner().node_id)?;
        let ring = self.manager.replace(&id).map_err(status)?;
        self.manager.stored().await.map_err(status)?;
        Ok(Response::new(self.to_proto(&ring)))
    }

    async fn add_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        let req = request.into_inner();
        let id = if req.node_id.is_empty() {
            None
        } else {
            Some(node_id(&req.node_id)?)
        };
        let ring = self.manager.add(id.as_ref()).map_err(status)?;
        self.manager.stored().await.map_err(status)?;
        Ok(Response::new(self.to_proto(&ring)))
    }

    async fn report_gateway(
        &self,
        request: Request<pb::GatewayReport>,
    ) -> Result<Response<pb::GatewayDirective>, Status> {
        let caller = authz::caller(&request);
        let report = request.into_inner();
        if !caller.is(&[Role::Gateway], &report.gateway) {
            let why = format!(
                "a gateway reports only as itself, not as gateway {:?}",
                report.gateway
            );
            return Err(self.authorizer.refuse(&caller, rpc::REPORT_GATEWAY, &why));
        }
        let directive = self.manager.report_gateway(report.into()).map_err(status)?;
        Ok(Response::new(directive.into()))
    }

    async fn regions(
        &self,
        _request: Request<pb::RegionsRequest>,
    ) -> Result<Response<pb::RegionsView>, Status> {
        Ok(Response::new(self.manager.regions().into()))
    }

    async fn drain_region(
        &self,
        request: Request<pb::DrainRegionRequest>,
    ) -> Result<Response<pb::RegionsView>, Status> {
        let req = request.into_inner();
        let view = self
            .manager
            .drain_region(&req.region, req.rate)
            .map_err(status)?;
        self.manager.stored().await.map_err(status)?;
        Ok(Response::new(view.into()))
    }

    async fn undrain_region(
        &self,
        request: Request<pb::DrainRegionRequest>,
    ) -> Result<Response<pb::RegionsView>, Status> {
        let req = request.into_inner();
        let view = self.manager.undrain_region(&req.region).map_err(status)?;
        self.manager.stored().await.map_err(status)?;
        Ok(Response::new(view.into()))
    }

    async fn revoke_tokens(
        &self,
        request: Request<pb::RevokeTokensRequest>,
    ) -> Result<Response<pb::RevokeTokensResponse>, Status> {
        let entries = request
            .into_inner()
            .jtis
            .into_iter()
            .map(Into::into)
            .collect();
        let revoked = self.manager.revoke_tokens(entries).map_err(status)?;
        self.manager.stored().await.map_err(status)?;
        Ok(Response::new(revoked.into()))
    }

    async fn disconnect_users(
        &self,
        request: Request<pb::DisconnectUsersRequest>,
    ) -> Result<Response<pb::DisconnectUsersResponse>, Status> {
        let orders = request
            .into_inner()
            .orders
            .into_iter()
            .map(order_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        // Not saved: orders are soft state, and answered at once.
        let disconnected = self.manager.disconnect_users(orders).map_err(status)?;
        Ok(Response::new(disconnected.into()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    #[test]
    fn only_the_end_of_a_nodes_latest_lease_stream_counts() {
        let streams = LeaseStreams::default();
        let node = (NodeId::new("cs-1").unwrap(), 1);
        let (old, new) = (streams.open(), streams.open());
        streams.heard(&node, old);
        // The node redialled: its new stream is heard before the old one's end is read.
        streams.heard(&node, new);
        assert!(!streams.ended(&node, old), "a stream given up on");
        assert!(streams.ended(&node, new), "its only stream");
    }
    use crate::membership::NodeState;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn every_refusal_keeps_its_code_and_message() {
        let bad_id = NodeId::new("").unwrap_err();
        let bad_id_message = bad_id.to_string();
        let cases: Vec<(Status, Code, &str)> = vec![
            (status(bad_id), Code::InvalidArgument, &bad_id_message),
            (
                status(MembershipError::NoAddr),
                Code::InvalidArgument,
                "addr is required",
            ),
            (
                status(MembershipError::NoSuchNode(id("cs-9"))),
                Code::FailedPrecondition,
                "no node cs-9",
            ),
            (
                status(MembershipError::NotActive(id("cs-1"), NodeState::Draining)),
                Code::FailedPrecondition,
                "cs-1 is draining, not active",
            ),
            (
                status(MembershipError::NotStandby(id("cs-1"), NodeState::Active)),
                Code::FailedPrecondition,
                "cs-1 is active, not a standby",
            ),
            (
                status(MembershipError::LastActiveNode(id("cs-1"))),
                Code::FailedPrecondition,
                "cs-1 is the last active node: add one first",
            ),
            (
                status(MembershipError::NoStandbyToReplace),
                Code::FailedPrecondition,
                "no live standby to replace it with",
            ),
            (
                status(MembershipError::NoStandbyToAdd),
                Code::FailedPrecondition,
                "no live standby to add",
            ),
            (
                status(MembershipError::OwnsNoSlots(id("cs-1"))),
                Code::FailedPrecondition,
                "cs-1 owns no slots",
            ),
            (
                status(RegionError::Unnamed),
                Code::InvalidArgument,
                "gateway and region are required",
            ),
            (
                status(RegionError::NoGateway("us".into())),
                Code::FailedPrecondition,
                "no gateway of region us has reported",
            ),
            (
                status(RegionError::NoHealthyRegion("us".into())),
                Code::FailedPrecondition,
                "no healthy region to move us's clients to",
            ),
            (
                status(RevocationError::TooManyInOneCall(10_001)),
                Code::InvalidArgument,
                "10001 revocations in one call; at most 10000",
            ),
            (
                status(RevocationError::BadJti),
                Code::InvalidArgument,
                "jti must be 1 to 256 bytes",
            ),
            (
                status(RevocationError::Full(100_000)),
                Code::ResourceExhausted,
                "the revocation list holds 100000 of at most 100000",
            ),
            (
                status(DisconnectError::NoOrders),
                Code::InvalidArgument,
                "no disconnect order given",
            ),
            (
                status(DisconnectError::TooManyInOneCall(1_001)),
                Code::InvalidArgument,
                "1001 disconnect orders in one call; at most 1000",
            ),
            (
                status(DisconnectError::Full(10_000)),
                Code::ResourceExhausted,
                "the disconnect list holds 10000 orders of at most 10000; each is forgotten a \
                 minute after it was given",
            ),
            (
                status(ChangeError::<MembershipError>::Unsaved(Unsaved::File(
                    crate::state_file::StateFileError::Io {
                        path: "/var/lib/cm/ring.tmp".into(),
                        source: std::io::Error::from_raw_os_error(28),
                    },
                ))),
                Code::Unavailable,
                "the ring manager could not save its state, so nothing changed: \
                 /var/lib/cm/ring.tmp: No space left on device (os error 28)",
            ),
            (
                status(Unsaved::NotWritten(std::time::Duration::from_secs(5))),
                Code::Unavailable,
                "the change is made but not yet written to consul within 5s: the ring manager \
                 keeps trying; a leader failover before it succeeds loses it (check with ctl ring \
                 / regions)",
            ),
            (
                status(Unsaved::TooLarge {
                    bytes: 600_000,
                    limit: 523_264,
                }),
                Code::ResourceExhausted,
                "the ring record would be 600000 bytes, past the 523264 a consul value may hold, \
                 so nothing changed (revocations take the room; they are dropped as their tokens \
                 expire)",
            ),
        ];
        for (status, code, message) in cases {
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }

    #[test]
    fn the_ring_carries_every_member_and_its_nodes_states() {
        let node = |n: &str| mesh_core::RingNode {
            id: id(n),
            addr: format!("{n}:1"),
        };
        let ring = Ring::empty().rebalanced(&[node("a"), node("b")]);
        let ring = ring.clone().with_followers(&ring, 2);
        let member = |n: &str, state, pid| MemberView {
            id: id(n),
            addr: format!("{n}:1"),
            pid,
            state,
            incarnation: 1,
            since_heartbeat: Duration::ZERO,
            catching_up: if n == "a" { 7 } else { 0 },
            catching_up_epoch: ring.epoch(),
        };
        let members = [
            member("a", NodeState::Draining, 7),
            member("s", NodeState::Standby, 9),
        ];
        let proto = ring_to_pb(&ring, &members);
        let nodes: Vec<(&str, &str, u32)> = proto
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.state.as_str(), n.pid))
            .collect();
        assert_eq!(nodes, [("a", "draining", 7), ("b", "active", 0)]);
        let members: Vec<(&str, &str, u32, u32, u32)> = proto
            .members
            .iter()
            .map(|m| {
                let (id, state) = (m.id.as_str(), m.state.as_str());
                (id, state, m.slots, m.slots_followed, m.catching_up)
            })
            .collect();
        let half = mesh_core::SLOT_COUNT as u32 / 2;
        assert_eq!(
            members,
            [("a", "draining", half, half, 7), ("s", "standby", 0, 0, 0)]
        );
    }

    #[test]
    fn the_regions_view_converts_both_ways_and_staleness_follows_the_age() {
        let gateway = |id: &str, last_seen_ms, stale| GatewayView {
            id: id.into(),
            url: format!("http://{id}"),
            connections: if stale { 0 } else { 3 },
            last_seen_ms,
            stale,
        };
        let view = RegionsView {
            regions: vec![RegionView {
                region: "us".into(),
                draining: true,
                rate: 10,
                connections: 3,
                nearest: vec!["eu".into()],
                gateways: vec![gateway("a", 2999, false), gateway("b", 3000, true)],
            }],
        };
        let proto = pb::RegionsView::from(view.clone());
        assert_eq!(proto.regions[0].gateways[1].last_seen_ms, 3000);
        assert_eq!(RegionsView::from(proto), view);
    }
}
