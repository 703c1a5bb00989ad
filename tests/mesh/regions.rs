//! Regions: draining a region moves every client to the nearest healthy region with nothing
//! lost or duplicated.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::support::{Rtm, WAIT, admin, eventually, mesh, poll_until, poster, rm_at, web_api};

const CLIENTS: usize = 300;
const CHANNELS: usize = 10;
/// Real `slack_sdk` RTM v2 clients, on top of the raw ones, in the first [`PY_CHANNELS`] channels.
const PY_CLIENTS: usize = 6;
const PY_CHANNELS: usize = 3;

/// The real rtm_v2 clients of `tests/clients/python/rtm_v2_drain.py`, in one Python process.
struct PyClients {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl PyClients {
    /// Starts the script with `config` and waits until every client got `hello`.
    async fn start(config: Value) -> PyClients {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let python = repo.join("tests/.venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `tests/setup` (or `tests/run`) to install the real clients",
            python.display()
        );
        let mut child = tokio::process::Command::new(python)
            .arg(repo.join("tests/clients/python/rtm_v2_drain.py"))
            .env("CHANNELMESH_TEST", config.to_string())
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the rtm_v2 drain script starts");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut py = PyClients { child, stdout };
        py.expect_line("READY").await;
        py
    }

    /// The next line the script prints, within `limit`.
    async fn line(&mut self, limit: Duration) -> String {
        tokio::time::timeout(limit, self.stdout.next_line())
            .await
            .expect("the rtm_v2 drain script answers in time")
            .unwrap()
            .expect("the rtm_v2 drain script is still running")
    }

    async fn expect_line(&mut self, want: &str) {
        let line = self.line(Duration::from_secs(30)).await;
        assert_eq!(line, want, "the rtm_v2 drain script said {line:?}");
    }

    /// Says REPORT; returns each client's report so far (`user`, `seen`, `url`, ...).
    async fn report(&mut self) -> Vec<Value> {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"REPORT\n").await.unwrap();
        stdin.flush().await.unwrap();
        Self::clients(&self.line(Duration::from_secs(10)).await)
    }

    fn clients(line: &str) -> Vec<Value> {
        let report: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("the rtm_v2 drain script said {line:?}: {e}"));
        report["clients"].as_array().unwrap().clone()
    }

    /// Says STOP; returns each client's report (`user`, `seen`, `url`, ...).
    async fn stop(mut self) -> Vec<Value> {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"STOP\n").await.unwrap();
        stdin.flush().await.unwrap();
        let clients = Self::clients(&self.line(Duration::from_secs(10)).await);
        self.expect_line("OK").await;
        drop(stdin);
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the rtm_v2 drain script exits after OK")
            .unwrap();
        assert!(
            status.success(),
            "the rtm_v2 drain script exited with {status}"
        );
        clients
    }
}

/// One client as an unmodified Slack client behaves: on `goodbye` or a closed socket it calls
/// `rtm.connect` again on the same base URL and follows the URL it gets.
struct Client {
    base: String,
    token: String,
    rtm: Rtm,
    /// Message ts in arrival order; shared, so that the test can wait for the last ones.
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    reconnects: usize,
}

impl Client {
    async fn reconnect(&mut self) {
        let (base, token) = (&self.base, &self.token);
        self.rtm = eventually("a reconnect", || async {
            let reply = web_api(base, "rtm.connect", Some(token)).await;
            let mut rtm = Rtm::open(reply["url"].as_str()?).await.ok()?;
            rtm.next()
                .await
                .is_ok_and(|v| v["type"] == "hello")
                .then_some(rtm)
        })
        .await;
        self.reconnects += 1;
    }

