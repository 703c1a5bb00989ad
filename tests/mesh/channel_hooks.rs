//! Who is subscribed to each channel, across gateways and regions, as the channel's owner
//! accounts it (the internal `ChannelInfo` and `ListChannels`, called as an admin server), and
//! the channel webhooks it tells from it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use channelmesh::{Mesh, MeshConfig};
use mesh_core::ChannelId;
use mesh_proto::admin::JoinChannelRequest;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_proto::channel::{ChannelInfoRequest, ChannelInfoResponse, ListChannelsRequest};
use mesh_proto::ring::NodeRequest;
use mesh_transport::Role;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::support::{
    Rtm, WebhookReceiver, acting_as, admin, eventually, mesh, mesh_with, post, ring_at, rm_at,
    with_webhooks,
};

/// The channel's owner and the others, with the ring's epoch.
async fn owner_and_others(mesh: &Mesh, channel: &str) -> (SocketAddr, Vec<SocketAddr>, u64) {
    let (ring, _) = ring_at(mesh.ring_manager).await;
    let owner = ring
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .clone();
    let (mut at, mut others) = (None, Vec::new());
    for (id, addr) in &mesh.channel_servers {
        if *id == owner {
            at = Some(*addr);
        } else {
            others.push(*addr);
        }
    }
    (at.unwrap(), others, ring.epoch())
}

/// A channel server's internal API, called as the admin server.
async fn as_admin(addr: SocketAddr) -> ChannelServerClient<Channel> {
    let endpoint =
        mesh_transport::endpoint_with(&addr.to_string(), &acting_as(Role::Admin, "admin")).unwrap();
    ChannelServerClient::new(endpoint.connect().await.unwrap())
}

async fn info(mesh: &Mesh, channel: &str) -> Result<ChannelInfoResponse, tonic::Status> {
    let (owner, _, epoch) = owner_and_others(mesh, channel).await;
    let request = ChannelInfoRequest {
        epoch,
        channel: channel.into(),
    };
    as_admin(owner)
        .await
        .channel_info(request)
        .await
        .map(|r| r.into_inner())
}

/// Per gateway: (gateway, region, subscribers), in gateway order.
fn by_gateway(info: &ChannelInfoResponse) -> Vec<(String, String, u64)> {
    let mut gateways: Vec<_> = info
        .gateways
        .iter()
        .map(|g| (g.gateway.clone(), g.region.clone(), g.subscribers))
        .collect();
    gateways.sort();
    gateways
}

/// ListChannels on every channel server, merged as the admin API does.
async fn list(mesh: &Mesh, prefix: &str, team: &str) -> Vec<(String, u64, u64)> {
    let (ring, _) = ring_at(mesh.ring_manager).await;
    let mut all = Vec::new();
    for (_, addr) in &mesh.channel_servers {
        let request = ListChannelsRequest {
            epoch: ring.epoch(),
            prefix: prefix.into(),
            team: team.into(),
            after: String::new(),
            limit: 0,
        };
        let page = as_admin(*addr)
            .await
            .list_channels(request)
            .await
            .unwrap()
            .into_inner();
        assert!(!page.has_more);
        all.extend(
            page.channels
                .into_iter()
                .map(|c| (c.channel, c.subscribers, c.members)),
        );
    }
    all.sort();
    all
}

