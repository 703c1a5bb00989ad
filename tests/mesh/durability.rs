//! The ring manager's state survives it (`dev --multi-process`, real processes): a ring manager
//! restarted without its state starts a new ring generation that every watcher follows; a
//! change whose state cannot be saved fails with a clear status and changes nothing; drains
//! and revocations come back with a restart from the state file, and with a new leader on
//! Consul (`fake-consul`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_core::Ring;
use mesh_proto::admin::{RevokeTokensRequest, RevokedToken};
use mesh_proto::ring::{DrainRegionRequest, GatewayReport, GetRingRequest, RegionsRequest};
use nix::sys::signal::Signal;

use fake_consul::FakeConsul;
use ring_client::ConsulRing;

use crate::consul::{addr_of, free_addr, kill_the_leader};
use crate::processes::{ADMIN_TOKEN, BIN, Dev, signal};
use crate::support::{
    Rtm, admin_at, eventually, eventually_within, post, ring_with, rm_with, state_of,
};

/// How long a restarted ring manager process may take to answer (a debug build on a busy
/// machine).
const RESTART: Duration = Duration::from_secs(30);

/// A ring manager on `dev`'s ring manager address, as `dev` runs it, with `state_file` if any
/// (killed on drop).
struct RingManagerProcess(Child);

impl RingManagerProcess {
    fn start(dev: &Dev, state_file: Option<&Path>) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(["ring-manager", "--listen", &dev.ring_manager.to_string()])
            .args(["--node-role", "channel-server"])
            .args(dev.tls_flags("rm-1"));
        if let Some(path) = state_file {
            command.arg("--state-file").arg(path);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        RingManagerProcess(child)
    }
}

/// SIGKILLs the process `pid` and waits until it is gone (exited, if not yet reaped by its
/// parent): its listening socket is closed, and a successor can bind its address.
async fn kill_and_wait(pid: u32) {
    signal(pid, Signal::SIGKILL);
    eventually("the killed process is gone", || async {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesized command name: Z is a zombie (exited).
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        matches!(state, None | Some("Z") | Some("X")).then_some(())
    })
    .await;
}

impl Drop for RingManagerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The ring the ring manager at `addr` serves, once it answers.
async fn served_ring(addr: SocketAddr, who: &mesh_transport::Transport) -> Option<Ring> {
    let channel = mesh_transport::endpoint_with(&addr.to_string(), who)
        .ok()?
        .connect()
        .await
        .ok()?;
    let proto = mesh_proto::ring::ring_manager_client::RingManagerClient::new(channel)
        .get_ring(GetRingRequest {})
        .await
        .ok()?
        .into_inner();
    ring_client::convert::ring_from_proto(proto).ok()
}

/// The ring epoch a gateway follows, from its `/metrics`.
async fn gateway_epoch(gateway: SocketAddr) -> Option<u64> {
    let body = reqwest::get(format!("http://{gateway}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = body.lines().find(|l| {
        l.strip_prefix("channelmesh_gateway_ring_epoch")
            .is_some_and(|rest| rest.starts_with([' ', '{']))
    })?;
    let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
    Some(value as u64)
}

