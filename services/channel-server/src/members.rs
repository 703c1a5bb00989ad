//! Who is subscribed to each channel this node owns, across every gateway and region: the
//! members each gateway reports (user, team, live connections), the grace before a departure
//! counts, and the facts the web app hears of — `channel_occupied`/`channel_vacated`,
//! `member_added`/`member_removed` and `user_offline_message`.
//!
//! Plain data, no I/O: each method takes the time and pushes the facts it produces. The shard
//! lock that guards a channel's events guards its members too, so a channel's facts come out in
//! order and a message is checked against the members as they are when it commits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use mesh_core::{ChannelEvent, ChannelId, EventBody, TeamId, Ts, UserId};

/// How long a departure waits before it counts, by default: a client reconnecting to another
/// gateway or region within it is not seen to leave.
pub const DEFAULT_GRACE_MS: u64 = 5_000;
/// Distinct users accounted per channel, by default.
pub const DEFAULT_USERS_PER_CHANNEL: usize = 100_000;
/// Gateway × channel × user entries per node, by default (270 bytes each with the user's
/// state, measured: `members::tests::memory_per_entry`).
pub const DEFAULT_TOTAL_ENTRIES: usize = 1_000_000;
/// Users known to belong to a channel (seen subscribed, or joined), by default.
pub const DEFAULT_KNOWN_PER_CHANNEL: usize = 10_000;
/// Users known to belong to channels, over all channels of a node, by default.
pub const DEFAULT_KNOWN_TOTAL: usize = 1_000_000;

/// The accounting's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Milliseconds a user's (or a channel's) last departure waits before it counts.
    pub grace_ms: u64,
    /// Distinct users accounted per channel; more are not counted (a counted drop).
    pub users_per_channel: usize,
    /// Gateway × channel × user entries held at once (split evenly over the shards).
    pub total_entries: usize,
    /// Users known to belong to a channel; past it the longest known is forgotten.
    pub known_per_channel: usize,
    /// Users known to belong to channels, over all of them (split evenly over the shards);
    /// past it no new one is learnt (a counted drop).
    pub known_total: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            grace_ms: DEFAULT_GRACE_MS,
            users_per_channel: DEFAULT_USERS_PER_CHANNEL,
            total_entries: DEFAULT_TOTAL_ENTRIES,
            known_per_channel: DEFAULT_KNOWN_PER_CHANNEL,
            known_total: DEFAULT_KNOWN_TOTAL,
        }
    }
}

/// One user's count on one gateway, as that gateway reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub user: UserId,
    pub team: Option<TeamId>,
    /// Live connections there subscribed to the channel (0: none left).
    pub conns: u32,
    /// When the user's first connection there subscribed (ms since the Unix epoch; 0: unknown).
    pub since_ms: u64,
    /// In a resumption: the gateway reported the user before, so this is not news.
    pub announced: bool,
}

/// The gateway stream a report came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub stream: u64,
    pub gateway: Arc<str>,
    pub region: Arc<str>,
}

/// What happened, for the web app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactKind {
    Occupied,
    Vacated,
    MemberAdded,
    MemberRemoved,
    /// A message to a member with no live connection subscribed to the channel.
    OfflineMessage {
        ts: Ts,
        text: String,
        sender: UserId,
    },
}

/// One fact about a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub kind: FactKind,
    pub channel: ChannelId,
    pub user: Option<UserId>,
    pub team: Option<TeamId>,
    /// When it happened, ms since the Unix epoch.
    pub time_ms: u64,
    /// Its id: the same whichever owner states the same fact.
    pub id: String,
}

impl FactKind {
    /// The event's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            FactKind::Occupied => "channel_occupied",
            FactKind::Vacated => "channel_vacated",
            FactKind::MemberAdded => "member_added",
            FactKind::MemberRemoved => "member_removed",
            FactKind::OfflineMessage { .. } => "user_offline_message",
        }
    }
}

/// One gateway stream's members of a channel.
#[derive(Debug)]
struct GatewaySet {
    gateway: Arc<str>,
    region: Arc<str>,
    users: HashMap<UserId, u32>,
}

