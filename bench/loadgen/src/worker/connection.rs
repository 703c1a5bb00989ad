//! One client of a worker, for its whole life: connect through the target's real connect flow
//! (RTM or NATS), then read the server's frames, timing each delivery, and publish on its
//! schedule within its window while the run is on; in connect-storm, close and connect again.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;

use super::{Active, Phase, Shared};
use crate::clock::micros_now;
use crate::pace;
use crate::plan::{PublishMode, Scenario, Target};
use crate::ws::Socket;
use crate::wsraw::{self, Frame};
use crate::{nats, rtm};

/// Frames a client handles in a row when they are already read, before it looks at its
/// other work (publishing, the phase) again.
const DRAIN_FRAMES: usize = 32;

/// One connection; for NATS, with the parser of the server's byte stream.
struct Client {
    ws: Socket,
    nats: Option<nats::Parser>,
    /// This client's place in the worker (its schedule and wake-up).
    slot: usize,
    /// The publish times read from the frames at hand, recorded together (kept for its
    /// allocation).
    received: Vec<u64>,
}

/// How a connection's session ended.
enum End {
    /// The run is over: close politely.
    Cancelled,
    /// The server closed it, or it failed.
    Closed,
}

/// Runs client `index` (this worker's `slot`-th) until the worker cancels.
pub(super) async fn client(shared: Arc<Shared>, slot: usize, index: usize) {
    let connected = tokio::select! {
        _ = shared.cancel.cancelled() => return,
        c = connect(&shared, slot, index) => c,
    };
    let mut client = match connected {
        Ok(c) => {
            shared.counters.connected.fetch_add(1, Ordering::Relaxed);
            shared.connected[slot].store(true, Ordering::Relaxed);
            c
        }
        Err(e) => {
            // The first few say why; the count says how many.
            if shared
                .counters
                .connect_failures
                .fetch_add(1, Ordering::Relaxed)
                < 3
            {
                tracing::warn!(client = index, error = %format!("{e:#}"), "connect failed");
            }
            return;
        }
    };
    let end = match shared.plan.scenario {
        Scenario::ConnectStorm => storm(&shared, &mut client, index).await,
        _ => {
            let publishes = match shared.plan.publish {
                PublishMode::Clients | PublishMode::Firehose => {
                    shared.members[index].publishes.clone()
                }
                PublishMode::Admin => Vec::new(),
            };
            session(&shared, &mut client, &publishes).await
        }
    };
    match end {
        Ok(End::Cancelled) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.ws.close(None)).await;
        }
        Ok(End::Closed) => {
            shared.counters.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            if shared.counters.disconnects.fetch_add(1, Ordering::Relaxed) < 3 {
                tracing::warn!(client = index, error = %format!("{e:#}"), "connection failed");
            }
        }
    }
}

/// Connects client `index` (at most `connect_parallel` at once) and times it.
async fn connect(shared: &Shared, slot: usize, index: usize) -> anyhow::Result<Client> {
    let _permit = shared.gate.acquire().await?;
    let plan = &shared.plan;
    anyhow::ensure!(!plan.gateways.is_empty(), "no gateway to connect to");
    let gateway = &plan.gateways[index % plan.gateways.len()];
    // The firehose connection to nats-server is a plain one: it subscribes to nothing.
    let subscribes = !(plan.target == Target::Nats && plan.is_firehose(index));
    let channels: Vec<String> = shared.members[index]
        .channels
        .iter()
        .filter(|_| subscribes)
        .map(|&c| shared.names[c as usize].clone())
        .collect();
    let started = Instant::now();
    let client = match plan.target {
        Target::Channelmesh => Client {
            ws: rtm::connect(
                &shared.http,
                gateway,
                plan.source,
                &plan.jwt_secret,
                &plan.user(index),
                &channels,
            )
            .await?,
            nats: None,
            slot,
            received: Vec::new(),
        },
        Target::Nats => {
            let (ws, parser) = nats::connect(gateway, plan.source, &channels).await?;
            Client {
                ws,
                nats: Some(parser),
                slot,
                received: Vec::new(),
            }
        }
    };
    if let Ok(mut h) = shared.connects.lock() {
        h.saturating_record(started.elapsed().as_micros() as u64);
    }
    let mut client = client;
    // An idle client holds only its socket between the rare frames it reads.
    client.ws.set_lean(plan.scenario == Scenario::Idle);
    Ok(client)
}

