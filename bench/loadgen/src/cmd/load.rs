//! `fanout`, `chat`, `connect-storm`, `idle`: many clients over worker processes. This module
//! turns the flags into the [`Plan`] every worker gets, has the [`coordinator`] run it, and
//! prints the [`Report`] (a table, or JSON with `--json`).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::clock;
use crate::coordinator::{self, RunOptions};
use crate::plan::{Plan, PublishMode, Scenario, Shape, Target};
use crate::report::Report;

/// Clients per worker process when `--processes` is not given (under the 20,000 open files a
/// process may hold, with room for the rest).
const CLIENTS_PER_PROCESS: usize = 15_000;
/// The dev mesh's gateways, us-east and eu-west.
const DEV_GATEWAYS: [&str; 2] = ["http://127.0.0.1:8080/api/", "http://127.0.0.1:8081/api/"];
/// Where `bench/compare.sh` puts nats-server's WebSocket listener.
const DEFAULT_NATS: &str = "ws://127.0.0.1:4223";

/// `fanout|chat|connect-storm|idle`'s flags.
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
    /// Open loop: publishers never wait for acknowledgements; each message is sent when the
    /// clock says it is due (and carries that time). Acks are read only to count them.
    #[arg(long)]
    pub open_loop: bool,
    /// The publish shape (overrides --publish): per-channel (one member per channel),
    /// firehose (one connection publishing to every channel), admin (the admin API's
    /// PublishStream from one process, open loop; PostMessage calls closed loop).
    #[arg(long, value_enum)]
    pub shape: Option<Shape>,
    /// Rate steps in one connected run: messages/s over the whole run, comma-separated (e.g.
    /// 1000,2000,4000); each is published for --step-seconds, then settled.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u64>,
    /// How long each rate step publishes.
    #[arg(long, default_value_t = 5)]
    pub step_seconds: u64,
    /// After each step, how long to wait at most for every expected delivery.
    #[arg(long, default_value_t = 5)]
    pub settle_seconds: u64,
    /// `PublishStream`s of the admin shape (open loop), all from one worker process.
    #[arg(long, default_value_t = 1)]
    pub admin_streams: usize,
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
pub async fn main(scenario: Scenario, args: LoadArgs) -> anyhow::Result<()> {
    let (plan, processes) = plan_for(scenario, &args)?;
    // Open loop without --rates: one step at --rate for --seconds.
    let (rates, step) = if args.rates.is_empty() && plan.open_loop {
        (vec![plan.rate], args.seconds)
    } else {
        (args.rates.clone(), args.step_seconds)
    };
    let options = RunOptions {
        duration: Duration::from_secs(args.seconds),
        server_pids: args.server_pids,
        progress: args.progress,
        rates,
        step: Duration::from_secs(step.max(1)),
        settle: Duration::from_secs(args.settle_seconds),
    };
    let report: Report = coordinator::run(plan, processes, &options).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
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
    let publish = args.shape.map_or(args.publish, Shape::publish);
    if publishing && args.open_loop {
        anyhow::ensure!(
            args.rate > 0 || !args.rates.is_empty(),
            "open loop needs a rate (--rate or --rates)"
        );
    }
    anyhow::ensure!(
        args.rates.iter().all(|&r| r > 0) || !args.open_loop,
        "open-loop rates must be above 0"
    );
    if !args.rates.is_empty() {
        anyhow::ensure!(
            publishing,
            "--rates needs a publishing scenario (fanout, chat)"
        );
    }
    if publish == PublishMode::Firehose {
        anyhow::ensure!(
            scenario == Scenario::Fanout,
            "--shape firehose is a fanout shape (its connection is a member of every channel)"
        );
    }
    anyhow::ensure!(args.admin_streams > 0, "--admin-streams must be at least 1");
    let (mut jwt_secret, mut admin_token) = (String::new(), String::new());
    if args.target == Target::Channelmesh {
        jwt_secret = args
            .jwt_secret
            .clone()
            .filter(|s| !s.is_empty())
            .context("CHANNELMESH_JWT_SECRET must be set (`channelmesh dev` prints it)")?;
        if publishing && publish == PublishMode::Admin {
            admin_token = args
                .admin_token
                .clone()
                .filter(|s| !s.is_empty())
                .context("CHANNELMESH_ADMIN_TOKEN must be set for --publish admin")?;
        }
    } else if publishing && publish == PublishMode::Admin {
        bail!("nats-server has no admin API: use --publish clients");
    }
    let plan = Plan {
        scenario,
        target: args.target,
        // Only the publishing scenarios publish.
        publish: if publishing {
            publish
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
        run: clock::micros_now(),
        processes,
        worker: 0,
        source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        connect_parallel: args.connect_parallel.max(1),
        open_loop: publishing && args.open_loop,
        admin_streams: args.admin_streams,
    };
    Ok((plan, processes))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let open = args(&["--target", "nats", "--open-loop", "--rate", "0"]);
        assert!(plan_for(Scenario::Fanout, &open).is_err());
        let chat_firehose = args(&["--target", "nats", "--shape", "firehose"]);
        assert!(plan_for(Scenario::Chat, &chat_firehose).is_err());
        let nats_admin_shape = args(&["--target", "nats", "--shape", "admin", "--open-loop"]);
        assert!(plan_for(Scenario::Fanout, &nats_admin_shape).is_err());
        let (plan, _) = plan_for(
            Scenario::Fanout,
            &args(&[
                "--target",
                "nats",
                "--shape",
                "firehose",
                "--open-loop",
                "--rates",
                "10,20",
            ]),
        )
        .unwrap();
        assert_eq!(plan.publish, PublishMode::Firehose);
        assert!(plan.open_loop);
    }
}
