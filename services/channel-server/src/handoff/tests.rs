//! Unit tests of handoffs: warming on gained slots, who sends what to whom, and a moved
//! channel's history, trim point and clock arriving whole at its new owner.

use mesh_core::{ChannelEvent, ChannelId, EventBody, Ts, UserId, slot_of};

use super::*;
use crate::metrics::Metrics;
use crate::shards::{Shards, StreamReply};
use crate::store::Limits;

/// Replies nobody reads: these tests open no gateway stream.
#[derive(Debug, Clone)]
struct Unread;

impl StreamReply for Unread {
    fn event(_: &ChannelEvent) -> Self {
        Unread
    }

    fn subscribed(_: &ChannelId, _: Option<Ts>, _: Option<Ts>) -> Self {
        Unread
    }

    fn gap(_: &ChannelId, _: Ts) -> Self {
        Unread
    }

    fn refused(_: &ChannelId, _: u64, _: &str) -> Self {
        Unread
    }
}

/// A clock that stands still: only a carried channel clock keeps a new owner's ts ahead.
fn still() -> u64 {
    1
}

fn node(id: &str) -> RingNode {
    RingNode {
        id: NodeId::new(id).unwrap(),
        addr: format!("{id}:1"),
    }
}

/// Two rings: cs-1 and cs-2, then cs-3 joins; with the handoffs of a planned move if `planned`.
fn rings(planned: bool) -> (Ring, Ring) {
    let first = Ring::empty().rebalanced(&[node("cs-1"), node("cs-2")]);
    let mut second = first.rebalanced(&[node("cs-1"), node("cs-2"), node("cs-3")]);
    if planned {
        let moves = second.moves_from(&first);
        second = second.with_handoffs(moves);
    }
    (first, second)
}

/// Slots `from` owns in `first` and cs-3 in `second`.
fn moved(first: &Ring, second: &Ring, from: &str) -> Vec<Slot> {
    let (from, to) = (node(from).id, node("cs-3").id);
    (0..SLOT_COUNT as Slot)
        .filter(|&s| first.owns(&from, s) && second.owns(&to, s))
        .collect()
}

/// A channel whose slot moves from cs-1 to cs-3.
fn moved_channel(first: &Ring, second: &Ring) -> ChannelId {
    let slots = moved(first, second, "cs-1");
    (0..100_000)
        .map(|i| ChannelId::new(&format!("C{i}")).unwrap())
        .find(|c| slots.contains(&slot_of(c)))
        .unwrap()
}

#[test]
fn a_gained_slot_waits_for_its_handoff_until_it_arrives() {
    let (first, second) = rings(true);
    let slot = moved(&first, &second, "cs-1")[0];
    let mut warming = Warming::default();
    let now = Instant::now();
    let unknown = warming.gain(
        &first,
        &second,
        &node("cs-3").id,
        now + WARMUP_TIMEOUT,
        |_| false,
    );
    assert!(unknown.is_empty(), "every gained slot comes with a handoff");
    assert_eq!(warming.waiting_for(slot), Some(node("cs-1").id));
    warming.received(&node("cs-1").id, 2);
    assert_eq!(warming.waiting_for(slot), None);
}

#[test]
fn a_handoff_that_beats_the_ring_is_not_waited_for() {
    let (first, second) = rings(true);
    let mut warming = Warming::default();
    warming.received(&node("cs-1").id, 2);
    let now = Instant::now();
    warming.gain(
        &first,
        &second,
        &node("cs-3").id,
        now + WARMUP_TIMEOUT,
        |_| false,
    );
    for slot in moved(&first, &second, "cs-1") {
        assert_eq!(warming.waiting_for(slot), None);
    }
    let from_two = moved(&first, &second, "cs-2")[0];
    assert_eq!(
        warming.waiting_for(from_two),
        Some(node("cs-2").id),
        "a handoff of another epoch or node does not count"
    );
}

