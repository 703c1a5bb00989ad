//! The gateway's limits (issue: hardening): nothing one client does hurts anyone else.

use std::time::{Duration, Instant};

use channelmesh::MeshConfig;
use futures::{SinkExt, StreamExt};
use gateway::limits::Limits;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Rtm, admin, eventually, mesh_with, post, web_api};

fn with_limits(limits: Limits) -> MeshConfig {
    let mut config = MeshConfig::ephemeral();
    config.limits = limits;
    config
}

/// The gateway's `/stats` counters.
async fn stats(base: &str) -> Value {
    let url = base.trim_end_matches("/api/").to_string() + "/stats";
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

fn is_ratelimited(v: &Value) -> bool {
    v["ok"] == json!(false) && v["error"]["code"] == json!(11) && v["error"]["msg"] == "ratelimited"
}

#[tokio::test]
async fn a_flooding_client_is_throttled_then_closed_while_a_polite_one_is_served() {
    let mesh = mesh_with(with_limits(Limits {
        frames_per_sec: 20,
        frame_burst: 20,
        refusals_before_close: 100,
        ..Limits::default()
    }))
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut flooder = Rtm::connect(&us, &mesh.token("UFLOOD", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut polite = Rtm::connect(&us, &mesh.token("UPOLITE", "T1", &["C1"]).unwrap())
        .await
        .unwrap();

    // The flooder sends far past its burst without waiting.
    for id in 1..=1_000 {
        let frame = json!({"id": id, "type": "message", "channel": "C1", "text": "flood"});
        if flooder
            .ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            break; // Closed on it already.
        }
    }
    // Meanwhile the polite client, one message at a time, is never refused.
    let mut latencies = Vec::new();
    for id in 1..=10 {
        let sent = Instant::now();
        polite
            .send(json!({"id": id, "type": "message", "channel": "C1", "text": format!("polite {id}")}))
            .await;
        let reply = polite.expect("the ack", |v| v["reply_to"] == id).await;
        assert_eq!(
            reply["ok"],
            json!(true),
            "the polite client was refused: {reply}"
        );
        latencies.push(sent.elapsed());
        // Pacing: a polite client sends at 10 frames a second, under its limit of 20.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("polite client's ack latencies during the flood: {latencies:?}");

    // The flooder got acks for about its burst, then `ratelimited` errors, then a close.
    let (mut acked, mut refused) = (0, 0);
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), flooder.ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let v: Value = serde_json::from_str(text.as_str()).unwrap();
                if is_ratelimited(&v) {
                    refused += 1;
                } else if v["ok"] == json!(true) {
                    acked += 1;
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break None,
            Err(_) => panic!("the flooder was neither refused nor closed"),
        }
    };
    assert!(refused > 0, "no ratelimited error reached the flooder");
    assert!(acked < 1_000, "every flood frame was taken");
    assert_eq!(code, Some(gateway::connection::close::RATE_LIMITED));
}

#[tokio::test]
async fn repeated_typing_is_coalesced() {
    let mesh = mesh_with(with_limits(Limits {
        typing_interval: Duration::from_secs(30),
        ..Limits::default()
    }))
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut typist = Rtm::connect(&us, &mesh.token("UTYPE", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut reader = Rtm::connect(&us, &mesh.token("UREAD", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    for id in 1..=5 {
        typist
            .send(json!({"id": id, "type": "typing", "channel": "C1"}))
            .await;
    }
    reader
        .expect("the first typing", |v| v["type"] == "user_typing")
        .await;
    reader
        .expect_none(Duration::from_millis(500), "a repeated typing", |v| {
            v["type"] == "user_typing"
        })
        .await;
    let metrics = metric_text(&us).await;
    assert_eq!(
        counter(&metrics, "channelmesh_gateway_typing_coalesced_total"),
        4.0
    );
}

/// Opens an RTM WebSocket whose client socket has a tiny receive buffer, and never reads it.
async fn non_reader(
    base: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let reply = web_api(base, "rtm.connect", Some(token)).await;
    let url = reply["url"].as_str().unwrap().to_string();
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    ws
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

/// The documented bound: a slow consumer holds at most its outgoing byte budget (plus the
/// WebSocket write buffer) before it is closed; the test allows generous room for the rest
/// of the process (history, the fast reader, allocator slack).
const RSS_GROWTH_BOUND: u64 = 32 << 20;

#[tokio::test]
async fn a_client_that_does_not_read_is_closed_and_memory_stays_flat() {
    let mesh = mesh_with(with_limits(Limits {
        outbound_bytes: 256 << 10,
        write_timeout: Duration::from_secs(2),
        ..Limits::default()
    }))
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut stalled = non_reader(&us, &mesh.token("USLOW", "T1", &["C1"]).unwrap()).await;
    let mut fast = Rtm::connect(&us, &mesh.token("UFAST", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let before = rss_bytes();

    // 10,000 messages of 4 KiB (40 MB in all) fanned out to both.
    const MESSAGES: usize = 10_000;
    let text = "x".repeat(4096);
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut peak = 0;
        while got < MESSAGES {
            let v = fast.next().await.expect("the fast reader keeps receiving");
            if v["type"] == "message" {
                got += 1;
                if got % 500 == 0 {
                    peak = peak.max(rss_bytes());
                }
            }
        }
        (got, peak, fast)
    });
    let admin = admin(&mesh).await;
    let posters: Vec<_> = (0..8)
        .map(|p| {
            let (mut admin, text) = (admin.clone(), text.clone());
            tokio::spawn(async move {
                for _ in (p..MESSAGES).step_by(8) {
                    post(&mut admin, "C1", "UPOSTER", &text).await;
                }
            })
        })
        .collect();
    for p in posters {
        p.await.unwrap();
    }
    let (got, peak, _fast) = reader.await.unwrap();
    assert_eq!(got, MESSAGES, "the fast reader got every message");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "RSS before {} KiB, peak during the fan-out {} KiB (+{} KiB)",
        before >> 10,
        peak >> 10,
        growth >> 10
    );
    assert!(
        growth < RSS_GROWTH_BOUND,
        "RSS grew by {growth} bytes while a client did not read"
    );

    // The gateway let the non-reader go: only the fast reader remains.
    eventually("the slow consumer to be dropped", || async {
        (stats(&us).await["connections"] == json!(1)).then_some(())
    })
    .await;
    // What the non-reader finally reads ends before the 10,000 messages: a close or EOF.
    let mut received = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => received += 1,
            Ok(Some(Ok(Message::Close(frame)))) => {
                if let Some(frame) = frame {
                    assert_eq!(
                        u16::from(frame.code),
                        gateway::connection::close::SLOW_CONSUMER
                    );
                }
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break,
            Err(_) => panic!("the slow consumer's socket was not closed"),
        }
    }
    assert!(received < MESSAGES, "the non-reader got everything");
}

#[tokio::test]
async fn slowloris_handshakes_time_out_and_others_still_connect() {
    let mesh = mesh_with(with_limits(Limits {
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    }))
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let addr = us
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /api/rtm.connect HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A normal client connects while the slow one dribbles.
    let dribble = tokio::spawn(async move {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        for _ in 0..200 {
            if slow.write_all(b"X").await.is_err() {
                return started.elapsed();
            }
            match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {} // An error response (408); the close follows.
                Err(_) => {}
            }
        }
        panic!("the gateway kept a slowloris handshake open for 40 s");
    });
    let mut client = Rtm::connect(&us, &mesh.token("U1", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut admin = admin(&mesh).await;
    post(&mut admin, "C1", "U2", "hi").await;
    client
        .expect("the message", |v| v["type"] == "message")
        .await;
    let held = dribble.await.unwrap();
    eprintln!("the slowloris connection was closed after {held:?}");
    // And counted.
    eventually("the header timeout in the metrics", || async {
        let metrics = metric_text(&us).await;
        (counter(&metrics, "channelmesh_gateway_header_timeouts_total") >= 1.0).then_some(())
    })
    .await;
}

/// The gateway's `/metrics` text.
pub(crate) async fn metric_text(base: &str) -> String {
    let url = base.trim_end_matches("/api/").to_string() + "/metrics";
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The value of the unlabelled-by-us counter `name` (its identity labels aside).
pub(crate) fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_gateway_refuses_connects_past_its_cap() {
    let mesh = mesh_with(with_limits(Limits {
        max_connections: 2,
        ..Limits::default()
    }))
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let token = mesh.token("U1", "T1", &[]).unwrap();
    let _a = Rtm::connect(&us, &token).await.unwrap();
    let b = Rtm::connect(&us, &token).await.unwrap();
    let refused = reqwest::Client::new()
        .post(format!("{us}rtm.connect"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body, json!({"ok": false, "error": "ratelimited"}));
    // One leaves: the next is admitted.
    drop(b);
    eventually("a place to free up", || async {
        let reply = web_api(&us, "rtm.connect", Some(&token)).await;
        (reply["ok"] == json!(true)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let mesh = mesh_with(with_limits(Limits {
        idle_timeout: Duration::from_millis(1500),
        ping_interval: Duration::from_millis(300),
        ..Limits::default()
    }))
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let mut silent = Rtm::connect(&us, &mesh.token("U1", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    let mut live = Rtm::connect(&us, &mesh.token("U2", "T1", &["C1"]).unwrap())
        .await
        .unwrap();
    // The live client keeps reading (and so answers pings) and stays open for twice the idle
    // timeout: a deliberate window. Meanwhile the silent one is not polled at all (reading it
    // would answer the pings).
    live.stays_open(Duration::from_secs(3), "the live client")
        .await;
    // The server closed the silent one. (The code may not reach a client this silent:
    // answering the queued pings on a socket the server already closed fails first.)
    let code = silent.closed().await;
    assert!(
        code.is_none() || code == Some(gateway::connection::close::IDLE_TIMEOUT),
        "closed with {code:?}"
    );
    let mut admin = admin(&mesh).await;
    post(&mut admin, "C1", "U3", "still here?").await;
    live.expect("the message", |v| v["type"] == "message").await;
}

#[tokio::test]
async fn connects_past_the_handshake_rate_are_told_to_retry() {
    let mesh = mesh_with(with_limits(Limits {
        handshakes_per_sec: 5,
        ..Limits::default()
    }))
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let token = mesh.token("U1", "T1", &[]).unwrap();
    let client = reqwest::Client::new();
    let (mut admitted, mut refused) = (0, 0);
    for _ in 0..30 {
        let reply = client
            .post(format!("{us}rtm.connect"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let retry_after = reply.headers().get("retry-after").cloned();
        let body: Value = reply.json().await.unwrap();
        if body["ok"] == json!(true) {
            admitted += 1;
        } else {
            assert_eq!(body, json!({"ok": false, "error": "ratelimited"}));
            assert_eq!(retry_after.unwrap(), "1");
            refused += 1;
        }
    }
    assert!(admitted >= 5, "the burst is admitted ({admitted})");
    assert!(refused > 0, "30 connects at once all passed a limit of 5/s");
}

#[tokio::test]
async fn at_the_socket_cap_accept_waits_until_one_closes() {
    let mesh = mesh_with(with_limits(Limits {
        max_sockets: 3,
        ..Limits::default()
    }))
    .await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let addr = us
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // Three idle sockets hold the cap (the kernel still completes later handshakes: they wait
    // in the listen backlog, unserved).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut fourth = tokio::net::TcpStream::connect(&addr).await.unwrap();
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_millis(500), fourth.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "served past the socket cap: {answer:?}");
    // One closes: the fourth is accepted and answered.
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(10), fourth.read_to_end(&mut answer))
        .await
        .expect("served once a socket closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