/// A user's standing in a channel over all gateways.
#[derive(Debug)]
struct UserState {
    team: Option<TeamId>,
    /// Live connections over all gateways.
    conns: u64,
    /// When this membership began (names it in event ids).
    since_ms: u64,
    /// When its last connection left (waiting out the grace), if it did.
    gone_at: Option<u64>,
}

/// Users known to belong to a channel, the longest known forgotten first past the bound.
#[derive(Debug, Default)]
struct Known {
    users: HashMap<UserId, Option<TeamId>>,
    order: VecDeque<UserId>,
}

impl Known {
    /// Learns `user` (within `bound`, the longest known forgotten first), if `total` (the
    /// users known over all channels, within `bounds.known_total`) has room for a new one.
    fn learn(
        &mut self,
        user: &UserId,
        team: Option<&TeamId>,
        bounds: &Bounds,
        total: &mut usize,
        dropped: &mut u64,
    ) {
        if let Some(known) = self.users.get_mut(user) {
            if known.is_none() {
                *known = team.cloned();
            }
            return;
        }
        // A channel at its own bound forgets one for it: no room needed.
        if *total >= bounds.known_total && self.users.len() < bounds.known_per_channel.max(1) {
            *dropped += 1;
            return;
        }
        let bound = bounds.known_per_channel;
        self.users.insert(user.clone(), team.cloned());
        self.order.push_back(user.clone());
        *total += 1;
        while self.users.len() > bound.max(1) {
            match self.order.pop_front() {
                Some(oldest) => {
                    if self.users.remove(&oldest).is_some() {
                        *total = total.saturating_sub(1);
                    }
                }
                None => break,
            }
        }
        // Entries of users removed since are skipped lazily; compact when they pile up.
        if self.order.len() > 2 * bound.max(1) {
            let users = &self.users;
            self.order.retain(|u| users.contains_key(u));
        }
    }

    fn remove(&mut self, user: &UserId, total: &mut usize) {
        if self.users.remove(user).is_some() {
            *total = total.saturating_sub(1);
        }
    }
}

/// One channel's accounting.
#[derive(Debug, Default)]
struct Channel {
    gateways: HashMap<u64, GatewaySet>,
    users: HashMap<UserId, UserState>,
    /// Since when the channel has had a member (names the occupancy in event ids).
    occupied_since: Option<u64>,
    known: Known,
}

impl Channel {
    fn is_idle(&self) -> bool {
        self.gateways.is_empty() && self.users.is_empty() && self.known.users.is_empty()
    }
}

/// One channel's live subscribers, for `ChannelInfo` and `ListChannels`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Live connections over all gateways.
    pub subscribers: u64,
    /// Distinct users with a live connection.
    pub members: u64,
    /// Per gateway (by id, in id order): its region and live connections.
    pub gateways: Vec<(String, String, u64)>,
}

/// The accounting of one shard's channels.
#[derive(Debug)]
pub struct Members {
    channels: HashMap<ChannelId, Channel>,
    bounds: Bounds,
    /// Gateway × channel × user entries held.
    entries: usize,
    /// Users known to belong to channels, over all channels here.
    known: usize,
    /// Whether to learn who belongs to channels (only `user_offline_message` needs it).
    learns: bool,
    /// Departures waiting out their grace, in the order they happened: when, where, who. An
    /// entry whose user has since come back (or left again later) is skipped when its turn
    /// comes, as is one whose channel was dropped meanwhile. The expiry looks only at those due: not at every user of a channel (a team's
    /// channel of 100,000 with one leaving), nor at every channel with someone leaving (a
    /// gateway's users' own channels, all at once when it goes).
    departures: VecDeque<(u64, ChannelId, UserId)>,
    /// Reports not counted for a bound.
    pub dropped: u64,
}

