//! One client WebSocket: subscribe its channels, say hello, then carry frames both ways.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use mesh_core::{ChannelEvent, ChannelId, EventBody, Identity, Origin};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::Shared;
use crate::hub::{CloseReason, Closer, ConnId, ConnSink, Control, Outbound, Rendered};
use crate::limits::TokenBucket;
use crate::outbox::Outbox;
use crate::socket::{ClientSocket, Error as WsError, Message, Outgoing};
use mesh_rtm::{self as rtm, ClientFrame, ErrorCode, RtmError};

/// Items queued to one connection before it counts as a slow consumer (the byte budget,
/// `Limits::outbound_bytes`, is usually reached first).
pub const OUTBOUND_QUEUE: usize = 8192;
/// How long a new connection waits for its channels' upstream subscriptions.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most history events a join catches up on.
const CATCH_UP_LIMIT: u32 = 1000;
/// Client frames being published at once per connection; past it the socket is not read.
const MAX_IN_FLIGHT: usize = 16;

/// WebSocket close codes the gateway uses. Documented in the README.
pub mod close {
    /// The server is shutting down (after `goodbye`): reconnect.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The channels could not be subscribed in time: reconnect later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The client sent nothing, not even a pong, for the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4001;
    /// The connection's token was revoked: get a new token before reconnecting.
    pub const TOKEN_REVOKED: u16 = 4003;
    /// The client did not read fast enough (its queue overflowed, or a write stalled):
    /// reconnect.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client kept sending past its frame rate limit after `ratelimited` errors.
    pub const RATE_LIMITED: u16 = 4029;
}

/// How long the close frame may take to write before the socket is dropped regardless.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Frames written before one flush when several are queued.
const WRITE_BATCH: usize = 64;
/// Turns a connection yields, while each brings more events, before it writes.
const MORE_TURNS: usize = 4;

/// A connection's own state, owned by its task.
struct Connection {
    conn: ConnId,
    identity: Identity,
    shared: Arc<Shared>,
    sink: ConnSink,
    /// Its own queue, for the catch-up a join sends later.
    outbox: Arc<Outbox>,
    /// Channels the user may read and post to right now.
    members: HashSet<ChannelId>,
    /// The user's and team's channels: never left.
    own: [ChannelId; 2],
    /// Channels joined while connected whose history since the join is still being fetched:
    /// their live events wait here, so the client gets history then live, in ts order.
    catching_up: HashMap<ChannelId, Vec<Arc<Rendered>>>,
    /// Per channel, the newest ts this client has (written, or from before it connected):
    /// the cursors it resumes from if the region drains.
    cursors: FastMap<ChannelId, mesh_core::Ts>,
    /// Events in the batch being gathered, and when the gateway received the oldest: counted
    /// in the metrics once the batch is written.
    written: u64,
    oldest: Option<std::time::Instant>,
    /// The items of the batch being taken from the outbox; its capacity is kept from one
    /// batch to the next, so a busy connection allocates nothing per batch.
    taken: Vec<Outbound>,
}

/// The per-connection maps are looked up for every event delivered: a fast hasher (foldhash,
/// seeded per process) instead of SipHash. Their keys are the connection's own channels, from
/// its signed token or its joins.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

impl Connection {
    /// Takes queued items until the batch is full or the queue empty.
    fn take_batch(&mut self, outbox: &Outbox, frames: &mut Outgoing) -> Step {
        let mut items = std::mem::take(&mut self.taken);
        outbox.pop_into(&mut items, WRITE_BATCH.saturating_sub(frames.frames()));
        let mut step = Step::Write;
        for item in items.drain(..) {
            if !self.on_outbound(item, frames) {
                step = Step::End(Some((
                    close::SLOW_CONSUMER,
                    "slow consumer: catch-up buffer overflowed",
                )));
                break;
            }
        }
        self.taken = items;
        step
    }

