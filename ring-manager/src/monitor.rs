//! The failure monitor: silence, then a probe, then down.
//!
//! Every tick it looks at the leases. A node whose lease stream ended, or that has been silent
//! for longer than the suspicion period, is probed (a gRPC health check: only a running process
//! answers it). A node that fails the probe and is still not heartbeating is declared down; so
//! is one silent for far longer (alive but cut off from the ring manager, and no longer serving
//! since its lease lapsed), probe or not. The decisions are plain methods on [`Membership`];
//! the loop here runs them, and the probe itself is gRPC ([`crate::grpc::probe`]).
//!
//! Silence is only evidence while the ring manager itself was running to hear it: when the
//! monitor wakes late (its process stopped, frozen, or starved), the time it did not run is
//! discounted from every node's silence ([`Stalls`], [`Membership::excuse_stall`]) before
//! anyone is judged on it.
//!
//! Nor is silence evidence while the ring manager hears fewer than half of its live members (a
//! partition that cuts *it* off looks, from inside, like most of the mesh dying at once): it
//! then judges nobody, and when it hears them again every member gets a suspicion period from
//! then to be heard, as after a restart. The nodes meanwhile keep serving on their peers' evidence that no manager leads
//! (`ring_client::lease`). The cost: when more than half of the members really die at once,
//! nobody is declared down until some come back or an operator acts (`ctl replace-node`).

use std::time::{Duration, Instant};

use mesh_core::NodeId;

use crate::grpc;
use crate::membership::{Membership, NodeState};
use crate::server::RingManager;

/// When the monitor looks and what it tolerates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How often it looks at the leases.
    pub(crate) tick: Duration,
    /// Silence after which a node is probed.
    pub(crate) suspect_after: Duration,
    /// Silence after which a node is declared down without a probe.
    pub(crate) silence_limit: Duration,
    /// How long a probe may take.
    pub(crate) probe_timeout: Duration,
}

/// How long after its own stall the monitor gives probes longer to answer (see
/// [`Stalls::probe_timeout`]): a host starved enough to stop the ring manager for half a second
/// stays starved for seconds (the 500,000-connection run's fan-out burst lasts about ten).
pub(crate) const STRAINED_FOR: Duration = Duration::from_secs(5);

/// Notices the monitor's own stalls: a tick that comes late by at least `suspect_after` means
/// the ring manager was not running (stopped, frozen, starved) and heard nobody meanwhile.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stalls {
    last: Instant,
    /// The latest stall: when the monitor woke from it, and the longest stall within
    /// [`STRAINED_FOR`] before that.
    strained: Option<(Instant, Duration)>,
}

impl Stalls {
    pub(crate) fn new(now: Instant) -> Self {
        Stalls {
            last: now,
            strained: None,
        }
    }

    /// A tick at `now`: how long the monitor stalled since the last one, when that is long
    /// enough to make a healthy node look silent.
    pub(crate) fn tick(&mut self, now: Instant, timing: &Timing) -> Option<Duration> {
        let late = now
            .saturating_duration_since(self.last)
            .saturating_sub(timing.tick);
        self.last = now;
        let stalled = (late >= timing.suspect_after).then_some(late);
        if let Some(stalled) = stalled {
            let longest = match self.strained {
                Some((at, before)) if now.saturating_duration_since(at) < STRAINED_FOR => {
                    before.max(stalled)
                }
                _ => stalled,
            };
            self.strained = Some((now, longest));
        }
        stalled
    }

    /// How long a probe sent at `now` may take: `probe_timeout`, or, within [`STRAINED_FOR`]
    /// of the monitor's own stall, as long as that stall (up to the silence limit). The
    /// starvation that stopped the ring manager stops the nodes on the same host as well, and
    /// a probe is a new connection with its TLS handshake: one that times out there is
    /// evidence of the host's load, not of the node's death. A node that is really gone
    /// refuses the connection at once, and is declared down as fast as ever.
    pub(crate) fn probe_timeout(&self, now: Instant, timing: &Timing) -> Duration {
        match self.strained {
            Some((at, stalled)) if now.saturating_duration_since(at) < STRAINED_FOR => {
                timing.probe_timeout.max(stalled.min(timing.silence_limit))
            }
            _ => timing.probe_timeout,
        }
    }
}

