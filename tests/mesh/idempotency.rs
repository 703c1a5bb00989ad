//! Idempotent publish from outside: the admin API's `idempotency_key` and an RTM message's
//! `client_msg_id` (per user) make a retried publish the same message, with the same ts.

use std::time::Duration;

use mesh_proto::admin::{HistoryRequest, PostMessageRequest, PublishEventRequest};
use serde_json::json;

use crate::support::{Rtm, admin, mesh};

#[tokio::test]
async fn a_post_retried_with_its_idempotency_key_is_one_message_with_one_ts() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut reader = Rtm::connect(&us, &mesh.token("UREAD", "T1", &["CIDEM"]).unwrap())
        .await
        .unwrap();
    let mut admin = admin(&mesh).await;
    let request = |text: &str, key: &str| PostMessageRequest {
        channel: "CIDEM".into(),
        user: "UPOST".into(),
        text: text.into(),
        team: String::new(),
        idempotency_key: key.into(),
    };
    let first = admin.post_message(request("once", "web-1")).await.unwrap();
    let again = admin.post_message(request("once", "web-1")).await.unwrap();
    assert_eq!(first.get_ref().ts, again.get_ref().ts, "the retry's ts");
    // A PublishEvent shares the key space; another key is another message.
    let raw = admin
        .publish_event(PublishEventRequest {
            channel: "CIDEM".into(),
            event_json: r#"{"type":"reaction_added","reaction":"+1"}"#.into(),
            idempotency_key: "web-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(raw.get_ref().ts, first.get_ref().ts);
    let other = admin.post_message(request("twice", "web-2")).await.unwrap();
    assert_ne!(other.get_ref().ts, first.get_ref().ts);

    let got = reader.expect("the post", |v| v["type"] == "message").await;
    assert_eq!(got["text"], "once");
    let next = reader
        .expect("the next post", |v| v["type"] == "message")
        .await;
    assert_eq!(next["text"], "twice", "the retry was not delivered again");
    let history = admin
        .history(HistoryRequest {
            channel: "CIDEM".into(),
            since_ts: String::new(),
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let ts: Vec<&str> = history.events.iter().map(|e| e.ts.as_str()).collect();
    assert_eq!(
        ts,
        [first.get_ref().ts.as_str(), other.get_ref().ts.as_str()]
    );
}

#[tokio::test]
async fn an_rtm_message_resent_with_its_client_msg_id_is_delivered_once() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let token = |user: &str| mesh.token(user, "T1", &["CGEN"]).unwrap();
    let mut ann = Rtm::connect(&us, &token("UANN")).await.unwrap();
    let mut bob = Rtm::connect(&eu, &token("UBOB")).await.unwrap();
    let mut cat = Rtm::connect(&us, &token("UCAT")).await.unwrap();
    let message = |id: i64, text: &str| {
        json!({"id": id, "type": "message", "channel": "CGEN", "text": text,
               "client_msg_id": "0f8e2a36-8d1c-4e7b-9a55-3c1d2b4e6f70"})
    };
    ann.send(message(1, "hello")).await;
    let first = ann.expect("ack 1", |v| v["reply_to"] == 1).await;
    // Re-sent (a reconnecting client does): the same ts, not a second message.
    ann.send(message(2, "hello")).await;
    let again = ann.expect("ack 2", |v| v["reply_to"] == 2).await;
    assert_eq!(first["ts"], again["ts"]);
    // The key is per user: another user's message with the same id is a message of its own.
    cat.send(message(3, "hello from cat")).await;
    let cats = cat.expect("ack 3", |v| v["reply_to"] == 3).await;
    assert_ne!(cats["ts"], first["ts"]);

    let got = bob
        .expect("ann's message", |v| v["type"] == "message")
        .await;
    assert_eq!(
        (got["user"].as_str(), &got["ts"]),
        (Some("UANN"), &first["ts"])
    );
    let next = bob
        .expect("cat's message", |v| v["type"] == "message")
        .await;
    assert_eq!(
        next["user"], "UCAT",
        "ann's re-send was not delivered again"
    );
    bob.expect_none(Duration::from_millis(300), "a second copy", |v| {
        v["type"] == "message"
    })
    .await;
}
