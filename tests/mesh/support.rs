//! The test kit: boots a whole mesh on 127.0.0.1:0 in one line, and speaks RTM and the admin
//! API to it as real clients do.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use channelmesh::{Mesh, MeshConfig};
use futures::{SinkExt, StreamExt};
use mesh_core::{Ring, SLOT_COUNT, Slot};
use mesh_proto::admin::admin_client::AdminClient;
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use mesh_proto::ring::{GetRingRequest, Member};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// A whole mesh on ephemeral ports.
pub async fn mesh() -> Mesh {
    mesh_with(MeshConfig::ephemeral()).await
}

/// A whole mesh with `config`. With `RUST_LOG` set, the services log to the test's output.
pub async fn mesh_with(config: MeshConfig) -> Mesh {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    Mesh::start(config, CancellationToken::new())
        .await
        .expect("the mesh starts")
}

/// What an [`eventually`] check answers: `Some` or `Ok` ends the wait with its value; `None` or
/// `Err` polls again, and the last `Err` is shown if the wait gives up.
pub trait Check<T> {
    fn done(self) -> Result<T, Option<String>>;
}

impl<T> Check<T> for Option<T> {
    fn done(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: std::fmt::Display> Check<T> for Result<T, E> {
    fn done(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

/// The first pause between two polls of a condition; it doubles up to [`POLL_MAX`], so that a
/// quick condition is seen soon and a slow one (or many waits at once) does not load a shared
/// machine.
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(100);

/// Waits until `check` is done (see [`Check`]), polling, for at most [`WAIT`]; panics with
/// `what` (and the last thing `check` saw) if it is not.
///
/// `check` is a closure returning a future (`|| async { .. }`) rather than an async closure,
/// whose future could not be sent to another task (`tokio::spawn`) by today's compiler; state it
/// needs mutably goes behind a lock.
pub async fn eventually<T, C, F, Fut>(what: &str, check: F) -> T
where
    C: Check<T>,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    eventually_within(what, WAIT, check).await
}

/// [`eventually`], for at most `limit`.
pub async fn eventually_within<T, C, F, Fut>(what: &str, limit: Duration, check: F) -> T
where
    C: Check<T>,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    match poll_until(limit, check).await {
        Ok(v) => v,
        Err(Some(last)) => panic!("{what}: not within {limit:?}; last seen: {last}"),
        Err(None) => panic!("{what}: not within {limit:?}"),
    }
}

/// Polls `check` until it is done or `limit` passes; then `Err` holds the last thing it saw. For
/// a wait after which the test's own assertions say what went wrong.
pub async fn poll_until<T, C, F, Fut>(limit: Duration, mut check: F) -> Result<T, Option<String>>
where
    C: Check<T>,
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = POLL_FIRST;
    loop {
        let last = match check().await.done() {
            Ok(v) => return Ok(v),
            Err(last) => last,
        };
        if tokio::time::Instant::now() > deadline {
            return Err(last);
        }
        // The poll interval of every wait in the kit: not a wait by itself.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port` (a child process that
/// started listening); panics with `what` if nothing does within [`WAIT`].
/// Runs `channelmesh bench ARGS` (the `channelmesh-loadgen` beside the binary) with `env` set
/// and the secrets of the caller's environment removed, within 2 minutes; returns its JSON
/// report, which must have every one of `fields`. Fails clearly when the load generator is not
/// built or the run fails.
pub async fn bench_report(args: &[&str], env: &[(&str, &str)], fields: &[&str]) -> Value {
    let channelmesh = std::path::Path::new(env!("CARGO_BIN_EXE_channelmesh"));
    let loadgen = channelmesh.with_file_name("channelmesh-loadgen");
    assert!(
        loadgen.is_file(),
        "{} is missing: `channelmesh bench` runs it. Build it with `cargo build -p \
         channelmesh-loadgen` (`tests/run` builds the whole workspace)",
        loadgen.display()
    );
    let mut command = tokio::process::Command::new(channelmesh);
    command
        .arg("bench")
        .args(args)
        .env_remove("CHANNELMESH_JWT_SECRET")
        .env_remove("CHANNELMESH_ADMIN_TOKEN")
        .env_remove("CHANNELMESH_LOADGEN")
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the bench run took over 2 minutes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in fields {
        assert!(!report[field].is_null(), "no {field} in {report}");
    }
    report
}

pub async fn listening(port: u16, what: &str) {
    eventually(what, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(drop)
    })
    .await;
}

/// Calls a Slack Web API method on a gateway (`POST {base}{method}`, bearer token).
pub async fn web_api(base: &str, method: &str, token: Option<&str>) -> Value {
    let mut request = reqwest::Client::new().post(format!("{base}{method}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request
        .send()
        .await
        .expect("the gateway answers")
        .json()
        .await
        .expect("the gateway answers JSON")
}

/// A gateway's `/metrics` text (`base`: its Web API base URL, `http://host:port/api/`).
pub async fn gateway_metrics(base: &str) -> String {
    let url = base.trim_end_matches("/api/").to_string() + "/metrics";
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The sum of the series of metric `name` in `text` whose labels include each of `labels`
/// (e.g. `reason="timeout"`; none: every series).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A WebSocket upgrade of connect URL `url` that the gateway is to refuse: its HTTP status
/// and JSON body.
pub async fn refused_upgrade(url: &str) -> (reqwest::StatusCode, Value) {
    let reply = reqwest::Client::new()
        .get(url.replacen("ws://", "http://", 1))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("the gateway answers");
    let status = reply.status();
    (status, reply.json().await.expect("a JSON answer"))
}

/// A raw RTM client over tokio-tungstenite.
pub struct Rtm {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub url: String,
}

impl Rtm {
    /// `rtm.connect`, then the WebSocket, then waits for `hello`.
    pub async fn connect(base: &str, token: &str) -> anyhow::Result<Rtm> {
        Self::connect_with(base, token, "").await
    }

    /// The same, with `query` (e.g. `?batch_presence_aware=1`) on `rtm.connect`.
    pub async fn connect_with(base: &str, token: &str, query: &str) -> anyhow::Result<Rtm> {
        let reply = web_api(base, &format!("rtm.connect{query}"), Some(token)).await;
        if reply["ok"] != json!(true) {
            bail!("rtm.connect refused: {reply}");
        }
        let url = reply["url"]
            .as_str()
            .context("rtm.connect has a url")?
            .to_string();
        let mut rtm = Rtm::open(&url).await?;
        let hello = rtm.next().await?;
        if hello["type"] != "hello" {
            bail!("first frame was {hello}, not hello");
        }
        Ok(rtm)
    }

    /// Opens the WebSocket at `url` only.
    pub async fn open(url: &str) -> anyhow::Result<Rtm> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Rtm {
            ws,
            url: url.to_string(),
        })
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("the frame is sent");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("the frame is sent");
    }

    /// The next JSON text frame (skipping protocol pings), within [`WAIT`].
    pub async fn next(&mut self) -> anyhow::Result<Value> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .context("no frame within the wait")?
                .context("the socket closed")??;
            match msg {
                Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => bail!("unexpected frame {other:?}"),
            }
        }
    }

    /// The first frame matching `pred`, skipping others.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next().await {
                Ok(v) if pred(&v) => return v,
                Ok(_) => continue,
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    }

