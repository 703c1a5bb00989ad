//! The message path: admin -> ring -> channel server -> every subscribed gateway -> clients.

use std::time::Duration;

use channel_client::wire::event_to_proto;
use mesh_core::{ChannelEvent, ChannelId, EventBody, UserId};
use mesh_proto::admin::{
    HistoryRequest, JoinChannelRequest, LeaveChannelRequest, PublishEventRequest,
};
use mesh_proto::channel::PublishRequest;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use serde_json::{Value, json};

use crate::support::{Rtm, admin, eventually, mesh, post, web_api};

#[tokio::test]
async fn client_message_is_acked_and_delivered_across_regions() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut ann = Rtm::connect(&us, &mesh.token("UANN", "T1", &["CGEN"]).unwrap())
        .await
        .unwrap();
    let mut bob = Rtm::connect(&eu, &mesh.token("UBOB", "T1", &["CGEN"]).unwrap())
        .await
        .unwrap();

    ann.send(json!({"id": 1, "type": "message", "channel": "CGEN", "text": "hi bob"}))
        .await;
    let ack = ann.expect("ack", |v| v["reply_to"] == 1).await;
    assert_eq!(ack["ok"], true);
    let ts = ack["ts"].as_str().expect("ack has ts").to_string();
    let got = bob.expect("message", |v| v["type"] == "message").await;
    assert_eq!(got["ts"], ts.as_str());
    assert_eq!(got["user"], "UANN");
    assert_eq!(got["team"], "T1");
    // The sender's own connection does not get its message back.
    ann.expect_none(
        Duration::from_millis(300),
        "an echo of its own message",
        |v| v["type"] == "message",
    )
    .await;

    bob.send(json!({"id": 2, "type": "typing", "channel": "CGEN"}))
        .await;
    let typing = ann
        .expect("user_typing", |v| v["type"] == "user_typing")
        .await;
    assert_eq!(
        typing,
        json!({"type": "user_typing", "channel": "CGEN", "user": "UBOB"})
    );

    ann.send(json!({"type": "ping", "id": 9, "time": 123}))
        .await;
    let pong = ann.expect("pong", |v| v["type"] == "pong").await;
    assert_eq!(pong, json!({"type": "pong", "reply_to": 9, "time": 123}));
}

#[tokio::test]
async fn user_and_team_channels_reach_every_connection_of_the_user() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let token = mesh.token("UANN", "TACME", &[]).unwrap();
    let mut phone = Rtm::connect(&us, &token).await.unwrap();
    let mut laptop = Rtm::connect(&eu, &token).await.unwrap();
    let mut admin = admin(&mesh).await;
    let ts = post(&mut admin, "UANN", "USLACKBOT", "direct to ann").await;
    for conn in [&mut phone, &mut laptop] {
        let got = conn
            .expect("the user-channel message", |v| v["text"] == "direct to ann")
            .await;
        assert_eq!(got["ts"], ts.as_str());
    }
    post(&mut admin, "TACME", "USLACKBOT", "to the whole team").await;
    for conn in [&mut phone, &mut laptop] {
        conn.expect("the team-channel message", |v| {
            v["text"] == "to the whole team"
        })
        .await;
    }
}

#[tokio::test]
async fn no_event_after_hello_is_missed() {
    // Each round subscribes a fresh channel, so the post races the upstream subscription.
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut admin = admin(&mesh).await;
    for round in 0..20 {
        let channel = format!("CRACE{round}");
        let token = mesh.token(&format!("U{round}"), "T1", &[&channel]).unwrap();
        let mut client = Rtm::connect(&us, &token).await.unwrap();
        let ts = post(&mut admin, &channel, "UWEB", "right after hello").await;
        let got = client
            .expect("the message posted right after hello", |v| {
                v["type"] == "message"
            })
            .await;
        assert_eq!(got["ts"], ts.as_str(), "round {round}");
    }
}

