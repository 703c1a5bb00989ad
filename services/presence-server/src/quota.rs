//! Per-team connection caps, without I/O: the connections each gateway session holds for each
//! team's users, and whether one more fits.
//!
//! The presence server that owns a team counts for it, so every connect of the team, through
//! any gateway in any region, is decided here, one at a time: a burst of simultaneous
//! connects cannot pass the cap together. A session's holdings go with the session (its
//! gateway died or lost its lease) and are replaced by its snapshot after a reconnect.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_core::{TeamId, UserId};

use crate::state::SessionId;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The team holds its cap.
    Team,
    /// The user holds their cap.
    User,
    /// This server has just taken the team over and not yet heard every gateway: retry.
    Warming,
}

impl Refusal {
    /// The wire name (`Acquired.refused`).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Team => "team",
            Refusal::User => "user",
            Refusal::Warming => "warming",
        }
    }
}

#[derive(Debug, Default)]
struct Team {
    total: u32,
    users: HashMap<UserId, u32>,
    /// Per session, its connections per user.
    sessions: HashMap<SessionId, HashMap<UserId, u32>>,
}

/// Connection counts of the teams one presence server owns.
#[derive(Debug, Default)]
pub struct Quotas {
    teams: HashMap<TeamId, Team>,
    /// Per session, recent grants by request number, with when they were made: a snapshot
    /// the gateway built before hearing a grant does not count it, and lists it as pending.
    granted: HashMap<SessionId, HashMap<u64, (TeamId, UserId, Instant)>>,
}

/// How long a grant is remembered for a snapshot that may not have heard of it yet (gateways
/// give up waiting for an answer well before).
pub const GRANT_MEMORY: Duration = Duration::from_secs(10);

impl Quotas {
    /// Connections the team holds across every gateway.
    pub fn team_connections(&self, team: &TeamId) -> u32 {
        self.teams.get(team).map_or(0, |t| t.total)
    }

    /// Teams with connections.
    pub fn len(&self) -> usize {
        self.teams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.teams.is_empty()
    }

