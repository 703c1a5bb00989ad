//! The client's side of a connection: each frame it sends, the rate limit on them, the
//! replies, and the publishes its messages and typing indicators start.
//!
//! Flow control is a credit: the bytes of the client's frames being published and not yet
//! answered ([`Limits::publish_bytes`], 1 MiB by default) and at most
//! [`MAX_PUBLISHES_IN_FLIGHT`] publishes. Out of credit, the socket is not read until answers
//! come back; TCP then holds the client. A connection is never capped at a fixed handful of
//! publishes: with a 1 MiB credit, thousands of chat-sized messages can be on their way.
//!
//! Order: a client's publishes start in the order it sent them, and each starts by queueing
//! its request on the router's publish stream to the channel's owner before the next one is
//! polled (`FuturesUnordered` polls newly pushed futures first in push order; the publishes
//! are unconstrained by tokio's cooperative budget, which would otherwise make one stop short
//! and be polled again after later ones; the stream's queue is a fair, first-come bounded
//! channel), and the channel server begins a stream's requests one at a time in order: a
//! client's messages to one channel get their ts in the order sent. Their answers may come back in any order (each names its `reply_to`). A
//! publish retried after a failure (a channel server gone mid-move) may land after later ones.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use channel_client::RouteError;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use mesh_core::{ChannelEvent, ChannelId, EventBody, Identity, Origin};
use mesh_rtm::{self as rtm, ClientFrame, ErrorCode, RtmError};

use super::context::ConnectionContext;
use crate::close::Close;
use crate::limits::{Limits, MAX_PUBLISHES_IN_FLIGHT, TokenBucket};
use crate::presence::PresenceHub;
use crate::socket::{Error as WsError, Message, Outgoing};
use crate::vocab::ConnId;

/// A client frame being published; resolves to its size in bytes (what it took of the
/// connection's credit) and the reply to write, if any.
pub(super) type Publishing =
    std::pin::Pin<Box<dyn std::future::Future<Output = (usize, Option<Utf8Bytes>)> + Send>>;

/// What a connection knows of its client's frames.
pub(super) struct Inbound {
    ctx: Arc<ConnectionContext>,
    conn: ConnId,
    /// The frame rate limit.
    bucket: TokenBucket,
    /// Frames refused in a row by the rate limit.
    refusals: u32,
    /// When the client last sent anything (a pong included).
    last_heard: Instant,
    /// Publishes not yet answered, and the credit they take.
    in_flight: InFlight,
}

/// A connection's publishes not yet answered.
#[derive(Default)]
struct InFlight {
    /// Boxed: `FuturesUnordered::new` allocates a stub task holding one future inline, which
    /// for the publish future would cost every idle connection kilobytes.
    publishing: FuturesUnordered<Publishing>,
    /// Bytes of the client frames being published: the credit taken.
    bytes: usize,
}

impl InFlight {
    /// Starts publishing a client frame of `bytes` bytes: it takes them from the credit.
    fn start(
        &mut self,
        bytes: usize,
        publishing: impl std::future::Future<Output = Option<Utf8Bytes>> + Send + 'static,
    ) {
        self.bytes += bytes;
        // Unconstrained by tokio's cooperative budget: a publish spent of it would stop short
        // of its queue and wake itself, and `FuturesUnordered` would then poll the later ones
        // first (it puts a future that woke itself behind the rest): their requests would
        // overtake its own, and their ts come before its ts. Each publish does little before
        // it queues its request or waits its turn in the queue's order.
        let publishing = tokio::task::unconstrained(async move { (bytes, publishing.await) });
        self.publishing.push(Box::pin(publishing));
    }
}

impl Inbound {
    /// The client side of connection `conn`, its rate limit starting full at `now`.
    pub(super) fn new(ctx: Arc<ConnectionContext>, conn: ConnId, now: Instant) -> Self {
        let limits = &ctx.limits;
        Inbound {
            bucket: TokenBucket::new(limits.frames_per_sec, limits.frame_burst, now),
            refusals: 0,
            last_heard: now,
            in_flight: InFlight::default(),
            ctx,
            conn,
        }
    }

