//! The SRE console's actions (`POST /api/actions`) over real HTTP against a real mesh: refused
//! without the operator token (configured or presented), refused unconfirmed, and with them a
//! node or a region drains and undrains, and the console's log records who did what.

use std::net::SocketAddr;

use channelmesh::MeshConfig;
use serde_json::{Value, json};

use crate::console::Page;
use crate::support::{Rtm, eventually, mesh, mesh_with, metric_sum};

const ALICE: &str = "alice-operator-token-0123";

/// A mesh whose console takes alice's operator token.
async fn operated() -> channelmesh::Mesh {
    mesh_with(MeshConfig {
        operator_tokens: vec![format!("alice:{ALICE}")],
        ..MeshConfig::ephemeral()
    })
    .await
}

/// Posts an action with `token` (`None`: no header); the status and the JSON answer.
async fn act(console: SocketAddr, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("http://{console}/api/actions"))
        .json(&body);
    if let Some(token) = token {
        request = request.header("X-Channelmesh-Operator-Token", token);
    }
    let reply = request.send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

fn drain(target: &str) -> Value {
    json!({"action": "drain_node", "target": target, "confirm": target})
}

async fn state(console: SocketAddr) -> Value {
    reqwest::get(format!("http://{console}/api/state"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn node_state(state: &Value, id: &str) -> String {
    state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn region_draining(state: &Value, region: &str) -> Option<bool> {
    state["regions"]
        .as_array()?
        .iter()
        .find(|r| r["region"] == region)?["draining"]
        .as_bool()
}

#[tokio::test]
async fn without_an_operator_token_configured_every_action_is_refused_naming_the_flag() {
    let mesh = mesh().await;
    let before = state(mesh.console).await;
    let (status, answer) = act(mesh.console, Some(ALICE), drain("cs-1")).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("--operator-token"),
        "{answer}"
    );
    let after = state(mesh.console).await;
    assert_eq!(after["epoch"], before["epoch"]);
    assert_eq!(node_state(&after, "cs-1"), "active");
}

#[tokio::test]
async fn a_missing_wrong_or_unconfirmed_action_is_refused_and_changes_nothing() {
    let mesh = operated().await;
    let console = mesh.console;
    let before = state(console).await;
    let (status, _) = act(console, None, drain("cs-1")).await;
    assert_eq!(status, 401, "no token");
    let (status, _) = act(console, Some("alice-operator-token-0124"), drain("cs-1")).await;
    assert_eq!(status, 401, "a wrong token");
    // The token as a bearer or a cookie is not the operator's header.
    let reply = reqwest::Client::new()
        .post(format!("http://{console}/api/actions"))
        .bearer_auth(ALICE)
        .header("cookie", format!("operator={ALICE}"))
        .json(&drain("cs-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 401, "bearer or cookie");
    // A cross-site form post carries no custom header.
    let reply = reqwest::Client::new()
        .post(format!("http://{console}/api/actions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("action=drain_node&target=cs-1&confirm=cs-1")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 401, "a form post");
    let unconfirmed = json!({"action": "drain_node", "target": "cs-1", "confirm": "cs-2"});
    let (status, answer) = act(console, Some(ALICE), unconfirmed).await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = act(
        console,
        Some(ALICE),
        json!({"action": "drain_node", "target": "cs-1"}),
    )
    .await;
    assert_eq!(status, 400, "no confirmation at all");

    let after = state(console).await;
    assert_eq!(after["epoch"], before["epoch"]);
    assert_eq!(node_state(&after, "cs-1"), "active");
    assert_eq!(after["actions"], json!([]), "nothing logged");
    let metrics = reqwest::get(format!("http://{console}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |outcome: &str| {
        let label = format!("outcome=\"{outcome}\"");
        metric_sum(
            &metrics,
            "channelmesh_ring_console_actions_total",
            &[&label],
        )
    };
    assert_eq!(count("bad_token"), 4.0, "{metrics}");
    assert_eq!(count("refused"), 2.0);
    assert_eq!(count("done"), 0.0);
}

#[tokio::test]
async fn an_operator_drains_and_undrains_a_node_and_the_log_records_who_did_what() {
    let mesh = operated().await;
    let console = mesh.console;
    let before = state(console).await["epoch"].as_u64().unwrap();

    let (status, answer) = act(console, Some(ALICE), drain("cs-1")).await;
    assert_eq!(status, 200, "{answer}");
    let epoch = answer["epoch"].as_u64().unwrap();
    assert!(epoch > before);
    let s = state(console).await;
    assert!(["draining", "standby"].contains(&node_state(&s, "cs-1").as_str()));
    let logged = &s["actions"][0];
    assert_eq!(logged["operator"], "alice");
    assert_eq!(logged["action"], "drain_node");
    assert_eq!(logged["target"], "cs-1");
    assert_eq!(logged["ok"], true);
    assert_eq!(logged["epoch"].as_u64(), Some(epoch));
    let cause = s["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["epoch"].as_u64() == Some(epoch))
        .map(|e| e["cause"].as_str().unwrap().to_string())
        .unwrap();
    assert!(cause.contains("cs-1 drained"), "{cause}");

    // Draining it again is refused by the ring manager (it is not active), and logged.
    let (status, answer) = act(console, Some(ALICE), drain("cs-1")).await;
    assert_eq!(status, 409, "{answer}");

    // Once it has handed its slots off it is a standby, and undraining makes it active.
    eventually("cs-1 is a standby with no slots", || async {
        let s = state(console).await;
        (node_state(&s, "cs-1") == "standby").then_some(())
    })
    .await;
    let undrain = json!({"action": "undrain_node", "target": "cs-1", "confirm": "cs-1"});
    let (status, answer) = act(console, Some(ALICE), undrain).await;
    assert_eq!(status, 200, "{answer}");
    eventually("cs-1 leads slots again", || async {
        let s = state(console).await;
        let cs1 = s["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["id"] == "cs-1")?
            .clone();
        (cs1["state"] == "active" && cs1["slots"].as_u64()? > 0).then_some(())
    })
    .await;
    let s = state(console).await;
    let actions: Vec<(String, bool)> = s["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["action"].as_str().unwrap().to_string(), a["ok"] == true))
        .collect();
    assert_eq!(
        actions,
        [
            ("undrain_node".to_string(), true),
            ("drain_node".to_string(), false),
            ("drain_node".to_string(), true)
        ]
    );

    // The page offers the actions and sends the token in its own header.
    let page = reqwest::get(format!("http://{console}/")).await.unwrap();
    assert!(page.text().await.unwrap().contains("id=\"operator-token\""));
    let js = reqwest::get(format!("http://{console}/console.js"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(js.contains("\"X-Channelmesh-Operator-Token\": operatorToken"));
}

#[tokio::test]
async fn an_operator_drains_and_undrains_a_region() {
    let mesh = operated().await;
    let console = mesh.console;
    eventually("both regions have reported", || async {
        let s = state(console).await;
        (!region_draining(&s, "us-east")? && !region_draining(&s, "eu-west")?).then_some(())
    })
    .await;
    let region =
        |action: &str| json!({"action": action, "target": "us-east", "confirm": "us-east"});
    let (status, answer) = act(
        console,
        Some("wrong-token-wrong-token"),
        region("drain_region"),
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(
        region_draining(&state(console).await, "us-east"),
        Some(false)
    );

    let (status, answer) = act(console, Some(ALICE), region("drain_region")).await;
    assert_eq!(status, 200, "{answer}");
    let s = state(console).await;
    assert_eq!(region_draining(&s, "us-east"), Some(true));
    assert_eq!(s["actions"][0]["action"], "drain_region");
    assert_eq!(s["actions"][0]["operator"], "alice");

    let (status, answer) = act(console, Some(ALICE), region("undrain_region")).await;
    assert_eq!(status, 200, "{answer}");
    let s = state(console).await;
    assert_eq!(region_draining(&s, "us-east"), Some(false));
    assert_eq!(s["actions"][0]["action"], "undrain_region");
}

#[tokio::test]
async fn an_operator_drains_a_node_and_disconnects_a_user_from_the_page_in_headless_chromium_typing_their_names()
 {
    let mesh = operated().await;
    let console = mesh.console;
    let page = Page::open(console, &format!("http://{console}/")).await;
    eventually("the page to go live with cs-1's drain button", || async {
        let ready = page
            .eval(
                "document.getElementById('live').textContent === 'live' && \
                 !!document.querySelector('button.action[data-action=drain_node][data-target=\"cs-1\"]')",
            )
            .await;
        (ready == json!(true)).then_some(())
    })
    .await;
    // The operator's token, typed into its field.
    page.eval(&format!(
        "(() => {{ const t = document.getElementById('operator-token'); t.value = '{ALICE}'; \
         t.dispatchEvent(new Event('input')); return true; }})()"
    ))
    .await;
    // Drain cs-2, typing the wrong name: the dialog does not let it through.
    let wrong = page
        .eval(
            "(() => { document.querySelector('button.action[data-action=drain_node][data-target=\"cs-2\"]').click(); \
             const i = document.getElementById('confirm-input'); i.value = 'cs-3'; \
             i.dispatchEvent(new Event('input')); \
             const blocked = document.getElementById('confirm-ok').disabled; \
             document.getElementById('confirm-cancel').click(); \
             return blocked && !document.getElementById('confirm').open; })()",
        )
        .await;
    assert_eq!(wrong, json!(true), "a wrong name keeps Confirm disabled");
    // Drain cs-1, typing its name.
    let sent = page
        .eval(
            "(() => { document.querySelector('button.action[data-action=drain_node][data-target=\"cs-1\"]').click(); \
             const i = document.getElementById('confirm-input'); i.value = 'cs-1'; \
             i.dispatchEvent(new Event('input')); \
             const ok = document.getElementById('confirm-ok'); if (ok.disabled) return false; \
             ok.click(); return true; })()",
        )
        .await;
    assert_eq!(sent, json!(true));
    eventually("the page to log alice's drain of cs-1", || async {
        let first = page
            .eval("document.querySelector('#actions li[data-action]')?.textContent ?? ''")
            .await;
        let text = first.as_str().unwrap_or_default().to_string();
        if text.contains("drain_node cs-1") && text.contains("by alice") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    let s = state(console).await;
    assert!(["draining", "standby"].contains(&node_state(&s, "cs-1").as_str()));
    assert_eq!(
        node_state(&s, "cs-2"),
        "active",
        "the unconfirmed drain was not sent"
    );
    assert_eq!(s["actions"].as_array().unwrap().len(), 1);
    let status = page
        .eval("document.getElementById('action-status').textContent")
        .await;
    assert!(
        status
            .as_str()
            .unwrap_or_default()
            .starts_with("done: cs-1 drains"),
        "{status}"
    );

    // Disconnect a user from the form: the dialog asks for the user id.
    let base = mesh.rtm_base_url("eu-west").unwrap();
    let token = mesh.token("UPAGE", "T1", &[]).unwrap();
    let mut client = Rtm::connect(&base, &token).await.unwrap();
    let sent = page
        .eval(
            "(() => { document.getElementById('disconnect-user').value = 'UPAGE'; \
             document.getElementById('disconnect-reason').value = 'maintenance'; \
             document.getElementById('disconnect-button').click(); \
             const i = document.getElementById('confirm-input'); i.value = 'UPAGE'; \
             i.dispatchEvent(new Event('input')); \
             const ok = document.getElementById('confirm-ok'); if (ok.disabled) return false; \
             ok.click(); return true; })()",
        )
        .await;
    assert_eq!(sent, json!(true));
    assert_eq!(client.closed().await, Some(4010), "closed: reconnect");
    eventually("the page to log the disconnect", || async {
        let first = page
            .eval("document.querySelector('#actions li[data-action]')?.textContent ?? ''")
            .await;
        let text = first.as_str().unwrap_or_default().to_string();
        if text.contains("disconnect_user UPAGE") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
}

#[tokio::test]
async fn an_operator_disconnects_a_user_and_nobody_else() {
    let mesh = operated().await;
    let console = mesh.console;
    let base = mesh.rtm_base_url("us-east").unwrap();
    let mut kicked = Rtm::connect(&base, &mesh.token("UKICK", "T1", &[]).unwrap())
        .await
        .unwrap();
    let mut other = Rtm::connect(&base, &mesh.token("UOTHER", "T1", &[]).unwrap())
        .await
        .unwrap();
    let order = |token: Option<&'static str>| {
        act(
            console,
            token,
            json!({"action": "disconnect_user", "target": "UKICK", "confirm": "UKICK",
                   "reason": "abuse", "reconnect": false}),
        )
    };
    let (status, _) = order(Some("wrong-token-wrong-token")).await;
    assert_eq!(status, 401);
    let (status, _) = order(None).await;
    assert_eq!(status, 401);
    kicked
        .stays_open(
            std::time::Duration::from_millis(1500),
            "an unauthorised disconnect",
        )
        .await;

    let (status, answer) = order(Some(ALICE)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        kicked.closed().await,
        Some(4011),
        "closed: do not reconnect"
    );
    other
        .stays_open(
            std::time::Duration::from_secs(1),
            "another user's connection",
        )
        .await;
    let s = state(console).await;
    assert_eq!(s["actions"][0]["action"], "disconnect_user");
    assert_eq!(s["actions"][0]["target"], "UKICK");
    assert_eq!(s["actions"][0]["operator"], "alice");
    assert_eq!(s["actions"][0]["ok"], true);
}
