//! The load scenarios' coordinator: starts worker processes of this binary (its hidden
//! `worker` subcommand), each binding its sockets to its own source address 127.0.0.(2+k) (one
//! process holds at most RLIMIT_NOFILE sockets); they connect clients through the target's real
//! connect flow, publish, and report counters and HDR histograms, which the coordinator merges
//! into one [`Report`].
//!
//! The same client code drives channelmesh (RTM over WebSocket) and nats-server (NATS over
//! WebSocket); only the protocol adapters ([`crate::rtm`], [`crate::nats`]) differ.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::plan::{self, Plan, Scenario};
use crate::protocol::{self, Counters, FromWorker, ToWorker, WorkerReport};
use crate::report::{Report, StepReport};
use crate::rss;

/// Lines from the workers waiting for the coordinator.
const EVENT_QUEUE: usize = 1024;
/// Connecting may go this long without a single client more before the run gives up.
const CONNECT_STALL: Duration = Duration::from_secs(60);
/// How long a worker may take to answer an order.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// After publishing stopped: how long deliveries may pause before the rest count as lost...
const DRAIN_STALL: Duration = Duration::from_secs(3);
/// ...and the longest the drain may take at all.
const DRAIN_MAX: Duration = Duration::from_secs(60);
/// The idle moment between the last connect and the RSS reading.
const SETTLE: Duration = Duration::from_secs(2);

/// How a run goes besides its plan.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How long to publish (or churn, or hold).
    pub duration: Duration,
    /// Server processes whose summed RSS is read before and after connecting.
    pub server_pids: Vec<u32>,
    /// Show the progress bar even when stderr is not a terminal.
    pub progress: bool,
    /// Rate steps (messages/s over the whole run), each published for `step`, then settled
    /// for at most `settle`: empty for one run at the plan's rate for `duration`.
    pub rates: Vec<u64>,
    pub step: Duration,
    pub settle: Duration,
}

