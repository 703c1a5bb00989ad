//! The SRE console: a web page and JSON API on the ring manager's HTTP listener, with the
//! liveness and readiness probes.
//!
//! `GET /` is the page (plain HTML, JS and SVG, embedded in the binary, nothing fetched from
//! elsewhere); `GET /api/state` a [`Snapshot`]; `GET /api/events` server-sent events, a new
//! snapshot whenever the ring, a member or a region changes (at most [`MAX_EVENTS_PER_SEC`] a
//! second per viewer); `GET /healthz` answers while the process runs, `GET /readyz` while this
//! ring manager serves the ring (embedded, or the Consul leader). `POST /api/actions` drains
//! and undrains a node or a region and disconnects a user, behind an operator token and a typed
//! confirmation, each recorded in the action log shown beside the epochs ([`actions`]); every
//! other operation stays in `channelmesh ctl`, which is authenticated by where it runs.
//!
//! Off loopback, everything but `/healthz` and `/readyz` needs the HTTP token
//! (`mesh_telemetry::access`): a browser asks for it (HTTP Basic, the token as password),
//! `ctl top` sends it as a bearer token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

pub mod actions;

use crate::membership::NodeState;
use crate::regions::RegionView;
use crate::server::RingManager;

/// Snapshots pushed per second per viewer, at most: a burst of changes (a failover moves
/// slots and states within milliseconds) becomes one update.
pub const MAX_EVENTS_PER_SEC: u32 = 4;
/// Viewers following `/api/events` at once; more are refused with 503 (each costs a snapshot
/// per change).
pub const MAX_VIEWERS: usize = 64;
/// How often a viewer's stream looks at the regions, which change by the gateways' reports
/// (every 0.5 s) rather than by an event of the ring manager.
const REGION_POLL: Duration = Duration::from_millis(500);
/// A snapshot goes out at least this often even when nothing changed, so that the heartbeat
/// ages on the page stay current.
const REFRESH: Duration = Duration::from_secs(5);
/// An SSE comment this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

const INDEX_HTML: &str = include_str!("../console/index.html");
/// Where the page carries its first snapshot.
const STATE_PLACEHOLDER: &str = "{/*STATE*/}";
const CONSOLE_JS: &str = include_str!("../console/console.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");
/// Only this origin's scripts, styles and connections: the page loads nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'";

/// Everything the console shows, as `/api/state` returns it and `/api/events` pushes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `embedded` (the ring manager is the registry), `leader` or `follower` (on Consul).
    pub role: String,
    /// Whether this ring manager serves the ring (what `/readyz` says).
    pub ready: bool,
    pub epoch: u64,
    pub slot_count: usize,
    /// When the snapshot was taken, Unix milliseconds.
    pub at_ms: u64,
    /// Every registered node, whatever its state, sorted by id.
    pub nodes: Vec<NodeJson>,
    /// The ring as runs of consecutive slots with one owner, in slot order.
    pub arcs: Vec<ArcJson>,
    /// Every region with its gateways, sorted by name.
    pub regions: Vec<RegionView>,
    /// Recent epochs, newest first.
    pub epochs: Vec<EpochJson>,
    /// How many nodes should hold each slot (owner and followers); 1: no followers.
    #[serde(default)]
    pub replication_factor: usize,
    /// Slots with fewer followers than `replication_factor - 1` (too few other nodes).
    #[serde(default)]
    pub under_replicated: usize,
    /// The console's actions (drains, undrains, disconnects), newest first: who, what, when,
    /// and the epoch each published.
    #[serde(default)]
    pub actions: Vec<actions::ActionJson>,
}