    /// Checks that no frame matching `pred` arrives within `window` (a negative check: it can
    /// only pass wrongly, never fail wrongly, on a slow machine).
    pub async fn expect_none(
        &mut self,
        window: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Message::Text(text) = msg {
                let v: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                assert!(!pred(&v), "unexpected {what}: {v}");
            }
        }
    }

    /// Reads (and so answers the server's pings) for all of `window`, and checks that the
    /// server keeps the socket open throughout. Like [`Rtm::expect_none`], a deliberate window.
    pub async fn stays_open(&mut self, window: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Close(frame)))) => panic!("{what}: closed with {frame:?}"),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("{what}: the socket failed: {e}"),
                Ok(None) => panic!("{what}: the socket ended"),
            }
        }
    }

    /// Waits for the server to close the socket; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return None,
                Err(_) => panic!("the server did not close the socket"),
            }
        }
    }
}

/// The operator credential of this test process's meshes (issued by the process's throwaway
/// CA, which every in-process mesh of the process shares).
pub fn operator() -> &'static mesh_transport::Transport {
    static OPERATOR: OnceLock<mesh_transport::Transport> = OnceLock::new();
    OPERATOR.get_or_init(|| channelmesh::mesh::Security::Mtls.operator().unwrap())
}

/// A directory laid out as `dev`'s state directory (`ca.pem`, `operator.pem`,
/// `operator.key`) with [`operator`]'s credential: `ctl --state-dir DIR` finds it there.
pub fn operator_state_dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("channelmesh-ops-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mesh_transport::Transport::Mtls(c) = operator() else {
            unreachable!("the test meshes speak mutual TLS")
        };
        std::fs::write(dir.join("ca.pem"), &c.ca).unwrap();
        channelmesh::certs::save_credentials(&dir, "operator", c).unwrap();
        dir
    })
}

