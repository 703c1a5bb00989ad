//! The mesh on Consul: `channelmesh dev --multi-process --consul`, with two ring managers
//! electing a leader, against `fake-consul` (a test server answering Consul's documented
//! responses; no Consul binary runs on these machines).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_consul::FakeConsul;
use mesh_core::{ChannelId, NodeId, Ring};
use nix::sys::signal::Signal;
use ring_client::ConsulRing;
use ring_client::consul_ring::LeaderInfo;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::processes::{ADMIN_TOKEN, BIN, Dev, signal};
use crate::support::{
    Poster, Rtm, admin_at, eventually, eventually_within, moves, post, post_index, poster,
    receive_all, ring_with,
};

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn addr_of(endpoint: &str) -> SocketAddr {
    endpoint.trim_start_matches("http://").parse().unwrap()
}

/// SIGKILLs `dev`'s ring manager that leads (`leader`); returns the next leader, once another
/// ring manager leads (the dead one's lock is held until Consul's session TTL lapses).
pub async fn kill_the_leader(dev: &Dev, ring: &ConsulRing, leader: &LeaderInfo) -> LeaderInfo {
    let leader_pid = dev
        .ring_managers
        .iter()
        .find(|(addr, _)| *addr == addr_of(&leader.endpoint))
        .unwrap()
        .1;
    signal(leader_pid, Signal::SIGKILL);
    eventually_within("a new leader", Duration::from_secs(40), || async {
        ring.leader()
            .await
            .ok()
            .flatten()
            .filter(|l| l.endpoint != leader.endpoint)
    })
    .await
}

/// The ring as Consul KV holds it, with the writer's lock index.
async fn stored(ring: &ConsulRing) -> (Ring, u64) {
    let (record, _) = ring.load().await.unwrap();
    let record = record.expect("a ring in consul");
    (record.saved.ring().unwrap(), record.lock_index)
}

/// Waits until a post sent from now on is delivered to `client`; returns how long that took.
async fn delivered_after(client: &mut Rtm, posting: &Poster) -> Duration {
    let started = Instant::now();
    let first = posting.next_index();
    client
        .expect("a message posted after the failure", |v| {
            post_index(v).is_some_and(|i| i >= first)
        })
        .await;
    started.elapsed()
}