/// An entry of [`Pending`] that has been answered.
const ANSWERED: u32 = u32::MAX;
/// The most messages a connection remembers unanswered; past it the oldest is forgotten (its
/// answer then goes uncounted, and open loop still expects its deliveries).
const PENDING_MAX: usize = 65_536;
/// Open loop: the most messages a publisher sends in one go before it reads again, when it is
/// behind its schedule.
const BURST_MAX: usize = 64;

/// Messages sent and not yet acknowledged, oldest first: (RTM id, channel, unix micros sent),
/// the channel [`ANSWERED`] once answered. Ids are consecutive per connection, so an id's
/// place is its distance from the oldest: an ack finds its message at once, in any order.
#[derive(Default)]
pub(super) struct Pending {
    messages: VecDeque<(u64, u32, u64)>,
    /// Entries of `messages` not yet answered.
    pub(super) outstanding: usize,
    /// NATS: messages per outstanding PING, oldest first.
    bursts: VecDeque<usize>,
    /// NATS open loop: messages sent since the last PING.
    unpinged: usize,
}

impl Pending {
    pub(super) fn push(&mut self, id: u64, channel: u32, sent_us: u64) {
        if self.messages.len() >= PENDING_MAX
            && let Some((_, c, _)) = self.messages.pop_front()
        {
            if c != ANSWERED {
                self.outstanding -= 1;
            }
            self.trim();
        }
        self.messages.push_back((id, channel, sent_us));
        self.outstanding += 1;
    }

    /// The message `id` (its channel and send time), if it is waiting for its answer.
    pub(super) fn take(&mut self, id: u64) -> Option<(u32, u64)> {
        let first = self.messages.front()?.0;
        let at = usize::try_from(id.checked_sub(first)?).ok()?;
        let entry = self.messages.get_mut(at)?;
        if entry.0 != id || entry.1 == ANSWERED {
            return None;
        }
        let taken = (entry.1, entry.2);
        entry.1 = ANSWERED;
        self.outstanding -= 1;
        self.trim();
        Some(taken)
    }

    /// The oldest message waiting for its answer (NATS answers in order).
    fn take_oldest(&mut self) -> Option<(u32, u64)> {
        self.trim();
        let id = self.messages.front()?.0;
        self.take(id)
    }

    fn trim(&mut self) {
        while self.messages.front().is_some_and(|m| m.1 == ANSWERED) {
            self.messages.pop_front();
        }
    }

    /// Whether anything sent still waits for its answer.
    pub(super) fn waiting(&self) -> bool {
        self.outstanding > 0 || !self.bursts.is_empty() || self.unpinged > 0
    }
}

/// A publisher's place in the current step.
struct Stepping {
    id: u64,
    go: Instant,
    go_us: u64,
    schedule: pace::Schedule,
    /// Messages sent in this step.
    sent: u64,
}

