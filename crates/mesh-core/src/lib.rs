//! channelmesh's domain: ids, timestamps, the slot ring, client tokens, channel events, channel
//! policies and the token bucket.
//!
//! This crate does no I/O and knows nothing of JSON or protobuf: the services' edge modules
//! convert wire formats into these types.

pub mod event;
pub mod ids;
pub mod policy;
pub mod rate;
pub mod ring;
pub mod token;
pub mod ts;

pub use event::{ChannelEvent, EventBody, Origin};
pub use ids::{ChannelId, IdError, NodeId, TeamId, UserId};
pub use ring::{Handoff, Ring, RingNode, SLOT_COUNT, Slot, slot_of};
pub use token::{Identity, IssuerAudience, TokenError, TokenKey, Verified};
pub use ts::{Ts, TsClock, TsError};
