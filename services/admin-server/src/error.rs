//! Why an admin call fails: the admin server's one domain error, each variant's message the one
//! the caller reads. `grpc::status` maps it to a gRPC status in one table.

use channel_client::RouteError;
use mesh_core::event::{MAX_RAW_EVENT_BYTES, MAX_TEXT_BYTES};
use mesh_core::{IdError, TokenError, TsError};

use crate::requests::{MAX_BROADCAST_CHANNELS, MAX_IDEMPOTENCY_KEY_BYTES, MAX_PRESENCE_USERS};

/// Why an admin call fails.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdminError {
    /// An id field does not parse.
    #[error("{field}: {error}")]
    BadId { field: &'static str, error: IdError },
    /// `since_ts` does not parse.
    #[error("since_ts: {0}")]
    BadSince(TsError),
    #[error("text: message text is missing")]
    MissingText,
    #[error("text: msg_too_long (over {MAX_TEXT_BYTES} bytes)")]
    TextTooLong,
    #[error("event_json: over {MAX_RAW_EVENT_BYTES} bytes")]
    EventTooLarge,
    #[error("event_json: invalid JSON: {0}")]
    InvalidJson(String),
    #[error("event_json: must be a JSON object")]
    NotAnObject,
    #[error("event_json: needs a string \"type\"")]
    NoEventType,
    /// The event's type is one of the protocol's own frames.
    #[error("event_json: type {0:?} is reserved for the protocol")]
    ReservedType(String),
    #[error("idempotency_key: over {MAX_IDEMPOTENCY_KEY_BYTES} bytes")]
    IdempotencyKeyTooLong,
    #[error("at most {MAX_PRESENCE_USERS} users per call")]
    TooManyUsers,
    #[error("jtis: at least one")]
    NoJtis,
    #[error("channels: at least one")]
    NoChannels,
    #[error("channels: at most {MAX_BROADCAST_CHANNELS} per call")]
    TooManyChannels,
    /// A Broadcast names a channel twice.
    #[error("channels: {0} is listed twice")]
    DuplicateChannel(String),
    /// A Broadcast with both a message (user, text) and an event.
    #[error("event_json: give a message (user and text) or an event, not both")]
    MessageAndEvent,
    #[error("page_token: not a token this API gave")]
    BadPageToken,
    /// A PublishStream request with id 0 (the server's first reply uses it).
    #[error("id: 0 is reserved for the stream's first reply")]
    ZeroId,
    /// A PublishStream request with neither a post nor an event.
    #[error("body: a post or an event is required")]
    NoBody,
    /// The user's presence server did not answer a ListConnections in time.
    #[error("connections of {0} unknown: their presence server did not answer in time")]
    ConnectionsUnanswered(String),
    /// The mesh was started without presence servers.
    #[error("this mesh has no presence servers")]
    NoPresenceServers,
    #[error("no presence server is on the ring yet")]
    NoPresenceServerYet,
    /// The presence servers of these users did not answer in time (down and not yet
    /// replaced, or overloaded): their presence is unknown, not away.
    #[error("presence unknown for {}: their presence server did not answer in time", .0.join(", "))]
    PresenceUnanswered(Vec<String>),
    /// Routing to the owning channel server failed; the message is the router's own.
    #[error("{}", route_message(.0))]
    Route(RouteError),
    /// The owning channel server accepted a publish but gave it no ts.
    #[error("channel server assigned no ts")]
    NoTs,
    #[error("{0}")]
    Mint(TokenError),
    /// RevokeTokens without a ring manager to forward it to.
    #[error("this admin server does not know the ring manager")]
    NoRingManager,
    /// The ring manager could not be found or dialled.
    #[error("ring manager: {0}")]
    RingManager(String),
    #[error("ring manager did not answer in time")]
    RingManagerTimeout,
}

/// The message a routing error carries, without the router's prefix.
fn route_message(error: &RouteError) -> &str {
    match error {
        RouteError::Invalid(m)
        | RouteError::Unavailable(m)
        | RouteError::Internal(m)
        | RouteError::RateLimited(m) => m,
    }
}