/// Reads the server's frames, and publishes to `publishes` (in turn) while the run is on.
async fn session(shared: &Shared, client: &mut Client, publishes: &[u32]) -> anyhow::Result<End> {
    let mut pending = Pending::default();
    let mut active = (!publishes.is_empty()).then(|| Active::new(&shared.active_publishers));
    let window = shared.plan.window.max(1);
    let open_loop = shared.plan.open_loop;
    let wake = shared.wakes[client.slot].clone();
    // Made once, not per frame: every receiver loops here for every delivery.
    let mut cancelled = pin!(shared.cancel.cancelled());
    let mut changed = pin!(phase_change(shared.phase.clone()));
    let mut now = *shared.phase.borrow();
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut out = Vec::new();
    let mut step: Option<Stepping> = None;
    loop {
        if !publishes.is_empty() {
            match now {
                Phase::Running => {
                    let current = shared.step();
                    if step.as_ref().is_none_or(|s| s.id != current.id) {
                        step = Some(Stepping {
                            id: current.id,
                            go: current.go,
                            go_us: current.go_us,
                            schedule: shared.schedule(client.slot),
                            sent: 0,
                        });
                        active = Some(Active::new(&shared.active_publishers));
                    }
                    let Some(at) = step.as_mut() else {
                        unreachable!("set above")
                    };
                    let mut room = if open_loop {
                        BURST_MAX
                    } else {
                        window.saturating_sub(pending.outstanding)
                    };
                    if at.schedule.rate > 0.0 {
                        let due = at.schedule.due(at.go.elapsed());
                        room = room.min(due.saturating_sub(at.sent) as usize);
                    }
                    if room > 0 {
                        let messages: Vec<(u32, u64)> = (0..room as u64)
                            .map(|k| {
                                let c = publishes[(next + k as usize) % publishes.len()];
                                // Open loop: stamped with when it was due.
                                let stamp = if open_loop && at.schedule.rate > 0.0 {
                                    at.go_us + at.schedule.due_at(at.sent + k).as_micros() as u64
                                } else {
                                    micros_now()
                                };
                                (c, stamp)
                            })
                            .collect();
                        next = (next + room) % publishes.len();
                        at.sent += room as u64;
                        publish(shared, client, &mut pending, &mut out, &mut sent, &messages)
                            .await?;
                    }
                }
                Phase::Stopping => {
                    // NATS open loop: one PING confirms everything sent.
                    if pending.unpinged > 0 && client.nats.is_some() {
                        pending.bursts.push_back(pending.unpinged);
                        pending.unpinged = 0;
                        client.ws.push(wsraw::OP_BINARY, nats::PING);
                        client.ws.flush().await?;
                    }
                    if !pending.waiting()
                        && let Some(a) = active.as_mut()
                    {
                        a.settle();
                    }
                }
                Phase::Connecting => {}
            }
        }
        let pacing = now == Phase::Running && step.as_ref().is_some_and(|s| s.schedule.rate > 0.0);
        tokio::select! {
            _ = &mut cancelled => {
                shared.counters.unacked.fetch_add(pending.outstanding as u64, Ordering::Relaxed);
                return Ok(End::Cancelled);
            }
            phase = &mut changed => match phase {
                Some(phase) => {
                    now = *phase.borrow();
                    changed.set(phase_change(phase));
                }
                None => return Ok(End::Cancelled),
            },
            // The pacing thread says a message is due; the loop's top decides how many.
            _ = wake.notified(), if pacing => {}
            open = client.ws.ready() => {
                // Frames already read from the socket are taken without going round the
                // select for each: an RTM delivery is a frame of its own, so this loop runs
                // per delivery (NATS packs several messages in a frame). What they deliver
                // is recorded once for all of them, at one clock reading taken after the
                // last (a latency errs long by the time it takes to read the rest, not short).
                if !take_frames(shared, client, &mut pending, open).await? {
                    return Ok(End::Closed);
                }
            }
        }
    }
}

/// After [`wsraw::WsStream::ready`] answered `open`: handles the frames read and records what
/// they delivered at one clock reading (also when the connection failed on the way). False
/// when the server closed the connection.
async fn take_frames(
    shared: &Shared,
    client: &mut Client,
    pending: &mut Pending,
    open: anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    client.received.clear();
    let read = match open {
        Ok(true) => read_frames(shared, client, pending).await,
        Ok(false) => Ok(false),
        Err(e) => Err(e),
    };
    shared.delivered(micros_now(), &client.received);
    read
}

/// Handles up to [`DRAIN_FRAMES`] frames already read (at least one is), then writes the
/// answers they called for (pongs). False when the server closed the connection.
async fn read_frames(
    shared: &Shared,
    client: &mut Client,
    pending: &mut Pending,
) -> anyhow::Result<bool> {
    let mut pong = false;
    for _ in 0..DRAIN_FRAMES {
        let Some(frame) = client.ws.try_next()? else {
            break;
        };
        let received = &mut client.received;
        pong |= on_frame(shared, received, client.nats.as_mut(), pending, frame)?;
    }
    if pong {
        client.ws.push(wsraw::OP_BINARY, nats::PONG);
    }
    if client.ws.wants_flush() {
        client.ws.flush().await?;
    }
    Ok(true)
}

/// Resolves when the run's phase changes, handing the receiver back for the next change; None
/// when the worker dropped the sender. Owns its receiver, so a session can keep one pinned
/// across frames and re-arm it.
async fn phase_change(mut phase: watch::Receiver<Phase>) -> Option<watch::Receiver<Phase>> {
    phase.changed().await.ok().map(|()| phase)
}

