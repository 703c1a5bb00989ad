//! Delivery to one URL: a bounded queue, batches, one request in flight, retries.
//!
//! Each URL has its own task. It takes the oldest queued event, waits up to
//! [`Delivery::batch_wait`] for more (up to [`Delivery::batch_max`]), and POSTs the batch; it
//! sends nothing else to that URL until the batch is answered 2xx, so the receiver gets every
//! event in the order emitted, across retries too. Any other answer, a transport error or a
//! timeout is retried after a jittered exponential backoff (the batch topped up with newer
//! events, still in order); an event not delivered [`Delivery::retry_for`] after it was emitted
//! is dropped at its next failure and counted. On cancellation the task makes one last attempt
//! for what it holds, within [`FLUSH_DEADLINE`].
//!
//! The body is built per attempt (its `time_ms` is the time of sending) from events serialised
//! once at [`Webhooks::emit`](super::Webhooks::emit), and signed over its exact bytes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sign::{SIGNATURE_HEADER, Secret};

/// Default: events per request at most.
pub const DEFAULT_BATCH_MAX: usize = 100;
/// Default: how long the first event of a batch waits for others.
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(50);
/// Default: how long one request may take before it counts as failed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default: the first retry's delay; it doubles per failure up to [`DEFAULT_BACKOFF_MAX`].
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Default: the longest delay between two attempts.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// On cancellation: how long the last attempt for the events still held may take.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// How events are delivered; [`Default`] has the production values and no URL.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The receivers, each with its own queue and task.
    pub urls: Vec<String>,
    /// Every request is signed with it.
    pub secret: Secret,
    /// Events queued per URL; past it the newest is dropped and counted.
    pub queue: usize,
    /// Events per request at most.
    pub batch_max: usize,
    /// How long the first event of a batch waits for others.
    pub batch_wait: Duration,
    /// How long one request may take.
    pub timeout: Duration,
    /// The first retry's delay, doubled per failure up to `backoff_max` (each delay jittered
    /// between half and all of it).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long after it was emitted an event is still retried.
    pub retry_for: Duration,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            urls: Vec::new(),
            secret: Secret::new(Vec::new()),
            queue: super::DEFAULT_QUEUE,
            batch_max: DEFAULT_BATCH_MAX,
            batch_wait: DEFAULT_BATCH_WAIT,
            timeout: DEFAULT_TIMEOUT,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            retry_for: Duration::from_secs(super::DEFAULT_RETRY_FOR_SECS),
        }
    }
}

/// An event as queued: its JSON (shared by every URL's queue) and when it was emitted.
#[derive(Debug, Clone)]
pub struct Queued {
    pub json: Arc<str>,
    pub emitted: Instant,
}

/// The sender's metrics (one set per service, summed over its URLs).
#[derive(Debug, Clone)]
pub struct Metrics {
    sent: IntCounter,
    requests: IntCounterVec,
    retries: IntCounter,
    dropped: IntCounterVec,
    depth: IntGauge,
    latency: Histogram,
}

/// Delivery latency buckets (emit → 2xx answer), in seconds: 1 ms to 10 minutes.
const DELIVERY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

impl Metrics {
    pub fn new(telemetry: &mesh_telemetry::metrics::Telemetry) -> Self {
        let opts = HistogramOpts::new(
            "channelmesh_webhook_delivery_seconds",
            "Time from an event's emission to the 2xx answer to the request that carried it.",
        )
        .buckets(DELIVERY_BUCKETS.to_vec());
        let latency = Histogram::with_opts(opts).unwrap_or_else(|_| {
            Histogram::with_opts(HistogramOpts::new("invalid", "invalid"))
                .unwrap_or_else(|_| unreachable!("a plain histogram is valid"))
        });
        if let Err(e) = telemetry.registry().register(Box::new(latency.clone())) {
            tracing::warn!(error = %e, "metric not registered");
        }
        Metrics {
            sent: telemetry.counter(
                "channelmesh_webhook_events_sent_total",
                "Webhook events delivered (answered 2xx), per URL.",
            ),
            requests: telemetry.counter_vec(
                "channelmesh_webhook_requests_total",
                "Webhook requests by outcome: ok (2xx), status (another answer), timeout, error \
                 (transport).",
                &["outcome"],
            ),
            retries: telemetry.counter(
                "channelmesh_webhook_retries_total",
                "Webhook requests that failed and will be retried.",
            ),
            dropped: telemetry.counter_vec(
                "channelmesh_webhook_events_dropped_total",
                "Webhook events given up: queue_full (the URL's queue was full), expired (not \
                 delivered within --webhook-retry-for), shutdown (not delivered by the last \
                 flush).",
                &["reason"],
            ),
            depth: telemetry.gauge(
                "channelmesh_webhook_queue_depth",
                "Webhook events queued or in flight, summed over the URLs.",
            ),
            latency,
        }
    }

