//! Unit tests of the Consul client's pure parts: durations in Go's syntax, KV entries as Consul
//! documents them, check ids, agent addresses and the blocking-query loop's bookkeeping. The
//! requests themselves are tested against `fake-consul` (ring-manager/tests/consul.rs).

use std::time::{Duration, Instant};

use super::*;

#[test]
fn durations_are_whole_seconds_or_milliseconds_as_go_parses_them() {
    assert_eq!(go_duration(Duration::from_secs(10)), "10s");
    assert_eq!(go_duration(Duration::from_secs(0)), "0s");
    assert_eq!(go_duration(Duration::from_secs(90)), "90s", "never minutes");
    assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
}

/// One entry of `GET /v1/kv/<key>` as `api-docs/kv.mdx` shows it.
fn kv_json(value: serde_json::Value, session: Option<&str>) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "CreateIndex": 100,
        "ModifyIndex": 200,
        "LockIndex": 3,
        "Key": "channelmesh/ring",
        "Flags": 0,
        "Value": value,
    });
    if let Some(session) = session {
        entry["Session"] = session.into();
    }
    entry
}

fn decode(entry: serde_json::Value) -> Result<KvEntry, String> {
    serde_json::from_value::<KvWire>(entry)
        .map_err(|e| e.to_string())?
        .decode()
}

#[test]
fn a_kv_entry_decodes_its_base64_value_session_and_indexes() {
    let entry = decode(kv_json(
        BASE64.encode(b"{\"epoch\":7}").into(),
        Some("adf4238a-882b-9ddc-4a9d-5b6758e4159e"),
    ))
    .unwrap();
    assert_eq!(
        entry,
        KvEntry {
            key: "channelmesh/ring".into(),
            value: b"{\"epoch\":7}".to_vec(),
            session: Some("adf4238a-882b-9ddc-4a9d-5b6758e4159e".into()),
            lock_index: 3,
            modify_index: 200,
        }
    );
}

#[test]
fn a_kv_entry_without_a_value_or_with_an_empty_session_has_neither() {
    let entry = decode(kv_json(serde_json::Value::Null, Some(""))).unwrap();
    assert!(entry.value.is_empty());
    assert_eq!(entry.session, None, "an empty session is no session");
    let entry = decode(kv_json(serde_json::Value::Null, None)).unwrap();
    assert_eq!(entry.session, None);
}

#[test]
fn a_kv_entry_whose_value_is_not_base64_is_refused() {
    assert!(decode(kv_json("not base64!".into(), None)).is_err());
}

#[test]
fn a_services_ttl_check_is_named_after_the_service() {
    let service = ServiceDef {
        id: "channelmesh-gateway-us-east-1".into(),
        name: "channelmesh-gateway".into(),
        address: String::new(),
        port: 8080,
        tags: Vec::new(),
        meta: Vec::new(),
        ttl: Duration::from_secs(10),
        deregister_after: Duration::from_secs(60),
    };
    assert_eq!(service.check_id(), "service:channelmesh-gateway-us-east-1");
}

#[test]
fn the_agent_address_is_an_http_url_with_host_and_port_only() {
    let consul = Consul::new("http://127.0.0.1:8500/", None).unwrap();
    assert_eq!(
        consul.url(),
        "http://127.0.0.1:8500",
        "the trailing slash goes"
    );
    assert!(Consul::new("https://consul.internal:8501", None).is_ok());
    for bad in [
        "127.0.0.1:8500",
        "consul:8500",
        "http://",
        "http://127.0.0.1:8500/v1",
        "",
    ] {
        assert!(
            matches!(Consul::new(bad, None), Err(ConsulError::Address(a)) if a == bad),
            "{bad:?} was accepted"
        );
    }
}

#[test]
fn the_blocking_loop_starts_non_blocking_and_then_blocks_on_the_last_index() {
    let mut blocking = BlockingLoop::new(Duration::from_millis(1));
    assert_eq!(blocking.index(), 0, "the first query answers at once");
    assert!(blocking.observe(17), "the first answer is news");
    assert_eq!(blocking.index(), 17);
    assert!(!blocking.observe(17), "the same index: nothing changed");
    assert!(blocking.observe(18));
    assert_eq!(blocking.index(), 18);
}

#[test]
fn the_blocking_loop_never_sends_index_zero_after_the_first_answer() {
    let mut blocking = BlockingLoop::new(Duration::from_millis(1));
    assert!(
        blocking.observe(0),
        "the first answer counts even at index 0"
    );
    assert_eq!(blocking.index(), 1, "index 0 would not block");
    assert!(!blocking.observe(1));
}

#[test]
fn the_blocking_loop_starts_over_when_the_index_goes_backwards() {
    let mut blocking = BlockingLoop::new(Duration::from_millis(1));
    blocking.observe(40);
    assert!(blocking.observe(12), "backwards counts as a change");
    assert_eq!(blocking.index(), 0, "and the next query starts from 0");
    assert!(blocking.observe(12), "whose answer is news again");
    assert_eq!(blocking.index(), 12);
}

#[tokio::test]
async fn the_blocking_loop_spaces_its_queries() {
    let spacing = Duration::from_millis(50);
    let mut blocking = BlockingLoop::new(spacing);
    let before_first = Instant::now();
    blocking.pace().await;
    blocking.pace().await;
    // A lower bound only: a sleep never ends early.
    assert!(
        before_first.elapsed() >= spacing,
        "two queries closer than the spacing"
    );
}
