//! The ring manager's shared handle: the membership state machine behind its lock, the ring it
//! publishes, the regions, and where every change is saved.
//!
//! The state machines ([`crate::membership`], [`crate::operations`], [`crate::regions`]) decide;
//! this module runs them in short critical sections, saves the state after every change and
//! only then publishes each new ring in order, and starts the failure monitor
//! ([`crate::monitor`]). The gRPC service on top of it is [`crate::grpc`].
//!
//! Architecture invariant: no ring is published, and no change answered, before the state
//! that holds it is saved. A change whose state cannot be saved is undone whole (the state
//! machines are cloned before it) and fails with [`Unsaved`]; nobody saw it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_core::{NodeId, Ring};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::disconnects::{DisconnectError, DisconnectOrder, Disconnected};
pub use crate::grpc::serve;
pub use crate::membership::{EpochChange, MemberView, NodeState};
use crate::membership::{Membership, MembershipError};
use crate::monitor::{self, Timing};
use crate::regions::{Directive, GatewayReport, RegionError, Regions, RegionsView};
use crate::revocations::{RevocationError, Revoked, RevokedToken};
use crate::state_file::{Saved, SavedDrain, SavedRevocation, StateFileError};

/// Default: how often channel servers send a heartbeat.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Default: how long a heartbeat's reply keeps a channel server's lease, from the heartbeat's
/// sending. Shorter than [`DEFAULT_SUSPECT_AFTER`], so a node stops serving before it can be
/// declared down.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(400);
/// Default: silence after which a node is probed.
pub const DEFAULT_SUSPECT_AFTER: Duration = Duration::from_millis(500);
/// Default: how long the confirming probe (a gRPC health check on the node) may take.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// A node that answers the probe but stays silent this many times [`Config::suspect_after`]
/// is declared down anyway (it is alive but cut off from the ring manager, and has stopped
/// serving since its lease lapsed).
const SILENCE_LIMIT_FACTOR: u32 = 4;
/// How often the monitor looks at the leases.
const MONITOR_TICK: Duration = Duration::from_millis(25);
/// How many recent epochs the ring manager remembers for the console (oldest dropped first).
pub const EPOCH_HISTORY: usize = 50;
/// Default: how many nodes hold each slot (its owner and `factor - 1` followers).
pub const DEFAULT_REPLICATION_FACTOR: usize = 2;

/// Timing of the ring manager's failure detection, who may be a node of its ring, and how
/// many copies of each slot the ring places.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    pub suspect_after: Duration,
    pub probe_timeout: Duration,
    /// The role a node's certificate must name to register and hold a lease here: channel
    /// servers on the channel ring, presence servers on the presence ring. `None`: either.
    pub node_role: Option<mesh_transport::Role>,
    /// How many nodes hold each slot: its owner and `replication_factor - 1` followers (as
    /// many as the ring's other nodes allow). 1: no followers, a dead node's slots go to a
    /// standby (today's takeover) or spread over the survivors. At least 1.
    pub replication_factor: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            lease: DEFAULT_LEASE,
            suspect_after: DEFAULT_SUSPECT_AFTER,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            node_role: None,
            replication_factor: DEFAULT_REPLICATION_FACTOR,
        }
    }
}

/// The ring manager; cheap to clone.
#[derive(Debug, Clone)]
pub struct RingManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    /// Where the ring and members are saved after every change.
    store: Store,
    /// Members, leases, the ring and its recent epochs. The lock is never held across an await.
    membership: Mutex<Membership>,
    /// The published ring; every watcher follows it. Changed only under `membership`'s lock.
    ring: watch::Sender<Arc<Ring>>,
    /// The regions' gateways and drain states, and the token revocations. The lock is never
    /// held across an await.
    regions: Mutex<Regions>,
    /// Bumped on every change of the ring or of a member's state (the console follows it).
    changes: watch::Sender<u64>,
    /// How many states were handed to a [`Store::Latest`] writer (each one's number).
    saves: AtomicU64,
    /// Stops the monitor and the lease streams.
    cancel: CancellationToken,
    /// Runs the monitor, its probes and the lease streams.
    tracker: TaskTracker,
}

