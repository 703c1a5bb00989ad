//! Unit tests of the membership state machine, and the helpers the operations' and the
//! monitor's tests share.

use super::*;

pub(crate) const SUSPECT: Duration = Duration::from_millis(500);

pub(crate) fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// A membership with `active` active nodes and `standby` standbys, registered at `now`,
/// its effects taken; without replication (factor 1: a standby takes over a dead node's slots).
pub(crate) fn with_nodes(active: &[&str], standby: &[&str], now: Instant) -> Membership {
    replicated(active, standby, 1, now)
}

pub(crate) fn state(m: &Membership, node: &str) -> NodeState {
    m.member(&id(node)).unwrap().state
}

#[test]
fn an_active_registration_takes_a_fair_share_in_a_new_epoch() {
    let now = Instant::now();
    let mut m = Membership::new(SUSPECT, 50);
    assert_eq!(m.register(id("a"), "a:1".into(), 7, false, now), Ok((1, 1)));
    assert_eq!(m.register(id("b"), "b:1".into(), 8, false, now), Ok((2, 2)));
    let effects = m.take_effects();
    assert!(effects.changed);
    let epochs: Vec<u64> = effects.published.iter().map(|r| r.epoch()).collect();
    assert_eq!(epochs, [1, 2]);
    let ring = m.ring().clone();
    assert_eq!(ring.slots_owned(&id("a")), mesh_core::SLOT_COUNT / 2);
    assert_eq!(ring.slots_owned(&id("b")), mesh_core::SLOT_COUNT / 2);
    // Epoch 2 moves half of a's slots to b, with a handoff.
    assert_eq!(ring.handoffs().len(), 1);
    assert_eq!(ring.handoffs()[0].from, id("a"));
    let history = m.history();
    assert_eq!(history[0].epoch, 2);
    assert_eq!(history[0].cause, "b joined the active nodes");
    assert_eq!(
        history[0].moves,
        [(Some(id("a")), Some(id("b")), mesh_core::SLOT_COUNT / 2)]
    );
    assert_eq!(
        history[1].moves,
        [(None, Some(id("a")), mesh_core::SLOT_COUNT)]
    );
    assert!(
        m.take_effects().published.is_empty(),
        "effects are taken once"
    );
}

#[test]
fn a_registration_needs_an_address() {
    let now = Instant::now();
    let mut m = with_nodes(&["a"], &[], now);
    let err = m
        .register(id("b"), String::new(), 0, false, now)
        .unwrap_err();
    assert_eq!(err.to_string(), "addr is required");
    assert_eq!(m.members(), [(id("a"), NodeState::Active)]);
    // Refused before anything else: a registered id is not retired by it.
    assert!(m.register(id("a"), String::new(), 0, false, now).is_err());
    assert_eq!(m.members(), [(id("a"), NodeState::Active)]);
    assert!(!m.take_effects().changed);
}

#[test]
fn a_standby_registration_changes_no_ring() {
    let now = Instant::now();
    let mut m = with_nodes(&["a"], &[], now);
    assert_eq!(m.register(id("s"), "s:1".into(), 0, true, now), Ok((1, 2)));
    let effects = m.take_effects();
    assert!(effects.published.is_empty());
    assert!(effects.changed, "a new member is saved");
    assert_eq!(state(&m, "s"), NodeState::Standby);
    assert_eq!(
        m.members(),
        [(id("a"), NodeState::Active), (id("s"), NodeState::Standby)]
    );
}

#[test]
fn a_re_registration_retires_the_earlier_incarnation_first() {
    let now = Instant::now();
    let mut m = with_nodes(&["a", "b"], &[], now);
    let (epoch, incarnation) = m.register(id("a"), "a:2".into(), 9, false, now).unwrap();
    assert_eq!((epoch, incarnation), (4, 3));
    let published: Vec<u64> = m
        .take_effects()
        .published
        .iter()
        .map(|r| r.epoch())
        .collect();
    assert_eq!(published, [3, 4], "down (slots to b), then joined again");
    assert_eq!(
        m.history()[1].cause,
        "a down (re-registered); its slots spread over the survivors"
    );
    assert!(
        !m.heartbeat(&id("a"), 1, 0, now),
        "the old incarnation is gone"
    );
    assert!(m.heartbeat(&id("a"), 3, 0, now));
    assert_eq!(m.ring().slots_owned(&id("a")), mesh_core::SLOT_COUNT / 2);
}

