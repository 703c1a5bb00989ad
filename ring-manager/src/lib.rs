//! The ring manager (Slack's CHARM): channel servers register with it, it assigns ring slots to
//! them and publishes every new epoch; admin servers, gateways and channel servers follow the
//! ring through `ring_client::RingWatcher` (the client halves live in the `ring-client` crate).
//!
//! Channel servers hold leases by heartbeat (`ring_client::lease`); the ring manager replaces
//! those that lose them. The decisions are state machines without I/O: [`membership`] (leases,
//! takeover, standbys, epochs), [`operations`] (drain, replace and add a node), [`regions`],
//! [`revocations`] and [`disconnects`]. [`monitor`] watches the leases, [`server`] holds the state and publishes
//! the ring, and [`grpc`] is the only module that speaks protobuf (the service and the
//! monitor's health-check probe).
//!
//! Two backends keep the ring: the embedded one, where the ring manager itself is the registry
//! (durable through its state file), and Consul ([`cluster`]), where ring managers elect a
//! leader with a session lock and keep the ring in KV.
//!
//! Each ring manager also serves HTTP ([`console`]): a read-only SRE console of the ring, its
//! members, the regions and recent epochs, with `/healthz` and `/readyz`; its actions (drain
//! and undrain a node or a region, disconnect a user) need an operator token.

pub mod cluster;
pub mod config;
pub mod console;
pub mod disconnects;
pub mod grpc;
pub mod membership;
pub mod monitor;
pub mod operations;
pub mod placement;
pub mod regions;
pub mod revocations;
pub mod run;
pub mod server;
pub mod state_file;

pub use config::{Args, ProcessConfig};
pub use server::{Config, NodeState, RingManager, Store, serve};

/// Errors of the ring manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid ring: {0}")]
    InvalidRing(String),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("state file: {0}")]
    StateFile(#[from] state_file::StateFileError),
    #[error(transparent)]
    Client(#[from] ring_client::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] mesh_telemetry::Error),
    #[error("--consul needs a fixed --listen port: it is published before it is bound")]
    ConsulNeedsFixedPort,
    /// The ring record in Consul was not written by an earlier leader, and this ring manager
    /// saw no good one to resume from instead (`cluster`).
    #[error("refusing to lead from the ring record in consul: {0}")]
    UntrustedRing(String),
    /// An `--operator-token` that cannot be used.
    #[error("--operator-token: {0}")]
    OperatorToken(String),
}

impl From<ring_client::consul::ConsulError> for Error {
    fn from(e: ring_client::consul::ConsulError) -> Self {
        Error::Client(e.into())
    }
}
