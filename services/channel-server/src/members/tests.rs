//! The member accounting against hand-made reports, with a hand-moved clock.

use std::sync::Arc;

use mesh_core::{ChannelEvent, ChannelId, EventBody, TeamId, Ts, UserId};

use super::*;

fn c(name: &str) -> ChannelId {
    ChannelId::new(name).unwrap()
}

fn u(name: &str) -> UserId {
    UserId::new(name).unwrap()
}

fn source(stream: u64, gateway: &str, region: &str) -> Source {
    Source {
        stream,
        gateway: Arc::from(gateway),
        region: Arc::from(region),
    }
}

fn report(user: &str, conns: u32, since_ms: u64) -> Report {
    Report {
        user: u(user),
        team: Some(TeamId::new("T1").unwrap()),
        conns,
        since_ms,
        announced: false,
    }
}

fn names(facts: &[Fact]) -> Vec<(&'static str, Option<String>)> {
    facts
        .iter()
        .map(|f| (f.kind.name(), f.user.as_ref().map(|u| u.to_string())))
        .collect()
}

/// The user of each fact.
fn users(facts: &[Fact]) -> Vec<&str> {
    facts
        .iter()
        .map(|f| f.user.as_ref().map_or("", |u| u.as_str()))
        .collect()
}

fn members() -> Members {
    Members::new(Bounds {
        grace_ms: 1_000,
        ..Bounds::default()
    })
}

fn message(channel: &str, from: &str, micros: u64) -> ChannelEvent {
    ChannelEvent {
        channel: c(channel),
        ts: Some(Ts::from_micros(micros)),
        body: EventBody::Message {
            user: u(from),
            text: "hello".into(),
            team: None,
        },
        origin: None,
    }
}

#[test]
fn the_first_subscriber_anywhere_occupies_and_each_users_first_connection_adds_it() {
    let mut m = members();
    let mut out = Vec::new();
    let (east, west) = (
        source(1, "us-east-1", "us-east"),
        source(2, "us-west-1", "us-west"),
    );
    m.subscribe(&east, &c("C1"), &[report("U1", 2, 100)], 100, &mut out);
    assert_eq!(
        names(&out),
        [
            ("channel_occupied", None),
            ("member_added", Some("U1".into()))
        ]
    );
    assert_eq!(out[1].id, "member_added:C1:U1:100");
    assert_eq!(out[1].team.as_ref().map(|t| t.as_str()), Some("T1"));
    out.clear();
    // The same user in another region, and a second user: only the second is news.
    m.subscribe(
        &west,
        &c("C1"),
        &[report("U1", 1, 150), report("U2", 1, 150)],
        150,
        &mut out,
    );
    assert_eq!(names(&out), [("member_added", Some("U2".into()))]);
    let summary = m.summary(&c("C1"));
    assert_eq!((summary.subscribers, summary.members), (4, 2));
    assert_eq!(
        summary.gateways,
        [
            ("us-east-1".to_string(), "us-east".to_string(), 2),
            ("us-west-1".to_string(), "us-west".to_string(), 2)
        ]
    );
    assert!(m.has_team(&c("C1"), "T1") && !m.has_team(&c("C1"), "T2"));
}

