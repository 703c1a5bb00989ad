//! The Consul backend against `fake-consul`, a test server answering Consul's documented
//! responses: the client's calls, the leader election with its fenced writes, the ring watch,
//! and service registration.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use fake_consul::FakeConsul;
use mesh_core::{NodeId, Ring, RingNode};
use ring_client::consul::{BlockingLoop, Consul};
use ring_client::record::Saved;
use ring_client::{RingSource, RingWatcher};
use ring_manager::cluster::{self, ConsulRing, LeaderConfig, Record};
use tokio_util::sync::CancellationToken;

use support::eventually;
use tokio_util::task::TaskTracker;

const TTL: Duration = Duration::from_secs(10);
const LOCK_DELAY: Duration = Duration::from_millis(300);
/// The management token of the tests that run Consul with ACLs on.
const TOKEN: &str = "0b9f7c1e-4d2a-4e11-9a35-consul0acl001";

fn nodes(n: usize) -> Vec<RingNode> {
    (1..=n)
        .map(|i| RingNode {
            id: NodeId::new(&format!("cs-{i}")).unwrap(),
            addr: format!("127.0.0.1:{}", 7000 + i),
        })
        .collect()
}

/// A ring record stamped with `lock_index` and `session`.
fn record(ring: &Ring, lock_index: u64, session: &str) -> Vec<u8> {
    let (epoch, nodes, slot_owner, slot_followers) = Saved::ring_parts(ring);
    serde_json::to_vec(&Record {
        lock_index,
        session: Some(session.into()),
        leader: "http://127.0.0.1:1".into(),
        saved: Saved {
            epoch,
            nodes,
            slot_owner,
            slot_followers,
            members: vec![],
            next_incarnation: 1,
            ..Saved::default()
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

/// A stand-in leader: a session holding `ring`'s lock, writing records as the ring manager
/// does (fenced, stamped with its lock index and session).
struct Holder {
    ring: ConsulRing,
    session: String,
    lock_index: u64,
}

impl Holder {
    async fn acquire(ring: &ConsulRing) -> Holder {
        let consul = &ring.consul;
        let session = consul.create_session("w", TTL, LOCK_DELAY).await.unwrap();
        assert!(
            consul
                .acquire(&ring.lock_key(), &session, vec![])
                .await
                .unwrap()
        );
        let (lock, _) = consul.get(&ring.lock_key(), None).await.unwrap();
        Holder {
            ring: ring.clone(),
            session,
            lock_index: lock.unwrap().lock_index,
        }
    }

    /// Writes `value` to the ring key, fenced by the lock.
    async fn write(&self, value: &[u8]) {
        let (key, consul) = (self.ring.ring_key(), &self.ring.consul);
        let (entry, _) = consul.get(&key, None).await.unwrap();
        let cas = entry.map_or(0, |e| e.modify_index);
        consul
            .fenced_cas(&self.ring.lock_key(), &self.session, &key, value, cas)
            .await
            .unwrap()
            .unwrap();
    }

    /// Writes `ring` stamped as this holder's.
    async fn write_ring(&self, ring: &Ring) {
        self.write(&record(ring, self.lock_index, &self.session))
            .await;
    }

    /// Gives the lock up and ends the session.
    async fn release(self) {
        let consul = &self.ring.consul;
        consul
            .release(&self.ring.lock_key(), &self.session)
            .await
            .unwrap();
        consul.destroy_session(&self.session).await.unwrap();
    }
}

/// What one follower of the ring records made of each record it saw: the epoch it accepted,
/// or why it refused.
type Outcomes = tokio::sync::mpsc::UnboundedReceiver<Result<u64, String>>;

fn follow(ring: &ConsulRing, cancel: &CancellationToken) -> Outcomes {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(ring_client::consul_ring::follow_records(
        ring.clone(),
        cancel.clone(),
        move |outcome| {
            let _ = tx.send(outcome.map(|r| r.saved.epoch).map_err(|e| e.to_string()));
        },
    ));
    rx
}

/// The next outcome that satisfies `pred`, skipping others.
async fn next_outcome(
    outcomes: &mut Outcomes,
    what: &str,
    pred: impl Fn(&Result<u64, String>) -> bool,
) -> Result<u64, String> {
    let wait = async {
        loop {
            let outcome = outcomes.recv().await.expect("the follower runs");
            if pred(&outcome) {
                return outcome;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A fake Consul and its ring at one prefix, followed by a `RingWatcher` and by [`follow`],
/// with a leader whose first ring (three nodes) the watcher has taken.
struct Watched {
    fake: FakeConsul,
    ring: ConsulRing,
    cancel: CancellationToken,
    watcher: RingWatcher,
    outcomes: Outcomes,
    leader: Holder,
    first: Ring,
    tracker: TaskTracker,
}

async fn watched(prefix: &str) -> Watched {
    let fake = FakeConsul::start().await.unwrap();
    let ring = ConsulRing::new(&fake.url(), None, prefix).unwrap();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let watcher = RingWatcher::spawn(RingSource::Consul(ring.clone()), &tracker, cancel.clone());
    let outcomes = follow(&ring, &cancel);
    let leader = Holder::acquire(&ring).await;
    let first = Ring::empty().rebalanced(&nodes(3));
    leader.write_ring(&first).await;
    watcher
        .wait_for_epoch(first.epoch(), Duration::from_secs(10))
        .await
        .unwrap();
    Watched {
        fake,
        ring,
        cancel,
        watcher,
        outcomes,
        leader,
        first,
        tracker,
    }
}

#[tokio::test]
async fn the_ring_watch_follows_kv_survives_an_index_reset_and_refuses_an_older_leader() {
    let Watched {
        fake,
        ring,
        cancel,
        watcher,
        mut outcomes,
        leader: a,
        first: r1,
        tracker,
    } = watched("watch").await;

    // Consul's index goes backwards (a snapshot restore): the watch starts over and still
    // sees the next ring.
    fake.reset_index(1);
    let r2 = r1.rebalanced(&nodes(4));
    a.write_ring(&r2).await;
    watcher
        .wait_for_epoch(r2.epoch(), Duration::from_secs(10))
        .await
        .unwrap();

    // A new leader takes the lock. Its predecessor's record is now stale, even with a newer
    // epoch (a late write): refused until the new leader writes its own.
    let stale = a.lock_index;
    let old_session = a.session.clone();
    a.release().await;
    let b = Holder::acquire(&ring).await;
    assert_eq!(b.lock_index, stale + 1);
    let r3 = r2.rebalanced(&nodes(5));
    b.write(&record(&r3, stale, &old_session)).await;
    let refused = next_outcome(&mut outcomes, "the older leader's record refused", |o| {
        o.as_ref().is_err_and(|e| e.contains("earlier leader"))
    })
    .await;
    assert!(
        refused
            .unwrap_err()
            .contains(&format!("lock index {stale}"))
    );
    assert_eq!(
        watcher.current().epoch(),
        r2.epoch(),
        "the older leader's ring was taken"
    );
    let r4 = r3.rebalanced(&nodes(6));
    b.write_ring(&r4).await;
    let seen = watcher
        .wait_for_epoch(r4.epoch(), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(seen.same_assignment(&r4));

    // Rate-limited: with nothing changing, the blocking loop is not spinning.
    let before = fake.request_count("/v1/kv/watch/ring");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = fake.request_count("/v1/kv/watch/ring") - before;
    assert!(
        during <= 6,
        "{during} queries in 500 ms from two followers while nothing changed"
    );
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// The attack: whoever can write KV (without holding the lock) writes a ring record that
/// claims a huge lock index — which, fenced by the highest lock index seen, would have frozen
/// every reader on the forged ring forever. Readers refuse it and keep the last good ring, and
/// the leader's next rings still go through.
#[tokio::test]
async fn a_forged_record_with_a_huge_lock_index_moves_no_reader_and_freezes_nothing() {
    let Watched {
        fake,
        ring,
        cancel,
        watcher,
        mut outcomes,
        leader,
        first: good,
        tracker,
    } = watched("forged").await;

    // The forger's ring: its own node owning every slot, at a huge epoch, under a huge lock
    // index, claiming the leader's session for good measure; a plain KV write.
    let evil = Ring::empty().rebalanced(&[RingNode {
        id: NodeId::new("evil").unwrap(),
        addr: "203.0.113.66:7001".into(),
    }]);
    let (_, nodes_, slot_owner, _) = Saved::ring_parts(&evil);
    let forged = serde_json::to_vec(&Record {
        lock_index: u64::MAX / 2,
        session: Some(leader.session.clone()),
        leader: "http://203.0.113.66:50050".into(),
        saved: Saved {
            epoch: 1_000_000,
            nodes: nodes_,
            slot_owner,
            members: vec![],
            next_incarnation: 1,
            ..Saved::default()
        },
    })
    .unwrap();
    let put = reqwest::Client::new()
        .put(format!("{}/v1/kv/{}", fake.url(), ring.ring_key()))
        .body(forged)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "the forger can write KV here");

    let refused = next_outcome(&mut outcomes, "the forged record refused", Result::is_err).await;
    assert!(
        refused.as_ref().unwrap_err().contains("has not reached"),
        "{refused:?}"
    );
    let kept = watcher.current();
    assert_eq!(kept.epoch(), good.epoch());
    assert!(
        kept.same_assignment(&good),
        "a reader moved to the forged ring"
    );

    // The leader's next ring, at a far lower epoch than the forged one, reaches every reader.
    let next = good.rebalanced(&nodes(4));
    leader.write_ring(&next).await;
    let accepted = next_outcome(&mut outcomes, "the leader's next ring", Result::is_ok).await;
    assert_eq!(accepted, Ok(next.epoch()));
    let seen = watcher
        .wait_for_epoch(next.epoch(), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(seen.same_assignment(&next));
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
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

/// Two ring managers on one Consul (with ACLs on: every call carries the token): one leads and
/// serves; when its session lapses, the other takes over with the same ring, and the first,
/// fenced, no longer writes.
#[tokio::test]
async fn ring_managers_elect_one_leader_and_fail_over_with_the_same_ring() {
    let fake = FakeConsul::start().await.unwrap();
    fake.require_token(Some(TOKEN));
    let ring = ConsulRing::new(&fake.url(), Some(TOKEN.into()), "elect").unwrap();
    let cancel = CancellationToken::new();
    let mut managers = campaigners(&ring, ring_manager::Config::default(), &cancel);
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
    let (lock, _) = ring.consul.get(&ring.lock_key(), None).await.unwrap();
    assert_eq!(
        stored.session,
        lock.unwrap().session,
        "the record names its writer"
    );

    // The leader "dies" without a word: cancel it, then let its session lapse in Consul.
    let second = fail_over(&fake, &ring, &mut managers, &first).await;
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

/// A ring manager of a test: its config, what stops it, its task.
type Manager = (
    LeaderConfig,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), ring_manager::Error>>,
);

/// The leader `first` "dies" without a word: its task stops, its session lapses in Consul.
/// Returns the next leader, once another of `managers` leads.
async fn fail_over(
    fake: &FakeConsul,
    ring: &ConsulRing,
    managers: &mut Vec<Manager>,
    first: &cluster::LeaderInfo,
) -> cluster::LeaderInfo {
    let index = managers
        .iter()
        .position(|(c, _, _)| c.endpoint == first.endpoint)
        .unwrap();
    let (_, stop, task) = managers.remove(index);
    task.abort();
    stop.cancel();
    let _ = task.await;
    let (lock, _) = ring.consul.get(&ring.lock_key(), None).await.unwrap();
    fake.expire_session(&lock.unwrap().session.unwrap());
    eventually("a new leader", || async {
        ring.leader()
            .await
            .unwrap()
            .filter(|l| l.endpoint != first.endpoint)
    })
    .await
}

/// Two ring managers with `manager`, each campaigning on `ring` until `cancel`.
fn campaigners(
    ring: &ConsulRing,
    manager: ring_manager::Config,
    cancel: &CancellationToken,
) -> Vec<Manager> {
    (0..2)
        .map(|_| start_ring_manager_with(ring, manager, cancel))
        .collect()
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn services_register_with_a_passing_ttl_check_and_deregister_on_shutdown() {
    let fake = FakeConsul::start().await.unwrap();
    fake.require_token(Some(TOKEN));
    let consul = Consul::new(&fake.url(), Some(TOKEN.into())).unwrap();
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

/// Starts a ring manager of a Consul group on a free port; its config, cancel token and task.
fn start_ring_manager(ring: &ConsulRing, cancel: &CancellationToken) -> Manager {
    start_ring_manager_with(ring, ring_manager::Config::default(), cancel)
}

/// [`start_ring_manager`] with `manager`.
fn start_ring_manager_with(
    ring: &ConsulRing,
    manager: ring_manager::Config,
    cancel: &CancellationToken,
) -> Manager {
    let listen = free_port();
    let config = LeaderConfig {
        endpoint: format!("http://{listen}"),
        listen,
        session_ttl: TTL,
        lock_delay: LOCK_DELAY,
        nearest: vec![],
    };
    let stop = cancel.child_token();
    let task = tokio::spawn(cluster::run_leader_election(
        ring.clone(),
        manager,
        config.clone(),
        stop.clone(),
    ));
    (config, stop, task)
}

/// A forged record (a huge lock index, the forger's own ring) written with a plain KV write;
/// returns its modify index.
async fn forge(fake: &FakeConsul, ring: &ConsulRing) -> u64 {
    let evil = Ring::empty().rebalanced(&[RingNode {
        id: NodeId::new("evil").unwrap(),
        addr: "203.0.113.66:7001".into(),
    }]);
    let (_, nodes, slot_owner, _) = Saved::ring_parts(&evil);
    let forged = Record {
        lock_index: u64::MAX / 2,
        session: None,
        leader: "http://203.0.113.66:50050".into(),
        saved: Saved {
            epoch: 1_000_000,
            nodes,
            slot_owner,
            members: vec![],
            next_incarnation: 1,
            ..Saved::default()
        },
    };
    let put = reqwest::Client::new()
        .put(format!("{}/v1/kv/{}", fake.url(), ring.ring_key()))
        .body(serde_json::to_vec(&forged).unwrap())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let (entry, _) = ring.consul.get(&ring.ring_key(), None).await.unwrap();
    let entry = entry.unwrap();
    assert_eq!(entry.value, serde_json::to_vec(&forged).unwrap());
    entry.modify_index
}

/// Registers a node through whichever ring manager leads.
async fn register(source: &RingSource, node: &str, port: u16) -> u64 {
    ring_client::source::register(
        source,
        mesh_proto::ring::RegisterRequest {
            node_id: node.into(),
            addr: format!("127.0.0.1:{port}"),
            pid: u32::from(port),
            standby: false,
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    .epoch
}

/// The leader's side of the forged-record attack: the leading ring manager writes its ring
/// back over a forged record at once (and keeps leading); a new leader that finds a forged
/// record in KV resumes the last good ring it saw instead, and stamps it as its own.
#[tokio::test]
async fn a_leader_writes_its_ring_over_a_forged_record_and_a_new_one_never_resumes_it() {
    let fake = FakeConsul::start().await.unwrap();
    let ring = ConsulRing::new(&fake.url(), None, "guard").unwrap();
    let cancel = CancellationToken::new();
    let mut managers = vec![
        start_ring_manager(&ring, &cancel),
        start_ring_manager(&ring, &cancel),
    ];
    let first = eventually("a leader", || async { ring.leader().await.unwrap() }).await;
    let source = RingSource::Consul(ring.clone());
    let tracker = TaskTracker::new();
    let watcher = RingWatcher::spawn(source.clone(), &tracker, cancel.clone());
    // cs-1 holds its lease (heartbeats), so nothing changes the ring on its own.
    let joined = ring_client::membership::join(
        &source,
        mesh_proto::ring::RegisterRequest {
            node_id: "cs-1".into(),
            addr: "127.0.0.1:9".into(),
            pid: 9,
            standby: false,
        },
        ring_client::Lease::default(),
        None,
        &tracker,
        &cancel,
    );
    joined.await.unwrap();
    let good = eventually("cs-1 active in KV", || async {
        let (record, _) = ring.load().await.unwrap();
        let record = record?;
        let active = record.saved.members.iter().any(|m| m.state == "active");
        active.then_some(record)
    })
    .await;
    watcher
        .wait_for_epoch(good.saved.epoch, Duration::from_secs(10))
        .await
        .unwrap();
    let evil = |ring: &Ring| ring.nodes().iter().any(|n| n.id.as_str() == "evil");

    // 1. Forged while the leader runs: it puts its own record back, and still leads.
    let forged_at = forge(&fake, &ring).await;
    let restored = eventually("the leader's record back in KV", || async {
        let (entry, _) = ring.consul.get(&ring.ring_key(), None).await.unwrap();
        let entry = entry.filter(|e| e.modify_index > forged_at)?;
        let record = ring_client::consul_ring::decode_record(&entry.value).ok()?;
        (record.leader == first.endpoint).then_some(record)
    })
    .await;
    assert_eq!(restored.lock_index, 1);
    let (lock, _) = ring.consul.get(&ring.lock_key(), None).await.unwrap();
    let lock = lock.unwrap();
    assert_eq!(
        restored.session, lock.session,
        "stamped with the holder's session"
    );
    assert_eq!(lock.lock_index, 1, "nobody else took the lock");
    assert_eq!(restored.saved, good.saved, "the ring it held, written back");
    assert_eq!(
        ring.leader().await.unwrap(),
        Some(first.clone()),
        "it kept leading"
    );
    assert!(!evil(&watcher.current()), "a reader took the forged ring");
    assert!(watcher.current().epoch() < 1_000_000);

    // 2. The leader dies (its guard with it), a forged record lands, and its session lapses:
    // the other ring manager leads from the last good ring it saw, not from KV.
    let (index, _) = managers
        .iter()
        .enumerate()
        .find(|(_, (c, _, _))| c.endpoint == first.endpoint)
        .unwrap();
    let (_, stop, task) = managers.remove(index);
    task.abort();
    stop.cancel();
    let _ = task.await;
    let (last, _) = ring.load().await.unwrap();
    let last = last.unwrap();
    assert_eq!(last.leader, first.endpoint, "the dead leader's last record");
    let dead = lock.session.unwrap();
    let forged_at = forge(&fake, &ring).await;
    fake.expire_session(&dead);
    let second = eventually("a new leader", || async {
        ring.leader()
            .await
            .unwrap()
            .filter(|l| l.endpoint != first.endpoint)
    })
    .await;
    let stamped = eventually("the new leader's record in KV", || async {
        let (entry, _) = ring.consul.get(&ring.ring_key(), None).await.unwrap();
        let entry = entry.filter(|e| e.modify_index > forged_at)?;
        ring_client::consul_ring::decode_record(&entry.value).ok()
    })
    .await;
    assert_eq!(stamped.leader, second.endpoint);
    assert_eq!(stamped.lock_index, 2);
    assert!(
        stamped.saved.epoch >= last.saved.epoch && stamped.saved.epoch < 1_000_000,
        "resumed the last good ring (epoch {}), not the forged one: {}",
        last.saved.epoch,
        stamped.saved.epoch
    );
    assert!(stamped.saved.members.iter().any(|m| m.id == "cs-1"));
    assert!(!evil(&stamped.saved.ring().unwrap()));

    // Readers never took the forged ring, and the new leader's next one reaches them.
    assert!(!evil(&watcher.current()));
    let next = register(&source, "cs-2", 10).await;
    let after = watcher
        .wait_for_epoch(next, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(after.nodes().iter().any(|n| n.id.as_str() == "cs-2"));
    assert!(!evil(&after));

    cancel.cancel();
    for (_, _, task) in managers {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    tracker.close();
    tracker.wait().await;
}

/// Every call the Consul client makes carries the ACL token: against a Consul with ACLs on
/// (default deny), each works with the management token, and each fails with a clear refusal
/// that names the flag without it or with a wrong one.
#[tokio::test]
async fn every_consul_call_carries_the_acl_token_and_fails_clearly_without_it() {
    let fake = FakeConsul::start().await.unwrap();
    fake.require_token(Some(TOKEN));
    let with = Consul::new(&fake.url(), Some(TOKEN.into())).unwrap();
    let def = ring_client::consul_ring::service_def(
        "gateway",
        "acl-1",
        "127.0.0.1:8080".parse().unwrap(),
        None,
        vec![],
    );

    // With the token: every call.
    let session = with.create_session("acl", TTL, LOCK_DELAY).await.unwrap();
    assert!(with.renew_session(&session).await.unwrap());
    assert!(
        with.acquire("acl/ring-manager/leader", &session, vec![])
            .await
            .unwrap()
    );
    let (lock, _) = with.get("acl/ring-manager/leader", None).await.unwrap();
    assert_eq!(lock.unwrap().session.as_deref(), Some(session.as_str()));
    with.fenced_cas("acl/ring-manager/leader", &session, "acl/ring", b"r", 0)
        .await
        .unwrap()
        .unwrap();
    let (entries, _) = with.list("acl/ring", None).await.unwrap();
    assert_eq!(entries.len(), 2, "the lock and the ring");
    with.register_service(&def).await.unwrap();
    assert!(
        with.update_check(&def.check_id(), true, "ok")
            .await
            .unwrap()
    );
    assert_eq!(
        with.health_service(&def.name, false).await.unwrap().len(),
        1
    );
    let ring = ConsulRing::new(&fake.url(), Some(TOKEN.into()), "acl").unwrap();
    let (snapshot, _) = ring.snapshot(None).await.unwrap();
    assert!(snapshot.lock.is_some() && snapshot.ring.is_some());

    // Without it (the anonymous token) and with a wrong one: refused, clearly.
    let denied = |result: Result<(), ring_client::consul::ConsulError>, what: &str, says: &str| {
        let error = result.expect_err(what);
        let text = error.to_string();
        assert!(
            matches!(error, ring_client::consul::ConsulError::Denied { .. }),
            "{what}: {text}"
        );
        assert!(text.contains(says), "{what}: {text}");
        assert!(
            text.contains("--consul-token or CONSUL_HTTP_TOKEN"),
            "{what}: {text}"
        );
    };
    for (client, says) in [
        (Consul::new(&fake.url(), None).unwrap(), "Permission denied"),
        (
            Consul::new(&fake.url(), Some("not-the-token".into())).unwrap(),
            "ACL not found",
        ),
    ] {
        denied(
            client.create_session("x", TTL, LOCK_DELAY).await.map(drop),
            "session create",
            says,
        );
        denied(
            client.renew_session(&session).await.map(drop),
            "renew",
            says,
        );
        denied(
            client
                .acquire("acl/ring-manager/leader", &session, vec![])
                .await
                .map(drop),
            "acquire",
            says,
        );
        denied(client.get("acl/ring", None).await.map(drop), "get", says);
        denied(
            client.register_service(&def).await,
            "service register",
            says,
        );
        denied(
            client
                .update_check(&def.check_id(), true, "ok")
                .await
                .map(drop),
            "check update",
            says,
        );
        denied(client.deregister_service(&def.id).await, "deregister", says);
        denied(
            client
                .release("acl/ring-manager/leader", &session)
                .await
                .map(drop),
            "release",
            says,
        );
        denied(client.destroy_session(&session).await, "destroy", says);
        let ring = ConsulRing::new(&fake.url(), None, "acl").unwrap();
        let ring = ConsulRing {
            consul: client.clone(),
            ..ring
        };
        let watched = ring.snapshot(None).await.map(|_| ()).map_err(|e| match e {
            ring_client::Error::Consul(e) => e,
            other => panic!("{other}"),
        });
        denied(watched, "the ring watch's read", says);
    }
    // What Consul filters rather than refuses, for the anonymous token.
    let anonymous = Consul::new(&fake.url(), None).unwrap();
    let (entries, _) = anonymous.list("acl/ring", None).await.unwrap();
    assert!(entries.is_empty(), "an anonymous list reads nothing");
    assert!(
        anonymous
            .health_service(&def.name, false)
            .await
            .unwrap()
            .is_empty()
    );
    let refused = anonymous
        .fenced_cas("acl/ring-manager/leader", &session, "acl/ring", b"x", 0)
        .await
        .unwrap()
        .unwrap_err();
    assert!(refused.denied(), "{refused:?}");
    assert_eq!(fake.kv_value("acl/ring").unwrap(), b"r", "nothing written");

    with.deregister_service(&def.id).await.unwrap();
    assert!(
        with.release("acl/ring-manager/leader", &session)
            .await
            .unwrap()
    );
    with.destroy_session(&session).await.unwrap();
}

/// A report of gateway `gateway` of `region` that holds no revocation yet.
fn report(gateway: &str, region: &str) -> mesh_proto::ring::GatewayReport {
    mesh_proto::ring::GatewayReport {
        gateway: gateway.into(),
        region: region.into(),
        url: format!("http://{gateway}.internal"),
        connections: 1,
        revocations_generation: 0,
        revocations_version: 0,
        ..Default::default()
    }
}

/// The leader at `endpoint`, once it answers.
async fn leader_client(
    endpoint: &str,
) -> mesh_proto::ring::ring_manager_client::RingManagerClient<tonic::transport::Channel> {
    eventually("the leader answers", || async {
        let mut client =
            mesh_proto::ring::ring_manager_client::RingManagerClient::connect(endpoint.to_string())
                .await
                .ok()?;
        client
            .get_ring(mesh_proto::ring::GetRingRequest {})
            .await
            .ok()?;
        Some(client)
    })
    .await
}

#[tokio::test]
async fn drains_and_revocations_survive_a_leader_failover_in_the_same_ring_generation() {
    use mesh_proto::ring::{
        DrainRegionRequest, GetRingRequest, RegionsRequest, RevokeTokensRequest, RevokedToken,
    };
    let fake = FakeConsul::start().await.unwrap();
    let ring = ConsulRing::new(&fake.url(), None, "durable").unwrap();
    let cancel = CancellationToken::new();
    let mut managers: Vec<_> = (0..2).map(|_| start_ring_manager(&ring, &cancel)).collect();
    let first = eventually("a leader", || async { ring.leader().await.unwrap() }).await;
    let mut rm = leader_client(&first.endpoint).await;
    for (gateway, region) in [("us-1", "us"), ("eu-1", "eu")] {
        rm.report_gateway(report(gateway, region)).await.unwrap();
    }
    rm.drain_region(DrainRegionRequest {
        region: "eu".into(),
        rate: 9,
    })
    .await
    .unwrap();
    let expires_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    rm.revoke_tokens(RevokeTokensRequest {
        jtis: vec![RevokedToken {
            jti: "j-failover".into(),
            expires_at,
        }],
    })
    .await
    .unwrap();
    let generation = rm
        .get_ring(GetRingRequest {})
        .await
        .unwrap()
        .into_inner()
        .generation;
    assert_ne!(generation, 0);
    // Answered only once written to KV, fenced, with the ring.
    let (stored, _) = ring.load().await.unwrap();
    let stored = stored.unwrap();
    assert_eq!(stored.saved.generation, generation);
    assert_eq!(stored.saved.draining_regions.len(), 1);
    assert_eq!(stored.saved.revoked.len(), 1);

    // The leader dies without a word; the other takes over from KV.
    let second = fail_over(&fake, &ring, &mut managers, &first).await;
    let mut rm = leader_client(&second.endpoint).await;
    let served = rm.get_ring(GetRingRequest {}).await.unwrap().into_inner();
    assert_eq!(served.generation, generation, "the same ring history");
    let view = rm.regions(RegionsRequest {}).await.unwrap().into_inner();
    let eu = view.regions.iter().find(|r| r.region == "eu");
    assert!(eu.is_some_and(|r| r.draining && r.rate == 9), "{view:?}");
    let directive = rm
        .report_gateway(report("us-2", "us"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(directive.revoked.len(), 1, "{directive:?}");
    assert_eq!(directive.revoked[0].jti, "j-failover");

    cancel.cancel();
    for (_, _, task) in managers {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
}

#[tokio::test]
async fn a_change_the_leader_cannot_write_to_consul_is_not_acknowledged() {
    use mesh_proto::ring::{DrainRegionRequest, RegionsRequest};
    let fake = FakeConsul::start().await.unwrap();
    let ring = ConsulRing::new(&fake.url(), None, "unwritten").unwrap();
    let cancel = CancellationToken::new();
    let (_config, _stop, task) = start_ring_manager(&ring, &cancel);
    let leader = eventually("a leader", || async { ring.leader().await.unwrap() }).await;
    let mut rm = leader_client(&leader.endpoint).await;
    for (gateway, region) in [("us-1", "us"), ("eu-1", "eu")] {
        rm.report_gateway(report(gateway, region)).await.unwrap();
    }
    let drain = DrainRegionRequest {
        region: "eu".into(),
        rate: 9,
    };
    // Consul stops answering (for less than the session TTL: this one still leads).
    fake.set_unavailable(true);
    let status = rm.drain_region(drain.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("not yet written to consul"),
        "{status:?}"
    );
    // Back: the leader's writer, which kept trying, writes it.
    fake.set_unavailable(false);
    eventually("the drain written to KV", || async {
        let (stored, _) = ring.load().await.ok()?;
        (stored?.saved.draining_regions.len() == 1).then_some(())
    })
    .await;
    let view = rm.regions(RegionsRequest {}).await.unwrap().into_inner();
    assert!(view.regions.iter().any(|r| r.region == "eu" && r.draining));
    // And the next change is answered once written.
    rm.undrain_region(drain).await.unwrap();
    let (stored, _) = ring.load().await.unwrap();
    assert!(stored.unwrap().saved.draining_regions.is_empty());

    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

/// One ring manager campaigning on `ring` with session TTL `ttl` until `cancel`, and once it
/// leads: whether it still does, its gRPC address, its session, and its task.
struct Alone {
    leading: tokio::sync::watch::Receiver<Option<ring_manager::RingManager>>,
    listen: std::net::SocketAddr,
    session: String,
    task: tokio::task::JoinHandle<Result<(), ring_manager::Error>>,
}

impl Alone {
    async fn lead(ring: &ConsulRing, ttl: Duration, cancel: &CancellationToken) -> Alone {
        let listen = free_port();
        let config = LeaderConfig {
            endpoint: format!("http://{listen}"),
            listen,
            session_ttl: ttl,
            lock_delay: LOCK_DELAY,
            nearest: vec![],
        };
        let (leadership, leading) = tokio::sync::watch::channel(None);
        let authorizer = mesh_transport::Authorizer::new(&mesh_telemetry::Telemetry::default());
        let task = tokio::spawn(cluster::run_leader_election_with(
            ring.clone(),
            ring_manager::Config::default(),
            config,
            leadership,
            authorizer,
            cancel.clone(),
        ));
        eventually("it leads", || async {
            leading.borrow().is_some().then_some(())
        })
        .await;
        let (lock, _) = ring.consul.get(&ring.lock_key(), None).await.unwrap();
        let session = lock.unwrap().session.unwrap();
        Alone {
            leading,
            listen,
            session,
            task,
        }
    }

    /// Waits until it no longer leads.
    async fn stepped_down(&self) {
        eventually("it steps down", || async {
            self.leading.borrow().is_none().then_some(())
        })
        .await;
    }
}

/// A leader whose session Consul invalidates (its TTL lapsed on Consul's side, an operator
/// destroyed it) and whose lock another session then takes stops serving at once: it watches
/// the lock and its session, rather than waiting for its next renewal to fail (a third of a TTL
/// that here is far longer than the wait).
#[tokio::test]
async fn a_deposed_leader_steps_down_without_waiting_for_its_renewals() {
    let fake = FakeConsul::start().await.unwrap();
    let ring = ConsulRing::new(&fake.url(), None, "deposed").unwrap();
    let cancel = CancellationToken::new();
    // Renewals every 40 s: the test's 20 s wait is over long before the first one.
    let leader = Alone::lead(&ring, Duration::from_secs(120), &cancel).await;

    // Consul invalidates its session; once the lock delay is over, another session takes the
    // lock.
    fake.expire_session(&leader.session);
    let usurper = ring
        .consul
        .create_session("usurper", TTL, LOCK_DELAY)
        .await
        .unwrap();
    eventually("the usurper holds the lock", || async {
        let info = serde_json::to_vec(&cluster::LeaderInfo {
            endpoint: "http://127.0.0.1:1".into(),
            pid: 1,
        })
        .unwrap();
        ring.consul
            .acquire(&ring.lock_key(), &usurper, info)
            .await
            .unwrap()
            .then_some(())
    })
    .await;
    leader.stepped_down().await;
    assert!(
        tokio::net::TcpStream::connect(leader.listen).await.is_err(),
        "its gRPC port is closed"
    );
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), leader.task).await;
}

/// A TCP proxy to `upstream` that, once `stalled` is set, blackholes every byte both ways on
/// every connection, old and new, without closing any: Consul gone without a reset.
async fn stalling_proxy(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stalled.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, flag.clone()));
            tokio::spawn(pump(sr, cw, flag.clone()));
        }
    });
    (addr, stalled)
}

/// Copies `from` to `to` until either closes, dropping every byte while `stalled`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A leader cut off from Consul cannot watch its lock: it steps down on its own, before Consul
/// may invalidate its session (a TTL after the last renewal) and let another ring manager take
/// the lock — not after its renewals have failed for a whole TTL, when another may lead already.
#[tokio::test]
async fn a_leader_cut_off_from_consul_steps_down_before_its_session_can_lapse() {
    let fake = FakeConsul::start().await.unwrap();
    // The leader reaches Consul through a proxy that will blackhole it; the test directly.
    let (proxy, stalled) = stalling_proxy(fake.addr()).await;
    let ring = ConsulRing::new(&format!("http://{proxy}"), None, "cut-off").unwrap();
    let direct = ConsulRing::new(&fake.url(), None, "cut-off").unwrap();
    let cancel = CancellationToken::new();
    let leader = Alone::lead(&ring, TTL, &cancel).await;

    stalled.store(true, std::sync::atomic::Ordering::SeqCst);
    leader.stepped_down().await;
    // Consul has not invalidated its session yet: nobody else could have taken the lock.
    let (lock, _) = direct.consul.get(&direct.lock_key(), None).await.unwrap();
    assert_eq!(
        lock.and_then(|l| l.session),
        Some(leader.session),
        "it stepped down only after its session lapsed"
    );
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), leader.task).await;
}

/// With replication, the ring record in KV carries every slot's followers, and the next
/// leader serves them as they were.
#[tokio::test]
async fn the_followers_are_kept_in_consul_and_served_by_the_next_leader() {
    let fake = FakeConsul::start().await.unwrap();
    let ring = ConsulRing::new(&fake.url(), None, "replicas").unwrap();
    let cancel = CancellationToken::new();
    // Registered nodes here never heartbeat: nobody is suspected within the test.
    let manager = ring_manager::Config {
        replication_factor: 2,
        suspect_after: Duration::from_secs(60),
        ..ring_manager::Config::default()
    };
    let mut managers = campaigners(&ring, manager, &cancel);
    let first = eventually("a leader", || async { ring.leader().await.unwrap() }).await;
    let source = RingSource::Consul(ring.clone());
    for (i, node) in ["cs-1", "cs-2", "cs-3"].iter().enumerate() {
        register(&source, node, 20 + i as u16).await;
    }
    let stored = eventually("three nodes in kv", || async {
        let (record, _) = ring.load().await.unwrap();
        let stored = record?.saved.ring().ok()?;
        (stored.nodes().len() == 3).then_some(stored)
    })
    .await;
    assert!(stored.is_replicated());
    for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
        let owner = &stored.owner(s).unwrap().id;
        let followers: Vec<&NodeId> = stored.followers(s).map(|f| &f.id).collect();
        assert_eq!(followers.len(), 1, "slot {s}");
        assert_ne!(followers[0], owner);
    }

    let second = fail_over(&fake, &ring, &mut managers, &first).await;
    let mut client = leader_client(&second.endpoint).await;
    let served = client
        .get_ring(mesh_proto::ring::GetRingRequest {})
        .await
        .unwrap()
        .into_inner();
    let served = ring_client::convert::ring_from_proto(served).unwrap();
    assert!(
        served.same_assignment(&stored),
        "{served:?} vs {stored:?}: owners and followers as stored"
    );
    cancel.cancel();
    for (_, _, task) in managers {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
}
