//! Bad input gets a clear error and never hurts anyone else (issue: foundation, "Bad input").

use std::time::Duration;

use channelmesh::MeshConfig;
use mesh_core::{Identity, TeamId, TokenKey, UserId};
use mesh_proto::admin::admin_client::AdminClient;
use mesh_proto::admin::{PostMessageRequest, PublishEventRequest};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Rtm, admin, mesh, mesh_with, post, web_api};

fn now() -> u64 {
    channelmesh::mesh::unix_now()
}

#[tokio::test]
async fn bad_tokens_are_refused_like_slack() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let identity = |exp| Identity {
        user: UserId::new("U1").unwrap(),
        team: TeamId::new("T1").unwrap(),
        name: None,
        channels: vec![],
        expires_at: exp,
        jti: None,
    };
    let expired = TokenKey::hs256(mesh.jwt_secret.as_bytes())
        .unwrap()
        .mint(&identity(now() - 3600), now() - 7200)
        .unwrap();
    let wrong_secret = TokenKey::hs256(b"not the secret, though long enough")
        .unwrap()
        .mint(&identity(now() + 3600), now())
        .unwrap();
    for method in ["auth.test", "rtm.connect"] {
        assert_eq!(
            web_api(&us, method, None).await,
            json!({"ok": false, "error": "not_authed"})
        );
        for bad in ["garbage", "a.b.c", expired.as_str(), wrong_secret.as_str()] {
            let reply = web_api(&us, method, Some(bad)).await;
            assert_eq!(
                reply,
                json!({"ok": false, "error": "invalid_auth"}),
                "{method} with {bad}"
            );
        }
    }
}

#[tokio::test]
async fn connect_urls_are_single_use_and_expire() {
    let mut config = MeshConfig::ephemeral();
    config.connect_url_ttl = Duration::from_millis(200);
    let mesh = mesh_with(config).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let token = mesh.token("U1", "T1", &[]).unwrap();

    let reply = web_api(&us, "rtm.connect", Some(&token)).await;
    let url = reply["url"].as_str().unwrap().to_string();
    let _first = Rtm::open(&url).await.expect("the URL works once");
    let again = Rtm::open(&url).await;
    assert!(again.is_err(), "a reused connect URL must be refused");

    let reply = web_api(&us, "rtm.connect", Some(&token)).await;
    let url = reply["url"].as_str().unwrap().to_string();
    // A clock that must pass: twice the URL's 200 ms lifetime. (Polling until it is refused
    // would prove nothing: the first try would use the single-use URL up.)
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        Rtm::open(&url).await.is_err(),
        "an expired connect URL must be refused"
    );
    assert!(
        Rtm::open(&format!(
            "{}/rtm/not-a-ticket",
            us.trim_end_matches("/api/")
        ))
        .await
        .is_err()
    );
}

