//! A worker process (`channelmesh bench worker`, started by the coordinator): runs its share of
//! the clients from its own source address, takes orders on stdin, reports on stdout.
//!
//! Flow control, the same for both targets: a publishing client has at most `window`
//! messages unacknowledged. RTM acknowledges each message (`reply_to`); NATS has no per-message
//! acknowledgement, so every burst of PUBs written together is followed by one PING, whose
//! PONG acknowledges the burst. A message counts as published when it is acknowledged.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use mesh_proto::admin::PostMessageRequest;
use mesh_proto::admin::admin_client::AdminClient;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pace::{self, Schedule};
use super::plan::{self, ADMIN_PUBLISHERS, Member, Plan, PublishMode, Scenario, Target};
use super::protocol::{self, Counters, FromWorker, ToWorker, WorkerReport};
use super::{Socket, micros_now, nats, rtm};

/// Frames a client handles in a row when they are already read, before it looks at its
/// other work (publishing, the phase) again.
const DRAIN_FRAMES: usize = 32;
/// How often progress goes to the coordinator.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long `Stop` waits for outstanding acknowledgements.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the coordinator may take to send the plan.
const PLAN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing the clients may take at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the run is; the clients watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Running,
    Stopping,
}

/// Shared by a worker's client tasks.
struct Shared {
    plan: Plan,
    members: Vec<Member>,
    /// Channel ids (and NATS subjects), by index.
    names: Vec<String>,
    /// For rtm.connect, bound to the worker's source address.
    http: reqwest::Client,
    phase: watch::Receiver<Phase>,
    cancel: CancellationToken,
    /// Connects in progress at once.
    gate: Semaphore,
    /// Per client of this worker, its publishing schedule (rate 0: as fast as the window
    /// allows, or not publishing).
    schedules: Vec<Schedule>,
    /// Per client of this worker, how the pacing thread says "a message is due".
    wakes: Vec<Arc<Notify>>,
    /// When publishing began (`Go`): the schedules count from it.
    go: OnceLock<Instant>,
    counters: Atomics,
    /// Per channel, acknowledged messages.
    published: Vec<AtomicU64>,
    /// Publish -> receive latency. One thread runs all the clients, so the lock is never
    /// contended; it is taken once per batch of frames read.
    latency: Mutex<Histogram<u64>>,
    connects: Mutex<Histogram<u64>>,
    /// Per client of this worker, whether it connected.
    connected: Vec<AtomicBool>,
    /// Publishers that have not yet settled after `Stop`.
    active_publishers: AtomicUsize,
    first_publish_us: AtomicU64,
    last_delivery_us: AtomicU64,
}

#[derive(Default)]
struct Atomics {
    connected: AtomicU64,
    connect_failures: AtomicU64,
    published: AtomicU64,
    publish_errors: AtomicU64,
    unacked: AtomicU64,
    delivered: AtomicU64,
    disconnects: AtomicU64,
    reconnects: AtomicU64,
    reconnect_failures: AtomicU64,
}

impl Atomics {
    fn snapshot(&self) -> Counters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            connected: get(&self.connected),
            connect_failures: get(&self.connect_failures),
            published: get(&self.published),
            publish_errors: get(&self.publish_errors),
            unacked: get(&self.unacked),
            delivered: get(&self.delivered),
            disconnects: get(&self.disconnects),
            reconnects: get(&self.reconnects),
            reconnect_failures: get(&self.reconnect_failures),
        }
    }
}

impl Shared {
    /// Records messages received at `now` (unix micros) that were sent at `sent_us`.
    fn delivered(&self, now: u64, sent_us: &[u64]) {
        if sent_us.is_empty() {
            return;
        }
        if let Ok(mut h) = self.latency.lock() {
            for &sent in sent_us {
                h.saturating_record(now.saturating_sub(sent).max(1));
            }
        }
        self.counters
            .delivered
            .fetch_add(sent_us.len() as u64, Ordering::Relaxed);
        self.last_delivery_us.fetch_max(now, Ordering::Relaxed);
    }