    /// One more connection of `user` of `team` through `session`, if it fits both caps
    /// (0: no cap).
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &mut self,
        session: SessionId,
        request: u64,
        team: &TeamId,
        user: &UserId,
        team_limit: u32,
        user_limit: u32,
        now: Instant,
    ) -> Result<(), Refusal> {
        let entry = self.teams.entry(team.clone()).or_default();
        if team_limit > 0 && entry.total >= team_limit {
            return Err(Refusal::Team);
        }
        let held = entry.users.get(user).copied().unwrap_or(0);
        if user_limit > 0 && held >= user_limit {
            return Err(Refusal::User);
        }
        self.count(session, team.clone(), user.clone(), 1);
        let grants = self.granted.entry(session).or_default();
        grants.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < GRANT_MEMORY);
        grants.insert(request, (team.clone(), user.clone(), now));
        Ok(())
    }

    fn count(&mut self, session: SessionId, team: TeamId, user: UserId, n: u32) {
        let entry = self.teams.entry(team).or_default();
        entry.total += n;
        *entry.users.entry(user.clone()).or_default() += n;
        *entry
            .sessions
            .entry(session)
            .or_default()
            .entry(user)
            .or_default() += n;
    }

    /// One connection of `user` of `team` through `session` ended.
    pub fn release(&mut self, session: SessionId, team: &TeamId, user: &UserId) {
        let Some(entry) = self.teams.get_mut(team) else {
            return;
        };
        let Some(held) = entry.sessions.get_mut(&session) else {
            return;
        };
        let Some(n) = held.get_mut(user) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            held.remove(user);
            if held.is_empty() {
                entry.sessions.remove(&session);
            }
        }
        entry.total -= 1;
        if let Some(u) = entry.users.get_mut(user) {
            *u -= 1;
            if *u == 0 {
                entry.users.remove(user);
            }
        }
        if entry.total == 0 {
            self.teams.remove(team);
        }
    }

    /// Replaces everything `session` holds with `held` (its gateway's snapshot), plus what
    /// this server granted to the requests the snapshot lists as still `pending`.
    pub fn replace(
        &mut self,
        session: SessionId,
        held: Vec<(TeamId, UserId, u32)>,
        pending: &[u64],
    ) {
        let mut grants = self.granted.remove(&session).unwrap_or_default();
        grants.retain(|request, _| pending.contains(request));
        self.drop_session(session);
        for (team, user, n) in held {
            if n > 0 {
                self.count(session, team, user, n);
            }
        }
        for (team, user, _) in grants.values() {
            self.count(session, team.clone(), user.clone(), 1);
        }
        if !grants.is_empty() {
            self.granted.insert(session, grants);
        }
    }

    /// `session` ended: what it held is free.
    pub fn drop_session(&mut self, session: SessionId) {
        self.granted.remove(&session);
        self.teams.retain(|_, entry| {
            if let Some(held) = entry.sessions.remove(&session) {
                for (user, n) in held {
                    entry.total -= n;
                    if let Some(u) = entry.users.get_mut(&user) {
                        *u -= n;
                        if *u == 0 {
                            entry.users.remove(&user);
                        }
                    }
                }
            }
            entry.total > 0
        });
    }

    /// After a ring change: forgets the teams `owned` says are no longer ours.
    pub fn retain(&mut self, owned: impl Fn(&TeamId) -> bool) {
        self.teams.retain(|team, _| owned(team));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str) -> TeamId {
        TeamId::new(id).unwrap()
    }

    fn u(id: &str) -> UserId {
        UserId::new(id).unwrap()
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn the_team_cap_holds_across_sessions() {
        let mut q = Quotas::default();
        let team = t("T1");
        for i in 0..5 {
            let session = i % 2;
            q.acquire(session, i, &team, &u(&format!("U{i}")), 5, 0, now())
                .unwrap();
        }
        assert_eq!(
            q.acquire(0, 0, &team, &u("U9"), 5, 0, now()),
            Err(Refusal::Team)
        );
        assert_eq!(
            q.acquire(1, 0, &team, &u("U9"), 5, 0, now()),
            Err(Refusal::Team)
        );
        q.release(1, &team, &u("U1"));
        assert_eq!(q.acquire(0, 0, &team, &u("U9"), 5, 0, now()), Ok(()));
        assert_eq!(q.team_connections(&team), 5);
    }

    #[test]
    fn the_user_cap_holds_and_other_teams_are_apart() {
        let mut q = Quotas::default();
        let user = u("U1");
        q.acquire(0, 0, &t("T1"), &user, 0, 2, now()).unwrap();
        q.acquire(1, 0, &t("T1"), &user, 0, 2, now()).unwrap();
        assert_eq!(
            q.acquire(0, 0, &t("T1"), &user, 0, 2, now()),
            Err(Refusal::User)
        );
        assert_eq!(q.acquire(0, 0, &t("T2"), &u("U2"), 1, 0, now()), Ok(()));
        assert_eq!(
            q.acquire(0, 0, &t("T2"), &u("U3"), 1, 0, now()),
            Err(Refusal::Team)
        );
    }

    #[test]
    fn a_dropped_session_frees_what_it_held_and_a_snapshot_replaces_it() {
        let mut q = Quotas::default();
        let team = t("T1");
        q.acquire(0, 0, &team, &u("U1"), 3, 0, now()).unwrap();
        q.acquire(1, 0, &team, &u("U2"), 3, 0, now()).unwrap();
        q.acquire(1, 0, &team, &u("U2"), 3, 0, now()).unwrap();
        q.drop_session(1);
        assert_eq!(q.team_connections(&team), 1);
        q.replace(
            0,
            vec![(team.clone(), u("U1"), 2), (team.clone(), u("U3"), 1)],
            &[],
        );
        assert_eq!(q.team_connections(&team), 3);
        assert_eq!(
            q.acquire(2, 0, &team, &u("U4"), 3, 0, now()),
            Err(Refusal::Team)
        );
        // A release the session never held changes nothing.
        q.release(2, &team, &u("U1"));
        assert_eq!(q.team_connections(&team), 3);
        q.drop_session(0);
        assert!(q.is_empty());
    }

    #[test]
    fn a_snapshot_built_before_a_grant_keeps_counting_it() {
        let mut q = Quotas::default();
        let team = t("T1");
        q.acquire(0, 7, &team, &u("U1"), 2, 0, now()).unwrap();
        q.acquire(0, 8, &team, &u("U2"), 2, 0, now()).unwrap();
        // The gateway heard grant 7, not yet 8.
        q.replace(0, vec![(team.clone(), u("U1"), 1)], &[8]);
        assert_eq!(q.team_connections(&team), 2);
        assert_eq!(
            q.acquire(0, 9, &team, &u("U3"), 2, 0, now()),
            Err(Refusal::Team)
        );
        // Once heard, the next snapshot counts it among the held.
        q.replace(
            0,
            vec![(team.clone(), u("U1"), 1), (team.clone(), u("U2"), 1)],
            &[],
        );
        assert_eq!(q.team_connections(&team), 2);
    }
}
