//! `channel-memory --mesh`: what a follower copy of a channel costs, measured on real channel
//! servers. For replication factor 1, then the factor asked for, each in a fresh
//! `channelmesh dev --multi-process` mesh: posts CHANNELS x EVENTS messages through the admin
//! API (each acknowledged only once every follower holds it) and reads every channel server's
//! RSS before and after. The growth at factor F less the growth at factor 1, per channel and
//! per extra copy, is a follower copy's cost; each node's growth is shown beside the slots it
//! leads and follows.

use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_core::NodeId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channelmesh::{Dev, replication_flags};
use crate::client::Admin;
use crate::rss;

/// Posts in flight at once (one task each).
const CONCURRENCY: usize = 64;
/// How long the ring may take to show every channel server.
const RING_TIMEOUT: Duration = Duration::from_secs(10);
/// A pause before each RSS reading, so that a reading is not of a burst's transient buffers.
const SETTLE: Duration = Duration::from_secs(2);

/// What to fill.
#[derive(Debug, Clone)]
pub struct MeshMemoryConfig {
    pub channels: usize,
    pub events_per_channel: usize,
    pub text_bytes: usize,
    /// The factor compared with 1.
    pub replication_factor: u32,
}

/// One channel server's RSS and share of the ring in one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeMemory {
    pub id: String,
    pub standby: bool,
    /// Slots it leads (is the primary of) and follows.
    pub slots_led: usize,
    pub slots_followed: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
}

/// One mesh, at one replication factor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MeshRun {
    pub replication_factor: u32,
    pub nodes: Vec<NodeMemory>,
    /// Every channel server's RSS growth, summed.
    pub grown_bytes: u64,
    /// That growth per channel (all its copies).
    pub bytes_per_channel: f64,
    pub posted: usize,
    pub post_errors: usize,
    pub posts_per_s: f64,
}

/// Both runs and what a follower copy costs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MeshMemoryReport {
    pub channels: usize,
    pub events_per_channel: usize,
    pub text_bytes: usize,
    pub runs: Vec<MeshRun>,
    /// (growth at factor F - growth at factor 1) / (channels x (F - 1)): a follower copy of
    /// one channel, with its history.
    pub follower_copy_bytes_per_channel: Option<f64>,
}

/// Measures factor 1, then `config.replication_factor` (if above 1).
pub async fn measure(config: &MeshMemoryConfig) -> anyhow::Result<MeshMemoryReport> {
    let mut factors = vec![1];
    if config.replication_factor > 1 {
        // Refused before the first run, by a build without replication.
        replication_flags(config.replication_factor).await?;
        factors.push(config.replication_factor);
    }
    let mut runs = Vec::new();
    for factor in factors {
        runs.push(run(config, factor).await?);
    }
    let follower_copy_bytes_per_channel = match runs.as_slice() {
        [one, more] => Some(
            (more.grown_bytes as f64 - one.grown_bytes as f64)
                / (config.channels.max(1) as f64 * f64::from(more.replication_factor - 1)),
        ),
        _ => None,
    };
    Ok(MeshMemoryReport {
        channels: config.channels,
        events_per_channel: config.events_per_channel,
        text_bytes: config.text_bytes,
        runs,
        follower_copy_bytes_per_channel,
    })
}

/// A fresh secret for one run's mesh: 256 random bits.
fn secret() -> String {
    format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

/// One mesh at `factor`: fill it, read every channel server's RSS, stop it.
async fn run(config: &MeshMemoryConfig, factor: u32) -> anyhow::Result<MeshRun> {
    let (jwt_secret, admin_token) = (secret(), secret());
    let dev = Dev::start_multi_process(&jwt_secret, &admin_token, Some(factor)).await?;
    let mesh = &dev.summary;
    let rm = format!(
        "http://{}",
        mesh.ring_manager.context("dev printed no ring manager")?
    );
    let admin_addr = mesh.admin.context("dev printed no admin server")?;
    let servers: Vec<(String, bool, u32)> = mesh
        .channel_servers
        .iter()
        .map(|n| Some((n.id.clone(), n.standby, n.pid?)))
        .collect::<Option<_>>()
        .context("a channel server's pid in what dev printed")?;

    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    let watcher = ring_client::RingWatcher::spawn(
        ring_client::RingSource::Direct(rm),
        &tracker,
        stop.clone(),
    );
    let active = servers.iter().filter(|(_, standby, _)| !standby).count();
    let ring = watcher
        .wait_for(RING_TIMEOUT, "every channel server in the ring", |r| {
            r.nodes().len() >= active && (factor == 1 || r.is_replicated())
        })
        .await?;

    tokio::time::sleep(SETTLE).await;
    let before: Vec<u64> = servers
        .iter()
        .map(|(_, _, pid)| rss::rss_of(&pid.to_string()))
        .collect::<anyhow::Result<_>>()?;
    let admin = Admin::connect(&admin_addr.to_string(), &admin_token).await?;
    let started = Instant::now();
    let (posted, post_errors) = fill(config, &admin).await;
    let posts_per_s = posted as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let mut nodes = Vec::new();
    for ((id, standby, pid), rss_before_bytes) in servers.iter().zip(before) {
        let node = NodeId::new(id)?;
        nodes.push(NodeMemory {
            id: id.clone(),
            standby: *standby,
            slots_led: ring.slots_owned(&node),
            slots_followed: ring.slots_followed(&node),
            rss_before_bytes,
            rss_after_bytes: rss::rss_of(&pid.to_string())?,
        });
    }
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    dev.stop().await;
    let grown_bytes = nodes
        .iter()
        .map(|n| n.rss_after_bytes.saturating_sub(n.rss_before_bytes))
        .sum();
    Ok(MeshRun {
        replication_factor: factor,
        nodes,
        grown_bytes,
        bytes_per_channel: grown_bytes as f64 / config.channels.max(1) as f64,
        posted,
        post_errors,
        posts_per_s,
    })
}

/// Posts `events_per_channel` rounds over every channel, [`CONCURRENCY`] posts in flight;
/// answers (acknowledged, failed).
async fn fill(config: &MeshMemoryConfig, admin: &Admin) -> (usize, usize) {
    let text = "x".repeat(config.text_bytes);
    let mut tasks = Vec::new();
    for task in 0..CONCURRENCY {
        let (mut admin, text, config) = (admin.clone(), text.clone(), config.clone());
        tasks.push(tokio::spawn(async move {
            let (mut posted, mut failed) = (0, 0);
            for _ in 0..config.events_per_channel {
                for c in (task..config.channels).step_by(CONCURRENCY) {
                    match admin.post(format!("C{c:09}"), "UBENCH", text.clone()).await {
                        Ok(()) => posted += 1,
                        Err(_) => failed += 1,
                    }
                }
            }
            (posted, failed)
        }));
    }
    let mut totals = (0, 0);
    for task in tasks {
        // A task that panicked posted nothing that counts.
        let (posted, failed) = task.await.unwrap_or((0, 0));
        totals = (totals.0 + posted, totals.1 + failed);
    }
    totals
}
