//! Channel policies from the policy file (issue 18): read-only channels, typing, publish rates
//! and history bounds per channel, team caps from the file and from the token's claim, and
//! reloads on SIGHUP — against real meshes, with slack_sdk and grpcio clients where the wire
//! contract is the point.

use std::path::{Path, PathBuf};

use channelmesh::{Mesh, MeshConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh_core::{Identity, IssuerAudience, TeamId, UserId};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::processes::{Dev, signal};
use crate::real_clients::{python, repo, run};
use crate::support::{
    Rtm, admin, eventually, gateway_metrics, mesh_with, metric_sum, post, web_api,
};

/// Writes `text` as the policy file of test `name`; returns its path.
fn policy_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "channelmesh-policies-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// An in-process mesh whose channel servers and gateways take the policy file `path`.
async fn mesh_with_policy(path: &Path) -> Mesh {
    mesh_with(MeshConfig {
        policy_file: Some(path.to_path_buf()),
        ..MeshConfig::ephemeral()
    })
    .await
}

#[tokio::test]
async fn slack_sdk_clients_see_read_only_typing_and_rate_policies_and_grpcio_posts_past_them() {
    let path = policy_file(
        "clients",
        r#"
        [[channel]]
        match = "CANN*"
        read_only = true

        [[channel]]
        match = "CQUIET"
        relay_typing = false

        [[channel]]
        match = "CRATE?"
        publish_rate = { per_second = 0.01, burst = 3 }
        "#,
    );
    let mesh = mesh_with_policy(&path).await;
    let channels = ["CANNOUNCE", "CQUIET", "CRATE1"];
    let config = json!({
        "us_east": mesh.rtm_base_url("us-east").unwrap(),
        "eu_west": mesh.rtm_base_url("eu-west").unwrap(),
        "ann_token": mesh.token("UANN", "T1", &channels).unwrap(),
        "bob_token": mesh.token("UBOB", "T1", &channels).unwrap(),
        "bob": "UBOB",
        "readonly": "CANNOUNCE",
        "quiet": "CQUIET",
        "rated": "CRATE1",
        "admin_addr": mesh.admin.to_string(),
        "admin_token": mesh.admin_token,
        "proto_root": repo().join("proto"),
    });
    let script = repo().join("tests/clients/python/rtm_v2_policies.py");
    run(&python(), &script, config).await;
    // Counted where refused: on the gateway (read-only) and on the channel's owner (rate).
    let us = gateway_metrics(&mesh.rtm_base_url("us-east").unwrap()).await;
    let refused = "channelmesh_gateway_posts_refused_total";
    assert_eq!(metric_sum(&us, refused, &["policy_read_only"]), 1.0, "{us}");
    assert_eq!(metric_sum(&us, refused, &["channel_rate_limited"]), 1.0);
}

/// The texts of `channel`'s history through the admin API, and its `complete_after_ts`.
async fn history(admin: &crate::support::Admin, channel: &str) -> (Vec<String>, String) {
    let request = mesh_proto::admin::HistoryRequest {
        channel: channel.into(),
        limit: 100,
        ..Default::default()
    };
    let page = admin.clone().history(request).await.unwrap().into_inner();
    let texts = page
        .events
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.event_json).unwrap()["text"].to_string())
        .map(|t| t.trim_matches('"').to_string())
        .collect();
    (texts, page.complete_after_ts)
}

