//! The Consul backend against `fake-consul`, a test server answering Consul's documented
//! responses: the client's calls, the leader election with its fenced writes, the ring watch,
//! and service registration.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_consul::FakeConsul;
use mesh_core::{NodeId, Ring, RingNode};
use ring_client::consul::{BlockingLoop, Consul};
use ring_client::record::Saved;
use ring_client::{RingSource, RingWatcher};
use ring_manager::cluster::{self, ConsulRing, LeaderConfig, Record};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const TTL: Duration = Duration::from_secs(10);
const LOCK_DELAY: Duration = Duration::from_millis(300);

/// Polls `f` until it returns `Some`, for at most 20 s.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn nodes(n: usize) -> Vec<RingNode> {
    (1..=n)
        .map(|i| RingNode {
            id: NodeId::new(&format!("cs-{i}")).unwrap(),
            addr: format!("127.0.0.1:{}", 7000 + i),
        })
        .collect()
}

fn record(ring: &Ring, lock_index: u64) -> Vec<u8> {
    let (epoch, nodes, slot_owner) = Saved::ring_parts(ring);
    serde_json::to_vec(&Record {
        lock_index,
        leader: "http://127.0.0.1:1".into(),
        saved: Saved {
            epoch,
            nodes,
            slot_owner,
            members: vec![],
            next_incarnation: 1,
        },
    })
    .unwrap()
}

#[tokio::test]
async fn a_lock_holder_writes_fenced_and_a_lapsed_one_is_refused() {
    let fake = FakeConsul::start().await.unwrap();
    let consul = Consul::new(&fake.url(), None).unwrap();
    let a = consul.create_session("a", TTL, LOCK_DELAY).await.unwrap();
    let b = consul.create_session("b", TTL, LOCK_DELAY).await.unwrap();
    assert!(consul.acquire("t/lock", &a, b"a".to_vec()).await.unwrap());
    assert!(!consul.acquire("t/lock", &b, b"b".to_vec()).await.unwrap());
    let (lock, _) = consul.get("t/lock", None).await.unwrap();
    let lock = lock.unwrap();
    assert_eq!(lock.session.as_deref(), Some(a.as_str()));
    assert_eq!(lock.value, b"a");
    assert_eq!(lock.lock_index, 1);

    // The holder writes with check-and-set; a stale index is refused.
    let first = consul
        .fenced_cas("t/lock", &a, "t/ring", b"one", 0)
        .await
        .unwrap()
        .unwrap();
    let again = consul
        .fenced_cas("t/lock", &a, "t/ring", b"two", 0)
        .await
        .unwrap();
    assert!(again.is_err(), "cas 0 on an existing key must fail");
    consul
        .fenced_cas("t/lock", &a, "t/ring", b"two", first)
        .await
        .unwrap()
        .unwrap();
    // Someone without the lock cannot write at all.
    let (ring, _) = consul.get("t/ring", None).await.unwrap();
    let index = ring.unwrap().modify_index;
    let refused = consul
        .fenced_cas("t/lock", &b, "t/ring", b"b's", index)
        .await
        .unwrap();
    assert!(refused.is_err());

    // A's session lapses: after the lock-delay B takes the lock with a higher lock index, and
    // A's late write is refused even with the right modify index.
    fake.expire_session(&a);
    assert!(!consul.renew_session(&a).await.unwrap());
    let acquired_by_b = eventually("b acquires after the lock-delay", || async {
        consul
            .acquire("t/lock", &b, b"b".to_vec())
            .await
            .unwrap()
            .then_some(())
    })
    .await;
    let () = acquired_by_b;
    let (lock, _) = consul.get("t/lock", None).await.unwrap();
    assert_eq!(lock.unwrap().lock_index, 2);
    let late = consul
        .fenced_cas("t/lock", &a, "t/ring", b"a's late write", index)
        .await
        .unwrap();
    assert!(late.is_err(), "a lapsed leader's write must be refused");
    assert_eq!(fake.kv_value("t/ring").unwrap(), b"two");
    assert!(consul.release("t/lock", &b).await.unwrap());
    consul.destroy_session(&b).await.unwrap();
}

