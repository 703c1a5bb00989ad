//! ACL enforcement, off unless a test turns it on ([`crate::FakeConsul::require_token`]): one
//! management token that may do everything, `default_policy = "deny"` for everyone else, as
//! `security/acl/index.mdx` and `agent/http.go` describe it.
//!
//! - The token comes from `X-Consul-Token`, `Authorization: Bearer`, or `?token=` (in that
//!   order, as `agent/http.go`'s `parseTokenWithDefault` reads them).
//! - An unknown token is refused outright: 403 `ACL not found`.
//! - No token is the anonymous token, which may do nothing: a request it may not make is a
//!   403 with Consul's `PermissionDeniedError` text, a `/v1/txn` a 409 with every operation
//!   `Permission denied`; reads that list (KV `?recurse`, health) are filtered down to nothing
//!   instead, without `X-Consul-Results-Filtered-By-ACLs` (Consul sets it only for a known
//!   token, `maskResultsFilteredByACLs`).

use axum::http::{HeaderMap, Method, StatusCode};

use crate::duration::go_quote;
use crate::http::HttpError;
use crate::state::NODE;

/// `acl.ErrNotFound`'s text.
const ACL_NOT_FOUND: &str = "ACL not found";
/// `acl.ErrPermissionDenied`'s text, as a refused txn operation reports it.
pub(crate) const PERMISSION_DENIED: &str = "Permission denied";

/// Who a request is, once its token is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// The management token, or anyone while ACLs are off.
    Management,
    /// No token: the anonymous token, allowed nothing.
    Anonymous,
}

/// The request's token, as Consul reads it.
fn token_of<'a>(headers: &'a HeaderMap, query: &'a [(String, String)]) -> Option<&'a str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("Authorization").and_then(|v| v.strip_prefix("Bearer "));
    let param = query
        .iter()
        .find(|(n, _)| n == "token")
        .map(|(_, v)| v.as_str());
    header("X-Consul-Token")
        .or(bearer)
        .or(param)
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Resolves a request's token against `required` (the management token; `None`: ACLs off).
pub(crate) fn resolve(
    required: Option<&str>,
    headers: &HeaderMap,
    query: &[(String, String)],
) -> Result<Caller, HttpError> {
    let Some(required) = required else {
        return Ok(Caller::Management);
    };
    match token_of(headers, query) {
        None => Ok(Caller::Anonymous),
        Some(token) if token == required => Ok(Caller::Management),
        Some(_) => Err(HttpError::new(StatusCode::FORBIDDEN, ACL_NOT_FOUND)),
    }
}

/// `acl.PermissionDeniedError` for the anonymous token lacking `resource:level` on `name`.
pub(crate) fn anonymous_denied(resource: &str, level: &str, name: &str) -> HttpError {
    let on = if name.is_empty() {
        String::new()
    } else {
        format!(" on {}", go_quote(name))
    };
    HttpError::new(
        StatusCode::FORBIDDEN,
        format!(
            "Permission denied: anonymous token lacks permission '{resource}:{level}'{on}. \
             The anonymous token is used implicitly when a request does not specify a token."
        ),
    )
}

/// What the anonymous token is refused outright, by method and path; `None` for the endpoints
/// that decide for themselves (KV reads, `/v1/txn`, health reads) and for unknown paths.
pub(crate) fn anonymous_refusal(method: &Method, path: &str) -> Option<HttpError> {
    let rest = |prefix: &str| path.strip_prefix(prefix);
    if let Some(key) = rest("/v1/kv/") {
        return (*method != Method::GET).then(|| anonymous_denied("key", "write", key));
    }
    if path.starts_with("/v1/session/") {
        let level = if *method == Method::GET {
            "read"
        } else {
            "write"
        };
        return Some(anonymous_denied("session", level, NODE));
    }
    if let Some(id) = rest("/v1/agent/service/deregister/") {
        return Some(anonymous_denied("service", "write", id));
    }
    if path == "/v1/agent/service/register" {
        return Some(anonymous_denied("service", "write", ""));
    }
    if let Some(check) = rest("/v1/agent/check/") {
        let id = check.split_once('/').map_or("", |(_, id)| id);
        return Some(anonymous_denied("service", "write", id));
    }
    None
}
