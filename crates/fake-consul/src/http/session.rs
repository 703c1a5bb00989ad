//! Sessions (`api-docs/session.mdx`, `agent/session_endpoint.go`,
//! `agent/consul/session_endpoint.go`).

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State as Shared};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Answer, AppState, HttpError, Params, blocking_query, decode_body, read_meta};
use crate::app::Arrival;
use crate::duration;
use crate::state::{Behavior, NODE, Session};

/// Session TTL bounds (`session.mdx`) and the default lock-delay.
const SESSION_TTL_MIN: Duration = Duration::from_secs(10);
const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);
const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct SessionRequest {
    name: String,
    node: String,
    lock_delay: Option<Value>,
    behavior: String,
    #[serde(rename = "TTL")]
    ttl: String,
    checks: Option<Vec<String>>,
    node_checks: Option<Vec<String>>,
}

/// `LockDelay` as Consul's `FixupLockDelay` reads it: a duration string or nanoseconds, with
/// values below 1000 taken as seconds.
fn lock_delay(raw: Option<Value>) -> Result<Duration, HttpError> {
    let decode_error = |e: String| HttpError::bad_request(format!("Request decode failed: {e}"));
    let delay = match raw {
        None => return Ok(DEFAULT_LOCK_DELAY),
        Some(Value::String(text)) => duration::parse(&text).map_err(decode_error)?,
        Some(Value::Number(n)) => Duration::from_nanos(n.as_f64().unwrap_or(0.0).max(0.0) as u64),
        Some(other) => return Err(decode_error(format!("invalid LockDelay {other}"))),
    };
    if delay < Duration::from_nanos(1000) {
        return Ok(Duration::from_secs(delay.as_nanos() as u64));
    }
    Ok(delay)
}

pub(super) async fn session_create(Shared(app): AppState, body: Bytes) -> Answer {
    let req: SessionRequest = decode_body(&body)?;
    let lock_delay = lock_delay(req.lock_delay)?;
    let behavior = match req.behavior.as_str() {
        "" | "release" => Behavior::Release,
        "delete" => Behavior::Delete,
        other => {
            return Err(HttpError::internal(format!(
                "Invalid Behavior setting '{other}'"
            )));
        }
    };
    let ttl = match req.ttl.as_str() {
        "" => None,
        text => Some(
            duration::parse(text)
                .map_err(|e| HttpError::internal(format!("Session TTL '{text}' invalid: {e}")))?,
        ),
    };
    let ttl = ttl.filter(|ttl| !ttl.is_zero());
    if let Some(ttl) = ttl.filter(|ttl| *ttl < SESSION_TTL_MIN || *ttl > SESSION_TTL_MAX) {
        let message = format!(
            "Invalid Session TTL '{}', must be between [10s=24h0m0s]",
            ttl.as_nanos()
        );
        return Err(HttpError::internal(message));
    }
    if !req.node.is_empty() && req.node != NODE {
        return Err(HttpError::internal("Missing node registration"));
    }
    let session = Session {
        name: req.name,
        lock_delay,
        behavior,
        ttl_text: req.ttl,
        ttl,
        expires: None,
        node_checks: req
            .node_checks
            .or(req.checks)
            .unwrap_or_else(|| vec!["serfHealth".to_owned()]),
        create_index: 0,
    };
    let id = app.write(|st| st.create_session(session, Instant::now()));
    Ok(Json(json!({ "ID": id })).into_response())
}

pub(super) async fn session_renew(Shared(app): AppState, Path(id): Path<String>) -> Answer {
    let renewed = app.write(|st| st.renew_session(&id, Instant::now()));
    match renewed {
        Some(session) => Ok(Json(json!([session])).into_response()),
        None => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        )),
    }
}

pub(super) async fn session_destroy(Shared(app): AppState, Path(id): Path<String>) -> Answer {
    app.write(|st| st.invalidate_session(&id, Instant::now()));
    Ok(Json(true).into_response())
}

pub(super) async fn session_info(
    Shared(app): AppState,
    Extension(arrival): Extension<Arrival>,
    Path(id): Path<String>,
    Query(params): Params,
) -> Answer {
    let query = blocking_query(&params, arrival)?;
    let (index, sessions) = app
        .blocking(query, |st| {
            let found: Vec<Value> = st
                .sessions
                .get(&id)
                .map(|s| s.to_json(&id))
                .into_iter()
                .collect();
            (st.session_index, found)
        })
        .await;
    Ok((read_meta(index), Json(sessions)).into_response())
}
