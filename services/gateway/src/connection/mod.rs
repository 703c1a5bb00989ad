//! One client WebSocket: the handshake (subscribe its channels, then `hello`), a loop that
//! carries frames both ways with one method per kind of event — the gateway shutting down, the
//! connection closed from outside, items queued to it, a publish answered, the ping timer, a
//! client frame — and the teardown.
//!
//! [`context`] is what the connection gets from its gateway; [`delivery`] what it writes;
//! [`inbound`] what the client sends; [`writer`] how it writes and closes.

mod context;
mod delivery;
mod inbound;
mod writer;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use mesh_core::{ChannelId, Identity, Ts};
use mesh_rtm::{self as rtm, ErrorCode, RtmError};

pub use crate::close::codes as close;
use crate::close::{Close, Closer};
use crate::outbox::{ConnSink, Outbox};
use crate::socket::{ClientSocket, Message, Outgoing};
use crate::vocab::ConnId;
pub use context::ConnectionContext;
use delivery::{Delivery, WRITE_BATCH};
pub use delivery::{OUTBOUND_QUEUE, SUBSCRIBE_TIMEOUT};
use inbound::Inbound;
use writer::{CLOSE_TIMEOUT, Written, close_frame, write};

/// Turns a connection yields, while each brings more events, before it writes.
const MORE_TURNS: usize = 4;

/// Runs one connection until either side closes or the gateway shuts down.
pub async fn run(
    socket: ClientSocket,
    ctx: Arc<ConnectionContext>,
    conn: ConnId,
    identity: Identity,
    batch_presence: bool,
    cursors: Vec<(ChannelId, Ts)>,
) {
    // The handshake and the teardown run once each, at the ends: boxed, their state (about
    // 2 KB each) is held only while they run, not for the connection's whole life inside its
    // task (bench/README.md, "Memory per idle connection").
    let handshake = Connection::handshake(socket, ctx, conn, identity, batch_presence, cursors);
    let Some(mut connection) = Box::pin(handshake).await else {
        return;
    };
    let close = connection.serve().await;
    Box::pin(connection.teardown(close)).await;
}

/// What one turn of a connection's loop leads to.
enum Step {
    /// Write the frames gathered, if any, and go on.
    Write,
    /// Write the frames gathered, then a ping.
    Ping,
    /// Close, with a close frame when there is a reason.
    End(Option<Close>),
}

/// A connection after its handshake, owned by its task.
struct Connection {
    ctx: Arc<ConnectionContext>,
    conn: ConnId,
    identity: Identity,
    socket: ClientSocket,
    /// Frames to write once the event that produced them is handled: one write per batch.
    frames: Outgoing,
    /// The connection's queue, which the hub and presence push into.
    outbox: Arc<Outbox>,
    /// Closes the connection from outside (drain, revocation, slow consumer).
    closer: Arc<Closer>,
    /// What the connection writes, and the channels it has.
    delivery: Delivery,
    /// What the client sends.
    inbound: Inbound,
    /// Pings the client; on each tick the idle timeout is checked.
    ping: tokio::time::Interval,
}

