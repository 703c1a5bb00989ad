//! Presence: who is online, across devices, regions, a dead gateway and a dead presence
//! server, through the RTM frames, `users.setPresence` and the admin API.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Rtm, admin, mesh, presence_of, web_api};

fn any_presence_of(user: &'static str) -> impl Fn(&Value) -> bool {
    move |v| presence_of(v, user, "active") || presence_of(v, user, "away")
}

/// Long enough for a change to have arrived if one were coming (a negative check).
const QUIET: Duration = Duration::from_millis(700);

#[tokio::test]
async fn a_watcher_sees_a_user_of_the_other_region_come_and_go_across_devices() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut a = Rtm::connect(&us, &mesh.token("UA", "T1", &[]).unwrap())
        .await
        .unwrap();
    // B was never online: the presence servers do not know B's team, so A hears nothing of B
    // yet (as of a user of another team); the first thing A hears is B coming online.
    a.send(json!({"id": 1, "type": "presence_sub", "ids": ["UB"]}))
        .await;
    a.expect("the reply", |v| v["reply_to"] == 1).await;

    let b_token = mesh.token("UB", "T1", &[]).unwrap();
    let mut b1 = Rtm::connect(&eu, &b_token).await.unwrap();
    let got = a
        .expect("news of B", |v| v["type"] == "presence_change")
        .await;
    assert!(presence_of(&got, "UB", "active"), "B active first: {got}");
    assert_eq!(got["user"], "UB", "one presence_change per user: {got}");

    // A second device, then one of them closes: no change.
    let b2 = Rtm::connect(&us, &b_token).await.unwrap();
    drop(b2);
    // A wrong away would come only after the grace period: wait past it.
    let past_grace = channelmesh::mesh::MeshConfig::ephemeral().presence_grace + QUIET;
    a.expect_none(
        past_grace,
        "a change while B stays online",
        any_presence_of("UB"),
    )
    .await;

    // The last one closes: away, after the grace period.
    let closed = Instant::now();
    b1.ws.close(None).await.unwrap();
    a.expect("B away", |v| presence_of(v, "UB", "away")).await;
    println!(
        "last connection closed -> away after {} ms",
        closed.elapsed().as_millis()
    );

    // A query answers once.
    a.send(json!({"type": "presence_query", "ids": ["UB", "UA"]}))
        .await;
    a.expect("A active on query", |v| presence_of(v, "UA", "active"))
        .await;
}

#[tokio::test]
async fn batch_presence_aware_clients_get_the_users_form() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut a = Rtm::connect_with(
        &us,
        &mesh.token("UA", "T1", &[]).unwrap(),
        "?batch_presence_aware=1",
    )
    .await
    .unwrap();
    let _b = Rtm::connect(&us, &mesh.token("UB", "T1", &[]).unwrap())
        .await
        .unwrap();
    let _c = Rtm::connect(&us, &mesh.token("UC", "T1", &[]).unwrap())
        .await
        .unwrap();
    a.send(json!({"id": 7, "type": "presence_sub", "ids": ["UB", "UC", "UD"]}))
        .await;
    let ok = a.expect("the reply", |v| v["reply_to"] == 7).await;
    assert_eq!(ok["ok"], true);
    let mut active = Vec::new();
    while active.len() < 2 {
        let v = a
            .expect("presence in the batch form", |v| {
                v["type"] == "presence_change" && v["presence"] == "active"
            })
            .await;
        assert!(v.get("user").is_none(), "batch form only: {v}");
        for u in v["users"].as_array().unwrap() {
            active.push(u.as_str().unwrap().to_string());
        }
    }
    active.sort();
    assert_eq!(active, ["UB", "UC"]);
}

