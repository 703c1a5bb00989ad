//! The embedded ring manager: membership with leases, replacement of dead channel servers, the
//! SRE operations, and the publisher of the ring.
//!
//! Channel servers register (as active capacity or as standbys) and hold a lease with a
//! heartbeat stream. A node whose stream ends or goes silent is probed; if the probe fails (or
//! the silence goes on) it is declared down, and a standby takes over exactly its slots — or,
//! with no standby, its slots spread over the survivors. Every change is a new epoch.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use mesh_core::{Handoff, NodeId, Ring, RingNode};
use mesh_proto::ring as pb;
use mesh_proto::ring::ring_manager_server::{RingManager as RingManagerRpc, RingManagerServer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::state_file::Saved;
use ring_client::convert::ring_to_proto;

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

/// Timing of the ring manager's failure detection.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    pub suspect_after: Duration,
    pub probe_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            lease: DEFAULT_LEASE,
            suspect_after: DEFAULT_SUSPECT_AFTER,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
        }
    }
}

/// A channel server's state, as `ctl ring` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Registered as active capacity, not yet given slots.
    Joining,
    /// Owns slots.
    Active,
    /// Registered, owns nothing; replaces a failed node or is added by an operator.
    Standby,
    /// Handing its slots' state to their new owners; becomes a standby when done.
    Draining,
    /// Lost its lease. A later registration under the same id starts a new incarnation.
    Down,
}

impl NodeState {
    /// The name `ctl` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Standby => "standby",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        }
    }
}

/// A member as the console shows it (read together with the ring it belongs to).
#[derive(Debug, Clone)]
pub struct MemberView {
    pub id: NodeId,
    pub addr: String,
    pub pid: u32,
    pub state: NodeState,
    /// Its registration: a node that re-registers gets a new one.
    pub incarnation: u64,
    /// Since its last heartbeat: the only liveness signal a node sends (heartbeats carry no
    /// load figures).
    pub since_heartbeat: Duration,
}

/// One published epoch and what it changed, for the console's history.
#[derive(Debug, Clone)]
pub struct EpochChange {
    pub epoch: u64,
    /// When it was published.
    pub at: std::time::SystemTime,
    /// Why, in words (the operation, or the dead node and who took its slots).
    pub cause: String,
    /// Slots whose owner changed.
    pub moved: usize,
    /// (from, to, slots) per pair of owners; `None` is "no owner" (the first epoch, or a ring
    /// with no active node left).
    pub moves: Vec<(Option<NodeId>, Option<NodeId>, usize)>,
}

#[derive(Debug, Clone)]
struct Member {
    addr: String,
    pid: u32,
    state: NodeState,
    incarnation: u64,
    last_heartbeat: Instant,
    /// Its lease stream ended: probe at once.
    stream_closed: bool,
    /// A probe is in flight.
    probing: bool,
    /// For a draining node: the epoch whose handoffs it must finish.
    drain_epoch: u64,
}

