//! CHARM: the ring manager replaces dead channel servers, drains, replaces and adds nodes, and
//! nothing acknowledged is lost while slots move (in-process; the SIGKILL tests are in
//! `processes`). The mesh replicates (factor 2) unless a test is about the unreplicated case,
//! where a standby takes over exactly a node's slots: those run with factor 1.

use std::collections::HashSet;
use std::time::Instant;

use mesh_core::{ChannelId, SLOT_COUNT};
use mesh_proto::admin::HistoryRequest;
use mesh_proto::ring::NodeRequest;
use tokio_util::sync::CancellationToken;

use channelmesh::{Mesh, MeshConfig};

use crate::support::{
    Acked, Rtm, admin, eventually, mesh, mesh_with, moves, post, poster, receive_all, ring_at,
    rm_at, state_of,
};

/// A mesh without replication (factor 1): a standby takes over a node's slots.
async fn unreplicated() -> Mesh {
    mesh_with(MeshConfig {
        replication_factor: 1,
        ..MeshConfig::ephemeral()
    })
    .await
}

/// Whether every slot that moved from `before` to `after` went to its first follower in
/// `before`.
fn to_first_followers(
    before: &mesh_core::Ring,
    moved: &[(mesh_core::Slot, String, String)],
) -> bool {
    moved.iter().all(|(slot, _, to)| {
        before.followers(*slot).next().map(|f| f.id.as_str()) == Some(to.as_str())
    })
}

/// A failover under load: the rings before and after, the stopped owner, and a reader of the
/// channel with the posts acknowledged once the failover was over.
struct Failover {
    before: mesh_core::Ring,
    after: mesh_core::Ring,
    victim: String,
    client: Rtm,
    acked_after: Vec<Acked>,
}

/// Posts to `channel` with a reader connected, stops its owner while posts flow, and waits
/// until `over(ring, members, victim)` says the failover is over (the ring then is `after`);
/// then for 10 more acknowledged posts. No post may fail: they are retried across it.
async fn stop_the_owner_while_posting(
    mesh: &Mesh,
    channel: &str,
    over: impl Fn(&mesh_core::Ring, &[mesh_proto::ring::Member], &str) -> bool,
) -> Failover {
    let us = mesh.rtm_base_url("us-east").unwrap();
    let client = Rtm::connect(&us, &mesh.token("UREADER", "T1", &[channel]).unwrap())
        .await
        .unwrap();
    let admin = admin(mesh).await;
    let (before, _) = ring_at(mesh.ring_manager).await;
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();

    let stop = CancellationToken::new();
    let started = Instant::now();
    let posting = poster(&admin, channel, stop.clone());
    // Posts are flowing when the owner dies.
    posting.acked_since(started, 3).await;
    assert!(mesh.stop_channel_server(&victim));
    let after = eventually("the failover", || async {
        let (after, members) = ring_at(mesh.ring_manager).await;
        (after.epoch() > before.epoch() && over(&after, &members, &victim)).then_some(after)
    })
    .await;
    let over_at = Instant::now();
    // Posts keep being acknowledged after the failover.
    posting.acked_since(over_at, 10).await;
    stop.cancel();
    let (acked, failed) = posting.finish().await;
    assert_eq!(
        failed, 0,
        "posts must be retried across the failover, not failed"
    );
    let acked_after: Vec<Acked> = acked
        .into_iter()
        .filter(|(_, _, at)| *at > over_at)
        .collect();
    assert!(!acked_after.is_empty());
    Failover {
        before,
        after,
        victim,
        client,
        acked_after,
    }
}