#[test]
fn a_late_handoff_keeps_its_slots_waiting_until_they_are_released() {
    let (first, second) = rings(true);
    let mut slots = moved(&first, &second, "cs-1");
    slots.extend(moved(&first, &second, "cs-2"));
    slots.sort_unstable();
    let mut warming = Warming::default();
    let deadline = Instant::now();
    warming.gain(&first, &second, &node("cs-3").id, deadline, |_| false);
    assert_eq!(warming.next_deadline(), Some(deadline));
    assert!(warming.due(deadline - Duration::from_millis(1)).is_empty());
    let due = warming.due(deadline);
    assert_eq!(due, slots, "every slot of every late sender");
    assert_eq!(
        warming.waiting_for(slots[0]),
        Some(node("cs-1").id),
        "still waiting: its history floor is set before it serves"
    );
    warming.release(&due);
    assert_eq!(warming.waiting_for(slots[0]), None);
    assert_eq!(warming.next_deadline(), None);
}

#[test]
fn an_epoch_is_handed_off_only_once_every_handoff_up_to_it_is_confirmed() {
    let mut progress = Progress::default();
    progress.followed(4, 0);
    assert_eq!(progress.handed_off(), 4);
    progress.followed(5, 2);
    assert_eq!(progress.handed_off(), 4);
    progress.confirmed(5);
    progress.followed(6, 0);
    assert_eq!(
        progress.handed_off(),
        4,
        "one of epoch 5's handoffs is unconfirmed"
    );
    progress.followed(7, 1);
    progress.confirmed(7);
    assert_eq!(
        progress.handed_off(),
        4,
        "a later epoch does not cover an earlier one"
    );
    progress.confirmed(5);
    assert_eq!(progress.handed_off(), 7);
}

#[test]
fn an_abandoned_handoff_holds_progress_back_until_a_later_epoch_is_confirmed_whole() {
    let mut progress = Progress::default();
    progress.followed(3, 2);
    progress.confirmed(3);
    progress.abandoned(3);
    progress.followed(4, 0);
    assert_eq!(
        progress.handed_off(),
        2,
        "a drain in epoch 3 never completes"
    );
    // A later drain whose handoffs all arrive completes.
    progress.followed(9, 1);
    assert_eq!(progress.handed_off(), 2);
    progress.confirmed(9);
    assert_eq!(progress.handed_off(), 9);
}

#[test]
fn slots_taken_over_from_a_dead_node_are_unknown_not_waited_for() {
    let (first, second) = rings(false);
    let mut warming = Warming::default();
    let now = Instant::now();
    let mut unknown = warming.gain(
        &first,
        &second,
        &node("cs-3").id,
        now + WARMUP_TIMEOUT,
        |_| false,
    );
    let mut gained = [
        moved(&first, &second, "cs-1"),
        moved(&first, &second, "cs-2"),
    ]
    .concat();
    unknown.sort_unstable();
    gained.sort_unstable();
    assert_eq!(unknown, gained);
    assert!(gained.iter().all(|&s| warming.waiting_for(s).is_none()));
}

#[test]
fn only_a_named_handoff_sends_and_each_names_its_new_owner() {
    let (first, planned) = rings(true);
    let (_, unplanned) = rings(false);
    let one = node("cs-1").id;
    let slot = moved(&first, &planned, "cs-1")[0];
    let kept = (0..SLOT_COUNT as Slot)
        .find(|&s| planned.owns(&one, s))
        .unwrap();
    assert_eq!(new_owner(&first, &planned, &one, slot), Some(&node("cs-3")));
    assert_eq!(new_owner(&first, &planned, &one, kept), None);
    assert_eq!(new_owner(&first, &unplanned, &one, slot), None);
    let sends = outgoing(
        &planned,
        &one,
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
    );
    assert_eq!(sends.len(), 1);
    assert_eq!(
        (&sends[0].to, sends[0].addr.as_str()),
        (&node("cs-3").id, "cs-3:1")
    );
    assert!(
        sends[0].snapshots.is_empty(),
        "sent even empty: cs-3 waits for it"
    );
    assert!(
        outgoing(
            &unplanned,
            &one,
            HashMap::new(),
            HashMap::new(),
            HashMap::new()
        )
        .is_empty()
    );
}

