//! A thin client for the few endpoints of Consul's HTTP API that channelmesh uses.
//!
//! `consulrs` (the crate the design card names) had its last release in 2021 and has no health
//! queries or transactions; the API we need is small, documented and stable, so this speaks it
//! directly over `reqwest`. Each method names the Consul document it follows. Everything here is
//! tested against `fake-consul`, a test server that answers those documented responses, since no
//! Consul binary runs on the machines the tests run on.
//!
//! - Sessions (`/v1/session/create|renew|destroy`): `api-docs/session.mdx`.
//! - KV (`/v1/kv/<key>` get, and `?recurse` prefix reads, with blocking queries;
//!   `?acquire=`/`?release=`): `api-docs/kv.mdx`, `api-docs/features/blocking.mdx`.
//! - Transactions (`/v1/txn`, KV verbs `check-session` and `cas`): `api-docs/txn.mdx`.
//! - Agent services and TTL checks (`/v1/agent/service/register|deregister`,
//!   `/v1/agent/check/pass|fail`): `api-docs/agent/service.mdx`, `api-docs/agent/check.mdx`.
//! - Health (`/v1/health/service/<name>`): `api-docs/health.mdx`.
//!
//! ACLs (`security/acl/index.mdx`): every request carries the client's token, when it has one,
//! in `X-Consul-Token` (one place: [`Consul::request`]). Consul answers a request its token may
//! not make with 403 ([`ConsulError::Denied`]) — except list reads, which it filters instead:
//! a filtered prefix read (`X-Consul-Results-Filtered-By-ACLs`) is refused here too, and an
//! anonymous one (which Consul does not flag) is told apart from an empty prefix by the caller
//! (`consul_ring`).

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// How long one non-blocking request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Consul adds up to `wait / 16` of jitter to a blocking query; the request's own timeout
/// allows that plus this margin.
const BLOCKING_MARGIN: Duration = Duration::from_secs(5);
/// The header that carries an ACL token.
const TOKEN_HEADER: &str = "X-Consul-Token";
/// The header that carries a read's index.
const INDEX_HEADER: &str = "X-Consul-Index";
/// The header Consul sets on a read whose results its ACLs filtered (for a known token).
const FILTERED_HEADER: &str = "X-Consul-Results-Filtered-By-ACLs";

/// Errors talking to Consul.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("consul at {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("consul answered {status} to {what}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    /// Consul's ACLs refused the request (HTTP 403: no token, an unknown one, or one without
    /// the right), or filtered what it read.
    #[error("consul refused {what}: {body} (the ACL token is --consul-token or CONSUL_HTTP_TOKEN)")]
    Denied { what: String, body: String },
    #[error("consul sent an unreadable answer to {what}: {message}")]
    Decode { what: String, message: String },
    #[error("invalid consul address {0:?}: expected http://HOST:PORT")]
    Address(String),
}

/// One KV entry, as `GET /v1/kv/<key>` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub session: Option<String>,
    pub lock_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvWire {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    lock_index: u64,
    #[serde(default)]
    modify_index: u64,
}

impl KvWire {
    fn decode(self) -> Result<KvEntry, String> {
        let value = match self.value {
            Some(v) => BASE64.decode(v).map_err(|e| e.to_string())?,
            None => Vec::new(),
        };
        Ok(KvEntry {
            key: self.key,
            value,
            session: self.session.filter(|s| !s.is_empty()),
            lock_index: self.lock_index,
            modify_index: self.modify_index,
        })
    }
}

/// A service to register with the local agent, with one TTL check.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    /// Unique on the agent, e.g. `channelmesh-channel-server-cs-1`.
    pub id: String,
    /// The service name others look up, e.g. `channelmesh-channel-server`.
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: Vec<(String, String)>,
    /// The TTL check's TTL: the service turns critical when not passed within it.
    pub ttl: Duration,
    /// Consul removes the service after its check has been critical this long.
    pub deregister_after: Duration,
}

impl ServiceDef {
    /// The id of its TTL check.
    pub fn check_id(&self) -> String {
        format!("service:{}", self.id)
    }
}

