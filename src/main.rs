//! `channelmesh`: the one binary. Parses arguments and hands off to the service libraries.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use channelmesh::mesh::{Mesh, MeshConfig, unix_now};
use clap::{Args, Parser, Subcommand};
use gateway::limits::Limits;
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
/// Env var: the presence ring's ring manager.
const ENV_PRESENCE_RING_MANAGER: &str = "CHANNELMESH_PRESENCE_RING_MANAGER";
/// The presence ring manager `dev` starts, and the default everyone else dials.
const DEFAULT_PRESENCE_RING_MANAGER: &str = "http://127.0.0.1:50052";
/// Env var: the Consul agent to use instead of a fixed ring manager.
const ENV_CONSUL: &str = "CHANNELMESH_CONSUL";
/// Env var: Consul's ACL token (Consul's own name for it).
const ENV_CONSUL_TOKEN: &str = "CONSUL_HTTP_TOKEN";
/// The ring manager `dev` starts, and the default everyone else dials.
const DEFAULT_RING_MANAGER: &str = "http://127.0.0.1:50050";
/// Env var: the ring manager console's URL (for `ctl top`).
const ENV_CONSOLE: &str = "CHANNELMESH_CONSOLE";
/// The console of the ring manager `dev` starts, and the default `ctl top` reads.
const DEFAULT_CONSOLE: &str = "http://127.0.0.1:50090";
/// `dev --consul`: the second ring manager's port.
const DEV_EXTRA_RING_MANAGER: u16 = 50060;
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
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off when
    /// unset. `dev --multi-process` passes it to every child.
    #[arg(long, global = true, env = mesh_telemetry::init::ENV_OTLP_ENDPOINT)]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Command,
}

/// TLS for gRPC between the services (and to the admin API): all three files, or none.
#[derive(Debug, Clone, Args)]
struct TlsArgs {
    /// The CA certificate (PEM) every service's certificate is signed by; with --tls-cert and
    /// --tls-key, every gRPC server of this process serves TLS and every gRPC client dials TLS.
    #[arg(long, global = true, env = "CHANNELMESH_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// This process's certificate chain (PEM): valid for the addresses others dial it at, with
    /// the serverAuth and clientAuth key usages.
    #[arg(long, global = true, env = "CHANNELMESH_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, global = true, env = "CHANNELMESH_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// Servers refuse clients without a certificate signed by the CA (mutual TLS).
    #[arg(long, global = true, env = "CHANNELMESH_TLS_REQUIRE_CLIENT_CERT")]
    tls_require_client_cert: bool,
}

impl TlsArgs {
    /// Sets this process's gRPC transport from the flags (nothing when none is given).
    fn configure(&self) -> anyhow::Result<()> {
        let (ca, cert, key) = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => {
                anyhow::ensure!(
                    !self.tls_require_client_cert,
                    "--tls-require-client-cert needs --tls-ca, --tls-cert and --tls-key"
                );
                return Ok(());
            }
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            _ => anyhow::bail!("TLS needs all of --tls-ca, --tls-cert and --tls-key"),
        };
        let read = |path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        mesh_transport::configure(mesh_transport::Tls {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
            require_client_cert: self.tls_require_client_cert,
        })
        .map_err(anyhow::Error::msg)
    }

    /// The same settings as arguments, for child processes.
    fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, path) in [
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
        ] {
            if let Some(path) = path {
                args.push(format!("{flag}={}", path.display()));
            }
        }
        if self.tls_require_client_cert {
            args.push("--tls-require-client-cert".into());
        }
        args
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole mesh in one process: ring manager, 3 channel servers, admin server on
    /// 127.0.0.1:50051, gateways us-east on 127.0.0.1:8080 and eu-west on 127.0.0.1:8081.
    Dev(DevArgs),
    /// Run a ring manager: the embedded registry, or with --consul one of a group that elects
    /// a leader in Consul and keeps the ring in Consul KV.
    RingManager {
        /// Address to serve gRPC on (with --consul: only while it leads).
        #[arg(long, default_value = "127.0.0.1:50050")]
        listen: SocketAddr,
        /// Save the ring and its members here after every change, and resume from it on start
        /// (without it, a restarted ring manager starts an empty ring). Embedded mode only:
        /// with --consul the ring lives in Consul KV.
        #[arg(long, conflicts_with = "consul")]
        state_file: Option<std::path::PathBuf>,
        /// The gRPC endpoint others dial when it leads (with --consul); defaults to
        /// http://LISTEN.
        #[arg(long)]
        advertise: Option<String>,
        /// With --consul: the leader's session TTL in seconds (Consul allows 10 to 86400).
        #[arg(long, default_value_t = ring_manager::cluster::DEFAULT_SESSION_TTL.as_secs())]
        session_ttl_secs: u64,
        /// A region's nearest regions, nearest first, for drains: REGION=R1,R2 (repeatable).
        /// Regions without one prefer the others by name.
        #[arg(long = "nearest", value_parser = parse_nearest)]
        nearest: Vec<(String, Vec<String>)>,
        /// With --consul: the lock-delay in milliseconds after a leader's session ends.
        #[arg(long, default_value_t = ring_manager::cluster::DEFAULT_LOCK_DELAY.as_millis() as u64)]
        lock_delay_ms: u64,
        /// Address to serve HTTP on: the SRE console (/), its JSON (/api/state, /api/events),
        /// /healthz and /readyz (ready while it serves the ring). Default: --listen's port
        /// + 40 (50050 -> 50090), or a port the OS picks when --listen's is 0.
        #[arg(long)]
        http: Option<SocketAddr>,
        #[command(flatten)]
        consul: ConsulArgs,
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
        /// Address to serve /metrics, /healthz and /readyz on. Default: --listen's port + 40
        /// (50061 -> 50101), or a port the OS picks when --listen's is 0.
        #[arg(long)]
        http: Option<SocketAddr>,
        #[command(flatten)]
        ring: RingArgs,
    },
    /// Run a presence server, on the presence ring (see --presence-ring-manager).
    PresenceServer {
        /// Its id on the presence ring, e.g. ps-1.
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Address others dial, if not the listen address.
        #[arg(long)]
        advertise: Option<String>,
        /// Join as a standby: no users until it replaces a failed server or is added.
        #[arg(long)]
        standby: bool,
        /// How long a user stays active after their last connection ends (ms): a reconnect
        /// within it produces no away/active pair.
        #[arg(long, default_value_t = presence_server::DEFAULT_GRACE.as_millis() as u64)]
        grace_ms: u64,
        /// How long a gateway's session may stay silent before its users' reports are dropped
        /// (ms).
        #[arg(long, default_value_t = presence_server::DEFAULT_GATEWAY_LEASE.as_millis() as u64)]
        gateway_lease_ms: u64,
        /// Address to serve /metrics, /healthz and /readyz on. Default: --listen's port + 40.
        #[arg(long)]
        http: Option<SocketAddr>,
        #[command(flatten)]
        ring: RingArgs,
    },
    /// Run an admin server (needs CHANNELMESH_ADMIN_TOKEN and CHANNELMESH_JWT_SECRET).
    AdminServer {
        /// Its id in Consul's catalog, unique in the mesh; defaults to the listen address.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Address to serve /metrics, /healthz and /readyz on. Default: --listen's port + 40
        /// (50051 -> 50091).
        #[arg(long)]
        http: Option<SocketAddr>,
        #[command(flatten)]
        ring: RingArgs,
    },
    /// Run a gateway for one region (needs CHANNELMESH_JWT_SECRET, or --jwt-public-key/--jwks).
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
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        tokens: TokenArgs,
    },
    /// SRE operations on the ring manager (by default the one `dev` starts).
    Ctl(CtlArgs),
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
    Probe { url: String },
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