impl Members {
    pub fn new(bounds: Bounds) -> Self {
        Members {
            channels: HashMap::new(),
            bounds,
            entries: 0,
            known: 0,
            learns: true,
            departures: VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn set_bounds(&mut self, bounds: Bounds) {
        self.bounds = bounds;
    }

    /// Whether to learn who belongs to channels (on by default; off spares the memory when no
    /// one is told of offline messages).
    pub fn set_learning(&mut self, learns: bool) {
        self.learns = learns;
    }

    /// `source` subscribed `channel` with these members (its whole set there, replacing what
    /// it said before).
    pub fn subscribe(
        &mut self,
        source: &Source,
        channel: &ChannelId,
        reports: &[Report],
        now_ms: u64,
        out: &mut Vec<Fact>,
    ) {
        let ch = self.channels.entry(channel.clone()).or_default();
        let set = ch
            .gateways
            .entry(source.stream)
            .or_insert_with(|| GatewaySet {
                gateway: source.gateway.clone(),
                region: source.region.clone(),
                users: HashMap::new(),
            });
        set.region = source.region.clone();
        // One pass each way: a gateway resubscribing a team's channel reports thousands.
        let reported: HashSet<&UserId> = reports.iter().map(|r| &r.user).collect();
        let stale: Vec<UserId> = set
            .users
            .keys()
            .filter(|u| !reported.contains(u))
            .cloned()
            .collect();
        let zeroed = stale.into_iter().map(|user| Report {
            user,
            team: None,
            conns: 0,
            since_ms: 0,
            announced: true,
        });
        let all: Vec<Report> = zeroed.chain(reports.iter().cloned()).collect();
        self.apply(source.stream, channel, &all, now_ms, out);
    }

    /// `stream` says these users' counts on `channel` changed; only for a channel it subscribed.
    pub fn update(
        &mut self,
        stream: u64,
        channel: &ChannelId,
        reports: &[Report],
        now_ms: u64,
        out: &mut Vec<Fact>,
    ) {
        let subscribed = self
            .channels
            .get(channel)
            .is_some_and(|c| c.gateways.contains_key(&stream));
        if subscribed {
            self.apply(stream, channel, reports, now_ms, out);
        }
    }

    /// `stream` no longer subscribes `channel` (unsubscribed, or its stream ended): its members
    /// there leave, each after the grace unless seen elsewhere.
    pub fn unsubscribe(&mut self, stream: u64, channel: &ChannelId, now_ms: u64) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let Some(set) = ch.gateways.remove(&stream) else {
            return;
        };
        self.entries = self.entries.saturating_sub(set.users.len());
        for (user, conns) in set.users {
            if let Some(state) = ch.users.get_mut(&user) {
                state.conns = state.conns.saturating_sub(u64::from(conns));
                if state.conns == 0 && state.gone_at.is_none() {
                    state.gone_at = Some(now_ms);
                    self.departures.push_back((now_ms, channel.clone(), user));
                }
            }
        }
    }

    fn apply(
        &mut self,
        stream: u64,
        channel: &ChannelId,
        reports: &[Report],
        now_ms: u64,
        out: &mut Vec<Fact>,
    ) {
        let (bounds, learns) = (self.bounds, self.learns);
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        for report in reports {
            let Some(set) = ch.gateways.get_mut(&stream) else {
                return;
            };
            let before = set.users.get(&report.user).copied().unwrap_or(0);
            if report.conns == before {
                continue;
            }
            let new_entry = before == 0;
            if new_entry
                && (self.entries >= bounds.total_entries
                    || (!ch.users.contains_key(&report.user)
                        && ch.users.len() >= bounds.users_per_channel))
            {
                self.dropped += 1;
                continue;
            }
            if report.conns == 0 {
                set.users.remove(&report.user);
                self.entries = self.entries.saturating_sub(1);
            } else {
                set.users.insert(report.user.clone(), report.conns);
                if new_entry {
                    self.entries += 1;
                }
            }
            let was_empty = ch.users.is_empty();
            match ch.users.get_mut(&report.user) {
                Some(state) => {
                    state.conns =
                        (state.conns + u64::from(report.conns)).saturating_sub(u64::from(before));
                    if state.team.is_none() {
                        state.team = report.team.clone();
                    }
                    if state.conns == 0 {
                        if state.gone_at.is_none() {
                            state.gone_at = Some(now_ms);
                            self.departures.push_back((
                                now_ms,
                                channel.clone(),
                                report.user.clone(),
                            ));
                        }
                    } else {
                        // Back within the grace (another gateway, another region): no news.
                        state.gone_at = None;
                    }
                }
                None if report.conns > 0 => {
                    let since = match report.since_ms {
                        0 => now_ms,
                        since => since,
                    };
                    ch.users.insert(
                        report.user.clone(),
                        UserState {
                            team: report.team.clone(),
                            conns: u64::from(report.conns),
                            since_ms: since,
                            gone_at: None,
                        },
                    );
                    if learns {
                        ch.known.learn(
                            &report.user,
                            report.team.as_ref(),
                            &bounds,
                            &mut self.known,
                            &mut self.dropped,
                        );
                    }
                    if was_empty && ch.occupied_since.is_none() {
                        ch.occupied_since = Some(since);
                        if !report.announced {
                            out.push(fact(FactKind::Occupied, channel, None, None, since));
                        }
                    }
                    if !report.announced {
                        out.push(fact(
                            FactKind::MemberAdded,
                            channel,
                            Some(&report.user),
                            report.team.as_ref(),
                            since,
                        ));
                    }
                }
                None => {}
            }
        }
    }

    /// Departures whose grace ran out by `now_ms` count: `member_removed` for each, then
    /// `channel_vacated` when the channel has nobody left; channel by channel, in the order
    /// their first due departure happened.
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<Fact>) {
        let grace = self.bounds.grace_ms;
        // Per channel touched, its users gone for good: who, when they left, since when they
        // were members, their team.
        type Gone = Vec<(UserId, u64, u64, Option<TeamId>)>;
        let mut touched: Vec<(ChannelId, Gone)> = Vec::new();
        let mut index: HashMap<ChannelId, usize> = HashMap::new();
        while let Some((at, ..)) = self.departures.front()
            && at.saturating_add(grace) <= now_ms
        {
            let Some((at, channel, user)) = self.departures.pop_front() else {
                break;
            };
            let Some(ch) = self.channels.get_mut(&channel) else {
                continue; // Dropped meanwhile: its departures were told then.
            };
            // Still gone since this departure: it counts (once; a later entry of the same user
            // finds it removed).
            let gone = match ch.users.get(&user) {
                Some(state) if state.gone_at == Some(at) => ch.users.remove(&user),
                _ => None,
            };
            let i = *index.entry(channel.clone()).or_insert_with(|| {
                touched.push((channel, Vec::new()));
                touched.len() - 1
            });
            if let Some(state) = gone {
                touched[i].1.push((user, at, state.since_ms, state.team));
            }
        }
        for (channel, gone) in touched {
            let Some(ch) = self.channels.get_mut(&channel) else {
                continue;
            };
            Self::tell_gone(&channel, ch, gone, out);
            // A user still in a grace is still among its users: an idle channel has none.
            if ch.is_idle() {
                self.channels.remove(&channel);
            }
        }
    }

