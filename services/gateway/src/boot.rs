//! Boot from the web app (Slack's client boot): on `rtm.connect` the gateway asks the web app
//! for the user's channels and profile — a POST of `{"user": "U…", "team": "T…"}` signed like
//! the webhooks (`X-Channelmesh-Signature`), answered `{"channels": ["C…", …], "name": "…"}` —
//! and unites them with the token's `channels` claim (or replaces it, `--boot-mode replace`).
//!
//! Bounded everywhere: one request per user at a time (concurrent connects of one user wait
//! for the same answer), at most [`BootConfig::max_in_flight`] users asked at once (past it the
//! connect is answered `ratelimited`), every request within [`BootConfig::deadline`], an answer
//! of at most [`MAX_ANSWER_BYTES`] and [`MAX_TOKEN_CHANNELS`] channels, and answers cached per
//! user for [`BootConfig::cache_ttl`] in an LRU of at most [`BootConfig::cache_users`] users
//! and [`CACHE_CHANNEL_BUDGET`] channel ids in all. A web app slow, down or answering nonsense
//! gives the connect a [`BootError`], never a hung or crashed connect.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use mesh_core::token::MAX_TOKEN_CHANNELS;
use mesh_core::{ChannelId, TeamId, UserId};
use mesh_hooks::SIGNATURE_HEADER;
pub use mesh_hooks::Secret;
use mesh_telemetry::Telemetry;
use mesh_telemetry::prometheus::{Histogram, IntCounter, IntCounterVec};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default: how long the gateway waits for the web app's answer (`--boot-deadline-ms`).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);
/// Default: how long an answer is reused for the same user (`--boot-cache-secs`).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
/// Default: the most users whose answers are cached (`--boot-cache-users`).
pub const DEFAULT_CACHE_USERS: usize = 10_000;
/// Default: the most users asked about at once (`--boot-max-in-flight`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// The largest answer read, in bytes: 10,000 ids of 64 bytes with their quotes fit.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// The most channel ids the cache holds over all its users; past it the least recently used
/// answers go first (a user in 10,000 channels costs about 10,000 `Arc<str>`s).
pub const CACHE_CHANNEL_BUDGET: usize = 2_000_000;

/// Whether the web app's channels join the token's or stand in for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BootMode {
    /// The token's channels and the web app's (without repeats).
    #[default]
    Union,
    /// Only the web app's; the token's `channels` claim is ignored.
    Replace,
}

/// How the gateway boots clients from the web app.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// The web app's boot endpoint (`--boot-url`).
    pub url: String,
    /// Signs every request (`CHANNELMESH_WEBHOOK_SECRET`).
    pub secret: Secret,
    /// The most the web app may take to answer, connect included.
    pub deadline: Duration,
    /// How long an answer serves later connects of the same user (0: not cached).
    pub cache_ttl: Duration,
    /// The most users whose answers are cached.
    pub cache_users: usize,
    /// The most users asked about at once.
    pub max_in_flight: usize,
    /// Union with the token's channels, or replace them.
    pub mode: BootMode,
}

impl BootConfig {
    /// This configuration as flags of a child `gateway` process (`channelmesh dev
    /// --multi-process`); the child takes the secret from the environment it inherits.
    pub fn args(&self) -> Vec<String> {
        let mode = match self.mode {
            BootMode::Union => "union",
            BootMode::Replace => "replace",
        };
        vec![
            format!("--boot-url={}", self.url),
            format!("--boot-mode={mode}"),
            format!("--boot-deadline-ms={}", self.deadline.as_millis()),
            format!("--boot-cache-secs={}", self.cache_ttl.as_secs()),
            format!("--boot-cache-users={}", self.cache_users),
            format!("--boot-max-in-flight={}", self.max_in_flight),
        ]
    }
}

/// What the web app said about a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    /// The user's channels, validated, without repeats.
    pub channels: Arc<[ChannelId]>,
    /// The display name, when the web app gave one (rtm.connect's `self.name`).
    pub name: Option<String>,
}

