//! The sender against a real local HTTP server: batches, signatures, order across retries,
//! counted drops, the last flush.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use mesh_telemetry::metrics::Telemetry;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::SIGNATURE_HEADER;
use delivery::FLUSH_DEADLINE;

const SECRET: &str = "test-secret";

/// What the test server saw, and whether it fails requests now.
#[derive(Default)]
struct Seen {
    /// Each accepted request's events' `seq` fields.
    batches: Vec<Vec<u64>>,
    /// Requests refused with 503.
    refused: usize,
    /// Requests whose signature, content type or body was wrong.
    bad: usize,
    fail: bool,
    /// Requests that arrived (whatever their answer).
    arrived: usize,
    /// Never answer.
    hang: bool,
}

type Shared = Arc<Mutex<Seen>>;

async fn receive(State(seen): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let hang = {
        let mut seen = seen.lock().unwrap();
        seen.arrived += 1;
        seen.hang
    };
    if hang {
        std::future::pending::<()>().await;
    }
    let mut seen = seen.lock().unwrap();
    let signed = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|sig| Secret::new(SECRET).verify(&body, sig));
    let json = headers
        .get("content-type")
        .is_some_and(|v| v == "application/json");
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let events = parsed
        .as_ref()
        .filter(|v| v["time_ms"].as_u64().is_some_and(|t| t > 0))
        .and_then(|v| v["events"].as_array());
    let (true, true, Some(events)) = (signed, json, events) else {
        seen.bad += 1;
        return StatusCode::UNAUTHORIZED;
    };
    if seen.fail {
        seen.refused += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let seqs = events
        .iter()
        .map(|e| {
            assert_eq!(e["name"], "test_event");
            assert_eq!(e["id"], format!("ev-{}", e["seq"]));
            e["seq"].as_u64().unwrap()
        })
        .collect();
    seen.batches.push(seqs);
    StatusCode::OK
}

/// A receiver on 127.0.0.1:0; its URL and what it saw.
async fn server() -> (String, Shared) {
    let seen = Shared::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), seen)
}

fn event(seq: u64) -> Event {
    let mut fields = Map::new();
    fields.insert("seq".into(), json!(seq));
    Event {
        id: format!("ev-{seq}"),
        name: "test_event",
        key: "K".into(),
        fields,
    }
}

fn delivery(url: &str) -> Delivery {
    Delivery {
        urls: vec![url.to_string()],
        secret: Secret::new(SECRET),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..Delivery::default()
    }
}

