//! Disconnect orders as this gateway takes them from the ring manager's directives (the web
//! app's `DisconnectUser`), and who each connection is, to match them: an order closes the
//! user's connections (only its team's, when it names one) that were open, or opening, when
//! the order arrived; a connection opened after it is never touched. State only: the region
//! state closes the connections.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use mesh_core::{TeamId, UserId};
use mesh_proto::ring as pb;

use crate::close::Close;
use crate::vocab::ConnId;

/// How long an order is kept for connections that were opening when it arrived: longer than
/// a connection's handshake may take (its subscriptions, at most 10 s).
const RECENT_TTL: Duration = Duration::from_secs(15);
/// The most recent orders kept (as many as the ring manager holds); the oldest go first.
const MAX_RECENT: usize = 10_000;

/// One order: close `user`'s connections (only `team`'s, when given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub user: UserId,
    pub team: Option<TeamId>,
    /// The close frame's reason text ("" for the close reason's own).
    pub reason: String,
    pub reconnect: bool,
}

impl Order {
    /// The order a directive carries; `None` when its user or team does not parse (the ring
    /// manager sends only ids it validated).
    pub fn from_proto(o: &pb::DisconnectOrder) -> Option<Order> {
        let team = match o.team.as_str() {
            "" => None,
            team => Some(TeamId::new(team).ok()?),
        };
        Some(Order {
            user: UserId::new(&o.user).ok()?,
            team,
            reason: o.reason.clone(),
            reconnect: o.reconnect,
        })
    }

    /// Whether it closes a connection of `user` whose token names `team`.
    pub fn matches(&self, user: &UserId, team: &TeamId) -> bool {
        &self.user == user && self.team.as_ref().is_none_or(|t| t == team)
    }

    /// Why a connection it closes is closed (4010 or 4011).
    pub fn close(&self) -> Close {
        Close::Disconnected {
            reconnect: self.reconnect,
        }
    }
}

/// A connection's user and team, and when it was opened (its WebSocket upgraded).
#[derive(Debug)]
struct Opened {
    user: UserId,
    team: TeamId,
    at: Instant,
}

/// The orders taken, and the connections they may close.
#[derive(Debug, Default)]
pub struct Disconnects {
    /// The ring manager's generation and version this gateway has taken the orders of.
    generation: u64,
    version: u64,
    /// Orders taken lately and when, oldest first.
    recent: VecDeque<(Instant, Order)>,
    /// Open (and opening) connections.
    conns: HashMap<ConnId, Opened>,
    /// The same, by user: an order looks at its user's connections only.
    by_user: HashMap<UserId, Vec<ConnId>>,
}

impl Disconnects {
    /// The (generation, version) held, for the report.
    pub fn held(&self) -> (u64, u64) {
        (self.generation, self.version)
    }

    /// Connection `conn` of `user`, `team`, opened at `at`.
    pub fn opened(&mut self, conn: ConnId, user: UserId, team: TeamId, at: Instant) {
        self.by_user.entry(user.clone()).or_default().push(conn);
        self.conns.insert(conn, Opened { user, team, at });
    }

    /// Connection `conn` ended.
    pub fn closed(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(conns) = self.by_user.get_mut(&c.user) {
            conns.retain(|&other| other != conn);
            if conns.is_empty() {
                self.by_user.remove(&c.user);
            }
        }
    }

