//! The load generator cannot rot: `channelmesh bench fanout` runs for a second with two worker
//! processes against the in-process mesh (client and admin publishing), against a real
//! nats-server and against the Node peer of `bench/compare.sh` (`bench/node-peer`), through
//! their real interfaces, and must deliver everything. The open-loop shapes of `compare.sh`
//! (per-channel, firehose, admin `PublishStream`, and chat) each run two short rate steps in
//! one connected run and must report every step and lose nothing. No timing is asserted.
//!
//! `channelmesh bench` runs the `channelmesh-loadgen` binary beside it, so these runs also prove
//! that dispatch. That binary belongs to another package of the workspace: `tests/run` (`cargo
//! nextest run --workspace`) builds it; a run of this package alone needs it built first.

use serde_json::Value;

use crate::support::{bench_report, listening, mesh};

/// Fields every report has.
const FIELDS: &[&str] = &[
    "scenario",
    "target",
    "processes",
    "connected",
    "connect_per_s",
    "published",
    "delivered",
    "delivered_per_s",
    "expected",
    "lost",
    "p50_us",
    "p99_us",
    "p999_us",
    "max_us",
    "loadgen_cpu_cores",
    "loadgen_cores",
    "loadgen_bound",
];

/// Runs the binary with `args` and returns its JSON report.
async fn bench(args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut all = vec!["--rate", "50", "--seconds", "1"];
    all.extend_from_slice(args);
    let report = run("fanout", &all, env).await;
    assert_eq!(report["connected"], 20, "{report}");
    report
}

/// Runs `channelmesh bench SCENARIO` (20 clients over 2 channels, unless `args` say otherwise)
/// with `args` and returns its JSON report, checked for what every run must show.
async fn run(scenario: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut all = vec![scenario, "--json", "--processes", "2"];
    all.extend_from_slice(args);
    for (flag, default) in [("--clients", "20"), ("--channels", "2")] {
        if !args.contains(&flag) {
            all.extend_from_slice(&[flag, default]);
        }
    }
    let report = bench_report(&all, env, FIELDS).await;
    assert_eq!(report["processes"], 2, "{report}");
    assert_eq!(report["connect_failures"], 0, "{report}");
    assert!(report["published"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["publish_errors"], 0, "{report}");
    assert_eq!(report["delivered"], report["expected"], "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["disconnects"], 0, "{report}");
    // The load generator's own CPU, against the cores it may use.
    assert!(report["loadgen_cores"].as_u64().unwrap() >= 1, "{report}");
    assert!(
        report["loadgen_cpu_cores"].as_f64().unwrap() >= 0.0,
        "{report}"
    );
    assert!(report["loadgen_bound"].is_boolean(), "{report}");
    report
}

/// The open-loop run's flags: two rate steps (published/s over the run) of a second each.
const OPEN_LOOP: &[&str] = &[
    "--open-loop",
    "--rates",
    "20,40",
    "--step-seconds",
    "1",
    "--settle-seconds",
    "10",
];

/// Runs an open-loop `shape` through [`OPEN_LOOP`]'s two steps and checks its report: both
/// steps there, in order, each with its figures, 0 lost and no publish errors, and what each
/// delivered is `receivers` per message sent (no timing asserted).
async fn open_loop(scenario: &str, shape: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut all = vec!["--shape", shape];
    all.extend_from_slice(OPEN_LOOP);
    all.extend_from_slice(args);
    let report = run(scenario, &all, env).await;
    assert_eq!(report["open_loop"], true, "{report}");
    // Open loop: `published` counts what was sent; `acked` what the server acknowledged.
    assert_eq!(report["published"], report["sent"], "{report}");
    assert!(report["acked"].as_u64().is_some(), "{report}");
    assert!(report.get("max_sustainable_rate").is_some(), "{report}");
    assert!(
        report.get("max_sustainable_delivered_per_s").is_some(),
        "{report}"
    );
    let steps = report["steps"].as_array().expect("a steps array");
    assert_eq!(steps.len(), 2, "{report}");
    for (step, rate) in steps.iter().zip([20, 40]) {
        assert_eq!(step["rate"], rate, "{step}");
        for field in [
            "sent_per_s",
            "delivered_per_s",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "loadgen_cpu_cores",
            "loadgen_bound",
            "kept_pace",
            "sustainable",
        ] {
            assert!(!step[field].is_null(), "no {field} in {step}");
        }
        assert!(step["sent"].as_u64().unwrap() > 0, "{step}");
        assert_eq!(step["lost"], 0, "{step}");
        assert_eq!(step["publish_errors"], 0, "{step}");
        assert_eq!(step["delivered"], step["expected"], "{step}");
    }
    let sent: u64 = steps.iter().map(|s| s["sent"].as_u64().unwrap()).sum();
    assert_eq!(report["sent"], sent, "{report}");
    report
}

/// Every message sent reached `receivers` clients.
fn each_reached(report: &Value, receivers: u64) {
    for step in report["steps"].as_array().unwrap() {
        assert_eq!(
            step["expected"].as_u64().unwrap(),
            step["sent"].as_u64().unwrap() * receivers,
            "{step}"
        );
    }
}

#[tokio::test]
async fn bench_open_loop_shapes_against_the_mesh_lose_nothing() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let env = [("CHANNELMESH_JWT_SECRET", mesh.jwt_secret.as_str())];
    let gateways = ["--gateway", &us, "--gateway", &eu];

    // (a) The first member of each channel publishes to the other 9.
    let report = open_loop("fanout", "per-channel", &gateways, &env).await;
    assert_eq!(report["connected"], 20, "{report}");
    each_reached(&report, 9);

    // (b) One more connection, a member of both channels, publishes to both; all 10 members
    // of a channel receive, and it receives nothing.
    let report = open_loop("fanout", "firehose", &gateways, &env).await;
    assert_eq!(report["publish"], "firehose", "{report}");
    assert_eq!(report["connected"], 21, "{report}");
    each_reached(&report, 10);

    // Chat: many small channels, a publisher in each, open loop.
    let mut chat = gateways.to_vec();
    chat.extend(["--channels", "10"]);
    let report = open_loop("chat", "per-channel", &chat, &env).await;
    assert_eq!(report["scenario"], "chat", "{report}");
}

#[tokio::test]
async fn bench_open_loop_over_the_admin_publish_stream_loses_nothing() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let admin = mesh.admin.to_string();
    let env = [
        ("CHANNELMESH_JWT_SECRET", mesh.jwt_secret.as_str()),
        ("CHANNELMESH_ADMIN_TOKEN", mesh.admin_token.as_str()),
    ];
    // (c) The web app's path: PublishStream from one process; every member receives.
    let args = ["--gateway", &us, "--admin", &admin, "--admin-streams", "2"];
    let report = open_loop("fanout", "admin", &args, &env).await;
    assert_eq!(report["publish"], "admin", "{report}");
    assert_eq!(report["acked"], report["sent"], "{report}");
    each_reached(&report, 10);
}

