//! The ring manager's clients: everything a service needs to follow the ring and to be a member
//! of it, without compiling the ring manager itself.
//!
//! - [`source`]: where the ring comes from ([`RingSource`]: a ring manager's endpoint, or
//!   Consul), the [`RingWatcher`] every router reads, and registration.
//! - [`lease`] and [`membership`]: a node's side of its lease (heartbeats, self-fencing) and its
//!   membership (register, hold the lease, register again as a standby when revoked);
//!   [`own_thread`]: the runtime on a thread of its own that the leases are kept on.
//! - [`convert`]: the ring's protobuf form; [`record`]: the ring record as saved (state file,
//!   Consul KV).
//! - [`consul`]: the thin Consul HTTP client; [`consul_ring`]: the ring's keys in Consul KV,
//!   following them, and registering a service in Consul's catalog.
//! - [`args`]: the `--ring-manager`, `--presence-ring-manager` and `--consul*` flags every
//!   service takes, and a service's [`Registration`] in Consul while it runs.

pub mod args;
pub mod consul;
pub mod consul_ring;
pub mod convert;
pub mod lease;
pub mod membership;
pub mod own_thread;
pub mod record;
pub mod source;

pub use args::{ConsulArgs, Registration, RingArgs};
pub use consul_ring::ConsulRing;
pub use lease::{Lease, LeaseEnd};
pub use source::{RingSource, RingWatcher};

/// Errors of the ring manager's clients.
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
    #[error(transparent)]
    Consul(#[from] consul::ConsulError),
    #[error("no ring manager leads (the lock in consul is free)")]
    NoLeader,
    /// A ring record in Consul that no current leader wrote.
    #[error("refused the ring record: {0}")]
    RefusedRecord(consul_ring::Refusal),
    /// `--consul` names no Consul agent this client can talk to.
    #[error("--consul {url}")]
    ConsulFlag {
        url: String,
        #[source]
        source: Box<Error>,
    },
}