/// The value of the series `series` (name and labels as printed) in `telemetry`.
fn metric(telemetry: &Telemetry, series: &str) -> f64 {
    telemetry
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits (up to 10 s) until `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn received(seen: &Shared) -> Vec<u64> {
    seen.lock().unwrap().batches.concat()
}

#[tokio::test]
async fn events_go_in_signed_batches_of_at_most_the_batch_size_in_order() {
    let (url, seen) = server().await;
    let telemetry = Telemetry::default();
    let hooks = Webhooks::start("test", delivery(&url), &telemetry, CancellationToken::new())
        .expect("starts");
    assert!(hooks.is_enabled());
    for seq in 0..250 {
        hooks.emit(event(seq));
    }
    until("every event", || received(&seen).len() == 250).await;
    // The receiver records a batch before it answers; the sender counts it once the answer
    // is in.
    until("the sender to count every event sent", || {
        metric(&telemetry, "channelmesh_webhook_events_sent_total") == 250.0
    })
    .await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.bad, 0, "every request signed, typed and well formed");
    assert_eq!(seen.batches.concat(), (0..250).collect::<Vec<_>>());
    assert!(seen.batches.iter().all(|b| b.len() <= 100));
    assert!(
        seen.batches.len() < 250,
        "batched: {} requests",
        seen.batches.len()
    );
    assert_eq!(
        metric(&telemetry, "channelmesh_webhook_events_sent_total"),
        250.0
    );
    assert_eq!(metric(&telemetry, "channelmesh_webhook_queue_depth"), 0.0);
}

#[tokio::test]
async fn a_failing_receiver_gets_everything_in_order_once_it_recovers() {
    let (url, seen) = server().await;
    let telemetry = Telemetry::default();
    let hooks = Webhooks::start("test", delivery(&url), &telemetry, CancellationToken::new())
        .expect("starts");
    seen.lock().unwrap().fail = true;
    for seq in 0..150 {
        hooks.emit(event(seq));
    }
    until("some refusals", || seen.lock().unwrap().refused >= 3).await;
    for seq in 150..300 {
        hooks.emit(event(seq));
    }
    assert!(metric(&telemetry, "channelmesh_webhook_queue_depth") > 0.0);
    seen.lock().unwrap().fail = false;
    until("every event", || received(&seen).len() >= 300).await;
    assert_eq!(received(&seen), (0..300).collect::<Vec<_>>());
    assert!(metric(&telemetry, "channelmesh_webhook_retries_total") >= 3.0);
    assert!(
        metric(
            &telemetry,
            "channelmesh_webhook_requests_total{outcome=\"status\"}"
        ) >= 3.0
    );
    assert_eq!(metric(&telemetry, "channelmesh_webhook_queue_depth"), 0.0);
    assert_eq!(seen.lock().unwrap().bad, 0);
}

#[tokio::test]
async fn a_full_queue_drops_the_newest_and_counts_it() {
    let (url, seen) = server().await;
    seen.lock().unwrap().fail = true;
    let telemetry = Telemetry::default();
    let config = Delivery {
        queue: 10,
        batch_max: 5,
        ..delivery(&url)
    };
    let hooks =
        Webhooks::start("test", config, &telemetry, CancellationToken::new()).expect("starts");
    for seq in 0..100 {
        hooks.emit(event(seq));
    }
    let full = "channelmesh_webhook_events_dropped_total{reason=\"queue_full\"}";
    let dropped = metric(&telemetry, full);
    assert!(dropped >= 80.0, "dropped {dropped}");
    seen.lock().unwrap().fail = false;
    until("the rest", || {
        received(&seen).len() as f64 + dropped == 100.0
    })
    .await;
    // What was kept is the oldest, in order.
    let got = received(&seen);
    assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_event_past_its_retry_time_is_dropped_and_counted() {
    let (url, seen) = server().await;
    seen.lock().unwrap().fail = true;
    let telemetry = Telemetry::default();
    let config = Delivery {
        retry_for: Duration::from_millis(300),
        ..delivery(&url)
    };
    let hooks =
        Webhooks::start("test", config, &telemetry, CancellationToken::new()).expect("starts");
    for seq in 0..5 {
        hooks.emit(event(seq));
    }
    let expired = "channelmesh_webhook_events_dropped_total{reason=\"expired\"}";
    until("the drop", || metric(&telemetry, expired) == 5.0).await;
    assert_eq!(metric(&telemetry, "channelmesh_webhook_queue_depth"), 0.0);
    // Later events are still delivered.
    seen.lock().unwrap().fail = false;
    hooks.emit(event(5));
    until("the next event", || received(&seen) == vec![5]).await;
}

#[tokio::test]
async fn cancellation_flushes_what_is_held() {
    let (url, seen) = server().await;
    let telemetry = Telemetry::default();
    let cancel = CancellationToken::new();
    let config = Delivery {
        batch_wait: Duration::from_secs(30),
        ..delivery(&url)
    };
    let hooks = Webhooks::start("test", config, &telemetry, cancel.clone()).expect("starts");
    for seq in 0..3 {
        hooks.emit(event(seq));
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), hooks.finished())
        .await
        .expect("the tasks end");
    assert_eq!(received(&seen), vec![0, 1, 2]);
}

#[tokio::test]
async fn cancellation_does_not_wait_for_a_request_that_hangs() {
    let (url, seen) = server().await;
    seen.lock().unwrap().hang = true;
    let telemetry = Telemetry::default();
    let cancel = CancellationToken::new();
    let hooks =
        Webhooks::start("test", delivery(&url), &telemetry, cancel.clone()).expect("starts");
    hooks.emit(event(0));
    until("the request", || seen.lock().unwrap().arrived == 1).await;
    cancel.cancel();
    // Within the last flush's deadline, not the request's 10 s timeout.
    tokio::time::timeout(FLUSH_DEADLINE * 2, hooks.finished())
        .await
        .expect("the task ends");
    let shutdown = "channelmesh_webhook_events_dropped_total{reason=\"shutdown\"}";
    assert_eq!(metric(&telemetry, shutdown), 1.0);
    assert_eq!(metric(&telemetry, "channelmesh_webhook_queue_depth"), 0.0);
}

#[test]
fn no_url_is_disabled_and_bad_settings_are_refused() {
    let telemetry = Telemetry::default();
    let cancel = CancellationToken::new();
    let hooks = WebhookArgs::default()
        .start("test", &telemetry, cancel.clone())
        .expect("no URL");
    assert!(!hooks.is_enabled());
    hooks.emit(event(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let https = Delivery {
        urls: vec!["https://example.com/".into()],
        ..Delivery::default()
    };
    assert!(matches!(
        Webhooks::start("test", https, &telemetry, cancel.clone()),
        Err(HooksError::Url(_))
    ));
    let empty = Delivery {
        queue: 0,
        ..delivery("http://127.0.0.1:1/")
    };
    assert!(matches!(
        Webhooks::start("test", empty, &telemetry, cancel),
        Err(HooksError::Queue)
    ));
}

#[test]
fn an_event_is_its_fields_with_its_id_and_name() {
    let mut e = event(7);
    e.fields.insert("id".into(), json!("spoofed"));
    let v: Value = serde_json::from_str(&e.to_json()).unwrap();
    assert_eq!(v, json!({"id": "ev-7", "name": "test_event", "seq": 7}));
    let b = delivery::body(5, ["{\"a\":1}", "{\"b\":2}"].into_iter());
    assert_eq!(b, "{\"time_ms\":5,\"events\":[{\"a\":1},{\"b\":2}]}");
}
