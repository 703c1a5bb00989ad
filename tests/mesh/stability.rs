//! Static stability and fencing with real processes: a frozen ring manager costs no publish,
//! and a channel server cut off from the ring manager while its peers still hear it stops
//! accepting writes before its slots are given away.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use channel_client::wire::event_to_proto;
use mesh_core::{ChannelEvent, ChannelId, EventBody, NodeId, Ring, UserId};
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_proto::channel::{LeaseStatusRequest, PublishRequest};
use mesh_transport::Role;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::processes::{ADMIN_TOKEN, BIN, Dev, signal};
use crate::support::{
    acting_as, admin_at, child_tls, eventually, eventually_within, poster, ring_with, state_of,
};

/// How long the processes a test starts itself may take to form a ring.
const STARTUP: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_ring_manager_frozen_for_ten_seconds_fails_no_publish() {
    let dev = Dev::start("rm-frozen-10s");
    let admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let (before, _) = ring_with(dev.ring_manager, &dev.operator).await;
    let stop = CancellationToken::new();
    let posts = poster(&admin, "CSTABLE", stop.clone());
    posts.acked_since(Instant::now(), 20).await;

    signal(dev.ring_manager_pid, Signal::SIGSTOP);
    // The fault itself, not a wait for anything: the ring manager stays frozen for 10 s while
    // the posts go on (every lease lapses after 400 ms; the channel servers find that none of
    // them hears the ring manager and keep serving on the ring they know).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let frozen_posts = posts.next_index();
    signal(dev.ring_manager_pid, Signal::SIGCONT);
    posts.acked_since(Instant::now(), 20).await;
    stop.cancel();
    let (acked, failed) = posts.finish().await;
    assert_eq!(failed, 0, "posts failed around the freeze");
    assert!(acked.len() >= frozen_posts, "{} acked", acked.len());

    // Its own freeze counted as nobody's silence: the ring keeps its active nodes.
    let (after, members) = ring_with(dev.ring_manager, &dev.operator).await;
    assert!(after.same_assignment(&before), "{members:?}");
    assert!(members.iter().all(|m| m.state != "down"), "{members:?}");
}

/// A TCP proxy to the ring manager for one channel server: it forwards, blackholes the
/// connections it has (every byte dropped, nothing closed: a dead path), or cuts them all and
/// refuses new ones (a partition).
struct PathToRingManager {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Connections numbered below this are blackholed.
    dead_below: Arc<AtomicUsize>,
    /// Every connection is closed and new ones refused.
    cut: CancellationToken,
}

impl PathToRingManager {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, dead_below) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let cut = CancellationToken::new();
        let (count, dead, stop) = (accepted.clone(), dead_below.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if stop.is_cancelled() {
                    continue; // Dropped at once: refused.
                }
                let n = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (from, to) in [(cr, sw), (sr, cw)] {
                    let (dead, stop) = (dead.clone(), stop.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = pump(from, to, n, dead) => {}
                        }
                    });
                }
            }
        });
        PathToRingManager {
            addr,
            accepted,
            dead_below,
            cut,
        }
    }

    /// Blackholes every connection made so far; returns how many there were.
    fn blackhole_existing(&self) -> usize {
        let n = self.accepted.load(Ordering::SeqCst);
        self.dead_below.store(n, Ordering::SeqCst);
        n
    }
}

/// Copies `from` to `to`, dropping every byte once connection `n` is blackholed.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, n: usize, dead: Arc<AtomicUsize>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if n < dead.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..read]).await.is_err() {
            return;
        }
    }
}

