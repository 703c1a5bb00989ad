//! A channel server's lease: heartbeats to the ring manager, and whether the server may serve.
//!
//! Each reply renews the lease until the *sending* time of the heartbeat it answers plus the
//! lease length, which is shorter than the silence after which the ring manager suspects the
//! node: a node therefore stops serving before anyone can take its slots (fencing).
//!
//! The lease stream is watched both ways: a reply deadline (twice the lease and a beat) on the
//! stream itself, and HTTP/2 and TCP keepalive on its connection as a backstop. A dead path, or
//! a ring manager gone without a reset, is a broken stream: dropped and dialled again — but not
//! while the peers confirm the ring manager is sick, when the stream resumes with it.
//!
//! Static stability — serving on the last ring while no ring manager can act — is entered only
//! on positive evidence that none leads ([`decide`]): when the lease lapses, the node asks its
//! peers (the other active nodes of its ring, over `LeaseStatus`) whether they still hear the
//! ring manager, and, on Consul, whether the leader lock is vacant. It keeps serving only if
//! no peer holds a lease and a majority of the ring answered so (or the lock is vacant), for a
//! short grant it renews by asking again; any peer that holds a lease, or no evidence at all,
//! fences it. A revoked lease always fences. Callers wait a little for a decision
//! ([`Lease::wait_serving`]) instead of failing while it is being made.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_proto::channel::LeaseStatusRequest;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_proto::ring::Heartbeat;
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use tokio::sync::Notify;
use tokio_stream::wrappers::IntervalStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::consul_ring::ConsulRing;
use crate::source::{RingSource, RingWatcher};

/// How long opening one lease stream may take: finding the leader, connecting (TCP, TLS,
/// HTTP/2) and the call's response headers. A frozen ring manager still completes TCP
/// handshakes, so only a bound on the whole opening notices it.
const OPEN_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between reconnects of the lease stream.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Heartbeats remembered for matching replies to their sending time.
const SENT_LOG: usize = 64;
/// HTTP/2 pings on the lease connection, even while idle, and how long one may go unanswered:
/// a backstop for a ring manager whose host vanished, longer than a freeze the mesh rides out
/// (a connection the node drops during a freeze is a stream the ring manager sees end when it
/// wakes, and probes the node for at once).
const LEASE_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(10));
/// The same on a ring watch connection, which may break freely: it is quiet between rings, and
/// keepalive is all that notices a dead path under it.
pub(crate) const WATCH_KEEPALIVE: (Duration, Duration) =
    (Duration::from_secs(2), Duration::from_secs(3));
/// TCP keepalive on those connections (a host gone without a reset).
const TCP_KEEPALIVE: Duration = Duration::from_secs(10);

/// While the lease is lapsed, how often the node gathers evidence again.
pub const CHECK_EVERY: Duration = Duration::from_millis(50);
/// How long one question (a peer's `LeaseStatus`, Consul's lock) may take; no answer in time
/// is no evidence.
pub const QUESTION_TIMEOUT: Duration = Duration::from_millis(100);
/// While fenced, the pause before asking again doubles from [`CHECK_EVERY`] up to this: a node
/// cut off for long asks its peers a few times a second, not twenty (a busy host whose leases
/// lapse must not be loaded further by the questions).
pub const FENCED_RECHECK_MAX: Duration = Duration::from_millis(400);
/// How long evidence that no ring manager leads lets the node serve, from when it was asked
/// for. It must end before a ring manager that comes back could give the node's slots away:
/// see docs/decisions.md ("Static stability only on evidence").
pub const STABLE_GRANT: Duration = Duration::from_millis(150);
/// How long a call waits for the node to be allowed to serve (a renewal, or a decision after
/// its lease lapsed) before it is refused with `no_lease`.
pub const SERVING_WAIT: Duration = Duration::from_millis(500);

/// `endpoint` with HTTP/2 pings (even while idle) and TCP keepalive: a stream to a ring manager
/// that froze, or whose host vanished without a reset, breaks instead of hanging.
pub(crate) fn with_keepalive(
    endpoint: Endpoint,
    (interval, timeout): (Duration, Duration),
) -> Endpoint {
    endpoint
        .http2_keep_alive_interval(interval)
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
}