    /// Reads until `stop`, following goodbyes.
    async fn run(mut self, stop: CancellationToken) -> Client {
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return self,
                f = self.rtm.next() => f,
            };
            match frame {
                Ok(v) if v["type"] == "message" && v["user"] == "UPOSTER" => {
                    let ts = v["ts"].as_str().unwrap().to_string();
                    self.seen.lock().unwrap().push(ts);
                }
                Ok(v) if v["type"] == "goodbye" => self.reconnect().await,
                Ok(_) => {}
                Err(_) => self.reconnect().await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_region_moves_every_client_with_nothing_lost_or_duplicated() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let us_addr = mesh
        .gateways
        .iter()
        .find(|(r, _)| r == "us-east")
        .unwrap()
        .1;
    let eu_addr = mesh
        .gateways
        .iter()
        .find(|(r, _)| r == "eu-west")
        .unwrap()
        .1;
    let stats = |addr| async move {
        reqwest::get(format!("http://{addr}/stats"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };

    // Several hundred clients on us-east, each in one of the channels.
    let channel = |i: usize| format!("CDRAIN{}", i % CHANNELS);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let token = mesh
            .token(&format!("UDRAIN{i}"), "T1", &[&channel(i)])
            .unwrap();
        let rtm = Rtm::connect(&us, &token).await.unwrap();
        clients.push(Client {
            base: us.clone(),
            token,
            rtm,
            seen: Arc::default(),
            reconnects: 0,
        });
    }
    // And real slack_sdk rtm_v2 clients, also on us-east, before any message is posted.
    let py_channel = |i: usize| channel(i % PY_CHANNELS);
    let py_clients: Vec<Value> = (0..PY_CLIENTS)
        .map(|i| {
            let user = format!("UPYDRAIN{i}");
            let token = mesh.token(&user, "T1", &[&py_channel(i)]).unwrap();
            json!({"user": user, "token": token, "channel": py_channel(i)})
        })
        .collect();
    // Behind a lock: the wait for the last messages below asks it for reports.
    let py = Mutex::new(PyClients::start(json!({"base_url": us, "clients": py_clients})).await);
    // Messages to every channel at a steady rate throughout.
    let admin = admin(&mesh).await;
    let stop_posting = CancellationToken::new();
    let posters: Vec<_> = (0..CHANNELS)
        .map(|c| poster(&admin, &channel(c), stop_posting.clone()))
        .collect();
    let stop_reading = CancellationToken::new();
    let seen: Vec<_> = clients.iter().map(|c| c.seen.clone()).collect();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(c.run(stop_reading.clone())))
        .collect();
    // Messages flow in every channel before the drain.
    let posting_since = Instant::now();
    for p in &posters {
        p.acked_since(posting_since, 5).await;
    }

    // Drain us-east (the gateways learn it from their next report).
    let started = Instant::now();
    let view = rm_at(mesh.ring_manager)
        .await
        .drain_region(mesh_proto::ring::DrainRegionRequest {
            region: "us-east".into(),
            rate: 200,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        view.regions
            .iter()
            .any(|r| r.region == "us-east" && r.draining)
    );
    crate::support::eventually_within(
        "us-east empty and every client on eu-west",
        Duration::from_secs(30),
        || async {
            let (us, eu) = (stats(us_addr).await, stats(eu_addr).await);
            (us["connections"] == 0 && eu["connections"] == json!(CLIENTS + PY_CLIENTS))
                .then_some(())
        },
    )
    .await;
    let drained_in = started.elapsed();
    let health = reqwest::get(format!("http://{us_addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        503,
        "a draining gateway fails its health check"
    );

    // A little more traffic on the new region, then stop.
    let drained = Instant::now();
    for p in &posters {
        p.acked_since(drained, 5).await;
    }
    stop_posting.cancel();
    let mut acked: Vec<Vec<String>> = Vec::new();
    let mut failed = 0;
    for p in posters {
        let (a, f) = p.finish().await;
        failed += f;
        acked.push(a.into_iter().map(|(_, ts, _)| ts).collect());
    }
    assert_eq!(failed, 0, "no post failed during the drain");
    // Let the last messages arrive: wait until every client has every acknowledged post of its
    // channel. Any duplicate from a reconnect comes before these, on the same connection. If
    // some never arrive, the counts below say how many.
    let _ = poll_until(WAIT, || async {
        let complete = |i: usize, seen: &[String]| {
            let got: HashSet<&String> = seen.iter().collect();
            acked[i % CHANNELS].iter().all(|ts| got.contains(ts))
        };
        for (i, seen) in seen.iter().enumerate() {
            if !complete(i, &seen.lock().unwrap()) {
                return Err(format!("client {i} is missing messages"));
            }
        }
        for (i, report) in py.lock().await.report().await.iter().enumerate() {
            let seen: Vec<String> = serde_json::from_value(report["seen"].clone()).unwrap();
            if !complete(i % PY_CHANNELS, &seen) {
                return Err(format!("rtm_v2 client {i} is missing messages"));
            }
        }
        Ok(())
    })
    .await;
    stop_reading.cancel();
    let mut lost = 0;
    let mut duplicated = 0;
    let reconnects = Arc::new(Mutex::new(0));
    for (i, reader) in readers.into_iter().enumerate() {
        let client = reader.await.unwrap();
        *reconnects.lock().await += client.reconnects;
        let seen = client.seen.lock().unwrap().clone();
        let want: HashSet<&String> = acked[i % CHANNELS].iter().collect();
        let got: HashSet<&String> = seen.iter().collect();
        duplicated += seen.len() - got.len();
        lost += want.difference(&got).count();
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, seen, "client {i} got messages out of ts order");
        assert!(
            client.rtm.url.contains(&eu_addr.to_string()),
            "client {i} ended on {}",
            client.rtm.url
        );
    }
    let (raw_lost, raw_duplicated) = (lost, duplicated);

    // The real rtm_v2 clients: the same checks, on what each one recorded in arrival order.
    let reports = py.into_inner().stop().await;
    assert_eq!(reports.len(), PY_CLIENTS);
    let mut py_reconnects = 0;
    let mut py_goodbyes = 0;
    let mut py_seen = 0;
    for (i, report) in reports.iter().enumerate() {
        let user = &report["user"];
        assert_eq!(user, &json!(format!("UPYDRAIN{i}")));
        let seen: Vec<String> = report["seen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ts| ts.as_str().unwrap().to_string())
            .collect();
        let want: HashSet<&String> = acked[i % PY_CHANNELS].iter().collect();
        let got: HashSet<&String> = seen.iter().collect();
        py_seen += seen.len();
        duplicated += seen.len() - got.len();
        lost += want.difference(&got).count();
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(
            sorted, seen,
            "rtm_v2 client {user} got messages out of ts order"
        );
        let url = report["url"].as_str().unwrap_or("(not connected)");
        assert!(
            url.contains(&eu_addr.to_string()),
            "rtm_v2 client {user} ended on {url}: {report}"
        );
        py_reconnects += report["hellos"].as_u64().unwrap() - 1;
        py_goodbyes += report["goodbyes"].as_u64().unwrap();
    }

    let total: usize = acked.iter().map(Vec::len).sum();
    println!(
        "drained {} clients ({CLIENTS} raw + {PY_CLIENTS} slack_sdk rtm_v2) from us-east in {} ms at 200/s; {total} messages posted; lost {lost}, duplicated {duplicated} (raw: {raw_lost}, {raw_duplicated}); {} raw reconnects, rtm_v2: {py_seen} messages received, {py_goodbyes} goodbyes, {py_reconnects} reconnects",
        CLIENTS + PY_CLIENTS,
        drained_in.as_millis(),
        reconnects.lock().await
    );
    assert_eq!((lost, duplicated), (0, 0));
}
