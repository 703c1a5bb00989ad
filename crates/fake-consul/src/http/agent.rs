//! Agent services and TTL checks (`api-docs/agent/service.mdx`, `api-docs/agent/check.mdx`)
//! and `/v1/health/service` (`api-docs/health.mdx`, `agent/health_endpoint.go`).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State as Shared};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::{
    Answer, AppState, HttpError, Params, blocking_query, decode_body, not_found, param, read_meta,
    refuse,
};
use crate::acl::Caller;
use crate::app::Arrival;
use crate::catalog::{
    CRITICAL, CheckDef, CheckUpdateError, PASSING, Registration, ServiceDef, WARNING,
};
use crate::duration::{self, go_quote};

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct ServiceRequest {
    #[serde(rename = "ID")]
    id: String,
    name: String,
    tags: Option<Vec<String>>,
    address: String,
    port: i64,
    meta: Option<BTreeMap<String, String>>,
    check: Option<CheckRequest>,
    checks: Option<Vec<CheckRequest>>,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
struct CheckRequest {
    #[serde(rename = "CheckID", alias = "ID")]
    check_id: String,
    name: String,
    notes: String,
    status: String,
    #[serde(rename = "TTL")]
    ttl: String,
    deregister_critical_service_after: String,
    /// Other check kinds (`HTTP`, `TCP`, `Args`, `Interval`, ...): accepted, never run.
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// An optional duration field: "" and zero mean "not set".
fn optional_duration(text: &str) -> Result<Option<Duration>, HttpError> {
    if text.is_empty() {
        return Ok(None);
    }
    let parsed = duration::parse(text)
        .map_err(|e| HttpError::bad_request(format!("Request decode failed: {e}")))?;
    Ok(Some(parsed).filter(|d| !d.is_zero()))
}

fn registration(
    req: ServiceRequest,
    replace_existing_checks: bool,
) -> Result<Registration, HttpError> {
    if req.name.is_empty() {
        return Err(HttpError::bad_request("Missing service name"));
    }
    let id = if req.id.is_empty() {
        req.name.clone()
    } else {
        req.id
    };
    // Like `ServiceDefinition.CheckTypes`: `Check` first, then `Checks`; empty ones dropped.
    let requested: Vec<CheckRequest> = req
        .check
        .into_iter()
        .chain(req.checks.into_iter().flatten())
        .filter(|c| *c != CheckRequest::default())
        .collect();
    let numbered = requested.len() > 1;
    let mut checks = Vec::with_capacity(requested.len());
    for (i, c) in requested.into_iter().enumerate() {
        let status = match c.status.as_str() {
            "" => CRITICAL.to_owned(),
            PASSING | WARNING | CRITICAL => c.status,
            _ => {
                return Err(HttpError::bad_request(
                    "Status for checks must 'passing', 'warning', 'critical'",
                ));
            }
        };
        let check_id = match (c.check_id.is_empty(), numbered) {
            (false, _) => c.check_id,
            (true, false) => format!("service:{id}"),
            (true, true) => format!("service:{id}:{}", i + 1),
        };
        checks.push(CheckDef {
            id: check_id,
            name: if c.name.is_empty() {
                format!("Service '{}' check", req.name)
            } else {
                c.name
            },
            notes: c.notes,
            status,
            ttl: optional_duration(&c.ttl)?,
            deregister_after: optional_duration(&c.deregister_critical_service_after)?,
        });
    }
    let service = ServiceDef {
        id,
        name: req.name,
        tags: req.tags.unwrap_or_default(),
        address: req.address,
        port: req.port,
        meta: req.meta.unwrap_or_default(),
    };
    Ok(Registration {
        service,
        checks,
        replace_existing_checks,
    })
}

pub(super) async fn service_register(
    Shared(app): AppState,
    Query(params): Params,
    body: Bytes,
) -> Answer {
    let req: ServiceRequest = decode_body(&body)?;
    let replace =
        param(&params, "replace-existing-checks").is_some_and(|v| v != "false" && v != "0");
    let reg = registration(req, replace)?;
    app.write(|st| st.register_service(reg, Instant::now()));
    Ok(StatusCode::OK.into_response())
}

pub(super) async fn service_deregister(Shared(app): AppState, Path(id): Path<String>) -> Answer {
    if app.write(|st| st.deregister_service(&id)) {
        return Ok(StatusCode::OK.into_response());
    }
    let message = format!(
        "Unknown service ID {}. Ensure that the service ID is passed, not the service name.",
        go_quote(&id)
    );
    Err(HttpError::new(StatusCode::NOT_FOUND, message))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct CheckUpdate {
    status: String,
    output: String,
}

/// `pass`, `warn`, `fail` (with `?note=`) and `update` (with a JSON body).
pub(super) async fn check_update(
    Shared(app): AppState,
    Path((verb, id)): Path<(String, String)>,
    Query(params): Params,
    body: Bytes,
) -> Answer {
    let note = || param(&params, "note").unwrap_or("").to_owned();
    let (status, output) = match verb.as_str() {
        "pass" => (PASSING.to_owned(), note()),
        "warn" => (WARNING.to_owned(), note()),
        "fail" => (CRITICAL.to_owned(), note()),
        "update" => {
            let update: CheckUpdate = decode_body(&body)?;
            if ![PASSING, WARNING, CRITICAL].contains(&update.status.as_str()) {
                return Err(HttpError::bad_request(format!(
                    "Invalid check status: '{}'",
                    update.status
                )));
            }
            (update.status, update.output)
        }
        _ => return Err(not_found().await),
    };
    match app.write(|st| st.update_ttl_check(&id, &status, output, Instant::now())) {
        Ok(()) => Ok(StatusCode::OK.into_response()),
        Err(CheckUpdateError::Unknown) => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown check ID {}. Ensure that the check ID is passed, not the check name.",
                go_quote(&id)
            ),
        )),
        Err(CheckUpdateError::NotTtl) => Err(HttpError::internal(format!(
            "CheckID {} does not have associated TTL",
            go_quote(&id)
        ))),
    }
}

/// Go's `strconv.ParseBool`.
fn go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

pub(super) async fn health_service(
    Shared(app): AppState,
    Extension(arrival): Extension<Arrival>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(params): Params,
) -> Answer {
    refuse(&params, &["tag", "filter", "near", "node-meta"])?;
    let passing = match param(&params, "passing") {
        None => false,
        Some("") => true,
        Some(text) => {
            go_bool(text).ok_or_else(|| HttpError::bad_request("Invalid value for ?passing"))?
        }
    };
    let query = blocking_query(&params, arrival)?;
    let (index, entries) = app
        .blocking(query, |st| {
            (
                st.catalog.index_for(&name),
                st.catalog.health(&name, passing),
            )
        })
        .await;
    // ACLs filter what an anonymous caller reads down to nothing, silently.
    let entries = match caller {
        Caller::Anonymous => Vec::new(),
        Caller::Management => entries,
    };
    Ok((read_meta(index), Json(entries)).into_response())
}
