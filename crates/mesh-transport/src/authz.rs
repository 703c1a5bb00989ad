//! The one authorization table of the internal gRPC plane — which roles may call which RPC —
//! and the tower layer that enforces it on every internal server before any handler runs.
//!
//! The layer reads the caller's identities from its verified client certificate, refuses a
//! call the table does not allow (`PERMISSION_DENIED`, naming the caller and the RPC; counted
//! as `channelmesh_grpc_permission_denied_total{rpc, role}`; logged with the caller's
//! identities), and puts the [`Caller`] into the request's extensions, where handlers find it
//! for their "as itself" checks ([`Authorizer::refuse`] answers those the same way). An RPC the
//! table does not name is refused.

use std::future::{Ready, ready};
use std::task::{Context, Poll};

use futures::future::Either;
use prometheus::IntCounterVec;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::identity::{Caller, Role};

/// The full path of every internal RPC, as the authorization table and the handlers name it.
pub mod rpc {
    pub const REGISTER: &str = "/channelmesh.ring.v1.RingManager/Register";
    pub const LEASE: &str = "/channelmesh.ring.v1.RingManager/Lease";
    pub const WATCH_RING: &str = "/channelmesh.ring.v1.RingManager/WatchRing";
    pub const GET_RING: &str = "/channelmesh.ring.v1.RingManager/GetRing";
    pub const DRAIN_NODE: &str = "/channelmesh.ring.v1.RingManager/DrainNode";
    pub const REPLACE_NODE: &str = "/channelmesh.ring.v1.RingManager/ReplaceNode";
    pub const ADD_NODE: &str = "/channelmesh.ring.v1.RingManager/AddNode";
    pub const REPORT_GATEWAY: &str = "/channelmesh.ring.v1.RingManager/ReportGateway";
    pub const REGIONS: &str = "/channelmesh.ring.v1.RingManager/Regions";
    pub const DRAIN_REGION: &str = "/channelmesh.ring.v1.RingManager/DrainRegion";
    pub const UNDRAIN_REGION: &str = "/channelmesh.ring.v1.RingManager/UndrainRegion";
    pub const REVOKE_TOKENS: &str = "/channelmesh.ring.v1.RingManager/RevokeTokens";
    pub const DISCONNECT_USERS: &str = "/channelmesh.ring.v1.RingManager/DisconnectUsers";
    pub const PUBLISH: &str = "/channelmesh.channel.v1.ChannelServer/Publish";
    pub const PUBLISH_STREAM: &str = "/channelmesh.channel.v1.ChannelServer/PublishStream";
    pub const HISTORY: &str = "/channelmesh.channel.v1.ChannelServer/History";
    pub const SUBSCRIBE: &str = "/channelmesh.channel.v1.ChannelServer/Subscribe";
    pub const HANDOFF: &str = "/channelmesh.channel.v1.ChannelServer/Handoff";
    pub const LEASE_STATUS: &str = "/channelmesh.channel.v1.ChannelServer/LeaseStatus";
    pub const REPLICATE: &str = "/channelmesh.channel.v1.ChannelServer/Replicate";
    pub const CATCH_UP: &str = "/channelmesh.channel.v1.ChannelServer/CatchUp";
    pub const CHANNEL_INFO: &str = "/channelmesh.channel.v1.ChannelServer/ChannelInfo";
    pub const LIST_CHANNELS: &str = "/channelmesh.channel.v1.ChannelServer/ListChannels";
    pub const SESSION: &str = "/channelmesh.presence.v1.Presence/Session";
    pub const QUERY: &str = "/channelmesh.presence.v1.Presence/Query";
    pub const CONNECTIONS: &str = "/channelmesh.presence.v1.Presence/Connections";
    pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
    pub const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";
}

use Role::{Admin, ChannelServer, Gateway, Operator, PresenceServer};

/// Every role: RPCs any service of the mesh may call.
const EVERYONE: &[Role] = &Role::ALL;

