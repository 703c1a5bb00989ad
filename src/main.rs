//! `channelmesh`: the one binary. Parses the command line, sets up logging, turns ctrl-c and
//! SIGTERM into one cancellation, and hands each command to the library that runs it; every
//! command then gets the same shutdown grace ([`shutdown`]).

use std::process::ExitCode;
use std::time::Duration;

use channelmesh::{certs, chaos, ctl, dev, loadgen, probe, shutdown, token};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mimalloc, not the system's glibc malloc: every service runs in this binary, and the fan-out's
/// per-event allocations (frames, gRPC messages, boxed futures) were a fifth to a third of its
/// profile; docs/decisions.md ("The allocator") has the measurement. The `system-allocator`
/// feature keeps the system's malloc, for heap profilers (bench/README.md, `bench/idle.sh`).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long a command may take to stop after ctrl-c or SIGTERM; then it is abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "channelmesh",
    version,
    about = "Slack's real-time messaging architecture: channel servers on a consistent-hash ring, regional gateways, admin servers."
)]
struct Cli {
    #[command(flatten)]
    log: mesh_telemetry::LogArgs,
    #[command(flatten)]
    tls: mesh_transport::TlsArgs,
    #[command(flatten)]
    http: mesh_telemetry::HttpArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole mesh in one process: ring manager, 3 channel servers, admin server on
    /// 127.0.0.1:50051, gateways us-east on 127.0.0.1:8080 and eu-west on 127.0.0.1:8081.
    Dev(dev::DevArgs),
    /// Run a ring manager: the embedded registry, or with --consul one of a group that elects
    /// a leader in Consul and keeps the ring in Consul KV.
    RingManager(ring_manager::Args),
    /// Run a channel server.
    ChannelServer(channel_server::Args),
    /// Run a presence server, on the presence ring (see --presence-ring-manager).
    PresenceServer(presence_server::Args),
    /// Run an admin server (needs CHANNELMESH_ADMIN_TOKEN and CHANNELMESH_JWT_SECRET).
    AdminServer(admin_server::Args),
    /// Run a gateway for one region (needs CHANNELMESH_JWT_SECRET, or --jwt-public-key/--jwks).
    Gateway(gateway::Args),
    /// Fault injection: run a multi-process mesh of its own under a workload, kill, freeze and
    /// skew its processes on a seeded schedule, and check its invariants at the end (exit 1
    /// when one broke).
    Chaos(chaos::ChaosArgs),
    /// SRE operations on the ring manager (by default the one `dev` starts).
    Ctl(ctl::CtlArgs),
    /// Measure the mesh from outside, through its real interfaces.
    ///
    /// Runs the load generator, `channelmesh-loadgen` (beside this binary, or at
    /// $CHANNELMESH_LOADGEN), with these arguments: `channelmesh bench --help` lists its
    /// commands.
    #[command(disable_help_flag = true)]
    Bench {
        /// The load generator's command and its flags, passed on as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Check a service's health endpoint (e.g. http://127.0.0.1:50101/readyz): exit 0 on a 2xx
    /// answer within 2 s, else 1 with the answer. For container health checks, whose images
    /// have no curl.
    Probe(probe::ProbeArgs),
    /// Mint a client token (signed with CHANNELMESH_JWT_SECRET) for trying things out.
    Token(token::TokenArgs),
    /// Issue the mesh's mutual-TLS certificates: a CA in --dir (made unless one is there),
    /// and a certificate per ROLE/ID[=HOST,HOST] from it (ID.pem, ID.key).
    Certs(certs::CertsArgs),
}

impl Command {
    /// The `service.name` its spans are exported under.
    fn service_name(&self) -> &'static str {
        match self {
            Command::Dev(_) => "channelmesh-dev",
            Command::RingManager(_) => "channelmesh-ring-manager",
            Command::ChannelServer(_) => "channelmesh-channel-server",
            Command::PresenceServer(_) => "channelmesh-presence-server",
            Command::AdminServer(_) => "channelmesh-admin-server",
            Command::Gateway(_) => "channelmesh-gateway",
            _ => "channelmesh",
        }
    }

