//! Unit tests of the shards: subscriptions, publish order and fan-out, falling behind, history
//! bounds, and following a ring that moves channels away.

use std::sync::Mutex;

use crate::members::{Report, Summary};
use std::sync::atomic::AtomicU64;

use mesh_core::{EventBody, RingNode, SLOT_COUNT, UserId};
use tokio::sync::mpsc::error::TryRecvError;

use super::*;

/// A reply as the tests read it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    Event(ChannelEvent),
    Subscribed(ChannelId, Option<Ts>),
    Refused(ChannelId, u64, String),
    Gap(ChannelId, Ts),
}

impl StreamReply for Test {
    fn event(event: &ChannelEvent) -> Self {
        Test::Event(event.clone())
    }

    fn subscribed(channel: &ChannelId, head: Option<Ts>, _: Option<Ts>) -> Self {
        Test::Subscribed(channel.clone(), head)
    }

    fn gap(channel: &ChannelId, complete_after: Ts) -> Self {
        Test::Gap(channel.clone(), complete_after)
    }

    fn refused(channel: &ChannelId, epoch: u64, reason: &str) -> Self {
        Test::Refused(channel.clone(), epoch, reason.to_string())
    }
}

/// A clock that stands still at one microsecond past the epoch: every ts comes from the
/// channel's own clock, so they are exact.
fn frozen() -> u64 {
    1
}

static TICKS: AtomicU64 = AtomicU64::new(1_000);

/// A clock that moves a microsecond per reading.
fn ticking() -> u64 {
    TICKS.fetch_add(1, Ordering::Relaxed)
}

fn shards(limits: Limits) -> (Shards<Test>, Metrics) {
    let metrics = Metrics::new(&mesh_telemetry::Telemetry::default());
    (Shards::new(limits, metrics.clone(), frozen), metrics)
}

fn c(s: &str) -> ChannelId {
    ChannelId::new(s).unwrap()
}

fn node(id: &str) -> RingNode {
    RingNode {
        id: NodeId::new(id).unwrap(),
        addr: format!("{id}:1"),
    }
}

fn message(channel: &ChannelId, text: &str) -> ChannelEvent {
    ChannelEvent {
        channel: channel.clone(),
        ts: None,
        body: EventBody::Message {
            user: UserId::new("U1").unwrap(),
            text: text.into(),
            team: None,
        },
        origin: None,
    }
}

fn publish(shards: &Shards<Test>, channel: &ChannelId, text: &str) -> Ts {
    let mut event = message(channel, text);
    shards.publish(&mut event, || Ok(())).unwrap();
    event.ts.unwrap()
}

