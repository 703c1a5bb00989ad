//! `channelmesh chaos`: starts a `dev --multi-process` mesh it owns ([`crate::dev::processes`]),
//! drives a workload through its real interfaces ([`workload`]), injects faults on a seeded
//! schedule ([`schedule`]) — kill -9 and restart, SIGSTOP and SIGCONT, clock skew — and at the
//! end checks the mesh's invariants from what the workload saw ([`check`]), printing a table or
//! JSON ([`report`]). A broken invariant is a failed command.

pub mod check;
pub mod log;
pub mod partition;
pub mod report;
pub mod schedule;
pub mod workload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_core::{ChannelId, Identity, IssuerAudience, TeamId, UserId};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::RngCore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::certs::Authority;
use crate::dev::mesh::{MeshConfig, Security};
use crate::dev::processes::{self, Processes, Service};
use crate::dev::state::StateDir;
use log::FaultRecord;
use partition::{Partitions, Side};
use report::Report;
use schedule::{Action, Fault, Kind, Role};
use workload::Recorder;

/// How long the mesh may take, after publishing stops, until every client is connected again
/// and has every acknowledged message (or a gap for it).
const SETTLE: Duration = Duration::from_secs(30);
/// How long every client may take to say hello at the start.
const CONNECT: Duration = Duration::from_secs(60);
/// How long the mesh's processes may take to stop at the end.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The `chaos` command's flags.
#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// The schedule's seed: the same seed gives the same faults at the same times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long the workload runs (faults stop 10 s before its end).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The fault kinds to inject, comma-separated: `kill`, `stop`, `skew`, `partition` (every
    /// role each applies to) or `ACTION:ROLE` with ROLE one of channel-server, gateway,
    /// presence-server, admin, ring-manager (e.g. `kill:gateway,stop`); `all`. Partitions need
    /// cgroup v2 and nftables (`nft`); without them they are reported as skipped.
    #[arg(long, default_value = "all", value_parser = Kind::parse_list)]
    faults: std::vec::Vec<Kind>,
    /// Run the mesh's processes from this `channelmesh` binary (e.g. an older build); faults
    /// it cannot take are reported as skipped.
    #[arg(long)]
    mesh_bin: Option<PathBuf>,
    /// RTM clients per region.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Channels the workload publishes to (every client subscribes to all of them).
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Publishes per second, all publishers together (the admin API's PostMessage and an RTM
    /// publisher per region share them).
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Where the run keeps its files: the children's logs (`logs/NAME.log`), certificates,
    /// the ring state file. Default: a new directory under the system's temp directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run the mesh on Consul: a fake Consul (the project's test double of its HTTP API) in
    /// this process, and two ring managers electing a leader there; `kill ring-manager` and
    /// `stop ring-manager` then hit either, leader or follower.
    #[arg(long)]
    consul: bool,
    /// Print the result as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs a chaos run; an error when an invariant broke (after the report is printed).
pub async fn run(
    args: ChaosArgs,
    log_args: Vec<String>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.minutes) || !positive(args.rate) || args.clients == 0 || args.channels == 0 {
        bail!("--minutes, --clients, --channels and --rate must be positive");
    }
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("channelmesh-chaos-{}", std::process::id()))
    });
    let log_dir = dir.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let state = StateDir::claim(&dir.join("state"))?;
    state.write_authority(Authority::for_this_process()?)?;
    let config = MeshConfig {
        security: Security::Mtls,
        ..MeshConfig::ephemeral()
    };
    let mut config = MeshConfig {
        jwt_secret: random_hex(),
        admin_token: random_hex(),
        ..config
    };
    // On Consul a ring manager publishes its address before it binds it: fixed ports.
    let consul = match args.consul {
        true => Some(fake_consul::FakeConsul::start().await?),
        false => None,
    };
    let mut extra_ring_managers = Vec::new();
    if consul.is_some() {
        config.ring_manager = free_port()?;
        config.presence_ring_manager = free_port()?;
        extra_ring_managers.push(free_port()?);
    }
    let mesh_bin = match &args.mesh_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe().context("locating the channelmesh binary")?,
    };
    // Partitions need cgroup v2 and nftables; without them the fault is skipped, saying why.
    let partitions = match args.faults.iter().any(|k| k.action == Action::Partition) {
        false => Err("not asked for".to_string()),
        true => Partitions::new(&format!("channelmesh-chaos-{}", std::process::id()))
            .await
            .map_err(|e| format!("{e:#}")),
    };
    let options = processes::Options {
        cgroups: partitions.as_ref().ok().map(|p| p.cgroups().to_path_buf()),
        // A production ring manager keeps its ring: in a state file, or in Consul.
        ring_state_file: consul.is_none().then(|| dir.join("ring.state")),
        consul: consul.as_ref().map(|c| c.url()),
        extra_ring_managers,
        global_args: log_args,
        state: Some(state),
        exe: Some(mesh_bin.clone()),
        log_dir: Some(log_dir.clone()),
        ..Default::default()
    };
    let say = |s: String| {
        if args.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    };
    say(format!(
        "chaos: seed {}, {} min, mesh from {}{}, logs in {}",
        args.seed,
        args.minutes,
        mesh_bin.display(),
        if args.consul { " on Consul" } else { "" },
        log_dir.display()
    ));
    let procs = tokio::select! {
        p = processes::start_all(&config, &options) => p?,
        () = cancel.cancelled() => return Ok(()),
    };
    say(format!("mesh up in {:.1?}", procs.started_in));
    let run = Duration::from_secs_f64(args.minutes * 60.0);
    let faults = schedule::schedule(args.seed, run, &args.faults, |role| targets(&procs, role));
    say(format!("{} faults scheduled", faults.len()));
    let skew_supported = takes_skew_flag(&mesh_bin).await;

    let mut chaos = Chaos {
        procs,
        skew_supported,
        partitions,
        say: &say,
    };
    let result = chaos.drive(&args, &config, run, &faults, &cancel).await;
    // Whatever happened, the mesh stops: every child is continued, then terminated.
    let stop = CancellationToken::new();
    stop.cancel();
    let stopped = chaos.procs.run(stop, STOP_GRACE).await;
    if let Ok(partitions) = &chaos.partitions {
        partitions.remove().await;
    }
    drop(consul);
    let (logs, records) = result?;
    if let Err(e) = stopped {
        say(format!("stopping the mesh: {e:#}"));
    }
    let mut logs = logs;
    logs.faults = records.clone();
    let findings = check::check(&logs);
    let report = Report {
        seed: args.seed,
        minutes: args.minutes,
        mesh_bin: mesh_bin.display().to_string(),
        faults: records,
        ok: findings.violations.is_empty(),
        findings,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.ok {
        bail!(
            "invariants broken: {}",
            report.findings.violations.join("; ")
        );
    }
    Ok(())
}

