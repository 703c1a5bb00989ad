//! What this gateway reports to presence servers about its own users: how many live local
//! connections each has (and the user's team, from their token), each connection's team and
//! when it opened (for the admin API's `ListConnections`), and the last manual setting
//! (`users.setPresence`) of each.

use std::collections::HashMap;

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

/// The users connected here, as presence servers are told.
#[derive(Debug, Default)]
pub(super) struct Reports {
    /// Live local connections per user.
    pub(super) online: HashMap<UserId, Here>,
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
            return true;
        }
        false
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
        // A user never seen (or already gone) changes nothing.
        assert!(!reports.disconnected(2, &u1));
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
