//! The gateway server (GS): terminates clients' WebSockets for one region, speaking Slack's RTM
//! protocol, and subscribes upstream to each channel once for all its local clients.

pub mod connection;
pub mod http;
pub mod hub;
pub mod presence;
pub mod region;
pub mod resume;
pub mod tickets;
mod upstream;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::serve::ListenerExt;
use channel_server::ChannelRouter;
use mesh_core::TokenKey;
use ring_manager::{RingSource, RingWatcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use hub::Hub;

/// Errors of the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Configuration of one gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// This gateway's id, unique in the mesh, e.g. "us-east-1".
    pub id: String,
    /// Its region, e.g. "us-east".
    pub region: String,
    /// Where the ring is found.
    pub ring: RingSource,
    /// Where the presence ring is found; without one, presence frames get an error reply.
    pub presence_ring: Option<RingSource>,
    /// The base URL clients reach this gateway at (e.g. "http://127.0.0.1:8080", or the
    /// region's Envoy); defaults to the bound address. WebSocket URLs use the same host.
    pub public_url: Option<String>,
    /// The HS256 secret client tokens are signed with.
    pub jwt_secret: Vec<u8>,
    /// How long a connect URL from `rtm.connect` stays valid.
    pub connect_url_ttl: std::time::Duration,
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
    pub key: TokenKey,
    pub region: String,
    /// "http://host:port", no trailing slash.
    pub http_url: String,
    /// "ws://host:port", no trailing slash.
    pub ws_url: String,
    pub next_conn: AtomicU64,
    /// Open client connections.
    pub connections: AtomicU64,
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
    let tracker = TaskTracker::new();
    let ring = RingWatcher::spawn(config.ring.clone(), &tracker, cancel.clone());
    let router = ChannelRouter::new(ring.clone());
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
            ring,
            router.clone(),
            tracker.clone(),
            cancel.clone(),
        ),
        router,
        tickets: tickets::Tickets::new(config.connect_url_ttl),
        key: TokenKey::hs256(&config.jwt_secret),
        region: config.region.clone(),
        http_url,
        ws_url,
        next_conn: AtomicU64::new(1),
        connections: AtomicU64::new(0),
        cancel: cancel.clone(),
        tracker: tracker.clone(),
    });
    tracing::info!(gateway = %config.id, region = %config.region, %local, "gateway listening");
    tracker.spawn(region::run(shared.clone(), config.id.clone()));
    let app = http::routes(shared);
    // Events are small frames written as they come: Nagle's algorithm would hold them back
    // behind the client's delayed ACKs (tens of milliseconds).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.clone().cancelled_owned())
        .await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    result.map_err(Error::from)
}
