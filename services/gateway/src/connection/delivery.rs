//! What a connection writes: the items the hub queues to it, taken in batches; the channels its
//! user is a member of; and per channel the cursor of what the client has, so that every
//! persisted event is written once and in ts order — across joins' catch-ups and resumes too.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::{ChannelId, Identity, Ts};
use mesh_rtm as rtm;

use super::context::ConnectionContext;
use crate::close::Close;
use crate::history;
use crate::outbox::{ConnSink, Outbox};
use crate::socket::Outgoing;
use crate::vocab::{Control, Outbound, Rendered};

/// Items queued to one connection before it counts as a slow consumer (the byte budget,
/// `Limits::outbound_bytes`, is usually reached first); also the most live events a channel's
/// backlog may hold back.
pub const OUTBOUND_QUEUE: usize = 8192;
/// How long a connection waits for its channels' upstream subscriptions: a new one before
/// `hello`, a joined channel before its catch-up.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames written before one flush when several are queued.
pub(super) const WRITE_BATCH: usize = 64;

/// The per-connection maps are looked up for every event delivered: a fast hasher (foldhash,
/// seeded per process) instead of SipHash. Their keys are the connection's own channels, from
/// its signed token or its joins.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A connection's delivery state, owned by its task.
pub(super) struct Delivery {
    ctx: Arc<ConnectionContext>,
    /// How the hub reaches this connection, for its joins.
    sink: ConnSink,
    /// Its own queue, for the backlogs its joins and resumes send later.
    outbox: Arc<Outbox>,
    /// Channels the user may read and post to right now.
    pub(super) members: HashSet<ChannelId>,
    /// The user's and the team's channels, in that order: never left. Only the user's carries
    /// the directives that join and leave channels.
    own: [ChannelId; 2],
    /// Channels joined or resumed whose history is still being read: their live events wait
    /// here, so the client gets history then live, in ts order.
    catching_up: HashMap<ChannelId, Vec<Arc<Rendered>>>,
    /// Per channel, the newest ts this client has (written, or from before it connected):
    /// the cursors it resumes from if the region drains.
    cursors: FastMap<ChannelId, Ts>,
    /// Events in the batch being gathered, and when the gateway received the oldest: counted
    /// in the metrics once the batch is written.
    written: u64,
    oldest: Option<Instant>,
    /// The items of the batch being taken from the outbox; its capacity is kept from one
    /// batch to the next, so a busy connection allocates nothing per batch.
    taken: Vec<Outbound>,
}

impl Delivery {
    /// The delivery state of a connection of `identity` into `outbox`, a member of `channels`.
    pub(super) fn new(
        ctx: Arc<ConnectionContext>,
        sink: ConnSink,
        outbox: Arc<Outbox>,
        identity: &Identity,
        channels: &[ChannelId],
    ) -> Self {
        Delivery {
            ctx,
            sink,
            outbox,
            own: [
                ChannelId::from(&identity.user),
                ChannelId::from(&identity.team),
            ],
            members: channels.iter().cloned().collect(),
            catching_up: HashMap::new(),
            cursors: FastMap::default(),
            written: 0,
            oldest: None,
            taken: Vec::new(),
        }
    }

    /// Sets where each channel starts for this client, before its channels are joined:
    /// resumed channels from the client's `cursors` (their live events wait for their history;
    /// returned are those of channels it is a member of), the others from the gateway's newest
    /// ts now, so that every later event either reaches it live or is in history.
    pub(super) fn start(&mut self, cursors: Vec<(ChannelId, Ts)>) -> Vec<(ChannelId, Ts)> {
        let cursors: Vec<(ChannelId, Ts)> = cursors
            .into_iter()
            .filter(|(c, _)| self.members.contains(c))
            .collect();
        for (channel, cursor) in &cursors {
            self.catching_up.insert(channel.clone(), Vec::new());
            self.cursors.insert(channel.clone(), *cursor);
        }
        for channel in &self.members {
            if !self.cursors.contains_key(channel) {
                let start = self.ctx.hub.last_ts(channel).unwrap_or_default();
                self.cursors.insert(channel.clone(), start);
            }
        }
        cursors
    }