#[test]
fn a_moved_channel_carries_its_history_trim_point_and_clock_to_its_new_owner() {
    let (first, second) = rings(true);
    let channel = moved_channel(&first, &second);
    let limits = Limits {
        history_events: 3,
        ..Limits::default()
    };
    let metrics = || Metrics::new(&mesh_telemetry::Telemetry::default());
    let old: Shards<Unread> = Shards::new(limits, metrics(), still);
    let new: Shards<Unread> = Shards::new(limits, metrics(), still);
    let publish = |shards: &Shards<Unread>| {
        let mut event = ChannelEvent {
            channel: channel.clone(),
            ts: None,
            body: EventBody::MemberLeft {
                user: UserId::new("U1").unwrap(),
            },
            origin: None,
        };
        shards.publish(&mut event, || Ok(())).unwrap();
        event.ts.unwrap()
    };
    let ts: Vec<Ts> = (0..5).map(|_| publish(&old)).collect();

    let mut sends = old.follow_ring(&first, &second, &node("cs-1").id, &[]);
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].to, node("cs-3").id);
    let snapshot = sends[0].snapshots.pop().unwrap();
    assert!(sends[0].snapshots.is_empty());
    assert_eq!(snapshot.channel, channel);
    assert_eq!(snapshot.last_ts, ts[4]);
    assert_eq!(snapshot.trimmed, ts[1]);
    assert_eq!(
        snapshot.events.iter().map(|e| e.ts).collect::<Vec<_>>(),
        &ts[2..]
    );
    assert_eq!(old.counts().channels, 0, "the old owner keeps nothing");
    assert!(
        sends[0].floors.is_empty(),
        "a channel handed over whole leaves no floor: its history is complete"
    );

    new.absorb(snapshot);
    let page = new.history(&channel, None, 10);
    assert_eq!(
        page.events.iter().map(|e| e.ts).collect::<Vec<_>>(),
        &ts[2..]
    );
    assert_eq!(page.complete_after, ts[1]);
    assert!(
        publish(&new) > ts[4],
        "the clock continues after the old owner's"
    );
}

#[test]
fn a_node_expects_handoffs_only_from_the_senders_its_rings_named() {
    let (first, second) = rings(true);
    let mut warming = Warming::default();
    let (one, three) = (node("cs-1").id, node("cs-3").id);
    warming.gain(&first, &second, &three, Instant::now(), |_| false);
    let epoch = second.epoch();
    assert!(warming.expected(&one, epoch));
    assert!(warming.expected(&node("cs-2").id, epoch));
    assert!(!warming.expected(&one, epoch + 1), "another epoch");
    assert!(!warming.expected(&three, epoch), "itself");
    // cs-1 gains nothing here: it expects no handoff at all.
    let mut other = Warming::default();
    other.gain(&first, &second, &one, Instant::now(), |_| false);
    assert!(!other.expected(&node("cs-2").id, epoch));
    assert!(
        other.named_sender(&node("cs-2").id, epoch),
        "but knows cs-2 was named to send: cs-2 may forward it if cs-3 dies"
    );
    assert!(!other.named_sender(&three, epoch));
    // Unplanned moves (a takeover) name no handoff.
    let (first, second) = rings(false);
    let mut taken = Warming::default();
    taken.gain(&first, &second, &three, Instant::now(), |_| false);
    assert!(!taken.expected(&one, second.epoch()));
}

