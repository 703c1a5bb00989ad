//! `channelmesh chaos` as CI runs it: a short seeded schedule of the faults the mesh survives
//! (kill -9 and restart, SIGSTOP and SIGCONT, network partitions, of every kind of process), its
//! JSON result read back, and every invariant checked.

use std::process::{Command, Stdio};

use serde_json::Value;

use crate::processes::BIN;

/// The faults CI injects (partitions need nftables, which tests/setup installs, and cgroup v2).
/// With seed 17 a minute holds one of each and more: an admin server killed, then cut off from
/// the ring managers, a channel server restarted with its clock 4.7 s behind, a gateway frozen,
/// and a channel server cut off from the ring managers for 9.4 s.
const CI_FAULTS: &str = "kill,stop,partition,skew";
const CI_SEED: &str = "17";

/// Runs `channelmesh chaos ARGS --json` in a directory of its own; (exit success, result).
fn chaos(name: &str, args: &[&str]) -> (bool, Value) {
    let dir = std::env::temp_dir().join(format!("channelmesh-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let output = Command::new(BIN)
        .arg("chaos")
        .args(args)
        .args(["--json", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("channelmesh chaos runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let result: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("chaos printed no JSON result ({e}); its stderr:\n{stderr}"));
    eprintln!("{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    (output.status.success(), result)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_seeded_schedule_of_every_fault_kind_breaks_no_invariant() {
    let (success, result) = tokio::task::spawn_blocking(|| {
        chaos(
            "chaos-ci",
            &["--seed", CI_SEED, "--minutes", "1", "--faults", CI_FAULTS],
        )
    })
    .await
    .unwrap();
    let findings = &result["findings"];
    eprintln!("{}", serde_json::to_string_pretty(findings).unwrap());

    // The result's shape: the seed, every fault with its kind and target, the counts.
    assert_eq!(result["seed"], 17);
    let faults = result["faults"].as_array().expect("a list of faults");
    assert!(
        faults.len() >= 3,
        "a minute holds several faults: {faults:?}"
    );
    for fault in faults {
        assert!(
            ["kill", "stop", "partition", "skew"]
                .contains(&fault["kind"]["action"].as_str().unwrap())
        );
        assert!(fault["target"].is_string() && fault["start"].is_f64());
        assert!(fault["skipped"].is_null(), "not injected: {fault}");
    }
    let injected: u64 = findings["per_kind"]
        .as_object()
        .unwrap()
        .values()
        .map(|k| k["injected"].as_u64().unwrap())
        .sum();
    assert_eq!(injected, faults.len() as u64);
    assert!(
        findings["acknowledged"].as_u64().unwrap() > 500,
        "{findings}"
    );
    assert_eq!(findings["clients_checked"], 8, "{findings}");
    assert!(findings["presence_samples"].as_u64().unwrap() > 0);

    // The invariants, and the exit code that says so.
    for broken in [
        "lost",
        "duplicated",
        "redelivered",
        "out_of_order",
        "ts_backwards",
        "history_disorder",
        "presence_false_away",
        "presence_flaps",
    ] {
        assert_eq!(findings[broken], 0, "{broken}: {findings}");
    }
    assert_eq!(result["ok"], true);
    assert!(success, "chaos exits 0 when every invariant held");
}
