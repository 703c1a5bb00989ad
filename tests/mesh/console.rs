//! The ring manager's SRE console: its JSON, its live events, the page in a real headless
//! Chromium (installed by `tests/setup`), and `ctl top`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Rtm, WAIT, eventually, mesh, mesh_with};

/// A mesh without replication (factor 1), for the tests of a standby's takeover.
async fn unreplicated() -> channelmesh::Mesh {
    mesh_with(channelmesh::MeshConfig {
        replication_factor: 1,
        ..channelmesh::MeshConfig::ephemeral()
    })
    .await
}

/// The number in `node`'s `follows` cell of the page's `dom`.
fn followed_in(dom: &str, node: &str) -> u64 {
    let row = &dom[dom.find(&format!("<tr data-node=\"{node}\"")).unwrap()..];
    let marker = "class=\"num followed\">";
    let cell = &row[row.find(marker).unwrap() + marker.len()..];
    let digits: String = cell.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

const BIN: &str = env!("CARGO_BIN_EXE_channelmesh");
/// How long one Chromium run may take (it starts cold on a busy 2-core machine).
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

async fn get(console: SocketAddr, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{console}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap()
}

async fn state(console: SocketAddr) -> Value {
    let response = get(console, "/api/state").await;
    assert!(response.status().is_success());
    response.json().await.unwrap()
}

fn node<'a>(state: &'a Value, id: &str) -> &'a Value {
    state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("{id} missing in {state}"))
}

#[tokio::test]
async fn console_state_has_every_node_the_ring_regions_and_probes() {
    let mesh = mesh().await;
    let console = mesh.console;

    let healthz = get(console, "/healthz").await;
    assert_eq!(healthz.status(), 200);
    let readyz = get(console, "/readyz").await;
    assert_eq!(readyz.status(), 200);

    let s = state(console).await;
    assert_eq!(s["role"], "embedded");
    assert_eq!(s["ready"], true);
    assert!(s["epoch"].as_u64().unwrap() >= 1);
    let ids: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cs-1", "cs-2", "cs-3", "cs-4"]);
    assert_eq!(node(&s, "cs-4")["state"], "standby");
    assert_eq!(node(&s, "cs-4")["standby"], true);
    assert_eq!(node(&s, "cs-4")["slots"], 0);
    let slots: u64 = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["slots"].as_u64().unwrap())
        .sum();
    assert_eq!(slots, mesh_core::SLOT_COUNT as u64);

    // The arcs tile the ring, and each node's arcs add up to its slots.
    let mut next = 0;
    for arc in s["arcs"].as_array().unwrap() {
        assert_eq!(arc["start"].as_u64().unwrap(), next);
        next += arc["len"].as_u64().unwrap();
    }
    assert_eq!(next, mesh_core::SLOT_COUNT as u64);
    for id in ["cs-1", "cs-2", "cs-3"] {
        let in_arcs: u64 = s["arcs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["node"] == id)
            .map(|a| a["len"].as_u64().unwrap())
            .sum();
        assert_eq!(in_arcs, node(&s, id)["slots"].as_u64().unwrap());
    }
    // The epoch history ends at the current epoch.
    assert_eq!(s["epochs"][0]["epoch"], s["epoch"]);

    // Regions with live connection counts.
    let base = mesh.rtm_base_url("us-east").unwrap();
    let token = mesh.token("UCONSOLE", "T1", &["CCONSOLE"]).unwrap();
    let _client = Rtm::connect(&base, &token).await.unwrap();
    eventually("us-east reports its client", || async {
        let s = state(console).await;
        let regions = s["regions"].as_array()?.clone();
        let us = regions.iter().find(|r| r["region"] == "us-east")?;
        let eu = regions.iter().find(|r| r["region"] == "eu-west")?;
        (us["connections"] == 1
            && eu["draining"] == false
            && us["gateways"][0]["id"] == "us-east-1")
            .then_some(())
    })
    .await;

    // The presence ring's manager has its own console.
    let p = state(mesh.presence_console).await;
    assert_eq!(node(&p, "ps-1")["state"], "active");
    assert_eq!(node(&p, "ps-3")["state"], "standby");

    let page = get(console, "/").await;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(page.text().await.unwrap().contains("console.js"));
}

/// Reads `/api/events` until a snapshot satisfies `want`.
async fn until_event(
    response: &mut reqwest::Response,
    buffer: &mut String,
    want: impl Fn(&Value) -> bool,
) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let snapshot: Value = serde_json::from_str(&data).unwrap();
                if want(&snapshot) {
                    return snapshot;
                }
            }
            let chunk = response
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .expect("the awaited snapshot arrives")
}