#[tokio::test]
async fn history_bounds_per_channel_trim_history_and_resume_and_follow_a_reload() {
    let path = policy_file(
        "history",
        "[[channel]]\nmatch = \"CSHORT\"\nhistory_max_events = 3\n\
         [[channel]]\nmatch = \"CAGED\"\nhistory_max_age = 1\n",
    );
    let mesh = mesh_with_policy(&path).await;
    let mut admin = admin(&mesh).await;
    let mut tss = Vec::new();
    for channel in ["CSHORT", "CLONG", "CAGED"] {
        for i in 0..5 {
            tss.push(post(&mut admin, channel, "UPOSTER", &format!("{channel} {i}")).await);
        }
    }
    let (short, complete_after) = history(&admin, "CSHORT").await;
    assert_eq!(short, ["CSHORT 2", "CSHORT 3", "CSHORT 4"]);
    assert_eq!(
        complete_after, tss[1],
        "complete only after the last event trimmed"
    );
    assert_eq!(history(&admin, "CLONG").await.0.len(), 5);

    // A client resuming from the first post hears of the gap, then gets what is kept.
    let token = mesh.token("UREADER", "T1", &["CSHORT"]).unwrap();
    let us = mesh.rtm_base_url("us-east").unwrap();
    let query = format!("?cursors=CSHORT:{}", tss[0]);
    let mut client = Rtm::connect_with(&us, &token, &query).await.unwrap();
    let is_post = |v: &Value| v["type"] == "message" && v["user"] == "UPOSTER";
    let gap = client
        .expect("the gap", |v| v["type"] == "history_gap" || is_post(v))
        .await;
    assert_eq!(gap["type"], "history_gap", "{gap}");
    assert_eq!(gap["oldest_ts"], tss[2].as_str());
    for ts in &tss[2..5] {
        assert_eq!(
            client.expect("a kept post", is_post).await["ts"],
            ts.as_str()
        );
    }

    // An age: CAGED's posts go once older than a second, on a read.
    eventually("CAGED's history aged out", || async {
        let (texts, complete_after) = history(&admin, "CAGED").await;
        (texts.is_empty() && complete_after == tss[14]).then_some(())
    })
    .await;

    // A reload (what SIGHUP asks for; every service of this in-process mesh follows it) bounds
    // CLONG too, on its next trim.
    std::fs::write(
        &path,
        "[[channel]]\nmatch = \"CLONG\"\nhistory_max_events = 2\n",
    )
    .unwrap();
    mesh_policy::request_reload();
    eventually("CLONG trimmed to 2 after the reload", || async {
        (history(&admin, "CLONG").await.0 == ["CLONG 3", "CLONG 4"]).then_some(())
    })
    .await;
}

/// A token of `user` in `team` carrying the `team_max_connections` claim `cap`, signed with the
/// test mesh's secret.
fn capped_token(mesh: &Mesh, user: &str, team: &str, cap: Option<u32>) -> String {
    let now = channelmesh::mesh::unix_now();
    let identity = Identity {
        user: UserId::new(user).unwrap(),
        team: TeamId::new(team).unwrap(),
        name: None,
        channels: vec![],
        expires_at: now + 3600,
        jti: None,
    };
    let key = EncodingKey::from_secret(mesh.jwt_secret.as_bytes());
    let header = Header::new(Algorithm::HS256);
    mesh_core::token::mint_capped(
        &header,
        &key,
        &identity,
        &IssuerAudience::default(),
        cap,
        now,
    )
    .unwrap()
}

/// `rtm.connect` with `token` on `base` until its answer is final (not `ratelimited` while the
/// team's presence server warms up), then opens the connection when admitted.
async fn connect(base: &str, token: &str) -> Result<Rtm, Value> {
    let reply = eventually("rtm.connect to stop answering ratelimited", || async {
        let reply = web_api(base, "rtm.connect", Some(token)).await;
        (reply["error"] != json!("ratelimited")).then_some(reply)
    })
    .await;
    let Some(url) = reply["url"].as_str() else {
        return Err(reply);
    };
    let mut client = Rtm::open(url).await.unwrap();
    client.expect("hello", |v| v["type"] == "hello").await;
    Ok(client)
}

#[tokio::test]
async fn team_caps_from_the_token_claim_and_the_policy_file_refuse_the_connection_past_them() {
    let path = policy_file("caps", "[teams]\nTFILE = 1\n");
    let mesh = mesh_with_policy(&path).await;
    let (us, eu) = (
        mesh.rtm_base_url("us-east").unwrap(),
        mesh.rtm_base_url("eu-west").unwrap(),
    );
    let too_many = json!({"ok": false, "error": "too_many_connections"});
    // The claim caps TCLAIM at 2, across gateways.
    let first = connect(&us, &capped_token(&mesh, "U1", "TCLAIM", Some(2))).await;
    let second = connect(&eu, &capped_token(&mesh, "U2", "TCLAIM", Some(2))).await;
    assert!(first.is_ok() && second.is_ok());
    let third = connect(&us, &capped_token(&mesh, "U3", "TCLAIM", Some(2))).await;
    assert_eq!(third.err(), Some(too_many.clone()));
    // The file caps TFILE at 1; a larger claim does not raise it.
    let _held = connect(&eu, &capped_token(&mesh, "U1", "TFILE", None))
        .await
        .unwrap();
    let over = connect(&us, &capped_token(&mesh, "U2", "TFILE", Some(10))).await;
    assert_eq!(over.err(), Some(too_many));
    // No cap anywhere: another team is admitted.
    assert!(
        connect(&us, &capped_token(&mesh, "U9", "TFREE", None))
            .await
            .is_ok()
    );
}

