//! `channelmesh-loadgen`: channelmesh's load generator and benchmarks, which measure a mesh from
//! outside through its real interfaces. `channelmesh bench …` runs this binary with the same
//! arguments. This file only parses arguments and hands off to a [`cmd`] module; the engine
//! that drives many clients over worker processes is in [`coordinator`] and [`worker`].

mod channelmesh;
mod client;
mod clock;
mod cmd;
mod coordinator;
mod cpu;
mod nats;
mod pace;
mod plan;
mod protocol;
mod report;
mod rss;
mod rtm;
mod worker;
mod ws;
mod wsraw;

use clap::{Parser, Subcommand};

use plan::Scenario;

#[derive(Debug, Parser)]
#[command(
    name = "channelmesh-loadgen",
    about = "Measure the mesh from outside, through its real interfaces"
)]
struct Cli {
    #[command(flatten)]
    log: mesh_telemetry::LogArgs,
    // The transport flags `channelmesh` takes (`channelmesh bench` passes them on): with
    // `--tls-*`, an `https://` admin API is checked against --tls-ca.
    #[command(flatten)]
    tls: mesh_transport::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fan-out: few channels, many subscribers (CLIENTS over CHANNELS); publishes at RATE for
    /// SECONDS (member clients over their WebSocket, or the admin API) and reports delivered/s,
    /// publish -> receive latency percentiles, connect rate, lost messages. Against
    /// channelmesh (needs CHANNELMESH_JWT_SECRET, as `dev` prints it) or nats-server.
    Fanout(cmd::load::LoadArgs),
    /// Chat: many small channels (mostly 2-5 members online, a few larger), a publisher in
    /// each at a modest rate.
    Chat(cmd::load::LoadArgs),
    /// Connect/disconnect churn: CLIENTS stay connected while CHURN of them per second close
    /// and reconnect; reports connects/s, failures, connect time percentiles.
    ConnectStorm(cmd::load::LoadArgs),
    /// Idle connections: connects CLIENTS, holds them SECONDS; with --server-pid, the server's
    /// RSS per connection.
    Idle(cmd::load::LoadArgs),
    /// A load generator worker: started by the scenarios above, orders on stdin.
    #[command(hide = true)]
    Worker,
    /// Presence fan-out: one presence server (started here, with its ring manager) takes
    /// online/offline reports for USERS from one gateway session as fast as it can while
    /// WATCHERS gateway sessions watch them all; reports updates taken and pushed per second.
    Presence(cmd::presence::Args),
    /// Channel-server memory: fills a channel server's store with CHANNELS active channels of
    /// EVENTS messages each (in this process) and reports the RSS it took; with --mesh, fills
    /// real channel servers at replication factor 1 and --replication-factor and reports what
    /// a follower copy of a channel costs.
    ChannelMemory(cmd::channel_memory::Args),
    /// Channel server failover: in a fresh `dev --multi-process` mesh per run (ports the OS
    /// picks), SIGKILLs the owner of a channel a client listens on while posts keep coming, and
    /// reports how long delivery stopped and which slots moved.
    Failover(cmd::failover::Args),
    /// Scale on one box: connects CLIENTS idle clients of one team over many gateways from
    /// many processes and source addresses, reports memory per connection (servers, kernel,
    /// load generator), posts one message to the team's channel through the admin API and
    /// reports how many received it and when the first and the last did.
    Scale(cmd::scale::Args),
    /// A `scale` worker: started by `scale`, orders on stdin.
    #[command(hide = true)]
    ScaleWorker(cmd::scale::WorkerArgs),
    /// Admin -> client delivery latency: posts messages one at a time through the admin API
    /// and times each until a connected RTM client receives it. Needs CHANNELMESH_JWT_SECRET
    /// and CHANNELMESH_ADMIN_TOKEN (as `dev` prints them).
    Latency(cmd::latency::Args),
    /// The load generator's headroom: a trivial server that takes a `fanout` run's connect
    /// flow (RTM or NATS) and writes pre-built, freshly stamped deliveries to its clients at
    /// RATE per second, evenly paced, from the run's first publish on; the run's report then
    /// shows what the load generator alone takes (bench/README.md).
    Blast(cmd::blast::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Spans go out under the name `channelmesh bench` always had.
    let tracing = runtime.block_on(async {
        mesh_telemetry::init(
            cli.log.log_json,
            cli.log.otlp_endpoint.as_deref(),
            "channelmesh",
        )
    });
    let tracing = match tracing {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Spans still buffered go out before the process ends.
    tracing.shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(transport) = cli.tls.transport()? {
        mesh_transport::configure(transport)?;
    }
    match cli.command {
        Command::Fanout(args) => cmd::load::main(Scenario::Fanout, args).await,
        Command::Chat(args) => cmd::load::main(Scenario::Chat, args).await,
        Command::ConnectStorm(args) => cmd::load::main(Scenario::ConnectStorm, args).await,
        Command::Idle(args) => cmd::load::main(Scenario::Idle, args).await,
        Command::Worker => worker::main().await,
        Command::Presence(args) => cmd::presence::main(args).await,
        Command::ChannelMemory(args) => cmd::channel_memory::main(args).await,
        Command::Failover(args) => cmd::failover::main(args).await,
        Command::Latency(args) => cmd::latency::main(args).await,
        Command::Scale(args) => cmd::scale::main(args).await,
        Command::ScaleWorker(args) => cmd::scale::worker(args).await,
        Command::Blast(args) => cmd::blast::main(args).await,
    }
}