/// The `--tls-*` flags of a child process acting as `role`/`id` beside this test process's
/// meshes: a certificate from their CA (valid for 127.0.0.1), written to a directory of this
/// test process.
pub fn child_tls(role: mesh_transport::Role, id: &str) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("channelmesh-child-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (identity, credentials) = issue(role, id);
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &credentials.ca).unwrap();
    let (cert, key) =
        channelmesh::certs::save_credentials(&dir, &identity.san(), &credentials).unwrap();
    vec![
        format!("--tls-ca={}", ca.display()),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ]
}

/// Calling as `role`/`id` (a certificate from the CA of this test process's meshes), e.g. as
/// a compromised gateway.
pub fn acting_as(role: mesh_transport::Role, id: &str) -> mesh_transport::Transport {
    mesh_transport::Transport::Mtls(issue(role, id).1)
}

/// A certificate naming `role`/`id` and 127.0.0.1, from the CA of this test process's meshes.
fn issue(
    role: mesh_transport::Role,
    id: &str,
) -> (mesh_transport::Identity, mesh_transport::Credentials) {
    let authority = channelmesh::certs::Authority::for_this_process().unwrap();
    let identity = mesh_transport::Identity::new(role, id).unwrap();
    let credentials = authority
        .issue(
            std::slice::from_ref(&identity),
            &["127.0.0.1".into()],
            channelmesh::certs::days(1),
        )
        .unwrap();
    (identity, credentials)
}

/// Gives this test process's certificate `identities` too (a service a test starts beside
/// the mesh, e.g. a gateway of its own, acts as itself).
pub fn trust(identities: &[mesh_transport::Identity]) {
    channelmesh::certs::Authority::for_this_process()
        .unwrap()
        .configure_process(identities, &["127.0.0.1".into()])
        .unwrap();
}

/// The ring and its members, as `ctl ring` sees them.
pub async fn ring_at(ring_manager: SocketAddr) -> (Ring, Vec<Member>) {
    ring_with(ring_manager, operator()).await
}

/// [`ring_at`], calling as `who`.
pub async fn ring_with(
    ring_manager: SocketAddr,
    who: &mesh_transport::Transport,
) -> (Ring, Vec<Member>) {
    let mut client = rm_with(ring_manager, who).await;
    let proto = client
        .get_ring(GetRingRequest {})
        .await
        .unwrap()
        .into_inner();
    let members = proto.members.clone();
    (
        ring_client::convert::ring_from_proto(proto).unwrap(),
        members,
    )
}

/// A ring manager client, as the operator of this process's meshes.
pub async fn rm_at(ring_manager: SocketAddr) -> RingManagerClient<Channel> {
    rm_with(ring_manager, operator()).await
}

/// A ring manager client calling as `who`.
pub async fn rm_with(
    ring_manager: SocketAddr,
    who: &mesh_transport::Transport,
) -> RingManagerClient<Channel> {
    let channel = mesh_transport::endpoint_with(&ring_manager.to_string(), who)
        .unwrap()
        .connect()
        .await
        .unwrap();
    RingManagerClient::new(channel)
}

/// A member's state, or "absent".
pub fn state_of<'a>(members: &'a [Member], id: &str) -> &'a str {
    members
        .iter()
        .find(|m| m.id == id)
        .map_or("absent", |m| m.state.as_str())
}

/// For each slot: (owner before, owner after), for the slots whose owner changed.
pub fn moves(before: &Ring, after: &Ring) -> Vec<(Slot, String, String)> {
    (0..SLOT_COUNT as Slot)
        .filter_map(|s| {
            let (a, b) = (
                before.owner(s)?.id.to_string(),
                after.owner(s)?.id.to_string(),
            );
            (a != b).then_some((s, a, b))
        })
        .collect()
}

/// An acknowledged post: its text, its ts, and when the ack came back.
pub type Acked = (String, String, Instant);

