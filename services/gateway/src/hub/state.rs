//! The hub's bookkeeping, apart from its I/O: which local connections want each channel, which
//! channel server each channel is subscribed on, and whether that subscription is confirmed.
//! Every method here only changes the maps and says what the hub must send.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use mesh_core::{ChannelEvent, ChannelId, NodeId, Ring, Ts};
use tokio::sync::oneshot;

use crate::outbox::ConnSink;
use crate::upstream::Upstream;
use crate::vocab::ConnId;

/// A live event waiting for a catch-up: the event, its rendered frame, and when it arrived.
pub(super) type Buffered = (ChannelEvent, Option<Utf8Bytes>, Option<Instant>);

/// Unsubscribes to send, per channel server.
pub(super) type Unsubscribes = HashMap<NodeId, Vec<String>>;

/// Local state of one channel.
#[derive(Debug, Default)]
pub(super) struct LocalChannel {
    pub(super) conns: HashMap<ConnId, ConnSink>,
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
            local.conns.insert(sink.id, sink.clone());
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
            local.conns.remove(&conn);
            if local.conns.is_empty() {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_core::{RingNode, UserId};
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