/// 32 random bytes as hex: a secret for this run's mesh.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A loopback address with a port free now (the OS picked it).
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// How many processes of `role` the mesh has.
fn targets(procs: &Processes, role: Role) -> usize {
    match role {
        Role::ChannelServer => procs.channel_servers.len(),
        Role::Gateway => procs.gateways.len(),
        Role::PresenceServer => procs.presence_servers.len(),
        Role::Admin => 1,
        Role::RingManager => 2 + procs.extra_ring_managers.len(),
    }
}

/// The `index`th process of `role`.
fn target(procs: &mut Processes, role: Role, index: usize) -> Option<&mut Service> {
    match role {
        Role::ChannelServer => procs.channel_servers.get_mut(index).map(|s| &mut s.2),
        Role::Gateway => procs.gateways.get_mut(index).map(|s| &mut s.1),
        Role::PresenceServer => procs.presence_servers.get_mut(index).map(|s| &mut s.2),
        Role::Admin => Some(&mut procs.admin),
        Role::RingManager => match index {
            0 => Some(&mut procs.ring_manager),
            1 => Some(&mut procs.presence_ring_manager),
            n => procs.extra_ring_managers.get_mut(n - 2),
        },
    }
}

/// Whether `bin`'s channel server takes the clock-skew test hook (an older build may not).
async fn takes_skew_flag(bin: &Path) -> bool {
    tokio::process::Command::new(bin)
        .args(["channel-server", "--clock-offset-ms", "1", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// A run in progress: the mesh it owns and what it records.
struct Chaos<'a> {
    procs: Processes,
    skew_supported: bool,
    /// Partitions, or why there are none.
    partitions: Result<Partitions, String>,
    say: &'a dyn Fn(String),
}

impl Chaos<'_> {
    /// The workload, the faults, the settling and the last history read: everything between
    /// the mesh starting and stopping.
    async fn drive(
        &mut self,
        args: &ChaosArgs,
        config: &MeshConfig,
        run: Duration,
        faults: &[Fault],
        cancel: &CancellationToken,
    ) -> anyhow::Result<(log::Logs, Vec<FaultRecord>)> {
        let channels: Vec<String> = (1..=args.channels).map(|i| format!("CCHAOS{i}")).collect();
        let gateways: Vec<(String, SocketAddr)> = self
            .procs
            .gateways
            .iter()
            .map(|(region, s)| (region.clone(), s.addr))
            .collect();
        let mut clients = Vec::new();
        for (r, (region, _)) in gateways.iter().enumerate() {
            for i in 1..=args.clients {
                clients.push((format!("UCHAOS{r}X{i}"), region.clone()));
            }
        }
        let minter =
            admin_server::Minter::new(config.jwt_secret.as_bytes(), IssuerAudience::default())?;
        let token = |user: &str| -> anyhow::Result<String> {
            let now = crate::dev::mesh::unix_now();
            let identity = Identity {
                user: UserId::new(user)?,
                team: TeamId::new(workload::TEAM)?,
                name: None,
                channels: channels
                    .iter()
                    .map(|c| ChannelId::new(c))
                    .collect::<Result<_, _>>()?,
                expires_at: now + 24 * 3600,
                jti: None,
            };
            Ok(minter.mint(identity, now)?.token)
        };
        let rec = Arc::new(Recorder::new(&clients));
        let users: Vec<String> = clients.iter().map(|(u, _)| u.clone()).collect();
        let base = |region: &str| -> String {
            let addr = gateways
                .iter()
                .find(|(r, _)| r == region)
                .map(|(_, a)| *a)
                .unwrap_or(gateways[0].1);
            format!("http://{addr}/api/")
        };

        // Clients first, each subscribed to every channel and watching everyone's presence.
        let stop_clients = cancel.child_token();
        let mut readers = JoinSet::new();
        for (i, (user, region)) in clients.iter().enumerate() {
            readers.spawn(workload::client(
                rec.clone(),
                i,
                base(region),
                token(user)?,
                channels.clone(),
                users.clone(),
                stop_clients.clone(),
            ));
        }
        let deadline = Instant::now() + CONNECT;
        while rec.connected() < clients.len() {
            if Instant::now() > deadline || cancel.is_cancelled() {
                bail!(
                    "only {} of {} clients connected within {CONNECT:?}",
                    rec.connected(),
                    clients.len()
                );
            }
            // The poll interval of the wait above.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (self.say)(format!(
            "{} clients connected in {} regions; publishing to {} channels at {}/s",
            clients.len(),
            gateways.len(),
            channels.len(),
            args.rate
        ));

        // Publishers: the admin API and one RTM publisher per region share the rate.
        let stop_publishing = cancel.child_token();
        let admin = workload::admin(self.procs.admin.addr, &config.admin_token)?;
        let publishers = 1 + gateways.len();
        let every = Duration::from_secs_f64(publishers as f64 / args.rate);
        let mut writers = JoinSet::new();
        let prefix = format!("s{}", args.seed);
        writers.spawn(workload::admin_publisher(
            rec.clone(),
            format!("{prefix}-admin"),
            admin.clone(),
            "UCHAOSADMIN".into(),
            channels.clone(),
            every,
            stop_publishing.clone(),
        ));
        for (r, (region, _)) in gateways.iter().enumerate() {
            let user = format!("UCHAOSPUB{r}");
            writers.spawn(workload::rtm_publisher(
                rec.clone(),
                format!("{prefix}-{region}"),
                base(region),
                token(&user)?,
                channels.clone(),
                every,
                stop_publishing.clone(),
            ));
        }
        readers.spawn(workload::presence_sampler(
            rec.clone(),
            admin.clone(),
            users,
            stop_clients.clone(),
        ));
        readers.spawn(workload::history_reader(
            rec.clone(),
            admin,
            channels.clone(),
            stop_clients.clone(),
        ));

        // The faults, one at a time, on the schedule.
        let t0 = rec.now();
        let mut records: Vec<FaultRecord> = Vec::new();
        for fault in faults {
            if !self
                .wait_until(&rec, t0 + fault.at.as_secs_f64(), cancel)
                .await
            {
                break;
            }
            self.report_last(&rec, &records);
            let record = self.inject(&rec, fault, cancel).await;
            records.push(record);
        }
        self.wait_until(&rec, t0 + run.as_secs_f64(), cancel).await;
        self.report_last(&rec, &records);
        stop_publishing.cancel();
        while writers.join_next().await.is_some() {}
        let published = rec.now();

        // Settle: every client connected again and holding every acknowledged message (or a
        // gap for it), or SETTLE passes.
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline && !cancel.is_cancelled() {
            let snapshot = rec.snapshot();
            let settled =
                rec.connected() == clients.len() && check::check(&snapshot).missed_deliveries == 0;
            if settled {
                break;
            }
            // The poll interval of the settle wait.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop_clients.cancel();
        while readers.join_next().await.is_some() {}
        let mut logs = rec.snapshot();
        logs.end = published;
        Ok((logs, records))
    }

    /// Sleeps until `at` on the recorder's clock; false if cancelled first.
    async fn wait_until(&self, rec: &Recorder, at: f64, cancel: &CancellationToken) -> bool {
        let wait = Duration::from_secs_f64((at - rec.now()).max(0.0));
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = cancel.cancelled() => false,
        }
    }

    /// The progress line of the last fault, once the quiet after it is over.
    fn report_last(&self, rec: &Recorder, records: &[FaultRecord]) {
        let Some(last) = records.last() else {
            return;
        };
        let line = match &last.skipped {
            Some(why) => format!(
                "[{:>7.1}s] {} {}: skipped ({why})",
                last.start, last.kind, last.target
            ),
            None => format!(
                "[{:>7.1}s] {} {}: {:.1} s; {} publishes failed during it and after",
                last.start,
                last.kind,
                last.target,
                last.end - last.start,
                rec.failed_between(last.start, rec.now())
            ),
        };
        (self.say)(line);
    }

    /// Injects `fault` and waits until its target is back.
    async fn inject(
        &mut self,
        rec: &Recorder,
        fault: &Fault,
        cancel: &CancellationToken,
    ) -> FaultRecord {
        let start = rec.now();
        let skew_supported = self.skew_supported;
        // A partition cuts a ring manager off from everyone, anything else from the ring
        // managers.
        let procs = &self.procs;
        let ring_managers: Vec<Side> = [&procs.ring_manager, &procs.presence_ring_manager]
            .into_iter()
            .chain(procs.extra_ring_managers.iter())
            .map(|s| Side {
                name: s.name.clone(),
                port: s.addr.port(),
            })
            .collect();
        let peers = match fault.kind.role {
            Role::RingManager => Vec::new(),
            _ => ring_managers,
        };
        let partitions = &self.partitions;
        let (target_name, skipped) = match target(&mut self.procs, fault.kind.role, fault.target) {
            None => (String::from("?"), Some("no such target".to_string())),
            Some(service) => {
                let name = service.name.clone();
                let skipped = match (fault.kind.action, partitions) {
                    (Action::Partition, Err(why)) => Some(why.clone()),
                    (Action::Partition, Ok(partitions)) => {
                        let side = Side {
                            name: name.clone(),
                            port: service.addr.port(),
                        };
                        partition(partitions, &side, &peers, fault, cancel)
                            .await
                            .err()
                            .map(|e| format!("{e:#}"))
                    }
                    (Action::Skew, _) if !skew_supported => {
                        Some("the mesh binary has no --clock-offset-ms".into())
                    }
                    (action, _) => apply(service, action, fault, cancel)
                        .await
                        .err()
                        .map(|e| format!("{e:#}")),
                };
                (name, skipped)
            }
        };
        FaultRecord {
            kind: fault.kind,
            target: target_name,
            start,
            end: rec.now(),
            skipped,
        }
    }
}

