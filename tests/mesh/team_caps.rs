//! Concurrent connections per team and per user, counted across every gateway of every region
//! (issue: hardening).

use channelmesh::{Mesh, MeshConfig};
use gateway::limits::Limits;
use serde_json::{Value, json};

use crate::support::{Rtm, eventually, mesh_with, web_api};

/// `rtm.connect` until the answer is final: a `ratelimited` (the team's presence server is
/// still warming up, say) is retried, as a client honouring `Retry-After` would.
async fn connect_final(base: &str, token: &str) -> Value {
    eventually("rtm.connect to stop answering ratelimited", || async {
        let reply = web_api(base, "rtm.connect", Some(token)).await;
        (reply["error"] != json!("ratelimited")).then_some(reply)
    })
    .await
}

async fn capped_mesh(team: u32, user: u32) -> Mesh {
    let mut config = MeshConfig::ephemeral();
    config.limits = Limits {
        team_connections: team,
        user_connections: user,
        ..Limits::default()
    };
    mesh_with(config).await
}

// Multi-threaded: on one thread, 501 clients at once starve the in-process mesh's heartbeats on
// a loaded machine, until the ring manager declares its nodes down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_501_connects_across_two_regions_admits_exactly_500() {
    let mesh = capped_mesh(500, 0).await;
    let regions = [
        mesh.rtm_base_url("us-east").unwrap(),
        mesh.rtm_base_url("eu-west").unwrap(),
    ];
    let calls = (0..501).map(|i| {
        let base = regions[i % 2].clone();
        let token = mesh.token(&format!("U{i}"), "T1", &[]).unwrap();
        async move { connect_final(&base, &token).await }
    });
    let replies = futures::future::join_all(calls).await;
    let admitted: Vec<&Value> = replies.iter().filter(|r| r["ok"] == json!(true)).collect();
    let refused = replies
        .iter()
        .filter(|r| **r == json!({"ok": false, "error": "too_many_connections"}))
        .count();
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &replies {
        *outcomes.entry(r["error"].to_string()).or_default() += 1;
    }
    eprintln!("outcomes: {outcomes:?}");
    assert_eq!(admitted.len(), 500, "admitted");
    assert_eq!(refused, 1, "refused with too_many_connections");

    // Another team is not affected.
    let other = mesh.token("UOTHER", "T2", &[]).unwrap();
    assert_eq!(connect_final(&regions[1], &other).await["ok"], json!(true));

    // A connection that ends gives its place back: use one connect URL, close it, and a new
    // user of the team gets in.
    let url = admitted[0]["url"].as_str().unwrap();
    let mut client = Rtm::open(url).await.unwrap();
    client.expect("hello", |v| v["type"] == "hello").await;
    drop(client);
    let newcomer = mesh.token("UNEW", "T1", &[]).unwrap();
    eventually("a place freed by the closed connection", || async {
        let reply = connect_final(&regions[0], &newcomer).await;
        (reply["ok"] == json!(true)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_user_past_their_cap_is_refused_on_any_gateway() {
    let mesh = capped_mesh(0, 2).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let token = mesh.token("U1", "T1", &[]).unwrap();
    let mut held = Vec::new();
    for base in [&us, &eu] {
        let reply = connect_final(base, &token).await;
        assert_eq!(reply["ok"], json!(true), "{reply}");
        let mut client = Rtm::open(reply["url"].as_str().unwrap()).await.unwrap();
        client.expect("hello", |v| v["type"] == "hello").await;
        held.push(client);
    }
    assert_eq!(
        connect_final(&us, &token).await,
        json!({"ok": false, "error": "too_many_connections"})
    );
    let someone_else = mesh.token("U2", "T1", &[]).unwrap();
    assert_eq!(connect_final(&eu, &someone_else).await["ok"], json!(true));
    // One of U1's connections closes: U1 may connect again.
    held.pop();
    eventually("U1's place to free up", || async {
        let reply = connect_final(&us, &token).await;
        (reply["ok"] == json!(true)).then_some(())
    })
    .await;
}
