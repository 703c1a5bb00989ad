//! `channel-memory`: how much memory a channel server needs to hold N active
//! channels with a history of E events each.
//!
//! It fills the channel server's own store (`channel_server::store::Store`, sharded by slot
//! as the service shards it) in this process and reads this process's RSS before and after:
//! the figure is the channel state a channel server holds, without its gRPC connections
//! (a few MiB, independent of the channel count). Going through gRPC would measure the same
//! structures while taking minutes to publish ten million events.
//!
//! Every event is built the way the service decodes one from a Publish request: its own user
//! id, team id and text allocations, none shared with another event.
//!
//! With `--mesh`, it measures real channel servers instead, at replication factor 1 and
//! `--replication-factor`, to give what a follower copy of a channel costs ([`mesh`]).

mod mesh;

use std::time::Instant;

use channel_server::store::{Limits, Store};
use mesh_core::event::MAX_TEXT_BYTES;
use mesh_core::{ChannelId, EventBody, TeamId, UserId, slot_of};
use rand::{Rng, SeedableRng};

use crate::rss;

/// Shards, as the channel server's service splits its store.
const SHARDS: usize = 16;

/// `channel-memory`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Active channels to fill [default: 1000000; with --mesh, 20000].
    #[arg(long)]
    channels: Option<usize>,
    // Messages in each channel's history.
    #[arg(long, default_value_t = 10)]
    events: usize,
    /// Bytes of text per message (with --mixed: the mean).
    #[arg(long, default_value_t = 200)]
    text_bytes: usize,
    /// Texts of random words with lengths spread around --text-bytes, as chat is,
    /// instead of all the same length.
    #[arg(long)]
    mixed: bool,
    /// Measure real channel servers (`channelmesh dev --multi-process`, posting through the
    /// admin API) at replication factor 1 and --replication-factor: the RSS of each node and
    /// what a follower copy of a channel costs.
    #[arg(long)]
    mesh: bool,
    /// With --mesh: the replication factor compared with 1 (each slot's copies: its primary
    /// and factor - 1 followers).
    #[arg(long, default_value_t = 2, requires = "mesh")]
    replication_factor: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Channels filled in this process unless --channels says otherwise.
const DEFAULT_CHANNELS: usize = 1_000_000;
/// Channels filled with --mesh (through gRPC: about a minute per factor on 2 vCPUs) unless
/// --channels says otherwise.
const DEFAULT_MESH_CHANNELS: usize = 20_000;

/// Measures and prints the report.
pub async fn main(args: Args) -> anyhow::Result<()> {
    if args.mesh {
        return main_mesh(args).await;
    }
    let sizes = if args.mixed {
        TextSizes::Mixed
    } else {
        TextSizes::Fixed
    };
    let config = ChannelMemoryConfig {
        channels: args.channels.unwrap_or(DEFAULT_CHANNELS),
        events_per_channel: args.events,
        text_bytes: args.text_bytes,
    };
    let r = channel_memory_with(&config, sizes)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{} channels x {} messages of {} B text: RSS {:.0} MiB -> {:.0} MiB (+{:.0} MiB)",
        r.channels,
        r.events_per_channel,
        r.text_bytes,
        mib(r.rss_before_bytes),
        mib(r.rss_after_bytes),
        mib(r.rss_after_bytes.saturating_sub(r.rss_before_bytes))
    );
    println!(
        "per channel {:.0} B; per message {:.0} B beyond its text; filled in {:.1} s",
        r.bytes_per_channel, r.overhead_per_event, r.fill_secs
    );
    Ok(())
}

/// `--mesh`: measures and prints the report.
async fn main_mesh(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(!args.mixed, "--mixed is for the in-process store only");
    let config = mesh::MeshMemoryConfig {
        channels: args.channels.unwrap_or(DEFAULT_MESH_CHANNELS),
        events_per_channel: args.events,
        text_bytes: args.text_bytes,
        replication_factor: args.replication_factor,
    };
    let r = mesh::measure(&config).await?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{} channels x {} messages of {} B text, posted through the admin API",
        r.channels, r.events_per_channel, r.text_bytes
    );
    for run in &r.runs {
        println!(
            "replication factor {}: channel servers +{:.0} MiB RSS, {:.0} B per channel \
             (all copies); {} posted ({:.0}/s), {} failed",
            run.replication_factor,
            mib(run.grown_bytes),
            run.bytes_per_channel,
            run.posted,
            run.posts_per_s,
            run.post_errors
        );
        for n in &run.nodes {
            println!(
                "  {:<6}{:<9} leads {:>4} slots, follows {:>4}: RSS {:.0} MiB -> {:.0} MiB (+{:.0} MiB)",
                n.id,
                if n.standby { " standby" } else { "" },
                n.slots_led,
                n.slots_followed,
                mib(n.rss_before_bytes),
                mib(n.rss_after_bytes),
                mib(n.rss_after_bytes.saturating_sub(n.rss_before_bytes))
            );
        }
    }
    if let Some(follower) = r.follower_copy_bytes_per_channel {
        println!("a follower copy: {follower:.0} B per channel");
    }
    Ok(())
}

/// What to fill.
#[derive(Debug, Clone)]
pub struct ChannelMemoryConfig {
    pub channels: usize,
    pub events_per_channel: usize,
    /// Bytes of message text per event (the mean, with [`TextSizes::Mixed`]).
    pub text_bytes: usize,
}

