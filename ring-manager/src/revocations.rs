//! Revoked client tokens: a bounded, versioned set of `jti`s that gateways follow through their
//! reports.
//!
//! Each `RevokeTokens` call bumps the version and stamps its entries with it; a gateway reports
//! the (generation, version) it holds and the directive carries the entries newer than that,
//! oldest first and a page at a time. The generation is random per ring manager start, so a
//! gateway reporting another generation gets the whole set again.
//!
//! Durable: the set is saved with the ring (state file, Consul KV) before a call is answered,
//! and a restarted (or newly elected) ring manager restores it ([`Revocations::restore`]) under
//! a new generation, so every gateway — old or started since — gets the whole set again.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

/// The most revocations held at once; past it `RevokeTokens` answers RESOURCE_EXHAUSTED.
pub const MAX_REVOCATIONS: usize = 100_000;
/// The most revocations one call may carry (and one directive, so a call's entries fit in one).
pub const MAX_REVOCATIONS_PER_CALL: usize = 10_000;
/// The longest `jti`, in bytes (as `mesh_core::token::MAX_JTI_BYTES`).
pub const MAX_JTI_BYTES: usize = 256;

/// A revoked token: its `jti` and when the token expires (Unix seconds); the entry is dropped
/// after that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedToken {
    pub jti: String,
    pub expires_at: u64,
}

/// The set after a `RevokeTokens` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// The set's version (bumped by every call that revoked something).
    pub version: u64,
    /// Entries held.
    pub held: u64,
}

/// What a gateway lacks: the entries newer than the version it reported, and the generation
/// and version it holds once it has added them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchUp {
    pub generation: u64,
    pub version: u64,
    /// Oldest first.
    pub revoked: Vec<RevokedToken>,
}

/// Why a `RevokeTokens` call was refused (the whole call: it is all or nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("{0} revocations in one call; at most {MAX_REVOCATIONS_PER_CALL}")]
    TooManyInOneCall(usize),
    #[error("jti must be 1 to {MAX_JTI_BYTES} bytes")]
    BadJti,
    /// The set is full; it holds this many.
    #[error("the revocation list holds {0} of at most {MAX_REVOCATIONS}")]
    Full(usize),
}

