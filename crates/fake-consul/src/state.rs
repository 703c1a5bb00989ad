//! The fake's whole state store: the Raft index, the KV table, sessions and lock-delays.
//!
//! Services and checks are added to [`State`] by `catalog.rs`. Everything here is synchronous
//! and takes `now` as an argument; the HTTP layer holds the one mutex around it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::catalog::Catalog;
use crate::kv::Kv;

/// The single node the fake pretends to be.
pub(crate) const NODE: &str = "fake-node";
/// The fake node's ID.
pub(crate) const NODE_ID: &str = "5f3b4c1e-8a2d-4e6f-9b7a-0c1d2e3f4a5b";
/// The one datacenter.
pub(crate) const DATACENTER: &str = "dc1";
/// The Raft index the fake starts at; the node and its `serfHealth` check are registered at it.
pub(crate) const START_INDEX: u64 = 10;

/// What happens to a session's locks when it is invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behavior {
    /// Locks are released (the keys stay).
    Release,
    /// Locked keys are deleted.
    Delete,
}

/// A session as created by `/v1/session/create`.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Its human-readable `Name`.
    pub(crate) name: String,
    /// How long its keys cannot be re-acquired after it is invalidated.
    pub(crate) lock_delay: Duration,
    /// Release or delete locks on invalidation.
    pub(crate) behavior: Behavior,
    /// The `TTL` string as given ("" when none).
    pub(crate) ttl_text: String,
    /// The parsed TTL, if any.
    pub(crate) ttl: Option<Duration>,
    /// When the TTL lapses unless renewed.
    pub(crate) expires: Option<Instant>,
    /// The node checks it is tied to (reported, never evaluated).
    pub(crate) node_checks: Vec<String>,
    /// The index at which it was created (sessions are never modified).
    pub(crate) create_index: u64,
}

impl Session {
    /// Consul's JSON for the session.
    pub(crate) fn to_json(&self, id: &str) -> Value {
        json!({
            "ID": id,
            "Name": self.name,
            "Node": NODE,
            "LockDelay": u64::try_from(self.lock_delay.as_nanos()).unwrap_or(u64::MAX),
            "Behavior": match self.behavior { Behavior::Release => "release", Behavior::Delete => "delete" },
            "TTL": self.ttl_text,
            "NodeChecks": self.node_checks,
            "ServiceChecks": null,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.create_index,
        })
    }
}

/// Everything the fake Consul knows.
#[derive(Debug)]
pub(crate) struct State {
    /// The Raft index: bumped by every write.
    pub(crate) index: u64,
    /// Bumped by `reset_index`: blocked queries return at once when it changes, as Consul's do
    /// when a snapshot restore abandons the state store.
    pub(crate) epoch: u64,
    /// The KV table.
    pub(crate) kv: Kv,
    /// When each key's lock-delay ends.
    pub(crate) lock_delays: HashMap<String, Instant>,
    /// Live sessions by ID.
    pub(crate) sessions: BTreeMap<String, Session>,
    /// The last index at which a session was created or invalidated.
    pub(crate) session_index: u64,
    /// Registered services and checks.
    pub(crate) catalog: Catalog,
}

impl State {
    pub(crate) fn new() -> Self {
        State {
            index: START_INDEX,
            epoch: 0,
            kv: Kv::default(),
            lock_delays: HashMap::new(),
            sessions: BTreeMap::new(),
            session_index: START_INDEX,
            catalog: Catalog::new(START_INDEX),
        }
    }

    /// Appends a "Raft log entry" and returns its index.
    pub(crate) fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Whether `key` is still in a lock-delay at `now`.
    pub(crate) fn in_lock_delay(&self, key: &str, now: Instant) -> bool {
        self.lock_delays.get(key).is_some_and(|until| *until > now)
    }

    /// Creates a session and returns its ID.
    pub(crate) fn create_session(&mut self, mut session: Session, now: Instant) -> String {
        let id = new_uuid();
        session.create_index = self.bump();
        session.expires = session.ttl.map(|ttl| now + ttl);
        self.session_index = session.create_index;
        self.sessions.insert(id.clone(), session);
        id
    }

    /// Restarts a session's TTL clock; `None` if the session does not exist.
    pub(crate) fn renew_session(&mut self, id: &str, now: Instant) -> Option<Value> {
        let session = self.sessions.get_mut(id)?;
        session.expires = session.ttl.map(|ttl| now + ttl);
        Some(session.to_json(id))
    }

    /// Invalidates a session (destroy or TTL expiry): releases or deletes its locks and starts
    /// their lock-delay. Returns false if there was no such session.
    pub(crate) fn invalidate_session(&mut self, id: &str, now: Instant) -> bool {
        let Some(session) = self.sessions.remove(id) else {
            return false;
        };
        let idx = self.bump();
        self.session_index = idx;
        for key in self.kv.keys_held_by(id) {
            match session.behavior {
                Behavior::Release => self.kv.release_invalidated(idx, &key),
                Behavior::Delete => self.kv.delete(idx, &key),
            }
            if !session.lock_delay.is_zero() {
                self.lock_delays.insert(key, now + session.lock_delay);
            }
        }
        true
    }

    /// Runs the timers: session TTLs, check TTLs and critical-service deregistration.
    /// Returns whether anything changed.
    pub(crate) fn reap(&mut self, now: Instant) -> bool {
        let expired: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.expires.is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            tracing::debug!(session = %id, "fake-consul: session TTL lapsed");
            self.invalidate_session(id, now);
        }
        self.lock_delays.retain(|_, until| *until > now);
        let catalog_changed = self.reap_checks(now);
        !expired.is_empty() || catalog_changed
    }

    /// Lowers every stored index to at most `to` and abandons blocked queries, like a snapshot
    /// restore. The Raft index is not lowered: Raft never goes back, so writes after a real
    /// restore get indexes above everything issued before it.
    pub(crate) fn reset_index(&mut self, to: u64) {
        let to = to.max(1);
        for entry in self.kv.entries.values_mut() {
            entry.create_index = entry.create_index.min(to);
            entry.modify_index = entry.modify_index.min(to);
        }
        self.kv.index = self.kv.index.min(to);
        for idx in self.kv.tombstones.values_mut() {
            *idx = (*idx).min(to);
        }
        for session in self.sessions.values_mut() {
            session.create_index = session.create_index.min(to);
        }
        self.session_index = self.session_index.min(to);
        self.catalog.lower_indexes(to);
        self.epoch += 1;
    }
}

/// A random UUID-shaped ID (8-4-4-4-12 hex digits), as Consul's `uuid.GenerateUUID` makes.
pub(crate) fn new_uuid() -> String {
    let hex: String = rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}