/// Why a user could not be booted; each is an `rtm.connect` error (`error` in
/// [`BootError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootError {
    /// The web app did not answer within the deadline.
    #[error("the web app did not answer within the deadline")]
    Timeout,
    /// The web app could not be reached or answered with an HTTP error.
    #[error("the web app is unavailable: {0}")]
    Unavailable(String),
    /// The web app's answer is not a valid boot answer.
    #[error("the web app's answer is invalid: {0}")]
    InvalidAnswer(String),
    /// Too many users are being asked about at once; the client should come back.
    #[error("too many boot requests in flight")]
    Busy,
}

impl BootError {
    /// The `error` of the `rtm.connect` answer (docs/rtm.md, "Boot from the web app").
    pub fn code(&self) -> &'static str {
        match self {
            BootError::Timeout => "boot_timeout",
            BootError::Unavailable(_) => "boot_unavailable",
            BootError::InvalidAnswer(_) => "boot_invalid_answer",
            BootError::Busy => "ratelimited",
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            BootError::Timeout => "timeout",
            BootError::Unavailable(_) => "unavailable",
            BootError::InvalidAnswer(_) => "invalid",
            BootError::Busy => "busy",
        }
    }
}

type Answer = Option<Result<Arc<Booted>, BootError>>;

/// The boot metrics (`channelmesh_gateway_boot_*`).
#[derive(Debug, Clone)]
struct BootMetrics {
    /// Requests to the web app, by outcome (`ok`, `timeout`, `unavailable`, `invalid`), and
    /// connects refused without one (`busy`).
    requests: IntCounterVec,
    /// How long the web app took, answered or not.
    latency: Histogram,
    /// Connects answered from the cache.
    cache_hits: IntCounter,
    /// Connects that waited for a request another connect of the same user had made.
    shared: IntCounter,
}

/// A cached answer.
#[derive(Debug)]
struct Cached {
    booted: Arc<Booted>,
    at: Instant,
}

/// The cache and the requests in flight, under one short lock (never held across `.await`).
#[derive(Debug)]
struct State {
    cache: LruCache<UserId, Cached>,
    /// Channel ids held by the cache, against [`CACHE_CHANNEL_BUDGET`].
    cached_channels: usize,
    /// Users being asked about: each connect of theirs waits on the same answer.
    in_flight: HashMap<UserId, watch::Receiver<Answer>>,
}

/// The gateway's boot client: cheap to share (`Arc`).
#[derive(Debug)]
pub struct Boot {
    config: BootConfig,
    client: reqwest::Client,
    state: Mutex<State>,
    permits: Arc<Semaphore>,
    metrics: BootMetrics,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Boot {
    /// A boot client for `config`, its metrics registered in `telemetry`; requests are tasks
    /// of `tracker` and end on `cancel`.
    pub fn new(
        config: BootConfig,
        telemetry: &Telemetry,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.deadline)
            .timeout(config.deadline)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let metrics = BootMetrics {
            requests: telemetry.counter_vec(
                "channelmesh_gateway_boot_requests_total",
                "Boot requests to the web app by outcome (ok, timeout, unavailable, invalid), and connects refused for too many in flight (busy).",
                &["outcome"],
            ),
            latency: telemetry.latency(
                "channelmesh_gateway_boot_request_seconds",
                "How long the web app took to answer a boot request (or to fail).",
            ),
            cache_hits: telemetry.counter(
                "channelmesh_gateway_boot_cache_hits_total",
                "Connects booted from a cached answer.",
            ),
            shared: telemetry.counter(
                "channelmesh_gateway_boot_shared_total",
                "Connects that waited for another connect's request for the same user.",
            ),
        };
        let users = NonZeroUsize::new(config.cache_users).unwrap_or(NonZeroUsize::MIN);
        Arc::new(Boot {
            permits: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            state: Mutex::new(State {
                cache: LruCache::new(users),
                cached_channels: 0,
                in_flight: HashMap::new(),
            }),
            config,
            client,
            metrics,
            tracker,
            cancel,
        })
    }

    /// Whether the web app's channels replace the token's.
    pub fn mode(&self) -> BootMode {
        self.config.mode
    }