/// `channelmesh ctl` as the operator of `dev`: (success, stdout + stderr).
async fn ctl(dev: &Dev, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("ctl")
        .arg("--ring-manager")
        .arg(format!("http://{}", dev.ring_manager))
        .arg("--state-dir")
        .arg(&dev.state_dir)
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_ring_manager_restarted_without_its_state_starts_a_generation_every_watcher_follows() {
    let dir = Dev::dir("rm-reset");
    let args = [
        "--ring-manager",
        "127.0.0.1:0",
        "--presence-ring-manager",
        "127.0.0.1:0",
    ]
    .map(String::from);
    let dev = Dev::launch(&args, Default::default(), dir);
    // Past the epochs a new history reaches with the same nodes (one per active node): drain
    // a node and add it back.
    let (start, _) = ring_with(dev.ring_manager, &dev.operator).await;
    let (ok, text) = ctl(&dev, &["drain-node", "cs-1"]).await;
    assert!(ok, "{text}");
    eventually("cs-1 drained to a standby", || async {
        let (_, members) = ring_with(dev.ring_manager, &dev.operator).await;
        (state_of(&members, "cs-1") == "standby").then_some(())
    })
    .await;
    let (ok, text) = ctl(&dev, &["add-node", "cs-1"]).await;
    assert!(ok, "{text}");
    let (before, _) = ring_with(dev.ring_manager, &dev.operator).await;
    assert!(before.epoch() > start.epoch() && before.epoch() > 3);
    assert_ne!(before.generation(), 0, "a ring carries its generation");
    for gateway in [dev.us_east, dev.eu_west.0] {
        eventually("the gateway follows the ring", || async {
            (gateway_epoch(gateway).await? == before.epoch()).then_some(())
        })
        .await;
    }

    kill_and_wait(dev.ring_manager_pid).await;
    let _restarted = RingManagerProcess::start(&dev, None);
    // The channel servers' leases are unknown to it: they register again, as they started
    // (three active, one standby), in a new history whose epochs start over.
    let after = eventually_within(
        "the new history has the three active nodes",
        RESTART,
        || async {
            let ring = served_ring(dev.ring_manager, &dev.operator).await?;
            (ring.nodes().len() == 3).then_some(ring)
        },
    )
    .await;
    assert_ne!(after.generation(), before.generation());
    assert!(
        after.epoch() < before.epoch(),
        "{after:?} after {before:?}: a lower epoch"
    );
    // Every watcher takes it: both gateways...
    for gateway in [dev.us_east, dev.eu_west.0] {
        eventually("the gateway follows the new generation", || async {
            let epoch = gateway_epoch(gateway).await?;
            (epoch == after.epoch()).then_some(())
        })
        .await;
    }
    // ...the admin server and the channel servers: a post is routed and delivered.
    let channel = "CRESET";
    let mut client = Rtm::connect(&dev.base_url(), &dev.token("UREADER", &[channel]))
        .await
        .unwrap();
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let ts = post(&mut admin, channel, "UPOSTER", "after the reset").await;
    let got = client
        .expect("the post after the reset", |v| {
            v["text"] == "after the reset"
        })
        .await;
    assert_eq!(got["ts"], ts.as_str());
}

#[tokio::test]
async fn a_change_that_cannot_be_saved_fails_clearly_and_changes_nothing() {
    let dir = Dev::dir("rm-unsaved");
    let state_dir = dir.join("ring-state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let dev = Dev::start_with_state_file(state_dir.join("ring.json"), dir.clone());
    eventually("both regions reported", || async {
        let (ok, text) = ctl(&dev, &["regions", "--json"]).await;
        (ok && text.contains("us-east") && text.contains("eu-west")).then_some(())
    })
    .await;
    let (before, members) = ring_with(dev.ring_manager, &dev.operator).await;
    let cs2_pid = members.iter().find(|m| m.id == "cs-2").unwrap().pid;

    // The state file's directory becomes a file: nothing can be written there, root or not.
    let moved = dir.join("ring-state.moved");
    std::fs::rename(&state_dir, &moved).unwrap();
    std::fs::write(&state_dir, "").unwrap();
    for args in [
        &["drain-node", "cs-1"][..],
        &["add-node", "cs-4"],
        &["drain-region", "eu-west"],
        &["revoke", "jti-unsaved", "--until", "4000000000"],
    ] {
        let (ok, text) = ctl(&dev, args).await;
        assert!(!ok, "ctl {args:?} succeeded: {text}");
        assert!(
            text.contains("could not save its state")
                && text.contains("ring-state/ring.tmp")
                && text.contains("Not a directory"),
            "ctl {args:?}: {text}"
        );
    }
    let mut rm = rm_with(dev.ring_manager, &dev.operator).await;
    let status = rm
        .drain_node(mesh_proto::ring::NodeRequest {
            node_id: "cs-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let (ring, members) = ring_with(dev.ring_manager, &dev.operator).await;
    assert!(ring.same_assignment(&before), "{ring:?} vs {before:?}");
    assert_eq!(state_of(&members, "cs-1"), "active");
    assert_eq!(state_of(&members, "cs-4"), "standby");
    let regions = rm.regions(RegionsRequest {}).await.unwrap().into_inner();
    assert!(regions.regions.iter().all(|r| !r.draining), "{regions:?}");

    // A node dies meanwhile: the monitor cannot save it down, so it publishes nothing.
    signal(cs2_pid, Signal::SIGKILL);
    // A deliberate "nothing happens" window, past the silence limit (2 s) after which the
    // monitor declares a silent node down without a probe: no event marks a declaration that
    // did not happen.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ring, members) = ring_with(dev.ring_manager, &dev.operator).await;
    assert!(ring.same_assignment(&before), "{ring:?} vs {before:?}");
    assert_eq!(state_of(&members, "cs-2"), "active", "{members:?}");

    // Writable again: the monitor's retry saves and publishes the failover (cs-2's slots to
    // their followers, the standby joining as one), and operations succeed.
    std::fs::remove_file(&state_dir).unwrap();
    std::fs::rename(&moved, &state_dir).unwrap();
    let taken = eventually("cs-2 down and its slots taken over", || async {
        let (ring, members) = ring_with(dev.ring_manager, &dev.operator).await;
        let standby_joined = matches!(state_of(&members, "cs-4"), "joining" | "active");
        // The members' states and the published ring are read apart: wait for both.
        let published = ring.epoch() > before.epoch();
        (state_of(&members, "cs-2") == "down" && standby_joined && published).then_some(ring)
    })
    .await;
    let saved = ring_client::record::Saved::clone(
        &serde_json::from_slice(&std::fs::read(state_dir.join("ring.json")).unwrap()).unwrap(),
    );
    assert_eq!(saved.epoch, taken.epoch(), "saved before it was published");
    let (ok, text) = ctl(&dev, &["drain-node", "cs-1"]).await;
    assert!(ok, "{text}");
}

/// The revoked token's `jti` in the drain-and-revoke tests.
const JTI: &str = "jti-durable";

/// Drains eu-west (rate 7) on the ring manager at `rm` once both regions have reported, and
/// revokes [`JTI`] through the admin server.
async fn drain_and_revoke(dev: &Dev, rm: SocketAddr) {
    let mut rm = rm_with(rm, &dev.operator).await;
    eventually("both regions reported", || async {
        let view = rm.clone().regions(RegionsRequest {}).await.ok()?;
        let reported = view.into_inner().regions.into_iter();
        (reported.filter(|r| !r.gateways.is_empty()).count() == 2).then_some(())
    })
    .await;
    rm.drain_region(DrainRegionRequest {
        region: "eu-west".into(),
        rate: 7,
    })
    .await
    .unwrap();
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    admin
        .revoke_tokens(RevokeTokensRequest {
            jtis: vec![RevokedToken {
                jti: JTI.into(),
                expires_at: channelmesh::mesh::unix_now() + 600,
            }],
        })
        .await
        .unwrap();
}

/// The ring manager at `rm` has eu-west draining at rate 7, and tells a gateway that knows no
/// revocation (a new one) about [`JTI`].
async fn drained_and_revoked(dev: &Dev, rm: SocketAddr) {
    // The drain holds, whether or not a gateway has reported since.
    let view = rm_with(rm, &dev.operator)
        .await
        .regions(RegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let eu = view.regions.iter().find(|r| r.region == "eu-west");
    assert!(eu.is_some_and(|r| r.draining && r.rate == 7), "{view:?}");
    let directive = rm_with(rm, &dev.as_child("us-east-1"))
        .await
        .report_gateway(GatewayReport {
            gateway: "us-east-1".into(),
            region: "us-east".into(),
            url: format!("http://{}", dev.us_east),
            connections: 0,
            revocations_generation: 0,
            revocations_version: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        directive.revoked.iter().any(|r| r.jti == JTI),
        "{directive:?}"
    );
    assert!(!directive.draining, "us-east does not drain");
}

#[tokio::test]
async fn revocations_and_region_drains_survive_a_ring_manager_restart() {
    let dev = Dev::start("rm-durable-state");
    drain_and_revoke(&dev, dev.ring_manager).await;
    let (before, _) = ring_with(dev.ring_manager, &dev.operator).await;

    kill_and_wait(dev.ring_manager_pid).await;
    let _restarted = RingManagerProcess::start(&dev, Some(&dev.state_file));
    let after = eventually_within("the restarted ring manager answers", RESTART, || {
        served_ring(dev.ring_manager, &dev.operator)
    })
    .await;
    assert!(after.same_assignment(&before));
    assert_eq!(after.generation(), before.generation(), "the same history");

    drained_and_revoked(&dev, dev.ring_manager).await;
}

// Multi-threaded: `Dev::on_consul` reads the child's stdout blocking while the fake Consul, on
// this runtime, must keep answering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_consul_revocations_and_region_drains_survive_a_leader_failover() {
    let fake = FakeConsul::start().await.unwrap();
    let rms = [free_addr(), free_addr()];
    let dev = Dev::on_consul("durable-failover", &fake.url(), &rms);
    let ring = ConsulRing::new(&fake.url(), None, "test-durable-failover").unwrap();
    let leader = ring.leader().await.unwrap().expect("a leader");
    drain_and_revoke(&dev, addr_of(&leader.endpoint)).await;
    let (before, _) = ring_with(addr_of(&leader.endpoint), &dev.operator).await;

    let second = kill_the_leader(&dev, &ring, &leader).await;
    let after = eventually("the new leader answers", || {
        served_ring(addr_of(&second.endpoint), &dev.operator)
    })
    .await;
    assert!(after.same_assignment(&before));
    assert_eq!(after.generation(), before.generation(), "the same history");
    drained_and_revoked(&dev, addr_of(&second.endpoint)).await;
}