    fn dropped(&self, reason: &str, n: usize) {
        self.dropped.with_label_values(&[reason]).inc_by(n as u64);
        self.depth.sub(n as i64);
    }
}

/// One URL's queue (the sending half; its task holds the other).
#[derive(Debug)]
pub struct Target {
    tx: mpsc::Sender<Queued>,
}

impl Target {
    /// Starts the task delivering to `url` on `tracker` until `cancel`.
    pub fn spawn(
        service: &'static str,
        url: String,
        client: reqwest::Client,
        delivery: Arc<Delivery>,
        metrics: Metrics,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Target {
        let (tx, rx) = mpsc::channel(delivery.queue);
        let worker = Worker {
            service,
            url,
            client,
            delivery,
            metrics,
            rx,
            cancel,
        };
        tracker.spawn(worker.run());
        Target { tx }
    }

    /// Queues `event`; a full queue drops it and counts it.
    pub fn push(&self, event: Queued, metrics: &Metrics) {
        match self.tx.try_send(event) {
            Ok(()) => metrics.depth.inc(),
            Err(TrySendError::Full(_)) => {
                metrics.dropped.with_label_values(&["queue_full"]).inc();
            }
            // The task ended (shutdown): nothing will be sent any more.
            Err(TrySendError::Closed(_)) => {
                metrics.dropped.with_label_values(&["shutdown"]).inc();
            }
        }
    }
}

/// Why an attempt failed (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Status(u16),
    Timeout,
    Transport,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Status(_) => "status",
            Failure::Timeout => "timeout",
            Failure::Transport => "error",
        }
    }
}

/// One URL's delivery task.
struct Worker {
    /// For logs.
    service: &'static str,
    url: String,
    client: reqwest::Client,
    delivery: Arc<Delivery>,
    metrics: Metrics,
    rx: mpsc::Receiver<Queued>,
    cancel: CancellationToken,
}