/// The authorization table: each internal RPC and the roles that may call it. Handlers check
/// further that a caller acts only as itself (a node registers, heartbeats and hands off as
/// itself; a gateway reports and opens presence sessions as itself).
pub const TABLE: &[(&str, &[Role])] = &[
    // Ring nodes join and hold their lease (as themselves).
    (rpc::REGISTER, &[ChannelServer, PresenceServer]),
    (rpc::LEASE, &[ChannelServer, PresenceServer]),
    // Everybody routes by the ring.
    (rpc::WATCH_RING, EVERYONE),
    (rpc::GET_RING, EVERYONE),
    // SRE operations.
    (rpc::DRAIN_NODE, &[Operator]),
    (rpc::REPLACE_NODE, &[Operator]),
    (rpc::ADD_NODE, &[Operator]),
    (rpc::DRAIN_REGION, &[Operator]),
    (rpc::UNDRAIN_REGION, &[Operator]),
    (rpc::REGIONS, &[Operator]),
    // The admin API's RevokeTokens forwards to the ring manager.
    (rpc::REVOKE_TOKENS, &[Operator, Admin]),
    // The admin API's DisconnectUser forwards to the ring manager (the console's too).
    (rpc::DISCONNECT_USERS, &[Operator, Admin]),
    // A gateway reports itself (as itself).
    (rpc::REPORT_GATEWAY, &[Gateway]),
    // Publishers: gateways (client posts) and admin servers (the web app's).
    (rpc::PUBLISH, &[Gateway, Admin]),
    (rpc::PUBLISH_STREAM, &[Gateway, Admin]),
    (rpc::HISTORY, &[Gateway, Admin]),
    // Only gateways fan events out to clients.
    (rpc::SUBSCRIBE, &[Gateway]),
    // A channel server hands a moved slot's state to its new owner (as the ring names it).
    (rpc::HANDOFF, &[ChannelServer]),
    // A channel server whose lease lapsed asks its peers whether they hear the ring manager.
    (rpc::LEASE_STATUS, &[ChannelServer]),
    // A slot's owner replicates its events to, and fills, the slot's followers (as itself).
    (rpc::REPLICATE, &[ChannelServer]),
    (rpc::CATCH_UP, &[ChannelServer]),
    // The admin API's channel queries.
    (rpc::CHANNEL_INFO, &[Admin]),
    (rpc::LIST_CHANNELS, &[Admin]),
    // A gateway's presence session (as itself); lookups by gateways and admin servers.
    (rpc::SESSION, &[Gateway]),
    (rpc::QUERY, &[Gateway, Admin]),
    // The admin API's ListConnections and DisconnectUser.
    (rpc::CONNECTIONS, &[Admin]),
    // The ring manager's failure probe, and anyone's health check.
    (rpc::HEALTH_CHECK, EVERYONE),
    (rpc::HEALTH_WATCH, EVERYONE),
];

/// The roles that may call `path`; `None` for an RPC the table does not name.
pub fn roles_for(path: &str) -> Option<&'static [Role]> {
    TABLE.iter().find(|(p, _)| *p == path).map(|(_, r)| *r)
}

/// What one internal server enforces with, and how it counts and logs its refusals; cheap to
/// clone. One per service (its counter lives in the service's registry).
#[derive(Debug, Clone)]
pub struct Authorizer {
    denied: IntCounterVec,
    /// Mutual TLS (callers are who their certificate says), or `--insecure` (everyone is
    /// [`Caller::Unauthenticated`]).
    authenticated: bool,
}

impl Authorizer {
    /// An authorizer counting into `telemetry`, for this process's transport: with mutual TLS
    /// it enforces the table; `--insecure` (or a process that never configured its transport)
    /// lets every call through.
    pub fn new(telemetry: &mesh_telemetry::Telemetry) -> Authorizer {
        let denied = telemetry.counter_vec(
            "channelmesh_grpc_permission_denied_total",
            "Internal gRPC calls refused with PERMISSION_DENIED: by the authorization table or \
             an \"as itself\" check, by RPC and the caller's roles.",
            &["rpc", "role"],
        );
        Authorizer {
            denied,
            authenticated: crate::is_mutual_tls(),
        }
    }

    /// The layer that enforces the table on a server.
    pub fn layer(&self) -> AuthorizeLayer {
        AuthorizeLayer {
            authorizer: self.clone(),
        }
    }

    /// The caller of a request, from the connection's verified client certificate.
    fn caller_of(&self, extensions: &http::Extensions) -> Caller {
        if !self.authenticated {
            return Caller::Unauthenticated;
        }
        let certs = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs());
        Caller::from_peer_certs(certs.as_deref().map(Vec::as_slice))
    }

    /// Checks `caller` against the table for `path`.
    fn check(&self, caller: &Caller, path: &str) -> Result<(), Status> {
        match roles_for(path) {
            Some(roles) if roles.iter().any(|r| caller.has_role(*r)) => Ok(()),
            Some(roles) => {
                let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                let why = format!("it needs the role {}", roles.join(" or "));
                Err(self.refuse(caller, path, &why))
            }
            None if matches!(caller, Caller::Unauthenticated) => Ok(()),
            None => Err(self.refuse(caller, path, "no such RPC in the authorization table")),
        }
    }

    /// Refuses `caller`'s call of `rpc` because of `why`: counts it, logs it with the caller's
    /// identities, and returns the `PERMISSION_DENIED` status to answer with. For the table and
    /// for the handlers' "as itself" checks alike.
    pub fn refuse(&self, caller: &Caller, rpc: &str, why: &str) -> Status {
        let label = match roles_for(rpc) {
            Some(_) => rpc.trim_start_matches('/'),
            // Not a caller-chosen label: an unknown path is counted as one.
            None => "unknown",
        };
        let role = caller.roles_label();
        self.denied.with_label_values(&[label, &role]).inc();
        tracing::warn!(caller = %caller, rpc, why, "permission denied");
        Status::permission_denied(format!("{caller} may not call {rpc}: {why}"))
    }
}