#[test]
fn leases_are_renewed_by_the_current_incarnation_only() {
    let now = Instant::now();
    let mut m = with_nodes(&["a"], &[], now);
    let later = now + Duration::from_secs(1);
    assert!(m.heartbeat(&id("a"), 1, 0, later));
    assert_eq!(m.views(later)[0].since_heartbeat, Duration::ZERO);
    assert!(!m.heartbeat(&id("a"), 2, 0, later), "unknown incarnation");
    assert!(!m.heartbeat(&id("zz"), 1, 0, later), "unknown node");
    m.lease_ended(&id("a"), 2);
    assert!(
        !m.member(&id("a")).unwrap().stream_closed,
        "another incarnation's stream"
    );
    m.lease_ended(&id("a"), 1);
    assert!(m.member(&id("a")).unwrap().stream_closed);
    // A heartbeat on a new stream clears it.
    assert!(m.heartbeat(&id("a"), 1, 0, later));
    assert!(!m.member(&id("a")).unwrap().stream_closed);
    m.declare_down(&id("a"), "test", later);
    assert!(
        !m.heartbeat(&id("a"), 1, 0, later),
        "a down node's lease is not renewed"
    );
    m.lease_ended(&id("a"), 1);
    assert!(!m.member(&id("a")).unwrap().stream_closed);
}

#[test]
fn a_live_standby_takes_over_exactly_the_dead_nodes_slots() {
    let now = Instant::now();
    let mut m = with_nodes(&["a", "b"], &["s2", "s1"], now);
    let before = m.ring().clone();
    m.declare_down(&id("a"), "lease lost and probe failed", now);
    let effects = m.take_effects();
    assert_eq!(effects.published.len(), 1);
    let after = m.ring();
    assert_eq!(after.epoch(), before.epoch() + 1);
    assert!(after.handoffs().is_empty(), "a dead node hands nothing off");
    for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
        let expected = if before.owns(&id("a"), s) { "s1" } else { "b" };
        assert!(after.owns(&id(expected), s), "slot {s}");
    }
    assert_eq!(state(&m, "a"), NodeState::Down);
    assert_eq!(
        state(&m, "s1"),
        NodeState::Active,
        "the lowest id is picked"
    );
    assert_eq!(state(&m, "s2"), NodeState::Standby);
    assert_eq!(
        m.history()[0].cause,
        "a down (lease lost and probe failed); standby s1 takes its slots"
    );
}

#[test]
fn without_a_live_standby_the_slots_spread_over_the_survivors() {
    let now = Instant::now();
    let mut m = with_nodes(&["a", "b", "c"], &["s"], now);
    // The standby's stream ended: it is not live.
    m.lease_ended(&id("s"), 4);
    m.declare_down(&id("a"), "test", now);
    assert_eq!(state(&m, "s"), NodeState::Standby);
    let ring = m.ring();
    assert_eq!(ring.slots_owned(&id("a")), 0);
    assert_eq!(
        ring.slots_owned(&id("b")) + ring.slots_owned(&id("c")),
        mesh_core::SLOT_COUNT
    );
    // A silent standby is not live either.
    let mut m = with_nodes(&["a", "b"], &["s"], now);
    m.declare_down(&id("a"), "test", now + SUSPECT);
    assert_eq!(state(&m, "s"), NodeState::Standby);
    assert_eq!(m.ring().slots_owned(&id("b")), mesh_core::SLOT_COUNT);
}

#[test]
fn a_node_without_slots_goes_down_without_a_new_epoch() {
    let now = Instant::now();
    let mut m = with_nodes(&["a"], &["s"], now);
    m.declare_down(&id("s"), "test", now);
    let effects = m.take_effects();
    assert!(effects.published.is_empty());
    assert!(effects.changed);
    assert_eq!(state(&m, "s"), NodeState::Down);
    m.declare_down(&id("nobody"), "test", now);
    assert!(!m.take_effects().changed);
}

#[test]
fn the_last_active_node_down_leaves_an_empty_ring() {
    let now = Instant::now();
    let mut m = with_nodes(&["a"], &[], now);
    m.declare_down(&id("a"), "test", now);
    assert!(m.ring().nodes().is_empty());
    assert_eq!(
        m.history()[0].moves,
        [(Some(id("a")), None, mesh_core::SLOT_COUNT)]
    );
}

