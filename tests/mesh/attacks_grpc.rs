//! Attacks on the internal gRPC plane of a default (mutual TLS) mesh, each a real gRPC call
//! from outside the mesh: without TLS, over TLS without a client certificate, with a
//! certificate of a foreign CA, and with a certificate of the mesh's CA in the wrong role or
//! acting as another service. Every one is refused, and none took effect.

use std::net::SocketAddr;

use channel_client::wire::event_to_proto;
use channelmesh::Mesh;
use channelmesh::certs::{Authority, days};
use futures::StreamExt;
use mesh_core::{ChannelEvent, ChannelId, EventBody, UserId};
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_proto::channel::subscribe_request::Command;
use mesh_proto::channel::{
    HandoffChunk, HistoryRequest, PublishRequest, Subscribe, SubscribeRequest,
};
use mesh_proto::presence::gateway_message::Kind;
use mesh_proto::presence::presence_client::PresenceClient;
use mesh_proto::presence::{GatewayMessage, QueryRequest, Snapshot, UserOnline};
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use mesh_proto::ring::{
    DrainRegionRequest, GatewayReport, Heartbeat, RegionsRequest, RegisterRequest,
};
use mesh_transport::{Credentials, Identity, Role, Transport};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::support::{admin, mesh, operator, ring_at, rm_at};

/// Who an attacker calls as.
#[derive(Debug, Clone, Copy)]
enum Who {
    /// Plaintext gRPC, as every call was obeyed before mutual TLS.
    Plaintext,
    /// TLS that trusts the mesh's CA (its certificate is public) but presents no certificate.
    NoCertificate,
    /// A certificate naming an operator, signed by a CA of the attacker's.
    ForeignCa,
    /// A certificate of the mesh's own CA naming one identity.
    As(Role, &'static str),
}

/// The mesh's CA certificate (PEM), as anyone who saw a server's chain knows it.
fn mesh_ca() -> Vec<u8> {
    Authority::for_this_process()
        .unwrap()
        .ca_pem()
        .as_bytes()
        .to_vec()
}

/// A connection to `addr` as `who`; `Err` when the connection itself is refused.
async fn dial(addr: SocketAddr, who: Who) -> Result<Channel, String> {
    let endpoint = match who {
        Who::Plaintext => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
        Who::NoCertificate => Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(mesh_ca())))
            .unwrap(),
        Who::ForeignCa => {
            let foreign = Authority::generate().unwrap().operator().unwrap();
            let credentials = Credentials {
                ca: mesh_ca(),
                ..foreign
            };
            mesh_transport::endpoint_with(&addr.to_string(), &Transport::Mtls(credentials)).unwrap()
        }
        Who::As(role, id) => {
            let credentials = Authority::for_this_process()
                .unwrap()
                .issue(&[Identity::new(role, id).unwrap()], &[], days(1))
                .unwrap();
            mesh_transport::endpoint_with(&addr.to_string(), &Transport::Mtls(credentials)).unwrap()
        }
    };
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// What one attack got back: the status it was refused with, or that it was obeyed.
type Outcome = Result<(), tonic::Status>;

/// Asserts `outcome` is a refusal before any handler ran: the connection, the TLS handshake or
/// the call failed at the transport, never reaching the authorization table.
fn refused_at_handshake(what: &str, who: Who, outcome: Result<Outcome, String>) {
    match outcome {
        Err(connect) => eprintln!("{what} as {who:?}: connection refused: {connect}"),
        Ok(Err(status)) => {
            eprintln!(
                "{what} as {who:?}: {:?} {}",
                status.code(),
                status.message()
            );
            assert!(
                matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal
                ),
                "{what} as {who:?} reached the server: {status:?}"
            );
        }
        Ok(Ok(())) => panic!("{what} as {who:?} was obeyed"),
    }
}

/// Asserts `outcome` is `PERMISSION_DENIED` with a message naming `caller` and saying `why`.
fn permission_denied(what: &str, outcome: Result<Outcome, String>, caller: &str, why: &str) {
    let status = match outcome {
        Err(connect) => panic!("{what}: the connection was refused: {connect}"),
        Ok(Ok(())) => panic!("{what} was obeyed"),
        Ok(Err(status)) => status,
    };
    eprintln!("{what}: {:?} {}", status.code(), status.message());
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    assert!(
        status.message().starts_with(caller) && status.message().contains(why),
        "{what}: {:?} should name {caller} and say {why:?}",
        status.message()
    );
}