/// A load of posts to one channel, one every few milliseconds, as `UPOSTER` with the texts
/// `p0`, `p1`, ... until its stop token fires. Its progress can be waited on, so that a test
/// acts once posts are flowing rather than after a guessed pause.
pub struct Poster {
    /// Every acknowledged post so far, in order.
    acked: Arc<Mutex<Vec<Acked>>>,
    /// The index of the next post to be sent.
    next: Arc<AtomicUsize>,
    /// Ends with the stop token; answers how many posts failed.
    task: tokio::task::JoinHandle<usize>,
}

/// Starts posting to `channel` until `stop`.
pub fn poster(admin: &Admin, channel: &str, stop: CancellationToken) -> Poster {
    let (mut admin, channel) = (admin.clone(), channel.to_string());
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn({
        let (acked, next) = (acked.clone(), next.clone());
        async move {
            let mut failed = 0;
            while !stop.is_cancelled() {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let text = format!("p{i}");
                let request = mesh_proto::admin::PostMessageRequest {
                    channel: channel.clone(),
                    user: "UPOSTER".into(),
                    text: text.clone(),
                    team: String::new(),
                    idempotency_key: String::new(),
                };
                match admin.post_message(request).await {
                    Ok(reply) => {
                        let ack = (text, reply.into_inner().ts, Instant::now());
                        acked.lock().unwrap().push(ack);
                    }
                    Err(status) => {
                        eprintln!("post {text} failed: {status}");
                        failed += 1;
                    }
                }
                // Pacing: a steady load, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failed
        }
    });
    Poster { acked, next, task }
}

impl Poster {
    /// The index of the next post to be sent: every post from here on has an index at least
    /// this (see [`post_index`]).
    pub fn next_index(&self) -> usize {
        self.next.load(Ordering::SeqCst)
    }

    /// Waits until `n` posts were acknowledged after `since`.
    pub async fn acked_since(&self, since: Instant, n: usize) {
        eventually(&format!("{n} posts acknowledged"), || async {
            let acked = self.acked.lock().unwrap();
            let count = acked.iter().filter(|(_, _, at)| *at > since).count();
            (count >= n).then_some(())
        })
        .await;
    }

    /// Waits for the poster to stop (its token must have fired); returns the acknowledged posts
    /// and how many posts failed.
    pub async fn finish(self) -> (Vec<Acked>, usize) {
        let failed = self.task.await.unwrap();
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, failed)
    }
}

/// The index of a [`Poster`]'s post in a `message` frame, if it is one.
pub fn post_index(v: &Value) -> Option<usize> {
    if v["type"] != "message" || v["user"] != "UPOSTER" {
        return None;
    }
    v["text"].as_str()?.strip_prefix('p')?.parse().ok()
}

/// Reads messages until every ts in `want` arrived; checks ts order and no duplicates.
pub async fn receive_all(client: &mut Rtm, want: &[Acked]) {
    let want_ts: HashSet<&str> = want.iter().map(|(_, ts, _)| ts.as_str()).collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut last = String::new();
    while !want_ts.iter().all(|ts| seen.contains(*ts)) {
        let frame = client
            .expect("the next message", |v| {
                v["type"] == "message" && v["user"] == "UPOSTER"
            })
            .await;
        let ts = frame["ts"].as_str().unwrap().to_string();
        assert!(ts > last, "out of order: {ts} after {last}");
        assert!(seen.insert(ts.clone()), "duplicate {ts}");
        last = ts;
    }
}

/// Adds the admin bearer token to every call.
#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0).parse().expect("ascii token");
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

/// An admin API client with the mesh's admin token.
pub async fn admin(mesh: &Mesh) -> Admin {
    admin_at(mesh.admin, &mesh.admin_token).await
}

/// An admin API client for the admin server at `addr` (the public API: plaintext, as `dev`
/// serves it).
pub async fn admin_at(addr: SocketAddr, token: &str) -> Admin {
    let channel = mesh_transport::public_endpoint(&addr.to_string(), None)
        .expect("valid uri")
        .connect()
        .await
        .expect("the admin server accepts");
    AdminClient::with_interceptor(channel, Bearer(token.to_string()))
}

