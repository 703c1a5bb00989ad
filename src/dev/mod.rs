//! `channelmesh dev`: the whole mesh on one machine — in this process ([`mesh`]) or as child
//! processes of this binary ([`processes`]), each service started by its own crate's start-up
//! either way — and what it prints once up ([`summary`]).

pub mod mesh;
pub mod processes;
pub mod state;
mod summary;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use admin_server::config::{
    ENV_ADMIN_TOKEN, ENV_JWT_AUDIENCE, ENV_JWT_ISSUER, ENV_JWT_SECRET, check_jwt_secret,
};
use gateway::limits::Limits;
use mesh_core::IssuerAudience;
use mesh_telemetry::side_port::http_addr;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

use mesh::{Mesh, MeshConfig, Security, consecutive, dev_ports, loopback};
use mesh_transport::TlsArgs;
use state::{StateDir, StateDirArg};
use summary::Summary;

use crate::certs::Authority;

/// `dev --consul`: the second ring manager's port.
const EXTRA_RING_MANAGER_PORT: u16 = 50060;

/// The `dev` command's flags.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Admin server address.
    #[arg(long, default_value_t = loopback(dev_ports::ADMIN))]
    admin: SocketAddr,
    /// Ring manager address.
    #[arg(long, default_value_t = loopback(dev_ports::RING_MANAGER))]
    ring_manager: SocketAddr,
    /// Gateway for the us-east region.
    #[arg(long, default_value_t = loopback(dev_ports::US_EAST))]
    us_east: SocketAddr,
    /// Gateway for the eu-west region.
    #[arg(long, default_value_t = loopback(dev_ports::EU_WEST))]
    eu_west: SocketAddr,
    /// Port of the first of the three channel servers and the standby (the others follow);
    /// 0 lets the OS pick.
    #[arg(long, default_value_t = dev_ports::CHANNEL_SERVERS)]
    channel_server_port: u16,
    /// The presence ring's ring manager.
    #[arg(long, default_value_t = loopback(dev_ports::PRESENCE_RING_MANAGER))]
    presence_ring_manager: SocketAddr,
    /// Port of the first of the two presence servers and their standby (the others follow);
    /// 0 lets the OS pick.
    #[arg(long, default_value_t = dev_ports::PRESENCE_SERVERS)]
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
    ring_state_file: Option<PathBuf>,
    /// With --multi-process: run on the Consul agent at this address (e.g.
    /// http://127.0.0.1:8500) — ring managers elect a leader there, keep the ring in its KV,
    /// and every service registers there.
    #[arg(long, requires = "multi_process")]
    consul: Option<String>,
    /// With --consul: the Consul key prefix.
    #[arg(long, requires = "consul")]
    consul_prefix: Option<String>,
    /// With --consul: Consul's ACL token, for dev and (by environment) every child.
    #[arg(long, requires = "consul", env = ring_client::args::ENV_CONSUL_TOKEN, hide_env_values = true)]
    consul_token: Option<String>,
    /// With --consul: another ring manager on this address (repeatable); they elect a leader.
    /// Default: one on 127.0.0.1:50060.
    #[arg(long = "extra-ring-manager", requires = "consul")]
    extra_ring_managers: Vec<SocketAddr>,
    /// How many channel servers hold each slot: the owner and N-1 followers (1: none), passed
    /// on to the ring manager (see `ring-manager --replication-factor`).
    #[arg(
        long,
        env = ring_manager::config::ENV_REPLICATION_FACTOR,
        value_parser = ring_manager::config::parse_replication_factor,
        default_value_t = ring_manager::server::DEFAULT_REPLICATION_FACTOR
    )]
    replication_factor: usize,
    #[command(flatten)]
    state_dir: StateDirArg,
    #[command(flatten)]
    limits: Limits,
    /// The channel servers' and gateways' policy file; `dev` reloads it on SIGHUP (forwarded
    /// to the children with --multi-process).
    #[command(flatten)]
    policy: mesh_policy::PolicyArgs,
    #[command(flatten)]
    boot: gateway::config::BootArgs,
    /// Who may act from the ring manager's console (drain and undrain nodes and regions,
    /// disconnect users): NAME:TOKEN or TOKEN, repeatable or a comma list (see `ring-manager
    /// --operator-token`).
    #[arg(
        long = "operator-token",
        env = ring_manager::console::actions::ENV_OPERATOR_TOKEN,
        value_delimiter = ',',
        hide_env_values = true
    )]
    operator_tokens: Vec<String>,
    /// Webhooks (`--webhook-url`, …), sent by the presence servers (`presence_changed`) and
    /// the channel servers; signed with CHANNELMESH_WEBHOOK_SECRET.
    #[command(flatten)]
    webhooks: mesh_hooks::WebhookArgs,
    /// The channel servers' --vacate-grace-ms.
    #[arg(long, env = "CHANNELMESH_VACATE_GRACE_MS", default_value_t = channel_server::members::DEFAULT_GRACE_MS)]
    vacate_grace_ms: u64,
}

impl DevArgs {
    /// The mesh layout these flags ask for, with these secrets.
    fn mesh_config(&self, jwt_secret: String, admin_token: String) -> anyhow::Result<MeshConfig> {
        let (channel, presence) = (self.channel_server_port, self.presence_server_port);
        Ok(MeshConfig {
            admin: self.admin,
            ring_manager: self.ring_manager,
            console: http_addr(self.http, self.ring_manager),
            gateways: vec![
                ("us-east".into(), self.us_east),
                ("eu-west".into(), self.eu_west),
            ],
            channel_servers: consecutive(channel, 0, 3),
            standbys: consecutive(channel, 3, 1),
            presence_ring_manager: self.presence_ring_manager,
            presence_console: http_addr(self.presence_http, self.presence_ring_manager),
            presence_servers: consecutive(presence, 0, 2),
            presence_standbys: consecutive(presence, 2, 1),
            limits: gateway::config::checked(self.limits.clone())?,
            boot: self.boot.config()?,
            operator_tokens: self.operator_tokens.clone(),
            replication_factor: self.replication_factor,
            policy_file: self.policy.policy_file.clone(),
            webhooks: self.webhooks.clone(),
            vacate_grace: Duration::from_millis(self.vacate_grace_ms),
            ..MeshConfig::dev(jwt_secret, admin_token)
        })
    }
}