/// Runs `plan` over `processes` workers: starts them, drives them through connect, publish
/// (or churn, or hold) for `options.duration`, drain, and merges what they report.
pub async fn run(plan: Plan, processes: usize, options: &RunOptions) -> anyhow::Result<Report> {
    let scenario = plan.scenario;
    let show = options.progress || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if show {
        ProgressBar::with_draw_target(
            Some(plan.clients as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        )
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
            .map_err(|e| anyhow::anyhow!("the progress template: {e}"))?
            .progress_chars("=> "),
    );
    bar.set_prefix("connecting");

    let rss_before = rss::sum(&options.server_pids)?;
    let mut workers = Workers::start(&plan, processes).await?;

    // Connect.
    let mut receivers = vec![0u64; plan.channels];
    let mut span = (u64::MAX, 0u64);
    let mut ready = 0;
    let mut last = (0, Instant::now());
    while ready < processes {
        match workers.next(ANSWER_TIMEOUT).await? {
            (
                _,
                FromWorker::Ready {
                    receivers: r,
                    connect_started_us,
                    connect_finished_us,
                },
            ) => {
                for (total, n) in receivers.iter_mut().zip(r) {
                    *total += u64::from(n);
                }
                span = (
                    span.0.min(connect_started_us),
                    span.1.max(connect_finished_us),
                );
                ready += 1;
            }
            (_, FromWorker::Progress(_)) => {}
            (k, other) => bail!("worker {k} said {other:?} while connecting"),
        }
        let t = workers.totals();
        bar.set_position(t.connected + t.connect_failures);
        bar.set_message(format!("{} failed", t.connect_failures));
        if t.connected != last.0 {
            last = (t.connected, Instant::now());
        } else if last.1.elapsed() > CONNECT_STALL {
            bail!("connecting stalled at {} clients", t.connected);
        }
    }
    let connected = workers.totals();
    let connect_secs = (span.1.saturating_sub(span.0)) as f64 / 1e6;
    let rss_after = if options.server_pids.is_empty() {
        None
    } else {
        tokio::time::sleep(SETTLE).await;
        rss::sum(&options.server_pids)?
    };

    let stepped = if options.rates.is_empty() {
        None
    } else {
        Some(steps(&mut workers, &plan, options, &receivers, &bar).await?)
    };
    let (run_secs, expected) = match &stepped {
        Some(s) => (s.seconds, s.expected),
        None => single(&mut workers, &plan, options, &receivers, &bar).await?,
    };

    workers.broadcast(&ToWorker::Finish).await?;
    let mut reports: Vec<WorkerReport> = Vec::new();
    while reports.len() < processes {
        match workers.next(ANSWER_TIMEOUT).await? {
            (_, FromWorker::Report(r)) => reports.push(*r),
            (_, FromWorker::Progress(_)) => {}
            (k, other) => bail!("worker {k} said {other:?} while finishing"),
        }
    }
    workers.stop().await;
    bar.finish_and_clear();

    let mut latency = protocol::histogram()?;
    let mut acks = protocol::histogram()?;
    let mut connects = protocol::histogram()?;
    let mut totals = Counters::default();
    let (mut first, mut last_delivery) = (u64::MAX, 0);
    let (mut cpu_seconds, mut publish_seconds) = (0.0_f64, 0.0_f64);
    for r in &reports {
        cpu_seconds += r.cpu_seconds;
        publish_seconds = publish_seconds.max(r.publish_seconds);
        latency.add(protocol::decode(&r.latency)?)?;
        acks.add(protocol::decode(&r.acks)?)?;
        connects.add(protocol::decode(&r.connect)?)?;
        add(&mut totals, &r.counters);
        if r.first_publish_us > 0 {
            first = first.min(r.first_publish_us);
        }
        last_delivery = last_delivery.max(r.last_delivery_us);
    }
    // Rate steps: their histograms (each worker's were reset per step) and their publishing
    // time, without the settling between them.
    let seconds = match stepped {
        Some(ref s) => {
            latency = s.latency.clone();
            acks = s.acks.clone();
            run_secs
        }
        None if first < last_delivery => (last_delivery - first) as f64 / 1e6,
        None => run_secs,
    };
    let (steps, max_sustainable) = match stepped {
        Some(s) => {
            let best = s
                .steps
                .iter()
                .filter(|s| s.sustainable)
                .max_by_key(|s| s.rate);
            let max = best.map(|s| (s.rate, s.delivered_per_s));
            (s.steps, max)
        }
        None => (Vec::new(), None),
    };
    let per_s = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    // The firehose connection is not a client of the workload.
    let memberships: u64 = plan::members(&plan)
        .iter()
        .take(plan.clients)
        .map(|m| m.channels.len() as u64)
        .sum();
    let rss_per_connection = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected.connected > 0 => {
            Some((a as f64 - b as f64) / connected.connected as f64)
        }
        _ => None,
    };
    // The workers inherit this process's affinity (e.g. `taskset -c 1`).
    let loadgen_cores = crate::cpu::allowed_cpus().unwrap_or(1);
    let loadgen_share = crate::cpu::share(cpu_seconds, publish_seconds, loadgen_cores);
    Ok(Report {
        loadgen_cpu_cores: if publish_seconds > 0.0 {
            cpu_seconds / publish_seconds
        } else {
            0.0
        },
        loadgen_cores,
        loadgen_bound: loadgen_share > crate::cpu::BOUND_SHARE,
        scenario,
        target: plan.target,
        publish: plan.publish,
        processes,
        clients: plan.clients,
        connected: connected.connected,
        connect_failures: connected.connect_failures,
        channels: plan.channels,
        fanout: memberships as f64 / plan.channels.max(1) as f64,
        payload_bytes: plan.payload,
        rate: plan.rate,
        window: plan.window,
        connect_per_s: per_s(connected.connected, connect_secs),
        connect_p50_us: connects.value_at_quantile(0.50),
        connect_p99_us: connects.value_at_quantile(0.99),
        connect_max_us: connects.max(),
        seconds,
        // Open loop: what was sent (acknowledged: `acked`).
        published: if plan.open_loop {
            totals.sent
        } else {
            totals.published
        },
        published_per_s: per_s(
            if plan.open_loop {
                totals.sent
            } else {
                totals.published
            },
            run_secs,
        ),
        sent: totals.sent,
        acked: totals.published,
        open_loop: plan.open_loop,
        steps,
        max_sustainable_rate: max_sustainable.map(|m| m.0),
        max_sustainable_delivered_per_s: max_sustainable.map(|m| m.1),
        publish_errors: totals.publish_errors,
        unacked: totals.unacked,
        delivered: totals.delivered,
        delivered_per_s: per_s(totals.delivered, seconds),
        expected,
        lost: expected.saturating_sub(totals.delivered),
        disconnects: totals.disconnects,
        p50_us: latency.value_at_quantile(0.50),
        p99_us: latency.value_at_quantile(0.99),
        p999_us: latency.value_at_quantile(0.999),
        max_us: latency.max(),
        ack_p50_us: acks.value_at_quantile(0.50),
        ack_p99_us: acks.value_at_quantile(0.99),
        reconnects: totals.reconnects,
        reconnect_failures: totals.reconnect_failures,
        reconnects_per_s: per_s(totals.reconnects, run_secs),
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        rss_per_connection_bytes: rss_per_connection,
    })
}

