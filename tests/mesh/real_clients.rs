//! Wire contracts checked with the real client libraries (installed by `tests/setup`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::json;

use crate::support::mesh;

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the test venv; run `tests/setup` to create it.
pub(crate) fn python() -> PathBuf {
    let python = repo().join("tests/.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `tests/setup` (or `tests/run`) to install the real clients",
        python.display()
    );
    python
}

/// `program script` with `config` as JSON in `CHANNELMESH_TEST`, no proxy, killed when dropped.
pub(crate) fn client_command(
    program: &Path,
    script: &Path,
    config: &serde_json::Value,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .arg(script)
        .env("CHANNELMESH_TEST", config.to_string())
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .kill_on_drop(true);
    command
}

pub(crate) async fn run(program: &Path, script: &Path, config: serde_json::Value) {
    let output = client_command(program, script, &config)
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(120), output)
        .await
        .expect("the client script finishes within two minutes")
        .expect("the client script runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.lines().any(|l| l == "OK"),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        output.status
    );
}

/// Client config for two users of team T1 in `channel`: UANN on us-east, UBOB on eu-west.
fn two_users(mesh: &channelmesh::Mesh, channel: &str) -> serde_json::Value {
    json!({
        "us_east": mesh.rtm_base_url("us-east").unwrap(),
        "eu_west": mesh.rtm_base_url("eu-west").unwrap(),
        "ann": "UANN",
        "bob": "UBOB",
        "ann_token": mesh.token("UANN", "T1", &[channel]).unwrap(),
        "bob_token": mesh.token("UBOB", "T1", &[channel]).unwrap(),
        "channel": channel,
    })
}

#[tokio::test]
async fn slack_sdk_rtm_v2_clients_exchange_messages_across_regions_with_grpcio_admin() {
    let mesh = mesh().await;
    let mut config = two_users(&mesh, "CGENERAL");
    config["admin_addr"] = json!(mesh.admin.to_string());
    config["admin_token"] = json!(mesh.admin_token);
    config["proto_root"] = json!(repo().join("proto"));
    run(
        &python(),
        &repo().join("tests/clients/python/rtm_v2_exchange.py"),
        config,
    )
    .await;
}

/// The `node` on `PATH`, with `@slack/rtm-api` installed by `tests/setup`.
pub(crate) fn node() -> PathBuf {
    let rtm_api = repo().join("tests/clients/node/node_modules/@slack/rtm-api");
    assert!(
        rtm_api.exists(),
        "{} is missing: run `tests/setup` (or `tests/run`) to install the real clients",
        rtm_api.display()
    );
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("node"))
        .find(|node| node.is_file())
        .expect("`node` (Node.js 20) is on PATH")
}

#[tokio::test]
async fn slack_rtm_api_node_clients_exchange_messages_across_regions_and_keep_alive() {
    let mesh = mesh().await;
    let config = two_users(&mesh, "CNODE");
    run(
        &node(),
        &repo().join("tests/clients/node/rtm_exchange.js"),
        config,
    )
    .await;
}

/// Client config for presence: UPRESA watches UPRESB, both of team T1 (a client sees only its
/// own team's presence); neither is in a channel.
fn watcher_and_watched(mesh: &channelmesh::Mesh) -> serde_json::Value {
    // A negative check waits this long: past the grace period, when a wrong away would show.
    let quiet =
        channelmesh::MeshConfig::ephemeral().presence_grace + std::time::Duration::from_secs(1);
    json!({
        "us_east": mesh.rtm_base_url("us-east").unwrap(),
        "eu_west": mesh.rtm_base_url("eu-west").unwrap(),
        "a": "UPRESA",
        "b": "UPRESB",
        "a_token": mesh.token("UPRESA", "T1", &[]).unwrap(),
        "b_token": mesh.token("UPRESB", "T1", &[]).unwrap(),
        "quiet_secs": quiet.as_secs_f64(),
    })
}

#[tokio::test]
async fn slack_sdk_rtm_v2_watcher_sees_presence_across_regions_and_devices() {
    let mesh = mesh().await;
    let config = watcher_and_watched(&mesh);
    run(
        &python(),
        &repo().join("tests/clients/python/rtm_v2_presence.py"),
        config,
    )
    .await;
}

#[tokio::test]
async fn slack_rtm_api_node_batch_presence_aware_watcher_gets_the_users_form() {
    let mesh = mesh().await;
    let config = watcher_and_watched(&mesh);
    run(
        &node(),
        &repo().join("tests/clients/node/rtm_presence.js"),
        config,
    )
    .await;
}
