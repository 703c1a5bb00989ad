//! The console's actions: drain and undrain a node, drain and undrain a region, disconnect a
//! user, from the page (`POST /api/actions`), each behind an operator token and recorded in the
//! action log the console shows beside the epochs.
//!
//! Secure by default: with no `--operator-token` every action is refused with 403 naming the
//! flag, on loopback too. The token travels in its own header, [`OPERATOR_HEADER`], set by the
//! page's script — never a cookie, and not `Authorization`, which a browser fills in by itself
//! once it has the HTTP token (Basic) for the console off loopback: a request from another site
//! can carry neither (a custom header needs a CORS preflight the console never grants). Each
//! request must also repeat its target in `confirm` (the page asks the operator to type it).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mesh_core::{NodeId, TeamId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::server::{ChangeError, RingManager};

/// The header the operator token comes in.
pub const OPERATOR_HEADER: &str = "x-channelmesh-operator-token";
/// Env var: the operator tokens (`--operator-token`).
pub const ENV_OPERATOR_TOKEN: &str = "CHANNELMESH_OPERATOR_TOKEN";
/// The shortest operator token accepted.
pub const MIN_OPERATOR_TOKEN_LEN: usize = 16;
/// Actions the log keeps (the oldest go first).
pub const MAX_LOGGED: usize = 200;
/// The largest action request read, in bytes.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// The longest target or operator name, in bytes.
const MAX_NAME_BYTES: usize = 128;

/// One operator: a name (what the log records as who) and a token.
#[derive(Clone)]
struct Operator {
    name: String,
    token: Vec<u8>,
}

/// The operators whose tokens the console takes; none: actions are off.
#[derive(Clone, Default)]
pub struct Operators(Arc<[Operator]>);

impl std::fmt::Debug for Operators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|o| o.name.as_str()).collect();
        write!(f, "Operators({names:?})")
    }
}

impl Operators {
    /// From `--operator-token` values, each `NAME:TOKEN` or a bare `TOKEN` (named
    /// `operator`); a token has at least [`MIN_OPERATOR_TOKEN_LEN`] bytes, no spaces or control
    /// characters.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let mut operators = Vec::new();
        for value in values.iter().filter(|v| !v.is_empty()) {
            let (name, token) = match value.split_once(':') {
                Some((name, token)) if !name.is_empty() => (name, token),
                _ => ("operator", value.as_str()),
            };
            if token.len() < MIN_OPERATOR_TOKEN_LEN {
                return Err(format!(
                    "an operator token of {name} has {} bytes; at least {MIN_OPERATOR_TOKEN_LEN} are needed",
                    token.len()
                ));
            }
            if token
                .bytes()
                .chain(name.bytes())
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                || name.len() > MAX_NAME_BYTES
            {
                return Err(format!(
                    "operator {name:.20}: no spaces or control characters, a name of at most {MAX_NAME_BYTES} bytes"
                ));
            }
            operators.push(Operator {
                name: name.to_string(),
                token: token.as_bytes().to_vec(),
            });
        }
        Ok(Operators(operators.into()))
    }

    /// Whether any operator is configured (else every action is refused).
    pub fn is_enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// The name of the operator whose token `presented` is (every token compared, each in
    /// constant time).
    fn who(&self, presented: &[u8]) -> Option<&str> {
        let mut found = None;
        for operator in self.0.iter() {
            if bool::from(operator.token.as_slice().ct_eq(presented)) {
                found = Some(operator.name.as_str());
            }
        }
        found
    }
}

/// One action, as the log records it and the snapshot shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionJson {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The operator's name (`--operator-token NAME:TOKEN`).
    pub operator: String,
    /// `drain_node`, `undrain_node`, `drain_region`, `undrain_region`, `disconnect_user`.
    pub action: String,
    /// The node, region or user.
    pub target: String,
    /// Whether it was done.
    pub ok: bool,
    /// What happened: the epoch it published, or why it was refused.
    pub outcome: String,
    /// The ring's epoch after it (0 when it changed no ring).
    pub epoch: u64,
}

/// The actions done or refused (with a valid operator token), newest first, bounded; and
/// every action request counted by outcome, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ActionLog {
    entries: Arc<Mutex<VecDeque<ActionJson>>>,
    counts: Arc<Counts>,
}

/// Action requests by outcome, all-time.
#[derive(Debug, Default)]
struct Counts {
    /// Done.
    done: AtomicU64,
    /// Refused by the ring manager (409, 503) or malformed (400), with a valid token.
    refused: AtomicU64,
    /// Refused for a missing or wrong operator token (401).
    bad_token: AtomicU64,
    /// Refused because no operator token is configured (403).
    off: AtomicU64,
}