#[test]
fn with_no_active_node_left_a_registering_standby_serves_every_slot() {
    let now = Instant::now();
    let mut m = with_nodes(&["a", "b"], &[], now);
    m.declare_down(&id("a"), "test", now);
    m.declare_down(&id("b"), "test", now);
    assert!(m.ring().nodes().is_empty());
    // Both come back as the lease client does after a revocation: as standbys.
    m.register(id("a"), "a:1".into(), 0, true, now).unwrap();
    m.register(id("b"), "b:1".into(), 0, true, now).unwrap();
    assert_eq!(state(&m, "a"), NodeState::Active, "the first one serves");
    assert_eq!(m.ring().slots_owned(&id("a")), mesh_core::SLOT_COUNT);
    assert_eq!(state(&m, "b"), NodeState::Standby, "the next one waits");
}

#[test]
fn a_standby_registering_on_a_ring_that_never_had_an_owner_waits() {
    let now = Instant::now();
    let mut m = with_nodes(&[], &[], now);
    m.register(id("s"), "s:1".into(), 0, true, now).unwrap();
    assert_eq!(state(&m, "s"), NodeState::Standby);
    assert!(m.ring().nodes().is_empty());
}

#[test]
fn the_history_keeps_the_newest_epochs() {
    let now = Instant::now();
    let mut m = Membership::new(SUSPECT, 2);
    for n in ["a", "b", "c"] {
        m.register(id(n), format!("{n}:1"), 0, false, now).unwrap();
    }
    let epochs: Vec<u64> = m.history().iter().map(|e| e.epoch).collect();
    assert_eq!(epochs, [3, 2]);
}

#[test]
fn the_saved_state_resumes_the_same_ring_and_members() {
    let now = Instant::now();
    let mut m = with_nodes(&["a", "b"], &["s"], now);
    m.declare_down(&id("b"), "test", now);
    let saved = m.saved();
    let later = now + Duration::from_secs(60);
    let resumed = Membership::resume(&saved, later, SUSPECT, 50).unwrap();
    assert_eq!(resumed.ring(), m.ring());
    assert_eq!(resumed.members(), m.members());
    assert_eq!(resumed.saved(), saved);
    // Everyone gets one suspicion period from the resumption.
    assert!(
        resumed
            .views(later)
            .iter()
            .all(|v| v.since_heartbeat == Duration::ZERO)
    );
    assert!(resumed.history().is_empty());
    let mut broken = saved.clone();
    broken.slot_owner.pop();
    assert!(Membership::resume(&broken, later, SUSPECT, 50).is_err());
}

#[test]
fn a_new_history_gets_its_own_generation_and_a_resumed_one_keeps_it() {
    let now = Instant::now();
    let (a, b) = (with_nodes(&["a"], &[], now), with_nodes(&["a"], &[], now));
    let generation = a.ring().generation();
    assert_ne!(generation, 0);
    assert_ne!(
        generation,
        b.ring().generation(),
        "two fresh starts, two histories"
    );
    let resumed = Membership::resume(&a.saved(), now, SUSPECT, 50).unwrap();
    assert_eq!(resumed.ring().generation(), generation);
    // State saved by an older ring manager (no generation) gets one, and the epochs go on.
    let mut old = a.saved();
    old.generation = 0;
    let resumed = Membership::resume(&old, now, SUSPECT, 50).unwrap();
    assert_ne!(resumed.ring().generation(), 0);
    assert_eq!(resumed.ring().epoch(), a.ring().epoch());
    assert_eq!(resumed.saved().generation, resumed.ring().generation());
}

/// [`with_nodes`] with replication factor `factor`: every ring it publishes has `factor - 1`
/// followers per slot.
pub(crate) fn replicated(
    active: &[&str],
    standby: &[&str],
    factor: usize,
    now: Instant,
) -> Membership {
    let mut m = Membership::new(SUSPECT, 50).with_replication_factor(factor);
    for (i, n) in active.iter().enumerate() {
        m.register(id(n), format!("{n}:1"), i as u32, false, now)
            .unwrap();
    }
    for n in standby {
        m.register(id(n), format!("{n}:1"), 0, true, now).unwrap();
    }
    m.take_effects();
    m
}

