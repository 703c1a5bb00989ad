//! The presence state machine, without I/O: what each gateway session reports, who watches
//! whom, and which presence changes to send to which session.
//!
//! A user is active while some session reports a live connection for them and they have not
//! set themselves away; away otherwise. Becoming active is published at once; becoming away
//! only after the grace period, so a reconnect within it produces no away/active pair — except
//! a manual away, which is published at once.
//!
//! A server answers and publishes only about users it owns in the newest ring it has seen.
//! After a ring change the gateways and this server learn the new ring in either order: a
//! gateway's report about a user this server does not own yet is taken in, but what it would
//! say about that user is held (as while warming up) until a ring gives it the user (then it
//! warms up and says it once) or it is forgotten with the ring that says it is not ours.
//!
//! Every change of what watchers hear (a user's published presence) is also kept as a
//! [`Change`] for the `presence_changed` webhook, taken with [`Presence::take_changes`]: when
//! it is published (active at once, away after the grace), and, when warming up ends, once
//! more for each connected user whose state was held (a takeover re-announces the users who
//! stayed connected; those a gateway says left recently go away after the grace, see
//! [`Presence::recently_left`]). Each change carries the time its state began as the gateways
//! know it (the user's oldest live connection, when their last one closed, or the manual
//! setting's time), so that two servers announcing the same fact give it the same id.
//!
//! Each user's team comes with the reports of their connections (the gateway read it from the
//! user's token) and goes out with every answer and change, so that a gateway shows a user's
//! presence only to clients of the same team. It is kept while the user is tracked, then
//! remembered for the [`REMEMBERED_TEAMS`] users last forgotten; a user whose team is not
//! known (never online since this server owned them) is answered without one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use lru::LruCache;
use mesh_core::{ChannelId, SLOT_COUNT, Slot, TeamId, UserId, slot_of};

/// One gateway stream, numbered by the server.
pub type SessionId = u64;

/// Users no longer tracked (offline, watched by nobody) whose team a server remembers, the
/// least recently forgotten dropped first: so that an offline user's teammates still read
/// them as away. About 100 bytes each.
pub const REMEMBERED_TEAMS: NonZeroUsize = NonZeroUsize::new(100_000).expect("not zero");

/// A user's presence as a watcher hears it, with the user's team when it is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub user: UserId,
    pub active: bool,
    pub team: Option<TeamId>,
}

/// Presence changes to send, per session.
pub type Notices = HashMap<SessionId, Vec<Notice>>;

/// A change of a user's published presence, for the `presence_changed` webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub user: UserId,
    pub active: bool,
    pub team: Option<TeamId>,
    /// When the user's new state began, as the gateways report it (Unix ms): the start of
    /// their oldest live connection (or of their manual "back") for active, the manual
    /// setting's time for away by hand, when their last connection closed for away after the
    /// grace. `None` when no gateway said: a fact only this server knows.
    pub since_ms: Option<u64>,
}

/// A user's connections on one gateway, as its session reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    pub user: UserId,
    /// Live connections there (0: none left).
    pub connections: u32,
    /// The user's team, from their token (`None`: a gateway that does not say).
    pub team: Option<TeamId>,
    /// When their oldest live connection there began (Unix ms; 0: the gateway does not say).
    pub since_ms: u64,
    /// With no connection left there: when the last one closed (Unix ms; 0: not said).
    pub left_ms: u64,
    /// Each of those connections (empty from a gateway that does not say).
    pub details: Vec<ConnDetail>,
}

/// One live connection as its gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnDetail {
    /// The team its token names (`None`: not said, or not an id).
    pub team: Option<TeamId>,
    /// When it opened, Unix milliseconds.
    pub connected_at_ms: u64,
}

/// One of a user's live connections, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub gateway: String,
    pub region: String,
    pub team: Option<TeamId>,
    pub connected_at_ms: u64,
}

#[derive(Debug, Default)]
struct Session {
    /// The gateway's id and region, as its snapshot named them.
    gateway: String,
    region: String,
    /// Live connections per user on that gateway.
    online: HashMap<UserId, u32>,
    /// Each live connection per user on that gateway, as reported.
    details: HashMap<UserId, Vec<ConnDetail>>,
    /// When each of those users' oldest live connection there began (Unix ms), when said.
    since_ms: HashMap<UserId, u64>,
    watched: HashSet<UserId>,
}