/// How long each message's text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSizes {
    /// Every text is `text_bytes` long.
    Fixed,
    /// Lengths spread as chat is, exponentially around a mean of `text_bytes` (most short,
    /// a few long, capped at [`MAX_TEXT_BYTES`]); random words, so every size class of the
    /// allocator is in play, as on a live server.
    Mixed,
}

/// What it measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelMemoryReport {
    pub channels: usize,
    pub events_per_channel: usize,
    pub text_bytes: usize,
    pub text_sizes: TextSizes,
    /// Mean bytes of text per event actually stored.
    pub mean_text_bytes: f64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// RSS growth per channel (its events included).
    pub bytes_per_channel: f64,
    /// RSS growth per event, beyond its text.
    pub overhead_per_event: f64,
    pub fill_secs: f64,
    pub evictions: u64,
}

/// A text of `len` bytes: random lowercase words.
fn random_text(rng: &mut impl Rng, len: usize) -> String {
    let mut text = String::with_capacity(len);
    while text.len() < len {
        if !text.is_empty() && rng.random_ratio(1, 6) {
            text.push(' ');
        } else {
            text.push(char::from(b'a' + rng.random_range(0..26u8)));
        }
    }
    text
}

/// Fills a store with texts sized as `sizes` says and measures it.
pub fn channel_memory_with(
    config: &ChannelMemoryConfig,
    sizes: TextSizes,
) -> anyhow::Result<ChannelMemoryReport> {
    let limits = Limits {
        history_events: config.events_per_channel.max(1),
        // The per-channel and total budgets must not trim or evict what is measured.
        history_bytes: usize::MAX / 2,
        total_bytes: usize::MAX / 2,
    };
    let mut shards: Vec<Store> = (0..SHARDS).map(|_| Store::new(limits)).collect();
    let fixed_text: String = "x".repeat(config.text_bytes);
    // Seeded: runs compare like with like.
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut text_total = 0u64;
    let before = rss::own()?;
    let started = Instant::now();
    let mut now_micros = 1_700_000_000_000_000u64;
    // Round-robin over the channels so every channel's history is spread over time, as a
    // live server's is.
    for round in 0..config.events_per_channel {
        for c in 0..config.channels {
            let channel = ChannelId::new(&format!("C{c:09}"))?;
            let text = match sizes {
                TextSizes::Fixed => fixed_text.clone(),
                TextSizes::Mixed => {
                    // Exponential around the mean: -mean * ln(u), u in (0, 1].
                    let u: f64 = 1.0 - rng.random::<f64>();
                    let len = (-(config.text_bytes as f64) * u.ln()).round() as usize;
                    random_text(&mut rng, len.clamp(1, MAX_TEXT_BYTES))
                }
            };
            text_total += text.len() as u64;
            let body = EventBody::Message {
                user: UserId::new(&format!("U{:08}", (c * 7 + round) % 100_000))?,
                text,
                team: Some(TeamId::new("T0BENCH")?),
            };
            now_micros += 1;
            let shard = usize::from(slot_of(&channel)) % SHARDS;
            shards[shard].append(&channel, &body, now_micros);
        }
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let after = rss::own()?;
    let held: usize = shards.iter().map(Store::len).sum();
    anyhow::ensure!(
        held == config.channels,
        "the store holds {held} channels, not {}",
        config.channels
    );
    let grown = after.saturating_sub(before) as f64;
    let events = (config.channels * config.events_per_channel).max(1) as f64;
    let mean_text_bytes = text_total as f64 / events;
    Ok(ChannelMemoryReport {
        channels: config.channels,
        events_per_channel: config.events_per_channel,
        text_bytes: config.text_bytes,
        text_sizes: sizes,
        mean_text_bytes,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_channel: grown / config.channels.max(1) as f64,
        overhead_per_event: grown / events - mean_text_bytes,
        fill_secs,
        evictions: shards.iter().map(Store::evictions).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_texts_spread_around_their_mean() {
        let config = ChannelMemoryConfig {
            channels: 200,
            events_per_channel: 10,
            text_bytes: 60,
        };
        let report = channel_memory_with(&config, TextSizes::Mixed).unwrap();
        assert_eq!(report.channels, 200);
        assert_eq!(report.evictions, 0);
        assert!(
            (45.0..75.0).contains(&report.mean_text_bytes),
            "mean {}",
            report.mean_text_bytes
        );
    }

    /// The realistic-mix figures, until the CLI takes a text-size mode:
    /// `cargo test --release -p channelmesh-loadgen channel_memory -- --ignored --nocapture`
    /// (`CHANNELS`, `TEXT_BYTES` override 1,000,000 and 60).
    #[test]
    #[ignore = "fills a million channels: a benchmark, run by hand"]
    fn channel_memory_mixed_figures() {
        let var = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let config = ChannelMemoryConfig {
            channels: var("CHANNELS", 1_000_000),
            events_per_channel: 10,
            text_bytes: var("TEXT_BYTES", 60),
        };
        let r = channel_memory_with(&config, TextSizes::Mixed).unwrap();
        let grown = r.rss_after_bytes.saturating_sub(r.rss_before_bytes);
        println!(
            "{} channels x {} messages of mixed text (mean {:.1} B): +{:.0} MiB RSS; \
             per channel {:.0} B; per message {:.0} B beyond its text",
            r.channels,
            r.events_per_channel,
            r.mean_text_bytes,
            grown as f64 / (1 << 20) as f64,
            r.bytes_per_channel,
            r.overhead_per_event
        );
    }
}
