//! The ring manager (Slack's CHARM): channel servers register with it, it assigns ring slots to
//! them and publishes every new epoch; admin servers, gateways and channel servers follow the
//! ring through [`client::RingWatcher`].
//!
//! This is the embedded backend: the ring manager itself is the registry, served over gRPC.
//! Channel servers hold leases by heartbeat ([`lease`]); the ring manager replaces those that
//! lose them ([`server`]).

pub mod client;
pub mod convert;
pub mod lease;
pub mod server;
pub mod state_file;

pub use client::RingWatcher;
pub use lease::{Lease, LeaseEnd};
pub use server::{Config, NodeState, RingManager, serve};

/// Errors of the ring manager and its clients.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid ring from the ring manager: {0}")]
    InvalidRing(String),
    #[error("ring manager transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("ring manager call failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("timed out waiting for the ring: {0}")]
    Timeout(String),
    #[error("state file: {0}")]
    StateFile(#[from] state_file::StateFileError),
}
