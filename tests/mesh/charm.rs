//! CHARM: the ring manager replaces dead channel servers, drains, replaces and adds nodes, and
//! nothing acknowledged is lost while slots move (in-process; the SIGKILL tests are in
//! `processes`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mesh_core::{ChannelId, Ring, SLOT_COUNT, Slot};
use mesh_proto::admin::HistoryRequest;
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use mesh_proto::ring::{GetRingRequest, Member, NodeRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::support::{Admin, Rtm, admin, eventually, mesh, post};

/// The ring and its members, as `ctl ring` sees them.
async fn ring(mesh: &channelmesh::Mesh) -> (Ring, Vec<Member>) {
    let mut client = rm(mesh).await;
    let proto = client
        .get_ring(GetRingRequest {})
        .await
        .unwrap()
        .into_inner();
    let members = proto.members.clone();
    (
        ring_manager::convert::ring_from_proto(proto).unwrap(),
        members,
    )
}

async fn rm(mesh: &channelmesh::Mesh) -> RingManagerClient<Channel> {
    RingManagerClient::connect(format!("http://{}", mesh.ring_manager))
        .await
        .unwrap()
}

fn state_of<'a>(members: &'a [Member], id: &str) -> &'a str {
    members
        .iter()
        .find(|m| m.id == id)
        .map_or("absent", |m| m.state.as_str())
}

/// For each slot: (owner before, owner after), for the slots whose owner changed.
fn moves(before: &Ring, after: &Ring) -> Vec<(Slot, String, String)> {
    (0..SLOT_COUNT as Slot)
        .filter_map(|s| {
            let (a, b) = (
                before.owner(s)?.id.to_string(),
                after.owner(s)?.id.to_string(),
            );
            (a != b).then_some((s, a, b))
        })
        .collect()
}

/// An acknowledged post: its text, its ts, and when the ack came back.
type Acked = (String, String, Instant);

