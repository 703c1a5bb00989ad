//! A whole mesh in one process: ring manager, channel servers, presence servers (with their
//! own ring manager), admin server and one gateway per region — each bound and served by its
//! crate's own start-up (`bind`, then `Bound::serve`), on its own sockets, talking to the
//! others over the same gRPC it uses across machines. `channelmesh dev` runs it; the
//! integration tests boot it on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_core::{Identity, IssuerAudience, NodeId, TeamId, TokenKey, UserId};
use mesh_transport::{Role, Transport};
use ring_client::RingSource;
use ring_manager::{NodeState, ProcessConfig, RingManager};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::certs::Authority;

/// How long start-up waits for every channel server to join the ring.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The identity of the ring manager, in certificates.
pub const RING_MANAGER_ID: &str = "rm-1";
/// The identity of the presence ring's ring manager, in certificates.
pub const PRESENCE_RING_MANAGER_ID: &str = "prm-1";
/// The identity of the admin server, in certificates (and its metrics' label).
pub const ADMIN_ID: &str = "admin-1";

/// How a mesh's services speak to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plaintext, no identities, no authorization (`--insecure`).
    Insecure,
    /// Mutual TLS with this process's throwaway CA ([`Authority::for_this_process`]): the
    /// process's certificate names every service of the mesh (one process hosts them all);
    /// the internal servers enforce the authorization table.
    Mtls,
}

impl Security {
    /// How an operator (`ctl`, a test) calls this mesh's ring managers.
    pub fn operator(&self) -> anyhow::Result<Transport> {
        match self {
            Security::Insecure => Ok(Transport::Insecure),
            Security::Mtls => Ok(Transport::Mtls(Authority::for_this_process()?.operator()?)),
        }
    }
}

/// Where and how to run a mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub ring_manager: SocketAddr,
    /// The ring manager's HTTP listener: the SRE console, `/healthz`, `/readyz`.
    pub console: SocketAddr,
    /// Failure detection of the ring manager (its `replication_factor` is replaced by the one
    /// below).
    pub ring: ring_manager::Config,
    /// How many channel servers hold each slot (the channel ring manager's
    /// `--replication-factor`): the owner and `replication_factor - 1` followers. 1: none.
    pub replication_factor: usize,
    /// One address per active channel server (cs-1, cs-2, ...).
    pub channel_servers: Vec<SocketAddr>,
    /// One address per standby channel server (numbered after the active ones).
    pub standbys: Vec<SocketAddr>,
    pub admin: SocketAddr,
    /// (region, address) per gateway.
    pub gateways: Vec<(String, SocketAddr)>,
    /// The HS256 secret of client tokens: at least 32 bytes.
    pub jwt_secret: String,
    /// The `iss` and `aud` the admin server mints and the gateways require, when set.
    pub jwt_claims: IssuerAudience,
    pub admin_token: String,
    /// How long a gateway's connect URLs stay valid.
    pub connect_url_ttl: Duration,
    /// The presence ring's own ring manager.
    pub presence_ring_manager: SocketAddr,
    /// The presence ring manager's console.
    pub presence_console: SocketAddr,
    /// One address per active presence server (ps-1, ps-2, ...).
    pub presence_servers: Vec<SocketAddr>,
    /// One address per standby presence server.
    pub presence_standbys: Vec<SocketAddr>,
    /// Presence timing: the away grace period and the gateways' lease.
    pub presence_grace: Duration,
    pub presence_gateway_lease: Duration,
    /// Every gateway's limits on clients.
    pub limits: gateway::limits::Limits,
    /// Every gateway's boot from the web app (`--boot-url`), when set.
    pub boot: Option<gateway::boot::BootConfig>,
    /// Who may act from the channel ring manager's console (`--operator-token`, `NAME:TOKEN`
    /// or `TOKEN`); none: its actions are refused.
    pub operator_tokens: Vec<String>,
    /// Mutual TLS with identities (the default), or plaintext.
    pub security: Security,
    /// The channel servers' and gateways' policy file (`--policy-file`); none: defaults.
    pub policy_file: Option<std::path::PathBuf>,
    /// Where the presence servers (and channel servers) send webhook events, and the secret
    /// they sign them with (`webhooks.secret`; with `--multi-process` it reaches the children
    /// as `CHANNELMESH_WEBHOOK_SECRET`). No URL: no webhooks.
    pub webhooks: mesh_hooks::WebhookArgs,
    /// The channel servers' `--vacate-grace-ms`.
    pub vacate_grace: Duration,
}

