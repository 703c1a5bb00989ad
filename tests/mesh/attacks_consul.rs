//! Attacks on the mesh through Consul, against `channelmesh dev --multi-process --consul` on
//! `fake-consul` with ACLs on (default deny; no Consul binary runs on these machines): a forged
//! ring record written straight to Consul's KV API, and Consul calls without the ACL token.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use fake_consul::FakeConsul;
use mesh_core::{ChannelId, NodeId, Ring, RingNode};
use mesh_transport::Role;
use nix::sys::signal::Signal;
use ring_client::consul_ring::{ConsulRing, Record};
use ring_client::record::Saved;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::processes::{ADMIN_TOKEN, BIN, Dev, signal};
use crate::support::{Rtm, admin_at, child_tls, eventually, post, poster, receive_all, ring_with};

/// The Consul management token the mesh is given (`--consul-token`).
const TOKEN: &str = "3c1d0e2f-5a4b-4c6d-8e7f-attacks0acl01";
/// Where a forged ring would send every channel.
const EVIL: &str = "203.0.113.66:7001";

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The stored ring record and its modify index.
async fn stored(ring: &ConsulRing) -> (Record, u64) {
    let (record, index) = ring.load().await.unwrap();
    (record.expect("a ring in consul"), index)
}

/// Writes a forged ring record — every slot to [`EVIL`], a far higher epoch — straight to
/// Consul's KV API, as an attacker holding a token that may write the key (the worst case:
/// without one Consul refuses the write) but not the leader's lock; returns its modify index.
async fn forge(fake: &FakeConsul, ring: &ConsulRing, lock_index: u64, session: &str) -> u64 {
    let evil = Ring::empty().rebalanced(&[RingNode {
        id: NodeId::new("evil").unwrap(),
        addr: EVIL.into(),
    }]);
    let (_, nodes, slot_owner, _) = Saved::ring_parts(&evil);
    let forged = serde_json::to_vec(&Record {
        lock_index,
        session: Some(session.into()),
        leader: "http://203.0.113.66:50050".into(),
        saved: Saved {
            epoch: 1_000_000,
            nodes,
            slot_owner,
            members: vec![],
            next_incarnation: 1,
            ..Saved::default()
        },
    })
    .unwrap();
    let put = reqwest::Client::new()
        .put(format!("{}/v1/kv/{}", fake.url(), ring.ring_key()))
        .header("X-Consul-Token", TOKEN)
        .body(forged.clone())
        .send()
        .await
        .unwrap();
    assert!(
        put.status().is_success(),
        "the forged write: {}",
        put.status()
    );
    let (entry, _) = ring.consul.get(&ring.ring_key(), None).await.unwrap();
    let entry = entry.unwrap();
    assert_eq!(entry.value, forged, "the forged record landed");
    entry.modify_index
}

// Multi-threaded: `Dev::on_consul_with` reads the child's stdout blocking while the fake
// Consul, on this runtime, must keep answering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_consul_ring_record_moves_no_reader_and_does_not_freeze_the_ring() {
    let fake = FakeConsul::start().await.unwrap();
    fake.require_token(Some(TOKEN));
    let rms = [free_addr(), free_addr()];
    let dev = Dev::on_consul_with("forged", &fake.url(), &rms, &["--consul-token", TOKEN]);
    let ring = ConsulRing::new(&fake.url(), Some(TOKEN.into()), "test-forged").unwrap();
    let leader = ring.leader().await.unwrap().expect("a leader");
    let (good, _) = stored(&ring).await;
    let good_ring = good.saved.ring().unwrap();

    let channel = "CFORGED";
    let mut client = Rtm::connect(&dev.base_url(), &dev.token("UREADER", &[channel]))
        .await
        .unwrap();
    let admin = admin_at(dev.admin, ADMIN_TOKEN).await;

    // Posts run across both forgeries: a reader (the admin server, a gateway, a channel
    // server) that took a forged ring would send them to an address nobody answers.
    let stop = CancellationToken::new();
    let posting = poster(&admin, channel, stop.clone());
    let session = good.session.clone().expect("the leader stamps its session");
    for (what, lock_index, session) in [
        ("a huge lock index", u64::MAX / 2, "forged-session"),
        (
            "the leader's lock index, another session",
            good.lock_index,
            "forged-session",
        ),
        (
            "a huge lock index, the leader's session",
            u64::MAX / 2,
            session.as_str(),
        ),
    ] {
        let forged_at = forge(&fake, &ring, lock_index, session).await;
        // The leader writes its own ring back over the forgery, under its own fence.
        let (back, _) = eventually(&format!("the leader's ring back over {what}"), || async {
            let (record, index) = stored(&ring).await;
            (index > forged_at).then_some((record, index))
        })
        .await;
        assert_eq!(back.lock_index, good.lock_index, "{what}");
        assert_eq!(back.session, good.session, "{what}");
        assert!(
            back.saved.ring().unwrap().same_assignment(&good_ring),
            "{what}"
        );
        println!("a forged record with {what}: the leader wrote its ring back");
    }
    stop.cancel();
    let (acked, failed) = posting.finish().await;
    assert_eq!(failed, 0, "no post failed across the forgeries");
    assert!(!acked.is_empty());
    receive_all(&mut client, &acked).await;
    // The leader kept leading, and serves its ring, not the forged one.
    assert_eq!(ring.leader().await.unwrap(), Some(leader.clone()));
    let leader_at: SocketAddr = leader
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (served, members) = ring_with(leader_at, &dev.operator).await;
    assert!(served.same_assignment(&good_ring));
    assert!(served.nodes().iter().all(|n| n.addr != EVIL));

    // Not frozen: the forged records' epoch (1,000,000) and lock index would have made every
    // later ring look old. Kill the channel's owner; the leader's next ring, at a far lower
    // epoch, reaches every reader, and delivery resumes on it.
    let before = stored(&ring).await.0.saved.ring().unwrap();
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();
    let pid = members.iter().find(|m| m.id == victim).unwrap().pid;
    signal(pid, Signal::SIGKILL);
    let after = eventually("the next ring in consul", || async {
        let ring = stored(&ring).await.0.saved.ring().unwrap();
        (ring.epoch() > before.epoch()).then_some(ring)
    })
    .await;
    assert!(after.epoch() < 1_000_000);
    let mut admin = admin;
    let ts = post(&mut admin, channel, "UPOSTER", "after the forgeries").await;
    let got = client
        .expect("the post after the failure", |v| {
            v["text"] == "after the forgeries"
        })
        .await;
    assert_eq!(got["ts"], ts.as_str());
}

