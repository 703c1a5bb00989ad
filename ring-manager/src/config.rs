//! A ring manager's configuration: the `ring-manager` command's flags ([`Args`]) and the typed
//! [`ProcessConfig`] a ring-manager process runs with — its failure detection ([`Config`]), its
//! addresses, and the [`Backend`] that keeps the ring.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ring_client::{ConsulArgs, ConsulRing};

use crate::Config;
use crate::Error;
use crate::cluster::{DEFAULT_LOCK_DELAY, DEFAULT_SESSION_TTL};
use crate::console::actions::Operators;
use crate::server::DEFAULT_REPLICATION_FACTOR;

/// Default: the address to serve gRPC on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50050";

/// The `ring-manager` command's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to serve gRPC on (with --consul: only while it leads).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Save the ring and its members here after every change, and resume from it on start
    /// (without it, a restarted ring manager starts an empty ring). Embedded mode only:
    /// with --consul the ring lives in Consul KV.
    #[arg(long, conflicts_with = "consul")]
    pub state_file: Option<PathBuf>,
    /// The gRPC endpoint others dial when it leads (with --consul); defaults to
    /// http://LISTEN.
    #[arg(long)]
    pub advertise: Option<String>,
    /// With --consul: the leader's session TTL in seconds (Consul allows 10 to 86400).
    #[arg(long, default_value_t = DEFAULT_SESSION_TTL.as_secs())]
    pub session_ttl_secs: u64,
    /// A region's nearest regions, nearest first, for drains: REGION=R1,R2 (repeatable).
    /// Regions without one prefer the others by name.
    #[arg(long = "nearest", value_parser = parse_nearest)]
    pub nearest: Vec<(String, Vec<String>)>,
    /// With --consul: the lock-delay in milliseconds after a leader's session ends.
    #[arg(long, default_value_t = DEFAULT_LOCK_DELAY.as_millis() as u64)]
    pub lock_delay_ms: u64,
    /// Address to serve HTTP on: the SRE console (/), its JSON (/api/state, /api/events),
    /// /metrics, /healthz and /readyz (ready while it serves the ring). Default: --listen's
    /// port + 40 (50050 -> 50090) on loopback, or a port the OS picks when --listen's is 0.
    /// Off loopback it needs --http-token.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// The role a node's certificate must name to join this ring: channel-server (the channel
    /// ring) or presence-server (the presence ring's ring manager must say so).
    #[arg(
        long,
        env = "CHANNELMESH_NODE_ROLE",
        value_parser = parse_node_role,
        default_value = "channel-server"
    )]
    pub node_role: mesh_transport::Role,
    /// How many channel servers hold each slot: its owner and N-1 followers, which receive
    /// every event before it is acknowledged and take the slot with its history when the owner
    /// dies. 1: no followers (a dead node's history is lost). The presence ring has no
    /// followers whatever this says (presence is soft state).
    #[arg(
        long,
        env = ENV_REPLICATION_FACTOR,
        value_parser = parse_replication_factor,
        default_value_t = DEFAULT_REPLICATION_FACTOR
    )]
    pub replication_factor: usize,
    /// Who may act from the console (drain and undrain a node or a region, disconnect a user):
    /// NAME:TOKEN (the log records NAME) or TOKEN (named `operator`), repeatable or a comma
    /// list; the page sends it in the X-Channelmesh-Operator-Token header. None: every action
    /// is refused.
    #[arg(
        long = "operator-token",
        env = crate::console::actions::ENV_OPERATOR_TOKEN,
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub operator_tokens: Vec<String>,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

/// The environment variable of `--replication-factor`.
pub const ENV_REPLICATION_FACTOR: &str = "CHANNELMESH_REPLICATION_FACTOR";

/// `--replication-factor`: 1 or more.
pub fn parse_replication_factor(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(
            "0 would keep no copy of a slot: the replication factor counts the owner, so 1 (no \
             followers) is the least"
                .to_string(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "{s:?} is not a replication factor: a whole number, 1 (no followers) or more"
        )),
    }
}