// Multi-threaded: `Dev::on_consul` reads the child's stdout blocking while the fake Consul, on
// this runtime, must keep answering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_consul_a_dead_channel_server_is_replaced_and_a_dead_ring_manager_fails_over() {
    let fake = FakeConsul::start().await.unwrap();
    let rms = [free_addr(), free_addr()];
    // About a standby's takeover: without replication (with it, followers take the slots).
    let dev = Dev::on_consul_with(
        "failover",
        &fake.url(),
        &rms,
        &["--replication-factor", "1"],
    );
    let ring = ConsulRing::new(&fake.url(), None, "test-failover").unwrap();
    let leader = ring.leader().await.unwrap().expect("a leader");

    // Every service registered itself, with a passing TTL check.
    eventually("every service registered", || async {
        let services = fake.services();
        let passing = |name: &str| {
            services
                .iter()
                .filter(|(_, n, status)| n == name && status == "passing")
                .count()
        };
        (passing("channelmesh-channel-server") == 4
                && passing("channelmesh-gateway") == 2
                && passing("channelmesh-admin-server") == 1
                && passing("channelmesh-presence-server") == 3
            // Two for the channel ring, one for the presence ring.
            && passing("channelmesh-ring-manager") == 3)
            .then_some(())
    })
    .await;

    // 1. SIGKILL the channel server that owns a channel a client listens on.
    let channel = "CCONSUL";
    let mut client = Rtm::connect(&dev.base_url(), &dev.token("UREADER", &[channel]))
        .await
        .unwrap();
    let admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let (before, lock_index) = stored(&ring).await;
    assert_eq!(lock_index, 1, "the first leader's fence");
    let (_, members) = ring_with(addr_of(&leader.endpoint), &dev.operator).await;
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();
    let pid = members.iter().find(|m| m.id == victim).unwrap().pid;
    let stop = CancellationToken::new();
    let posting = poster(&admin, channel, stop.clone());
    signal(pid, Signal::SIGKILL);
    let resumed_in = delivered_after(&mut client, &posting).await;
    stop.cancel();
    let (_, failed) = posting.finish().await;
    assert_eq!(failed, 0, "no post failed across the kill");
    println!(
        "on consul: kill -9 of {victim} -> delivery resumed in {} ms",
        resumed_in.as_millis()
    );
    let (after, _) = eventually("the new ring in consul", || async {
        let (r, i) = stored(&ring).await;
        (r.epoch() > before.epoch()).then_some((r, i))
    })
    .await;
    let moved = moves(&before, &after);
    assert_eq!(
        moved.len(),
        before.slots_owned(&NodeId::new(&victim).unwrap()),
        "only the dead node's slots move"
    );
    assert!(
        moved
            .iter()
            .all(|(_, from, to)| *from == victim && to == "cs-4")
    );

    // 2. SIGKILL the leading ring manager. Its lock stays held until Consul's session TTL
    // lapses; meanwhile the data plane keeps delivering on the ring it knows.
    let stop = CancellationToken::new();
    let posts = poster(&admin, channel, stop.clone());
    let killed = Instant::now();
    let second = kill_the_leader(&dev, &ring, &leader).await;
    println!(
        "ring manager failover on consul: new leader after {} ms",
        killed.elapsed().as_millis()
    );
    stop.cancel();
    let (acked, failed) = posts.finish().await;
    assert_eq!(failed, 0, "no post failed while the ring manager was down");
    assert!(!acked.is_empty());
    receive_all(&mut client, &acked).await;

    // The new leader serves the same ring it found in KV: nothing reshuffled.
    let (served, _) = eventually("the new leader answers", || async {
        let channel = mesh_transport::endpoint_with(&second.endpoint, &dev.operator)
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut rm = mesh_proto::ring::ring_manager_client::RingManagerClient::new(channel);
        let proto = rm
            .get_ring(mesh_proto::ring::GetRingRequest {})
            .await
            .ok()?
            .into_inner();
        let members = proto.members.clone();
        Some((ring_client::convert::ring_from_proto(proto).ok()?, members))
    })
    .await;
    assert!(served.same_assignment(&after), "{served:?} vs {after:?}");

    // `ctl` finds the leader through Consul.
    let out = Command::new(BIN)
        .args([
            "ctl",
            "--consul",
            &fake.url(),
            "--consul-prefix",
            "test-failover",
        ])
        // The operator credential `dev` wrote, as an SRE's `ctl` finds it.
        .arg("--state-dir")
        .arg(&dev.state_dir)
        .args(["--json", "ring"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success());
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["epoch"], after.epoch());

    // 3. The new leader handles the next failure: no standby is left, so the dead node's
    // slots spread over the survivors, under the new leader's fence.
    let other = after
        .nodes()
        .iter()
        .find(|n| n.id.as_str() != "cs-4")
        .unwrap()
        .clone();
    let (_, members) = ring_with(addr_of(&second.endpoint), &dev.operator).await;
    let pid = members
        .iter()
        .find(|m| m.id == other.id.as_str())
        .unwrap()
        .pid;
    signal(pid, Signal::SIGKILL);
    let (last, lock_index) = eventually("the survivors take the dead node's slots", || async {
        let (r, i) = stored(&ring).await;
        (r.epoch() > after.epoch()).then_some((r, i))
    })
    .await;
    assert_eq!(lock_index, 2, "written under the second leader's fence");
    let moved = moves(&after, &last);
    assert!(!moved.is_empty());
    assert!(moved.iter().all(|(_, from, _)| *from == other.id.as_str()));
    let mut admin = admin;
    let ts = post(&mut admin, channel, "UPOSTER", "after both failures").await;
    let got = client
        .expect("a message after both failures", |v| {
            v["text"] == "after both failures"
        })
        .await;
    assert_eq!(got["ts"], ts.as_str());
}