    /// The user's channels and profile: cached, or from a request in flight for them, or from
    /// a new one. Answers within the deadline (and a little more for the hand-over).
    pub async fn channels(
        self: &Arc<Self>,
        user: &UserId,
        team: &TeamId,
    ) -> Result<Arc<Booted>, BootError> {
        let mut answer = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(cached) = state.cache.get(user) {
                if cached.at.elapsed() < self.config.cache_ttl {
                    self.metrics.cache_hits.inc();
                    return Ok(cached.booted.clone());
                }
                if let Some(stale) = state.cache.pop(user) {
                    state.cached_channels -= stale.booted.channels.len();
                }
            }
            if let Some(waiting) = state.in_flight.get(user) {
                self.metrics.shared.inc();
                waiting.clone()
            } else {
                let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                    self.metrics.requests.with_label_values(&["busy"]).inc();
                    return Err(BootError::Busy);
                };
                let (tx, rx) = watch::channel(None);
                state.in_flight.insert(user.clone(), rx.clone());
                let this = self.clone();
                let (user, team) = (user.clone(), team.clone());
                self.tracker.spawn(async move {
                    let _permit = permit;
                    let result = tokio::select! {
                        result = this.ask(&user, &team) => result,
                        _ = this.cancel.cancelled() => Err(BootError::Unavailable("the gateway is stopping".into())),
                    };
                    this.settle(user, &result);
                    let _ = tx.send(Some(result));
                });
                rx
            }
        };
        // The request ends within the deadline; the margin covers its hand-over.
        let wait = answer.wait_for(Option::is_some);
        match tokio::time::timeout(self.config.deadline + Duration::from_millis(250), wait).await {
            Ok(Ok(got)) => got.clone().unwrap_or(Err(BootError::Timeout)),
            Ok(Err(_)) => Err(BootError::Unavailable("the request was dropped".into())),
            Err(_) => Err(BootError::Timeout),
        }
    }

    /// Records a finished request: no longer in flight; cached when it succeeded.
    fn settle(&self, user: UserId, result: &Result<Arc<Booted>, BootError>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_flight.remove(&user);
        let Ok(booted) = result else { return };
        if self.config.cache_ttl.is_zero() {
            return;
        }
        let size = booted.channels.len();
        let entry = Cached {
            booted: booted.clone(),
            at: Instant::now(),
        };
        if let Some((_, old)) = state.cache.push(user, entry) {
            state.cached_channels -= old.booted.channels.len();
        }
        state.cached_channels += size;
        while state.cached_channels > CACHE_CHANNEL_BUDGET {
            let Some((_, old)) = state.cache.pop_lru() else {
                break;
            };
            state.cached_channels -= old.booted.channels.len();
        }
    }

    /// One request to the web app, within the deadline, counted and timed.
    async fn ask(&self, user: &UserId, team: &TeamId) -> Result<Arc<Booted>, BootError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.deadline, self.request(user, team))
            .await
            .unwrap_or(Err(BootError::Timeout));
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics.requests.with_label_values(&[outcome]).inc();
        if let Err(error) = &result {
            tracing::warn!(%user, %error, "boot from the web app failed");
        }
        result.map(Arc::new)
    }

    async fn request(&self, user: &UserId, team: &TeamId) -> Result<Booted, BootError> {
        let body = serde_json::json!({"user": user.as_str(), "team": team.as_str()}).to_string();
        let signature = self.config.secret.sign(body.as_bytes());
        let unavailable = |e: reqwest::Error| {
            if e.is_timeout() {
                BootError::Timeout
            } else {
                BootError::Unavailable(e.without_url().to_string())
            }
        };
        let mut response = self
            .client
            .post(&self.config.url)
            .header(SIGNATURE_HEADER, signature)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if !status.is_success() {
            return Err(BootError::Unavailable(format!("HTTP {status}")));
        }
        let too_large = || BootError::InvalidAnswer(format!("over {MAX_ANSWER_BYTES} bytes"));
        if response
            .content_length()
            .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        parse(&bytes)
    }
}

