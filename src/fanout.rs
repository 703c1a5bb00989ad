//! `channelmesh bench fanout|chat|connect-storm|idle`: the load generator. A coordinator (this
//! module) starts worker processes of the same binary (`bench worker`), each binding its
//! sockets to its own source address 127.0.0.(2+k) (one process holds at most RLIMIT_NOFILE
//! sockets); they connect clients through the target's real connect flow, publish, and report
//! counters and HDR histograms, which the coordinator merges.
//!
//! The same client code drives channelmesh (RTM over WebSocket) and nats-server (NATS over
//! WebSocket); only the protocol adapters ([`rtm`], [`nats`]) differ.

mod nats;
mod pace;
pub mod plan;
pub mod protocol;
pub mod report;
mod rtm;
mod worker;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

pub use plan::{PublishMode, Scenario, Target};
pub use report::Report;
pub use worker::main as worker_main;

use plan::Plan;
use protocol::{Counters, FromWorker, ToWorker, WorkerReport};

/// A client's WebSocket.
pub(crate) type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Clients per worker process when `--processes` is not given (under the 20,000 open files a
/// process may hold, with room for the rest).
const CLIENTS_PER_PROCESS: usize = 15_000;
/// The dev mesh's gateways, us-east and eu-west.
const DEV_GATEWAYS: [&str; 2] = ["http://127.0.0.1:8080/api/", "http://127.0.0.1:8081/api/"];
/// Where `bench/compare.sh` puts nats-server's WebSocket listener.
const DEFAULT_NATS: &str = "ws://127.0.0.1:4223";
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

/// `bench fanout|chat|connect-storm|idle`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// The server under test.
    #[arg(long, value_enum, default_value = "channelmesh")]
    pub target: Target,
    /// Where clients connect (repeat to spread them): RTM base URLs for channelmesh (default:
    /// both dev gateways), WebSocket URLs for nats (default ws://127.0.0.1:4223).
    #[arg(long = "gateway")]
    pub gateways: Vec<String>,
    /// The admin server (with `--publish admin`).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub admin: String,
    /// Clients (default: fanout 1,000; chat 10,000; connect-storm 1,000; idle 10,000).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Channels (default: fanout 10; chat 10,000; connect-storm and idle 100).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Messages per second over the whole run; 0: as fast as the window allows.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// How long to publish (or churn, or hold).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// Who publishes: member clients over their WebSocket, or the admin API (channelmesh).
    #[arg(long, value_enum, default_value = "clients")]
    pub publish: PublishMode,
    /// Unacknowledged messages one publishing client may have outstanding (RTM: acks; NATS:
    /// PONGs to the PING after each burst).
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// connect-storm: the fraction of clients that reconnect per second.
    #[arg(long, default_value_t = 0.1)]
    pub churn: f64,
    /// Worker processes (default: one per 15,000 clients); worker k binds 127.0.0.(2+k).
    #[arg(long)]
    pub processes: Option<usize>,
    /// A server process whose RSS to read before and after connecting; repeatable.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Connects in progress at once, per worker.
    #[arg(long, default_value_t = 64)]
    pub connect_parallel: usize,
    /// Seeds the chat scenario's channel sizes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Show the progress bar even when stderr is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// The secret client tokens are signed with (channelmesh).
    #[arg(long, env = "CHANNELMESH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The admin API's bearer token (with `--publish admin`).
    #[arg(long, env = "CHANNELMESH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

/// Runs `scenario` and prints its report (a table, or JSON with `--json`).
pub async fn cli(scenario: Scenario, args: LoadArgs) -> anyhow::Result<()> {
    let json = args.json;
    let report = run(scenario, args).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Runs `scenario` with `args`: starts the workers, drives them through connect, publish,
/// drain, and merges what they report.
pub async fn run(scenario: Scenario, args: LoadArgs) -> anyhow::Result<Report> {
    let (plan, processes) = plan_for(scenario, &args)?;
    let show = args.progress || std::io::IsTerminal::is_terminal(&std::io::stderr());
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

    let rss_before = rss(&args.server_pids)?;
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
    let rss_after = if args.server_pids.is_empty() {
        None
    } else {
        tokio::time::sleep(SETTLE).await;
        rss(&args.server_pids)?
    };

    // Run.
    let duration = Duration::from_secs(args.seconds);
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

    // Stop publishing; what was acknowledged decides what is expected.
    workers.broadcast(&ToWorker::Stop).await?;
    let mut published = vec![0u64; plan.channels];
    let mut stopped = 0;
    while stopped < processes {
        match workers.next(ANSWER_TIMEOUT).await? {
            (_, FromWorker::Stopped { published: p }) => {
                for (total, n) in published.iter_mut().zip(p) {
                    *total += n;
                }
                stopped += 1;
            }
            (_, FromWorker::Progress(_)) => {}
            (k, other) => bail!("worker {k} said {other:?} while stopping"),
        }
    }
    let expected: u64 = published.iter().zip(&receivers).map(|(p, r)| p * r).sum();

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
    let mut connects = protocol::histogram()?;
    let mut totals = Counters::default();
    let (mut first, mut last_delivery) = (u64::MAX, 0);
    for r in &reports {
        latency.add(protocol::decode(&r.latency)?)?;
        connects.add(protocol::decode(&r.connect)?)?;
        add(&mut totals, &r.counters);
        if r.first_publish_us > 0 {
            first = first.min(r.first_publish_us);
        }
        last_delivery = last_delivery.max(r.last_delivery_us);
    }
    let seconds = if first < last_delivery {
        (last_delivery - first) as f64 / 1e6
    } else {
        run_secs
    };
    let per_s = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let memberships: u64 = plan::members(&plan)
        .iter()
        .map(|m| m.channels.len() as u64)
        .sum();
    let rss_per_connection = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected.connected > 0 => {
            Some((a as f64 - b as f64) / connected.connected as f64)
        }
        _ => None,
    };
    Ok(Report {
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
        published: totals.published,
        published_per_s: per_s(totals.published, run_secs),
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
        reconnects: totals.reconnects,
        reconnect_failures: totals.reconnect_failures,
        reconnects_per_s: per_s(totals.reconnects, run_secs),
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        rss_per_connection_bytes: rss_per_connection,
    })
}

/// The plan every worker gets (its index and source address filled in per worker), and how
/// many workers.
fn plan_for(scenario: Scenario, args: &LoadArgs) -> anyhow::Result<(Plan, usize)> {
    let (clients, channels) = match scenario {
        Scenario::Fanout => (1000, 10),
        Scenario::Chat => (10_000, 10_000),
        Scenario::ConnectStorm => (1000, 100),
        Scenario::Idle => (10_000, 100),
    };
    let clients = args.clients.unwrap_or(clients);
    let channels = args.channels.unwrap_or(channels);
    anyhow::ensure!(clients > 0, "--clients must be at least 1");
    anyhow::ensure!(channels > 0, "--channels must be at least 1");
    anyhow::ensure!(args.window > 0, "--window must be at least 1");
    let processes = args
        .processes
        .unwrap_or(clients.div_ceil(CLIENTS_PER_PROCESS))
        .clamp(1, clients);
    anyhow::ensure!(
        processes <= 250,
        "at most 250 processes (source addresses 127.0.0.2-251)"
    );
    if scenario == Scenario::ConnectStorm {
        anyhow::ensure!(
            args.churn > 0.0 && args.churn.is_finite(),
            "--churn must be a positive fraction per second"
        );
    }
    let gateways = if args.gateways.is_empty() {
        match args.target {
            Target::Channelmesh => DEV_GATEWAYS.iter().map(|g| g.to_string()).collect(),
            Target::Nats => vec![DEFAULT_NATS.to_string()],
        }
    } else {
        args.gateways.clone()
    };
    let publishing = matches!(scenario, Scenario::Fanout | Scenario::Chat);
    let (mut jwt_secret, mut admin_token) = (String::new(), String::new());
    if args.target == Target::Channelmesh {
        jwt_secret = args
            .jwt_secret
            .clone()
            .filter(|s| !s.is_empty())
            .context("CHANNELMESH_JWT_SECRET must be set (`channelmesh dev` prints it)")?;
        if publishing && args.publish == PublishMode::Admin {
            admin_token = args
                .admin_token
                .clone()
                .filter(|s| !s.is_empty())
                .context("CHANNELMESH_ADMIN_TOKEN must be set for --publish admin")?;
        }
    } else if publishing && args.publish == PublishMode::Admin {
        bail!("nats-server has no admin API: use --publish clients");
    }
    let plan = Plan {
        scenario,
        target: args.target,
        // Only the publishing scenarios publish.
        publish: if publishing {
            args.publish
        } else {
            PublishMode::Clients
        },
        gateways,
        admin: args.admin.clone(),
        admin_token,
        jwt_secret,
        clients,
        channels,
        payload: args.payload,
        rate: if publishing { args.rate } else { 0 },
        window: args.window,
        churn: args.churn,
        seed: args.seed,
        run: micros_now(),
        processes,
        worker: 0,
        source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        connect_parallel: args.connect_parallel.max(1),
    };
    Ok((plan, processes))
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
                .args(["bench", "worker"])
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

/// The summed VmRSS of `pids`, in bytes; None without pids.
fn rss(pids: &[u32]) -> anyhow::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = 0;
    for pid in pids {
        total += crate::store_bench::rss_of(&pid.to_string())?;
    }
    Ok(Some(total))
}

/// Unix time in microseconds: the publish timestamp messages carry (one clock, one machine).
pub(crate) fn micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The publish time at the start of a message text after its leading `b`: digits up to `:`.
pub(crate) fn sent_at(text: &[u8]) -> Option<u64> {
    let end = text.iter().position(|&b| b == b':')?;
    if end == 0 {
        return None;
    }
    // By hand rather than through `str::parse`: every receiver reads every message.
    text[..end].iter().try_fold(0u64, |n, &b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// The clients' WebSocket settings: a 4 KiB read buffer instead of tungstenite's 128 KiB, so
/// tens of thousands of idle clients fit in a few processes (messages here are small), and
/// because tungstenite zeroes the free part of the buffer before every read: with 16 KiB that
/// memset was 7% of a worker's time at 650,000 deliveries/s. A larger frame (a NATS batch)
/// still arrives whole; it takes a few more reads.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4 * 1024)
}

/// Opens a WebSocket to `url` from `source` (bound before connecting, so each worker uses its
/// own address and port range).
pub(crate) async fn dial(url: &str, source: IpAddr) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::http::Uri;
    let uri: Uri = url
        .parse()
        .with_context(|| format!("a WebSocket URL: {url}"))?;
    let host = uri.host().with_context(|| format!("no host in {url}"))?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .with_context(|| format!("no address for {host} of the source's family"))?;
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // Ports in TIME_WAIT from closed clients (connect-storm) may be bound again.
    socket.set_reuseaddr(true)?;
    socket.bind((source, 0).into())?;
    let stream = tokio::time::timeout(Duration::from_secs(20), socket.connect(addr))
        .await
        .context("TCP connect timed out")?
        .with_context(|| format!("connecting to {addr} from {source}"))?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())),
    )
    .await
    .context("WebSocket handshake timed out")??;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    #[test]
    fn publish_times_are_read_from_the_text() {
        assert_eq!(
            sent_at(b"1700000000123456:7:xx"),
            Some(1_700_000_000_123_456)
        );
        assert_eq!(sent_at(b"12x:7"), None);
        assert_eq!(sent_at(b"123"), None);
        assert_eq!(sent_at(b":7"), None);
        assert_eq!(sent_at(b"99999999999999999999999:7"), None);
    }

    #[test]
    fn merged_histograms_give_exact_percentiles() {
        let mut a: Histogram<u64> = protocol::histogram().unwrap();
        let mut b: Histogram<u64> = protocol::histogram().unwrap();
        let mut all: Histogram<u64> = protocol::histogram().unwrap();
        for v in 1..=1000u64 {
            let h = if v % 3 == 0 { &mut a } else { &mut b };
            h.record(v * 7).unwrap();
            all.record(v * 7).unwrap();
        }
        let mut merged = protocol::decode(&protocol::encode(&a).unwrap()).unwrap();
        merged
            .add(protocol::decode(&protocol::encode(&b).unwrap()).unwrap())
            .unwrap();
        for q in [0.5, 0.99, 0.999] {
            assert_eq!(merged.value_at_quantile(q), all.value_at_quantile(q));
        }
    }

    #[test]
    fn bad_combinations_are_refused_before_anything_starts() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: LoadArgs,
        }
        let args = |extra: &[&str]| {
            let mut argv = vec!["bench"];
            argv.extend_from_slice(extra);
            Cli::parse_from(argv).args
        };
        let nats_admin = args(&["--target", "nats", "--publish", "admin"]);
        assert!(plan_for(Scenario::Fanout, &nats_admin).is_err());
        assert!(
            plan_for(
                Scenario::Fanout,
                &args(&["--target", "nats", "--clients", "0"])
            )
            .is_err()
        );
        let storm = args(&["--target", "nats", "--churn", "0"]);
        assert!(plan_for(Scenario::ConnectStorm, &storm).is_err());
        let (plan, processes) = plan_for(
            Scenario::Idle,
            &args(&["--target", "nats", "--clients", "40000"]),
        )
        .unwrap();
        assert_eq!((processes, plan.rate), (3, 0));
    }
}