    /// Whether the client's next frame may be read: credit is left (the bytes being published
    /// are under [`Limits::publish_bytes`], the publishes under [`MAX_PUBLISHES_IN_FLIGHT`]).
    /// With nothing in flight a frame is always read, whatever its size.
    pub(super) fn can_read(&self) -> bool {
        let in_flight = &self.in_flight;
        in_flight.publishing.is_empty()
            || (in_flight.publishing.len() < MAX_PUBLISHES_IN_FLIGHT
                && in_flight.bytes < self.ctx.limits.publish_bytes)
    }

    /// Whether a publish is in flight.
    pub(super) fn publishing(&self) -> bool {
        !self.in_flight.publishing.is_empty()
    }

    /// The next publish to finish, with its reply; its bytes go back to the credit.
    /// Cancel-safe: nothing is taken before the one await, and nothing awaited after it.
    pub(super) async fn next_reply(&mut self) -> Option<Option<Utf8Bytes>> {
        let (bytes, reply) = self.in_flight.publishing.next().await?;
        self.in_flight.bytes -= bytes;
        Some(reply)
    }

    /// Whether the client has sent nothing for the idle timeout.
    pub(super) fn idle(&self) -> bool {
        self.last_heard.elapsed() >= self.ctx.limits.idle_timeout
    }