    /// Reads what the client missed since each of `cursors`, on tracked tasks.
    pub(super) fn resume(&self, cursors: Vec<(ChannelId, Ts)>) {
        for (channel, cursor) in cursors {
            self.ctx.tracker.spawn(history::resume(
                self.ctx.router.clone(),
                self.ctx.metrics.clone(),
                self.outbox.clone(),
                channel,
                cursor,
            ));
        }
    }

    /// Takes queued items until the batch is full or the queue empty, appending the frames to
    /// write to `frames`; `Err` when the connection must close.
    pub(super) fn take_batch(&mut self, frames: &mut Outgoing) -> Result<(), Close> {
        let mut items = std::mem::take(&mut self.taken);
        self.outbox
            .pop_into(&mut items, WRITE_BATCH.saturating_sub(frames.frames()));
        let mut taken = Ok(());
        for item in items.drain(..) {
            if !self.on_outbound(item, frames) {
                taken = Err(Close::BacklogOverflow);
                break;
            }
        }
        self.taken = items;
        taken
    }

    /// Everything still queued, for a goodbye (stops at a backlog overflow).
    pub(super) fn take_all(&mut self, frames: &mut Outgoing) {
        while let Some(item) = self.outbox.pop() {
            if !self.on_outbound(item, frames) {
                break;
            }
        }
    }

    /// Gives back the memory kept between writes, once the connection is quiet.
    pub(super) fn release(&mut self, frames: &mut Outgoing) {
        self.taken = Vec::new();
        frames.release();
    }

    /// The batch gathered was written: counted in the metrics.
    pub(super) fn batch_written(&mut self) {
        if self.written > 0 {
            self.ctx.metrics.written(self.written, self.oldest.take());
            self.written = 0;
        }
    }

    /// Per channel, the newest ts the client has.
    pub(super) fn cursors(&self) -> Vec<(ChannelId, Ts)> {
        self.cursors.iter().map(|(c, t)| (c.clone(), *t)).collect()
    }

    /// Takes every channel out of the membership, for the teardown.
    pub(super) fn leave_all(&mut self) -> Vec<ChannelId> {
        self.members.drain().collect()
    }

    /// `event` goes out in the batch being gathered.
    fn count_written(&mut self, event: &Rendered) {
        self.written += 1;
        if self.oldest.is_none() {
            self.oldest = event.received;
        }
    }

    /// The client has `event` now: its channel's cursor moves to it.
    /// Returns false, and moves nothing, when the client already has it (a persisted event
    /// at or before the channel's cursor). One map lookup, no allocation on the hot path.
    fn advance(&mut self, event: &Rendered) -> bool {
        let Some(ts) = event.ts else {
            return true;
        };
        match self.cursors.get_mut(&event.channel) {
            Some(cursor) if ts <= *cursor => false,
            Some(cursor) => {
                *cursor = ts;
                true
            }
            None => {
                self.cursors.insert(event.channel.clone(), ts);
                true
            }
        }
    }

    /// Applies one queued item, appending the frames to write to `out`. Returns false when the
    /// connection must close as a slow consumer.
    fn on_outbound(&mut self, item: Outbound, out: &mut Outgoing) -> bool {
        match item {
            Outbound::Event(event) => {
                if !self.catching_up.is_empty()
                    && let Some(buffer) = self.catching_up.get_mut(&event.channel)
                {
                    if buffer.len() >= OUTBOUND_QUEUE {
                        return false;
                    }
                    buffer.push(event);
                } else if self.advance(&event) {
                    self.count_written(&event);
                    out.event(event);
                }
                // Otherwise already written: a resume's history read can overtake the live
                // stream.
            }
            Outbound::Frame(frame) => out.text(&frame),
            Outbound::Control(control) => self.on_control(*control, out),
        }
        true
    }

    /// Whether a directive published on channel `on` is this connection's to follow: only
    /// its user's own channel carries them. Any other is ignored, counted and logged: a
    /// directive on a shared channel (the team's, an ordinary one, another user's) would
    /// otherwise join or remove every connection subscribed to it.
    fn directive_is_mine(&self, on: &ChannelId, channel: &ChannelId) -> bool {
        if on == self.user_channel() {
            return true;
        }
        self.ctx.metrics.directives_ignored.inc();
        tracing::debug!(conn = self.sink.id, user = %self.sink.user, %on, %channel,
            "ignored a channel directive not on the user's own channel");
        false
    }

