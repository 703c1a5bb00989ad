//! Attacks by clients on one another, each through the real interfaces of a real mesh: a client
//! that tries to join a channel by directive, a directive published on a shared channel, a
//! client that posts to its team's (or its own user's) channel, and a team reading another
//! team's presence through `users.getPresence`, `presence_sub` and `presence_query`.

use std::time::Duration;

use gateway::limits::Limits;
use mesh_proto::admin::{HistoryRequest, JoinChannelRequest, LeaveChannelRequest};
use serde_json::{Value, json};

use crate::support::{Admin, Rtm, admin, eventually, mesh, mesh_with, post, web_api};
use crate::support::{gateway_metrics, metric_sum};

/// Long enough for a frame to have arrived if one were coming (a negative check).
const QUIET: Duration = Duration::from_millis(700);

/// Sends `frame` (which has `"id": id`) and returns the reply to it.
async fn ask(client: &mut Rtm, id: i64, frame: Value) -> Value {
    client.send(frame).await;
    client.expect("the reply", |v| v["reply_to"] == id).await
}

/// The error code of a reply (`None`: it is not an error).
fn error_code(reply: &Value) -> Option<u64> {
    (reply["ok"] == false).then(|| reply["error"]["code"].as_u64())?
}

/// A message frame to `channel`.
fn message(id: i64, channel: &str, text: &str) -> Value {
    json!({"id": id, "type": "message", "channel": channel, "text": text})
}

/// Texts of the messages `channel`'s history holds.
async fn history_texts(admin: &mut Admin, channel: &str) -> Vec<String> {
    let history = admin
        .history(HistoryRequest {
            channel: channel.into(),
            since_ts: String::new(),
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    history
        .events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.event_json).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_client_cannot_join_or_leave_a_channel_by_sending_a_directive_shaped_frame() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut mallory = Rtm::connect(&us, &mesh.token("UMAL", "T1", &["CPUBLIC"]).unwrap())
        .await
        .unwrap();
    let mut member = Rtm::connect(&us, &mesh.token("UMEM", "T1", &["CSECRET"]).unwrap())
        .await
        .unwrap();
    // Every shape the server's own membership frames take, sent by the client: unsupported.
    let forged = [
        json!({"id": 1, "type": "channel_joined", "channel": {"id": "CSECRET", "is_member": true}}),
        json!({"id": 2, "type": "channel_joined", "channel": "CSECRET"}),
        json!({"id": 3, "type": "member_joined_channel", "user": "UMAL", "channel": "CSECRET"}),
        json!({"id": 4, "type": "channel_left", "channel": "CPUBLIC"}),
        json!({"id": 5, "type": "group_joined", "channel": {"id": "CSECRET"}}),
    ];
    for (id, frame) in (1..).zip(forged) {
        let reply = ask(&mut mallory, id, frame).await;
        assert_eq!(error_code(&reply), Some(3), "{reply}");
    }
    // A directive's JSON as the text of a message on the user's own channel: refused too (the
    // user's channel carries the server's events only), and it would be a message anyway.
    let directive = r#"{"type":"channel_joined","channel":{"id":"CSECRET"}}"#;
    let reply = ask(&mut mallory, 6, message(6, "UMAL", directive)).await;
    assert_eq!(error_code(&reply), Some(12), "{reply}");

    // The web app posts to the private channel: its member gets it...
    let mut admin = admin(&mesh).await;
    post(&mut admin, "CSECRET", "UBOSS", "the secret plans").await;
    member
        .expect("the member gets the post", |v| {
            v["text"] == "the secret plans"
        })
        .await;
    // ...and Mallory's connection is still not in it, and still in the channel it had: a post
    // of hers to each says so (the connection answers from its own membership).
    let reply = ask(&mut mallory, 7, message(7, "CSECRET", "let me in")).await;
    assert_eq!(reply["error"]["msg"], "not_in_channel", "{reply}");
    let reply = ask(&mut mallory, 8, message(8, "CPUBLIC", "still here")).await;
    assert_eq!(reply["ok"], true, "{reply}");
    mallory
        .expect_none(QUIET, "anything of the private channel", |v| {
            v["channel"] == "CSECRET" || v["channel"]["id"] == "CSECRET"
        })
        .await;
}

#[tokio::test]
async fn a_directive_published_on_a_shared_channel_joins_and_removes_nobody() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut mallory = Rtm::connect(&us, &mesh.token("UMAL", "T1", &["CGENERAL"]).unwrap())
        .await
        .unwrap();
    let mut member = Rtm::connect(
        &us,
        &mesh.token("UMEM", "T1", &["CGENERAL", "CSECRET"]).unwrap(),
    )
    .await
    .unwrap();
    let mut admin = admin(&mesh).await;
    // User, team and channel ids share one namespace: `JoinChannel` for "user" T1 publishes
    // the join directive on the team's channel, for "user" CGENERAL on #general. Every
    // connection of the team, or of #general, receives it.
    for on in ["T1", "CGENERAL"] {
        admin
            .join_channel(JoinChannelRequest {
                user: on.into(),
                channel: "CSECRET".into(),
                team: String::new(),
            })
            .await
            .unwrap();
        admin
            .leave_channel(LeaveChannelRequest {
                user: on.into(),
                channel: "CSECRET".into(),
            })
            .await
            .unwrap();
    }
    // Four directives, each reaching both connections: each connection ignored each one.
    eventually("the directives ignored by both connections", || async {
        let text = gateway_metrics(&us).await;
        (metric_sum(&text, "channelmesh_gateway_directives_ignored_total", &[]) >= 8.0)
            .then_some(())
    })
    .await;
    // Mallory did not join; the member did not leave.
    let reply = ask(&mut mallory, 1, message(1, "CSECRET", "am I in?")).await;
    assert_eq!(reply["error"]["msg"], "not_in_channel", "{reply}");
    let reply = ask(&mut member, 2, message(2, "CSECRET", "still in")).await;
    assert_eq!(reply["ok"], true, "{reply}");
    for client in [&mut mallory, &mut member] {
        client
            .expect_none(QUIET, "a join or leave", |v| {
                v["type"] == "channel_joined" || v["type"] == "channel_left"
            })
            .await;
    }
    // The directive on the user's own channel is the one that counts.
    admin
        .join_channel(JoinChannelRequest {
            user: "UMAL".into(),
            channel: "CSECRET".into(),
            team: "T1".into(),
        })
        .await
        .unwrap();
    let joined = mallory
        .expect("the join by the web app", |v| v["type"] == "channel_joined")
        .await;
    assert_eq!(joined["channel"]["id"], "CSECRET", "{joined}");
    let reply = ask(&mut mallory, 3, message(3, "CSECRET", "hello")).await;
    assert_eq!(reply["ok"], true, "{reply}");
}

