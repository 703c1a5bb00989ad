//! Token hygiene at a real gateway (issue: hardening): a gateway holding only public keys
//! accepts RS256 and EdDSA tokens through `rtm.connect`, picks JWKS keys by `kid`, applies its
//! configured leeway, and refuses HS256 tokens, whatever they were signed with.

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh_core::{Identity, TeamId, UserId};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::{Rtm, mesh, web_api};

fn now() -> u64 {
    channelmesh::mesh::unix_now()
}

/// The test keys of `crates/mesh-core/tests/keys/`.
pub fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("crates/mesh-core/tests/keys")
        .join(name)
}

fn key_bytes(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).unwrap()
}

pub fn identity(user: &str, expires_at: u64, jti: Option<&str>) -> Identity {
    Identity {
        user: UserId::new(user).unwrap(),
        team: TeamId::new("T1").unwrap(),
        name: None,
        channels: vec![],
        expires_at,
        jti: jti.map(str::to_string),
    }
}

/// A token for `identity` signed by the private key file `private` with `alg` (HS256: the
/// file's bytes are the secret), with `kid` in its header.
pub fn signed(alg: Algorithm, private: &[u8], kid: Option<&str>, identity: &Identity) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(private).unwrap(),
        _ => EncodingKey::from_secret(private),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    mesh_core::token::mint_with(&header, &key, identity, now()).unwrap()
}

/// A gateway of region `region` on 127.0.0.1:0 following `ring_manager`'s ring, with no HS256
/// secret: only the RSA and Ed25519 test public keys and the test JWKS, leeway 120 s. Returns
/// its `/api/` base URL; it stops when the guard drops.
pub async fn public_key_gateway(
    ring_manager: std::net::SocketAddr,
    region: &str,
) -> (String, tokio_util::sync::DropGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // In this process, beside the mesh: the process's certificate names it too.
    let id = format!("{region}-pk");
    crate::support::trust(&[
        mesh_transport::Identity::new(mesh_transport::Role::Gateway, &id).unwrap(),
    ]);
    let config = gateway::Config {
        id,
        region: region.into(),
        ring: ring_client::RingSource::Direct(format!("http://{ring_manager}")),
        presence_ring: None,
        public_url: None,
        jwt_secret: Vec::new(),
        connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
        limits: Default::default(),
        redirect_allow: Default::default(),
        policy_file: None,
        boot: None,
        tokens: gateway::tokens::TokenConfig {
            public_keys: vec![key_path("rsa-public.pem"), key_path("ed25519-public.pem")],
            jwks: Some(key_path("jwks.json")),
            leeway_secs: 120,
            ..Default::default()
        },
    };
    let cancel = CancellationToken::new();
    tokio::spawn(gateway::serve(config, listener, cancel.clone()));
    (format!("http://{addr}/api/"), cancel.drop_guard())
}