fn drain(rx: &mut mpsc::Receiver<Test>) -> Vec<Test> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn texts(replies: &[Test]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| match r {
            Test::Event(ChannelEvent {
                body: EventBody::Message { text, .. },
                ..
            }) => Some(text.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn subscribed_comes_first_then_every_event_in_ts_order() {
    let (shards, metrics) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let before = publish(&shards, &c("C1"), "before");
    let (mut stream, mut rx) = shards.open_stream("gw", 16, &cancel);
    shards.subscribe(&mut stream, &c("C1"), None, &[]);
    let ts: Vec<Ts> = (0..5)
        .map(|i| publish(&shards, &c("C1"), &format!("m{i}")))
        .collect();
    publish(&shards, &c("C2"), "elsewhere");
    let replies = drain(&mut rx);
    assert_eq!(replies[0], Test::Subscribed(c("C1"), Some(before)));
    let got: Vec<Ts> = replies[1..]
        .iter()
        .map(|r| match r {
            Test::Event(e) => e.ts.unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, ts);
    assert!(ts.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(metrics.fanned_out.get(), 5);
}

#[test]
fn subscribing_twice_delivers_once_and_unsubscribing_stops_delivery() {
    let (shards, _) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let (mut stream, mut rx) = shards.open_stream("gw", 16, &cancel);
    shards.subscribe(&mut stream, &c("C1"), None, &[]);
    shards.subscribe(&mut stream, &c("C1"), None, &[]);
    assert_eq!(shards.counts().subscriptions, 1);
    publish(&shards, &c("C1"), "once");
    let replies = drain(&mut rx);
    assert_eq!(replies.len(), 3, "two Subscribed, one event: {replies:?}");
    assert_eq!(texts(&replies), ["once"]);
    shards.unsubscribe(&mut stream, &c("C1"));
    shards.unsubscribe(&mut stream, &c("C1"));
    publish(&shards, &c("C1"), "unheard");
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(shards.counts().subscriptions, 0);
}

#[test]
fn a_transient_event_is_fanned_out_but_not_kept() {
    let (shards, _) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let (mut stream, mut rx) = shards.open_stream("gw", 16, &cancel);
    shards.subscribe(&mut stream, &c("C1"), None, &[]);
    let mut typing = ChannelEvent {
        body: EventBody::Typing {
            user: UserId::new("U1").unwrap(),
        },
        ..message(&c("C1"), "")
    };
    shards.publish(&mut typing, || Ok(())).unwrap();
    assert_eq!(typing.ts, None);
    assert_eq!(drain(&mut rx)[1], Test::Event(typing));
    assert!(shards.history(&c("C1"), None, 10).events.is_empty());
}

#[tokio::test]
async fn a_gateway_that_falls_behind_loses_its_stream_not_the_others() {
    let (shards, metrics) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let (mut slow, _slow_rx) = shards.open_stream("gw", 2, &cancel);
    let (mut fast, mut fast_rx) = shards.open_stream("gw", 16, &cancel);
    shards.subscribe(&mut slow, &c("C1"), None, &[]);
    shards.subscribe(&mut fast, &c("C1"), None, &[]);
    for i in 0..3 {
        publish(&shards, &c("C1"), &format!("m{i}"));
    }
    assert_eq!(
        slow.end().clone().ended().await,
        ServeError::FellBehind,
        "the first reason given is the one the gateway reads"
    );
    assert_eq!(metrics.streams_fallen_behind.get(), 1);
    assert_eq!(texts(&drain(&mut fast_rx)), ["m0", "m1", "m2"]);
    assert_eq!(shards.counts().subscriptions, 1);
}

#[tokio::test]
async fn a_reply_that_does_not_fit_ends_the_stream() {
    let (shards, _) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let (mut stream, _rx) = shards.open_stream("gw", 1, &cancel);
    shards.subscribe(&mut stream, &c("C1"), None, &[]);
    shards.subscribe(&mut stream, &c("C2"), None, &[]);
    assert_eq!(
        stream.end().clone().ended().await,
        ServeError::FellBehindOnReply
    );
}

#[tokio::test]
async fn closing_a_stream_drops_its_subscriptions_and_shutdown_ends_the_others() {
    let (shards, _) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let (mut closed, _closed_rx) = shards.open_stream("gw", 16, &cancel);
    let (open, _open_rx) = shards.open_stream("gw", 16, &cancel);
    shards.subscribe(&mut closed, &c("C1"), None, &[]);
    shards.subscribe(&mut closed, &c("C2"), None, &[]);
    let end = closed.end().clone();
    assert_eq!(shards.counts().streams, 2);
    shards.close_stream(closed);
    assert_eq!(end.ended().await, ServeError::StreamClosed);
    let counts = shards.counts();
    assert_eq!((counts.subscriptions, counts.streams), (0, 1));
    cancel.cancel();
    assert_eq!(open.end().clone().ended().await, ServeError::ShuttingDown);
}

#[test]
fn history_is_trimmed_to_its_bounds_and_says_where_it_is_complete() {
    let limits = Limits {
        history_events: 3,
        ..Limits::default()
    };
    let (shards, metrics) = shards(limits);
    assert!(shards.history(&c("C1"), None, 10).events.is_empty());
    let ts: Vec<Ts> = (0..5)
        .map(|i| publish(&shards, &c("C1"), &format!("m{i}")))
        .collect();
    let page = shards.history(&c("C1"), None, 10);
    assert_eq!(
        page.events.iter().map(|e| e.ts).collect::<Vec<_>>(),
        &ts[2..]
    );
    assert_eq!(page.complete_after, ts[1], "the newest ts trimmed");
    assert_eq!(page.oldest, Some(ts[2]));
    let first = shards.history(&c("C1"), Some(ts[2]), 1);
    assert_eq!((first.events[0].ts, first.has_more), (ts[3], true));
    let reads = |outcome| metrics.history_reads.with_label_values(&[outcome]).get();
    assert_eq!((reads("empty"), reads("hit")), (1, 2));
}

#[test]
fn history_limits_default_and_cap() {
    assert_eq!(history_limit(0), DEFAULT_HISTORY_LIMIT as usize);
    assert_eq!(history_limit(7), 7);
    assert_eq!(history_limit(u32::MAX), MAX_HISTORY_LIMIT as usize);
}

#[test]
fn a_lost_slot_is_dropped_and_its_gateways_told_it_moved() {
    let (one, two) = (node("cs-1"), node("cs-2"));
    let first = Ring::empty().rebalanced(std::slice::from_ref(&one));
    // cs-2 takes over without a handoff (as after a failure).
    let second = first.rebalanced(&[one.clone(), two.clone()]);
    let lost = (0..1000)
        .map(|i| c(&format!("C{i}")))
        .find(|ch| second.owns(&two.id, slot_of(ch)))
        .unwrap();
    let kept = (0..1000)
        .map(|i| c(&format!("C{i}")))
        .find(|ch| second.owns(&one.id, slot_of(ch)))
        .unwrap();
    let (shards, _) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let (mut stream, mut rx) = shards.open_stream("gw", 16, &cancel);
    for channel in [&lost, &kept] {
        publish(&shards, channel, "x");
        shards.subscribe(&mut stream, channel, None, &[]);
    }
    drain(&mut rx);
    let sends = shards.follow_ring(&first, &second, &one.id, &[]);
    assert!(sends.is_empty(), "no handoff named: nothing to send");
    assert_eq!(
        drain(&mut rx),
        [Test::Refused(lost.clone(), 2, "moved".into())]
    );
    assert_eq!(shards.counts().channels, 1);
    assert!(shards.history(&lost, None, 10).events.is_empty());
    assert_eq!(shards.history(&kept, None, 10).events.len(), 1);
    assert_eq!(shards.counts().subscriptions, 1);
}

#[test]
fn slots_known_lost_have_no_history_before_now() {
    let metrics = Metrics::new(&mesh_telemetry::Telemetry::default());
    let shards = Shards::<Test>::new(Limits::default(), metrics, ticking);
    let ring = Ring::empty().rebalanced(&[node("cs-1")]);
    let channel = c("C1");
    shards.follow_ring(&ring, &ring, &node("cs-1").id, &[slot_of(&channel)]);
    let page = shards.history(&channel, None, 10);
    assert!(page.complete_after >= Ts::from_micros(1_000));
    assert!(publish(&shards, &channel, "after") > page.complete_after);
    let other = (0..SLOT_COUNT)
        .map(|i| c(&format!("C{i}")))
        .find(|ch| slot_of(ch) != slot_of(&channel))
        .unwrap();
    assert_eq!(
        shards.history(&other, None, 10).complete_after,
        Ts::default()
    );
}

#[test]
fn a_publish_checked_before_a_ring_change_is_refused_under_the_lock_once_the_slot_moved() {
    let (shards, _) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let (mut stream, mut rx) = shards.open_stream("gw", 16, &cancel);
    shards.subscribe(&mut stream, &c("C1"), None, &[]);
    publish(&shards, &c("C1"), "before");
    // The caller's ownership check passed; then the ring moved the channel's slot to cs-2.
    let me = NodeId::new("cs-1").unwrap();
    let moved = Ring::empty().rebalanced(&[node("cs-2")]);
    let mut event = message(&c("C1"), "after the move");
    let refused = shards
        .publish(&mut event, || {
            crate::ownership::owns(&moved, &me, slot_of(&c("C1")))
        })
        .expect_err("the slot is cs-2's now");
    assert!(
        matches!(refused, ServeError::WrongOwner { ref owner, .. } if owner == "cs-2"),
        "{refused:?}"
    );
    // Neither stored nor acknowledged with a ts, nor fanned out.
    assert_eq!(event.ts, None);
    let history = shards.history(&c("C1"), None, 10);
    assert_eq!(history.events.len(), 1, "only the event before the move");
    assert_eq!(texts(&drain(&mut rx)), ["before"]);
}

#[test]
fn a_gateway_that_delivered_past_the_clock_raises_it_and_the_others_hear_a_gap() {
    let (shards, _) = shards(Limits::default());
    let cancel = CancellationToken::new();
    let (mut first, mut first_rx) = shards.open_stream("gw", 16, &cancel);
    let (mut second, mut second_rx) = shards.open_stream("gw", 16, &cancel);
    let channel = c("C1");
    let before = publish(&shards, &channel, "before");
    shards.subscribe(&mut first, &channel, Some(before), &[]);
    assert_eq!(
        drain(&mut first_rx),
        [Test::Subscribed(channel.clone(), Some(before))],
        "a gateway at this node's head moves no floor"
    );
    // Another gateway delivered up to here from an earlier owner whose clock was ahead.
    let delivered = Ts::from_micros(5_000_000);
    let floor = Ts::from_micros(5_000_001);
    shards.subscribe(&mut second, &channel, Some(delivered), &[]);
    assert_eq!(drain(&mut first_rx), [Test::Gap(channel.clone(), floor)]);
    assert_eq!(
        drain(&mut second_rx),
        [Test::Subscribed(channel.clone(), Some(before))]
    );
    assert_eq!(
        shards.history(&channel, None, 10).complete_after,
        floor,
        "a resume from before it hears history_gap"
    );
    let next = publish(&shards, &channel, "after");
    assert!(next > floor, "no ts a gateway would drop: {next:?}");
    shards.subscribe(&mut second, &channel, Some(delivered), &[]);
    drain(&mut second_rx);
    assert_eq!(texts(&drain(&mut first_rx)), ["after"], "no second gap");
}

#[test]
fn slots_marked_unknown_tell_their_subscribers_of_a_gap() {
    let metrics = Metrics::new(&mesh_telemetry::Telemetry::default());
    let shards = Shards::<Test>::new(Limits::default(), metrics, ticking);
    let cancel = CancellationToken::new();
    let (mut stream, mut rx) = shards.open_stream("gw", 16, &cancel);
    let channel = c("C1");
    shards.subscribe(&mut stream, &channel, None, &[]);
    drain(&mut rx);
    shards.mark_unknown(&[slot_of(&channel)]);
    let replies = drain(&mut rx);
    let floor = shards.history(&channel, None, 10).complete_after;
    assert!(floor >= Ts::from_micros(1_000));
    assert_eq!(replies, [Test::Gap(channel, floor)]);
}

/// A replicator that records what it was asked to send, each follower on a link numbered by
/// its position in the ring, and refuses everything once `full`.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<(NodeId, u64)>>,
    full: std::sync::atomic::AtomicBool,
}

impl Replicator for Recorder {
    fn replicate(
        &self,
        followers: &[&RingNode],
        entry: &Replicated,
    ) -> Result<Vec<(NodeId, LinkId)>, ServeError> {
        if self.full.load(Ordering::Relaxed) {
            return Err(ServeError::ReplicationBehind);
        }
        let links: Vec<(NodeId, LinkId)> = followers
            .iter()
            .map(|f| (f.id.clone(), link_of(&f.id)))
            .collect();
        let mut sent = self.sent.lock().unwrap();
        sent.extend(links.iter().map(|(id, _)| (id.clone(), entry.id)));
        Ok(links)
    }
}

/// The link number the [`Recorder`] gives a follower.
fn link_of(id: &NodeId) -> LinkId {
    id.as_str().trim_start_matches("cs-").parse().unwrap()
}

/// cs-1 owning every slot, each followed by cs-2 (and cs-3 when `three`).
fn replicated_ring(three: bool) -> Arc<Ring> {
    let mut members = vec![node("cs-1")];
    let one = Ring::empty().rebalanced(&members);
    members.push(node("cs-2"));
    if three {
        members.push(node("cs-3"));
    }
    // Followers for every slot of a ring where cs-1 owns all of them.
    let owners: Vec<u32> = vec![0; SLOT_COUNT];
    let followers = (0..SLOT_COUNT)
        .map(|_| (1..members.len() as u32).collect())
        .collect();
    let ring = Ring::from_replicated_parts(one.epoch() + 1, members, owners, followers).unwrap();
    Arc::new(ring)
}

fn begin(
    shards: &Shards<Test>,
    ring: &Arc<Ring>,
    recorder: &Recorder,
    channel: &ChannelId,
    text: &str,
    key: Option<&str>,
) -> (Published, ChannelEvent) {
    let mut event = message(channel, text);
    let published = shards
        .publish_once(&mut event, key, || Ok(ring.clone()), recorder)
        .unwrap();
    (published, event)
}

fn answer(published: Published) -> Option<Result<Ts, ServeError>> {
    match published {
        Published::Waiting { mut reply, .. } => reply.try_recv().ok(),
        Published::Done { .. } => panic!("stored without its followers"),
    }
}

#[test]
fn a_replicated_event_is_stored_delivered_and_answered_only_once_every_follower_has_it() {
    let (shards, _) = shards(Limits::default());
    let ring = replicated_ring(true);
    let recorder = Recorder::default();
    let cancel = CancellationToken::new();
    let (mut stream, mut rx) = shards.open_stream("gw", 16, &cancel);
    shards.subscribe(&mut stream, &c("C1"), None, &[]);
    drain(&mut rx);
    let (first, e1) = begin(&shards, &ring, &recorder, &c("C1"), "one", None);
    let (second, e2) = begin(&shards, &ring, &recorder, &c("C1"), "two", None);
    let (id1, id2) = {
        let sent = recorder.sent.lock().unwrap();
        assert_eq!(sent.len(), 4, "each event to cs-2 and cs-3: {sent:?}");
        (sent[0].1, sent[2].1)
    };
    let shard = usize::from(slot_of(&c("C1"))) % SHARDS;
    // Nothing visible yet: no delivery, no history, no answer.
    assert!(drain(&mut rx).is_empty());
    assert!(shards.history(&c("C1"), None, 10).events.is_empty());
    assert_eq!(shards.pending(), 2);
    // cs-2 acknowledges both, cs-3 only the second: still nothing, as the first waits.
    shards.acked(2, &[(shard, id1), (shard, id2)]);
    shards.acked(3, &[(shard, id2)]);
    assert!(
        drain(&mut rx).is_empty(),
        "the second waits behind the first"
    );
    // cs-3 acknowledges the first: both go, in order.
    shards.acked(3, &[(shard, id1)]);
    assert_eq!(texts(&drain(&mut rx)), ["one", "two"]);
    assert_eq!(answer(first), Some(Ok(e1.ts.unwrap())));
    assert_eq!(answer(second), Some(Ok(e2.ts.unwrap())));
    assert_eq!(shards.history(&c("C1"), None, 10).events.len(), 2);
    assert_eq!(shards.pending(), 0);
}

#[test]
fn a_refused_event_fails_and_the_ones_after_it_go_on() {
    let (shards, _) = shards(Limits::default());
    let ring = replicated_ring(false);
    let recorder = Recorder::default();
    let (first, _) = begin(&shards, &ring, &recorder, &c("C1"), "one", None);
    let (second, e2) = begin(&shards, &ring, &recorder, &c("C1"), "two", None);
    let ids: Vec<u64> = recorder.sent.lock().unwrap().iter().map(|s| s.1).collect();
    let shard = usize::from(slot_of(&c("C1"))) % SHARDS;
    shards.refused(&[(shard, ids[0])], "not_follower: fenced");
    assert_eq!(
        answer(first),
        Some(Err(ServeError::ReplicationRefused(
            "not_follower: fenced".into()
        )))
    );
    shards.acked(2, &[(shard, ids[1])]);
    assert_eq!(answer(second), Some(Ok(e2.ts.unwrap())));
    let history = shards.history(&c("C1"), None, 10);
    assert_eq!(
        texts(
            &history
                .events
                .into_iter()
                .map(|s| Test::Event(ChannelEvent {
                    channel: c("C1"),
                    ts: Some(s.ts),
                    body: s.body,
                    origin: None,
                }))
                .collect::<Vec<_>>()
        ),
        ["two"]
    );
}

#[test]
fn a_retry_while_the_first_waits_waits_for_it_and_gets_its_ts() {
    let (shards, _) = shards(Limits::default());
    let ring = replicated_ring(false);
    let recorder = Recorder::default();
    let (first, e1) = begin(&shards, &ring, &recorder, &c("C1"), "once", Some("k1"));
    let (retry, again) = begin(&shards, &ring, &recorder, &c("C1"), "once", Some("k1"));
    assert!(matches!(retry, Published::Waiting { fresh: false, .. }));
    assert_eq!(again.ts, e1.ts);
    assert_eq!(
        recorder.sent.lock().unwrap().len(),
        1,
        "sent to the follower once"
    );
    let id = recorder.sent.lock().unwrap()[0].1;
    shards.acked(2, &[(usize::from(slot_of(&c("C1"))) % SHARDS, id)]);
    assert_eq!(answer(first), Some(Ok(e1.ts.unwrap())));
    assert_eq!(answer(retry), Some(Ok(e1.ts.unwrap())));
    // Once stored, a retry is answered from the window.
    let (late, _) = begin(&shards, &ring, &recorder, &c("C1"), "once", Some("k1"));
    assert!(matches!(late, Published::Done { fresh: false }));
    assert_eq!(shards.history(&c("C1"), None, 10).events.len(), 1);
}

#[test]
fn a_retry_finds_its_first_among_thousands_waiting_and_a_failed_key_is_fresh_again() {
    let (shards, _) = shards(Limits::default());
    let ring = replicated_ring(false);
    let recorder = Recorder::default();
    let shard = usize::from(slot_of(&c("C1"))) % SHARDS;
    // A backlog: 3,000 keyed events wait for cs-2, and the same keys on another channel.
    let mut firsts = Vec::new();
    for n in 0..3000 {
        let key = format!("k{n}");
        firsts.push(begin(&shards, &ring, &recorder, &c("C1"), "m", Some(&key)));
    }
    let (_, other) = begin(&shards, &ring, &recorder, &c("C2"), "m", Some("k1500"));
    assert_eq!(shards.pending_keys(), 3001);
    // A retry of the 1,500th joins it: same ts, not sent again.
    let (retry, again) = begin(&shards, &ring, &recorder, &c("C1"), "m", Some("k1500"));
    assert!(matches!(retry, Published::Waiting { fresh: false, .. }));
    assert_eq!(again.ts, firsts[1500].1.ts);
    assert_ne!(again.ts, other.ts, "a key is the channel's own");
    let sent: Vec<u64> = recorder.sent.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(sent.len(), 3001, "the retry went to no follower");
    // The first is refused by the follower: it and its retry fail, and the key is free again.
    shards.refused(&[(shard, sent[0])], "not_follower: fenced");
    assert_eq!(
        shards.pending_keys(),
        3000,
        "the refused event's key is forgotten"
    );
    let (fresh, after) = begin(&shards, &ring, &recorder, &c("C1"), "m", Some("k0"));
    assert!(matches!(fresh, Published::Waiting { fresh: true, .. }));
    assert_ne!(after.ts, firsts[0].1.ts);
    // Everything acknowledged: every publish answered, no key left behind.
    // Sent in order: C1's 3,000, C2's one, then C1's fresh k0.
    let of_c2 = usize::from(slot_of(&c("C2"))) % SHARDS;
    let all: Vec<(usize, u64)> = recorder
        .sent
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(n, s)| (if n == 3000 { of_c2 } else { shard }, s.1))
        .collect();
    shards.acked(2, &all);
    assert_eq!(answer(retry), Some(Ok(firsts[1500].1.ts.unwrap())));
    assert_eq!(answer(fresh), Some(Ok(after.ts.unwrap())));
    assert_eq!(shards.pending(), 0);
    assert_eq!(shards.pending_keys(), 0);
}

#[test]
fn a_ring_change_sends_waiting_events_to_new_followers_and_fails_those_of_lost_slots() {
    let (shards, _) = shards(Limits::default());
    let me = NodeId::new("cs-1").unwrap();
    let ring = replicated_ring(false);
    let recorder = Recorder::default();
    let (waiting, e1) = begin(&shards, &ring, &recorder, &c("C1"), "one", None);
    // cs-2 died: cs-3 follows every slot now.
    let members = vec![node("cs-1"), node("cs-3")];
    let next = Ring::from_replicated_parts(
        ring.epoch() + 1,
        members.clone(),
        vec![0; SLOT_COUNT],
        vec![vec![1]; SLOT_COUNT],
    )
    .unwrap();
    shards.reroute(&next, &me, &recorder);
    let sent = recorder.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].0.as_str(), "cs-3");
    // An acknowledgement from the dropped follower counts for nothing; cs-3's does.
    let shard = usize::from(slot_of(&c("C1"))) % SHARDS;
    let mut waiting = match waiting {
        Published::Waiting { reply, .. } => reply,
        Published::Done { .. } => unreachable!(),
    };
    shards.acked(3, &[(shard, sent[0].1)]);
    assert_eq!(waiting.try_recv().ok(), Some(Ok(e1.ts.unwrap())));
    // A ring where the slot went to cs-3: the waiting event fails as moved.
    let (lost, _) = begin(
        &shards,
        &Arc::new(next.clone()),
        &recorder,
        &c("C1"),
        "two",
        Some("k2"),
    );
    assert_eq!(shards.pending_keys(), 1);
    let moved = Ring::from_replicated_parts(
        next.epoch() + 1,
        members,
        vec![1; SLOT_COUNT],
        vec![vec![0]; SLOT_COUNT],
    )
    .unwrap();
    shards.reroute(&moved, &me, &recorder);
    assert!(matches!(
        answer(lost),
        Some(Err(ServeError::WrongOwner { .. }))
    ));
    assert_eq!(shards.pending(), 0);
    assert_eq!(
        shards.pending_keys(),
        0,
        "the failed event's key is forgotten"
    );
}

#[test]
fn a_full_replication_queue_refuses_the_publish_before_giving_it_a_ts() {
    let (shards, _) = shards(Limits::default());
    let ring = replicated_ring(false);
    let recorder = Recorder::default();
    recorder.full.store(true, Ordering::Relaxed);
    let mut event = message(&c("C1"), "no room");
    let refused = shards
        .publish_once(&mut event, None, || Ok(ring.clone()), &recorder)
        .unwrap_err();
    assert_eq!(refused, ServeError::ReplicationBehind);
    assert_eq!(shards.pending(), 0);
    assert!(shards.history(&c("C1"), None, 10).events.is_empty());
}

#[test]
fn a_follower_stores_replicated_events_in_ts_order_once() {
    let (shards, _) = shards(Limits::default());
    let at = |micros: u64, text: &str| ChannelEvent {
        ts: Some(Ts::from_micros(micros)),
        ..message(&c("C1"), text)
    };
    shards.apply(&at(20, "b"), Some("kb"), 5);
    shards.apply(&at(10, "a"), None, 5);
    shards.apply(&at(20, "b"), Some("kb"), 5);
    shards.apply(&at(30, "c"), None, 5);
    let page = shards.history(&c("C1"), None, 10);
    let ts: Vec<u64> = page.events.iter().map(|e| e.ts.as_micros()).collect();
    assert_eq!(ts, [10, 20, 30]);
    // Promoted, its clock continues after what it holds, and it knows the key.
    let mut next = message(&c("C1"), "d");
    shards.publish(&mut next, || Ok(())).unwrap();
    assert!(next.ts.unwrap() > Ts::from_micros(30));
    let ring = Arc::new(Ring::empty());
    let (again, _) = begin_plain(&shards, &ring, "b", "kb");
    assert!(matches!(again, Published::Done { fresh: false }));
}

fn begin_plain(
    shards: &Shards<Test>,
    ring: &Arc<Ring>,
    text: &str,
    key: &str,
) -> (Published, ChannelEvent) {
    begin(
        shards,
        ring,
        &Recorder::default(),
        &c("C1"),
        text,
        Some(key),
    )
}

/// A member report of `user` with `conns` connections, in team T1.
fn member(user: &str, conns: u32) -> Report {
    Report {
        user: UserId::new(user).unwrap(),
        team: Some(mesh_core::TeamId::new("T1").unwrap()),
        conns,
        since_ms: 7,
        announced: false,
    }
}

#[test]
fn members_are_listed_in_id_order_by_page_and_their_facts_reach_the_sink_in_order() {
    let (shards, _) = shards(Limits::default());
    shards.set_member_bounds(members::Bounds {
        grace_ms: 0,
        ..members::Bounds::default()
    });
    let told: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = told.clone();
    shards.set_fact_sink(FactSink(Box::new(move |fact| {
        sink.lock().unwrap().push(fact.id)
    })));
    let cancel = CancellationToken::new();
    let (mut stream, _rx) = shards.open_stream("gw-a", 64, &cancel);
    stream.set_region("east");
    for (channel, users) in [("C3", 1), ("C1", 2), ("C2", 3)] {
        let reports: Vec<Report> = (0..users).map(|i| member(&format!("U{i}"), 1)).collect();
        shards.subscribe(&mut stream, &c(channel), None, &reports);
    }
    let ids = |page: &[(ChannelId, Summary)]| -> Vec<String> {
        page.iter().map(|(c, _)| c.to_string()).collect()
    };
    let (page, more) = shards.list_channels(|_| true, |_| true, None, "", 2);
    assert_eq!((ids(&page), more), (vec!["C1".into(), "C2".into()], true));
    assert_eq!((page[1].1.subscribers, page[1].1.members), (3, 3));
    assert_eq!(page[1].1.gateways, [("gw-a".into(), "east".into(), 3)]);
    let (page, more) = shards.list_channels(|_| true, |_| true, None, "C2", 2);
    assert_eq!((ids(&page), more), (vec!["C3".into()], false));
    let not_c1 = slot_of(&c("C1"));
    let (page, _) = shards.list_channels(|s| s != not_c1, |c| c.as_str() < "C3", None, "", 9);
    assert_eq!(ids(&page), ["C2"]);
    let (page, _) = shards.list_channels(|_| true, |_| true, Some("T2"), "", 9);
    assert!(page.is_empty());

    // A message to C1 (from U1) while U0 has no connection there: told once it is stored.
    shards.update_members(&stream, &c("C1"), &[member("U0", 0)]);
    let ts = publish(&shards, &c("C1"), "hello");
    let info = shards.channel_info(&c("C1"));
    assert_eq!(
        (info.head, info.history_length, info.oldest),
        (Some(ts), 1, Some(ts))
    );
    assert_eq!((info.live.subscribers, info.live.members), (1, 1));
    // The stream ends: its members leave (the grace here is 0).
    shards.close_stream(stream);
    shards.expire_members();
    let told = told.lock().unwrap().clone();
    let c1: Vec<&str> = told
        .iter()
        .map(String::as_str)
        .filter(|id| id.contains(":C1:"))
        .collect();
    assert_eq!(
        c1,
        [
            "channel_occupied:C1:7",
            "member_added:C1:U0:7",
            "member_added:C1:U1:7",
            &format!("user_offline_message:C1:U0:{ts}"),
            "member_removed:C1:U0:7",
            "member_removed:C1:U1:7",
            "channel_vacated:C1:7",
        ]
    );
    assert!(
        shards
            .list_channels(|_| true, |_| true, None, "", 9)
            .0
            .is_empty()
    );
}