#[derive(Debug, Default)]
struct User {
    /// The team the user's connections were last reported with.
    team: Option<TeamId>,
    /// Sessions reporting at least one live connection.
    online_in: u32,
    /// The newest manual setting: (away, set at ms).
    manual: Option<(bool, u64)>,
    /// What watchers were last told.
    published: Option<bool>,
    /// Becomes away at this time unless it comes back first.
    away_at: Option<Instant>,
    /// While offline: when their last connection closed, as the gateways say (Unix ms).
    left_ms: Option<u64>,
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

    /// No longer needed: idle and not published active.
    fn forgettable(&self) -> bool {
        self.idle() && self.published != Some(true)
    }
}

/// Presence of the users one server owns.
#[derive(Debug)]
pub struct Presence {
    grace: Duration,
    sessions: HashMap<SessionId, Session>,
    users: HashMap<UserId, User>,
    /// The teams of users no longer tracked, most recently forgotten first.
    remembered: LruCache<UserId, TeamId>,
    /// While set, changes are held (after gaining users, until their gateways re-reported).
    warm_until: Option<Instant>,
    /// Users whose watchers must hear their state when warming ends (or, for users not
    /// owned yet, once a ring gives them to this server and its warming ends).
    dirty: HashSet<UserId>,
    /// Per slot, whether this server owns it in the newest ring it has seen (`None`: told of
    /// no ring, every user counts as owned).
    owned: Option<Box<[bool]>>,
    /// Published changes not taken yet (see [`Presence::take_changes`]).
    changes: Vec<Change>,
    /// Users set to go away, in the order their times come: (when, who). An entry whose
    /// user's `away_at` has changed since (came back, or left again later) is skipped. A tick
    /// looks only at those due, not at every user tracked (hundreds of thousands online).
    away_queue: VecDeque<(Instant, UserId)>,
    /// Users whose time to go away came while they were not this server's (a gateway saw a
    /// ring giving them to us before we did): looked at again each tick until they are ours
    /// or forgotten.
    away_unowned: Vec<(Instant, UserId)>,
}

impl Presence {
    pub fn new(grace: Duration) -> Self {
        Presence {
            grace,
            sessions: HashMap::new(),
            users: HashMap::new(),
            remembered: LruCache::new(REMEMBERED_TEAMS),
            warm_until: None,
            dirty: HashSet::new(),
            owned: None,
            changes: Vec::new(),
            away_queue: VecDeque::new(),
            away_unowned: Vec::new(),
        }
    }

    /// The changes published since the last call, in order.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// When `user`'s being active began, as the gateways report it: their oldest live
    /// connection's start, or their manual "back" if later.
    fn active_since(&self, user: &UserId) -> Option<u64> {
        let connected = self
            .sessions
            .values()
            .filter_map(|s| s.since_ms.get(user).copied())
            .filter(|&t| t > 0)
            .min()?;
        let back = match self.users.get(user).and_then(|u| u.manual) {
            Some((false, at)) => at,
            _ => 0,
        };
        Some(connected.max(back))
    }

    /// The change that says `user` is `active` now.
    fn change(&self, user: &UserId, active: bool) -> Change {
        let u = self.users.get(user);
        let since_ms = if active {
            self.active_since(user)
        } else {
            match u.and_then(|u| u.manual) {
                Some((true, at)) => Some(at),
                _ => None,
            }
        };
        Change {
            user: user.clone(),
            active,
            team: u.and_then(|u| u.team.clone()),
            since_ms,
        }
    }

    /// Whether `user` is this server's in the newest ring it has seen.
    fn owns(&self, user: &UserId) -> bool {
        owns(self.owned.as_deref(), user)
    }

    /// Whether what watchers would hear about `user` is held for now: while warming up, or
    /// while `user` is not ours (a gateway that saw a ring giving them to us before we did).
    fn holds(&self, user: &UserId) -> bool {
        self.warm_until.is_some() || !self.owns(user)
    }

    /// The current presence of `user` as watchers know it (or would, on watching), with
    /// their team if known.
    pub fn get(&self, user: &UserId) -> Notice {
        let tracked = self.users.get(user);
        Notice {
            user: user.clone(),
            active: tracked.is_some_and(|u| u.published.unwrap_or_else(|| u.computed())),
            team: match tracked {
                Some(u) => u.team.clone(),
                None => self.remembered.peek(user).cloned(),
            },
        }
    }

    /// `user`'s entry, made when there is none.
    fn track(&mut self, user: &UserId) -> &mut User {
        track(&mut self.users, &mut self.remembered, user)
    }