    /// Gives back the memory kept between writes, once the connection is quiet.
    fn release(&mut self, frames: &mut Outgoing) {
        self.taken = Vec::new();
        frames.release();
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

    /// Applies a change to what the connection receives.
    fn on_control(&mut self, control: Control, out: &mut Outgoing) {
        match control {
            Control::Joined { channel, since } => {
                if self.members.insert(channel.clone()) {
                    self.cursors
                        .insert(channel.clone(), since.unwrap_or_default());
                    self.catching_up.insert(channel.clone(), Vec::new());
                    let waiting = self
                        .shared
                        .hub
                        .join(&self.sink, std::slice::from_ref(&channel));
                    let (shared, outbox) = (self.shared.clone(), self.outbox.clone());
                    self.shared
                        .tracker
                        .spawn(catch_up(shared, outbox, channel, since, waiting));
                }
            }
            Control::CatchUp { channel, events } => {
                let Some(live) = self.catching_up.remove(&channel) else {
                    return;
                };
                out.text(&rtm::channel_joined(&channel));
                let mut newest = None;
                for event in events.iter().chain(live.iter()) {
                    // Persisted events once each, in ts order; transient ones as they come.
                    match event.ts {
                        Some(ts) if newest.is_some_and(|n| ts <= n) => continue,
                        Some(ts) => newest = Some(ts),
                        None => {}
                    }
                    if self.advance(event) {
                        self.count_written(event);
                        out.event(event.clone());
                    }
                }
            }
            Control::Resume(resumed) => {
                let Some(live) = self.catching_up.remove(&resumed.channel) else {
                    return;
                };
                if let Some(oldest) = resumed.gap {
                    out.text(&rtm::history_gap(&resumed.channel, resumed.cursor, oldest));
                }
                // The missed events, then what came live meanwhile: each once, in ts order,
                // none at or before the cursor.
                let mut newest = Some(resumed.cursor);
                for event in resumed.events.iter().chain(live.iter()) {
                    match event.ts {
                        Some(ts) if newest.is_some_and(|n| ts <= n) => continue,
                        Some(ts) => newest = Some(ts),
                        None => {}
                    }
                    if self.advance(event) {
                        self.count_written(event);
                        out.event(event.clone());
                    }
                }
            }
            Control::Left { channel } => {
                if !self.own.contains(&channel) && self.members.remove(&channel) {
                    self.cursors.remove(&channel);
                    self.catching_up.remove(&channel);
                    self.shared
                        .hub
                        .leave(self.conn, std::slice::from_ref(&channel));
                    out.text(&rtm::channel_left(&channel));
                }
            }
        }
    }
}

/// After a join: waits for the channel's upstream subscription, reads its history since the
/// join, and queues both to the connection as one catch-up.
async fn catch_up(
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    channel: ChannelId,
    since: Option<mesh_core::Ts>,
    waiting: Vec<tokio::sync::oneshot::Receiver<()>>,
) {
    let subscribed =
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, futures::future::join_all(waiting)).await;
    if !matches!(&subscribed, Ok(r) if r.iter().all(Result::is_ok)) {
        tracing::warn!(%channel, "joined channel not subscribed in time; delivering live events only");
    }
    let mut events = Vec::new();
    if since.is_some() {
        match shared.router.history(&channel, since, CATCH_UP_LIMIT).await {
            Ok(history) => {
                if history.has_more {
                    tracing::warn!(%channel, "more than {CATCH_UP_LIMIT} events since the join; catching up on the first ones");
                }
                events = history
                    .events
                    .iter()
                    .filter_map(|event| {
                        Some(Arc::new(Rendered {
                            channel: channel.clone(),
                            ts: event.ts,
                            frame: Utf8Bytes::from(rtm::render(event)?),
                            received: None,
                        }))
                    })
                    .collect();
            }
            Err(e) => {
                tracing::warn!(%channel, error = %e, "reading history of a joined channel failed")
            }
        }
    }
    let item = Outbound::control(Control::CatchUp { channel, events });
    outbox.push_own(item);
}

