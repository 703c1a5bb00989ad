//! Webhooks: events for the web app, POSTed to every `--webhook-url` with the body
//! `{"time_ms": <ms since epoch>, "events": [{"id": "…", "name": "…", …}]}` and the signature
//! header ([`crate::sign`]).
//!
//! A service that has events to tell calls [`Webhooks::emit`]; it never waits. Delivery is
//! batched, ordered per [`Event::key`], at least once with a stable [`Event::id`], retried with
//! backoff, bounded in memory with a counted drop.
// SKELETON: the sender is being written (issue 18, webhooks). `emit` drops events until then.

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::sign::Secret;

/// The environment variable holding the secret every request to the web app is signed with.
pub const SECRET_ENV: &str = "CHANNELMESH_WEBHOOK_SECRET";

/// The webhook flags, flattened into the `Args` of each service that emits events.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WebhookArgs {
    /// POST webhook events to this URL (repeatable). Requests are signed with the secret in
    /// CHANNELMESH_WEBHOOK_SECRET, which must then be set.
    #[arg(long = "webhook-url", value_name = "URL")]
    pub webhook_url: Vec<String>,
}

/// Why the webhook sender cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    #[error("--webhook-url needs the secret in {SECRET_ENV} (requests to the web app are signed)")]
    NoSecret,
    #[error("invalid webhook URL {0:?}: expected http:// or https://")]
    Url(String),
}

impl WebhookArgs {
    /// Starts the sender for `service` (a metrics label), its metrics in `telemetry`, ending on
    /// `cancel`; [`Webhooks::disabled`] when no URL is given.
    pub fn start(
        &self,
        service: &'static str,
        telemetry: &mesh_telemetry::metrics::Telemetry,
        cancel: CancellationToken,
    ) -> Result<Webhooks, HooksError> {
        let _ = (service, telemetry, cancel);
        if self.webhook_url.is_empty() {
            return Ok(Webhooks::disabled());
        }
        for url in &self.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(HooksError::Url(url.clone()));
            }
        }
        let _secret = secret_from_env()?;
        Ok(Webhooks { enabled: true })
    }
}

/// The secret from [`SECRET_ENV`] (set and non-empty), for the webhooks and the boot request.
pub fn secret_from_env() -> Result<Secret, HooksError> {
    match std::env::var(SECRET_ENV) {
        Ok(value) if !value.is_empty() => Ok(Secret::new(value)),
        _ => Err(HooksError::NoSecret),
    }
}

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
