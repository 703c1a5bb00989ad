//! The hub's fan-out and catch-up, driven without channel servers: the tests set a channel's
//! subscription by hand and hand the hub what an upstream stream would.

use std::sync::Arc;
use std::time::Instant;

use channel_client::router::History;
use channel_client::{ChannelRouter, RouteError};
use mesh_core::{ChannelEvent, ChannelId, EventBody, NodeId, Origin, Ts, UserId};
use ring_client::{RingSource, RingWatcher};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Hub;
use crate::close::Closer;
use crate::metrics::GatewayMetrics;
use crate::outbox::{ConnSink, Outbox};
use crate::vocab::{Control, Outbound};

/// A hub of gateway "gw1" whose ring stays empty (its ring manager is nowhere).
fn hub() -> Hub {
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let nowhere = RingSource::Direct("http://127.0.0.1:9".into());
    let ring = RingWatcher::spawn(nowhere, &tracker, cancel.clone());
    let router = ChannelRouter::new(ring.clone(), &tracker, cancel.clone());
    let metrics = GatewayMetrics::new(&mesh_telemetry::Telemetry::new(&[]));
    Hub::new(
        "gw1".into(),
        "test".into(),
        ring,
        router,
        metrics,
        tracker,
        cancel,
    )
}

fn channel(name: &str) -> ChannelId {
    ChannelId::new(name).unwrap()
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn ts(micros: u64) -> Ts {
    Ts::parse(&format!("1700000000.{micros:06}")).unwrap()
}

/// A message on `channel` at `micros`, sent by connection `from` of "gw1" if any.
fn message(channel: &str, micros: u64, from: Option<u64>) -> ChannelEvent {
    ChannelEvent {
        channel: self::channel(channel),
        ts: Some(ts(micros)),
        body: EventBody::Message {
            user: UserId::new("U1").unwrap(),
            text: format!("m{micros}"),
            team: None,
        },
        origin: from.map(|conn| Origin {
            gateway: "gw1".into(),
            conn,
        }),
    }
}

/// Connection `id` joins `channels`; returns its outbox.
fn join(hub: &Hub, id: u64, channels: &[ChannelId]) -> Arc<Outbox> {
    let outbox = Arc::new(Outbox::new(64, 1 << 20));
    let user = UserId::new("U1").unwrap();
    let sink = ConnSink::new(id, user, outbox.clone(), Arc::new(Closer::default()));
    hub.join(&sink, channels);
    outbox
}

/// Points `channel`'s subscription at `on`, confirmed.
fn subscribed_on(hub: &Hub, channel: &ChannelId, on: &NodeId) {
    let mut state = hub.state();
    let local = state.channels.get_mut(channel).unwrap();
    local.upstream = Some(on.clone());
    local.activate();
}

/// The ts (in micros) of the events queued to `outbox`, in order.
fn queued(outbox: &Outbox) -> Vec<u64> {
    outbox
        .take_all()
        .into_iter()
        .map(|item| match item {
            Outbound::Event(event) => {
                let ts = event.ts.unwrap().to_string();
                ts.rsplit('.').next().unwrap().parse().unwrap()
            }
            other => panic!("not an event: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn each_event_reaches_every_subscriber_once_but_its_sender() {
    let hub = hub();
    let (c1, cs1) = (channel("C1"), node("cs1"));
    let a = join(&hub, 1, std::slice::from_ref(&c1));
    let b = join(&hub, 2, std::slice::from_ref(&c1));
    assert_eq!(hub.channel_count(), 1);
    subscribed_on(&hub, &c1, &cs1);
    let batch = vec![
        message("C1", 1, Some(1)),
        message("C1", 2, None),
        message("C1", 2, None),
        message("C2", 3, None),
    ];
    hub.deliver_batch(&cs1, batch, Instant::now());
    // A stream from a server the channel is not on is stale.
    hub.deliver_batch(&node("cs2"), vec![message("C1", 4, None)], Instant::now());
    assert_eq!(queued(&a), [2]);
    assert_eq!(queued(&b), [1, 2]);
    assert_eq!(hub.metrics().delivered.get(), 3);
    assert_eq!(hub.last_ts(&c1), Some(ts(2)));
    // The last one to leave lets the channel go.
    hub.leave(1, std::slice::from_ref(&c1));
    hub.leave(2, std::slice::from_ref(&c1));
    assert_eq!((hub.channel_count(), hub.last_ts(&c1)), (0, None));
}

#[tokio::test]
async fn membership_events_tell_each_connection_to_join_or_leave() {
    let hub = hub();
    let (u1, cs1) = (channel("U1"), node("cs1"));
    let a = join(&hub, 1, std::slice::from_ref(&u1));
    subscribed_on(&hub, &u1, &cs1);
    let mut joined = message("U1", 1, None);
    joined.body = EventBody::ChannelJoined {
        channel: channel("C5"),
        since: Some(ts(1)),
    };
    let mut left = message("U1", 2, None);
    left.body = EventBody::ChannelLeft {
        channel: channel("C5"),
    };
    hub.deliver_batch(&cs1, vec![joined, left], Instant::now());
    let controls: Vec<Control> = a
        .take_all()
        .into_iter()
        .map(|item| match item {
            Outbound::Control(control) => *control,
            other => panic!("not a control: {other:?}"),
        })
        .collect();
    assert!(matches!(&controls[..], [
        Control::Joined { channel: j, since: Some(_), on: o1 },
        Control::Left { channel: l, on: o2 },
    ] if j.as_str() == "C5" && l.as_str() == "C5" && o1 == &u1 && o2 == &u1));
    // Controls are not events: nothing counted as delivered.
    assert_eq!(hub.metrics().delivered.get(), 0);
}

/// Connection 1 in C1, whose subscription moved to cs1 after the gateway delivered ts 1 and
/// which cs1 confirmed with its newest ts 3: the channel catches up. Returns the connection's
/// outbox.
fn catching_up(hub: &Hub) -> Arc<Outbox> {
    let (c1, cs1) = (channel("C1"), node("cs1"));
    let outbox = join(hub, 1, std::slice::from_ref(&c1));
    let mut state = hub.state();
    let local = state.channels.get_mut(&c1).unwrap();
    local.upstream = Some(cs1);
    local.last_ts = Some(ts(1));
    // The new owner is ahead: live events wait for the catch-up.
    assert_eq!(local.confirmed(Some(ts(3))), Some(ts(1)));
    outbox
}

/// Catch-ups counted (ok, failed).
fn catch_ups(hub: &Hub) -> (u64, u64) {
    let outcome = |o: &str| hub.metrics().catch_ups.with_label_values(&[o]).get();
    (outcome("ok"), outcome("failed"))
}

#[tokio::test]
async fn a_resubscribed_channel_catches_up_before_its_live_events() {
    let hub = hub();
    let (c1, cs1) = (channel("C1"), node("cs1"));
    let a = catching_up(&hub);
    hub.deliver_batch(&cs1, vec![message("C1", 4, None)], Instant::now());
    hub.deliver_batch(&cs1, vec![message("C1", 5, None)], Instant::now());
    assert!(queued(&a).is_empty());
    // A catch-up for a stream the channel left meanwhile is dropped.
    hub.caught_up(&node("cs2"), &c1, Ok(History::default()));
    let history = History {
        events: vec![
            message("C1", 2, None),
            message("C1", 3, None),
            message("C1", 4, None),
        ],
        ..History::default()
    };
    hub.caught_up(&cs1, &c1, Ok(history));
    assert_eq!(queued(&a), [2, 3, 4, 5]);
    assert!(hub.state().channels[&c1].active);
    assert_eq!(catch_ups(&hub), (1, 0));
}

#[tokio::test]
async fn a_failed_catch_up_delivers_the_live_events_that_waited() {
    let hub = hub();
    let (c1, cs1) = (channel("C1"), node("cs1"));
    let a = catching_up(&hub);
    hub.deliver_batch(&cs1, vec![message("C1", 4, None)], Instant::now());
    let failed = Err(RouteError::Unavailable("down".into()));
    hub.caught_up(&cs1, &c1, failed);
    let mut items = a.take_all();
    assert!(
        matches!(items.remove(0), Outbound::Control(c) if matches!(*c, Control::Gap { delivered, .. } if delivered == ts(1))),
        "what it could not read is a gap, not silence"
    );
    let live: Vec<_> = items
        .iter()
        .map(|i| matches!(i, Outbound::Event(e) if e.ts == Some(ts(4))))
        .collect();
    assert_eq!(live, [true]);
    assert!(hub.state().channels[&c1].active);
    assert_eq!(catch_ups(&hub), (0, 1));
}

/// The gaps queued to `outbox`: (floor, delivered) in micros past the test's second.
fn gaps(outbox: &Outbox) -> Vec<(Ts, Ts)> {
    outbox
        .take_all()
        .into_iter()
        .filter_map(|item| match item {
            Outbound::Control(control) => match *control {
                Control::Gap {
                    floor, delivered, ..
                } => Some((floor, delivered)),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_floor_past_what_was_delivered_tells_the_connections_history_gap() {
    let hub = hub();
    let (c1, cs1) = (channel("C1"), node("cs1"));
    let a = join(&hub, 1, std::slice::from_ref(&c1));
    subscribed_on(&hub, &c1, &cs1);
    hub.deliver_batch(&cs1, vec![message("C1", 3, None)], Instant::now());
    assert_eq!(queued(&a), [3]);
    hub.gap(&cs1, &c1, ts(3));
    hub.gap(&node("cs2"), &c1, ts(9));
    assert!(gaps(&a).is_empty(), "nothing missed; a stale stream");
    hub.gap(&cs1, &c1, ts(9));
    assert_eq!(gaps(&a), [(ts(9), ts(3))]);
    // The same on a (re)subscription whose history starts after what was delivered.
    hub.subscribed(&cs1, &c1, Some(ts(3)), Some(ts(2)));
    assert!(gaps(&a).is_empty());
    hub.subscribed(&cs1, &c1, None, Some(ts(7)));
    assert_eq!(gaps(&a), [(ts(7), ts(3))]);
}
