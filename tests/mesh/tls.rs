//! gRPC between the services over mutual TLS (issue: hardening): a whole mesh whose every
//! internal and admin connection is TLS with client certificates, and who it refuses.

use mesh_proto::admin::PostMessageRequest;
use mesh_proto::admin::admin_client::AdminClient;
use mesh_transport::Tls;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::support::{Rtm, admin, mesh};

/// A CA, and a certificate it signed for 127.0.0.1 and localhost usable as server and client:
/// (CA PEM, certificate PEM, key PEM).
fn authority(name: &str) -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

async fn post_with(endpoint: Endpoint, token: &str) -> Result<(), String> {
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(PostMessageRequest {
        channel: "C1".into(),
        user: "U2".into(),
        text: "hello".into(),
        team: String::new(),
    });
    let bearer = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", bearer);
    AdminClient::new(channel)
        .post_message(request)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_mesh_on_mutual_tls_delivers_and_refuses_plaintext_and_strangers() {
    let (ca, cert, key) = authority("mesh");
    mesh_transport::configure(Tls {
        ca: ca.clone().into_bytes(),
        cert: cert.into_bytes(),
        key: key.into_bytes(),
        require_client_cert: true,
    })
    .unwrap();
    // The mesh starts only if every service registers, leases and subscribes over TLS.
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut here = Rtm::connect(&us, &mesh.token("U1", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut there = Rtm::connect(&eu, &mesh.token("U3", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut admin = admin(&mesh).await;
    crate::support::post(&mut admin, "C1", "U2", "over tls").await;
    for client in [&mut here, &mut there] {
        client
            .expect("the message", |v| {
                v["type"] == "message" && v["text"] == "over tls"
            })
            .await;
    }

    let addr = mesh.admin.to_string();
    // Plaintext is refused.
    let plaintext = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    assert!(post_with(plaintext, &mesh.admin_token).await.is_err());
    // TLS without a client certificate is refused.
    let anonymous = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca)))
        .unwrap();
    assert!(post_with(anonymous, &mesh.admin_token).await.is_err());
    // A certificate from another CA is refused.
    let (_, other_cert, other_key) = authority("stranger");
    let stranger = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .identity(Identity::from_pem(other_cert, other_key)),
        )
        .unwrap();
    assert!(post_with(stranger, &mesh.admin_token).await.is_err());
    // The mesh's own certificate is accepted.
    let own = mesh_transport::endpoint(&addr).unwrap();
    assert_eq!(post_with(own, &mesh.admin_token).await, Ok(()));
}