/// Does `action` to `service` for `fault.length`, then brings it back.
async fn apply(
    service: &mut Service,
    action: Action,
    fault: &Fault,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let pid = Pid::from_raw(service.pid as i32);
    // The fault's length is what is being injected, not a wait for anything.
    let hold = async {
        tokio::select! {
            () = tokio::time::sleep(fault.length) => {}
            () = cancel.cancelled() => {}
        }
    };
    match action {
        Action::Kill => {
            kill(pid, Signal::SIGKILL)?;
            hold.await;
            restart(service, &[]).await
        }
        Action::Stop => {
            kill(pid, Signal::SIGSTOP)?;
            hold.await;
            kill(pid, Signal::SIGCONT)?;
            Ok(())
        }
        Action::Skew => {
            let flag = ["--clock-offset-ms".to_string(), fault.skew_ms.to_string()];
            restart(service, &flag).await?;
            hold.await;
            restart(service, &[]).await
        }
        Action::Partition => bail!("network partitions are not implemented"),
    }
}

/// Cuts `side` off from `peers` (everyone when none) for `fault.length`, then heals.
async fn partition(
    partitions: &Partitions,
    side: &Side,
    peers: &[Side],
    fault: &Fault,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    partitions.cut(side, peers).await?;
    // The fault's length is what is being injected, not a wait for anything.
    tokio::select! {
        () = tokio::time::sleep(fault.length) => {}
        () = cancel.cancelled() => {}
    }
    partitions.heal().await
}

/// Restarts `service` with `extra` flags, trying a few times (its port may take a moment to be
/// free again).
async fn restart(service: &mut Service, extra: &[String]) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..5 {
        match service.restart(extra).await {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
        // A pause between attempts, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("restart failed")))
}