#[derive(Debug)]
struct State {
    members: BTreeMap<NodeId, Member>,
    next_incarnation: u64,
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
    /// Members. The lock is never held across an await.
    state: Mutex<State>,
    /// The published ring; every watcher follows it. Changed only under `state`'s lock.
    ring: watch::Sender<Arc<Ring>>,
    /// The regions' gateways and drain states.
    regions: crate::regions::Regions,
    /// Bumped on every change of the ring or of a member's state (the console follows it).
    changes: watch::Sender<u64>,
    /// The last [`EPOCH_HISTORY`] epochs published by this ring manager, oldest first.
    history: Mutex<VecDeque<EpochChange>>,
    cancel: CancellationToken,
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

/// Why an SRE operation was refused.
fn op_error(msg: impl Into<String>) -> Status {
    Status::failed_precondition(msg.into())
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
        let (ring, members, next_incarnation) = match saved {
            Some(saved) => {
                let ring = saved.ring().map_err(crate::Error::InvalidRing)?;
                let now = Instant::now();
                let members = saved
                    .members
                    .iter()
                    .filter_map(|m| {
                        let state = match m.state.as_str() {
                            "joining" => NodeState::Joining,
                            "active" => NodeState::Active,
                            "standby" => NodeState::Standby,
                            "draining" => NodeState::Draining,
                            _ => NodeState::Down,
                        };
                        // Everyone gets one suspicion period to resume its lease.
                        let member = Member {
                            addr: m.addr.clone(),
                            pid: m.pid,
                            state,
                            incarnation: m.incarnation,
                            last_heartbeat: now,
                            stream_closed: false,
                            probing: false,
                            drain_epoch: 0,
                        };
                        Some((NodeId::new(&m.id).ok()?, member))
                    })
                    .collect();
                tracing::info!(epoch = ring.epoch(), "ring manager resumed its saved ring");
                (ring, members, saved.next_incarnation)
            }
            None => (Ring::empty(), BTreeMap::new(), 1),
        };
        let (ring, _) = watch::channel(Arc::new(ring));
        let manager = RingManager {
            inner: Arc::new(Inner {
                config,
                store,
                state: Mutex::new(State {
                    members,
                    next_incarnation,
                }),
                ring,
                regions: crate::regions::Regions::default(),
                changes: watch::channel(0).0,
                history: Mutex::new(VecDeque::with_capacity(EPOCH_HISTORY)),
                cancel,
                tracker: tracker.clone(),
            }),
        };
        tracker.spawn(manager.clone().monitor());
        Ok(manager)
    }

    /// Saves the ring and members to the store; a failure is logged, not fatal.
    fn persist(&self, state: &State) {
        // Every change of the ring or of a member goes through here: tell the console.
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        if matches!(self.inner.store, Store::Memory) {
            return;
        }
        let (epoch, nodes, slot_owner) = Saved::ring_parts(&self.ring());
        let saved = Saved {
            epoch,
            nodes,
            slot_owner,
            members: state
                .members
                .iter()
                .map(|(id, m)| crate::state_file::SavedMember {
                    id: id.to_string(),
                    addr: m.addr.clone(),
                    pid: m.pid,
                    state: m.state.as_str().to_string(),
                    incarnation: m.incarnation,
                })
                .collect(),
            next_incarnation: state.next_incarnation,
        };
        match &self.inner.store {
            Store::Memory => {}
            Store::File(path) => {
                if let Err(e) = crate::state_file::store(path, &saved) {
                    tracing::error!(error = %e, "could not save the ring manager's state");
                }
            }
            Store::Latest(tx) => {
                tx.send_replace(Some(Arc::new(saved)));
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Configures each region's nearest regions (nearest first), for drains.
    pub fn set_nearest(&self, nearest: Vec<(String, Vec<String>)>) {
        self.inner.regions.set_nearest(nearest);
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
        let state = self.state();
        let now = Instant::now();
        let members = state
            .members
            .iter()
            .map(|(id, m)| MemberView {
                id: id.clone(),
                addr: m.addr.clone(),
                pid: m.pid,
                state: m.state,
                incarnation: m.incarnation,
                since_heartbeat: now.saturating_duration_since(m.last_heartbeat),
            })
            .collect();
        (self.ring(), members)
    }

    /// The recent epochs this ring manager published, newest first.
    pub fn history(&self) -> Vec<EpochChange> {
        let history = self.inner.history.lock().unwrap_or_else(|e| e.into_inner());
        history.iter().rev().cloned().collect()
    }

    /// Every region's gateways, connections and drain state (what `ctl regions` shows).
    pub fn regions(&self) -> pb::RegionsView {
        self.inner.regions.view()
    }

    /// Members and their states, sorted by id.
    pub fn members(&self) -> Vec<(NodeId, NodeState)> {
        self.state()
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.state))
            .collect()
    }

    /// Publishes `next` (under the state lock), saves it, and logs what changed.
    fn publish(&self, state: &State, next: Ring, why: &str) -> Arc<Ring> {
        let before = self.ring();
        let mut moves: BTreeMap<(Option<&NodeId>, Option<&NodeId>), usize> = BTreeMap::new();
        for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
            let (from, to) = (before.owner(s).map(|n| &n.id), next.owner(s).map(|n| &n.id));
            if from != to {
                *moves.entry((from, to)).or_default() += 1;
            }
        }
        let moved = moves.values().sum();
        self.remember(EpochChange {
            epoch: next.epoch(),
            at: std::time::SystemTime::now(),
            cause: why.to_string(),
            moved,
            moves: moves
                .into_iter()
                .map(|((from, to), n)| (from.cloned(), to.cloned(), n))
                .collect(),
        });
        tracing::info!(
            epoch = next.epoch(),
            moved_slots = moved,
            why,
            "new ring epoch"
        );
        let next = Arc::new(next);
        self.inner.ring.send_replace(next.clone());
        self.persist(state);
        next
    }

