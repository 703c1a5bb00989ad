//! The KV table and the per-verb write rules of Consul's state store (`agent/consul/state/kvs.go`).
//!
//! The table is a plain value so that a transaction can run against a clone and be swapped in
//! only if every operation succeeds. Session validity and lock-delay are checked by the caller,
//! as Consul checks them before the write reaches Raft.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Value, json};

/// One stored key, as Consul's `DirEntry` without the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// How many times the key has been newly acquired; a plain write resets it to 0, as in Consul.
    pub(crate) lock_index: u64,
    /// The opaque `Flags` integer.
    pub(crate) flags: u64,
    /// The raw value; empty renders as `null`.
    pub(crate) value: Vec<u8>,
    /// The session holding the lock, if any.
    pub(crate) session: Option<String>,
    /// The index at which the key was created.
    pub(crate) create_index: u64,
    /// The index of the last write that changed the key.
    pub(crate) modify_index: u64,
}

impl Entry {
    /// Consul's JSON for the entry; `with_value` is false for transaction results of writes.
    pub(crate) fn to_json(&self, key: &str, with_value: bool) -> Value {
        let value = (with_value && !self.value.is_empty())
            .then(|| base64::engine::general_purpose::STANDARD.encode(&self.value));
        let mut out = json!({
            "LockIndex": self.lock_index,
            "Key": key,
            "Flags": self.flags,
            "Value": value,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        });
        if let Some(session) = &self.session {
            out["Session"] = Value::from(session.as_str());
        }
        out
    }
}

/// The KV table: its entries and its table index (which Consul also moves on deletes).
#[derive(Debug, Clone, Default)]
pub(crate) struct Kv {
    /// The entries by key.
    pub(crate) entries: BTreeMap<String, Entry>,
    /// The last index at which any key was written or deleted.
    pub(crate) index: u64,
    /// Consul's graveyard: the index at which each deleted key was deleted, so that a prefix
    /// read's index moves on a delete under the prefix. Kept forever (Consul reaps them).
    pub(crate) tombstones: BTreeMap<String, u64>,
}

impl Kv {
    /// `kvsSetTxn`: stores the entry unless it is identical to the current one, in which case
    /// no index moves (Consul skips idempotent writes). Returns the entry as stored.
    fn store(&mut self, idx: u64, key: &str, mut entry: Entry) -> Entry {
        if let Some(old) = self.entries.get(key) {
            entry.create_index = old.create_index;
            entry.modify_index = old.modify_index;
            if *old == entry {
                return entry;
            }
        } else {
            entry.create_index = idx;
        }
        entry.modify_index = idx;
        self.index = idx;
        self.entries.insert(key.to_owned(), entry.clone());
        entry
    }

    fn entry(lock_index: u64, flags: u64, value: Vec<u8>, session: Option<String>) -> Entry {
        Entry {
            lock_index,
            flags,
            value,
            session,
            create_index: 0,
            modify_index: 0,
        }
    }

    /// A plain write: keeps the lock holder, resets `LockIndex` like Consul's `kvsSetTxn`.
    pub(crate) fn set(&mut self, idx: u64, key: &str, value: Vec<u8>, flags: u64) -> Entry {
        let session = self.entries.get(key).and_then(|e| e.session.clone());
        self.store(idx, key, Self::entry(0, flags, value, session))
    }

    /// Check-and-set: `cas` 0 means "only if absent", otherwise it must equal `ModifyIndex`.
    pub(crate) fn cas(
        &mut self,
        idx: u64,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        cas: u64,
    ) -> Option<Entry> {
        let current = self.entries.get(key).map(|e| e.modify_index);
        let ok = match current {
            None => cas == 0,
            Some(modify_index) => cas != 0 && cas == modify_index,
        };
        ok.then(|| self.set(idx, key, value, flags))
    }

    /// Acquire: succeeds if unlocked (bumping `LockIndex`) or already held by `session`.
    pub(crate) fn lock(
        &mut self,
        idx: u64,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
    ) -> Option<Entry> {
        let lock_index = match self.entries.get(key) {
            Some(e) if e.session.as_deref() == Some(session) => e.lock_index,
            Some(e) if e.session.is_some() => return None,
            Some(e) => e.lock_index + 1,
            None => 1,
        };
        Some(self.store(
            idx,
            key,
            Self::entry(lock_index, flags, value, Some(session.to_owned())),
        ))
    }

    /// Release: only the holder may release; the body still replaces the value, as in Consul.
    pub(crate) fn unlock(
        &mut self,
        idx: u64,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
    ) -> Option<Entry> {
        let held = self
            .entries
            .get(key)
            .filter(|e| e.session.as_deref() == Some(session))?;
        let lock_index = held.lock_index;
        Some(self.store(idx, key, Self::entry(lock_index, flags, value, None)))
    }

    /// Clears the holder of a key whose session was invalidated, keeping value and flags.
    pub(crate) fn release_invalidated(&mut self, idx: u64, key: &str) {
        if let Some(mut entry) = self.entries.get(key).cloned() {
            entry.session = None;
            self.store(idx, key, entry);
        }
    }

    /// Deletes a key (leaving a tombstone); deleting a missing key changes nothing.
    pub(crate) fn delete(&mut self, idx: u64, key: &str) {
        if self.entries.remove(key).is_some() {
            self.index = idx;
            self.tombstones.insert(key.to_owned(), idx);
        }
    }

    /// CAS delete. As in `kvsDeleteCASTxn`, a missing key counts as success.
    pub(crate) fn delete_cas(&mut self, idx: u64, key: &str, cas: u64) -> bool {
        match self.entries.get(key) {
            None => true,
            Some(e) if e.modify_index != cas => false,
            Some(_) => {
                self.delete(idx, key);
                true
            }
        }
    }

    /// Deletes every key under `prefix`.
    pub(crate) fn delete_tree(&mut self, idx: u64, prefix: &str) {
        for key in self.keys_with_prefix(prefix) {
            self.delete(idx, &key);
        }
    }

    /// The keys under `prefix`, in order.
    pub(crate) fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let under = self.entries.range(prefix.to_owned()..);
        under
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A prefix read as `kvsListTxn` answers it: the entries under `prefix`, and its index —
    /// the highest `ModifyIndex` or tombstone under the prefix, else the table's (at least 1).
    pub(crate) fn list(&self, prefix: &str) -> (u64, Vec<(String, Entry)>) {
        let entries: Vec<(String, Entry)> = self
            .entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let modified = entries.iter().map(|(_, e)| e.modify_index);
        let deleted = self
            .tombstones
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, idx)| *idx);
        let index = modified.chain(deleted).max().unwrap_or(0);
        let index = if index == 0 { self.index.max(1) } else { index };
        (index, entries)
    }

    /// The keys locked by `session`.
    pub(crate) fn keys_held_by(&self, session: &str) -> Vec<String> {
        let held = self
            .entries
            .iter()
            .filter(|(_, e)| e.session.as_deref() == Some(session));
        held.map(|(k, _)| k.clone()).collect()
    }
}
