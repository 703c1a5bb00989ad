//! The ring in Consul, as every service reads it: where it lives (keys under a prefix), who
//! leads (the lock key's value), following the ring by blocking queries, and registering a
//! service in Consul's catalog with a TTL check.
//!
//! Keys, under a prefix (`channelmesh` by default):
//! - `<prefix>/ring-manager/leader`: the lock. Its value is the leader's [`LeaderInfo`]; its
//!   `LockIndex` counts acquisitions and is the leader's fencing token.
//! - `<prefix>/ring`: the ring and its members as a [`Record`], written only by a transaction
//!   that also checks that the writer's session still holds the lock (the ring manager's
//!   `cluster` module writes it). The record names its writer: the lock index and the session
//!   it held the lock with.
//!
//! Both keys start with `<prefix>/ring`, so one blocking prefix read of it sees the lock and
//! the ring together, from one snapshot of Consul's store, and wakes when either changes.
//! Whoever may write KV can write the ring key; what a reader accepts is decided by
//! [`check`]: only a record that names the lock's current `LockIndex` and holder. A record
//! with an invented lock index is refused, and since the fence is the lock's own index rather
//! than the highest one seen, it cannot freeze a reader either.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::consul::{BlockingLoop, Consul, ConsulError, ServiceDef};
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
    /// The writer's lock index (its fencing token): the lock's `LockIndex` when it won it.
    pub lock_index: u64,
    /// The session the writer held the lock with (absent in records written before it was
    /// recorded: such a record is accepted by no reader, and a new leader rewrites it).
    #[serde(default)]
    pub session: Option<String>,
    /// The writer's endpoint, for operators.
    pub leader: String,
    #[serde(flatten)]
    pub saved: Saved,
}

/// The lock key as a reader sees it: its `LockIndex`, and the session holding it (none while
/// it is free: between a leader's end and the next one's start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub lock_index: u64,
    pub session: Option<String>,
}

/// Why a reader refused a ring record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// There is no lock key: no leader ever took it, so no leader wrote the record.
    #[error("there is no ring manager lock, so no leader wrote it")]
    NoLock,
    /// Written under an earlier acquisition of the lock: the current leader has not written
    /// yet (it does as it starts).
    #[error("written by an earlier leader (lock index {record}; the lock's is {lock})")]
    EarlierLeader { record: u64, lock: u64 },
    /// It names a lock index the lock has not reached: no leader wrote it.
    #[error("it claims lock index {record}, which the lock (at {lock}) has not reached")]
    FutureLockIndex { record: u64, lock: u64 },
    /// The right lock index, but not the session holding the lock.
    #[error("written by session {record:?}, but session {holder} holds the lock")]
    NotTheHolder {
        record: Option<String>,
        holder: String,
    },
}

impl Refusal {
    /// Whether the record is simply older than the current leader (nothing wrong), rather than
    /// one no leader could have written.
    pub fn is_stale(&self) -> bool {
        matches!(self, Refusal::EarlierLeader { .. })
    }
}

/// Whether a reader accepts `record` while the lock is `lock`: only a record that names the
/// lock's current `LockIndex` and the session holding it. While the lock is free (its holder's
/// session ended, the next leader not in yet) Consul keeps its `LockIndex` but forgets the
/// session: a record of that lock index is the last leader's, and is accepted, so that a
/// process starting then still finds the ring (static stability).
pub fn check(record: &Record, lock: Option<&Lock>) -> Result<(), Refusal> {
    let Some(lock) = lock else {
        return Err(Refusal::NoLock);
    };
    if record.lock_index < lock.lock_index {
        return Err(Refusal::EarlierLeader {
            record: record.lock_index,
            lock: lock.lock_index,
        });
    }
    if record.lock_index > lock.lock_index {
        return Err(Refusal::FutureLockIndex {
            record: record.lock_index,
            lock: lock.lock_index,
        });
    }
    match &lock.session {
        Some(holder) if record.session.as_ref() != Some(holder) => Err(Refusal::NotTheHolder {
            record: record.session.clone(),
            holder: holder.clone(),
        }),
        _ => Ok(()),
    }
}

