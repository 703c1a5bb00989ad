//! Denial of service by one caller (issue 15): one user, one address, a caller minting connect
//! URLs it never opens, a client trickling or bloating a request body — each is refused with a
//! clear answer, and everyone else is still served. Real HTTP and WebSocket clients against a
//! real mesh; outcomes only (statuses, errors, others' success), no timings.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use channelmesh::{Mesh, MeshConfig};
use gateway::limits::Limits;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    Rtm, admin, eventually, gateway_metrics, mesh_with, metric_sum, post, refused_upgrade, rm_at,
    web_api,
};

async fn mesh_limited(limits: Limits) -> Mesh {
    let mut config = MeshConfig::ephemeral();
    config.limits = limits;
    mesh_with(config).await
}

/// An HTTP client whose calls come from `source` (any 127.0.0.x is this host).
fn client_from(source: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::V4(source))
        .build()
        .unwrap()
}

/// `POST {base}{method}` with `token` (if any) and `headers`: status, `Retry-After`, body.
async fn call(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>, Value) {
    let mut request = http.post(format!("{base}{method}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let reply = request.send().await.expect("the gateway answers");
    let status = reply.status();
    let retry_after = reply
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (
        status,
        retry_after,
        reply.json().await.expect("a JSON answer"),
    )
}

/// Calls `method` `n` times at once-after-another; returns (answered ok, answered
/// `ratelimited` with `Retry-After: 1`), and checks nothing else came back but `others`.
async fn hammer(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    n: usize,
    others: &[&str],
) -> (usize, usize) {
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..n {
        let (status, retry_after, body) = call(http, base, method, token, headers).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["ok"] == json!(true) {
            ok += 1;
        } else if body == json!({"ok": false, "error": "ratelimited"}) {
            assert_eq!(retry_after.as_deref(), Some("1"), "ratelimited says when");
            limited += 1;
        } else {
            let error = body["error"].as_str().unwrap_or_default();
            assert!(others.contains(&error), "{method}: unexpected {body}");
        }
    }
    (ok, limited)
}

/// Waits until the gateway at `base` counted at least one `name` with `labels`.
async fn counted(base: &str, name: &str, labels: &[&str]) {
    eventually(&format!("{name} {labels:?} counted"), || async {
        let text = gateway_metrics(base).await;
        (metric_sum(&text, name, labels) >= 1.0).then_some(())
    })
    .await;
}

/// Checks that the gateway at `base` still serves everyone else: a client of `user` connects,
/// and gets a message posted to its channel.
async fn others_are_served(mesh: &Mesh, base: &str, user: &str) {
    let token = mesh.token(user, "T1", &["C1"]).unwrap();
    let mut client = Rtm::connect(base, &token).await.unwrap();
    let mut admin = admin(mesh).await;
    post(&mut admin, "C1", "UPOSTER", "still served").await;
    client
        .expect("the message", |v| v["type"] == "message")
        .await;
}

/// `host:port` of a gateway's base URL.
fn authority(base: &str) -> String {
    base.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn one_user_hammering_rtm_connect_is_limited_while_another_user_connects() {
    let mesh = mesh_limited(Limits {
        connects_per_user: 1,
        ..Limits::default()
    })
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let attacker = mesh.token("UHAMMER", "T1", &[]).unwrap();
    let http = reqwest::Client::new();
    let (admitted, limited) =
        hammer(&http, &us, "rtm.connect", Some(&attacker), &[], 60, &[]).await;
    eprintln!("one user, 60 rtm.connect: {admitted} admitted, {limited} ratelimited");
    assert!(admitted >= 1, "the burst is admitted");
    assert!(
        limited > 0,
        "60 connects of one user all passed a limit of 1/s"
    );
    // Another user, from the same address, connects and is served.
    others_are_served(&mesh, &us, "UOTHER").await;
    counted(
        &us,
        "channelmesh_gateway_connect_refusals_total",
        &[r#"reason="user_rate""#],
    )
    .await;
}

#[tokio::test]
async fn one_address_hammering_rtm_connect_is_limited_and_forging_x_forwarded_for_does_not_help() {
    let proxy = Ipv4Addr::new(127, 0, 0, 4);
    let mesh = mesh_limited(Limits {
        connects_per_addr: 1,
        trusted_proxies: vec![format!("{proxy}/32").parse().unwrap()],
        ..Limits::default()
    })
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let attacker = client_from(Ipv4Addr::new(127, 0, 0, 2));
    // No token at all: counted by address before the token is looked at.
    let (_, limited) = hammer(
        &attacker,
        &us,
        "rtm.connect",
        None,
        &[],
        40,
        &["not_authed"],
    )
    .await;
    assert!(limited > 0, "40 calls from one address all passed 1/s");
    // A valid token from that address, and a forged X-Forwarded-For: still that address.
    let token = mesh.token("UATTACK", "T1", &[]).unwrap();
    let forged = [("x-forwarded-for", "198.51.100.77")];
    let (status, retry_after, body) =
        call(&attacker, &us, "rtm.connect", Some(&token), &forged).await;
    assert_eq!(
        (status, body, retry_after.as_deref()),
        (
            StatusCode::OK,
            json!({"ok": false, "error": "ratelimited"}),
            Some("1")
        )
    );
    // Another address connects and is served.
    let neighbour = client_from(Ipv4Addr::new(127, 0, 0, 3));
    let own = mesh.token("UNEIGHBOUR", "T1", &["C1"]).unwrap();
    let (_, _, reply) = call(&neighbour, &us, "rtm.connect", Some(&own), &[]).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let mut client = Rtm::open(reply["url"].as_str().unwrap()).await.unwrap();
    client.expect("hello", |v| v["type"] == "hello").await;
    // Through a trusted proxy, the client it names is limited, not the proxy: one client
    // behind it hammers and is refused, another behind it still gets in.
    let through = client_from(proxy);
    let hammerer = [("x-forwarded-for", "198.51.100.1")];
    let (_, limited) = hammer(
        &through,
        &us,
        "rtm.connect",
        None,
        &hammerer,
        40,
        &["not_authed"],
    )
    .await;
    assert!(limited > 0, "the client behind the proxy was not limited");
    let polite = [("x-forwarded-for", "1.2.3.4, 198.51.100.2")];
    let (_, _, reply) = call(&through, &us, "rtm.connect", Some(&own), &polite).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    counted(
        &us,
        "channelmesh_gateway_connect_refusals_total",
        &[r#"reason="address_rate""#],
    )
    .await;
}

/// `rtm.connect` until the answer is not `ratelimited` (the team's presence server warming up).
async fn connect_final(base: &str, token: &str) -> Value {
    eventually("rtm.connect to stop answering ratelimited", || async {
        let reply = web_api(base, "rtm.connect", Some(token)).await;
        (reply["error"] != json!("ratelimited")).then_some(reply)
    })
    .await
}

#[tokio::test]
async fn connect_urls_never_opened_do_not_lock_a_team_out() {
    let mut config = MeshConfig::ephemeral();
    config.limits = Limits {
        team_connections: 2,
        ..Limits::default()
    };
    // URLs valid far longer than any wait here: what frees the team is the hold, not expiry.
    config.connect_url_ttl = Duration::from_secs(600);
    let mesh = mesh_with(config).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let hoarder = mesh.token("UHOARD", "T1", &["C1"]).unwrap();
    let first = connect_final(&us, &hoarder).await;
    let second = connect_final(&us, &hoarder).await;
    assert_eq!((&first["ok"], &second["ok"]), (&json!(true), &json!(true)));
    // The team's two places are held by the unopened URLs, for now.
    let member = mesh.token("UMEMBER", "T1", &["C1"]).unwrap();
    assert_eq!(
        connect_final(&us, &member).await,
        json!({"ok": false, "error": "too_many_connections"})
    );
    // After the hold both places are given back, long before the URLs expire.
    eventually("both unopened URLs to give their places back", || async {
        let text = gateway_metrics(&us).await;
        (metric_sum(
            &text,
            "channelmesh_gateway_ticket_places_released_total",
            &[],
        ) >= 2.0)
            .then_some(())
    })
    .await;
    let reply = connect_final(&us, &member).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let mut member_client = Rtm::open(reply["url"].as_str().unwrap()).await.unwrap();
    member_client
        .expect("hello", |v| v["type"] == "hello")
        .await;
    // The cap stays exact: an old URL opened now asks for a place again and gets the last
    // one; the other finds the team full.
    let mut hoarded = Rtm::open(first["url"].as_str().unwrap()).await.unwrap();
    hoarded.expect("hello", |v| v["type"] == "hello").await;
    let refused = refused_upgrade(second["url"].as_str().unwrap()).await;
    assert_eq!(
        refused,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ok": false, "error": "too_many_connections"})
        )
    );
    let mut admin = admin(&mesh).await;
    post(&mut admin, "C1", "U9", "both in").await;
    member_client
        .expect("the message", |v| v["type"] == "message")
        .await;
    hoarded
        .expect("the message", |v| v["type"] == "message")
        .await;
}

/// Reads what the gateway sends on `socket` until it closes it; panics if it keeps it open
/// for `limit`, while `drip` keeps being sent every 200 ms.
async fn read_until_closed(socket: &mut TcpStream, drip: &[u8], limit: usize) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..limit {
        // A write may fail once the gateway closed: reading says so.
        let _ = socket.write_all(drip).await;
        match tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return String::from_utf8_lossy(&answer).into_owned(),
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    panic!(
        "the gateway kept the socket open; it sent {:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// The status and JSON body of a raw HTTP/1.1 response.
fn status_and_body(answer: &str) -> (u16, Value) {
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_deadline_while_the_gateway_serves_others() {
    let mesh = mesh_limited(Limits {
        request_body_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut slow = TcpStream::connect(authority(&us)).await.unwrap();
    slow.write_all(
        b"POST /api/rtm.connect HTTP/1.1\r\nHost: x\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n",
    )
    .await
    .unwrap();
    // A byte every 200 ms, for at most 40 s.
    let trickle = tokio::spawn(async move { read_until_closed(&mut slow, b"a", 200).await });
    // Meanwhile others are served.
    others_are_served(&mesh, &us, "U1").await;
    let answer = trickle.await.unwrap();
    assert_eq!(
        status_and_body(&answer),
        (408, json!({"ok": false, "error": "request_timeout"})),
        "{answer}"
    );
    counted(
        &us,
        "channelmesh_gateway_request_body_refusals_total",
        &[r#"reason="timeout""#],
    )
    .await;
}

#[tokio::test]
async fn an_oversized_body_is_refused_and_a_large_ordinary_one_is_not() {
    let mesh = mesh_limited(Limits::default()).await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let cap = Limits::default().request_body_bytes;
    // Declared too large: refused before a byte of it is read.
    let mut declared = TcpStream::connect(authority(&us)).await.unwrap();
    let head = format!(
        "POST /api/auth.test HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        100 * cap
    );
    declared.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut declared, b"", 50).await;
    let too_large = (413, json!({"ok": false, "error": "request_too_large"}));
    assert_eq!(status_and_body(&answer), too_large, "{answer}");
    // Chunked, without a length: refused once past the cap.
    let mut chunked = TcpStream::connect(authority(&us)).await.unwrap();
    chunked
        .write_all(
            b"POST /api/rtm.connect HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let chunk = format!("1000\r\n{}\r\n", "a".repeat(0x1000));
    for _ in 0..=cap / 0x1000 {
        chunked.write_all(chunk.as_bytes()).await.unwrap();
    }
    let answer = read_until_closed(&mut chunked, b"", 50).await;
    assert_eq!(status_and_body(&answer), too_large, "{answer}");
    // A form body just under the cap is read as ever.
    let token = mesh.token("U1", "T1", &[]).unwrap();
    let padding = "a".repeat(cap - 200);
    let reply: Value = reqwest::Client::new()
        .post(format!("{us}auth.test"))
        .form(&[("token", token.as_str()), ("padding", padding.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let text = gateway_metrics(&us).await;
    assert_eq!(
        metric_sum(
            &text,
            "channelmesh_gateway_request_body_refusals_total",
            &[r#"reason="too_large""#]
        ),
        2.0
    );
}

#[tokio::test]
async fn auth_test_and_users_methods_are_limited_per_user_and_per_address() {
    let mesh = mesh_limited(Limits {
        api_calls_per_user: 1,
        api_calls_per_addr: 2,
        ..Limits::default()
    })
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    // One user: auth.test, then users.getPresence, share the user's rate (a burst of 10; the
    // address's 20 are not reached).
    let http = client_from(Ipv4Addr::new(127, 0, 0, 2));
    let noisy = mesh.token("UNOISY", "T1", &[]).unwrap();
    let (_, limited) = hammer(&http, &us, "auth.test", Some(&noisy), &[], 12, &[]).await;
    assert!(limited > 0, "auth.test of one user was not limited");
    let (_, limited) = hammer(&http, &us, "users.getPresence", Some(&noisy), &[], 3, &[]).await;
    assert!(
        limited > 0,
        "users.getPresence does not share the user's rate"
    );
    // Another user from the same address is still answered.
    let quiet = mesh.token("UQUIET", "T1", &[]).unwrap();
    let (_, _, reply) = call(&http, &us, "auth.test", Some(&quiet), &[]).await;
    assert_eq!(reply["user_id"], json!("UQUIET"), "{reply}");
    // One address, many users (a fresh token each time): limited by the address.
    let crowd = client_from(Ipv4Addr::new(127, 0, 0, 3));
    let mut limited = 0;
    for i in 0..40 {
        let token = mesh.token(&format!("UCROWD{i}"), "T1", &[]).unwrap();
        let form = [("presence", "away")];
        let reply: Value = crowd
            .post(format!("{us}users.setPresence"))
            .bearer_auth(&token)
            .form(&form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if reply == json!({"ok": false, "error": "ratelimited"}) {
            limited += 1;
        } else {
            assert_eq!(reply, json!({"ok": true}));
        }
    }
    assert!(
        limited > 0,
        "40 users.setPresence from one address all passed 2/s"
    );
    // Another address is answered.
    let (_, _, reply) = call(
        &client_from(Ipv4Addr::new(127, 0, 0, 5)),
        &us,
        "users.getPresence",
        Some(&quiet),
        &[],
    )
    .await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let text = gateway_metrics(&us).await;
    for (method, reason) in [
        ("auth.test", "user_rate"),
        ("users.getPresence", "user_rate"),
        ("users.setPresence", "address_rate"),
    ] {
        let labels = [
            format!(r#"method="{method}""#),
            format!(r#"reason="{reason}""#),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        assert!(
            metric_sum(&text, "channelmesh_gateway_api_refusals_total", &labels) >= 1.0,
            "{method} {reason} not counted"
        );
    }
}

#[tokio::test]
async fn a_draining_gateway_passes_each_clients_address_to_a_gateway_that_trusts_it() {
    // The gateways (127.0.0.1) trust each other; clients come from 127.0.0.10 and up.
    let mesh = mesh_limited(Limits {
        connects_per_addr: 1,
        trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
        ..Limits::default()
    })
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    rm_at(mesh.ring_manager)
        .await
        .drain_region(mesh_proto::ring::DrainRegionRequest {
            region: "us-east".into(),
            rate: 0,
        })
        .await
        .unwrap();
    let health = us.replace("/api/", "/healthz");
    eventually("us-east to know it drains", || async {
        let status = reqwest::get(&health).await.unwrap().status();
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    // More clients than one address's burst (10), each from its own address, all through the
    // draining us-east: eu-west counts each client, not the gateway that forwards them.
    let eu_ws = eu.replacen("http://", "ws://", 1).replace("/api/", "/rtm/");
    for i in 0..15u8 {
        let http = client_from(Ipv4Addr::new(127, 0, 0, 10 + i));
        let token = mesh.token(&format!("UMOVED{i}"), "T1", &[]).unwrap();
        let reply = eventually("us-east forwards to eu-west", || async {
            let (_, _, reply) = call(&http, &us, "rtm.connect", Some(&token), &[]).await;
            (reply["ok"] == json!(true)).then_some(reply)
        })
        .await;
        let url = reply["url"].as_str().unwrap();
        assert!(url.starts_with(&eu_ws), "{url} is not eu-west's");
    }
    let text = gateway_metrics(&eu).await;
    assert_eq!(
        metric_sum(
            &text,
            "channelmesh_gateway_connect_refusals_total",
            &[r#"reason="address_rate""#]
        ),
        0.0,
        "eu-west limited the forwarding gateway instead of the clients"
    );
}