    /// Appends to the bounded epoch history.
    fn remember(&self, change: EpochChange) {
        let mut history = self.inner.history.lock().unwrap_or_else(|e| e.into_inner());
        if history.len() == EPOCH_HISTORY {
            history.pop_front();
        }
        history.push_back(change);
    }

    fn active_nodes(state: &State) -> Vec<RingNode> {
        state
            .members
            .iter()
            .filter(|(_, m)| m.state == NodeState::Active)
            .map(|(id, m)| RingNode {
                id: id.clone(),
                addr: m.addr.clone(),
            })
            .collect()
    }

    /// A live standby to take over, preferring the lowest id.
    fn pick_standby(&self, state: &State) -> Option<(NodeId, String)> {
        let now = Instant::now();
        state
            .members
            .iter()
            .find(|(_, m)| {
                m.state == NodeState::Standby
                    && !m.stream_closed
                    && now.duration_since(m.last_heartbeat) < self.inner.config.suspect_after
            })
            .map(|(id, m)| (id.clone(), m.addr.clone()))
    }

    /// Adds (or re-announces) a channel server. An active registration takes a fair share of
    /// slots in a new epoch; a standby waits. A re-registration of an id whose earlier
    /// incarnation still owns slots first retires that incarnation as if it had died.
    pub fn register(&self, id: NodeId, addr: String, pid: u32, standby: bool) -> (u64, u64) {
        let mut state = self.state();
        if state
            .members
            .get(&id)
            .is_some_and(|m| m.state != NodeState::Down)
        {
            tracing::warn!(node = %id, "node re-registered; retiring its earlier incarnation");
            self.declare_down_locked(&mut state, &id, "re-registered");
        }
        let incarnation = state.next_incarnation;
        state.next_incarnation += 1;
        state.members.insert(
            id.clone(),
            Member {
                addr: addr.clone(),
                pid,
                state: if standby {
                    NodeState::Standby
                } else {
                    NodeState::Joining
                },
                incarnation,
                last_heartbeat: Instant::now(),
                stream_closed: false,
                probing: false,
                drain_epoch: 0,
            },
        );
        let epoch = if standby {
            tracing::info!(node = %id, %addr, "standby node registered");
            self.persist(&state);
            self.ring().epoch()
        } else {
            let ring = self.add_locked(&mut state, &id);
            tracing::info!(node = %id, %addr, epoch = ring.epoch(), "node registered");
            ring.epoch()
        };
        (epoch, incarnation)
    }

    /// Makes `id` active, taking a fair share of slots from the others (with handoffs).
    fn add_locked(&self, state: &mut State, id: &NodeId) -> Arc<Ring> {
        if let Some(m) = state.members.get_mut(id) {
            m.state = NodeState::Active;
        }
        let current = self.ring();
        let next = current.rebalanced(&Self::active_nodes(state));
        let handoffs = next.moves_from(&current);
        let cause = format!("{id} joined the active nodes");
        self.publish(state, next.with_handoffs(handoffs), &cause)
    }

