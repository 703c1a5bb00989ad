//! The ring manager (Slack's CHARM): channel servers register with it, it assigns ring slots to
//! them and publishes every new epoch; admin servers, gateways and channel servers follow the
//! ring through [`client::RingWatcher`].
//!
//! Channel servers hold leases by heartbeat ([`lease`]); the ring manager replaces those that
//! lose them ([`server`]). Two backends keep the ring: the embedded one, where the ring manager
//! itself is the registry (durable through its state file), and Consul ([`cluster`]), where
//! ring managers elect a leader with a session lock and keep the ring in KV.
//!
//! Each ring manager also serves HTTP ([`console`]): a read-only SRE console of the ring, its
//! members, the regions and recent epochs, with `/healthz` and `/readyz`.

pub mod client;
pub mod cluster;
pub mod console;
pub mod consul;
pub mod convert;
pub mod lease;
pub mod membership;
pub mod regions;
pub mod revocations;
pub mod server;
pub mod state_file;
pub mod transport;

pub use client::{RingSource, RingWatcher};
pub use lease::{Lease, LeaseEnd};
pub use server::{Config, NodeState, RingManager, Store, serve};

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
    #[error(transparent)]
    Consul(consul::ConsulError),
    #[error("no ring manager leads (the lock in consul is free)")]
    NoLeader,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
