//! Unit tests of session bookkeeping: reports in, changes and answers out, sessions that end
//! or fall behind, warming after a ring change, and queries.

use mesh_core::RingNode;
use tokio::sync::mpsc::error::TryRecvError;

use super::*;

const GRACE: Duration = Duration::from_secs(2);

/// A message as the tests read it (presence without the teams: `query` shows those).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Presence(Vec<(UserId, bool)>),
    Acquired(u64, Result<(), Refusal>),
}

impl Outbound for Sent {
    fn presence(items: Vec<Notice>) -> Self {
        Sent::Presence(items.into_iter().map(|n| (n.user, n.active)).collect())
    }

    fn acquired(request: u64, outcome: Result<(), Refusal>) -> Self {
        Sent::Acquired(request, outcome)
    }
}

fn u(id: &str) -> UserId {
    UserId::new(id).unwrap()
}

fn t(id: &str) -> TeamId {
    TeamId::new(id).unwrap()
}

/// An empty snapshot watching `watched`.
fn watching(watched: &[&str]) -> Report {
    Report::Snapshot {
        gateway: "gw-1".into(),
        region: "us".into(),
        online: vec![],
        manual: vec![],
        teams: vec![],
        pending_acquires: vec![],
        left: vec![],
        watched: watched.iter().map(|w| u(w)).collect(),
    }
}

/// `user`, of team T1, has `connections` on the gateway.
fn online(user: &str, connections: u32) -> Report {
    Report::Online(Online {
        user: u(user),
        connections,
        team: Some(t("T1")),
        details: vec![],
        since_ms: 0,
        left_ms: 0,
    })
}

/// What a query answers for `user`.
fn notice(user: &str, active: bool, team: Option<&str>) -> Notice {
    Notice {
        user: u(user),
        active,
        team: team.map(t),
    }
}

fn acquire(request: u64, team: &str, user: &str, team_limit: u32) -> Report {
    Report::Acquire(Acquire {
        request,
        who: Some((t(team), u(user))),
        team_limit,
        user_limit: 0,
    })
}

fn drain(rx: &mut mpsc::Receiver<Sent>) -> Vec<Sent> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[test]
fn a_watcher_hears_another_sessions_user_come_and_go_after_the_grace() {
    let sessions: Sessions<Sent> = Sessions::new(GRACE, 16);
    let t0 = Instant::now();
    let (watcher, mut rx) = sessions.open();
    let (reporter, _reporter_rx) = sessions.open();
    sessions.apply(watcher, watching(&["U1"]), t0);
    sessions.apply(reporter, watching(&[]), t0);
    assert_eq!(
        drain(&mut rx),
        [Sent::Presence(vec![(u("U1"), false)])],
        "a snapshot's new watches are answered"
    );
    sessions.apply(watcher, Report::Watch(vec![u("U1")]), t0);
    assert_eq!(drain(&mut rx), [Sent::Presence(vec![(u("U1"), false)])]);
    sessions.apply(reporter, online("U1", 1), t0);
    assert_eq!(drain(&mut rx), [Sent::Presence(vec![(u("U1"), true)])]);
    sessions.apply(reporter, online("U1", 0), t0);
    sessions.tick(t0 + GRACE / 2);
    assert_eq!(drain(&mut rx), [], "within the grace: nothing yet");
    sessions.tick(t0 + GRACE);
    assert_eq!(drain(&mut rx), [Sent::Presence(vec![(u("U1"), false)])]);
    assert_eq!(
        sessions.query(&["U1".into()]),
        Ok(vec![notice("U1", false, Some("T1"))])
    );
}

#[test]
fn an_ended_session_takes_its_users_and_its_connections_with_it() {
    let sessions: Sessions<Sent> = Sessions::new(GRACE, 16);
    let t0 = Instant::now();
    let (watcher, mut rx) = sessions.open();
    let (gateway, mut gateway_rx) = sessions.open();
    sessions.apply(watcher, watching(&["U1"]), t0);
    sessions.apply(gateway, watching(&[]), t0);
    sessions.apply(gateway, online("U1", 1), t0);
    sessions.apply(gateway, acquire(1, "T1", "U1", 1), t0);
    assert_eq!(drain(&mut gateway_rx), [Sent::Acquired(1, Ok(()))]);
    assert_eq!(
        drain(&mut rx),
        [
            Sent::Presence(vec![(u("U1"), false)]),
            Sent::Presence(vec![(u("U1"), true)])
        ]
    );
    assert_eq!(sessions.counts(), (2, 1));

    sessions.end(gateway, t0);
    sessions.end(gateway, t0);
    assert_eq!(sessions.counts().0, 1);
    assert_eq!(gateway_rx.try_recv(), Err(TryRecvError::Disconnected));
    sessions.tick(t0 + GRACE);
    assert_eq!(drain(&mut rx), [Sent::Presence(vec![(u("U1"), false)])]);
    sessions.apply(watcher, acquire(2, "T1", "U2", 1), t0);
    assert_eq!(
        drain(&mut rx),
        [Sent::Acquired(2, Ok(()))],
        "the team's only connection left with the session"
    );
}

