//! Why the channel server refuses a call or ends a gateway's stream: the domain's one error,
//! mapped to gRPC statuses in one table at the edge (`grpc::status`).

use mesh_core::{NodeId, Slot};

/// Why a call is refused, or why a gateway's subscription stream ended. Each message is the
/// one the caller reads (routers match the prefix before the colon).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// This node's lease does not hold (fencing): it may not serve anything.
    #[error("no_lease: {0}")]
    NoLease(&'static str),
    /// The slot came here in a handoff whose state has not arrived yet.
    #[error("slot_warming: waiting for slot {slot}'s state from {from}")]
    Warming { slot: Slot, from: NodeId },
    /// The caller routed by a newer epoch than this node learned in time.
    #[error("ring_behind: this channel server knows epoch {known}, caller routed by {asked}")]
    RingBehind { known: u64, asked: u64 },
    /// Another node owns the slot (`owner` is empty on a ring without nodes).
    #[error("wrong_owner: slot {slot} belongs to {owner:?} in epoch {epoch}, not to {node}")]
    WrongOwner {
        slot: Slot,
        owner: String,
        epoch: u64,
        node: NodeId,
    },
    /// The gateway's queue was full when an event came: its stream ends and it resubscribes.
    #[error("gateway fell behind its subscription queue; resubscribe")]
    FellBehind,
    /// The gateway's queue was full when a reply to one of its commands came.
    #[error("gateway fell behind its subscription queue")]
    FellBehindOnReply,
    /// The gateway's queue was full when it was told a channel moved away.
    #[error("gateway fell behind")]
    FellBehindOnMove,
    /// The gateway closed its side of the stream.
    #[error("subscription stream closed")]
    StreamClosed,
    /// The stream ended with the server.
    #[error("channel server shutting down")]
    ShuttingDown,
    /// Too many events wait for the slot's followers: the publish is refused (routers retry).
    #[error("replication_behind: the slot's followers have not kept up; retry")]
    ReplicationBehind,
    /// The slot's followers did not acknowledge the event in time; it may still be stored
    /// (a retry with the same idempotency key gets its ts).
    #[error("replication_timeout: the slot's followers did not acknowledge in time; retry")]
    ReplicationTimeout,
    /// A follower refused the event: in its ring this node does not own the slot, or it does
    /// not follow it.
    #[error("replication_refused: {0}")]
    ReplicationRefused(String),
    /// Replication or a catch-up from a node that is not the slot's owner in this node's ring,
    /// or for a slot this node does not follow (fencing).
    #[error("not_follower: slot {slot} is not replicated from {from} to {node} in epoch {epoch}")]
    NotFollower {
        slot: Slot,
        from: NodeId,
        node: NodeId,
        epoch: u64,
    },
}