/// `--node-role`: a ring node's role.
fn parse_node_role(s: &str) -> Result<mesh_transport::Role, String> {
    use mesh_transport::Role;
    match s.parse::<Role>() {
        Ok(role @ (Role::ChannelServer | Role::PresenceServer)) => Ok(role),
        _ => Err(format!(
            "{s:?} is not a ring node's role: channel-server or presence-server"
        )),
    }
}

/// Everything one ring-manager process runs with.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The timing of its failure detection.
    pub manager: Config,
    /// The address to serve gRPC on (on Consul: while it leads).
    pub listen: SocketAddr,
    /// The console's address: the SRE console, `/healthz`, `/readyz`.
    pub console: SocketAddr,
    /// Each region's nearest regions, nearest first (for drains).
    pub nearest: Vec<(String, Vec<String>)>,
    /// What keeps the ring.
    pub backend: Backend,
    /// Its own metrics (the refusals of its gRPC calls), served on the console's `/metrics`
    /// beside the ring's.
    pub telemetry: mesh_telemetry::Telemetry,
    /// Who may act from the console (none: actions are refused).
    pub operators: Operators,
}

/// What keeps the ring.
#[derive(Debug, Clone)]
pub enum Backend {
    /// This ring manager is the registry; with a state file the ring survives its restarts.
    Embedded { state_file: Option<PathBuf> },
    /// One of a group of ring managers that elect a leader in Consul and keep the ring in
    /// its KV.
    Consul {
        ring: ConsulRing,
        /// The gRPC endpoint others dial while this one leads.
        endpoint: String,
        /// The leader's session TTL.
        session_ttl: Duration,
        /// How long the lock stays untakeable after a leader's session ends.
        lock_delay: Duration,
    },
}

impl ProcessConfig {
    /// An embedded ring manager with no state file, serving gRPC on `listen` and its console
    /// on `console`.
    pub fn embedded(manager: Config, listen: SocketAddr, console: SocketAddr) -> Self {
        ProcessConfig {
            manager,
            listen,
            console,
            nearest: Vec::new(),
            backend: Backend::Embedded { state_file: None },
            telemetry: mesh_telemetry::Telemetry::default(),
            operators: Operators::default(),
        }
    }

    /// The configuration `args` ask for.
    pub fn from_args(args: &Args) -> Result<Self, Error> {
        let backend = match args.consul.ring()? {
            Some(ring) => {
                // Others find the leader by the endpoint it publishes before it binds.
                if args.listen.port() == 0 {
                    return Err(Error::ConsulNeedsFixedPort);
                }
                Backend::Consul {
                    ring,
                    endpoint: args
                        .advertise
                        .clone()
                        .unwrap_or_else(|| format!("http://{}", args.listen)),
                    session_ttl: Duration::from_secs(args.session_ttl_secs),
                    lock_delay: Duration::from_millis(args.lock_delay_ms),
                }
            }
            None => Backend::Embedded {
                state_file: args.state_file.clone(),
            },
        };
        // Presence is soft state, rebuilt from the gateways: its ring places no followers.
        let replication_factor = match args.node_role {
            mesh_transport::Role::PresenceServer => 1,
            _ => args.replication_factor,
        };
        Ok(ProcessConfig {
            manager: Config {
                node_role: Some(args.node_role),
                replication_factor,
                ..Config::default()
            },
            listen: args.listen,
            console: mesh_telemetry::side_port::http_addr(args.http, args.listen),
            nearest: args.nearest.clone(),
            backend,
            telemetry: mesh_telemetry::Telemetry::default(),
            operators: Operators::parse(&args.operator_tokens).map_err(Error::OperatorToken)?,
        })
    }
}

