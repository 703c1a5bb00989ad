//! Fuzzing the connect path of a real gateway: arbitrary `Authorization` headers, tokens (in the
//! header, the query and form bodies), mutated valid tokens and arbitrary bodies against
//! `rtm.connect`, and arbitrary connect-URL tickets against the WebSocket upgrade. Each request
//! must get an answer within the client timeout (no stall), never a 5xx, and never admit a
//! caller without a valid token; the gateway must still serve a real client afterwards.
//!
//! Inputs come from proptest strategies (sampled, not shrunk: a failure prints its input).
//! `CHANNELMESH_FUZZ_CASES=N` sends N requests per target (default a few hundred).

use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Rtm, eventually, mesh};

fn cases(default: usize) -> usize {
    std::env::var("CHANNELMESH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` inputs drawn from `strategy`.
fn sample<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::default();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// A request that might trip the connect path.
#[derive(Debug, Clone)]
struct Attempt {
    authorization: Option<Vec<u8>>,
    query: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// Percent-encodes all but URL-unreserved bytes (a valid token stays as it is).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn mutate(token: &str, edits: &[(prop::sample::Index, u8, u8)]) -> String {
    let mut bytes = token.as_bytes().to_vec();
    for (at, byte, op) in edits {
        if bytes.is_empty() {
            break;
        }
        let i = at.index(bytes.len());
        match op {
            0 => bytes[i] = *byte,
            1 => {
                bytes.remove(i);
            }
            _ => bytes.insert(i, *byte),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn attempts(valid: String) -> impl Strategy<Value = Attempt> {
    let token = prop_oneof![
        ".{0,64}",
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,80}",
        prop::collection::vec((any::<prop::sample::Index>(), 32u8..127, 0u8..3), 1..4)
            .prop_map(move |edits| mutate(&valid, &edits)),
    ];
    let authorization = prop_oneof![
        Just(None),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Some),
        token
            .clone()
            .prop_map(|t| Some(format!("Bearer {t}").into_bytes())),
        token
            .clone()
            .prop_map(|t| Some(format!("bearer  {t} ").into_bytes())),
    ];
    let query = prop_oneof![
        Just(String::new()),
        token.clone().prop_map(|t| format!("?token={}", encode(&t))),
        "\\?[ -~]{0,100}",
    ];
    let content_type = prop_oneof![
        Just(None),
        Just(Some("application/x-www-form-urlencoded".to_string())),
        Just(Some("application/json".to_string())),
        "[ -~]{0,40}".prop_map(Some),
    ];
    let body = prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..400),
        token.prop_map(|t| {
            format!(
                "token={}&batch_presence_aware=1&cursors=C1:1.2,zz",
                encode(&t)
            )
            .into_bytes()
        }),
    ];
    (authorization, query, content_type, body).prop_map(
        |(authorization, query, content_type, body)| Attempt {
            authorization,
            query,
            content_type,
            body,
        },
    )
}

#[tokio::test]
async fn fuzz_rtm_connect_and_the_upgrade() {
    let mesh = mesh().await;
    let base = mesh.rtm_base_url("us-east").unwrap();
    let valid = mesh.token("U1", "T1", &["C1"]).unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let n = cases(300);
    let mut sent = 0;
    for attempt in sample(attempts(valid.clone()), n) {
        let mut request = client.post(format!("{base}rtm.connect{}", attempt.query));
        if let Some(auth) = &attempt.authorization {
            // Bytes no header may carry are refused by the client itself: skip those.
            match reqwest::header::HeaderValue::from_bytes(auth) {
                Ok(v) => request = request.header("authorization", v),
                Err(_) => continue,
            }
        }
        if let Some(ct) = &attempt.content_type {
            match reqwest::header::HeaderValue::from_str(ct) {
                Ok(v) => request = request.header("content-type", v),
                Err(_) => continue,
            }
        }
        let reply = request
            .body(attempt.body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("no answer (stall or reset) to {attempt:?}: {e}"));
        let status = reply.status();
        assert!(!status.is_server_error(), "{status} for {attempt:?}");
        let body: Value = reply
            .json()
            .await
            .unwrap_or_else(|e| panic!("not JSON for {attempt:?}: {e}"));
        if body["ok"] == json!(true) {
            // Admitted: only the unmodified token may do that.
            let presented = [
                attempt
                    .authorization
                    .as_deref()
                    .map(|a| String::from_utf8_lossy(a).into_owned()),
                Some(attempt.query.clone()),
                Some(String::from_utf8_lossy(&attempt.body).into_owned()),
            ];
            assert!(
                presented.iter().flatten().any(|p| p.contains(&valid)),
                "admitted without the valid token: {attempt:?}"
            );
        } else {
            assert!(body["error"].is_string(), "{body} for {attempt:?}");
        }
        sent += 1;
    }
    eprintln!("fuzz rtm.connect: {sent} requests");

    // Connect-URL tickets: anything but an issued one is refused before the upgrade.
    let http = base.trim_end_matches("/api/").to_string();
    let tickets = sample(
        prop_oneof![
            "[0-9a-f]{32}",
            "[0-9a-f]{0,40}",
            ".{0,100}",
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ],
        cases(300),
    );
    let mut upgrades = 0;
    for ticket in tickets {
        let path = encode(&ticket);
        let reply = client
            .get(format!("{http}/rtm/{path}"))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap_or_else(|e| panic!("no answer to ticket {ticket:?}: {e}"));
        let status = reply.status();
        assert!(
            status.is_client_error(),
            "{status} for ticket {ticket:?} (must be refused, not upgraded or failed)"
        );
        if status == StatusCode::UNAUTHORIZED {
            let body: Value = reply.json().await.unwrap();
            assert_eq!(body["error"], "invalid_connect_url");
        }
        upgrades += 1;
    }
    eprintln!("fuzz upgrade tickets: {upgrades} requests");

    // Still serving (a busy machine may time a first attempt out: each failure is shown).
    let mut rtm = eventually("a real client connects after the fuzzing", || async {
        Rtm::connect(&base, &valid)
            .await
            .inspect_err(|e| eprintln!("connect after fuzzing: {e}"))
            .ok()
    })
    .await;
    rtm.send(json!({"id": 1, "type": "ping"})).await;
    rtm.expect("pong", |v| v["type"] == "pong").await;
}