impl DevArgs {
    /// Every address the mesh listens on as these flags ask.
    fn listen_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = vec![
            self.admin,
            self.ring_manager,
            self.us_east,
            self.eu_west,
            self.presence_ring_manager,
        ];
        addrs.extend(self.http);
        addrs.extend(self.presence_http);
        addrs.extend(&self.extra_ring_managers);
        addrs
    }
}

/// Runs `dev` until `cancel`, then stops every service within `grace` (a service that does not
/// is an error). `log_args`: the logging flags every child process gets; `transport`: the
/// transport flags (only `--insecure` and `--insecure-allow-remote`: `dev` makes its own
/// certificates).
pub async fn run(
    args: DevArgs,
    log_args: Vec<String>,
    transport: &TlsArgs,
    cancel: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    if transport.has_files() {
        anyhow::bail!(
            "dev makes its own CA and certificates (in its --state-dir); --tls-ca, --tls-cert \
             and --tls-key are for the services run on their own"
        );
    }
    let (jwt_secret, generated_jwt) = secret(ENV_JWT_SECRET);
    // A secret of the user's that no gateway would take: refused before anything starts.
    check_jwt_secret(&jwt_secret)?;
    let (admin_token, generated_admin) = secret(ENV_ADMIN_TOKEN);
    let mut config = MeshConfig {
        jwt_claims: IssuerAudience::new(env(ENV_JWT_ISSUER), env(ENV_JWT_AUDIENCE)),
        ..args.mesh_config(jwt_secret, admin_token)?
    };
    // The webhooks' secret is the user's: without it, webhook URLs are refused up front.
    if !config.webhooks.webhook_url.is_empty() && config.webhooks.secret.is_none() {
        config.webhooks.secret = Some(mesh_hooks::secret_from_env()?);
    }
    let secrets = [
        (ENV_JWT_SECRET, config.jwt_secret.clone(), generated_jwt),
        (ENV_ADMIN_TOKEN, config.admin_token.clone(), generated_admin),
    ];
    // Mutual TLS with a throwaway CA in the state directory, or --insecure.
    let state = if transport.insecure {
        transport.check_listen(&args.listen_addrs())?;
        config.security = Security::Insecure;
        crate::warn_insecure();
        None
    } else {
        let state = StateDir::claim(&args.state_dir.dir())?;
        state.write_authority(Authority::for_this_process()?)?;
        config.security = Security::Mtls;
        Some(state)
    };
    let security = summary::Security::new(state.as_ref().map(StateDir::path));

    if args.multi_process {
        let mut extra_ring_managers = args.extra_ring_managers;
        if args.consul.is_some() && extra_ring_managers.is_empty() {
            extra_ring_managers.push(loopback(EXTRA_RING_MANAGER_PORT));
        }
        let options = processes::Options {
            ring_state_file: args.ring_state_file,
            consul: args.consul.clone(),
            consul_prefix: args.consul_prefix,
            consul_token: args.consul_token,
            extra_ring_managers,
            global_args: [log_args, transport.to_args()].concat(),
            state,
            ..Default::default()
        };
        // A signal before the mesh is up stops it at once (the children are killed).
        let procs = tokio::select! {
            procs = processes::start_all(&config, &options) => procs?,
            () = cancel.cancelled() => return Ok(()),
        };
        let summary = Summary::multi_process(&procs, &config, args.consul.is_some());
        summary.print(&secrets, &security);
        return procs.run(cancel, grace).await;
    }

    let mesh = tokio::select! {
        mesh = Mesh::start(config.clone(), cancel.clone()) => mesh?,
        () = cancel.cancelled() => return Ok(()),
    };
    Summary::in_process(&mesh, &config).print(&secrets, &security);
    let stopped = mesh.run_until_stopped(grace).await;
    drop(state);
    stopped
}

/// The environment variable `name`, unless unset or empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The secret in the environment variable `name`, or a random one: (secret, generated).
fn secret(name: &str) -> (String, bool) {
    match env(name) {
        Some(secret) => (secret, false),
        None => (random_secret(), true),
    }
}

/// 32 random bytes (HS256's key size) as 64 hex digits: the secret is used as the bytes of
/// this string, 64 of them.
fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_long_enough_to_sign_with() {
        let secret = random_secret();
        assert_eq!(secret.len(), 64);
        assert!(check_jwt_secret(&secret).is_ok());
        assert_ne!(secret, random_secret());
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        dev: DevArgs,
    }

    #[test]
    fn the_replication_factor_reaches_the_mesh_and_zero_is_refused() {
        use clap::Parser;
        let config = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("dev").chain(args.iter().copied()))?;
            Ok::<_, clap::Error>(cli.dev.mesh_config("s".repeat(32), "t".into()).unwrap())
        };
        assert_eq!(config(&[]).unwrap().replication_factor, 2);
        let one = config(&["--replication-factor", "1"]).unwrap();
        assert_eq!(one.replication_factor, 1);
        let zero = config(&["--replication-factor", "0"])
            .unwrap_err()
            .to_string();
        assert!(zero.contains("0 would keep no copy of a slot"), "{zero}");
    }
}