#[tokio::test]
async fn console_events_push_a_snapshot_when_a_channel_server_dies() {
    let mesh = unreplicated().await;
    let mut events = reqwest::Client::new()
        .get(format!("http://{}/api/events", mesh.console))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buffer = String::new();
    let first = until_event(&mut events, &mut buffer, |_| true).await;
    assert_eq!(node(&first, "cs-2")["state"], "active");
    let epoch = first["epoch"].as_u64().unwrap();

    assert!(mesh.stop_channel_server("cs-2"));
    let after = until_event(&mut events, &mut buffer, |s| {
        node(s, "cs-2")["state"] == "down" && s["epoch"].as_u64().unwrap() > epoch
    })
    .await;
    assert_eq!(node(&after, "cs-2")["slots"], 0);
    assert_eq!(node(&after, "cs-4")["state"], "active");
    let change = &after["epochs"][0];
    assert!(
        change["cause"].as_str().unwrap().contains("cs-2"),
        "{change}"
    );
    assert_eq!(change["moves"][0]["from"], "cs-2");
    assert_eq!(change["moves"][0]["to"], "cs-4");
    assert_eq!(
        change["moved"].as_u64().unwrap(),
        node(&first, "cs-2")["slots"].as_u64().unwrap(),
        "exactly the dead node's slots moved"
    );
}

/// The Chromium that `tests/setup` installs (Debian's `chromium`).
fn chromium() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join("chromium");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("chromium is missing: run `tests/setup` (it installs Debian's chromium package)");
}

/// The page's DOM after its scripts ran, as headless Chromium dumps it.
async fn dump_dom(url: &str) -> String {
    let profile = std::env::temp_dir().join(format!(
        "channelmesh-console-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let run = tokio::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            // Below the page's LIVE_DELAY_MS: the dump is taken before its event stream
            // opens (an open stream stops the virtual clock, and the dump would never come).
            "--virtual-time-budget=500",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT, run)
        .await
        .expect("chromium dumps the page within its timeout")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[tokio::test]
async fn console_page_in_headless_chromium_shows_the_nodes_and_a_dead_one() {
    let mesh = mesh().await;
    let url = format!("http://{}/", mesh.console);

    let dom = dump_dom(&url).await;
    for id in ["cs-1", "cs-2", "cs-3", "cs-4"] {
        assert!(
            dom.contains(&format!("<tr data-node=\"{id}\"")),
            "{id} is not in the page:\n{dom}"
        );
    }
    assert!(dom.contains("<tr data-node=\"cs-2\" data-state=\"active\""));
    assert!(dom.contains("<tr data-node=\"cs-4\" data-state=\"standby\""));
    assert!(dom.contains("class=\"arc\""), "the ring is drawn");
    // Replicated (factor 2): each active node follows slots, the standby none.
    assert!(followed_in(&dom, "cs-2") > 0, "{dom}");
    assert_eq!(followed_in(&dom, "cs-4"), 0);

    assert!(mesh.stop_channel_server("cs-2"));
    let dom = eventually("the page shows cs-2 down", || async {
        let dom = dump_dom(&url).await;
        dom.contains("<tr data-node=\"cs-2\" data-state=\"down\"")
            .then_some(dom)
    })
    .await;
    // Its slots went to their followers; the standby joined as a follower (and may lead
    // already, once its copies are filled).
    assert!(
        dom.contains("<tr data-node=\"cs-4\" data-state=\"joining\"")
            || dom.contains("<tr data-node=\"cs-4\" data-state=\"active\""),
        "{dom}"
    );
    assert!(followed_in(&dom, "cs-4") > 0, "{dom}");
    assert!(dom.contains("cs-2 down"), "the epoch list says why");
}

#[tokio::test]
async fn ctl_top_once_prints_the_nodes_and_regions() {
    let mesh = mesh().await;
    let console = format!("http://{}", mesh.console);
    let top = |json: bool| {
        let mut command = tokio::process::Command::new(BIN);
        command.args(["ctl", "top", "--once", "--console", &console]);
        if json {
            command.arg("--json");
        }
        command.output()
    };
    let out = eventually("ctl top shows both regions", || async {
        let out = top(false).await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        (text.contains("us-east") && text.contains("eu-west")).then_some(text)
    })
    .await;
    for id in ["cs-1", "cs-2", "cs-3", "cs-4"] {
        assert!(out.contains(id), "{id} missing:\n{out}");
    }
    assert!(out.contains("standby"), "{out}");
    assert!(out.contains("RECENT EPOCHS"), "{out}");

    let json = top(true).await.unwrap();
    assert!(json.status.success());
    let s: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 4);

    // A console that is not there: exit 1 with the reason.
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "top", "--once", "--console", "http://127.0.0.1:1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("console"));
}

/// Evaluates `expression` in the page over the DevTools protocol; returns its JSON value.
async fn evaluate(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    id: u64,
    expression: &str,
) -> Value {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let call = serde_json::json!({
        "id": id,
        "method": "Runtime.evaluate",
        "params": {"expression": expression, "returnByValue": true},
    });
    ws.send(Message::text(call.to_string())).await.unwrap();
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("chromium answers")
            .expect("the DevTools socket stays open")
            .unwrap();
        let Message::Text(text) = message else {
            continue;
        };
        let reply: Value = serde_json::from_str(&text).unwrap();
        if reply["id"] == id {
            return reply["result"]["result"]["value"].clone();
        }
    }
}