#[tokio::test]
async fn bad_frames_get_error_replies_and_the_connection_stays() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut c = Rtm::connect(&us, &mesh.token("U1", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let cases: Vec<(Message, serde_json::Value)> = vec![
        (
            Message::Text("not json".into()),
            json!({"type": "error", "code": 1}),
        ),
        (
            Message::Text("[1,2,3]".into()),
            json!({"type": "error", "code": 1}),
        ),
        (
            Message::Text("42".into()),
            json!({"type": "error", "code": 1}),
        ),
        (
            Message::Text(r#"{"id":5,"type":"teleport"}"#.into()),
            json!({"reply_to": 5, "code": 3}),
        ),
        (
            Message::Text(r#"{"id":6}"#.into()),
            json!({"reply_to": 6, "code": 3}),
        ),
        (
            Message::Text(r#"{"id":7,"type":"message","channel":"C1"}"#.into()),
            json!({"reply_to": 7, "code": 2}),
        ),
        (
            Message::Text(r#"{"id":8,"type":"message","channel":["C1"],"text":"x"}"#.into()),
            json!({"reply_to": 8, "code": 4}),
        ),
        (
            Message::Text(r#"{"type":"message","channel":"C1","text":"no id"}"#.into()),
            json!({"type": "error", "code": 4}),
        ),
        (
            Message::Text(r#"{"id":9,"type":"message","channel":"bad channel","text":"x"}"#.into()),
            json!({"reply_to": 9, "code": 5}),
        ),
        (
            Message::Text(r#"{"id":10,"type":"typing"}"#.into()),
            json!({"reply_to": 10, "code": 4}),
        ),
        (
            Message::Text(r#"{"id":11,"type":"message","channel":"CSECRET","text":"x"}"#.into()),
            json!({"reply_to": 11, "code": 6}),
        ),
        (
            Message::Binary(vec![0u8, 1, 2].into()),
            json!({"type": "error", "code": 8}),
        ),
    ];
    for (frame, want) in cases {
        c.send_raw(frame.clone()).await;
        let got = c
            .next()
            .await
            .unwrap_or_else(|e| panic!("no reply to {frame:?}: {e}"));
        assert_eq!(got["error"]["code"], want["code"], "{frame:?} -> {got}");
        if let Some(id) = want.get("reply_to") {
            assert_eq!(got["reply_to"], *id, "{got}");
            assert_eq!(got["ok"], false);
        } else {
            assert_eq!(got["type"], "error", "{got}");
        }
    }
    let long = "x".repeat(16 * 1024 + 1);
    c.send(json!({"id": 12, "type": "message", "channel": "C1", "text": long}))
        .await;
    let got = c.expect("msg_too_long", |v| v["reply_to"] == 12).await;
    assert_eq!(got["error"]["msg"], "msg_too_long");
    // Still connected and working.
    c.send(json!({"id": 13, "type": "message", "channel": "C1", "text": "still here"}))
        .await;
    assert_eq!(c.expect("ack", |v| v["reply_to"] == 13).await["ok"], true);
}

#[tokio::test]
async fn an_oversized_frame_closes_only_its_own_connection() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut bystander = Rtm::connect(&us, &mesh.token("U2", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut abuser = Rtm::connect(&us, &mesh.token("U1", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let huge = format!(
        r#"{{"id":1,"type":"message","channel":"C1","text":"{}"}}"#,
        "x".repeat(200 * 1024)
    );
    // The server may close before the whole frame is written; that is the point.
    let _ = futures::SinkExt::send(&mut abuser.ws, Message::Text(huge.into())).await;
    assert_eq!(abuser.closed().await, Some(1009));
    let mut admin = admin(&mesh).await;
    let ts = post(&mut admin, "C1", "UWEB", "business as usual").await;
    let got = bystander
        .expect("the bystander's message", |v| v["type"] == "message")
        .await;
    assert_eq!(got["ts"], ts.as_str());
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_checks_arguments() {
    let mesh = mesh().await;
    let mut anonymous = AdminClient::connect(format!("http://{}", mesh.admin))
        .await
        .unwrap();
    let post_req = || PostMessageRequest {
        channel: "C1".into(),
        user: "U1".into(),
        text: "x".into(),
        team: String::new(),
        idempotency_key: String::new(),
    };
    let status = anonymous.post_message(post_req()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(post_req());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        anonymous.post_message(wrong).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    let mut admin = admin(&mesh).await;
    let bad = [
        PostMessageRequest {
            channel: "bad channel".into(),
            ..post_req()
        },
        PostMessageRequest {
            text: String::new(),
            ..post_req()
        },
        PostMessageRequest {
            user: String::new(),
            ..post_req()
        },
        PostMessageRequest {
            text: "x".repeat(16 * 1024 + 1),
            ..post_req()
        },
        PostMessageRequest {
            idempotency_key: "k".repeat(129),
            ..post_req()
        },
    ];
    for req in bad {
        assert_eq!(
            admin.post_message(req).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
    for json in ["not json", "[1]", r#"{"no":"type"}"#, r#"{"type":"hello"}"#] {
        let req = PublishEventRequest {
            channel: "C1".into(),
            event_json: json.into(),
            idempotency_key: String::new(),
        };
        assert_eq!(
            admin.publish_event(req).await.unwrap_err().code(),
            tonic::Code::InvalidArgument,
            "{json}"
        );
    }
}
