//! Replication as the ring manager runs it, over its real gRPC API: nodes that register and
//! hold leases by heartbeat (stand-ins for channel servers, so that a test decides what they
//! report), every published ring with its followers, a dead node's slots promoted to them, drain
//! and replace by promotion with their handoffs, an added node that leads once its copies are
//! filled, and the followers kept across a restart from the state file.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::{NodeId, Ring, SLOT_COUNT, Slot};
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use mesh_proto::ring::{GetRingRequest, Heartbeat, NodeRequest, RegisterRequest};
use ring_manager::config::{Backend, ProcessConfig};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use support::eventually;
use tonic::transport::Channel;

/// How often a stand-in node sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_millis(50);

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// A ring manager with `factor`, on port 0, saving to `state_file` if given.
struct Manager {
    endpoint: String,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Manager {
    async fn start(factor: usize, state_file: Option<PathBuf>) -> Manager {
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut config = ProcessConfig::embedded(
            ring_manager::Config {
                replication_factor: factor,
                ..ring_manager::Config::default()
            },
            loopback,
            loopback,
        );
        config.backend = Backend::Embedded { state_file };
        let cancel = CancellationToken::new();
        let bound = ring_manager::run::bind(config, &cancel).await.unwrap();
        let endpoint = format!("http://{}", bound.local_addr());
        let serving = cancel.clone();
        let task = tokio::spawn(async move {
            let _ = bound.serve(serving).await;
        });
        Manager {
            endpoint,
            cancel,
            task,
        }
    }

    async fn client(&self) -> RingManagerClient<Channel> {
        RingManagerClient::connect(self.endpoint.clone())
            .await
            .unwrap()
    }

    /// The current ring, and each member's (slots followed, catching up) by id.
    async fn ring(&self) -> (Ring, Vec<(String, String, u32, u32)>) {
        let proto = self
            .client()
            .await
            .get_ring(GetRingRequest {})
            .await
            .unwrap()
            .into_inner();
        let members = proto
            .members
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    m.state.clone(),
                    m.slots_followed,
                    m.catching_up,
                )
            })
            .collect();
        (
            ring_client::convert::ring_from_proto(proto).unwrap(),
            members,
        )
    }

    /// Waits for a ring that satisfies `check`.
    async fn ring_where(&self, what: &str, check: impl Fn(&Ring) -> bool) -> Ring {
        eventually(what, || async {
            let (ring, _) = self.ring().await;
            check(&ring).then_some(ring)
        })
        .await
    }

    async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A stand-in channel server: registered, holding its lease by heartbeat, reporting the
/// replication progress the test sets. It never reports a handoff done: a node it drains stays
/// draining.
struct Node {
    incarnation: u64,
    /// (catching_up, catching_up_epoch) its heartbeats report.
    progress: watch::Sender<(u32, u64)>,
    /// Stops its heartbeats and ends its lease stream, as a crash would.
    stop: CancellationToken,
}

impl Node {
    async fn start(manager: &Manager, name: &str, port: u16, standby: bool) -> Node {
        let mut client = manager.client().await;
        let reply = client
            .register(RegisterRequest {
                node_id: name.into(),
                // Nothing listens there: a probe of a silent node fails.
                addr: format!("127.0.0.1:{port}"),
                pid: u32::from(port),
                standby,
            })
            .await
            .unwrap()
            .into_inner();
        let (progress, reports) = watch::channel((0, 0));
        let stop = CancellationToken::new();
        let (beats, stream) = mpsc::channel(16);
        let mut replies = client
            .lease(ReceiverStream::new(stream))
            .await
            .unwrap()
            .into_inner();
        tokio::spawn(async move { while let Some(Ok(_)) = replies.next().await {} });
        let (node, incarnation, stopped) = (name.to_string(), reply.incarnation, stop.clone());
        tokio::spawn(async move {
            for seq in 0.. {
                let (catching_up, catching_up_epoch) = *reports.borrow();
                let beat = Heartbeat {
                    node_id: node.clone(),
                    incarnation,
                    seq,
                    handed_off_epoch: 0,
                    catching_up,
                    catching_up_epoch,
                };
                if beats.send(beat).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                }
            }
        });
        Node {
            incarnation,
            progress,
            stop,
        }
    }
}

/// Starts `active` active nodes, then `standby` standbys (ports 1, 2, ...: nothing listens).
async fn nodes(manager: &Manager, active: &[&str], standby: &[&str]) -> Vec<Node> {
    let mut all = Vec::new();
    for (i, name) in active.iter().enumerate() {
        all.push(Node::start(manager, name, 1 + i as u16, false).await);
    }
    for (i, name) in standby.iter().enumerate() {
        let port = 1 + (active.len() + i) as u16;
        all.push(Node::start(manager, name, port, true).await);
    }
    all
}

