//! The ring in Consul, as every service reads it: where it lives (keys under a prefix), who
//! leads (the lock key's value), following the ring by blocking queries, and registering a
//! service in Consul's catalog with a TTL check.
//!
//! Keys, under a prefix (`channelmesh` by default):
//! - `<prefix>/ring-manager/leader`: the lock. Its value is the leader's [`LeaderInfo`]; its
//!   `LockIndex` counts acquisitions and is the leader's fencing token.
//! - `<prefix>/ring`: the ring and its members as a [`Record`], written only by a transaction
//!   that also checks that the writer's session still holds the lock (the ring manager's
//!   `cluster` module writes it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::consul::{BlockingLoop, Consul, ServiceDef};
use crate::record::Saved;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "channelmesh";
/// Default: the TTL of a service's health check in Consul.
pub const DEFAULT_CHECK_TTL: Duration = Duration::from_secs(10);
/// Consul removes a service whose check has been critical this long.
const DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// How long a blocking query waits for a change.
pub const BLOCKING_WAIT: Duration = Duration::from_secs(60);
/// The rate limit of every blocking-query loop: at most one query per this.
pub const MIN_QUERY_SPACING: Duration = Duration::from_millis(20);
/// The first and the longest pause after a failed request to Consul.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a stopping service waits for Consul to deregister it.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the ring lives in Consul; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConsulRing {
    pub consul: Consul,
    pub prefix: String,
}

/// The lock key's value: who leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The leader's gRPC endpoint, e.g. `http://10.0.0.5:50050`.
    pub endpoint: String,
    pub pid: u32,
}

/// The ring key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The writer's lock index (its fencing token): never lower than any earlier writer's.
    pub lock_index: u64,
    /// The writer's endpoint, for operators.
    pub leader: String,
    #[serde(flatten)]
    pub saved: Saved,
}

impl ConsulRing {
    /// The ring at `prefix` in the Consul agent at `url`.
    pub fn new(url: &str, token: Option<String>, prefix: &str) -> Result<Self, crate::Error> {
        Ok(ConsulRing {
            consul: Consul::new(url, token)?,
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// The leader lock's key.
    pub fn lock_key(&self) -> String {
        format!("{}/ring-manager/leader", self.prefix)
    }

    /// The ring's key.
    pub fn ring_key(&self) -> String {
        format!("{}/ring", self.prefix)
    }

    /// The current leader, if the lock is held.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>, crate::Error> {
        let (entry, _) = self.consul.get(&self.lock_key(), None).await?;
        Ok(entry
            .filter(|e| e.session.is_some())
            .and_then(|e| serde_json::from_slice(&e.value).ok()))
    }

    /// The stored ring record and its modify index (0 when there is none yet).
    pub async fn load(&self) -> Result<(Option<Record>, u64), crate::Error> {
        let (entry, _) = self.consul.get(&self.ring_key(), None).await?;
        match entry {
            None => Ok((None, 0)),
            Some(entry) => {
                let record = decode_record(&entry.value)?;
                Ok((Some(record), entry.modify_index))
            }
        }
    }
}

pub fn decode_record(value: &[u8]) -> Result<Record, crate::Error> {
    let record: Record = serde_json::from_slice(value)
        .map_err(|e| crate::Error::InvalidRing(format!("ring record in consul: {e}")))?;
    record.saved.ring().map_err(crate::Error::InvalidRing)?;
    Ok(record)
}

/// Follows the ring record by blocking queries, publishing each newer epoch on `tx`. Keeps the
/// last ring while Consul is unreachable; refuses a record from an older leader (lower lock
/// index) or an older epoch.
pub(crate) async fn follow(
    ring: ConsulRing,
    tx: watch::Sender<Arc<mesh_core::Ring>>,
    cancel: CancellationToken,
) {
    let key = ring.ring_key();
    let mut blocking = BlockingLoop::new(MIN_QUERY_SPACING);
    let mut fence = 0u64;
    let mut backoff = BACKOFF_MIN;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = blocking.pace() => {}
        }
        // Cancel-safe: a dropped query loses nothing; the next one asks again.
        let answer = tokio::select! {
            _ = cancel.cancelled() => return,
            a = ring.consul.get(&key, Some((blocking.index(), BLOCKING_WAIT))) => a,
        };
        let (entry, index) = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "ring watch on consul interrupted");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        if !blocking.observe(index) {
            continue;
        }
        let Some(entry) = entry else { continue };
        let record = match decode_record(&entry.value) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "ignoring an unreadable ring record");
                continue;
            }
        };
        if record.lock_index < fence {
            tracing::warn!(
                lock_index = record.lock_index,
                fence,
                "ignoring a ring written by an earlier leader"
            );
            continue;
        }
        fence = record.lock_index;
        let Ok(next) = record.saved.ring() else {
            continue;
        };
        let current = tx.borrow().epoch();
        if next.epoch() > current {
            tx.send_replace(Arc::new(next));
        }
    }
}

/// Registers `service` in Consul with a TTL check and passes the check every third of its TTL
/// until `cancel`, then deregisters it. Re-registers when the agent forgot it (e.g. restarted).
pub async fn keep_registered(consul: Consul, service: ServiceDef, cancel: CancellationToken) {
    let check = service.check_id();
    let mut registered = false;
    let mut backoff = BACKOFF_MIN;
    loop {
        let result = if registered {
            consul.update_check(&check, true, "alive").await
        } else {
            consul.register_service(&service).await.map(|()| true)
        };
        let pause = match result {
            Ok(true) => {
                if !registered {
                    tracing::info!(service = %service.id, "registered in consul");
                }
                registered = true;
                backoff = BACKOFF_MIN;
                service.ttl / 3
            }
            Ok(false) => {
                registered = false;
                BACKOFF_MIN
            }
            Err(e) => {
                tracing::warn!(service = %service.id, error = %e, "consul registration");
                let pause = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                pause
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    if registered {
        let _ =
            tokio::time::timeout(DEREGISTER_TIMEOUT, consul.deregister_service(&service.id)).await;
    }
}

/// A [`ServiceDef`] with the defaults channelmesh uses, for a service listening on `addr` and
/// reached at `advertise` (`host:port`, optionally as an `http://` URL) if given. An unspecified
/// listen IP with nothing advertised leaves the address empty: Consul then uses its node's.
pub fn service_def(
    kind: &str,
    id: &str,
    addr: SocketAddr,
    advertise: Option<&str>,
    meta: Vec<(String, String)>,
) -> ServiceDef {
    let advertised = advertise
        .map(|a| {
            a.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
        })
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)));
    let (address, port) = match advertised {
        Some(hp) => hp,
        None if addr.ip().is_unspecified() => (String::new(), addr.port()),
        None => (addr.ip().to_string(), addr.port()),
    };
    ServiceDef {
        id: format!("channelmesh-{kind}-{id}"),
        name: format!("channelmesh-{kind}"),
        address,
        port,
        tags: vec!["channelmesh".to_string()],
        meta,
        ttl: DEFAULT_CHECK_TTL,
        deregister_after: DEREGISTER_AFTER,
    }
}