    /// The connection's user's own channel.
    fn user_channel(&self) -> &ChannelId {
        &self.own[0]
    }

    /// Applies a change to what the connection receives.
    fn on_control(&mut self, control: Control, out: &mut Outgoing) {
        match control {
            Control::Joined { channel, since, on } => {
                if !self.directive_is_mine(&on, &channel) {
                    return;
                }
                if self.members.insert(channel.clone()) {
                    self.cursors
                        .insert(channel.clone(), since.unwrap_or_default());
                    self.catching_up.insert(channel.clone(), Vec::new());
                    let waiting = self
                        .ctx
                        .hub
                        .join(&self.sink, std::slice::from_ref(&channel));
                    self.ctx.tracker.spawn(history::join(
                        self.ctx.router.clone(),
                        self.outbox.clone(),
                        channel,
                        since,
                        waiting,
                        SUBSCRIBE_TIMEOUT,
                    ));
                }
            }
            Control::Backlog(backlog) => {
                let Some(live) = self.catching_up.remove(&backlog.channel) else {
                    return;
                };
                if let Some(preface) = &backlog.preface {
                    out.text(preface);
                }
                for event in history::merge(backlog.after, backlog.events, live, |e| e.ts) {
                    if self.advance(&event) {
                        self.count_written(&event);
                        out.event(event);
                    }
                }
            }
            Control::Gap {
                channel,
                floor,
                delivered,
            } => {
                // A cursor at 0: nothing written on the channel yet.
                let cursor = self
                    .cursors
                    .get(&channel)
                    .copied()
                    .filter(|c| *c != Ts::default());
                if cursor.is_none_or(|c| c < floor) {
                    self.ctx.metrics.live_gaps.inc();
                    let cursor = cursor.unwrap_or(delivered);
                    out.text(&rtm::history_gap(&channel, cursor, None));
                }
            }
            Control::Left { channel, on } => {
                if !self.directive_is_mine(&on, &channel) {
                    return;
                }
                if !self.own.contains(&channel) && self.members.remove(&channel) {
                    self.cursors.remove(&channel);
                    self.catching_up.remove(&channel);
                    self.ctx
                        .hub
                        .leave(self.sink.id, std::slice::from_ref(&channel));
                    out.text(&rtm::channel_left(&channel));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::{TeamId, UserId};

    use super::*;
    use crate::close::Closer;
    use crate::vocab::Backlog;

    fn ts(micros: u64) -> Ts {
        Ts::parse(&format!("1700000000.{micros:06}")).unwrap()
    }

    fn channel(name: &str) -> ChannelId {
        ChannelId::new(name).unwrap()
    }

    /// An event of channel `name` at ts `micros` (`None`: transient), its frame naming both.
    fn event(name: &str, micros: Option<u64>) -> Arc<Rendered> {
        let at = micros.map_or("-".to_string(), |m| m.to_string());
        Arc::new(Rendered {
            channel: channel(name),
            ts: micros.map(ts),
            frame: format!("{name}:{at}").into(),
            received: None,
        })
    }

    /// User U1 of team T1, a member of C1 (and of its own channels), with nothing queued.
    fn delivery(ctx: &Arc<ConnectionContext>) -> Delivery {
        let identity = Identity {
            user: UserId::new("U1").unwrap(),
            team: TeamId::new("T1").unwrap(),
            name: None,
            channels: vec![channel("C1")],
            expires_at: 0,
            jti: None,
        };
        let outbox = Arc::new(Outbox::new(OUTBOUND_QUEUE, 1 << 20));
        let closer = Arc::new(Closer::default());
        let sink = ConnSink::new(1, identity.user.clone(), outbox.clone(), closer);
        Delivery::new(
            ctx.clone(),
            sink,
            outbox,
            &identity,
            &identity.all_channels(),
        )
    }

    /// What the items make the connection write, as text.
    fn written(delivery: &mut Delivery, items: Vec<Outbound>) -> Vec<String> {
        let mut frames = Outgoing::default();
        for item in items {
            assert!(delivery.on_outbound(item, &mut frames));
        }
        frames.texts()
    }

    #[tokio::test]
    async fn a_gap_is_written_to_a_connection_whose_cursor_is_below_the_floor() {
        let ctx = ConnectionContext::for_tests();
        let mut d = delivery(&ctx);
        d.start(Vec::new());
        let gap = |floor: u64| {
            Outbound::control(Control::Gap {
                channel: channel("C1"),
                floor: ts(floor),
                delivered: ts(1),
            })
        };
        // Nothing written yet: the gateway's delivered ts is the cursor it names.
        let frames = written(&mut d, vec![gap(3)]);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("\"history_gap\""), "{frames:?}");
        assert!(frames[0].contains(&ts(1).to_string()), "{frames:?}");
        let frames = written(
            &mut d,
            vec![Outbound::Event(event("C1", Some(5))), gap(5), gap(6)],
        );
        assert_eq!(frames.len(), 2, "none at its cursor: {frames:?}");
        assert!(frames[1].contains(&ts(5).to_string()), "{frames:?}");
    }

    #[tokio::test]
    async fn each_persisted_event_is_written_once_and_in_order() {
        let ctx = ConnectionContext::for_tests();
        let mut d = delivery(&ctx);
        d.start(Vec::new());
        let items = [Some(1), Some(2), Some(2), Some(1), None, Some(3)]
            .map(|t| Outbound::Event(event("C1", t)));
        assert_eq!(
            written(&mut d, items.to_vec()),
            ["C1:1", "C1:2", "C1:-", "C1:3"]
        );
        assert_eq!(d.written, 4);
        d.batch_written();
        assert_eq!((d.written, ctx.metrics.written.get()), (0, 4));
        assert!(d.cursors().contains(&(channel("C1"), ts(3))));
    }

    #[tokio::test]
    async fn a_resume_writes_its_history_then_the_live_events_that_waited() {
        let ctx = ConnectionContext::for_tests();
        let mut d = delivery(&ctx);
        let resumed = d.start(vec![(channel("C1"), ts(2)), (channel("C9"), ts(1))]);
        // Only channels the user is a member of are resumed.
        assert_eq!(resumed, [(channel("C1"), ts(2))]);
        let live = [Some(4), None, Some(5)].map(|t| Outbound::Event(event("C1", t)));
        assert!(written(&mut d, live.to_vec()).is_empty());
        let backlog = Backlog {
            channel: channel("C1"),
            preface: Some("gap".into()),
            after: Some(ts(2)),
            events: [1, 2, 3, 4].map(|t| event("C1", Some(t))).to_vec(),
        };
        let control = Outbound::control(Control::Backlog(backlog));
        assert_eq!(
            written(&mut d, vec![control]),
            ["gap", "C1:3", "C1:4", "C1:-", "C1:5"]
        );
        // A second backlog for the same channel finds nothing waiting: it is dropped.
        let again = Backlog {
            channel: channel("C1"),
            preface: Some("gap".into()),
            after: None,
            events: vec![event("C1", Some(9))],
        };
        let control = Outbound::control(Control::Backlog(again));
        assert!(written(&mut d, vec![control]).is_empty());
    }

    #[tokio::test]
    async fn a_channel_joined_while_connected_catches_up_then_leaves() {
        let ctx = ConnectionContext::for_tests();
        let mut d = delivery(&ctx);
        d.start(Vec::new());
        let joined = Control::Joined {
            channel: channel("C2"),
            since: Some(ts(1)),
            on: channel("U1"),
        };
        assert!(written(&mut d, vec![Outbound::control(joined)]).is_empty());
        assert!(d.members.contains(&channel("C2")));
        assert_eq!(ctx.hub.channel_count(), 1);
        let live = Outbound::Event(event("C2", Some(3)));
        assert!(written(&mut d, vec![live]).is_empty());
        let backlog = Backlog {
            channel: channel("C2"),
            preface: Some("joined".into()),
            after: None,
            events: vec![event("C2", Some(2)), event("C2", Some(3))],
        };
        assert_eq!(
            written(&mut d, vec![Outbound::control(Control::Backlog(backlog))]),
            ["joined", "C2:2", "C2:3"]
        );
        let left = Control::Left {
            channel: channel("C2"),
            on: channel("U1"),
        };
        let got = written(&mut d, vec![Outbound::control(left)]);
        assert_eq!(got.len(), 1);
        assert!(got[0].contains("channel_left"), "{got:?}");
        assert!(!d.members.contains(&channel("C2")));
        assert_eq!(ctx.hub.channel_count(), 0);
    }

    #[tokio::test]
    async fn the_users_own_channels_are_never_left() {
        let ctx = ConnectionContext::for_tests();
        let mut d = delivery(&ctx);
        for own in ["U1", "T1"] {
            let left = Control::Left {
                channel: channel(own),
                on: channel("U1"),
            };
            assert!(written(&mut d, vec![Outbound::control(left)]).is_empty());
            assert!(d.members.contains(&channel(own)));
        }
        // Nor is a channel the user is not in.
        let left = Control::Left {
            channel: channel("C7"),
            on: channel("U1"),
        };
        assert!(written(&mut d, vec![Outbound::control(left)]).is_empty());
        assert_eq!(d.members.len(), 3);
        assert_eq!(d.leave_all().len(), 3);
    }

    #[tokio::test]
    async fn directives_are_followed_only_on_the_users_own_channel() {
        let ctx = ConnectionContext::for_tests();
        let mut d = delivery(&ctx);
        d.start(Vec::new());
        // On the team's channel, an ordinary channel the user is in, another user's channel:
        // none joins, none leaves.
        for on in ["T1", "C1", "U2"] {
            let joined = Control::Joined {
                channel: channel("C9"),
                since: None,
                on: channel(on),
            };
            let left = Control::Left {
                channel: channel("C1"),
                on: channel(on),
            };
            let items = vec![Outbound::control(joined), Outbound::control(left)];
            assert!(written(&mut d, items).is_empty(), "on {on}");
        }
        assert!(!d.members.contains(&channel("C9")));
        assert!(d.members.contains(&channel("C1")));
        assert_eq!(ctx.hub.channel_count(), 0, "nothing subscribed");
        assert_eq!(ctx.metrics.directives_ignored.get(), 6);
        // The same directives on the user's own channel are followed.
        let joined = Control::Joined {
            channel: channel("C9"),
            since: None,
            on: channel("U1"),
        };
        assert!(written(&mut d, vec![Outbound::control(joined)]).is_empty());
        assert!(d.members.contains(&channel("C9")));
        assert_eq!(ctx.metrics.directives_ignored.get(), 6);
    }

    #[tokio::test]
    async fn a_backlog_that_overflows_closes_the_connection() {
        let ctx = ConnectionContext::for_tests();
        let mut d = delivery(&ctx);
        d.start(vec![(channel("C1"), ts(1))]);
        let mut frames = Outgoing::default();
        for i in 0..OUTBOUND_QUEUE {
            let live = Outbound::Event(event("C1", Some(2 + i as u64)));
            assert!(d.on_outbound(live, &mut frames));
        }
        d.outbox
            .push(Outbound::Event(event("C1", Some(999_999))))
            .unwrap();
        assert_eq!(d.take_batch(&mut frames), Err(Close::BacklogOverflow));
        assert!(frames.is_empty());
    }

    #[tokio::test]
    async fn a_batch_takes_at_most_a_write_worth_of_frames() {
        let ctx = ConnectionContext::for_tests();
        let mut d = delivery(&ctx);
        d.start(Vec::new());
        for i in 0..WRITE_BATCH + 3 {
            d.outbox.push(Outbound::frame(format!("f{i}"))).unwrap();
        }
        let mut frames = Outgoing::default();
        assert_eq!(d.take_batch(&mut frames), Ok(()));
        assert_eq!(frames.frames(), WRITE_BATCH);
        // A goodbye takes everything left.
        d.take_all(&mut frames);
        assert_eq!(frames.frames(), WRITE_BATCH + 3);
        assert!(d.outbox.pop().is_none());
    }
}