#[derive(Debug, Args)]
struct CtlArgs {
    #[command(flatten)]
    ring: RingArgs,
    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// The ring: epoch, and every node with its state, slots, pid and address.
    Ring,
    /// The slot and node that own a channel.
    Owner { channel: String },
    /// Move a node's slots to the other active nodes (its channels' state goes with them);
    /// the node becomes a standby.
    DrainNode { id: String },
    /// Hand a node's slots to a standby (with its channels' state if the node is alive).
    ReplaceNode { id: String },
    /// Bring a standby into the ring: it takes a fair share of slots from the others.
    AddNode {
        /// The standby to add; any live standby if omitted.
        id: Option<String>,
    },
    /// Every region: gateways, connections, drain state, nearest regions.
    Regions,
    /// Drain a region: its gateways fail health checks, send rtm.connect callers to the nearest
    /// healthy region (with resume cursors), and say goodbye to their clients at RATE per second.
    DrainRegion {
        region: String,
        /// Goodbyes per second per gateway (default 100).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
    /// End a region's drain.
    UndrainRegion { region: String },
    /// Revoke client tokens by `jti` until UNIX (their `exp`): gateways refuse them and close
    /// connections holding them (close code 4003).
    Revoke {
        /// The tokens' `jti` claims.
        #[arg(required = true)]
        jtis: Vec<String>,
        /// When the tokens expire, Unix seconds; the revocation is forgotten after it.
        #[arg(long)]
        until: u64,
    },
    /// A refreshing terminal view of the console's numbers: epoch, nodes with states and
    /// slots, regions with connections and drain state, recent epochs. Reads the ring
    /// manager's console (`/api/state`), not its gRPC.
    Top {
        /// The ring manager console's URL.
        #[arg(long, env = ENV_CONSOLE, default_value = DEFAULT_CONSOLE)]
        console: String,
        /// Print once and exit (with --json: one JSON snapshot).
        #[arg(long)]
        once: bool,
        /// Milliseconds between refreshes.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
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
    /// Port of the first of the three channel servers and the standby (the others follow);
    /// 0 lets the OS pick.
    #[arg(long, default_value_t = 50061)]
    channel_server_port: u16,
    /// The presence ring's ring manager.
    #[arg(long, default_value = "127.0.0.1:50052")]
    presence_ring_manager: SocketAddr,
    /// Port of the first of the two presence servers and their standby (the others follow);
    /// 0 lets the OS pick.
    #[arg(long, default_value_t = 50071)]
    presence_server_port: u16,
    /// The ring manager's HTTP listener: the SRE console, /healthz, /readyz. Default:
    /// --ring-manager's port + 40 (127.0.0.1:50090), or a port the OS picks when that is 0.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// The presence ring manager's HTTP listener. Default: --presence-ring-manager's port
    /// + 40 (127.0.0.1:50092), or a port the OS picks when that is 0.
    #[arg(long)]
    presence_http: Option<SocketAddr>,
    /// Run every service as its own child process (ring manager, 3 active and 1 standby
    /// channel servers, admin server, a gateway per region), on the same ports.
    #[arg(long)]
    multi_process: bool,
    /// With --multi-process: the ring manager's state file (see `ring-manager --state-file`).
    #[arg(long, requires = "multi_process", conflicts_with = "consul")]
    ring_state_file: Option<std::path::PathBuf>,
    /// With --multi-process: run on the Consul agent at this address (e.g.
    /// http://127.0.0.1:8500) — ring managers elect a leader there, keep the ring in its KV,
    /// and every service registers there.
    #[arg(long, requires = "multi_process")]
    consul: Option<String>,
    /// With --consul: the Consul key prefix.
    #[arg(long, requires = "consul")]
    consul_prefix: Option<String>,
    /// With --consul: another ring manager on this address (repeatable); they elect a leader.
    /// Default: one on 127.0.0.1:50060.
    #[arg(long = "extra-ring-manager", requires = "consul")]
    extra_ring_managers: Vec<SocketAddr>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// A gateway's limits on clients (the README's "Limits" table).
#[derive(Debug, Clone, Args)]
struct LimitArgs {
    /// Client frames one connection may send per second, sustained (0: no limit); past it
    /// the frame gets a `ratelimited` error.
    #[arg(long, default_value_t = Limits::default().frames_per_sec)]
    client_frames_per_sec: u32,
    /// Frames a connection may send at once above that rate.
    #[arg(long, default_value_t = Limits::default().frame_burst)]
    client_frame_burst: u32,
    /// Refused frames in a row after which a connection is closed (4029).
    #[arg(long, default_value_t = Limits::default().refusals_before_close)]
    refusals_before_close: u32,
    /// Bytes queued to one connection before it is closed as a slow consumer (4008).
    #[arg(long, default_value_t = Limits::default().outbound_bytes)]
    outbound_queue_bytes: usize,
    /// Seconds a write to a client may stall before it is closed as a slow consumer (4008).
    #[arg(long, default_value_t = Limits::default().write_timeout.as_secs_f64())]
    write_timeout_secs: f64,
    /// Milliseconds within which a user's repeated typing in a channel is coalesced.
    #[arg(long, default_value_t = Limits::default().typing_interval.as_millis() as u64)]
    typing_interval_ms: u64,
    /// Client connections per gateway; past it `rtm.connect` answers `ratelimited`.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Open sockets per gateway (clients and HTTP calls); at the cap accept waits. Lowered
    /// to fit the process's open-files limit.
    #[arg(long, default_value_t = Limits::default().max_sockets)]
    max_sockets: usize,
    /// `rtm.connect` calls per second per gateway (0: no limit).
    #[arg(long, default_value_t = Limits::default().handshakes_per_sec)]
    handshakes_per_sec: u32,
    /// Seconds a request may take to send its headers (slowloris).
    #[arg(long, default_value_t = Limits::default().handshake_timeout.as_secs_f64())]
    handshake_timeout_secs: f64,
    /// Seconds a connection may stay silent (not even a pong) before it is closed (4001).
    #[arg(long, default_value_t = Limits::default().idle_timeout.as_secs_f64())]
    idle_timeout_secs: f64,
    /// Seconds between the gateway's pings to each connection.
    #[arg(long, default_value_t = Limits::default().ping_interval.as_secs_f64())]
    ping_interval_secs: f64,
    /// Concurrent connections per team across all gateways and regions (0: no cap); past it
    /// `rtm.connect` answers `too_many_connections`. Counted by the presence servers.
    #[arg(long, default_value_t = 0)]
    team_connection_limit: u32,
    /// A team's own cap, replacing --team-connection-limit: TEAM=N (repeatable; 0: no cap).
    #[arg(long = "team-limit", value_parser = parse_team_limit)]
    team_limits: Vec<(TeamId, u32)>,
    /// Concurrent connections per user across all gateways (0: no cap).
    #[arg(long, default_value_t = 0)]
    user_connection_limit: u32,
}

fn parse_team_limit(raw: &str) -> Result<(TeamId, u32), String> {
    let (team, n) = raw
        .split_once('=')
        .ok_or_else(|| format!("{raw}: expected TEAM=N"))?;
    let team = TeamId::new(team).map_err(|e| format!("{team}: {e}"))?;
    let n = n.parse().map_err(|_| format!("{n}: not a number"))?;
    Ok((team, n))
}

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<Limits> {
        let secs = |name: &str, v: f64| -> anyhow::Result<Duration> {
            Duration::try_from_secs_f64(v)
                .map_err(|_| anyhow::anyhow!("--{name}: {v} is not a duration"))
        };
        let limits = Limits {
            frames_per_sec: self.client_frames_per_sec,
            frame_burst: self.client_frame_burst,
            refusals_before_close: self.refusals_before_close.max(1),
            outbound_bytes: self.outbound_queue_bytes,
            write_timeout: secs("write-timeout-secs", self.write_timeout_secs)?,
            typing_interval: Duration::from_millis(self.typing_interval_ms),
            max_connections: self.max_connections,
            max_sockets: self.max_sockets,
            handshakes_per_sec: self.handshakes_per_sec,
            handshake_timeout: secs("handshake-timeout-secs", self.handshake_timeout_secs)?,
            idle_timeout: secs("idle-timeout-secs", self.idle_timeout_secs)?,
            ping_interval: secs("ping-interval-secs", self.ping_interval_secs)?,
            team_connections: self.team_connection_limit,
            team_overrides: self.team_limits.iter().cloned().collect(),
            user_connections: self.user_connection_limit,
        };
        anyhow::ensure!(
            !limits.ping_interval.is_zero() && limits.ping_interval < limits.idle_timeout,
            "--ping-interval-secs must be above 0 and below --idle-timeout-secs"
        );
        Ok(limits)
    }

    /// The same limits as command-line arguments, for gateway child processes.
    fn to_args(&self) -> Vec<String> {
        vec![
            format!("--client-frames-per-sec={}", self.client_frames_per_sec),
            format!("--client-frame-burst={}", self.client_frame_burst),
            format!("--refusals-before-close={}", self.refusals_before_close),
            format!("--outbound-queue-bytes={}", self.outbound_queue_bytes),
            format!("--write-timeout-secs={}", self.write_timeout_secs),
            format!("--typing-interval-ms={}", self.typing_interval_ms),
            format!("--max-connections={}", self.max_connections),
            format!("--max-sockets={}", self.max_sockets),
            format!("--handshakes-per-sec={}", self.handshakes_per_sec),
            format!("--handshake-timeout-secs={}", self.handshake_timeout_secs),
            format!("--idle-timeout-secs={}", self.idle_timeout_secs),
            format!("--ping-interval-secs={}", self.ping_interval_secs),
            format!("--team-connection-limit={}", self.team_connection_limit),
            format!("--user-connection-limit={}", self.user_connection_limit),
        ]
        .into_iter()
        .chain(
            self.team_limits
                .iter()
                .map(|(team, n)| format!("--team-limit={team}={n}")),
        )
        .collect()
    }
}

/// Which client tokens a gateway accepts beyond the HS256 secret (CHANNELMESH_JWT_SECRET, which
/// becomes optional when a public key is given).
#[derive(Debug, Args)]
struct TokenArgs {
    /// A PEM public key (RSA: RS256 tokens; Ed25519: EdDSA tokens); repeatable.
    #[arg(
        long = "jwt-public-key",
        env = "CHANNELMESH_JWT_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    public_keys: Vec<std::path::PathBuf>,
    /// A JWKS file of public keys, selected by the token's `kid`.
    #[arg(long, env = "CHANNELMESH_JWKS")]
    jwks: Option<std::path::PathBuf>,
    /// Clock skew tolerated on a token's `exp` and `nbf`, in seconds.
    #[arg(long, env = "CHANNELMESH_JWT_LEEWAY_SECS", default_value_t = mesh_core::token::LEEWAY_SECS)]
    jwt_leeway_secs: u64,
}

impl TokenArgs {
    fn config(&self) -> gateway::tokens::TokenConfig {
        gateway::tokens::TokenConfig {
            public_keys: self.public_keys.clone(),
            jwks: self.jwks.clone(),
            leeway_secs: self.jwt_leeway_secs,
        }
    }
}

#[derive(Debug, Args)]
struct RingArgs {
    /// The ring manager's gRPC endpoint (ignored with --consul).
    #[arg(long, env = ENV_RING_MANAGER, default_value = DEFAULT_RING_MANAGER)]
    ring_manager: String,
    /// The presence ring's ring manager (ignored with --consul, where the presence ring lives
    /// under CONSUL_PREFIX/presence).
    #[arg(long, env = ENV_PRESENCE_RING_MANAGER, default_value = DEFAULT_PRESENCE_RING_MANAGER)]
    presence_ring_manager: String,
    #[command(flatten)]
    consul: ConsulArgs,
}

impl RingArgs {
    /// Where the ring comes from: Consul if given, else the ring manager's endpoint.
    fn source(&self) -> anyhow::Result<ring_client::RingSource> {
        Ok(match self.consul.ring()? {
            Some(ring) => ring_client::RingSource::Consul(ring),
            None => ring_client::RingSource::Direct(self.ring_manager.clone()),
        })
    }

    /// Where the presence ring comes from.
    fn presence_source(&self) -> anyhow::Result<ring_client::RingSource> {
        let mut consul = self.consul.clone();
        consul.consul_prefix = format!("{}/presence", consul.consul_prefix);
        Ok(match consul.ring()? {
            Some(ring) => ring_client::RingSource::Consul(ring),
            None => ring_client::RingSource::Direct(self.presence_ring_manager.clone()),
        })
    }
}

#[derive(Debug, Args, Clone)]
struct ConsulArgs {
    /// Use the Consul agent at this address (e.g. http://127.0.0.1:8500): the ring and the
    /// leading ring manager are found there, and the service registers there with a TTL check.
    #[arg(long, env = ENV_CONSUL)]
    consul: Option<String>,
    /// The prefix of channelmesh's keys in Consul KV.
    #[arg(long, default_value = ring_client::consul_ring::DEFAULT_PREFIX)]
    consul_prefix: String,
    /// Consul ACL token.
    #[arg(long, env = ENV_CONSUL_TOKEN, hide_env_values = true)]
    consul_token: Option<String>,
}

impl ConsulArgs {
    fn ring(&self) -> anyhow::Result<Option<ring_client::ConsulRing>> {
        self.consul
            .as_deref()
            .map(|url| {
                ring_client::ConsulRing::new(url, self.consul_token.clone(), &self.consul_prefix)
                    .with_context(|| format!("--consul {url}"))
            })
            .transpose()
    }

    /// With Consul, registers this service (`kind`, unique `id`, listening on `addr`, reached
    /// at `advertise` if given) with a TTL check that passes while the process runs, until
    /// `cancel`.
    fn register(
        &self,
        kind: &str,
        id: &str,
        (addr, advertise): (SocketAddr, Option<&str>),
        meta: Vec<(String, String)>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        if let Some(ring) = self.ring()? {
            let def = ring_client::consul_ring::service_def(kind, id, addr, advertise, meta);
            tokio::spawn(ring_client::consul_ring::keep_registered(
                ring.consul,
                def,
                cancel.clone(),
            ));
        }
        Ok(())
    }
}

/// How far a ring manager's console port is from its gRPC port by default (50050 -> 50090).
const CONSOLE_PORT_OFFSET: u16 = 40;

/// A ring manager's HTTP address: `http` if given, else next to its gRPC address `grpc` (same
/// interface, port + [`CONSOLE_PORT_OFFSET`]), so that two ring managers on one host (the
/// channel and presence rings) never collide, and port 0 stays "the OS picks".
fn console_addr(http: Option<SocketAddr>, grpc: SocketAddr) -> SocketAddr {
    http.unwrap_or_else(|| {
        let port = match grpc.port() {
            0 => 0,
            p => p.checked_add(CONSOLE_PORT_OFFSET).unwrap_or(0),
        };
        SocketAddr::new(grpc.ip(), port)
    })
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

/// The `service.name` a subcommand's spans are exported under.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Dev(_) => "channelmesh-dev",
        Command::RingManager { .. } => "channelmesh-ring-manager",
        Command::ChannelServer { .. } => "channelmesh-channel-server",
        Command::PresenceServer { .. } => "channelmesh-presence-server",
        Command::AdminServer { .. } => "channelmesh-admin-server",
        Command::Gateway { .. } => "channelmesh-gateway",
        _ => "channelmesh",
    }
}

/// Binds `--http` (default: next to the gRPC address `listen`) and serves `telemetry` on it
/// until `cancel`.
async fn serve_http(
    http: Option<SocketAddr>,
    listen: SocketAddr,
    telemetry: mesh_telemetry::Telemetry,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let addr = http.unwrap_or_else(|| channelmesh::mesh::http_addr(listen));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!("http on {}", listener.local_addr()?);
    Ok(mesh_telemetry::http::serve(listener, telemetry, cancel).await?)
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
    if let Command::Bench { args } = cli.command {
        // The flags given before `bench` go first; the load generator takes them too.
        let mut global = cli.tls.to_args();
        if cli.log_json {
            global.push("--log-json".into());
        }
        if let Some(endpoint) = cli.otlp_endpoint {
            global.push(format!("--otlp-endpoint={endpoint}"));
        }
        return channelmesh::loadgen::run(global, args);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let tracing = runtime.block_on(async {
        mesh_telemetry::init(
            cli.log_json,
            cli.otlp_endpoint.as_deref(),
            service_name(&cli.command),
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
    let cancel = CancellationToken::new();
    cli.tls.configure()?;
    match cli.command {
        Command::Dev(args) => {
            let tls_args = cli.tls.to_args();
            dev(args, (cli.log_json, cli.otlp_endpoint, tls_args), cancel).await
        }
        Command::RingManager {
            listen,
            state_file,
            advertise,
            session_ttl_secs,
            lock_delay_ms,
            nearest,
            http,
            consul,
        } => {
            cancel_on_signals(cancel.clone());
            let config = ring_manager::Config::default();
            let http = console_addr(http, listen);
            let http = TcpListener::bind(http)
                .await
                .with_context(|| format!("binding {http}"))?;
            let console_url = format!("http://{}/", http.local_addr()?);
            if let Some(ring) = consul.ring()? {
                anyhow::ensure!(
                    listen.port() != 0,
                    "--consul needs a fixed --listen port: it is published before it is bound"
                );
                let endpoint = advertise.unwrap_or_else(|| format!("http://{listen}"));
                let id = endpoint
                    .trim_start_matches("http://")
                    .trim_start_matches("https://");
                consul.register(
                    "ring-manager",
                    id,
                    (listen, Some(&endpoint)),
                    vec![],
                    &cancel,
                )?;
                println!("listening on {listen}");
                println!("console on {console_url}");
                let leader = ring_manager::cluster::LeaderConfig {
                    endpoint,
                    listen,
                    session_ttl: Duration::from_secs(session_ttl_secs),
                    lock_delay: Duration::from_millis(lock_delay_ms),
                    nearest,
                };
                let (leadership, leading) = tokio::sync::watch::channel(None);
                let console = ring_manager::console::Console::consul(leading);
                // Either ending with an error takes the process down.
                tokio::try_join!(
                    ring_manager::cluster::run_leader_election_with(
                        ring,
                        config,
                        leader,
                        leadership,
                        cancel.clone(),
                    ),
                    ring_manager::console::serve(console, http, cancel.clone()),
                )?;
                return Ok(());
            }
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            println!("listening on {}", listener.local_addr()?);
            println!("console on {console_url}");
            let tracker = tokio_util::task::TaskTracker::new();
            let manager =
                ring_manager::RingManager::new(config, state_file, &tracker, cancel.clone())?;
            manager.set_nearest(nearest);
            let console = ring_manager::console::Console::embedded(manager.clone());
            tokio::try_join!(
                ring_manager::serve(manager, listener, cancel.clone()),
                ring_manager::console::serve(console, http, cancel.clone()),
            )?;
            Ok(())
        }
        Command::ChannelServer {
            id,
            listen,
            advertise,
            standby,
            http,
            ring,
        } => {
            cancel_on_signals(cancel.clone());
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let local = listener.local_addr()?;
            println!("listening on {local}");
            ring.consul.register(
                "channel-server",
                &id,
                (local, advertise.as_deref()),
                vec![],
                &cancel,
            )?;
            let config = channel_server::Config {
                node: NodeId::new(&id)?,
                ring: ring.source()?,
                advertise,
                limits: channel_server::Limits::default(),
                gateway_queue: channel_server::DEFAULT_GATEWAY_QUEUE,
                standby,
                telemetry: mesh_telemetry::Telemetry::new(&[("node", id.as_str())]),
            };
            let telemetry = config.telemetry.clone();
            tokio::try_join!(
                async { Ok(channel_server::serve(config, listener, cancel.clone()).await?) },
                serve_http(http, listen, telemetry, cancel.clone()),
            )?;
            Ok(())
        }
        Command::PresenceServer {
            id,
            listen,
            advertise,
            standby,
            grace_ms,
            gateway_lease_ms,
            http,
            ring,
        } => {
            cancel_on_signals(cancel.clone());
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let local = listener.local_addr()?;
            println!("listening on {local}");
            ring.consul.register(
                "presence-server",
                &id,
                (local, advertise.as_deref()),
                vec![],
                &cancel,
            )?;
            let config = presence_server::Config {
                node: NodeId::new(&id)?,
                ring: ring.presence_source()?,
                advertise,
                standby,
                grace: Duration::from_millis(grace_ms),
                gateway_lease: Duration::from_millis(gateway_lease_ms),
                telemetry: mesh_telemetry::Telemetry::new(&[("node", id.as_str())]),
            };
            let telemetry = config.telemetry.clone();
            tokio::try_join!(
                async { Ok(presence_server::serve(config, listener, cancel.clone()).await?) },
                serve_http(http, listen, telemetry, cancel.clone()),
            )?;
            Ok(())
        }
        Command::AdminServer {
            id,
            listen,
            http,
            ring,
        } => {
            let mut config = admin_server::Config {
                ring: ring.source()?,
                presence_ring: Some(ring.presence_source()?),
                admin_token: required_env(ENV_ADMIN_TOKEN)?,
                jwt_secret: required_env(ENV_JWT_SECRET)?.into_bytes(),
                telemetry: mesh_telemetry::Telemetry::default(),
            };
            cancel_on_signals(cancel.clone());
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let local = listener.local_addr()?;
            println!("listening on {local}");
            let id = id.unwrap_or_else(|| local.to_string());
            ring.consul
                .register("admin-server", &id, (local, None), vec![], &cancel)?;
            config.telemetry = mesh_telemetry::Telemetry::new(&[("admin", id.as_str())]);
            let telemetry = config.telemetry.clone();
            tokio::try_join!(
                async { Ok(admin_server::serve(config, listener, cancel.clone()).await?) },
                serve_http(http, listen, telemetry, cancel.clone()),
            )?;
            Ok(())
        }
        Command::Gateway {
            region,
            id,
            listen,
            public_url,
            ring,
            limits,
            tokens,
        } => {
            // Optional when public keys are given: such a gateway never needs the secret.
            let from_env = std::env::var(ENV_JWT_SECRET).unwrap_or_default();
            if from_env.is_empty() && tokens.public_keys.is_empty() && tokens.jwks.is_none() {
                anyhow::bail!("set {ENV_JWT_SECRET}, or give --jwt-public-key or --jwks");
            }
            let config = gateway::Config {
                id: id.unwrap_or_else(|| format!("{region}-1")),
                region,
                ring: ring.source()?,
                presence_ring: Some(ring.presence_source()?),
                public_url,
                jwt_secret: from_env.into_bytes(),
                connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
                limits: limits.limits()?,
                tokens: tokens.config(),
            };
            cancel_on_signals(cancel.clone());
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let local = listener.local_addr()?;
            println!("listening on {local}");
            let meta = vec![("region".to_string(), config.region.clone())];
            ring.consul
                .register("gateway", &config.id, (local, None), meta, &cancel)?;
            Ok(gateway::serve(config, listener, cancel).await?)
        }
        Command::Ctl(CtlArgs {
            json,
            command:
                CtlCommand::Top {
                    console,
                    once,
                    interval_ms,
                },
            ..
        }) => {
            cancel_on_signals(cancel.clone());
            let every = Duration::from_millis(interval_ms.max(100));
            channelmesh::ctl::top(&console, once, json, every, cancel).await
        }
        Command::Ctl(args) => {
            use channelmesh::ctl;
            let endpoint = args
                .ring
                .source()?
                .endpoint()
                .await
                .context("finding the ring manager")?;
            let endpoint = endpoint.as_str();
            match args.command {
                CtlCommand::Ring => ctl::ring(endpoint, args.json).await,
                CtlCommand::Owner { channel } => ctl::owner(endpoint, &channel, args.json).await,
                CtlCommand::DrainNode { id } => {
                    ctl::node_op(endpoint, ctl::NodeOp::Drain, Some(&id), args.json).await
                }
                CtlCommand::ReplaceNode { id } => {
                    ctl::node_op(endpoint, ctl::NodeOp::Replace, Some(&id), args.json).await
                }
                CtlCommand::AddNode { id } => {
                    ctl::node_op(endpoint, ctl::NodeOp::Add, id.as_deref(), args.json).await
                }
                CtlCommand::Regions => ctl::regions(endpoint, args.json).await,
                CtlCommand::Top { .. } => unreachable!("handled above"),
                CtlCommand::DrainRegion { region, rate } => {
                    ctl::region_op(endpoint, &region, true, rate, args.json).await
                }
                CtlCommand::UndrainRegion { region } => {
                    ctl::region_op(endpoint, &region, false, 0, args.json).await
                }
                CtlCommand::Revoke { jtis, until } => revoke(endpoint, jtis, until).await,
            }
        }
        Command::Bench { .. } => unreachable!("handled in main, before the runtime starts"),
        Command::Probe { url } => {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?;
            let response = client.get(&url).send().await?;
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            anyhow::ensure!(status.is_success(), "{url}: {status}: {}", body.trim());
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
                jti: None,
            };
            println!(
                "{}",
                TokenKey::hs256(secret.as_bytes()).mint(&identity, now)?
            );
            Ok(())
        }
    }
}

/// `ctl revoke`: one RevokeTokens call to the ring manager.
async fn revoke(endpoint: &str, jtis: Vec<String>, until: u64) -> anyhow::Result<()> {
    use mesh_proto::ring::ring_manager_client::RingManagerClient;
    use mesh_proto::ring::{RevokeTokensRequest, RevokedToken};
    let call = async {
        let channel = mesh_transport::endpoint(endpoint)?.connect().await?;
        let mut client = RingManagerClient::new(channel);
        let request = RevokeTokensRequest {
            jtis: jtis
                .into_iter()
                .map(|jti| RevokedToken {
                    jti,
                    expires_at: until,
                })
                .collect(),
        };
        anyhow::Ok(client.revoke_tokens(request).await?.into_inner())
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .context("the ring manager did not answer in time")??;
    println!(
        "revocation list version {}: {} revoked tokens held",
        reply.version, reply.held
    );
    Ok(())
}

/// `dev`; `(log_json, otlp_endpoint, tls_args)` are passed on to child processes.
async fn dev(
    args: DevArgs,
    (log_json, otlp_endpoint, tls_args): (bool, Option<String>, Vec<String>),
    cancel: CancellationToken,
) -> anyhow::Result<()> {
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
    let port = |i: u16| match args.channel_server_port {
        0 => 0,
        base => base.saturating_add(i),
    };
    config.channel_servers = (0..3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], port(i))))
        .collect();
    config.standbys = vec![SocketAddr::from(([127, 0, 0, 1], port(3)))];
    config.presence_ring_manager = args.presence_ring_manager;
    let ps_port = |i: u16| match args.presence_server_port {
        0 => 0,
        base => base.saturating_add(i),
    };
    config.presence_servers = (0..2)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], ps_port(i))))
        .collect();
    config.presence_standbys = vec![SocketAddr::from(([127, 0, 0, 1], ps_port(2)))];
    config.console = console_addr(args.http, args.ring_manager);
    config.presence_console = console_addr(args.presence_http, args.presence_ring_manager);
    config.limits = args.limits.limits()?;
    cancel_on_signals(cancel.clone());
    let secrets = [
        (ENV_JWT_SECRET, config.jwt_secret.clone(), generated_jwt),
        (ENV_ADMIN_TOKEN, config.admin_token.clone(), generated_admin),
    ];

    if args.multi_process {
        let mut extra_ring_managers = args.extra_ring_managers;
        if args.consul.is_some() && extra_ring_managers.is_empty() {
            extra_ring_managers.push(SocketAddr::from(([127, 0, 0, 1], DEV_EXTRA_RING_MANAGER)));
        }
        let options = channelmesh::multiprocess::Options {
            ring_state_file: args.ring_state_file,
            consul: args.consul.clone(),
            consul_prefix: args.consul_prefix,
            extra_ring_managers,
            gateway_args: args.limits.to_args(),
            otlp_endpoint: otlp_endpoint.clone(),
            log_json,
            tls_args,
        };
        let procs = channelmesh::multiprocess::start_all(&config, &options).await?;
        let mut ring_managers = vec![(procs.ring_manager.addr, Some(procs.ring_manager.pid))];
        ring_managers.extend(
            procs
                .extra_ring_managers
                .iter()
                .map(|p| (p.addr, Some(p.pid))),
        );
        let summary = Summary {
            mode: if args.consul.is_some() {
                "multi-process, on consul"
            } else {
                "multi-process"
            },
            ring_managers,
            channel_servers: procs
                .channel_servers
                .iter()
                .map(|(id, standby, p)| (id.clone(), p.addr, *standby, Some(p.pid)))
                .collect(),
            admin: (procs.admin.addr, Some(procs.admin.pid)),
            gateways: procs
                .gateways
                .iter()
                .map(|(region, p)| (region.clone(), p.addr, Some(p.pid)))
                .collect(),
            presence_ring_manager: (
                procs.presence_ring_manager.addr,
                Some(procs.presence_ring_manager.pid),
            ),
            presence_servers: procs
                .presence_servers
                .iter()
                .map(|(id, standby, p)| (id.clone(), p.addr, *standby, Some(p.pid)))
                .collect(),
            // The OS-picked console ports of child processes are not known here.
            consoles: [("", config.console), ("presence ", config.presence_console)]
                .into_iter()
                .filter(|(_, addr)| addr.port() != 0)
                .collect(),
            // Children serve HTTP next to their gRPC port; OS-picked ones are not known here.
            http: std::iter::once(("admin".to_string(), config.admin))
                .chain(
                    procs
                        .channel_servers
                        .iter()
                        .map(|(id, _, p)| (id.clone(), p.addr)),
                )
                .chain(
                    procs
                        .presence_servers
                        .iter()
                        .map(|(id, _, p)| (id.clone(), p.addr)),
                )
                .zip(
                    std::iter::once(config.admin)
                        .chain(config.channel_servers.iter().copied())
                        .chain(config.standbys.iter().copied())
                        .chain(config.presence_servers.iter().copied())
                        .chain(config.presence_standbys.iter().copied()),
                )
                .filter(|(_, asked)| asked.port() != 0)
                .map(|((id, _), asked)| (id, channelmesh::mesh::http_addr(asked)))
                .collect(),
            started_in: procs.started_in,
        };
        summary.print(&secrets);
        procs.run_until_stopped(cancel, SHUTDOWN_GRACE).await;
        return Ok(());
    }

    let actives = config.channel_servers.len();
    let presence_actives = config.presence_servers.len();
    let mesh = Mesh::start(config, cancel).await?;
    let summary = Summary {
        mode: "one process, embedded ring manager",
        ring_managers: vec![(mesh.ring_manager, None)],
        channel_servers: mesh
            .channel_servers
            .iter()
            .enumerate()
            .map(|(i, (id, addr))| (id.to_string(), *addr, i >= actives, None))
            .collect(),
        admin: (mesh.admin, None),
        gateways: mesh
            .gateways
            .iter()
            .map(|(r, a)| (r.clone(), *a, None))
            .collect(),
        presence_ring_manager: (mesh.presence_ring_manager, None),
        presence_servers: mesh
            .presence_servers
            .iter()
            .enumerate()
            .map(|(i, (id, addr))| (id.to_string(), *addr, i >= presence_actives, None))
            .collect(),
        consoles: vec![("", mesh.console), ("presence ", mesh.presence_console)],
        http: mesh.http.clone(),
        started_in: mesh.started_in,
    };
    summary.print(&secrets);
    mesh.run_until_stopped(SHUTDOWN_GRACE).await
}