impl Connection {
    /// Subscribes the connection's channels first and says hello after, so that every event
    /// posted after hello reaches the client; then resumes the channels it has cursors for.
    /// `None` when the connection ended here (the subscriptions did not come in time, or the
    /// client went away).
    async fn handshake(
        mut socket: ClientSocket,
        ctx: Arc<ConnectionContext>,
        conn: ConnId,
        identity: Identity,
        batch_presence: bool,
        cursors: Vec<(ChannelId, Ts)>,
    ) -> Option<Self> {
        let outbox = Arc::new(Outbox::new(OUTBOUND_QUEUE, ctx.limits.outbound_bytes));
        socket.mark_reads(outbox.clone());
        let closer = Arc::new(Closer::default());
        let sink = ConnSink::new(conn, identity.user.clone(), outbox.clone(), closer.clone())
            .with_team(identity.team.clone());
        let initial = identity.all_channels();
        // The membership below holds them from now on: no second copy for the connection's
        // life (a user may be in 10,000 channels, more with a boot answer).
        let identity = Identity {
            channels: Vec::new(),
            ..identity
        };
        let mut delivery = Delivery::new(
            ctx.clone(),
            sink.clone(),
            outbox.clone(),
            &identity,
            &initial,
        );
        let mut frames = Outgoing::default();
        let resumed = delivery.start(cursors);
        let waiting = ctx.hub.join(&sink, &initial);
        let ready =
            tokio::time::timeout(SUBSCRIBE_TIMEOUT, futures::future::join_all(waiting)).await;
        let ready = matches!(ready, Ok(results) if results.iter().all(Result::is_ok));
        if !ready {
            tracing::warn!(conn, user = %identity.user, "channel subscriptions not confirmed in time");
            let error = RtmError::new(
                ErrorCode::Unavailable,
                "channels unavailable; reconnect later",
                None,
            );
            frames.text(&error.render());
            let close = close_frame(Close::SubscribeTimeout, None);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(&mut frames, close)).await;
            ctx.hub.leave(conn, &initial);
            return None;
        }
        frames.text(&rtm::hello());
        let timeout = ctx.limits.write_timeout;
        if !matches!(
            write(&mut socket, &mut frames, false, timeout, None).await,
            Written::Done
        ) {
            ctx.hub.leave(conn, &initial);
            return None;
        }
        tracing::debug!(conn, user = %identity.user, channels = delivery.members.len(), "client connected");
        ctx.metrics.connected();
        ctx.region.register(conn, closer.clone());
        if let Some(presence) = &ctx.presence {
            presence.connected(&sink, &identity.team, batch_presence);
        }
        delivery.resume(resumed);
        let inbound = Inbound::new(ctx.clone(), conn, Instant::now());
        let interval = ctx.limits.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(Connection {
            inbound,
            ctx,
            conn,
            identity,
            socket,
            frames,
            outbox,
            closer,
            delivery,
            ping,
        })
    }

    /// Carries frames both ways until either side closes; returns why, when the gateway
    /// closes it.
    async fn serve(&mut self) -> Option<Close> {
        // Made once, not on every turn of the loop: making one locks the token's tree.
        let (cancel, closer, outbox) = (
            self.ctx.cancel.clone(),
            self.closer.clone(),
            self.outbox.clone(),
        );
        let shutdown = cancel.cancelled();
        let closing = closer.token().cancelled();
        tokio::pin!(shutdown, closing);
        loop {
            // A turn takes from the task's cooperative budget: frames already buffered (a
            // client's flood read in one go) are handled without touching the socket, and
            // without this the loop would hold its thread for thousands of them.
            tokio::task::consume_budget().await;
            let step = tokio::select! {
                _ = &mut shutdown => self.on_shutdown().await,
                _ = &mut closing => self.on_closed().await,
                // Cancel-safe: a push's wake-up is kept until taken.
                _ = outbox.ready() => self.on_queued().await,
                Some(reply) = self.inbound.next_reply(), if self.inbound.publishing() => {
                    self.on_reply(reply)
                }
                _ = self.ping.tick() => self.on_ping(),
                // Cancel-safe: the WebSocket stream's next() loses nothing when another branch
                // wins.
                msg = self.socket.next(), if self.inbound.can_read() => self.on_client(msg),
            };
            let ping = match step {
                Step::End(close) => return close,
                Step::Write if self.frames.is_empty() => continue,
                Step::Write => false,
                Step::Ping => true,
            };
            if let ControlFlow::Break(close) = self.write_gathered(ping).await {
                return close;
            }
        }
    }

    /// The gateway shuts down: goodbye, then close.
    async fn on_shutdown(&mut self) -> Step {
        self.frames.text(&rtm::goodbye());
        let timeout = self.ctx.limits.write_timeout;
        let _ = write(&mut self.socket, &mut self.frames, false, timeout, None).await;
        Step::End(Some(Close::ShuttingDown))
    }

    /// The connection was closed from outside, for the closer's reason.
    async fn on_closed(&mut self) -> Step {
        match self.closer.reason() {
            Some(Close::Draining) => {
                // Lame duck: write what is already queued, keep the cursors for the
                // reconnect, then goodbye.
                self.delivery.take_all(&mut self.frames);
                let cursors = self.delivery.cursors();
                self.ctx
                    .region
                    .hand_over(self.identity.user.clone(), cursors);
                self.frames.text(&rtm::goodbye());
                let timeout = self.ctx.limits.write_timeout;
                let _ = write(&mut self.socket, &mut self.frames, false, timeout, None).await;
                Step::End(Some(Close::Draining))
            }
            Some(close) => Step::End(Some(close)),
            None => Step::End(Some(Close::QueueOverflow)),
        }
    }

    /// Items were queued: take up to a batch, written with one flush.
    async fn on_queued(&mut self) -> Step {
        let mut taken = self.delivery.take_batch(&mut self.frames);
        // Under load, let the fan-out queue more before paying for a system call, for as long
        // as each turn brings more (a few turns at most): a connection then writes many
        // events per write. A lone frame is no sign of load: it is written at once (a yield
        // would cost a turn of the scheduler per write).
        for _ in 0..MORE_TURNS {
            let before = self.frames.frames();
            if taken.is_err() || !(2..WRITE_BATCH).contains(&before) {
                break;
            }
            tokio::task::yield_now().await;
            taken = self.delivery.take_batch(&mut self.frames);
            if self.frames.frames() == before {
                break;
            }
        }
        self.outbox.rearm();
        match taken {
            Ok(()) => Step::Write,
            Err(close) => Step::End(Some(close)),
        }
    }

    /// A publish finished: its reply, if any, goes out.
    fn on_reply(&mut self, reply: Option<Utf8Bytes>) -> Step {
        if let Some(reply) = reply {
            self.frames.text(&reply);
        }
        Step::Write
    }

    /// The ping timer: close an idle client, else ping it.
    fn on_ping(&mut self) -> Step {
        if self.inbound.idle() {
            Step::End(Some(Close::Idle))
        } else {
            self.delivery.release(&mut self.frames);
            Step::Ping
        }
    }

    /// A frame from the client (`None`: the stream ended).
    fn on_client(&mut self, msg: Option<Result<Message, crate::socket::Error>>) -> Step {
        let members = &self.delivery.members;
        match self
            .inbound
            .on_message(msg, &self.identity, members, &mut self.frames)
        {
            ControlFlow::Continue(()) => Step::Write,
            ControlFlow::Break(close) => Step::End(close),
        }
    }

    /// Writes the frames gathered (and a ping after them when `ping`); `Break` when the
    /// connection must end.
    async fn write_gathered(&mut self, ping: bool) -> ControlFlow<Option<Close>> {
        let (timeout, stop) = (self.ctx.limits.write_timeout, Some(self.closer.token()));
        match write(&mut self.socket, &mut self.frames, ping, timeout, stop).await {
            Written::Done => self.delivery.batch_written(),
            // The close token fired: the next turn closes, finishing the cut write first.
            Written::Interrupted => {}
            Written::Broken => return ControlFlow::Break(None),
            Written::Stalled => {
                self.closer.close(Close::WriteStalled);
                tracing::info!(conn = self.conn, user = %self.identity.user, "closing slow consumer: a write stalled");
                return ControlFlow::Break(Some(Close::WriteStalled));
            }
        }
        ControlFlow::Continue(())
    }

    /// Closes the socket (with the closing handshake when there is a reason) and takes the
    /// connection out of the hub, the region and presence.
    async fn teardown(mut self, close: Option<Close>) {
        if let Some(close) = close {
            // The closer's text (a disconnect's) goes with the closer's own reason only.
            let closer = self.closer.clone();
            let text = closer.text().filter(|_| closer.reason() == Some(close));
            writer::close(&mut self.socket, &mut self.frames, close, text).await;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.socket.close()).await;
        let (ctx, conn) = (&self.ctx, self.conn);
        ctx.region.unregister(conn);
        self.outbox.close();
        let all = self.delivery.leave_all();
        ctx.hub.leave(conn, &all);
        if let Some(presence) = &ctx.presence {
            presence.disconnected(conn, &self.identity.user);
        }
        ctx.metrics.disconnected(close);
        let close = close.map(|c| (c.code(), c.reason()));
        tracing::debug!(conn, user = %self.identity.user, ?close, "client disconnected");
    }
}
