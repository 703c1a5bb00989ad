//! One service's metrics registry and readiness: what its `/metrics` and `/readyz` answer.
//!
//! Metrics are created through [`Telemetry`], which registers them in the service's own
//! registry. A name registered twice (a bug) is logged and the metric is still returned,
//! unregistered: metrics never take a service down.

use std::sync::{Arc, Mutex, RwLock};

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets, in seconds: 50 µs to 5 s, about three per decade.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Whether a service takes traffic: `Err(reason)` when not.
pub type Readiness = Result<(), String>;

type ReadyCheck = Arc<dyn Fn() -> Readiness + Send + Sync>;
type ScrapeHook = Arc<dyn Fn() + Send + Sync>;

/// A service's metrics registry and readiness check; cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// Until the service sets one, it is not ready ("starting").
    ready: RwLock<Option<ReadyCheck>>,
    /// Run before each scrape: they set gauges from the service's live state.
    hooks: Mutex<Vec<ScrapeHook>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("ready", &self.readiness())
            .finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new(&[])
    }
}

impl Telemetry {
    /// A registry whose every series carries `labels` (the service's identity, e.g.
    /// `[("node", "cs-1")]`). Labels with an invalid name are left out, with a warning.
    pub fn new(labels: &[(&str, &str)]) -> Self {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let registry = Registry::new_custom(None, Some(labels)).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "invalid metric labels; serving metrics without them");
            Registry::new()
        });
        Telemetry {
            inner: Arc::new(Inner {
                registry,
                ready: RwLock::new(None),
                hooks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The registry, for collectors of one's own.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    fn register<C: Collector + Clone + 'static>(&self, collector: C) -> C {
        if let Err(e) = self.inner.registry.register(Box::new(collector.clone())) {
            tracing::warn!(error = %e, "metric not registered");
        }
        collector
    }

    /// A counter.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        let counter = IntCounter::with_opts(Opts::new(name, help))
            .unwrap_or_else(|e| invalid(name, e, || IntCounter::new("invalid", "invalid")));
        self.register(counter)
    }

    /// A counter with `labels`.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let counter = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
            invalid(name, e, || {
                IntCounterVec::new(Opts::new("invalid", "invalid"), labels)
            })
        });
        self.register(counter)
    }

    /// A gauge.
    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let gauge = IntGauge::with_opts(Opts::new(name, help))
            .unwrap_or_else(|e| invalid(name, e, || IntGauge::new("invalid", "invalid")));
        self.register(gauge)
    }

    /// A gauge with `labels`.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let gauge = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
            invalid(name, e, || {
                IntGaugeVec::new(Opts::new("invalid", "invalid"), labels)
            })
        });
        self.register(gauge)
    }

    /// A latency histogram in seconds, with [`LATENCY_BUCKETS`].
    pub fn latency(&self, name: &str, help: &str) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        let histogram = Histogram::with_opts(opts).unwrap_or_else(|e| {
            invalid(name, e, || {
                Histogram::with_opts(HistogramOpts::new("invalid", "invalid"))
            })
        });
        self.register(histogram)
    }

    /// A latency histogram in seconds with `labels`.
    pub fn latency_vec(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        let histogram = HistogramVec::new(opts, labels).unwrap_or_else(|e| {
            invalid(name, e, || {
                HistogramVec::new(HistogramOpts::new("invalid", "invalid"), labels)
            })
        });
        self.register(histogram)
    }

    /// Runs `hook` before every scrape: it sets gauges from the service's live state (counts
    /// that are cheaper to read when asked than to keep current on every change).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(hook));
    }

    /// Sets how readiness is decided: `check` is asked on every `/readyz`.
    pub fn set_ready(&self, check: impl Fn() -> Readiness + Send + Sync + 'static) {
        *self.inner.ready.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(check));
    }

    /// Marks the service as not ready for good (it is stopping).
    pub fn set_stopping(&self) {
        self.set_ready(|| Err("stopping".to_string()));
    }

    /// Whether the service takes traffic now.
    pub fn readiness(&self) -> Readiness {
        let check = self
            .inner
            .ready
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match check {
            Some(check) => check(),
            None => Err("starting".to_string()),
        }
    }

    /// Every metric in Prometheus' text format, after running the scrape hooks.
    pub fn encode(&self) -> String {
        // Cloned out so that a hook never runs under the lock.
        let hooks: Vec<ScrapeHook> = self
            .inner
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for hook in hooks {
            hook();
        }
        TextEncoder::new()
            .encode_to_string(&self.inner.registry.gather())
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }
}

