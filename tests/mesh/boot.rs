//! Boot from the web app (`--boot-url`): a real aiohttp web app
//! (tests/clients/python/boot_webapp.py, checking every request's signature) answers the
//! gateways' boot requests; real RTM clients connect with the channels it gives.

use std::process::Stdio;
use std::time::{Duration, Instant};

use channelmesh::MeshConfig;
use gateway::boot::{BootConfig, BootMode, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::processes::{ADMIN_TOKEN, Dev};
use crate::real_clients::{client_command, python, repo};
use crate::support::{
    Rtm, WebhookReceiver, admin, admin_at, eventually, gateway_metrics, mesh_with, metric_sum,
    post, web_api,
};

/// The secret the gateways sign with and the web app checks.
const SECRET: &str = "boot-test-secret";
/// The signature header's name, as the gateway sends it.
const SIGNATURE_HEADER: &str = "X-Channelmesh-Signature";

/// The web app, killed when dropped.
struct WebApp {
    child: tokio::process::Child,
    /// `http://127.0.0.1:PORT`.
    base: String,
    http: reqwest::Client,
}

impl WebApp {
    /// Starts boot_webapp.py with `config` (its `secret` added) and waits for its port.
    async fn start(mut config: Value) -> WebApp {
        config["secret"] = json!(SECRET);
        let script = repo().join("tests/clients/python/boot_webapp.py");
        let mut child = client_command(&python(), &script, &config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the web app starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("the web app's output") {
                if let Some(port) = line.strip_prefix("listening on ") {
                    return port.trim().to_string();
                }
            }
            panic!("the web app ended before it listened");
        })
        .await
        .expect("the web app listens within 30 s");
        WebApp {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    /// The boot URL to give the gateways.
    fn url(&self) -> String {
        format!("{}/boot", self.base)
    }

    /// Sets how the web app answers: `ok`, `slow` (after `delay_s`), `error` (HTTP 500),
    /// `garbage` (an invalid answer).
    async fn behave(&self, mode: &str, delay_s: f64) {
        let reply = self
            .http
            .post(format!("{}/control", self.base))
            .json(&json!({"mode": mode, "delay_s": delay_s}))
            .send()
            .await
            .expect("the web app answers /control");
        assert!(reply.status().is_success());
    }

    /// The web app's counts: signed requests per user, and requests refused for their
    /// signature.
    async fn stats(&self) -> Value {
        self.http
            .get(format!("{}/stats", self.base))
            .send()
            .await
            .expect("the web app answers /stats")
            .json()
            .await
            .expect("JSON stats")
    }

    async fn requests_for(&self, user: &str) -> u64 {
        self.stats().await["requests"][user].as_u64().unwrap_or(0)
    }
}

/// A mesh whose gateways boot from `url` within `deadline`.
fn booting(url: String, deadline: Duration) -> MeshConfig {
    MeshConfig {
        boot: Some(BootConfig {
            url,
            secret: Secret::new(SECRET),
            deadline,
            cache_ttl: Duration::from_secs(30),
            cache_users: 1_000,
            max_in_flight: 64,
            mode: BootMode::Union,
        }),
        ..MeshConfig::ephemeral()
    }
}

/// `rtm.connect` for `token` at `base`: the whole answer.
async fn rtm_connect(base: &str, token: &str) -> Value {
    web_api(base, "rtm.connect", Some(token)).await
}

#[tokio::test]
async fn a_user_in_5000_channels_from_the_web_app_gets_a_message_in_the_5000th_and_keeps_the_tokens_channels()
 {
    let webapp = WebApp::start(json!({
        "users": {"U5K": {"count": 5000, "prefix": "CB", "name": "five-k"}},
    }))
    .await;
    let mesh = mesh_with(booting(webapp.url(), Duration::from_secs(5))).await;
    let base = mesh.rtm_base_url("us-east").unwrap();
    let token = mesh.token("U5K", "T1", &["CTOKEN"]).unwrap();

    let answer = rtm_connect(&base, &token).await;
    assert_eq!(answer["ok"], json!(true), "{answer}");
    assert_eq!(answer["self"]["name"], "five-k", "the web app's profile");
    let mut client = Rtm::open(answer["url"].as_str().unwrap()).await.unwrap();
    assert_eq!(client.next().await.unwrap()["type"], "hello");

    let mut admin = admin(&mesh).await;
    for channel in ["CB04999", "CB00000", "CTOKEN"] {
        let ts = post(&mut admin, channel, "UPOSTER", &format!("to {channel}")).await;
        let got = client
            .expect(&format!("the message in {channel}"), |v| {
                v["type"] == "message" && v["channel"] == channel
            })
            .await;
        assert_eq!(got["ts"], json!(ts));
    }
    assert_eq!(webapp.requests_for("U5K").await, 1);

    // A second connect of the same user within the cache's life asks nobody.
    let second = Rtm::connect(&base, &token).await.unwrap();
    drop(second);
    assert_eq!(
        webapp.requests_for("U5K").await,
        1,
        "answered from the cache"
    );
    let metrics = gateway_metrics(&base).await;
    assert_eq!(
        metric_sum(&metrics, "channelmesh_gateway_boot_cache_hits_total", &[]),
        1.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "channelmesh_gateway_boot_requests_total",
            &["outcome=\"ok\""]
        ),
        1.0
    );

    // Every request the gateway made was signed right; a wrong signature is refused.
    assert_eq!(webapp.stats().await["bad_signatures"], 0);
    let forged = webapp
        .http
        .post(webapp.url())
        .header(SIGNATURE_HEADER, "sha256=00")
        .body(r#"{"user":"U5K","team":"T1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(webapp.stats().await["bad_signatures"], 1);
    assert_eq!(webapp.requests_for("U5K").await, 1);
}

#[tokio::test]
async fn a_web_app_slow_failing_wrong_or_down_gives_rtm_connect_a_clear_error() {
    let webapp = WebApp::start(json!({"users": {"UOK": {"channels": ["COK"]}}})).await;
    let deadline = Duration::from_millis(800);
    let mesh = mesh_with(booting(webapp.url(), deadline)).await;
    let base = mesh.rtm_base_url("us-east").unwrap();
    let token = |user: &str| mesh.token(user, "T1", &[]).unwrap();

    // Booted once while the web app is well: cached for later.
    let ok = Rtm::connect(&base, &token("UOK")).await.unwrap();
    drop(ok);

    // Slower than the deadline: the connect is answered at the deadline, not after the web
    // app's 10 s.
    webapp.behave("slow", 10.0).await;
    let started = Instant::now();
    let answer = rtm_connect(&base, &token("USLOW")).await;
    assert_eq!(answer, json!({"ok": false, "error": "boot_timeout"}));
    println!("boot_timeout after {:?}", started.elapsed());

    webapp.behave("error", 0.0).await;
    let answer = rtm_connect(&base, &token("UERR")).await;
    assert_eq!(answer, json!({"ok": false, "error": "boot_unavailable"}));

    webapp.behave("garbage", 0.0).await;
    let answer = rtm_connect(&base, &token("UBAD")).await;
    assert_eq!(answer, json!({"ok": false, "error": "boot_invalid_answer"}));

    // Down: nothing listens on its port any more.
    let mut webapp = webapp;
    webapp.child.kill().await.unwrap();
    let answer = rtm_connect(&base, &token("UDOWN")).await;
    assert_eq!(answer, json!({"ok": false, "error": "boot_unavailable"}));

    // A user booted before still connects (from the cache), with the web app's channel.
    let mut client = Rtm::connect(&base, &token("UOK")).await.unwrap();
    let mut admin = admin(&mesh).await;
    post(&mut admin, "COK", "UPOSTER", "still here").await;
    client
        .expect("the message in the booted channel", |v| {
            v["type"] == "message" && v["channel"] == "COK"
        })
        .await;
    let metrics = gateway_metrics(&base).await;
    for outcome in ["timeout", "unavailable", "invalid"] {
        let label = format!("outcome=\"{outcome}\"");
        assert!(
            metric_sum(
                &metrics,
                "channelmesh_gateway_boot_requests_total",
                &[&label]
            ) >= 1.0,
            "{outcome} counted"
        );
    }
}

#[tokio::test]
async fn concurrent_connects_of_one_user_share_one_request() {
    let webapp = WebApp::start(json!({"users": {"UMANY": {"channels": ["CMANY"]}}})).await;
    webapp.behave("slow", 0.5).await;
    let mesh = mesh_with(booting(webapp.url(), Duration::from_secs(5))).await;
    let base = mesh.rtm_base_url("us-east").unwrap();
    let token = mesh.token("UMANY", "T1", &[]).unwrap();
    let connects = (0..5).map(|_| rtm_connect(&base, &token));
    for answer in futures::future::join_all(connects).await {
        assert_eq!(answer["ok"], json!(true), "{answer}");
    }
    eventually("the web app saw its one request", || async {
        (webapp.requests_for("UMANY").await == 1).then_some(())
    })
    .await;
}

/// The boot path's added connect latency: `rtm.connect` + `hello` for distinct users (no cache
/// help), p50/p99, without `--boot-url` (the channels in the token) and with it (the same
/// channels from the web app). Run:
/// `BOOT_BENCH_CONNECTS=300 BOOT_BENCH_CHANNELS=100 cargo nextest run --test mesh boot_latency --run-ignored only --no-capture`
#[tokio::test]
#[ignore = "a measurement, not a check: run it by name"]
async fn boot_latency() {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (connects, channels) = (
        var("BOOT_BENCH_CONNECTS", 300),
        var("BOOT_BENCH_CHANNELS", 100),
    );
    let ids: Vec<String> = (0..channels).map(|i| format!("CX{i:05}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let webapp = WebApp::start(json!({"default": {"count": channels, "prefix": "CX"}})).await;
    for boot in [false, true] {
        let config = if boot {
            let mut config = booting(webapp.url(), Duration::from_secs(2));
            if let Some(b) = config.boot.as_mut() {
                b.cache_ttl = Duration::ZERO;
            }
            config
        } else {
            MeshConfig::ephemeral()
        };
        let mesh = mesh_with(config).await;
        let base = mesh.rtm_base_url("us-east").unwrap();
        let mut took = Vec::with_capacity(connects);
        for i in 0..connects {
            let user = format!("UBENCH{i}");
            let token = if boot {
                mesh.token(&user, "T1", &[]).unwrap()
            } else {
                mesh.token(&user, "T1", &id_refs).unwrap()
            };
            let started = Instant::now();
            let client = Rtm::connect(&base, &token).await.unwrap();
            took.push(started.elapsed());
            drop(client);
        }
        took.sort();
        let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
        println!(
            "boot={boot} channels={channels} connects={connects}: rtm.connect+hello p50 {:?} p99 {:?}",
            at(0.50),
            at(0.99)
        );
        let mut mesh = mesh;
        mesh.shutdown(Duration::from_secs(10)).await;
    }
}

#[test]
fn a_gateway_given_a_boot_url_refuses_to_start_without_the_secret() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_channelmesh"))
        .args(["gateway", "--insecure", "--region", "us-east"])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--boot-url",
            "http://127.0.0.1:9/boot",
        ])
        .env(
            "CHANNELMESH_JWT_SECRET",
            "boot-secret-boot-secret-boot-secret!",
        )
        .env_remove("CHANNELMESH_WEBHOOK_SECRET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "started without the secret");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: ") && l.contains("CHANNELMESH_WEBHOOK_SECRET")),
        "{stderr}"
    );
}