/// The ports of the `dev` layout ([`MeshConfig::dev`]); each gRPC service's HTTP side is on
/// its port + 40 (`mesh_telemetry::side_port`).
pub mod dev_ports {
    pub const RING_MANAGER: u16 = 50050;
    pub const ADMIN: u16 = 50051;
    pub const PRESENCE_RING_MANAGER: u16 = 50052;
    /// The first channel server's; the others and the standby follow.
    pub const CHANNEL_SERVERS: u16 = 50061;
    /// The first presence server's; the other and the standby follow.
    pub const PRESENCE_SERVERS: u16 = 50071;
    pub const US_EAST: u16 = 8080;
    pub const EU_WEST: u16 = 8081;
}

/// `port` on the loopback interface.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `count` loopback addresses on consecutive ports, from `base` + `from` (all 0, "the OS
/// picks", when `base` is 0).
pub fn consecutive(base: u16, from: u16, count: u16) -> Vec<SocketAddr> {
    (from..from.saturating_add(count))
        .map(|i| match base {
            0 => 0,
            base => base.saturating_add(i),
        })
        .map(loopback)
        .collect()
}

impl MeshConfig {
    /// The `dev` layout: ring manager on 50050 (its console on 50090), admin on 50051, three
    /// channel servers on 50061-50063 and a standby on 50064, gateways us-east on 8080 and
    /// eu-west on 8081; the presence ring's manager on 50052 (console on 50092), presence
    /// servers on 50071-50072 and a standby on 50073.
    pub fn dev(jwt_secret: String, admin_token: String) -> Self {
        use dev_ports::*;
        let console = |port| mesh_telemetry::side_port::http_addr(None, loopback(port));
        MeshConfig {
            ring_manager: loopback(RING_MANAGER),
            console: console(RING_MANAGER),
            ring: ring_manager::Config::default(),
            replication_factor: ring_manager::server::DEFAULT_REPLICATION_FACTOR,
            channel_servers: consecutive(CHANNEL_SERVERS, 0, 3),
            standbys: consecutive(CHANNEL_SERVERS, 3, 1),
            admin: loopback(ADMIN),
            gateways: vec![
                ("us-east".into(), loopback(US_EAST)),
                ("eu-west".into(), loopback(EU_WEST)),
            ],
            jwt_secret,
            jwt_claims: IssuerAudience::default(),
            admin_token,
            connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
            presence_ring_manager: loopback(PRESENCE_RING_MANAGER),
            presence_console: console(PRESENCE_RING_MANAGER),
            presence_servers: consecutive(PRESENCE_SERVERS, 0, 2),
            presence_standbys: consecutive(PRESENCE_SERVERS, 2, 1),
            presence_grace: presence_server::DEFAULT_GRACE,
            presence_gateway_lease: presence_server::DEFAULT_GATEWAY_LEASE,
            limits: gateway::limits::Limits::default(),
            boot: None,
            operator_tokens: Vec::new(),
            security: Security::Mtls,
            policy_file: None,
            webhooks: mesh_hooks::WebhookArgs::default(),
            vacate_grace: Duration::from_millis(channel_server::members::DEFAULT_GRACE_MS),
        }
    }

    /// The `dev` layout on ports the OS picks, with fixed test secrets: for tests.
    pub fn ephemeral() -> Self {
        MeshConfig {
            ring_manager: loopback(0),
            console: loopback(0),
            ring: ring_manager::Config::default(),
            replication_factor: ring_manager::server::DEFAULT_REPLICATION_FACTOR,
            channel_servers: vec![loopback(0); 3],
            standbys: vec![loopback(0)],
            admin: loopback(0),
            gateways: vec![
                ("us-east".into(), loopback(0)),
                ("eu-west".into(), loopback(0)),
            ],
            // 32 bytes: the shortest HS256 secret the services take.
            jwt_secret: "test-jwt-secret-test-jwt-secret!".into(),
            jwt_claims: IssuerAudience::default(),
            admin_token: "test-admin-token".into(),
            connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
            presence_ring_manager: loopback(0),
            presence_console: loopback(0),
            presence_servers: vec![loopback(0); 2],
            presence_standbys: vec![loopback(0)],
            presence_grace: presence_server::DEFAULT_GRACE,
            presence_gateway_lease: presence_server::DEFAULT_GATEWAY_LEASE,
            limits: gateway::limits::Limits::default(),
            boot: None,
            operator_tokens: Vec::new(),
            security: Security::Mtls,
            policy_file: None,
            webhooks: mesh_hooks::WebhookArgs::default(),
            vacate_grace: Duration::from_millis(channel_server::members::DEFAULT_GRACE_MS),
        }
    }