impl Worker {
    async fn run(mut self) {
        let mut batch: VecDeque<Queued> = VecDeque::new();
        let mut failures: u32 = 0;
        loop {
            if batch.is_empty() && !self.fill(&mut batch).await {
                break;
            }
            // Cancel-safe: a request abandoned on cancellation keeps its events in `batch`,
            // which the last flush sends again (same ids: at least once).
            let outcome = tokio::select! {
                outcome = self.attempt(&batch) => outcome,
                _ = self.cancel.cancelled() => break,
            };
            match outcome {
                Ok(()) => {
                    self.delivered(&mut batch);
                    failures = 0;
                }
                Err(failure) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(
                            service = self.service,
                            url = %self.url,
                            ?failure,
                            failures,
                            events = batch.len(),
                            "webhook delivery failed; retrying"
                        );
                    }
                    self.expire(&mut batch);
                    if !batch.is_empty() {
                        self.metrics.retries.inc();
                    }
                    let delay = backoff(&self.delivery, failures);
                    // Cancel-safe: sleeping loses nothing.
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    // Newer events join the retried batch (after it: the order holds).
                    while batch.len() < self.delivery.batch_max {
                        match self.rx.try_recv() {
                            Ok(event) => batch.push_back(event),
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        self.flush(batch).await;
    }

    /// Waits for an event, then for more up to the batch's size or wait; false when cancelled.
    async fn fill(&mut self, batch: &mut VecDeque<Queued>) -> bool {
        // Cancel-safe: `recv` loses no event when the other branch wins.
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return false,
            next = self.rx.recv() => match next {
                Some(event) => batch.push_back(event),
                None => return false,
            },
        }
        let deadline = tokio::time::Instant::now() + self.delivery.batch_wait;
        while batch.len() < self.delivery.batch_max {
            tokio::select! {
                biased;
                next = self.rx.recv() => match next {
                    Some(event) => batch.push_back(event),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.cancel.cancelled() => break,
            }
        }
        true
    }

    /// POSTs `batch` once.
    async fn attempt(&self, batch: &VecDeque<Queued>) -> Result<(), Failure> {
        let body = body(now_ms(), batch.iter().map(|e| &*e.json));
        let signature = self.delivery.secret.sign(body.as_bytes());
        let sent = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        let outcome = match sent {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(Failure::Status(response.status().as_u16())),
            Err(e) if e.is_timeout() => Err(Failure::Timeout),
            Err(_) => Err(Failure::Transport),
        };
        let label = outcome.err().map_or("ok", Failure::label);
        self.metrics.requests.with_label_values(&[label]).inc();
        outcome
    }

    /// `batch` was answered 2xx.
    fn delivered(&self, batch: &mut VecDeque<Queued>) {
        for event in batch.iter() {
            self.metrics
                .latency
                .observe(event.emitted.elapsed().as_secs_f64());
        }
        self.metrics.sent.inc_by(batch.len() as u64);
        self.metrics.depth.sub(batch.len() as i64);
        batch.clear();
    }

    /// Drops (and counts) the events of `batch` past their retry time.
    fn expire(&self, batch: &mut VecDeque<Queued>) {
        let before = batch.len();
        let retry_for = self.delivery.retry_for;
        batch.retain(|event| event.emitted.elapsed() < retry_for);
        let expired = before - batch.len();
        if expired > 0 {
            tracing::error!(
                service = self.service,
                url = %self.url,
                expired,
                ?retry_for,
                "webhook events not delivered in time; dropped"
            );
            self.metrics.dropped("expired", expired);
        }
    }

    /// The last attempt, on cancellation: what it holds and what is queued, in batches, one
    /// attempt each, within [`FLUSH_DEADLINE`]; the rest is dropped and counted.
    async fn flush(mut self, mut batch: VecDeque<Queued>) {
        self.rx.close();
        let deadline = tokio::time::Instant::now() + FLUSH_DEADLINE;
        loop {
            while batch.len() < self.delivery.batch_max {
                match self.rx.try_recv() {
                    Ok(event) => batch.push_back(event),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            match tokio::time::timeout_at(deadline, self.attempt(&batch)).await {
                Ok(Ok(())) => self.delivered(&mut batch),
                _ => break,
            }
        }
        let mut lost = batch.len();
        while self.rx.try_recv().is_ok() {
            lost += 1;
        }
        tracing::warn!(
            service = self.service,
            url = %self.url,
            lost,
            "webhook events not delivered before shutdown; dropped"
        );
        self.metrics.dropped("shutdown", lost);
    }
}

/// The request body: `{"time_ms":…,"events":[…]}` from events already serialised.
pub fn body<'a>(time_ms: u64, events: impl Iterator<Item = &'a str>) -> String {
    let mut body = format!("{{\"time_ms\":{time_ms},\"events\":[");
    for (i, event) in events.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(event);
    }
    body.push_str("]}");
    body
}

/// Milliseconds since the epoch now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The delay before the retry that follows the `failures`-th failure in a row: the minimum
/// doubled per earlier failure, capped, then jittered down to between half and all of it.
fn backoff(delivery: &Delivery, failures: u32) -> Duration {
    let doubled = delivery
        .backoff_min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let full = doubled.min(delivery.backoff_max);
    full.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}
