//! The presence state machine, without I/O: what each gateway session reports, who watches
//! whom, and which presence changes to send to which session.
//!
//! A user is active while some session reports a live connection for them and they have not
//! set themselves away; away otherwise. Becoming active is published at once; becoming away
//! only after the grace period, so a reconnect within it produces no away/active pair — except
//! a manual away, which is published at once.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use mesh_core::UserId;

/// One gateway stream, numbered by the server.
pub type SessionId = u64;

/// Presence changes to send: per session, (user, active) pairs.
pub type Notices = HashMap<SessionId, Vec<(UserId, bool)>>;

#[derive(Debug, Default)]
struct Session {
    /// Live connections per user on that gateway.
    online: HashMap<UserId, u32>,
    watched: HashSet<UserId>,
}

#[derive(Debug, Default)]
struct User {
    /// Sessions reporting at least one live connection.
    online_in: u32,
    /// The newest manual setting: (away, set at ms).
    manual: Option<(bool, u64)>,
    /// What watchers were last told.
    published: Option<bool>,
    /// Becomes away at this time unless it comes back first.
    away_at: Option<Instant>,
    watchers: HashSet<SessionId>,
}

impl User {
    fn computed(&self) -> bool {
        self.online_in > 0 && !self.manual.is_some_and(|(away, _)| away)
    }

    fn idle(&self) -> bool {
        self.online_in == 0
            && self.manual.is_none()
            && self.watchers.is_empty()
            && self.away_at.is_none()
    }
}

/// Presence of the users one server owns.
#[derive(Debug)]
pub struct Presence {
    grace: Duration,
    sessions: HashMap<SessionId, Session>,
    users: HashMap<UserId, User>,
    /// While set, changes are held (after gaining users, until their gateways re-reported).
    warm_until: Option<Instant>,
    /// Users whose watchers must hear their state when warming ends.
    dirty: HashSet<UserId>,
}

impl Presence {
    pub fn new(grace: Duration) -> Self {
        Presence {
            grace,
            sessions: HashMap::new(),
            users: HashMap::new(),
            warm_until: None,
            dirty: HashSet::new(),
        }
    }

    /// The current presence of `user` as watchers know it (or would, on watching).
    pub fn get(&self, user: &UserId) -> bool {
        self.users
            .get(user)
            .map(|u| u.published.unwrap_or_else(|| u.computed()))
            .unwrap_or(false)
    }

    /// True while changes are held after gaining users (see [`Presence::rebalance`]).
    pub fn warming(&self, now: Instant) -> bool {
        self.warm_until.is_some_and(|t| now < t)
    }

    /// Users tracked (online, watched, or with a manual setting).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Replaces everything `session` reported.
    pub fn snapshot(
        &mut self,
        session: SessionId,
        online: Vec<(UserId, u32)>,
        manual: Vec<(UserId, bool, u64)>,
        watched: Vec<UserId>,
        now: Instant,
    ) -> Notices {
        let mut notices = Notices::new();
        let old = self
            .sessions
            .insert(session, Session::default())
            .unwrap_or_default();
        // Out with the old reports, in with the new: a user in both is never published away
        // in between, since away waits for the grace.
        for user in old.online.keys() {
            self.adjust(user, -1, now, &mut notices);
        }
        for (user, n) in online {
            self.set_online(session, &user, n, now, &mut notices);
        }
        for (user, away, at) in manual {
            self.set_manual(&user, away, at, now, &mut notices);
        }
        let new: HashSet<UserId> = watched.into_iter().collect();
        let gone: Vec<UserId> = old.watched.difference(&new).cloned().collect();
        self.unwatch(session, &gone);
        let added: Vec<UserId> = new.difference(&old.watched).cloned().collect();
        if let Some(s) = self.sessions.get_mut(&session) {
            s.watched = old.watched.intersection(&new).cloned().collect();
        }
        notices.extend_session(session, self.watch(session, &added));
        notices
    }

    /// `user` has `n` live connections on `session`'s gateway.
    pub fn online(&mut self, session: SessionId, user: &UserId, n: u32, now: Instant) -> Notices {
        let mut notices = Notices::new();
        self.set_online(session, user, n, now, &mut notices);
        notices
    }

    fn set_online(
        &mut self,
        session: SessionId,
        user: &UserId,
        n: u32,
        now: Instant,
        notices: &mut Notices,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let was = s.online.get(user).copied().unwrap_or(0) > 0;
        if n > 0 {
            s.online.insert(user.clone(), n);
        } else {
            s.online.remove(user);
        }
        match (was, n > 0) {
            (false, true) => self.adjust(user, 1, now, notices),
            (true, false) => self.adjust(user, -1, now, notices),
            _ => {}
        }
    }

