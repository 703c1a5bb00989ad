//! The mesh on mutual TLS, as it runs by default: every internal connection (registrations,
//! leases, ring watches, publishes, subscriptions, presence sessions, probes) carries the
//! process's certificate and passes the authorization table; the admin API is public, served
//! plaintext or with a server certificate of its own, and never asks for a client certificate.
//! The refusals are in `attacks_grpc.rs`.

use channelmesh::certs::{Authority, days};
use mesh_proto::admin::PostMessageRequest;
use mesh_proto::admin::admin_client::AdminClient;
use mesh_transport::{Identity, Role, ServerTls, Transport};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::support::{Rtm, admin, mesh};

async fn post_with(endpoint: Endpoint, token: &str) -> Result<String, String> {
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(PostMessageRequest {
        channel: "C1".into(),
        user: "U2".into(),
        text: "through the admin api's own tls".into(),
        team: String::new(),
        idempotency_key: String::new(),
    });
    let bearer = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", bearer);
    AdminClient::new(channel)
        .post_message(request)
        .await
        .map(|r| r.into_inner().ts)
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_default_mesh_speaks_mutual_tls_inside_and_delivers_across_regions() {
    // The mesh starts only if every service registers, leases and subscribes as itself.
    let mesh = mesh().await;
    let Some(Transport::Mtls(process)) = mesh_transport::transport().as_deref().cloned() else {
        panic!("the test mesh speaks mutual TLS");
    };
    let named = process.identities().unwrap();
    for service in [
        "cs-1.channel-server.channelmesh",
        "ps-3.presence-server.channelmesh",
        "us-east-1.gateway.channelmesh",
        "admin-1.admin.channelmesh",
        "rm-1.ring-manager.channelmesh",
    ] {
        assert!(
            named.iter().any(|i| i.to_string() == service),
            "{service} not in {named:?}"
        );
    }
    assert!(
        !named.iter().any(|i| i.role == Role::Operator),
        "the services' certificate is no operator's"
    );
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut here = Rtm::connect(&us, &mesh.token("U1", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut there = Rtm::connect(&eu, &mesh.token("U3", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    // The admin API of `dev` is plaintext, as the real clients (grpcio) use it.
    let mut admin = admin(&mesh).await;
    crate::support::post(&mut admin, "C1", "U2", "over tls").await;
    for client in [&mut here, &mut there] {
        client
            .expect("the message", |v| {
                v["type"] == "message" && v["text"] == "over tls"
            })
            .await;
    }
}

#[tokio::test]
async fn an_admin_server_with_its_own_certificate_serves_tls_and_asks_no_client_certificate() {
    let mesh = mesh().await;
    // A public certificate from a CA of the web's, not the mesh's.
    let public_ca = Authority::generate().unwrap();
    let public = public_ca
        .issue(
            &[Identity::new(Role::Admin, "api").unwrap()],
            &["127.0.0.1".into()],
            days(1),
        )
        .unwrap();
    let config = admin_server::Config {
        ring: ring_client::RingSource::Direct(format!("http://{}", mesh.ring_manager)),
        presence_ring: None,
        admin_token: mesh.admin_token.clone(),
        jwt_secret: mesh.jwt_secret.clone().into_bytes(),
        jwt_claims: Default::default(),
        telemetry: mesh_telemetry::Telemetry::default(),
        public_tls: Some(ServerTls {
            cert: public.cert.clone(),
            key: public.key.clone(),
        }),
    };
    let bound = admin_server::run::bind(config, "127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let addr = bound.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(bound.serve(stop.clone()));
    let _stop = stop.drop_guard();

    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut reader = Rtm::connect(&us, &mesh.token("U1", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    // TLS checked against the public CA, with no client certificate: served (once the admin
    // server routes by the ring).
    let tls = mesh_transport::public_endpoint(
        &format!("https://{addr}"),
        Some(public_ca.ca_pem().as_bytes()),
    )
    .unwrap();
    let ts = crate::support::eventually("the admin server posts over its own TLS", || {
        let tls = tls.clone();
        let token = mesh.admin_token.clone();
        async move { post_with(tls, &token).await }
    })
    .await;
    let got = reader.expect("the post", |v| v["type"] == "message").await;
    assert_eq!(got["ts"], ts.as_str());
    // Plaintext to a TLS listener fails.
    let plaintext = mesh_transport::public_endpoint(&addr.to_string(), None).unwrap();
    assert!(post_with(plaintext, &mesh.admin_token).await.is_err());
    // The mesh's CA does not vouch for the public certificate.
    let wrong_ca = mesh_transport::public_endpoint(
        &format!("https://{addr}"),
        Some(Authority::for_this_process().unwrap().ca_pem().as_bytes()),
    )
    .unwrap();
    assert!(post_with(wrong_ca, &mesh.admin_token).await.is_err());
}

#[tokio::test]
async fn an_insecure_mesh_speaks_plaintext_inside_only_when_asked() {
    let mesh = crate::support::mesh_with(channelmesh::MeshConfig {
        security: channelmesh::mesh::Security::Insecure,
        ..channelmesh::MeshConfig::ephemeral()
    })
    .await;
    assert_eq!(
        mesh_transport::transport().as_deref(),
        Some(&Transport::Insecure)
    );
    // Plaintext, with no certificate, an SRE call is obeyed: what --insecure means.
    let plaintext = Endpoint::from_shared(format!("http://{}", mesh.ring_manager))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let regions = mesh_proto::ring::ring_manager_client::RingManagerClient::new(plaintext)
        .regions(mesh_proto::ring::RegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(regions.regions.iter().any(|r| r.region == "us-east"));
    // And the mesh works end to end.
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut reader = Rtm::connect(&us, &mesh.token("U1", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut admin = admin(&mesh).await;
    crate::support::post(&mut admin, "C1", "U2", "in plaintext").await;
    reader
        .expect("the message", |v| {
            v["type"] == "message" && v["text"] == "in plaintext"
        })
        .await;
}