// Multi-threaded: signing an RS256 token here (the `rsa` crate, unoptimized) holds its thread
// for a good part of a second on a loaded machine, and the in-process mesh must keep
// heartbeating meanwhile, or its ring manager declares every node down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_key_gateway_takes_rs256_and_eddsa_and_refuses_hs256() {
    let mesh = mesh().await;
    let (base, _gateway) = public_key_gateway(mesh.ring_manager, "pk-region").await;
    let rsa = key_bytes("rsa-private.pem");
    let ed = key_bytes("ed25519-private.pem");
    let fresh = |user| identity(user, now() + 600, None);

    // Through the real rtm.connect and WebSocket: hello arrives.
    for token in [
        signed(Algorithm::RS256, &rsa, None, &fresh("URSA")),
        signed(Algorithm::EdDSA, &ed, None, &fresh("UED")),
        // JWKS, by kid.
        signed(
            Algorithm::RS256,
            &key_bytes("rsa2-private.pem"),
            Some("rsa-2"),
            &fresh("UJWKS"),
        ),
        // Within the leeway (expired 60 s ago, leeway 120 s).
        signed(
            Algorithm::RS256,
            &rsa,
            None,
            &identity("ULATE", now() - 60, None),
        ),
    ] {
        let mut rtm = Rtm::connect(&base, &token)
            .await
            .expect("the token is accepted");
        rtm.send(json!({"id": 1, "type": "ping"})).await;
        rtm.expect("pong", |v| v["type"] == "pong").await;
    }

    let invalid = json!({"ok": false, "error": "invalid_auth"});
    let refused = [
        // HS256 with the mesh's real secret: this gateway holds no secret.
        (
            "HS256 with the secret",
            signed(
                Algorithm::HS256,
                mesh.jwt_secret.as_bytes(),
                None,
                &fresh("U1"),
            ),
        ),
        // Algorithm confusion: HS256 keyed with the public key's own bytes.
        (
            "HS256 with the RSA public key as secret",
            signed(
                Algorithm::HS256,
                &key_bytes("rsa-public.pem"),
                None,
                &fresh("U1"),
            ),
        ),
        (
            "HS256 with the Ed25519 public key as secret",
            signed(
                Algorithm::HS256,
                &key_bytes("ed25519-public.pem"),
                None,
                &fresh("U1"),
            ),
        ),
        // A key the gateway does not hold.
        (
            "RS256 by another key naming a JWKS kid",
            signed(
                Algorithm::RS256,
                &key_bytes("rsa2-private.pem"),
                Some("rsa-1"),
                &fresh("U1"),
            ),
        ),
        (
            "EdDSA naming an RSA key's kid",
            signed(
                Algorithm::EdDSA,
                &key_bytes("ed25519b-private.pem"),
                Some("rsa-1"),
                &fresh("U1"),
            ),
        ),
        // Beyond the leeway.
        (
            "expired 10 minutes ago",
            signed(
                Algorithm::RS256,
                &rsa,
                None,
                &identity("U1", now() - 600, None),
            ),
        ),
    ];
    for (what, token) in refused {
        let reply = web_api(&base, "rtm.connect", Some(&token)).await;
        assert_eq!(reply, invalid, "{what}");
    }
    // The mesh's own gateways (HS256 secret only) refuse the public-key tokens.
    let us = mesh.rtm_base_url("us-east").unwrap();
    let rs = signed(Algorithm::RS256, &rsa, None, &fresh("URSA"));
    assert_eq!(web_api(&us, "rtm.connect", Some(&rs)).await, invalid);
}

#[tokio::test]
async fn a_gateway_with_a_bad_key_file_does_not_start() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = gateway::Config {
        id: "bad-1".into(),
        region: "bad".into(),
        ring: ring_client::RingSource::Direct("http://127.0.0.1:1".into()),
        presence_ring: None,
        public_url: None,
        jwt_secret: Vec::new(),
        connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
        limits: Default::default(),
        redirect_allow: Default::default(),
        policy_file: None,
        boot: None,
        tokens: gateway::tokens::TokenConfig {
            // A private key: the gateway must never be handed one.
            public_keys: vec![key_path("rsa-private.pem")],
            ..Default::default()
        },
    };
    let result = gateway::serve(config, listener, CancellationToken::new()).await;
    let error = result.expect_err("a private key is refused").to_string();
    assert!(error.contains("private key"), "{error}");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = gateway::Config {
        id: "bad-2".into(),
        region: "bad".into(),
        ring: ring_client::RingSource::Direct("http://127.0.0.1:1".into()),
        presence_ring: None,
        public_url: None,
        jwt_secret: Vec::new(),
        connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
        limits: Default::default(),
        redirect_allow: Default::default(),
        policy_file: None,
        boot: None,
        tokens: Default::default(),
    };
    let result = gateway::serve(config, listener, CancellationToken::new()).await;
    assert!(result.is_err(), "a gateway with no key at all is refused");
}