/// One run at the plan's rate for `options.duration`, then a drain: the run's wall seconds
/// of publishing and the deliveries expected.
async fn single(
    workers: &mut Workers,
    plan: &Plan,
    options: &RunOptions,
    receivers: &[u64],
    bar: &ProgressBar,
) -> anyhow::Result<(f64, u64)> {
    let scenario = plan.scenario;
    // Run.
    let duration = options.duration;
    bar.set_prefix(match scenario {
        Scenario::Idle => "holding",
        Scenario::ConnectStorm => "churning",
        _ => "publishing",
    });
    bar.set_length(duration.as_millis() as u64);
    bar.set_position(0);
    workers.broadcast(&ToWorker::Go).await?;
    let started = Instant::now();
    let mut before = (workers.totals(), Instant::now());
    while started.elapsed() < duration {
        let left = duration.saturating_sub(started.elapsed());
        if let Some((k, e @ (FromWorker::Ready { .. } | FromWorker::Stopped { .. }))) =
            workers.next_within(left).await?
        {
            bail!("worker {k} said {e:?} while running");
        }
        bar.set_position(started.elapsed().as_millis() as u64);
        if before.1.elapsed() >= Duration::from_secs(1) {
            let now = workers.totals();
            let secs = before.1.elapsed().as_secs_f64();
            bar.set_message(match scenario {
                Scenario::ConnectStorm => format!(
                    "{:.0} reconnects/s",
                    (now.reconnects - before.0.reconnects) as f64 / secs
                ),
                _ => format!(
                    "{:.0} published/s, {:.0} delivered/s",
                    (now.published - before.0.published) as f64 / secs,
                    (now.delivered - before.0.delivered) as f64 / secs
                ),
            });
            before = (now, Instant::now());
        }
    }
    let run_secs = started.elapsed().as_secs_f64();
    let processes = workers.children.len();

    // Stop publishing; what was acknowledged decides what is expected.
    workers.broadcast(&ToWorker::Stop).await?;
    let mut published = vec![0u64; plan.channels];
    let mut stopped = 0;
    while stopped < processes {
        match workers.next(ANSWER_TIMEOUT).await? {
            (_, FromWorker::Stopped { published: p, .. }) => {
                for (total, n) in published.iter_mut().zip(p) {
                    *total += n;
                }
                stopped += 1;
            }
            (_, FromWorker::Progress(_)) => {}
            (k, other) => bail!("worker {k} said {other:?} while stopping"),
        }
    }
    let expected: u64 = published.iter().zip(receivers).map(|(p, r)| p * r).sum();

    // Drain: until everything arrived, or deliveries stop coming.
    bar.set_prefix("draining");
    bar.set_length(expected.max(1));
    let draining = Instant::now();
    let mut last = (workers.totals().delivered, Instant::now());
    while last.0 < expected && last.1.elapsed() < DRAIN_STALL && draining.elapsed() < DRAIN_MAX {
        workers.next_within(Duration::from_millis(300)).await?;
        let delivered = workers.totals().delivered;
        bar.set_position(delivered);
        if delivered != last.0 {
            last = (delivered, Instant::now());
        }
    }

    Ok((run_secs, expected))
}

/// What the rate steps measured, all of them.
struct Stepped {
    steps: Vec<StepReport>,
    /// Publishing wall seconds, all steps.
    seconds: f64,
    expected: u64,
    latency: Histogram<u64>,
    acks: Histogram<u64>,
}

