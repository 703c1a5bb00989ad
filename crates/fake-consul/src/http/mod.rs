//! The HTTP surface: the router, and what every handler shares (errors, query parameters,
//! blocking-query parsing, read headers).
//!
//! Handlers, one module per Consul API area, turn requests into calls on the state through
//! [`App`]; every Consul-visible wording lives in them or in `txn.rs`.

mod agent;
mod kv;
mod session;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State as Shared};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Deserialize;

use crate::acl::{self, Caller};
use crate::app::{App, Arrival, BlockingQuery};
use crate::duration::{self, go_quote};

/// `?wait` when none is given, and its cap (`features/blocking.mdx`).
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

pub(super) type AppState = Shared<Arc<App>>;
pub(super) type Params = Query<Vec<(String, String)>>;

/// An error answer: a status and Consul's plain-text message.
#[derive(Debug)]
pub(crate) struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// Consul answers 500 for errors returned by its RPC layer.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, self.message).into_response()
    }
}

pub(super) type Answer = Result<Response, HttpError>;

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/v1/kv/{*key}",
            get(kv::kv_get).put(kv::kv_put).delete(kv::kv_delete),
        )
        .route("/v1/session/create", put(session::session_create))
        .route("/v1/session/renew/{id}", put(session::session_renew))
        .route("/v1/session/destroy/{id}", put(session::session_destroy))
        .route("/v1/session/info/{id}", get(session::session_info))
        .route("/v1/txn", put(kv::txn))
        .route("/v1/agent/service/register", put(agent::service_register))
        .route(
            "/v1/agent/service/deregister/{id}",
            put(agent::service_deregister),
        )
        .route("/v1/agent/check/{verb}/{id}", put(agent::check_update))
        .route("/v1/health/service/{name}", get(agent::health_service))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), gate))
        .with_state(app)
}

/// Counts every request; while the fake is "unavailable", fails it as Consul does without a
/// cluster leader; and resolves its ACL token (`acl.rs`), refusing what the caller may not do.
async fn gate(Shared(app): AppState, mut req: Request, next: Next) -> Response {
    let epoch = app.read(|st| st.epoch);
    req.extensions_mut().insert(Arrival { epoch });
    app.count(req.uri().path());
    if app.unavailable.load(Ordering::SeqCst) {
        return HttpError::internal("rpc error: No cluster leader").into_response();
    }
    let query: Vec<(String, String)> = Query::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .unwrap_or_default();
    let required = app.acl_token();
    let caller = match acl::resolve(required.as_deref(), req.headers(), &query) {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
    if caller == Caller::Anonymous
        && let Some(refused) = acl::anonymous_refusal(req.method(), req.uri().path())
    {
        return refused.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

pub(super) async fn not_found() -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        "Invalid URL path: not a recognized HTTP API endpoint\n",
    )
}

async fn method_not_allowed(method: Method) -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed"),
    )
}

/// The value of query parameter `name` ("" when given bare).
pub(super) fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Refuses query parameters Consul honours but the fake does not implement.
pub(super) fn refuse(params: &[(String, String)], names: &[&str]) -> Result<(), HttpError> {
    match names.iter().find(|n| param(params, n).is_some()) {
        Some(name) => Err(HttpError::bad_request(format!(
            "fake-consul does not implement ?{name}"
        ))),
        None => Ok(()),
    }
}

/// Go's `strconv.ParseUint`, with its error wording (Consul answers it with a 500).
pub(super) fn parse_uint(text: &str) -> Result<u64, HttpError> {
    let err = || {
        HttpError::internal(format!(
            "strconv.ParseUint: parsing {}: invalid syntax",
            go_quote(text)
        ))
    };
    text.parse().map_err(|_| err())
}

/// `?index` and `?wait`, with Consul's default, cap and up to `wait/16` jitter.
pub(super) fn blocking_query(
    params: &[(String, String)],
    arrival: Arrival,
) -> Result<BlockingQuery, HttpError> {
    let wait = match param(params, "wait") {
        None | Some("") => Duration::ZERO,
        Some(text) => {
            duration::parse(text).map_err(|_| HttpError::bad_request("Invalid wait time"))?
        }
    };
    let min_index = match param(params, "index") {
        None | Some("") => 0,
        Some(text) => text
            .parse()
            .map_err(|_| HttpError::bad_request("Invalid index"))?,
    };
    let wait = if wait.is_zero() {
        DEFAULT_WAIT
    } else {
        wait.min(MAX_WAIT)
    };
    let jitter_ms = u64::try_from(wait.as_millis() / 16).unwrap_or(0);
    let wait = wait + Duration::from_millis(rand::random_range(0..=jitter_ms));
    Ok(BlockingQuery {
        min_index,
        wait,
        epoch: arrival.epoch,
    })
}

/// The headers Consul sets on reads.
pub(super) fn read_meta(index: u64) -> [(&'static str, String); 3] {
    [
        ("X-Consul-Index", index.to_string()),
        ("X-Consul-KnownLeader", "true".to_owned()),
        ("X-Consul-LastContact", "0".to_owned()),
    ]
}

pub(super) fn decode_body<T: Default + for<'de> Deserialize<'de>>(
    body: &[u8],
) -> Result<T, HttpError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| HttpError::bad_request(format!("Request decode failed: {e}")))
}
