//! Webhooks: events for the web app, POSTed to every `--webhook-url` with the body
//! `{"time_ms": <ms since epoch at sending>, "events": [{"id": "…", "name": "…", …}]}` and the
//! signature header ([`crate::sign`]).
//!
//! A service that has events to tell calls [`Webhooks::emit`]; it never waits. Each URL has its
//! own bounded queue and one request in flight ([`delivery`]): delivery is batched, in the
//! order emitted (so ordered per [`Event::key`], also across retries), at least once with a
//! stable [`Event::id`], retried with backoff, bounded in memory with a counted drop.

pub mod delivery;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sign::Secret;
use delivery::{Delivery, Metrics, Queued, Target};

/// The environment variable holding the secret every request to the web app is signed with.
pub const SECRET_ENV: &str = "CHANNELMESH_WEBHOOK_SECRET";
/// Default: how long an event is retried before it is dropped (and counted), in seconds.
pub const DEFAULT_RETRY_FOR_SECS: u64 = 600;
/// Default: events queued per URL; past it the newest is dropped (and counted).
pub const DEFAULT_QUEUE: usize = 100_000;

/// The webhook flags, flattened into the `Args` of each service that emits events.
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookArgs {
    /// POST webhook events to this URL (repeatable). Requests are signed with the secret in
    /// CHANNELMESH_WEBHOOK_SECRET, which must then be set.
    #[arg(long = "webhook-url", value_name = "URL")]
    pub webhook_url: Vec<String>,
    /// How long an undelivered event is retried (seconds) before it is dropped and counted.
    #[arg(
        long = "webhook-retry-for",
        value_name = "SECS",
        env = "CHANNELMESH_WEBHOOK_RETRY_FOR",
        default_value_t = DEFAULT_RETRY_FOR_SECS
    )]
    pub webhook_retry_for: u64,
    /// Events queued per URL; past it the newest is dropped and counted.
    #[arg(
        long = "webhook-queue",
        value_name = "EVENTS",
        env = "CHANNELMESH_WEBHOOK_QUEUE",
        default_value_t = DEFAULT_QUEUE
    )]
    pub webhook_queue: usize,
    /// The secret, when given by the caller (the in-process dev mesh, tests); otherwise
    /// [`SECRET_ENV`] is read at start.
    #[arg(skip)]
    pub secret: Option<Secret>,
}

impl Default for WebhookArgs {
    fn default() -> Self {
        WebhookArgs {
            webhook_url: Vec::new(),
            webhook_retry_for: DEFAULT_RETRY_FOR_SECS,
            webhook_queue: DEFAULT_QUEUE,
            secret: None,
        }
    }
}

/// Why the webhook sender cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    #[error("--webhook-url needs the secret in {SECRET_ENV} (requests to the web app are signed)")]
    NoSecret,
    #[error("invalid webhook URL {0:?}: expected http://")]
    Url(String),
    #[error("--webhook-queue must be at least 1")]
    Queue,
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
}

impl WebhookArgs {
    /// Starts the sender for `service` (named in logs), its metrics in `telemetry`, ending on
    /// `cancel`; [`Webhooks::disabled`] when no URL is given.
    pub fn start(
        &self,
        service: &'static str,
        telemetry: &mesh_telemetry::metrics::Telemetry,
        cancel: CancellationToken,
    ) -> Result<Webhooks, HooksError> {
        if self.webhook_url.is_empty() {
            return Ok(Webhooks::disabled());
        }
        let delivery = Delivery {
            urls: self.webhook_url.clone(),
            secret: match &self.secret {
                Some(secret) => secret.clone(),
                None => secret_from_env()?,
            },
            queue: self.webhook_queue,
            retry_for: Duration::from_secs(self.webhook_retry_for),
            ..Delivery::default()
        };
        Webhooks::start(service, delivery, telemetry, cancel)
    }
}

impl WebhookArgs {
    /// These flags as a child process takes them (none without a URL); the secret goes by
    /// environment ([`SECRET_ENV`]), never argv.
    pub fn to_args(&self) -> Vec<String> {
        if self.webhook_url.is_empty() {
            return Vec::new();
        }
        let mut args = Vec::new();
        for url in &self.webhook_url {
            args.extend(["--webhook-url".to_string(), url.clone()]);
        }
        args.extend([
            "--webhook-retry-for".to_string(),
            self.webhook_retry_for.to_string(),
            "--webhook-queue".to_string(),
            self.webhook_queue.to_string(),
        ]);
        args
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

impl Event {
    /// The event as it goes out: `{"id", "name", …fields}` (a field named `id` or `name` is
    /// overridden by the event's own).
    pub fn to_json(&self) -> String {
        let mut object = self.fields.clone();
        object.insert("id".into(), Value::String(self.id.clone()));
        object.insert("name".into(), Value::String(self.name.into()));
        Value::Object(object).to_string()
    }
}

/// A service's webhook sender: cheap to clone; disabled when no URL is configured.
#[derive(Debug, Clone, Default)]
pub struct Webhooks {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    targets: Vec<Target>,
    metrics: Metrics,
    tracker: TaskTracker,
}

impl Webhooks {
    /// A sender that sends nothing (no `--webhook-url`).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts one delivery task per URL of `delivery` (see [`delivery`]), ending on `cancel`
    /// after a last, short flush.
    pub fn start(
        service: &'static str,
        delivery: Delivery,
        telemetry: &mesh_telemetry::metrics::Telemetry,
        cancel: CancellationToken,
    ) -> Result<Webhooks, HooksError> {
        for url in &delivery.urls {
            // Plain HTTP only: this build carries no TLS client (a TLS-terminating proxy in
            // front of the web app, or a sidecar, serves https).
            if !url.starts_with("http://") {
                return Err(HooksError::Url(url.clone()));
            }
        }
        if delivery.queue == 0 {
            return Err(HooksError::Queue);
        }
        let client = reqwest::Client::builder()
            .timeout(delivery.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| HooksError::Client(e.to_string()))?;
        let metrics = Metrics::new(telemetry);
        let tracker = TaskTracker::new();
        let delivery = Arc::new(delivery);
        let targets = delivery
            .urls
            .iter()
            .map(|url| {
                Target::spawn(
                    service,
                    url.clone(),
                    client.clone(),
                    delivery.clone(),
                    metrics.clone(),
                    &tracker,
                    cancel.clone(),
                )
            })
            .collect();
        tracker.close();
        tracing::info!(service, urls = delivery.urls.len(), "webhooks enabled");
        Ok(Webhooks {
            inner: Some(Arc::new(Inner {
                targets,
                metrics,
                tracker,
            })),
        })
    }

    /// Whether any URL is configured: callers skip building events when not.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues an event for every URL. Never waits: a URL whose queue is full drops it (the
    /// newest) and counts it.
    pub fn emit(&self, event: Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        tracing::trace!(name = event.name, id = %event.id, key = %event.key, "webhook event");
        let queued = Queued {
            json: Arc::from(event.to_json()),
            emitted: Instant::now(),
        };
        for target in &inner.targets {
            target.push(queued.clone(), &inner.metrics);
        }
    }

    /// Waits until every delivery task ended (after the cancellation and their last flush).
    pub async fn finished(&self) {
        if let Some(inner) = &self.inner {
            inner.tracker.wait().await;
        }
    }
}

#[cfg(test)]
mod tests;
