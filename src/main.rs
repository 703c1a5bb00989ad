//! `channelmesh`: the one binary. Parses arguments and hands off to the service libraries.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use channelmesh::mesh::{Mesh, MeshConfig, unix_now};
use clap::{Args, Parser, Subcommand};
use mesh_core::{ChannelId, Identity, NodeId, TeamId, TokenKey, UserId};
use rand::RngCore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Env var: the HS256 secret client tokens are signed with.
const ENV_JWT_SECRET: &str = "CHANNELMESH_JWT_SECRET";
/// Env var: the admin API's bearer token.
const ENV_ADMIN_TOKEN: &str = "CHANNELMESH_ADMIN_TOKEN";
/// Env var: the ring manager's gRPC endpoint.
const ENV_RING_MANAGER: &str = "CHANNELMESH_RING_MANAGER";
/// The ring manager `dev` starts, and the default everyone else dials.
const DEFAULT_RING_MANAGER: &str = "http://127.0.0.1:50050";
/// How long shutdown waits for services to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "channelmesh",
    version,
    about = "Slack's real-time messaging architecture: channel servers on a consistent-hash ring, regional gateways, admin servers."
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole mesh in one process: ring manager, 3 channel servers, admin server on
    /// 127.0.0.1:50051, gateways us-east on 127.0.0.1:8080 and eu-west on 127.0.0.1:8081.
    Dev(DevArgs),
    /// Run a ring manager (embedded registry).
    RingManager {
        /// Address to serve gRPC on.
        #[arg(long, default_value = "127.0.0.1:50050")]
        listen: SocketAddr,
    },
    /// Run a channel server.
    ChannelServer {
        /// Its id on the ring, e.g. cs-1.
        #[arg(long)]
        id: String,
        /// Address to serve gRPC on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Address others dial, if not the listen address.
        #[arg(long)]
        advertise: Option<String>,
        /// Join as a standby: no slots until it replaces a failed node or is added.
        #[arg(long)]
        standby: bool,
        #[command(flatten)]
        ring: RingArgs,
    },
    /// Run an admin server (needs CHANNELMESH_ADMIN_TOKEN and CHANNELMESH_JWT_SECRET).
    AdminServer {
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        #[command(flatten)]
        ring: RingArgs,
    },
    /// Run a gateway for one region (needs CHANNELMESH_JWT_SECRET).
    Gateway {
        /// The region it serves, e.g. us-east.
        #[arg(long)]
        region: String,
        /// Its id, unique in the mesh; defaults to REGION-1.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The base URL clients reach it at (e.g. its region's Envoy); defaults to the listen
        /// address.
        #[arg(long)]
        public_url: Option<String>,
        #[command(flatten)]
        ring: RingArgs,
    },
    /// Measure the mesh from outside, through its real interfaces.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Mint a client token (signed with CHANNELMESH_JWT_SECRET) for trying things out.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        team: String,
        /// A channel the token admits; repeat for more.
        #[arg(long = "channel")]
        channels: Vec<String>,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
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

#[derive(Debug, Args)]
struct DevArgs {
    /// Admin server address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    admin: SocketAddr,
    /// Ring manager address.
    #[arg(long, default_value = "127.0.0.1:50050")]
    ring_manager: SocketAddr,
    /// Gateway for the us-east region.
    #[arg(long, default_value = "127.0.0.1:8080")]
    us_east: SocketAddr,
    /// Gateway for the eu-west region.
    #[arg(long, default_value = "127.0.0.1:8081")]
    eu_west: SocketAddr,
    /// Port of the first of the three channel servers (the others follow); 0 lets the OS pick.
    #[arg(long, default_value_t = 50061)]
    channel_server_port: u16,
}

#[derive(Debug, Args)]
struct RingArgs {
    /// The ring manager's gRPC endpoint.
    #[arg(long, env = ENV_RING_MANAGER, default_value = DEFAULT_RING_MANAGER)]
    ring_manager: String,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,channelmesh=info,ring_manager=info,channel_server=info,gateway=info,admin_server=info",
        )
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A required secret from the environment.
fn required_env(name: &str) -> anyhow::Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => anyhow::bail!("{name} must be set (only `channelmesh dev` generates it)"),
    }
}

