//! The presence server (PS): users are hashed onto presence servers by their own ring (managed
//! by a ring manager exactly like the channel servers' ring). Gateways report their users'
//! live connections to each user's owner over a leased stream and watch users there; the
//! owner pushes presence changes back to the gateways that watch.

pub mod config;
pub mod grpc;
pub mod hooks;
pub mod quota;
pub mod run;
pub mod sessions;
pub mod state;
pub mod ticker;

use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::presence::presence_server::PresenceServer;
use mesh_proto::ring::RegisterRequest;
use ring_client::{Lease, RingWatcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;

pub use config::{Args, Config};
pub use grpc::PresenceService;

/// Default: how long a user stays active after their last connection ends (and a gateway's
/// users after it is gone): a reconnect within it produces no away/active pair.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);
/// Default: how long a gateway's session may stay silent before its reports are dropped
/// (gateways send a heartbeat every [`HEARTBEAT_INTERVAL`]).
pub const DEFAULT_GATEWAY_LEASE: Duration = Duration::from_secs(3);
/// How often a gateway says something on an otherwise quiet session.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// After gaining users (a ring change), how long changes are held so that gateways can
/// re-report them first. A gateway hears of the ring change and sends its snapshot within
/// milliseconds when idle; 0.5 s was seen to be too short on a loaded 2-core machine (a
/// watcher heard a user go away who never left), so the margin is wide.
pub const WARM_UP: Duration = Duration::from_millis(1500);

/// Errors of the presence server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ring manager: {0}")]
    Ring(#[from] ring_client::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] mesh_telemetry::Error),
    #[error(transparent)]
    Id(#[from] mesh_core::IdError),
    /// The `--presence-ring-manager`/`--consul*` flags name no usable ring.
    #[error(transparent)]
    RingArgs(ring_client::Error),
    /// The webhook flags cannot be used (`--webhook-url` without the secret, a bad URL).
    #[error(transparent)]
    Webhooks(#[from] mesh_hooks::HooksError),
}

/// Serves a presence server on `listener`, registered on the presence ring, until `cancel`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let local: SocketAddr = listener.local_addr()?;
    let hooks = config
        .webhooks
        .start("presence-server", &config.telemetry, cancel.clone())?;

    let addr = config
        .advertise
        .clone()
        .unwrap_or_else(|| local.to_string());
    let tracker = TaskTracker::new();
    let ring = RingWatcher::spawn(config.ring.clone(), &tracker, cancel.clone());
    let authorizer = mesh_transport::Authorizer::new(&config.telemetry);
    let service = PresenceService::start(
        config.node.clone(),
        ring,
        (config.grace, config.gateway_lease),
        authorizer.clone(),
        hooks.clone(),
        &tracker,
        cancel.clone(),
    );
    tracing::info!(node = %config.node, %addr, standby = config.standby, "presence server listening");
    let lease = Lease::default();
    observe(&config.telemetry, &service, &lease);
    let (_health, health_service) = tonic_health::server::health_reporter();
    let server = mesh_transport::internal_server(&authorizer)?
        .add_service(health_service)
        .add_service(PresenceServer::new(service))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    let request = RegisterRequest {
        node_id: config.node.to_string(),
        addr,
        pid: std::process::id(),
        standby: config.standby,
    };
    let joined =
        ring_client::membership::join(&config.ring, request, lease, None, &tracker, &cancel).await;
    if let Err(e) = joined {
        cancel.cancel();
        return Err(e.into());
    }
    let result = server.await;
    config.telemetry.set_stopping();
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    // Its last flush (bounded by the sender's own deadline).
    hooks.finished().await;
    match result {
        Ok(r) => r.map_err(Error::from),
        Err(join) => Err(Error::Io(std::io::Error::other(join.to_string()))),
    }
}

/// Readiness (the lease holds) and the presence gauges read at scrape time.
fn observe(telemetry: &mesh_telemetry::Telemetry, service: &PresenceService, lease: &Lease) {
    let serving = lease.clone();
    telemetry.set_ready(move || {
        if serving.is_serving() {
            Ok(())
        } else {
            Err(serving.why_not_serving().to_string())
        }
    });
    let sessions = telemetry.gauge(
        "channelmesh_presence_sessions",
        "Open gateway sessions (each gateway reports and watches over one).",
    );
    let users = telemetry.gauge(
        "channelmesh_presence_users",
        "Users this presence server tracks (online, watched, or with a manual setting).",
    );
    let service = service.clone();
    telemetry.on_scrape(move || {
        let (open, tracked) = service.counts();
        sessions.set(open as i64);
        users.set(tracked as i64);
    });
}
