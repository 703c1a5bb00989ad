//! The ring manager's shared handle: the membership state machine behind its lock, the ring it
//! publishes, the regions, and where every change is saved.
//!
//! The state machines ([`crate::membership`], [`crate::operations`], [`crate::regions`]) decide;
//! this module runs them in short critical sections, publishes each new ring in order, saves
//! the state after every change and starts the failure monitor ([`crate::monitor`]). The gRPC
//! service on top of it is [`crate::grpc`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_core::{NodeId, Ring};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::grpc::serve;
pub use crate::membership::{EpochChange, MemberView, NodeState};
use crate::membership::{Membership, MembershipError};
use crate::monitor::{self, Timing};
use crate::regions::{Directive, GatewayReport, RegionError, Regions, RegionsView};
use crate::revocations::{RevocationError, Revoked, RevokedToken};
use crate::state_file::Saved;

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

/// Timing of the ring manager's failure detection, and who may be a node of its ring.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    pub suspect_after: Duration,
    pub probe_timeout: Duration,
    /// The role a node's certificate must name to register and hold a lease here: channel
    /// servers on the channel ring, presence servers on the presence ring. `None`: either.
    pub node_role: Option<mesh_transport::Role>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            lease: DEFAULT_LEASE,
            suspect_after: DEFAULT_SUSPECT_AFTER,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            node_role: None,
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
    /// Stops the monitor and the lease streams.
    cancel: CancellationToken,
    /// Runs the monitor, its probes and the lease streams.
    tracker: TaskTracker,
}

/// Where the ring manager saves its ring and members after every change.
#[derive(Debug)]
pub enum Store {
    /// Nowhere: a restart starts an empty ring.
    Memory,
    /// A state file, rewritten atomically (embedded mode).
    File(PathBuf),
    /// The latest state, for a writer that stores it elsewhere (Consul KV) in order.
    Latest(watch::Sender<Option<Arc<Saved>>>),
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
        Self::resume(config, saved, store, tracker, cancel)
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
        let membership = match saved {
            Some(saved) => {
                let membership =
                    Membership::resume(&saved, Instant::now(), config.suspect_after, EPOCH_HISTORY)
                        .map_err(crate::Error::InvalidRing)?;
                let epoch = membership.ring().epoch();
                tracing::info!(epoch, "ring manager resumed its saved ring");
                membership
            }
            None => Membership::new(config.suspect_after, EPOCH_HISTORY),
        };
        let (ring, _) = watch::channel(membership.ring().clone());
        let manager = RingManager {
            inner: Arc::new(Inner {
                config,
                store,
                membership: Mutex::new(membership),
                ring,
                regions: Mutex::new(Regions::default()),
                changes: watch::channel(0).0,
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

    /// Runs `change` on the membership under its lock, then, still under it, publishes each
    /// ring it made (in order) and saves the state if it changed.
    pub(crate) fn update<T>(&self, change: impl FnOnce(&mut Membership) -> T) -> T {
        let mut membership = self.membership();
        let out = change(&mut membership);
        let effects = membership.take_effects();
        for ring in effects.published {
            self.inner.ring.send_replace(ring);
        }
        if effects.changed {
            self.persist(&membership);
        }
        out
    }

    /// Saves the ring and members to the store; a failure is logged, not fatal.
    fn persist(&self, membership: &Membership) {
        // Every change of the ring or of a member goes through here: tell the console.
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        match &self.inner.store {
            Store::Memory => {}
            Store::File(path) => {
                if let Err(e) = crate::state_file::store(path, &membership.saved()) {
                    tracing::error!(error = %e, "could not save the ring manager's state");
                }
            }
            Store::Latest(tx) => {
                tx.send_replace(Some(Arc::new(membership.saved())));
            }
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

    /// Adds (or re-announces) a channel server; returns the epoch it joined in and its
    /// incarnation (see [`Membership::register`]).
    pub fn register(
        &self,
        id: NodeId,
        addr: String,
        pid: u32,
        standby: bool,
    ) -> Result<(u64, u64), MembershipError> {
        self.update(|m| m.register(id, addr, pid, standby, Instant::now()))
    }

    /// Renews `id`'s lease; false if that incarnation is no longer valid.
    pub(crate) fn heartbeat(&self, id: &NodeId, incarnation: u64, handed_off_epoch: u64) -> bool {
        self.update(|m| m.heartbeat(id, incarnation, handed_off_epoch, Instant::now()))
    }

    /// `id`'s lease stream ended.
    pub(crate) fn lease_ended(&self, id: &NodeId, incarnation: u64) {
        self.update(|m| m.lease_ended(id, incarnation));
    }

    /// `ctl drain-node`: moves `id`'s slots to the other active nodes, with handoff.
    pub fn drain(&self, id: &NodeId) -> Result<Arc<Ring>, MembershipError> {
        self.update(|m| m.drain(id))
    }

    /// `ctl replace-node`: hands `id`'s slots to a standby (with handoff if `id` is alive).
    pub fn replace(&self, id: &NodeId) -> Result<Arc<Ring>, MembershipError> {
        self.update(|m| m.replace(id, Instant::now()))
    }

    /// `ctl add-node`: makes standby `id` (or any live standby) active.
    pub fn add(&self, id: Option<&NodeId>) -> Result<Arc<Ring>, MembershipError> {
        self.update(|m| m.add(id, Instant::now()))
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
    /// default).
    pub fn drain_region(&self, region: &str, rate: u32) -> Result<RegionsView, RegionError> {
        self.regions_state().drain(region, rate, Instant::now())
    }

    /// `ctl undrain-region`: ends `region`'s drain.
    pub fn undrain_region(&self, region: &str) -> RegionsView {
        self.regions_state().undrain(region, Instant::now())
    }

    /// Revokes tokens by `jti` until they expire (see [`crate::revocations`]).
    pub fn revoke_tokens(&self, entries: Vec<RevokedToken>) -> Result<Revoked, RevocationError> {
        self.regions_state().revoke(entries)
    }
}