#[tokio::test]
async fn a_client_post_to_its_team_channel_is_refused_and_reaches_nobody() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut mallory = Rtm::connect(&us, &mesh.token("UMAL", "T1", &[]).unwrap())
        .await
        .unwrap();
    let mut teammate = Rtm::connect(&eu, &mesh.token("UTEAM", "T1", &[]).unwrap())
        .await
        .unwrap();
    let reply = ask(&mut mallory, 1, message(1, "T1", "fake announcement")).await;
    assert_eq!(error_code(&reply), Some(12), "{reply}");
    assert_eq!(reply["error"]["msg"], "restricted_action_read_only_channel");
    let typing = json!({"id": 2, "type": "typing", "channel": "T1"});
    assert_eq!(error_code(&ask(&mut mallory, 2, typing).await), Some(12));
    let reply = ask(&mut mallory, 3, message(3, "UMAL", "a note to myself")).await;
    assert_eq!(error_code(&reply), Some(12), "{reply}");
    // Nothing was published: neither channel's history holds it...
    let mut admin = admin(&mesh).await;
    assert!(history_texts(&mut admin, "T1").await.is_empty());
    assert!(history_texts(&mut admin, "UMAL").await.is_empty());
    // ...no teammate saw it, and the refusals are counted.
    teammate
        .expect_none(QUIET, "a client's post on the team channel", |v| {
            v["channel"] == "T1"
        })
        .await;
    let text = gateway_metrics(&us).await;
    let refused = "channelmesh_gateway_posts_refused_total";
    assert_eq!(metric_sum(&text, refused, &[]), 3.0, "{text}");
    // The team channel still carries the server's events to the whole team.
    post(&mut admin, "T1", "UADMIN", "all hands at noon").await;
    for client in [&mut mallory, &mut teammate] {
        client
            .expect("the web app's post to the team", |v| {
                v["channel"] == "T1" && v["text"] == "all hands at noon"
            })
            .await;
    }
}

