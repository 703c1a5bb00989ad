//! A whole mesh in one process: ring manager, channel servers, presence servers (with their
//! own ring manager), admin server and one gateway per region — each serving on its own socket and talking to the others over the same gRPC it
//! uses across machines. `channelmesh dev` runs it; the integration tests boot it on port 0.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_core::{Identity, NodeId, TeamId, TokenKey, UserId};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long start-up waits for every channel server to join the ring.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to run a mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub ring_manager: SocketAddr,
    /// The ring manager's HTTP listener: the SRE console, `/healthz`, `/readyz`.
    pub console: SocketAddr,
    /// Failure detection of the ring manager.
    pub ring: ring_manager::Config,
    /// One address per active channel server (cs-1, cs-2, ...).
    pub channel_servers: Vec<SocketAddr>,
    /// One address per standby channel server (numbered after the active ones).
    pub standbys: Vec<SocketAddr>,
    pub admin: SocketAddr,
    /// (region, address) per gateway.
    pub gateways: Vec<(String, SocketAddr)>,
    pub jwt_secret: String,
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
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl MeshConfig {
    /// The `dev` layout: ring manager on 50050 (its console on 50090), admin on 50051, three
    /// channel servers on 50061-50063 and a standby on 50064, gateways us-east on 8080 and
    /// eu-west on 8081; the presence ring's manager on 50052 (console on 50092), presence
    /// servers on 50071-50072 and a standby on 50073.
    pub fn dev(jwt_secret: String, admin_token: String) -> Self {
        MeshConfig {
            ring_manager: loopback(50050),
            console: loopback(50090),
            ring: ring_manager::Config::default(),
            channel_servers: (1..=3).map(|i| loopback(50060 + i)).collect(),
            standbys: vec![loopback(50064)],
            admin: loopback(50051),
            gateways: vec![
                ("us-east".into(), loopback(8080)),
                ("eu-west".into(), loopback(8081)),
            ],
            jwt_secret,
            admin_token,
            connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
            presence_ring_manager: loopback(50052),
            presence_console: loopback(50092),
            presence_servers: (1..=2).map(|i| loopback(50070 + i)).collect(),
            presence_standbys: vec![loopback(50073)],
            presence_grace: presence_server::DEFAULT_GRACE,
            presence_gateway_lease: presence_server::DEFAULT_GATEWAY_LEASE,
            limits: gateway::limits::Limits::default(),
        }
    }

    /// The `dev` layout on ports the OS picks, with fixed test secrets: for tests.
    pub fn ephemeral() -> Self {
        MeshConfig {
            ring_manager: loopback(0),
            console: loopback(0),
            ring: ring_manager::Config::default(),
            channel_servers: vec![loopback(0); 3],
            standbys: vec![loopback(0)],
            admin: loopback(0),
            gateways: vec![
                ("us-east".into(), loopback(0)),
                ("eu-west".into(), loopback(0)),
            ],
            jwt_secret: "test-jwt-secret".into(),
            admin_token: "test-admin-token".into(),
            connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
            presence_ring_manager: loopback(0),
            presence_console: loopback(0),
            presence_servers: vec![loopback(0); 2],
            presence_standbys: vec![loopback(0)],
            presence_grace: presence_server::DEFAULT_GRACE,
            presence_gateway_lease: presence_server::DEFAULT_GATEWAY_LEASE,
            limits: gateway::limits::Limits::default(),
        }
    }
}

/// How far a gRPC service's HTTP port (`/metrics`, `/healthz`, `/readyz`) is from its gRPC port
/// by default: the ring manager's console rule (50050 -> 50090), for every gRPC service.
pub const HTTP_PORT_OFFSET: u16 = 40;

/// The HTTP address of a gRPC service listening on `grpc`: same interface, port +
/// [`HTTP_PORT_OFFSET`]; port 0 stays "the OS picks".
pub fn http_addr(grpc: SocketAddr) -> SocketAddr {
    let port = match grpc.port() {
        0 => 0,
        p => p.checked_add(HTTP_PORT_OFFSET).unwrap_or(0),
    };
    SocketAddr::new(grpc.ip(), port)
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
    tasks: JoinSet<(String, anyhow::Result<()>)>,
    tracker: tokio_util::task::TaskTracker,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} to {addr}"))
}

/// Serves `telemetry` over HTTP on `addr` as one of `tasks`, until `cancel`; returns the bound
/// address.
async fn serve_http(
    tasks: &mut JoinSet<(String, anyhow::Result<()>)>,
    telemetry: mesh_telemetry::Telemetry,
    addr: SocketAddr,
    name: String,
    cancel: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = bind(addr, &format!("{name} HTTP listener")).await?;
    let local = listener.local_addr()?;
    tasks.spawn(async move {
        let r = mesh_telemetry::http::serve(listener, telemetry, cancel).await;
        (format!("{name} HTTP"), r.map_err(anyhow::Error::from))
    });
    Ok(local)
}

