//! The hub's bookkeeping, apart from its I/O: which local connections want each channel, which
//! channel server each channel is subscribed on, and whether that subscription is confirmed.
//! Every method here only changes the maps and says what the hub must send.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use mesh_core::{ChannelEvent, ChannelId, NodeId, Ring, TeamId, Ts, UserId};
use tokio::sync::oneshot;

use crate::outbox::ConnSink;
use crate::upstream::Upstream;
use crate::vocab::ConnId;

/// A live event waiting for a catch-up: the event, its rendered frame, and when it arrived.
pub(super) type Buffered = (ChannelEvent, Option<Utf8Bytes>, Option<Instant>);

/// Unsubscribes to send, per channel server.
pub(super) type Unsubscribes = HashMap<NodeId, Vec<String>>;

/// One user's live connections here subscribed to a channel, as reported upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Member {
    pub(super) team: Option<TeamId>,
    /// Its live connections here subscribed to the channel.
    pub(super) conns: u32,
    /// When its first connection here joined the channel (ms since the Unix epoch).
    pub(super) since_ms: u64,
    /// A channel server confirmed a subscription that counted it (on this stream or an
    /// earlier one): it was told as news there.
    pub(super) announced: bool,
}

/// A user's count on a channel as sent upstream (0: no connection left here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reported {
    pub(super) user: UserId,
    pub(super) team: Option<TeamId>,
    pub(super) conns: u32,
    pub(super) since_ms: u64,
    /// Reported upstream before this report.
    pub(super) announced: bool,
}

/// Member changes to send, per channel server: each channel with its changed users.
pub(super) type MemberChanges = HashMap<NodeId, Vec<(ChannelId, Vec<Reported>)>>;

/// Milliseconds since the Unix epoch by the wall clock (0 before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Local state of one channel.
#[derive(Debug, Default)]
pub(super) struct LocalChannel {
    pub(super) conns: HashMap<ConnId, ConnSink>,
    /// The users of `conns`, with their connection counts: what the channel's owner is told.
    pub(super) members: HashMap<UserId, Member>,
    /// The channel server the subscription was sent to.
    pub(super) upstream: Option<NodeId>,
    /// That channel server confirmed it: every later event of the channel reaches us.
    pub(super) active: bool,
    /// Connections waiting for `active`.
    pub(super) waiters: Vec<oneshot::Sender<()>>,
    /// The newest ts delivered.
    pub(super) last_ts: Option<Ts>,
    /// Set while the channel catches up from history after a resubscription: live events
    /// wait here, so clients get the missed ones first, in ts order, without duplicates.
    pub(super) catching_up: Option<Vec<Buffered>>,
}

impl LocalChannel {
    /// A channel server confirmed the subscription: the members it was sent with (and those
    /// sent after it on the same stream) count as announced there.
    pub(super) fn announced(&mut self) {
        for member in self.members.values_mut() {
            member.announced = true;
        }
    }

    /// The subscription is confirmed: every waiting connection hears it.
    pub(super) fn activate(&mut self) {
        self.active = true;
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
    }

    /// `node` confirmed the subscription, its newest ts being `head`. When that is past what
    /// was delivered (events went to the new owner while the channel moved), live events wait
    /// and the catch-up starts after the returned ts; otherwise the channel is active now.
    pub(super) fn confirmed(&mut self, head: Option<Ts>) -> Option<Ts> {
        match (self.last_ts, head) {
            (Some(last), Some(head)) if head > last => {
                self.catching_up = Some(Vec::new());
                Some(last)
            }
            _ => {
                self.activate();
                None
            }
        }
    }

    /// Forgets the subscription if it was on `node`; true if it was.
    pub(super) fn detach(&mut self, node: &NodeId) -> bool {
        if self.upstream.as_ref() != Some(node) {
            return false;
        }
        self.upstream = None;
        self.active = false;
        true
    }
}

/// Every channel a local connection wants, and the streams to channel servers.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) channels: HashMap<ChannelId, LocalChannel>,
    pub(super) upstreams: HashMap<NodeId, Upstream>,
    /// Users whose connection count on a channel changed since it was last reported.
    pub(super) dirty: HashMap<ChannelId, HashSet<UserId>>,
}

