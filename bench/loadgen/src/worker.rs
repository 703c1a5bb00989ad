//! A worker process (`channelmesh-loadgen worker`, started by the coordinator): runs its share of
//! the clients from its own source address ([`connection`]; with `--publish admin`, its share of
//! the admin-API publishers, [`admin`]), takes orders on stdin, reports on stdout.
//!
//! Flow control, the same for both targets: a publishing client has at most `window`
//! messages unacknowledged. RTM acknowledges each message (`reply_to`); NATS has no per-message
//! acknowledgement, so every burst of PUBs written together is followed by one PING, whose
//! PONG acknowledges the burst. A message counts as published when it is acknowledged.
//!
//! Open loop (`--open-loop`): publishers never wait. Each message is sent when the clock says
//! it is due and carries that due time (so a publisher held back by its socket shows in the
//! latency rather than hiding it); RTM acks are read only to count them (and refusals), NATS
//! publishers send one PING when publishing stops, whose PONG confirms the lot. What is
//! expected is what was sent and not refused.
//!
//! Rate steps: `Step { rate }` starts publishing at a rate (`Go` is a step at the plan's
//! rate), `Stop` ends it, `Collect` hands over the step's histograms and resets them.

mod admin;
pub(crate) mod connection;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::micros_now;
use crate::pace::{self, Schedule};
use crate::plan::{self, ADMIN_PUBLISHERS, Member, Plan, PublishMode, Target};
use crate::protocol::{self, Counters, FromWorker, ToWorker, WorkerReport};

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
    /// Per client of this worker, its publishing schedule in the current step (rate 0: as
    /// fast as the window allows, or not publishing). Read by a client when a step starts.
    schedules: Mutex<Vec<Schedule>>,
    /// Per client of this worker, how the pacing thread says "a message is due".
    wakes: Vec<Arc<Notify>>,
    /// The current step: when it began (the schedules count from it) and its rate.
    step: Mutex<Step>,
    counters: Atomics,
    /// Per channel, acknowledged messages.
    published: Vec<AtomicU64>,
    /// Per channel, messages sent, and refused by the server (RTM `ok:false`, a failed
    /// admin request).
    sent: Vec<AtomicU64>,
    refused: Vec<AtomicU64>,
    /// Publish -> receive latency. One thread runs all the clients, so the lock is never
    /// contended; it is taken once per batch of frames read.
    latency: Mutex<Histogram<u64>>,
    /// Publish -> acknowledgement (RTM `reply_to`, NATS PONG, the admin API's answer).
    acks: Mutex<Histogram<u64>>,
    connects: Mutex<Histogram<u64>>,
    /// Per client of this worker, whether it connected.
    connected: Vec<AtomicBool>,
    /// Publishers that have not yet settled after `Stop`.
    active_publishers: AtomicUsize,
    first_publish_us: AtomicU64,
    last_delivery_us: AtomicU64,
}

/// A rate step as the clients see it.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// Counts the steps, so a client that missed a phase change still starts afresh.
    id: u64,
    go: Instant,
    /// `go` in unix microseconds.
    go_us: u64,
    /// Messages per second over the whole run.
    rate: u64,
}

#[derive(Default)]
struct Atomics {
    connected: AtomicU64,
    connect_failures: AtomicU64,
    published: AtomicU64,
    sent: AtomicU64,
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
            sent: get(&self.sent),
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