/// Why the node does not serve, as callers read it.
const NEVER_RENEWED: &str = "lease lapsed: no word from the ring manager";
const REVOKED: &str = "lease revoked: this node was declared down";

/// What the node may do now.
#[derive(Debug, Default)]
struct LeaseState {
    /// Serving is allowed until then (renewals).
    valid_until: Option<Instant>,
    /// When a reply last renewed the lease.
    renewed_at: Option<Instant>,
    /// Static stability: serving on the last ring is allowed until then, on evidence that no
    /// ring manager leads.
    stable_until: Option<Instant>,
    /// Why the last decision fenced the node.
    fenced: Option<&'static str>,
    /// The ring manager declared this incarnation down.
    revoked: bool,
}

impl LeaseState {
    fn serving(&self, now: Instant) -> bool {
        let until = |t: Option<Instant>| t.is_some_and(|t| now < t);
        !self.revoked && (until(self.valid_until) || until(self.stable_until))
    }

    fn holds_lease(&self, now: Instant) -> bool {
        !self.revoked && self.valid_until.is_some_and(|t| now < t)
    }
}

/// A lease held by one incarnation of a ring node; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Lease {
    state: Arc<Mutex<LeaseState>>,
    /// Woken whenever the node may have become allowed to serve.
    changed: Arc<Notify>,
    handed_off_epoch: Arc<AtomicU64>,
    /// Replication progress: (epoch, slots followed still being filled), packed as
    /// `epoch << 16 | slots` (slots fit in 16 bits: at most `SLOT_COUNT`).
    catching_up: Arc<AtomicU64>,
}

/// How a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnd {
    /// The ring manager revoked it: register again, as a new incarnation.
    Revoked,
    /// The server is shutting down.
    Cancelled,
}

/// A node's lease as its peers read it (`LeaseStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// A reply of the ring manager renewed it within the lease length.
    pub holds_lease: bool,
    /// The ring manager declared this incarnation down.
    pub revoked: bool,
    /// Since the last renewal, if there was one.
    pub renewed_ago: Option<Duration>,
}

/// One peer's answer, as evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAnswer {
    /// It holds its lease (or was revoked): a ring manager leads and hears it.
    HearsManager,
    /// Its lease lapsed too.
    Lapsed,
    /// It did not answer in time.
    NoAnswer,
}

/// The Consul leader lock, as evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockSeen {
    /// Nobody holds it: no ring manager leads.
    Vacant,
    /// Some session holds it.
    Held,
    /// Not on Consul, or Consul did not answer in time.
    Unknown,
}