    /// Declares `id` down and moves its slots: to a standby if one is live, else spread over
    /// the survivors.
    fn declare_down_locked(&self, state: &mut State, id: &NodeId, why: &str) {
        let Some(member) = state.members.get_mut(id) else {
            return;
        };
        let owned = matches!(member.state, NodeState::Active | NodeState::Draining);
        member.state = NodeState::Down;
        member.probing = false;
        tracing::warn!(node = %id, why, "node declared down");
        let current = self.ring();
        if !owned || current.slots_owned(id) == 0 {
            self.persist(state);
            return;
        }
        if let Some((standby, addr)) = self.pick_standby(state)
            && let Some(next) = current.with_takeover(
                id,
                RingNode {
                    id: standby.clone(),
                    addr,
                },
            )
        {
            if let Some(m) = state.members.get_mut(&standby) {
                m.state = NodeState::Active;
            }
            tracing::info!(dead = %id, %standby, "standby takes over the dead node's slots");
            let cause = format!("{id} down ({why}); standby {standby} takes its slots");
            self.publish(state, next, &cause);
            return;
        }
        let next = current.rebalanced(&Self::active_nodes(state));
        let cause = format!("{id} down ({why}); its slots spread over the survivors");
        self.publish(state, next, &cause);
    }

    /// Renews `id`'s lease; false if that incarnation is no longer valid.
    fn heartbeat(&self, id: &NodeId, incarnation: u64, handed_off_epoch: u64) -> bool {
        let mut state = self.state();
        let Some(member) = state.members.get_mut(id) else {
            return false;
        };
        if member.incarnation != incarnation || member.state == NodeState::Down {
            return false;
        }
        member.last_heartbeat = Instant::now();
        member.stream_closed = false;
        if member.state == NodeState::Draining && handed_off_epoch >= member.drain_epoch {
            member.state = NodeState::Standby;
            tracing::info!(node = %id, "drain complete; node is a standby");
            self.persist(&state);
        }
        true
    }

    fn lease_ended(&self, id: &NodeId, incarnation: u64) {
        let mut state = self.state();
        if let Some(member) = state.members.get_mut(id)
            && member.incarnation == incarnation
            && member.state != NodeState::Down
        {
            member.stream_closed = true;
        }
    }

    /// Watches the leases: probes silent nodes and declares down the ones that fail.
    async fn monitor(self) {
        let mut tick = tokio::time::interval(MONITOR_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let config = self.inner.config;
            let now = Instant::now();
            let mut probes = Vec::new();
            {
                let mut state = self.state();
                let mut overdue = Vec::new();
                for (id, m) in state.members.iter_mut() {
                    if m.state == NodeState::Down || m.probing {
                        continue;
                    }
                    let silent = now.duration_since(m.last_heartbeat);
                    if silent > config.suspect_after * SILENCE_LIMIT_FACTOR {
                        overdue.push(id.clone());
                    } else if m.stream_closed || silent > config.suspect_after {
                        tracing::debug!(node = %id, ?silent, stream_closed = m.stream_closed, "lease suspect; probing");
                        m.probing = true;
                        probes.push((id.clone(), m.incarnation, m.addr.clone()));
                    }
                }
                for id in overdue {
                    self.declare_down_locked(&mut state, &id, "silent past the lease limit");
                }
            }
            for (id, incarnation, addr) in probes {
                let this = self.clone();
                self.inner.tracker.spawn(async move {
                    let reachable = matches!(
                        tokio::time::timeout(config.probe_timeout, probe(&addr)).await,
                        Ok(true)
                    );
                    let mut state = this.state();
                    let Some(m) = state.members.get_mut(&id) else {
                        return;
                    };
                    if m.incarnation != incarnation || m.state == NodeState::Down {
                        return;
                    }
                    m.probing = false;
                    let fresh =
                        Instant::now().duration_since(m.last_heartbeat) <= config.suspect_after;
                    // Down when the probe failed and the node is not heartbeating right now.
                    let healthy = fresh && !m.stream_closed;
                    if !reachable && !healthy {
                        this.declare_down_locked(&mut state, &id, "lease lost and probe failed");
                    }
                });
            }
        }
    }

