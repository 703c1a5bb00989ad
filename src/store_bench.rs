//! `channelmesh bench channel-memory`: how much memory a channel server needs to hold N active
//! channels with a history of E events each.
//!
//! It fills the channel server's own store (`channel_server::store::Store`, sharded by slot
//! as the service shards it) in this process and reads this process's RSS before and after:
//! the figure is the channel state a channel server holds, without its gRPC connections
//! (a few MiB, independent of the channel count). Going through gRPC would measure the same
//! structures while taking minutes to publish ten million events.

use std::time::Instant;

use channel_server::store::{Limits, Store};
use mesh_core::{ChannelId, EventBody, TeamId, UserId, slot_of};

/// Shards, as the channel server's service splits its store.
const SHARDS: usize = 16;

/// What to fill.
#[derive(Debug, Clone)]
pub struct ChannelMemoryConfig {
    pub channels: usize,
    pub events_per_channel: usize,
    /// Bytes of message text per event.
    pub text_bytes: usize,
}

/// What it measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelMemoryReport {
    pub channels: usize,
    pub events_per_channel: usize,
    pub text_bytes: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// RSS growth per channel (its events included).
    pub bytes_per_channel: f64,
    /// RSS growth per event, beyond its text.
    pub overhead_per_event: f64,
    pub fill_secs: f64,
    pub evictions: u64,
}

/// This process's resident set, from `/proc/self/status`.
pub fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kb * 1024)
}

/// Fills a store and measures it.
pub fn channel_memory(config: &ChannelMemoryConfig) -> anyhow::Result<ChannelMemoryReport> {
    let limits = Limits {
        history_events: config.events_per_channel.max(1),
        // The per-channel and total budgets must not trim or evict what is measured.
        history_bytes: usize::MAX / 2,
        total_bytes: usize::MAX / 2,
    };
    let mut shards: Vec<Store> = (0..SHARDS).map(|_| Store::new(limits)).collect();
    let team = TeamId::new("T0BENCH")?;
    let text: String = "x".repeat(config.text_bytes);
    let before = rss_bytes()?;
    let started = Instant::now();
    let mut now_micros = 1_700_000_000_000_000u64;
    // Round-robin over the channels so every channel's history is spread over time, as a
    // live server's is.
    for round in 0..config.events_per_channel {
        for c in 0..config.channels {
            let channel = ChannelId::new(&format!("C{c:09}"))?;
            let body = EventBody::Message {
                user: UserId::new(&format!("U{:08}", (c * 7 + round) % 100_000))?,
                text: text.clone(),
                team: Some(team.clone()),
            };
            now_micros += 1;
            let shard = usize::from(slot_of(&channel)) % SHARDS;
            shards[shard].append(&channel, body, now_micros);
        }
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let after = rss_bytes()?;
    let held: usize = shards.iter().map(Store::len).sum();
    anyhow::ensure!(
        held == config.channels,
        "the store holds {held} channels, not {}",
        config.channels
    );
    let grown = after.saturating_sub(before) as f64;
    let events = (config.channels * config.events_per_channel).max(1) as f64;
    Ok(ChannelMemoryReport {
        channels: config.channels,
        events_per_channel: config.events_per_channel,
        text_bytes: config.text_bytes,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_channel: grown / config.channels.max(1) as f64,
        overhead_per_event: grown / events - config.text_bytes as f64,
        fill_secs,
        evictions: shards.iter().map(Store::evictions).sum(),
    })
}
