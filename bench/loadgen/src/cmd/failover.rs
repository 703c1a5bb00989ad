//! `failover`: channel server failover. In a fresh `channelmesh dev --multi-process` mesh per
//! run (ports the OS picks), SIGKILLs the channel server owning a channel a client listens on
//! while posts keep coming, and measures how long delivery stops and which slots move.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_core::{ChannelId, Identity, SLOT_COUNT, Slot, TeamId, UserId};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channelmesh::Dev;
use crate::client::{self, Admin};
use crate::clock::unix_now;

/// How long the ring may take to show the channel's owner, and the new epoch after the kill.
const RING_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause between two posts.
const POST_EVERY: Duration = Duration::from_millis(2);

/// `failover`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Runs (each on its own mesh); the report gives each and the median.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The mesh's replication factor (`dev --replication-factor`; default: `dev`'s): with
    /// followers, each of the killed node's slots goes to its first follower.
    #[arg(long)]
    replication_factor: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// What `failover` measured in one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverRun {
    /// The channel server killed (the owner of the client's channel).
    pub killed: String,
    /// From SIGKILL until the client received a message posted after it.
    pub delivery_resumed_ms: f64,
    /// From SIGKILL until the ring manager published the new epoch.
    pub new_epoch_ms: f64,
    /// Slots that changed owner, and how many there are.
    pub slots_moved: usize,
    pub slots_total: usize,
    /// Whether every moved slot went from the killed node to one standby.
    pub only_dead_nodes_slots_to_one_standby: bool,
    /// Whether every moved slot went from the killed node to the slot's first follower (a
    /// replicated ring's promotion; false in a ring without followers).
    pub only_dead_nodes_slots_to_their_followers: bool,
}

/// `failover`: each run and the median.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverReport {
    pub runs: Vec<FailoverRun>,
    pub median_delivery_resumed_ms: f64,
    pub median_new_epoch_ms: f64,
}

/// Measures and prints the report.
pub async fn main(args: Args) -> anyhow::Result<()> {
    let runs = args.runs;
    let report = failover(runs, args.replication_factor).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("channel server SIGKILL -> delivery resumed, {runs} runs");
    println!(
        "{:>4} {:<6} {:>12} {:>12} {:>14}  ONLY-DEAD->ONE-STANDBY  ONLY-DEAD->FOLLOWERS",
        "RUN", "KILLED", "RESUMED ms", "EPOCH ms", "SLOTS MOVED"
    );
    for (i, r) in report.runs.iter().enumerate() {
        println!(
            "{:>4} {:<6} {:>12.1} {:>12.1} {:>8} ({:.1}%)  {:<21}  {}",
            i + 1,
            r.killed,
            r.delivery_resumed_ms,
            r.new_epoch_ms,
            r.slots_moved,
            100.0 * r.slots_moved as f64 / r.slots_total as f64,
            r.only_dead_nodes_slots_to_one_standby,
            r.only_dead_nodes_slots_to_their_followers
        );
    }
    println!(
        "median: delivery resumed {:.1} ms, new epoch {:.1} ms",
        report.median_delivery_resumed_ms, report.median_new_epoch_ms
    );
    Ok(())
}

