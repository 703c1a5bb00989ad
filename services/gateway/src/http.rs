//! HTTP routes: Slack's `auth.test` and `rtm.connect`, the WebSocket endpoint, health; and
//! their access log, which never holds a credential ([`access_log`]).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use mesh_core::token::Verifier;
use mesh_core::{Identity, TokenError, Verified};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::admission::{Gate, Method, Peer, Refusal};
use crate::boot::{self, Boot, Booted};
use crate::connection::{self, ConnectionContext};
use crate::cursors::{cursors_param, parse_cursors};
use crate::limits::TokenBucket;
use crate::presence::{Refused, TeamSlot};
use crate::socket::Upgrade;
use crate::tickets::Tickets;

/// The largest client frame accepted, in bytes; a larger one closes the socket with 1009 before
/// it is read whole. (Message text itself is capped at 16 KiB; this leaves room for escaping.)
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// The WebSocket read buffer per connection, in bytes: allocated whole for every connection
/// up front, so small (clients send little; a larger frame grows it as it arrives).
const WS_READ_BUFFER: usize = 512;

/// What the HTTP routes use.
#[derive(Debug)]
pub struct Edge {
    /// What every connection shares; each WebSocket accepted runs on it.
    pub ctx: Arc<ConnectionContext>,
    /// Asks the web app for each user's channels on `rtm.connect` (`--boot-url`), when set.
    pub boot: Option<Arc<Boot>>,
    /// Checks client tokens.
    pub key: Verifier,
    /// Connect URLs handed out by `rtm.connect`, not yet used.
    pub tickets: Arc<Tickets>,
    /// This gateway's region.
    pub region: String,
    /// "http://host:port", no trailing slash.
    pub http_url: String,
    /// "ws://host:port", no trailing slash.
    pub ws_url: String,
    /// Open client connections.
    pub connections: Arc<AtomicU64>,
    /// The next connection's id.
    pub next_conn: AtomicU64,
    /// `rtm.connect` calls the gateway takes per second.
    pub handshakes: Mutex<TokenBucket>,
    /// The per-address and per-user rates of the Slack methods, and how bodies are read.
    pub gate: Gate,
}

/// The gateway's routes.
pub fn routes(edge: Arc<Edge>) -> Router {
    Router::new()
        .route("/api/auth.test", any(auth_test))
        .route("/api/rtm.connect", any(rtm_connect))
        .route("/api/rtm.start", any(rtm_connect))
        .route("/api/users.setPresence", any(set_presence))
        .route("/api/users.getPresence", any(get_presence))
        .route("/rtm/{ticket}", get(websocket))
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .route_layer(axum::middleware::from_fn(access_log))
        .with_state(edge)
}

/// What the access log writes in place of a credential.
const REDACTED: &str = "REDACTED";

/// Logs each routed request at debug level: its method, its route (the pattern, so a connect
/// URL's ticket is not written), its query with every `token` value [redacted](redact_query),
/// the status and how long the answer took. Nothing else here logs a URL or a query.
async fn access_log(request: Request, next: Next) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return next.run(request).await;
    }
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let query = request.uri().query().map(redact_query).unwrap_or_default();
    let response = next.run(request).await;
    tracing::debug!(
        %method,
        route,
        query,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "http request"
    );
    response
}

