//! What this gateway reports to presence servers about its own users: how many live local
//! connections each has (and the user's team, from their token), each connection's team and
//! when it opened (for the admin API's `ListConnections`), and the last manual setting
//! (`users.setPresence`) of each.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use mesh_core::{TeamId, UserId};

use crate::vocab::ConnId;

/// The most connections of one user a report details (the oldest); the count is whole.
pub(super) const MAX_DETAILED: usize = 1_000;

/// A user's live connections here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Here {
    pub(super) connections: u32,
    /// The team of the user's newest connection.
    pub(super) team: TeamId,
    /// When the first of these connections began (Unix ms): presence servers derive their
    /// webhook event ids from it.
    pub(super) since_ms: u64,
    /// Each connection, oldest first.
    pub(super) conns: Vec<Conn>,
}

/// One live connection, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Conn {
    pub(super) id: ConnId,
    /// The team its token names.
    pub(super) team: TeamId,
    /// When it opened, Unix milliseconds.
    pub(super) at_ms: u64,
}

/// Now, in Unix milliseconds.
pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long a user whose last connection here closed is still reported as having left (in
/// snapshots): longer than a presence server's grace plus a failover.
pub(super) const LEFT_KEPT: Duration = Duration::from_secs(30);
/// Users remembered as having left, at most (about 100 bytes each); past it the oldest go.
pub(super) const LEFT_MAX: usize = 100_000;

/// The users connected here, as presence servers are told.
#[derive(Debug, Default)]
pub(super) struct Reports {
    /// Live local connections per user.
    pub(super) online: HashMap<UserId, Here>,
    /// Users whose last connection here closed within [`LEFT_KEPT`]: (when, Unix ms; when).
    left: HashMap<UserId, (u64, Instant)>,
    /// The same leaves, oldest first (some stale: the user came back or left again), so that
    /// the oldest are forgotten in O(1); at most [`LEFT_MAX`].
    left_order: VecDeque<(UserId, Instant)>,
    /// The last manual setting relayed per user: (away, set at ms).
    pub(super) manual: HashMap<UserId, (bool, u64)>,
}

impl Reports {
    /// Connection `conn` of `user`, of `team`, opened at `at_ms`; true when it is the user's
    /// first: the user is online here now.
    pub(super) fn connected(
        &mut self,
        conn: ConnId,
        user: &UserId,
        team: &TeamId,
        at_ms: u64,
    ) -> bool {
        let here = self.online.entry(user.clone()).or_insert_with(|| Here {
            connections: 0,
            team: team.clone(),
            since_ms: at_ms,
            conns: Vec::new(),
        });
        here.connections += 1;
        here.team = team.clone();
        self.left.remove(user);
        here.conns.push(Conn {
            id: conn,
            team: team.clone(),
            at_ms,
        });
        here.connections == 1
    }

    /// Connection `conn` of `user` ended; true when it was the last: the user is offline here
    /// now, and its manual setting is forgotten.
    pub(super) fn disconnected(&mut self, conn: ConnId, user: &UserId) -> bool {
        let Some(here) = self.online.get_mut(user) else {
            return false;
        };
        here.conns.retain(|c| c.id != conn);
        here.connections = here.connections.saturating_sub(1);
        if here.connections == 0 {
            self.online.remove(user);
            self.manual.remove(user);
            self.remember_left(user);
            return true;
        }
        false
    }

    /// Remembers that `user`'s last connection here closed now, forgetting the oldest when
    /// [`LEFT_MAX`] are remembered.
    fn remember_left(&mut self, user: &UserId) {
        let now = Instant::now();
        while let Some((oldest, at)) = self.left_order.front() {
            if self.left_order.len() < LEFT_MAX && now.duration_since(*at) < LEFT_KEPT {
                break;
            }
            // Forgotten unless that user left again since (a newer entry).
            if self.left.get(oldest).is_some_and(|(_, t)| t == at) {
                self.left.remove(oldest);
            }
            self.left_order.pop_front();
        }
        self.left.insert(user.clone(), (unix_ms(), now));
        self.left_order.push_back((user.clone(), now));
    }

    /// When `user`'s last connection here closed (Unix ms), if within [`LEFT_KEPT`].
    pub(super) fn left_ms(&self, user: &UserId) -> Option<u64> {
        self.left
            .get(user)
            .filter(|(_, at)| at.elapsed() < LEFT_KEPT)
            .map(|(ms, _)| *ms)
    }

    /// Users whose last connection here closed within [`LEFT_KEPT`], with when (Unix ms).
    pub(super) fn recently_left(&self) -> impl Iterator<Item = (&UserId, u64)> {
        self.left
            .iter()
            .filter(|(_, (_, at))| at.elapsed() < LEFT_KEPT)
            .map(|(user, (ms, _))| (user, *ms))
    }

    /// `user` set `away` (or back to automatic) at `at` ms. Kept while the user is connected
    /// here (and until then), so that snapshots carry it.
    pub(super) fn set_manual(&mut self, user: &UserId, away: bool, at: u64) {
        self.manual.insert(user.clone(), (away, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_and_the_last_connection_change_what_is_reported() {
        let mut reports = Reports::default();
        let (u1, t1) = (UserId::new("U1").unwrap(), TeamId::new("T1").unwrap());
        let t2 = TeamId::new("T2").unwrap();
        assert!(reports.connected(1, &u1, &t1, 10));
        assert!(!reports.connected(2, &u1, &t2, 20));
        reports.set_manual(&u1, true, 5);
        assert!(!reports.disconnected(1, &u1));
        let here = Here {
            connections: 1,
            team: t2.clone(),
            since_ms: 10,
            conns: vec![Conn {
                id: 2,
                team: t2,
                at_ms: 20,
            }],
        };
        assert_eq!(reports.online[&u1], here);
        assert!(reports.disconnected(2, &u1));
        assert!(reports.online.is_empty() && reports.manual.is_empty());
        // Remembered as having left, until back.
        assert!(reports.left_ms(&u1).is_some_and(|t| t >= here.since_ms));
        assert_eq!(reports.recently_left().count(), 1);
        // A user never seen (or already gone) changes nothing.
        assert!(!reports.disconnected(2, &u1));
        reports.connected(3, &u1, &TeamId::new("T1").unwrap(), 30);
        assert_eq!(reports.left_ms(&u1), None);
    }

    #[test]
    fn at_most_left_max_leaves_are_remembered_the_oldest_forgotten_first() {
        let mut reports = Reports::default();
        let team = TeamId::new("T1").unwrap();
        for i in 0..LEFT_MAX + 10 {
            let user = UserId::new(&format!("U{i}")).unwrap();
            reports.connected(i as u64, &user, &team, 1);
            reports.disconnected(i as u64, &user);
        }
        assert!(reports.left.len() <= LEFT_MAX && reports.left_order.len() <= LEFT_MAX);
        assert_eq!(reports.left_ms(&UserId::new("U0").unwrap()), None);
        let newest = UserId::new(&format!("U{}", LEFT_MAX + 9)).unwrap();
        assert!(reports.left_ms(&newest).is_some());
    }

    #[test]
    fn a_manual_setting_waits_for_the_user_to_connect() {
        let mut reports = Reports::default();
        let u1 = UserId::new("U1").unwrap();
        reports.set_manual(&u1, true, 5);
        reports.set_manual(&u1, false, 6);
        assert_eq!(reports.manual[&u1], (false, 6));
        assert!(reports.connected(1, &u1, &TeamId::new("T1").unwrap(), 1));
        assert_eq!(reports.manual[&u1], (false, 6));
    }
}