/// What a node whose lease lapsed does, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep serving on the last ring (static stability; AP).
    Stable(&'static str),
    /// Stop accepting writes (CP).
    Fence(&'static str),
}

/// The decision of a node whose lease lapsed, from its peers' `answers` (one per other active
/// node of its ring) and the Consul `lock`:
/// - a peer that hears the ring manager means a manager leads and only this node's link to it
///   is broken: fence (its slots may be given away);
/// - a vacant Consul lock means no manager leads: serve;
/// - at least one peer, and with this node a majority of the ring, answered that their leases
///   lapsed too: the manager is sick, not this node's link: serve;
/// - anything else (no peers, too few answers) is no evidence: fence.
pub fn decide(answers: &[PeerAnswer], lock: LockSeen) -> Verdict {
    if answers.contains(&PeerAnswer::HearsManager) {
        return Verdict::Fence("lease lapsed: a peer still hears the ring manager");
    }
    if lock == LockSeen::Vacant {
        return Verdict::Stable("no ring manager leads (the consul lock is vacant)");
    }
    let lapsed = answers.iter().filter(|a| **a == PeerAnswer::Lapsed).count();
    let ring = answers.len() + 1;
    if lapsed >= 1 && 2 * (lapsed + 1) > ring {
        return Verdict::Stable("no peer hears the ring manager");
    }
    Verdict::Fence("lease lapsed: no evidence that no ring manager leads (peers unreachable)")
}

impl Lease {
    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the node may serve traffic now.
    pub fn is_serving(&self) -> bool {
        self.state().serving(Instant::now())
    }

    /// Waits up to `wait` for the node to be allowed to serve: a renewal, or a decision after
    /// its lease lapsed. A revoked lease is refused at once. `Err` says why not.
    pub async fn wait_serving(&self, wait: Duration) -> Result<(), &'static str> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read: a change after the read wakes it.
            changed.as_mut().enable();
            {
                let s = self.state();
                if s.serving(Instant::now()) {
                    return Ok(());
                }
                if s.revoked {
                    return Err(REVOKED);
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(self.why_not_serving());
            }
        }
    }

    /// Why the node may not serve, for error messages.
    pub fn why_not_serving(&self) -> &'static str {
        let s = self.state();
        if s.revoked {
            REVOKED
        } else {
            s.fenced.unwrap_or(NEVER_RENEWED)
        }
    }

    /// The lease as a peer asking `LeaseStatus` reads it.
    pub fn status(&self) -> Status {
        let now = Instant::now();
        let s = self.state();
        Status {
            holds_lease: s.holds_lease(now),
            revoked: s.revoked,
            renewed_ago: s.renewed_at.map(|t| now.saturating_duration_since(t)),
        }
    }

    /// Starts afresh for a new incarnation: not serving until its first renewal.
    pub fn reset(&self) {
        *self.state() = LeaseState::default();
    }

    /// Reports that every outgoing handoff of `epoch` is done (drain progress).
    pub fn handed_off(&self, epoch: u64) {
        self.handed_off_epoch.fetch_max(epoch, Ordering::Relaxed);
    }

    /// Reports that in `epoch`'s ring, `slots` of the slots this node follows are still being
    /// filled from their owners (replication progress, sent with every heartbeat).
    pub fn catching_up(&self, epoch: u64, slots: usize) {
        let slots = slots.min(usize::from(u16::MAX)) as u64;
        self.catching_up
            .store(epoch << 16 | slots, Ordering::Relaxed);
    }

    /// Whether the node serves on evidence that the ring manager is sick (static stability).
    fn manager_sick(&self) -> bool {
        self.state()
            .stable_until
            .is_some_and(|t| Instant::now() < t)
    }

    /// A reply renewed the lease until `until`.
    fn renew(&self, until: Instant) {
        {
            let mut s = self.state();
            s.valid_until = Some(until);
            s.renewed_at = Some(Instant::now());
            s.stable_until = None;
            s.fenced = None;
        }
        self.changed.notify_waiters();
    }

    /// Applies `verdict`, reached on evidence asked for at `asked_at`; returns whether it
    /// changed what the node does.
    fn apply(&self, verdict: Verdict, asked_at: Instant) -> bool {
        let changed = {
            let mut s = self.state();
            let was_stable = s.stable_until.is_some();
            match verdict {
                Verdict::Stable(_) => {
                    s.stable_until = Some(asked_at + STABLE_GRANT);
                    s.fenced = None;
                    !was_stable
                }
                Verdict::Fence(why) => {
                    s.stable_until = None;
                    let changed = was_stable || s.fenced != Some(why);
                    s.fenced = Some(why);
                    changed
                }
            }
        };
        self.changed.notify_waiters();
        changed
    }

    /// Holds the lease of `node`'s `incarnation` with the ring manager `source` leads to until
    /// it is revoked or `cancel` fires, reconnecting (and finding the leader again) as needed.
    pub async fn hold(
        &self,
        source: &RingSource,
        node: &str,
        incarnation: u64,
        interval: Duration,
        lease: Duration,
        cancel: &CancellationToken,
    ) -> LeaseEnd {
        let mut broken = false;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                r = self.session(source, node, incarnation, interval, lease, cancel) => r,
            };
            match result {
                Ok(()) => return LeaseEnd::Revoked,
                Err(why) if !broken => {
                    tracing::warn!(%source, %why, "lease stream broken; reconnecting");
                    broken = true;
                }
                Err(why) => tracing::debug!(%source, %why, "lease stream broken again"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            }
        }
    }

    /// One lease stream. `Ok` when revoked; `Err` says why the stream could not be opened or
    /// ended (it ended, failed, or went silent past the reply deadline).
    async fn session(
        &self,
        source: &RingSource,
        node: &str,
        incarnation: u64,
        interval: Duration,
        lease: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        // The request stream is driven by the transport's own task: it must end by itself when
        // this session does (returns, is dropped, or the server shuts down), or the ring manager
        // would keep hearing heartbeats from a node that stopped.
        let session = cancel.child_token();
        let _end_heartbeats = session.clone().drop_guard();
        let sent: Arc<Mutex<VecDeque<(u64, Instant)>>> = Arc::default();
        let log = sent.clone();
        let handed_off = self.handed_off_epoch.clone();
        let catching_up = self.catching_up.clone();
        let node = node.to_string();
        let mut seq = 0u64;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeats = IntervalStream::new(ticker)
            .take_until(session.cancelled_owned())
            .map(move |_| {
                seq += 1;
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                if log.len() == SENT_LOG {
                    log.pop_front();
                }
                log.push_back((seq, Instant::now()));
                let replication = catching_up.load(Ordering::Relaxed);
                Heartbeat {
                    node_id: node.clone(),
                    incarnation,
                    seq,
                    handed_off_epoch: handed_off.load(Ordering::Relaxed),
                    catching_up: (replication & 0xffff) as u32,
                    catching_up_epoch: replication >> 16,
                }
            });
        let open = async {
            let endpoint = source.endpoint().await.map_err(|e| e.to_string())?;
            let channel = mesh_transport::endpoint(&endpoint).map_err(|e| e.to_string())?;
            let channel = with_keepalive(channel, LEASE_KEEPALIVE)
                .connect_timeout(OPEN_TIMEOUT)
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            RingManagerClient::new(channel)
                .lease(heartbeats)
                .await
                .map_err(|s| s.to_string())
        };
        let mut replies = tokio::time::timeout(OPEN_TIMEOUT, open)
            .await
            .map_err(|_| format!("no lease stream within {OPEN_TIMEOUT:?}"))??
            .into_inner();
        // Silence for twice the lease (and a beat) is a broken stream: the path to the ring
        // manager is dead, or the ring manager is gone. Not sooner: the lease has lapsed at
        // the first missing reply anyway, and a stream the ring manager sees end makes it probe
        // the node at once. Nor while the peers confirm the ring manager is sick (static
        // stability): then the stream is not what is broken, and it resumes when the ring
        // manager does.
        let deadline = 2 * lease + interval;
        loop {
            // Cancel-safe: a message() dropped at the deadline loses nothing.
            let reply = match tokio::time::timeout(deadline, replies.message()).await {
                Err(_) if self.manager_sick() => continue,
                Err(_) => return Err(format!("no reply within {deadline:?}")),
                Ok(Err(status)) => return Err(status.to_string()),
                Ok(Ok(None)) => return Err("the ring manager ended the stream".into()),
                Ok(Ok(Some(reply))) => reply,
            };
            if !reply.valid {
                tracing::warn!(incarnation, "the ring manager revoked this node's lease");
                {
                    let mut s = self.state();
                    s.revoked = true;
                    s.valid_until = None;
                    s.stable_until = None;
                }
                self.changed.notify_waiters();
                return Ok(());
            }
            let sent_at = sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(s, _)| *s == reply.seq)
                .map(|(_, t)| *t);
            if let Some(sent_at) = sent_at {
                self.renew(sent_at + lease);
            }
        }
    }

    /// While the lease is lapsed (and was held once), gathers evidence every [`CHECK_EVERY`]
    /// from `witnesses` and decides whether the node keeps serving on its last ring, until
    /// `cancel`.
    pub async fn decide_while_lapsed(&self, witnesses: Witnesses, cancel: CancellationToken) {
        let mut peers = Peers::default();
        let mut fenced_rounds = 0u32;
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let lapsed = {
                let s = self.state();
                s.renewed_at.is_some() && !s.revoked && !s.holds_lease(Instant::now())
            };
            if !lapsed {
                fenced_rounds = 0;
                continue;
            }
            let asked_at = Instant::now();
            // Cancel-safe: dropping the questions loses nothing.
            let (answers, lock) = tokio::select! {
                _ = cancel.cancelled() => return,
                evidence = witnesses.ask(&mut peers) => evidence,
            };
            let verdict = decide(&answers, lock);
            if self.apply(verdict, asked_at) {
                match verdict {
                    Verdict::Stable(why) => tracing::warn!(
                        ?answers, ?lock, %why,
                        "lease lapsed; serving on the last ring (static stability)"
                    ),
                    Verdict::Fence(why) => tracing::warn!(
                        ?answers, ?lock, %why,
                        "lease lapsed; refusing writes (fenced)"
                    ),
                }
            }
            if matches!(verdict, Verdict::Fence(_)) {
                let pause = fenced_pause(fenced_rounds);
                fenced_rounds = fenced_rounds.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            } else {
                fenced_rounds = 0;
            }
        }
    }
}