    fn adjust(&mut self, user: &UserId, delta: i32, now: Instant, notices: &mut Notices) {
        let u = self.users.entry(user.clone()).or_default();
        u.online_in = u.online_in.saturating_add_signed(delta);
        self.settle(user, now, notices);
    }

    /// A manual setting; the newest (by `at`) wins.
    pub fn manual(&mut self, user: &UserId, away: bool, at: u64, now: Instant) -> Notices {
        let mut notices = Notices::new();
        self.set_manual(user, away, at, now, &mut notices);
        notices
    }

    fn set_manual(
        &mut self,
        user: &UserId,
        away: bool,
        at: u64,
        now: Instant,
        notices: &mut Notices,
    ) {
        let u = self.users.entry(user.clone()).or_default();
        if u.manual.is_some_and(|(_, t)| t > at) {
            return;
        }
        u.manual = Some((away, at));
        // A user who says they are away is away at once: only automatic changes are coalesced.
        if away && u.published == Some(true) {
            u.published = Some(false);
            u.away_at = None;
            if self.warm_until.is_some() {
                self.dirty.insert(user.clone());
            } else {
                notify(notices, &u.watchers, user, false);
            }
        }
        self.settle(user, now, notices);
    }

    /// Re-decides `user` after a change: publish active at once, away after the grace.
    fn settle(&mut self, user: &UserId, now: Instant, notices: &mut Notices) {
        let warming = self.warm_until.is_some();
        let grace = self.grace;
        let Some(u) = self.users.get_mut(user) else {
            return;
        };
        let computed = u.computed();
        if u.published == Some(computed) {
            u.away_at = None;
        } else if computed {
            u.away_at = None;
            u.published = Some(true);
            if warming {
                self.dirty.insert(user.clone());
            } else {
                notify(notices, &u.watchers, user, true);
            }
        } else if u.published.is_none() {
            u.published = Some(false);
        } else if u.away_at.is_none() {
            u.away_at = Some(now + grace);
        }
        if u.idle() && u.published != Some(true) {
            self.users.remove(user);
        }
    }

    /// `session` watches `users`; returns their presence for it.
    pub fn watch(&mut self, session: SessionId, users: &[UserId]) -> Vec<(UserId, bool)> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Vec::new();
        };
        let mut answer = Vec::new();
        for user in users {
            s.watched.insert(user.clone());
            let u = self.users.entry(user.clone()).or_default();
            u.watchers.insert(session);
            let computed = u.computed();
            let active = *u.published.get_or_insert(computed);
            if self.warm_until.is_some() {
                self.dirty.insert(user.clone());
            } else {
                answer.push((user.clone(), active));
            }
        }
        answer
    }

    /// `session` stops watching `users`.
    pub fn unwatch(&mut self, session: SessionId, users: &[UserId]) {
        if let Some(s) = self.sessions.get_mut(&session) {
            for user in users {
                s.watched.remove(user);
            }
        }
        for user in users {
            if let Some(u) = self.users.get_mut(user) {
                u.watchers.remove(&session);
                if u.idle() && u.published != Some(true) {
                    self.users.remove(user);
                }
            }
        }
    }

    /// `session` ended (its gateway went away or lost its lease): its reports no longer count.
    pub fn drop_session(&mut self, session: SessionId, now: Instant) -> Notices {
        let mut notices = Notices::new();
        let Some(s) = self.sessions.remove(&session) else {
            return notices;
        };
        for user in s.watched {
            if let Some(u) = self.users.get_mut(&user) {
                u.watchers.remove(&session);
            }
        }
        for (user, _) in s.online {
            self.adjust(&user, -1, now, &mut notices);
        }
        notices
    }

    /// Publishes what is due: aways past their grace, and everything held while warming.
    pub fn tick(&mut self, now: Instant) -> Notices {
        let mut notices = Notices::new();
        if self.warm_until.is_some_and(|t| now >= t) {
            self.warm_until = None;
            for user in std::mem::take(&mut self.dirty) {
                if let Some(u) = self.users.get(&user) {
                    let active = u.published.unwrap_or(false);
                    notify(&mut notices, &u.watchers, &user, active);
                }
            }
        }
        if self.warm_until.is_some() {
            return notices;
        }
        let due: Vec<UserId> = self
            .users
            .iter()
            .filter(|(_, u)| u.away_at.is_some_and(|t| now >= t))
            .map(|(id, _)| id.clone())
            .collect();
        for user in due {
            let Some(u) = self.users.get_mut(&user) else {
                continue;
            };
            u.away_at = None;
            if !u.computed() {
                u.published = Some(false);
                notify(&mut notices, &u.watchers, &user, false);
                if u.idle() {
                    self.users.remove(&user);
                }
            }
        }
        notices
    }

    /// After a ring change: forgets users `owned` says are no longer ours, and holds changes
    /// for `warm_up` so that gateways can re-report the users we gained before anyone hears a
    /// state rebuilt from half the reports.
    pub fn rebalance(
        &mut self,
        owned: impl Fn(&UserId) -> bool,
        gained: bool,
        now: Instant,
        warm_up: Duration,
    ) {
        self.users.retain(|user, _| owned(user));
        for s in self.sessions.values_mut() {
            s.online.retain(|user, _| owned(user));
            s.watched.retain(|user| owned(user));
        }
        self.dirty.retain(|user| owned(user));
        if gained {
            self.warm_until = Some(now + warm_up);
        }
    }
}