/// A fresh secret for one run's mesh.
fn secret() -> String {
    // 256 random bits: HS256's key size.
    format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

/// Runs the measurement `runs` times, each on its own mesh.
async fn failover(runs: usize, factor: Option<u32>) -> anyhow::Result<FailoverReport> {
    let mut results = Vec::new();
    for run in 0..runs {
        results.push(once(run, factor).await?);
    }
    let median = |f: fn(&FailoverRun) -> f64| {
        let mut v: Vec<f64> = results.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(FailoverReport {
        median_delivery_resumed_ms: median(|r| r.delivery_resumed_ms),
        median_new_epoch_ms: median(|r| r.new_epoch_ms),
        runs: results,
    })
}

/// One run: starts a mesh, kills the owner of channel `CFAILOVER{run}` while posts to it keep
/// coming, measures, stops the mesh.
async fn once(run: usize, factor: Option<u32>) -> anyhow::Result<FailoverRun> {
    let (jwt_secret, admin_token) = (secret(), secret());
    let dev = Dev::start_multi_process(&jwt_secret, &admin_token, factor).await?;
    let mesh = &dev.summary;
    let rm = format!(
        "http://{}",
        mesh.ring_manager.context("dev printed no ring manager")?
    );
    let (_, gateway) = mesh.gateways.first().context("dev printed no gateway")?;
    let gateway = format!("http://{gateway}/api/");
    let admin_addr = mesh.admin.context("dev printed no admin server")?;
    let stop = CancellationToken::new();

    let channel = ChannelId::new(&format!("CFAILOVER{run}"))?;
    let identity = Identity {
        user: UserId::new("UBENCH")?,
        team: TeamId::new("TBENCH")?,
        name: None,
        channels: vec![channel.clone()],
        expires_at: unix_now() + 3600,
        jti: None,
    };
    let mut ws = client::connect(&gateway, &jwt_secret, &identity).await?;
    let tracker = TaskTracker::new();
    let watcher = ring_client::RingWatcher::spawn(
        ring_client::RingSource::Direct(rm),
        &tracker,
        stop.clone(),
    );
    let before = watcher
        .wait_for(RING_TIMEOUT, "the ring", |r| r.owner_of(&channel).is_some())
        .await?;
    let victim = before.owner_of(&channel).context("an owner")?.id.clone();
    let pid = mesh
        .channel_servers
        .iter()
        .find(|node| node.id == victim.as_str())
        .and_then(|node| node.pid)
        .context("the owner's pid in what dev printed")?;

    let mut admin = Admin::connect(&admin_addr.to_string(), &admin_token).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let posting = {
        let (next, stop, channel) = (next.clone(), stop.clone(), channel.to_string());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let i = next.fetch_add(1, Ordering::SeqCst);
                // A post that fails is simply not counted; the measurement is of delivery.
                let _ = admin
                    .post(channel.clone(), "UPOSTER", format!("f{i}"))
                    .await;
                tokio::time::sleep(POST_EVERY).await;
            }
        })
    };
    // Delivery is flowing before the kill.
    while client::next_json(&mut ws).await?["type"] != "message" {}

    let epoch = before.epoch();
    let killed_at = Instant::now();
    let first_after = next.load(Ordering::SeqCst);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
    let new_epoch = {
        let watcher = watcher.clone();
        tokio::spawn(async move {
            let ring = watcher.wait_for_epoch(epoch + 1, RING_TIMEOUT).await;
            (killed_at.elapsed(), ring)
        })
    };
    loop {
        let frame = client::next_json(&mut ws).await?;
        let index = frame["text"]
            .as_str()
            .and_then(|t| t.strip_prefix('f'))
            .and_then(|t| t.parse::<usize>().ok());
        if frame["type"] == "message" && index.is_some_and(|i| i >= first_after) {
            break;
        }
    }
    let resumed = killed_at.elapsed();
    let (epoch_after, after) = new_epoch.await?;
    let after = after?;
    let moved: Vec<_> = (0..SLOT_COUNT as Slot)
        .filter_map(|s| {
            let (a, b) = (before.owner(s)?, after.owner(s)?);
            (a.id != b.id).then(|| (s, a.id.clone(), b.id.clone()))
        })
        .collect();
    let first_follower = |s: Slot| before.followers(s).next().map(|n| n.id.clone());
    let targets: HashSet<_> = moved.iter().map(|(_, _, to)| to).collect();
    let result = FailoverRun {
        killed: victim.to_string(),
        delivery_resumed_ms: resumed.as_secs_f64() * 1e3,
        new_epoch_ms: epoch_after.as_secs_f64() * 1e3,
        slots_moved: moved.len(),
        slots_total: SLOT_COUNT,
        only_dead_nodes_slots_to_one_standby: targets.len() == 1
            && moved.iter().all(|(_, from, _)| *from == victim),
        only_dead_nodes_slots_to_their_followers: before.is_replicated()
            && moved
                .iter()
                .all(|(s, from, to)| *from == victim && first_follower(*s).as_ref() == Some(to)),
    };
    stop.cancel();
    let _ = posting.await;
    let _ = ws.close(None).await;
    tracker.close();
    tracker.wait().await;
    dev.stop().await;
    Ok(result)
}
