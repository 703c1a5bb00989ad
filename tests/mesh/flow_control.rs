//! Per-connection flow control (issue 19): a client with lifted frame limits publishes
//! thousands of messages back to back without waiting for acks; every one is acked, each
//! channel's get their ts in the order sent, and every receiver gets them all in that order,
//! whether the connection's publish credit is the default or so small that the gateway must
//! stop reading the socket again and again.

use std::collections::HashMap;

use channelmesh::MeshConfig;
use futures::{SinkExt, StreamExt};
use gateway::limits::Limits;
use mesh_core::Ts;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Rtm, WAIT, mesh_with};

const CHANNELS: [&str; 2] = ["CFLOW1", "CFLOW2"];

/// The publisher's text for message `i`: padded so that the tiny credit holds a few only.
fn text(i: usize) -> String {
    format!("m{i:05}-{}", "x".repeat(100))
}

/// The index a message's text carries.
fn index_of(text: &str) -> usize {
    text[1..6].parse().unwrap()
}

/// Boots a mesh whose connections have `publish_bytes` of credit and no frame rate limit,
/// sends `messages` from one connection without waiting, alternating between its two
/// channels, and checks acks and deliveries.
async fn flood_is_acked_and_delivered_in_order(publish_bytes: usize, messages: usize) {
    let mut config = MeshConfig::ephemeral();
    config.limits = Limits {
        frames_per_sec: 0,
        publish_bytes,
        ..Limits::default()
    };
    let mesh = mesh_with(config).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let token = mesh.token("UBOT", "T1", &CHANNELS).unwrap();
    let publisher = Rtm::connect(&us, &token).await.unwrap();
    // One receiver per channel on the publisher's gateway, and one in both on the other
    // region's.
    let mut receivers = Vec::new();
    for (base, user, channels) in [
        (&us, "URECV1", &CHANNELS[..1]),
        (&us, "URECV2", &CHANNELS[1..]),
        (&eu, "URECV3", &CHANNELS[..]),
    ] {
        let token = mesh.token(user, "T1", channels).unwrap();
        let rtm = Rtm::connect(base, &token).await.unwrap();
        let want = (0..messages)
            .filter(|i| channels.contains(&CHANNELS[i % 2]))
            .count();
        receivers.push(tokio::spawn(receive(rtm, want)));
    }

    // The acks are read as they come, beside the sends, as a real client would.
    let (mut sink, mut stream) = publisher.ws.split();
    let acks = tokio::spawn(async move {
        let mut acks: HashMap<usize, Value> = HashMap::new();
        while acks.len() < messages {
            let frame = tokio::time::timeout(WAIT, stream.next()).await;
            let Ok(Some(Ok(Message::Text(text)))) = frame else {
                match frame {
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("{} acks, then {other:?}", acks.len()),
                }
            };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            let Some(id) = v["reply_to"].as_u64() else {
                continue;
            };
            let id = usize::try_from(id).unwrap();
            assert!(acks.insert(id, v).is_none(), "message {id} was acked twice");
        }
        acks
    });
    for i in 0..messages {
        let frame =
            json!({"id": i, "type": "message", "channel": CHANNELS[i % 2], "text": text(i)});
        sink.send(Message::Text(frame.to_string().into()))
            .await
            .expect("the gateway takes the frame");
    }
    let acks = acks.await.unwrap();

    // Every message acked, and each channel's ts increase in the order sent.
    let mut last: HashMap<&str, Ts> = HashMap::new();
    for i in 0..messages {
        let ack = &acks[&i];
        assert_eq!(ack["ok"], json!(true), "message {i}: {ack}");
        let ts = Ts::parse(ack["ts"].as_str().unwrap()).unwrap();
        if let Some(before) = last.insert(CHANNELS[i % 2], ts) {
            assert!(before < ts, "message {i}'s ts {ts} is not after {before}");
        }
    }
    // Every receiver got every message of its channels, once, in the order sent, with the ts
    // of its ack.
    for receiver in receivers {
        let got = receiver.await.unwrap();
        let mut next: HashMap<&str, usize> = HashMap::new();
        for (channel, i, ts) in got {
            let channel = CHANNELS.iter().find(|c| **c == channel).unwrap();
            let want = next
                .entry(channel)
                .or_insert(CHANNELS.iter().position(|c| c == channel).unwrap());
            assert_eq!(
                i, *want,
                "in {channel}, message {i} came where {want} was due"
            );
            *want += 2;
            assert_eq!(
                acks[&i]["ts"].as_str(),
                Some(ts.as_str()),
                "message {i}'s ts"
            );
        }
    }
}

/// The first `want` messages `rtm` receives: channel, index and ts.
async fn receive(mut rtm: Rtm, want: usize) -> Vec<(String, usize, String)> {
    let mut got = Vec::with_capacity(want);
    while got.len() < want {
        let v = rtm
            .next()
            .await
            .unwrap_or_else(|e| panic!("after {} messages: {e}", got.len()));
        let text = v["text"].as_str().unwrap_or_default();
        if v["type"] != "message" || !text.starts_with('m') {
            continue;
        }
        got.push((
            v["channel"].as_str().unwrap().to_string(),
            index_of(text),
            v["ts"].as_str().unwrap().to_string(),
        ));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_connection_is_acked_and_delivered_in_order() {
    // All of them in flight at once (the whole flood is under the default credit): the mesh,
    // in one process of a test, takes them all together.
    flood_is_acked_and_delivered_in_order(Limits::default().publish_bytes, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_a_tiny_credit_waits_on_the_socket_and_loses_nothing() {
    // A credit of about sixteen messages: the gateway stops reading the socket again and again.
    flood_is_acked_and_delivered_in_order(2_048, 2_000).await;
}
