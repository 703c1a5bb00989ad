//! The channel servers' client: [`ChannelRouter`] routes publishes, history reads and
//! membership calls to the channel server that owns a channel under the ring, and [`wire`]
//! converts events to and from their protobuf form. Admin servers and gateways use it;
//! channel servers use its wire format (and call each other for hand-offs).

pub mod router;
pub mod wire;

pub use router::{ChannelRouter, History, ROUTE_DEADLINE, RouteError};

/// The gRPC metadata key a gateway names itself by on its `Subscribe` stream.
pub const GATEWAY_ID_HEADER: &str = "x-channelmesh-gateway";
/// The largest gRPC message a hand-off may carry (a channel's whole history, in pages).
pub const MAX_HANDOFF_MESSAGE: usize = 64 * 1024 * 1024;