/// Checks that every slot of `ring` has `min(factor - 1, nodes - 1)` distinct followers, none
/// its owner, and, with one follower per slot, each owner's slots spread evenly over the other
/// nodes. (With more, `Ring::with_followers` keeps a slot's old followers before a new node
/// gets a place, so a node that joins follows less than its share: not checked.)
pub(crate) fn assert_followers(ring: &Ring, factor: usize) {
    let n = ring.nodes().len();
    let want = factor.saturating_sub(1).min(n.saturating_sub(1));
    let mut pairs: BTreeMap<(NodeId, NodeId), usize> = BTreeMap::new();
    for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
        let owner = &ring.owner(s).unwrap().id;
        let followers: Vec<&NodeId> = ring.followers(s).map(|f| &f.id).collect();
        assert_eq!(followers.len(), want, "slot {s} of {ring:?}");
        assert!(
            !followers.contains(&owner),
            "slot {s}: its owner follows it"
        );
        let mut distinct = followers.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            followers.len(),
            "slot {s}: a follower twice"
        );
        for f in followers {
            *pairs.entry((owner.clone(), f.clone())).or_default() += 1;
        }
    }
    if want == 0 {
        assert!(!ring.is_replicated());
        return;
    }
    if want > 1 {
        return;
    }
    for owner in ring.nodes() {
        let owned = ring.slots_owned(&owner.id);
        let per: Vec<usize> = ring
            .nodes()
            .iter()
            .filter(|o| o.id != owner.id)
            .map(|o| {
                pairs
                    .get(&(owner.id.clone(), o.id.clone()))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        let share = (owned * want).div_ceil(n - 1);
        assert!(
            per.iter().all(|&p| p <= share),
            "{}'s {owned} slots followed unevenly: {per:?}",
            owner.id
        );
    }
}

#[test]
fn every_published_ring_has_factor_minus_one_followers_per_slot_and_none_with_factor_one() {
    let now = Instant::now();
    for factor in [1, 2, 3] {
        let mut m = Membership::new(SUSPECT, 50).with_replication_factor(factor);
        let mut published = Vec::new();
        for n in ["a", "b", "c", "d"] {
            m.register(id(n), format!("{n}:1"), 0, false, now).unwrap();
            published.extend(m.take_effects().published);
        }
        m.register(id("s"), "s:1".into(), 0, true, now).unwrap();
        m.declare_down(&id("b"), "test", now);
        published.extend(m.take_effects().published);
        m.drain(&id("c")).unwrap();
        published.extend(m.take_effects().published);
        assert_eq!(published.len(), 6, "factor {factor}");
        for ring in &published {
            assert_followers(ring, factor);
            assert_eq!(ring.is_replicated(), factor > 1 && ring.nodes().len() > 1);
        }
    }
}

#[test]
fn declare_down_promotes_each_slot_to_its_first_follower_evenly_and_the_standby_follows() {
    let now = Instant::now();
    let mut m = replicated(&["a", "b", "c"], &["s"], 2, now);
    let before = m.ring().clone();
    assert!(before.is_replicated());
    m.declare_down(&id("a"), "lease lost and probe failed", now);
    let after = m.ring().clone();
    assert_eq!(after.epoch(), before.epoch() + 1);
    assert!(after.handoffs().is_empty(), "a dead node hands nothing off");
    let mut gained: BTreeMap<NodeId, usize> = BTreeMap::new();
    for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
        if before.owns(&id("a"), s) {
            let heir = before.followers(s).next().unwrap();
            assert_eq!(
                after.owner(s),
                Some(heir),
                "slot {s} goes to its first follower"
            );
            *gained.entry(heir.id.clone()).or_default() += 1;
        } else {
            assert_eq!(after.owner(s), before.owner(s), "slot {s} stays");
        }
    }
    let (b, c) = (gained[&id("b")], gained[&id("c")]);
    assert_eq!(b + c, before.slots_owned(&id("a")));
    assert!(b.abs_diff(c) <= 1, "spread evenly: b {b}, c {c}");
    // The standby joins the ring owning nothing, to receive follower places.
    assert!(after.nodes().iter().any(|n| n.id == id("s")));
    assert_eq!(after.slots_owned(&id("s")), 0);
    assert!(after.slots_followed(&id("s")) > 0);
    assert_followers(&after, 2);
    assert_eq!(state(&m, "s"), NodeState::Joining);
    assert_eq!(state(&m, "a"), NodeState::Down);
    assert_eq!(
        m.history()[0].cause,
        "a down (lease lost and probe failed); its slots promoted to their followers; standby s \
         joins as a follower"
    );
}