/// Runs boot_client.py (slack_sdk) with `config`; when `on_hello` is given, waits for its
/// `HELLO` line and runs it before the client's end. Asserts it prints OK.
async fn slack_sdk_client(
    config: Value,
    on_hello: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>>,
) {
    let script = repo().join("tests/clients/python/boot_client.py");
    let mut child = client_command(&python(), &script, &config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the slack_sdk client starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut seen = Vec::new();
    let mut on_hello = on_hello;
    let read = async {
        while let Some(line) = lines.next_line().await.expect("the client's output") {
            seen.push(line.clone());
            if line == "HELLO"
                && let Some(step) = on_hello.take()
            {
                step.await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the slack_sdk client finishes within a minute");
    let output = child.wait_with_output().await.expect("the client ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && seen.iter().any(|l| l == "OK"),
        "boot_client.py failed ({}):\n{}\n{stderr}",
        output.status,
        seen.join("\n")
    );
}

#[tokio::test]
async fn slack_sdk_clients_boot_into_5000_channels_and_read_the_boot_errors() {
    let webapp = WebApp::start(json!({
        "users": {"U5K": {"count": 5000, "prefix": "CB", "name": "five-k"}},
    }))
    .await;
    let mesh = mesh_with(booting(webapp.url(), Duration::from_millis(800))).await;
    let base = mesh.rtm_base_url("us-east").unwrap();
    let text = "to the 5000th channel";
    let config = json!({
        "base": base,
        "token": mesh.token("U5K", "T1", &[]).unwrap(),
        "name": "five-k",
        "channel": "CB04999",
        "text": text,
    });
    let mut admin = admin(&mesh).await;
    let post_it = Box::pin(async move {
        post(&mut admin, "CB04999", "UPOSTER", text).await;
    });
    slack_sdk_client(config, Some(post_it)).await;

    webapp.behave("slow", 10.0).await;
    let slow = json!({"base": base, "token": mesh.token("USLOW", "T1", &[]).unwrap(), "expect_error": "boot_timeout"});
    slack_sdk_client(slow, None).await;

    let mut webapp = webapp;
    webapp.child.kill().await.unwrap();
    let down = json!({"base": base, "token": mesh.token("UDOWN", "T1", &[]).unwrap(), "expect_error": "boot_unavailable"});
    slack_sdk_client(down, None).await;
}

/// `dev --multi-process` hands the boot URL to its gateway children and the webhook URL to its
/// channel-server children, each with the secret from its environment: a user the web app boots
/// into a channel gets a message posted there, and the channel's owner (another process) tells
/// the receiver the user was added, signed.
#[tokio::test]
async fn dev_multi_process_boots_its_gateways_and_its_channel_servers_send_webhooks() {
    let webapp = WebApp::start(json!({"users": {"UMP": {"channels": ["CBOOTMP"]}}})).await;
    let receiver = WebhookReceiver::start(SECRET).await;
    let dir = Dev::dir("boot-multi-process");
    let state_file = dir.join("ring.json");
    let mut args = Dev::embedded_args(&state_file);
    args.extend([
        "--boot-url".to_string(),
        webapp.url(),
        "--webhook-url".to_string(),
        receiver.url(),
    ]);
    let dev = Dev::launch_with_env(
        &args,
        &[("CHANNELMESH_WEBHOOK_SECRET", SECRET)],
        state_file,
        dir,
    );
    let base = format!("http://{}/api/", dev.us_east);
    let mut client = Rtm::connect(&base, &dev.token("UMP", &[])).await.unwrap();
    assert_eq!(
        webapp.requests_for("UMP").await,
        1,
        "the gateway child booted"
    );

    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let ts = post(&mut admin, "CBOOTMP", "UPOSTER", "to a booted channel").await;
    let got = client
        .expect("the message in the booted channel", |v| {
            v["type"] == "message" && v["channel"] == "CBOOTMP"
        })
        .await;
    assert_eq!(got["ts"], json!(ts));

    let added = eventually("the owner tells member_added", || async {
        receiver.events().await.into_iter().find(|e| {
            e["name"] == "member_added" && e["channel"] == "CBOOTMP" && e["user"] == "UMP"
        })
    })
    .await;
    assert_eq!(
        added["id"].as_str().unwrap().split(':').next(),
        Some("member_added")
    );
    assert_eq!(receiver.received().await.bad_signatures, 0);
}