#[tokio::test]
async fn users_set_presence_away_overrides_and_auto_restores() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut a = Rtm::connect(&us, &mesh.token("UA", "T1", &[]).unwrap())
        .await
        .unwrap();
    let b_token = mesh.token("UB", "T1", &[]).unwrap();
    let _b = Rtm::connect(&us, &b_token).await.unwrap();
    a.send(json!({"type": "presence_sub", "ids": ["UB"]})).await;
    a.expect("B active", |v| presence_of(v, "UB", "active"))
        .await;

    let reply = web_api(&us, "users.setPresence?presence=away", Some(&b_token)).await;
    assert_eq!(reply["ok"], true, "{reply}");
    a.expect("B away by hand", |v| presence_of(v, "UB", "away"))
        .await;
    let reply = web_api(&us, "users.getPresence?user=UB", Some(&b_token)).await;
    assert_eq!(reply["presence"], "away", "{reply}");
    let reply = web_api(&us, "users.setPresence?presence=auto", Some(&b_token)).await;
    assert_eq!(reply["ok"], true, "{reply}");
    a.expect("B active again", |v| presence_of(v, "UB", "active"))
        .await;
    let reply = web_api(&us, "users.setPresence?presence=busy", Some(&b_token)).await;
    assert_eq!(reply["error"], "invalid_presence", "{reply}");

    // The web app asks through the admin API.
    let mut admin = admin(&mesh).await;
    let reply = admin
        .get_presence(mesh_proto::admin::GetPresenceRequest {
            users: vec!["UB".into(), "UA".into(), "UNOBODY".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(String, String)> = reply
        .users
        .into_iter()
        .map(|p| (p.user, p.presence))
        .collect();
    assert_eq!(
        got,
        [
            ("UB".to_string(), "active".to_string()),
            ("UA".to_string(), "active".to_string()),
            ("UNOBODY".to_string(), "away".to_string())
        ]
    );
    let refused = admin
        .get_presence(mesh_proto::admin::GetPresenceRequest {
            users: vec!["not a user".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn presence_sub_past_the_cap_is_refused() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut a = Rtm::connect(&us, &mesh.token("UA", "T1", &[]).unwrap())
        .await
        .unwrap();
    let ids: Vec<String> = (0..501).map(|i| format!("U{i}")).collect();
    a.send(json!({"id": 3, "type": "presence_sub", "ids": ids}))
        .await;
    let reply = a.expect("the error reply", |v| v["reply_to"] == 3).await;
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["code"], 10);
    assert_eq!(reply["error"]["msg"], "too_many_ids");
    a.send(json!({"id": 4, "type": "presence_sub", "ids": "UB"}))
        .await;
    let reply = a.expect("the error reply", |v| v["reply_to"] == 4).await;
    assert_eq!(reply["error"]["code"], 4);
    // The connection is still usable.
    a.send(json!({"id": 5, "type": "ping"})).await;
    a.expect("pong", |v| v["reply_to"] == 5).await;
}

#[tokio::test]
async fn a_dead_gateway_turns_its_users_away() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut a = Rtm::connect(&us, &mesh.token("UA", "T1", &[]).unwrap())
        .await
        .unwrap();
    let _b = Rtm::connect(&eu, &mesh.token("UB", "T1", &[]).unwrap())
        .await
        .unwrap();
    a.send(json!({"type": "presence_sub", "ids": ["UB"]})).await;
    a.expect("B active", |v| presence_of(v, "UB", "active"))
        .await;
    let stopped = Instant::now();
    assert!(mesh.stop_gateway("eu-west"));
    a.expect("B away once its gateway is gone", |v| {
        presence_of(v, "UB", "away")
    })
    .await;
    println!(
        "gateway stopped -> its user away after {} ms",
        stopped.elapsed().as_millis()
    );
}

#[tokio::test]
async fn a_dead_presence_server_is_rebuilt_from_the_gateways_without_a_storm() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut a = Rtm::connect(&us, &mesh.token("UA", "T1", &[]).unwrap())
        .await
        .unwrap();
    let mut b = Rtm::connect(&eu, &mesh.token("UB", "T1", &[]).unwrap())
        .await
        .unwrap();
    a.send(json!({"type": "presence_sub", "ids": ["UB"]})).await;
    a.expect("B active", |v| presence_of(v, "UB", "active"))
        .await;

    // Kill the presence server that owns B.
    let (ring, _) = crate::support::ring_at(mesh.presence_ring_manager).await;
    let owner = ring
        .owner_of(&mesh_core::ChannelId::new("UB").unwrap())
        .unwrap()
        .id
        .to_string();
    assert!(mesh.stop_presence_server(&owner));
    crate::support::eventually("the standby takes over B", || async {
        let (after, _) = crate::support::ring_at(mesh.presence_ring_manager).await;
        let now = after
            .owner_of(&mesh_core::ChannelId::new("UB").unwrap())?
            .id
            .to_string();
        (now != owner).then_some(())
    })
    .await;
    // Rebuilt from the gateways' reports: A hears no away/active flap...
    a.expect_none(
        QUIET * 2,
        "a presence change while B stayed online",
        any_presence_of("UB"),
    )
    .await;
    // ...and the new owner has the right state, and keeps it current.
    a.send(json!({"type": "presence_query", "ids": ["UB"]}))
        .await;
    a.expect("B still active", |v| presence_of(v, "UB", "active"))
        .await;
    b.ws.close(None).await.unwrap();
    a.expect("B away, from the new owner", |v| {
        presence_of(v, "UB", "away")
    })
    .await;
}

#[tokio::test]
async fn a_gateway_watches_a_user_once_for_all_its_clients() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let gateway = mesh
        .gateways
        .iter()
        .find(|(r, _)| r == "us-east")
        .unwrap()
        .1;
    let stats = || async move {
        reqwest::get(format!("http://{gateway}/stats"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let mut a1 = Rtm::connect(&us, &mesh.token("UA1", "T1", &[]).unwrap())
        .await
        .unwrap();
    let mut a2 = Rtm::connect(&us, &mesh.token("UA2", "T1", &[]).unwrap())
        .await
        .unwrap();
    for a in [&mut a1, &mut a2] {
        a.send(json!({"id": 1, "type": "presence_sub", "ids": ["UB", "UC"]}))
            .await;
        a.expect("the reply", |v| v["reply_to"] == 1).await;
    }
    // Both subscriptions taken (their replies came after): B and C are watched once each.
    let s = stats().await;
    assert_eq!(s["presence"]["watched_users"], 2, "{s}");
    // One client narrows its set; the other still hears about both.
    a1.send(json!({"type": "presence_sub", "ids": ["UC"]}))
        .await;
    let _b = Rtm::connect(&us, &mesh.token("UB", "T1", &[]).unwrap())
        .await
        .unwrap();
    a2.expect("B active for the client still watching", |v| {
        presence_of(v, "UB", "active")
    })
    .await;
    a1.expect_none(
        QUIET,
        "B for a client that stopped watching",
        any_presence_of("UB"),
    )
    .await;
    a2.send(json!({"type": "presence_sub", "ids": []})).await;
    a1.send(json!({"type": "presence_sub", "ids": []})).await;
    crate::support::eventually("no user watched any more", || async {
        let s = stats().await;
        (s["presence"]["watched_users"] == 0).then_some(())
    })
    .await;
}