    /// Takes a directive's `orders` (now at `generation`, `version`) at `now`; returns the
    /// connections to close and the order that closes each.
    pub fn take(
        &mut self,
        (generation, version): (u64, u64),
        orders: Vec<Order>,
        now: Instant,
    ) -> Vec<(ConnId, Order)> {
        self.generation = generation;
        self.version = version;
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= RECENT_TTL)
        {
            self.recent.pop_front();
        }
        let mut doomed = Vec::new();
        for order in orders {
            let theirs = self.by_user.get(&order.user).into_iter().flatten();
            for conn in theirs {
                if let Some(c) = self.conns.get(conn)
                    && order.matches(&c.user, &c.team)
                {
                    doomed.push((*conn, order.clone()));
                }
            }
            if self.recent.len() == MAX_RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back((now, order));
        }
        doomed
    }

    /// The newest order that arrived since connection `conn` opened and matches it: a
    /// connection registering now that was still opening when the order came.
    pub fn pending_for(&self, conn: ConnId) -> Option<&Order> {
        let c = self.conns.get(&conn)?;
        self.recent
            .iter()
            .rev()
            .take_while(|(at, _)| *at > c.at)
            .map(|(_, order)| order)
            .find(|order| order.matches(&c.user, &c.team))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(user: &str, team: Option<&str>, reconnect: bool) -> Order {
        Order::from_proto(&pb::DisconnectOrder {
            user: user.into(),
            team: team.unwrap_or("").into(),
            reason: "bye".into(),
            reconnect,
            issued_at_ms: 1,
        })
        .unwrap()
    }

    fn ids(user: &str, team: &str) -> (UserId, TeamId) {
        (UserId::new(user).unwrap(), TeamId::new(team).unwrap())
    }

    #[test]
    fn an_order_closes_the_users_connections_of_its_team_or_all_of_them() {
        let mut d = Disconnects::default();
        let now = Instant::now();
        let (u1, t1) = ids("U1", "T1");
        let (_, t2) = ids("U1", "T2");
        let (u2, _) = ids("U2", "T1");
        d.opened(1, u1.clone(), t1.clone(), now);
        d.opened(2, u1.clone(), t2.clone(), now);
        d.opened(3, u2.clone(), t1.clone(), now);
        let mut doomed = d.take((7, 1), vec![order("U1", Some("T1"), true)], now);
        doomed.sort_by_key(|(c, _)| *c);
        assert_eq!(doomed.len(), 1);
        assert_eq!(doomed[0].0, 1);
        assert_eq!(doomed[0].1.close().code(), 4010);
        assert_eq!(d.held(), (7, 1));
        let mut doomed: Vec<ConnId> = d
            .take((7, 2), vec![order("U1", None, false)], now)
            .into_iter()
            .map(|(c, o)| {
                assert_eq!(o.close().code(), 4011);
                c
            })
            .collect();
        doomed.sort();
        assert_eq!(doomed, [1, 2]);
        // A bad id is no order.
        let bad = pb::DisconnectOrder {
            user: "not a user".into(),
            ..pb::DisconnectOrder::default()
        };
        assert_eq!(Order::from_proto(&bad), None);
    }

    #[test]
    fn a_connection_opening_when_the_order_came_is_closed_as_it_registers_and_a_later_one_is_not() {
        let mut d = Disconnects::default();
        let start = Instant::now();
        let (u1, t1) = ids("U1", "T1");
        d.opened(1, u1.clone(), t1.clone(), start);
        let later = start + Duration::from_millis(10);
        // Connection 1 is still in its handshake (the region state has no closer for it):
        // the order is kept for it.
        d.take((7, 1), vec![order("U1", None, false)], later);
        assert_eq!(d.pending_for(1).map(|o| o.reconnect), Some(false));
        // Connection 2 opened after the order arrived: untouched.
        d.opened(2, u1.clone(), t1.clone(), later + Duration::from_millis(1));
        assert_eq!(d.pending_for(2), None);
        d.closed(1);
        assert_eq!(d.pending_for(1), None);
        assert_eq!(d.by_user[&u1], [2]);
        // Orders are forgotten after a while.
        d.opened(3, u1, t1, start);
        d.take((7, 1), vec![], later + RECENT_TTL);
        assert_eq!(d.pending_for(3), None);
        d.closed(2);
        d.closed(3);
        assert!(d.by_user.is_empty() && d.conns.is_empty());
    }
}