impl ActionLog {
    fn record(&self, entry: ActionJson) {
        let mut log = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        log.push_front(entry);
        log.truncate(MAX_LOGGED);
    }

    /// Every logged action, newest first.
    pub fn entries(&self) -> Vec<ActionJson> {
        let log = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    fn count(&self, counter: impl Fn(&Counts) -> &AtomicU64) {
        counter(&self.counts).fetch_add(1, Ordering::Relaxed);
    }

    /// Action requests by outcome: `done`, `refused` (by the ring manager, or malformed),
    /// `bad_token`, `off` (no operator token configured).
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        let c = &self.counts;
        [
            ("done", c.done.load(Ordering::Relaxed)),
            ("refused", c.refused.load(Ordering::Relaxed)),
            ("bad_token", c.bad_token.load(Ordering::Relaxed)),
            ("off", c.off.load(Ordering::Relaxed)),
        ]
    }
}

/// What the page posts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRequest {
    action: String,
    target: String,
    /// The target again, as the operator typed it to confirm.
    confirm: String,
    /// `drain_region`: goodbyes per second per gateway (0: the default).
    #[serde(default)]
    rate: u32,
    /// `disconnect_user`: only the connections whose token names this team ("" or absent: all).
    #[serde(default)]
    team: String,
    /// `disconnect_user`: the close frame's reason (cut to 100 bytes).
    #[serde(default)]
    reason: String,
    /// `disconnect_user`: whether the client should reconnect (close code 4010, the default)
    /// or not (4011).
    #[serde(default = "reconnect_by_default")]
    reconnect: bool,
}

fn reconnect_by_default() -> bool {
    true
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn refused(status: StatusCode, error: &str) -> Response {
    answer(status, json!({"ok": false, "error": error}))
}

/// `POST /api/actions`: checks the operator token and the confirmation, runs the action on
/// the serving ring manager (`manager`; `None`: this one does not lead), and logs it.
pub async fn act(
    operators: &Operators,
    log: &ActionLog,
    manager: Option<RingManager>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let response = checked(operators, log, manager, headers, body).await;
    let status = response.status();
    if status == StatusCode::OK {
        log.count(|c| &c.done);
    } else if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
        log.count(|c| &c.refused);
    }
    response
}

async fn checked(
    operators: &Operators,
    log: &ActionLog,
    manager: Option<RingManager>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if !operators.is_enabled() {
        log.count(|c| &c.off);
        return refused(
            StatusCode::FORBIDDEN,
            &format!(
                "console actions are off: start the ring manager with --operator-token (env {ENV_OPERATOR_TOKEN})"
            ),
        );
    }
    let presented = headers
        .get(OPERATOR_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let Some(operator) = operators.who(presented) else {
        tracing::warn!("a console action with a missing or wrong operator token was refused");
        log.count(|c| &c.bad_token);
        return refused(
            StatusCode::UNAUTHORIZED,
            "a missing or wrong operator token (header X-Channelmesh-Operator-Token)",
        );
    };
    if body.len() > MAX_REQUEST_BYTES {
        return refused(StatusCode::PAYLOAD_TOO_LARGE, "the request is too large");
    }
    let request: ActionRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return refused(
                StatusCode::BAD_REQUEST,
                &format!("a request is {{\"action\", \"target\", \"confirm\"}}: {e}"),
            );
        }
    };
    if request.target.is_empty() || request.target.len() > MAX_NAME_BYTES {
        return refused(
            StatusCode::BAD_REQUEST,
            "a target of 1 to 128 bytes is required",
        );
    }
    if request.confirm != request.target {
        return refused(
            StatusCode::BAD_REQUEST,
            "not confirmed: `confirm` must repeat the target",
        );
    }
    let Some(manager) = manager else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "this ring manager does not lead: act on the leader's console",
        );
    };
    let (status, outcome, epoch) = run(&manager, &request).await;
    let ok = status == StatusCode::OK;
    tracing::info!(operator, action = %request.action, target = %request.target, ok, %outcome, "console action");
    if status != StatusCode::BAD_REQUEST {
        log.record(ActionJson {
            at_ms: super::unix_ms(SystemTime::now()),
            operator: operator.to_string(),
            action: request.action.clone(),
            target: request.target.clone(),
            ok,
            outcome: outcome.clone(),
            epoch,
        });
    }
    if ok {
        answer(
            status,
            json!({"ok": true, "action": request.action, "target": request.target, "epoch": epoch, "outcome": outcome}),
        )
    } else {
        refused(status, &outcome)
    }
}