/// Serves `manager`'s console on `addr` as one of `tasks`; returns the bound address.
async fn serve_console(
    tasks: &mut JoinSet<(String, anyhow::Result<()>)>,
    manager: &ring_manager::RingManager,
    addr: SocketAddr,
    which: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let name = format!("{which}ring manager console");
    let listener = bind(addr, &name).await?;
    let local = listener.local_addr()?;
    let console = ring_manager::console::Console::embedded(manager.clone());
    let cancel = cancel.clone();
    tasks.spawn(async move {
        let r = ring_manager::console::serve(console, listener, cancel).await;
        (name, r.map_err(anyhow::Error::from))
    });
    Ok(local)
}

impl Mesh {
    /// Binds every socket, starts every service, and returns once every channel server owns
    /// slots on the ring. `cancel` stops it all.
    pub async fn start(config: MeshConfig, cancel: CancellationToken) -> anyhow::Result<Mesh> {
        let started = Instant::now();
        let mut tasks = JoinSet::new();

        let rm_listener = bind(config.ring_manager, "ring manager").await?;
        let ring_manager = rm_listener.local_addr()?;
        let rm_endpoint = format!("http://{ring_manager}");
        let tracker = tokio_util::task::TaskTracker::new();
        let manager = ring_manager::RingManager::new(config.ring, None, &tracker, cancel.clone())?;
        let mut ring = manager.subscribe();
        {
            let (manager, cancel) = (manager.clone(), cancel.clone());
            tasks.spawn(async move {
                let r = ring_manager::serve(manager, rm_listener, cancel).await;
                ("ring manager".to_string(), r.map_err(anyhow::Error::from))
            });
        }
        let console = serve_console(&mut tasks, &manager, config.console, "", &cancel).await?;

        let mut http = Vec::new();
        let mut channel_servers = Vec::new();
        let mut cs_cancel = Vec::new();
        let actives = config.channel_servers.iter().map(|a| (a, false));
        let standbys = config.standbys.iter().map(|a| (a, true));
        for (i, (addr, standby)) in actives.chain(standbys).enumerate() {
            let listener = bind(*addr, "channel server").await?;
            let local = listener.local_addr()?;
            let node = NodeId::new(&format!("cs-{}", i + 1))?;
            channel_servers.push((node.clone(), local));
            let telemetry = mesh_telemetry::Telemetry::new(&[("node", node.as_str())]);
            let cancel = cancel.child_token();
            let http_local = serve_http(
                &mut tasks,
                telemetry.clone(),
                http_addr(*addr),
                format!("channel server {node}"),
                cancel.clone(),
            )
            .await?;
            http.push((node.to_string(), http_local));
            let cs_config = channel_server::Config {
                node: node.clone(),
                ring: ring_client::RingSource::Direct(rm_endpoint.clone()),
                advertise: None,
                limits: channel_server::Limits::default(),
                gateway_queue: channel_server::DEFAULT_GATEWAY_QUEUE,
                standby,
                telemetry,
            };
            cs_cancel.push((node.clone(), cancel.clone()));
            tasks.spawn(async move {
                let r = channel_server::serve(cs_config, listener, cancel).await;
                (
                    format!("channel server {node}"),
                    r.map_err(anyhow::Error::from),
                )
            });
        }

        // The presence ring: its own ring manager, managed exactly like the channel servers'.
        let prm_listener = bind(config.presence_ring_manager, "presence ring manager").await?;
        let presence_ring_manager = prm_listener.local_addr()?;
        let prm_endpoint = format!("http://{presence_ring_manager}");
        let presence_manager =
            ring_manager::RingManager::new(config.ring, None, &tracker, cancel.clone())?;
        let mut presence_ring = presence_manager.subscribe();
        {
            let (manager, cancel) = (presence_manager.clone(), cancel.clone());
            tasks.spawn(async move {
                let r = ring_manager::serve(manager, prm_listener, cancel).await;
                (
                    "presence ring manager".to_string(),
                    r.map_err(anyhow::Error::from),
                )
            });
        }
        let presence_console = serve_console(
            &mut tasks,
            &presence_manager,
            config.presence_console,
            "presence ",
            &cancel,
        )
        .await?;
        let presence_source = ring_client::RingSource::Direct(prm_endpoint.clone());
        let mut presence_servers = Vec::new();
        let mut ps_cancel = Vec::new();
        let actives = config.presence_servers.iter().map(|a| (a, false));
        let standbys = config.presence_standbys.iter().map(|a| (a, true));
        for (i, (addr, standby)) in actives.chain(standbys).enumerate() {
            let listener = bind(*addr, "presence server").await?;
            let node = NodeId::new(&format!("ps-{}", i + 1))?;
            presence_servers.push((node.clone(), listener.local_addr()?));
            let telemetry = mesh_telemetry::Telemetry::new(&[("node", node.as_str())]);
            let cancel = cancel.child_token();
            let http_local = serve_http(
                &mut tasks,
                telemetry.clone(),
                http_addr(*addr),
                format!("presence server {node}"),
                cancel.clone(),
            )
            .await?;
            http.push((node.to_string(), http_local));
            let ps_config = presence_server::Config {
                node: node.clone(),
                ring: presence_source.clone(),
                advertise: None,
                standby,
                grace: config.presence_grace,
                gateway_lease: config.presence_gateway_lease,
                telemetry,
            };
            ps_cancel.push((node.clone(), cancel.clone()));
            tasks.spawn(async move {
                let r = presence_server::serve(ps_config, listener, cancel).await;
                (
                    format!("presence server {node}"),
                    r.map_err(anyhow::Error::from),
                )
            });
        }

        let admin_listener = bind(config.admin, "admin server").await?;
        let admin = admin_listener.local_addr()?;
        {
            let telemetry = mesh_telemetry::Telemetry::new(&[("admin", "admin-1")]);
            let http_local = serve_http(
                &mut tasks,
                telemetry.clone(),
                http_addr(config.admin),
                "admin server".to_string(),
                cancel.clone(),
            )
            .await?;
            http.insert(0, ("admin".to_string(), http_local));
            let admin_config = admin_server::Config {
                ring: ring_client::RingSource::Direct(rm_endpoint.clone()),
                presence_ring: Some(presence_source.clone()),
                admin_token: config.admin_token.clone(),
                jwt_secret: config.jwt_secret.clone().into_bytes(),
                telemetry,
            };
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let r = admin_server::serve(admin_config, admin_listener, cancel).await;
                ("admin server".to_string(), r.map_err(anyhow::Error::from))
            });
        }

        let mut gateways = Vec::new();
        let mut gw_cancel = Vec::new();
        for (region, addr) in &config.gateways {
            let listener = bind(*addr, "gateway").await?;
            let local = listener.local_addr()?;
            gateways.push((region.clone(), local));
            let gw_config = gateway::Config {
                id: format!("{region}-1"),
                region: region.clone(),
                ring: ring_client::RingSource::Direct(rm_endpoint.clone()),
                presence_ring: Some(presence_source.clone()),
                public_url: None,
                jwt_secret: config.jwt_secret.clone().into_bytes(),
                connect_url_ttl: config.connect_url_ttl,
                limits: config.limits.clone(),
                tokens: Default::default(),
            };
            let (cancel, name) = (cancel.child_token(), format!("gateway {region}"));
            gw_cancel.push((region.clone(), cancel.clone()));
            tasks.spawn(async move {
                let r = gateway::serve(gw_config, listener, cancel).await;
                (name, r.map_err(anyhow::Error::from))
            });
        }

        // Ready once every active channel server owns slots and every standby is registered.
        let want = config.channel_servers.len();
        let waited =
            tokio::time::timeout(READY_TIMEOUT, ring.wait_for(|r| r.nodes().len() == want)).await;
        let standbys_in = || {
            manager
                .members()
                .iter()
                .filter(|(_, s)| *s == ring_manager::NodeState::Standby)
                .count()
                >= config.standbys.len()
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while matches!(waited, Ok(Ok(_))) && !standbys_in() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !matches!(waited, Ok(Ok(_))) || !standbys_in() {
            cancel.cancel();
            anyhow::bail!("channel servers did not all join the ring within {READY_TIMEOUT:?}");
        }
        let want = config.presence_servers.len();
        let waited = tokio::time::timeout(
            READY_TIMEOUT,
            presence_ring.wait_for(|r| r.nodes().len() == want),
        )
        .await;
        let presence_standbys_in = || {
            presence_manager
                .members()
                .iter()
                .filter(|(_, s)| *s == ring_manager::NodeState::Standby)
                .count()
                >= config.presence_standbys.len()
        };
        while matches!(waited, Ok(Ok(_))) && !presence_standbys_in() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !matches!(waited, Ok(Ok(_))) || !presence_standbys_in() {
            cancel.cancel();
            anyhow::bail!("presence servers did not all join their ring within {READY_TIMEOUT:?}");
        }
        Ok(Mesh {
            ring_manager,
            console,
            channel_servers,
            admin,
            gateways,
            jwt_secret: config.jwt_secret,
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
            tracker,
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

    /// Mints a client token for `user` of `team` with `channels`, valid for an hour.
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
        Ok(TokenKey::hs256(self.jwt_secret.as_bytes()).mint(&identity, now)?)
    }

    /// Waits until a service stops (an error) or `cancel` fires, then stops everything within
    /// `grace`.
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
        self.shutdown(grace).await;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops every service, waiting at most `grace`, then aborts what is left.
    pub async fn shutdown(&mut self, grace: Duration) {
        self.cancel.cancel();
        self.tracker.close();
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
