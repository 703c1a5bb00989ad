//! A process's logging and tracing: `tracing` events to stderr (text, or JSON lines), and, when
//! an OTLP endpoint is given, spans exported to it over OTLP/gRPC in batches.
//!
//! The two have their own filters. Logs follow `RUST_LOG` (default [`DEFAULT_LOG_FILTER`]);
//! spans follow [`TRACE_TARGETS`] at debug level, where the message path's per-event spans
//! live, so that without an endpoint those spans are never even created.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::Error;

/// Logs when `RUST_LOG` is not set: warnings, and what channelmesh's own crates say at info.
pub const DEFAULT_LOG_FILTER: &str = "warn,channelmesh=info,ring_manager=info,ring_client=info,channel_server=info,channel_client=info,gateway=info,admin_server=info,presence_server=info,presence_client=info,mesh_transport=info,mesh_telemetry=info";

/// The crates whose spans (down to debug level) are exported when tracing is on.
pub const TRACE_TARGETS: &[&str] = &[
    "channelmesh",
    "admin_server",
    "channel_server",
    "channel_client",
    "gateway",
    "presence_server",
    "ring_manager",
    "ring_client",
    "presence_client",
];

/// Env var the OTLP endpoint is also read from (OpenTelemetry's own name for it).
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The process's tracing, once [`init`] installed it: flush before exit.
#[derive(Debug)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now (blocking; call it off the async workers or accept a
    /// short stall).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }

    /// Flushes and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "stopping the span exporter failed");
        }
    }
}

/// Installs the process's global subscriber: logs to stderr (JSON lines with `log_json`), and
/// with `otlp_endpoint` (e.g. `http://127.0.0.1:4317`) spans exported as `service_name`.
/// Must run inside a Tokio runtime when exporting (the gRPC exporter lives on it).
pub fn init(
    log_json: bool,
    otlp_endpoint: Option<&str>,
    service_name: &str,
) -> Result<Tracing, Error> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if log_json {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let provider = otlp_endpoint
        .filter(|e| !e.is_empty())
        .map(|endpoint| exporter(endpoint, service_name))
        .transpose()?;
    let spans = provider.as_ref().map(|provider| {
        let targets = TRACE_TARGETS.iter().fold(Targets::new(), |t, target| {
            t.with_target(*target, LevelFilter::DEBUG)
        });
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name.to_string()))
            .with_filter(targets)
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|e| Error::AlreadyInstalled(e.to_string()))?;
    if let Some(endpoint) = otlp_endpoint.filter(|_| provider.is_some()) {
        tracing::info!(
            endpoint,
            service = service_name,
            "exporting traces over OTLP"
        );
    }
    Ok(Tracing { provider })
}

fn exporter(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, Error> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Exporter(format!("{endpoint}: {e}")))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build())
}