impl State {
    /// Adds `sink` to each channel. Returns a receiver per channel whose subscription is not
    /// yet confirmed (each fires once it is), and the channels not yet subscribed anywhere.
    pub(super) fn join(
        &mut self,
        sink: &ConnSink,
        channels: &[ChannelId],
    ) -> (Vec<oneshot::Receiver<()>>, Vec<ChannelId>) {
        let mut waiting = Vec::new();
        let mut to_subscribe: Vec<ChannelId> = Vec::new();
        for channel in channels {
            let local = self.channels.entry(channel.clone()).or_default();
            if local.conns.insert(sink.id, sink.clone()).is_none() {
                let member = local
                    .members
                    .entry(sink.user.clone())
                    .or_insert_with(|| Member {
                        team: sink.team.clone(),
                        conns: 0,
                        since_ms: now_ms(),
                        announced: false,
                    });
                member.conns += 1;
                self.dirty
                    .entry(channel.clone())
                    .or_default()
                    .insert(sink.user.clone());
            }
            if local.active {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            local.waiters.push(tx);
            waiting.push(rx);
            if local.upstream.is_none() {
                to_subscribe.push(channel.clone());
            }
        }
        (waiting, to_subscribe)
    }

    /// Removes connection `conn` from each channel, forgetting channels nobody wants; returns
    /// their unsubscribes.
    pub(super) fn leave(&mut self, conn: ConnId, channels: &[ChannelId]) -> Unsubscribes {
        let mut unsubscribe: Unsubscribes = HashMap::new();
        for channel in channels {
            let Some(local) = self.channels.get_mut(channel) else {
                continue;
            };
            if let Some(sink) = local.conns.remove(&conn) {
                if let Some(member) = local.members.get_mut(&sink.user) {
                    member.conns = member.conns.saturating_sub(1);
                    if member.conns == 0 {
                        local.members.remove(&sink.user);
                    }
                }
                self.dirty
                    .entry(channel.clone())
                    .or_default()
                    .insert(sink.user);
            }
            if local.conns.is_empty() {
                // The unsubscribe tells the owner: no member change to send.
                self.dirty.remove(channel);
                if let Some(node) = local.upstream.take() {
                    unsubscribe
                        .entry(node)
                        .or_default()
                        .push(channel.to_string());
                }
                self.channels.remove(channel);
            }
        }
        unsubscribe
    }

    /// `channel`'s whole member set, for its subscription (its pending changes with it): each
    /// says whether a channel server confirmed it before.
    pub(super) fn full_set(&mut self, channel: &ChannelId) -> Vec<Reported> {
        self.dirty.remove(channel);
        let Some(local) = self.channels.get_mut(channel) else {
            return Vec::new();
        };
        local
            .members
            .iter()
            .map(|(user, member)| report(user, member))
            .collect()
    }

    /// The member changes not reported yet, per channel server the channel is subscribed on
    /// (a channel not subscribed anywhere reports its whole set when it is).
    pub(super) fn take_changes(&mut self) -> MemberChanges {
        let mut changes: MemberChanges = HashMap::new();
        for (channel, users) in std::mem::take(&mut self.dirty) {
            let Some(local) = self.channels.get_mut(&channel) else {
                continue;
            };
            let Some(node) = local.upstream.clone() else {
                continue;
            };
            let active = local.active;
            let reported = users
                .into_iter()
                .map(|user| match local.members.get_mut(&user) {
                    Some(member) => {
                        let reported = report(&user, member);
                        // On a confirmed subscription the owner takes it as it comes.
                        member.announced |= active;
                        reported
                    }
                    None => Reported {
                        user,
                        team: None,
                        conns: 0,
                        since_ms: 0,
                        announced: true,
                    },
                })
                .collect();
            changes.entry(node).or_default().push((channel, reported));
        }
        changes
    }

    /// Points `channels` at their owners in `ring`, unconfirmed; returns them by owner, with
    /// the owner's address. Channels without an owner (no ring yet) wait for the next ring.
    pub(super) fn assign(
        &mut self,
        ring: &Ring,
        channels: Vec<ChannelId>,
    ) -> HashMap<NodeId, (String, Vec<String>)> {
        let mut by_node: HashMap<NodeId, (String, Vec<String>)> = HashMap::new();
        for channel in channels {
            let Some(owner) = ring.owner_of(&channel) else {
                continue; // No ring yet: the next ring reconciles it.
            };
            if let Some(local) = self.channels.get_mut(&channel) {
                local.upstream = Some(owner.id.clone());
                local.active = false;
                local.catching_up = None;
            }
            by_node
                .entry(owner.id.clone())
                .or_insert_with(|| (owner.addr.clone(), Vec::new()))
                .1
                .push(channel.to_string());
        }
        by_node
    }

    /// Channels whose owner in `ring` is not the channel server they are subscribed on:
    /// detached, they are returned to subscribe again, with the unsubscribes from their old
    /// servers.
    pub(super) fn moved(&mut self, ring: &Ring) -> (Vec<ChannelId>, Unsubscribes) {
        let mut to_subscribe = Vec::new();
        let mut unsubscribe: Unsubscribes = HashMap::new();
        for (channel, local) in self.channels.iter_mut() {
            let owner = ring.owner_of(channel).map(|n| &n.id);
            if local.upstream.as_ref() == owner && owner.is_some() {
                continue;
            }
            if let Some(old) = local.upstream.take() {
                unsubscribe
                    .entry(old)
                    .or_default()
                    .push(channel.to_string());
            }
            local.active = false;
            to_subscribe.push(channel.clone());
        }
        (to_subscribe, unsubscribe)
    }

    /// Ends the streams to channel servers that left `ring`.
    pub(super) fn close_departed(&mut self, ring: &Ring) {
        let live: HashSet<&NodeId> = ring.nodes().iter().map(|n| &n.id).collect();
        let gone: Vec<NodeId> = self
            .upstreams
            .keys()
            .filter(|n| !live.contains(n))
            .cloned()
            .collect();
        for node in gone {
            if let Some(upstream) = self.upstreams.remove(&node) {
                upstream.cancel.cancel();
            }
        }
    }

    /// `node`'s stream is gone: it is ended, and its channels wait to resubscribe.
    pub(super) fn lose(&mut self, node: &NodeId) {
        if let Some(upstream) = self.upstreams.remove(node) {
            upstream.cancel.cancel();
        }
        for local in self.channels.values_mut() {
            local.detach(node);
        }
    }
}

/// `member` as reported now.
fn report(user: &UserId, member: &Member) -> Reported {
    Reported {
        user: user.clone(),
        team: member.team.clone(),
        conns: member.conns,
        since_ms: member.since_ms,
        announced: member.announced,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_core::{RingNode, TeamId, UserId};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::close::Closer;
    use crate::outbox::Outbox;

    fn channel(name: &str) -> ChannelId {
        ChannelId::new(name).unwrap()
    }

    fn sink(id: ConnId) -> ConnSink {
        let outbox = Arc::new(Outbox::new(16, 1 << 20));
        let user = UserId::new("U1").unwrap();
        ConnSink::new(id, user, outbox, Arc::new(Closer::default()))
    }

    fn node(name: &str) -> RingNode {
        RingNode {
            id: NodeId::new(name).unwrap(),
            addr: format!("{name}:1"),
        }
    }

    fn ring(nodes: &[RingNode]) -> Ring {
        Ring::empty().rebalanced(nodes)
    }

    /// A stream handle with nothing behind it.
    fn upstream() -> Upstream {
        let (commands, _) = tokio::sync::mpsc::channel(1);
        Upstream {
            commands,
            cancel: CancellationToken::new(),
        }
    }

    #[test]
    fn a_channel_is_subscribed_once_and_its_joiners_wait_for_the_confirmation() {
        let mut state = State::default();
        let c1 = channel("C1");
        let (waiting, subscribe) = state.join(&sink(1), std::slice::from_ref(&c1));
        assert_eq!((waiting.len(), &subscribe), (1, &vec![c1.clone()]));
        let one = ring(&[node("cs1")]);
        let sent = state.assign(&one, subscribe);
        assert_eq!(sent[&NodeId::new("cs1").unwrap()].1, ["C1"]);
        // A second connection while the subscription is pending: it waits, nothing is sent.
        let (mut second, subscribe) = state.join(&sink(2), std::slice::from_ref(&c1));
        assert_eq!((second.len(), subscribe.len()), (1, 0));
        // Confirmed with nothing missed: both wake, and a later joiner does not wait.
        assert_eq!(state.channels.get_mut(&c1).unwrap().confirmed(None), None);
        assert!(second.pop().unwrap().try_recv().is_ok());
        let (waiting, subscribe) = state.join(&sink(3), std::slice::from_ref(&c1));
        assert!(waiting.is_empty() && subscribe.is_empty());
        assert_eq!(state.channels[&c1].conns.len(), 3);
    }

    #[test]
    fn the_last_leaver_unsubscribes() {
        let mut state = State::default();
        let (c1, c2) = (channel("C1"), channel("C2"));
        let both = [c1.clone(), c2.clone()];
        let (_, subscribe) = state.join(&sink(1), &both);
        state.assign(&ring(&[node("cs1")]), subscribe);
        state.join(&sink(2), std::slice::from_ref(&c1));
        let unsubscribe = state.leave(1, &both);
        assert_eq!(unsubscribe[&NodeId::new("cs1").unwrap()], ["C2"]);
        assert_eq!(state.channels.len(), 1);
        let unsubscribe = state.leave(2, &both);
        assert_eq!(unsubscribe[&NodeId::new("cs1").unwrap()], ["C1"]);
        assert!(state.channels.is_empty());
        // Leaving what was never joined changes nothing.
        assert!(state.leave(3, &both).is_empty());
    }

    #[test]
    fn without_a_ring_nothing_is_sent_and_the_next_ring_subscribes() {
        let mut state = State::default();
        let c1 = channel("C1");
        let (_, subscribe) = state.join(&sink(1), std::slice::from_ref(&c1));
        assert!(state.assign(&Ring::empty(), subscribe).is_empty());
        assert_eq!(state.channels[&c1].upstream, None);
        let (moved, unsubscribe) = state.moved(&ring(&[node("cs1")]));
        assert_eq!((moved, unsubscribe.len()), (vec![c1], 0));
    }

    #[test]
    fn a_ring_change_moves_only_the_channels_whose_owner_changed() {
        let mut state = State::default();
        let channels: Vec<ChannelId> = (0..64).map(|i| channel(&format!("C{i}"))).collect();
        let (_, subscribe) = state.join(&sink(1), &channels);
        let before = ring(&[node("cs1")]);
        state.assign(&before, subscribe);
        state
            .upstreams
            .insert(NodeId::new("cs1").unwrap(), upstream());
        for local in state.channels.values_mut() {
            local.activate();
        }
        let after = ring(&[node("cs1"), node("cs2")]);
        let (moved, unsubscribe) = state.moved(&after);
        let cs2 = NodeId::new("cs2").unwrap();
        let expected: Vec<&ChannelId> = channels
            .iter()
            .filter(|c| after.owner_of(c).map(|n| &n.id) == Some(&cs2))
            .collect();
        assert!(!expected.is_empty() && expected.len() < channels.len());
        assert_eq!(moved.len(), expected.len());
        assert_eq!(unsubscribe[&NodeId::new("cs1").unwrap()].len(), moved.len());
        for channel in &channels {
            let local = &state.channels[channel];
            assert_eq!(local.active, !moved.contains(channel), "{channel}");
        }
        // cs1 left: its stream ends.
        let cancel = state.upstreams[&NodeId::new("cs1").unwrap()].cancel.clone();
        state.close_departed(&ring(&[node("cs2")]));
        assert!(state.upstreams.is_empty() && cancel.is_cancelled());
    }

    #[test]
    fn a_lost_stream_detaches_its_channels_only() {
        let mut state = State::default();
        let (c1, c2) = (channel("C1"), channel("C2"));
        state.join(&sink(1), &[c1.clone(), c2.clone()]);
        let (cs1, cs2) = (NodeId::new("cs1").unwrap(), NodeId::new("cs2").unwrap());
        for (c, n) in [(&c1, &cs1), (&c2, &cs2)] {
            let local = state.channels.get_mut(c).unwrap();
            local.upstream = Some(n.clone());
            local.activate();
        }
        state.upstreams.insert(cs1.clone(), upstream());
        let cancel = state.upstreams[&cs1].cancel.clone();
        state.lose(&cs1);
        assert!(cancel.is_cancelled() && state.upstreams.is_empty());
        assert_eq!(state.channels[&c1].upstream, None);
        assert!(!state.channels[&c1].active);
        assert_eq!(state.channels[&c2].upstream, Some(cs2.clone()));
        assert!(state.channels[&c2].active);
        // A refusal from a server the channel is not on is stale.
        assert!(!state.channels.get_mut(&c2).unwrap().detach(&cs1));
        assert!(state.channels.get_mut(&c2).unwrap().detach(&cs2));
    }

    fn sink_of(id: ConnId, user: &str) -> ConnSink {
        let outbox = Arc::new(Outbox::new(16, 1 << 20));
        let user = UserId::new(user).unwrap();
        ConnSink::new(id, user, outbox, Arc::new(Closer::default()))
            .with_team(TeamId::new("T1").unwrap())
    }

    fn counts(reported: &[Reported]) -> Vec<(String, u32, bool)> {
        let mut counts: Vec<(String, u32, bool)> = reported
            .iter()
            .map(|r| (r.user.to_string(), r.conns, r.announced))
            .collect();
        counts.sort();
        counts
    }

    #[test]
    fn members_go_upstream_whole_with_a_subscription_then_as_coalesced_changes() {
        let mut state = State::default();
        let c1 = channel("C1");
        let one = std::slice::from_ref(&c1);
        state.join(&sink_of(1, "U1"), one);
        state.join(&sink_of(2, "U1"), one);
        state.join(&sink_of(3, "U2"), one);
        // Not subscribed anywhere yet: nothing to send but the whole set with the subscription.
        assert!(state.take_changes().is_empty());
        state.assign(&ring(&[node("cs1")]), vec![c1.clone()]);
        let set = state.full_set(&c1);
        assert_eq!(
            counts(&set),
            [("U1".into(), 2, false), ("U2".into(), 1, false)]
        );
        assert!(
            set.iter()
                .all(|r| r.team.as_ref().is_some_and(|t| t.as_str() == "T1"))
        );
        assert!(
            state.take_changes().is_empty(),
            "the subscription carried them"
        );
        // Refused (the channel server did not count them): still news for the next one.
        assert!(state.full_set(&c1).iter().all(|m| !m.announced));
        let local = state.channels.get_mut(&c1).unwrap();
        local.announced();
        local.activate();
        // Three changes to U1 and one to U2 since: one report each, absolute (U1's
        // connections all left and one came back: a new member entry here, not yet reported).
        state.leave(1, one);
        state.leave(2, one);
        state.join(&sink_of(4, "U1"), one);
        state.leave(3, one);
        let changes = state.take_changes();
        let cs1 = NodeId::new("cs1").unwrap();
        assert_eq!(changes.len(), 1);
        let (ch, reported) = &changes[&cs1][0];
        assert_eq!(ch, &c1);
        assert_eq!(
            counts(reported),
            [("U1".into(), 1, false), ("U2".into(), 0, true)]
        );
        assert!(state.take_changes().is_empty());
        // A resubscription (after a ring change) says they were announced.
        let set = state.full_set(&c1);
        assert_eq!(counts(&set), [("U1".into(), 1, true)]);
        // The last one gone: the unsubscribe says it, no member change.
        state.leave(4, one);
        assert!(state.take_changes().is_empty());
    }

    #[test]
    fn a_confirmation_past_what_was_delivered_starts_a_catch_up() {
        let ts = |s: &str| Ts::parse(s).unwrap();
        let mut local = LocalChannel {
            last_ts: Some(ts("1700000000.000001")),
            ..LocalChannel::default()
        };
        let (tx, mut rx) = oneshot::channel();
        local.waiters.push(tx);
        assert_eq!(
            local.confirmed(Some(ts("1700000000.000005"))),
            Some(ts("1700000000.000001"))
        );
        assert!(!local.active && local.catching_up.is_some());
        assert!(rx.try_recv().is_err());
        // Nothing missed (or nothing delivered yet): active at once.
        let mut fresh = LocalChannel::default();
        assert_eq!(fresh.confirmed(Some(ts("1700000000.000005"))), None);
        assert!(fresh.active && fresh.catching_up.is_none());
    }
}