    /// `gone` left `channel` for good: `member_removed` for each, in the order they left, then
    /// `channel_vacated` if nobody is left.
    fn tell_gone(
        channel: &ChannelId,
        ch: &mut Channel,
        mut gone: Vec<(UserId, u64, u64, Option<TeamId>)>,
        out: &mut Vec<Fact>,
    ) {
        gone.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        let mut last_at = 0;
        for (user, at, since, team) in gone {
            last_at = last_at.max(at);
            let mut removed = fact(
                FactKind::MemberRemoved,
                channel,
                Some(&user),
                team.as_ref(),
                since,
            );
            removed.time_ms = at;
            out.push(removed);
        }
        if ch.users.is_empty()
            && let Some(since) = ch.occupied_since.take()
        {
            let mut vacated = fact(FactKind::Vacated, channel, None, None, since);
            vacated.time_ms = last_at.max(since);
            out.push(vacated);
        }
    }

    /// An event committed on its channel: a join or leave updates who is known to belong; a
    /// chat message is told (`user_offline_message`) for each member with no live connection
    /// subscribed — the user of a user channel, or a known member of another (not a team's
    /// channel) — but its sender.
    pub fn committed(&mut self, event: &ChannelEvent, hooks: bool, out: &mut Vec<Fact>) {
        let channel = &event.channel;
        match &event.body {
            EventBody::MemberJoined { user, team } if self.learns => {
                self.channels
                    .entry(channel.clone())
                    .or_default()
                    .known
                    .learn(
                        user,
                        team.as_ref(),
                        &self.bounds,
                        &mut self.known,
                        &mut self.dropped,
                    );
            }
            EventBody::MemberLeft { user } => {
                if let Some(ch) = self.channels.get_mut(channel) {
                    ch.known.remove(user, &mut self.known);
                    if ch.is_idle() {
                        self.channels.remove(channel);
                    }
                }
            }
            EventBody::Message {
                user: sender, text, ..
            } if hooks => {
                let Some(ts) = event.ts else { return };
                let ch = self.channels.get(channel);
                let online = |user: &UserId| {
                    ch.and_then(|c| c.users.get(user))
                        .is_some_and(|state| state.conns > 0)
                };
                let mut offline: Vec<(UserId, Option<TeamId>)> = Vec::new();
                if channel.as_str().starts_with('U') {
                    if let Ok(user) = UserId::new(channel.as_str()) {
                        let team = ch.and_then(|c| c.known.users.get(&user).cloned()).flatten();
                        offline.push((user, team));
                    }
                } else if channel.as_str().starts_with('T') {
                    // A team's channel: everyone of the team belongs; a message there is an
                    // announcement, not one to tell each member of.
                } else if let Some(ch) = ch {
                    offline.extend(ch.known.users.iter().map(|(u, t)| (u.clone(), t.clone())));
                }
                offline.retain(|(user, _)| user != sender && !online(user));
                offline.sort_by(|a, b| a.0.cmp(&b.0));
                for (user, team) in offline {
                    let kind = FactKind::OfflineMessage {
                        ts,
                        text: text.clone(),
                        sender: sender.clone(),
                    };
                    let mut told = fact(kind, channel, Some(&user), team.as_ref(), 0);
                    told.time_ms = ts.as_micros() / 1000;
                    told.id = format!("user_offline_message:{channel}:{user}:{ts}");
                    out.push(told);
                }
            }
            _ => {}
        }
    }