/// Runs one connection until either side closes or the gateway shuts down.
pub async fn run(
    mut socket: ClientSocket,
    shared: Arc<Shared>,
    conn: ConnId,
    identity: Identity,
    batch_presence: bool,
    cursors: Vec<(ChannelId, mesh_core::Ts)>,
) {
    let outbox = Arc::new(Outbox::new(OUTBOUND_QUEUE, shared.limits.outbound_bytes));
    let closer = Arc::new(Closer::default());
    let sink = ConnSink::new(conn, identity.user.clone(), outbox.clone(), closer.clone());
    let initial = identity.all_channels();
    let mut me = Connection {
        conn,
        own: [
            ChannelId::from(&identity.user),
            ChannelId::from(&identity.team),
        ],
        members: initial.iter().cloned().collect(),
        identity,
        shared: shared.clone(),
        sink,
        outbox: outbox.clone(),
        catching_up: HashMap::new(),
        taken: Vec::new(),
        cursors: FastMap::default(),
        written: 0,
        oldest: None,
    };
    // Frames to write once the branch that produced them is done: one write per batch.
    let mut frames = Outgoing::default();
    let cancel = shared.cancel.clone();

    // Channels resumed from a cursor hold their live events until their history is read.
    let cursors: Vec<(ChannelId, mesh_core::Ts)> = cursors
        .into_iter()
        .filter(|(c, _)| me.members.contains(c))
        .collect();
    for (channel, cursor) in &cursors {
        me.catching_up.insert(channel.clone(), Vec::new());
        me.cursors.insert(channel.clone(), *cursor);
    }
    // Where each channel starts for this client: every event after the gateway's newest ts at
    // this point either reaches it live or is in history.
    for channel in &me.members {
        if !me.cursors.contains_key(channel) {
            let start = shared.hub.last_ts(channel).unwrap_or_default();
            me.cursors.insert(channel.clone(), start);
        }
    }
    // Subscribe first, hello after: every event posted after hello reaches this client.
    let waiting = shared.hub.join(&me.sink, &initial);
    let ready = tokio::time::timeout(SUBSCRIBE_TIMEOUT, futures::future::join_all(waiting)).await;
    let ready = matches!(ready, Ok(results) if results.iter().all(Result::is_ok));
    if !ready {
        tracing::warn!(conn, user = %me.identity.user, "channel subscriptions not confirmed in time");
        let error = RtmError::new(
            ErrorCode::Unavailable,
            "channels unavailable; reconnect later",
            None,
        );
        frames.text(&error.render());
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            socket.send(
                &mut frames,
                close_frame(close::TRY_AGAIN_LATER, "subscriptions timed out"),
            ),
        )
        .await;
        shared.hub.leave(conn, &initial);
        return;
    }
    frames.text(&rtm::hello());
    if !matches!(
        write(
            &mut socket,
            &mut frames,
            false,
            shared.limits.write_timeout,
            None
        )
        .await,
        Written::Done
    ) {
        shared.hub.leave(conn, &initial);
        return;
    }
    tracing::debug!(conn, user = %me.identity.user, channels = me.members.len(), "client connected");
    shared.metrics.connected();
    shared.region_state.register(conn, closer.clone());
    if let Some(presence) = &shared.presence {
        presence.connected(&me.sink, batch_presence);
    }
    for (channel, cursor) in cursors {
        shared.tracker.spawn(crate::resume::resume(
            shared.clone(),
            me.outbox.clone(),
            channel,
            cursor,
        ));
    }

    let limits = &shared.limits;
    let mut bucket = TokenBucket::new(limits.frames_per_sec, limits.frame_burst, Instant::now());
    let mut refusals = 0u32;
    let mut last_heard = Instant::now();
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + limits.ping_interval,
        limits.ping_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Boxed: `FuturesUnordered::new` allocates a stub task holding one future inline, which
    // for the publish future would cost every idle connection kilobytes.
    let mut in_flight: FuturesUnordered<Publishing> = FuturesUnordered::new();
    // Made once, not on every turn of the loop: making one locks the token's tree.
    let shutdown = cancel.cancelled();
    let closing = closer.token.cancelled();
    tokio::pin!(shutdown, closing);
    let close: Option<(u16, &'static str)> = loop {
        let step = tokio::select! {
            _ = &mut shutdown => {
                frames.text(&rtm::goodbye());
                let _ = write(&mut socket, &mut frames, false, limits.write_timeout, None).await;
                Step::End(Some((close::GOING_AWAY, "server shutting down")))
            }
            _ = &mut closing => match closer.reason.get() {
                Some(CloseReason::Drain) => {
                    // Lame duck: write what is already queued, keep the cursors for the
                    // reconnect, then goodbye.
                    while let Some(item) = outbox.pop() {
                        if !me.on_outbound(item, &mut frames) {
                            break;
                        }
                    }
                    let cursors: Vec<(ChannelId, mesh_core::Ts)> =
                        me.cursors.iter().map(|(c, t)| (c.clone(), *t)).collect();
                    shared.region_state.hand_over(me.identity.user.clone(), cursors);
                    frames.text(&rtm::goodbye());
                    let _ = write(&mut socket, &mut frames, false, limits.write_timeout, None).await;
                    Step::End(Some((close::GOING_AWAY, "region draining")))
                }
                Some(CloseReason::Revoked) => {
                    Step::End(Some((close::TOKEN_REVOKED, "token revoked")))
                }
                Some(CloseReason::SlowConsumer) | None => Step::End(Some((
                    close::SLOW_CONSUMER,
                    "slow consumer: outgoing queue overflowed",
                ))),
            },
            // Cancel-safe: a push's wake-up is kept until taken.
            _ = outbox.ready() => {
                // Take what is queued, up to a batch: written with one flush.
                let mut step = me.take_batch(&outbox, &mut frames);
                // Under load, let the fan-out queue more before paying for a system call, for
                // as long as each turn brings more (a few turns at most): a connection then
                // writes many events per write. A lone frame is no sign of load: it is
                // written at once (a yield would cost a turn of the scheduler per write).
                for _ in 0..MORE_TURNS {
                    let before = frames.frames();
                    if !matches!(step, Step::Write) || !(2..WRITE_BATCH).contains(&before) {
                        break;
                    }
                    tokio::task::yield_now().await;
                    step = me.take_batch(&outbox, &mut frames);
                    if frames.frames() == before {
                        break;
                    }
                }
                outbox.rearm();
                step
            }
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(reply) = reply {
                    frames.text(&reply);
                }
                Step::Write
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= limits.idle_timeout {
                    Step::End(Some((close::IDLE_TIMEOUT, "idle timeout")))
                } else {
                    me.release(&mut frames);
                    Step::Ping
                }
            }
            // Cancel-safe: the WebSocket stream's next() loses nothing when another branch wins.
            msg = socket.next(), if in_flight.len() < MAX_IN_FLIGHT => {
                let now = Instant::now();
                last_heard = now;
                match msg {
                    None | Some(Ok(Message::Close(_))) => Step::End(None),
                    Some(Err(e)) => {
                        tracing::debug!(conn, error = %e, "websocket read failed");
                        Step::End(is_capacity(&e).then_some((close::TOO_BIG, "frame over the size limit")))
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Step::Write,
                    Some(Ok(frame)) if !bucket.take(now) => {
                        refusals += 1;
                        shared.metrics.rate_limited();
                        if refusals >= limits.refusals_before_close {
                            Step::End(Some((close::RATE_LIMITED, "rate limited: too many frames")))
                        } else {
                            let id = frame.to_text().ok().and_then(|t| rtm::parse(t).ok()).and_then(|f| f.id());
                            let error = RtmError::new(ErrorCode::RateLimited, "ratelimited", id);
                            frames.text(&error.render());
                            Step::Write
                        }
                    }
                    Some(Ok(Message::Text(text))) => {
                        refusals = 0;
                        let reply = match rtm::parse(text.as_str()) {
                            Err(error) => Some(error.render().into()),
                            Ok(ClientFrame::Ping { fields }) => Some(Utf8Bytes::from(rtm::pong(fields))),
                            Ok(ClientFrame::Message { id, channel, text }) => {
                                in_flight.push(Box::pin(publish(&me, Some(id), channel, Some(text))));
                                None
                            }
                            Ok(ClientFrame::Typing { id, channel }) => {
                                // Repeats within the typing interval are dropped: receivers
                                // already show the user typing.
                                if shared.typing.first_in_interval(&me.identity.user, &channel, now) {
                                    in_flight.push(Box::pin(publish(&me, id, channel, None)));
                                } else {
                                    shared.metrics.typing_coalesced.inc();
                                }
                                None
                            }
                            Ok(ClientFrame::PresenceSub { id, ids }) => presence_frame(&shared, id, |p| p.subscribe(conn, ids)),
                            Ok(ClientFrame::PresenceQuery { id, ids }) => presence_frame(&shared, id, |p| p.query(conn, ids)),
                        };
                        if let Some(reply) = reply {
                            frames.text(&reply);
                        }
                        Step::Write
                    }
                    Some(Ok(_)) => {
                        refusals = 0;
                        let error = RtmError::new(ErrorCode::Binary, "binary frames are not accepted; send JSON text", None);
                        frames.text(&error.render());
                        Step::Write
                    }
                }
            }
        };
        let written = match step {
            Step::End(close) => break close,
            Step::Write if frames.is_empty() => continue,
            Step::Write | Step::Ping => {
                let ping = matches!(step, Step::Ping);
                let stop = Some(&closer.token);
                write(&mut socket, &mut frames, ping, limits.write_timeout, stop).await
            }
        };
        match written {
            Written::Done => {
                if me.written > 0 {
                    shared.metrics.written(me.written, me.oldest.take());
                    me.written = 0;
                }
            }
            // The close token fired: the next turn closes, finishing the cut write first.
            Written::Interrupted => {}
            Written::Broken => break None,
            Written::Stalled => {
                closer.close(CloseReason::SlowConsumer);
                tracing::info!(conn, user = %me.identity.user, "closing slow consumer: a write stalled");
                break Some((close::SLOW_CONSUMER, "slow consumer: a write stalled"));
            }
        }
    };
    if let Some((code, reason)) = close {
        // The closing handshake: send ours, then read (and drop) what the client still sends
        // until its close. Closing the socket with unread input would reset it, and the client
        // would lose our close frame, and its code, with the reset.
        // What was being written when the close came is finished first, so the close frame
        // does not land inside a text frame.
        let sent = tokio::time::timeout(
            CLOSE_TIMEOUT,
            socket.send(&mut frames, close_frame(code, reason)),
        )
        .await;
        if matches!(sent, Ok(Ok(()))) {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while let Some(Ok(msg)) = socket.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close()).await;
    shared.region_state.unregister(conn);
    outbox.close();
    let all: Vec<ChannelId> = me.members.drain().collect();
    shared.hub.leave(conn, &all);
    if let Some(presence) = &shared.presence {
        presence.disconnected(conn, &me.identity.user);
    }
    shared.metrics.disconnected(close.map(|(code, _)| code));
    tracing::debug!(conn, user = %me.identity.user, ?close, "client disconnected");
}