#[test]
fn a_moved_slot_carries_its_floor_to_its_new_owner() {
    let (first, second) = rings(true);
    let channel = moved_channel(&first, &second);
    let metrics = || Metrics::new(&mesh_telemetry::Telemetry::default());
    let old: Shards<Unread> = Shards::new(Limits::default(), metrics(), still);
    let new: Shards<Unread> = Shards::new(Limits::default(), metrics(), still);
    // The old owner lost the slot's history before (an eviction, a takeover): its floor.
    old.mark_unknown(&[slot_of(&channel)]);
    let floor = old.history(&channel, None, 1).complete_after;
    assert_ne!(floor, Ts::default());
    let sends = old.follow_ring(&first, &second, &node("cs-1").id, &[]);
    assert_eq!(sends[0].floors, [(slot_of(&channel), floor)]);
    for &(slot, ts) in &sends[0].floors {
        new.absorb_floor(slot, ts);
    }
    assert_eq!(
        new.history(&channel, None, 1).complete_after,
        floor,
        "the new owner's history does not claim what the old one lost"
    );
}

#[test]
fn a_slot_taken_over_from_a_dead_node_settles_before_it_takes_publishes() {
    let (first, second) = rings(false);
    let mut warming = Warming::default();
    let now = Instant::now();
    let unknown = warming.gain(
        &first,
        &second,
        &node("cs-3").id,
        now + WARMUP_TIMEOUT,
        |_| false,
    );
    let until = now + TAKEOVER_SETTLE;
    warming.settle(&first, &unknown, until);
    let from_one = moved(&first, &second, "cs-1")[0];
    assert_eq!(warming.settling(from_one, "C1", now), Some(node("cs-1").id));
    assert_eq!(
        warming.waiting_for(from_one),
        None,
        "subscriptions are served"
    );
    // A channel a gateway resubscribed to takes publishes at once; the others wait.
    warming.resubscribed("C1", from_one);
    assert_eq!(warming.settling(from_one, "C1", now), None);
    assert_eq!(warming.settling(from_one, "C2", now), Some(node("cs-1").id));
    assert_eq!(warming.settling(from_one, "C2", until), None);
    assert!(warming.resubscribed.is_empty(), "forgotten with the settle");
    // A subscription to a slot that does not settle changes nothing.
    warming.resubscribed("C1", from_one);
    assert!(warming.resubscribed.is_empty());
    // A planned move's slots wait for their handoff instead.
    let (first, second) = rings(true);
    let mut planned = Warming::default();
    let unknown = planned.gain(
        &first,
        &second,
        &node("cs-3").id,
        now + WARMUP_TIMEOUT,
        |_| false,
    );
    planned.settle(&first, &unknown, until);
    assert_eq!(planned.settling(from_one, "C1", now), None);
}

#[test]
fn slots_an_earlier_incarnation_owned_are_gained_again_and_promoted_ones_serve_at_once() {
    // A restarted cs-1 starts from a ring that still gives its earlier incarnation slots; the
    // next ring keeps some of them with it, with no handoff: nothing of them is held here.
    let (first, second) = rings(false);
    let me = node("cs-1").id;
    let kept: Vec<Slot> = (0..SLOT_COUNT as Slot)
        .filter(|&s| first.owns(&me, s) && second.owns(&me, s))
        .collect();
    assert!(!kept.is_empty());
    let mut fresh = Warming::default();
    fresh.not_held(&kept);
    let unknown = fresh.gain(&first, &second, &me, Instant::now(), |_| false);
    assert_eq!(unknown, kept, "gained as from a node that died");
    // Only the first ring after the start: a later one keeps what it holds.
    let third = second.rebalanced(&[node("cs-1"), node("cs-2"), node("cs-3")]);
    assert!(
        fresh
            .gain(&second, &third, &me, Instant::now(), |_| false)
            .is_empty()
    );
    // A slot gained as a follower in sync is promoted: neither waited for nor unknown.
    let (first, second) = rings(false);
    let mut warming = Warming::default();
    let gained = moved(&first, &second, "cs-1");
    let unknown = warming.gain(&first, &second, &node("cs-3").id, Instant::now(), |s| {
        gained.contains(&s)
    });
    assert!(unknown.iter().all(|s| !gained.contains(s)));
    assert!(gained.iter().all(|&s| warming.waiting_for(s).is_none()));
}