#[test]
fn a_user_moving_regions_within_the_grace_is_neither_removed_nor_added_again() {
    let mut m = members();
    let mut out = Vec::new();
    let (east, west) = (source(1, "e", "us-east"), source(2, "w", "us-west"));
    m.subscribe(&east, &c("C1"), &[report("U1", 1, 100)], 100, &mut out);
    out.clear();
    // Gone from the east (its last connection there), back in the west 500 ms later.
    m.update(1, &c("C1"), &[report("U1", 0, 0)], 200, &mut out);
    m.expire(700, &mut out);
    m.subscribe(&west, &c("C1"), &[report("U1", 1, 700)], 700, &mut out);
    m.expire(5_000, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(m.summary(&c("C1")).gateways.len(), 1);
    // Gone for good: removed, then vacated, only once the grace ran out.
    m.unsubscribe(2, &c("C1"), 6_000);
    m.expire(6_999, &mut out);
    assert!(out.is_empty());
    m.expire(7_000, &mut out);
    assert_eq!(
        names(&out),
        [
            ("member_removed", Some("U1".into())),
            ("channel_vacated", None)
        ]
    );
    // Ids name the membership and occupancy they end: the first connection's time.
    assert_eq!(out[0].id, "member_removed:C1:U1:100");
    assert_eq!(out[1].id, "channel_vacated:C1:100");
    assert_eq!(out[0].time_ms, 6_000);
    // A new occupancy later is a new fact with a new id.
    out.clear();
    m.subscribe(&east, &c("C1"), &[report("U1", 1, 9_000)], 9_000, &mut out);
    assert_eq!(out[0].id, "channel_occupied:C1:9000");
}

#[test]
fn in_a_large_channel_each_departure_counts_once_from_its_latest_leaving() {
    let mut m = members();
    let mut out = Vec::new();
    let g = source(1, "g", "r");
    let all: Vec<Report> = (0..20_000)
        .map(|i| report(&format!("U{i}"), 1, 100))
        .collect();
    m.subscribe(&g, &c("T1"), &all, 100, &mut out);
    assert_eq!(m.summary(&c("T1")).members, 20_000);
    out.clear();
    // U1 leaves, comes back within the grace and leaves again; U2 leaves once; U3 leaves and
    // comes back for good.
    m.update(1, &c("T1"), &[report("U1", 0, 0)], 1_000, &mut out);
    m.update(1, &c("T1"), &[report("U2", 0, 0)], 1_200, &mut out);
    m.update(1, &c("T1"), &[report("U3", 0, 0)], 1_300, &mut out);
    m.update(1, &c("T1"), &[report("U1", 1, 1_500)], 1_500, &mut out);
    m.update(1, &c("T1"), &[report("U3", 1, 1_600)], 1_600, &mut out);
    m.update(1, &c("T1"), &[report("U1", 0, 0)], 1_800, &mut out);
    m.expire(2_199, &mut out);
    assert!(out.is_empty(), "{out:?}");
    m.expire(2_200, &mut out);
    assert_eq!(users(&out), ["U2"]);
    m.expire(2_799, &mut out);
    assert_eq!(
        users(&out),
        ["U2"],
        "U1's first leaving does not count: it came back"
    );
    m.expire(2_800, &mut out);
    assert_eq!(users(&out), ["U2", "U1"]);
    assert_eq!(out[1].time_ms, 1_800);
    m.expire(10_000, &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(m.summary(&c("T1")).members, 19_998);

    // The gateway resubscribes with all but U4..U9 (their connections closed meanwhile): only
    // they leave.
    out.clear();
    let now: Vec<Report> = all
        .iter()
        .filter(|r| {
            !matches!(
                r.user.as_str(),
                "U1" | "U2" | "U4" | "U5" | "U6" | "U7" | "U8" | "U9"
            )
        })
        .cloned()
        .map(|mut r| {
            r.announced = true;
            r
        })
        .collect();
    m.subscribe(&g, &c("T1"), &now, 20_000, &mut out);
    assert!(out.is_empty(), "{out:?}");
    m.expire(21_000, &mut out);
    assert_eq!(users(&out), ["U4", "U5", "U6", "U7", "U8", "U9"]);
    assert_eq!(m.summary(&c("T1")).members, 19_992);
}

#[test]
fn a_gateway_going_away_removes_its_users_from_their_own_channels_once_the_grace_runs_out() {
    let mut m = members();
    let mut out = Vec::new();
    let g = source(1, "g", "r");
    for i in 0..1_000 {
        let user = format!("U{i}");
        m.subscribe(&g, &c(&user), &[report(&user, 1, 100)], 100, &mut out);
    }
    out.clear();
    // Its stream ends: every channel's only member leaves at once.
    for i in 0..1_000 {
        m.unsubscribe(1, &c(&format!("U{i}")), 2_000);
    }
    m.expire(2_999, &mut out);
    assert!(out.is_empty());
    // U7 comes back (through another gateway) within the grace: only its channel stays.
    let w = source(2, "w", "r");
    m.subscribe(&w, &c("U7"), &[report("U7", 1, 2_500)], 2_500, &mut out);
    m.expire(3_000, &mut out);
    let removed = out
        .iter()
        .filter(|f| f.kind == FactKind::MemberRemoved)
        .count();
    let vacated = out.iter().filter(|f| f.kind == FactKind::Vacated).count();
    assert_eq!((removed, vacated), (999, 999));
    assert!(!users(&out).contains(&"U7"));
    // Each channel's removal comes before its vacating.
    assert_eq!(
        names(&out[..2]),
        [
            ("member_removed", Some("U0".into())),
            ("channel_vacated", None)
        ]
    );
    assert_eq!(m.summary(&c("U7")).members, 1);
    assert_eq!(m.summary(&c("U8")).members, 0);
    assert_eq!(m.live().count(), 1);
    out.clear();
    m.expire(100_000, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn a_resumption_takes_announced_members_in_without_news() {
    let mut m = members();
    let mut out = Vec::new();
    let mut announced = report("U1", 1, 100);
    announced.announced = true;
    let fresh = report("U2", 1, 300);
    m.subscribe(
        &source(7, "g", "r"),
        &c("C1"),
        &[announced, fresh],
        400,
        &mut out,
    );
    assert_eq!(names(&out), [("member_added", Some("U2".into()))]);
    assert_eq!(m.summary(&c("C1")).members, 2);
    // Leaving still counts, with the ids the first owner would have given.
    out.clear();
    m.unsubscribe(7, &c("C1"), 500);
    m.expire(2_000, &mut out);
    let ids: Vec<&str> = out.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "member_removed:C1:U1:100",
            "member_removed:C1:U2:300",
            "channel_vacated:C1:100"
        ]
    );
}

#[test]
fn updates_are_absolute_and_only_for_subscribed_channels() {
    let mut m = members();
    let mut out = Vec::new();
    m.update(1, &c("C1"), &[report("U1", 1, 1)], 1, &mut out);
    assert!(out.is_empty() && m.live().next().is_none());
    m.subscribe(&source(1, "g", "r"), &c("C1"), &[], 1, &mut out);
    m.update(1, &c("C1"), &[report("U1", 3, 1)], 1, &mut out);
    m.update(1, &c("C1"), &[report("U1", 3, 1)], 2, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(m.summary(&c("C1")).subscribers, 3);
    // A full set that no longer names a user counts it gone.
    m.subscribe(
        &source(1, "g", "r"),
        &c("C1"),
        &[report("U2", 1, 5)],
        5,
        &mut out,
    );
    let summary = m.summary(&c("C1"));
    assert_eq!((summary.subscribers, summary.members), (1, 1));
    assert_eq!(m.entries(), 1);
}

#[test]
fn a_message_is_told_to_known_members_who_are_offline_but_not_to_online_ones_or_the_sender() {
    let mut m = members();
    let mut out = Vec::new();
    let joined = |user: &str| ChannelEvent {
        channel: c("C1"),
        ts: Some(Ts::from_micros(1)),
        body: EventBody::MemberJoined {
            user: u(user),
            team: Some(TeamId::new("T9").unwrap()),
        },
        origin: None,
    };
    // U3 joined by the admin API; U1 seen subscribed; U2 subscribed now; U4 joined then left.
    m.committed(&joined("U3"), true, &mut out);
    m.committed(&joined("U4"), true, &mut out);
    let left = ChannelEvent {
        body: EventBody::MemberLeft { user: u("U4") },
        ..joined("U4")
    };
    m.committed(&left, true, &mut out);
    m.subscribe(
        &source(1, "g", "r"),
        &c("C1"),
        &[report("U1", 1, 1), report("U2", 1, 1)],
        1,
        &mut out,
    );
    m.update(1, &c("C1"), &[report("U1", 0, 0)], 2, &mut out);
    out.clear();
    m.committed(&message("C1", "U2", 1_700_000_000_000_042), true, &mut out);
    let told = users(&out);
    assert_eq!(told, ["U1", "U3"]);
    assert_eq!(out[0].id, "user_offline_message:C1:U1:1700000000.000042");
    assert_eq!(out[1].team.as_ref().map(|t| t.as_str()), Some("T9"));
    assert_eq!(out[0].time_ms, 1_700_000_000_000);
    // Webhooks off: nothing is built.
    out.clear();
    m.committed(&message("C1", "U2", 50), false, &mut out);
    assert!(out.is_empty());
}

#[test]
fn a_message_to_a_teams_channel_is_told_to_nobody() {
    let mut m = members();
    let mut out = Vec::new();
    m.subscribe(
        &source(1, "g", "r"),
        &c("T1"),
        &[report("U1", 1, 1)],
        1,
        &mut out,
    );
    m.update(1, &c("T1"), &[report("U1", 0, 0)], 2, &mut out);
    out.clear();
    m.committed(&message("T1", "U2", 10), true, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn a_message_to_a_users_own_channel_is_told_only_while_they_are_offline() {
    let mut m = members();
    let mut out = Vec::new();
    m.committed(&message("U1", "U2", 10), true, &mut out);
    assert_eq!(names(&out), [("user_offline_message", Some("U1".into()))]);
    out.clear();
    m.subscribe(
        &source(1, "g", "r"),
        &c("U1"),
        &[report("U1", 1, 1)],
        1,
        &mut out,
    );
    out.clear();
    m.committed(&message("U1", "U2", 20), true, &mut out);
    assert!(out.is_empty());
}

#[test]
fn bounds_drop_and_count_what_does_not_fit() {
    let mut m = Members::new(Bounds {
        grace_ms: 0,
        users_per_channel: 2,
        total_entries: 3,
        known_per_channel: 2,
        known_total: 5,
    });
    let mut out = Vec::new();
    let set: Vec<Report> = (1..=3).map(|i| report(&format!("U{i}"), 1, 1)).collect();
    m.subscribe(&source(1, "g", "r"), &c("C1"), &set, 1, &mut out);
    assert_eq!((m.summary(&c("C1")).members, m.dropped), (2, 1));
    m.subscribe(&source(1, "g", "r"), &c("C2"), &set, 1, &mut out);
    assert_eq!((m.entries(), m.dropped), (3, 3));
    // Known members: the oldest known is forgotten past the bound.
    let joined = |user: &str| ChannelEvent {
        channel: c("C3"),
        ts: Some(Ts::from_micros(1)),
        body: EventBody::MemberJoined {
            user: u(user),
            team: None,
        },
        origin: None,
    };
    for user in ["U7", "U8", "U9"] {
        m.committed(&joined(user), true, &mut out);
    }
    out.clear();
    m.committed(&message("C3", "U1", 5), true, &mut out);
    let told = users(&out);
    assert_eq!(told, ["U8", "U9"]);
    // Five known over all channels (U1, U2 of C1, U1 of C2, U8, U9 of C3): a new one elsewhere
    // is refused and counted.
    assert_eq!(m.known(), 5);
    let dropped = m.dropped;
    m.committed(
        &ChannelEvent {
            channel: c("C4"),
            ..joined("U5")
        },
        true,
        &mut out,
    );
    assert_eq!((m.known(), m.dropped), (5, dropped + 1));
}

#[test]
fn channels_that_moved_are_forgotten_and_only_departures_in_their_grace_are_told() {
    let mut m = members();
    let mut out = Vec::new();
    let g = source(1, "g", "r");
    m.subscribe(
        &g,
        &c("C1"),
        &[report("U1", 1, 1), report("U2", 1, 1)],
        1,
        &mut out,
    );
    m.subscribe(&g, &c("C2"), &[report("U1", 1, 1)], 1, &mut out);
    m.update(1, &c("C1"), &[report("U1", 0, 0)], 2, &mut out);
    m.subscribe(&g, &c("C3"), &[report("U1", 1, 1)], 1, &mut out);
    m.unsubscribe(1, &c("C3"), 3);
    out.clear();
    m.drop_channels(|channel| channel.as_str() != "C2", &mut out);
    // C1: U1 had left (told now), U2 is live (the new owner takes it in); C3: nobody is left.
    let mut told: Vec<&str> = out.iter().map(|f| f.id.as_str()).collect();
    told.sort();
    assert_eq!(
        told,
        [
            "channel_vacated:C3:1",
            "member_removed:C1:U1:1",
            "member_removed:C3:U1:1"
        ]
    );
    out.clear();
    m.expire(10_000, &mut out);
    assert!(out.is_empty());
    assert_eq!(m.entries(), 1);
    assert_eq!(m.live().collect::<Vec<_>>(), [&c("C2")]);
}

/// A measurement, not a check (`cargo nextest run -p channel-server memory_per_entry
/// --run-ignored only --no-capture`): the resident memory one gateway × channel × user entry
/// costs, with its user's state and known-member entry (10,000 channels × 100 users).
#[test]
#[ignore = "a measurement"]
fn memory_per_entry() {
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        statm
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 4096
    }
    let mut m = Members::new(Bounds::default());
    let mut out = Vec::new();
    let before = rss();
    let channels = 10_000;
    let users = 100;
    for ch in 0..channels {
        let reports: Vec<Report> = (0..users)
            .map(|u| report(&format!("U{:08}", ch * 7 + u), 1, 1))
            .collect();
        m.subscribe(
            &source(1, "us-east-1", "us-east"),
            &c(&format!("C{ch:08}")),
            &reports,
            1,
            &mut out,
        );
        out.clear();
    }
    let after = rss();
    let entries = m.entries() as u64;
    println!(
        "entries {entries}, known {}, bytes per entry (gateway set + user state + known): {}",
        m.known(),
        (after - before) / entries
    );
}

#[test]
fn without_learning_nobody_is_known_but_members_are_still_counted() {
    let mut m = members();
    m.set_learning(false);
    let mut out = Vec::new();
    m.subscribe(
        &source(1, "g", "r"),
        &c("C1"),
        &[report("U1", 1, 1)],
        1,
        &mut out,
    );
    let joined = ChannelEvent {
        channel: c("C1"),
        ts: Some(Ts::from_micros(1)),
        body: EventBody::MemberJoined {
            user: u("U2"),
            team: None,
        },
        origin: None,
    };
    m.committed(&joined, false, &mut out);
    assert_eq!((m.known(), m.entries(), out.len()), (0, 1, 2));
}

#[test]
fn handed_over_members_wait_for_their_gateways_and_leave_when_none_reports_them() {
    let mut old = members();
    let mut out = Vec::new();
    old.subscribe(
        &source(1, "g", "r"),
        &c("C1"),
        &[report("U1", 1, 10), report("U2", 2, 20)],
        20,
        &mut out,
    );
    out.clear();
    let handed = old.drop_channels(|_| true, &mut out);
    assert!(out.is_empty());
    assert_eq!(handed.len(), 1);
    // The new owner: U1's gateway re-subscribes within the grace, U2's never does.
    let mut new = members();
    new.adopt(&c("C1"), &handed[0].1, 100);
    let mut again = report("U1", 1, 10);
    again.announced = true;
    new.subscribe(&source(9, "g", "r"), &c("C1"), &[again], 150, &mut out);
    new.expire(1_099, &mut out);
    assert!(out.is_empty());
    new.expire(1_100, &mut out);
    assert_eq!(names(&out), [("member_removed", Some("U2".into()))]);
    assert_eq!(out[0].id, "member_removed:C1:U2:20");
    // U1 leaves for good: the occupancy the first owner announced ends with its id.
    out.clear();
    new.unsubscribe(9, &c("C1"), 2_000);
    new.expire(3_000, &mut out);
    let ids: Vec<&str> = out.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["member_removed:C1:U1:10", "channel_vacated:C1:10"]);
}
