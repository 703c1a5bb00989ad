//! `scale`: many idle clients on one box, then one message on their team's channel. Worker
//! processes (each under the 20,000-open-files limit, each from its own 127.0.0.x source
//! address) connect CLIENTS clients of one team through the real connect flow (`rtm.connect`,
//! then the WebSocket) and hold them with as little memory as a client can: the WebSocket is
//! upgraded by hand over a `TcpStream` and read with [`Held`], which keeps no buffer of its own
//! while the socket is idle. Once all are connected the coordinator measures memory (the
//! servers' RSS, the kernel's slab and TCP pages, the workers' RSS), posts one message to the
//! team's channel through the admin API (`PostMessage`) stamped with its send time, and reports
//! how many clients received it and when the first and the last did.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use memchr::memmem::Finder;
use mesh_core::{Identity, TeamId, TokenKey, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::client::Admin;
use crate::clock::{micros_now, unix_now};
use crate::rss;

/// Env var: the HS256 secret client tokens are signed with.
const ENV_JWT_SECRET: &str = "CHANNELMESH_JWT_SECRET";
/// Env var: the admin API's bearer token.
const ENV_ADMIN_TOKEN: &str = "CHANNELMESH_ADMIN_TOKEN";
/// How long each step of one client's connect (the HTTP call, the TCP connect, the upgrade,
/// the hello) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per client: a refused or timed-out connect is tried again (counted as a retry)
/// after a pause, and counts as failed after the last.
const ATTEMPTS: usize = 3;
/// How often a worker reports its progress while connecting.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// The largest upgrade response header accepted.
const MAX_HEADER: usize = 4096;
/// Lines from the workers the coordinator has not read yet.
const EVENT_QUEUE: usize = 1024;
/// Clients per source address. `bind` to port 0 takes the even ports of the ephemeral range
/// first (14,116 of 32768-60999) and only then searches the odd ones, walking every bound port
/// on the way: past ~14,000 clients on one address each connect costs the kernel a scan of the
/// range (the box's CPU went to `inet_bind2_bucket_match_addr_any`). A worker spreads its
/// clients over enough addresses to stay under that.
const CLIENTS_PER_SOURCE: usize = 10_000;
/// The user the team message is posted as.
const POSTER: &str = "USCALEPOSTER";

/// `scale`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// RTM base URL of a gateway (repeatable): worker k connects through gateway k mod N.
    #[arg(long = "gateway", required = true)]
    gateways: Vec<String>,
    /// Clients to connect, over all workers.
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// Worker processes (each from its own source address 127.0.0.(SOURCE_FROM + k)); default:
    /// one per gateway, and at least one per 18,000 clients.
    #[arg(long)]
    processes: Option<usize>,
    /// The last octet of the first worker's source address.
    #[arg(long, default_value_t = 2)]
    source_from: u8,
    /// Connects in flight per worker.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connects started per second over all workers, evenly paced (0: as fast as they go). A
    /// box whose cores are all busy connecting starves the ring's heartbeats (a channel server
    /// misses its 400 ms lease and the ring moves its slots): pace the connects below that.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// The clients' team: every connection follows the team's channel, which the message goes to.
    #[arg(long, default_value = "TSCALE")]
    team: String,
    /// Admin server address (its public API, plaintext "host:port" or "https://host:port").
    #[arg(long, default_value = "127.0.0.1:50051")]
    admin: String,
    /// A gateway process whose RSS is measured (repeatable).
    #[arg(long = "gateway-pid")]
    gateway_pids: Vec<u32>,
    /// Another server process whose RSS is measured (repeatable): ring manager, channel,
    /// presence and admin servers.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Seconds connecting may take, over all workers.
    #[arg(long, default_value_t = 900)]
    connect_timeout_secs: u64,
    /// Seconds the clients may take to receive the message.
    #[arg(long, default_value_t = 60)]
    deliver_timeout_secs: u64,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

/// A `scale` worker's flags (the coordinator starts it; orders on stdin).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    gateway: String,
    /// Its source address 127.0.0.X (the rtm.connect calls come from it).
    #[arg(long)]
    source: Ipv4Addr,
    /// How many source addresses its WebSockets come from: 127.S.0.X for S in 0..SOURCES.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Its first client's number (user `U<number>`).
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    team: String,
    /// What the team message's text holds: a client that reads it has received the message.
    #[arg(long)]
    marker: String,
    #[arg(long)]
    concurrency: usize,
    /// Connects started per second by this worker (0: unpaced).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

/// A line from a worker to the coordinator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum FromWorker {
    Progress {
        connected: usize,
        failed: usize,
    },
    Connected {
        connected: usize,
        failed: usize,
        retries: usize,
        /// The first few distinct errors.
        errors: Vec<String>,
        /// Its own RSS before connecting and once connected, bytes.
        rss_before: u64,
        rss_after: u64,
    },
    Received {
        /// Unix microseconds at which each client that received the message read it.
        times_us: Vec<u64>,
        /// Connections the gateway closed (or that failed) since they connected.
        closed: usize,
    },
}

