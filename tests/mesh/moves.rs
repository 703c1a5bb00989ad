//! Moves that must lose nothing silently, on real processes (`dev --multi-process`): a drain
//! whose new owner freezes, a handoff that never arrives, and a takeover by a channel server
//! whose clock is behind.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_core::{ChannelId, Ts};
use mesh_proto::admin::HistoryRequest;
use mesh_proto::ring::NodeRequest;
use nix::sys::signal::Signal;

use crate::processes::{ADMIN_TOKEN, BIN, Dev, signal};
use crate::support::{
    Admin, Rtm, admin_at, eventually, eventually_within, metric_sum, post, ring_with, rm_with,
    state_of, try_post,
};

/// Waits for moves that take a warm-up or a node declared down, and a few retries.
const MOVE_WAIT: Duration = Duration::from_secs(40);

/// A stopped process, continued when the test ends however it ends.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        signal(self.0, Signal::SIGCONT);
    }
}

/// A process this test started, killed when the test ends.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The ts of `channel`'s history, once a read succeeds.
async fn history_ts(admin: &Admin, channel: &str) -> Vec<String> {
    eventually("a history read", || async {
        let request = HistoryRequest {
            channel: channel.into(),
            since_ts: String::new(),
            limit: 100,
        };
        let reply = admin.clone().history(request).await.ok()?;
        Some(
            reply
                .into_inner()
                .events
                .into_iter()
                .map(|e| e.ts)
                .collect(),
        )
    })
    .await
}

fn ts(text: &str) -> Ts {
    Ts::parse(text).unwrap()
}