/// The count of refusals of `rpc` to callers of `role` in a `/metrics` text.
fn denied(metrics: &str, role: &str, rpc: &str) -> u64 {
    let (role, rpc) = (format!("role=\"{role}\""), format!("rpc=\"{rpc}\""));
    metrics
        .lines()
        .filter(|l| l.starts_with("channelmesh_grpc_permission_denied_total{"))
        .filter(|l| l.contains(&role) && l.contains(&rpc))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// `DrainRegion us-east` as `who`.
async fn drain_region(mesh: &Mesh, who: Who) -> Result<Outcome, String> {
    let mut rm = RingManagerClient::new(dial(mesh.ring_manager, who).await?);
    let request = DrainRegionRequest {
        region: "us-east".into(),
        rate: 0,
    };
    Ok(rm.drain_region(request).await.map(drop))
}

/// `ReportGateway` as gateway `gateway` of us-east, with an attacker's URL.
async fn report_gateway(mesh: &Mesh, who: Who, gateway: &str) -> Result<Outcome, String> {
    let mut rm = RingManagerClient::new(dial(mesh.ring_manager, who).await?);
    let report = GatewayReport {
        gateway: gateway.into(),
        region: "us-east".into(),
        url: "http://attacker.example:8080".into(),
        ..GatewayReport::default()
    };
    Ok(rm.report_gateway(report).await.map(drop))
}

/// `Register` of node `node` at an attacker's address.
async fn register(mesh: &Mesh, who: Who, node: &str) -> Result<Outcome, String> {
    let mut rm = RingManagerClient::new(dial(mesh.ring_manager, who).await?);
    let request = RegisterRequest {
        node_id: node.into(),
        addr: "10.6.6.6:50052".into(),
        pid: 666,
        standby: false,
    };
    Ok(rm.register(request).await.map(drop))
}

/// A `Lease` heartbeat for node `node`: the first reply, or the refusal.
async fn heartbeat(mesh: &Mesh, who: Who, node: &str) -> Result<Outcome, String> {
    let mut rm = RingManagerClient::new(dial(mesh.ring_manager, who).await?);
    let beat = Heartbeat {
        node_id: node.into(),
        incarnation: 1,
        seq: 1,
        handed_off_epoch: 0,
        ..Default::default()
    };
    let mut replies = match rm.lease(futures::stream::iter([beat])).await {
        Ok(replies) => replies.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    Ok(match replies.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(tonic::Status::aborted(
            "the lease stream ended without a reply",
        )),
        Err(status) => Err(status),
    })
}

/// The channel server that owns the channel, and the ring's epoch.
async fn owner(mesh: &Mesh, channel: &ChannelId) -> (SocketAddr, u64) {
    let (ring, _) = ring_at(mesh.ring_manager).await;
    let owner = ring.owner_of(channel).unwrap().id.clone();
    let (_, addr) = mesh
        .channel_servers
        .iter()
        .find(|(id, _)| *id == owner)
        .unwrap();
    (*addr, ring.epoch())
}

/// `Publish` of a message "forged" as user U1 to the channel's owner.
async fn publish(mesh: &Mesh, who: Who, channel: &str) -> Result<Outcome, String> {
    let channel = ChannelId::new(channel).unwrap();
    let (addr, epoch) = owner(mesh, &channel).await;
    let event = ChannelEvent {
        channel,
        ts: None,
        body: EventBody::Message {
            user: UserId::new("U1").unwrap(),
            text: "forged".into(),
            team: None,
        },
        origin: None,
    };
    let mut cs = ChannelServerClient::new(dial(addr, who).await?);
    let request = PublishRequest {
        epoch,
        event: Some(event_to_proto(&event)),
        idempotency_key: String::new(),
    };
    Ok(cs.publish(request).await.map(drop))
}

/// `Subscribe` to the channel at its owner: the first reply, or the refusal.
async fn subscribe(mesh: &Mesh, who: Who, channel: &str) -> Result<Outcome, String> {
    let id = ChannelId::new(channel).unwrap();
    let (addr, epoch) = owner(mesh, &id).await;
    let mut cs = ChannelServerClient::new(dial(addr, who).await?);
    let command = SubscribeRequest {
        command: Some(Command::Subscribe(Subscribe {
            epoch,
            channels: vec![channel.into()],
            ..Default::default()
        })),
    };
    // Kept open: the server answers a subscription with its head, and the stream stays.
    let requests = futures::stream::iter([command]).chain(futures::stream::pending());
    let mut replies = match cs.subscribe(requests).await {
        Ok(replies) => replies.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    Ok(match replies.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(tonic::Status::aborted(
            "the subscription ended without a reply",
        )),
        Err(status) => Err(status),
    })
}

/// `History` of the channel at its owner.
async fn history(mesh: &Mesh, who: Who, channel: &str) -> Result<Outcome, String> {
    let id = ChannelId::new(channel).unwrap();
    let (addr, epoch) = owner(mesh, &id).await;
    let mut cs = ChannelServerClient::new(dial(addr, who).await?);
    let request = HistoryRequest {
        epoch,
        channel: channel.into(),
        since_ts: String::new(),
        limit: 10,
    };
    Ok(cs.history(request).await.map(drop))
}

/// A `Handoff` chunk to the channel's owner, claiming to come from node `from`, carrying
/// forged history, for the ring's epoch plus `ahead` (an epoch no ring has named yet).
async fn handoff(
    mesh: &Mesh,
    who: Who,
    (from, ahead): (&str, u64),
    channel: &str,
) -> Result<Outcome, String> {
    let id = ChannelId::new(channel).unwrap();
    let (addr, epoch) = owner(mesh, &id).await;
    let epoch = epoch + ahead;
    let mut cs = ChannelServerClient::new(dial(addr, who).await?);
    let chunk = HandoffChunk {
        from_node: from.into(),
        epoch,
        channels: vec![mesh_proto::channel::ChannelState {
            channel: channel.into(),
            last_ts: "1.000001".into(),
            events: Vec::new(),
            trimmed_ts: String::new(),
            recent_keys: Vec::new(),
        }],
        done: true,
        slot_floors: Vec::new(),
        members: Vec::new(),
    };
    Ok(cs.handoff(futures::stream::iter([chunk])).await.map(drop))
}

/// A presence `Session` opened as gateway `gateway`, saying user U7 is online: the refusal,
/// or `Ok` when the session stays open.
async fn session(mesh: &Mesh, who: Who, gateway: &str) -> Result<Outcome, String> {
    let (_, addr) = mesh.presence_servers[0].clone();
    let mut ps = PresenceClient::new(dial(addr, who).await?);
    let snapshot = GatewayMessage {
        kind: Some(Kind::Snapshot(Snapshot {
            gateway: gateway.into(),
            online: vec![UserOnline {
                user: "U7".into(),
                connections: 1,
                team: "T1".into(),
                ..UserOnline::default()
            }],
            ..Snapshot::default()
        })),
    };
    let messages = futures::stream::iter([snapshot]).chain(futures::stream::pending());
    let mut replies = match ps.session(messages).await {
        Ok(replies) => replies.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    // An accepted session answers nothing until asked: a refusal arrives at once, an open
    // session is seen as still open a moment later.
    let next = tokio::time::timeout(std::time::Duration::from_secs(2), replies.message()).await;
    Ok(match next {
        Err(_) | Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(tonic::Status::aborted("the session ended")),
        Ok(Err(status)) => Err(status),
    })
}

/// A presence `Query` for user U7.
async fn query(mesh: &Mesh, who: Who) -> Result<Outcome, String> {
    let (_, addr) = mesh.presence_servers[0].clone();
    let mut ps = PresenceClient::new(dial(addr, who).await?);
    let request = QueryRequest {
        users: vec!["U7".into()],
    };
    Ok(ps.query(request).await.map(drop))
}

/// Nothing the attacks tried took effect: no region drains, no gateway reports an attacker's
/// URL, no node is registered at an attacker's address, no forged message is in history.
async fn nothing_took_effect(mesh: &Mesh, channel: &str) {
    let regions = rm_at(mesh.ring_manager)
        .await
        .regions(RegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    for region in &regions.regions {
        assert!(!region.draining, "{} was drained", region.region);
        for gateway in &region.gateways {
            assert!(!gateway.url.contains("attacker"), "{gateway:?}");
        }
    }
    let (_, members) = ring_at(mesh.ring_manager).await;
    assert!(
        members.iter().all(|m| !m.addr.starts_with("10.6.6.6")),
        "{members:?}"
    );
    let history = admin(mesh)
        .await
        .history(mesh_proto::admin::HistoryRequest {
            channel: channel.into(),
            since_ts: String::new(),
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !format!("{history:?}").contains("forged"),
        "a forged message landed: {history:?}"
    );
}

#[tokio::test]
async fn the_seven_calls_obeyed_before_are_refused_without_a_certificate_of_the_mesh() {
    let mesh = mesh().await;
    let channel = "CATTACK";
    for who in [Who::Plaintext, Who::NoCertificate, Who::ForeignCa] {
        refused_at_handshake("DrainRegion", who, drain_region(&mesh, who).await);
        let report = report_gateway(&mesh, who, "us-east-1").await;
        refused_at_handshake("ReportGateway", who, report);
        refused_at_handshake("Register", who, register(&mesh, who, "cs-1").await);
        refused_at_handshake("Publish", who, publish(&mesh, who, channel).await);
        refused_at_handshake("Subscribe", who, subscribe(&mesh, who, channel).await);
        refused_at_handshake("presence Query", who, query(&mesh, who).await);
        let opened = session(&mesh, who, "us-east-1").await;
        refused_at_handshake("presence Session", who, opened);
    }
    nothing_took_effect(&mesh, channel).await;
}

#[tokio::test]
async fn the_rest_of_the_internal_rpcs_are_refused_without_a_certificate_of_the_mesh() {
    let mesh = mesh().await;
    let channel = "CATTACK";
    for who in [Who::Plaintext, Who::NoCertificate, Who::ForeignCa] {
        refused_at_handshake("History", who, history(&mesh, who, channel).await);
        let handed = handoff(&mesh, who, ("cs-1", 0), channel).await;
        refused_at_handshake("Handoff", who, handed);
        refused_at_handshake("Lease", who, heartbeat(&mesh, who, "cs-1").await);
    }
}

#[tokio::test]
async fn the_ring_manager_refuses_the_wrong_role_and_a_service_acting_as_another() {
    let mesh = mesh().await;
    let gateway = Who::As(Role::Gateway, "us-east-1");
    let cs2 = Who::As(Role::ChannelServer, "cs-2");
    permission_denied(
        "DrainRegion with a gateway's certificate",
        drain_region(&mesh, gateway).await,
        "us-east-1.gateway.channelmesh",
        "may not call /channelmesh.ring.v1.RingManager/DrainRegion: it needs the role operator",
    );
    permission_denied(
        "DrainRegion with a channel server's certificate",
        drain_region(&mesh, cs2).await,
        "cs-2.channel-server.channelmesh",
        "it needs the role operator",
    );
    permission_denied(
        "Lease heartbeat for cs-1 with cs-2's certificate",
        heartbeat(&mesh, cs2, "cs-1").await,
        "cs-2.channel-server.channelmesh",
        "a node acts only as itself, not as node \"cs-1\"",
    );
    permission_denied(
        "Register as cs-1 with cs-2's certificate",
        register(&mesh, cs2, "cs-1").await,
        "cs-2.channel-server.channelmesh",
        "a node acts only as itself, not as node \"cs-1\"",
    );
    permission_denied(
        "Register on the channel ring with a presence server's certificate, as itself",
        register(&mesh, Who::As(Role::PresenceServer, "ps-1"), "ps-1").await,
        "ps-1.presence-server.channelmesh",
        "this ring's nodes are channel-server",
    );
    permission_denied(
        "Register with a gateway's certificate",
        register(&mesh, gateway, "us-east-1").await,
        "us-east-1.gateway.channelmesh",
        "it needs the role channel-server or presence-server",
    );
    permission_denied(
        "ReportGateway as eu-west-1 with us-east-1's certificate",
        report_gateway(&mesh, gateway, "eu-west-1").await,
        "us-east-1.gateway.channelmesh",
        "a gateway reports only as itself, not as gateway \"eu-west-1\"",
    );
    permission_denied(
        "ReportGateway with a channel server's certificate",
        report_gateway(&mesh, cs2, "us-east-1").await,
        "cs-2.channel-server.channelmesh",
        "it needs the role gateway",
    );
    nothing_took_effect(&mesh, "CATTACK").await;

    // The operator drains (and undrains): the table lets SREs do their work.
    let ops = mesh_transport::endpoint_with(&mesh.ring_manager.to_string(), operator())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut rm = RingManagerClient::new(ops);
    let request = DrainRegionRequest {
        region: "us-east".into(),
        rate: 0,
    };
    let drained = rm.drain_region(request.clone()).await.unwrap().into_inner();
    assert!(
        drained
            .regions
            .iter()
            .any(|r| r.region == "us-east" && r.draining)
    );
    rm.undrain_region(request).await.unwrap();

    // Refusals are counted by RPC and the caller's roles.
    let metrics = reqwest::get(format!("http://{}/metrics", mesh.console))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (role, rpc) in [
        ("gateway", "RingManager/DrainRegion"),
        ("channel-server", "RingManager/DrainRegion"),
        ("channel-server", "RingManager/Lease"),
        ("channel-server", "RingManager/Register"),
        ("presence-server", "RingManager/Register"),
        ("gateway", "RingManager/Register"),
        ("gateway", "RingManager/ReportGateway"),
        ("channel-server", "RingManager/ReportGateway"),
    ] {
        let rpc = format!("channelmesh.ring.v1.{rpc}");
        assert_eq!(
            denied(&metrics, role, &rpc),
            1,
            "{role} {rpc} in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn channel_and_presence_servers_refuse_the_wrong_role_and_a_service_acting_as_another() {
    let mesh = mesh().await;
    let channel = "CATTACK";
    let ops = Who::As(Role::Operator, "ops");
    let gateway = Who::As(Role::Gateway, "us-east-1");
    let cs2 = Who::As(Role::ChannelServer, "cs-2");
    permission_denied(
        "Publish with an operator's certificate",
        publish(&mesh, ops, channel).await,
        "ops.operator.channelmesh",
        "it needs the role gateway or admin",
    );
    permission_denied(
        "Subscribe with a channel server's certificate",
        subscribe(&mesh, cs2, channel).await,
        "cs-2.channel-server.channelmesh",
        "it needs the role gateway",
    );
    permission_denied(
        "History with a presence server's certificate",
        history(&mesh, Who::As(Role::PresenceServer, "ps-1"), channel).await,
        "ps-1.presence-server.channelmesh",
        "it needs the role gateway or admin",
    );
    permission_denied(
        "Handoff with a gateway's certificate",
        handoff(&mesh, gateway, ("cs-1", 0), channel).await,
        "us-east-1.gateway.channelmesh",
        "it needs the role channel-server",
    );
    // Another node's name, or its own when the ring names no handoff from it.
    let (ring, _) = ring_at(mesh.ring_manager).await;
    let owner = ring
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();
    let other = if owner == "cs-1" { "cs-2" } else { "cs-1" };
    let other_cert = if owner == "cs-1" {
        Who::As(Role::ChannelServer, "cs-2")
    } else {
        Who::As(Role::ChannelServer, "cs-1")
    };
    permission_denied(
        "Handoff claiming another node",
        handoff(&mesh, other_cert, (&owner, 0), channel).await,
        &format!("{other}.channel-server.channelmesh"),
        &format!("a channel server hands off only as itself, not as {owner}"),
    );
    permission_denied(
        "Handoff the ring does not name",
        handoff(&mesh, other_cert, (other, 1000), channel).await,
        &format!("{other}.channel-server.channelmesh"),
        &format!("the ring names no handoff from {other} to {owner}"),
    );
    permission_denied(
        "presence Session as eu-west-1 with us-east-1's certificate",
        session(&mesh, gateway, "eu-west-1").await,
        "us-east-1.gateway.channelmesh",
        "a gateway opens presence sessions only as itself, not as gateway \"eu-west-1\"",
    );
    permission_denied(
        "presence Session with an admin server's certificate",
        session(&mesh, Who::As(Role::Admin, "admin-1"), "us-east-1").await,
        "admin-1.admin.channelmesh",
        "it needs the role gateway",
    );
    permission_denied(
        "presence Query with an operator's certificate",
        query(&mesh, ops).await,
        "ops.operator.channelmesh",
        "it needs the role gateway or admin",
    );
    nothing_took_effect(&mesh, channel).await;
    // U7, whom the refused sessions called online, reads as away.
    let presence = admin(&mesh)
        .await
        .get_presence(mesh_proto::admin::GetPresenceRequest {
            users: vec!["U7".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        presence.users.iter().all(|u| u.presence != "active"),
        "{presence:?}"
    );

    // The right callers are served: a gateway's own session and queries.
    let own = session(&mesh, gateway, "us-east-1").await;
    assert!(matches!(own, Ok(Ok(()))), "{own:?}");
    let queried = query(&mesh, gateway).await;
    assert!(matches!(queried, Ok(Ok(()))), "{queried:?}");

    // Counted on the channel server's own /metrics.
    let (name, http) = mesh.http.iter().find(|(name, _)| *name == owner).unwrap();
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let publish = "channelmesh.channel.v1.ChannelServer/Publish";
    assert_eq!(
        denied(&metrics, "operator", publish),
        1,
        "{name}:\n{metrics}"
    );
    let handoff = "channelmesh.channel.v1.ChannelServer/Handoff";
    assert_eq!(
        denied(&metrics, "channel-server", handoff),
        2,
        "{name}:\n{metrics}"
    );
}
