//! `/v1/txn` for KV operations: the verbs of Consul's `agent/consul/state/txn.go`, all or nothing.
//!
//! Operations run in order against a clone of the KV table, so later operations see earlier
//! ones; if any fails, every error is reported and the clone is dropped. Error texts are
//! Consul's own.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::duration::go_quote;
use crate::http::HttpError;
use crate::kv::{Entry, Kv};
use crate::state::State;

/// The most operations one transaction may hold (the current `txn.mdx` limit).
const MAX_OPS: usize = 128;

/// One KV operation, with its value already base64-decoded.
#[derive(Debug)]
pub(crate) struct KvOp {
    verb: String,
    key: String,
    value: Vec<u8>,
    flags: u64,
    index: u64,
    session: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireOp {
    #[serde(rename = "KV")]
    kv: Option<WireKv>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct WireKv {
    verb: String,
    key: String,
    value: Option<String>,
    flags: u64,
    index: u64,
    session: String,
}

/// Decodes the request body. `None` is an operation naming no kind, which Consul rejects
/// inside the transaction ("no operation specified").
pub(crate) fn decode(body: &[u8]) -> Result<Vec<Option<KvOp>>, HttpError> {
    let parse_error = |e: String| HttpError::bad_request(format!("Failed to parse body: {e}"));
    let wire: Vec<WireOp> = serde_json::from_slice(body).map_err(|e| parse_error(e.to_string()))?;
    if wire.len() > MAX_OPS {
        let message = format!(
            "Transaction contains too many operations ({} > {MAX_OPS})",
            wire.len()
        );
        return Err(HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, message));
    }
    let mut ops = Vec::with_capacity(wire.len());
    for (i, op) in wire.into_iter().enumerate() {
        let Some(kv) = op.kv else {
            if let Some(kind) = op.other.keys().next() {
                let message = format!(
                    "fake-consul implements only KV operations in /v1/txn; operation {i} is {kind}"
                );
                return Err(HttpError::bad_request(message));
            }
            ops.push(None);
            continue;
        };
        let value = match kv.value {
            None => Vec::new(),
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| parse_error(format!("failed to decode value: {e}")))?,
        };
        let WireKv {
            verb,
            key,
            flags,
            index,
            session,
            ..
        } = kv;
        ops.push(Some(KvOp {
            verb,
            key,
            value,
            flags,
            index,
            session,
        }));
    }
    Ok(ops)
}

/// Whether a verb writes (and so goes through "Raft" rather than the read-only fast path).
pub(crate) fn is_write(op: &KvOp) -> bool {
    matches!(
        op.verb.as_str(),
        "set" | "cas" | "lock" | "unlock" | "delete" | "delete-cas" | "delete-tree"
    )
}

/// Runs the transaction at Raft index `idx`: the new KV table and the `Results`, or the
/// `Errors`. The caller commits the table.
pub(crate) fn apply(
    state: &State,
    ops: &[Option<KvOp>],
    idx: u64,
    now: Instant,
) -> Result<(Kv, Vec<Value>), Vec<Value>> {
    let error = |i: usize, what: String| json!({ "OpIndex": i, "What": what });
    // Consul's pre-checks, made before the transaction is applied.
    let mut errors = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Some(op) = op else { continue };
        if op.key.is_empty() && op.verb != "delete-tree" {
            errors.push(error(i, "Must provide key".to_owned()));
        } else if op.verb == "lock" && state.in_lock_delay(&op.key, now) {
            let what = format!("failed to lock key {} due to lock delay", go_quote(&op.key));
            errors.push(error(i, what));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut kv = state.kv.clone();
    let mut results = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let outcome = match op {
            Some(op) => run(&mut kv, state, idx, op),
            None => Err("no operation specified".to_owned()),
        };
        match outcome {
            Ok(entries) => results.extend(entries),
            Err(what) => errors.push(error(i, what)),
        }
    }
    if errors.is_empty() {
        Ok((kv, results))
    } else {
        Err(errors)
    }
}

fn result(key: &str, entry: &Entry, with_value: bool) -> Value {
    json!({ "KV": entry.to_json(key, with_value) })
}

fn run(kv: &mut Kv, state: &State, idx: u64, op: &KvOp) -> Result<Vec<Value>, String> {
    let key = op.key.as_str();
    let quoted = go_quote(key);
    let written = |entry: Entry| vec![result(key, &entry, false)];
    let value = op.value.clone();
    match op.verb.as_str() {
        "set" => Ok(written(kv.set(idx, key, value, op.flags))),
        "cas" => kv
            .cas(idx, key, value, op.flags, op.index)
            .map(written)
            .ok_or_else(|| format!("failed to set key {quoted}, index is stale")),
        "lock" => {
            if op.session.is_empty() {
                return Err("missing session".to_owned());
            }
            if !state.sessions.contains_key(&op.session) {
                return Err(format!("invalid session {}", go_quote(&op.session)));
            }
            kv.lock(idx, key, value, op.flags, &op.session)
                .map(written)
                .ok_or_else(|| format!("failed to lock key {quoted}, lock is already held"))
        }
        "unlock" => {
            if op.session.is_empty() {
                return Err("missing session".to_owned());
            }
            kv.unlock(idx, key, value, op.flags, &op.session).map(written).ok_or_else(|| {
                format!("failed to unlock key {quoted}, lock isn't held, or is held by another session")
            })
        }
        "get" => kv
            .entries
            .get(key)
            .map(|e| vec![result(key, e, true)])
            .ok_or_else(|| format!("key {quoted} doesn't exist")),
        "get-or-empty" => {
            let empty = || Entry {
                lock_index: 0,
                flags: op.flags,
                value: Vec::new(),
                session: (!op.session.is_empty()).then(|| op.session.clone()),
                create_index: 0,
                modify_index: op.index,
            };
            let entry = kv.entries.get(key).cloned().unwrap_or_else(empty);
            Ok(vec![result(key, &entry, true)])
        }
        "get-tree" => {
            let keys = kv.keys_with_prefix(key);
            let entries = keys
                .iter()
                .filter_map(|k| kv.entries.get(k).map(|e| result(k, e, true)));
            Ok(entries.collect())
        }
        "check-index" => match kv.entries.get(key) {
            None => Err(format!("failed to check index, key {quoted} doesn't exist")),
            Some(e) if e.modify_index != op.index => Err(format!(
                "failed index check for key {quoted}, current modify index {} != {}",
                e.modify_index, op.index
            )),
            Some(e) => Ok(vec![result(key, e, false)]),
        },
        "check-session" => match kv.entries.get(key) {
            None => Err(format!(
                "failed to check session, key {quoted} doesn't exist"
            )),
            Some(e) if e.session.as_deref().unwrap_or("") != op.session => Err(format!(
                "failed session check for key {quoted}, current session {} != {}",
                go_quote(e.session.as_deref().unwrap_or("")),
                go_quote(&op.session)
            )),
            Some(e) => Ok(vec![result(key, e, false)]),
        },
        "check-not-exists" => match kv.entries.contains_key(key) {
            true => Err(format!("key {quoted} exists")),
            false => Ok(Vec::new()),
        },
        "delete" => {
            kv.delete(idx, key);
            Ok(Vec::new())
        }
        "delete-tree" => {
            kv.delete_tree(idx, key);
            Ok(Vec::new())
        }
        "delete-cas" => match kv.delete_cas(idx, key, op.index) {
            true => Ok(Vec::new()),
            false => Err(format!("failed to delete key {quoted}, index is stale")),
        },
        verb => Err(format!("unknown KV verb {}", go_quote(verb))),
    }
}
