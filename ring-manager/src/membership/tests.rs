//! Unit tests of the membership state machine, and the helpers the operations' and the
//! monitor's tests share.

use super::*;

pub(crate) const SUSPECT: Duration = Duration::from_millis(500);

pub(crate) fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// A membership with `active` active nodes and `standby` standbys, registered at `now`,
/// its effects taken.
pub(crate) fn with_nodes(active: &[&str], standby: &[&str], now: Instant) -> Membership {
    let mut m = Membership::new(SUSPECT, 50);
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