    /// Stops tracking `user` if nothing needs them any more, remembering their team.
    fn forget_if_unneeded(&mut self, user: &UserId) {
        if self.users.get(user).is_some_and(User::forgettable)
            && let Some(u) = self.users.remove(user)
            && let Some(team) = u.team
        {
            self.remembered.put(user.clone(), team);
        }
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
        online: Vec<Online>,
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
        for report in online {
            self.set_online(session, &report, now, &mut notices);
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

    /// Names `session`'s gateway and its region (from its snapshot), for
    /// [`Presence::connections`].
    pub fn name_session(&mut self, session: SessionId, gateway: String, region: String) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.gateway = gateway;
            s.region = region;
        }
    }

    /// `user`'s live connections as every session reports them, oldest first (whether or not
    /// this server owns the user: the caller routed by the ring).
    pub fn connections(&self, user: &UserId) -> Vec<Connection> {
        let mut all: Vec<Connection> = self
            .sessions
            .values()
            .flat_map(|s| {
                s.details
                    .get(user)
                    .into_iter()
                    .flatten()
                    .map(|d| Connection {
                        gateway: s.gateway.clone(),
                        region: s.region.clone(),
                        team: d.team.clone(),
                        connected_at_ms: d.connected_at_ms,
                    })
            })
            .collect();
        all.sort_by(|a, b| (a.connected_at_ms, &a.gateway).cmp(&(b.connected_at_ms, &b.gateway)));
        all
    }

    /// A user's live connections on `session`'s gateway now.
    pub fn online(&mut self, session: SessionId, report: &Online, now: Instant) -> Notices {
        let mut notices = Notices::new();
        self.set_online(session, report, now, &mut notices);
        notices
    }

    fn set_online(
        &mut self,
        session: SessionId,
        report: &Online,
        now: Instant,
        notices: &mut Notices,
    ) {
        let (user, n) = (&report.user, report.connections);
        if !self.sessions.contains_key(&session) {
            return;
        }
        if n > 0
            && let Some(team) = &report.team
        {
            // The newest report names the team: a user id belongs to one team.
            self.track(user).team = Some(team.clone());
        }
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let was = s.online.get(user).copied().unwrap_or(0) > 0;
        if n > 0 {
            s.online.insert(user.clone(), n);
            s.details.insert(user.clone(), report.details.clone());
            if report.since_ms > 0 {
                s.since_ms.insert(user.clone(), report.since_ms);
            }
        } else {
            s.online.remove(user);
            s.details.remove(user);
            s.since_ms.remove(user);
        }
        if was && n == 0 && report.left_ms > 0 {
            let u = self.track(user);
            u.left_ms = Some(u.left_ms.map_or(report.left_ms, |t| t.max(report.left_ms)));
        }
        match (was, n > 0) {
            (false, true) => self.adjust(user, 1, now, notices),
            (true, false) => self.adjust(user, -1, now, notices),
            _ => {}
        }
    }

    fn adjust(&mut self, user: &UserId, delta: i32, now: Instant, notices: &mut Notices) {
        let u = self.track(user);
        if delta > 0 && u.online_in == 0 {
            u.left_ms = None;
        }
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
        let held = self.holds(user);
        let u = track(&mut self.users, &mut self.remembered, user);
        if u.manual.is_some_and(|(_, t)| t > at) {
            return;
        }
        u.manual = Some((away, at));
        // A user who says they are away is away at once: only automatic changes are coalesced.
        if away && u.published == Some(true) {
            u.published = Some(false);
            u.away_at = None;
            if held {
                self.dirty.insert(user.clone());
            } else {
                notify(notices, u, user, false);
                let change = self.change(user, false);
                self.changes.push(change);
            }
        }
        self.settle(user, now, notices);
    }

