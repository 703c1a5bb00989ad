//! A test double of HashiCorp Consul's HTTP API, for testing channelmesh's Consul client where
//! no Consul binary can run.
//!
//! [`FakeConsul::start`] serves a real HTTP server on `127.0.0.1:0` that answers the requests
//! below the way Consul's documentation (and, where the docs are silent, Consul's source) says
//! Consul answers them: same paths, PascalCase JSON, status codes, `X-Consul-*` headers and
//! error texts. Anything else gets Consul's 404 (`Invalid URL path: not a recognized HTTP API
//! endpoint`) or a 405 for a known path with the wrong method.
//!
//! | Endpoints | Follows |
//! |---|---|
//! | `GET/PUT/DELETE /v1/kv/<key>` (`?raw`, `?recurse`, `?cas`, `?flags`, `?acquire`, `?release`, DELETE `?recurse`) | `api-docs/kv.mdx`, `agent/kvs_endpoint.go`, `agent/consul/state/kvs.go` |
//! | `?index`/`?wait` blocking on KV, session info and health reads | `api-docs/features/blocking.mdx` |
//! | `PUT /v1/session/create`, `/renew/<id>`, `/destroy/<id>`, `GET /v1/session/info/<id>` | `api-docs/session.mdx`, `docs/dynamic-app-config/sessions/index.mdx`, `agent/session_endpoint.go` |
//! | `PUT /v1/txn` (KV verbs `set cas lock unlock get get-or-empty get-tree check-index check-session check-not-exists delete delete-tree delete-cas`) | `api-docs/txn.mdx`, `agent/consul/state/txn.go`, `agent/consul/txn_endpoint.go` |
//! | `PUT /v1/agent/service/register`, `/v1/agent/service/deregister/<id>` | `api-docs/agent/service.mdx`, `agent/agent.go` |
//! | `PUT /v1/agent/check/{pass,warn,fail}/<id>?note=`, `/v1/agent/check/update/<id>` | `api-docs/agent/check.mdx`, `agent/checks/check.go` |
//! | `GET /v1/health/service/<name>` (`?passing`) | `api-docs/health.mdx`, `agent/health_endpoint.go` |
//! | ACLs ([`FakeConsul::require_token`]): `X-Consul-Token` | `security/acl/index.mdx`, `agent/http.go`, `acl/errors.go` |
//!
//! Behaviour worth knowing, taken from Consul rather than invented:
//! - One Raft index, starting at 10, moves on every write. A KV read answers `X-Consul-Index`
//!   with the key's `ModifyIndex`, or for a missing key with the KV table's index (at least 1),
//!   as `KVS.Get` does; a `?recurse` read with the highest `ModifyIndex` or tombstone under the
//!   prefix (a plain string prefix), else the table's, as `KVS.List` does. Identical KV writes and identical service re-registrations move nothing.
//!   [`FakeConsul::reset_index`] lowers stored indexes like a snapshot restore and releases
//!   blocked queries, while Raft keeps counting up (`features/blocking.mdx`).
//! - A plain write to a locked key keeps the holder but resets `LockIndex` to 0, and a
//!   `?release` write replaces the value with the request body (both as `kvsSetTxn` does).
//! - Invalidating a session (destroy, TTL lapse, [`FakeConsul::expire_session`]) releases or
//!   deletes its keys and starts their lock-delay; `?release` does not. During lock-delay
//!   `?acquire` answers `false` and a txn `lock` fails "due to lock delay".
//! - Errors Consul's RPC layer returns (bad session TTL or `Behavior`, `?acquire` with an
//!   unknown session, a non-TTL check update) are HTTP 500 with Consul's text.
//! - Check status changes move the health index; output-only updates are stored but move
//!   nothing (a real agent syncs them lazily). A re-registered check keeps its status.
//!
//! Deliberate simplifications:
//! - One node, `fake-node` (127.0.0.1), one datacenter, `dc1`; no namespaces, partitions,
//!   consistency modes, `?dc`, `?keys` reads, `?tag`/`?filter`, or non-KV txn operations (those
//!   are refused with a 400 that says so). Tombstones of deleted keys are never reaped.
//! - ACLs are off unless [`FakeConsul::require_token`] turns them on, and then there are only
//!   two callers: the management token, which may do everything, and the anonymous token (no
//!   token), which may do nothing (`default_policy = "deny"`); any other token is `ACL not
//!   found`. No policies, roles or the `/v1/acl` endpoints; see `acl.rs` for the answers.
//! - A session expires exactly at its TTL (Consul may take up to 2×TTL); session checks are
//!   recorded but never evaluated.
//! - Only TTL checks run. Other check kinds are stored with their initial status.
//!   `DeregisterCriticalServiceAfter` is honoured exactly (Consul enforces a 1m minimum and
//!   reaps every 30s). Timers are checked every 50 ms.
//! - Request bodies must use PascalCase field names (Consul also accepts other casings).
//!   KV keys are not validated (recent Consul versions refuse some characters), and an empty
//!   key gets the 404 above rather than Consul's 400 `Missing key name`.
//! - [`FakeConsul::set_unavailable`] fails every request with HTTP 500
//!   `rpc error: No cluster leader`, including agent endpoints that a real agent would still
//!   serve from local state.