#[tokio::test]
async fn the_ring_watch_follows_kv_survives_an_index_reset_and_refuses_an_older_leader() {
    let fake = FakeConsul::start().await.unwrap();
    let ring = ConsulRing::new(&fake.url(), None, "watch").unwrap();
    let consul = ring.consul.clone();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let watcher = RingWatcher::spawn(RingSource::Consul(ring.clone()), &tracker, cancel.clone());

    let r1 = Ring::empty().rebalanced(&nodes(3));
    let put = |value: Vec<u8>| {
        let consul = consul.clone();
        let key = ring.ring_key();
        async move {
            let s = consul.create_session("w", TTL, LOCK_DELAY).await.unwrap();
            let lock = ring_lock(&key);
            assert!(consul.acquire(&lock, &s, vec![]).await.unwrap());
            let (entry, _) = consul.get(&key, None).await.unwrap();
            let cas = entry.map_or(0, |e| e.modify_index);
            consul
                .fenced_cas(&lock, &s, &key, &value, cas)
                .await
                .unwrap()
                .unwrap();
            consul.release(&lock, &s).await.unwrap();
            consul.destroy_session(&s).await.unwrap();
        }
    };
    put(record(&r1, 5)).await;
    watcher
        .wait_for_epoch(r1.epoch(), Duration::from_secs(10))
        .await
        .unwrap();

    // Consul's index goes backwards (a snapshot restore): the watch starts over and still
    // sees the next ring.
    fake.reset_index(1);
    let r2 = r1.rebalanced(&nodes(4));
    put(record(&r2, 5)).await;
    watcher
        .wait_for_epoch(r2.epoch(), Duration::from_secs(10))
        .await
        .unwrap();

    // A record from an older leader (lower lock index) is ignored even with a newer epoch;
    // a later one from the current leader is taken.
    let r3 = r2.rebalanced(&nodes(5));
    put(record(&r3, 4)).await;
    let r4 = r3.rebalanced(&nodes(6));
    put(record(&r4, 6)).await;
    let seen = watcher
        .wait_for_epoch(r4.epoch(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(seen.epoch(), r4.epoch());

    // Rate-limited: with nothing changing, the blocking loop is not spinning.
    let before = fake.request_count("/v1/kv/watch/ring");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = fake.request_count("/v1/kv/watch/ring") - before;
    assert!(
        during <= 3,
        "{during} queries in 500 ms while nothing changed"
    );
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

fn ring_lock(ring_key: &str) -> String {
    format!("{ring_key}-writer-lock")
}

#[test]
fn the_blocking_loop_resets_an_index_that_goes_backwards_and_never_sends_zero() {
    let mut blocking = BlockingLoop::new(Duration::from_millis(1));
    assert_eq!(blocking.index(), 0);
    assert!(blocking.observe(0));
    assert_eq!(blocking.index(), 1, "never block on index 0");
    assert!(blocking.observe(40));
    assert!(!blocking.observe(40));
    assert!(blocking.observe(12), "backwards counts as a change");
    assert_eq!(blocking.index(), 0, "and restarts from 0");
}

/// Two ring managers on one Consul: one leads and serves; when its session lapses, the other
/// takes over with the same ring, and the first, fenced, no longer writes.
#[tokio::test]
async fn ring_managers_elect_one_leader_and_fail_over_with_the_same_ring() {
    let fake = FakeConsul::start().await.unwrap();
    let ring = ConsulRing::new(&fake.url(), None, "elect").unwrap();
    let cancel = CancellationToken::new();
    let mut managers = Vec::new();
    for _ in 0..2 {
        let listen = free_port();
        let config = LeaderConfig {
            endpoint: format!("http://{listen}"),
            listen,
            session_ttl: TTL,
            lock_delay: LOCK_DELAY,
            nearest: vec![],
        };
        let (ring, cancel) = (ring.clone(), cancel.child_token());
        let task = tokio::spawn(cluster::run_leader_election(
            ring,
            ring_manager::Config::default(),
            config.clone(),
            cancel.clone(),
        ));
        managers.push((config, cancel, task));
    }
    let first = eventually("a leader", || async { ring.leader().await.unwrap() }).await;

    // A channel server registers through whichever leads; the ring lands in KV.
    let source = RingSource::Consul(ring.clone());
    let tracker = TaskTracker::new();
    let watcher = RingWatcher::spawn(source.clone(), &tracker, cancel.clone());
    let reply = ring_client::source::register(
        &source,
        mesh_proto::ring::RegisterRequest {
            node_id: "cs-1".into(),
            addr: "127.0.0.1:9".into(),
            pid: 1,
            standby: false,
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let before = watcher
        .wait_for_epoch(reply.epoch, Duration::from_secs(10))
        .await
        .unwrap();
    let (stored, _) = ring.load().await.unwrap();
    let stored = stored.unwrap();
    assert_eq!(stored.leader, first.endpoint);
    assert_eq!(stored.lock_index, 1);

    // The leader "dies" without a word: cancel it, then let its session lapse in Consul.
    let (leader_idx, _) = managers
        .iter()
        .enumerate()
        .find(|(_, (c, _, _))| c.endpoint == first.endpoint)
        .unwrap();
    let (_, stop, task) = managers.remove(leader_idx);
    task.abort();
    stop.cancel();
    let _ = task.await;
    let (lock, _) = ring.consul.get(&ring.lock_key(), None).await.unwrap();
    let dead = lock.unwrap().session.unwrap();
    fake.expire_session(&dead);

    let second = eventually("a new leader", || async {
        ring.leader()
            .await
            .unwrap()
            .filter(|l| l.endpoint != first.endpoint)
    })
    .await;
    // The new leader serves the same ring it found in KV: nothing reshuffled.
    let served = eventually("the new leader answers", || async {
        let mut client = mesh_proto::ring::ring_manager_client::RingManagerClient::connect(
            second.endpoint.clone(),
        )
        .await
        .ok()?;
        let proto = client
            .get_ring(mesh_proto::ring::GetRingRequest {})
            .await
            .ok()?
            .into_inner();
        ring_client::convert::ring_from_proto(proto).ok()
    })
    .await;
    assert!(served.same_assignment(&before), "{served:?} vs {before:?}");

    // Its next change carries its own, higher lock index.
    ring_client::source::register(
        &source,
        mesh_proto::ring::RegisterRequest {
            node_id: "cs-2".into(),
            addr: "127.0.0.1:10".into(),
            pid: 2,
            standby: false,
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let after: Arc<Ring> = watcher
        .wait_for(Duration::from_secs(10), "cs-2 on the ring", |r| {
            r.nodes().len() == 2
        })
        .await
        .unwrap();
    assert!(after.epoch() > before.epoch());
    let (stored, _) = ring.load().await.unwrap();
    let stored = stored.unwrap();
    assert_eq!(stored.leader, second.endpoint);
    assert_eq!(stored.lock_index, 2);

    cancel.cancel();
    for (_, _, task) in managers {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    tracker.close();
    tracker.wait().await;
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn services_register_with_a_passing_ttl_check_and_deregister_on_shutdown() {
    let fake = FakeConsul::start().await.unwrap();
    let consul = Consul::new(&fake.url(), None).unwrap();
    let cancel = CancellationToken::new();
    let def = ring_client::consul_ring::service_def(
        "gateway",
        "us-east-1",
        "0.0.0.0:8080".parse().unwrap(),
        Some("gw-1.internal:8080"),
        vec![("region".into(), "us-east".into())],
    );
    let task = tokio::spawn(ring_client::consul_ring::keep_registered(
        consul.clone(),
        def.clone(),
        cancel.clone(),
    ));
    let healthy = eventually("the gateway is registered and passing", || async {
        let found = consul
            .health_service("channelmesh-gateway", true)
            .await
            .unwrap();
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(healthy[0].id, "channelmesh-gateway-us-east-1");
    assert_eq!(healthy[0].address, "gw-1.internal");
    assert_eq!(healthy[0].port, 8080);
    assert_eq!(healthy[0].status, "passing");
    cancel.cancel();
    task.await.unwrap();
    assert!(
        consul
            .health_service("channelmesh-gateway", false)
            .await
            .unwrap()
            .is_empty(),
        "deregistered on shutdown"
    );
}