/// What `dev` prints once the mesh is up.
struct Summary {
    mode: &'static str,
    ring_managers: Vec<(SocketAddr, Option<u32>)>,
    /// (id, address, standby, pid)
    channel_servers: Vec<(String, SocketAddr, bool, Option<u32>)>,
    admin: (SocketAddr, Option<u32>),
    /// (region, address, pid)
    gateways: Vec<(String, SocketAddr, Option<u32>)>,
    presence_ring_manager: (SocketAddr, Option<u32>),
    /// (id, address, standby, pid)
    presence_servers: Vec<(String, SocketAddr, bool, Option<u32>)>,
    /// ("" or "presence ", address) per ring manager console.
    consoles: Vec<(&'static str, SocketAddr)>,
    /// (service, address) of each gRPC service's /metrics, /healthz, /readyz.
    http: Vec<(String, SocketAddr)>,
    started_in: Duration,
}

impl Summary {
    fn print(&self, secrets: &[(&str, String, bool)]) {
        let pid = |p: Option<u32>| p.map(|p| format!("  pid {p}")).unwrap_or_default();
        println!("channelmesh dev mesh ({})", self.mode);
        for (addr, p) in &self.ring_managers {
            println!("  ring manager     grpc://{addr}{}", pid(*p));
        }
        for (id, addr, standby, p) in &self.channel_servers {
            let role = if *standby { " (standby)" } else { "" };
            println!("  channel server   {id} grpc://{addr}{role}{}", pid(*p));
        }
        println!(
            "  admin server     grpc://{}  (channelmesh.admin.v1.Admin, reflection on){}",
            self.admin.0,
            pid(self.admin.1)
        );
        println!(
            "  presence ring    grpc://{}  (its ring manager){}",
            self.presence_ring_manager.0,
            pid(self.presence_ring_manager.1)
        );
        for (id, addr, standby, p) in &self.presence_servers {
            let role = if *standby { " (standby)" } else { "" };
            println!("  presence server  {id} grpc://{addr}{role}{}", pid(*p));
        }
        for (region, addr, p) in &self.gateways {
            println!(
                "  gateway {region:<8} http://{addr}/api/  (RTM base URL){}",
                pid(*p)
            );
        }
        for (service, addr) in &self.http {
            println!("  http {service:<11} http://{addr}/metrics  (/healthz, /readyz)");
        }
        for (which, addr) in &self.consoles {
            let what = format!("{which}console");
            println!("  {what:<16} http://{addr}/  (SRE console; /healthz, /readyz)");
        }
        for (name, value, generated) in secrets {
            if *generated {
                println!("  {name}={value}  (generated)");
            }
        }
        println!("ready in {} ms", self.started_in.as_millis());
    }
}