    /// `ctl drain-node`: moves `id`'s slots to the other active nodes, with handoff.
    pub fn drain(&self, id: &NodeId) -> Result<Arc<Ring>, Status> {
        let mut state = self.state();
        let member = state
            .members
            .get(id)
            .ok_or_else(|| op_error(format!("no node {id}")))?;
        if member.state != NodeState::Active {
            return Err(op_error(format!(
                "{id} is {}, not active",
                member.state.as_str()
            )));
        }
        let survivors: Vec<RingNode> = Self::active_nodes(&state)
            .into_iter()
            .filter(|n| &n.id != id)
            .collect();
        if survivors.is_empty() {
            return Err(op_error(format!(
                "{id} is the last active node: add one first"
            )));
        }
        let current = self.ring();
        let next = current.rebalanced(&survivors);
        let handoffs = next.moves_from(&current);
        let epoch = next.epoch();
        if let Some(m) = state.members.get_mut(id) {
            m.state = NodeState::Draining;
            m.drain_epoch = epoch;
        }
        let cause = format!("{id} drained");
        Ok(self.publish(&state, next.with_handoffs(handoffs), &cause))
    }

    /// `ctl replace-node`: hands `id`'s slots to a standby (with handoff if `id` is alive).
    pub fn replace(&self, id: &NodeId) -> Result<Arc<Ring>, Status> {
        let mut state = self.state();
        let member = state
            .members
            .get(id)
            .ok_or_else(|| op_error(format!("no node {id}")))?;
        if member.state != NodeState::Active {
            return Err(op_error(format!(
                "{id} is {}, not active",
                member.state.as_str()
            )));
        }
        let (standby, addr) = self
            .pick_standby(&state)
            .ok_or_else(|| op_error("no live standby to replace it with"))?;
        let current = self.ring();
        let next = current
            .with_takeover(
                id,
                RingNode {
                    id: standby.clone(),
                    addr,
                },
            )
            .ok_or_else(|| op_error(format!("{id} owns no slots")))?;
        let epoch = next.epoch();
        if let Some(m) = state.members.get_mut(&standby) {
            m.state = NodeState::Active;
        }
        if let Some(m) = state.members.get_mut(id) {
            m.state = NodeState::Draining;
            m.drain_epoch = epoch;
        }
        let cause = format!("{id} replaced by standby {standby}");
        let handoffs = vec![Handoff {
            from: id.clone(),
            to: standby,
        }];
        Ok(self.publish(&state, next.with_handoffs(handoffs), &cause))
    }

    /// `ctl add-node`: makes standby `id` (or any live standby) active.
    pub fn add(&self, id: Option<&NodeId>) -> Result<Arc<Ring>, Status> {
        let mut state = self.state();
        let id = match id {
            Some(id) => {
                let m = state
                    .members
                    .get(id)
                    .ok_or_else(|| op_error(format!("no node {id}")))?;
                if m.state != NodeState::Standby {
                    return Err(op_error(format!(
                        "{id} is {}, not a standby",
                        m.state.as_str()
                    )));
                }
                id.clone()
            }
            None => {
                self.pick_standby(&state)
                    .ok_or_else(|| op_error("no live standby to add"))?
                    .0
            }
        };
        Ok(self.add_locked(&mut state, &id))
    }

    fn to_proto(&self, ring: &Ring) -> pb::Ring {
        let state = self.state();
        let mut proto = ring_to_proto(ring, |id| {
            let m = state.members.get(id);
            (
                m.map_or("active", |m| m.state.as_str()).to_string(),
                m.map_or(0, |m| m.pid),
            )
        });
        proto.members = state
            .members
            .iter()
            .map(|(id, m)| pb::Member {
                id: id.to_string(),
                addr: m.addr.clone(),
                state: m.state.as_str().to_string(),
                pid: m.pid,
                slots: ring.slots_owned(id) as u32,
            })
            .collect();
        proto
    }
}

