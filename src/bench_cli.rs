//! The `bench` subcommands and their reports: the load generator (fan-out, chat,
//! connect-storm, idle), the presence, channel-memory, failover and latency benches. Moved
//! here unchanged from `main.rs`; the load generator's own crate replaces it.

use std::time::Duration;

use admin_server::config::{ENV_ADMIN_TOKEN, ENV_JWT_SECRET, required_env};
use clap::Subcommand;

/// The `bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Fan-out: few channels, many subscribers (CLIENTS over CHANNELS); publishes at RATE for
    /// SECONDS (member clients over their WebSocket, or the admin API) and reports delivered/s,
    /// publish -> receive latency percentiles, connect rate, lost messages. Against
    /// channelmesh (needs CHANNELMESH_JWT_SECRET, as `dev` prints it) or nats-server.
    Fanout(crate::fanout::LoadArgs),
    /// Chat: many small channels (mostly 2-5 members online, a few larger), a publisher in
    /// each at a modest rate.
    Chat(crate::fanout::LoadArgs),
    /// Connect/disconnect churn: CLIENTS stay connected while CHURN of them per second close
    /// and reconnect; reports connects/s, failures, connect time percentiles.
    ConnectStorm(crate::fanout::LoadArgs),
    /// Idle connections: connects CLIENTS, holds them SECONDS; with --server-pid, the server's
    /// RSS per connection.
    Idle(crate::fanout::LoadArgs),
    /// A load generator worker: started by the scenarios above, orders on stdin.
    #[command(hide = true)]
    Worker,
    /// Presence fan-out: one presence server (started here, with its ring manager) takes
    /// online/offline reports for USERS from one gateway session as fast as it can while
    /// WATCHERS gateway sessions watch them all; reports updates taken and pushed per second.
    Presence {
        #[arg(long, default_value_t = 1000)]
        users: usize,
        #[arg(long, default_value_t = 10)]
        watchers: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Channel server failover: in a fresh `dev --multi-process` mesh per run (ports the OS
    /// picks), SIGKILLs the owner of a channel a client listens on while posts keep coming, and
    /// reports how long delivery stopped and which slots moved.
    /// Channel-server memory: fills a channel server's store with CHANNELS active channels of
    /// EVENTS messages each (in this process) and reports the RSS it took.
    ChannelMemory {
        #[arg(long, default_value_t = 1_000_000)]
        channels: usize,
        #[arg(long, default_value_t = 10)]
        events: usize,
        /// Bytes of text per message (with --mixed: the mean).
        #[arg(long, default_value_t = 200)]
        text_bytes: usize,
        /// Texts of random words with lengths spread around --text-bytes, as chat is,
        /// instead of all the same length.
        #[arg(long)]
        mixed: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    Failover {
        /// Runs (each on its own mesh); the report gives each and the median.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Admin -> client delivery latency: posts messages one at a time through the admin API
    /// and times each until a connected RTM client receives it. Needs CHANNELMESH_JWT_SECRET
    /// and CHANNELMESH_ADMIN_TOKEN (as `dev` prints them).
    Latency {
        /// RTM base URL of the gateway the client connects to.
        #[arg(long, default_value = "http://127.0.0.1:8080/api/")]
        gateway: String,
        /// Admin server address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        admin: String,
        /// Messages to time.
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        /// Messages sent first and not counted.
        #[arg(long, default_value_t = 100)]
        warmup: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one bench and prints its report.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Fanout(args) => {
            crate::fanout::cli(crate::fanout::Scenario::Fanout, args).await
        }
        BenchCommand::Chat(args) => crate::fanout::cli(crate::fanout::Scenario::Chat, args).await,
        BenchCommand::ConnectStorm(args) => {
            crate::fanout::cli(crate::fanout::Scenario::ConnectStorm, args).await
        }
        BenchCommand::Idle(args) => crate::fanout::cli(crate::fanout::Scenario::Idle, args).await,
        BenchCommand::Worker => crate::fanout::worker_main().await,
        BenchCommand::Presence {
            users,
            watchers,
            seconds,
            json,
        } => {
            let report = crate::bench::presence(crate::bench::PresenceConfig {
                users,
                watchers,
                duration: Duration::from_secs(seconds),
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "one presence server, {} users, {} watching gateways, {:.1} s",
                    report.users, report.watchers, report.seconds
                );
                println!("  reports taken  {:>12.0} /s", report.reports_per_s);
                println!("  changes pushed {:>12.0} /s", report.pushed_per_s);
            }
            Ok(())
        }
        BenchCommand::ChannelMemory {
            channels,
            events,
            text_bytes,
            mixed,
            json,
        } => {
            use crate::store_bench::{ChannelMemoryConfig, TextSizes, channel_memory_with};
            let sizes = if mixed {
                TextSizes::Mixed
            } else {
                TextSizes::Fixed
            };
            let config = ChannelMemoryConfig {
                channels,
                events_per_channel: events,
                text_bytes,
            };
            let r = channel_memory_with(&config, sizes)?;
            if json {
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
        BenchCommand::Failover { runs, json } => {
            let report = crate::bench::failover(runs).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
                return Ok(());
            }
            println!("channel server SIGKILL -> delivery resumed, {runs} runs");
            println!(
                "{:>4} {:<6} {:>12} {:>12} {:>14}  ONLY-DEAD->ONE-STANDBY",
                "RUN", "KILLED", "RESUMED ms", "EPOCH ms", "SLOTS MOVED"
            );
            for (i, r) in report.runs.iter().enumerate() {
                println!(
                    "{:>4} {:<6} {:>12.1} {:>12.1} {:>8} ({:.1}%)  {}",
                    i + 1,
                    r.killed,
                    r.delivery_resumed_ms,
                    r.new_epoch_ms,
                    r.slots_moved,
                    100.0 * r.slots_moved as f64 / r.slots_total as f64,
                    r.only_dead_nodes_slots_to_one_standby
                );
            }
            println!(
                "median: delivery resumed {:.1} ms, new epoch {:.1} ms",
                report.median_delivery_resumed_ms, report.median_new_epoch_ms
            );
            Ok(())
        }
        BenchCommand::Latency {
            gateway,
            admin,
            messages,
            warmup,
            json,
        } => {
            let config = crate::bench::LatencyConfig {
                gateway,
                admin,
                admin_token: required_env(ENV_ADMIN_TOKEN)?,
                jwt_secret: required_env(ENV_JWT_SECRET)?,
                messages,
                warmup,
            };
            let report = crate::bench::latency(config).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "admin -> client delivery latency over {} messages",
                    report.messages
                );
                println!("  p50  {:>8} us", report.p50_us);
                println!("  p90  {:>8} us", report.p90_us);
                println!("  p99  {:>8} us", report.p99_us);
                println!("  max  {:>8} us", report.max_us);
                println!("  mean {:>8} us", report.mean_us);
                if let Some(rpc) = &report.post_rpc {
                    println!(
                        "  (the PostMessage call alone: p50 {} us, p99 {} us, max {} us)",
                        rpc.p50_us, rpc.p99_us, rpc.max_us
                    );
                }
            }
            Ok(())
        }
    }
}