/// A client frame being published; resolves to the reply to write, if any.
type Publishing = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Utf8Bytes>> + Send>>;

/// What one turn of a connection's loop leads to.
enum Step {
    /// Write the frames gathered, if any, and go on.
    Write,
    /// Write the frames gathered, then a ping.
    Ping,
    /// Close, with a close frame when there is a code.
    End(Option<(u16, &'static str)>),
}

/// How a write went.
enum Written {
    Done,
    /// `stop` fired first: the connection is being closed from outside.
    Interrupted,
    /// The socket failed: the client is gone.
    Broken,
    /// The client did not take the frames within the write timeout.
    Stalled,
}

/// Writes `frames` (emptying it) in one write, and a ping after them when `ping`, within
/// `timeout`; gives up early when `stop` fires, so a client that stopped reading never holds
/// its connection's task. What an interrupted write left is written before the close frame.
async fn write(
    socket: &mut ClientSocket,
    frames: &mut Outgoing,
    ping: bool,
    timeout: Duration,
    stop: Option<&tokio_util::sync::CancellationToken>,
) -> Written {
    let writing = async {
        match ping {
            true => socket.send(frames, Message::Ping(Default::default())).await,
            false => socket.write(frames).await,
        }
    };
    let timed = tokio::time::timeout(timeout, writing);
    let result = match stop {
        Some(stop) => tokio::select! {
            biased;
            _ = stop.cancelled() => return Written::Interrupted,
            result = timed => result,
        },
        None => timed.await,
    };
    match result {
        Ok(Ok(())) => Written::Done,
        Ok(Err(_)) => Written::Broken,
        Err(_) => Written::Stalled,
    }
}

/// Hands a presence frame to the presence hub; the reply, if the frame had an id, says it was
/// taken (or that the mesh has no presence servers).
fn presence_frame(
    shared: &Shared,
    id: Option<i64>,
    f: impl FnOnce(&crate::presence::PresenceHub),
) -> Option<Utf8Bytes> {
    match &shared.presence {
        Some(presence) => {
            f(presence);
            id.map(|id| Utf8Bytes::from(rtm::ok_reply(id)))
        }
        None => Some(
            RtmError::new(ErrorCode::Unavailable, "presence is not available", id)
                .render()
                .into(),
        ),
    }
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: tokio_tungstenite::tungstenite::Utf8Bytes::from_static(reason),
    }))
}