/// A node of the ring manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeJson {
    pub id: String,
    pub addr: String,
    /// joining, active, standby, draining or down.
    pub state: String,
    pub standby: bool,
    /// Slots it owns in this epoch: its load, as far as the ring manager knows it (heartbeats
    /// carry no load figures).
    pub slots: usize,
    pub pid: u32,
    pub incarnation: u64,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_ms: u64,
    /// Slots it follows in this epoch (holds a copy of, for their owners).
    #[serde(default)]
    pub followed: usize,
    /// Followed slots still being filled from their owner, as its last heartbeat reported
    /// them (in `catching_up_epoch`'s ring: older than `epoch` is stale).
    #[serde(default)]
    pub catching_up: u32,
    #[serde(default)]
    pub catching_up_epoch: u64,
}

/// `len` consecutive slots from `start`, owned by `node` (`None`: nobody, before the first
/// node joins).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArcJson {
    pub start: usize,
    pub len: usize,
    pub node: Option<String>,
}

/// A published epoch and what it changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochJson {
    pub epoch: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    pub cause: String,
    pub moved: usize,
    pub moves: Vec<MoveJson>,
}

/// `slots` slots that went from `from` to `to` (`None`: no owner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveJson {
    pub from: Option<String>,
    pub to: Option<String>,
    pub slots: usize,
}

