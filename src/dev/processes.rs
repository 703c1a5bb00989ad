//! `channelmesh dev --multi-process`: every service as its own child process of this binary,
//! running the service's own subcommand (the same `run` as in production), on the same ports
//! as `dev`, so that a channel server can really be killed. With `--consul` the services find
//! the ring in Consul and several ring managers elect a leader there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use admin_server::config::{ENV_ADMIN_TOKEN, ENV_JWT_AUDIENCE, ENV_JWT_ISSUER, ENV_JWT_SECRET};
use anyhow::{Context, bail};
use mesh_proto::ring::GetRingRequest;
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ring_client::ConsulRing;
use ring_client::RingSource;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use mesh_transport::{Identity, Role};

use super::mesh::{MeshConfig, PRESENCE_RING_MANAGER_ID, RING_MANAGER_ID};
use super::state::StateDir;
use crate::certs::{self, Authority};

/// How long a child may take to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the mesh may take to assemble its ring.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A started child process.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub addr: SocketAddr,
    pub pid: u32,
    child: Child,
    /// How it was started: [`Service::restart`] starts it so again.
    launch: Launch,
}

/// A child's command line and environment, kept so that it can be started again.
#[derive(Debug, Clone)]
struct Launch {
    exe: PathBuf,
    args: Vec<String>,
    /// Variables to set (`Some`) or remove (`None`).
    env: Vec<(&'static str, Option<String>)>,
    /// Its output goes to `DIR/NAME.log` rather than this process's.
    log_dir: Option<PathBuf>,
    /// It runs in the cgroup v2 `DIR/NAME`, joined before it starts.
    cgroup: Option<PathBuf>,
    /// It serves an HTTP side port, by default its gRPC port + 40 (every role but a gateway,
    /// whose one port is HTTP).
    side_port: bool,
}

/// What `start_all` runs besides the mesh layout.
#[derive(Debug, Default)]
pub struct Options {
    /// The embedded ring manager's state file.
    pub ring_state_file: Option<std::path::PathBuf>,
    /// Run on the Consul agent at this URL: every ring manager in `extra_ring_managers` joins
    /// the leader election, and every service finds the ring there.
    pub consul: Option<String>,
    /// The Consul key prefix (default `channelmesh`).
    pub consul_prefix: Option<String>,
    /// Consul's ACL token, given to every child by environment (not argv).
    pub consul_token: Option<String>,
    /// With Consul: more ring managers (followers), one per address.
    pub extra_ring_managers: Vec<SocketAddr>,
    /// The global flags every child gets: logging, tracing, `--insecure`.
    pub global_args: Vec<String>,
    /// Where each child's certificate is written (issued by this process's CA): mutual TLS.
    /// `None`: plaintext (`--insecure` in `global_args`).
    pub state: Option<StateDir>,
    /// The `channelmesh` binary the children run (default: this one).
    pub exe: Option<PathBuf>,
    /// Each child's stdout and stderr go to `DIR/NAME.log` rather than this process's.
    pub log_dir: Option<PathBuf>,
    /// Each child runs in a cgroup v2 of its own, `DIR/NAME` (made if absent), which it joins
    /// before it opens a socket: its sockets then carry the cgroup, for firewall rules.
    pub cgroups: Option<PathBuf>,
}

/// The running children.
#[derive(Debug)]
pub struct Processes {
    /// The first ring manager (with Consul, the first to campaign).
    pub ring_manager: Service,
    /// With Consul, the other ring managers.
    pub extra_ring_managers: Vec<Service>,
    pub presence_ring_manager: Service,
    /// Active then standby presence servers: (id, standby, service).
    pub presence_servers: Vec<(String, bool, Service)>,
    /// Active then standby channel servers: (id, standby, service).
    pub channel_servers: Vec<(String, bool, Service)>,
    pub admin: Service,
    pub gateways: Vec<(String, Service)>,
    pub started_in: Duration,
}

/// The `--tls-*` flags of the child that is `identity`: a certificate of this process's CA
/// naming it, written to the state directory. None with plaintext.
fn child_tls(
    options: &Options,
    config: &MeshConfig,
    (role, id): (Role, &str),
) -> anyhow::Result<Vec<String>> {
    let Some(state) = &options.state else {
        return Ok(Vec::new());
    };
    let identity = Identity::new(role, id)?;
    let credentials = Authority::for_this_process()?.issue(
        &[identity],
        &config.hosts(),
        certs::days(certs::DEFAULT_VALIDITY_DAYS),
    )?;
    state.child_flags(id, &credentials)
}

/// Starts `exe args...` as the service `identity`, with the secrets in its environment and
/// `options`' global flags, and waits for its `listening on ADDR` line.
async fn start_with(
    name: &str,
    args: &[String],
    config: &MeshConfig,
    options: &Options,
    identity: (Role, &str),
) -> anyhow::Result<Service> {
    let exe = match &options.exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().context("locating the channelmesh binary")?,
    };
    let tls = child_tls(options, config, identity)?;
    // The token claims as the mesh has them, not as this process's environment may.
    let claims = &config.jwt_claims;
    let mut env = vec![
        (ENV_JWT_ISSUER, claims.issuer.clone()),
        (ENV_JWT_AUDIENCE, claims.audience.clone()),
        (ENV_JWT_SECRET, Some(config.jwt_secret.clone())),
        (ENV_ADMIN_TOKEN, Some(config.admin_token.clone())),
    ];
    // Consul's ACL token and the HTTP token by environment, not argv, however `dev` got them.
    if let Some(token) = &options.consul_token {
        env.push((ring_client::args::ENV_CONSUL_TOKEN, Some(token.clone())));
    }
    // The console's operator tokens (only ring managers read them), by environment too.
    if !config.operator_tokens.is_empty() {
        let var = ring_manager::console::actions::ENV_OPERATOR_TOKEN;
        env.push((var, Some(config.operator_tokens.join(","))));
    }
    // The webhooks' secret by environment too, as the services read it.
    if let Some(secret) = &config.webhooks.secret {
        let secret = String::from_utf8_lossy(secret.expose()).into_owned();
        env.push((mesh_hooks::SECRET_ENV, Some(secret)));
    }
    if let Some(token) = mesh_telemetry::access::token() {
        let token = token.expose().to_string();
        env.push((mesh_telemetry::access::ENV_HTTP_TOKEN, Some(token)));
    }
    let launch = Launch {
        exe,
        args: [args, &options.global_args, &tls].concat(),
        env,
        log_dir: options.log_dir.clone(),
        cgroup: options.cgroups.as_ref().map(|dir| dir.join(name)),
        side_port: identity.0 != Role::Gateway,
    };
    let (child, pid, addr) = launch.spawn(name).await?;
    Ok(Service {
        name: name.to_string(),
        addr,
        pid,
        child,
        launch,
    })
}

