//! The gateway server (GS): terminates clients' WebSockets for one region, speaking Slack's RTM
//! protocol, and subscribes upstream to each channel once for all its local clients.
//!
//! Modules, leaf first (each uses only those before it; `layering` checks it): the vocabulary
//! ([`vocab`], [`close`], [`cursors`]), [`limits`], [`tokens`], [`metrics`]; the [`outbox`] and
//! the [`socket`]; [`history`]; the `upstream` streams and the [`hub`]; [`presence`]; the
//! region's state ([`region::state`]); [`tickets`]; the [`connection`]; the region's reports
//! ([`region::report`]); the [`listener`], the [`admission`] of HTTP calls and the HTTP edge
//! ([`http`]); and here, [`serve`], which assembles them.

pub mod admission;
pub mod boot;
pub mod close;
pub mod config;
pub mod connection;
pub mod cursors;
pub mod history;
pub mod http;
pub mod hub;
#[cfg(test)]
mod layering;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod region;
pub mod run;
pub mod socket;
pub mod tickets;
pub mod tokens;
mod upstream;
pub mod vocab;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use channel_client::ChannelRouter;
use ring_client::RingWatcher;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config};
use connection::ConnectionContext;
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
    /// The policy file could not be loaded at start.
    #[error(transparent)]
    Policy(#[from] mesh_policy::PolicyFileError),
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
    let policies = mesh_policy::start(
        config.policy_file.as_deref(),
        &telemetry,
        &tracker,
        cancel.clone(),
    )?;
    let ring = RingWatcher::spawn(config.ring.clone(), &tracker, cancel.clone());
    let router = ChannelRouter::new(ring.clone(), &tracker, cancel.clone());
    let presence = config.presence_ring.clone().map(|source| {
        let ring = RingWatcher::spawn(source, &tracker, cancel.clone());
        let withheld = metrics.presence_withheld.clone();
        presence::PresenceHub::new(
            (config.id.clone(), config.region.clone()),
            ring,
            withheld,
            tracker.clone(),
            cancel.clone(),
        )
    });
    if config.redirect_allow.is_empty() {
        tracing::info!(
            "redirects are off: while the region drains, rtm.connect is refused, not forwarded (give --redirect-allow)"
        );
    } else {
        let allowed: Vec<String> = config
            .redirect_allow
            .entries()
            .map(|e| e.to_string())
            .collect();
        tracing::info!(
            ?allowed,
            "while the region drains, rtm.connect is forwarded only to these gateways"
        );
    }
    let region_state = Arc::new(region::RegionState::new(
        config.redirect_allow.clone(),
        metrics.redirects_refused.clone(),
    ));
    let connections = Arc::new(AtomicU64::new(0));
    let sockets = listener::Sockets::new(limits.max_sockets);
    let handshakes = limits::TokenBucket::new(
        limits.handshakes_per_sec,
        limits.handshakes_per_sec,
        std::time::Instant::now(),
    );
    let ctx = Arc::new(ConnectionContext {
        hub: Hub::new(
            config.id.clone(),
            config.region.clone(),
            ring.clone(),
            router.clone(),
            metrics.clone(),
            tracker.clone(),
            cancel.clone(),
        ),
        router,
        presence,
        policies,
        region: region_state.clone(),
        typing: limits::TypingCoalescer::new(limits.typing_interval, TYPING_PAIRS),
        metrics,
        limits,
        tracker: tracker.clone(),
        cancel: cancel.clone(),
    });
    let boot = config.boot.clone().map(|boot| {
        tracing::info!(url = %boot.url, mode = ?boot.mode, "rtm.connect asks the web app for each user's channels");
        boot::Boot::new(boot, &telemetry, tracker.clone(), cancel.clone())
    });
    let edge = Arc::new(http::Edge {
        ctx: ctx.clone(),
        boot,
        key,
        tickets: Arc::new(tickets::Tickets::new(config.connect_url_ttl)),
        region: config.region.clone(),
        http_url,
        ws_url,
        connections: connections.clone(),
        next_conn: AtomicU64::new(1),
        handshakes: Mutex::new(handshakes),
        gate: admission::Gate::new(&ctx.limits, ctx.metrics.clone()),
    });
    tracing::info!(gateway = %config.id, region = %config.region, %local, "gateway listening");
    let reporter = region::Reporter {
        gateway: config.id.clone(),
        region: config.region.clone(),
        url: edge.http_url.clone(),
        ring_source: config.ring.clone(),
        state: region_state,
        connections,
        cancel: cancel.clone(),
    };
    tracker.spawn(reporter.run());
    tracker.spawn(sweep_tickets(
        edge.tickets.clone(),
        ctx.metrics.clone(),
        cancel.clone(),
    ));
    let capped = ctx.limits.team_connections > 0
        || !ctx.limits.team_overrides.is_empty()
        || ctx.limits.user_connections > 0;
    if capped && ctx.presence.is_none() {
        tracing::warn!(
            "team and user connection caps need presence servers to count them; not enforced"
        );
    }
    observe(&edge, &telemetry, ring);
    // `/metrics` and `/readyz` beside the gateway's own `/healthz`; off loopback `/metrics`
    // and `/stats` need the HTTP token (`mesh_telemetry::access`).
    let app = http::routes(edge.clone()).merge(mesh_telemetry::http::probes(telemetry.clone()));
    let app =
        mesh_telemetry::access::guard(app, local, |path| path == "/metrics" || path == "/stats");
    listener::serve(
        listener,
        app,
        &sockets,
        ctx.limits.handshake_timeout,
        ctx.metrics.header_timeouts.clone(),
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
fn observe(edge: &Arc<http::Edge>, telemetry: &mesh_telemetry::Telemetry, ring: RingWatcher) {
    let weak = Arc::downgrade(edge);
    let routed = ring.clone();
    telemetry.set_ready(move || {
        let Some(edge) = weak.upgrade() else {
            return Err("stopping".to_string());
        };
        if edge.ctx.region.draining() {
            Err("draining".to_string())
        } else if routed.current().nodes().is_empty() {
            Err("no channel server on the ring yet".to_string())
        } else {
            Ok(())
        }
    });
    let weak = Arc::downgrade(edge);
    telemetry.on_scrape(move || {
        let Some(edge) = weak.upgrade() else {
            return;
        };
        let ctx = &edge.ctx;
        let m = &ctx.metrics;
        let connections = edge.connections.load(std::sync::atomic::Ordering::Relaxed);
        m.connections.set(connections as i64);
        m.channels.set(ctx.hub.channel_count() as i64);
        m.upstreams.set(ctx.hub.upstream_count() as i64);
        m.ring_epoch.set(ring.current().epoch() as i64);
        m.draining.set(i64::from(ctx.region.draining()));
        for (table, keys) in edge.gate.keys() {
            m.rate_limit_keys
                .with_label_values(&[table])
                .set(keys as i64);
        }
        if let Some(presence) = &ctx.presence {
            let (watched, online, sessions) = presence.counts();
            m.presence_watched.set(watched as i64);
            m.presence_online.set(online as i64);
            m.presence_sessions.set(sessions as i64);
        }
    });
}

/// Every second: drops expired connect URLs, and gives back the places under team and user
/// caps of those unused for `tickets::SLOT_HOLD`.
async fn sweep_tickets(
    tickets: Arc<tickets::Tickets>,
    metrics: Arc<metrics::GatewayMetrics>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                // Dropping a place releases it (outside the tickets' lock).
                let released = tickets.sweep(std::time::Instant::now());
                if !released.is_empty() {
                    tracing::debug!(places = released.len(), "connect URLs unused: places under the caps given back");
                    metrics.ticket_places_released.inc_by(released.len() as u64);
                }
            }
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