/// `query` with the value of every `token` parameter replaced by `REDACTED` (names compared
/// decoded, as [`Params`] reads them: `%74oken` is a token too); the other pairs as they were.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let (name, _) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if decoded == "token" {
                format!("{name}={REDACTED}")
            } else {
                pair.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Request parameters from the query string and a form body (JSON bodies are ignored: slack_sdk
/// sends an empty one labelled JSON).
struct Params(Vec<(String, String)>);

impl Params {
    fn read(headers: &HeaderMap, query: Option<String>, body: &Bytes) -> Self {
        let mut pairs: Vec<(String, String)> = Vec::new();
        if let Some(q) = query {
            pairs.extend(form_urlencoded_pairs(q.as_bytes()));
        }
        let is_form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if is_form {
            pairs.extend(form_urlencoded_pairs(body));
        }
        Params(pairs)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn form_urlencoded_pairs(input: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(input).into_owned().collect()
}

/// Slack answers API errors with HTTP 200 and `{"ok":false,"error":..}`.
fn slack_error(error: &str) -> Response {
    axum::Json(json!({"ok": false, "error": error})).into_response()
}

/// A Slack method call the gate let through: its parameters, its caller, and the client's
/// address.
struct Call {
    params: Params,
    identity: Identity,
    /// The token's `team_max_connections` claim.
    team_max_connections: Option<u32>,
    client: IpAddr,
}

/// Lets a call of `method` through the gate: its address's rate, its body (capped, with a
/// deadline), its token, its user's rate. Otherwise the answer to give.
async fn admit(
    edge: &Edge,
    method: Method,
    peer: Peer,
    headers: &HeaderMap,
    query: Option<String>,
    body: Body,
) -> Result<Call, Response> {
    let client = edge.gate.client(peer, headers);
    edge.gate.by_address(method, client).map_err(refused)?;
    let body = edge.gate.body(body).await.map_err(refused)?;
    let params = Params::read(headers, query, &body);
    let verified = authenticate(edge, headers, &params).map_err(slack_error)?;
    let identity = verified.identity;
    edge.gate.by_user(method, &identity.user).map_err(refused)?;
    Ok(Call {
        params,
        identity,
        team_max_connections: verified.team_max_connections,
        client,
    })
}

/// The answer to a call the gate refused: `ratelimited` for a rate; for a body, an HTTP
/// error with a Slack-style body, on a connection then closed (the rest of a body too large
/// or too slow is never read).
fn refused(refusal: Refusal) -> Response {
    let (status, error) = match refusal {
        Refusal::AddressRate | Refusal::UserRate => return ratelimited(),
        Refusal::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
        Refusal::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
        Refusal::BodyBroken => (StatusCode::BAD_REQUEST, "invalid_form_data"),
    };
    let body = json!({"ok": false, "error": error});
    let mut response = (status, axum::Json::<Value>(body)).into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// The caller's identity (and claims), from `Authorization: Bearer`, or a `token` parameter.
fn authenticate(
    edge: &Edge,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Verified, &'static str> {
    let Some(token) = bearer_or_param(headers, params) else {
        return Err("not_authed");
    };
    let token = token.as_str();
    let verified = edge.key.verify_claims(token).map_err(|e| {
        let reason = match e {
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not yet valid",
            TokenError::BadSignature => "bad signature",
            TokenError::NoKey(_) => "no key for its algorithm or kid",
            TokenError::InvalidClaims(_) => "missing or wrong claims (e.g. iss, aud)",
            _ => "malformed",
        };
        tracing::debug!(reason, "refused a token");
        "invalid_auth"
    })?;
    if let Some(jti) = &verified.identity.jti
        && edge.ctx.region.is_revoked(jti)
    {
        tracing::debug!(%jti, "refused a revoked token");
        return Err("token_revoked");
    }
    Ok(verified)
}

/// The caller's token: `Authorization: Bearer`, else a `token` parameter.
fn bearer_or_param(headers: &HeaderMap, params: &Params) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    bearer
        .or_else(|| params.get("token").filter(|t| !t.is_empty()))
        .map(str::to_string)
}

async fn auth_test(
    State(edge): State<Arc<Edge>>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let identity = match admit(&edge, Method::AuthTest, peer, &headers, query, body).await {
        Ok(call) => call.identity,
        Err(refusal) => return refusal,
    };
    let user = identity.user.as_str();
    axum::Json(json!({
        "ok": true,
        "url": format!("{}/", edge.http_url),
        "team": identity.team.as_str(),
        "user": identity.name.as_deref().unwrap_or(user),
        "team_id": identity.team.as_str(),
        "user_id": user,
        // Distinct per user: rtm_v2 drops events whose bot_id equals its own (RTM.md).
        "bot_id": format!("B{user}"),
        "is_enterprise_install": false,
    }))
    .into_response()
}

async fn rtm_connect(
    State(edge): State<Arc<Edge>>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let Call {
        params,
        identity,
        team_max_connections,
        client,
    } = match admit(&edge, Method::Connect, peer, &headers, query, body).await {
        Ok(call) => call,
        Err(refusal) => return refusal,
    };
    if let Some(refusal) = admission(&edge) {
        return refusal;
    }
    let batch = matches!(params.get("batch_presence_aware"), Some("1" | "true"));
    let cursors = match params.get("cursors").map(parse_cursors) {
        None => Vec::new(),
        Some(Ok(c)) => c,
        Some(Err(_)) => return slack_error("invalid_cursors"),
    };
    let mut identity = identity;
    if edge.ctx.region.draining() {
        let token = bearer_or_param(&headers, &params).unwrap_or_default();
        let user = identity.user.clone();
        return match redirect_connect(&edge, &token, &user, client, batch, cursors).await {
            Some(response) => response,
            None => ratelimited(),
        };
    }
    let booted = match &edge.boot {
        Some(boot) => match booted(boot, &mut identity).await {
            Ok(answer) => Some((answer, boot.mode())),
            Err(refusal) => return refusal,
        },
        None => None,
    };
    let user = identity.user.to_string();
    let name = identity.name.clone().unwrap_or_else(|| user.clone());
    let team = identity.team.to_string();
    let slot = match team_slot(&edge, &identity, team_max_connections).await {
        Ok(slot) => slot,
        Err(Refused::Team | Refused::User) => return slack_error("too_many_connections"),
        Err(Refused::Retry) => return ratelimited(),
    };
    let Some(ticket) =
        edge.tickets
            .issue(identity, team_max_connections, batch, cursors, slot, booted)
    else {
        return ratelimited();
    };
    axum::Json(json!({
        "ok": true,
        "url": format!("{}/rtm/{ticket}", edge.ws_url),
        "self": {"id": user, "name": name},
        "team": {"id": team, "name": team, "domain": team.to_lowercase()},
    }))
    .into_response()
}

/// The web app's answer for `identity`'s user (its name taken at once; its channels joined
/// to the token's when the connect URL is opened: [`Ticket::booted`](crate::tickets::Ticket));
/// otherwise the `rtm.connect` answer to give: `boot_timeout`, `boot_unavailable`,
/// `boot_invalid_answer` (HTTP 200 with `Retry-After: 1`, as Slack answers its errors), or
/// `ratelimited` when too many users are being asked about at once.
async fn booted(boot: &Arc<Boot>, identity: &mut Identity) -> Result<Arc<Booted>, Response> {
    match boot.channels(&identity.user, &identity.team).await {
        Ok(answer) => {
            if let Some(name) = &answer.name {
                identity.name = Some(name.clone());
            }
            Ok(answer)
        }
        Err(boot::BootError::Busy) => Err(ratelimited()),
        Err(error) => {
            tracing::debug!(user = %identity.user, %error, "refused a connect: no boot answer");
            let mut response = slack_error(error.code());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            Err(response)
        }
    }
}

/// `ratelimited` with `Retry-After: 1`: Slack's answer to a caller that should come back.
fn ratelimited() -> Response {
    let mut response = slack_error("ratelimited");
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

/// Whether this gateway takes one more client now: under its connection cap and its
/// handshake rate. `None` admits; otherwise the refusal to answer with.
fn admission(edge: &Edge) -> Option<Response> {
    if edge.connections.load(Ordering::Relaxed) >= edge.ctx.limits.max_connections as u64 {
        tracing::debug!("refused a connect: the gateway is at its connection cap");
        edge.ctx.metrics.connect_refused("max_connections");
        return Some(ratelimited());
    }
    let admitted = edge
        .handshakes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(std::time::Instant::now());
    if !admitted {
        tracing::debug!("refused a connect: over the handshake rate");
        edge.ctx.metrics.connect_refused("handshake_rate");
        return Some(ratelimited());
    }
    None
}

/// A place under the caller's team and user connection caps, counted across every gateway
/// by the team's presence server; `None` when neither cap applies (or the mesh has no
/// presence servers to count: the caps are then not enforced, as logged at start). The team's
/// cap: the policy file's or the flags', lowered to the token's `team_max_connections` claim
/// ([`crate::limits::Limits::team_cap_with`]). A refusal is counted here.
async fn team_slot(
    edge: &Edge,
    identity: &Identity,
    claimed: Option<u32>,
) -> Result<Option<TeamSlot>, Refused> {
    let file = edge.ctx.policies.current().team_cap(&identity.team);
    let team_cap = edge.ctx.limits.team_cap_with(&identity.team, file, claimed);
    let user_cap = edge.ctx.limits.user_connections;
    let Some(presence) = edge
        .ctx
        .presence
        .as_ref()
        .filter(|_| team_cap > 0 || user_cap > 0)
    else {
        return Ok(None);
    };
    match presence
        .acquire(&identity.team, &identity.user, team_cap, user_cap)
        .await
    {
        Ok(slot) => Ok(Some(slot)),
        Err(refused) => {
            let reason = match refused {
                Refused::Team => "team_connections",
                Refused::User => "user_connections",
                Refused::Retry => "team_count_unavailable",
            };
            edge.ctx.metrics.connect_refused(reason);
            Err(refused)
        }
    }
}

/// `users.setPresence` (`presence=away|auto`): away overrides the user's connections until set
/// back to `auto` (`active` is taken as `auto`).
async fn set_presence(
    State(edge): State<Arc<Edge>>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let Call {
        params, identity, ..
    } = match admit(&edge, Method::SetPresence, peer, &headers, query, body).await {
        Ok(call) => call,
        Err(refusal) => return refusal,
    };
    let away = match params.get("presence") {
        Some("away") => true,
        Some("auto" | "active") => false,
        _ => return slack_error("invalid_presence"),
    };
    let Some(presence) = &edge.ctx.presence else {
        return slack_error("presence_unavailable");
    };
    presence.set_manual(&identity.user, away);
    axum::Json(json!({"ok": true})).into_response()
}

/// `users.getPresence` (`user=U`, default the caller): `{"ok":true,"presence":..}`. A user
/// the caller may not see — of another team, or whose team the presence servers do not know —
/// is `user_not_found`, as an id that names nobody (docs/rtm.md, "Presence").
async fn get_presence(
    State(edge): State<Arc<Edge>>,
    peer: Peer,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let Call {
        params, identity, ..
    } = match admit(&edge, Method::GetPresence, peer, &headers, query, body).await {
        Ok(call) => call,
        Err(refusal) => return refusal,
    };
    let user = match params.get("user") {
        Some(raw) => match mesh_core::UserId::new(raw) {
            Ok(u) => u,
            Err(_) => return slack_error("user_not_found"),
        },
        None => identity.user.clone(),
    };
    let Some(presence) = &edge.ctx.presence else {
        return slack_error("presence_unavailable");
    };
    let answer = presence.lookup(std::slice::from_ref(&user)).await;
    // Nobody could answer (the user's presence server is down and not yet replaced): no guess.
    if answer.first().is_some_and(|p| !p.answered) {
        return slack_error("presence_unavailable");
    }
    let Some(found) = answer.first().filter(|p| {
        crate::presence::visible(&identity.user, &identity.team, &p.user, p.team.as_ref())
    }) else {
        presence.withheld();
        return slack_error("user_not_found");
    };
    let presence = if found.active { "active" } else { "away" };
    axum::Json(json!({"ok": true, "presence": presence})).into_response()
}

/// Health: 503 while the region drains, so load balancers (Envoy) send no new clients here.
async fn healthz(State(edge): State<Arc<Edge>>) -> Response {
    if edge.ctx.region.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ok".into_response()
    }
}

/// While the region drains: asks a gateway of the nearest healthy region to admit the caller
/// (with the caller's own token, and its address in `X-Forwarded-For` for the per-address
/// limits of a gateway that trusts this one) and returns its answer, with the caller's resume
/// cursors (from its goodbye'd connection here, or its own) on the URL.
async fn redirect_connect(
    edge: &Edge,
    token: &str,
    user: &mesh_core::UserId,
    caller: IpAddr,
    batch: bool,
    cursors: Vec<(mesh_core::ChannelId, mesh_core::Ts)>,
) -> Option<Response> {
    // Only gateways on --redirect-allow ever see the caller's token.
    let targets = edge.ctx.region.redirect_to();
    if targets.is_empty() {
        return None;
    }
    let mut cursors = cursors;
    if let Some(handed) = edge.ctx.region.take_handover(user) {
        for (channel, ts) in handed {
            if !cursors.iter().any(|(c, _)| *c == channel) {
                cursors.push((channel, ts));
            }
        }
    }
    let client = edge.ctx.region.http();
    for target in targets {
        let mut form = vec![(
            "batch_presence_aware",
            if batch { "1" } else { "0" }.to_string(),
        )];
        if !cursors.is_empty() {
            form.push(("cursors", cursors_param(&cursors)));
        }
        let reply = client
            .post(target)
            .bearer_auth(token)
            .header("x-forwarded-for", caller.to_string())
            .form(&form)
            .send()
            .await;
        let Ok(reply) = reply else { continue };
        let Ok(body) = reply.json::<Value>().await else {
            continue;
        };
        if body["ok"] == json!(true) {
            return Some(axum::Json(body).into_response());
        }
    }
    None
}

/// Read-only counters for operators and tests.
async fn stats(State(edge): State<Arc<Edge>>) -> Response {
    axum::Json(json!({
        "gateway": edge.ctx.hub.gateway(),
        "region": edge.region,
        "connections": edge.connections.load(Ordering::Relaxed),
        "channels": edge.ctx.hub.channel_count(),
        "upstreams": edge.ctx.hub.upstream_count(),
        "presence": edge.ctx.presence.as_ref().map(|p| {
            let (watched, online, sessions) = p.counts();
            json!({"watched_users": watched, "online_users": online, "sessions": sessions})
        }),
    }))
    .into_response()
}

async fn websocket(
    State(edge): State<Arc<Edge>>,
    Path(ticket): Path<String>,
    RawQuery(query): RawQuery,
    ws: Upgrade,
) -> Response {
    // Cursors may also come on the WebSocket URL (they then replace rtm.connect's).
    let cursors = form_urlencoded_pairs(query.unwrap_or_default().as_bytes())
        .into_iter()
        .find(|(k, _)| k == "cursors")
        .map(|(_, v)| parse_cursors(&v));
    if let Some(Err(_)) = cursors {
        let body = json!({"ok": false, "error": "invalid_cursors"});
        return (StatusCode::BAD_REQUEST, axum::Json::<Value>(body)).into_response();
    }
    if edge.ctx.region.draining() {
        edge.ctx.metrics.connect_refused("draining");
        let body = json!({"ok": false, "error": "region_draining"});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json::<Value>(body)).into_response();
    }
    let Some(mut ticket) = edge.tickets.redeem(&ticket) else {
        let body = json!({"ok": false, "error": "invalid_connect_url"});
        return (StatusCode::UNAUTHORIZED, axum::Json::<Value>(body)).into_response();
    };
    if let Some(Ok(cursors)) = cursors {
        ticket.cursors = cursors;
    }
    // Revoked since its rtm.connect.
    if let Some(jti) = &ticket.identity.jti
        && edge.ctx.region.is_revoked(jti)
    {
        let body = json!({"ok": false, "error": "token_revoked"});
        return (StatusCode::FORBIDDEN, axum::Json::<Value>(body)).into_response();
    }
    if edge.connections.load(Ordering::Relaxed) >= edge.ctx.limits.max_connections as u64 {
        edge.ctx.metrics.connect_refused("max_connections");
        let body = json!({"ok": false, "error": "too_many_connections"});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json::<Value>(body)).into_response();
    }
    // A ticket older than its hold gave its place under the caps back: ask again
    // (a refusal here is answered like the gateway's own cap: 503).
    if ticket.slot.is_none() {
        ticket.slot = match team_slot(&edge, &ticket.identity, ticket.team_max_connections).await {
            Ok(slot) => slot,
            Err(refused) => {
                let error = match refused {
                    Refused::Team | Refused::User => "too_many_connections",
                    Refused::Retry => "ratelimited",
                };
                let body = json!({"ok": false, "error": error});
                let mut response =
                    (StatusCode::SERVICE_UNAVAILABLE, axum::Json::<Value>(body)).into_response();
                if refused == Refused::Retry {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                return response;
            }
        };
    }
    // The web app's channels join the token's only now, for a connection about to open.
    if let Some((answer, mode)) = ticket.booted.take() {
        let token = std::mem::take(&mut ticket.identity.channels);
        ticket.identity.channels = boot::unite(token, &answer, mode);
    }
    let conn = edge.next_conn.fetch_add(1, Ordering::Relaxed);
    let tracked = edge.clone();
    // Clients send little: a small read buffer keeps an idle connection cheap (tungstenite
    // allocates it whole up front).
    let config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    ws.on_upgrade(config, move |socket| {
        let edge = tracked.clone();
        let task = async move {
            edge.connections.fetch_add(1, Ordering::Relaxed);
            if let Some(jti) = &ticket.identity.jti {
                edge.ctx.region.track_jti(conn, jti.clone());
            }
            let (user, team) = (&ticket.identity.user, &ticket.identity.team);
            edge.ctx.region.track_user(conn, user.clone(), team.clone());
            // The connection holds its place under the team's cap until it ends.
            let slot = ticket.slot;
            connection::run(
                socket,
                edge.ctx.clone(),
                conn,
                ticket.identity,
                ticket.batch_presence,
                ticket.cursors,
            )
            .await;
            drop(slot);
            // Also when the connection ended before it registered.
            edge.ctx.region.unregister(conn);
            edge.connections.fetch_sub(1, Ordering::Relaxed);
        };
        tracked.ctx.tracker.track_future(task)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_token_value_and_nothing_else() {
        assert_eq!(
            redact_query("token=abc.def.ghi&batch_presence_aware=1"),
            "token=REDACTED&batch_presence_aware=1"
        );
        // Encoded names, repeats, empty and bare pairs; a `token` inside another value stays.
        assert_eq!(
            redact_query("%74oken=x&token=y&cursors=C1%3D1&token&x=token%3Dz&"),
            "%74oken=REDACTED&token=REDACTED&cursors=C1%3D1&token=REDACTED&x=token%3Dz&"
        );
        assert_eq!(redact_query("tokens=a&atoken=b"), "tokens=a&atoken=b");
        assert_eq!(redact_query(""), "");
    }

    #[test]
    fn decodes_form_pairs() {
        let pairs = form_urlencoded_pairs(b"token=a%2Bb&batch_presence_aware=1&x=y+z&bad=%zz&");
        assert_eq!(
            pairs,
            vec![
                ("token".into(), "a+b".into()),
                ("batch_presence_aware".into(), "1".into()),
                ("x".into(), "y z".into()),
                ("bad".into(), "%zz".into()),
            ]
        );
    }
}