impl Snapshot {
    /// The snapshot without the fields that change with every look (ages, the time): two
    /// snapshots with equal fingerprints show the same mesh.
    fn fingerprint(&self) -> Snapshot {
        let mut s = self.clone();
        s.at_ms = 0;
        for n in &mut s.nodes {
            n.heartbeat_ms = 0;
        }
        for g in s.regions.iter_mut().flat_map(|r| r.gateways.iter_mut()) {
            g.last_seen_ms = 0;
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The ring manager is the registry: it always serves the ring.
    Embedded,
    /// One of a Consul group: serves the ring only while it leads.
    Consul,
}

/// The console of one ring manager; cheap to clone.
#[derive(Debug, Clone)]
pub struct Console {
    mode: Mode,
    /// The ring manager while this process serves the ring (always, when embedded).
    leader: watch::Receiver<Option<RingManager>>,
    /// Keeps `leader` open in embedded mode, where nothing else holds the sender.
    _fixed: Option<Arc<watch::Sender<Option<RingManager>>>>,
    viewers: Arc<Semaphore>,
    /// The process's own metrics (its gRPC refusals), served after the ring's.
    metrics: Option<mesh_telemetry::Telemetry>,
    /// Who may act (none: actions are refused).
    operators: actions::Operators,
    /// The actions taken through this console.
    log: actions::ActionLog,
}

impl Console {
    /// The console of an embedded ring manager.
    pub fn embedded(manager: RingManager) -> Self {
        let (tx, rx) = watch::channel(Some(manager));
        Console {
            mode: Mode::Embedded,
            leader: rx,
            _fixed: Some(Arc::new(tx)),
            viewers: Arc::new(Semaphore::new(MAX_VIEWERS)),
            metrics: None,
            operators: actions::Operators::default(),
            log: actions::ActionLog::default(),
        }
    }

    /// The console of a ring manager on Consul: `leadership` holds its ring manager while it
    /// leads, `None` while it follows.
    pub fn consul(leadership: watch::Receiver<Option<RingManager>>) -> Self {
        Console {
            mode: Mode::Consul,
            leader: leadership,
            _fixed: None,
            viewers: Arc::new(Semaphore::new(MAX_VIEWERS)),
            metrics: None,
            operators: actions::Operators::default(),
            log: actions::ActionLog::default(),
        }
    }

    /// Serves `telemetry`'s metrics on `/metrics` after the ring's.
    pub fn with_metrics(mut self, telemetry: mesh_telemetry::Telemetry) -> Self {
        self.metrics = Some(telemetry);
        self
    }

    /// Takes actions from `operators` (none: every action is refused).
    pub fn with_operators(mut self, operators: actions::Operators) -> Self {
        self.operators = operators;
        self
    }

    fn manager(&self) -> Option<RingManager> {
        self.leader.borrow().clone()
    }

    /// What the console shows right now.
    pub fn snapshot(&self) -> Snapshot {
        let at_ms = unix_ms(SystemTime::now());
        let Some(manager) = self.manager() else {
            return Snapshot {
                role: "follower".into(),
                ready: false,
                epoch: 0,
                slot_count: mesh_core::SLOT_COUNT,
                at_ms,
                nodes: Vec::new(),
                arcs: Vec::new(),
                regions: Vec::new(),
                epochs: Vec::new(),
                replication_factor: 0,
                under_replicated: 0,
                actions: self.log.entries(),
            };
        };
        let replication_factor = manager.config().replication_factor;
        let (ring, members) = manager.members_detail();
        let nodes = members
            .into_iter()
            .map(|m| NodeJson {
                slots: ring.slots_owned(&m.id),
                id: m.id.to_string(),
                addr: m.addr,
                state: m.state.as_str().to_string(),
                standby: m.state == NodeState::Standby,
                pid: m.pid,
                incarnation: m.incarnation,
                heartbeat_ms: m.since_heartbeat.as_millis() as u64,
                followed: ring.slots_followed(&m.id),
                catching_up: m.catching_up,
                catching_up_epoch: m.catching_up_epoch,
            })
            .collect();
        Snapshot {
            role: match self.mode {
                Mode::Embedded => "embedded",
                Mode::Consul => "leader",
            }
            .into(),
            ready: true,
            epoch: ring.epoch(),
            slot_count: mesh_core::SLOT_COUNT,
            at_ms,
            nodes,
            arcs: arcs(&ring),
            regions: manager.regions().regions,
            epochs: manager
                .history()
                .into_iter()
                .map(|e| EpochJson {
                    epoch: e.epoch,
                    at_ms: unix_ms(e.at),
                    cause: e.cause,
                    moved: e.moved,
                    moves: e
                        .moves
                        .into_iter()
                        .map(|(from, to, slots)| MoveJson {
                            from: from.map(|n| n.to_string()),
                            to: to.map(|n| n.to_string()),
                            slots,
                        })
                        .collect(),
                })
                .collect(),
            under_replicated: under_replicated(&ring, replication_factor),
            replication_factor,
            actions: self.log.entries(),
        }
    }
}

/// How many of `ring`'s slots have fewer than `factor - 1` followers (none on a ring without
/// nodes: nothing is held at all).
fn under_replicated(ring: &mesh_core::Ring, factor: usize) -> usize {
    if ring.nodes().is_empty() {
        return 0;
    }
    let want = factor.saturating_sub(1);
    (0..mesh_core::SLOT_COUNT as mesh_core::Slot)
        .filter(|&s| ring.followers(s).count() < want)
        .count()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The ring as runs of consecutive slots with the same owner.
fn arcs(ring: &mesh_core::Ring) -> Vec<ArcJson> {
    let nodes = ring.nodes();
    let owners: Vec<Option<u32>> = if nodes.is_empty() {
        vec![None; mesh_core::SLOT_COUNT]
    } else {
        ring.owners().map(Some).collect()
    };
    let mut arcs: Vec<ArcJson> = Vec::new();
    let mut run_owner: Option<Option<u32>> = None;
    for (slot, owner) in owners.into_iter().enumerate() {
        match arcs.last_mut() {
            Some(last) if run_owner == Some(owner) => last.len += 1,
            _ => {
                run_owner = Some(owner);
                arcs.push(ArcJson {
                    start: slot,
                    len: 1,
                    node: owner
                        .and_then(|i| nodes.get(i as usize))
                        .map(|n| n.id.to_string()),
                });
            }
        }
    }
    arcs
}

/// Serves `console` on `listener` until `cancel` fires.
pub async fn serve(
    console: Console,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), crate::Error> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "ring manager console listening");
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a console connection");
        }
    });
    let app = mesh_telemetry::access::guard(
        router(console, cancel.clone()),
        addr,
        mesh_telemetry::access::all_but_probes,
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await?;
    Ok(())
}