async fn gateway_stats(mesh: &channelmesh::Mesh, region: &str) -> Value {
    let addr = mesh.gateways.iter().find(|(r, _)| r == region).unwrap().1;
    reqwest::get(format!("http://{addr}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_gateway_subscribes_each_channel_once_and_lets_go_with_the_last_client() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut clients = Vec::new();
    for i in 0..5 {
        let token = mesh.token(&format!("U{i}"), "T1", &["CSHARED"]).unwrap();
        clients.push(Rtm::connect(&us, &token).await.unwrap());
    }
    let stats = gateway_stats(&mesh, "us-east").await;
    // CSHARED once, T1 once, five user channels.
    assert_eq!(stats["channels"], 7, "{stats}");
    assert_eq!(stats["connections"], 5, "{stats}");
    let mut admin = admin(&mesh).await;
    let ts = post(&mut admin, "CSHARED", "UWEB", "to all five").await;
    for client in &mut clients {
        let got = client
            .expect("the shared message", |v| v["type"] == "message")
            .await;
        assert_eq!(got["ts"], ts.as_str());
    }
    drop(clients);
    eventually("the gateway drops every channel", || async {
        let stats = gateway_stats(&mesh, "us-east").await;
        (stats["channels"] == 0 && stats["connections"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn join_and_leave_change_live_connections() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut ann = Rtm::connect(&us, &mesh.token("UANN", "T1", &[]).unwrap())
        .await
        .unwrap();
    let mut bob = Rtm::connect(&eu, &mesh.token("UBOB", "T1", &["CNEW"]).unwrap())
        .await
        .unwrap();
    let mut admin = admin(&mesh).await;

    // ann is not in CNEW yet.
    ann.send(json!({"id": 1, "type": "message", "channel": "CNEW", "text": "let me in"}))
        .await;
    let refused = ann.expect("not_in_channel", |v| v["reply_to"] == 1).await;
    assert_eq!(refused["ok"], false);
    assert_eq!(refused["error"]["msg"], "not_in_channel");

    admin
        .join_channel(JoinChannelRequest {
            user: "UANN".into(),
            channel: "CNEW".into(),
            team: "T1".into(),
        })
        .await
        .unwrap();
    let joined = ann
        .expect("channel_joined", |v| v["type"] == "channel_joined")
        .await;
    assert_eq!(joined["channel"]["id"], "CNEW");
    let member = bob
        .expect("member_joined_channel", |v| {
            v["type"] == "member_joined_channel"
        })
        .await;
    assert_eq!(member["user"], "UANN");
    assert_eq!(member["channel"], "CNEW");

    let ts = post(&mut admin, "CNEW", "UBOB", "welcome ann").await;
    let got = ann
        .expect("a message in the joined channel", |v| {
            v["type"] == "message"
        })
        .await;
    assert_eq!(got["ts"], ts.as_str());
    ann.send(json!({"id": 2, "type": "message", "channel": "CNEW", "text": "thanks"}))
        .await;
    assert_eq!(ann.expect("ack", |v| v["reply_to"] == 2).await["ok"], true);

    admin
        .leave_channel(LeaveChannelRequest {
            user: "UANN".into(),
            channel: "CNEW".into(),
        })
        .await
        .unwrap();
    let left = ann
        .expect("channel_left", |v| v["type"] == "channel_left")
        .await;
    assert_eq!(left["channel"], "CNEW");
    bob.expect("member_left_channel", |v| {
        v["type"] == "member_left_channel" && v["user"] == "UANN"
    })
    .await;
    post(&mut admin, "CNEW", "UBOB", "ann is gone").await;
    bob.expect("bob still receives", |v| v["text"] == "ann is gone")
        .await;
    ann.send(json!({"id": 3, "type": "message", "channel": "CNEW", "text": "again?"}))
        .await;
    assert_eq!(
        ann.expect("not_in_channel", |v| v["reply_to"] == 3).await["error"]["msg"],
        "not_in_channel"
    );
    ann.expect_none(
        Duration::from_millis(300),
        "a message of a left channel",
        |v| v["text"] == "ann is gone",
    )
    .await;
}

#[tokio::test]
async fn history_pages_forward_and_leaves_out_typing() {
    let mesh = mesh().await;
    let mut admin = admin(&mesh).await;
    let mut ts = Vec::new();
    for i in 0..5 {
        ts.push(post(&mut admin, "CHIST", "UWEB", &format!("m{i}")).await);
    }
    let raw = json!({"type": "reaction_added", "user": "U1", "reaction": "tada", "item": {"type": "message", "channel": "CHIST", "ts": ts[0]}});
    let event_ts = admin
        .publish_event(PublishEventRequest {
            channel: "CHIST".into(),
            event_json: raw.to_string(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ts;
    assert!(
        ts.windows(2).all(|w| w[0] < w[1]) && ts[4] < event_ts,
        "ts increase: {ts:?} {event_ts}"
    );

    let page = admin
        .history(HistoryRequest {
            channel: "CHIST".into(),
            since_ts: ts[1].clone(),
            limit: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<&str> = page.events.iter().map(|e| e.ts.as_str()).collect();
    assert_eq!(got, [ts[2].as_str(), ts[3].as_str()]);
    assert!(page.has_more);
    assert_eq!(page.oldest_ts, ts[0]);
    let event: Value = serde_json::from_str(&page.events[0].event_json).unwrap();
    assert_eq!(event["text"], "m2");
    let rest = admin
        .history(HistoryRequest {
            channel: "CHIST".into(),
            since_ts: ts[3].clone(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.events.len(), 2);
    assert!(!rest.has_more);
    let reaction: Value = serde_json::from_str(&rest.events[1].event_json).unwrap();
    assert_eq!(reaction["reaction"], "tada");
    assert_eq!(reaction["event_ts"], event_ts.as_str());
}

#[tokio::test]
async fn a_channel_server_refuses_slots_it_does_not_own() {
    let mesh = mesh().await;
    let channel = ChannelId::new("CFENCE").unwrap();
    let (ring, _) = crate::support::ring_at(mesh.ring_manager).await;
    let owner = ring.owner_of(&channel).unwrap().id.clone();
    let (_, other) = mesh
        .channel_servers
        .iter()
        .find(|(id, _)| *id != owner)
        .unwrap();
    // As the mesh's own publishers do: with the process's certificate (gateway, admin).
    let connection = mesh_transport::endpoint(&other.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ChannelServerClient::new(connection);
    let event = ChannelEvent {
        channel,
        ts: None,
        body: EventBody::Message {
            user: UserId::new("U1").unwrap(),
            text: "x".into(),
            team: None,
        },
        origin: None,
    };
    let status = client
        .publish(PublishRequest {
            epoch: ring.epoch(),
            event: Some(event_to_proto(&event)),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().starts_with("wrong_owner"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn auth_test_answers_a_distinct_bot_id() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let reply = web_api(
        &us,
        "auth.test",
        Some(&mesh.token("UANN", "T1", &[]).unwrap()),
    )
    .await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["user_id"], "UANN");
    assert_eq!(reply["team_id"], "T1");
    assert_eq!(reply["bot_id"], "BUANN");
}

#[tokio::test]
async fn a_joining_connection_gets_every_message_since_the_join_once_in_order() {
    // Posts keep coming while JoinChannel runs: some land after the join's ts but before the
    // gateway hears of the join (only history has those), some race the new upstream
    // subscription, some come after. The client must get each one after the join exactly once,
    // in ts order, right after channel_joined.
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut ann = Rtm::connect(&us, &mesh.token("UANN", "T1", &[]).unwrap())
        .await
        .unwrap();
    let mut admin = admin(&mesh).await;
    for round in 0..5 {
        let channel = format!("CJOIN{round}");
        let stop = tokio_util::sync::CancellationToken::new();
        let poster = {
            let (mut admin, channel, stop) = (admin.clone(), channel.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.is_cancelled() {
                    post(&mut admin, &channel, "UBOB", &format!("m{i}")).await;
                    i += 1;
                }
                for _ in 0..3 {
                    post(&mut admin, &channel, "UBOB", &format!("m{i}")).await;
                    i += 1;
                }
            })
        };
        let join_ts = admin
            .join_channel(JoinChannelRequest {
                user: "UANN".into(),
                channel: channel.clone(),
                team: "T1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .ts;
        stop.cancel();
        poster.await.unwrap();
        let history = admin
            .history(HistoryRequest {
                channel: channel.clone(),
                since_ts: join_ts.clone(),
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        let want: Vec<String> = history
            .events
            .iter()
            .filter(|e| e.event_json.contains(r#""type":"message""#))
            .map(|e| e.ts.clone())
            .collect();
        assert!(want.len() >= 3, "round {round}: {want:?}");
        let joined = ann.next().await.unwrap();
        assert_eq!(joined["type"], "channel_joined", "round {round}: {joined}");
        assert_eq!(joined["channel"]["id"], channel.as_str());
        let mut got = Vec::new();
        while got.len() < want.len() {
            let frame = ann
                .expect("a message of the joined channel", |v| {
                    v["type"] == "message"
                })
                .await;
            got.push(frame["ts"].as_str().unwrap().to_string());
        }
        assert_eq!(got, want, "round {round}");
    }
    ann.expect_none(Duration::from_millis(300), "a duplicate", |v| {
        v["type"] == "message"
    })
    .await;
}

/// A router's publish stream runs on the caller's task tracker and ends with the caller's
/// token, even while the router (which holds the stream's sender) lives on.
#[tokio::test]
async fn a_routers_publish_stream_is_tracked_and_ends_with_its_token() {
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;
    let mesh = mesh().await;
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let source = ring_client::RingSource::Direct(format!("http://{}", mesh.ring_manager));
    let ring = ring_client::RingWatcher::spawn(source, &tracker, cancel.clone());
    let router = channel_client::router::ChannelRouter::new(ring, &tracker, cancel.clone());
    assert_eq!(tracker.len(), 1, "the ring watcher");
    let event = ChannelEvent {
        channel: ChannelId::new("CROUTER").unwrap(),
        ts: None,
        body: EventBody::Message {
            user: UserId::new("UROUTER").unwrap(),
            text: "through the stream".into(),
            team: None,
        },
        origin: None,
    };
    let ts = eventually("a publish through the router", || async {
        router.publish(&event).await.ok()
    })
    .await;
    assert!(ts.is_some(), "a message gets a ts");
    assert_eq!(tracker.len(), 2, "the ring watcher and the publish stream");
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(30), tracker.wait())
        .await
        .expect("the publish stream ended with its token");
    drop(router);
}

#[tokio::test]
async fn a_gateway_shutting_down_says_goodbye_then_closes_with_1001() {
    let mut mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut ann = Rtm::connect(&us, &mesh.token("UANN", "T1", &["CGEN"]).unwrap())
        .await
        .unwrap();
    ann.send(json!({"id": 1, "type": "ping"})).await;
    ann.expect("pong", |v| v["type"] == "pong").await;

    // The client reads while the mesh shuts down: its goodbye, then the close frame.
    let client = tokio::spawn(async move {
        let goodbye = ann.expect("goodbye", |v| v["type"] == "goodbye").await;
        (goodbye, ann.closed().await)
    });
    mesh.shutdown(Duration::from_secs(10)).await;
    let (goodbye, code) = client.await.unwrap();
    assert_eq!(goodbye, json!({"type": "goodbye"}));
    assert_eq!(code, Some(1001), "the close says the server is going away");
}