/// One instance from `GET /v1/health/service/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthyService {
    pub id: String,
    pub address: String,
    pub port: u16,
    /// The worst status of its checks: `passing`, `warning` or `critical`.
    pub status: String,
}

/// Why a transaction was refused (HTTP 409): one entry per failed operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnRefused(pub Vec<TxnError>);

/// One failed operation of a refused transaction: its index in the transaction and Consul's
/// reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnError {
    pub op_index: usize,
    pub what: String,
}

impl TxnRefused {
    /// Whether operation `op_index` failed.
    pub fn failed(&self, op_index: usize) -> bool {
        self.0.iter().any(|e| e.op_index == op_index)
    }

    /// Whether Consul's ACLs refused an operation (`Permission denied`).
    pub fn denied(&self) -> bool {
        self.0
            .iter()
            .any(|e| e.what.starts_with("Permission denied"))
    }
}

impl std::fmt::Display for TxnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "op {}: {}", self.op_index, self.what)
    }
}

/// A Consul agent's HTTP API; cheap to clone.
#[derive(Debug, Clone)]
pub struct Consul {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Formats a duration the way Consul parses it (Go's `time.ParseDuration`).
pub fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// `req` as a blocking query when `block` gives the last index seen and the longest wait, with
/// a client timeout past the wait (Consul adds up to 1/16 of it as jitter).
fn blocking(
    req: reqwest::RequestBuilder,
    block: Option<(u64, Duration)>,
) -> reqwest::RequestBuilder {
    match block {
        Some((index, wait)) => req
            .query(&[("index", index.to_string()), ("wait", go_duration(wait))])
            .timeout(wait + wait / 16 + BLOCKING_MARGIN),
        None => req,
    }
}

impl Consul {
    /// A client for the agent at `url` (e.g. `http://127.0.0.1:8500`), sending `token` as the
    /// ACL token if given.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, ConsulError> {
        let base = url.trim_end_matches('/').to_string();
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
            .ok_or_else(|| ConsulError::Address(url.to_string()))?;
        if rest.is_empty() || rest.contains('/') {
            return Err(ConsulError::Address(url.to_string()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .map_err(|source| ConsulError::Http {
                url: base.clone(),
                source,
            })?;
        Ok(Consul { http, base, token })
    }

    /// The agent's address.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Whether requests carry an ACL token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Every request starts here: the agent's URL, the timeout and, when configured, the ACL
    /// token in `X-Consul-Token`.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(REQUEST_TIMEOUT);
        if let Some(token) = &self.token {
            req = req.header(TOKEN_HEADER, token);
        }
        req
    }

    async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ConsulError> {
        req.send().await.map_err(|source| ConsulError::Http {
            url: format!("{} ({what})", self.base),
            source,
        })
    }

    async fn body(what: &str, resp: reqwest::Response) -> Result<Vec<u8>, ConsulError> {
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| ConsulError::Decode {
            what: what.to_string(),
            message: e.to_string(),
        })?;
        if !(200..300).contains(&status) {
            return Err(Self::refused(what, status, &body));
        }
        Ok(body.to_vec())
    }

    /// The error for an answer of `status` (not 2xx) with `body`.
    fn refused(what: &str, status: u16, body: &[u8]) -> ConsulError {
        let body = String::from_utf8_lossy(body).trim().to_string();
        let what = what.to_string();
        if status == reqwest::StatusCode::FORBIDDEN.as_u16() {
            ConsulError::Denied { what, body }
        } else {
            ConsulError::Status { what, status, body }
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(what: &str, body: &[u8]) -> Result<T, ConsulError> {
        serde_json::from_slice(body).map_err(|e| ConsulError::Decode {
            what: what.to_string(),
            message: e.to_string(),
        })
    }

    /// `PUT /v1/session/create`: a session that Consul invalidates unless renewed within `ttl`
    /// (Consul accepts 10 s to 24 h and may wait up to twice the TTL). Locks it held are
    /// released on invalidation and cannot be taken again for `lock_delay`.
    pub async fn create_session(
        &self,
        name: &str,
        ttl: Duration,
        lock_delay: Duration,
    ) -> Result<String, ConsulError> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Create<'a> {
            name: &'a str,
            #[serde(rename = "TTL")]
            ttl: String,
            lock_delay: String,
            behavior: &'a str,
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let what = "session create";
        let req = self
            .request(reqwest::Method::PUT, "/v1/session/create")
            .json(&Create {
                name,
                ttl: go_duration(ttl),
                lock_delay: go_duration(lock_delay),
                behavior: "release",
            });
        let body = Self::body(what, self.send(what, req).await?).await?;
        Ok(Self::json::<Created>(what, &body)?.id)
    }

    /// `PUT /v1/session/renew/<id>`: false when the session no longer exists (HTTP 404).
    pub async fn renew_session(&self, id: &str) -> Result<bool, ConsulError> {
        let what = "session renew";
        let req = self.request(reqwest::Method::PUT, &format!("/v1/session/renew/{id}"));
        let resp = self.send(what, req).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        Self::body(what, resp).await?;
        Ok(true)
    }

    /// `PUT /v1/session/destroy/<id>`: ends the session and releases its locks.
    pub async fn destroy_session(&self, id: &str) -> Result<(), ConsulError> {
        let what = "session destroy";
        let req = self.request(reqwest::Method::PUT, &format!("/v1/session/destroy/{id}"));
        Self::body(what, self.send(what, req).await?).await?;
        Ok(())
    }

    /// `PUT /v1/kv/<key>?acquire=<session>`: takes the lock on `key` and sets its value;
    /// false if another session holds it (or it is in its lock-delay).
    pub async fn acquire(
        &self,
        key: &str,
        session: &str,
        value: Vec<u8>,
    ) -> Result<bool, ConsulError> {
        let what = "kv acquire";
        let req = self
            .request(reqwest::Method::PUT, &format!("/v1/kv/{key}"))
            .query(&[("acquire", session)])
            .body(value);
        let body = Self::body(what, self.send(what, req).await?).await?;
        Self::json(what, &body)
    }

    /// `PUT /v1/kv/<key>?release=<session>`: gives the lock up (no lock-delay).
    pub async fn release(&self, key: &str, session: &str) -> Result<bool, ConsulError> {
        let what = "kv release";
        let req = self
            .request(reqwest::Method::PUT, &format!("/v1/kv/{key}"))
            .query(&[("release", session)]);
        let body = Self::body(what, self.send(what, req).await?).await?;
        Self::json(what, &body)
    }

    /// `GET /v1/kv/<key>`, as a blocking query when `block` gives the last index seen and the
    /// longest wait. Returns the entry (`None` on 404) and the `X-Consul-Index`.
    pub async fn get(
        &self,
        key: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<(Option<KvEntry>, u64), ConsulError> {
        let what = "kv get";
        let req = blocking(
            self.request(reqwest::Method::GET, &format!("/v1/kv/{key}")),
            block,
        );
        let resp = self.send(what, req).await?;
        let index = index_of(&resp);
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok((None, index));
        }
        let body = Self::body(what, resp).await?;
        let entries: Vec<KvWire> = Self::json(what, &body)?;
        let entry = entries
            .into_iter()
            .find(|e| e.key == key)
            .map(KvWire::decode)
            .transpose()
            .map_err(|message| ConsulError::Decode {
                what: what.to_string(),
                message,
            })?;
        Ok((entry, index))
    }

    /// `GET /v1/kv/<prefix>?recurse`, as a blocking query when `block` gives the last index
    /// seen and the longest wait: every entry whose key starts with `prefix` (a plain string
    /// prefix), read in one snapshot, and the `X-Consul-Index` (the highest index under the
    /// prefix). An empty prefix answers 404: no entries. A read Consul says its ACLs filtered
    /// is refused as [`ConsulError::Denied`].
    pub async fn list(
        &self,
        prefix: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<(Vec<KvEntry>, u64), ConsulError> {
        let what = "kv list";
        let req = blocking(
            self.request(reqwest::Method::GET, &format!("/v1/kv/{prefix}"))
                .query(&[("recurse", "true")]),
            block,
        );
        let resp = self.send(what, req).await?;
        let index = index_of(&resp);
        if resp
            .headers()
            .get(FILTERED_HEADER)
            .is_some_and(|v| v.as_bytes() == b"true")
        {
            return Err(ConsulError::Denied {
                what: format!("{what} {prefix}"),
                body: "results filtered by ACLs: the token may not read every key".to_string(),
            });
        }
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok((Vec::new(), index));
        }
        let body = Self::body(what, resp).await?;
        let entries: Vec<KvWire> = Self::json(what, &body)?;
        let entries = entries
            .into_iter()
            .map(KvWire::decode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| ConsulError::Decode {
                what: what.to_string(),
                message,
            })?;
        Ok((entries, index))
    }

    /// `PUT /v1/txn`: sets `key` to `value` only if its modify index is still `cas` (0: only if
    /// absent) **and** `session` still holds the lock `lock_key` — a write fenced by the
    /// leader's lock. Returns the new modify index, or why Consul refused it (HTTP 409).
    pub async fn fenced_cas(
        &self,
        lock_key: &str,
        session: &str,
        key: &str,
        value: &[u8],
        cas: u64,
    ) -> Result<Result<u64, TxnRefused>, ConsulError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Answer {
            #[serde(default)]
            results: Option<Vec<OpResult>>,
            #[serde(default)]
            errors: Option<Vec<OpError>>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct OpResult {
            #[serde(rename = "KV")]
            kv: Option<KvWire>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct OpError {
            op_index: usize,
            what: String,
        }
        let what = "txn";
        let ops = serde_json::json!([
            {"KV": {"Verb": "check-session", "Key": lock_key, "Session": session}},
            {"KV": {"Verb": "cas", "Key": key, "Value": BASE64.encode(value), "Index": cas}},
        ]);
        let req = self.request(reqwest::Method::PUT, "/v1/txn").json(&ops);
        let resp = self.send(what, req).await?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| ConsulError::Decode {
            what: what.to_string(),
            message: e.to_string(),
        })?;
        if status != reqwest::StatusCode::OK && status != reqwest::StatusCode::CONFLICT {
            return Err(Self::refused(what, status.as_u16(), &body));
        }
        let answer: Answer = Self::json(what, &body)?;
        if status == reqwest::StatusCode::CONFLICT {
            let errors = answer.errors.unwrap_or_default();
            return Ok(Err(TxnRefused(
                errors
                    .into_iter()
                    .map(|e| TxnError {
                        op_index: e.op_index,
                        what: e.what,
                    })
                    .collect(),
            )));
        }
        let index = answer
            .results
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| r.kv)
            .find(|kv| kv.key == key)
            .map(|kv| kv.modify_index)
            .ok_or_else(|| ConsulError::Decode {
                what: what.to_string(),
                message: "no result for the written key".to_string(),
            })?;
        Ok(Ok(index))
    }

    /// `PUT /v1/agent/service/register`: registers `service` with its TTL check, passing from
    /// the start.
    pub async fn register_service(&self, service: &ServiceDef) -> Result<(), ConsulError> {
        let what = "service register";
        let meta: serde_json::Map<String, serde_json::Value> = service
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let body = serde_json::json!({
            "ID": service.id,
            "Name": service.name,
            "Tags": service.tags,
            "Address": service.address,
            "Port": service.port,
            "Meta": meta,
            "Check": {
                "CheckID": service.check_id(),
                "Name": format!("{} lease", service.name),
                "TTL": go_duration(service.ttl),
                "Status": "passing",
                "DeregisterCriticalServiceAfter": go_duration(service.deregister_after),
            },
        });
        let req = self
            .request(reqwest::Method::PUT, "/v1/agent/service/register")
            .json(&body);
        Self::body(what, self.send(what, req).await?).await?;
        Ok(())
    }

    /// `PUT /v1/agent/check/pass/<id>` (or `fail` with `note`): reports a TTL check's status.
    /// Ok(false) when the agent does not know the check (HTTP 404): register again.
    pub async fn update_check(
        &self,
        check_id: &str,
        passing: bool,
        note: &str,
    ) -> Result<bool, ConsulError> {
        let what = "check update";
        let verb = if passing { "pass" } else { "fail" };
        let req = self
            .request(
                reqwest::Method::PUT,
                &format!("/v1/agent/check/{verb}/{check_id}"),
            )
            .query(&[("note", note)]);
        let resp = self.send(what, req).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        Self::body(what, resp).await?;
        Ok(true)
    }

    /// `PUT /v1/agent/service/deregister/<id>`.
    pub async fn deregister_service(&self, id: &str) -> Result<(), ConsulError> {
        let what = "service deregister";
        let req = self.request(
            reqwest::Method::PUT,
            &format!("/v1/agent/service/deregister/{id}"),
        );
        Self::body(what, self.send(what, req).await?).await?;
        Ok(())
    }

    /// `GET /v1/health/service/<name>`: every instance with the worst status of its checks,
    /// only passing ones when `passing_only`.
    pub async fn health_service(
        &self,
        name: &str,
        passing_only: bool,
    ) -> Result<Vec<HealthyService>, ConsulError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            service: Service,
            #[serde(default)]
            checks: Vec<Check>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Service {
            #[serde(rename = "ID")]
            id: String,
            #[serde(default)]
            address: String,
            #[serde(default)]
            port: u16,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Check {
            status: String,
        }
        let what = "health service";
        let mut req = self.request(reqwest::Method::GET, &format!("/v1/health/service/{name}"));
        if passing_only {
            req = req.query(&[("passing", "true")]);
        }
        let body = Self::body(what, self.send(what, req).await?).await?;
        let entries: Vec<Entry> = Self::json(what, &body)?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let rank = |s: &str| match s {
                    "passing" => 0,
                    "warning" => 1,
                    _ => 2,
                };
                let status = e
                    .checks
                    .iter()
                    .map(|c| c.status.as_str())
                    .max_by_key(|s| rank(s))
                    .unwrap_or("passing")
                    .to_string();
                HealthyService {
                    id: e.service.id,
                    address: e.service.address,
                    port: e.service.port,
                    status,
                }
            })
            .collect())
    }
}

