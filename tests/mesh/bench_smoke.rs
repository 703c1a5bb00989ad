//! The benchmark harness cannot rot: `channelmesh bench fanout` runs for a second against the
//! in-process mesh, through its real interfaces, and must deliver everything (no timing is
//! asserted).

use crate::support::mesh;

#[tokio::test]
async fn bench_fanout_runs_and_loses_nothing() {
    let mesh = mesh().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_channelmesh"))
        .args([
            "bench",
            "fanout",
            "--json",
            "--clients",
            "20",
            "--channels",
            "2",
        ])
        .args(["--rate", "50", "--seconds", "1"])
        .args(["--gateway", &mesh.rtm_base_url("us-east").unwrap()])
        .args(["--gateway", &mesh.rtm_base_url("eu-west").unwrap()])
        .args(["--admin", &mesh.admin.to_string()])
        .env("CHANNELMESH_JWT_SECRET", &mesh.jwt_secret)
        .env("CHANNELMESH_ADMIN_TOKEN", &mesh.admin_token)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["published"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["publish_errors"], 0, "{report}");
    assert_eq!(report["delivered"], report["expected"], "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["fanout"], 10.0);
}
