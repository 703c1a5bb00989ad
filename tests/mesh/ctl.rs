//! `channelmesh ctl` as SREs and scripts use it: the `--json` fields are a contract.

use std::process::Output;

use serde_json::Value;

use crate::support::{eventually, mesh, operator_state_dir};

const BIN: &str = env!("CARGO_BIN_EXE_channelmesh");

async fn ctl(ring_manager: std::net::SocketAddr, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .arg("ctl")
        .arg("--ring-manager")
        .arg(format!("http://{ring_manager}"))
        // The operator credential, where `dev` would have written it.
        .arg("--state-dir")
        .arg(operator_state_dir())
        .args(args)
        .output()
        .await
        .unwrap()
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn ctl_json_output_has_the_documented_fields_and_refusals_exit_1() {
    let mesh = mesh().await;
    let rm = mesh.ring_manager;

    let ring = json(&ctl(rm, &["ring", "--json"]).await);
    assert!(ring["epoch"].as_u64().unwrap() >= 1);
    let nodes = ring["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4);
    for node in nodes {
        for field in ["id", "addr", "state", "slots", "pid"] {
            assert!(node.get(field).is_some(), "{field} missing in {node}");
        }
    }
    let slots: u64 = nodes.iter().map(|n| n["slots"].as_u64().unwrap()).sum();
    assert_eq!(slots, mesh_core::SLOT_COUNT as u64);

    let owner = json(&ctl(rm, &["owner", "general", "--json"]).await);
    assert_eq!(owner["channel"], "general");
    assert_eq!(owner["slot"], 787, "the slot pinned by the hash's tests");
    assert!(owner["node"].as_str().unwrap().starts_with("cs-"));
    assert!(owner["addr"].as_str().unwrap().contains(':'));

    // Regions: both gateways report within a second.
    let regions = eventually("both regions reported", || async {
        let v = json(&ctl(rm, &["regions", "--json"]).await);
        (v.as_array()?.len() == 2).then_some(v)
    })
    .await;
    for region in regions.as_array().unwrap() {
        for field in [
            "region",
            "draining",
            "rate",
            "connections",
            "nearest",
            "gateways",
        ] {
            assert!(region.get(field).is_some(), "{field} missing in {region}");
        }
    }
    let drained = json(&ctl(rm, &["drain-region", "eu-west", "--rate", "50", "--json"]).await);
    let eu = drained
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["region"] == "eu-west")
        .unwrap();
    assert_eq!(eu["draining"], true);
    assert_eq!(eu["rate"], 50);
    assert_eq!(eu["nearest"][0], "us-east");
    let undrained = json(&ctl(rm, &["undrain-region", "eu-west", "--json"]).await);
    assert!(
        undrained
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["draining"] == false)
    );

    // Refusals: exit 1 with the reason on stderr.
    for args in [
        &["drain-region", "nowhere"][..],
        &["drain-node", "cs-9"][..],
        &["owner", "not a channel"][..],
    ] {
        let out = ctl(rm, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} says why");
    }
}

/// `ctl ring --json` gives each member its `replicas`: slots it leads, follows, and follows
/// still being filled (as its heartbeats report); the plain output shows them too.
#[tokio::test]
async fn ctl_ring_shows_each_members_replicas() {
    use mesh_proto::ring::{Heartbeat, RegisterRequest};
    use mesh_transport::Role;

    let mesh = mesh().await;
    let rm = mesh.ring_manager;
    let ring = json(&ctl(rm, &["ring", "--json"]).await);
    let nodes = ring["nodes"].as_array().unwrap();
    let (mut led, mut followed) = (0, 0);
    for node in nodes {
        let replicas = node["replicas"].as_object().unwrap();
        let mut keys: Vec<&str> = replicas.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["catching_up", "followed", "led"], "{node}");
        assert_eq!(replicas["led"], node["slots"]);
        led += replicas["led"].as_u64().unwrap();
        followed += replicas["followed"].as_u64().unwrap();
        if node["state"] == "standby" {
            assert_eq!(replicas["followed"], 0, "{node}");
        }
    }
    assert_eq!(led, mesh_core::SLOT_COUNT as u64);
    assert_eq!(
        followed,
        mesh_core::SLOT_COUNT as u64,
        "replication factor 2: one follower per slot"
    );
    // The presence ring places none: presence is soft state.
    let presence = json(&ctl(mesh.presence_ring_manager, &["ring", "--json"]).await);
    for node in presence["nodes"].as_array().unwrap() {
        assert_eq!(node["replicas"]["followed"], 0, "{node}");
    }

    // A node's heartbeats say how many followed slots are still being filled.
    let node = crate::support::acting_as(Role::ChannelServer, "cs-9");
    let mut client = crate::support::rm_with(rm, &node).await;
    let registered = client
        .register(RegisterRequest {
            node_id: "cs-9".into(),
            addr: "127.0.0.1:9".into(),
            pid: 9,
            standby: true,
        })
        .await
        .unwrap()
        .into_inner();
    let epoch = ring["epoch"].as_u64().unwrap();
    // Heartbeats every 50 ms for as long as the lease call lives (the rest of the test).
    let incarnation = registered.incarnation;
    let beats = futures::stream::unfold(1u64, move |seq| async move {
        if seq > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let beat = Heartbeat {
            node_id: "cs-9".into(),
            incarnation,
            seq,
            handed_off_epoch: 0,
            catching_up: 7,
            catching_up_epoch: epoch,
        };
        Some((beat, seq + 1))
    });
    let _lease = client.lease(beats).await.unwrap();
    let cs9 = eventually("cs-9's progress shown", || async {
        let ring = json(&ctl(rm, &["ring", "--json"]).await);
        let nodes = ring["nodes"].as_array()?.clone();
        let cs9 = nodes.into_iter().find(|n| n["id"] == "cs-9")?;
        (cs9["replicas"]["catching_up"] == 7).then_some(cs9)
    })
    .await;
    assert_eq!(cs9["replicas"]["led"], 0);
    let plain = ctl(rm, &["ring"]).await;
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(text.contains("FOLLOWED"), "{text}");
    let row = text.lines().find(|l| l.starts_with("cs-9")).unwrap();
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        columns[..6],
        ["cs-9", "standby", "0", "9", "0", "7"],
        "{text}"
    );
}