impl Launch {
    /// Starts the child `name` and waits for its `listening on ADDR` line: (child, pid, ADDR).
    async fn spawn(&self, name: &str) -> anyhow::Result<(Child, u32, SocketAddr)> {
        let mut command = match &self.cgroup {
            None => Command::new(&self.exe),
            Some(cgroup) => {
                std::fs::create_dir_all(cgroup)
                    .with_context(|| format!("creating the cgroup {}", cgroup.display()))?;
                // The shell joins the cgroup, then becomes the service (same pid).
                let mut command = Command::new("sh");
                command
                    .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
                    .arg(cgroup)
                    .arg(&self.exe);
                command
            }
        };
        for (var, value) in &self.env {
            match value {
                Some(value) => command.env(var, value),
                None => command.env_remove(var),
            };
        }
        let log = match &self.log_dir {
            Some(dir) => {
                let path = dir.join(format!("{name}.log"));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                Some(file)
            }
            None => None,
        };
        if let Some(file) = &log {
            command.stderr(file.try_clone()?);
        }
        let mut child = command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("the child has a pid")?;
        let stdout = child.stdout.take().context("the child's stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .with_context(|| format!("{name} did not start within {START_TIMEOUT:?}"))??
            .with_context(|| {
                let tail = self.log_tail(name).unwrap_or_default();
                format!("{name} exited before listening{tail}")
            })?;
        let addr: SocketAddr = first
            .strip_prefix("listening on ")
            .with_context(|| format!("{name} printed {first:?}"))?
            .parse()?;
        // Keep draining its stdout so that it never blocks or fails on a full pipe.
        let prefix = name.to_string();
        tokio::spawn(async move {
            let mut log = log;
            while let Ok(Some(line)) = lines.next_line().await {
                match &mut log {
                    Some(file) => {
                        use std::io::Write;
                        let _ = writeln!(file, "{line}");
                    }
                    None => println!("[{prefix}] {line}"),
                }
            }
        });
        Ok((child, pid, addr))
    }
}

impl Launch {
    /// The last lines of `name`'s log, when it has one: why a child that ended said it did.
    fn log_tail(&self, name: &str) -> Option<String> {
        let path = self.log_dir.as_ref()?.join(format!("{name}.log"));
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n");
        Some(format!("; the end of its log:\n{tail}"))
    }
}

impl Service {
    /// Starts this service again as it was started, plus `extra` flags, on the address it
    /// listened on (which a `--listen` on port 0 lets the OS pick only the first time): kills
    /// the process first if it still runs.
    pub async fn restart(&mut self, extra: &[String]) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(START_TIMEOUT, self.child.wait()).await;
        let mut launch = self.launch.clone();
        if let Some(i) = launch.args.iter().position(|a| a == "--listen")
            && let Some(value) = launch.args.get_mut(i + 1)
        {
            let was_ephemeral = value.parse::<SocketAddr>().is_ok_and(|a| a.port() == 0);
            *value = self.addr.to_string();
            // Its HTTP side port was the OS's pick too: keep it so. Pinned, the gRPC port
            // would put it on that port + 40, which anything on the machine may hold.
            if was_ephemeral && launch.side_port && !launch.args.iter().any(|a| a == "--http") {
                let http =
                    SocketAddr::new(mesh_telemetry::access::loopback_like(self.addr.ip()), 0);
                launch.args.extend(["--http".to_string(), http.to_string()]);
            }
        }
        launch.args.extend(extra.iter().cloned());
        let (child, pid, addr) = launch.spawn(&self.name).await?;
        (self.child, self.pid, self.addr) = (child, pid, addr);
        Ok(())
    }
}