/// What a probe that ran for `took` says about its node: whether it answered (`outcome` is
/// `None` when `timeout` ran out first), or nothing when it timed out but the monitor noticed
/// only `suspect_after` or more past the timeout: the ring manager itself was not running, and
/// the node may have answered meanwhile. The node is then probed again.
pub(crate) fn probe_verdict(
    outcome: Option<bool>,
    took: Duration,
    timeout: Duration,
    timing: &Timing,
) -> Option<bool> {
    match outcome {
        Some(answered) => Some(answered),
        None if took >= timeout + timing.suspect_after => None,
        None => Some(false),
    }
}

/// A probe of a suspect node, of the incarnation that was suspect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Probe {
    pub(crate) id: NodeId,
    /// The incarnation that was suspect: an answer about another one is ignored.
    pub(crate) incarnation: u64,
    /// Where to send the health check.
    pub(crate) addr: String,
}

impl Membership {
    /// The ring manager did not run for `stalled` up to `now`: nobody's silence during it is
    /// evidence, so every member's last heartbeat moves forward by that much (never past
    /// `now`). A node silent before the stall stays as silent as it was.
    pub(crate) fn excuse_stall(&mut self, stalled: Duration, now: Instant) {
        for (_, m) in self.members_mut() {
            m.last_heartbeat = (m.last_heartbeat + stalled).min(now);
        }
    }

    /// Whether the ring manager hears at least half of its members that are not down at `now`
    /// (a heartbeat within `suspect_after` on a stream still open).
    pub(crate) fn hears_most(&self, now: Instant, suspect_after: Duration) -> bool {
        let (mut live, mut heard) = (0usize, 0usize);
        for (_, m) in self.members_iter() {
            if m.state == NodeState::Down {
                continue;
            }
            live += 1;
            if !m.stream_closed && now.duration_since(m.last_heartbeat) <= suspect_after {
                heard += 1;
            }
        }
        2 * heard >= live
    }

    /// Whether the ring manager may judge anyone at `now`: not while it hears fewer than half
    /// of its members (see the module's doc); when it hears them again, every member's silence
    /// starts again from `now`.
    fn may_judge(&mut self, now: Instant, suspect_after: Duration) -> bool {
        let hears = self.hears_most(now, suspect_after);
        match (hears, self.deaf_since) {
            (false, None) => {
                tracing::warn!(
                    "the ring manager hears fewer than half of its nodes: it is likely the one cut \
                     off, and declares nobody down until it hears them again"
                );
                self.deaf_since = Some(now);
                false
            }
            (false, Some(_)) => false,
            (true, Some(since)) => {
                let deaf = now.saturating_duration_since(since);
                tracing::warn!(?deaf, "the ring manager hears most of its nodes again");
                self.deaf_since = None;
                for (_, m) in self.members_mut() {
                    m.last_heartbeat = m.last_heartbeat.max(now);
                }
                true
            }
            (true, None) => true,
        }
    }

    /// One look at the leases at `now`: declares down the nodes silent past the limit, and
    /// returns a probe for each other suspect (marked as probing until its answer). Judges
    /// nobody while the ring manager hears fewer than half of its members.
    pub(crate) fn sweep(&mut self, now: Instant, timing: &Timing) -> Vec<Probe> {
        if !self.may_judge(now, timing.suspect_after) {
            return Vec::new();
        }
        let mut overdue = Vec::new();
        let mut probes = Vec::new();
        for (id, m) in self.members_mut() {
            if m.state == NodeState::Down || m.probing {
                continue;
            }
            let silent = now.duration_since(m.last_heartbeat);
            if silent > timing.silence_limit {
                overdue.push(id.clone());
            } else if m.stream_closed || silent > timing.suspect_after {
                tracing::debug!(node = %id, ?silent, stream_closed = m.stream_closed, "lease suspect; probing");
                m.probing = true;
                probes.push(Probe {
                    id: id.clone(),
                    incarnation: m.incarnation,
                    addr: m.addr.clone(),
                });
            }
        }
        for id in overdue {
            self.declare_down(&id, "silent past the lease limit", now);
        }
        probes
    }