fn index_of(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get(INDEX_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The index bookkeeping and rate limit of a blocking-query loop, as Consul's blocking-query
/// document asks of clients: reset the index when it goes backwards, never send an index below
/// 1, and do not spin when answers come back at once.
#[derive(Debug)]
pub struct BlockingLoop {
    index: u64,
    last_start: Option<Instant>,
    min_spacing: Duration,
}

impl BlockingLoop {
    /// A loop that starts at index 0 (an immediate answer) and sends at most one query per
    /// `min_spacing`.
    pub fn new(min_spacing: Duration) -> Self {
        BlockingLoop {
            index: 0,
            last_start: None,
            min_spacing,
        }
    }

    /// The index to send with the next query.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Waits until the next query may start (the rate limit).
    pub async fn pace(&mut self) {
        if let Some(last) = self.last_start {
            let next = last + self.min_spacing;
            if next > Instant::now() {
                tokio::time::sleep_until(next.into()).await;
            }
        }
        self.last_start = Some(Instant::now());
    }

    /// Takes the `X-Consul-Index` of an answer; true if it says something may have changed.
    pub fn observe(&mut self, index: u64) -> bool {
        if index < self.index {
            // Went backwards (e.g. a snapshot restore): start over from 0, as documented.
            tracing::warn!(
                was = self.index,
                now = index,
                "consul index went backwards; resetting"
            );
            self.index = 0;
            return true;
        }
        // The first answer (from index 0) always counts.
        let changed = index != self.index || self.index == 0;
        // An index of 0 would turn the next query into a non-blocking one: use at least 1.
        self.index = index.max(1);
        changed
    }
}

#[cfg(test)]
mod tests;