/// Starts the whole mesh as child processes and waits until its ring is assembled.
pub async fn start_all(config: &MeshConfig, options: &Options) -> anyhow::Result<Processes> {
    let started = Instant::now();
    // This process checks the rings as an operator.
    mesh_transport::configure(config.security.operator()?)?;
    let s = |v: &str| v.to_string();
    let prefix = options
        .consul_prefix
        .clone()
        .unwrap_or_else(|| ring_client::consul_ring::DEFAULT_PREFIX.to_string());
    // A ring manager on `addr` with its console on `http`; `presence`: the presence ring's.
    let rm_args = |addr: SocketAddr, http: SocketAddr, presence: bool| {
        let mut args = vec![
            s("ring-manager"),
            s("--listen"),
            addr.to_string(),
            s("--http"),
            http.to_string(),
            s("--node-role"),
            s(if presence {
                "presence-server"
            } else {
                "channel-server"
            }),
        ];
        if !presence {
            args.extend([
                s("--replication-factor"),
                config.replication_factor.to_string(),
            ]);
        }
        if let Some(path) = &options.ring_state_file {
            let mut path = path.display().to_string();
            if presence {
                path.push_str(".presence");
            }
            args.extend([s("--state-file"), path]);
        }
        if let Some(url) = &options.consul {
            let prefix = if presence {
                ring_client::args::presence_prefix(&prefix)
            } else {
                prefix.clone()
            };
            args.extend([s("--consul"), url.clone(), s("--consul-prefix"), prefix]);
        }
        args
    };
    let ring_manager = start_with(
        "ring-manager",
        &rm_args(config.ring_manager, config.console, false),
        config,
        options,
        (Role::RingManager, RING_MANAGER_ID),
    )
    .await?;
    let presence_ring_manager = start_with(
        "presence-ring-manager",
        &rm_args(config.presence_ring_manager, config.presence_console, true),
        config,
        options,
        (Role::RingManager, PRESENCE_RING_MANAGER_ID),
    )
    .await?;
    // How every other service finds the ring: Consul, or the ring manager just started.
    let ring_args = match &options.consul {
        Some(url) => {
            let mut args = vec![s("--consul"), url.clone()];
            if let Some(prefix) = &options.consul_prefix {
                args.extend([s("--consul-prefix"), prefix.clone()]);
            }
            args
        }
        None => vec![
            s("--ring-manager"),
            format!("http://{}", ring_manager.addr),
            s("--presence-ring-manager"),
            format!("http://{}", presence_ring_manager.addr),
        ],
    };
    let mut extra_ring_managers = Vec::new();
    for (i, addr) in options.extra_ring_managers.iter().enumerate() {
        let name = format!("ring-manager-{}", i + 2);
        let id = format!("rm-{}", i + 2);
        // Their consoles on ports the OS picks: they only serve while leading.
        let http = SocketAddr::from(([127, 0, 0, 1], 0));
        let args = rm_args(*addr, http, false);
        let identity = (Role::RingManager, id.as_str());
        extra_ring_managers.push(start_with(&name, &args, config, options, identity).await?);
    }
    // The presence servers send `presence_changed` webhooks.
    let presence_args = [ring_args.clone(), config.webhooks.to_args()].concat();
    let presence_servers = start_nodes(
        ("presence-server", "ps", Role::PresenceServer),
        &config.presence_servers,
        &config.presence_standbys,
        &presence_args,
        config,
        options,
    )
    .await?;
    // Channel servers and gateways take the policy file (and reload it on SIGHUP).
    let policy_args: Vec<String> = config
        .policy_file
        .iter()
        .map(|p| format!("--policy-file={}", p.display()))
        .collect();
    let channel_servers = start_nodes(
        ("channel-server", "cs", Role::ChannelServer),
        &config.channel_servers,
        &config.standbys,
        &[ring_args.clone(), policy_args.clone()].concat(),
        config,
        options,
    )
    .await?;
    let mut admin_args = vec![s("admin-server"), s("--listen"), config.admin.to_string()];
    admin_args.extend(ring_args.iter().cloned());
    let admin_id = (Role::Admin, super::mesh::ADMIN_ID);
    let admin = start_with("admin-server", &admin_args, config, options, admin_id).await?;
    // Each gateway may forward clients to the mesh's own gateways while its region drains.
    let redirect_allow: Vec<String> = config
        .gateways
        .iter()
        .map(|(_, addr)| format!("http://{addr}"))
        .collect();
    let mut gateways = Vec::new();
    for (region, addr) in &config.gateways {
        let id = gateway::config::default_id(region);
        let mut args = vec![
            s("gateway"),
            s("--region"),
            region.clone(),
            s("--id"),
            id.clone(),
            s("--listen"),
            addr.to_string(),
            s("--redirect-allow"),
            redirect_allow.join(","),
        ];
        args.extend(ring_args.iter().cloned());
        args.extend(gateway::config::limit_args(&config.limits));
        args.extend(policy_args.iter().cloned());
        // The secret the boot requests are signed with comes by inherited environment.
        args.extend(config.boot.iter().flat_map(|b| b.args()));
        let name = format!("gateway-{region}");
        let gateway = start_with(&name, &args, config, options, (Role::Gateway, &id)).await?;
        gateways.push((region.clone(), gateway));
    }

    // Ready when, on both rings, every active server owns slots and every standby is
    // registered.
    let consul = |prefix: String| -> anyhow::Result<RingSource> {
        let url = options.consul.as_deref().unwrap_or_default();
        let token = options.consul_token.clone();
        Ok(RingSource::Consul(ConsulRing::new(url, token, &prefix)?))
    };
    let (ring, presence_ring) = match &options.consul {
        Some(_) => (
            consul(prefix.clone())?,
            consul(ring_client::args::presence_prefix(&prefix))?,
        ),
        None => (
            RingSource::Direct(format!("http://{}", ring_manager.addr)),
            RingSource::Direct(format!("http://{}", presence_ring_manager.addr)),
        ),
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    assembled(
        &ring,
        config.channel_servers.len(),
        config.standbys.len(),
        deadline,
    )
    .await?;
    assembled(
        &presence_ring,
        config.presence_servers.len(),
        config.presence_standbys.len(),
        deadline,
    )
    .await?;
    Ok(Processes {
        ring_manager,
        extra_ring_managers,
        presence_ring_manager,
        presence_servers,
        channel_servers,
        admin,
        gateways,
        started_in: started.elapsed(),
    })
}

/// Starts the ring nodes of one kind (`subcommand`, ids `prefix-1`, `prefix-2`, ..., in
/// `role`): one per active address, then one standby per standby address.
async fn start_nodes(
    (subcommand, prefix, role): (&str, &str, Role),
    actives: &[SocketAddr],
    standbys: &[SocketAddr],
    ring_args: &[String],
    config: &MeshConfig,
    options: &Options,
) -> anyhow::Result<Vec<(String, bool, Service)>> {
    let mut nodes = Vec::new();
    let all = actives
        .iter()
        .map(|a| (a, false))
        .chain(standbys.iter().map(|a| (a, true)));
    for (i, (addr, standby)) in all.enumerate() {
        let id = format!("{prefix}-{}", i + 1);
        let mut args = vec![
            subcommand.to_string(),
            "--id".to_string(),
            id.clone(),
            "--listen".to_string(),
            addr.to_string(),
        ];
        args.extend(ring_args.iter().cloned());
        if standby {
            args.push("--standby".to_string());
        }
        if role == Role::ChannelServer {
            args.extend([
                "--vacate-grace-ms".to_string(),
                config.vacate_grace.as_millis().to_string(),
            ]);
            args.extend(config.webhooks.to_args());
        }
        let service = start_with(&id, &args, config, options, (role, &id)).await?;
        nodes.push((id.clone(), standby, service));
    }
    Ok(nodes)
}

/// Waits until the ring `source` leads to has `actives` active and `standbys` standby members.
async fn assembled(
    source: &RingSource,
    actives: usize,
    standbys: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        // With Consul, the leader may not be elected yet.
        let ring = match source.endpoint().await {
            Ok(rm) => match connect_rm(&rm).await {
                Ok(mut client) => client.get_ring(GetRingRequest {}).await.ok(),
                Err(_) => None,
            },
            Err(_) => None,
        };
        if let Some(ring) = ring.map(|r| r.into_inner()) {
            let count = |state: &str| ring.members.iter().filter(|m| m.state == state).count();
            if count("active") == actives && count("standby") == standbys {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the ring at {source} did not assemble within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Processes {
    /// Every child: gateways, admin, presence, channel servers, ring managers.
    pub fn all_mut(&mut self) -> Vec<&mut Service> {
        let mut all: Vec<&mut Service> = Vec::new();
        all.extend(self.gateways.iter_mut().map(|(_, s)| s));
        all.push(&mut self.admin);
        all.extend(self.presence_servers.iter_mut().map(|(_, _, s)| s));
        all.push(&mut self.presence_ring_manager);
        all.extend(self.channel_servers.iter_mut().map(|(_, _, s)| s));
        all.push(&mut self.ring_manager);
        all.extend(self.extra_ring_managers.iter_mut());
        all
    }

    /// Sends SIGHUP to every child that reloads the policy file on it: the channel servers and
    /// the gateways.
    fn forward_reload(&self) {
        let children = self
            .channel_servers
            .iter()
            .map(|(_, _, s)| s)
            .chain(self.gateways.iter().map(|(_, s)| s));
        for service in children {
            tracing::info!(service = %service.name, pid = service.pid, "forwarding SIGHUP");
            let _ = kill(Pid::from_raw(service.pid as i32), Signal::SIGHUP);
        }
    }

    /// Runs until `cancel`, reporting children that exit on their own, then stops them all:
    /// SIGTERM, and SIGKILL after `grace`.
    pub async fn run_until_stopped(self, cancel: CancellationToken, grace: Duration) {
        let _ = self.run(cancel, grace).await;
    }

    /// [`Processes::run_until_stopped`]; an error if a child had to be killed.
    pub async fn run(mut self, cancel: CancellationToken, grace: Duration) -> anyhow::Result<()> {
        let mut reported = std::collections::HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut reloads = mesh_policy::reloads();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                // `dev` got SIGHUP: so does every child that takes the policy file.
                Ok(()) = reloads.changed() => self.forward_reload(),
            }
            for service in self.all_mut() {
                if let Ok(Some(status)) = service.child.try_wait()
                    && reported.insert(service.pid)
                {
                    eprintln!("{} (pid {}) exited: {status}", service.name, service.pid);
                }
            }
        }
        for service in self.all_mut() {
            let _ = kill(Pid::from_raw(service.pid as i32), Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut killed = 0;
        for service in self.all_mut() {
            if tokio::time::timeout_at(deadline, service.child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "{} (pid {}) did not stop in time; killing it",
                    service.name, service.pid
                );
                let _ = service.child.kill().await;
                killed += 1;
            }
        }
        if killed > 0 {
            bail!("{killed} services did not stop within {grace:?}; killed them");
        }
        Ok(())
    }
}

/// A ring manager client for `endpoint`, with this process's transport (as the operator).
async fn connect_rm(
    endpoint: &str,
) -> Result<RingManagerClient<tonic::transport::Channel>, tonic::transport::Error> {
    let channel = mesh_transport::endpoint(endpoint)?.connect().await?;
    Ok(RingManagerClient::new(channel))
}