#[tokio::test]
async fn a_gateway_may_allow_posts_to_the_team_channel_but_never_to_the_users() {
    let mut config = channelmesh::MeshConfig::ephemeral();
    config.limits = Limits {
        team_channel_posts: true,
        ..Limits::default()
    };
    let mesh = mesh_with(config).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let mut poster = Rtm::connect(&us, &mesh.token("UPOST", "T1", &[]).unwrap())
        .await
        .unwrap();
    let mut teammate = Rtm::connect(&eu, &mesh.token("UTEAM", "T1", &[]).unwrap())
        .await
        .unwrap();
    let reply = ask(&mut poster, 1, message(1, "T1", "lunch?")).await;
    assert_eq!(reply["ok"], true, "{reply}");
    teammate
        .expect("the post to the team", |v| {
            v["channel"] == "T1" && v["text"] == "lunch?"
        })
        .await;
    let reply = ask(&mut poster, 2, message(2, "UPOST", "a note to myself")).await;
    assert_eq!(error_code(&reply), Some(12), "{reply}");
}

/// A `presence_change` naming `user`, in either form.
fn about(user: &'static str) -> impl Fn(&Value) -> bool {
    move |v| {
        v["type"] == "presence_change"
            && (v["user"] == user
                || v["users"]
                    .as_array()
                    .is_some_and(|users| users.iter().any(|u| u == user)))
    }
}

/// `users.getPresence?user=USER` with `token`: the whole answer.
async fn get_presence(base: &str, user: &str, token: &str) -> Value {
    web_api(base, &format!("users.getPresence?user={user}"), Some(token)).await
}