    /// Forgets the channels `lost` says went elsewhere: the new owner rebuilds their live
    /// members from the gateways' re-subscriptions (which it takes in without news). Departures
    /// still in their grace are told now (`member_removed`, then `channel_vacated` if nobody
    /// is left), as no gateway will tell the new owner of them. Returns the live members of
    /// each channel dropped (for a handoff: see [`Members::adopt`]).
    pub fn drop_channels(
        &mut self,
        lost: impl Fn(&ChannelId) -> bool,
        out: &mut Vec<Fact>,
    ) -> Vec<(ChannelId, Vec<Report>)> {
        let dropped: Vec<ChannelId> = self.channels.keys().filter(|c| lost(c)).cloned().collect();
        let mut live = Vec::new();
        for channel in dropped {
            let Some(ch) = self.channels.remove(&channel) else {
                continue;
            };
            let reports: Vec<Report> = ch
                .users
                .iter()
                .filter(|(_, u)| u.conns > 0)
                .map(|(user, u)| Report {
                    user: user.clone(),
                    team: u.team.clone(),
                    conns: u32::try_from(u.conns).unwrap_or(u32::MAX),
                    since_ms: u.since_ms,
                    announced: true,
                })
                .collect();
            if !reports.is_empty() {
                live.push((channel.clone(), reports));
            }
            self.entries = self
                .entries
                .saturating_sub(ch.gateways.values().map(|g| g.users.len()).sum::<usize>());
            self.known = self.known.saturating_sub(ch.known.users.len());
            // Departures in their grace run out at once: the same facts, in the same order.
            // Their entries in the queue are skipped when their turn comes.
            let mut ch = ch;
            let gone: Vec<_> = ch
                .users
                .iter()
                .filter_map(|(user, s)| {
                    let at = s.gone_at?;
                    Some((user.clone(), at, s.since_ms, s.team.clone()))
                })
                .collect();
            if !gone.is_empty() {
                for (user, ..) in &gone {
                    ch.users.remove(user);
                }
                Self::tell_gone(&channel, &mut ch, gone, out);
            }
        }
        live
    }