/// `REGION=R1,R2`.
fn parse_nearest(raw: &str) -> Result<(String, Vec<String>), String> {
    let (region, nearest) = raw
        .split_once('=')
        .ok_or_else(|| format!("{raw:?}: expected REGION=R1,R2"))?;
    Ok((
        region.to_string(),
        nearest
            .split(',')
            .filter(|r| !r.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn config(args: &[&str]) -> Result<ProcessConfig, Error> {
        let cli = Cli::parse_from(std::iter::once("ring-manager").chain(args.iter().copied()));
        ProcessConfig::from_args(&cli.args)
    }

    #[test]
    fn a_ring_takes_channel_servers_unless_told_it_is_the_presence_ring() {
        use mesh_transport::Role;
        let c = config(&[]).unwrap();
        assert_eq!(c.manager.node_role, Some(Role::ChannelServer));
        let c = config(&["--node-role", "presence-server"]).unwrap();
        assert_eq!(c.manager.node_role, Some(Role::PresenceServer));
        for other in ["gateway", "operator", "either"] {
            assert!(Cli::try_parse_from(["ring-manager", "--node-role", other]).is_err());
        }
    }

    #[test]
    fn the_replication_factor_defaults_to_two_refuses_zero_and_the_presence_ring_has_none() {
        assert_eq!(config(&[]).unwrap().manager.replication_factor, 2);
        let c = config(&["--replication-factor", "3"]).unwrap();
        assert_eq!(c.manager.replication_factor, 3);
        let c = config(&["--replication-factor", "1"]).unwrap();
        assert_eq!(c.manager.replication_factor, 1);
        let zero = Cli::try_parse_from(["ring-manager", "--replication-factor", "0"]).unwrap_err();
        assert!(
            zero.to_string().contains(
                "0 would keep no copy of a slot: the replication factor counts the owner"
            ),
            "{zero}"
        );
        assert!(Cli::try_parse_from(["ring-manager", "--replication-factor", "two"]).is_err());
        let c = config(&[
            "--node-role",
            "presence-server",
            "--replication-factor",
            "3",
        ])
        .unwrap();
        assert_eq!(c.manager.replication_factor, 1, "presence is soft state");
    }

    #[test]
    fn the_console_is_next_to_the_grpc_port_on_loopback_unless_given() {
        let c = config(&["--listen", "127.0.0.1:50052"]).unwrap();
        assert_eq!(c.console.to_string(), "127.0.0.1:50092");
        let c = config(&["--listen", "0.0.0.0:50050"]).unwrap();
        assert_eq!(c.console.to_string(), "127.0.0.1:50090");
        assert!(matches!(c.backend, Backend::Embedded { state_file: None }));
        let c = config(&["--http", "127.0.0.1:9000"]).unwrap();
        assert_eq!(c.console.to_string(), "127.0.0.1:9000");
    }

    #[test]
    fn on_consul_it_needs_a_fixed_port_and_advertises_it() {
        let consul = ["--consul", "http://127.0.0.1:8500"];
        let error = config(&[&consul[..], &["--listen", "127.0.0.1:0"]].concat()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "--consul needs a fixed --listen port: it is published before it is bound"
        );
        let c = config(&[&consul[..], &["--listen", "10.0.0.5:50050"]].concat()).unwrap();
        assert!(
            matches!(c.backend, Backend::Consul { ref endpoint, .. } if endpoint == "http://10.0.0.5:50050")
        );
    }

    #[test]
    fn nearest_regions_parse() {
        let c = config(&[
            "--nearest",
            "us-east=eu-west,ap-south",
            "--nearest",
            "eu-west=",
        ])
        .unwrap();
        assert_eq!(
            c.nearest,
            [
                (
                    "us-east".to_string(),
                    vec!["eu-west".to_string(), "ap-south".to_string()]
                ),
                ("eu-west".to_string(), vec![]),
            ]
        );
        assert!(parse_nearest("us-east").is_err());
    }
}