/// The web app's answer, as sent.
#[derive(serde::Deserialize)]
struct Wire {
    channels: Vec<String>,
    #[serde(default)]
    name: Option<String>,
}

/// The longest display name taken from the web app, in bytes.
const MAX_NAME_BYTES: usize = 256;

/// A boot answer, checked: at most [`MAX_TOKEN_CHANNELS`] channels, each a valid id, repeats
/// dropped; a name of at most [`MAX_NAME_BYTES`].
pub fn parse(bytes: &[u8]) -> Result<Booted, BootError> {
    let invalid = |why: String| BootError::InvalidAnswer(why);
    let wire: Wire = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    if wire.channels.len() > MAX_TOKEN_CHANNELS {
        return Err(invalid(format!("more than {MAX_TOKEN_CHANNELS} channels")));
    }
    if wire.name.as_ref().is_some_and(|n| n.len() > MAX_NAME_BYTES) {
        return Err(invalid(format!("a name over {MAX_NAME_BYTES} bytes")));
    }
    let mut seen = std::collections::HashSet::with_capacity(wire.channels.len());
    let mut channels = Vec::with_capacity(wire.channels.len());
    for raw in &wire.channels {
        let id = ChannelId::new(raw).map_err(|e| invalid(format!("channel {raw:.70}: {e}")))?;
        if seen.insert(id.clone()) {
            channels.push(id);
        }
    }
    Ok(Booted {
        channels: channels.into(),
        name: wire.name.filter(|n| !n.is_empty()),
    })
}

/// The channels a connection gets: the token's and the web app's without repeats (`Union`),
/// or the web app's (`Replace`).
pub fn unite(token: Vec<ChannelId>, booted: &Booted, mode: BootMode) -> Vec<ChannelId> {
    let mut all = match mode {
        BootMode::Union => token,
        BootMode::Replace => Vec::new(),
    };
    let mut seen: std::collections::HashSet<ChannelId> = all.iter().cloned().collect();
    all.reserve(booted.channels.len());
    for channel in booted.channels.iter() {
        if seen.insert(channel.clone()) {
            all.push(channel.clone());
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[&str]) -> Vec<ChannelId> {
        raw.iter().map(|c| ChannelId::new(c).unwrap()).collect()
    }

    #[test]
    fn an_answer_is_validated_and_its_repeats_dropped() {
        let booted = parse(br#"{"channels": ["C1", "C2", "C1"], "name": "ann"}"#).unwrap();
        assert_eq!(&*booted.channels, ids(&["C1", "C2"]).as_slice());
        assert_eq!(booted.name.as_deref(), Some("ann"));
        for bad in [
            &br#"{"channels": ["C1", "bad id"]}"#[..],
            br#"{"channels": "C1"}"#,
            br#"{"name": "x"}"#,
            b"not json",
            br#"{"channels": [""]}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(BootError::InvalidAnswer(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let many: Vec<String> = (0..=MAX_TOKEN_CHANNELS).map(|i| format!("C{i}")).collect();
        let body = serde_json::json!({ "channels": many }).to_string();
        assert!(matches!(
            parse(body.as_bytes()),
            Err(BootError::InvalidAnswer(_))
        ));
    }

    #[test]
    fn union_keeps_the_tokens_channels_and_replace_drops_them() {
        let booted = Booted {
            channels: ids(&["C2", "C3"]).into(),
            name: None,
        };
        assert_eq!(
            unite(ids(&["C1", "C2"]), &booted, BootMode::Union),
            ids(&["C1", "C2", "C3"])
        );
        assert_eq!(
            unite(ids(&["C1"]), &booted, BootMode::Replace),
            ids(&["C2", "C3"])
        );
    }

    #[test]
    fn each_error_has_its_connect_error() {
        assert_eq!(BootError::Timeout.code(), "boot_timeout");
        assert_eq!(
            BootError::Unavailable(String::new()).code(),
            "boot_unavailable"
        );
        assert_eq!(
            BootError::InvalidAnswer(String::new()).code(),
            "boot_invalid_answer"
        );
        assert_eq!(BootError::Busy.code(), "ratelimited");
    }
}