/// Publishes each of `options.rates` in turn for `options.step`, settles after each (until
/// every expected delivery arrived, or `options.settle`), and reports each step. Stops early
/// after two steps in a row that failed badly.
async fn steps(
    workers: &mut Workers,
    plan: &Plan,
    options: &RunOptions,
    receivers: &[u64],
    bar: &ProgressBar,
) -> anyhow::Result<Stepped> {
    let processes = workers.children.len();
    let loadgen_cores = crate::cpu::allowed_cpus().unwrap_or(1);
    let mut out = Stepped {
        steps: Vec::new(),
        seconds: 0.0,
        expected: 0,
        latency: protocol::histogram()?,
        acks: protocol::histogram()?,
    };
    // Running totals at the end of the previous step.
    let mut before = Counters::default();
    let mut bad_in_a_row = 0;
    for (i, &rate) in options.rates.iter().enumerate() {
        bar.set_prefix(format!("{rate}/s"));
        bar.set_length(options.step.as_millis() as u64);
        bar.set_position(0);
        let server_before = crate::cpu::processes_cpu(&options.server_pids);
        workers.broadcast(&ToWorker::Step { rate }).await?;
        let started = Instant::now();
        while started.elapsed() < options.step {
            let left = options.step.saturating_sub(started.elapsed());
            if let Some((k, e @ (FromWorker::Ready { .. } | FromWorker::Stopped { .. }))) =
                workers.next_within(left).await?
            {
                bail!("worker {k} said {e:?} while running");
            }
            bar.set_position(started.elapsed().as_millis() as u64);
        }
        let server_after = crate::cpu::processes_cpu(&options.server_pids);
        let window = started.elapsed().as_secs_f64();
        workers.broadcast(&ToWorker::Stop).await?;
        let mut published = vec![0u64; plan.channels];
        let (mut delivered_at_stop, mut cpu_seconds, mut publish_seconds) = (0, 0.0, 0.0_f64);
        let mut stopped = 0;
        while stopped < processes {
            match workers.next(ANSWER_TIMEOUT).await? {
                (
                    _,
                    FromWorker::Stopped {
                        published: p,
                        delivered,
                        cpu_seconds: cpu,
                        publish_seconds: secs,
                    },
                ) => {
                    for (total, n) in published.iter_mut().zip(p) {
                        *total += n;
                    }
                    delivered_at_stop += delivered;
                    cpu_seconds += cpu;
                    publish_seconds = publish_seconds.max(secs);
                    stopped += 1;
                }
                (_, FromWorker::Progress(_)) => {}
                (k, other) => bail!("worker {k} said {other:?} while stopping"),
            }
        }
        // Everything sent since the run began (the workers count from the start).
        let expected: u64 = published.iter().zip(receivers).map(|(p, r)| p * r).sum();

        // Settle: until every expected delivery arrived, or the settle time is over.
        bar.set_prefix("settling");
        let settling = Instant::now();
        while workers.totals().delivered < expected && settling.elapsed() < options.settle {
            workers.next_within(Duration::from_millis(100)).await?;
        }
        workers.broadcast(&ToWorker::Collect).await?;
        let mut latency = protocol::histogram()?;
        let mut acks = protocol::histogram()?;
        let mut now = Counters::default();
        let mut collected = 0;
        while collected < processes {
            match workers.next(ANSWER_TIMEOUT).await? {
                (
                    _,
                    FromWorker::Collected {
                        latency: l,
                        acks: a,
                        counters,
                    },
                ) => {
                    latency.add(protocol::decode(&l)?)?;
                    acks.add(protocol::decode(&a)?)?;
                    add(&mut now, &counters);
                    collected += 1;
                }
                (_, FromWorker::Progress(_)) => {}
                (k, other) => bail!("worker {k} said {other:?} while collecting"),
            }
        }
        let per_s = |n: u64| if window > 0.0 { n as f64 / window } else { 0.0 };
        let sent = now.sent - before.sent;
        let delivered = now.delivered - before.delivered;
        let expected_here = expected - out.expected;
        let loadgen_cpu_cores = if publish_seconds > 0.0 {
            cpu_seconds / publish_seconds
        } else {
            0.0
        };
        let mut step = StepReport {
            rate,
            seconds: window,
            sent,
            sent_per_s: per_s(sent),
            acked: now.published - before.published,
            publish_errors: now.publish_errors - before.publish_errors,
            expected: expected_here,
            delivered,
            delivered_per_s: per_s(delivered_at_stop.saturating_sub(before.delivered)),
            lost: expected_here.saturating_sub(delivered),
            p50_us: latency.value_at_quantile(0.50),
            p99_us: latency.value_at_quantile(0.99),
            p999_us: latency.value_at_quantile(0.999),
            max_us: latency.max(),
            ack_p50_us: acks.value_at_quantile(0.50),
            ack_p99_us: acks.value_at_quantile(0.99),
            server_cpu_cores: match (server_before, server_after) {
                (Some(b), Some(a)) if window > 0.0 => {
                    Some(a.saturating_sub(b).as_secs_f64() / window)
                }
                _ => None,
            },
            loadgen_cpu_cores,
            loadgen_bound: crate::cpu::share(cpu_seconds, publish_seconds, loadgen_cores)
                > crate::cpu::BOUND_SHARE,
            kept_pace: false,
            sustainable: false,
        };
        step.judge();
        tracing::debug!(step = i, rate, ?step, "rate step");
        bad_in_a_row = if step.failed_badly() {
            bad_in_a_row + 1
        } else {
            0
        };
        out.seconds += window;
        out.expected = expected;
        out.latency.add(&latency)?;
        out.acks.add(&acks)?;
        out.steps.push(step);
        before = now;
        if bad_in_a_row >= 2 {
            break;
        }
    }
    Ok(out)
}