/// The first line of `child`'s stderr that contains `needle`, within 20 s.
async fn stderr_line(child: &mut tokio::process::Child, needle: &str) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let find = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("stderr ended without {needle:?}");
    };
    tokio::time::timeout(Duration::from_secs(20), find)
        .await
        .unwrap_or_else(|_| panic!("no stderr line with {needle:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_calls_without_the_acl_token_are_refused_with_a_clear_message() {
    let fake = FakeConsul::start().await.unwrap();
    fake.require_token(Some(TOKEN));
    let prefix = "test-acl";
    let ring = ConsulRing::new(&fake.url(), Some(TOKEN.into()), prefix).unwrap();
    let consul = ["--consul", &fake.url(), "--consul-prefix", prefix];

    // `ctl` without a token, and with a wrong one: refused, naming the flag.
    for token in [None, Some("not-the-token")] {
        let mut ctl = tokio::process::Command::new(BIN);
        // The question is Consul's ACL: no mesh credentials are involved (without this flag
        // `ctl` looks for a local dev's operator certificate first, and a fresh machine has
        // none).
        ctl.arg("ctl")
            .arg("--insecure")
            .args(consul)
            .arg("ring")
            .env_remove("CONSUL_HTTP_TOKEN");
        if let Some(token) = token {
            ctl.env("CONSUL_HTTP_TOKEN", token);
        }
        let out = ctl.output().await.unwrap();
        assert!(!out.status.success(), "{token:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("consul refused")
                && stderr.contains("(the ACL token is --consul-token or CONSUL_HTTP_TOKEN)"),
            "{token:?}: {stderr}"
        );
        let why = if token.is_some() {
            "ACL not found"
        } else {
            "Permission denied"
        };
        assert!(stderr.contains(why), "{token:?}: {stderr}");
        println!("ctl ring with token {token:?}: {}", stderr.trim());
    }

    // A ring manager without the token logs the refusal and never takes the lock.
    let ring_manager = |token: Option<&str>| {
        let listen = free_addr();
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(child_tls(Role::RingManager, "rm-acl"))
            .arg("ring-manager")
            .args(consul)
            .args(["--listen", &listen.to_string()])
            .args(["--advertise", &format!("http://{listen}")])
            .env_remove("CONSUL_HTTP_TOKEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(token) = token {
            command.env("CONSUL_HTTP_TOKEN", token);
        }
        command.spawn().unwrap()
    };
    let mut refused = ring_manager(None);
    let line = stderr_line(&mut refused, "CONSUL_HTTP_TOKEN").await;
    assert!(line.contains("consul refused"), "{line}");
    println!("ring manager without the token: {line}");
    assert_eq!(
        ring.leader().await.unwrap(),
        None,
        "no leader without the token"
    );
    drop(refused);

    // With the token, the same ring manager leads.
    let _leading = ring_manager(Some(TOKEN));
    eventually("a leader with the token", || async {
        ring.leader().await.ok().flatten()
    })
    .await;
}