    /// `probe`'s answer at `now`: the node is down when it did not answer and is not
    /// heartbeating (its stream ended, or silent for longer than `suspect_after`). An answer
    /// about an incarnation that is gone, or already down, changes nothing.
    pub(crate) fn probed(
        &mut self,
        probe: &Probe,
        reachable: bool,
        now: Instant,
        suspect_after: Duration,
    ) {
        let Some(m) = self.member_mut(&probe.id) else {
            return;
        };
        if m.incarnation != probe.incarnation || m.state == NodeState::Down {
            return;
        }
        m.probing = false;
        let fresh = now.duration_since(m.last_heartbeat) <= suspect_after;
        let healthy = fresh && !m.stream_closed;
        if !reachable && !healthy && self.deaf_since.is_none() {
            self.declare_down(&probe.id, "lease lost and probe failed", now);
        }
    }
}

/// Watches `manager`'s leases every tick until it is cancelled, probing suspects on its task
/// tracker.
pub(crate) async fn run(manager: RingManager, timing: Timing) {
    let mut tick = tokio::time::interval(timing.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalls = Stalls::new(Instant::now());
    let mut unsaved = UnsavedLog::default();
    loop {
        tokio::select! {
            _ = manager.cancel().cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let stalled = stalls.tick(now, &timing);
        if let Some(stalled) = stalled {
            tracing::warn!(
                ?stalled,
                "the ring manager did not run for a while; no node is judged on the silence that caused"
            );
        }
        if let Some(stalled) = stalled {
            // Apart from the sweep, so that a sweep undone for want of a save keeps the excuse.
            manager.excuse_stall(stalled, now);
        }
        // A node declared down whose new ring cannot be saved is undone (and stays suspect):
        // the next tick declares it again.
        let probes = match manager.update(|m| m.sweep(now, &timing)) {
            Ok(probes) => probes,
            Err(e) => {
                unsaved.failed(&e, Instant::now());
                continue;
            }
        };
        let probe_timeout = stalls.probe_timeout(now, &timing);
        for suspect in probes {
            let prober = manager.clone();
            manager.tracker().spawn(async move {
                let sent = Instant::now();
                let outcome = tokio::time::timeout(probe_timeout, grpc::probe(&suspect.addr))
                    .await
                    .ok();
                let Some(reachable) = probe_verdict(outcome, sent.elapsed(), probe_timeout, &timing)
                else {
                    tracing::warn!(
                        node = %suspect.id,
                        took = ?sent.elapsed(),
                        "a probe timed out while the ring manager itself was not running; probing again"
                    );
                    prober.unprobe(&suspect.id, suspect.incarnation);
                    return;
                };
                let judged = prober.update(|m| {
                    m.probed(&suspect, reachable, Instant::now(), timing.suspect_after)
                });
                if let Err(e) = judged {
                    // Undone: probed again at the next tick, and declared down then.
                    tracing::error!(
                        node = %suspect.id,
                        error = %e,
                        "a node found down could not be saved as down; probing it again"
                    );
                    prober.unprobe(&suspect.id, suspect.incarnation);
                }
            });
        }
    }
}

/// How often the monitor repeats the same failed save in its log (it retries every tick).
const UNSAVED_LOG_EVERY: Duration = Duration::from_secs(1);

/// The monitor's failed saves: each is logged at error, at most once per
/// [`UNSAVED_LOG_EVERY`] (with how many failed since), and retried at the next tick.
#[derive(Debug, Default)]
struct UnsavedLog {
    last: Option<Instant>,
    since: u64,
}

impl UnsavedLog {
    fn failed(&mut self, e: &crate::server::Unsaved, now: Instant) {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < UNSAVED_LOG_EVERY)
        {
            return;
        }
        tracing::error!(
            error = %e,
            failed_saves = self.since,
            "nodes found down could not be saved as down; nothing was published, retrying"
        );
        self.last = Some(now);
        self.since = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::tests::{SUSPECT, id, state, with_nodes};

    const TIMING: Timing = Timing {
        tick: Duration::from_millis(25),
        suspect_after: SUSPECT,
        silence_limit: Duration::from_millis(2000),
        probe_timeout: Duration::from_millis(200),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_silent_node_is_probed_once_and_a_heartbeating_one_is_not() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b"], &[], start);
        assert!(
            m.sweep(start + SUSPECT, &TIMING).is_empty(),
            "not past it yet"
        );
        m.heartbeat(&id("b"), 2, 0, start + ms(400));
        let probes = m.sweep(start + ms(600), &TIMING);
        assert_eq!(
            probes,
            [Probe {
                id: id("a"),
                incarnation: 1,
                addr: "a:1".into()
            }]
        );
        assert!(
            m.sweep(start + ms(700), &TIMING).is_empty(),
            "one probe at a time"
        );
        assert!(
            m.take_effects().published.is_empty(),
            "suspicion changes no ring"
        );
    }

    #[test]
    fn an_ended_stream_is_probed_at_once() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b"], &[], start);
        m.lease_ended(&id("a"), 1);
        assert_eq!(m.sweep(start, &TIMING).len(), 1);
    }

    #[test]
    fn a_failed_probe_of_a_silent_node_declares_it_down() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b", "c"], &["s"], start);
        m.heartbeat(&id("c"), 3, 0, start + ms(500));
        m.heartbeat(&id("s"), 4, 0, start + ms(500));
        let probes = m.sweep(start + ms(600), &TIMING);
        assert_eq!(probes.len(), 2, "a and b are silent");
        m.probed(&probes[0], false, start + ms(700), SUSPECT);
        assert_eq!(state(&m, "a"), NodeState::Down);
        assert_eq!(state(&m, "s"), NodeState::Active, "the standby took over");
        assert_eq!(
            m.history()[0].cause,
            "a down (lease lost and probe failed); standby s takes its slots"
        );
        // b answers: it stays, and may be probed again later.
        m.probed(&probes[1], true, start + ms(700), SUSPECT);
        assert_eq!(state(&m, "b"), NodeState::Active);
        assert!(!m.member(&id("b")).unwrap().probing);
    }

    #[test]
    fn a_node_heartbeating_again_survives_a_failed_probe() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b"], &[], start);
        m.heartbeat(&id("b"), 2, 0, start + ms(550));
        let probes = m.sweep(start + ms(600), &TIMING);
        m.heartbeat(&id("a"), 1, 0, start + ms(650));
        m.probed(&probes[0], false, start + ms(700), SUSPECT);
        assert_eq!(state(&m, "a"), NodeState::Active);
        // But not one whose stream has ended since, however recent its last heartbeat.
        m.lease_ended(&id("a"), 1);
        let probes = m.sweep(start + ms(700), &TIMING);
        m.probed(&probes[0], false, start + ms(700), SUSPECT);
        assert_eq!(state(&m, "a"), NodeState::Down);
    }

    #[test]
    fn a_ring_manager_that_hears_fewer_than_half_judges_nobody_and_then_gives_everyone_time() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b", "c"], &["s"], start);
        // Cut off: only c is heard, for far longer than the silence limit.
        for t in [300, 600, 3000, 6000] {
            m.heartbeat(&id("c"), 3, 0, start + ms(t));
            assert!(m.sweep(start + ms(t + 50), &TIMING).is_empty(), "at {t} ms");
        }
        assert!(
            m.take_effects().published.is_empty(),
            "nobody declared down"
        );
        for node in ["a", "b", "c"] {
            assert_eq!(state(&m, node), NodeState::Active, "{node}");
        }
        // Healed: a is heard again, so most are; b and s get a suspicion period from now.
        let healed = start + ms(6100);
        m.heartbeat(&id("a"), 1, 0, healed);
        assert!(m.sweep(healed, &TIMING).is_empty(), "nobody suspect yet");
        assert!(m.take_effects().published.is_empty());
        // Silence after that counts again: b, still not heard, is probed, and a failed probe
        // now declares it down.
        m.heartbeat(&id("a"), 1, 0, healed + ms(500));
        m.heartbeat(&id("c"), 3, 0, healed + ms(500));
        m.heartbeat(&id("s"), 4, 0, healed + ms(500));
        let probes = m.sweep(healed + ms(550), &TIMING);
        assert_eq!(probes.len(), 1);
        assert_eq!(probes[0].id, id("b"));
        m.probed(&probes[0], false, healed + ms(600), SUSPECT);
        assert_eq!(state(&m, "b"), NodeState::Down);
    }

    #[test]
    fn a_probe_answered_while_the_ring_manager_is_cut_off_declares_nobody_down() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b", "c"], &[], start);
        m.heartbeat(&id("b"), 2, 0, start + ms(500));
        m.heartbeat(&id("c"), 3, 0, start + ms(500));
        let probes = m.sweep(start + ms(600), &TIMING);
        assert_eq!(probes.len(), 1, "a is suspect");
        // Before the probe's answer the ring manager stops hearing b and c too.
        assert!(m.sweep(start + ms(1200), &TIMING).is_empty());
        m.probed(&probes[0], false, start + ms(1250), SUSPECT);
        assert_eq!(state(&m, "a"), NodeState::Active);
    }

    #[test]
    fn a_probe_of_an_earlier_incarnation_changes_nothing() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b", "c", "d"], &[], start);
        m.heartbeat(&id("c"), 3, 0, start + ms(500));
        m.heartbeat(&id("d"), 4, 0, start + ms(500));
        let probes = m.sweep(start + ms(600), &TIMING);
        let at = start + ms(600);
        m.register(id("a"), "a:2".into(), 0, false, at).unwrap();
        let epoch = m.ring().epoch();
        m.probed(&probes[0], false, at, SUSPECT);
        assert_eq!(state(&m, "a"), NodeState::Active);
        assert_eq!(m.ring().epoch(), epoch);
        // Nor one of a node that is gone already.
        m.declare_down(&id("b"), "test", at);
        let epoch = m.ring().epoch();
        m.probed(&probes[1], false, at, SUSPECT);
        assert_eq!(m.ring().epoch(), epoch);
    }

    #[test]
    fn a_tick_late_by_the_suspicion_period_is_a_stall_and_ordinary_jitter_is_not() {
        let start = Instant::now();
        let mut stalls = Stalls::new(start);
        assert_eq!(stalls.tick(start + ms(25), &TIMING), None);
        assert_eq!(
            stalls.tick(start + ms(25 + 40), &TIMING),
            None,
            "15 ms late"
        );
        let woke = start + ms(65 + 6000);
        assert_eq!(stalls.tick(woke, &TIMING), Some(ms(6000 - 25)));
        assert_eq!(stalls.tick(woke + ms(25), &TIMING), None);
    }

    #[test]
    fn after_its_own_stall_the_monitor_gives_probes_as_long_as_the_stall_for_a_while() {
        let start = Instant::now();
        let mut stalls = Stalls::new(start);
        assert_eq!(stalls.probe_timeout(start, &TIMING), ms(200));
        // Stopped for 1.2 s: probes sent in the next STRAINED_FOR may take as long.
        let woke = start + ms(25 + 1200);
        assert_eq!(stalls.tick(woke, &TIMING), Some(ms(1200)));
        assert_eq!(stalls.probe_timeout(woke, &TIMING), ms(1200));
        // A shorter stall within the window keeps the longer allowance.
        let again = woke + ms(25 + 600);
        assert_eq!(stalls.tick(again, &TIMING), Some(ms(600)));
        assert_eq!(stalls.probe_timeout(again, &TIMING), ms(1200));
        assert_eq!(stalls.tick(again + ms(25), &TIMING), None);
        // A stall longer than the silence limit gives no more than the limit, and the
        // allowance ends STRAINED_FOR after the last stall.
        let mut stalls = Stalls::new(start);
        let woke = start + ms(6025);
        stalls.tick(woke, &TIMING);
        assert_eq!(stalls.probe_timeout(woke, &TIMING), TIMING.silence_limit);
        assert_eq!(
            stalls.probe_timeout(woke + STRAINED_FOR - ms(1), &TIMING),
            TIMING.silence_limit
        );
        assert_eq!(
            stalls.probe_timeout(woke + STRAINED_FOR, &TIMING),
            ms(200),
            "back to the usual once the window has passed without a stall"
        );
    }

    #[test]
    fn a_probe_that_timed_out_while_the_ring_manager_stalled_is_no_evidence() {
        let timeout = ms(200);
        // Answered, or refused, in time: evidence either way.
        assert_eq!(
            probe_verdict(Some(true), ms(3000), timeout, &TIMING),
            Some(true)
        );
        assert_eq!(
            probe_verdict(Some(false), ms(5), timeout, &TIMING),
            Some(false)
        );
        // Timed out, noticed about on time: the node did not answer.
        assert_eq!(probe_verdict(None, ms(230), timeout, &TIMING), Some(false));
        // Timed out, noticed a suspicion period late: the ring manager was not running.
        assert_eq!(probe_verdict(None, ms(200 + 500), timeout, &TIMING), None);
    }

    #[test]
    fn after_its_own_stall_the_monitor_declares_nobody_down_for_the_silence_it_caused() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b", "c"], &["s"], start);
        m.heartbeat(&id("a"), 1, 0, start + ms(100));
        m.heartbeat(&id("b"), 2, 0, start + ms(100));
        m.heartbeat(&id("s"), 4, 0, start + ms(100));
        // The ring manager stops at 100 ms and wakes 6 s later. c had been silent since the
        // start: 100 ms before the stall.
        let (mut stalls, woke) = (Stalls::new(start + ms(100)), start + ms(6100));
        let stalled = stalls.tick(woke, &TIMING).expect("a stall");
        m.excuse_stall(stalled, woke);
        let epoch = m.ring().epoch();
        assert!(m.sweep(woke, &TIMING).is_empty(), "nobody is suspect yet");
        assert_eq!(m.ring().epoch(), epoch);
        for node in ["a", "b", "c"] {
            assert_eq!(state(&m, node), NodeState::Active, "{node}");
        }
        // Silence after the wake counts again, from where it was: c, silent for 100 ms when
        // the ring manager stopped, is suspect some 400 ms after the wake; a and b, heard
        // 100 ms later than c, are not yet.
        let probes = m.sweep(woke + ms(425), &TIMING);
        assert_eq!(
            probes.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
    }

    #[test]
    fn a_node_silent_past_the_limit_is_down_without_a_probe() {
        let start = Instant::now();
        let mut m = with_nodes(&["a", "b"], &[], start);
        m.heartbeat(&id("b"), 2, 0, start + ms(1800));
        let probes = m.sweep(start + ms(2001), &TIMING);
        assert!(probes.is_empty());
        assert_eq!(state(&m, "a"), NodeState::Down);
        assert_eq!(
            m.history()[0].cause,
            "a down (silent past the lease limit); its slots spread over the survivors"
        );
        assert_eq!(m.ring().slots_owned(&id("b")), mesh_core::SLOT_COUNT);
        // A down node is never looked at again.
        assert!(
            m.sweep(start + ms(9000), &TIMING)
                .iter()
                .all(|p| p.id != id("a"))
        );
    }
}