/// A metric whose definition is invalid (a bug): logged, and replaced by a placeholder.
fn invalid<M>(
    name: &str,
    error: prometheus::Error,
    placeholder: impl FnOnce() -> prometheus::Result<M>,
) -> M {
    tracing::error!(metric = name, error = %error, "invalid metric definition");
    match placeholder() {
        Ok(m) => m,
        // The placeholder's definition is fixed and valid.
        Err(e) => unreachable!("placeholder metric: {e}"),
    }
}

/// Seconds since `micros` (microseconds since the Unix epoch) by this machine's clock; `None`
/// for 0 (not set) or a time in the future (clocks of two machines disagree).
pub fn seconds_since_unix_micros(micros: u64) -> Option<f64> {
    if micros == 0 {
        return None;
    }
    let now = unix_micros();
    (now >= micros).then(|| (now - micros) as f64 / 1e6)
}

/// Microseconds since the Unix epoch.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_metrics_with_the_service_labels() {
        let telemetry = Telemetry::new(&[("node", "cs-1")]);
        let published = telemetry.counter_vec("published_total", "events", &["kind"]);
        published.with_label_values(&["message"]).inc_by(3);
        let streams = telemetry.gauge("streams", "open streams");
        let live = Arc::new(std::sync::atomic::AtomicI64::new(0));
        {
            let live = live.clone();
            telemetry
                .on_scrape(move || streams.set(live.load(std::sync::atomic::Ordering::Relaxed)));
        }
        live.store(2, std::sync::atomic::Ordering::Relaxed);
        telemetry
            .latency("publish_seconds", "latency")
            .observe(0.0003);

        let text = telemetry.encode();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("valid exposition format");
        let value = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| (s.value.clone(), s.labels.get("node").map(str::to_string)))
        };
        assert_eq!(
            value("published_total"),
            Some((prometheus_parse::Value::Counter(3.0), Some("cs-1".into())))
        );
        assert_eq!(
            value("streams"),
            Some((prometheus_parse::Value::Gauge(2.0), Some("cs-1".into())))
        );
        assert!(text.contains("publish_seconds_bucket{node=\"cs-1\",le=\"0.0005\"} 1"));
    }

    #[test]
    fn a_duplicate_name_is_not_fatal() {
        let telemetry = Telemetry::default();
        let a = telemetry.counter("dup_total", "first");
        let b = telemetry.counter("dup_total", "second");
        a.inc();
        b.inc();
        assert!(telemetry.encode().contains("dup_total 1"));
    }

    #[test]
    fn readiness_starts_false_and_follows_the_check() {
        let telemetry = Telemetry::default();
        assert_eq!(telemetry.readiness(), Err("starting".to_string()));
        telemetry.set_ready(|| Ok(()));
        assert_eq!(telemetry.readiness(), Ok(()));
        telemetry.set_stopping();
        assert!(telemetry.readiness().is_err());
    }

    #[test]
    fn ages_from_wall_clock_micros() {
        assert_eq!(seconds_since_unix_micros(0), None);
        assert_eq!(seconds_since_unix_micros(u64::MAX), None);
        let age = seconds_since_unix_micros(unix_micros() - 2_000_000).expect("in the past");
        assert!(age >= 2.0);
    }
}