    /// The addresses a service listens on for gRPC (or, for a gateway, its clients), which
    /// `--insecure` keeps on loopback; `None` for a command that is not a service.
    fn listen(&self) -> Option<(&'static str, Vec<std::net::SocketAddr>)> {
        match self {
            Command::RingManager(a) => Some(("ring-manager", vec![a.listen])),
            Command::ChannelServer(a) => Some(("channel-server", vec![a.listen])),
            Command::PresenceServer(a) => Some(("presence-server", vec![a.listen])),
            Command::AdminServer(a) => Some(("admin-server", vec![a.listen])),
            Command::Gateway(a) => Some(("gateway", vec![a.listen])),
            _ => None,
        }
    }

    /// Whether it takes `--policy-file` and reloads it on SIGHUP.
    fn reloads_policies(&self) -> bool {
        matches!(
            self,
            Command::Dev(_) | Command::Gateway(_) | Command::ChannelServer(_)
        )
    }

    /// Runs the command until it ends; `cancel` asks it to stop. `log_args` are the logging
    /// flags `dev --multi-process` passes on; `transport` the transport flags.
    async fn run(
        self,
        log_args: Vec<String>,
        transport: &mesh_transport::TlsArgs,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        match self {
            Command::Dev(args) => dev::run(args, log_args, transport, cancel, SHUTDOWN_GRACE).await,
            Command::RingManager(args) => Ok(ring_manager::run::run(args, cancel).await?),
            Command::ChannelServer(args) => Ok(channel_server::run::run(args, cancel).await?),
            Command::PresenceServer(args) => Ok(presence_server::run::run(args, cancel).await?),
            Command::AdminServer(args) => Ok(admin_server::run::run(args, cancel).await?),
            Command::Gateway(args) => Ok(gateway::run::run(args, cancel).await?),
            Command::Ctl(args) => ctl::run(args, transport.transport()?, cancel).await,
            Command::Chaos(args) => chaos::run(args, log_args, cancel).await,
            Command::Bench { .. } => unreachable!("handled in main, before the runtime starts"),
            Command::Probe(args) => probe::run(args).await,
            Command::Token(args) => token::run(args),
            Command::Certs(args) => certs::run(args),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { args } = cli.command {
        // The flags given before `bench` go first; the load generator takes them too.
        return loadgen::run([cli.tls.to_args(), cli.log.to_args()].concat(), args);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let service_name = cli.command.service_name();
    let tracing = runtime.block_on(async {
        mesh_telemetry::init(
            cli.log.log_json,
            cli.log.otlp_endpoint.as_deref(),
            service_name,
        )
    });
    let tracing = match tracing {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Spans still buffered go out before the process ends.
    tracing.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.is::<shutdown::Abandoned>() {
                // What did not stop is left behind rather than waited for.
                runtime.shutdown_background();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    cli.http.configure()?;
    // A service speaks mutual TLS as its flags say, or plaintext only when told so; `dev`
    // and `ctl` set up their own.
    if let Some((command, listen)) = cli.command.listen() {
        let transport = cli
            .tls
            .transport()?
            .ok_or_else(|| mesh_transport::Error::NoTransport {
                command: command.to_string(),
            })?;
        cli.tls.check_listen(&listen)?;
        if transport == mesh_transport::Transport::Insecure {
            channelmesh::warn_insecure();
        }
        mesh_transport::configure(transport)?;
    }
    let cancel = CancellationToken::new();
    shutdown::cancel_on_signals(cancel.clone());
    if cli.command.reloads_policies() {
        shutdown::reload_on_sighup(cancel.clone());
    }
    let work = cli.command.run(cli.log.to_args(), &cli.tls, cancel.clone());
    shutdown::supervise(work, &cancel, SHUTDOWN_GRACE).await
}