/// Sends one message to each of `messages` (channel, publish time): RTM one frame each, NATS
/// one frame of PUBs and, closed loop, a PING.
async fn publish(
    shared: &Shared,
    client: &mut Client,
    pending: &mut Pending,
    out: &mut Vec<u8>,
    sent: &mut u64,
    messages: &[(u32, u64)],
) -> anyhow::Result<()> {
    match client.nats {
        None => {
            for &(c, stamp) in messages {
                *sent += 1;
                let text = shared.text_at(*sent, stamp);
                let frame = rtm::message_frame(*sent, &shared.names[c as usize], &text);
                client.ws.push(wsraw::OP_TEXT, frame.as_bytes());
                pending.push(*sent, c, micros_now());
                shared.sent(c);
            }
            client.ws.flush_reading().await?;
        }
        Some(_) => {
            out.clear();
            for &(c, stamp) in messages {
                *sent += 1;
                let text = shared.text_at(*sent, stamp);
                nats::publish_frame(out, &shared.names[c as usize], text.as_bytes());
                if shared.plan.open_loop {
                    pending.unpinged += 1;
                } else {
                    pending.push(*sent, c, micros_now());
                }
                shared.sent(c);
            }
            if !shared.plan.open_loop {
                out.extend_from_slice(nats::PING);
                pending.bursts.push_back(messages.len());
            }
            client.ws.push(wsraw::OP_BINARY, out);
            client.ws.flush_reading().await?;
        }
    }
    Ok(())
}

/// Handles one data frame from the server, adding the publish times of the messages it
/// delivers to `received`. True when the server asked for a PONG (NATS).
fn on_frame(
    shared: &Shared,
    received: &mut Vec<u64>,
    nats: Option<&mut nats::Parser>,
    pending: &mut Pending,
    frame: Frame<'_>,
) -> anyhow::Result<bool> {
    let Some(parser) = nats else {
        // The gateway sends only text; wsraw answers pings itself.
        if frame.opcode == wsraw::OP_TEXT {
            match rtm::classify(frame.payload) {
                rtm::Incoming::Delivery { sent_us } => received.push(sent_us),
                rtm::Incoming::Ack { id, ok } => {
                    if let Some((c, sent_us)) = pending.take(id) {
                        if ok {
                            shared.acked(c, sent_us);
                        } else {
                            shared.refused(c);
                        }
                    }
                }
                rtm::Incoming::Other => {}
            }
        }
        return Ok(false);
    };
    let mut pong = false;
    parser.each(frame.payload, |op| match op {
        nats::Op::Msg {
            sent_us: Some(sent_us),
        } => received.push(sent_us),
        nats::Op::Ping => pong = true,
        nats::Op::Pong => {
            let burst = pending.bursts.pop_front().unwrap_or(0);
            if shared.plan.open_loop {
                // The one PING at the end of a step: everything before it is in.
                shared
                    .counters
                    .published
                    .fetch_add(burst as u64, Ordering::Relaxed);
            } else {
                for _ in 0..burst {
                    if let Some((c, sent_us)) = pending.take_oldest() {
                        shared.acked(c, sent_us);
                    }
                }
            }
        }
        nats::Op::Err(e) => {
            shared
                .counters
                .publish_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "nats-server sent -ERR");
        }
        nats::Op::Msg { sent_us: None } | nats::Op::Info | nats::Op::Ok => {}
    })?;
    Ok(pong)
}

/// connect-storm: while the run is on, each client holds its connection for a random time
/// (mean 1 / churn seconds), closes it and connects again, timing the connect.
async fn storm(shared: &Shared, client: &mut Client, index: usize) -> anyhow::Result<End> {
    let mut phase = shared.phase.clone();
    let mut pending = Pending::default();
    let churn = shared.plan.churn.max(1e-6);
    loop {
        let running = *phase.borrow_and_update() == Phase::Running;
        let hold = Duration::from_secs_f64(rand::rng().random::<f64>() * 2.0 / churn);
        let deadline = tokio::time::sleep(hold);
        tokio::pin!(deadline);
        let reconnect = loop {
            tokio::select! {
                _ = shared.cancel.cancelled() => return Ok(End::Cancelled),
                changed = phase.changed() => {
                    if changed.is_err() {
                        return Ok(End::Cancelled);
                    }
                    break false;
                }
                _ = &mut deadline, if running => break true,
                open = client.ws.ready() => {
                    if !take_frames(shared, client, &mut pending, open).await? {
                        return Ok(End::Closed);
                    }
                }
            }
        };
        if !reconnect {
            continue;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), client.ws.close(None)).await;
        loop {
            let attempt = tokio::select! {
                _ = shared.cancel.cancelled() => return Ok(End::Cancelled),
                c = connect(shared, client.slot, index) => c,
            };
            match attempt {
                Ok(c) => {
                    *client = c;
                    shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    if shared
                        .counters
                        .reconnect_failures
                        .fetch_add(1, Ordering::Relaxed)
                        < 3
                    {
                        tracing::warn!(client = index, error = %format!("{e:#}"), "reconnect failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