    /// Handles what the socket read (`None`: it ended): replies go to `frames`; `Break` ends
    /// the connection, with a close frame when there is a reason. `identity` and `members`
    /// are the connection's: who publishes, and where they may.
    pub(super) fn on_message(
        &mut self,
        msg: Option<Result<Message, WsError>>,
        identity: &Identity,
        members: &HashSet<ChannelId>,
        frames: &mut Outgoing,
    ) -> ControlFlow<Option<Close>> {
        let now = Instant::now();
        self.last_heard = now;
        let (ctx, conn) = (&self.ctx, self.conn);
        match msg {
            None | Some(Ok(Message::Close(_))) => ControlFlow::Break(None),
            Some(Err(e)) => {
                tracing::debug!(conn, error = %e, "websocket read failed");
                ControlFlow::Break(is_capacity(&e).then_some(Close::FrameTooBig))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => ControlFlow::Continue(()),
            Some(Ok(frame)) if !self.bucket.take(now) => {
                self.refusals += 1;
                ctx.metrics.rate_limited();
                if self.refusals >= ctx.limits.refusals_before_close {
                    ControlFlow::Break(Some(Close::RateLimited))
                } else {
                    let id = frame
                        .to_text()
                        .ok()
                        .and_then(|t| rtm::parse(t).ok())
                        .and_then(|f| f.id());
                    let error = RtmError::new(ErrorCode::RateLimited, "ratelimited", id);
                    frames.text(&error.render());
                    ControlFlow::Continue(())
                }
            }
            Some(Ok(Message::Text(text))) => {
                self.refusals = 0;
                let bytes = text.len();
                let reply = match rtm::parse(text.as_str()) {
                    Err(error) => Some(error.render().into()),
                    Ok(ClientFrame::Ping { fields }) => Some(Utf8Bytes::from(rtm::pong(fields))),
                    Ok(ClientFrame::Message {
                        id,
                        channel,
                        text,
                        client_msg_id,
                    }) => {
                        let allowed = may_post(identity, members, &channel, &ctx.limits)
                            .and_then(|()| by_policy(ctx, &channel));
                        let post = Post {
                            id: Some(id),
                            channel,
                            text: Some(text),
                            client_msg_id,
                        };
                        let publishing = publish(ctx, conn, identity, allowed, post);
                        self.in_flight.start(bytes, publishing);
                        None
                    }
                    Ok(ClientFrame::Typing { channel, .. })
                        if !ctx.policies.for_channel(channel.as_str()).relay_typing =>
                    {
                        // The channel's policy relays no typing: dropped, as a repeat is.
                        tracing::trace!(conn, %channel, "typing not relayed by policy");
                        ctx.metrics
                            .posts_refused
                            .with_label_values(&["typing_not_relayed"])
                            .inc();
                        None
                    }
                    Ok(ClientFrame::Typing { id, channel }) => {
                        // Repeats within the typing interval are dropped: receivers already
                        // show the user typing.
                        if ctx.typing.first_in_interval(&identity.user, &channel, now) {
                            let allowed = may_post(identity, members, &channel, &ctx.limits)
                                .and_then(|()| by_policy(ctx, &channel));
                            let post = Post {
                                id,
                                channel,
                                text: None,
                                client_msg_id: None,
                            };
                            let publishing = publish(ctx, conn, identity, allowed, post);
                            self.in_flight.start(bytes, publishing);
                        } else {
                            ctx.metrics.typing_coalesced.inc();
                        }
                        None
                    }
                    Ok(ClientFrame::PresenceSub { id, ids }) => {
                        presence_frame(ctx, id, |p| p.subscribe(conn, ids))
                    }
                    Ok(ClientFrame::PresenceQuery { id, ids }) => {
                        presence_frame(ctx, id, |p| p.query(conn, ids))
                    }
                };
                if let Some(reply) = reply {
                    frames.text(&reply);
                }
                ControlFlow::Continue(())
            }
            Some(Ok(_)) => {
                self.refusals = 0;
                let error = RtmError::new(
                    ErrorCode::Binary,
                    "binary frames are not accepted; send JSON text",
                    None,
                );
                frames.text(&error.render());
                ControlFlow::Continue(())
            }
        }
    }
}

/// Hands a presence frame to the presence hub; the reply, if the frame had an id, says it was
/// taken (or that the mesh has no presence servers).
fn presence_frame(
    ctx: &ConnectionContext,
    id: Option<i64>,
    f: impl FnOnce(&PresenceHub),
) -> Option<Utf8Bytes> {
    match &ctx.presence {
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

fn is_capacity(e: &WsError) -> bool {
    matches!(e, WsError::Capacity(_))
}

/// Why a client may not post to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PostRefused {
    /// Its user is not a member of the channel: error 6.
    NotInChannel,
    /// The channel carries the server's events only: error 12.
    ReadOnly,
    /// The channel's policy makes it read-only (announcements): error 12, as above.
    PolicyReadOnly,
    /// The channel's publish rate (its policy, counted on its owner) is spent: error 13.
    ChannelRate,
}

impl PostRefused {
    /// The error reply, to the frame's `id` if it had one.
    fn error(self, id: Option<i64>) -> RtmError {
        match self {
            PostRefused::NotInChannel => RtmError::new(ErrorCode::NotInChannel, self.as_str(), id),
            PostRefused::ReadOnly | PostRefused::PolicyReadOnly => {
                RtmError::new(ErrorCode::ReadOnlyChannel, READ_ONLY_MSG, id)
            }
            PostRefused::ChannelRate => {
                RtmError::new(ErrorCode::ChannelRateLimited, "rate_limited", id)
            }
        }
    }

    /// The metrics' label (and, but for the policy's refusals, the error's message).
    fn as_str(self) -> &'static str {
        match self {
            PostRefused::NotInChannel => "not_in_channel",
            PostRefused::ReadOnly => READ_ONLY_MSG,
            PostRefused::PolicyReadOnly => "policy_read_only",
            PostRefused::ChannelRate => "channel_rate_limited",
        }
    }
}

/// Slack's message for a post to a read-only channel.
const READ_ONLY_MSG: &str = "restricted_action_read_only_channel";

/// Whether the channel's policy lets clients post to `channel` (the admin API is not asked).
fn by_policy(ctx: &ConnectionContext, channel: &ChannelId) -> Result<(), PostRefused> {
    match ctx.policies.for_channel(channel.as_str()).read_only {
        true => Err(PostRefused::PolicyReadOnly),
        false => Ok(()),
    }
}

/// Whether the connection of `identity`, a member of `members`, may post (a message, a typing
/// indicator) to `channel`. The user's own channel carries the server's events to that user
/// (joins, leaves, and what the web app publishes there) and the team's channel the server's
/// events to the whole team: a client posts to neither, unless `limits` let it post to the
/// team's (docs/decisions.md, "Clients do not post to their own channels").
fn may_post(
    identity: &Identity,
    members: &HashSet<ChannelId>,
    channel: &ChannelId,
    limits: &Limits,
) -> Result<(), PostRefused> {
    let is_user = channel.as_str() == identity.user.as_str();
    let is_team = channel.as_str() == identity.team.as_str();
    if is_user || (is_team && !limits.team_channel_posts) {
        return Err(PostRefused::ReadOnly);
    }
    if !members.contains(channel) {
        return Err(PostRefused::NotInChannel);
    }
    Ok(())
}

/// Publishes a client's message (`text`) or typing indicator (no text) on `channel`, if
/// A message or typing frame to publish, as the client sent it.
struct Post {
    /// The frame's id (a message's is required; it gets the ack).
    id: Option<i64>,
    channel: ChannelId,
    /// A message's text; `None` for typing.
    text: Option<String>,
    /// A message's `client_msg_id`: a re-sent message with the same one is answered with the
    /// first one's ts and not delivered again.
    client_msg_id: Option<String>,
}

/// `allowed` there; resolves to the reply frame, if any.
fn publish(
    ctx: &Arc<ConnectionContext>,
    conn: ConnId,
    identity: &Identity,
    allowed: Result<(), PostRefused>,
    post: Post,
) -> impl std::future::Future<Output = Option<Utf8Bytes>> + use<> {
    let Post {
        id,
        channel,
        text,
        client_msg_id,
    } = post;
    // The channel server's key: per user, apart from the admin API's and the routers' keys.
    let key = client_msg_id.map(|m| format!("rtm:{}:{m}", identity.user));
    let user = identity.user.clone();
    let body = match text {
        Some(text) => EventBody::Message {
            user,
            text,
            team: Some(identity.team.clone()),
        },
        None => EventBody::Typing { user },
    };
    let ctx = ctx.clone();
    async move {
        let refuse = |refused: PostRefused| {
            ctx.metrics
                .posts_refused
                .with_label_values(&[refused.as_str()])
                .inc();
            Some(refused.error(id).render().into())
        };
        if let Err(refused) = allowed {
            return refuse(refused);
        }
        let event = ChannelEvent {
            channel,
            ts: None,
            body,
            origin: Some(Origin {
                gateway: ctx.hub.gateway().to_string(),
                conn,
            }),
        };
        let published = match &key {
            Some(key) => ctx.router.publish_keyed(&event, key).await,
            None => ctx.router.publish(&event).await,
        };
        match published {
            Ok(Some(ts)) => match (&event.body, id) {
                (EventBody::Message { text, .. }, Some(id)) => {
                    Some(Utf8Bytes::from(rtm::message_ack(id, ts, text)))
                }
                _ => None,
            },
            Ok(None) => None,
            Err(RouteError::RateLimited(why)) => {
                tracing::debug!(conn, %why, "a client post over its channel's publish rate");
                refuse(PostRefused::ChannelRate)
            }
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

#[cfg(test)]
mod tests {
    use mesh_core::{TeamId, UserId};

    use super::*;

    /// The client side of a connection of user U1 (of team T1), a member of no channel, and
    /// what it wrote.
    struct Client {
        inbound: Inbound,
        me: Identity,
        members: HashSet<ChannelId>,
        frames: Outgoing,
    }

    impl Client {
        fn new() -> Self {
            Client::with_limits(|_| {})
        }

        /// The same, its gateway's limits changed by `change`.
        fn with_limits(change: impl FnOnce(&mut Limits)) -> Self {
            let mut ctx = ConnectionContext::for_tests();
            change(&mut Arc::get_mut(&mut ctx).unwrap().limits);
            Client {
                inbound: Inbound::new(ctx, 1, Instant::now()),
                me: Client::identity(),
                members: HashSet::new(),
                frames: Outgoing::default(),
            }
        }

        /// User U1 of team T1, whose token names C1.
        fn identity() -> Identity {
            Identity {
                user: UserId::new("U1").unwrap(),
                team: TeamId::new("T1").unwrap(),
                name: None,
                channels: vec![ChannelId::new("C1").unwrap()],
                expires_at: 0,
                jti: None,
            }
        }

        /// The connection reads `msg`.
        fn read(&mut self, msg: Option<Result<Message, WsError>>) -> ControlFlow<Option<Close>> {
            let Client {
                inbound,
                me,
                members,
                frames,
            } = self;
            inbound.on_message(msg, me, members, frames)
        }

        /// The connection reads a text frame.
        fn send(&mut self, frame: &str) -> ControlFlow<Option<Close>> {
            self.read(Some(Ok(Message::Text(frame.into()))))
        }

        /// The frames written since the last call, parsed.
        fn replies(&mut self) -> Vec<serde_json::Value> {
            self.frames
                .texts()
                .iter()
                .map(|t| serde_json::from_str(t).unwrap())
                .collect()
        }
    }

    const GO_ON: ControlFlow<Option<Close>> = ControlFlow::Continue(());

    #[tokio::test]
    async fn pings_are_answered_and_bad_frames_told_why() {
        let mut client = Client::new();
        assert_eq!(client.send(r#"{"type":"ping","id":7}"#), GO_ON);
        assert_eq!(client.send("not json"), GO_ON);
        let binary = Some(Ok(Message::Binary(vec![1u8].into())));
        assert_eq!(client.read(binary), GO_ON);
        let got = client.replies();
        assert_eq!(got[0]["type"], "pong");
        assert_eq!(got[0]["reply_to"], 7);
        assert_eq!(got[1]["type"], "error");
        assert_eq!(got[2]["type"], "error");
        assert!(!client.inbound.publishing());
        // Without presence servers, presence frames get an error.
        assert_eq!(
            client.send(r#"{"type":"presence_sub","id":8,"ids":["U2"]}"#),
            GO_ON
        );
        let got = client.replies();
        assert_eq!(got[0]["error"]["msg"], "presence is not available");
    }

    #[tokio::test]
    async fn a_message_outside_the_users_channels_is_refused() {
        let mut client = Client::new();
        let message = r#"{"id":3,"type":"message","channel":"C9","text":"hi"}"#;
        assert_eq!(client.send(message), GO_ON);
        assert!(client.frames.is_empty() && client.inbound.publishing());
        let reply = client.inbound.next_reply().await.flatten().unwrap();
        let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap();
        assert_eq!(
            (reply["ok"].clone(), reply["reply_to"].clone()),
            (false.into(), 3.into())
        );
        assert_eq!(reply["error"]["msg"], "not_in_channel");
    }

    #[test]
    fn the_users_and_the_teams_channels_are_read_only_to_clients() {
        let me = Client::identity();
        let members: HashSet<ChannelId> = me.all_channels().into_iter().collect();
        let c = |id: &str| ChannelId::new(id).unwrap();
        let (mut limits, refused) = (Limits::default(), Err(PostRefused::ReadOnly));
        assert_eq!(may_post(&me, &members, &c("C1"), &limits), Ok(()));
        assert_eq!(may_post(&me, &members, &c("U1"), &limits), refused);
        assert_eq!(may_post(&me, &members, &c("T1"), &limits), refused);
        assert_eq!(
            may_post(&me, &members, &c("C9"), &limits),
            Err(PostRefused::NotInChannel)
        );
        // The gateway may allow posts to the team's channel; never to the user's.
        limits.team_channel_posts = true;
        assert_eq!(may_post(&me, &members, &c("T1"), &limits), Ok(()));
        assert_eq!(may_post(&me, &members, &c("U1"), &limits), refused);
        // Read-only wins over membership: a channel the token lists is no exception.
        let no_members = HashSet::new();
        assert_eq!(
            may_post(&me, &no_members, &c("T1"), &Limits::default()),
            refused
        );
    }

    #[tokio::test]
    async fn a_post_to_the_teams_channel_gets_error_12_and_is_counted() {
        let mut client = Client::new();
        let message = r#"{"id":4,"type":"message","channel":"T1","text":"hi all"}"#;
        assert_eq!(client.send(message), GO_ON);
        let reply = client.inbound.next_reply().await.flatten().unwrap();
        let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap();
        assert_eq!(reply["reply_to"], 4);
        assert_eq!(reply["error"]["code"], 12);
        assert_eq!(reply["error"]["msg"], "restricted_action_read_only_channel");
        // Typing without an id gets the error event.
        assert_eq!(client.send(r#"{"type":"typing","channel":"U1"}"#), GO_ON);
        let reply = client.inbound.next_reply().await.flatten().unwrap();
        let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap();
        assert_eq!(
            (reply["type"].as_str(), reply["error"]["code"].as_u64()),
            (Some("error"), Some(12))
        );
        let refused = &client.inbound.ctx.metrics.posts_refused;
        let read_only = refused.with_label_values(&["restricted_action_read_only_channel"]);
        assert_eq!(read_only.get(), 2);
    }

    #[tokio::test]
    async fn the_policy_makes_a_channel_read_only_and_drops_its_typing() {
        let mut client = Client::new();
        client.members.insert(ChannelId::new("C1").unwrap());
        client.members.insert(ChannelId::new("C2").unwrap());
        let file = "[[channel]]\nmatch = \"C1\"\nread_only = true\n\
                    [[channel]]\nmatch = \"C2\"\nrelay_typing = false\n";
        let policies = mesh_core::policy::Policies::parse(file).unwrap();
        client.inbound.ctx.policies.replace(policies);
        let message = r#"{"id":5,"type":"message","channel":"C1","text":"hi"}"#;
        assert_eq!(client.send(message), GO_ON);
        let reply = client.inbound.next_reply().await.flatten().unwrap();
        let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap();
        assert_eq!(
            reply,
            serde_json::json!({"ok": false, "reply_to": 5,
                "error": {"code": 12, "msg": "restricted_action_read_only_channel"}})
        );
        // Typing in C2 is dropped: no publish, no reply.
        assert_eq!(
            client.send(r#"{"id":6,"type":"typing","channel":"C2"}"#),
            GO_ON
        );
        assert!(!client.inbound.publishing() && client.frames.is_empty());
        let refused = &client.inbound.ctx.metrics.posts_refused;
        assert_eq!(refused.with_label_values(&["policy_read_only"]).get(), 1);
        assert_eq!(refused.with_label_values(&["typing_not_relayed"]).get(), 1);
    }

    #[tokio::test]
    async fn a_client_past_its_rate_is_refused_then_closed() {
        let mut client = Client::new();
        let limits = client.inbound.ctx.limits.clone();
        let ping = r#"{"type":"ping","id":1}"#;
        for _ in 0..limits.frame_burst {
            assert_eq!(client.send(ping), GO_ON);
        }
        let mut turns = 0;
        let flow = loop {
            match client.send(ping) {
                GO_ON => turns += 1,
                end => break end,
            }
            assert!(turns < 10_000, "never closed");
        };
        assert_eq!(flow, ControlFlow::Break(Some(Close::RateLimited)));
        // Every refused frame was told so, up to the one that closed the connection.
        let got = client.replies();
        let refused = got
            .iter()
            .filter(|r| r["error"]["msg"] == "ratelimited")
            .count();
        assert!(
            refused as u32 >= limits.refusals_before_close - 1,
            "{refused}"
        );
    }

    #[tokio::test]
    async fn the_socket_is_not_read_while_the_publishes_take_the_credit() {
        let mut client = Client::with_limits(|l| l.publish_bytes = 1_000);
        let message = |id: usize| {
            let text = "x".repeat(250);
            format!(r#"{{"id":{id},"type":"message","channel":"C9","text":"{text}"}}"#)
        };
        // Three frames of about 300 bytes leave credit; the fourth takes the last of it.
        for id in 1..=3 {
            assert!(client.inbound.can_read(), "frame {id}");
            assert_eq!(client.send(&message(id)), GO_ON);
        }
        assert!(client.inbound.can_read());
        assert_eq!(client.send(&message(4)), GO_ON);
        assert!(!client.inbound.can_read(), "out of credit");
        // An answer gives its frame's bytes back.
        assert!(client.inbound.next_reply().await.is_some());
        assert!(client.inbound.can_read());
        for _ in 0..3 {
            assert!(client.inbound.next_reply().await.is_some());
        }
        assert!(!client.inbound.publishing());
        assert_eq!(client.inbound.in_flight.bytes, 0);

        // No credit at all still publishes one frame at a time, however large.
        let mut client = Client::with_limits(|l| l.publish_bytes = 0);
        assert!(client.inbound.can_read());
        assert_eq!(client.send(&message(1)), GO_ON);
        assert!(!client.inbound.can_read());
        assert!(client.inbound.next_reply().await.is_some());
        assert!(client.inbound.can_read());
    }

    #[tokio::test]
    async fn many_small_publishes_stop_at_the_count_cap() {
        let mut client = Client::with_limits(|l| l.frames_per_sec = 0);
        let ping_sized = r#"{"id":1,"type":"message","channel":"C9","text":"x"}"#;
        for _ in 0..MAX_PUBLISHES_IN_FLIGHT {
            assert!(client.inbound.can_read());
            assert_eq!(client.send(ping_sized), GO_ON);
        }
        assert!(client.inbound.in_flight.bytes < client.inbound.ctx.limits.publish_bytes);
        assert!(!client.inbound.can_read(), "at the count cap");
        assert!(client.inbound.next_reply().await.is_some());
        assert!(client.inbound.can_read());
    }

    #[tokio::test]
    async fn the_end_of_the_stream_ends_the_connection_without_a_close_code() {
        let mut client = Client::new();
        assert_eq!(client.read(None), ControlFlow::Break(None));
        let close = Some(Ok(Message::Close(None)));
        assert_eq!(client.read(close), ControlFlow::Break(None));
        assert!(!client.inbound.idle());
    }
}