/// The lock and the ring, as one read of Consul saw them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The lock key, if it exists.
    pub lock: Option<Lock>,
    /// The ring key's raw value and modify index, if it exists.
    pub ring: Option<(Vec<u8>, u64)>,
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

    /// The prefix both keys start with: one prefix read sees the lock and the ring together.
    fn watched_prefix(&self) -> String {
        self.ring_key()
    }

    /// Reads the lock and the ring in one snapshot, as a blocking query when `block` gives the
    /// last index seen and the longest wait; returns them with the `X-Consul-Index`.
    ///
    /// When there is nothing under the prefix, the ring key is read once more on its own: an
    /// anonymous prefix read that Consul's ACLs filter down to nothing looks just like an
    /// empty prefix, and the single read turns it into a clear refusal.
    pub async fn snapshot(
        &self,
        block: Option<(u64, Duration)>,
    ) -> Result<(Snapshot, u64), crate::Error> {
        let (entries, index) = self.consul.list(&self.watched_prefix(), block).await?;
        if entries.is_empty() {
            // 404 when allowed and absent; 403 (an error) when not allowed.
            self.consul.get(&self.ring_key(), None).await?;
        }
        let (lock_key, ring_key) = (self.lock_key(), self.ring_key());
        let mut snapshot = Snapshot::default();
        for entry in entries {
            if entry.key == lock_key {
                snapshot.lock = Some(Lock {
                    lock_index: entry.lock_index,
                    session: entry.session,
                });
            } else if entry.key == ring_key {
                snapshot.ring = Some((entry.value, entry.modify_index));
            }
        }
        Ok((snapshot, index))
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

/// Follows the ring record by blocking queries, publishing each ring that supersedes the last
/// ([`mesh_core::Ring::supersedes`]: a newer epoch, or a reset's new generation). Keeps the
/// last ring while Consul is unreachable, and while the stored record is one it refuses
/// ([`follow_records`]).
pub(crate) async fn follow(
    ring: ConsulRing,
    tx: watch::Sender<Arc<mesh_core::Ring>>,
    cancel: CancellationToken,
) {
    follow_records(ring, cancel, |outcome| {
        let Ok(next) = outcome.and_then(|r| r.saved.ring().map_err(crate::Error::InvalidRing))
        else {
            return;
        };
        crate::source::offer(&tx, next);
    })
    .await;
}

/// Follows the lock and the ring record together by blocking prefix queries until `cancel`,
/// calling `seen` whenever either key changed (and the ring key exists) with the record if
/// [`check`] accepts it, else why not. A refused or unreadable record is logged (once) and
/// should leave the caller's last good one in place. Keeps going while Consul is unreachable
/// (backing off) or refuses the read (logged as an error: a missing or wrong ACL token).
pub async fn follow_records(
    ring: ConsulRing,
    cancel: CancellationToken,
    mut seen: impl FnMut(Result<Record, crate::Error>),
) {
    let mut blocking = BlockingLoop::new(MIN_QUERY_SPACING);
    let mut backoff = BACKOFF_MIN;
    // The modify index of the last record refused, so that a refusal is logged once.
    let mut refused = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = blocking.pace() => {}
        }
        // Cancel-safe: a dropped query loses nothing; the next one asks again.
        let answer = tokio::select! {
            _ = cancel.cancelled() => return,
            a = ring.snapshot(Some((blocking.index(), BLOCKING_WAIT))) => a,
        };
        let (snapshot, index) = match answer {
            Ok(a) => a,
            Err(e) => {
                if matches!(&e, crate::Error::Consul(ConsulError::Denied { .. })) {
                    tracing::error!(error = %e, retry_in = ?backoff, "consul refuses the ring watch");
                } else {
                    tracing::warn!(error = %e, retry_in = ?backoff, "ring watch on consul interrupted");
                }
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
        let Some((value, modify_index)) = snapshot.ring else {
            continue;
        };
        let outcome = decode_record(&value).and_then(|record| {
            check(&record, snapshot.lock.as_ref())
                .map(|()| record)
                .map_err(crate::Error::RefusedRecord)
        });
        match &outcome {
            Ok(_) => refused = None,
            Err(e) if refused != Some(modify_index) => {
                refused = Some(modify_index);
                match e {
                    crate::Error::RefusedRecord(r) if r.is_stale() => {
                        tracing::info!(reason = %r, "waiting for the leader's ring record");
                    }
                    _ => tracing::error!(
                        error = %e,
                        modify_index,
                        "refusing the ring record in consul; keeping the last good ring"
                    ),
                }
            }
            Err(_) => {}
        }
        seen(outcome);
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
        let (epoch, nodes, slot_owner, slot_followers) = Saved::ring_parts(&ring);
        Saved {
            epoch,
            nodes,
            slot_owner,
            slot_followers,
            members: vec![SavedMember {
                id: "cs-1".into(),
                addr: "10.0.0.1:7001".into(),
                pid: 42,
                state: "active".into(),
                incarnation: 1,
            }],
            next_incarnation: 2,
            ..Saved::default()
        }
    }

    #[test]
    fn a_record_round_trips_with_the_saved_ring_beside_the_fence() {
        let record = Record {
            lock_index: 3,
            session: Some("s-3".into()),
            leader: "http://10.0.0.9:50050".into(),
            saved: saved(),
        };
        let json = serde_json::to_value(&record).unwrap();
        // Flattened: the ring's fields sit next to the writer's, as every service reads them.
        assert_eq!(json["lock_index"], 3);
        assert_eq!(json["session"], "s-3");
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
            session: None,
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
            session: None,
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
    fn a_record_written_before_sessions_were_recorded_reads_without_one() {
        let mut json = serde_json::to_value(Record {
            lock_index: 2,
            session: None,
            leader: String::new(),
            saved: saved(),
        })
        .unwrap();
        json.as_object_mut().unwrap().remove("session");
        let record = decode_record(json.to_string().as_bytes()).unwrap();
        assert_eq!(record.session, None);
    }

    fn written(lock_index: u64, session: Option<&str>) -> Record {
        Record {
            lock_index,
            session: session.map(String::from),
            leader: String::new(),
            saved: saved(),
        }
    }

    fn lock(lock_index: u64, session: Option<&str>) -> Lock {
        Lock {
            lock_index,
            session: session.map(String::from),
        }
    }

    #[test]
    fn a_reader_accepts_only_the_record_of_the_locks_current_index_and_holder() {
        let held = lock(5, Some("s5"));
        assert_eq!(check(&written(5, Some("s5")), Some(&held)), Ok(()));
        // An earlier leader's: stale, not forged.
        let earlier = check(&written(4, Some("s4")), Some(&held)).unwrap_err();
        assert_eq!(earlier, Refusal::EarlierLeader { record: 4, lock: 5 });
        assert!(earlier.is_stale());
        // An invented lock index, however large: refused, and it moves no fence.
        let forged = check(&written(u64::MAX, Some("s5")), Some(&held)).unwrap_err();
        assert_eq!(
            forged,
            Refusal::FutureLockIndex {
                record: u64::MAX,
                lock: 5
            }
        );
        assert!(!forged.is_stale());
        assert_eq!(check(&written(5, Some("s5")), Some(&held)), Ok(()));
        // The right index, another session (or none recorded).
        for session in [Some("intruder"), None] {
            assert_eq!(
                check(&written(5, session), Some(&held)),
                Err(Refusal::NotTheHolder {
                    record: session.map(String::from),
                    holder: "s5".into()
                })
            );
        }
        // No lock at all: no leader wrote anything.
        assert_eq!(check(&written(1, Some("s1")), None), Err(Refusal::NoLock));
    }

    #[test]
    fn while_the_lock_is_free_the_last_leaders_record_is_accepted() {
        let free = lock(5, None);
        assert_eq!(check(&written(5, Some("s5")), Some(&free)), Ok(()));
        assert!(check(&written(4, Some("s4")), Some(&free)).is_err());
        assert!(check(&written(6, Some("s6")), Some(&free)).is_err());
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
