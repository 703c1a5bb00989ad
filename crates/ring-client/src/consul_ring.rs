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

#[cfg(test)]
mod tests {
    use mesh_core::{NodeId, Ring, RingNode};

    use super::*;
    use crate::record::SavedMember;

    fn def(addr: &str, advertise: Option<&str>) -> ServiceDef {
        service_def(
            "gateway",
            "us-east-1",
            addr.parse().unwrap(),
            advertise,
            vec![],
        )
    }

    fn address(d: &ServiceDef) -> (&str, u16) {
        (d.address.as_str(), d.port)
    }

    #[test]
    fn a_service_is_named_by_kind_and_id_with_the_default_check() {
        let meta = vec![("region".to_string(), "us-east".to_string())];
        let d = service_def(
            "channel-server",
            "cs-1",
            "127.0.0.1:7001".parse().unwrap(),
            None,
            meta.clone(),
        );
        assert_eq!(d.id, "channelmesh-channel-server-cs-1");
        assert_eq!(d.name, "channelmesh-channel-server");
        assert_eq!(d.tags, ["channelmesh"]);
        assert_eq!(d.meta, meta);
        assert_eq!(d.ttl, DEFAULT_CHECK_TTL);
        assert_eq!(d.deregister_after, DEREGISTER_AFTER);
    }

    #[test]
    fn the_advertised_address_wins_with_or_without_a_scheme() {
        for advertise in [
            "gw-1.internal:8080",
            "http://gw-1.internal:8080",
            "https://gw-1.internal:8080/",
        ] {
            let d = def("0.0.0.0:9000", Some(advertise));
            assert_eq!(address(&d), ("gw-1.internal", 8080), "{advertise}");
        }
    }

    #[test]
    fn without_a_usable_advertised_address_the_listen_address_is_used() {
        assert_eq!(address(&def("10.0.0.5:9000", None)), ("10.0.0.5", 9000));
        // No port, or not a number: as if nothing were advertised.
        assert_eq!(
            address(&def("10.0.0.5:9000", Some("gw-1.internal"))),
            ("10.0.0.5", 9000)
        );
        assert_eq!(
            address(&def("10.0.0.5:9000", Some("gw-1.internal:http"))),
            ("10.0.0.5", 9000)
        );
    }

    #[test]
    fn an_unspecified_listen_ip_leaves_the_address_to_consul() {
        assert_eq!(address(&def("0.0.0.0:9000", None)), ("", 9000));
        assert_eq!(address(&def("[::]:9000", None)), ("", 9000));
    }

    #[test]
    fn the_keys_live_under_the_prefix_without_its_slashes() {
        let ring = ConsulRing::new("http://127.0.0.1:8500", None, "/team-a/cm/").unwrap();
        assert_eq!(ring.prefix, "team-a/cm");
        assert_eq!(ring.lock_key(), "team-a/cm/ring-manager/leader");
        assert_eq!(ring.ring_key(), "team-a/cm/ring");
        assert!(ConsulRing::new("127.0.0.1:8500", None, DEFAULT_PREFIX).is_err());
    }

    fn saved() -> Saved {
        let node = |id: &str, addr: &str| RingNode {
            id: NodeId::new(id).unwrap(),
            addr: addr.into(),
        };
        let ring = Ring::empty()
            .rebalanced(&[node("cs-1", "10.0.0.1:7001"), node("cs-2", "10.0.0.2:7001")]);
        let (epoch, nodes, slot_owner) = Saved::ring_parts(&ring);
        Saved {
            epoch,
            nodes,
            slot_owner,
            members: vec![SavedMember {
                id: "cs-1".into(),
                addr: "10.0.0.1:7001".into(),
                pid: 42,
                state: "active".into(),
                incarnation: 1,
            }],
            next_incarnation: 2,
        }
    }

    #[test]
    fn a_record_round_trips_with_the_saved_ring_beside_the_fence() {
        let record = Record {
            lock_index: 3,
            leader: "http://10.0.0.9:50050".into(),
            saved: saved(),
        };
        let json = serde_json::to_value(&record).unwrap();
        // Flattened: the ring's fields sit next to the writer's, as every service reads them.
        assert_eq!(json["lock_index"], 3);
        assert_eq!(json["epoch"], record.saved.epoch);
        assert!(json.get("saved").is_none());
        let decoded = decode_record(json.to_string().as_bytes()).unwrap();
        assert_eq!(decoded, record);
    }

    #[test]
    fn a_record_that_is_not_json_or_holds_a_bad_ring_is_refused() {
        let invalid =
            |value: &[u8]| matches!(decode_record(value), Err(crate::Error::InvalidRing(_)));
        assert!(invalid(b"not json"));
        assert!(invalid(b"{\"lock_index\": 1}"), "no ring in it");
        let mut record = Record {
            lock_index: 1,
            leader: String::new(),
            saved: saved(),
        };
        record.saved.slot_owner.pop();
        assert!(
            invalid(&serde_json::to_vec(&record).unwrap()),
            "a slot short"
        );
        let mut record = Record {
            lock_index: 1,
            leader: String::new(),
            saved: saved(),
        };
        record.saved.nodes[0].0 = "not a node id".into();
        assert!(
            invalid(&serde_json::to_vec(&record).unwrap()),
            "a bad node id"
        );
    }

    #[test]
    fn the_leaders_lock_value_is_its_endpoint_and_pid() {
        let leader: LeaderInfo =
            serde_json::from_str(r#"{"endpoint": "http://10.0.0.9:50050", "pid": 7}"#).unwrap();
        assert_eq!(
            leader,
            LeaderInfo {
                endpoint: "http://10.0.0.9:50050".into(),
                pid: 7
            }
        );
    }
}