    /// Counts a message sent to `channel`.
    fn sent(&self, channel: u32) {
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.sent.get(channel as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a message to `channel` the server refused.
    fn refused(&self, channel: u32) {
        self.counters.publish_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.refused.get(channel as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The current step.
    fn step(&self) -> Step {
        *self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Client `slot`'s schedule in the current step.
    fn schedule(&self, slot: usize) -> Schedule {
        let schedules = self.schedules.lock().unwrap_or_else(|e| e.into_inner());
        schedules.get(slot).copied().unwrap_or(Schedule {
            rate: 0.0,
            phase: 0.0,
        })
    }

    /// Counts a message acknowledged now that was sent at `sent_us` (unix micros).
    fn acked(&self, channel: u32, sent_us: u64) {
        if let Ok(mut h) = self.acks.lock() {
            h.saturating_record(micros_now().saturating_sub(sent_us).max(1));
        }
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.published.get(channel as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A message text: the publish time first, padded to the payload size.
    fn text(&self, seq: u64) -> String {
        self.text_at(seq, micros_now())
    }

    /// A message text stamped with publish time `at_us` (open loop: when it was due).
    fn text_at(&self, seq: u64, at_us: u64) -> String {
        self.first_publish_us.fetch_min(at_us, Ordering::Relaxed);
        let mut text = format!("b{at_us}:{seq}:");
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
    let shared = Arc::new(Shared {
        wakes: mine.iter().map(|_| Arc::new(Notify::new())).collect(),
        schedules: Mutex::new(schedules(&plan, &members, &mine, plan.rate)),
        step: Mutex::new(Step {
            id: 0,
            go: Instant::now(),
            go_us: micros_now(),
            rate: plan.rate,
        }),
        gate: Semaphore::new(plan.connect_parallel.max(1)),
        published: (0..plan.channels).map(|_| AtomicU64::new(0)).collect(),
        sent: (0..plan.channels).map(|_| AtomicU64::new(0)).collect(),
        refused: (0..plan.channels).map(|_| AtomicU64::new(0)).collect(),
        connected: mine.iter().map(|_| AtomicBool::new(false)).collect(),
        members,
        names,
        http,
        phase: phase_rx,
        cancel: CancellationToken::new(),
        counters: Atomics::default(),
        latency: Mutex::new(protocol::histogram()?),
        acks: Mutex::new(protocol::histogram()?),
        connects: Mutex::new(protocol::histogram()?),
        active_publishers: AtomicUsize::new(0),
        first_publish_us: AtomicU64::new(u64::MAX),
        last_delivery_us: AtomicU64::new(0),
        plan,
    });

    let tracker = TaskTracker::new();
    let connect_started_us = micros_now();
    for (slot, &index) in mine.iter().enumerate() {
        tracker.spawn(connection::client(shared.clone(), slot, index));
    }
    if shared.plan.admin_streams() && shared.plan.target == Target::Channelmesh {
        // The web app's path: one process (worker 0), a few streams.
        if shared.plan.worker == 0 {
            for stream in 0..shared.plan.admin_streams.max(1) {
                tracker.spawn(admin::streamer(shared.clone(), stream));
            }
        }
    } else if shared.plan.publish == PublishMode::Admin && shared.plan.target == Target::Channelmesh
    {
        for task in (shared.plan.worker..ADMIN_PUBLISHERS).step_by(shared.plan.processes.max(1)) {
            tracker.spawn(admin::publisher(shared.clone(), task));
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

    let mut stop_pacing = CancellationToken::new();
    let mut pacer = None;
    // This process's CPU at the step's start, and what it used until `Stop` (with the span's
    // wall time): the last step's, and all steps' together.
    let mut cpu_at_go = None;
    let mut used = (0.0, 0.0);
    let mut steps = 0u64;
    let finished = loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break false };
                let rate = match serde_json::from_str::<ToWorker>(&line).context("an order")? {
                    ToWorker::Go => Some(shared.plan.rate),
                    ToWorker::Step { rate } => Some(rate),
                    ToWorker::Stop => {
                        stop_pacing.cancel();
                        phase_tx.send_replace(Phase::Stopping);
                        let step = shared.step();
                        let delivered = shared.counters.delivered.load(Ordering::Relaxed);
                        let mut this = (0.0, step.go.elapsed().as_secs_f64());
                        if let (Some(before), Some(after)) = (cpu_at_go, crate::cpu::process_cpu()) {
                            this.0 = after.saturating_sub(before).as_secs_f64();
                        }
                        used = (used.0 + this.0, used.1 + this.1);
                        let waiting = Instant::now();
                        while shared.active_publishers.load(Ordering::SeqCst) > 0
                            && waiting.elapsed() < SETTLE_TIMEOUT
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let load = |v: &[AtomicU64]| -> Vec<u64> {
                            v.iter().map(|n| n.load(Ordering::Relaxed)).collect()
                        };
                        let published = if shared.plan.open_loop {
                            load(&shared.sent)
                                .into_iter()
                                .zip(load(&shared.refused))
                                .map(|(s, r)| s.saturating_sub(r))
                                .collect()
                        } else {
                            load(&shared.published)
                        };
                        send(out, &FromWorker::Stopped {
                            published,
                            delivered,
                            cpu_seconds: this.0,
                            publish_seconds: this.1,
                        })
                        .await?;
                        None
                    }
                    ToWorker::Collect => {
                        let take = |h: &Mutex<Histogram<u64>>| -> anyhow::Result<String> {
                            let mut h = h
                                .lock()
                                .map_err(|_| anyhow::anyhow!("a poisoned histogram"))?;
                            let text = protocol::encode(&h)?;
                            h.reset();
                            Ok(text)
                        };
                        let collected = FromWorker::Collected {
                            latency: take(&shared.latency)?,
                            acks: take(&shared.acks)?,
                            counters: shared.counters.snapshot(),
                        };
                        send(out, &collected).await?;
                        None
                    }
                    ToWorker::Finish => break true,
                    ToWorker::Plan(_) => bail!("a second plan"),
                };
                if let Some(rate) = rate {
                    // A step: the previous one's pacer was told to stop with it.
                    if let Some(previous) = pacer.take() {
                        join_pacer(previous).await?;
                    }
                    steps += 1;
                    let go = Instant::now();
                    *shared.schedules.lock().unwrap_or_else(|e| e.into_inner()) =
                        schedules(&shared.plan, &shared.members, &mine, rate);
                    *shared.step.lock().unwrap_or_else(|e| e.into_inner()) = Step {
                        id: steps,
                        go,
                        go_us: micros_now(),
                        rate,
                    };
                    cpu_at_go = crate::cpu::process_cpu();
                    stop_pacing = CancellationToken::new();
                    let publishers: Vec<_> = (0..mine.len())
                        .map(|slot| (shared.schedule(slot), shared.wakes[slot].clone()))
                        .filter(|(s, _)| s.rate > 0.0)
                        .collect();
                    if !publishers.is_empty() {
                        pacer = Some(
                            pace::spawn(go, publishers, stop_pacing.clone())
                                .context("starting the pacing thread")?,
                        );
                    }
                    phase_tx.send_replace(Phase::Running);
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
        join_pacer(pacer).await?;
    }
    if finished {
        let latency = protocol::encode(
            &*shared
                .latency
                .lock()
                .map_err(|_| anyhow::anyhow!("a poisoned histogram"))?,
        )?;
        let acks = protocol::encode(
            &*shared
                .acks
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
            acks,
            connect: connects,
            first_publish_us: if first == u64::MAX { 0 } else { first },
            last_delivery_us: shared.last_delivery_us.load(Ordering::Relaxed),
            cpu_seconds: used.0,
            publish_seconds: used.1,
        };
        send(out, &FromWorker::Report(Box::new(report))).await?;
    }
    Ok(())
}

/// Waits for a pacing thread told to stop (it looks at its token at least every few
/// milliseconds).
async fn join_pacer(pacer: std::thread::JoinHandle<()>) -> anyhow::Result<()> {
    tokio::time::timeout(CLOSE_TIMEOUT, tokio::task::spawn_blocking(|| pacer.join()))
        .await
        .context("the pacing thread did not stop in time")??
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))
}

/// Each of this worker's clients' publishing schedule at `rate` (over the whole run): its
/// publisher slots' share of the rate, and a phase from its first slot's place among all of
/// the run's slots, so the publishers of every worker take turns evenly rather than firing
/// together.
fn schedules(plan: &Plan, members: &[Member], mine: &[usize], rate: u64) -> Vec<Schedule> {
    let slots = plan.publisher_slots(members);
    let per_slot = if rate == 0 || slots == 0 {
        0.0
    } else {
        rate as f64 / slots as f64
    };
    let mut first = Vec::with_capacity(members.len());
    let mut k = 0;
    for m in members {
        first.push(k);
        k += m.publishes.len();
    }
    mine.iter()
        .map(|&i| {
            let publishes = match plan.publish {
                PublishMode::Clients | PublishMode::Firehose => members[i].publishes.len(),
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