    /// `channel`'s live members as its previous owner handed them over: each one no gateway
    /// has reported here yet is taken in without news, as if its last connection had just
    /// left — a gateway's re-subscription within the grace keeps it, and its removal is told
    /// when none comes (its gateway went away during the move).
    pub fn adopt(&mut self, channel: &ChannelId, reports: &[Report], now_ms: u64) {
        let learns = self.learns;
        let ch = self.channels.entry(channel.clone()).or_default();
        for report in reports {
            if ch.users.contains_key(&report.user)
                || ch.users.len() >= self.bounds.users_per_channel
            {
                continue;
            }
            let since = report.since_ms;
            ch.occupied_since = Some(ch.occupied_since.map_or(since, |s| s.min(since)));
            ch.users.insert(
                report.user.clone(),
                UserState {
                    team: report.team.clone(),
                    conns: 0,
                    since_ms: since,
                    gone_at: Some(now_ms),
                },
            );
            self.departures
                .push_back((now_ms, channel.clone(), report.user.clone()));
            if learns {
                ch.known.learn(
                    &report.user,
                    report.team.as_ref(),
                    &self.bounds,
                    &mut self.known,
                    &mut self.dropped,
                );
            }
        }
    }

    /// `channel`'s live subscribers now.
    pub fn summary(&self, channel: &ChannelId) -> Summary {
        let Some(ch) = self.channels.get(channel) else {
            return Summary::default();
        };
        let mut by_gateway: HashMap<&str, (&str, u64)> = HashMap::new();
        for set in ch.gateways.values() {
            let entry = by_gateway.entry(&set.gateway).or_insert((&set.region, 0));
            entry.1 += set.users.values().map(|c| u64::from(*c)).sum::<u64>();
        }
        let mut gateways: Vec<(String, String, u64)> = by_gateway
            .into_iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(g, (r, n))| (g.to_string(), r.to_string(), n))
            .collect();
        gateways.sort();
        Summary {
            subscribers: ch.users.values().map(|u| u.conns).sum(),
            members: ch.users.values().filter(|u| u.conns > 0).count() as u64,
            gateways,
        }
    }

    /// Whether `channel` has a live subscriber of `team`.
    pub fn has_team(&self, channel: &ChannelId, team: &str) -> bool {
        self.channels.get(channel).is_some_and(|ch| {
            ch.users
                .values()
                .any(|u| u.conns > 0 && u.team.as_ref().is_some_and(|t| t.as_str() == team))
        })
    }

    /// Channels with a live subscriber.
    pub fn live(&self) -> impl Iterator<Item = &ChannelId> {
        self.channels
            .iter()
            .filter(|(_, ch)| ch.users.values().any(|u| u.conns > 0))
            .map(|(c, _)| c)
    }

    /// Gateway × channel × user entries held.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Users known to belong to channels here.
    pub fn known(&self) -> usize {
        self.known
    }
}

/// A fact with its id, deterministic from what it states: the channel, the user, and when the
/// membership (or occupancy) it begins or ends began.
fn fact(
    kind: FactKind,
    channel: &ChannelId,
    user: Option<&UserId>,
    team: Option<&TeamId>,
    since_ms: u64,
) -> Fact {
    let id = match user {
        Some(user) => format!("{}:{channel}:{user}:{since_ms}", kind.name()),
        None => format!("{}:{channel}:{since_ms}", kind.name()),
    };
    Fact {
        kind,
        channel: channel.clone(),
        user: user.cloned(),
        team: team.cloned(),
        time_ms: since_ms,
        id,
    }
}

#[cfg(test)]
mod tests;
