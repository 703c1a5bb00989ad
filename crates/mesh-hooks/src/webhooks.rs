//! Webhooks: events for the web app, POSTed to every `--webhook-url` with the body
//! `{"time_ms": <ms since epoch>, "events": [{"id": "…", "name": "…", …}]}` and the signature
//! header ([`crate::sign`]).
//!
//! A service that has events to tell calls [`Webhooks::emit`]; it never waits. Delivery is
//! batched, ordered per [`Event::key`], at least once with a stable [`Event::id`], retried with
//! backoff, bounded in memory with a counted drop.
// SKELETON: the sender is being written (issue 18, webhooks). `emit` drops events until then.

use serde_json::{Map, Value};

/// One event for the web app.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Stable across retries and re-sends: the receiver dedups by it.
    pub id: String,
    /// `channel_occupied`, `channel_vacated`, `member_added`, `member_removed`,
    /// `presence_changed`, `user_offline_message`.
    pub name: &'static str,
    /// What orders it: events with the same key reach each receiver in the order emitted (the
    /// channel id for channel events, the user id for a user's).
    pub key: String,
    /// The event's own fields (`channel`, `user`, `presence`, …), beside `id` and `name`.
    pub fields: Map<String, Value>,
}

/// A service's webhook sender: cheap to clone; disabled when no URL is configured.
#[derive(Debug, Clone, Default)]
pub struct Webhooks {
    enabled: bool,
}

impl Webhooks {
    /// A sender that sends nothing (no `--webhook-url`).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Whether any URL is configured: callers skip building events when not.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Queues an event for every URL. Never waits.
    pub fn emit(&self, event: Event) {
        if self.enabled {
            tracing::trace!(name = event.name, id = %event.id, "webhook event");
        }
    }
}
