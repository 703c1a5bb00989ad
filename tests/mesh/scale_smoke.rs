//! The scale benchmark cannot rot: `channelmesh bench scale` connects 2,000 clients of one team
//! over both gateways of the in-process mesh from four worker processes (the real connect
//! flow, the hand-written WebSocket client), posts one message to the team's channel through the
//! admin API, and every client must receive it. The report's fields must all be there; no
//! timing is asserted. (`bench/scale.sh` runs the same at 500,000 over separate gateway
//! processes.)

use channelmesh::MeshConfig;

use crate::support::{bench_report, mesh_with};

/// Fields every `scale` report has.
const FIELDS: &[&str] = &[
    "clients",
    "gateways",
    "processes",
    "connected",
    "failed",
    "connect_secs",
    "connect_per_s",
    "closed",
    "before",
    "after",
    "gateway_bytes_per_conn",
    "servers_bytes_per_conn",
    "kernel_bytes_per_conn",
    "kernel_bytes_per_server_socket",
    "loadgen_bytes_per_client",
    "post_rpc_ms",
    "received",
    "missing",
    "deliver_first_ms",
    "deliver_p50_ms",
    "deliver_p99_ms",
    "deliver_last_ms",
];

#[tokio::test]
async fn bench_scale_delivers_the_team_message_to_every_client() {
    // Thousands of clients from one address each, as fast as they come.
    let mut config = MeshConfig::ephemeral();
    config.limits.connects_per_addr = 0;
    config.limits.handshakes_per_sec = 0;
    let mesh = mesh_with(config).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let admin = mesh.admin.to_string();
    let me = std::process::id().to_string();
    let args = ["scale", "--json", "--clients", "2000", "--processes", "4"];
    let args = [&args[..], &["--gateway", &us, "--gateway", &eu]].concat();
    let args = [&args[..], &["--admin", &admin, "--server-pid", &me]].concat();
    let env = [
        ("CHANNELMESH_JWT_SECRET", mesh.jwt_secret.as_str()),
        ("CHANNELMESH_ADMIN_TOKEN", mesh.admin_token.as_str()),
    ];
    let report = bench_report(&args, &env, FIELDS).await;
    assert_eq!(report["processes"], 4, "{report}");
    assert_eq!(report["connected"], 2000, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["closed"], 0, "{report}");
    assert_eq!(report["received"], 2000, "{report}");
    assert_eq!(report["missing"], 0, "{report}");
    // Measured: the test process (the mesh) grew, and the kernel holds the sockets.
    assert!(
        report["after"]["servers_rss"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["after"]["tcp_inuse"].as_u64().unwrap() >= 4000,
        "{report}"
    );
    assert!(
        report["deliver_last_ms"].as_f64().unwrap() >= report["deliver_first_ms"].as_f64().unwrap(),
        "{report}"
    );
}
