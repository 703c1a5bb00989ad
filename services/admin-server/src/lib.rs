//! The admin server (AS): the web application's gRPC API. Stateless: it validates each call,
//! routes it by the ring to the owning channel server, and answers.

mod auth;
pub mod config;
mod error;
mod grpc;
mod listing;
pub mod mint;
mod requests;
pub mod run;

use std::time::Duration;

use channel_client::ChannelRouter;
use mesh_proto::admin::admin_server::AdminServer;
use ring_client::RingWatcher;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;

pub use auth::AdminAuth;
pub use config::{Args, Config};
pub use grpc::AdminService;
pub use mint::{Minted, Minter};

/// Errors of the admin server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] mesh_telemetry::Error),
    /// A secret the admin server needs is not in the environment.
    #[error("{0} must be set (only `channelmesh dev` generates it)")]
    MissingEnv(&'static str),
    /// The HS256 secret is too short to sign with.
    #[error("{var}: {0}", var = config::ENV_JWT_SECRET)]
    JwtSecret(mesh_core::TokenError),
    /// The `--ring-manager`/`--consul*` flags name no usable ring.
    #[error(transparent)]
    RingArgs(#[from] ring_client::Error),
    /// The admin API's certificate could not be read.
    #[error("the admin API's certificate: {0}")]
    PublicTls(#[from] mesh_transport::Error),
}

/// HTTP/2 flow control on the admin API: what a caller may send on one stream, and on one
/// connection, before the server has read it. The stream window lets a PublishStream run ahead
/// of a busy server (at 64 KiB, about 250 requests of 200 bytes, the window, not the CPU, held
/// a stream to ~25,000 a second on one core). The HTTP/2 library closes a connection whose
/// unread small DATA frames (a grpcio client sends each message of a stream in one) cost more
/// than half the connection window in framing: a connection window 16 times the stream's keeps
/// a stream of requests of 40 bytes and more well inside that.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Serves the admin API on `listener`, with gRPC server reflection of the admin API alone,
/// until `cancel`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), Error> {
    // A short secret stops the admin server before it starts anything.
    let minter =
        Minter::new(&config.jwt_secret, config.jwt_claims.clone()).map_err(Error::JwtSecret)?;
    let tracker = TaskTracker::new();
    let ring = RingWatcher::spawn(config.ring.clone(), &tracker, cancel.clone());
    let presence = config
        .presence_ring
        .clone()
        .map(|source| RingWatcher::spawn(source, &tracker, cancel.clone()));
    let service = AdminService::new(
        ChannelRouter::new(ring.clone(), &tracker, cancel.clone()),
        minter,
        presence,
    )
    .with_ring_manager(config.ring.clone())
    .with_telemetry(&config.telemetry)
    .with_tasks(&tracker, cancel.clone());
    {
        let routed = ring.clone();
        config.telemetry.set_ready(move || {
            if routed.current().nodes().is_empty() {
                Err("no channel server on the ring yet".to_string())
            } else {
                Ok(())
            }
        });
        let epoch = config.telemetry.gauge(
            "channelmesh_admin_ring_epoch",
            "The newest ring epoch this admin server routes by.",
        );
        config
            .telemetry
            .on_scrape(move || epoch.set(ring.current().epoch() as i64));
    }
    let auth = AdminAuth::new(&config.admin_token);
    // The public API only: the internal services' schemas are nobody else's business. Both
    // versions of the reflection protocol, each listing both (as every service the port
    // serves): v1, and v1alpha, the only one Python's grpcio-reflection client and many GUI
    // tools speak.
    let described = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mesh_proto::ADMIN_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection = described().build_v1()?;
    let reflection_v1alpha = described().build_v1alpha()?;
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        tls = config.public_tls.is_some(),
        "admin server listening"
    );
    // Public: its own certificate (or plaintext), the bearer token, no client certificate.
    let result = mesh_transport::public_server(config.public_tls.as_ref())?
        .timeout(Duration::from_secs(30))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(AdminServer::with_interceptor(service, auth))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.clone().cancelled_owned(),
        )
        .await;
    config.telemetry.set_stopping();
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(result?)
}