#[test]
fn without_a_standby_declare_down_still_promotes_and_a_follower_only_node_leaves_the_ring() {
    let now = Instant::now();
    let mut m = replicated(&["a", "b", "c"], &[], 2, now);
    let before = m.ring().clone();
    m.declare_down(&id("b"), "test", now);
    let after = m.ring().clone();
    for s in 0..mesh_core::SLOT_COUNT as mesh_core::Slot {
        if before.owns(&id("b"), s) {
            assert_eq!(after.owner(s), before.followers(s).next());
        }
    }
    assert_followers(&after, 2);
    // A node on the ring that owns nothing (a follower still joining) that dies leaves it.
    let mut m = replicated(&["a", "b"], &["s"], 2, now);
    m.add(Some(&id("s")), now).unwrap();
    let with_s = m.ring().clone();
    assert_eq!(with_s.slots_owned(&id("s")), 0);
    m.take_effects();
    m.declare_down(&id("s"), "test", now);
    assert_eq!(m.take_effects().published.len(), 1);
    assert!(m.ring().nodes().iter().all(|n| n.id != id("s")));
    assert_followers(m.ring(), 2);
}

#[test]
fn replication_progress_is_kept_per_member_and_a_stale_epoch_does_not_count() {
    let now = Instant::now();
    let mut m = replicated(&["a"], &["s"], 2, now);
    let ring = m.add(Some(&id("s")), now).unwrap();
    let join_epoch = ring.epoch();
    assert_eq!(state(&m, "s"), NodeState::Joining);
    assert_eq!(ring.slots_followed(&id("s")), mesh_core::SLOT_COUNT);
    assert!(!m.ready_to_lead(&id("s")), "nothing reported yet");
    // Caught up, but counted in an older ring: unknown.
    m.report_progress(&id("s"), 2, 0, join_epoch - 1);
    assert!(!m.ready_to_lead(&id("s")));
    assert!(m.lead_followed(&id("s")).is_none());
    m.report_progress(&id("s"), 2, 17, join_epoch);
    let view = m.views(now).into_iter().find(|v| v.id == id("s")).unwrap();
    assert_eq!((view.catching_up, view.catching_up_epoch), (17, join_epoch));
    assert!(!m.ready_to_lead(&id("s")), "still filling");
    m.report_progress(&id("s"), 99, 0, join_epoch);
    assert!(!m.ready_to_lead(&id("s")), "another incarnation's report");
    m.report_progress(&id("s"), 2, 0, join_epoch);
    assert!(m.ready_to_lead(&id("s")));
    m.take_effects();
    let led = m.lead_followed(&id("s")).unwrap();
    assert_eq!(led.epoch(), join_epoch + 1);
    assert_eq!(led.slots_owned(&id("s")), mesh_core::SLOT_COUNT / 2);
    assert_eq!(
        led.handoffs(),
        [mesh_core::Handoff {
            from: id("a"),
            to: id("s")
        }]
    );
    assert_eq!(state(&m, "s"), NodeState::Active);
    assert_followers(&led, 2);
    assert!(m.take_effects().changed);
    assert!(!m.ready_to_lead(&id("s")), "once");
}

#[test]
fn a_resumed_ring_keeps_its_followers() {
    let now = Instant::now();
    let mut m = replicated(&["a", "b", "c"], &["s"], 2, now);
    m.declare_down(&id("b"), "test", now);
    let saved = m.saved();
    assert!(saved.slot_followers.iter().any(|f| !f.is_empty()));
    let resumed = Membership::resume(&saved, now, SUSPECT, 50)
        .unwrap()
        .with_replication_factor(2);
    assert!(resumed.ring().same_assignment(m.ring()));
    assert!(resumed.ring().is_replicated());
    assert_eq!(resumed.saved(), saved);
    assert_eq!(state(&resumed, "s"), NodeState::Joining);
}