#[test]
fn the_team_cap_is_counted_across_sessions_and_released() {
    let sessions: Sessions<Sent> = Sessions::new(GRACE, 16);
    let now = Instant::now();
    let (one, mut one_rx) = sessions.open();
    let (two, mut two_rx) = sessions.open();
    sessions.apply(one, acquire(1, "T1", "U1", 1), now);
    sessions.apply(two, acquire(1, "T1", "U2", 1), now);
    assert_eq!(drain(&mut one_rx), [Sent::Acquired(1, Ok(()))]);
    assert_eq!(drain(&mut two_rx), [Sent::Acquired(1, Err(Refusal::Team))]);
    sessions.apply(
        one,
        Report::Release {
            team: t("T1"),
            user: u("U1"),
        },
        now,
    );
    sessions.apply(two, acquire(2, "T1", "U2", 1), now);
    assert_eq!(drain(&mut two_rx), [Sent::Acquired(2, Ok(()))]);
    let garbage = Report::Acquire(Acquire {
        request: 3,
        who: None,
        team_limit: 0,
        user_limit: 0,
    });
    sessions.apply(two, garbage, now);
    assert_eq!(drain(&mut two_rx), [Sent::Acquired(3, Err(Refusal::Team))]);
}

#[test]
fn a_session_that_falls_behind_is_cut_off_and_an_unheard_grant_taken_back() {
    let sessions: Sessions<Sent> = Sessions::new(GRACE, 1);
    let now = Instant::now();
    let (slow, _slow_rx) = sessions.open();
    let (other, mut other_rx) = sessions.open();
    sessions.apply(slow, acquire(1, "T1", "U1", 0), now);
    // The queue holds one message: the second grant is not heard.
    sessions.apply(slow, acquire(2, "T1", "U1", 2), now);
    assert_eq!(sessions.counts().0, 1, "cut off");
    // Both of its connections are free again: the cap of one fits one more.
    sessions.apply(other, acquire(1, "T1", "U2", 1), now);
    assert_eq!(drain(&mut other_rx), [Sent::Acquired(1, Ok(()))]);
}

#[test]
fn a_watcher_whose_queue_is_full_is_cut_off() {
    let sessions: Sessions<Sent> = Sessions::new(GRACE, 1);
    let t0 = Instant::now();
    let (watcher, mut rx) = sessions.open();
    let (gateway, _gateway_rx) = sessions.open();
    sessions.apply(watcher, watching(&["U1", "U2"]), t0);
    assert_eq!(drain(&mut rx).len(), 1, "the answer to its watches");
    sessions.apply(gateway, watching(&[]), t0);
    sessions.apply(gateway, online("U1", 1), t0);
    assert_eq!(sessions.counts().0, 2);
    sessions.apply(gateway, online("U2", 1), t0);
    assert_eq!(sessions.counts().0, 1);
}

#[test]
fn gaining_slots_warms_up_refusing_connections_until_it_ends() {
    let sessions: Sessions<Sent> = Sessions::new(GRACE, 16);
    let now = Instant::now();
    let node = RingNode {
        id: NodeId::new("ps-1").unwrap(),
        addr: "ps-1:1".into(),
    };
    let ring = Ring::empty().rebalanced(std::slice::from_ref(&node));
    let (session, mut rx) = sessions.open();
    sessions.follow_ring(&node.id, None, &ring, now);
    sessions.apply(session, acquire(1, "T1", "U1", 0), now);
    assert_eq!(drain(&mut rx), [Sent::Acquired(1, Err(Refusal::Warming))]);
    sessions.follow_ring(&node.id, Some(&ring), &ring, now + crate::WARM_UP);
    let later = now + crate::WARM_UP;
    sessions.apply(session, acquire(2, "T1", "U1", 0), later);
    assert_eq!(
        drain(&mut rx),
        [Sent::Acquired(2, Ok(()))],
        "nothing gained the second time"
    );
}

#[test]
fn users_of_slots_lost_are_forgotten() {
    let sessions: Sessions<Sent> = Sessions::new(GRACE, 16);
    let now = Instant::now();
    let (session, _rx) = sessions.open();
    sessions.apply(session, watching(&[]), now);
    sessions.apply(session, online("U1", 1), now);
    assert_eq!(
        sessions.query(&["U1".into()]),
        Ok(vec![notice("U1", true, Some("T1"))])
    );
    let other = RingNode {
        id: NodeId::new("ps-2").unwrap(),
        addr: "ps-2:1".into(),
    };
    let ring = Ring::empty().rebalanced(&[other]);
    sessions.follow_ring(&NodeId::new("ps-1").unwrap(), None, &ring, now);
    assert_eq!(sessions.counts(), (1, 0));
    // Nor is their team remembered.
    assert_eq!(
        sessions.query(&["U1".into()]),
        Ok(vec![notice("U1", false, None)])
    );
}

#[test]
fn a_query_names_the_id_that_does_not_parse() {
    let sessions: Sessions<Sent> = Sessions::new(GRACE, 16);
    let refused = sessions
        .query(&["U1".into(), "not valid".into()])
        .unwrap_err();
    let QueryError::BadUser { raw, .. } = &refused;
    assert_eq!(raw, "not valid");
    assert!(refused.to_string().starts_with("not valid: "));
}