/// What a worker's stdout said, or that it ended.
enum Event {
    Line(FromWorker),
    Exited,
}

/// The worker processes.
struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    events: mpsc::Receiver<(usize, Event)>,
    /// Each worker's latest counters.
    latest: HashMap<usize, Counters>,
    /// Workers that sent their final report (and may exit).
    reported: HashSet<usize>,
}

impl Workers {
    /// Starts `processes` workers and hands each its plan.
    async fn start(plan: &Plan, processes: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this program")?;
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for k in 0..processes {
            let mut child = tokio::process::Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {k}"))?;
            let mut stdin = child.stdin.take().context("a worker's stdin")?;
            let stdout = child.stdout.take().context("a worker's stdout")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let event = match serde_json::from_str::<FromWorker>(&line) {
                        Ok(m) => Event::Line(m),
                        Err(e) => Event::Line(FromWorker::Failed {
                            error: format!("an unreadable line ({e}): {line}"),
                        }),
                    };
                    if tx.send((k, event)).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send((k, Event::Exited)).await;
            });
            let mut mine = plan.clone();
            mine.worker = k;
            mine.source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k as u8));
            write_line(&mut stdin, &ToWorker::Plan(Box::new(mine))).await?;
            children.push(child);
            stdins.push(stdin);
        }
        Ok(Self {
            children,
            stdins,
            events,
            latest: HashMap::new(),
            reported: HashSet::new(),
        })
    }

    async fn broadcast(&mut self, order: &ToWorker) -> anyhow::Result<()> {
        for stdin in &mut self.stdins {
            write_line(stdin, order).await?;
        }
        Ok(())
    }

    /// The next message from any worker, within `timeout`; progress is recorded on the way.
    async fn next(&mut self, timeout: Duration) -> anyhow::Result<(usize, FromWorker)> {
        self.next_within(timeout)
            .await?
            .with_context(|| format!("no word from the workers in {timeout:?}"))
    }

    /// Like [`Workers::next`], but None when `timeout` passes quietly.
    async fn next_within(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<Option<(usize, FromWorker)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(event) = tokio::time::timeout_at(deadline, self.events.recv()).await else {
                return Ok(None);
            };
            match event.context("every worker ended")? {
                // A worker exits once it has reported.
                (k, Event::Exited) if self.reported.contains(&k) => continue,
                (k, Event::Exited) => {
                    let status = match self.children.get_mut(k) {
                        Some(child) => tokio::time::timeout(Duration::from_secs(2), child.wait())
                            .await
                            .map_or("still running".to_string(), |s| format!("{s:?}")),
                        None => "unknown".to_string(),
                    };
                    bail!("worker {k} ended unexpectedly ({status})")
                }
                (k, Event::Line(FromWorker::Failed { error })) => bail!("worker {k}: {error}"),
                (k, Event::Line(message)) => {
                    match &message {
                        FromWorker::Progress(c) => {
                            self.latest.insert(k, c.clone());
                        }
                        FromWorker::Report(r) => {
                            self.latest.insert(k, r.counters.clone());
                            self.reported.insert(k);
                        }
                        _ => {}
                    }
                    return Ok(Some((k, message)));
                }
            }
        }
    }

    /// The workers' latest counters, added up.
    fn totals(&self) -> Counters {
        let mut t = Counters::default();
        for c in self.latest.values() {
            add(&mut t, c);
        }
        t
    }

    /// Closes the workers' stdin (they exit) and waits for them, killing the ones that linger.
    async fn stop(mut self) {
        self.stdins.clear();
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

fn add(total: &mut Counters, c: &Counters) {
    total.connected += c.connected;
    total.connect_failures += c.connect_failures;
    total.published += c.published;
    total.sent += c.sent;
    total.publish_errors += c.publish_errors;
    total.unacked += c.unacked;
    total.delivered += c.delivered;
    total.disconnects += c.disconnects;
    total.reconnects += c.reconnects;
    total.reconnect_failures += c.reconnect_failures;
}

async fn write_line(stdin: &mut ChildStdin, order: &ToWorker) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(order)?;
    line.push(b'\n');
    stdin
        .write_all(&line)
        .await
        .context("writing to a worker")?;
    stdin.flush().await?;
    Ok(())
}