/// Checks every slot has `followers` followers, none its owner.
fn assert_followed(ring: &Ring, followers: usize) {
    for s in 0..SLOT_COUNT as Slot {
        let owner = &ring.owner(s).unwrap().id;
        let list: Vec<&NodeId> = ring.followers(s).map(|f| &f.id).collect();
        assert_eq!(list.len(), followers, "slot {s} in {ring:?}");
        assert!(!list.contains(&owner), "slot {s}'s owner follows it");
    }
}

/// The handoffs `ring` names, as sorted (from, to) pairs.
fn handoffs(ring: &Ring) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = ring
        .handoffs()
        .iter()
        .map(|h| (h.from.to_string(), h.to.to_string()))
        .collect();
    pairs.sort();
    pairs
}

/// Checks `after` gave each of `node`'s slots in `before` to the slot's first follower and
/// moved no other slot.
fn assert_promoted(before: &Ring, after: &Ring, node: &str) {
    for s in 0..SLOT_COUNT as Slot {
        let expected = if before.owns(&id(node), s) {
            before.followers(s).next()
        } else {
            before.owner(s)
        };
        assert_eq!(after.owner(s), expected, "slot {s}");
    }
}

#[tokio::test]
async fn every_ring_watched_has_followers_and_a_dead_nodes_slots_go_to_them() {
    let manager = Manager::start(2, None).await;
    let mut watch = manager
        .client()
        .await
        .watch_ring(mesh_proto::ring::WatchRingRequest {})
        .await
        .unwrap()
        .into_inner();
    let nodes = nodes(&manager, &["cs-1", "cs-2", "cs-3"], &["cs-4"]).await;
    let before = manager
        .ring_where("three owners", |r| r.nodes().len() == 3)
        .await;
    assert_followed(&before, 1);
    let (_, members) = manager.ring().await;
    for (member, state, followed, _) in &members {
        let expected = if state == "standby" {
            0
        } else {
            before.slots_followed(&id(member)) as u32
        };
        assert_eq!(*followed, expected, "{member}");
    }

    // cs-1 dies: its stream ends and the probe finds nothing.
    nodes[0].stop.cancel();
    let after = manager
        .ring_where("cs-1 declared down", |r| r.epoch() > before.epoch())
        .await;
    assert_eq!(after.epoch(), before.epoch() + 1);
    assert_promoted(&before, &after, "cs-1");
    assert!(after.handoffs().is_empty(), "nobody hands off for the dead");
    let gained = |n: &str| after.slots_owned(&id(n)) - before.slots_owned(&id(n));
    assert!(
        gained("cs-2").abs_diff(gained("cs-3")) <= 1,
        "spread evenly: {} and {}",
        gained("cs-2"),
        gained("cs-3")
    );
    assert_eq!(after.slots_owned(&id("cs-4")), 0);
    assert!(after.slots_followed(&id("cs-4")) > 0, "the standby follows");
    assert_followed(&after, 1);

    // Every ring the watch streamed had its followers (one node: none possible).
    let mut seen = Vec::new();
    while let Ok(Some(Ok(proto))) =
        tokio::time::timeout(Duration::from_millis(100), watch.next()).await
    {
        let ring = ring_client::convert::ring_from_proto(proto).unwrap();
        seen.push(ring.epoch());
        let want = ring.nodes().len().saturating_sub(1).min(1);
        if !ring.nodes().is_empty() {
            assert_followed(&ring, want);
        }
    }
    assert!(seen.contains(&after.epoch()), "{seen:?}");
    manager.stop().await;
}

#[tokio::test]
async fn with_factor_one_the_standby_takes_over_as_before() {
    let manager = Manager::start(1, None).await;
    let nodes = nodes(&manager, &["cs-1", "cs-2"], &["cs-3"]).await;
    let before = manager
        .ring_where("two owners", |r| r.nodes().len() == 2)
        .await;
    assert!(!before.is_replicated());
    nodes[0].stop.cancel();
    let after = manager
        .ring_where("cs-1 declared down", |r| r.epoch() > before.epoch())
        .await;
    for s in 0..SLOT_COUNT as Slot {
        let expected = if before.owns(&id("cs-1"), s) {
            "cs-3"
        } else {
            "cs-2"
        };
        assert!(after.owns(&id(expected), s), "slot {s}");
    }
    assert!(!after.is_replicated());
    manager.stop().await;
}

