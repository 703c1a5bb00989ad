//! The words every layer of the gateway shares: a connection's id, a channel event rendered to
//! RTM JSON once, and the items queued to a connection. Types only: no engine lives here.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use mesh_core::{ChannelId, Ts};

/// A connection's id within its gateway.
pub type ConnId = u64;

/// A channel event rendered to RTM JSON, once per gateway, shared by every local subscriber.
#[derive(Debug)]
pub struct Rendered {
    pub channel: ChannelId,
    /// The channel's ts of the event; `None` for transient events.
    pub ts: Option<Ts>,
    pub frame: Utf8Bytes,
    /// When this gateway received it from its channel server (live events only): the start
    /// of the gateway -> socket stage.
    pub received: Option<Instant>,
}

/// What the hub queues to a connection. Two words: a fan-out writes one of these into every
/// subscriber's queue per event, so the rare kinds are boxed to keep the common one small.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A channel event.
    Event(Arc<Rendered>),
    /// A frame for this connection only, written as is.
    Frame(Box<Utf8Bytes>),
    /// A change to what the connection receives.
    Control(Box<Control>),
}

/// A change to what a connection receives.
#[derive(Debug, Clone)]
pub enum Control {
    /// The connection's user joined `channel`: start receiving it. `on` is the channel the
    /// directive was published on: a connection honours it only on its user's own channel.
    Joined {
        channel: ChannelId,
        since: Option<Ts>,
        on: ChannelId,
    },
    /// The connection's user left `channel` (honoured, too, only `on` the user's channel).
    Left { channel: ChannelId, on: ChannelId },
    /// What the connection missed on one channel, ready to write before the live events that
    /// waited for it (see `history`).
    Backlog(Backlog),
    /// `channel`'s history is complete only after `floor` (its floor jumped on its channel
    /// server, or a catch-up could not be read whole): a connection whose cursor is below it
    /// is written `history_gap`. `delivered`: the newest ts this gateway delivered on it, the
    /// frame's cursor for a connection that has none.
    Gap {
        channel: ChannelId,
        floor: Ts,
        delivered: Ts,
    },
}

/// History one connection was missing on one channel: after a join (since the join), or on a
/// resume (since the client's cursor).
#[derive(Debug, Clone)]
pub struct Backlog {
    pub channel: ChannelId,
    /// A frame written first: `channel_joined` after a join; `history_gap` when a resume's
    /// history no longer reaches back to its cursor.
    pub preface: Option<String>,
    /// Persisted events at or before this ts are not written (a resume's cursor).
    pub after: Option<Ts>,
    /// The history read, oldest first.
    pub events: Vec<Arc<Rendered>>,
}

impl Outbound {
    /// A frame for one connection.
    pub fn frame(frame: impl Into<Utf8Bytes>) -> Self {
        Outbound::Frame(Box::new(frame.into()))
    }

    /// A change to what one connection receives.
    pub fn control(control: Control) -> Self {
        Outbound::Control(Box::new(control))
    }

    /// The bytes this item holds for its connection alone, counted against the connection's
    /// outgoing budget. A shared event counts its frame: a slow reader keeps it alive.
    pub fn queued_bytes(&self) -> usize {
        match self {
            Outbound::Event(event) => event.frame.len(),
            Outbound::Frame(frame) => frame.len(),
            Outbound::Control(_) => 0,
        }
    }
}
