//! Channel events: what channel servers order, store and fan out, and gateways deliver.

use bytes::Bytes;

use crate::ids::{ChannelId, TeamId, UserId};
use crate::ts::Ts;

/// The longest message text accepted, in bytes (Slack's limit).
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// The largest raw event accepted from the admin API, in bytes of JSON.
pub const MAX_RAW_EVENT_BYTES: usize = 64 * 1024;

/// Where a client-sent event came from: that connection does not get its own event back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The gateway's id.
    pub gateway: String,
    /// The connection's id within that gateway.
    pub conn: u64,
}

/// What happened in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// A chat message.
    Message {
        user: UserId,
        text: String,
        team: Option<TeamId>,
    },
    /// Someone is typing. Transient: no ts, never stored.
    Typing { user: UserId },
    /// A user joined this channel.
    MemberJoined { user: UserId, team: Option<TeamId> },
    /// A user left this channel.
    MemberLeft { user: UserId },
    /// Published on a user's own channel: that user now receives `channel`, from after `since`.
    ChannelJoined {
        channel: ChannelId,
        since: Option<Ts>,
    },
    /// Published on a user's own channel: that user no longer receives `channel`.
    ChannelLeft { channel: ChannelId },
    /// Any other client event: a JSON object with a string `type`, kept as opaque bytes.
    Raw { kind: String, json: Bytes },
}

impl EventBody {
    /// Transient events are fanned out but get no ts and are never stored.
    pub fn is_transient(&self) -> bool {
        matches!(self, EventBody::Typing { .. })
    }

    /// Bytes this body holds on the heap, roughly; history budgets count it.
    pub fn heap_size(&self) -> usize {
        match self {
            EventBody::Message { user, text, team } => {
                user.as_str().len() + text.len() + team.as_ref().map_or(0, |t| t.as_str().len())
            }
            EventBody::Typing { user }
            | EventBody::MemberJoined { user, .. }
            | EventBody::MemberLeft { user } => user.as_str().len(),
            EventBody::ChannelJoined { channel, .. } | EventBody::ChannelLeft { channel } => {
                channel.as_str().len()
            }
            EventBody::Raw { kind, json } => kind.len() + json.len(),
        }
    }
}

/// An event in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelEvent {
    pub channel: ChannelId,
    /// Assigned by the owning channel server; `None` for transient events and before assignment.
    pub ts: Option<Ts>,
    pub body: EventBody,
    pub origin: Option<Origin>,
}