    /// Every identity of the mesh's services, as its process's certificate names them.
    pub fn identities(&self) -> anyhow::Result<Vec<mesh_transport::Identity>> {
        use mesh_transport::Identity;
        let mut ids = vec![
            Identity::new(Role::RingManager, RING_MANAGER_ID)?,
            Identity::new(Role::RingManager, PRESENCE_RING_MANAGER_ID)?,
            Identity::new(Role::Admin, ADMIN_ID)?,
        ];
        let channel_servers = self.channel_servers.len() + self.standbys.len();
        for i in 1..=channel_servers {
            ids.push(Identity::new(Role::ChannelServer, &format!("cs-{i}"))?);
        }
        let presence_servers = self.presence_servers.len() + self.presence_standbys.len();
        for i in 1..=presence_servers {
            ids.push(Identity::new(Role::PresenceServer, &format!("ps-{i}"))?);
        }
        for (region, _) in &self.gateways {
            let id = gateway::config::default_id(region);
            ids.push(Identity::new(Role::Gateway, &id)?);
        }
        Ok(ids)
    }

    /// The hosts the services dial each other at: loopback, and every other address of the
    /// layout.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = ["127.0.0.1", "::1", "localhost"].map(String::from).into();
        let addrs = [self.ring_manager, self.admin, self.presence_ring_manager]
            .into_iter()
            .chain(self.channel_servers.iter().copied())
            .chain(self.standbys.iter().copied())
            .chain(self.presence_servers.iter().copied())
            .chain(self.presence_standbys.iter().copied());
        for addr in addrs {
            let ip = addr.ip().to_string();
            if !hosts.contains(&ip) {
                hosts.push(ip);
            }
        }
        hosts
    }

    /// Sets this process's transport for the mesh: mutual TLS with a certificate naming
    /// every service, or plaintext.
    pub fn configure_transport(&self) -> anyhow::Result<()> {
        match self.security {
            Security::Insecure => mesh_transport::configure(Transport::Insecure)?,
            Security::Mtls => Authority::for_this_process()?
                .configure_process(&self.identities()?, &self.hosts())?,
        }
        Ok(())
    }
}

/// A running mesh.
#[derive(Debug)]
pub struct Mesh {
    pub ring_manager: SocketAddr,
    /// The ring manager's console (HTTP).
    pub console: SocketAddr,
    /// Every channel server, active and standby, in start order.
    pub channel_servers: Vec<(NodeId, SocketAddr)>,
    pub admin: SocketAddr,
    /// (region, address) per gateway.
    pub gateways: Vec<(String, SocketAddr)>,
    pub jwt_secret: String,
    /// The `iss` and `aud` its tokens carry, when set.
    pub jwt_claims: IssuerAudience,
    pub admin_token: String,
    /// How long start-up took, until every channel server was on the ring.
    pub started_in: Duration,
    cancel: CancellationToken,
    /// Each channel server's own stop token (for failure tests).
    cs_cancel: Vec<(NodeId, CancellationToken)>,
    pub presence_ring_manager: SocketAddr,
    /// The presence ring manager's console (HTTP).
    pub presence_console: SocketAddr,
    /// Every presence server, active and standby, in start order.
    pub presence_servers: Vec<(NodeId, SocketAddr)>,
    /// The HTTP listener (`/metrics`, `/healthz`, `/readyz`) of every gRPC service, by name:
    /// `admin`, `cs-1`, ..., `ps-1`, ... (gateways serve them on their own port; ring managers
    /// on their consoles).
    pub http: Vec<(String, SocketAddr)>,
    /// Each presence server's and each gateway's own stop token (for failure tests).
    ps_cancel: Vec<(NodeId, CancellationToken)>,
    gw_cancel: Vec<(String, CancellationToken)>,
    tasks: Tasks,
    /// How its services speak to each other.
    pub security: Security,
}

/// Every service's task, each ending with its name and how it ended.
type Tasks = JoinSet<(String, anyhow::Result<()>)>;

/// Runs `serve` as the service `name` among `tasks`.
fn spawn<E>(
    tasks: &mut Tasks,
    name: String,
    serve: impl Future<Output = Result<(), E>> + Send + 'static,
) where
    E: Into<anyhow::Error>,
{
    tasks.spawn(async move { (name, serve.await.map_err(Into::into)) });
}