/// The revocation set.
#[derive(Debug, Clone)]
pub struct Revocations {
    generation: u64,
    version: u64,
    /// jti -> (expires_at, version).
    by_jti: HashMap<String, (u64, u64)>,
    /// (version, jti), for the entries newer than a gateway's version.
    by_version: BTreeSet<(u64, String)>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            // Random per start (RandomState is seeded from the OS), never 0: a new gateway
            // reports generation 0 and must get the whole set.
            generation: RandomState::new().build_hasher().finish().max(1),
            version: 0,
            by_jti: HashMap::new(),
            by_version: BTreeSet::new(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Revocations {
    /// A set holding `entries` (as saved), under a new generation: every gateway catches up
    /// from scratch. Expired entries are dropped; the rest share version 1.
    pub fn restore(entries: Vec<RevokedToken>) -> Self {
        let mut set = Revocations::default();
        if let Err(e) = set.insert_unchecked(entries, unix_now()) {
            tracing::error!(error = %e, "restoring the saved token revocations");
        }
        set
    }

    /// The entries held, as saved (not yet expired, by jti).
    pub fn saved(&self) -> Vec<RevokedToken> {
        let mut entries: Vec<RevokedToken> = self
            .by_jti
            .iter()
            .map(|(jti, &(expires_at, _))| RevokedToken {
                jti: jti.clone(),
                expires_at,
            })
            .collect();
        entries.sort_by(|a, b| a.jti.cmp(&b.jti));
        entries
    }

    /// Adds `entries` (already-expired ones are skipped: their tokens are refused anyway).
    /// All or nothing: a bad entry or a full set refuses the whole call.
    pub fn revoke(&mut self, entries: Vec<RevokedToken>) -> Result<Revoked, RevocationError> {
        self.revoke_at(entries, unix_now())
    }

    /// [`Revocations::revoke`] at `now` (Unix seconds).
    fn revoke_at(
        &mut self,
        entries: Vec<RevokedToken>,
        now: u64,
    ) -> Result<Revoked, RevocationError> {
        if entries.len() > MAX_REVOCATIONS_PER_CALL {
            return Err(RevocationError::TooManyInOneCall(entries.len()));
        }
        if entries
            .iter()
            .any(|e| e.jti.is_empty() || e.jti.len() > MAX_JTI_BYTES)
        {
            return Err(RevocationError::BadJti);
        }
        self.insert_unchecked(entries, now)
    }

    /// Adds `entries`, checked by the caller for their count and jtis, at `now`: all or
    /// nothing, refused when the set would be full.
    fn insert_unchecked(
        &mut self,
        entries: Vec<RevokedToken>,
        now: u64,
    ) -> Result<Revoked, RevocationError> {
        self.expire(now);
        let live: Vec<RevokedToken> = entries.into_iter().filter(|e| e.expires_at > now).collect();
        let new = live
            .iter()
            .filter(|e| !self.by_jti.contains_key(&e.jti))
            .count();
        if self.by_jti.len() + new > MAX_REVOCATIONS {
            return Err(RevocationError::Full(self.by_jti.len()));
        }
        if !live.is_empty() {
            self.version += 1;
            for e in live {
                let version = self.version;
                let expires_at = match self.by_jti.get(&e.jti) {
                    Some(&(old_expiry, old_version)) => {
                        self.by_version.remove(&(old_version, e.jti.clone()));
                        old_expiry.max(e.expires_at)
                    }
                    None => e.expires_at,
                };
                self.by_version.insert((version, e.jti.clone()));
                self.by_jti.insert(e.jti, (expires_at, version));
            }
            tracing::info!(
                version = self.version,
                held = self.by_jti.len(),
                "tokens revoked"
            );
        }
        Ok(Revoked {
            version: self.version,
            held: self.by_jti.len() as u64,
        })
    }

    /// Drops the entries whose tokens have expired.
    fn expire(&mut self, now: u64) {
        let by_version = &mut self.by_version;
        self.by_jti.retain(|jti, (expires_at, version)| {
            let keep = *expires_at > now;
            if !keep {
                by_version.remove(&(*version, jti.clone()));
            }
            keep
        });
    }

    /// What a gateway holding (`generation`, `version`) lacks: the entries newer than
    /// `version` (all when the generation differs), whole versions at a time, up to
    /// [`MAX_REVOCATIONS_PER_CALL`] entries.
    pub fn catch_up(&self, generation: u64, version: u64) -> CatchUp {
        let from = if generation == self.generation {
            version
        } else {
            0
        };
        let mut page = Vec::new();
        // The newest version whose entries are all in the page, and where the current one began.
        let (mut complete, mut current, mut group_start) = (from, from, 0);
        let mut full = false;
        // A report of the last possible version (no gateway holds it; a hostile one may say so)
        // has nothing after it.
        for (v, jti) in self
            .by_version
            .range((from.saturating_add(1), String::new())..)
        {
            let Some(&(expires_at, _)) = self.by_jti.get(jti) else {
                continue;
            };
            if *v != current {
                complete = current;
                current = *v;
                group_start = page.len();
            }
            if page.len() == MAX_REVOCATIONS_PER_CALL {
                // A version is never split: its entries wait for the next directive. One
                // call's entries always fit in a page, so every page makes progress.
                page.truncate(group_start);
                full = true;
                break;
            }
            page.push(RevokedToken {
                jti: jti.clone(),
                expires_at,
            });
        }
        // Everything sent: the gateway is at the current version even if the newest versions'
        // entries have expired since.
        let last = if full { complete } else { self.version };
        CatchUp {
            generation: self.generation,
            version: last,
            revoked: page,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(jti: &str, expires_at: u64) -> RevokedToken {
        RevokedToken {
            jti: jti.into(),
            expires_at,
        }
    }

    fn jtis(c: &CatchUp) -> Vec<&str> {
        c.revoked.iter().map(|e| e.jti.as_str()).collect()
    }

    #[test]
    fn a_restored_set_holds_the_saved_entries_under_a_new_generation() {
        let mut r = Revocations::default();
        let far = unix_now() + 3600;
        r.revoke(vec![entry("b", far), entry("a", far)]).unwrap();
        r.revoke(vec![entry("c", far)]).unwrap();
        let saved = r.saved();
        assert_eq!(saved, [entry("a", far), entry("b", far), entry("c", far)]);
        let mut expired = saved.clone();
        expired.push(entry("gone", 1));
        let back = Revocations::restore(expired);
        assert_eq!(back.saved(), saved);
        assert_ne!(back.generation, r.generation);
        // A gateway of the old generation gets the whole set again.
        let c = back.catch_up(r.generation, r.version);
        assert_eq!(jtis(&c), ["a", "b", "c"]);
        assert!(Revocations::restore(Vec::new()).saved().is_empty());
    }

    #[test]
    fn gateways_catch_up_by_version() {
        let mut r = Revocations::default();
        let now = 1_000;
        r.revoke_at(vec![entry("a", now + 10), entry("b", now + 10)], now)
            .unwrap();
        let c = r.catch_up(0, 0);
        assert_eq!(jtis(&c), ["a", "b"]);
        assert_eq!(c.version, 1);
        let (generation, version) = (c.generation, c.version);
        assert_ne!(generation, 0, "a new gateway's generation is never ours");
        let c = r.catch_up(generation, version);
        assert!(c.revoked.is_empty());
        assert_eq!(c.version, 1);
        r.revoke_at(vec![entry("c", now + 10)], now).unwrap();
        let c = r.catch_up(generation, version);
        assert_eq!(jtis(&c), ["c"]);
        assert_eq!(c.version, 2);
        // Another generation (a restarted ring manager's gateway): the whole set.
        let c = r.catch_up(generation.wrapping_add(1), 2);
        assert_eq!(jtis(&c), ["a", "b", "c"]);
    }

    #[test]
    fn a_call_bumps_the_version_only_when_it_revokes_something() {
        let mut r = Revocations::default();
        assert_eq!(
            r.revoke_at(vec![], 10).unwrap(),
            Revoked {
                version: 0,
                held: 0
            }
        );
        assert_eq!(r.revoke_at(vec![entry("a", 50)], 10).unwrap().version, 1);
        // Only expired entries: nothing to add, no new version.
        assert_eq!(r.revoke_at(vec![entry("b", 5)], 10).unwrap().version, 1);
        // Re-revoking keeps the later expiry and moves the entry to the new version.
        let reply = r.revoke_at(vec![entry("a", 20)], 10).unwrap();
        assert_eq!(
            reply,
            Revoked {
                version: 2,
                held: 1
            }
        );
        let c = r.catch_up(0, 0);
        assert_eq!(c.revoked, [entry("a", 50)]);
        assert_eq!(r.catch_up(c.generation, 1).revoked, [entry("a", 50)]);
        assert!(r.catch_up(c.generation, 2).revoked.is_empty());
    }

    #[test]
    fn a_gateway_claiming_the_last_version_gets_nothing_and_the_current_version() {
        let mut r = Revocations::default();
        let now = 1_000;
        r.revoke_at(vec![entry("a", now + 10)], now).unwrap();
        let c = r.catch_up(r.generation, u64::MAX);
        assert!(c.revoked.is_empty());
        assert_eq!(c.version, 1);
    }

    #[test]
    fn expired_entries_are_dropped_and_skipped() {
        let mut r = Revocations::default();
        let reply = r
            .revoke_at(vec![entry("old", 5), entry("new", 50)], 10)
            .unwrap();
        assert_eq!(reply.held, 1);
        let reply = r.revoke_at(vec![], 60).unwrap();
        assert_eq!(reply.held, 0);
        let c = r.catch_up(0, 0);
        assert!(c.revoked.is_empty());
        assert_eq!(c.version, 1);
    }

    #[test]
    fn refuses_bad_jtis_whole_calls() {
        let mut r = Revocations::default();
        assert_eq!(
            r.revoke_at(vec![entry("", 100)], 1),
            Err(RevocationError::BadJti)
        );
        let long = "j".repeat(MAX_JTI_BYTES + 1);
        assert_eq!(
            r.revoke_at(vec![entry("fine", 100), entry(&long, 100)], 1),
            Err(RevocationError::BadJti)
        );
        // All or nothing: the good entry of the refused call was not kept.
        assert_eq!(r.revoke_at(vec![], 1).unwrap().held, 0);
        let longest = "j".repeat(MAX_JTI_BYTES);
        assert_eq!(r.revoke_at(vec![entry(&longest, 100)], 1).unwrap().held, 1);
    }

    #[test]
    fn refuses_past_the_caps() {
        let mut r = Revocations::default();
        let too_many: Vec<_> = (0..=MAX_REVOCATIONS_PER_CALL)
            .map(|i| entry(&format!("j{i}"), 100))
            .collect();
        assert_eq!(
            r.revoke_at(too_many, 1),
            Err(RevocationError::TooManyInOneCall(
                MAX_REVOCATIONS_PER_CALL + 1
            ))
        );
        for batch in 0..MAX_REVOCATIONS / MAX_REVOCATIONS_PER_CALL {
            let entries = (0..MAX_REVOCATIONS_PER_CALL)
                .map(|i| entry(&format!("j{batch}-{i}"), 100))
                .collect();
            r.revoke_at(entries, 1).unwrap();
        }
        assert_eq!(
            r.revoke_at(vec![entry("one-more", 100)], 1),
            Err(RevocationError::Full(MAX_REVOCATIONS))
        );
        // Re-revoking a held jti needs no room.
        r.revoke_at(vec![entry("j0-0", 200)], 1).unwrap();
        // Pages stop at a version boundary: the first page is the first call's entries.
        let c = r.catch_up(0, 0);
        assert_eq!(c.revoked.len(), MAX_REVOCATIONS_PER_CALL - 1);
        assert_eq!(c.version, 1);
        // Once expired, there is room again.
        r.revoke_at(vec![entry("later", 300)], 150).unwrap();
    }
}