    fn acked(&self, channel: u32) {
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.published.get(channel as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A message text: the publish time first, padded to the payload size.
    fn text(&self, seq: u64) -> String {
        let now = micros_now();
        self.first_publish_us.fetch_min(now, Ordering::Relaxed);
        let mut text = format!("b{now}:{seq}:");
        let pad = self.plan.payload.saturating_sub(text.len());
        text.extend(std::iter::repeat_n('x', pad));
        text
    }
}

/// A publisher counted in `active_publishers` until it settles (or ends).
struct Active<'a>(Option<&'a AtomicUsize>);

impl<'a> Active<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(Some(n))
    }

    fn settle(&mut self) {
        if let Some(n) = self.0.take() {
            n.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Runs a worker: reads the plan from stdin, then orders, until `Finish` or stdin closes.
///
/// The worker gets a current-thread runtime of its own, on its own thread: a worker is pinned
/// to one core with the others anyway, and one thread running every client spares each
/// received message the multi-threaded scheduler's cross-thread bookkeeping. The caller's
/// runtime only waits for the answer.
pub async fn main() -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-worker".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the worker's runtime")
                .and_then(|runtime| runtime.block_on(serve()));
            let _ = tx.send(result);
        })
        .context("starting the worker's thread")?;
    // No timeout: this is the worker's whole life, which ends when its stdin closes (the
    // coordinator's orders and the worker's own steps have theirs).
    rx.await
        .context("the worker's thread ended without a word")?
}

/// The worker proper, on its own runtime.
async fn serve() -> anyhow::Result<()> {
    raise_open_files_limit();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let first = tokio::time::timeout(PLAN_TIMEOUT, lines.next_line())
        .await
        .context("no plan on stdin")??
        .context("stdin closed before the plan")?;
    let ToWorker::Plan(plan) = serde_json::from_str(&first).context("the plan line")? else {
        bail!("the first line must be the plan");
    };
    let result = run(*plan, &mut lines, &mut out).await;
    if let Err(e) = &result {
        let _ = send(
            &mut out,
            &FromWorker::Failed {
                error: format!("{e:#}"),
            },
        )
        .await;
    }
    result
}

type Lines = tokio::io::Lines<BufReader<tokio::io::Stdin>>;