#[tokio::test]
async fn a_dead_channel_server_is_replaced_by_the_standby_and_delivery_resumes() {
    let mesh = unreplicated().await;
    let Failover {
        before,
        after,
        victim,
        mut client,
        acked_after,
    } = stop_the_owner_while_posting(&mesh, "CFAILOVER", |_, members, _| {
        state_of(members, "cs-4") == "active"
    })
    .await;

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
    let (_, members) = ring_at(mesh.ring_manager).await;
    assert_eq!(state_of(&members, &victim), "down");

    // Every post acked after the replacement reaches the client, once, in order. (Posts the
    // dead node acked but had not yet sent on died with its memory.)
    receive_all(&mut client, &acked_after).await;
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
    let (before, _) = ring_at(mesh.ring_manager).await;
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();

    let stop = CancellationToken::new();
    let started = Instant::now();
    let posting = poster(&admin, channel, stop.clone());
    // Posts are flowing when the drain starts.
    posting.acked_since(started, 3).await;
    let drained = rm_at(mesh.ring_manager)
        .await
        .drain_node(NodeRequest {
            node_id: victim.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let after = ring_client::convert::ring_from_proto(drained).unwrap();
    // Posts keep being acknowledged after the drain.
    posting.acked_since(Instant::now(), 10).await;
    stop.cancel();
    let (acked, failed) = posting.finish().await;
    assert_eq!(failed, 0);

    let moved = moves(&before, &after);
    assert_eq!(
        moved.len(),
        before.slots_owned(&mesh_core::NodeId::new(&victim).unwrap())
    );
    assert!(moved.iter().all(|(_, from, _)| *from == victim));
    assert!(
        to_first_followers(&before, &moved),
        "replicated: each slot goes to its follower"
    );
    assert!(after.handoffs().iter().all(|h| h.from.as_str() == victim));
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
        let (_, members) = ring_at(mesh.ring_manager).await;
        (state_of(&members, &victim) == "standby").then_some(())
    })
    .await;
}

#[tokio::test]
async fn replace_node_hands_its_slots_and_history_to_the_standby() {
    let mesh = unreplicated().await;
    let replaced = replace_the_owner_of(&mesh, "CREPLACE").await;
    let moved = moves(&replaced.before, &replaced.after);
    assert!(!moved.is_empty());
    assert!(
        moved
            .iter()
            .all(|(_, from, to)| *from == replaced.victim && to == "cs-4")
    );
}

/// A replacement of a channel's owner: the ring before and after, and who was replaced.
struct Replaced {
    before: mesh_core::Ring,
    after: mesh_core::Ring,
    victim: String,
}

