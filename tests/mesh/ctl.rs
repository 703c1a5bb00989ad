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