/// Active addresses then standby ones, each with whether it is a standby.
fn nodes<'a>(
    actives: &'a [SocketAddr],
    standbys: &'a [SocketAddr],
) -> impl Iterator<Item = (SocketAddr, bool)> + 'a {
    let actives = actives.iter().map(|a| (*a, false));
    actives.chain(standbys.iter().map(|a| (*a, true)))
}

/// Binds the embedded ring manager `config` describes and serves it as the service `name`;
/// returns its gRPC and console addresses and the manager (to follow its ring).
async fn start_ring_manager(
    tasks: &mut Tasks,
    name: &str,
    config: ProcessConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<(SocketAddr, SocketAddr, RingManager)> {
    let bound = ring_manager::run::bind(config, cancel)
        .await
        .with_context(|| format!("starting the {name}"))?;
    let manager = bound.manager().context("an embedded ring manager")?.clone();
    let addrs = (bound.local_addr(), bound.console_addr());
    spawn(tasks, name.to_string(), bound.serve(cancel.clone()));
    Ok((addrs.0, addrs.1, manager))
}

/// Waits until `manager`'s ring has `actives` active nodes and at least `standbys` standbys
/// are registered, for at most [`READY_TIMEOUT`]; false if not by then.
async fn assembled(manager: &RingManager, actives: usize, standbys: usize) -> bool {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut ring = manager.subscribe();
    let active = ring.wait_for(|r| r.nodes().len() == actives);
    if !matches!(tokio::time::timeout_at(deadline, active).await, Ok(Ok(_))) {
        return false;
    }
    let standbys_in = || {
        let members = manager.members();
        members
            .iter()
            .filter(|(_, s)| *s == NodeState::Standby)
            .count()
            >= standbys
    };
    while !standbys_in() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Waits until every HTTP side at `addrs` answers `/readyz` with 200, for at most
/// [`READY_TIMEOUT`]; the first that did not, and why, if not by then.
async fn all_ready(addrs: impl Iterator<Item = SocketAddr>) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let client = reqwest::Client::new();
    for addr in addrs {
        loop {
            let answer = client.get(format!("http://{addr}/readyz")).send().await;
            let why = match answer {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("the service at {addr} was not ready ({why})"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

impl Mesh {
    /// Binds every socket, starts every service, and returns once every channel server owns
    /// slots on the ring and every service is ready. `cancel` stops it all.
    pub async fn start(config: MeshConfig, cancel: CancellationToken) -> anyhow::Result<Mesh> {
        let started = Instant::now();
        config
            .configure_transport()
            .context("setting up the mesh's transport")?;
        let mut tasks = Tasks::new();
        // The HTTP side (`/metrics`, `/healthz`, `/readyz`) of every gRPC service, admin first.
        let mut http = Vec::new();

        let (ring_manager, console, manager) = start_ring_manager(
            &mut tasks,
            "ring manager",
            ProcessConfig {
                operators: ring_manager::console::actions::Operators::parse(
                    &config.operator_tokens,
                )
                .map_err(ring_manager::Error::OperatorToken)?,
                ..ProcessConfig::embedded(
                    ring_manager::Config {
                        node_role: Some(Role::ChannelServer),
                        replication_factor: config.replication_factor,
                        ..config.ring
                    },
                    config.ring_manager,
                    config.console,
                )
            },
            &cancel,
        )
        .await?;
        let ring = RingSource::Direct(format!("http://{ring_manager}"));

        let mut channel_servers = Vec::new();
        let mut cs_cancel = Vec::new();
        for (i, (addr, standby)) in nodes(&config.channel_servers, &config.standbys).enumerate() {
            let node = NodeId::new(&format!("cs-{}", i + 1))?;
            let name = format!("channel server {node}");
            let cs = channel_server::Config {
                standby,
                policy_file: config.policy_file.clone(),
                webhooks: config.webhooks.clone(),
                members: channel_server::members::Bounds {
                    grace_ms: config.vacate_grace.as_millis() as u64,
                    ..channel_server::members::Bounds::default()
                },
                ..channel_server::Config::new(node.clone(), ring.clone())
            };
            let bound = channel_server::run::bind(cs, addr, None)
                .await
                .with_context(|| format!("starting {name}"))?;
            channel_servers.push((node.clone(), bound.local_addr()));
            http.push((node.to_string(), bound.http_addr()));
            let stop = cancel.child_token();
            cs_cancel.push((node, stop.clone()));
            spawn(&mut tasks, name, bound.serve(stop));
        }

        // The presence ring: its own ring manager, managed exactly like the channel servers'.
        let (presence_ring_manager, presence_console, presence_manager) = start_ring_manager(
            &mut tasks,
            "presence ring manager",
            ProcessConfig::embedded(
                ring_manager::Config {
                    node_role: Some(Role::PresenceServer),
                    // Presence is soft state: its ring places no followers.
                    replication_factor: 1,
                    ..config.ring
                },
                config.presence_ring_manager,
                config.presence_console,
            ),
            &cancel,
        )
        .await?;
        let presence_ring = RingSource::Direct(format!("http://{presence_ring_manager}"));
        let mut presence_servers = Vec::new();
        let mut ps_cancel = Vec::new();
        let all = nodes(&config.presence_servers, &config.presence_standbys);
        for (i, (addr, standby)) in all.enumerate() {
            let node = NodeId::new(&format!("ps-{}", i + 1))?;
            let name = format!("presence server {node}");
            let ps = presence_server::Config {
                standby,
                grace: config.presence_grace,
                gateway_lease: config.presence_gateway_lease,
                webhooks: config.webhooks.clone(),
                ..presence_server::Config::new(node.clone(), presence_ring.clone())
            };
            let bound = presence_server::run::bind(ps, addr, None)
                .await
                .with_context(|| format!("starting {name}"))?;
            presence_servers.push((node.clone(), bound.local_addr()));
            http.push((node.to_string(), bound.http_addr()));
            let stop = cancel.child_token();
            ps_cancel.push((node, stop.clone()));
            spawn(&mut tasks, name, bound.serve(stop));
        }

        let admin_config = admin_server::Config {
            ring: ring.clone(),
            presence_ring: Some(presence_ring.clone()),
            admin_token: config.admin_token.clone(),
            jwt_secret: config.jwt_secret.clone().into_bytes(),
            jwt_claims: config.jwt_claims.clone(),
            telemetry: admin_server::config::telemetry(ADMIN_ID),
            public_tls: None,
        };
        let bound = admin_server::run::bind(admin_config, config.admin, None)
            .await
            .context("starting the admin server")?;
        let admin = bound.local_addr();
        http.insert(0, ("admin".to_string(), bound.http_addr()));
        spawn(
            &mut tasks,
            "admin server".into(),
            bound.serve(cancel.clone()),
        );

        // Bound first, so that each may forward clients to the others (`--redirect-allow`).
        let mut bound_gateways = Vec::new();
        for (region, addr) in &config.gateways {
            let name = format!("gateway {region}");
            let gw = gateway::Config {
                id: gateway::config::default_id(region),
                region: region.clone(),
                ring: ring.clone(),
                presence_ring: Some(presence_ring.clone()),
                public_url: None,
                jwt_secret: config.jwt_secret.clone().into_bytes(),
                connect_url_ttl: config.connect_url_ttl,
                limits: config.limits.clone(),
                tokens: gateway::tokens::TokenConfig {
                    claims: config.jwt_claims.clone(),
                    ..Default::default()
                },
                redirect_allow: Default::default(),
                policy_file: config.policy_file.clone(),
                boot: config.boot.clone(),
            };
            let bound = gateway::run::bind(gw, *addr)
                .await
                .with_context(|| format!("starting the {name}"))?;
            bound_gateways.push((region.clone(), name, bound));
        }
        let own = gateway::region::RedirectAllow::new(
            bound_gateways
                .iter()
                .map(|(_, _, b)| gateway::region::AllowEntry::origin(b.local_addr()))
                .collect(),
        );
        let mut gateways = Vec::new();
        let mut gw_cancel = Vec::new();
        for (region, name, bound) in bound_gateways {
            let bound = bound.with_redirect_allow(own.clone());
            gateways.push((region.clone(), bound.local_addr()));
            let stop = cancel.child_token();
            gw_cancel.push((region.clone(), stop.clone()));
            spawn(&mut tasks, name, bound.serve(stop));
        }

        // Ready once every active server owns slots and every standby is registered, on both
        // rings.
        let (actives, standbys) = (config.channel_servers.len(), config.standbys.len());
        if !assembled(&manager, actives, standbys).await {
            cancel.cancel();
            anyhow::bail!("channel servers did not all join the ring within {READY_TIMEOUT:?}");
        }
        let actives = config.presence_servers.len();
        let standbys = config.presence_standbys.len();
        if !assembled(&presence_manager, actives, standbys).await {
            cancel.cancel();
            anyhow::bail!("presence servers did not all join their ring within {READY_TIMEOUT:?}");
        }
        // The admin server and the gateways follow the ring over connections of their own, a
        // moment after the ring manager has it.
        let sides = http.iter().map(|(_, a)| *a);
        if let Err(not_ready) = all_ready(sides.chain(gateways.iter().map(|(_, a)| *a))).await {
            cancel.cancel();
            anyhow::bail!("{not_ready} within {READY_TIMEOUT:?}");
        }
        Ok(Mesh {
            ring_manager,
            console,
            channel_servers,
            admin,
            gateways,
            jwt_secret: config.jwt_secret,
            jwt_claims: config.jwt_claims,
            admin_token: config.admin_token,
            started_in: started.elapsed(),
            cancel,
            cs_cancel,
            presence_ring_manager,
            presence_console,
            presence_servers,
            http,
            ps_cancel,
            gw_cancel,
            tasks,
            security: config.security,
        })
    }

    /// Stops channel server `node` at once, as a crash would: its sockets close and it stops
    /// heartbeating (in-process tests; the multi-process tests use SIGKILL).
    pub fn stop_channel_server(&self, node: &str) -> bool {
        match self.cs_cancel.iter().find(|(id, _)| id.as_str() == node) {
            Some((_, cancel)) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops presence server `node` at once, as a crash would.
    pub fn stop_presence_server(&self, node: &str) -> bool {
        match self.ps_cancel.iter().find(|(id, _)| id.as_str() == node) {
            Some((_, cancel)) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops the gateway of `region` (its clients' sockets close).
    pub fn stop_gateway(&self, region: &str) -> bool {
        match self.gw_cancel.iter().find(|(r, _)| r == region) {
            Some((_, cancel)) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The RTM base URL of the gateway in `region`, e.g. "http://127.0.0.1:8080/api/".
    pub fn rtm_base_url(&self, region: &str) -> Option<String> {
        self.gateways
            .iter()
            .find(|(r, _)| r == region)
            .map(|(_, addr)| format!("http://{addr}/api/"))
    }

    /// Mints a client token for `user` of `team` with `channels`, valid for an hour, with the
    /// mesh's `iss` and `aud`.
    pub fn token(&self, user: &str, team: &str, channels: &[&str]) -> anyhow::Result<String> {
        let now = unix_now();
        let identity = Identity {
            user: UserId::new(user)?,
            team: TeamId::new(team)?,
            name: None,
            channels: channels
                .iter()
                .map(|c| c.parse())
                .collect::<Result<_, _>>()?,
            expires_at: now + 3600,
            jti: None,
        };
        let key = TokenKey::hs256(self.jwt_secret.as_bytes())?.expect(self.jwt_claims.clone());
        Ok(key.mint(&identity, now)?)
    }

    /// Waits until a service stops (an error) or `cancel` fires, then stops everything within
    /// `grace`; a service that does not stop by then is aborted, and that is an error too.
    pub async fn run_until_stopped(mut self, grace: Duration) -> anyhow::Result<()> {
        let failure = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => None,
            // A service that ends because the stop already began (its token is a child of
            // `cancel`) is no failure: seen here first only by the luck of the poll order.
            Some(done) = self.tasks.join_next() => match done {
                Ok((_, Ok(()))) if self.cancel.is_cancelled() => None,
                Ok((name, Ok(()))) => Some(anyhow::anyhow!("{name} stopped unexpectedly")),
                Ok((name, Err(e))) => Some(e.context(format!("{name} failed"))),
                Err(join) => Some(anyhow::anyhow!("a service task panicked: {join}")),
            },
        };
        let stopped = self.stop(grace).await;
        match failure {
            Some(e) => Err(e),
            None if !stopped => {
                anyhow::bail!("services did not stop within {grace:?}; aborted them")
            }
            None => Ok(()),
        }
    }

    /// Stops every service, waiting at most `grace`, then aborts what is left.
    pub async fn shutdown(&mut self, grace: Duration) {
        self.stop(grace).await;
    }

    /// [`Mesh::shutdown`]; false if services had to be aborted.
    async fn stop(&mut self, grace: Duration) -> bool {
        self.cancel.cancel();
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = self.tasks.join_next().await {
                if let Ok((name, Err(e))) = done {
                    tracing::warn!(service = %name, error = %e, "service ended with an error");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "services did not stop within the grace period; aborting them"
            );
            self.tasks.abort_all();
        }
        drained.is_ok()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