fn random_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cancels `cancel` on ctrl-c or SIGTERM.
fn cancel_on_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
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
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_json);
    let cancel = CancellationToken::new();
    match cli.command {
        Command::Dev(args) => dev(args, cancel).await,
        Command::RingManager { listen } => {
            cancel_on_signals(cancel.clone());
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let tracker = tokio_util::task::TaskTracker::new();
            let config = ring_manager::Config::default();
            let manager = ring_manager::RingManager::new(config, &tracker, cancel.clone());
            Ok(ring_manager::serve(manager, listener, cancel).await?)
        }
        Command::ChannelServer {
            id,
            listen,
            advertise,
            standby,
            ring,
        } => {
            cancel_on_signals(cancel.clone());
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let config = channel_server::Config {
                node: NodeId::new(&id)?,
                ring_manager: ring.ring_manager,
                advertise,
                limits: channel_server::Limits::default(),
                gateway_queue: channel_server::DEFAULT_GATEWAY_QUEUE,
                standby,
            };
            Ok(channel_server::serve(config, listener, cancel).await?)
        }
        Command::AdminServer { listen, ring } => {
            let config = admin_server::Config {
                ring_manager: ring.ring_manager,
                admin_token: required_env(ENV_ADMIN_TOKEN)?,
                jwt_secret: required_env(ENV_JWT_SECRET)?.into_bytes(),
            };
            cancel_on_signals(cancel.clone());
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            Ok(admin_server::serve(config, listener, cancel).await?)
        }
        Command::Gateway {
            region,
            id,
            listen,
            public_url,
            ring,
        } => {
            let config = gateway::Config {
                id: id.unwrap_or_else(|| format!("{region}-1")),
                region,
                ring_manager: ring.ring_manager,
                public_url,
                jwt_secret: required_env(ENV_JWT_SECRET)?.into_bytes(),
                connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
            };
            cancel_on_signals(cancel.clone());
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            Ok(gateway::serve(config, listener, cancel).await?)
        }
        Command::Bench(BenchCommand::Latency {
            gateway,
            admin,
            messages,
            warmup,
            json,
        }) => {
            let config = channelmesh::bench::LatencyConfig {
                gateway,
                admin,
                admin_token: required_env(ENV_ADMIN_TOKEN)?,
                jwt_secret: required_env(ENV_JWT_SECRET)?,
                messages,
                warmup,
            };
            let report = channelmesh::bench::latency(config).await?;
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
        Command::Token {
            user,
            team,
            channels,
            name,
            ttl,
        } => {
            let secret = required_env(ENV_JWT_SECRET)?;
            let now = unix_now();
            let identity = Identity {
                user: UserId::new(&user)?,
                team: TeamId::new(&team)?,
                name,
                channels: channels
                    .iter()
                    .map(|c| ChannelId::new(c))
                    .collect::<Result<_, _>>()?,
                expires_at: now + ttl,
            };
            println!(
                "{}",
                TokenKey::hs256(secret.as_bytes()).mint(&identity, now)?
            );
            Ok(())
        }
    }
}

async fn dev(args: DevArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (jwt_secret, generated_jwt) = match from_env(ENV_JWT_SECRET) {
        Some(s) => (s, false),
        None => (random_secret(), true),
    };
    let (admin_token, generated_admin) = match from_env(ENV_ADMIN_TOKEN) {
        Some(s) => (s, false),
        None => (random_secret(), true),
    };
    let mut config = MeshConfig::dev(jwt_secret, admin_token);
    config.admin = args.admin;
    config.ring_manager = args.ring_manager;
    config.gateways = vec![
        ("us-east".into(), args.us_east),
        ("eu-west".into(), args.eu_west),
    ];
    config.channel_servers = (0..3)
        .map(|i| {
            let port = match args.channel_server_port {
                0 => 0,
                base => base.saturating_add(i),
            };
            SocketAddr::from(([127, 0, 0, 1], port))
        })
        .collect();
    cancel_on_signals(cancel.clone());
    let mesh = Mesh::start(config, cancel).await?;

    println!("channelmesh dev mesh (embedded ring manager)");
    println!("  ring manager     grpc://{}", mesh.ring_manager);
    for (node, addr) in &mesh.channel_servers {
        println!("  channel server   {node} grpc://{addr}");
    }
    println!(
        "  admin server     grpc://{}  (channelmesh.admin.v1.Admin, reflection on)",
        mesh.admin
    );
    for (region, addr) in &mesh.gateways {
        println!("  gateway {region:<8} http://{addr}/api/  (RTM base URL)");
    }
    if generated_jwt {
        println!("  {ENV_JWT_SECRET}={}  (generated)", mesh.jwt_secret);
    }
    if generated_admin {
        println!("  {ENV_ADMIN_TOKEN}={}  (generated)", mesh.admin_token);
    }
    println!("ready in {} ms", mesh.started_in.as_millis());
    mesh.run_until_stopped(SHUTDOWN_GRACE).await
}