#[tokio::test]
async fn a_team_cannot_read_another_teams_presence_by_any_path() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    // Alice and Bob of T1; Zed of T2, online on the other region; UNEVER never connected.
    let alice_token = mesh.token("UALICE", "T1", &[]).unwrap();
    let mut alice = Rtm::connect(&us, &alice_token).await.unwrap();
    let mut bob = Rtm::connect(&eu, &mesh.token("UBOB", "T1", &[]).unwrap())
        .await
        .unwrap();
    let zed_token = mesh.token("UZED", "T2", &[]).unwrap();
    let mut zed = Rtm::connect(&eu, &zed_token).await.unwrap();
    // Online users are known to the presence servers once their reports arrived: wait until
    // each team sees its own (so that what follows is not a race with the reports).
    eventually("Bob reported online", || async {
        let reply = get_presence(&us, "UBOB", &alice_token).await;
        (reply["presence"] == "active").then_some(())
    })
    .await;
    eventually("Zed reported online", || async {
        let reply = get_presence(&eu, "UZED", &zed_token).await;
        (reply["presence"] == "active").then_some(())
    })
    .await;

    // 1. users.getPresence: another team's user reads exactly as a user who does not exist.
    let other_team = get_presence(&us, "UZED", &alice_token).await;
    assert_eq!(other_team, json!({"ok": false, "error": "user_not_found"}));
    assert_eq!(get_presence(&us, "UNEVER", &alice_token).await, other_team);
    assert_eq!(
        get_presence(&us, "UBOB", &alice_token).await,
        json!({"ok": true, "presence": "active"})
    );
    let own = web_api(&us, "users.getPresence", Some(&alice_token)).await;
    assert_eq!(own, json!({"ok": true, "presence": "active"}));

    // 2. presence_query: one answer for all the ids, in the order asked; Zed and UNEVER are
    // left out, so the first frame of it is Bob's.
    let query = json!({"id": 1, "type": "presence_query", "ids": ["UZED", "UNEVER", "UBOB"]});
    assert_eq!(ask(&mut alice, 1, query).await["ok"], true);
    let first = alice
        .expect("the query's answer", |v| v["type"] == "presence_change")
        .await;
    assert_eq!(
        first,
        json!({"type": "presence_change", "user": "UBOB", "presence": "active"})
    );

    // 3. presence_sub: Bob's presence comes, Zed's never, neither now nor when Zed leaves.
    let sub = json!({"id": 2, "type": "presence_sub", "ids": ["UZED", "UNEVER", "UBOB"]});
    assert_eq!(ask(&mut alice, 2, sub).await["ok"], true);
    alice
        .expect("Bob's presence", |v| {
            about("UBOB")(v) && v["presence"] == "active"
        })
        .await;
    zed.ws.close(None).await.unwrap();
    bob.ws.close(None).await.unwrap();
    // Zed went first, so Zed's away was published before Bob's (on whichever presence server):
    // by the time Alice hears Bob's, she would have heard Zed's. A short window after covers
    // two servers whose ticks are not in step.
    alice
        .expect("Bob away", |v| about("UBOB")(v) && v["presence"] == "away")
        .await;
    alice
        .expect_none(QUIET, "another team's presence", |v| {
            about("UZED")(v) || about("UNEVER")(v)
        })
        .await;
    // Withheld and counted: getPresence twice, the query twice, the subscription at least once.
    let text = gateway_metrics(&us).await;
    let withheld = metric_sum(&text, "channelmesh_gateway_presence_withheld_total", &[]);
    assert!(withheld >= 5.0, "{withheld}: {text}");

    // The other way round: a T2 client does not see Alice.
    let mut zed = Rtm::connect(&us, &zed_token).await.unwrap();
    assert_eq!(
        get_presence(&us, "UALICE", &zed_token).await,
        json!({"ok": false, "error": "user_not_found"})
    );
    let query = json!({"id": 3, "type": "presence_query", "ids": ["UALICE", "UZED"]});
    assert_eq!(ask(&mut zed, 3, query).await["ok"], true);
    let first = zed
        .expect("the query's answer", |v| v["type"] == "presence_change")
        .await;
    assert_eq!(
        first,
        json!({"type": "presence_change", "user": "UZED", "presence": "active"})
    );

    // The web app's own call is not limited to a team.
    let mut admin = admin(&mesh).await;
    let reply = admin
        .get_presence(mesh_proto::admin::GetPresenceRequest {
            users: vec!["UZED".into(), "UALICE".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, &str)> = reply
        .users
        .iter()
        .map(|p| (p.user.as_str(), p.presence.as_str()))
        .collect();
    assert_eq!(got, [("UZED", "active"), ("UALICE", "active")]);
}

#[tokio::test]
async fn a_teammate_seen_online_reads_away_and_one_never_seen_reads_as_nobody() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let alice_token = mesh.token("UALICE", "T1", &[]).unwrap();
    let mut alice = Rtm::connect(&us, &alice_token).await.unwrap();
    // Never online: the presence servers cannot tell Bob's team, so Alice reads Bob as she
    // reads a user of another team.
    assert_eq!(
        get_presence(&us, "UBOB", &alice_token).await,
        json!({"ok": false, "error": "user_not_found"})
    );
    // Bob comes and goes; nobody watches him.
    let bob = Rtm::connect(&us, &mesh.token("UBOB", "T1", &[]).unwrap())
        .await
        .unwrap();
    eventually("Bob active", || async {
        let reply = get_presence(&us, "UBOB", &alice_token).await;
        (reply["presence"] == "active").then_some(())
    })
    .await;
    drop(bob);
    // Offline, watched by nobody: no longer tracked, but his team is remembered.
    eventually("Bob away", || async {
        let reply = get_presence(&us, "UBOB", &alice_token).await;
        (reply == json!({"ok": true, "presence": "away"})).then_some(())
    })
    .await;
    // A watch answers at once with his presence.
    let sub = json!({"id": 1, "type": "presence_sub", "ids": ["UBOB"]});
    assert_eq!(ask(&mut alice, 1, sub).await["ok"], true);
    alice
        .expect("Bob away at once", |v| {
            about("UBOB")(v) && v["presence"] == "away"
        })
        .await;
}