/// Posts to `channel` every few milliseconds until `stop`; returns the acked posts and how many
/// posts failed.
fn poster(
    admin: &Admin,
    channel: &str,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(Vec<Acked>, usize)> {
    let (mut admin, channel) = (admin.clone(), channel.to_string());
    tokio::spawn(async move {
        let (mut acked, mut failed) = (Vec::new(), 0);
        let mut i = 0;
        while !stop.is_cancelled() {
            let text = format!("p{i}");
            let request = mesh_proto::admin::PostMessageRequest {
                channel: channel.clone(),
                user: "UPOSTER".into(),
                text: text.clone(),
                team: String::new(),
            };
            match admin.post_message(request).await {
                Ok(reply) => acked.push((text, reply.into_inner().ts, Instant::now())),
                Err(status) => {
                    eprintln!("post {text} failed: {status}");
                    failed += 1;
                }
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (acked, failed)
    })
}

/// Reads messages until every ts in `want` arrived; checks ts order and no duplicates.
async fn receive_all(client: &mut Rtm, want: &[Acked]) {
    let want_ts: HashSet<&str> = want.iter().map(|(_, ts, _)| ts.as_str()).collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut last = String::new();
    while !want_ts.iter().all(|ts| seen.contains(*ts)) {
        let frame = client
            .expect("the next message", |v| {
                v["type"] == "message" && v["user"] == "UPOSTER"
            })
            .await;
        let ts = frame["ts"].as_str().unwrap().to_string();
        assert!(ts > last, "out of order: {ts} after {last}");
        assert!(seen.insert(ts.clone()), "duplicate {ts}");
        last = ts;
    }
}

#[tokio::test]
async fn a_dead_channel_server_is_replaced_by_the_standby_and_delivery_resumes() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let channel = "CFAILOVER";
    let mut client = Rtm::connect(&us, &mesh.token("UREADER", "T1", &[channel]).unwrap())
        .await
        .unwrap();
    let admin = admin(&mesh).await;
    let (before, _) = ring(&mesh).await;
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();

    let stop = CancellationToken::new();
    let posting = poster(&admin, channel, stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(mesh.stop_channel_server(&victim));
    let after = eventually("the standby takes over", || async {
        let (after, members) = ring(&mesh).await;
        (after.epoch() > before.epoch() && state_of(&members, "cs-4") == "active").then_some(after)
    })
    .await;
    let replaced_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let (acked, failed) = posting.await.unwrap();
    assert_eq!(
        failed, 0,
        "posts must be retried across the failover, not failed"
    );

    // Exactly the dead node's slots moved, all onto the standby.
    let moved = moves(&before, &after);
    assert_eq!(
        moved.len(),
        before.slots_owned(&mesh_core::NodeId::new(&victim).unwrap())
    );
    assert!(
        moved
            .iter()
            .all(|(_, from, to)| *from == victim && to == "cs-4"),
        "{:?}",
        &moved[..3]
    );
    let (_, members) = ring(&mesh).await;
    assert_eq!(state_of(&members, &victim), "down");

    // Every post acked after the replacement reaches the client, once, in order. (Posts the
    // dead node acked but had not yet sent on died with its memory.)
    let after_replacement: Vec<Acked> = acked
        .into_iter()
        .filter(|(_, _, at)| *at > replaced_at)
        .collect();
    assert!(!after_replacement.is_empty());
    receive_all(&mut client, &after_replacement).await;
}

#[tokio::test]
async fn a_drained_node_hands_over_its_channels_and_loses_nothing() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let channel = "CDRAIN";
    let mut client = Rtm::connect(&us, &mesh.token("UREADER", "T1", &[channel]).unwrap())
        .await
        .unwrap();
    let mut admin = admin(&mesh).await;
    let first = post(&mut admin, channel, "UPOSTER", "before the drain").await;
    let (before, _) = ring(&mesh).await;
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();

    let stop = CancellationToken::new();
    let posting = poster(&admin, channel, stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let drained = rm(&mesh)
        .await
        .drain_node(NodeRequest {
            node_id: victim.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let after = ring_manager::convert::ring_from_proto(drained).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (acked, failed) = posting.await.unwrap();
    assert_eq!(failed, 0);

    let moved = moves(&before, &after);
    assert_eq!(
        moved.len(),
        before.slots_owned(&mesh_core::NodeId::new(&victim).unwrap())
    );
    assert!(moved.iter().all(|(_, from, _)| *from == victim));
    assert_eq!(
        after.slots_owned(&mesh_core::NodeId::new(&victim).unwrap()),
        0
    );

    let mut all = vec![(
        "before the drain".to_string(),
        first.clone(),
        Instant::now(),
    )];
    all.extend(acked.iter().cloned());
    receive_all(&mut client, &all).await;

    // The history moved with the channel: the new owner still has the first message.
    let history = admin
        .history(HistoryRequest {
            channel: channel.into(),
            since_ts: String::new(),
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history.events.first().map(|e| e.ts.as_str()),
        Some(first.as_str())
    );
    assert_eq!(
        history.events.len(),
        acked.len() + 1,
        "history holds every post exactly once"
    );
    eventually("the drained node becomes a standby", || async {
        let (_, members) = ring(&mesh).await;
        (state_of(&members, &victim) == "standby").then_some(())
    })
    .await;
}

#[tokio::test]
async fn replace_node_hands_its_slots_and_history_to_the_standby() {
    let mesh = mesh().await;
    let channel = "CREPLACE";
    let mut admin = admin(&mesh).await;
    let first = post(&mut admin, channel, "UPOSTER", "kept").await;
    let (before, _) = ring(&mesh).await;
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();
    let replaced = rm(&mesh)
        .await
        .replace_node(NodeRequest {
            node_id: victim.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let after = ring_manager::convert::ring_from_proto(replaced).unwrap();
    let moved = moves(&before, &after);
    assert!(!moved.is_empty());
    assert!(
        moved
            .iter()
            .all(|(_, from, to)| *from == victim && to == "cs-4")
    );
    let second = post(&mut admin, channel, "UPOSTER", "after").await;
    assert!(second > first);
    let history = admin
        .history(HistoryRequest {
            channel: channel.into(),
            since_ts: String::new(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let ts: Vec<&str> = history.events.iter().map(|e| e.ts.as_str()).collect();
    assert_eq!(ts, [first.as_str(), second.as_str()]);
}

#[tokio::test]
async fn adding_a_standby_moves_a_fair_share_onto_it_only() {
    let mesh = mesh().await;
    let (before, _) = ring(&mesh).await;
    let added = rm(&mesh)
        .await
        .add_node(NodeRequest {
            node_id: "cs-4".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let after = ring_manager::convert::ring_from_proto(added).unwrap();
    let moved = moves(&before, &after);
    assert!(moved.iter().all(|(_, _, to)| to == "cs-4"));
    assert!(
        moved.len() == SLOT_COUNT / 4 || moved.len() == SLOT_COUNT / 4 + 1,
        "{}",
        moved.len()
    );
    let refused = rm(&mesh)
        .await
        .add_node(NodeRequest {
            node_id: "cs-4".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn with_no_standby_a_dead_nodes_slots_spread_over_the_survivors() {
    let mesh = mesh().await;
    // The standby replaces the first death; the second has none left.
    let (ring0, _) = ring(&mesh).await;
    assert!(mesh.stop_channel_server("cs-1"));
    let ring1 = eventually("cs-1 replaced", || async {
        let (r, _) = ring(&mesh).await;
        (r.epoch() > ring0.epoch()).then_some(r)
    })
    .await;
    assert!(mesh.stop_channel_server("cs-2"));
    let ring2 = eventually("cs-2's slots spread", || async {
        let (r, _) = ring(&mesh).await;
        (r.epoch() > ring1.epoch()).then_some(r)
    })
    .await;
    let moved = moves(&ring1, &ring2);
    assert!(moved.iter().all(|(_, from, _)| from == "cs-2"));
    let receivers: HashSet<&str> = moved.iter().map(|(_, _, to)| to.as_str()).collect();
    assert_eq!(receivers, HashSet::from(["cs-3", "cs-4"]));
    let mut admin = admin(&mesh).await;
    post(&mut admin, "CANY", "U1", "still working").await;
}