/// Sends a message to `channel` as frame `id`; its reply (an ack or an error).
async fn send(client: &mut Rtm, id: i64, channel: &str) -> Value {
    client
        .send(json!({"id": id, "type": "message", "channel": channel, "text": format!("m{id}")}))
        .await;
    client
        .expect("the reply", |v| v["reply_to"] == json!(id))
        .await
}

/// Whether `reply` is the read-only refusal.
fn read_only(reply: &Value) -> bool {
    reply["error"] == json!({"code": 12, "msg": "restricted_action_read_only_channel"})
}

#[tokio::test]
async fn sighup_to_dev_multi_process_makes_a_channel_read_only_and_back_and_a_bad_file_changes_nothing()
 {
    let path = policy_file("sighup", "version = \"open\"\n");
    let dir = Dev::dir("policy-sighup");
    let mut args: Vec<String> = ["--ring-manager", "127.0.0.1:0", "--presence-ring-manager"]
        .map(String::from)
        .into();
    args.push("127.0.0.1:0".into());
    args.push(format!("--policy-file={}", path.display()));
    let dev = Dev::launch(&args, PathBuf::new(), dir);
    let base = dev.base_url();
    let client = Rtm::connect(&base, &dev.token("UANN", &["CFLIP"]))
        .await
        .unwrap();
    let client = tokio::sync::Mutex::new(client);
    let id = std::sync::Mutex::new(0);
    // Posts to CFLIP with the next frame id; the reply.
    let post = || async {
        let n = {
            let mut id = id.lock().unwrap();
            *id += 1;
            *id
        };
        send(&mut *client.lock().await, n, "CFLIP").await
    };
    assert_eq!(post().await["ok"], json!(true));
    // The gateway's value of the series of `name` with `label`.
    let metric = |name: &'static str, label: &'static str| {
        let base = base.clone();
        async move { metric_sum(&gateway_metrics(&base).await, name, &[label]) }
    };
    let (info, reloads) = (
        "channelmesh_policy_info",
        "channelmesh_policy_reloads_total",
    );
    assert_eq!(metric(info, "version=\"open\"").await, 1.0);

    // Read-only after a rewrite and SIGHUP to `dev`, which forwards it to its children.
    let closed = "version = \"closed\"\n[[channel]]\nmatch = \"CF*\"\nread_only = true\n";
    std::fs::write(&path, closed).unwrap();
    signal(dev.pid(), Signal::SIGHUP);
    eventually("the post refused as read-only", || async {
        read_only(&post().await).then_some(())
    })
    .await;
    assert_eq!(metric(info, "version=\"closed\"").await, 1.0);
    assert_eq!(metric(reloads, "outcome=\"ok\"").await, 1.0);

    // A bad file: the reload fails, is counted, and the channel stays read-only.
    std::fs::write(&path, "[[channel]]\nmatch = \"CF*\"\nread_only = nope\n").unwrap();
    signal(dev.pid(), Signal::SIGHUP);
    eventually("the failed reload counted", || async {
        (metric(reloads, "outcome=\"error\"").await == 1.0).then_some(())
    })
    .await;
    assert!(read_only(&post().await));
    assert_eq!(metric(info, "version=\"closed\"").await, 1.0);

    // Writable again.
    std::fs::write(&path, "version = \"open again\"\n").unwrap();
    signal(dev.pid(), Signal::SIGHUP);
    eventually("the post accepted again", || async {
        (post().await["ok"] == json!(true)).then_some(())
    })
    .await;
}

#[test]
fn a_bad_policy_file_at_start_refuses_to_start_naming_the_line() {
    let path = policy_file(
        "bad-start",
        "[[channel]]\nmatch = \"C*\"\n\nrelay_typing = 3\n",
    );
    let output = std::process::Command::new(crate::processes::BIN)
        .args([
            "--insecure",
            "gateway",
            "--region",
            "us-east",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--ring-manager", "http://127.0.0.1:9"])
        .arg(format!("--policy-file={}", path.display()))
        .env("CHANNELMESH_JWT_SECRET", "s".repeat(32))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: the policy file {}, line 4: ",
            path.display()
        )),
        "{stderr}"
    );
    // Refused before it binds: it never said where it listens.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("listening on"), "{stdout}");
}