/// The console's routes; event streams end when `cancel` fires.
pub fn router(console: Console, cancel: CancellationToken) -> Router {
    let state = (console, cancel);
    Router::new()
        .route("/", get(page))
        .route("/console", get(page))
        .route(
            "/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route("/api/state", get(state_json))
        .route("/api/events", get(events))
        .route(
            "/api/actions",
            axum::routing::post(act).layer(axum::extract::DefaultBodyLimit::max(
                actions::MAX_REQUEST_BYTES,
            )),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

type AppState = (Console, CancellationToken);

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The page, with the current snapshot inlined: it renders complete without a round trip, and
/// tools that capture it (a headless browser's DOM dump or screenshot) need not wait for one.
async fn page(axum::extract::State((console, _)): axum::extract::State<AppState>) -> Response {
    let json = serde_json::to_string(&console.snapshot()).unwrap_or_else(|_| "null".into());
    // Inside <script>, only "</script" could end the element: no '<' survives as such (JSON
    // allows '<' only in strings, where \u003c means the same).
    let json = json.replace('<', "\\u003c");
    let html = INDEX_HTML.replace(STATE_PLACEHOLDER, &json);
    let mut response = html.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    response
}

async fn state_json(
    axum::extract::State((console, _)): axum::extract::State<AppState>,
) -> Response {
    let mut response = axum::Json(console.snapshot()).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `POST /api/actions` (see [`actions`]).
async fn act(
    axum::extract::State((console, _)): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let manager = console.manager();
    actions::act(&console.operators, &console.log, manager, &headers, &body).await
}

async fn readyz(axum::extract::State((console, _)): axum::extract::State<AppState>) -> Response {
    match console.manager() {
        Some(manager) => (
            StatusCode::OK,
            format!("ready: serving ring epoch {}\n", manager.ring().epoch()),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: another ring manager leads\n",
        )
            .into_response(),
    }
}

/// Prometheus metrics of the ring this ring manager serves, read from a fresh snapshot (so
/// that two ring managers in one process, as in `dev`, each show their own ring).
async fn metrics(axum::extract::State((console, _)): axum::extract::State<AppState>) -> Response {
    let snapshot = console.snapshot();
    let t = mesh_telemetry::Telemetry::default();
    t.gauge(
        "channelmesh_ring_ready",
        "1 while this ring manager serves the ring (embedded, or the Consul leader), else 0.",
    )
    .set(i64::from(snapshot.ready));
    t.gauge("channelmesh_ring_epoch", "The ring's epoch.")
        .set(snapshot.epoch as i64);
    let slots = t.gauge_vec(
        "channelmesh_ring_slots",
        "Slots each node owns in the current epoch.",
        &["node"],
    );
    let members = t.gauge_vec(
        "channelmesh_ring_members",
        "Registered nodes by state (joining, active, standby, draining, down).",
        &["state"],
    );
    for state in ["joining", "active", "standby", "draining", "down"] {
        members.with_label_values(&[state]).set(0);
    }
    let followed = t.gauge_vec(
        "channelmesh_ring_slots_followed",
        "Slots each node follows (holds a copy of) in the current epoch.",
        &["node"],
    );
    let catching_up = t.gauge_vec(
        "channelmesh_ring_slots_catching_up",
        "Followed slots each node last reported as still being filled from their owner.",
        &["node"],
    );
    for node in &snapshot.nodes {
        slots.with_label_values(&[&node.id]).set(node.slots as i64);
        members.with_label_values(&[&node.state]).inc();
        if node.state != "down" {
            followed
                .with_label_values(&[&node.id])
                .set(node.followed as i64);
            catching_up
                .with_label_values(&[&node.id])
                .set(i64::from(node.catching_up));
        }
    }
    t.gauge(
        "channelmesh_ring_replication_factor",
        "How many nodes should hold each slot (owner and followers); 1: no followers.",
    )
    .set(snapshot.replication_factor as i64);
    t.gauge(
        "channelmesh_ring_slots_under_replicated",
        "Slots with fewer followers than the replication factor asks (too few other nodes).",
    )
    .set(snapshot.under_replicated as i64);
    t.gauge(
        "channelmesh_ring_standbys",
        "Standby nodes ready to take over a failed node's slots.",
    )
    .set(snapshot.nodes.iter().filter(|n| n.standby).count() as i64);
    let connections = t.gauge_vec(
        "channelmesh_ring_region_connections",
        "Client connections per region, as its gateways last reported.",
        &["region"],
    );
    let draining = t.gauge_vec(
        "channelmesh_ring_region_draining",
        "1 while a region drains, else 0.",
        &["region"],
    );
    for region in &snapshot.regions {
        connections
            .with_label_values(&[&region.region])
            .set(region.connections as i64);
        draining
            .with_label_values(&[&region.region])
            .set(i64::from(region.draining));
    }
    // A fresh registry per scrape: each counter starts at the console's own count.
    let actions = t.counter_vec(
        "channelmesh_ring_console_actions_total",
        "Console action requests since start, by outcome (done; refused: by the ring manager or malformed; bad_token; off: no --operator-token).",
        &["outcome"],
    );
    for (outcome, n) in console.log.counts() {
        actions.with_label_values(&[outcome]).inc_by(n);
    }
    let mut text = t.encode();
    if let Some(own) = &console.metrics {
        text.push_str(&own.encode());
    }
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn events(
    axum::extract::State((console, cancel)): axum::extract::State<AppState>,
) -> Response {
    let Ok(permit) = console.viewers.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many console viewers (at most {MAX_VIEWERS})\n"),
        )
            .into_response();
    };
    let viewer = Viewer {
        changes: console.manager().map(|m| m.watch_changes()),
        leader: console.leader.clone(),
        console,
        cancel,
        last: None,
        last_sent: None,
        _permit: permit,
    };
    let mut response = Sse::new(updates(viewer))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// One `/api/events` stream's position.
struct Viewer {
    console: Console,
    cancel: CancellationToken,
    /// The serving ring manager's change counter (re-subscribed when leadership changes).
    changes: Option<watch::Receiver<u64>>,
    leader: watch::Receiver<Option<RingManager>>,
    /// What the viewer was last sent.
    last: Option<Snapshot>,
    last_sent: Option<Instant>,
    /// Counts the viewer against [`MAX_VIEWERS`] until its stream is dropped.
    _permit: OwnedSemaphorePermit,
}

/// The stream of snapshots for one viewer: the current one at once, then one per change, no
/// more than [`MAX_EVENTS_PER_SEC`] a second. It holds no queue: each snapshot is taken when
/// the viewer is ready for it, so a slow viewer just sees fewer, newer ones.
fn updates(viewer: Viewer) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(viewer, |mut v| async move {
        let spacing = Duration::from_secs(1) / MAX_EVENTS_PER_SEC;
        loop {
            if let Some(sent) = v.last_sent {
                tokio::select! {
                    _ = v.cancel.cancelled() => return None,
                    _ = tokio::time::sleep_until((sent + spacing).into()) => {}
                }
            }
            let snapshot = v.console.snapshot();
            let fingerprint = snapshot.fingerprint();
            let refresh_due = v.last_sent.is_none_or(|t| t.elapsed() >= REFRESH);
            if refresh_due || v.last.as_ref() != Some(&fingerprint) {
                v.last = Some(fingerprint);
                v.last_sent = Some(Instant::now());
                let event = Event::default()
                    .event("state")
                    .json_data(&snapshot)
                    .unwrap_or_else(|e| Event::default().comment(format!("snapshot: {e}")));
                return Some((Ok(event), v));
            }
            // Cancel-safe: each branch only waits; the loop re-reads everything after any.
            tokio::select! {
                _ = v.cancel.cancelled() => return None,
                _ = changed(v.changes.as_mut()) => {}
                _ = changed(Some(&mut v.leader)) => {
                    v.changes = v.console.manager().map(|m| m.watch_changes());
                }
                _ = tokio::time::sleep(REGION_POLL) => {}
            }
        }
    })
}

/// Waits for `rx` to change; never returns if there is no receiver or its sender is gone.
async fn changed<T>(rx: Option<&mut watch::Receiver<T>>) {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{NodeId, Ring, RingNode};

    fn node(id: &str) -> RingNode {
        RingNode {
            id: NodeId::new(id).unwrap(),
            addr: format!("{id}:1"),
        }
    }

    #[test]
    fn arcs_cover_every_slot_once_in_runs_of_one_owner() {
        assert_eq!(
            arcs(&Ring::empty()),
            vec![ArcJson {
                start: 0,
                len: mesh_core::SLOT_COUNT,
                node: None
            }]
        );
        let ring =
            Ring::empty()
                .rebalanced(&[node("a")])
                .rebalanced(&[node("a"), node("b"), node("c")]);
        let runs = arcs(&ring);
        let mut next = 0;
        for (i, arc) in runs.iter().enumerate() {
            assert_eq!(arc.start, next, "runs are contiguous");
            assert!(arc.len > 0);
            if i > 0 {
                assert_ne!(runs[i - 1].node, arc.node, "neighbouring runs differ");
            }
            let id = NodeId::new(arc.node.as_deref().unwrap()).unwrap();
            assert!((arc.start..arc.start + arc.len).all(|s| ring.owns(&id, s as u16)));
            next += arc.len;
        }
        assert_eq!(next, mesh_core::SLOT_COUNT);
    }

    #[test]
    fn slots_short_of_followers_are_counted() {
        assert_eq!(under_replicated(&Ring::empty(), 2), 0, "nothing is held");
        let one = Ring::empty().rebalanced(&[node("a")]);
        let one = one.clone().with_followers(&one, 2);
        assert_eq!(under_replicated(&one, 2), mesh_core::SLOT_COUNT);
        assert_eq!(under_replicated(&one, 1), 0);
        let two = one.rebalanced(&[node("a"), node("b")]);
        assert_eq!(
            under_replicated(&two, 2),
            mesh_core::SLOT_COUNT,
            "none placed yet"
        );
        let two = two.with_followers(&one, 2);
        assert_eq!(under_replicated(&two, 2), 0);
        assert_eq!(
            under_replicated(&two, 3),
            mesh_core::SLOT_COUNT,
            "one other node only"
        );
    }

    #[test]
    fn the_fingerprint_ignores_ages_only() {
        let snapshot = Snapshot {
            role: "embedded".into(),
            ready: true,
            epoch: 3,
            slot_count: mesh_core::SLOT_COUNT,
            at_ms: 1,
            nodes: vec![NodeJson {
                id: "cs-1".into(),
                addr: "a:1".into(),
                state: "active".into(),
                standby: false,
                slots: 4096,
                pid: 1,
                incarnation: 1,
                heartbeat_ms: 40,
                followed: 0,
                catching_up: 0,
                catching_up_epoch: 0,
            }],
            arcs: Vec::new(),
            regions: Vec::new(),
            epochs: Vec::new(),
            replication_factor: 1,
            under_replicated: 0,
            actions: Vec::new(),
        };
        let mut later = snapshot.clone();
        later.at_ms = 2;
        later.nodes[0].heartbeat_ms = 90;
        assert_eq!(snapshot.fingerprint(), later.fingerprint());
        later.nodes[0].state = "down".into();
        assert_ne!(snapshot.fingerprint(), later.fingerprint());
    }
}