/// How long a change answered by a Consul-backed leader waits for its state to be written to
/// KV.
pub const STORE_WAIT: Duration = Duration::from_secs(5);

/// What a heartbeat reports besides the lease it renews.
#[derive(Debug, Clone, Copy, Default)]
pub struct Beat {
    /// The newest epoch whose outgoing handoffs the node has finished (drain progress).
    pub handed_off_epoch: u64,
    /// Followed slots still being filled from their owner, counted in ring epoch
    /// `catching_up_epoch`.
    pub catching_up: u32,
    pub catching_up_epoch: u64,
}

/// A change whose state was not saved.
#[derive(Debug, thiserror::Error)]
pub enum Unsaved {
    /// The state file could not be written: the change was undone, and nothing of it was
    /// published.
    #[error("the ring manager could not save its state, so nothing changed: {0}")]
    File(#[from] StateFileError),
    /// Consul KV: the change is made (and still being written, which fails only if this
    /// leader stops leading first), but not written within [`STORE_WAIT`].
    #[error(
        "the change is made but not yet written to consul within {0:?}: the ring manager keeps \
         trying; a leader failover before it succeeds loses it (check with ctl ring / regions)"
    )]
    NotWritten(Duration),
    /// Consul KV: the record would be larger than a Consul value may be: the change was undone.
    #[error(
        "the ring record would be {bytes} bytes, past the {limit} a consul value may hold, so \
         nothing changed (revocations take the room; they are dropped as their tokens expire)"
    )]
    TooLarge { bytes: usize, limit: usize },
}

/// The largest ring record a Consul-backed ring manager writes: Consul's limit on a value
/// (512 KiB by default), less room for the writer's fence.
pub const CONSUL_RECORD_LIMIT: usize = 512 * 1024 - 1024;

/// Why a change was not made: the state machine refused it, or its state could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError<E> {
    #[error(transparent)]
    Refused(E),
    #[error(transparent)]
    Unsaved(#[from] Unsaved),
}

/// Where the ring manager saves its ring and members after every change.
#[derive(Debug)]
pub enum Store {
    /// Nowhere: a restart starts a new ring history (generation).
    Memory,
    /// A state file, rewritten atomically and durably (embedded mode).
    File(PathBuf),
    /// The latest state, numbered, for a writer that stores it elsewhere (Consul KV) in order
    /// and reports the number of the latest state it has written on `written`.
    Latest {
        latest: watch::Sender<Option<(u64, Arc<Saved>)>>,
        written: watch::Receiver<u64>,
    },
}

