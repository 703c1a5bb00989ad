//! Observability shared by every channelmesh service.
//!
//! - [`metrics`]: a service's Prometheus registry and readiness check ([`Telemetry`]);
//! - [`http`]: the small HTTP router that serves them as `/metrics`, `/healthz`, `/readyz`;
//! - [`access`]: who may read HTTP endpoints beyond the health probes (loopback, or the
//!   `--http-token` elsewhere), for every listener that serves them;
//! - [`init`]: logging (text or JSON lines) and, when an OTLP endpoint is given, OpenTelemetry
//!   tracing, for a whole process;
//! - [`propagation`]: W3C trace context through gRPC metadata and internal messages, so that
//!   one post is one trace across the admin server, the channel server and the gateway;
//! - [`side_port`]: where a gRPC service serves its HTTP side by default (gRPC port + 40), and
//!   serving it beside the service; [`LogArgs`]: the `--log-json`/`--otlp-endpoint` flags;
//!   [`HttpArgs`]: `--http-token`.
//!
//! Each service gets its own [`Telemetry`] (its own registry, with its identity as constant
//! labels), so that the in-process `dev` mesh serves each service's own metrics on its own
//! port, exactly as separate processes would.

pub mod access;
mod args;
pub mod http;
pub mod init;
pub mod metrics;
pub mod propagation;
pub mod side_port;

pub use args::{HttpArgs, LogArgs};
pub use init::{Tracing, init};
pub use metrics::Telemetry;
/// The Prometheus client every service registers its metrics with (one version everywhere).
pub use prometheus;

/// Errors of the telemetry set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OTLP exporter could not be built (a bad endpoint URL, say).
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// A global tracing subscriber was already installed in this process.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
    /// A service's listener could not be bound ([`side_port`]).
    #[error("binding {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// An HTTP side port or console was asked for off loopback without an HTTP token.
    #[error(
        "{addr} is not a loopback address: serving /metrics or a console there needs a bearer \
         token (--http-token or CHANNELMESH_HTTP_TOKEN)"
    )]
    HttpTokenRequired { addr: std::net::SocketAddr },
    /// The HTTP token cannot be used.
    #[error("--http-token (CHANNELMESH_HTTP_TOKEN): {0}")]
    HttpToken(String),
}