async fn run(plan: Plan, lines: &mut Lines, out: &mut tokio::io::Stdout) -> anyhow::Result<()> {
    let members = plan::members(&plan);
    let mine: Vec<usize> = plan.mine().collect();
    let names = (0..plan.channels as u32).map(|c| plan.channel(c)).collect();
    let http = reqwest::Client::builder()
        .no_proxy()
        .local_address(plan.source)
        .timeout(Duration::from_secs(20))
        .build()?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let schedules = schedules(&plan, &members, &mine);
    let shared = Arc::new(Shared {
        wakes: mine.iter().map(|_| Arc::new(Notify::new())).collect(),
        schedules,
        go: OnceLock::new(),
        gate: Semaphore::new(plan.connect_parallel.max(1)),
        published: (0..plan.channels).map(|_| AtomicU64::new(0)).collect(),
        connected: mine.iter().map(|_| AtomicBool::new(false)).collect(),
        members,
        names,
        http,
        phase: phase_rx,
        cancel: CancellationToken::new(),
        counters: Atomics::default(),
        latency: Mutex::new(protocol::histogram()?),
        connects: Mutex::new(protocol::histogram()?),
        active_publishers: AtomicUsize::new(0),
        first_publish_us: AtomicU64::new(u64::MAX),
        last_delivery_us: AtomicU64::new(0),
        plan,
    });

    let tracker = TaskTracker::new();
    let connect_started_us = micros_now();
    for (slot, &index) in mine.iter().enumerate() {
        tracker.spawn(client(shared.clone(), slot, index));
    }
    if shared.plan.publish == PublishMode::Admin && shared.plan.target == Target::Channelmesh {
        for task in (shared.plan.worker..ADMIN_PUBLISHERS).step_by(shared.plan.processes.max(1)) {
            tracker.spawn(admin_publisher(shared.clone(), task));
        }
    }
    tracker.close();

    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let total = mine.len() as u64;
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                None => return stop(&shared, &tracker).await,
                Some(line) => bail!("an order while connecting: {line}"),
            },
            _ = tick.tick() => {
                let c = shared.counters.snapshot();
                send(out, &FromWorker::Progress(c.clone())).await?;
                if c.connected + c.connect_failures >= total {
                    break;
                }
            }
        }
    }
    let connect_finished_us = micros_now();
    let mut receivers = vec![0u32; shared.plan.channels];
    for (slot, &index) in mine.iter().enumerate() {
        if shared.connected[slot].load(Ordering::Relaxed) {
            plan::receivers_of(&shared.plan, &shared.members[index], &mut receivers);
        }
    }
    send(
        out,
        &FromWorker::Ready {
            receivers,
            connect_started_us,
            connect_finished_us,
        },
    )
    .await?;

    let stop_pacing = CancellationToken::new();
    let mut pacer = None;
    let finished = loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break false };
                match serde_json::from_str::<ToWorker>(&line).context("an order")? {
                    ToWorker::Go => {
                        let go = *shared.go.get_or_init(Instant::now);
                        let publishers: Vec<_> = shared
                            .schedules
                            .iter()
                            .zip(&shared.wakes)
                            .filter(|(s, _)| s.rate > 0.0)
                            .map(|(s, w)| (*s, w.clone()))
                            .collect();
                        if !publishers.is_empty() {
                            pacer = Some(
                                pace::spawn(go, publishers, stop_pacing.clone())
                                    .context("starting the pacing thread")?,
                            );
                        }
                        phase_tx.send_replace(Phase::Running);
                    }
                    ToWorker::Stop => {
                        stop_pacing.cancel();
                        phase_tx.send_replace(Phase::Stopping);
                        let waiting = Instant::now();
                        while shared.active_publishers.load(Ordering::SeqCst) > 0
                            && waiting.elapsed() < SETTLE_TIMEOUT
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let published = shared
                            .published
                            .iter()
                            .map(|n| n.load(Ordering::Relaxed))
                            .collect();
                        send(out, &FromWorker::Stopped { published }).await?;
                    }
                    ToWorker::Finish => break true,
                    ToWorker::Plan(_) => bail!("a second plan"),
                }
            }
            _ = tick.tick() => {
                send(out, &FromWorker::Progress(shared.counters.snapshot())).await?;
            }
        }
    };
    stop_pacing.cancel();
    stop(&shared, &tracker).await?;
    if let Some(pacer) = pacer {
        // It looks at its token at least every few milliseconds.
        tokio::time::timeout(CLOSE_TIMEOUT, tokio::task::spawn_blocking(|| pacer.join()))
            .await
            .context("the pacing thread did not stop in time")??
            .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    }
    if finished {
        let latency = protocol::encode(
            &*shared
                .latency
                .lock()
                .map_err(|_| anyhow::anyhow!("a poisoned histogram"))?,
        )?;
        let connects = protocol::encode(
            &*shared
                .connects
                .lock()
                .map_err(|_| anyhow::anyhow!("a poisoned histogram"))?,
        )?;
        let first = shared.first_publish_us.load(Ordering::Relaxed);
        let report = WorkerReport {
            counters: shared.counters.snapshot(),
            latency,
            connect: connects,
            first_publish_us: if first == u64::MAX { 0 } else { first },
            last_delivery_us: shared.last_delivery_us.load(Ordering::Relaxed),
        };
        send(out, &FromWorker::Report(Box::new(report))).await?;
    }
    Ok(())
}

/// Each of this worker's clients' publishing schedule: its publisher slots' share of the rate,
/// and a phase from its first slot's place among all of the run's slots, so the publishers of
/// every worker take turns evenly rather than firing together.
fn schedules(plan: &Plan, members: &[Member], mine: &[usize]) -> Vec<Schedule> {
    let slots = plan.publisher_slots(members);
    let per_slot = plan.rate_per_slot(slots);
    let mut first = Vec::with_capacity(members.len());
    let mut k = 0;
    for m in members {
        first.push(k);
        k += m.publishes.len();
    }
    mine.iter()
        .map(|&i| {
            let publishes = match plan.publish {
                PublishMode::Clients => members[i].publishes.len(),
                PublishMode::Admin => 0,
            };
            Schedule {
                rate: per_slot * publishes as f64,
                phase: pace::phase(first[i], slots),
            }
        })
        .collect()
}

/// Closes every client and waits for their tasks.
async fn stop(shared: &Shared, tracker: &TaskTracker) -> anyhow::Result<()> {
    shared.cancel.cancel();
    tokio::time::timeout(CLOSE_TIMEOUT, tracker.wait())
        .await
        .context("the clients did not close in time")
}

async fn send(out: &mut tokio::io::Stdout, message: &FromWorker) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    out.flush().await?;
    Ok(())
}

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

async fn client(shared: Arc<Shared>, slot: usize, index: usize) {
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
                PublishMode::Clients => shared.members[index].publishes.clone(),
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
    let channels: Vec<String> = shared.members[index]
        .channels
        .iter()
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
    Ok(client)
}

/// Messages sent and not yet acknowledged, oldest first: (RTM id, channel).
#[derive(Default)]
struct Pending {
    messages: VecDeque<(u64, u32)>,
    /// NATS: messages per outstanding PING, oldest first.
    bursts: VecDeque<usize>,
}