/// Runs a scale test and prints its report.
pub async fn main(args: Args) -> anyhow::Result<()> {
    let admin_token = required_env(ENV_ADMIN_TOKEN)?;
    required_env(ENV_JWT_SECRET)?;
    let report = run(&args, &admin_token).await?;
    print_table(&report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// A required secret from the environment.
fn required_env(name: &str) -> anyhow::Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => bail!("{name} must be set (only `channelmesh dev` generates it)"),
    }
}

/// Memory readings of the box and the servers at one moment.
#[derive(Debug, Clone, Default, Serialize)]
struct Memory {
    /// Summed RSS of the gateway processes, bytes.
    gateways_rss: u64,
    /// Summed RSS of the other server processes, bytes.
    servers_rss: u64,
    /// /proc/meminfo, bytes.
    mem_available: u64,
    slab: u64,
    slab_unreclaimable: u64,
    page_tables: u64,
    /// /proc/net/sockstat: TCP sockets in use and the pages their buffers hold (as bytes).
    tcp_inuse: u64,
    tcp_mem: u64,
}

fn memory(args: &Args) -> anyhow::Result<Memory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    let sockstat =
        std::fs::read_to_string("/proc/net/sockstat").context("reading /proc/net/sockstat")?;
    let tcp = |name: &str| sockstat_field(&sockstat, name);
    Ok(Memory {
        gateways_rss: rss::sum(&args.gateway_pids)?.unwrap_or(0),
        servers_rss: rss::sum(&args.server_pids)?.unwrap_or(0),
        mem_available: field("MemAvailable"),
        slab: field("Slab"),
        slab_unreclaimable: field("SUnreclaim"),
        page_tables: field("PageTables"),
        tcp_inuse: tcp("inuse"),
        tcp_mem: tcp("mem") * page_size(),
    })
}

/// A field of the `TCP:` line of /proc/net/sockstat (`TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1`).
fn sockstat_field(sockstat: &str, name: &str) -> u64 {
    let Some(line) = sockstat.lines().find(|l| l.starts_with("TCP:")) else {
        return 0;
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == name)
        .and_then(|i| words.get(i + 1)?.parse().ok())
        .unwrap_or(0)
}

/// The kernel's page size (sockstat's `mem` counts pages): 4 KiB on the machines this runs on
/// (x86-64, and arm64 as distributions build it).
fn page_size() -> u64 {
    4096
}

/// What `scale` reports.
#[derive(Debug, Clone, Serialize)]
struct Report {
    clients: usize,
    gateways: usize,
    processes: usize,
    connected: usize,
    failed: usize,
    retries: usize,
    errors: Vec<String>,
    connect_secs: f64,
    connect_per_s: f64,
    /// Connections the gateways closed between connecting and the message.
    closed: usize,
    before: Memory,
    after: Memory,
    /// Gateways' RSS growth per connection, bytes.
    gateway_bytes_per_conn: f64,
    /// The other servers' RSS growth per connection, bytes.
    servers_bytes_per_conn: f64,
    /// Slab + TCP buffer pages growth per connection, both ends of the loopback connection.
    kernel_bytes_per_conn: f64,
    /// Half of that: the server's end (the two ends are the same kind of socket).
    kernel_bytes_per_server_socket: f64,
    slab_bytes_per_conn: f64,
    tcp_mem_bytes_per_conn: f64,
    /// The workers' RSS once connected, over the clients; and their RSS before connecting.
    loadgen_rss: u64,
    loadgen_rss_before: u64,
    loadgen_bytes_per_client: f64,
    /// The team message.
    post_rpc_ms: f64,
    received: usize,
    missing: usize,
    deliver_first_ms: f64,
    deliver_p50_ms: f64,
    deliver_p99_ms: f64,
    deliver_last_ms: f64,
}

