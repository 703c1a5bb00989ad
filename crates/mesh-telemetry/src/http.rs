//! The HTTP side of a service's telemetry: `/metrics` (Prometheus text), `/healthz` (the
//! process runs) and `/readyz` (it takes traffic: 200, or 503 with the reason). Off loopback,
//! `/metrics` needs the HTTP token ([`crate::access`]); the probes stay open.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Telemetry;

/// `/metrics`, `/healthz` and `/readyz` for `telemetry`; merge it into a service's own router
/// (the gateway) or serve it alone ([`serve`]).
pub fn router(telemetry: Telemetry) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(probes(telemetry))
}

/// `/metrics` and `/readyz` only, for a router that has its own `/healthz`.
pub fn probes(telemetry: Telemetry) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .with_state(telemetry)
}

async fn metrics(State(telemetry): State<Telemetry>) -> Response {
    let mut response = telemetry.encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn readyz(State(telemetry): State<Telemetry>) -> Response {
    match telemetry.readiness() {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// Serves [`router`] on `listener` until `cancel`, everything but the probes guarded by the
/// listener's [`Access`](crate::access::Access).
pub async fn serve(
    listener: TcpListener,
    telemetry: Telemetry,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::debug!(%addr, "telemetry HTTP listening");
    let app = crate::access::guard(router(telemetry), addr, crate::access::all_but_probes);
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}