/// Reads the server's frames, and publishes to `publishes` (in turn) while the run is on.
async fn session(shared: &Shared, client: &mut Client, publishes: &[u32]) -> anyhow::Result<End> {
    let mut pending = Pending::default();
    let mut active = (!publishes.is_empty()).then(|| Active::new(&shared.active_publishers));
    let window = shared.plan.window.max(1);
    let schedule = shared.schedules[client.slot];
    let wake = shared.wakes[client.slot].clone();
    // Made once, not per frame: every receiver loops here for every delivery.
    let mut cancelled = pin!(shared.cancel.cancelled());
    let mut changed = pin!(phase_change(shared.phase.clone()));
    let mut now = *shared.phase.borrow();
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut out = Vec::new();
    loop {
        if !publishes.is_empty() {
            match now {
                Phase::Running => {
                    let mut room = window.saturating_sub(pending.messages.len());
                    if schedule.rate > 0.0 {
                        let go = *shared.go.get_or_init(Instant::now);
                        let due = schedule.due(go.elapsed());
                        room = room.min(due.saturating_sub(sent) as usize);
                    }
                    if room > 0 {
                        let channels: Vec<u32> = (0..room)
                            .map(|k| publishes[(next + k) % publishes.len()])
                            .collect();
                        next = (next + room) % publishes.len();
                        publish(shared, client, &mut pending, &mut out, &mut sent, &channels)
                            .await?;
                    }
                }
                Phase::Stopping if pending.messages.is_empty() => {
                    if let Some(a) = active.as_mut() {
                        a.settle();
                    }
                }
                _ => {}
            }
        }
        let pacing = now == Phase::Running && schedule.rate > 0.0;
        tokio::select! {
            _ = &mut cancelled => {
                shared.counters.unacked.fetch_add(pending.messages.len() as u64, Ordering::Relaxed);
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
            msg = client.ws.next() => {
                // Frames already read from the socket are taken without going round the
                // select for each: an RTM delivery is a frame of its own, so this loop runs
                // per delivery (NATS packs several messages in a frame). What they deliver
                // is recorded once for all of them, at one clock reading taken after the
                // last (a latency errs long by the time it takes to read the rest, not short).
                let mut msg = msg;
                client.received.clear();
                for taken in 1.. {
                    let open = match msg {
                        Some(Ok(msg)) => on_frame(shared, client, &mut pending, msg).await?,
                        Some(Err(e)) => {
                            shared.delivered(micros_now(), &client.received);
                            return Err(e.into());
                        }
                        None => false,
                    };
                    if !open {
                        shared.delivered(micros_now(), &client.received);
                        return Ok(End::Closed);
                    }
                    if taken == DRAIN_FRAMES {
                        break;
                    }
                    match client.ws.next().now_or_never() {
                        Some(next) => msg = next,
                        None => break,
                    }
                }
                shared.delivered(micros_now(), &client.received);
            }
        }
    }
}

/// Resolves when the run's phase changes, handing the receiver back for the next change; None
/// when the worker dropped the sender. Owns its receiver, so a session can keep one pinned
/// across frames and re-arm it.
async fn phase_change(mut phase: watch::Receiver<Phase>) -> Option<watch::Receiver<Phase>> {
    phase.changed().await.ok().map(|()| phase)
}

/// Sends one message to each of `channels`: RTM one frame each, NATS one frame of PUBs and a
/// PING.
async fn publish(
    shared: &Shared,
    client: &mut Client,
    pending: &mut Pending,
    out: &mut Vec<u8>,
    sent: &mut u64,
    channels: &[u32],
) -> anyhow::Result<()> {
    match client.nats {
        None => {
            for &c in channels {
                *sent += 1;
                let frame =
                    rtm::message_frame(*sent, &shared.names[c as usize], &shared.text(*sent));
                client.ws.feed(Message::Text(frame.into())).await?;
                pending.messages.push_back((*sent, c));
            }
            client.ws.flush().await?;
        }
        Some(_) => {
            out.clear();
            for &c in channels {
                *sent += 1;
                let text = shared.text(*sent);
                nats::publish_frame(out, &shared.names[c as usize], text.as_bytes());
                pending.messages.push_back((*sent, c));
            }
            out.extend_from_slice(nats::PING);
            pending.bursts.push_back(channels.len());
            client.ws.send(Message::Binary(out.clone().into())).await?;
        }
    }
    Ok(())
}

/// Handles one frame from the server, adding the publish times of the messages it delivers
/// to `client.received`. False when the server is closing the connection.
async fn on_frame(
    shared: &Shared,
    client: &mut Client,
    pending: &mut Pending,
    msg: Message,
) -> anyhow::Result<bool> {
    let Some(parser) = client.nats.as_mut() else {
        match msg {
            Message::Text(text) => match rtm::classify(text.as_str()) {
                rtm::Incoming::Delivery { sent_us } => client.received.push(sent_us),
                rtm::Incoming::Ack { id, ok } => {
                    let at = pending.messages.iter().position(|(i, _)| *i == id);
                    if let Some((_, c)) = at.and_then(|at| pending.messages.remove(at)) {
                        if ok {
                            shared.acked(c);
                        } else {
                            shared
                                .counters
                                .publish_errors
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                rtm::Incoming::Other => {}
            },
            Message::Close(_) => return Ok(false),
            // The gateway sends only text; tungstenite answers pings itself.
            _ => {}
        }
        return Ok(true);
    };
    let bytes = match &msg {
        Message::Binary(bytes) => bytes.as_ref(),
        Message::Text(text) => text.as_bytes(),
        Message::Close(_) => return Ok(false),
        _ => return Ok(true),
    };
    let mut pong = false;
    let sent = &mut client.received;
    parser.each(bytes, |op| match op {
        nats::Op::Msg {
            sent_us: Some(sent_us),
        } => sent.push(sent_us),
        nats::Op::Ping => pong = true,
        nats::Op::Pong => {
            let burst = pending.bursts.pop_front().unwrap_or(0);
            for _ in 0..burst {
                if let Some((_, c)) = pending.messages.pop_front() {
                    shared.acked(c);
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
    if pong {
        client.ws.send(nats::pong()).await?;
    }
    Ok(true)
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
                msg = client.ws.next() => match msg {
                    Some(Ok(msg)) => {
                        client.received.clear();
                        let open = on_frame(shared, client, &mut pending, msg).await?;
                        shared.delivered(micros_now(), &client.received);
                        if !open {
                            return Ok(End::Closed);
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(End::Closed),
                },
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

/// One admin-API publisher: `PostMessage` calls one at a time, its share of the rate, to the
/// channels in turn.
async fn admin_publisher(shared: Arc<Shared>, task: usize) {
    let mut active = Active::new(&shared.active_publishers);
    if let Err(e) = admin_publish(&shared, task).await {
        tracing::warn!(task, error = %format!("{e:#}"), "admin publisher stopped");
    }
    active.settle();
}

async fn admin_publish(shared: &Shared, task: usize) -> anyhow::Result<()> {
    let plan = &shared.plan;
    let channel = mesh_transport::endpoint(&plan.admin)?
        .connect()
        .await
        .context("connecting to the admin server")?;
    let mut admin = AdminClient::new(channel);
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", plan.admin_token).parse()?;
    let mut phase = shared.phase.clone();
    while *phase.borrow_and_update() != Phase::Running {
        tokio::select! {
            _ = shared.cancel.cancelled() => return Ok(()),
            changed = phase.changed() => changed?,
        }
    }
    let rate = plan.rate_per_slot(plan.publisher_slots(&shared.members));
    let offset = if rate > 0.0 {
        rand::rng().random::<f64>() / rate
    } else {
        0.0
    };
    let started = Instant::now();
    let channels = plan.channels.max(1);
    let mut c = task % channels;
    let mut sent = 0u64;
    while *phase.borrow() == Phase::Running && !shared.cancel.is_cancelled() {
        if rate > 0.0 {
            let at = (sent as f64 + 1.0) / rate - offset;
            let wait = at - started.elapsed().as_secs_f64();
            if wait > 0.0 {
                tokio::select! {
                    _ = shared.cancel.cancelled() => return Ok(()),
                    _ = phase.changed() => continue,
                    _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
                }
            }
        }
        sent += 1;
        let mut request = tonic::Request::new(PostMessageRequest {
            channel: shared.names[c].clone(),
            user: "UBENCHPUB".into(),
            text: shared.text(sent),
            team: String::new(),
        });
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        match admin.post_message(request).await {
            Ok(_) => shared.acked(c as u32),
            Err(_) => {
                shared
                    .counters
                    .publish_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        c = (c + 1) % channels;
    }
    Ok(())
}

/// One process holds at most RLIMIT_NOFILE sockets: use the whole hard limit.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}