/// The confirming probe: a gRPC health check on the node. Only a running process answers it;
/// a frozen one still completes TCP handshakes, so a bare connect would not do.
async fn probe(addr: &str) -> bool {
    let Ok(endpoint) = mesh_transport::endpoint(addr) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok()
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn node_id(s: &str) -> Result<NodeId, Status> {
    NodeId::new(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl RingManagerRpc for RingManager {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let id = node_id(&req.node_id)?;
        if req.addr.is_empty() {
            return Err(Status::invalid_argument("addr is required"));
        }
        let (epoch, incarnation) = RingManager::register(self, id, req.addr, req.pid, req.standby);
        let config = self.inner.config;
        Ok(Response::new(pb::RegisterResponse {
            epoch,
            incarnation,
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u32,
            lease_ms: config.lease.as_millis() as u32,
        }))
    }

    type LeaseStream = BoxStream<pb::LeaseReply>;

    async fn lease(
        &self,
        request: Request<Streaming<pb::Heartbeat>>,
    ) -> Result<Response<Self::LeaseStream>, Status> {
        let mut heartbeats = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let mut holder: Option<(NodeId, u64)> = None;
            loop {
                // Cancel-safe: message() loses nothing when cancellation wins; we stop anyway.
                let next = tokio::select! {
                    _ = this.inner.cancel.cancelled() => break,
                    next = heartbeats.message() => next,
                };
                let Ok(Some(hb)) = next else {
                    break;
                };
                let Ok(id) = NodeId::new(&hb.node_id) else {
                    break;
                };
                let valid = this.heartbeat(&id, hb.incarnation, hb.handed_off_epoch);
                holder = Some((id, hb.incarnation));
                let reply = pb::LeaseReply {
                    seq: hb.seq,
                    valid,
                    epoch: this.ring().epoch(),
                };
                // A full reply queue means the node is not reading: it misses renewals.
                let _ = tx.try_send(Ok(reply));
            }
            tracing::debug!(holder = ?holder, "lease stream ended");
            if let Some((id, incarnation)) = holder {
                this.lease_ended(&id, incarnation);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchRingStream = BoxStream<pb::Ring>;

    async fn watch_ring(
        &self,
        _request: Request<pb::WatchRingRequest>,
    ) -> Result<Response<Self::WatchRingStream>, Status> {
        let this = self.clone();
        let stream = WatchStream::new(self.subscribe())
            .map(move |ring| Ok(this.to_proto(&ring)))
            .take_until(self.inner.cancel.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_ring(
        &self,
        _request: Request<pb::GetRingRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        Ok(Response::new(self.to_proto(&self.ring())))
    }

    async fn drain_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        let ring = self.drain(&node_id(&request.into_inner().node_id)?)?;
        Ok(Response::new(self.to_proto(&ring)))
    }

    async fn replace_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        let ring = self.replace(&node_id(&request.into_inner().node_id)?)?;
        Ok(Response::new(self.to_proto(&ring)))
    }

    async fn report_gateway(
        &self,
        request: Request<pb::GatewayReport>,
    ) -> Result<Response<pb::GatewayDirective>, Status> {
        let report = request.into_inner();
        if report.gateway.is_empty() || report.region.is_empty() {
            return Err(Status::invalid_argument("gateway and region are required"));
        }
        Ok(Response::new(self.inner.regions.report(report)))
    }

    async fn regions(
        &self,
        _request: Request<pb::RegionsRequest>,
    ) -> Result<Response<pb::RegionsView>, Status> {
        Ok(Response::new(self.inner.regions.view()))
    }

    async fn drain_region(
        &self,
        request: Request<pb::DrainRegionRequest>,
    ) -> Result<Response<pb::RegionsView>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.inner.regions.drain(&req.region, req.rate)?,
        ))
    }

    async fn undrain_region(
        &self,
        request: Request<pb::DrainRegionRequest>,
    ) -> Result<Response<pb::RegionsView>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.inner.regions.undrain(&req.region)))
    }

    async fn revoke_tokens(
        &self,
        request: Request<pb::RevokeTokensRequest>,
    ) -> Result<Response<pb::RevokeTokensResponse>, Status> {
        Ok(Response::new(
            self.inner.regions.revoke(request.into_inner())?,
        ))
    }

    async fn add_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        let req = request.into_inner();
        let id = if req.node_id.is_empty() {
            None
        } else {
            Some(node_id(&req.node_id)?)
        };
        let ring = self.add(id.as_ref())?;
        Ok(Response::new(self.to_proto(&ring)))
    }
}

/// Serves `manager` on `listener` until `cancel` fires.
pub async fn serve(
    manager: RingManager,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), crate::Error> {
    tracing::info!(addr = ?listener.local_addr().ok(), "ring manager listening");
    mesh_transport::server()?
        .add_service(RingManagerServer::new(manager))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}
