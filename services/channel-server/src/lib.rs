//! The channel server (CS): holds channels in memory for the ring slots it owns, gives each event
//! its ts, keeps bounded history, and fans each event out once to every subscribed gateway.

pub mod config;
pub mod error;
pub mod grpc;
pub mod handoff;
pub mod hooks;
pub mod idempotency;
pub mod members;
pub mod metrics;
pub mod ownership;
pub mod rates;
pub mod replication;
pub mod run;
pub mod shards;
pub mod store;

use std::net::SocketAddr;

use mesh_proto::channel::channel_server_server::ChannelServerServer;
use mesh_proto::ring::RegisterRequest;
use ring_client::{Lease, RingWatcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;

pub use config::{Args, Config, DEFAULT_GATEWAY_QUEUE};
pub use error::ServeError;
pub use grpc::{ChannelService, ServiceConfig};
pub use store::Limits;

/// Errors of the channel server.
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
    /// The `--ring-manager`/`--consul*` flags name no usable ring.
    #[error(transparent)]
    RingArgs(ring_client::Error),
    /// The policy file could not be loaded at start.
    #[error(transparent)]
    Policy(#[from] mesh_policy::PolicyFileError),
    /// The webhook flags are unusable (no secret, a bad URL).
    #[error("webhooks: {0}")]
    Hooks(#[from] mesh_hooks::HooksError),
}

/// Serves a channel server on `listener`, registered with the ring manager and holding its
/// lease, until `cancel`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let local: SocketAddr = listener.local_addr()?;
    let addr = config
        .advertise
        .clone()
        .unwrap_or_else(|| local.to_string());
    if config.clock_offset_ms != 0 {
        tracing::warn!(
            offset_ms = config.clock_offset_ms,
            "TEST HOOK: this channel server stamps ts with a clock offset from the wall clock"
        );
        mesh_core::ts::set_clock_offset_micros(config.clock_offset_ms.saturating_mul(1000));
    }
    let tracker = TaskTracker::new();
    let policies = mesh_policy::start(
        config.policy_file.as_deref(),
        &config.telemetry,
        &tracker,
        cancel.clone(),
    )?;
    let ring = RingWatcher::spawn(config.ring.clone(), &tracker, cancel.clone());
    let lease = Lease::default();
    {
        let lease = lease.clone();
        config.telemetry.set_ready(move || {
            if lease.is_serving() {
                Ok(())
            } else {
                Err(lease.why_not_serving().to_string())
            }
        });
    }
    let authorizer = mesh_transport::Authorizer::new(&config.telemetry);
    let webhooks = config
        .webhooks
        .start("channel-server", &config.telemetry, cancel.clone())?;
    let service = ChannelService::new(
        ServiceConfig {
            node: config.node.clone(),
            limits: config.limits,
            gateway_queue: config.gateway_queue,
            window: config.window,
            telemetry: config.telemetry.clone(),
            authorizer: authorizer.clone(),
            catch_up_rate: config.catch_up_rate,
            policies,
            webhooks,
            members: config.members,
        },
        ring.clone(),
        lease.clone(),
        tracker.clone(),
        cancel.clone(),
    );
    tracing::info!(node = %config.node, %addr, standby = config.standby, "channel server listening");
    // The ring manager probes a silent node with a standard gRPC health check: only a process
    // that runs answers it (a frozen one still completes TCP handshakes).
    let (_health, health_service) = tonic_health::server::health_reporter();
    let server = mesh_transport::internal_server(&authorizer)?
        .add_service(health_service)
        .add_service(
            ChannelServerServer::new(service).max_decoding_message_size(grpc::MAX_HANDOFF_MESSAGE),
        )
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
    // When its lease lapses, the node asks its peers (and Consul) whether a ring manager leads.
    let witnesses = ring_client::lease::Witnesses {
        node: config.node.to_string(),
        ring: ring.clone(),
        consul: match &config.ring {
            ring_client::RingSource::Consul(consul) => Some(consul.clone()),
            ring_client::RingSource::Direct(_) => None,
        },
    };
    let joined = ring_client::membership::join(
        &config.ring,
        request,
        lease,
        Some(witnesses),
        &tracker,
        &cancel,
    )
    .await;
    if let Err(e) = joined {
        cancel.cancel();
        return Err(e.into());
    }
    let result = server.await;
    config.telemetry.set_stopping();
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    match result {
        Ok(r) => r.map_err(Error::from),
        Err(join) => Err(Error::Io(std::io::Error::other(join.to_string()))),
    }
}
