//! KV reads and writes (`api-docs/kv.mdx`, `agent/kvs_endpoint.go`) and `/v1/txn`
//! (`api-docs/txn.mdx`, `agent/txn_endpoint.go`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State as Shared};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;
use tokio::time::Instant;

use super::{
    Answer, AppState, HttpError, Params, blocking_query, param, parse_uint, read_meta, refuse,
};
use crate::acl::{self, Caller};
use crate::app::{App, Arrival, BlockingQuery};
use crate::duration::go_quote;
use crate::state::State;
use crate::txn;

/// A missing key answers with the KV table's index (Consul's `kvsMaxIndex`, never below 1),
/// so a blocking read of an absent key wakes on any KV write; a present key answers with its
/// own `ModifyIndex`. `?recurse` reads every key under a prefix ([`kv_list`]).
pub(super) async fn kv_get(
    Shared(app): AppState,
    Extension(arrival): Extension<Arrival>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    Query(params): Params,
) -> Answer {
    refuse(&params, &["keys", "separator"])?;
    let query = blocking_query(&params, arrival)?;
    if param(&params, "recurse").is_some() {
        return Ok(kv_list(&app, query, caller, &key).await);
    }
    if caller == Caller::Anonymous {
        return Err(acl::anonymous_denied("key", "read", &key));
    }
    let (index, entry) = app
        .blocking(query, |state| match state.kv.entries.get(&key) {
            Some(entry) => (entry.modify_index, Some(entry.clone())),
            None => (state.kv.index.max(1), None),
        })
        .await;
    let meta = read_meta(index);
    Ok(match entry {
        None => (StatusCode::NOT_FOUND, meta).into_response(),
        Some(entry) if param(&params, "raw").is_some() => {
            let raw_headers = [
                ("Content-Type", "text/plain"),
                ("X-Content-Type-Options", "nosniff"),
                ("Content-Security-Policy", "sandbox"),
            ];
            (meta, raw_headers, entry.value).into_response()
        }
        Some(entry) => (meta, Json(json!([entry.to_json(&key, true)]))).into_response(),
    })
}

/// `?recurse`: every entry under `prefix`, from one snapshot, blocking on the prefix's index
/// (`kvsListTxn`). Nothing under it is a 404. ACLs filter a list rather than refuse it: an
/// anonymous caller (with a deny-all default) reads nothing, and Consul does not say so to an
/// anonymous caller (no `X-Consul-Results-Filtered-By-ACLs`).
async fn kv_list(
    app: &App,
    query: BlockingQuery,
    caller: Caller,
    prefix: &str,
) -> axum::response::Response {
    let (index, entries) = app.blocking(query, |st| st.kv.list(prefix)).await;
    let meta = read_meta(index);
    if entries.is_empty() || caller == Caller::Anonymous {
        return (StatusCode::NOT_FOUND, meta).into_response();
    }
    let entries: Vec<_> = entries.iter().map(|(k, e)| e.to_json(k, true)).collect();
    (meta, Json(entries)).into_response()
}

fn conflicting(params: &[(String, String)], flags: &[&str]) -> Result<(), HttpError> {
    if flags.iter().filter(|f| param(params, f).is_some()).count() > 1 {
        let mut pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.sort();
        return Err(HttpError::bad_request(format!(
            "Conflicting flags: {}\n",
            pairs.join("&")
        )));
    }
    Ok(())
}

pub(super) async fn kv_put(
    Shared(app): AppState,
    Path(key): Path<String>,
    Query(params): Params,
    body: Bytes,
) -> Answer {
    conflicting(&params, &["cas", "acquire", "release"])?;
    let flags = param(&params, "flags")
        .map(parse_uint)
        .transpose()?
        .unwrap_or(0);
    let value = body.to_vec();
    let now = Instant::now();
    let done = if let Some(cas) = param(&params, "cas") {
        let cas = parse_uint(cas)?;
        app.write(|st| {
            let idx = st.bump();
            st.kv.cas(idx, &key, value, flags, cas).is_some()
        })
    } else if let Some(session) = param(&params, "acquire") {
        app.write(|st| {
            // Consul checks lock-delay before the write, and the session inside it.
            if st.in_lock_delay(&key, now) {
                return Ok(false);
            }
            check_session(st, session)?;
            let idx = st.bump();
            Ok(st.kv.lock(idx, &key, value, flags, session).is_some())
        })?
    } else if let Some(session) = param(&params, "release") {
        if session.is_empty() {
            return Err(HttpError::internal("missing session"));
        }
        app.write(|st| {
            let idx = st.bump();
            st.kv.unlock(idx, &key, value, flags, session).is_some()
        })
    } else {
        app.write(|st| {
            let idx = st.bump();
            st.kv.set(idx, &key, value, flags);
            true
        })
    };
    Ok(Json(done).into_response())
}

fn check_session(state: &State, session: &str) -> Result<(), HttpError> {
    if session.is_empty() {
        return Err(HttpError::internal("missing session"));
    }
    if !state.sessions.contains_key(session) {
        return Err(HttpError::internal(format!(
            "invalid session {}",
            go_quote(session)
        )));
    }
    Ok(())
}

pub(super) async fn kv_delete(
    Shared(app): AppState,
    Path(key): Path<String>,
    Query(params): Params,
) -> Answer {
    conflicting(&params, &["recurse", "cas"])?;
    let done = if param(&params, "recurse").is_some() {
        app.write(|st| {
            let idx = st.bump();
            st.kv.delete_tree(idx, &key);
            true
        })
    } else if let Some(cas) = param(&params, "cas") {
        let cas = parse_uint(cas)?;
        app.write(|st| {
            let idx = st.bump();
            st.kv.delete_cas(idx, &key, cas)
        })
    } else {
        app.write(|st| {
            let idx = st.bump();
            st.kv.delete(idx, &key);
            true
        })
    };
    Ok(Json(done).into_response())
}

pub(super) async fn txn(
    Shared(app): AppState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Answer {
    let ops = txn::decode(&body)?;
    if caller == Caller::Anonymous {
        // Consul vets each operation's ACL before applying any: every KV operation fails.
        let errors: Vec<_> = (0..ops.len())
            .map(|i| json!({ "OpIndex": i, "What": acl::PERMISSION_DENIED }))
            .collect();
        let body = Json(json!({ "Results": null, "Errors": errors }));
        return Ok((StatusCode::CONFLICT, body).into_response());
    }
    let writes = ops.iter().flatten().any(txn::is_write);
    let now = Instant::now();
    let outcome = if writes {
        app.write(|st| {
            let idx = st.index + 1;
            let (kv, results) = txn::apply(st, &ops, idx, now)?;
            st.index = idx;
            st.kv = kv;
            Ok(results)
        })
    } else {
        app.read(|st| txn::apply(st, &ops, st.index, now).map(|(_, results)| results))
    };
    Ok(match outcome {
        Ok(results) if writes => {
            Json(json!({ "Results": results, "Errors": null })).into_response()
        }
        // Read-only transactions take the fast path, which reports leader contact.
        Ok(results) => {
            let leader = [
                ("X-Consul-KnownLeader", "true"),
                ("X-Consul-LastContact", "0"),
            ];
            (leader, Json(json!({ "Results": results, "Errors": null }))).into_response()
        }
        Err(errors) => (
            StatusCode::CONFLICT,
            Json(json!({ "Results": null, "Errors": errors })),
        )
            .into_response(),
    })
}
