//! `presence`: presence fan-out. One presence server (started here, with the ring manager of
//! its ring, by running the `channelmesh` binary) takes online/offline reports for USERS from
//! one gateway session as fast as it can while WATCHERS gateway sessions watch them all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_proto::presence as pb;
use mesh_proto::presence::gateway_message::Kind;
use mesh_proto::presence::presence_client::PresenceClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channelmesh::Service;

/// Changes in flight (sent, not yet at every watcher), well under the
/// presence server's per-session queue.
const PRESENCE_WINDOW: u64 = 1024;

/// `presence`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    // Users whose presence flips.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    // Gateway sessions that watch every one of them.
    #[arg(long, default_value_t = 10)]
    watchers: usize,
    // How long to drive the load, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// What one presence server sustained.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PresenceReport {
    pub users: usize,
    pub watchers: usize,
    pub seconds: f64,
    /// Presence reports the presence server took and turned into changes, per second.
    pub reports_per_s: f64,
    /// Presence changes it pushed to watching gateways (one user's change to one gateway is
    /// one), per second.
    pub pushed_per_s: f64,
}

/// Measures and prints the report.
pub async fn main(args: Args) -> anyhow::Result<()> {
    let report = presence(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "one presence server, {} users, {} watching gateways, {:.1} s",
        report.users, report.watchers, report.seconds
    );
    println!("  reports taken  {:>12.0} /s", report.reports_per_s);
    println!("  changes pushed {:>12.0} /s", report.pushed_per_s);
    Ok(())
}

/// Starts one presence server (and the ring manager of its ring) as child processes, then,
/// as one reporting gateway and `watchers` watching gateways on real gRPC sessions, flips
/// users between away and active as fast as the server takes the reports, and counts what it
/// pushes back, until every change reached every watcher.
async fn presence(args: &Args) -> anyhow::Result<PresenceReport> {
    let duration = Duration::from_secs(args.seconds);
    // Plaintext on loopback: the bench's sessions pose as many gateways, which mutual TLS
    // would refuse (a session is its gateway's own).
    let rm = Service::start(
        "ring-manager",
        &["ring-manager", "--insecure", "--listen", "127.0.0.1:0"],
    )
    .await?;
    let rm_url = format!("http://{}", rm.addr);
    let ps = Service::start(
        "presence-server",
        &[
            "presence-server",
            "--insecure",
            "--id",
            "ps-1",
            "--presence-ring-manager",
            &rm_url,
            "--grace-ms",
            "0",
        ],
    )
    .await?;
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let ring = ring_client::RingWatcher::spawn(
        ring_client::RingSource::Direct(rm_url),
        &tracker,
        stop.clone(),
    );
    ring.wait_for(
        Duration::from_secs(10),
        "the presence server on its ring",
        |r| !r.nodes().is_empty(),
    )
    .await?;
    // Past the warm-up that follows gaining the whole ring.
    tokio::time::sleep(presence_server::WARM_UP * 2).await;

    let users: Vec<String> = (0..args.users).map(|i| format!("UBENCH{i}")).collect();
    let endpoint = format!("http://{}", ps.addr);
    let session =
        |snapshot: pb::Snapshot| {
            let endpoint = endpoint.clone();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<pb::GatewayMessage>(4096);
                tx.send(pb::GatewayMessage {
                    kind: Some(Kind::Snapshot(snapshot)),
                })
                .await?;
                let outgoing = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                });
                let incoming = PresenceClient::connect(endpoint)
                    .await?
                    .session(outgoing)
                    .await?
                    .into_inner();
                anyhow::Ok((tx, incoming))
            }
        };
    let pushed = Arc::new(AtomicU64::new(0));
    let mut watchers = Vec::new();
    for w in 0..args.watchers {
        let (tx, mut incoming) = session(pb::Snapshot {
            gateway: format!("watcher-{w}"),
            watched: users.clone(),
            ..Default::default()
        })
        .await?;
        let pushed = pushed.clone();
        watchers.push(tokio::spawn(async move {
            // A gateway's heartbeat keeps the session's lease.
            let mut beat = tokio::time::interval(presence_server::HEARTBEAT_INTERVAL);
            loop {
                tokio::select! {
                    _ = beat.tick() => {
                        let heartbeat = pb::GatewayMessage { kind: Some(Kind::Heartbeat(pb::Heartbeat {})) };
                        if tx.send(heartbeat).await.is_err() {
                            return;
                        }
                    }
                    message = incoming.message() => match message {
                        Ok(Some(message)) => {
                            pushed.fetch_add(message.users.len() as u64, Ordering::Relaxed);
                        }
                        _ => return,
                    },
                }
            }
        }));
    }
    // The reporting gateway has every user online; each report is a manual away or back,
    // which the server publishes at once (automatic aways wait for the grace period and
    // coalesce, which would hide the work).
    let (reporter, _replies) = session(pb::Snapshot {
        gateway: "reporter".into(),
        online: users
            .iter()
            .map(|u| pb::UserOnline {
                user: u.clone(),
                connections: 1,
                // As a gateway reports it: the server keeps each user's team.
                team: "TBENCH".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await?;
    // Let the watches' first answers and the users' arrivals pass before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = pushed.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut reports = 0u64;
    let mut away = vec![false; users.len()];
    'drive: while started.elapsed() < duration {
        for (i, user) in users.iter().enumerate() {
            away[i] = !away[i];
            reports += 1;
            let report = pb::GatewayMessage {
                kind: Some(Kind::Manual(pb::Manual {
                    user: user.clone(),
                    away: away[i],
                    set_at_ms: reports,
                })),
            };
            reporter.send(report).await?;
            if reports.is_multiple_of(256) {
                if started.elapsed() >= duration {
                    break 'drive;
                }
                // A closed loop: at most WINDOW changes not yet at every watcher, so the rate
                // is what the server sustains, not a flood it must cut off.
                let watchers = args.watchers.max(1) as u64;
                let waiting = Instant::now();
                while reports.saturating_sub((pushed.load(Ordering::Relaxed) - before) / watchers)
                    > PRESENCE_WINDOW
                {
                    if waiting.elapsed() > Duration::from_secs(2) {
                        anyhow::bail!("the presence server stopped pushing changes");
                    }
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    // Done when every change reached every watcher (or they stopped coming): the rate is
    // what the server actually processed, not what the sockets buffered.
    let want = reports * args.watchers as u64;
    let mut last = (0, Instant::now());
    let elapsed = loop {
        let now = pushed.load(Ordering::Relaxed) - before;
        if now >= want {
            break started.elapsed().as_secs_f64();
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            anyhow::bail!(
                "the presence server stopped pushing after {now} of {want} changes \
                 (a watcher cut off as a slow consumer?)"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let pushed_total = pushed.load(Ordering::Relaxed) - before;
    stop.cancel();
    drop(reporter);
    for w in watchers {
        w.abort();
    }
    tracker.close();
    tracker.wait().await;
    drop(ps);
    drop(rm);
    Ok(PresenceReport {
        users: args.users,
        watchers: args.watchers,
        seconds: elapsed,
        reports_per_s: reports as f64 / elapsed,
        pushed_per_s: pushed_total as f64 / elapsed,
    })
}