/// A channel that `node` owns on `ring`.
fn owned_by(ring: &Ring, node: &NodeId) -> ChannelId {
    (0..)
        .map(|i| ChannelId::new(&format!("CCUT{i}")).unwrap())
        .find(|c| ring.owner_of(c).is_some_and(|o| &o.id == node))
        .unwrap()
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `channelmesh <args>` with the `--tls-*` flags `tls`; killed on drop.
fn service(tls: &[String], args: &[&str]) -> Child {
    Command::new(BIN)
        .args(tls)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A publish of `text` to `channel` on the channel server at `addr`, as an admin server would.
async fn publish(
    client: &mut ChannelServerClient<Channel>,
    epoch: u64,
    channel: &ChannelId,
    text: &str,
) -> Result<String, tonic::Status> {
    let event = ChannelEvent {
        channel: channel.clone(),
        ts: None,
        body: EventBody::Message {
            user: UserId::new("UPOSTER").unwrap(),
            text: text.into(),
            team: None,
        },
        origin: None,
    };
    let request = PublishRequest {
        epoch,
        event: Some(event_to_proto(&event)),
        idempotency_key: String::new(),
    };
    let call = client.publish(request);
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(reply) => reply.map(|r| r.into_inner().ts),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 5 s")),
    }
}

#[tokio::test]
async fn a_channel_server_cut_off_from_the_ring_manager_fences_before_its_slots_move() {
    // Every certificate first: issuing one rewrites the CA file a starting process reads.
    let rm_tls = child_tls(Role::RingManager, "rm");
    let cs_tls: Vec<_> = ["cs-1", "cs-2", "cs-3", "cs-4"]
        .iter()
        .map(|id| child_tls(Role::ChannelServer, id))
        .collect();
    let rm = free_addr();
    let _rm = service(&rm_tls, &["ring-manager", "--listen", &rm.to_string()]);
    eventually_within("the ring manager listens", STARTUP, || async {
        TcpStream::connect(rm).await.ok().map(|_| ())
    })
    .await;
    let path = PathToRingManager::start(rm).await;
    let rm_url = format!("http://{rm}");
    let via_proxy = format!("http://{}", path.addr);
    let mut servers = Vec::new();
    let paths = [("cs-1", &rm_url), ("cs-2", &rm_url), ("cs-3", &via_proxy)];
    for ((id, ring_manager), tls) in paths.into_iter().zip(&cs_tls) {
        // On a port of its own choosing, advertised as bound.
        let args = [
            "channel-server",
            "--id",
            id,
            "--listen",
            "127.0.0.1:0",
            "--ring-manager",
            ring_manager,
        ];
        servers.push(service(tls, &args));
    }
    let operator = acting_as(Role::Operator, "operator");
    // Started after a build, the processes can be slow to come up the first time.
    let ring = eventually_within("three active channel servers", STARTUP, || async {
        let (ring, _) = ring_with(rm, &operator).await;
        (ring.nodes().len() == 3).then_some(ring)
    })
    .await;
    let cut_off = ring
        .nodes()
        .iter()
        .find(|n| n.id.as_str() == "cs-3")
        .unwrap()
        .clone();
    let channel = owned_by(&ring, &cut_off.id);
    let connection =
        mesh_transport::endpoint_with(&cut_off.addr, &acting_as(Role::Admin, "admin-1"))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut client = ChannelServerClient::new(connection);
    eventually("cs-3 serves", || async {
        publish(&mut client.clone(), ring.epoch(), &channel, "hello")
            .await
            .ok()
    })
    .await;

    // A dead path: its connections to the ring manager go silent, unclosed. The silent lease
    // stream is dropped at its reply deadline and dialled again (new connections pass), so
    // cs-3 keeps its lease and serves.
    let dead = path.blackhole_existing();
    eventually("cs-3 dials the ring manager again", || async {
        (path.accepted.load(Ordering::SeqCst) > dead).then_some(())
    })
    .await;
    eventually("cs-3 serves after redialling", || async {
        publish(
            &mut client.clone(),
            ring.epoch(),
            &channel,
            "after the dead path",
        )
        .await
        .ok()
    })
    .await;
    let (_, members) = ring_with(rm, &operator).await;
    assert_eq!(state_of(&members, "cs-3"), "active", "{members:?}");

    // Its ring watch went quiet on the dead path too: keepalive breaks it, and cs-3 follows
    // the next ring (cs-4 joining).
    let args = [
        "channel-server",
        "--id",
        "cs-4",
        "--listen",
        "127.0.0.1:0",
        "--ring-manager",
        &rm_url,
    ];
    servers.push(service(&cs_tls[3], &args));
    let ring = eventually("four active channel servers", || async {
        let (ring, _) = ring_with(rm, &operator).await;
        (ring.nodes().len() == 4).then_some(ring)
    })
    .await;
    let as_peer =
        mesh_transport::endpoint_with(&cut_off.addr, &acting_as(Role::ChannelServer, "cs-9"))
            .unwrap()
            .connect()
            .await
            .unwrap();
    eventually("cs-3 follows the new ring", || async {
        let status = ChannelServerClient::new(as_peer.clone())
            .lease_status(LeaseStatusRequest {
                node_id: "cs-9".into(),
            })
            .await
            .ok()?
            .into_inner();
        (status.holds_lease && status.epoch >= ring.epoch()).then_some(())
    })
    .await;
    let channel = owned_by(&ring, &cut_off.id);

    // A partition: cs-3 cannot reach the ring manager at all, while its peers still hear it.
    // cs-3 must refuse writes (no_lease) before the ring manager gives its slot away, and
    // acknowledge nothing after.
    path.cut.cancel();
    let mut acked_after_refusal = Vec::new();
    let mut refused = None;
    let mut i = 0;
    let moved = loop {
        let (now, members) = ring_with(rm, &operator).await;
        if now.owner_of(&channel).is_some_and(|o| o.id != cut_off.id) {
            break (now, members);
        }
        i += 1;
        match publish(&mut client, ring.epoch(), &channel, &format!("cut {i}")).await {
            Ok(ts) if refused.is_some() => acked_after_refusal.push(ts),
            Ok(_) => {}
            Err(status) if status.message().contains("no_lease") => {
                refused.get_or_insert(status);
            }
            Err(status) => panic!("unexpected refusal: {status:?}"),
        }
    };
    let (after, members) = moved;
    let refused = refused.expect("cs-3 refused a publish with no_lease before its slot moved");
    println!("cs-3 fenced: {}", refused.message());
    assert!(acked_after_refusal.is_empty(), "{acked_after_refusal:?}");
    assert_eq!(state_of(&members, "cs-3"), "down", "{members:?}");
    // Fenced, it acknowledges nothing on the slot it lost.
    let late = publish(&mut client, ring.epoch(), &channel, "after the move").await;
    assert!(late.is_err(), "acknowledged after the move: {late:?}");
    assert!(after.epoch() > ring.epoch());
}
