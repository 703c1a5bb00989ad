//! Token revocation by `jti` (issue: hardening): the admin API's RevokeTokens reaches every
//! gateway through the ring manager; revoked tokens are refused at `rtm.connect` and at the
//! WebSocket upgrade, and live connections holding them are closed with 4003.

use mesh_proto::admin::{MintTokenRequest, RevokeTokensRequest, RevokedToken};
use serde_json::json;

use crate::support::{Rtm, admin, admin_at, eventually, mesh, refused_upgrade, web_api};

fn mint_request(user: &str) -> MintTokenRequest {
    MintTokenRequest {
        user: user.into(),
        team: "T1".into(),
        channels: vec!["C1".into()],
        ttl_seconds: 600,
        name: String::new(),
    }
}

#[tokio::test]
async fn revoked_tokens_are_refused_and_their_connections_closed() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut admin = admin(&mesh).await;
    let doomed = admin
        .mint_token(mint_request("U1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!doomed.jti.is_empty(), "MintToken gives the jti");
    let kept = admin
        .mint_token(mint_request("U2"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(doomed.jti, kept.jti);

    let mut victim = Rtm::connect(&us, &doomed.token).await.unwrap();
    let mut bystander = Rtm::connect(&us, &kept.token).await.unwrap();
    // A connect URL handed out before the revocation.
    let pending = web_api(&eu, "rtm.connect", Some(&doomed.token)).await;
    let pending_url = pending["url"].as_str().unwrap().to_string();

    let reply = admin
        .revoke_tokens(RevokeTokensRequest {
            jtis: vec![RevokedToken {
                jti: doomed.jti.clone(),
                expires_at: doomed.expires_at,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.held, 1);
    assert!(reply.version >= 1);

    // The live connection is closed with the documented code.
    assert_eq!(victim.closed().await, Some(4003));
    // Both regions refuse the token, Slack-style (HTTP 200, ok:false).
    let revoked = json!({"ok": false, "error": "token_revoked"});
    for base in [&us, &eu] {
        eventually("the gateway refuses the revoked token", || async {
            let reply = web_api(base, "rtm.connect", Some(&doomed.token)).await;
            (reply == revoked).then_some(())
        })
        .await;
    }
    // The URL from before is refused at the upgrade.
    let (status, body) = refused_upgrade(&pending_url).await;
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "token_revoked");

    // Others are untouched.
    bystander.send(json!({"id": 7, "type": "ping"})).await;
    bystander.expect("pong", |v| v["type"] == "pong").await;
    let mut again = Rtm::connect(&eu, &kept.token).await.unwrap();
    again.send(json!({"id": 8, "type": "ping"})).await;
    again.expect("pong", |v| v["type"] == "pong").await;
}

#[tokio::test]
async fn revoke_tokens_checks_its_input_and_the_admin_token() {
    let mesh = mesh().await;
    let mut admin = admin(&mesh).await;
    let one = |jti: &str| RevokeTokensRequest {
        jtis: vec![RevokedToken {
            jti: jti.into(),
            expires_at: channelmesh::mesh::unix_now() + 60,
        }],
    };
    let empty = admin
        .revoke_tokens(RevokeTokensRequest { jtis: vec![] })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    let blank = admin.revoke_tokens(one("")).await.unwrap_err();
    assert_eq!(blank.code(), tonic::Code::InvalidArgument);
    let long = admin
        .revoke_tokens(one(&"j".repeat(257)))
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    let too_many = RevokeTokensRequest {
        jtis: (0..10_001)
            .map(|i| RevokedToken {
                jti: format!("j{i}"),
                expires_at: channelmesh::mesh::unix_now() + 60,
            })
            .collect(),
    };
    let status = admin.revoke_tokens(too_many).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let mut wrong = admin_at(mesh.admin, "not-the-admin-token").await;
    let status = wrong.revoke_tokens(one("x")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // An already-expired token is accepted and not held.
    let reply = admin
        .revoke_tokens(RevokeTokensRequest {
            jtis: vec![RevokedToken {
                jti: "old".into(),
                expires_at: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.held, 0);
}