mod acl;
mod app;
mod catalog;
mod duration;
mod http;
mod kv;
mod state;
mod txn;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::app::App;

/// How often session TTLs, check TTLs and critical-service deregistration are checked.
const REAP_INTERVAL: Duration = Duration::from_millis(50);

/// A running fake Consul agent. Serves until [`FakeConsul::shutdown`] or drop.
pub struct FakeConsul {
    /// The state, shared with the server and the timer task.
    app: Arc<App>,
    /// The address the server listens on.
    addr: SocketAddr,
}

impl fmt::Debug for FakeConsul {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConsul")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeConsul {
    /// Binds 127.0.0.1:0 and serves until dropped or [`FakeConsul::shutdown`].
    pub async fn start() -> std::io::Result<FakeConsul> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let app = Arc::new(App::new(cancel.clone()));
        let router = http::router(app.clone());
        // Both tasks end on `cancel`: the server stops accepting and drains (blocked queries
        // return at once), and the timer loop exits.
        tokio::spawn(async move {
            let server =
                axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned());
            if let Err(error) = server.await {
                tracing::warn!(%error, "fake-consul: server failed");
            }
        });
        tokio::spawn(run_timers(app.clone()));
        Ok(FakeConsul { app, addr })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: closes the listener, releases blocked queries and stops the timers.
    pub fn shutdown(&self) {
        self.app.cancel.cancel();
    }

    /// Invalidates a session as if its TTL had lapsed: its locks are released or deleted per
    /// its `Behavior`, and its lock-delay starts.
    pub fn expire_session(&self, id: &str) {
        self.app
            .write(|st| st.invalidate_session(id, Instant::now()));
    }

    /// Simulates Consul's index going backwards, as after a snapshot restore: every stored
    /// index (KV entries and the KV table, sessions, services, checks) is lowered to at most
    /// `to` (at least 1), and blocked queries return at once with the lowered index.
    ///
    /// As with a real restore, the Raft index itself keeps counting up: the next write gets an
    /// index above any issued before, so it also wakes a client still blocking on a
    /// pre-reset index.
    pub fn reset_index(&self, to: u64) {
        self.app.write(|st| st.reset_index(to));
    }

    /// The raw value of a KV key, if present.
    pub fn kv_value(&self, key: &str) -> Option<Vec<u8>> {
        self.app
            .read(|st| st.kv.entries.get(key).map(|e| e.value.clone()))
    }

    /// Registered services as (service ID, service name, aggregated check status), the status
    /// being the worst of `passing`, `warning` and `critical` among the service's checks.
    pub fn services(&self) -> Vec<(String, String, String)> {
        self.app.read(|st| {
            let services = st.catalog.services.values();
            let row = |s: &catalog::Service| {
                let status = st.catalog.aggregate_status(&s.def.id).to_owned();
                (s.def.id.clone(), s.def.name.clone(), status)
            };
            services.map(row).collect()
        })
    }

    /// How many requests have been received whose path starts with `prefix`
    /// (e.g. `/v1/kv/channelmesh/ring`). Requests are counted on arrival, so a query still
    /// blocking is included.
    pub fn request_count(&self, prefix: &str) -> u64 {
        self.app.request_count(prefix)
    }

    /// Turns ACLs on, `default_policy = "deny"`, with `token` the one management token (`None`
    /// turns them off again, the default): requests without it are refused as Consul refuses
    /// them (see the module docs).
    pub fn require_token(&self, token: Option<&str>) {
        self.app.set_acl_token(token.map(str::to_owned));
    }

    /// While `down`, every request fails with HTTP 500 `rpc error: No cluster leader`.
    pub fn set_unavailable(&self, down: bool) {
        self.app.unavailable.store(down, Ordering::SeqCst);
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.app.cancel.cancel();
    }
}

/// Runs session and check timers until shutdown.
async fn run_timers(app: Arc<App>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = app.cancel.cancelled() => return,
            _ = tick.tick() => app.update(|st| st.reap(Instant::now())),
        }
    }
}