fn is_capacity(e: &WsError) -> bool {
    matches!(e, WsError::Capacity(_))
}

/// Publishes a client's message (`text`) or typing indicator (no text); resolves to the reply
/// frame, if any.
fn publish(
    me: &Connection,
    id: Option<i64>,
    channel: ChannelId,
    text: Option<String>,
) -> impl std::future::Future<Output = Option<Utf8Bytes>> + use<> {
    let user = me.identity.user.clone();
    let body = match text {
        Some(text) => EventBody::Message {
            user,
            text,
            team: Some(me.identity.team.clone()),
        },
        None => EventBody::Typing { user },
    };
    let allowed = me.members.contains(&channel);
    let shared = me.shared.clone();
    let conn = me.conn;
    async move {
        if !allowed {
            return Some(
                RtmError::new(ErrorCode::NotInChannel, "not_in_channel", id)
                    .render()
                    .into(),
            );
        }
        let event = ChannelEvent {
            channel,
            ts: None,
            body,
            origin: Some(Origin {
                gateway: shared.hub.gateway().to_string(),
                conn,
            }),
        };
        match shared.router.publish(&event).await {
            Ok(Some(ts)) => match (&event.body, id) {
                (EventBody::Message { text, .. }, Some(id)) => {
                    Some(Utf8Bytes::from(rtm::message_ack(id, ts, text)))
                }
                _ => None,
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(conn, error = %e, "publishing a client event failed");
                Some(
                    RtmError::new(ErrorCode::Unavailable, "could not deliver; try again", id)
                        .render()
                        .into(),
                )
            }
        }
    }
}