/// Posts to `channel`, replaces its owner (`ctl replace-node`), then checks the channel's
/// history holds the post from before and one from after, in order (the history moved with the
/// slot).
async fn replace_the_owner_of(mesh: &Mesh, channel: &str) -> Replaced {
    let mut admin = admin(mesh).await;
    let first = post(&mut admin, channel, "UPOSTER", "kept").await;
    let (before, _) = ring_at(mesh.ring_manager).await;
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();
    let replaced = rm_at(mesh.ring_manager)
        .await
        .replace_node(NodeRequest {
            node_id: victim.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let after = ring_client::convert::ring_from_proto(replaced).unwrap();
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
    Replaced {
        before,
        after,
        victim,
    }
}

/// `ctl add-node cs-4` (the standby): the rings before and after; adding it again is refused.
async fn add_the_standby(mesh: &Mesh) -> (mesh_core::Ring, mesh_core::Ring) {
    let (before, _) = ring_at(mesh.ring_manager).await;
    let add = || async {
        rm_at(mesh.ring_manager)
            .await
            .add_node(NodeRequest {
                node_id: "cs-4".into(),
            })
            .await
    };
    let added = add().await.unwrap().into_inner();
    let after = ring_client::convert::ring_from_proto(added).unwrap();
    let refused = add().await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    (before, after)
}

#[tokio::test]
async fn adding_a_standby_moves_a_fair_share_onto_it_only() {
    let mesh = unreplicated().await;
    let (before, after) = add_the_standby(&mesh).await;
    let moved = moves(&before, &after);
    assert!(moved.iter().all(|(_, _, to)| to == "cs-4"));
    assert!(
        moved.len() == SLOT_COUNT / 4 || moved.len() == SLOT_COUNT / 4 + 1,
        "{}",
        moved.len()
    );
}

#[tokio::test]
async fn with_no_standby_a_dead_nodes_slots_spread_over_the_survivors() {
    let mesh = unreplicated().await;
    // The standby replaces the first death; the second has none left.
    let (ring0, _) = ring_at(mesh.ring_manager).await;
    assert!(mesh.stop_channel_server("cs-1"));
    let ring1 = eventually("cs-1 replaced", || async {
        let (r, _) = ring_at(mesh.ring_manager).await;
        (r.epoch() > ring0.epoch()).then_some(r)
    })
    .await;
    assert!(mesh.stop_channel_server("cs-2"));
    let ring2 = eventually("cs-2's slots spread", || async {
        let (r, _) = ring_at(mesh.ring_manager).await;
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

/// The console's record of the epoch after `epoch`: its cause and its moves (from, to, slots).
async fn epoch_after(mesh: &Mesh, epoch: u64) -> (String, Vec<(String, String, u64)>) {
    let url = format!("http://{}/api/state", mesh.console);
    let state: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let record = state["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["epoch"] == epoch + 1)
        .unwrap()
        .clone();
    let moves = record["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let name = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
            (
                name(&m["from"]),
                name(&m["to"]),
                m["slots"].as_u64().unwrap(),
            )
        })
        .collect();
    (record["cause"].as_str().unwrap().to_string(), moves)
}

#[tokio::test]
async fn a_dead_channel_servers_slots_go_to_their_followers_and_delivery_resumes() {
    let mesh = mesh().await;
    let Failover {
        before,
        victim,
        mut client,
        acked_after,
        ..
    } = stop_the_owner_while_posting(&mesh, "CPROMOTE", |_, members, victim| {
        state_of(members, victim) == "down"
    })
    .await;
    assert!(before.is_replicated());

    // The failure's epoch (later ones may follow, once the standby's copies are filled): each
    // of the victim's slots went to its first follower, none to the standby, which joined.
    let (cause, moved) = epoch_after(&mesh, before.epoch()).await;
    assert!(
        cause.contains("its slots promoted to their followers; standby cs-4 joins as a follower"),
        "{cause}"
    );
    let victim_id = mesh_core::NodeId::new(&victim).unwrap();
    let mut expected: Vec<(String, String, u64)> = Vec::new();
    for slot in 0..SLOT_COUNT as mesh_core::Slot {
        if before.owns(&victim_id, slot) {
            let heir = before.followers(slot).next().unwrap().id.to_string();
            match expected.iter_mut().find(|(_, to, _)| *to == heir) {
                Some(entry) => entry.2 += 1,
                None => expected.push((victim.clone(), heir, 1)),
            }
        }
    }
    let mut moved = moved;
    moved.sort();
    expected.sort();
    assert_eq!(moved, expected, "each slot to its first follower");
    assert_eq!(expected.len(), 2, "spread over both survivors");
    let (halves, total) = (expected[0].2, expected[0].2 + expected[1].2);
    assert!(halves.abs_diff(total - halves) <= 1, "evenly: {expected:?}");
    let (ring, members) = ring_at(mesh.ring_manager).await;
    assert!(ring.slots_followed(&mesh_core::NodeId::new("cs-4").unwrap()) > 0);
    assert!(matches!(state_of(&members, "cs-4"), "joining" | "active"));

    receive_all(&mut client, &acked_after).await;
}

#[tokio::test]
async fn replace_node_on_a_replicated_ring_promotes_followers_and_hands_over_the_history() {
    let mesh = mesh().await;
    // The history arrives with the handoff: checked by the helper.
    let Replaced {
        before,
        after,
        victim,
    } = replace_the_owner_of(&mesh, "CREPLACE").await;
    let moved = moves(&before, &after);
    let victim_id = mesh_core::NodeId::new(&victim).unwrap();
    assert_eq!(moved.len(), before.slots_owned(&victim_id));
    assert!(moved.iter().all(|(_, from, _)| *from == victim));
    assert!(to_first_followers(&before, &moved));
    let mut heirs: Vec<&str> = moved.iter().map(|(_, _, to)| to.as_str()).collect();
    heirs.sort();
    heirs.dedup();
    let mut named: Vec<(&str, &str)> = after
        .handoffs()
        .iter()
        .map(|h| (h.from.as_str(), h.to.as_str()))
        .collect();
    named.sort();
    let expected: Vec<(&str, &str)> = heirs.iter().map(|h| (victim.as_str(), *h)).collect();
    assert_eq!(
        named, expected,
        "a handoff from the live old owner to each new owner"
    );
    let standby = mesh_core::NodeId::new("cs-4").unwrap();
    assert_eq!(after.slots_owned(&standby), 0);
    assert!(
        after.slots_followed(&standby) > 0,
        "the standby joins as a follower"
    );
}

#[tokio::test]
async fn adding_a_standby_to_a_replicated_ring_makes_it_a_follower_first() {
    let mesh = mesh().await;
    let (before, after) = add_the_standby(&mesh).await;
    assert_eq!(after.epoch(), before.epoch() + 1);
    assert!(moves(&before, &after).is_empty(), "no primary moves yet");
    assert!(after.handoffs().is_empty());
    let standby = mesh_core::NodeId::new("cs-4").unwrap();
    assert!(after.nodes().iter().any(|n| n.id == standby));
    assert!(
        after.slots_followed(&standby) >= SLOT_COUNT / 4,
        "{}",
        after.slots_followed(&standby)
    );
    // The mesh still serves with a node that owns nothing on its ring.
    let mut admin = admin(&mesh).await;
    post(&mut admin, "CANY", "U1", "still working").await;
}