#[tokio::test]
async fn the_owner_counts_subscribers_per_gateway_and_region_and_follows_a_user_across_regions() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let (ann, bob) = (
        mesh.token("UANN", "T1", &["CACCT"]).unwrap(),
        mesh.token("UBOB", "T2", &["CACCT"]).unwrap(),
    );
    // Ann twice in us-east, Bob once in eu-west.
    let phone = Rtm::connect(&us, &ann).await.unwrap();
    let laptop = Rtm::connect(&us, &ann).await.unwrap();
    let _bob = Rtm::connect(&eu, &bob).await.unwrap();
    let east = ("us-east-1".to_string(), "us-east".to_string());
    let west = ("eu-west-1".to_string(), "eu-west".to_string());
    eventually("three subscribers of two users in two regions", || async {
        let info = info(&mesh, "CACCT").await.map_err(|s| s.to_string())?;
        let want = vec![
            (west.0.clone(), west.1.clone(), 1),
            (east.0.clone(), east.1.clone(), 2),
        ];
        match (info.subscribers, info.members, by_gateway(&info)) {
            (3, 2, gateways) if gateways == want => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
    // Each user's own channel is one subscriber; ListChannels finds them by prefix and team.
    assert_eq!(
        list(&mesh, "CACCT", "").await,
        [("CACCT".to_string(), 3, 2)]
    );
    assert_eq!(list(&mesh, "CACCT", "T2").await.len(), 1);
    assert!(list(&mesh, "CACCT", "T9").await.is_empty());
    assert_eq!(list(&mesh, "UANN", "").await, [("UANN".to_string(), 2, 1)]);
    // Ann moves to eu-west: us-east lets go, eu-west holds all three.
    drop((phone, laptop));
    let _moved = Rtm::connect(&eu, &ann).await.unwrap();
    eventually("Ann's connection counted in eu-west only", || async {
        let info = info(&mesh, "CACCT").await.map_err(|s| s.to_string())?;
        match (info.subscribers, info.members, by_gateway(&info)) {
            (2, 2, gateways) if gateways == vec![(west.0.clone(), west.1.clone(), 2)] => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
    // Only the owner answers; another channel server names it.
    let (_, others, epoch) = owner_and_others(&mesh, "CACCT").await;
    let refusal = as_admin(others[0])
        .await
        .channel_info(ChannelInfoRequest {
            epoch,
            channel: "CACCT".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refusal.code(), tonic::Code::FailedPrecondition);
    assert!(refusal.message().starts_with("wrong_owner"), "{refusal:?}");
    // A gateway may not ask.
    let owner = owner_and_others(&mesh, "CACCT").await.0;
    let endpoint =
        mesh_transport::endpoint_with(&owner.to_string(), &acting_as(Role::Gateway, "us-east-1"))
            .unwrap();
    let denied = ChannelServerClient::new(endpoint.connect().await.unwrap())
        .channel_info(ChannelInfoRequest {
            epoch,
            channel: "CACCT".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
}

/// The secret the mesh signs webhooks with, and the receiver checks.
const SECRET: &str = "channel-hooks-test-secret";

/// A mesh (us-east and eu-west) whose channel servers send webhooks to `receiver`, with the
/// vacate grace `grace`.
async fn hooked_mesh(receiver: &WebhookReceiver, grace: Duration) -> Mesh {
    let config = with_webhooks(MeshConfig::ephemeral(), &[receiver.url()], SECRET);
    mesh_with(MeshConfig {
        vacate_grace: grace,
        ..config
    })
    .await
}

/// The channel events of `channel` the receiver accepted, deduplicated by id (the first
/// delivery kept), in arrival order.
async fn channel_events(receiver: &WebhookReceiver, channel: &str) -> Vec<Value> {
    let mut seen = HashSet::new();
    receiver
        .events()
        .await
        .into_iter()
        .filter(|e| e["channel"] == channel && e["name"] != "presence_changed")
        .filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// Waits until `channel`'s events hold one that `pred` takes; returns them all.
async fn wait_for(
    receiver: &WebhookReceiver,
    channel: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool + Copy,
) -> Vec<Value> {
    eventually(what, || async move {
        let events = channel_events(receiver, channel).await;
        match events.iter().any(pred) {
            true => Ok(events),
            false => Err(format!("{:?}", names(&events))),
        }
    })
    .await
}

/// (name, user) of each event.
fn names(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (field("name"), field("user"))
        })
        .collect()
}

fn is(name: &'static str, user: &'static str) -> impl Fn(&Value) -> bool + Copy {
    move |e: &Value| e["name"] == name && (user.is_empty() || e["user"] == user)
}

/// Every delivery was signed right (the receiver checks each), and events delivered more than
/// once under one id are the same fact.
async fn check_deliveries(receiver: &WebhookReceiver) {
    let received = receiver.received().await;
    assert_eq!(received.bad_signatures, 0);
    assert_eq!(received.bad_bodies, 0);
    let mut by_id: std::collections::HashMap<String, Value> = Default::default();
    for mut event in received.events {
        let object = event.as_object_mut().unwrap();
        for added in ["arrival_ms", "body_time_ms", "request"] {
            object.remove(added);
        }
        let id = event["id"].as_str().unwrap().to_string();
        if let Some(first) = by_id.insert(id.clone(), event.clone()) {
            assert_eq!(first, event, "one id, two facts: {id}");
        }
    }
}

fn pair(name: &str, user: &str) -> (String, String) {
    (name.to_string(), user.to_string())
}

#[tokio::test]
async fn channel_events_tell_occupancy_and_members_once_without_flapping_across_regions() {
    let receiver = WebhookReceiver::start(SECRET).await;
    // Long enough that a reconnect to the other region falls well within it.
    let mesh = hooked_mesh(&receiver, Duration::from_secs(4)).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let ann = mesh.token("UANN", "T1", &["CHOOK"]).unwrap();
    let bob = mesh.token("UBOB", "T1", &["CHOOK"]).unwrap();

    let ann_us = Rtm::connect(&us, &ann).await.unwrap();
    let events = wait_for(&receiver, "CHOOK", "Ann added", is("member_added", "UANN")).await;
    assert_eq!(
        names(&events),
        [pair("channel_occupied", ""), pair("member_added", "UANN")]
    );
    let bob_eu = Rtm::connect(&eu, &bob).await.unwrap();
    wait_for(&receiver, "CHOOK", "Bob added", is("member_added", "UBOB")).await;

    // Ann's connection drops in us-east and comes back in eu-west, within the grace.
    drop(ann_us);
    let ann_eu = Rtm::connect(&eu, &ann).await.unwrap();
    // Bob leaves for good: his removal comes after the grace, and in the channel's order
    // after anything Ann's move would have told.
    drop(bob_eu);
    let events = wait_for(
        &receiver,
        "CHOOK",
        "Bob removed",
        is("member_removed", "UBOB"),
    )
    .await;
    assert_eq!(
        names(&events),
        [
            pair("channel_occupied", ""),
            pair("member_added", "UANN"),
            pair("member_added", "UBOB"),
            pair("member_removed", "UBOB"),
        ],
        "Ann's move across regions told nothing"
    );

    // Ann leaves: her removal, then the channel is vacated.
    drop(ann_eu);
    let events = wait_for(&receiver, "CHOOK", "vacated", is("channel_vacated", "")).await;
    assert_eq!(
        names(&events),
        [
            pair("channel_occupied", ""),
            pair("member_added", "UANN"),
            pair("member_added", "UBOB"),
            pair("member_removed", "UBOB"),
            pair("member_removed", "UANN"),
            pair("channel_vacated", ""),
        ]
    );
    for event in &events {
        assert!(event["time_ms"].as_u64().is_some_and(|t| t > 0), "{event}");
        assert_eq!(event["channel"], "CHOOK");
        if event["name"].as_str().unwrap().starts_with("member_") {
            assert_eq!(event["team"], "T1", "{event}");
        }
    }
    // One id per fact; a membership's removal names the membership its addition did.
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len());
    let since = |e: &Value| {
        e["id"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(since(&events[1]), since(&events[4]));
    assert_eq!(since(&events[0]), since(&events[5]));
    check_deliveries(&receiver).await;
}

#[tokio::test]
async fn a_message_is_told_for_members_who_are_offline_and_never_for_online_ones() {
    let receiver = WebhookReceiver::start(SECRET).await;
    let mesh = hooked_mesh(&receiver, Duration::from_secs(1)).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut admin = admin(&mesh).await;
    // Dave is online in the channel; Carol was joined to it by the web app and never connects.
    let dave = Rtm::connect(&us, &mesh.token("UDAVE", "T1", &["CPUSH"]).unwrap())
        .await
        .unwrap();
    wait_for(
        &receiver,
        "CPUSH",
        "Dave added",
        is("member_added", "UDAVE"),
    )
    .await;
    wait_for(
        &receiver,
        "UDAVE",
        "Dave's own channel",
        is("member_added", "UDAVE"),
    )
    .await;
    admin
        .join_channel(JoinChannelRequest {
            user: "UCAROL".into(),
            channel: "CPUSH".into(),
            team: "T1".into(),
        })
        .await
        .unwrap();
    let first = post(&mut admin, "CPUSH", "USENDER", "first").await;
    let second = post(&mut admin, "CPUSH", "USENDER", "second").await;
    let to_dave = post(&mut admin, "UDAVE", "USENDER", "while online").await;
    let events = wait_for(&receiver, "CPUSH", "the second message told", |e| {
        e["name"] == "user_offline_message" && e["text"] == "second"
    })
    .await;
    // In the channel's order: nothing told for Dave (online) or the sender, both for Carol.
    let told: Vec<(String, String, String)> = events
        .iter()
        .filter(|e| e["name"] == "user_offline_message")
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap().to_string();
            (field("user"), field("ts"), field("text"))
        })
        .collect();
    assert_eq!(
        told,
        [
            ("UCAROL".into(), first.clone(), "first".into()),
            ("UCAROL".into(), second, "second".into()),
        ]
    );
    let carol = events
        .iter()
        .find(|e| e["name"] == "user_offline_message")
        .unwrap();
    assert_eq!(carol["sender"], "USENDER");
    assert_eq!(carol["team"], "T1");
    assert_eq!(carol["channel"], "CPUSH");
    assert!(carol["time_ms"].as_u64().is_some_and(|t| t > 0));

    // A message to Carol's own channel: she has no connection.
    let dm = post(&mut admin, "UCAROL", "USENDER", "direct").await;
    let events = wait_for(&receiver, "UCAROL", "Carol's direct message", |e| {
        e["name"] == "user_offline_message"
    })
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (&events[0]["user"], &events[0]["ts"]),
        (&json!("UCAROL"), &json!(dm))
    );

    // Dave goes offline: once his removal is told (after the message sent while he was
    // online, in his channel's order), messages to him and to CPUSH are told for him too.
    drop(dave);
    wait_for(
        &receiver,
        "UDAVE",
        "Dave removed",
        is("member_removed", "UDAVE"),
    )
    .await;
    wait_for(
        &receiver,
        "CPUSH",
        "Dave removed",
        is("member_removed", "UDAVE"),
    )
    .await;
    let later = post(&mut admin, "UDAVE", "USENDER", "while offline").await;
    let events = wait_for(&receiver, "UDAVE", "Dave's offline message", |e| {
        e["name"] == "user_offline_message"
    })
    .await;
    let told: Vec<&Value> = events
        .iter()
        .filter(|e| e["name"] == "user_offline_message")
        .collect();
    assert_eq!(
        told.len(),
        1,
        "nothing for {to_dave}, sent while he was online"
    );
    assert_eq!(told[0]["ts"], json!(later));
    let third = post(&mut admin, "CPUSH", "USENDER", "third").await;
    let events = wait_for(&receiver, "CPUSH", "the third told to Dave", |e| {
        e["name"] == "user_offline_message" && e["user"] == "UDAVE"
    })
    .await;
    let users: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "user_offline_message" && e["ts"] == json!(third))
        .map(|e| e["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["UCAROL", "UDAVE"]);
    check_deliveries(&receiver).await;
}

/// A mesh sending webhooks with Ann in us-east and Bob in eu-west on `channel`, both told; the
/// channel's owner. The grace (2 s) leaves the gateways time to re-subscribe on a new owner.
struct AnnAndBob {
    receiver: WebhookReceiver,
    mesh: Mesh,
    ann: Rtm,
    bob: Rtm,
    owner: String,
}

async fn ann_and_bob(channel: &'static str) -> AnnAndBob {
    let receiver = WebhookReceiver::start(SECRET).await;
    let mesh = hooked_mesh(&receiver, Duration::from_secs(2)).await;
    let token = |user: &str| mesh.token(user, "T1", &[channel]).unwrap();
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let ann = Rtm::connect(&us, &token("UANN")).await.unwrap();
    let bob = Rtm::connect(&eu, &token("UBOB")).await.unwrap();
    wait_for(&receiver, channel, "Bob added", is("member_added", "UBOB")).await;
    let (ring, _) = ring_at(mesh.ring_manager).await;
    let owner = ring
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();
    AnnAndBob {
        receiver,
        mesh,
        ann,
        bob,
        owner,
    }
}

/// Waits until `channel` is owned by another node than `old`, which counts Ann and Bob (the
/// gateways re-subscribed there).
async fn counted_elsewhere(mesh: &Mesh, channel: &str, old: &str) {
    eventually("a new owner counts Ann and Bob", || async {
        let (ring, _) = ring_at(mesh.ring_manager).await;
        let now = ring.owner_of(&ChannelId::new(channel).unwrap()).unwrap();
        if now.id.as_str() == old {
            return Err("not moved yet".to_string());
        }
        let info = info(mesh, channel).await.map_err(|s| s.to_string())?;
        match (info.subscribers, info.members) {
            (2, 2) => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_channel_that_moves_to_a_new_owner_is_not_announced_again() {
    let AnnAndBob {
        receiver,
        mesh,
        ann: _ann,
        bob,
        owner,
    } = ann_and_bob("CMOVE").await;
    rm_at(mesh.ring_manager)
        .await
        .drain_node(NodeRequest {
            node_id: owner.clone(),
        })
        .await
        .unwrap();
    counted_elsewhere(&mesh, "CMOVE", &owner).await;
    // News after the move comes from the new owner: Carol joins, Bob leaves.
    let us = mesh.rtm_base_url("us-east").unwrap();
    let carol = mesh.token("UCAROL", "T1", &["CMOVE"]).unwrap();
    let _carol = Rtm::connect(&us, &carol).await.unwrap();
    wait_for(
        &receiver,
        "CMOVE",
        "Carol added",
        is("member_added", "UCAROL"),
    )
    .await;
    drop(bob);
    let events = wait_for(
        &receiver,
        "CMOVE",
        "Bob removed",
        is("member_removed", "UBOB"),
    )
    .await;
    assert_eq!(
        names(&events),
        [
            pair("channel_occupied", ""),
            pair("member_added", "UANN"),
            pair("member_added", "UBOB"),
            pair("member_added", "UCAROL"),
            pair("member_removed", "UBOB"),
        ],
        "the move announced nothing again"
    );
    // Nor under the same ids: the new owner took the re-subscriptions in silently (this mesh
    // has no failed delivery, so nothing was delivered twice).
    let raw = receiver.received().await;
    assert_eq!(raw.failed, 0);
    let all: Vec<&Value> = raw
        .events
        .iter()
        .filter(|e| e["channel"] == "CMOVE")
        .collect();
    assert_eq!(all.len(), events.len(), "{all:?}");
    check_deliveries(&receiver).await;
}

#[tokio::test]
async fn a_crashed_owner_says_nothing_again_and_a_dead_gateways_members_leave() {
    let AnnAndBob {
        receiver,
        mesh,
        ann: _ann,
        bob: _bob,
        owner,
    } = ann_and_bob("CGONE").await;
    // The owner crashes: its follower takes the slot, and the gateways re-subscribe there.
    assert!(mesh.stop_channel_server(&owner));
    counted_elsewhere(&mesh, "CGONE", &owner).await;
    // us-east goes away with Ann's connection: she leaves, once the grace ran out.
    assert!(mesh.stop_gateway("us-east"));
    eventually("us-east's subscription gone", || async {
        let info = info(&mesh, "CGONE").await.map_err(|s| s.to_string())?;
        match by_gateway(&info).len() {
            1 => Ok(()),
            _ => Err(format!("{info:?}")),
        }
    })
    .await;
    let events = wait_for(
        &receiver,
        "CGONE",
        "Ann removed",
        is("member_removed", "UANN"),
    )
    .await;
    assert_eq!(
        names(&events),
        [
            pair("channel_occupied", ""),
            pair("member_added", "UANN"),
            pair("member_added", "UBOB"),
            pair("member_removed", "UANN"),
        ]
    );
    let info = info(&mesh, "CGONE").await.unwrap();
    assert_eq!(
        by_gateway(&info),
        [("eu-west-1".to_string(), "eu-west".to_string(), 1)]
    );
    check_deliveries(&receiver).await;
}
