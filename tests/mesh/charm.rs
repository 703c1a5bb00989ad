//! CHARM: the ring manager replaces dead channel servers, drains, replaces and adds nodes, and
//! nothing acknowledged is lost while slots move (in-process; the SIGKILL tests are in
//! `processes`).

use std::collections::HashSet;
use std::time::Instant;

use mesh_core::{ChannelId, SLOT_COUNT};
use mesh_proto::admin::HistoryRequest;
use mesh_proto::ring::NodeRequest;
use tokio_util::sync::CancellationToken;

use crate::support::{
    Acked, Rtm, admin, eventually, mesh, moves, post, poster, receive_all, ring_at, rm_at, state_of,
};

#[tokio::test]
async fn a_dead_channel_server_is_replaced_by_the_standby_and_delivery_resumes() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let channel = "CFAILOVER";
    let mut client = Rtm::connect(&us, &mesh.token("UREADER", "T1", &[channel]).unwrap())
        .await
        .unwrap();
    let admin = admin(&mesh).await;
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
    let after = eventually("the standby takes over", || async {
        let (after, members) = ring_at(mesh.ring_manager).await;
        (after.epoch() > before.epoch() && state_of(&members, "cs-4") == "active").then_some(after)
    })
    .await;
    let replaced_at = Instant::now();
    // Posts keep being acknowledged after the replacement.
    posting.acked_since(replaced_at, 10).await;
    stop.cancel();
    let (acked, failed) = posting.finish().await;
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
    let (_, members) = ring_at(mesh.ring_manager).await;
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
    let mesh = mesh().await;
    let channel = "CREPLACE";
    let mut admin = admin(&mesh).await;
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
    let (before, _) = ring_at(mesh.ring_manager).await;
    let added = rm_at(mesh.ring_manager)
        .await
        .add_node(NodeRequest {
            node_id: "cs-4".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let after = ring_client::convert::ring_from_proto(added).unwrap();
    let moved = moves(&before, &after);
    assert!(moved.iter().all(|(_, _, to)| to == "cs-4"));
    assert!(
        moved.len() == SLOT_COUNT / 4 || moved.len() == SLOT_COUNT / 4 + 1,
        "{}",
        moved.len()
    );
    let refused = rm_at(mesh.ring_manager)
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