/// The extra pause before asking again after `rounds` fenced verdicts in a row.
fn fenced_pause(rounds: u32) -> Duration {
    CHECK_EVERY
        .saturating_mul(1 << rounds.min(8))
        .saturating_sub(CHECK_EVERY)
        .min(FENCED_RECHECK_MAX)
}

/// Whom a node whose lease lapsed asks whether a ring manager leads.
#[derive(Debug, Clone)]
pub struct Witnesses {
    /// This node's id on the ring (it does not ask itself).
    pub node: String,
    /// Its ring: the other active nodes are its peers.
    pub ring: RingWatcher,
    /// On Consul: where the leader lock is.
    pub consul: Option<ConsulRing>,
}

/// Connections to peers, kept between questions (each reconnects by itself).
#[derive(Debug, Default)]
struct Peers {
    channels: HashMap<String, Channel>,
}

impl Peers {
    fn channel(&mut self, addr: &str) -> Option<Channel> {
        if let Some(channel) = self.channels.get(addr) {
            return Some(channel.clone());
        }
        let channel = mesh_transport::endpoint(addr)
            .ok()?
            .connect_timeout(QUESTION_TIMEOUT)
            .connect_lazy();
        self.channels.insert(addr.to_string(), channel.clone());
        Some(channel)
    }
}