fn notify(notices: &mut Notices, watchers: &HashSet<SessionId>, user: &UserId, active: bool) {
    for session in watchers {
        notices
            .entry(*session)
            .or_default()
            .push((user.clone(), active));
    }
}

trait ExtendSession {
    fn extend_session(&mut self, session: SessionId, items: Vec<(UserId, bool)>);
}

impl ExtendSession for Notices {
    fn extend_session(&mut self, session: SessionId, items: Vec<(UserId, bool)>) {
        if !items.is_empty() {
            self.entry(session).or_default().extend(items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(2);

    fn u(id: &str) -> UserId {
        UserId::new(id).unwrap()
    }

    #[test]
    fn a_watcher_hears_active_then_away_after_the_grace() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![], vec![], vec![], t0);
        p.snapshot(2, vec![], vec![], vec![], t0);
        assert_eq!(p.watch(1, &[u("UB")]), vec![(u("UB"), false)]);
        let n = p.online(2, &u("UB"), 1, t0);
        assert_eq!(n[&1], vec![(u("UB"), true)]);
        // A second device, then one closes: nothing to say.
        assert!(p.online(2, &u("UB"), 2, t0).is_empty());
        assert!(p.online(2, &u("UB"), 1, t0).is_empty());
        // The last closes: away only after the grace.
        assert!(p.online(2, &u("UB"), 0, t0).is_empty());
        assert!(p.tick(t0 + GRACE / 2).is_empty());
        assert_eq!(p.tick(t0 + GRACE)[&1], vec![(u("UB"), false)]);
        assert!(!p.get(&u("UB")));
    }

    #[test]
    fn a_reconnect_within_the_grace_says_nothing() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![], vec![], vec![u("UB")], t0);
        p.snapshot(2, vec![(u("UB"), 1)], vec![], vec![], t0);
        assert!(p.online(2, &u("UB"), 0, t0).is_empty());
        // It comes back on another gateway before the grace ends.
        p.snapshot(3, vec![(u("UB"), 1)], vec![], vec![], t0 + GRACE / 2);
        assert!(p.tick(t0 + GRACE * 2).is_empty());
        assert!(p.get(&u("UB")));
    }

    #[test]
    fn a_dropped_session_takes_its_users_away_and_manual_away_overrides() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![], vec![], vec![u("UB"), u("UC")], t0);
        p.snapshot(2, vec![(u("UB"), 1), (u("UC"), 1)], vec![], vec![], t0);
        let n = p.manual(&u("UC"), true, 10, t0);
        assert_eq!(n[&1], vec![(u("UC"), false)], "away by hand is at once");
        // An older setting from another gateway loses.
        assert!(p.manual(&u("UC"), false, 5, t0).is_empty());
        assert!(p.tick(t0 + GRACE).is_empty());
        p.drop_session(2, t0 + GRACE);
        assert_eq!(p.tick(t0 + GRACE * 2)[&1], vec![(u("UB"), false)]);
        // Back to automatic: active again at once while connected.
        p.snapshot(3, vec![(u("UC"), 1)], vec![], vec![], t0);
        assert_eq!(p.manual(&u("UC"), false, 20, t0)[&1], vec![(u("UC"), true)]);
    }

    #[test]
    fn warming_holds_changes_then_tells_watchers_once() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.rebalance(|_| true, true, t0, Duration::from_millis(500));
        p.snapshot(1, vec![], vec![], vec![u("UB")], t0);
        assert!(
            p.snapshot(2, vec![(u("UB"), 1)], vec![], vec![], t0)
                .is_empty()
        );
        assert!(p.tick(t0).is_empty());
        assert_eq!(
            p.tick(t0 + Duration::from_millis(500))[&1],
            vec![(u("UB"), true)]
        );
        // Users no longer owned are forgotten.
        p.rebalance(|_| false, false, t0, Duration::ZERO);
        assert!(p.is_empty());
    }
}