#[tokio::test]
async fn a_drain_whose_new_owner_freezes_keeps_the_history_and_completes_only_once_it_arrived() {
    let dev = Dev::start("moves-frozen-target");
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let (before, members) = ring_with(dev.ring_manager, &dev.operator).await;
    let (drained, frozen) = ("cs-1", "cs-2");
    let owner = |ring: &mesh_core::Ring, channel: &str| {
        let id = ChannelId::new(channel).unwrap();
        ring.owner_of(&id).unwrap().id.to_string()
    };
    // Channels of the drained node, one message each: some move to the node that freezes.
    let channels: Vec<String> = (0..)
        .map(|i| format!("CMOVE{i}"))
        .filter(|c| owner(&before, c) == drained)
        .take(40)
        .collect();
    let mut posted = Vec::new();
    for channel in &channels {
        posted.push(post(&mut admin, channel, "UPOSTER", "kept").await);
    }

    // The new owner freezes as the drain starts: it takes no handoff until declared down.
    let pid = members.iter().find(|m| m.id == frozen).unwrap().pid;
    signal(pid, Signal::SIGSTOP);
    let _thaw = Thaw(pid);
    let ring = rm_with(dev.ring_manager, &dev.operator)
        .await
        .drain_node(NodeRequest {
            node_id: drained.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let after = ring_client::convert::ring_from_proto(ring).unwrap();
    let to_frozen = channels
        .iter()
        .filter(|c| owner(&after, c) == frozen)
        .count();
    assert!(to_frozen > 0, "some channels move to the frozen node");

    // The drain completes only once every moved channel's state reached an owner that took
    // it (the frozen node's slots go to the standby meanwhile): at that moment, no later,
    // every message is in its channel's history.
    eventually_within("the drained node becomes a standby", MOVE_WAIT, || async {
        let (_, members) = ring_with(dev.ring_manager, &dev.operator).await;
        (state_of(&members, drained) == "standby").then_some(())
    })
    .await;
    let mut lost = Vec::new();
    for (channel, ts) in channels.iter().zip(&posted) {
        if !history_ts(&admin, channel).await.contains(ts) {
            lost.push(channel.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} channels ({to_frozen} moved to the frozen node) lost their history: {lost:?}",
        lost.len(),
        channels.len()
    );
}

/// On a mesh of `replication_factor`: a client sees one post and misses the next; then, once
/// every follower's copy is filled, the channel's owner freezes before it learns it is
/// drained, so its handoff never comes. Returns the first frame of the channel a
/// client resuming from the post it saw receives, the missed post's ts, and the ts of a post
/// the new owner took, after checking that the resumed client gets that post.
async fn drain_a_frozen_owner_and_resume(
    dev: &Dev,
    replication_factor: u32,
) -> (serde_json::Value, String, String) {
    let channel = "CWARM";
    let token = dev.token("UREADER", &[channel]);
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let mut client = Rtm::connect(&dev.base_url(), &token).await.unwrap();
    let seen = post(&mut admin, channel, "UPOSTER", "seen").await;
    client
        .expect("the first message", |v| v["ts"] == seen)
        .await;
    drop(client);
    let missed = post(&mut admin, channel, "UPOSTER", "missed while away").await;

    // Every follower's copy filled first: a slot whose follower is still being filled goes to
    // it as from a node that died (its history marked incomplete), which is the other test.
    dev.settled(replication_factor).await;
    let (victim, pid) = dev.channel_owner(channel).await;
    signal(pid, Signal::SIGSTOP);
    let _thaw = Thaw(pid);
    rm_with(dev.ring_manager, &dev.operator)
        .await
        .drain_node(NodeRequest { node_id: victim })
        .await
        .unwrap();
    let after = eventually_within("the new owner takes posts", MOVE_WAIT, || {
        try_post(&admin, channel, "after the move")
    })
    .await;

    let query = format!("?cursors={channel}:{seen}");
    let mut resumed = Rtm::connect_with(&dev.base_url(), &token, &query)
        .await
        .unwrap();
    let first = resumed
        .expect("the channel's first frame", |v| v["channel"] == channel)
        .await;
    assert_eq!(first["cursor"].as_str().unwrap_or(&seen), seen.as_str());
    resumed
        .expect("the message after the move", |v| v["ts"] == after)
        .await;
    (first, missed, after)
}

#[tokio::test]
async fn a_move_whose_handoff_never_arrives_gives_a_resuming_client_history_gap() {
    // About a move to a node that holds nothing of the slot: without replication (with it, a
    // drain moves each slot to its follower, which holds the history: the next test).
    let dev = Dev::start_unreplicated("moves-warmup");
    // The new owner serves once its warm-up runs out. A client resuming from the message it
    // saw hears that history has a gap, rather than silently missing the message the frozen
    // node kept.
    let (first, _, _) = drain_a_frozen_owner_and_resume(&dev, 1).await;
    assert_eq!(first["type"], "history_gap", "{first}");
}

#[tokio::test]
async fn a_drain_whose_owner_freezes_loses_nothing_when_the_slot_goes_to_its_follower() {
    let dev = Dev::start("moves-follower");
    // The slot goes to its follower, which has every acknowledged message already: a client
    // resuming from the message it saw gets what it missed, then the new one, with no gap.
    let (first, missed, _) = drain_a_frozen_owner_and_resume(&dev, 2).await;
    assert_eq!(first["type"], "message", "{first}");
    assert_eq!(first["ts"], missed.as_str());
}

#[tokio::test]
async fn a_standby_whose_clock_is_behind_takes_over_above_the_last_ts_delivered_and_says_gap() {
    // About a standby's takeover: without replication (with it, followers take the slots).
    let dev = Dev::start_unreplicated("moves-skew");
    let (_, members) = ring_with(dev.ring_manager, &dev.operator).await;
    // The standby restarts with its clock a minute behind.
    let standby = members.iter().find(|m| m.state == "standby").unwrap();
    let id = standby.id.clone();
    signal(standby.pid, Signal::SIGKILL);
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = Command::new(BIN)
        .args(["channel-server", "--id", &id, "--standby"])
        .args(["--listen", "127.0.0.1:0", "--http", &http.to_string()])
        .args(["--ring-manager", &dev.ring_manager.to_string()])
        .arg("--clock-offset-ms=-60000")
        .args(dev.tls_flags(&id))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let behind = Started(child);
    eventually("the standby registers again, behind", || async {
        let (_, members) = ring_with(dev.ring_manager, &dev.operator).await;
        members
            .iter()
            .any(|m| m.id == id && m.pid == behind.0.id() && m.state == "standby")
            .then_some(())
    })
    .await;

    // A live client has a message from the channel's owner.
    let channel = "CSKEW";
    let (_, owner_pid) = dev.channel_owner(channel).await;
    let mut client = Rtm::connect(&dev.base_url(), &dev.token("UREADER", &[channel]))
        .await
        .unwrap();
    let admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let delivered = try_post(&admin, channel, "before the takeover")
        .await
        .unwrap();
    client.expect("the message", |v| v["ts"] == delivered).await;

    // The owner dies; the standby takes over and the gateway subscribes there.
    signal(owner_pid, Signal::SIGKILL);
    let metrics = format!("http://{http}/metrics");
    eventually_within(
        "the gateway subscribes on the standby",
        MOVE_WAIT,
        || async {
            let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
            (metric_sum(&text, "channelmesh_channel_subscriptions", &[]) >= 1.0).then_some(())
        },
    )
    .await;
    let next = eventually("a post after the takeover", || {
        try_post(&admin, channel, "after the takeover")
    })
    .await;
    assert!(
        ts(&next) > ts(&delivered),
        "the new owner's ts {next} is above the last delivered {delivered}"
    );

    // The live client hears of the gap first (what the dead node took is unknown), then gets
    // the message: a gateway drops a ts at or below what it delivered.
    let frame = client
        .expect("a gap or the message", |v| {
            v["type"] == "history_gap" || v["ts"] == next
        })
        .await;
    assert_eq!(frame["type"], "history_gap", "{frame}");
    assert_eq!(frame["cursor"], delivered.as_str());
    client.expect("the message", |v| v["ts"] == next).await;
}
