//! Resume: a client that reconnects with cursors gets what it missed, in order, before live
//! events, with no duplicates and no gaps — or a `history_gap` event when history no longer
//! reaches back that far.

use std::time::Instant;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::{Rtm, admin, mesh, post, poster, receive_all, web_api};

fn is_post(v: &Value) -> bool {
    v["type"] == "message" && v["user"] == "UPOSTER"
}

#[tokio::test]
async fn a_client_that_reconnects_with_a_cursor_gets_everything_it_missed_once_in_order() {
    let mesh = mesh().await;
    let channel = "CRESUME";
    let token = mesh.token("UREADER", "T1", &[channel]).unwrap();
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let admin = admin(&mesh).await;

    // Posts keep coming throughout.
    let stop = CancellationToken::new();
    let posts = poster(&admin, channel, stop.clone());
    let mut first = Rtm::connect(&us, &token).await.unwrap();
    let mut cursor = String::new();
    for _ in 0..5 {
        let v = first.expect("a message", is_post).await;
        cursor = v["ts"].as_str().unwrap().to_string();
    }
    first.ws.close(None).await.unwrap();
    drop(first);
    // Away while posts are acknowledged, then back in the other region with the cursor.
    posts.acked_since(Instant::now(), 5).await;
    let mut second = Rtm::connect_with(&eu, &token, &format!("?cursors={channel}:{cursor}"))
        .await
        .unwrap();
    // And posts keep coming after the resume.
    posts.acked_since(Instant::now(), 5).await;
    stop.cancel();
    let (acked, failed) = posts.finish().await;
    assert_eq!(failed, 0);
    let missed_and_after: Vec<_> = acked
        .into_iter()
        .filter(|(_, ts, _)| ts.as_str() > cursor.as_str())
        .collect();
    assert!(!missed_and_after.is_empty());
    // Every post after the cursor, once each, in ts order, and nothing at or before it.
    let next = second.expect("the first resumed event", is_post).await;
    assert!(next["ts"].as_str().unwrap() > cursor.as_str(), "{next}");
    assert_eq!(
        next["ts"],
        missed_and_after[0].1.as_str(),
        "no gap at the start"
    );
    receive_all(&mut second, &missed_and_after[1..]).await;
}

#[tokio::test]
async fn a_cursor_older_than_history_gets_a_history_gap_event() {
    let mesh = mesh().await;
    let channel = "CGAP";
    let token = mesh.token("UREADER", "T1", &[channel]).unwrap();
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut admin = admin(&mesh).await;
    let cursor = post(&mut admin, channel, "UPOSTER", "the last one seen").await;
    // More than a channel's history holds (100 events) arrive while the client is away.
    let mut tss = Vec::new();
    for i in 0..150 {
        tss.push(post(&mut admin, channel, "UPOSTER", &format!("missed {i}")).await);
    }
    let mut client = Rtm::connect_with(&us, &token, &format!("?cursors={channel}:{cursor}"))
        .await
        .unwrap();
    let gap = client
        .expect("the gap event", |v| {
            v["type"] == "history_gap" || is_post(v)
        })
        .await;
    assert_eq!(gap["type"], "history_gap", "the gap comes first: {gap}");
    assert_eq!(gap["channel"], channel);
    assert_eq!(gap["cursor"], cursor.as_str());
    assert_eq!(
        gap["oldest_ts"],
        tss[50].as_str(),
        "the oldest event still held"
    );
    // Then what is still held, in order.
    for ts in &tss[50..] {
        let v = client.expect("a retained event", is_post).await;
        assert_eq!(v["ts"], ts.as_str());
    }
}

#[tokio::test]
async fn cursors_work_on_the_websocket_url_and_bad_ones_are_refused() {
    let mesh = mesh().await;
    let channel = "CURL";
    let token = mesh.token("UREADER", "T1", &[channel]).unwrap();
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut admin = admin(&mesh).await;
    let cursor = post(&mut admin, channel, "UPOSTER", "seen").await;
    let missed = post(&mut admin, channel, "UPOSTER", "missed").await;

    let reply = web_api(&us, "rtm.connect", Some(&token)).await;
    let url = reply["url"].as_str().unwrap();
    let mut client = Rtm::open(&format!("{url}?cursors={channel}:{cursor}"))
        .await
        .unwrap();
    client.expect("hello", |v| v["type"] == "hello").await;
    let v = client.expect("the missed message", is_post).await;
    assert_eq!(v["ts"], missed.as_str());
    assert_eq!(v["text"], "missed");

    let reply = web_api(&us, "rtm.connect?cursors=CURL:yesterday", Some(&token)).await;
    assert_eq!(reply["error"], "invalid_cursors", "{reply}");
}

#[tokio::test]
async fn history_lost_with_a_dead_channel_server_is_reported_as_a_gap() {
    // Without replication: a dead owner's history dies with it (with replication its follower
    // holds it: tests/mesh/replication.rs).
    let mesh = crate::support::mesh_with(channelmesh::MeshConfig {
        replication_factor: 1,
        ..channelmesh::MeshConfig::ephemeral()
    })
    .await;
    let channel = "CLOST";
    let token = mesh.token("UREADER", "T1", &[channel]).unwrap();
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut admin = admin(&mesh).await;
    let cursor = post(&mut admin, channel, "UPOSTER", "seen").await;
    post(
        &mut admin,
        channel,
        "UPOSTER",
        "missed, then lost with its server",
    )
    .await;
    let (ring, _) = crate::support::ring_at(mesh.ring_manager).await;
    let owner = ring
        .owner_of(&mesh_core::ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();
    assert!(mesh.stop_channel_server(&owner));
    crate::support::eventually("a new owner", || async {
        let (r, _) = crate::support::ring_at(mesh.ring_manager).await;
        (r.owner_of(&mesh_core::ChannelId::new(channel).unwrap())?
            .id
            .as_str()
            != owner)
            .then_some(())
    })
    .await;
    let mut client = Rtm::connect_with(&us, &token, &format!("?cursors={channel}:{cursor}"))
        .await
        .unwrap();
    let gap = client
        .expect("the gap event", |v| v["type"] == "history_gap")
        .await;
    assert_eq!(gap["channel"], channel);
    // Live delivery goes on after it.
    let ts = post(&mut admin, channel, "UPOSTER", "after the failover").await;
    let v = client.expect("a live message", is_post).await;
    assert_eq!(v["ts"], ts.as_str());
}