#[tokio::test]
async fn drain_and_replace_promote_followers_with_handoffs_from_the_old_owner() {
    let manager = Manager::start(2, None).await;
    let _nodes = nodes(&manager, &["cs-1", "cs-2", "cs-3", "cs-4"], &["cs-5"]).await;
    let before = manager
        .ring_where("four owners", |r| r.nodes().len() == 4)
        .await;
    let mut client = manager.client().await;
    let drained = client
        .drain_node(NodeRequest {
            node_id: "cs-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let drained = ring_client::convert::ring_from_proto(drained).unwrap();
    assert_promoted(&before, &drained, "cs-2");
    let heirs: Vec<(String, String)> = ["cs-1", "cs-3", "cs-4"]
        .iter()
        .map(|to| ("cs-2".to_string(), to.to_string()))
        .collect();
    assert_eq!(handoffs(&drained), heirs);
    assert_followed(&drained, 1);

    let replaced = client
        .replace_node(NodeRequest {
            node_id: "cs-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let replaced = ring_client::convert::ring_from_proto(replaced).unwrap();
    assert_promoted(&drained, &replaced, "cs-3");
    let heirs: Vec<(String, String)> = ["cs-1", "cs-4"]
        .iter()
        .map(|to| ("cs-3".to_string(), to.to_string()))
        .collect();
    assert_eq!(handoffs(&replaced), heirs);
    assert_eq!(replaced.slots_owned(&id("cs-5")), 0);
    assert!(replaced.slots_followed(&id("cs-5")) > 0);
    assert_followed(&replaced, 1);
    let (_, members) = manager.ring().await;
    let state = |n: &str| members.iter().find(|m| m.0 == n).unwrap().1.clone();
    assert_eq!(state("cs-5"), "joining");
    manager.stop().await;
}

#[tokio::test]
async fn an_added_standby_follows_first_and_leads_once_its_heartbeats_report_its_copies_filled() {
    let manager = Manager::start(2, None).await;
    let nodes = nodes(&manager, &["cs-1", "cs-2"], &["cs-3"]).await;
    let before = manager
        .ring_where("two owners", |r| r.nodes().len() == 2)
        .await;
    let joined = manager
        .client()
        .await
        .add_node(NodeRequest {
            node_id: "cs-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let joined = ring_client::convert::ring_from_proto(joined).unwrap();
    let s = id("cs-3");
    assert_eq!(joined.epoch(), before.epoch() + 1);
    assert_eq!(joined.slots_owned(&s), 0, "it owns nothing yet");
    assert!(joined.slots_followed(&s) > 0, "it follows");
    assert!(joined.handoffs().is_empty());
    let node = &nodes[2];

    // Caught up, but counted in the ring before it joined: unknown. Then still filling.
    node.progress.send_replace((0, before.epoch()));
    node.progress.send_replace((5, joined.epoch()));
    let (ring, members) = eventually("the progress shown", || async {
        let (ring, members) = manager.ring().await;
        let cs3 = members.iter().find(|m| m.0 == "cs-3")?.clone();
        (cs3.3 == 5).then_some((ring, members))
    })
    .await;
    assert_eq!(ring.epoch(), joined.epoch(), "not while it catches up");
    let cs3 = members.iter().find(|m| m.0 == "cs-3").unwrap();
    assert_eq!(
        (cs3.1.as_str(), cs3.2),
        ("joining", joined.slots_followed(&s) as u32)
    );

    // Filled: it leads its share, on slots it followed, handed off by their old owners.
    node.progress.send_replace((0, joined.epoch()));
    let led = manager
        .ring_where("cs-3 leads", |r| r.slots_owned(&s) > 0)
        .await;
    assert_eq!(led.epoch(), joined.epoch() + 1);
    assert_eq!(led.slots_owned(&s), SLOT_COUNT / 3);
    for slot in 0..SLOT_COUNT as Slot {
        if led.owns(&s, slot) {
            assert!(
                joined.follows(&s, slot),
                "slot {slot}: led where it followed"
            );
        }
    }
    assert_eq!(
        handoffs(&led),
        [
            ("cs-1".to_string(), "cs-3".to_string()),
            ("cs-2".to_string(), "cs-3".to_string())
        ]
    );
    assert_followed(&led, 1);
    let (_, members) = manager.ring().await;
    assert_eq!(members.iter().find(|m| m.0 == "cs-3").unwrap().1, "active");
    assert_eq!(node.incarnation, 3);
    manager.stop().await;
}

#[tokio::test]
async fn a_restarted_ring_manager_resumes_its_followers_from_the_state_file() {
    let dir = std::env::temp_dir().join(format!("channelmesh-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ring.json");
    let _ = std::fs::remove_file(&path);
    let manager = Manager::start(2, Some(path.clone())).await;
    let _nodes = nodes(&manager, &["cs-1", "cs-2", "cs-3"], &[]).await;
    let before = manager
        .ring_where("three owners", |r| r.nodes().len() == 3)
        .await;
    assert!(before.is_replicated());
    manager.stop().await;
    let saved = ring_manager::state_file::load(&path).unwrap().unwrap();
    assert!(saved.ring().unwrap().same_assignment(&before));

    let resumed = Manager::start(2, Some(path.clone())).await;
    let (ring, _) = resumed.ring().await;
    assert!(ring.same_assignment(&before), "{ring:?} vs {before:?}");
    assert_eq!(ring.generation(), Arc::new(before).generation());
    resumed.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
