//! The gateway server (GS): terminates clients' WebSockets for one region, speaking Slack's RTM
//! protocol, and subscribes upstream to each channel once for all its local clients.

pub mod config;
pub mod connection;
pub mod http;
pub mod hub;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod region;
pub mod resume;
pub mod run;
pub mod socket;
pub mod tickets;
pub mod tokens;
mod upstream;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use channel_client::ChannelRouter;
use mesh_core::token::Verifier;
use ring_client::{RingSource, RingWatcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config};
pub use hub::Hub;

/// Errors of the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("token keys: {0}")]
    Tokens(#[from] tokens::TokenConfigError),
    /// The listener could not be bound.
    #[error(transparent)]
    Bind(#[from] mesh_telemetry::Error),
    /// The flags and the environment make no configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The `--consul*` flags name no usable Consul agent.
    #[error(transparent)]
    RingArgs(#[from] ring_client::Error),
}

/// What every connection and route of a gateway shares.
#[derive(Debug)]
pub struct Shared {
    pub hub: Hub,
    /// Presence, when the mesh has presence servers.
    pub presence: Option<presence::PresenceHub>,
    /// Where the ring manager is found (for region reports).
    pub ring_source: RingSource,
    /// The region's drain state, open connections, and goodbye'd connections' cursors.
    pub region_state: region::RegionState,
    pub router: ChannelRouter,
    pub tickets: tickets::Tickets,
    /// Checks client tokens.
    pub key: Verifier,
    pub region: String,
    /// "http://host:port", no trailing slash.
    pub http_url: String,
    /// "ws://host:port", no trailing slash.
    pub ws_url: String,
    pub next_conn: AtomicU64,
    /// Open client connections.
    pub connections: AtomicU64,
    pub limits: limits::Limits,
    /// `rtm.connect` calls the gateway takes per second.
    pub handshakes: std::sync::Mutex<limits::TokenBucket>,
    pub typing: limits::TypingCoalescer,
    /// The listener's open sockets.
    pub sockets: listener::Sockets,
    /// The gateway's metrics (also reachable through the hub).
    pub metrics: Arc<metrics::GatewayMetrics>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

/// Serves a gateway on `listener` until `cancel`; clients get `goodbye` on the way out.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let local = listener.local_addr()?;
    // Bad key files stop the gateway before it starts anything.
    let key = tokens::load(&config.jwt_secret, &config.tokens)?;
    let http_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"))
        .trim_end_matches('/')
        .to_string();
    let ws_url = if let Some(rest) = http_url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        format!("ws://{}", http_url.trim_start_matches("http://"))
    };
    // Never more sockets than the process can open.
    let limits = match limits::open_files_limit() {
        Some(fds) => config.limits.clone().fit_to_fd_limit(fds, FD_RESERVE),
        None => config.limits.clone(),
    };
    let tracker = TaskTracker::new();
    let telemetry = mesh_telemetry::Telemetry::new(&[
        ("gateway", config.id.as_str()),
        ("region", config.region.as_str()),
    ]);
    let metrics = metrics::GatewayMetrics::new(&telemetry);
    let ring = RingWatcher::spawn(config.ring.clone(), &tracker, cancel.clone());
    let router = ChannelRouter::new(ring.clone(), &tracker, cancel.clone());
    let presence = config.presence_ring.clone().map(|source| {
        let ring = RingWatcher::spawn(source, &tracker, cancel.clone());
        presence::PresenceHub::new(config.id.clone(), ring, tracker.clone(), cancel.clone())
    });
    let shared = Arc::new(Shared {
        presence,
        ring_source: config.ring.clone(),
        region_state: region::RegionState::default(),
        hub: Hub::new(
            config.id.clone(),
            ring.clone(),
            router.clone(),
            metrics.clone(),
            tracker.clone(),
            cancel.clone(),
        ),
        router,
        tickets: tickets::Tickets::new(config.connect_url_ttl),
        key,
        region: config.region.clone(),
        http_url,
        ws_url,
        next_conn: AtomicU64::new(1),
        connections: AtomicU64::new(0),
        handshakes: std::sync::Mutex::new(limits::TokenBucket::new(
            limits.handshakes_per_sec,
            limits.handshakes_per_sec,
            std::time::Instant::now(),
        )),
        typing: limits::TypingCoalescer::new(limits.typing_interval, TYPING_PAIRS),
        sockets: listener::Sockets::new(limits.max_sockets),
        metrics,
        limits,
        cancel: cancel.clone(),
        tracker: tracker.clone(),
    });
    tracing::info!(gateway = %config.id, region = %config.region, %local, "gateway listening");
    tracker.spawn(region::run(shared.clone(), config.id.clone()));
    tracker.spawn(sweep_tickets(shared.clone()));
    let capped = shared.limits.team_connections > 0
        || !shared.limits.team_overrides.is_empty()
        || shared.limits.user_connections > 0;
    if capped && shared.presence.is_none() {
        tracing::warn!(
            "team and user connection caps need presence servers to count them; not enforced"
        );
    }
    observe(&shared, &telemetry, ring);
    // `/metrics` and `/readyz` beside the gateway's own `/healthz`.
    let app = http::routes(shared.clone()).merge(mesh_telemetry::http::probes(telemetry.clone()));
    listener::serve(
        listener,
        app,
        &shared.sockets,
        shared.limits.handshake_timeout,
        shared.metrics.header_timeouts.clone(),
        &tracker,
        cancel.clone(),
    )
    .await;
    telemetry.set_stopping();
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Readiness (the ring is known and the region is not draining) and the gauges read at scrape
/// time.
fn observe(shared: &Arc<Shared>, telemetry: &mesh_telemetry::Telemetry, ring: RingWatcher) {
    let weak = Arc::downgrade(shared);
    let routed = ring.clone();
    telemetry.set_ready(move || {
        let Some(shared) = weak.upgrade() else {
            return Err("stopping".to_string());
        };
        if shared.region_state.draining() {
            Err("draining".to_string())
        } else if routed.current().nodes().is_empty() {
            Err("no channel server on the ring yet".to_string())
        } else {
            Ok(())
        }
    });
    let weak = Arc::downgrade(shared);
    telemetry.on_scrape(move || {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let m = &shared.metrics;
        let connections = shared
            .connections
            .load(std::sync::atomic::Ordering::Relaxed);
        m.connections.set(connections as i64);
        m.channels.set(shared.hub.channel_count() as i64);
        m.upstreams.set(shared.hub.upstream_count() as i64);
        m.ring_epoch.set(ring.current().epoch() as i64);
        m.draining.set(i64::from(shared.region_state.draining()));
        if let Some(presence) = &shared.presence {
            let (watched, online, sessions) = presence.counts();
            m.presence_watched.set(watched as i64);
            m.presence_online.set(online as i64);
            m.presence_sessions.set(sessions as i64);
        }
    });
}

/// Drops expired connect URLs every second, freeing their places under team caps.
async fn sweep_tickets(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tick.tick() => shared.tickets.purge_expired(),
        }
    }
}

/// File descriptors kept free of client sockets: upstream gRPC connections, the listener,
/// logs, the state of the runtime.
const FD_RESERVE: u64 = 256;
/// (user, channel) pairs the typing coalescer remembers.
const TYPING_PAIRS: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(65_536) {
    Some(n) => n,
    None => std::num::NonZeroUsize::MIN,
};
