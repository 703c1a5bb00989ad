//! Attacks on the HTTP endpoints beyond the health probes — a ring manager's console, every
//! service's `/metrics`, a gateway's `/stats` — by a caller on the network, against real
//! processes over real HTTP. Off loopback these need the process's `--http-token`
//! (`CHANNELMESH_HTTP_TOKEN`): without it a caller gets 401, with it 200; a side port or console
//! asked for off loopback without a token does not start; a gateway (whose port is public) with
//! no token answers 403 there. `/healthz` and `/readyz` stay open for load balancers.
//!
//! The listeners are bound to `0.0.0.0` (not loopback) and called through 127.0.0.1: the rule
//! is decided by the address a listener is bound to, so that is a caller "on the network".

use std::process::Stdio;

use mesh_transport::Role;
use tokio::process::{Child, Command};

use crate::processes::BIN;
use crate::support::{child_tls, listening};

/// The processes' HTTP token (at least 16 bytes).
const HTTP_TOKEN: &str = "attack-test-http-token-0123456789";
/// A JWT secret long enough for any gateway.
const JWT_SECRET: &str = "attack-test-jwt-secret-0123456789abcdef";

/// A port free on every interface, for a child process to bind.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `channelmesh <args>` with the HTTP token in its environment (or none), killed on drop.
fn spawn(args: &[&str], http_token: Option<&str>) -> Child {
    command(args, http_token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn command(args: &[&str], http_token: Option<&str>) -> Command {
    // A service gets a certificate from the test process's CA, naming it by its `--id`.
    let id = args
        .iter()
        .position(|a| *a == "--id")
        .map_or("console", |at| args[at + 1]);
    let tls = match args[0] {
        "ring-manager" => child_tls(Role::RingManager, id),
        "channel-server" => child_tls(Role::ChannelServer, id),
        "gateway" => child_tls(Role::Gateway, id),
        _ => Vec::new(),
    };
    let mut command = Command::new(BIN);
    command
        .args(tls)
        .args(args)
        .env_remove("CHANNELMESH_HTTP_TOKEN")
        .env("CHANNELMESH_JWT_SECRET", JWT_SECRET)
        .stdin(Stdio::null());
    if let Some(token) = http_token {
        command.env("CHANNELMESH_HTTP_TOKEN", token);
    }
    command
}

/// `GET http://127.0.0.1:<port><path>` with `Authorization: <authorization>` if given: the
/// status and the body.
async fn get(port: u16, path: &str, authorization: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Every protected path of a listener: 401 with no credentials, a wrong token, the token
/// under another scheme; 200 with the token as a bearer token. Returns the bodies of the 200s.
async fn only_the_token_reads(port: u16, paths: &[&str]) -> Vec<String> {
    let mut bodies = Vec::new();
    for path in paths {
        for refused in [
            None,
            Some(bearer("not-the-token-at-all-0123456789")),
            Some(format!("Token {HTTP_TOKEN}")),
        ] {
            let (status, body) = get(port, path, refused.as_deref()).await;
            assert_eq!(status, 401, "{path} with {refused:?}: {body}");
            assert!(body.contains("--http-token"), "{path}: {body}");
            println!("GET {path} with {refused:?}: {status} {}", body.trim());
        }
        let (status, body) = get(port, path, Some(&bearer(HTTP_TOKEN))).await;
        assert_eq!(status, 200, "{path} with the token: {body}");
        bodies.push(body);
    }
    bodies
}

#[tokio::test]
async fn a_console_and_metrics_off_loopback_answer_only_the_http_token() {
    let (grpc, console) = (free_port(), free_port());
    let _rm = spawn(
        &[
            "ring-manager",
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http",
            &format!("0.0.0.0:{console}"),
        ],
        Some(HTTP_TOKEN),
    );
    listening(console, "the ring manager's console").await;

    let bodies = only_the_token_reads(console, &["/", "/api/state", "/metrics"]).await;
    assert!(bodies[1].contains("\"epoch\""), "{}", bodies[1]);
    assert!(bodies[2].contains("channelmesh_"), "{}", bodies[2]);
    // A browser sends the token as the password of HTTP Basic authentication.
    let basic = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{console}/api/state"))
        .basic_auth("ops", Some(HTTP_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status().as_u16(), 200);
    // The probes stay open.
    assert_eq!(get(console, "/healthz", None).await.0, 200);
    assert_eq!(get(console, "/readyz", None).await.0, 200);

    // A channel server's side port off loopback: /metrics needs the token, /readyz does not.
    let (cs, cs_http) = (free_port(), free_port());
    let _cs = spawn(
        &[
            "channel-server",
            "--id",
            "cs-attack",
            "--listen",
            &format!("127.0.0.1:{cs}"),
            "--advertise",
            &format!("127.0.0.1:{cs}"),
            "--ring-manager",
            &format!("http://127.0.0.1:{grpc}"),
            "--http",
            &format!("0.0.0.0:{cs_http}"),
        ],
        Some(HTTP_TOKEN),
    );
    listening(cs_http, "the channel server's side port").await;
    let bodies = only_the_token_reads(cs_http, &["/metrics"]).await;
    assert!(bodies[0].contains("node=\"cs-attack\""), "{}", bodies[0]);
    assert_eq!(get(cs_http, "/healthz", None).await.0, 200);

    // `ctl top` reads the console only with the token, and says which flag it lacks.
    let console_url = format!("http://127.0.0.1:{console}");
    let top = ["ctl", "top", "--once", "--console", &console_url];
    let refused = command(&top, None).output().await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("--http-token or CHANNELMESH_HTTP_TOKEN"),
        "{stderr}"
    );
    println!("ctl top without the token: {}", stderr.trim());
    let read = command(&top, Some(HTTP_TOKEN)).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&read.stdout);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(stdout.contains("epoch"), "{stdout}");
}

#[tokio::test]
async fn a_console_or_side_port_off_loopback_without_a_token_does_not_start() {
    let grpc = free_port();
    let rm = command(
        &[
            "ring-manager",
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http",
            &format!("0.0.0.0:{}", free_port()),
        ],
        None,
    )
    .output()
    .await
    .unwrap();
    assert!(!rm.status.success());
    let stderr = String::from_utf8_lossy(&rm.stderr);
    assert!(
        stderr.contains("is not a loopback address")
            && stderr.contains("--http-token or CHANNELMESH_HTTP_TOKEN"),
        "{stderr}"
    );
    println!(
        "ring-manager --http 0.0.0.0 without a token: {}",
        stderr.trim()
    );
    // Nothing was left listening on the gRPC port either.
    assert!(std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err());

    // A token too short to be one is refused as well.
    let short = command(&["ring-manager", "--listen", "127.0.0.1:0"], Some("short"))
        .output()
        .await
        .unwrap();
    assert!(!short.status.success());
    let stderr = String::from_utf8_lossy(&short.stderr);
    assert!(stderr.contains("at least 16"), "{stderr}");
}

#[tokio::test]
async fn a_gateway_on_a_public_address_guards_metrics_and_stats_and_keeps_its_probes_open() {
    let grpc = free_port();
    let _rm = spawn(
        &["ring-manager", "--listen", &format!("127.0.0.1:{grpc}")],
        None,
    );
    let gateway = |port: u16, token| {
        spawn(
            &[
                "gateway",
                "--region",
                "us-east",
                "--id",
                &format!("us-east-{port}"),
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--public-url",
                &format!("http://127.0.0.1:{port}"),
                "--ring-manager",
                &format!("http://127.0.0.1:{grpc}"),
            ],
            token,
        )
    };

    // With the token: 401 without it, 200 with it.
    let with = free_port();
    let _with = gateway(with, Some(HTTP_TOKEN));
    listening(with, "the gateway with a token").await;
    let bodies = only_the_token_reads(with, &["/metrics", "/stats"]).await;
    assert!(bodies[0].contains("channelmesh_"), "{}", bodies[0]);
    assert_eq!(get(with, "/healthz", None).await.0, 200);

    // Without a token: the gateway serves its clients, but /metrics and /stats are closed.
    let without = free_port();
    let _without = gateway(without, None);
    listening(without, "the gateway without a token").await;
    for path in ["/metrics", "/stats"] {
        let (status, body) = get(without, path, Some(&bearer(HTTP_TOKEN))).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("this service has none"), "{body}");
        println!(
            "GET {path} on a gateway without a token: {status} {}",
            body.trim()
        );
    }
    assert_eq!(get(without, "/healthz", None).await.0, 200);
    // The public API is untouched: `rtm.connect` without a token is Slack's answer.
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{without}/api/rtm.connect"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["error"], "not_authed", "{answer}");
}