/// A page open in a headless Chromium, driven over the DevTools protocol; the browser and its
/// profile go when it is dropped.
pub(crate) struct Page {
    /// The page's DevTools socket and the id of its last call.
    devtools: tokio::sync::Mutex<(
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        u64,
    )>,
    group: nix::unistd::Pid,
    _browser: tokio::process::Child,
    profile: PathBuf,
}

impl Page {
    /// Opens `url` (the console at `console`) in a headless Chromium.
    pub(crate) async fn open(console: SocketAddr, url: &str) -> Page {
        let profile = std::env::temp_dir().join(format!(
            "channelmesh-console-live-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let browser = tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Debian's `chromium` is a wrapper script, and the browser
            // and its helpers must all go when the test ends.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let group = nix::unistd::Pid::from_raw(browser.id().unwrap() as i32);
        // Chromium writes the port it picked to DevToolsActivePort.
        let port: u16 = eventually("chromium's DevTools port", || async {
            let text = std::fs::read_to_string(profile.join("DevToolsActivePort")).ok()?;
            text.lines().next()?.trim().parse().ok()
        })
        .await;
        let page_ws: String = eventually("the console page in chromium", || async {
            let pages: Value = reqwest::get(format!("http://127.0.0.1:{port}/json"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            pages
                .as_array()?
                .iter()
                .find(|p| {
                    p["type"] == "page"
                        && p["url"]
                            .as_str()
                            .is_some_and(|u| u.contains(&console.to_string()))
                })
                .and_then(|p| p["webSocketDebuggerUrl"].as_str().map(str::to_string))
        })
        .await;
        let (ws, _) = tokio_tungstenite::connect_async(page_ws.as_str())
            .await
            .unwrap();
        Page {
            devtools: tokio::sync::Mutex::new((ws, 0)),
            group,
            _browser: browser,
            profile,
        }
    }

    /// The value of `expression` evaluated in the page.
    pub(crate) async fn eval(&self, expression: &str) -> Value {
        let mut devtools = self.devtools.lock().await;
        let (ws, id) = &mut *devtools;
        *id += 1;
        evaluate(ws, *id, expression).await
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(self.group, nix::sys::signal::Signal::SIGKILL);
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[tokio::test]
async fn console_page_updates_live_when_a_channel_server_dies() {
    let mesh = unreplicated().await;
    // A page left open in a headless Chromium: it must change by the event stream alone, with
    // no reload.
    let page = Page::open(mesh.console, &format!("http://{}/", mesh.console)).await;
    let rows = "JSON.stringify({live: document.getElementById('live').textContent, \
                nodes: Object.fromEntries([...document.querySelectorAll('#nodes tr[data-node]')] \
                .map(r => [r.dataset.node, r.dataset.state]))})";
    let look = || async {
        let text = page.eval(rows).await;
        serde_json::from_str::<Value>(text.as_str().unwrap_or("null")).unwrap_or(Value::Null)
    };
    // Wait until the page has loaded and follows the event stream, then kill a node.
    let live = eventually("the page to go live", || async {
        let live = look().await;
        if live["live"] == "live" {
            Ok(live)
        } else {
            Err(live)
        }
    })
    .await;
    assert_eq!(live["nodes"]["cs-2"], "active", "{live}");
    assert!(mesh.stop_channel_server("cs-2"));
    eventually("the page to show cs-2 down and cs-4 active", || async {
        let after = look().await;
        if after["nodes"]["cs-2"] == "down" && after["nodes"]["cs-4"] == "active" {
            Ok(())
        } else {
            Err(after)
        }
    })
    .await;
}