    /// Re-decides `user` after a change: publish active at once, away after the grace.
    fn settle(&mut self, user: &UserId, now: Instant, notices: &mut Notices) {
        let held = self.holds(user);
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
            if held {
                self.dirty.insert(user.clone());
            } else {
                notify(notices, u, user, true);
                let change = self.change(user, true);
                self.changes.push(change);
            }
        } else if u.published.is_none() {
            u.published = Some(false);
        } else if u.away_at.is_none() {
            u.away_at = Some(now + grace);
            self.away_queue.push_back((now + grace, user.clone()));
        }
        self.forget_if_unneeded(user);
    }

    /// Users a gateway's snapshot says left it recently (with when, Unix ms). One this server
    /// does not know yet while it holds them (it just gained them) was online under their
    /// previous owner, whose `away` may never have been said: it goes away here after the
    /// grace (the `presence_changed` id derived from when they left, as the previous owner's).
    pub fn recently_left(&mut self, left: &[(UserId, u64)], now: Instant) -> Notices {
        let mut notices = Notices::new();
        for (user, left_ms) in left {
            if !self.holds(user) {
                continue;
            }
            if let Some(u) = self.users.get_mut(user)
                && (u.online_in > 0 || u.published.is_some())
            {
                // Known here; one leaving now takes the latest time any gateway gives.
                if u.online_in == 0 && u.published == Some(true) {
                    u.left_ms = Some(u.left_ms.map_or(*left_ms, |t| t.max(*left_ms)));
                }
                continue;
            }
            let u = self.track(user);
            u.published = Some(true);
            u.left_ms = Some(*left_ms);
            self.settle(user, now, &mut notices);
        }
        notices
    }

    /// `session` watches `users`; returns their presence for it.
    pub fn watch(&mut self, session: SessionId, users: &[UserId]) -> Vec<Notice> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Vec::new();
        };
        let mut answer = Vec::new();
        for user in users {
            s.watched.insert(user.clone());
            let held = self.warm_until.is_some() || !owns(self.owned.as_deref(), user);
            let u = track(&mut self.users, &mut self.remembered, user);
            u.watchers.insert(session);
            let computed = u.computed();
            let active = *u.published.get_or_insert(computed);
            if held {
                self.dirty.insert(user.clone());
            } else {
                answer.push(Notice {
                    user: user.clone(),
                    active,
                    team: u.team.clone(),
                });
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
                self.forget_if_unneeded(user);
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
            let (due, held): (Vec<UserId>, Vec<UserId>) = std::mem::take(&mut self.dirty)
                .into_iter()
                .partition(|user| self.owns(user));
            self.dirty.extend(held);
            for user in due {
                if let Some(u) = self.users.get(&user) {
                    let active = u.published.unwrap_or(false);
                    notify(&mut notices, u, &user, active);
                    // A connected user's state is (re-)announced: what another server said
                    // before a takeover may have been lost with it (same fact, same id).
                    if u.online_in > 0 {
                        let change = self.change(&user, active);
                        self.changes.push(change);
                    }
                }
            }
        }
        if self.warm_until.is_some() {
            return notices;
        }
        // A user not ours yet waits for the ring that gives them to us (or forgets them).
        let mut due = Vec::new();
        for (at, user) in std::mem::take(&mut self.away_unowned) {
            if self.users.get(&user).is_some_and(|u| u.away_at == Some(at)) {
                match self.owns(&user) {
                    true => due.push(user),
                    false => self.away_unowned.push((at, user)),
                }
            }
        }
        while let Some((at, _)) = self.away_queue.front()
            && *at <= now
        {
            let Some((at, user)) = self.away_queue.pop_front() else {
                break;
            };
            if self.users.get(&user).is_some_and(|u| u.away_at == Some(at)) {
                match self.owns(&user) {
                    true => due.push(user),
                    false => self.away_unowned.push((at, user)),
                }
            }
        }
        for user in due {
            let Some(u) = self.users.get_mut(&user).filter(|u| u.away_at.is_some()) else {
                continue;
            };
            u.away_at = None;
            if !u.computed() {
                u.published = Some(false);
                notify(&mut notices, u, &user, false);
                self.changes.push(Change {
                    user: user.clone(),
                    active: false,
                    team: u.team.clone(),
                    since_ms: u.left_ms,
                });
                self.forget_if_unneeded(&user);
            }
        }
        notices
    }

    /// After a ring change: keeps the slots `owns_slot` says are ours, forgets the users of the
    /// others, and holds changes for `warm_up` so that gateways can re-report the users we
    /// gained before anyone hears a state rebuilt from half the reports.
    pub fn rebalance(
        &mut self,
        owns_slot: impl Fn(Slot) -> bool,
        gained: bool,
        now: Instant,
        warm_up: Duration,
    ) {
        let slots: Box<[bool]> = (0..SLOT_COUNT as Slot).map(owns_slot).collect();
        let owned = |user: &UserId| owns(Some(&slots), user);
        self.users.retain(|user, _| owned(user));
        let gone: Vec<UserId> = self
            .remembered
            .iter()
            .filter(|(user, _)| !owned(user))
            .map(|(user, _)| user.clone())
            .collect();
        for user in gone {
            self.remembered.pop(&user);
        }
        for s in self.sessions.values_mut() {
            s.online.retain(|user, _| owned(user));
            s.details.retain(|user, _| owned(user));
            s.since_ms.retain(|user, _| owned(user));
            s.watched.retain(|user| owned(user));
        }
        self.dirty.retain(|user| owned(user));
        self.owned = Some(slots);
        if gained {
            self.warm_until = Some(now + warm_up);
        }
    }
}