/// The caller a handler's request carries (the layer put it there); a request that reached a
/// handler without the layer has no identity.
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Identified(Vec::new()))
}

/// Enforces the authorization table on every request of the server it wraps.
#[derive(Debug, Clone)]
pub struct AuthorizeLayer {
    authorizer: Authorizer,
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            authorizer: self.authorizer.clone(),
        }
    }
}

/// A server's routes behind the authorization table.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    authorizer: Authorizer,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<R>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let caller = self.authorizer.caller_of(request.extensions());
        match self.authorizer.check(&caller, request.uri().path()) {
            Ok(()) => {
                request.extensions_mut().insert(caller);
                Either::Left(self.inner.call(request))
            }
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn caller(ids: &[(Role, &str)]) -> Caller {
        Caller::Identified(
            ids.iter()
                .map(|(r, i)| Identity::new(*r, i).unwrap())
                .collect(),
        )
    }

    fn authorizer() -> (Authorizer, mesh_telemetry::Telemetry) {
        let telemetry = mesh_telemetry::Telemetry::default();
        let mut authorizer = Authorizer::new(&telemetry);
        authorizer.authenticated = true;
        (authorizer, telemetry)
    }

    #[test]
    fn every_rpc_of_the_internal_services_is_in_the_table_once() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(mesh_proto::FILE_DESCRIPTOR_SET).unwrap();
        // Every RPC the internal services declare (the public admin API is not served here).
        let mut declared: Vec<String> = set
            .file
            .iter()
            .filter(|f| !f.package().starts_with("channelmesh.admin"))
            .flat_map(|f| {
                f.service.iter().flat_map(move |s| {
                    s.method
                        .iter()
                        .map(move |m| format!("/{}.{}/{}", f.package(), s.name(), m.name()))
                })
            })
            .collect();
        declared.sort_unstable();
        let mut named: Vec<&str> = TABLE
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| !p.starts_with("/grpc.health"))
            .collect();
        named.sort_unstable();
        assert_eq!(named, declared);
        let mut paths: Vec<&str> = TABLE.iter().map(|(p, _)| *p).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), TABLE.len(), "an RPC named twice");
    }

    #[test]
    fn the_table_refuses_the_wrong_role_and_unknown_rpcs() {
        let (authz, telemetry) = authorizer();
        let gateway = caller(&[(Role::Gateway, "us-east-1")]);
        assert!(authz.check(&gateway, rpc::REPORT_GATEWAY).is_ok());
        assert!(authz.check(&gateway, rpc::HEALTH_CHECK).is_ok());
        let refused = authz.check(&gateway, rpc::DRAIN_REGION).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            refused.message(),
            "us-east-1.gateway.channelmesh may not call \
             /channelmesh.ring.v1.RingManager/DrainRegion: it needs the role operator"
        );
        let operator = caller(&[(Role::Operator, "ops")]);
        let refused = authz.check(&operator, rpc::PUBLISH).unwrap_err();
        assert_eq!(
            refused.message(),
            "ops.operator.channelmesh may not call \
             /channelmesh.channel.v1.ChannelServer/Publish: it needs the role gateway or admin"
        );
        let nobody = caller(&[]);
        assert!(authz.check(&nobody, rpc::GET_RING).is_err());
        let unknown = authz.check(&operator, "/channelmesh.ring.v1.RingManager/Nuke");
        assert_eq!(
            unknown.unwrap_err().message(),
            "ops.operator.channelmesh may not call /channelmesh.ring.v1.RingManager/Nuke: \
             no such RPC in the authorization table"
        );
        let text = telemetry.encode();
        for line in [
            "channelmesh_grpc_permission_denied_total{role=\"gateway\",rpc=\"channelmesh.ring.v1.RingManager/DrainRegion\"} 1",
            "channelmesh_grpc_permission_denied_total{role=\"operator\",rpc=\"channelmesh.channel.v1.ChannelServer/Publish\"} 1",
            "channelmesh_grpc_permission_denied_total{role=\"none\",rpc=\"channelmesh.ring.v1.RingManager/GetRing\"} 1",
            "channelmesh_grpc_permission_denied_total{role=\"operator\",rpc=\"unknown\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn insecure_lets_everything_through() {
        let (mut authz, _) = authorizer();
        authz.authenticated = false;
        let caller = authz.caller_of(&http::Extensions::new());
        assert_eq!(caller, Caller::Unauthenticated);
        assert!(authz.check(&caller, rpc::DRAIN_REGION).is_ok());
        assert!(authz.check(&caller, "/anything/else").is_ok());
    }
}
