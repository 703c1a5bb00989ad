//! Pins the fake's documented Consul behaviour through real HTTP requests.

// A failed unwrap in a test is a test failure with a backtrace: what a test should do.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use fake_consul::FakeConsul;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

/// Generous bound for anything that happens "eventually".
const EVENTUALLY: Duration = Duration::from_secs(10);

async fn start() -> (FakeConsul, Client) {
    (FakeConsul::start().await.unwrap(), Client::new())
}

/// Polls `check` until it returns true or the bound passes.
async fn eventually<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {EVENTUALLY:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a GET in the background (for blocking queries).
fn spawn_get(client: &Client, url: String) -> tokio::task::JoinHandle<Response> {
    let client = client.clone();
    tokio::spawn(async move { client.get(url).send().await.unwrap() })
}

/// Waits, within the generous bound, for a background GET's answer.
async fn answer(blocked: tokio::task::JoinHandle<Response>) -> Response {
    tokio::time::timeout(EVENTUALLY, blocked)
        .await
        .unwrap()
        .unwrap()
}

fn index_of(resp: &Response) -> u64 {
    resp.headers()["X-Consul-Index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn put(client: &Client, url: String, body: impl Into<reqwest::Body>) -> Response {
    client.put(url).body(body).send().await.unwrap()
}

async fn put_bool(client: &Client, url: String, body: impl Into<reqwest::Body>) -> bool {
    let resp = put(client, url, body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

async fn get_entry(client: &Client, consul: &FakeConsul, key: &str) -> Value {
    let resp = client
        .get(format!("{}/v1/kv/{key}", consul.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let entries: Value = resp.json().await.unwrap();
    entries[0].clone()
}

async fn create_session(client: &Client, consul: &FakeConsul, body: Value) -> String {
    let resp = put(
        client,
        format!("{}/v1/session/create", consul.url()),
        body.to_string(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let created: Value = resp.json().await.unwrap();
    created["ID"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn kv_put_get_missing_cas_and_delete() {
    let (consul, client) = start().await;
    let url = |rest: &str| format!("{}/v1/kv/{rest}", consul.url());

    let missing = client.get(url("app/config")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(index_of(&missing), 1, "an empty KV table reports index 1");
    assert_eq!(missing.headers()["X-Consul-KnownLeader"], "true");
    assert!(missing.text().await.unwrap().is_empty());

    assert!(put_bool(&client, url("app/config?flags=42"), "hello").await);
    let entry = get_entry(&client, &consul, "app/config").await;
    assert_eq!(entry["Key"], "app/config");
    assert_eq!(entry["Value"], "aGVsbG8=");
    assert_eq!(entry["Flags"], 42);
    assert_eq!(entry["LockIndex"], 0);
    assert!(
        entry.get("Session").is_none(),
        "Session is omitted when unlocked"
    );
    let modify = entry["ModifyIndex"].as_u64().unwrap();
    assert_eq!(entry["CreateIndex"], modify);

    let raw = client.get(url("app/config?raw")).send().await.unwrap();
    assert_eq!(index_of(&raw), modify);
    assert_eq!(raw.bytes().await.unwrap().as_ref(), b"hello");

    // cas=0 only creates; a stale index fails; the current index succeeds.
    assert!(!put_bool(&client, url("app/config?cas=0"), "x").await);
    assert!(!put_bool(&client, url(&format!("app/config?cas={}", modify - 1)), "x").await);
    assert!(put_bool(&client, url(&format!("app/config?cas={modify}")), "world").await);
    assert!(put_bool(&client, url("app/other?cas=0"), "").await);
    assert_eq!(
        get_entry(&client, &consul, "app/other").await["Value"],
        Value::Null
    );
    assert_eq!(
        consul.kv_value("app/config").as_deref(),
        Some(&b"world"[..])
    );

    let current = get_entry(&client, &consul, "app/config").await["ModifyIndex"]
        .as_u64()
        .unwrap();
    let delete = |q: String| client.delete(url(&format!("app/config{q}"))).send();
    assert!(
        !delete("?cas=0".into())
            .await
            .unwrap()
            .json::<bool>()
            .await
            .unwrap()
    );
    assert!(
        delete(format!("?cas={current}"))
            .await
            .unwrap()
            .json::<bool>()
            .await
            .unwrap()
    );
    assert_eq!(consul.kv_value("app/config"), None);
    let gone = client.get(url("app/config")).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert!(
        index_of(&gone) > current,
        "a missing key reports the KV table index"
    );
    assert!(
        delete(String::new())
            .await
            .unwrap()
            .json::<bool>()
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn blocking_read_returns_on_change_and_on_wait_timeout() {
    let (consul, client) = start().await;
    let url = format!("{}/v1/kv/watched", consul.url());
    assert!(put_bool(&client, url.clone(), "v1").await);
    let first = client.get(&url).send().await.unwrap();
    let index = index_of(&first);

    // Times out with the same index when nothing changes.
    let idle = client
        .get(format!("{url}?index={index}&wait=100ms"))
        .send()
        .await
        .unwrap();
    assert_eq!(idle.status(), StatusCode::OK);
    assert_eq!(index_of(&idle), index);

    // Returns the new state when the key changes.
    let blocked = spawn_get(&client, format!("{url}?index={index}&wait=1m"));
    eventually(|| async { consul.request_count("/v1/kv/watched") >= 4 }).await;
    assert!(put_bool(&client, url.clone(), "v2").await);
    let woken = answer(blocked).await;
    let woken_index = index_of(&woken);
    assert!(woken_index > index);
    let entries: Value = woken.json().await.unwrap();
    assert_eq!(entries[0]["Value"], "djI=");

    // An identical write changes nothing, so the index stays.
    assert!(put_bool(&client, url.clone(), "v2").await);
    let same = client.get(&url).send().await.unwrap();
    assert_eq!(index_of(&same), woken_index);

    let bad = client
        .get(format!("{url}?index=1&wait=soon"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(bad.text().await.unwrap(), "Invalid wait time");
}

#[tokio::test]
async fn acquire_and_release_follow_the_lock_rules() {
    let (consul, client) = start().await;
    let a = create_session(&client, &consul, json!({ "Name": "a", "LockDelay": "0s" })).await;
    let b = create_session(&client, &consul, json!({ "Name": "b" })).await;
    let url = |q: &str| format!("{}/v1/kv/leader?{q}", consul.url());

    assert!(put_bool(&client, url(&format!("acquire={a}")), "node-a").await);
    let held = get_entry(&client, &consul, "leader").await;
    assert_eq!(held["LockIndex"], 1);
    assert_eq!(held["Session"], a.as_str());

    // Another session cannot take it; the holder re-acquires without bumping LockIndex.
    assert!(!put_bool(&client, url(&format!("acquire={b}")), "node-b").await);
    assert!(put_bool(&client, url(&format!("acquire={a}")), "node-a2").await);
    assert_eq!(get_entry(&client, &consul, "leader").await["LockIndex"], 1);

    // Only the holder releases; release keeps LockIndex and clears Session.
    assert!(!put_bool(&client, url(&format!("release={b}")), "").await);
    assert!(put_bool(&client, url(&format!("release={a}")), "node-a2").await);
    let released = get_entry(&client, &consul, "leader").await;
    assert_eq!(released["LockIndex"], 1);
    assert!(released.get("Session").is_none());

    // A new acquisition (release applies no lock-delay) bumps LockIndex.
    assert!(put_bool(&client, url(&format!("acquire={b}")), "node-b").await);
    assert_eq!(get_entry(&client, &consul, "leader").await["LockIndex"], 2);

    // Acquiring with an unknown session is an RPC error, like Consul's.
    let unknown = put(&client, url("acquire=no-such-session"), "").await;
    assert_eq!(unknown.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        unknown.text().await.unwrap(),
        r#"invalid session "no-such-session""#
    );
    let conflicting = put(&client, url(&format!("acquire={a}&cas=0")), "").await;
    assert_eq!(conflicting.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn invalidated_sessions_release_locks_behind_a_lock_delay() {
    let (consul, client) = start().await;
    let url = |key: &str, q: &str| format!("{}/v1/kv/{key}?{q}", consul.url());

    // Destroy: the lock is released and cannot be re-acquired during the lock-delay.
    let holder = create_session(&client, &consul, json!({ "LockDelay": "1h" })).await;
    let other = create_session(&client, &consul, json!({})).await;
    assert!(put_bool(&client, url("a", &format!("acquire={holder}")), "x").await);
    assert!(
        put_bool(
            &client,
            format!("{}/v1/session/destroy/{holder}", consul.url()),
            ""
        )
        .await
    );
    assert!(
        get_entry(&client, &consul, "a")
            .await
            .get("Session")
            .is_none()
    );
    assert!(!put_bool(&client, url("a", &format!("acquire={other}")), "y").await);

    // TTL expiry with Behavior=delete: the key is deleted, and the lock-delay still applies.
    let ttl = json!({ "TTL": "10s", "Behavior": "delete", "LockDelay": "1h" });
    let ephemeral = create_session(&client, &consul, ttl).await;
    assert!(put_bool(&client, url("b", &format!("acquire={ephemeral}")), "x").await);
    consul.expire_session(&ephemeral);
    assert_eq!(consul.kv_value("b"), None);
    assert!(!put_bool(&client, url("b", &format!("acquire={other}")), "y").await);
    let renew = put(
        &client,
        format!("{}/v1/session/renew/{ephemeral}", consul.url()),
        "",
    )
    .await;
    assert_eq!(renew.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        renew.text().await.unwrap(),
        format!("Session id '{ephemeral}' not found")
    );
    let info = client
        .get(format!("{}/v1/session/info/{ephemeral}", consul.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(info.json::<Value>().await.unwrap(), json!([]));

    // A zero lock-delay lets another session take the key at once.
    let quick = create_session(&client, &consul, json!({ "TTL": "10s", "LockDelay": "0s" })).await;
    assert!(put_bool(&client, url("c", &format!("acquire={quick}")), "x").await);
    consul.expire_session(&quick);
    assert!(put_bool(&client, url("c", &format!("acquire={other}")), "y").await);
    assert_eq!(get_entry(&client, &consul, "c").await["LockIndex"], 2);
}

#[tokio::test]
async fn sessions_renew_report_and_validate_like_consul() {
    let (consul, client) = start().await;
    let id = create_session(&client, &consul, json!({ "Name": "lease", "TTL": "15s" })).await;
    let renew = put(
        &client,
        format!("{}/v1/session/renew/{id}", consul.url()),
        "",
    )
    .await;
    assert_eq!(renew.status(), StatusCode::OK);
    let sessions: Value = renew.json().await.unwrap();
    let session = &sessions[0];
    assert_eq!(session["ID"], id.as_str());
    assert_eq!(session["Name"], "lease");
    assert_eq!(session["Node"], "fake-node");
    assert_eq!(session["TTL"], "15s");
    assert_eq!(session["LockDelay"], 15_000_000_000u64);
    assert_eq!(session["Behavior"], "release");
    assert_eq!(session["NodeChecks"], json!(["serfHealth"]));

    let short = put(
        &client,
        format!("{}/v1/session/create", consul.url()),
        r#"{"TTL":"5s"}"#,
    )
    .await;
    assert_eq!(short.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let text = short.text().await.unwrap();
    assert_eq!(
        text,
        "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]"
    );
    let garbage = put(&client, format!("{}/v1/session/create", consul.url()), "{").await;
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn txn_applies_all_or_nothing() {
    let (consul, client) = start().await;
    let session = create_session(&client, &consul, json!({ "LockDelay": "0s" })).await;
    let txn = |ops: Value| {
        client
            .put(format!("{}/v1/txn", consul.url()))
            .body(ops.to_string())
            .send()
    };

    let ok = txn(json!([
        { "KV": { "Verb": "lock", "Key": "ring/leader", "Value": "bm9kZS0x", "Session": session } },
        { "KV": { "Verb": "set", "Key": "ring/state", "Value": "c3RhdGU=" } },
        { "KV": { "Verb": "get", "Key": "ring/state" } },
    ]))
    .await
    .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(body["Errors"], Value::Null);
    let results = body["Results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["KV"]["Session"], session.as_str());
    assert_eq!(
        results[0]["KV"]["Value"],
        Value::Null,
        "writes return no value"
    );
    assert_eq!(results[2]["KV"]["Value"], "c3RhdGU=");
    let modify = results[1]["KV"]["ModifyIndex"].as_u64().unwrap();

    // A failed check-session rolls back the set before it.
    let conflict = txn(json!([
        { "KV": { "Verb": "set", "Key": "ring/state", "Value": "bmV3" } },
        { "KV": { "Verb": "check-session", "Key": "ring/leader", "Session": "someone-else" } },
    ]))
    .await
    .unwrap();
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    let body: Value = conflict.json().await.unwrap();
    assert_eq!(body["Results"], Value::Null);
    assert_eq!(body["Errors"][0]["OpIndex"], 1);
    let what = format!(
        r#"failed session check for key "ring/leader", current session "{session}" != "someone-else""#
    );
    assert_eq!(body["Errors"][0]["What"], what);
    assert_eq!(
        consul.kv_value("ring/state").as_deref(),
        Some(&b"state"[..])
    );

    // check-index against the current index passes; a stale cas fails.
    let checked = txn(json!([
        { "KV": { "Verb": "check-index", "Key": "ring/state", "Index": modify } },
        { "KV": { "Verb": "cas", "Key": "ring/state", "Value": "bmV3", "Index": modify - 1 } },
    ]))
    .await
    .unwrap();
    assert_eq!(checked.status(), StatusCode::CONFLICT);
    let body: Value = checked.json().await.unwrap();
    assert_eq!(
        body["Errors"][0]["What"],
        r#"failed to set key "ring/state", index is stale"#
    );
}

async fn register(client: &Client, consul: &FakeConsul, body: Value) {
    let resp = put(
        client,
        format!("{}/v1/agent/service/register", consul.url()),
        body.to_string(),
    )
    .await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        resp.text().await.unwrap()
    );
}

async fn health(client: &Client, consul: &FakeConsul, query: &str) -> (u64, Value) {
    let url = format!("{}/v1/health/service/channel-server{query}", consul.url());
    let resp = client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    (index_of(&resp), resp.json().await.unwrap())
}

#[tokio::test]
async fn ttl_checks_drive_health_and_passing_filters() {
    let (consul, client) = start().await;
    for id in ["cs-1", "cs-2"] {
        let check = json!({ "TTL": "1h" });
        register(
            &client,
            &consul,
            json!({ "ID": id, "Name": "channel-server", "Port": 7000, "Check": check }),
        )
        .await;
    }
    let (_, all) = health(&client, &consul, "").await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let checks = &all[0]["Checks"];
    assert_eq!(checks[0]["CheckID"], "serfHealth");
    assert_eq!(checks[1]["CheckID"], "service:cs-1");
    assert_eq!(checks[1]["Status"], "critical", "TTL checks start critical");
    assert_eq!(all[0]["Node"]["Node"], "fake-node");
    assert_eq!(all[0]["Service"]["Port"], 7000);

    let pass = put(
        &client,
        format!("{}/v1/agent/check/pass/service:cs-1?note=ok", consul.url()),
        "",
    )
    .await;
    assert_eq!(pass.status(), StatusCode::OK);
    let (_, passing) = health(&client, &consul, "?passing").await;
    assert_eq!(passing.as_array().unwrap().len(), 1);
    assert_eq!(passing[0]["Service"]["ID"], "cs-1");
    assert_eq!(passing[0]["Checks"][1]["Output"], "ok");

    let mut services = consul.services();
    services.sort();
    let row = |id: &str, status: &str| {
        (
            id.to_owned(),
            "channel-server".to_owned(),
            status.to_owned(),
        )
    };
    assert_eq!(
        services,
        vec![row("cs-1", "passing"), row("cs-2", "critical")]
    );

    let unknown = put(
        &client,
        format!("{}/v1/agent/check/pass/nope", consul.url()),
        "",
    )
    .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let text = unknown.text().await.unwrap();
    assert_eq!(
        text,
        r#"Unknown check ID "nope". Ensure that the check ID is passed, not the check name."#
    );

    let deregister = put(
        &client,
        format!("{}/v1/agent/service/deregister/cs-2", consul.url()),
        "",
    )
    .await;
    assert_eq!(deregister.status(), StatusCode::OK);
    assert_eq!(
        health(&client, &consul, "")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn blocking_health_queries_wake_on_status_changes() {
    let (consul, client) = start().await;
    let check = json!({ "TTL": "1h", "Status": "passing" });
    register(
        &client,
        &consul,
        json!({ "ID": "cs-1", "Name": "channel-server", "Check": check }),
    )
    .await;
    let (index, _) = health(&client, &consul, "").await;

    let url = format!("{}/v1/health/service/channel-server", consul.url());
    let blocked = spawn_get(&client, format!("{url}?index={index}&wait=1m"));
    eventually(|| async { consul.request_count("/v1/health/service/channel-server") >= 2 }).await;
    // An output-only update moves no index; a status change does.
    let note = put(
        &client,
        format!(
            "{}/v1/agent/check/pass/service:cs-1?note=still-fine",
            consul.url()
        ),
        "",
    )
    .await;
    assert_eq!(note.status(), StatusCode::OK);
    assert_eq!(health(&client, &consul, "").await.0, index);
    let fail = put(
        &client,
        format!(
            "{}/v1/agent/check/fail/service:cs-1?note=down",
            consul.url()
        ),
        "",
    )
    .await;
    assert_eq!(fail.status(), StatusCode::OK);

    let woken = answer(blocked).await;
    assert!(index_of(&woken) > index);
    let entries: Value = woken.json().await.unwrap();
    assert_eq!(entries[0]["Checks"][1]["Status"], "critical");
    assert_eq!(entries[0]["Checks"][1]["Output"], "down");
}

#[tokio::test]
async fn a_lapsed_ttl_turns_critical_and_can_deregister_the_service() {
    let (consul, client) = start().await;
    let check = json!({ "CheckID": "cs-1:ttl", "TTL": "1s", "Status": "passing" });
    register(
        &client,
        &consul,
        json!({ "ID": "cs-1", "Name": "channel-server", "Check": check }),
    )
    .await;
    let update = json!({ "Status": "passing", "Output": "serving" }).to_string();
    let updated = put(
        &client,
        format!("{}/v1/agent/check/update/cs-1:ttl", consul.url()),
        update,
    )
    .await;
    assert_eq!(updated.status(), StatusCode::OK);

    eventually(|| async {
        let (_, entries) = health(&client, &consul, "").await;
        entries[0]["Checks"][1]["Status"] == "critical"
    })
    .await;
    let (_, entries) = health(&client, &consul, "").await;
    assert_eq!(
        entries[0]["Checks"][1]["Output"],
        "TTL expired (last output before timeout follows): serving"
    );

    let doomed = json!({ "TTL": "1s", "DeregisterCriticalServiceAfter": "1s" });
    register(
        &client,
        &consul,
        json!({ "ID": "cs-2", "Name": "channel-server", "Check": doomed }),
    )
    .await;
    eventually(|| async { consul.services().iter().all(|(id, _, _)| id != "cs-2") }).await;
    assert_eq!(
        consul.services().len(),
        1,
        "only the service with the deregistering check goes"
    );
}

#[tokio::test]
async fn reset_index_wakes_blocked_queries_with_a_lower_index() {
    let (consul, client) = start().await;
    let url = format!("{}/v1/kv/channelmesh/ring", consul.url());
    let count = || consul.request_count("/v1/kv/channelmesh/ring");
    for value in ["a", "b", "c"] {
        assert!(put_bool(&client, url.clone(), value).await);
    }
    let index = index_of(&client.get(&url).send().await.unwrap());
    let blocked = spawn_get(&client, format!("{url}?index={index}&wait=1m"));
    // A request is counted on arrival, before it blocks.
    eventually(|| async { count() >= 5 }).await;
    consul.reset_index(2);
    let woken = answer(blocked).await;
    assert_eq!(index_of(&woken), 2);
    assert_eq!(count(), 5);

    // As after a real restore, Raft keeps counting up: the next write wakes both a client
    // that started over and one still blocking on its pre-reset index.
    let restarted = spawn_get(&client, format!("{url}?index=2&wait=1m"));
    let stale = spawn_get(&client, format!("{url}?index={index}&wait=1m"));
    eventually(|| async { count() >= 7 }).await;
    assert!(put_bool(&client, url.clone(), "d").await);
    assert!(index_of(&answer(restarted).await) > index);
    assert!(index_of(&answer(stale).await) > index);
}

#[tokio::test]
async fn unavailable_unknown_paths_and_wrong_methods() {
    let (consul, client) = start().await;
    consul.set_unavailable(true);
    let down = client
        .get(format!("{}/v1/kv/x", consul.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(down.text().await.unwrap(), "rpc error: No cluster leader");
    consul.set_unavailable(false);

    let unknown = client
        .get(format!("{}/v1/catalog/services", consul.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let wrong = client
        .post(format!("{}/v1/session/create", consul.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);

    consul.shutdown();
    eventually(|| async {
        client
            .get(format!("{}/v1/kv/x", consul.url()))
            .send()
            .await
            .is_err()
    })
    .await;
}

#[tokio::test]
async fn a_recurse_read_lists_a_prefix_in_one_snapshot_and_blocks_on_it() {
    let (consul, client) = start().await;
    let kv = |key: &str| format!("{}/v1/kv/{key}", consul.url());
    let list = kv("cm/ring?recurse");
    // Nothing under the prefix: 404, with the table's index.
    let empty = client.get(&list).send().await.unwrap();
    assert_eq!(empty.status(), StatusCode::NOT_FOUND);
    assert!(index_of(&empty) >= 1);

    // A plain string prefix: `cm/ring` and `cm/ring-manager/leader`, not `cm/other`.
    assert!(put_bool(&client, kv("cm/ring"), "r1").await);
    assert!(put_bool(&client, kv("cm/ring-manager/leader"), "l1").await);
    assert!(put_bool(&client, kv("cm/other"), "o").await);
    let resp = client.get(&list).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let index = index_of(&resp);
    let entries: Value = resp.json().await.unwrap();
    let keys: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["cm/ring", "cm/ring-manager/leader"]);
    // The index is the highest ModifyIndex under the prefix, not the table's.
    let leader = get_entry(&client, &consul, "cm/ring-manager/leader").await;
    assert_eq!(index, leader["ModifyIndex"].as_u64().unwrap());
    assert_eq!(
        entries[0]["Value"], "cjE=",
        "values base64 as in a single read"
    );

    // A write elsewhere does not wake it; a write to either key under it does.
    let blocked = spawn_get(&client, format!("{list}&index={index}&wait=1m"));
    assert!(put_bool(&client, kv("cm/other"), "o2").await);
    assert!(put_bool(&client, kv("cm/ring"), "r2").await);
    let woken = answer(blocked).await;
    assert!(index_of(&woken) > index);
    let entries: Value = woken.json().await.unwrap();
    assert_eq!(entries[0]["Value"], "cjI=");

    // Deleting a key under the prefix moves its index too (Consul's tombstones).
    let index = index_of(&client.get(&list).send().await.unwrap());
    let blocked = spawn_get(&client, format!("{list}&index={index}&wait=1m"));
    let deleted = client
        .delete(kv("cm/ring-manager/leader"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    let woken = answer(blocked).await;
    assert!(index_of(&woken) > index);
    let entries: Value = woken.json().await.unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 1);
}

/// Every endpoint with ACLs on: the management token may do everything; no token (the
/// anonymous token, `default_policy = "deny"`) is refused with Consul's answers; another token
/// is not found.
#[tokio::test]
async fn with_acls_on_only_the_management_token_is_obeyed() {
    const TOKEN: &str = "5e1f1c3a-2b9d-4c57-8f00-acl0manage0001";
    let (consul, client) = start().await;
    let url = |path: &str| format!("{}{path}", consul.url());
    // Off by default: a request without a token works.
    assert!(put_bool(&client, url("/v1/kv/cm/ring"), "before").await);
    consul.require_token(Some(TOKEN));

    let anonymous = |method: reqwest::Method, path: &str| client.request(method, url(path));
    let denied = |resource: &str, on: &str| {
        format!(
            "Permission denied: anonymous token lacks permission '{resource}'{on}. The anonymous \
             token is used implicitly when a request does not specify a token."
        )
    };
    use reqwest::Method;
    let refusals = [
        (
            Method::GET,
            "/v1/kv/cm/ring",
            denied("key:read", " on \"cm/ring\""),
        ),
        (
            Method::PUT,
            "/v1/kv/cm/ring",
            denied("key:write", " on \"cm/ring\""),
        ),
        (
            Method::DELETE,
            "/v1/kv/cm/ring",
            denied("key:write", " on \"cm/ring\""),
        ),
        (
            Method::PUT,
            "/v1/session/create",
            denied("session:write", " on \"fake-node\""),
        ),
        (
            Method::PUT,
            "/v1/session/renew/x",
            denied("session:write", " on \"fake-node\""),
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            denied("service:write", ""),
        ),
        (
            Method::PUT,
            "/v1/agent/service/deregister/gw",
            denied("service:write", " on \"gw\""),
        ),
        (
            Method::PUT,
            "/v1/agent/check/pass/service:gw",
            denied("service:write", " on \"service:gw\""),
        ),
    ];
    for (method, path, text) in refusals {
        let resp = anonymous(method.clone(), path).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(resp.text().await.unwrap(), text, "{method} {path}");
    }
    // A transaction: every operation refused, nothing applied.
    let ops = json!([{"KV": {"Verb": "set", "Key": "cm/ring", "Value": "eA=="}}]);
    let txn = anonymous(Method::PUT, "/v1/txn")
        .body(ops.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(txn.status(), StatusCode::CONFLICT);
    let body: Value = txn.json().await.unwrap();
    assert_eq!(
        body["Errors"],
        json!([{"OpIndex": 0, "What": "Permission denied"}])
    );
    assert_eq!(consul.kv_value("cm/ring").unwrap(), b"before");
    // Lists are filtered to nothing, silently for the anonymous token.
    let list = anonymous(Method::GET, "/v1/kv/cm/ring?recurse")
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::NOT_FOUND);
    assert!(
        list.headers()
            .get("X-Consul-Results-Filtered-By-ACLs")
            .is_none()
    );
    let health = anonymous(Method::GET, "/v1/health/service/channelmesh-gateway")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap(), json!([]));

    // Another token is not found, whatever it asks.
    let unknown = client
        .get(url("/v1/kv/cm/ring"))
        .header("X-Consul-Token", "not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::FORBIDDEN);
    assert_eq!(unknown.text().await.unwrap(), "ACL not found");

    // The management token, in any of the places Consul reads it.
    let header = client
        .get(url("/v1/kv/cm/ring?recurse"))
        .header("X-Consul-Token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(header.status(), StatusCode::OK);
    let bearer = client
        .put(url("/v1/kv/cm/ring"))
        .bearer_auth(TOKEN)
        .body("after")
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);
    let param = client
        .get(url(&format!("/v1/kv/cm/ring?token={TOKEN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(param.status(), StatusCode::OK);
    assert_eq!(consul.kv_value("cm/ring").unwrap(), b"after");

    // And off again.
    consul.require_token(None);
    assert!(put_bool(&client, url("/v1/kv/cm/ring"), "open").await);
}