/// One worker as the coordinator drives it.
struct Worker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
}

async fn run(args: &Args, admin_token: &str) -> anyhow::Result<Report> {
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    let processes = args
        .processes
        .unwrap_or_else(|| args.gateways.len().max(args.clients.div_ceil(18_000)))
        .clamp(1, args.clients);
    anyhow::ensure!(
        usize::from(args.source_from) + processes <= 255,
        "{processes} workers do not fit in 127.0.0.{}..254",
        args.source_from
    );
    let marker = format!("scale{}", micros_now());
    let before = memory(args)?;
    let exe = std::env::current_exe().context("finding this program")?;
    let (tx, mut events) = mpsc::channel::<(usize, FromWorker)>(EVENT_QUEUE);
    let mut workers = Vec::new();
    let mut first = 0;
    let started = Instant::now();
    for k in 0..processes {
        let count = args.clients / processes + usize::from(k < args.clients % processes);
        let source = Ipv4Addr::new(127, 0, 0, args.source_from + k as u8);
        let mut child = tokio::process::Command::new(&exe)
            .arg("scale-worker")
            .args(["--gateway", &args.gateways[k % args.gateways.len()]])
            .args(["--source", &source.to_string()])
            .args([
                "--sources",
                &count.div_ceil(CLIENTS_PER_SOURCE).max(1).to_string(),
            ])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--team", &args.team, "--marker", &marker])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args([
                "--rate",
                &(f64::from(args.rate) / processes as f64).to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {k}"))?;
        first += count;
        let stdin = child.stdin.take().context("a worker's stdin")?;
        let stdout = child.stdout.take().context("a worker's stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<FromWorker>(&line) {
                    Ok(m) => {
                        if tx.send((k, m)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => eprintln!("worker {k}: an unreadable line ({e}): {line}"),
                }
            }
        });
        workers.push(Worker { child, stdin });
    }
    drop(tx);

    // Connecting: progress every few seconds, until every worker says it is done.
    let mut progress = vec![(0usize, 0usize); processes];
    let mut done: Vec<Option<FromWorker>> = (0..processes).map(|_| None).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.connect_timeout_secs);
    let mut shown = Instant::now();
    while done.iter().any(Option::is_none) {
        let (k, line) = tokio::time::timeout_at(deadline, events.recv())
            .await
            .context("the workers did not finish connecting in time")?
            .context("every worker exited before connecting")?;
        match line {
            FromWorker::Progress { connected, failed } => progress[k] = (connected, failed),
            m @ FromWorker::Connected { .. } => done[k] = Some(m),
            FromWorker::Received { .. } => bail!("worker {k} reported a message too early"),
        }
        if shown.elapsed() >= Duration::from_secs(5) {
            shown = Instant::now();
            let (c, f) = progress
                .iter()
                .fold((0, 0), |(c, f), (a, b)| (c + a, f + b));
            eprintln!(
                "  {:>6.1} s  {c} connected, {f} failed",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let (mut connected, mut failed, mut retries) = (0, 0, 0);
    let (mut loadgen_rss, mut loadgen_rss_before) = (0, 0);
    let mut errors: Vec<String> = Vec::new();
    for m in done.into_iter().flatten() {
        if let FromWorker::Connected {
            connected: c,
            failed: f,
            retries: r,
            errors: e,
            rss_before,
            rss_after,
        } = m
        {
            connected += c;
            failed += f;
            retries += r;
            loadgen_rss += rss_after;
            loadgen_rss_before += rss_before;
            for e in e {
                if errors.len() < 5 && !errors.contains(&e) {
                    errors.push(e);
                }
            }
        }
    }
    let after = memory(args)?;
    eprintln!(
        "  {connected} connected in {connect_secs:.1} s; posting to {}",
        args.team
    );

    // The message, stamped with its send time.
    let mut admin = Admin::connect(&args.admin, admin_token).await?;
    let sent_us = micros_now();
    admin
        .post(args.team.clone(), POSTER, format!("{marker} {sent_us}"))
        .await
        .context("posting the team message")?;
    let post_rpc_ms = (micros_now() - sent_us) as f64 / 1000.0;
    let wait = format!("wait {}\n", args.deliver_timeout_secs * 1000);
    for w in &mut workers {
        w.stdin.write_all(wait.as_bytes()).await?;
    }
    let mut times = Vec::with_capacity(connected);
    let mut closed = 0;
    let mut answered = 0;
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(args.deliver_timeout_secs + 30);
    while answered < processes {
        let (k, line) = tokio::time::timeout_at(deadline, events.recv())
            .await
            .context("the workers did not report the message in time")?
            .context("a worker exited before reporting the message")?;
        match line {
            FromWorker::Received {
                times_us,
                closed: c,
            } => {
                times.extend(times_us.iter().map(|t| t.saturating_sub(sent_us)));
                closed += c;
                answered += 1;
            }
            other => bail!("worker {k} sent {other:?} while the message was out"),
        }
    }
    // Closing stdin ends each worker, and with it its clients.
    for w in workers {
        drop(w.stdin);
        let mut child = w.child;
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    times.sort_unstable();
    let ms = |q: f64| {
        times
            .get(((times.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    let per = |grown: u64, shrunk: u64| {
        if connected == 0 {
            0.0
        } else {
            grown.saturating_sub(shrunk) as f64 / connected as f64
        }
    };
    let kernel = per(after.slab + after.tcp_mem, before.slab + before.tcp_mem);
    Ok(Report {
        clients: args.clients,
        gateways: args.gateways.len(),
        processes,
        connected,
        failed,
        retries,
        errors,
        connect_secs,
        connect_per_s: connected as f64 / connect_secs.max(1e-9),
        closed,
        gateway_bytes_per_conn: per(after.gateways_rss, before.gateways_rss),
        servers_bytes_per_conn: per(after.servers_rss, before.servers_rss),
        kernel_bytes_per_conn: kernel,
        kernel_bytes_per_server_socket: kernel / 2.0,
        slab_bytes_per_conn: per(after.slab, before.slab),
        tcp_mem_bytes_per_conn: per(after.tcp_mem, before.tcp_mem),
        loadgen_rss,
        loadgen_rss_before,
        loadgen_bytes_per_client: per(loadgen_rss, loadgen_rss_before),
        before,
        after,
        post_rpc_ms,
        received: times.len(),
        missing: connected.saturating_sub(times.len()),
        deliver_first_ms: ms(0.0),
        deliver_p50_ms: ms(0.5),
        deliver_p99_ms: ms(0.99),
        deliver_last_ms: ms(1.0),
    })
}

fn print_table(r: &Report) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "scale: {} clients over {} gateways from {} worker processes",
        r.clients, r.gateways, r.processes
    );
    eprintln!(
        "  connected        {:>10}  ({} failed, {} retries) in {:.1} s: {:.0}/s",
        r.connected, r.failed, r.retries, r.connect_secs, r.connect_per_s
    );
    for e in &r.errors {
        eprintln!("    error: {e}");
    }
    eprintln!(
        "  gateways RSS     {:>10.1} MiB -> {:.1} MiB: {:.0} B per connection",
        mib(r.before.gateways_rss),
        mib(r.after.gateways_rss),
        r.gateway_bytes_per_conn
    );
    eprintln!(
        "  other servers    {:>10.1} MiB -> {:.1} MiB: {:.0} B per connection",
        mib(r.before.servers_rss),
        mib(r.after.servers_rss),
        r.servers_bytes_per_conn
    );
    eprintln!(
        "  kernel           {:>10.0} B per connection (slab {:.0} + TCP buffers {:.0}; both \
         ends of loopback: {:.0} B per server socket)",
        r.kernel_bytes_per_conn,
        r.slab_bytes_per_conn,
        r.tcp_mem_bytes_per_conn,
        r.kernel_bytes_per_server_socket
    );
    eprintln!(
        "  load generator   {:>10.1} MiB -> {:.1} MiB: {:.0} B per client",
        mib(r.loadgen_rss_before),
        mib(r.loadgen_rss),
        r.loadgen_bytes_per_client
    );
    eprintln!(
        "  team message     {:>10} of {} received ({} missing, {} closed before); PostMessage \
         {:.1} ms",
        r.received, r.connected, r.missing, r.closed, r.post_rpc_ms
    );
    eprintln!(
        "  delivery         first {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms",
        r.deliver_first_ms, r.deliver_p50_ms, r.deliver_p99_ms, r.deliver_last_ms
    );
}

/// What a worker shares with its clients' tasks.
struct Shared {
    marker: Finder<'static>,
    /// When each client read the message (unix microseconds).
    times: Mutex<Vec<u64>>,
    closed: AtomicUsize,
}

/// A `scale` worker: connects its clients, reports, holds them; on `wait MS` reports who
/// received the message within MS; ends at the end of stdin.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let jwt_secret = required_env(ENV_JWT_SECRET)?;
    let key = TokenKey::hs256(jwt_secret.as_bytes())?;
    let team = TeamId::new(&args.team)?;
    let rss_before = rss::own()?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::V4(args.source))
        .pool_max_idle_per_host(args.concurrency)
        .timeout(STEP_TIMEOUT)
        .build()?;
    let shared = Arc::new(Shared {
        marker: Finder::new(args.marker.as_bytes()).into_owned(),
        times: Mutex::new(Vec::with_capacity(args.count)),
        closed: AtomicUsize::new(0),
    });
    let progress = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let reporter = {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let line = FromWorker::Progress {
                    connected: progress.0.load(Ordering::Relaxed),
                    failed: progress.1.load(Ordering::Relaxed),
                };
                if let Ok(line) = serde_json::to_string(&line) {
                    println!("{line}");
                }
            }
        })
    };
    // Orders from the coordinator; the end of stdin (the coordinator gone) ends this worker
    // at any point, connecting or not.
    let (order_tx, mut orders) = mpsc::channel::<String>(4);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if order_tx.send(line).await.is_err() {
                return;
            }
        }
        std::process::exit(0);
    });
    let mut retries = 0;
    let mut errors: Vec<String> = Vec::new();
    let paced_from = tokio::time::Instant::now();
    let mut attempts = futures::stream::iter(args.first..args.first + args.count)
        .map(|i| {
            let (http, key, team, args) = (&http, &key, &team, &args);
            // Client n of this worker starts n / rate seconds in.
            let start = (args.rate > 0.0)
                .then(|| paced_from + Duration::from_secs_f64((i - args.first) as f64 / args.rate));
            async move {
                if let Some(start) = start {
                    tokio::time::sleep_until(start).await;
                }
                let mut tries = 0;
                loop {
                    tries += 1;
                    match connect(http, &args.gateway, source_of(args, i), key, team, i).await {
                        Ok(held) => return (tries, Ok(held)),
                        Err(e) if tries >= ATTEMPTS => return (tries, Err(e)),
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                }
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    while let Some((tries, outcome)) = attempts.next().await {
        retries += tries - 1;
        match outcome {
            Ok(held) => {
                progress.0.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(held.hold(shared.clone()));
            }
            Err(e) => {
                progress.1.fetch_add(1, Ordering::Relaxed);
                let e = format!("{e:#}");
                if errors.len() < 3 && !errors.contains(&e) {
                    errors.push(e);
                }
            }
        }
    }
    drop(attempts);
    reporter.abort();
    let connected = progress.0.load(Ordering::Relaxed);
    let line = FromWorker::Connected {
        connected,
        failed: progress.1.load(Ordering::Relaxed),
        retries,
        errors,
        rss_before,
        rss_after: rss::own()?,
    };
    println!("{}", serde_json::to_string(&line)?);
    while let Some(order) = orders.recv().await {
        let Some(ms) = order.strip_prefix("wait ").and_then(|m| m.parse().ok()) else {
            bail!("an order a scale worker does not know: {order}");
        };
        let deadline = Instant::now() + Duration::from_millis(ms);
        loop {
            let received = shared.times.lock().map(|t| t.len()).unwrap_or(0);
            let closed = shared.closed.load(Ordering::Relaxed);
            if received + closed >= connected || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let times_us = shared
            .times
            .lock()
            .map(|t| t.clone())
            .map_err(|_| anyhow::anyhow!("a client task panicked"))?;
        let line = FromWorker::Received {
            times_us,
            closed: shared.closed.load(Ordering::Relaxed),
        };
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}

/// The source address of the worker's client number `i`: 127.S.0.X, S spreading the clients
/// over `--sources` addresses.
fn source_of(args: &WorkerArgs, i: usize) -> IpAddr {
    let s = (i - args.first) % usize::from(args.sources.max(1));
    let [a, _, c, d] = args.source.octets();
    IpAddr::V4(Ipv4Addr::new(a, s as u8, c, d))
}

/// Connects client number `i` of `team` through the gateway at base URL `gateway`: a token for
/// user `U<i>`, `rtm.connect`, then the WebSocket from `source`, up to its `hello`.
async fn connect(
    http: &reqwest::Client,
    gateway: &str,
    source: IpAddr,
    key: &TokenKey,
    team: &TeamId,
    i: usize,
) -> anyhow::Result<Held> {
    let identity = Identity {
        user: UserId::new(&format!("U{i}"))?,
        team: team.clone(),
        name: None,
        // The user's own channel and the team's follow from the identity.
        channels: Vec::new(),
        expires_at: unix_now() + 24 * 3600,
        jti: None,
    };
    let token = key.mint(&identity, unix_now())?;
    let reply: Value = http
        .post(format!("{gateway}rtm.connect"))
        .bearer_auth(&token)
        .send()
        .await
        .context("calling rtm.connect")?
        .json()
        .await
        .context("reading rtm.connect's answer")?;
    let url = reply["url"]
        .as_str()
        .with_context(|| format!("rtm.connect answered {reply}"))?;
    tokio::time::timeout(STEP_TIMEOUT, Held::open(url, source))
        .await
        .context("the WebSocket was not open in time")?
}

/// One held client: its socket and the bytes of a frame not yet whole (empty, and without an
/// allocation, while the client is idle).
struct Held {
    stream: TcpStream,
    pending: Vec<u8>,
}

/// What a server frame at the start of a buffer is.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    opcode: u8,
    /// Where its payload starts and ends.
    payload: std::ops::Range<usize>,
}

/// The frame at the start of `buf`, if all of it is there.
fn frame(buf: &[u8]) -> Option<Frame> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, header) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let start: usize = header + if masked { 4 } else { 0 };
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    if buf.len() < end {
        return None;
    }
    Some(Frame {
        opcode: b0 & 0x0f,
        payload: start..end,
    })
}

/// The frames of `buf` that are whole: calls `each` with each frame's opcode and payload;
/// returns how many bytes they took.
fn frames(buf: &[u8], mut each: impl FnMut(u8, &[u8])) -> usize {
    let mut at = 0;
    while let Some(f) = frame(&buf[at..]) {
        each(f.opcode, &buf[at + f.payload.start..at + f.payload.end]);
        at += f.payload.end;
    }
    at
}

/// A client's masked pong echoing `payload` (a control frame's payload is at most 125 bytes);
/// the mask key is zero, which leaves the payload as it is.
fn pong(payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(125);
    let mut f = Vec::with_capacity(6 + len);
    f.extend_from_slice(&[0x8a, 0x80 | len as u8, 0, 0, 0, 0]);
    f.extend_from_slice(&payload[..len]);
    f
}

thread_local! {
    /// Where a worker thread reads sockets into: one buffer per thread, not per client.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
}

impl Held {
    /// Opens the WebSocket at `url` (ws://IP:PORT/PATH) from `source` with a hand-written
    /// upgrade, and reads frames up to the gateway's `hello`.
    async fn open(url: &str, source: IpAddr) -> anyhow::Result<Held> {
        let rest = url
            .strip_prefix("ws://")
            .with_context(|| format!("a plain ws:// URL: {url}"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let addr: SocketAddr = match authority.parse() {
            Ok(a) => a,
            Err(_) => tokio::net::lookup_host(authority)
                .await?
                .find(|a| a.is_ipv4() == source.is_ipv4())
                .with_context(|| format!("no address for {authority}"))?,
        };
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // An ephemeral port of the source address: a worker holds fewer clients than the
        // 28,000 ports of the range (32768-60999).
        socket.bind(SocketAddr::new(source, 0))?;
        let mut stream = socket
            .connect(addr)
            .await
            .with_context(|| format!("connecting to {addr} from {source}"))?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET /{path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        let end = loop {
            if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_HEADER {
                bail!("an upgrade response header over {MAX_HEADER} bytes");
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("the gateway closed the socket during the upgrade");
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            let head = String::from_utf8_lossy(&buf[..end]);
            bail!(
                "the upgrade was refused: {}",
                head.lines().next().unwrap_or("")
            );
        }
        buf.drain(..end);
        // Up to the hello.
        loop {
            let mut hello = false;
            let mut closed = false;
            let used = frames(&buf, |opcode, payload| match opcode {
                0x1 if memchr::memmem::find(payload, br#""type":"hello""#).is_some() => {
                    hello = true
                }
                0x8 => closed = true,
                _ => {}
            });
            buf.drain(..used);
            if closed {
                bail!("the gateway closed the WebSocket before hello");
            }
            if hello {
                break;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("the gateway closed the socket before hello");
            }
        }
        buf.shrink_to_fit();
        Ok(Held {
            stream,
            pending: buf,
        })
    }

    /// Holds the client until the gateway closes it (or the process ends): answers pings, and
    /// records when the team message arrives.
    async fn hold(mut self, shared: Arc<Shared>) {
        let mut seen = false;
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            match take(&self.stream, &pending, &shared, &mut seen) {
                Some(used) => self.pending = pending[used..].to_vec(),
                None => return closed(&shared),
            }
        }
        loop {
            if self.stream.readable().await.is_err() {
                return closed(&shared);
            }
            let outcome = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let n = match self.stream.try_read(&mut scratch[..]) {
                    Ok(0) => return Err(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                    Err(_) => return Err(()),
                };
                if self.pending.is_empty() {
                    let used = take(&self.stream, &scratch[..n], &shared, &mut seen).ok_or(())?;
                    self.pending.extend_from_slice(&scratch[used..n]);
                } else {
                    let mut pending = std::mem::take(&mut self.pending);
                    pending.extend_from_slice(&scratch[..n]);
                    let used = take(&self.stream, &pending, &shared, &mut seen).ok_or(())?;
                    pending.drain(..used);
                    if !pending.is_empty() {
                        self.pending = pending;
                    }
                }
                Ok(())
            });
            if outcome.is_err() {
                return closed(&shared);
            }
        }
    }
}

/// Reads the whole frames of `buf` from `stream`: a pong for each ping, the arrival of the
/// message; the bytes they took, or None when the gateway closed the WebSocket.
fn take(stream: &TcpStream, buf: &[u8], shared: &Shared, seen: &mut bool) -> Option<usize> {
    let mut close = false;
    let used = frames(buf, |opcode, payload| match opcode {
        0x0 | 0x1 if !*seen && shared.marker.find(payload).is_some() => {
            *seen = true;
            let now = micros_now();
            if let Ok(mut times) = shared.times.lock() {
                times.push(now);
            }
        }
        // A small frame on an idle socket: it fits in the send buffer.
        0x9 => {
            let _ = stream.try_write(&pong(payload));
        }
        0x8 => close = true,
        _ => {}
    });
    (!close).then_some(used)
}

fn closed(shared: &Shared) {
    shared.closed.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_whole_or_not_at_all() {
        let mut buf = vec![0x81, 5];
        buf.extend_from_slice(b"hello");
        buf.extend_from_slice(&[0x89, 2, b'p', b'i']);
        let mut long = vec![0x81, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(b'x', 256));
        buf.extend_from_slice(&long);
        let mut seen = Vec::new();
        let used = frames(&buf, |op, p| seen.push((op, p.len())));
        assert_eq!(used, buf.len());
        assert_eq!(seen, [(0x1, 5), (0x9, 2), (0x1, 256)]);
        // A frame cut anywhere is left for the next read.
        for cut in 1..long.len() {
            assert_eq!(frame(&long[..cut]), None, "cut at {cut}");
        }
        let mut eight = vec![0x82, 127];
        eight.extend_from_slice(&3u64.to_be_bytes());
        eight.extend_from_slice(b"abc");
        assert_eq!(
            frame(&eight),
            Some(Frame {
                opcode: 0x2,
                payload: 10..13
            })
        );
    }

    #[test]
    fn a_pong_is_masked_with_a_zero_key() {
        assert_eq!(pong(b"ab"), [0x8a, 0x82, 0, 0, 0, 0, b'a', b'b']);
    }

    #[test]
    fn sockstat_fields_are_read() {
        let s = "sockets: used 10\nTCP: inuse 5 orphan 0 tw 2 alloc 7 mem 31\nUDP: inuse 1 mem 2\n";
        assert_eq!(sockstat_field(s, "mem"), 31);
        assert_eq!(sockstat_field(s, "inuse"), 5);
        assert_eq!(sockstat_field(s, "nope"), 0);
    }
}