/// Posts a message through the admin API; returns its ts.
pub async fn post(admin: &mut Admin, channel: &str, user: &str, text: &str) -> String {
    admin
        .post_message(mesh_proto::admin::PostMessageRequest {
            channel: channel.into(),
            user: user.into(),
            text: text.into(),
            team: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .expect("PostMessage succeeds")
        .into_inner()
        .ts
}

/// Posts `text` as UPOSTER; `None` while the channel's owner does not take it (a move or a
/// failover in progress), for [`eventually`].
pub async fn try_post(admin: &Admin, channel: &str, text: &str) -> Option<String> {
    let request = mesh_proto::admin::PostMessageRequest {
        channel: channel.into(),
        user: "UPOSTER".into(),
        text: text.into(),
        team: String::new(),
        idempotency_key: String::new(),
    };
    let reply = admin.clone().post_message(request).await.ok()?;
    Some(reply.into_inner().ts)
}

/// A `presence_change` about `user` saying `presence`, in either the single or the batch form.
pub fn presence_of(v: &Value, user: &str, presence: &str) -> bool {
    v["type"] == "presence_change"
        && v["presence"] == presence
        && (v["user"] == user
            || v["users"]
                .as_array()
                .is_some_and(|users| users.iter().any(|u| u == user)))
}

/// The web app's webhook endpoint, as a test runs it: `tests/clients/python/webhook_receiver.py`
/// (aiohttp) on a port of its own, checking every request's signature against its secret;
/// killed when dropped.
pub struct WebhookReceiver {
    /// `http://127.0.0.1:PORT`: its control endpoints are under it.
    base: String,
    _child: tokio::process::Child,
}

/// What a [`WebhookReceiver`] saw.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Received {
    /// Every event accepted, in arrival order, each with `arrival_ms`, `body_time_ms` (the
    /// body's `time_ms`) and `request` (the delivery's number) added.
    pub events: Vec<Value>,
    /// Deliveries, whatever their outcome.
    pub requests: u64,
    /// Deliveries refused 401 for a signature that did not match.
    pub bad_signatures: u64,
    /// Deliveries refused 400 (not the documented body).
    pub bad_bodies: u64,
    /// Deliveries answered with the failure of [`WebhookReceiver::fail`].
    pub failed: u64,
}

impl WebhookReceiver {
    /// Starts a receiver that checks signatures with `secret`.
    pub async fn start(secret: &str) -> WebhookReceiver {
        use tokio::io::AsyncBufReadExt;
        let script = crate::real_clients::repo().join("tests/clients/python/webhook_receiver.py");
        let mut child = crate::real_clients::client_command(
            &crate::real_clients::python(),
            &script,
            &json!({}),
        )
        .env("CHANNELMESH_WEBHOOK_SECRET", secret)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the webhook receiver runs");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let port = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the webhook receiver says its port")
            .expect("its stdout reads")
            .expect("a first line");
        let port: u16 = port.trim().parse().expect("a port");
        // Keep reading its stdout so that it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        WebhookReceiver {
            base: format!("http://127.0.0.1:{port}"),
            _child: child,
        }
    }

    /// The URL to give as `--webhook-url`.
    pub fn url(&self) -> String {
        format!("{}/webhook", self.base)
    }

    /// Everything it saw so far.
    pub async fn received(&self) -> Received {
        reqwest::get(format!("{}/events", self.base))
            .await
            .expect("the receiver answers")
            .json()
            .await
            .expect("its /events is JSON")
    }

    /// The events accepted so far, in arrival order.
    pub async fn events(&self) -> Vec<Value> {
        self.received().await.events
    }

    /// Answers every delivery with `status` from now on.
    pub async fn fail(&self, status: u16) {
        let url = format!("{}/fail?status={status}", self.base);
        let sent = reqwest::Client::new().post(url).send().await;
        assert!(sent.expect("the receiver answers").status().is_success());
    }

    /// Checks signatures with `secret` from now on.
    pub async fn set_secret(&self, secret: &str) {
        let url = format!("{}/secret", self.base);
        let sent = reqwest::Client::new()
            .post(url)
            .body(secret.to_string())
            .send()
            .await;
        assert!(sent.expect("the receiver answers").status().is_success());
    }

    /// Accepts deliveries again.
    pub async fn recover(&self) {
        let url = format!("{}/recover", self.base);
        let sent = reqwest::Client::new().post(url).send().await;
        assert!(sent.expect("the receiver answers").status().is_success());
    }
}

/// `MeshConfig::ephemeral()` sending webhooks to `urls`, signed with `secret`.
pub fn with_webhooks(config: MeshConfig, urls: &[String], secret: &str) -> MeshConfig {
    MeshConfig {
        webhooks: mesh_hooks::WebhookArgs {
            webhook_url: urls.to_vec(),
            secret: Some(mesh_hooks::Secret::new(secret)),
            ..mesh_hooks::WebhookArgs::default()
        },
        ..config
    }
}