#[tokio::test]
async fn bench_open_loop_shapes_against_nats_server_lose_nothing() {
    let nats = nats_server().await;
    let target = ["--target", "nats", "--gateway", &nats.ws];
    let report = open_loop("fanout", "per-channel", &target, &[]).await;
    each_reached(&report, 9);
    // One PING at the end of each step confirms everything sent.
    assert_eq!(report["acked"], report["sent"], "{report}");
    // The firehose is a plain connection: it subscribes to nothing.
    let report = open_loop("fanout", "firehose", &target, &[]).await;
    assert_eq!(report["connected"], 21, "{report}");
    each_reached(&report, 10);
}

#[tokio::test]
async fn bench_fanout_over_two_processes_loses_nothing() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let admin = mesh.admin.to_string();
    let env = [
        ("CHANNELMESH_JWT_SECRET", mesh.jwt_secret.as_str()),
        ("CHANNELMESH_ADMIN_TOKEN", mesh.admin_token.as_str()),
    ];
    let gateways = ["--gateway", &us, "--gateway", &eu];

    // Member clients publish: each message reaches the channel's other 9 members.
    let report = bench(&gateways, &env).await;
    assert_eq!(report["target"], "channelmesh");
    assert_eq!(report["fanout"], 10.0);
    let published = report["published"].as_u64().unwrap();
    assert_eq!(report["expected"].as_u64().unwrap(), published * 9);

    // The admin API publishes: every member receives.
    let mut args = gateways.to_vec();
    args.extend(["--publish", "admin", "--admin", &admin]);
    let report = bench(&args, &env).await;
    let published = report["published"].as_u64().unwrap();
    assert_eq!(report["expected"].as_u64().unwrap(), published * 10);
}

/// A nats-server with its WebSocket listener on a free loopback port; stopped on drop.
struct Nats {
    _child: tokio::process::Child,
    dir: std::path::PathBuf,
    ws: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn nats_server() -> Nats {
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (port, ws_port) = (free(), free());
    let dir = std::env::temp_dir().join(format!(
        "channelmesh-bench-nats-{}-{ws_port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:{port}\"\nwebsocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n"
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new("nats-server")
        .arg("-c")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server is not installed: run tests/setup");
    listening(
        ws_port,
        &format!("nats-server's WebSocket listener on {ws_port}"),
    )
    .await;
    Nats {
        _child: child,
        dir,
        ws: format!("ws://127.0.0.1:{ws_port}"),
    }
}

#[tokio::test]
async fn bench_fanout_against_nats_server_loses_nothing() {
    let nats = nats_server().await;
    let report = bench(&["--target", "nats", "--gateway", &nats.ws], &[]).await;
    assert_eq!(report["target"], "nats");
    let published = report["published"].as_u64().unwrap();
    // echo:false: the publisher does not get its own messages, as on RTM.
    assert_eq!(report["expected"].as_u64().unwrap(), published * 9);
}

/// The Node peer (`bench/node-peer/server.js`) on a free loopback port; stopped on drop.
async fn node_peer(secret: &str) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/node-peer/server.js");
    let child = tokio::process::Command::new("node")
        .arg(script)
        .arg(format!("127.0.0.1:{port}"))
        .env("CHANNELMESH_JWT_SECRET", secret)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node is not installed");
    listening(
        port,
        &format!("the Node peer on {port} (tests/setup installs its `ws`)"),
    )
    .await;
    (child, format!("http://127.0.0.1:{port}/api/"))
}

#[tokio::test]
async fn bench_fanout_against_the_node_peer_loses_nothing() {
    let secret = "node-peer-smoke-secret-of-32-bytes";
    let (_peer, gateway) = node_peer(secret).await;
    let report = bench(
        &["--target", "channelmesh", "--gateway", &gateway],
        &[("CHANNELMESH_JWT_SECRET", secret)],
    )
    .await;
    let published = report["published"].as_u64().unwrap();
    // The sender does not get its own message.
    assert_eq!(report["expected"].as_u64().unwrap(), published * 9);
}