impl RingManager {
    /// A ring manager, resumed from `state_file` if it holds a saved ring (else epoch 0, no
    /// members), saving every change there. Its monitor runs on `tracker` until `cancel`.
    pub fn new(
        config: Config,
        state_file: Option<PathBuf>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, crate::Error> {
        let (saved, store) = match state_file {
            Some(path) => (crate::state_file::load(&path)?, Store::File(path)),
            None => (None, Store::Memory),
        };
        let manager = Self::resume(config, saved, store, tracker, cancel.clone())?;
        // Saved at once: the generation is fixed on disk, and a state file that cannot be
        // written stops the start rather than the first change.
        let saved = manager.save(&manager.membership(), &manager.regions_state());
        if let Err(Unsaved::File(e)) = saved {
            cancel.cancel();
            return Err(e.into());
        }
        Ok(manager)
    }

    /// A ring manager resumed from `saved` (else epoch 0, no members), saving every change to
    /// `store`. Its monitor runs on `tracker` until `cancel`.
    pub fn resume(
        config: Config,
        saved: Option<Saved>,
        store: Store,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, crate::Error> {
        let (membership, regions) = match saved {
            Some(saved) => {
                let membership =
                    Membership::resume(&saved, Instant::now(), config.suspect_after, EPOCH_HISTORY)
                        .map_err(crate::Error::InvalidRing)?
                        .with_replication_factor(config.replication_factor);
                let ring = membership.ring();
                tracing::info!(
                    generation = ring.generation(),
                    epoch = ring.epoch(),
                    draining_regions = saved.draining_regions.len(),
                    revoked = saved.revoked.len(),
                    "ring manager resumed its saved ring"
                );
                let regions = Regions::restore(
                    saved
                        .draining_regions
                        .into_iter()
                        .map(|d| (d.region, d.rate))
                        .collect(),
                    saved
                        .revoked
                        .into_iter()
                        .map(|r| RevokedToken {
                            jti: r.jti,
                            expires_at: r.expires_at,
                        })
                        .collect(),
                );
                (membership, regions)
            }
            None => {
                let membership = Membership::new(config.suspect_after, EPOCH_HISTORY)
                    .with_replication_factor(config.replication_factor);
                tracing::info!(
                    generation = membership.ring().generation(),
                    "ring manager starts a new ring history"
                );
                (membership, Regions::default())
            }
        };
        let (ring, _) = watch::channel(membership.ring().clone());
        let manager = RingManager {
            inner: Arc::new(Inner {
                config,
                store,
                membership: Mutex::new(membership),
                ring,
                regions: Mutex::new(regions),
                changes: watch::channel(0).0,
                saves: AtomicU64::new(0),
                cancel,
                tracker: tracker.clone(),
            }),
        };
        let timing = Timing {
            tick: MONITOR_TICK,
            suspect_after: config.suspect_after,
            silence_limit: config.suspect_after * SILENCE_LIMIT_FACTOR,
            probe_timeout: config.probe_timeout,
        };
        tracker.spawn(monitor::run(manager.clone(), timing));
        Ok(manager)
    }

    fn membership(&self) -> MutexGuard<'_, Membership> {
        self.inner
            .membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn regions_state(&self) -> MutexGuard<'_, Regions> {
        self.inner.regions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `change` on the membership under its lock, then, still under it, saves the state
    /// if it changed and only then publishes each ring it made (in order). A change whose state
    /// cannot be saved is undone whole and nothing of it is published: [`Unsaved`].
    ///
    /// Lock order: the membership, then the regions.
    pub(crate) fn update<T>(
        &self,
        change: impl FnOnce(&mut Membership) -> T,
    ) -> Result<T, Unsaved> {
        let mut membership = self.membership();
        let before = membership.clone();
        let out = change(&mut membership);
        let effects = membership.take_effects();
        if effects.changed {
            let saved = self.save(&membership, &self.regions_state());
            if let Err(e) = saved {
                *membership = before;
                return Err(e);
            }
        }
        for ring in effects.published {
            self.inner.ring.send_replace(ring);
        }
        Ok(out)
    }

    /// Runs `change`, which changes nothing saved (lease bookkeeping: renewals, ended streams,
    /// probes, stalls), under the membership's lock, without the copy [`RingManager::update`]
    /// takes: the hot path of every heartbeat.
    fn update_leases<T>(&self, change: impl FnOnce(&mut Membership) -> T) -> T {
        let mut membership = self.membership();
        let out = change(&mut membership);
        let effects = membership.take_effects();
        debug_assert!(
            !effects.changed && effects.published.is_empty(),
            "a lease change changed saved state"
        );
        out
    }

    /// Runs `change` on the regions (drains, revocations) under the locks, and saves the state;
    /// a change that cannot be saved is put back.
    fn update_regions<T, E>(
        &self,
        change: impl FnOnce(&mut Regions) -> Result<T, E>,
    ) -> Result<T, ChangeError<E>> {
        let membership = self.membership();
        let mut regions = self.regions_state();
        let before = regions.durable();
        let out = change(&mut regions).map_err(ChangeError::Refused)?;
        if let Err(e) = self.save(&membership, &regions) {
            regions.put_back(before);
            return Err(e.into());
        }
        Ok(out)
    }

    /// Saves the ring, members, drains and revocations to the store (the state file durably,
    /// before returning), and tells the console something changed.
    fn save(&self, membership: &Membership, regions: &Regions) -> Result<(), Unsaved> {
        let saved = || {
            let (draining, revoked) = regions.saved();
            Saved {
                draining_regions: draining
                    .into_iter()
                    .map(|(region, rate)| SavedDrain { region, rate })
                    .collect(),
                revoked: revoked
                    .into_iter()
                    .map(|r| SavedRevocation {
                        jti: r.jti,
                        expires_at: r.expires_at,
                    })
                    .collect(),
                ..membership.saved()
            }
        };
        match &self.inner.store {
            Store::Memory => {}
            Store::File(path) => crate::state_file::store(path, &saved())?,
            Store::Latest { latest, .. } => {
                let saved = saved();
                let bytes = serde_json::to_vec(&saved).map_or(0, |v| v.len());
                if bytes > CONSUL_RECORD_LIMIT {
                    return Err(Unsaved::TooLarge {
                        bytes,
                        limit: CONSUL_RECORD_LIMIT,
                    });
                }
                let number = self.inner.saves.fetch_add(1, Ordering::SeqCst) + 1;
                latest.send_replace(Some((number, Arc::new(saved))));
            }
        }
        // Every change of the ring, a member, a drain or the revocations goes through here:
        // tell the console.
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Waits until the store holds every change made so far: at once with a state file (saved
    /// before the change returned) or none; on Consul, until the leader's writer has written it
    /// to KV, at most [`STORE_WAIT`]. The gRPC service answers an operation after this.
    pub async fn stored(&self) -> Result<(), Unsaved> {
        let Store::Latest { written, .. } = &self.inner.store else {
            return Ok(());
        };
        let target = self.inner.saves.load(Ordering::SeqCst);
        let mut written = written.clone();
        match tokio::time::timeout(STORE_WAIT, written.wait_for(|&n| n >= target)).await {
            Ok(Ok(_)) => Ok(()),
            // Timed out, or the writer stopped (no longer leading).
            _ => Err(Unsaved::NotWritten(STORE_WAIT)),
        }
    }

    /// Failure detection and lease timing.
    pub(crate) fn config(&self) -> Config {
        self.inner.config
    }

    /// Cancelled when the ring manager stops.
    pub(crate) fn cancel(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// Where the ring manager's own tasks (lease streams, probes) run.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// Configures each region's nearest regions (nearest first), for drains.
    pub fn set_nearest(&self, nearest: Vec<(String, Vec<String>)>) {
        self.regions_state().set_nearest(nearest);
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.inner.ring.borrow().clone()
    }

    /// Follows the ring in process.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Ring>> {
        self.inner.ring.subscribe()
    }

    /// Changes whenever the ring or a member's state does (a version number, for followers
    /// that re-read [`RingManager::members_detail`]).
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The ring and every member, read together so that they agree.
    pub fn members_detail(&self) -> (Arc<Ring>, Vec<MemberView>) {
        let membership = self.membership();
        (membership.ring().clone(), membership.views(Instant::now()))
    }

    /// The recent epochs this ring manager published, newest first.
    pub fn history(&self) -> Vec<EpochChange> {
        self.membership().history()
    }

    /// Members and their states, sorted by id.
    pub fn members(&self) -> Vec<(NodeId, NodeState)> {
        self.membership().members()
    }

    /// Adds (or re-announces) a channel server; returns the epoch it joined in, its
    /// incarnation and the ring's generation (see [`Membership::register`]).
    pub fn register(
        &self,
        id: NodeId,
        addr: String,
        pid: u32,
        standby: bool,
    ) -> Result<(u64, u64, u64), ChangeError<MembershipError>> {
        let registered = self.update(|m| {
            m.register(id, addr, pid, standby, Instant::now())
                .map(|(epoch, incarnation)| (epoch, incarnation, m.ring().generation()))
        });
        flatten(registered)
    }

    /// Renews `id`'s lease and notes its replication progress; false if that incarnation is no
    /// longer valid. A drain that ends with it but cannot be saved is retried at the next heartbeat (the lease is renewed all
    /// the same).
    pub(crate) fn heartbeat(&self, id: &NodeId, incarnation: u64, beat: Beat) -> bool {
        let now = Instant::now();
        let renewed = self.update_leases(|m| {
            let renewed = m.renew(id, incarnation, now);
            if renewed {
                m.report_progress(id, incarnation, beat.catching_up, beat.catching_up_epoch);
            }
            renewed
        });
        if !renewed {
            return false;
        }
        if self.membership().ready_to_lead(id)
            && let Err(e) = self.update(|m| m.lead_followed(id))
        {
            tracing::error!(node = %id, error = %e, "a caught-up follower's primaries could not be saved; retried at the next heartbeat");
        }
        let handed_off_epoch = beat.handed_off_epoch;
        if !self.membership().drain_done(id, handed_off_epoch) {
            return true;
        }
        match self.update(|m| m.heartbeat(id, incarnation, handed_off_epoch, now)) {
            Ok(valid) => valid,
            Err(e) => {
                tracing::error!(node = %id, error = %e, "a drain's end could not be saved; retried at the next heartbeat");
                true
            }
        }
    }

    /// `id`'s lease stream ended.
    pub(crate) fn lease_ended(&self, id: &NodeId, incarnation: u64) {
        self.update_leases(|m| m.lease_ended(id, incarnation));
    }

    /// The monitor did not run for `stalled` up to `now` (see [`crate::monitor`]).
    pub(crate) fn excuse_stall(&self, stalled: Duration, now: Instant) {
        self.update_leases(|m| m.excuse_stall(stalled, now));
    }

    /// A probe of `id`'s `incarnation` whose answer could not be acted on: probe it again.
    pub(crate) fn unprobe(&self, id: &NodeId, incarnation: u64) {
        self.update_leases(|m| m.unprobe(id, incarnation));
    }

    /// `ctl drain-node`: moves `id`'s slots to the other active nodes, with handoff.
    pub fn drain(&self, id: &NodeId) -> Result<Arc<Ring>, ChangeError<MembershipError>> {
        flatten(self.update(|m| m.drain(id)))
    }

    /// `ctl replace-node`: hands `id`'s slots to a standby (with handoff if `id` is alive).
    pub fn replace(&self, id: &NodeId) -> Result<Arc<Ring>, ChangeError<MembershipError>> {
        flatten(self.update(|m| m.replace(id, Instant::now())))
    }

    /// `ctl add-node`: makes standby `id` (or any live standby) active.
    pub fn add(&self, id: Option<&NodeId>) -> Result<Arc<Ring>, ChangeError<MembershipError>> {
        flatten(self.update(|m| m.add(id, Instant::now())))
    }

    /// Takes a gateway's report; answers with its directive.
    pub fn report_gateway(&self, report: GatewayReport) -> Result<Directive, RegionError> {
        self.regions_state().report(report, Instant::now())
    }

    /// Every region's gateways, connections and drain state (what `ctl regions` shows).
    pub fn regions(&self) -> RegionsView {
        self.regions_state().view(Instant::now())
    }

    /// `ctl drain-region`: drains `region` at `rate` goodbyes per second per gateway (0: the
    /// default), saved before it is answered.
    pub fn drain_region(
        &self,
        region: &str,
        rate: u32,
    ) -> Result<RegionsView, ChangeError<RegionError>> {
        self.update_regions(|r| r.drain(region, rate, Instant::now()))
    }

    /// `ctl undrain-region`: ends `region`'s drain, saved before it is answered.
    pub fn undrain_region(&self, region: &str) -> Result<RegionsView, Unsaved> {
        self.update_regions(|r| {
            Ok::<_, std::convert::Infallible>(r.undrain(region, Instant::now()))
        })
        .map_err(|e| match e {
            ChangeError::Refused(never) => match never {},
            ChangeError::Unsaved(e) => e,
        })
    }

    /// Revokes tokens by `jti` until they expire (see [`crate::revocations`]), saved before it
    /// is answered.
    pub fn revoke_tokens(
        &self,
        entries: Vec<RevokedToken>,
    ) -> Result<Revoked, ChangeError<RevocationError>> {
        self.update_regions(|r| r.revoke(entries))
    }

    /// Orders every gateway to close the connections `orders` name (see
    /// [`crate::disconnects`]): each gateway takes them with the directive answering its next
    /// report (within about a second). Soft state: not saved, answered at once.
    pub fn disconnect_users(
        &self,
        orders: Vec<DisconnectOrder>,
    ) -> Result<Disconnected, DisconnectError> {
        self.regions_state().disconnect(orders, Instant::now())
    }

    /// Orders every gateway to close `user`'s connections (only those of `team` when given),
    /// with `reason` as the close frame's reason (cut to 100 bytes) and close code 4010 when
    /// the client should `reconnect`, else 4011. The SRE console's action, and the admin API's
    /// `DisconnectUser` (through `DisconnectUsers`).
    pub fn disconnect_user(
        &self,
        user: mesh_core::UserId,
        team: Option<mesh_core::TeamId>,
        reason: &str,
        reconnect: bool,
    ) -> Result<Disconnected, DisconnectError> {
        self.disconnect_users(vec![DisconnectOrder {
            user,
            team,
            reason: reason.to_string(),
            reconnect,
            issued_at_ms: 0,
        }])
    }
}

/// A state machine's answer to a change that may not have been saved, as one result.
fn flatten<T, E>(result: Result<Result<T, E>, Unsaved>) -> Result<T, ChangeError<E>> {
    result?.map_err(ChangeError::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Revocations per call in the Consul size test.
    const BATCH: usize = 1_000;

    fn manager(store: Store, tracker: &TaskTracker, cancel: &CancellationToken) -> RingManager {
        RingManager::resume(Config::default(), None, store, tracker, cancel.clone()).unwrap()
    }

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[tokio::test]
    async fn a_change_that_cannot_be_saved_is_undone_and_not_published() {
        let dir = std::env::temp_dir().join(format!("channelmesh-server-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let path = dir.join("ring.json");
        let rm = manager(Store::File(path.clone()), &tracker, &cancel);
        rm.register(id("cs-1"), "a:1".into(), 1, false).unwrap();
        rm.register(id("cs-2"), "a:2".into(), 2, false).unwrap();
        let before = rm.ring();
        let mut watcher = rm.subscribe();
        watcher.borrow_and_update();
        // The state file's directory is replaced by a file.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, "").unwrap();
        let refused = rm.drain(&id("cs-1")).unwrap_err();
        assert!(
            matches!(refused, ChangeError::Unsaved(Unsaved::File(_))),
            "{refused}"
        );
        assert!(refused.to_string().contains("ring.tmp"), "{refused}");
        assert!(rm.register(id("cs-3"), "a:3".into(), 3, false).is_err());
        assert_eq!(rm.ring(), before);
        assert!(!watcher.has_changed().unwrap(), "nothing was published");
        assert!(rm.members().iter().all(|(_, s)| *s == NodeState::Active));
        // Writable again: the same operation goes through, saved before it is published.
        std::fs::remove_file(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let ring = rm.drain(&id("cs-1")).unwrap();
        let saved = crate::state_file::load(&path).unwrap().unwrap();
        assert_eq!(saved.epoch, ring.epoch());
        assert_eq!(saved.generation, ring.generation());
        cancel.cancel();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn on_consul_a_record_past_the_value_limit_is_refused_and_undone() {
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let (latest, _updates) = watch::channel(None);
        let (_written, written_rx) = watch::channel(0);
        let store = Store::Latest {
            latest,
            written: written_rx,
        };
        let rm = manager(store, &tracker, &cancel);
        let far = u64::MAX / 2;
        let mut refused = None;
        for call in 0..100 {
            let entries = (0..BATCH)
                .map(|i| RevokedToken {
                    jti: format!("jti-{call}-{i}"),
                    expires_at: far,
                })
                .collect();
            if let Err(e) = rm.revoke_tokens(entries) {
                refused = Some((call, e));
                break;
            }
        }
        let (call, e) = refused.expect("refused before 100,000 revocations");
        assert!(
            matches!(e, ChangeError::Unsaved(Unsaved::TooLarge { .. })),
            "{e}"
        );
        // The refused call was undone: only the earlier calls are held.
        let held = rm.revoke_tokens(Vec::new());
        let held = held.map(|r| r.held).unwrap_or_default();
        assert!(call > 0);
        assert_eq!(held as usize, call * BATCH);
        cancel.cancel();
    }
}