impl Witnesses {
    /// Asks every peer and Consul at once, each for at most [`QUESTION_TIMEOUT`].
    async fn ask(&self, peers: &mut Peers) -> (Vec<PeerAnswer>, LockSeen) {
        let ring = self.ring.current();
        let others: Vec<_> = ring
            .nodes()
            .iter()
            .filter(|n| n.id.as_str() != self.node)
            .map(|n| (n.addr.clone(), peers.channel(&n.addr)))
            .collect();
        // Forget connections to nodes that left the ring.
        peers
            .channels
            .retain(|addr, _| others.iter().any(|(a, _)| a == addr));
        let node = self.node.clone();
        let questions = others.into_iter().map(|(_, channel)| {
            let node = node.clone();
            async move {
                let Some(channel) = channel else {
                    return PeerAnswer::NoAnswer;
                };
                let mut client = ChannelServerClient::new(channel);
                let call = client.lease_status(LeaseStatusRequest { node_id: node });
                match tokio::time::timeout(QUESTION_TIMEOUT, call).await {
                    Ok(Ok(reply)) => {
                        let reply = reply.into_inner();
                        if reply.holds_lease || reply.revoked {
                            PeerAnswer::HearsManager
                        } else {
                            PeerAnswer::Lapsed
                        }
                    }
                    _ => PeerAnswer::NoAnswer,
                }
            }
        });
        let lock = async {
            let Some(consul) = &self.consul else {
                return LockSeen::Unknown;
            };
            match tokio::time::timeout(QUESTION_TIMEOUT, consul.leader()).await {
                Ok(Ok(None)) => LockSeen::Vacant,
                Ok(Ok(Some(_))) => LockSeen::Held,
                _ => LockSeen::Unknown,
            }
        };
        tokio::join!(futures::future::join_all(questions), lock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PeerAnswer::{HearsManager, Lapsed, NoAnswer};

    #[test]
    fn a_new_lease_does_not_serve_until_renewed() {
        let lease = Lease::default();
        assert!(!lease.is_serving());
        assert_eq!(lease.why_not_serving(), NEVER_RENEWED);
        lease.renew(Instant::now() + Duration::from_secs(60));
        assert!(lease.is_serving());
        assert!(lease.status().holds_lease);
        lease.state().valid_until = Some(Instant::now() - Duration::from_millis(1));
        assert!(
            !lease.is_serving(),
            "a lapsed lease fences until a decision"
        );
        assert!(!lease.status().holds_lease);
    }

    #[test]
    fn a_fenced_node_asks_less_and_less_often() {
        // On top of the tick: at once, then 50, 150, 350, at most 400 ms more.
        let pauses: Vec<u64> = (0..6).map(|r| fenced_pause(r).as_millis() as u64).collect();
        assert_eq!(pauses, [0, 50, 150, 350, 400, 400]);
    }

    #[test]
    fn a_peer_that_hears_the_manager_fences_whatever_else_is_seen() {
        for lock in [LockSeen::Vacant, LockSeen::Held, LockSeen::Unknown] {
            assert!(matches!(
                decide(&[Lapsed, HearsManager, Lapsed], lock),
                Verdict::Fence(_)
            ));
        }
    }

    #[test]
    fn every_answering_peer_lapsed_is_static_stability() {
        assert!(matches!(
            decide(&[Lapsed, Lapsed, Lapsed], LockSeen::Unknown),
            Verdict::Stable(_)
        ));
        assert!(matches!(
            decide(&[Lapsed, Lapsed], LockSeen::Held),
            Verdict::Stable(_)
        ));
        // One peer silent of three: with this node, three of four answered.
        assert!(matches!(
            decide(&[Lapsed, NoAnswer, Lapsed], LockSeen::Unknown),
            Verdict::Stable(_)
        ));
    }

    #[test]
    fn without_evidence_or_a_majority_the_node_fences() {
        // Alone on its ring, or nobody answered: nothing says no manager leads.
        assert!(matches!(decide(&[], LockSeen::Unknown), Verdict::Fence(_)));
        assert!(matches!(
            decide(&[NoAnswer, NoAnswer], LockSeen::Held),
            Verdict::Fence(_)
        ));
        // Two of four (this node and one peer) is no majority: the other two may be with the
        // ring manager on the far side of a partition.
        assert!(matches!(
            decide(&[Lapsed, NoAnswer, NoAnswer], LockSeen::Unknown),
            Verdict::Fence(_)
        ));
    }

    #[test]
    fn a_vacant_consul_lock_is_evidence_on_its_own() {
        assert!(matches!(decide(&[], LockSeen::Vacant), Verdict::Stable(_)));
        assert!(matches!(
            decide(&[NoAnswer], LockSeen::Vacant),
            Verdict::Stable(_)
        ));
    }

    #[test]
    fn a_stable_verdict_serves_for_its_grant_and_a_renewal_or_fence_ends_it() {
        let lease = Lease::default();
        lease.renew(Instant::now() - Duration::from_millis(1));
        assert!(!lease.is_serving());
        let now = Instant::now();
        assert!(lease.apply(Verdict::Stable("test"), now));
        assert!(lease.is_serving());
        assert!(
            !lease.status().holds_lease,
            "peers are told the truth: no lease"
        );
        assert!(!lease.apply(Verdict::Stable("test"), now), "no change");
        // The grant runs from when the evidence was asked for.
        lease.apply(
            Verdict::Stable("test"),
            now - STABLE_GRANT - Duration::from_millis(1),
        );
        assert!(!lease.is_serving(), "an old grant has run out");
        lease.apply(Verdict::Stable("test"), now);
        assert!(lease.apply(Verdict::Fence("a peer hears it"), now));
        assert!(!lease.is_serving());
        assert_eq!(lease.why_not_serving(), "a peer hears it");
        lease.state().revoked = true;
        lease.apply(Verdict::Stable("test"), now);
        assert!(!lease.is_serving(), "a revoked lease always fences");
        assert_eq!(lease.why_not_serving(), REVOKED);
    }

    #[tokio::test]
    async fn a_caller_waits_for_a_decision_and_is_refused_when_none_comes() {
        let lease = Lease::default();
        lease.renew(Instant::now() - Duration::from_millis(1));
        let waiter = {
            let lease = lease.clone();
            tokio::spawn(async move { lease.wait_serving(Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        lease.apply(Verdict::Stable("manager sick"), Instant::now());
        assert_eq!(waiter.await.unwrap(), Ok(()));
        lease.apply(Verdict::Fence("a peer hears it"), Instant::now());
        assert_eq!(
            lease.wait_serving(Duration::from_millis(20)).await,
            Err("a peer hears it")
        );
        lease.state().revoked = true;
        assert_eq!(
            lease.wait_serving(Duration::from_secs(10)).await,
            Err(REVOKED)
        );
    }
}