/// `user`'s entry in `users`, made when there is none, with the team `remembered` for them.
/// (A function of the two fields, so that the rest of the state stays free to borrow.)
fn track<'a>(
    users: &'a mut HashMap<UserId, User>,
    remembered: &mut LruCache<UserId, TeamId>,
    user: &UserId,
) -> &'a mut User {
    users.entry(user.clone()).or_insert_with(|| User {
        team: remembered.pop(user),
        ..User::default()
    })
}

/// Whether `user` is in one of the `owned` slots (`None`: no ring yet, every user is).
fn owns(owned: Option<&[bool]>, user: &UserId) -> bool {
    owned.is_none_or(|slots| slots[usize::from(slot_of(&ChannelId::from(user)))])
}

/// Tells `u`'s watchers that `user` is now `active`.
fn notify(notices: &mut Notices, u: &User, user: &UserId, active: bool) {
    for session in &u.watchers {
        notices.entry(*session).or_default().push(Notice {
            user: user.clone(),
            active,
            team: u.team.clone(),
        });
    }
}

trait ExtendSession {
    fn extend_session(&mut self, session: SessionId, items: Vec<Notice>);
}

impl ExtendSession for Notices {
    fn extend_session(&mut self, session: SessionId, items: Vec<Notice>) {
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

    /// `user` of team T1 has `n` connections on a gateway.
    fn on(user: &str, n: u32) -> Online {
        Online {
            user: u(user),
            connections: n,
            team: Some(TeamId::new("T1").unwrap()),
            details: (0..n)
                .map(|i| ConnDetail {
                    team: Some(TeamId::new("T1").unwrap()),
                    connected_at_ms: 1_000 + u64::from(i),
                })
                .collect(),
            since_ms: 0,
            left_ms: 0,
        }
    }

    /// What notices say, without the teams.
    fn said(notices: &[Notice]) -> Vec<(UserId, bool)> {
        notices.iter().map(|n| (n.user.clone(), n.active)).collect()
    }

    #[test]
    fn a_watcher_hears_active_then_away_after_the_grace() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![], vec![], vec![], t0);
        p.snapshot(2, vec![], vec![], vec![], t0);
        assert_eq!(said(&p.watch(1, &[u("UB")])), vec![(u("UB"), false)]);
        let n = p.online(2, &on("UB", 1), t0);
        assert_eq!(said(&n[&1]), vec![(u("UB"), true)]);
        // A second device, then one closes: nothing to say.
        assert!(p.online(2, &on("UB", 2), t0).is_empty());
        assert!(p.online(2, &on("UB", 1), t0).is_empty());
        // The last closes: away only after the grace.
        assert!(p.online(2, &on("UB", 0), t0).is_empty());
        assert!(p.tick(t0 + GRACE / 2).is_empty());
        assert_eq!(said(&p.tick(t0 + GRACE)[&1]), vec![(u("UB"), false)]);
        assert!(!p.get(&u("UB")).active);
    }

    #[test]
    fn among_many_online_each_goes_away_once_after_the_grace_from_their_latest_leaving() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        let watched: Vec<UserId> = ["U1", "U2", "U3"].map(u).to_vec();
        p.snapshot(1, vec![], vec![], watched, t0);
        let all: Vec<Online> = (0..10_000).map(|i| on(&format!("U{i}"), 1)).collect();
        p.snapshot(2, all, vec![], vec![], t0);
        // U1 leaves, comes back and leaves again; U2 leaves once; U3 leaves and comes back.
        let step = GRACE / 4;
        assert!(p.online(2, &on("U1", 0), t0).is_empty());
        assert!(p.online(2, &on("U2", 0), t0 + step).is_empty());
        assert!(p.online(2, &on("U3", 0), t0 + step).is_empty());
        assert!(p.online(2, &on("U1", 1), t0 + step * 2).is_empty());
        assert!(p.online(2, &on("U3", 1), t0 + step * 2).is_empty());
        assert!(p.online(2, &on("U1", 0), t0 + step * 3).is_empty());
        assert!(p.tick(t0 + GRACE).is_empty(), "U1 came back");
        assert_eq!(said(&p.tick(t0 + GRACE + step)[&1]), vec![(u("U2"), false)]);
        assert!(p.tick(t0 + GRACE + step * 2).is_empty());
        assert_eq!(
            said(&p.tick(t0 + GRACE + step * 3)[&1]),
            vec![(u("U1"), false)]
        );
        assert!(p.tick(t0 + GRACE * 10).is_empty());
        assert!(p.get(&u("U3")).active);
    }

    #[test]
    fn a_reconnect_within_the_grace_says_nothing() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![], vec![], vec![u("UB")], t0);
        p.snapshot(2, vec![on("UB", 1)], vec![], vec![], t0);
        assert!(p.online(2, &on("UB", 0), t0).is_empty());
        // It comes back on another gateway before the grace ends.
        p.snapshot(3, vec![on("UB", 1)], vec![], vec![], t0 + GRACE / 2);
        assert!(p.tick(t0 + GRACE * 2).is_empty());
        assert!(p.get(&u("UB")).active);
    }

    #[test]
    fn a_dropped_session_takes_its_users_away_and_manual_away_overrides() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![], vec![], vec![u("UB"), u("UC")], t0);
        p.snapshot(2, vec![on("UB", 1), on("UC", 1)], vec![], vec![], t0);
        let n = p.manual(&u("UC"), true, 10, t0);
        assert_eq!(
            said(&n[&1]),
            vec![(u("UC"), false)],
            "away by hand is at once"
        );
        // An older setting from another gateway loses.
        assert!(p.manual(&u("UC"), false, 5, t0).is_empty());
        assert!(p.tick(t0 + GRACE).is_empty());
        p.drop_session(2, t0 + GRACE);
        assert_eq!(said(&p.tick(t0 + GRACE * 2)[&1]), vec![(u("UB"), false)]);
        // Back to automatic: active again at once while connected.
        p.snapshot(3, vec![on("UC", 1)], vec![], vec![], t0);
        assert_eq!(
            said(&p.manual(&u("UC"), false, 20, t0)[&1]),
            vec![(u("UC"), true)]
        );
    }

    #[test]
    fn warming_holds_changes_then_tells_watchers_once() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.rebalance(|_| true, true, t0, Duration::from_millis(500));
        p.snapshot(1, vec![], vec![], vec![u("UB")], t0);
        assert!(
            p.snapshot(2, vec![on("UB", 1)], vec![], vec![], t0)
                .is_empty()
        );
        assert!(p.tick(t0).is_empty());
        assert_eq!(
            said(&p.tick(t0 + Duration::from_millis(500))[&1]),
            vec![(u("UB"), true)]
        );
        // Users no longer owned are forgotten.
        p.rebalance(|_| false, false, t0, Duration::ZERO);
        assert!(p.is_empty());
    }

    #[test]
    fn a_user_not_owned_yet_is_held_until_the_ring_gives_them_and_warming_ends() {
        let t0 = Instant::now();
        let warm = Duration::from_millis(500);
        let theirs = slot_of(&ChannelId::from(&u("UB")));
        let mut p = Presence::new(GRACE);
        p.rebalance(|s| s != theirs, false, t0, warm);
        // The gateways saw the ring that gives us UB before we did: the watcher's snapshot
        // comes first, and UB, not reported online yet, would read away.
        assert!(p.snapshot(1, vec![], vec![], vec![u("UB")], t0).is_empty());
        assert!(p.tick(t0 + GRACE).is_empty());
        // Our ring comes, then UB's gateway re-reports: the watcher hears UB once, active.
        p.rebalance(|_| true, true, t0, warm);
        assert!(
            p.snapshot(2, vec![on("UB", 1)], vec![], vec![], t0)
                .is_empty()
        );
        assert_eq!(said(&p.tick(t0 + warm)[&1]), vec![(u("UB"), true)]);
        assert!(p.tick(t0 + GRACE * 2).is_empty());
        // A gateway ahead of us about a user the next ring does not give us: nothing is said,
        // and the user is forgotten with that ring.
        let t1 = t0 + GRACE * 2;
        let other = (0..SLOT_COUNT as Slot)
            .map(|i| u(&format!("UX{i}")))
            .find(|x| slot_of(&ChannelId::from(x)) != theirs)
            .unwrap();
        let other_slot = slot_of(&ChannelId::from(&other));
        p.rebalance(|s| s != other_slot, false, t1, warm);
        assert!(p.watch(1, std::slice::from_ref(&other)).is_empty());
        assert!(p.tick(t1 + GRACE).is_empty());
        p.rebalance(|s| s != other_slot, false, t1, warm);
        assert!(!p.users.contains_key(&other) && !p.dirty.contains(&other));
    }

    /// `user`'s team as the state answers it.
    fn team_of(p: &Presence, user: &str) -> Option<String> {
        p.get(&u(user)).team.map(|t| t.to_string())
    }

    #[test]
    fn a_users_team_goes_with_every_answer_and_change() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![], vec![], vec![], t0);
        p.snapshot(2, vec![], vec![], vec![], t0);
        // Never online: no team, in the answer to a watch as in a query.
        let answer = p.watch(1, &[u("UB")]);
        assert_eq!(answer[0].team, None);
        assert_eq!(team_of(&p, "UB"), None);
        // Online: the report names the team, and the change carries it.
        let n = p.online(2, &on("UB", 1), t0);
        assert_eq!(n[&1][0].team.as_ref().map(TeamId::as_str), Some("T1"));
        // A report without a team leaves it as it was.
        let unnamed = Online {
            team: None,
            ..on("UB", 2)
        };
        p.online(2, &unnamed, t0);
        assert_eq!(team_of(&p, "UB").as_deref(), Some("T1"));
        // Gone, watched: the away after the grace still names it.
        p.online(2, &on("UB", 0), t0);
        let n = p.tick(t0 + GRACE);
        assert_eq!(n[&1][0].team.as_ref().map(TeamId::as_str), Some("T1"));
        // Watched by nobody: no longer tracked, the team remembered for queries and for the
        // next watch.
        p.unwatch(1, &[u("UB")]);
        assert!(p.is_empty());
        assert_eq!(team_of(&p, "UB").as_deref(), Some("T1"));
        let answer = p.watch(1, &[u("UB")]);
        assert_eq!(answer[0].team.as_ref().map(TeamId::as_str), Some("T1"));
        assert!(!answer[0].active);
        // A user no longer owned is forgotten, team and all.
        p.unwatch(1, &[u("UB")]);
        p.rebalance(|_| false, false, t0, Duration::ZERO);
        assert_eq!(team_of(&p, "UB"), None);
    }

    /// `user` of team T1 has `n` connections on a gateway, the oldest since `since_ms`.
    fn on_since(user: &str, n: u32, since_ms: u64) -> Online {
        Online {
            since_ms,
            ..on(user, n)
        }
    }

    /// What the changes say: (user, active, since).
    fn changed(p: &mut Presence) -> Vec<(String, bool, Option<u64>)> {
        p.take_changes()
            .into_iter()
            .map(|c| (c.user.to_string(), c.active, c.since_ms))
            .collect()
    }

    #[test]
    fn every_published_change_is_kept_for_the_webhook_with_when_its_state_began() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![], vec![], vec![], t0);
        p.snapshot(2, vec![], vec![], vec![], t0);
        // Watched or not, a connect is a change: active since the connection began.
        p.online(1, &on_since("UB", 1, 1000), t0);
        assert_eq!(changed(&mut p), vec![("UB".into(), true, Some(1000))]);
        assert_eq!(p.take_changes(), vec![], "taken once");
        // Another gateway, a second device, a reconnect within the grace: nothing.
        p.online(2, &on_since("UB", 1, 1500), t0);
        p.online(1, &on_since("UB", 0, 0), t0);
        p.online(1, &on_since("UB", 1, 1600), t0);
        assert!(p.tick(t0 + GRACE * 2).is_empty());
        assert_eq!(changed(&mut p), vec![]);
        // Away and back by hand: at once, at the settings' times.
        p.manual(&u("UB"), true, 2000, t0);
        p.manual(&u("UB"), false, 3000, t0);
        assert_eq!(
            changed(&mut p),
            vec![
                ("UB".into(), false, Some(2000)),
                ("UB".into(), true, Some(3000))
            ]
        );
        // Gone: away after the grace, a fact only this server knows.
        p.drop_session(1, t0);
        p.drop_session(2, t0);
        assert_eq!(changed(&mut p), vec![]);
        p.tick(t0 + GRACE);
        assert_eq!(changed(&mut p), vec![("UB".into(), false, None)]);
    }

    #[test]
    fn a_takeover_retells_each_connected_user_as_first_told_and_no_one_else() {
        let t0 = Instant::now();
        let warm = Duration::from_millis(500);
        // The first owner: UB connects (since 1000), UC by hand away (at 2000).
        let mut first = Presence::new(GRACE);
        first.snapshot(1, vec![on_since("UB", 1, 1000)], vec![], vec![], t0);
        first.snapshot(2, vec![on_since("UC", 1, 900)], vec![], vec![], t0);
        first.manual(&u("UC"), true, 2000, t0);
        let told = changed(&mut first);
        // Its successor hears the gateways' snapshots while warming: nothing until it ends,
        // then each connected user once, with the ids' facts the first owner used; a watched
        // user who is offline is not announced.
        let mut next = Presence::new(GRACE);
        next.rebalance(|_| true, true, t0, warm);
        next.snapshot(1, vec![on_since("UB", 1, 1000)], vec![], vec![u("UD")], t0);
        next.snapshot(
            2,
            vec![on_since("UC", 1, 900)],
            vec![(u("UC"), true, 2000)],
            vec![],
            t0,
        );
        assert_eq!(changed(&mut next), vec![]);
        next.tick(t0 + warm);
        let mut retold = changed(&mut next);
        retold.sort();
        let mut expected: Vec<_> = told
            .into_iter()
            .filter(|(user, ..)| user == "UB" || user == "UC")
            .collect();
        // UC's last word was away by hand.
        expected.retain(|c| c != &("UC".to_string(), true, Some(900)));
        expected.sort();
        assert_eq!(retold, expected);
    }

    #[test]
    fn a_user_who_left_within_the_grace_of_a_dead_owner_still_goes_away_with_the_same_id() {
        let t0 = Instant::now();
        let warm = Duration::from_millis(500);
        let left = |user: &str, left_ms: u64| Online {
            left_ms,
            ..on_since(user, 0, 0)
        };
        // The first owner hears UL leave at 1500; it dies before the grace ends.
        let mut first = Presence::new(GRACE);
        first.snapshot(1, vec![on_since("UL", 1, 1000)], vec![], vec![], t0);
        first.online(1, &left("UL", 1500), t0);
        first.tick(t0 + GRACE);
        let would_have = changed(&mut first);
        assert_eq!(would_have.last(), Some(&("UL".into(), false, Some(1500))));
        // Its successor learns from the gateway's snapshot that UL left at 1500: UL goes away
        // after the grace, with the same fact (the same id).
        let mut next = Presence::new(GRACE);
        next.rebalance(|_| true, true, t0, warm);
        next.snapshot(1, vec![], vec![], vec![], t0);
        next.recently_left(&[(u("UL"), 1500)], t0);
        next.tick(t0 + warm);
        assert_eq!(changed(&mut next), vec![]);
        next.tick(t0 + GRACE);
        assert_eq!(changed(&mut next), vec![("UL".into(), false, Some(1500))]);
        // Once settled, a gateway's report of a user who left says nothing more.
        next.snapshot(1, vec![], vec![], vec![], t0 + GRACE);
        next.recently_left(&[(u("UL"), 1500), (u("UX"), 1600)], t0 + GRACE);
        next.tick(t0 + GRACE * 3);
        assert_eq!(changed(&mut next), vec![]);
    }

    #[test]
    fn the_newest_report_names_the_team() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![on("UB", 1)], vec![], vec![], t0);
        let elsewhere = Online {
            team: Some(TeamId::new("T2").unwrap()),
            ..on("UB", 1)
        };
        p.snapshot(2, vec![elsewhere], vec![], vec![], t0);
        assert_eq!(team_of(&p, "UB").as_deref(), Some("T2"));
    }

    #[test]
    fn connections_are_listed_from_every_session_oldest_first_and_go_with_it() {
        let t0 = Instant::now();
        let mut p = Presence::new(GRACE);
        p.snapshot(1, vec![on("UA", 2)], vec![], vec![], t0);
        p.name_session(1, "gw-a".into(), "us".into());
        p.snapshot(2, vec![], vec![], vec![], t0);
        p.name_session(2, "gw-b".into(), "eu".into());
        let mut later = on("UA", 1);
        later.details[0].connected_at_ms = 1_500;
        later.details[0].team = Some(TeamId::new("T2").unwrap());
        p.online(2, &later, t0);
        let listed: Vec<(String, String, Option<String>, u64)> = p
            .connections(&u("UA"))
            .into_iter()
            .map(|c| {
                (
                    c.gateway,
                    c.region,
                    c.team.map(|t| t.to_string()),
                    c.connected_at_ms,
                )
            })
            .collect();
        let t = |s: &str| Some(s.to_string());
        assert_eq!(
            listed,
            [
                ("gw-a".into(), "us".into(), t("T1"), 1_000),
                ("gw-a".into(), "us".into(), t("T1"), 1_001),
                ("gw-b".into(), "eu".into(), t("T2"), 1_500),
            ]
        );
        // Gone on one gateway, and a session that ends takes its connections with it.
        p.online(2, &on("UA", 0), t0);
        assert_eq!(p.connections(&u("UA")).len(), 2);
        p.drop_session(1, t0);
        assert!(p.connections(&u("UA")).is_empty());
        assert!(p.connections(&u("UB")).is_empty());
    }
}