/// Runs `request` on `manager`: (status, what happened, the ring's epoch after).
async fn run(manager: &RingManager, request: &ActionRequest) -> (StatusCode, String, u64) {
    let target = request.target.as_str();
    let node = || NodeId::new(target).map_err(|e| e.to_string());
    let done: Result<String, (StatusCode, String)> = match request.action.as_str() {
        "drain_node" => match node() {
            Ok(id) => manager
                .drain(&id)
                .map(|ring| format!("{id} drains (epoch {})", ring.epoch()))
                .map_err(change_error),
            Err(e) => Err((StatusCode::BAD_REQUEST, e)),
        },
        // A drained node is a standby once it has handed its slots off; undraining it makes
        // it active again with a fair share (`ctl add-node NODE`).
        "undrain_node" => match node() {
            Ok(id) => manager
                .add(Some(&id))
                .map(|ring| format!("{id} is active again (epoch {})", ring.epoch()))
                .map_err(change_error),
            Err(e) => Err((StatusCode::BAD_REQUEST, e)),
        },
        "drain_region" => manager
            .drain_region(target, request.rate)
            .map(|_| format!("region {target} drains"))
            .map_err(change_error),
        "undrain_region" => manager
            .undrain_region(target)
            .map(|_| format!("region {target} no longer drains"))
            .map_err(|e| change_error::<std::convert::Infallible>(e.into())),
        "disconnect_user" => disconnect_user(manager, request),
        other => Err((
            StatusCode::BAD_REQUEST,
            format!(
                "no action {other:.40}: drain_node, undrain_node, drain_region, undrain_region or disconnect_user"
            ),
        )),
    };
    let done = match done {
        Ok(outcome) => manager
            .stored()
            .await
            .map(|()| outcome)
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(e) => Err(e),
    };
    let epoch = manager.ring().epoch();
    match done {
        Ok(outcome) => (StatusCode::OK, outcome, epoch),
        Err((status, why)) => (status, why, epoch),
    }
}

/// Orders every gateway to close the user's connections (soft state: not saved, see
/// `crate::disconnects`).
fn disconnect_user(
    manager: &RingManager,
    request: &ActionRequest,
) -> Result<String, (StatusCode, String)> {
    let bad = |e: mesh_core::IdError| (StatusCode::BAD_REQUEST, e.to_string());
    let user = UserId::new(&request.target).map_err(bad)?;
    let team = match request.team.as_str() {
        "" => None,
        team => Some(TeamId::new(team).map_err(bad)?),
    };
    let scope = team
        .as_ref()
        .map(|t| format!(" (team {t})"))
        .unwrap_or_default();
    let close = if request.reconnect {
        "4010, reconnect"
    } else {
        "4011, do not reconnect"
    };
    manager
        .disconnect_user(user.clone(), team, &request.reason, request.reconnect)
        .map(|_| format!("{user}'s connections{scope} are closed ({close})"))
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

/// A refusal by the state machine is a conflict with the mesh's state (409); a change that
/// could not be saved is 503.
fn change_error<E: std::fmt::Display>(e: ChangeError<E>) -> (StatusCode, String) {
    match e {
        ChangeError::Refused(e) => (StatusCode::CONFLICT, e.to_string()),
        ChangeError::Unsaved(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_are_named_tokens_long_enough() {
        let ops = Operators::parse(&["alice:aaaaaaaaaaaaaaaa".into(), "bbbbbbbbbbbbbbbb".into()])
            .unwrap();
        assert_eq!(ops.who(b"aaaaaaaaaaaaaaaa"), Some("alice"));
        assert_eq!(ops.who(b"bbbbbbbbbbbbbbbb"), Some("operator"));
        assert_eq!(ops.who(b"aaaaaaaaaaaaaaa"), None);
        assert_eq!(ops.who(b""), None);
        assert!(Operators::parse(&["alice:short".into()]).is_err());
        assert!(Operators::parse(&["alice:has a space in it!".into()]).is_err());
        assert!(!Operators::parse(&[]).unwrap().is_enabled());
    }

    #[test]
    fn the_log_keeps_the_newest() {
        let log = ActionLog::default();
        for i in 0..MAX_LOGGED + 5 {
            log.record(ActionJson {
                at_ms: i as u64,
                operator: "o".into(),
                action: "drain_node".into(),
                target: "cs-1".into(),
                ok: true,
                outcome: String::new(),
                epoch: 0,
            });
        }
        let entries = log.entries();
        assert_eq!(entries.len(), MAX_LOGGED);
        assert_eq!(entries[0].at_ms, (MAX_LOGGED + 4) as u64);
    }
}
