//! Starting a ring manager: [`bind`] its sockets (so that a caller on port 0 learns its
//! addresses), then [`Bound::serve`] its gRPC and its console; [`run`] is the `ring-manager`
//! command.
//!
//! Embedded, the ring manager is created at [`bind`] (resumed from its state file), so that a
//! caller can follow its ring before it serves. On Consul, it campaigns for the lead when it
//! serves, and binds its gRPC address only while it leads.

use std::net::SocketAddr;

use mesh_telemetry::side_port::{self, spawn_until};
use ring_client::consul_ring::service_def;
use ring_client::{ConsulRing, Registration};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{LeaderConfig, run_leader_election_with};
use crate::config::{Args, Backend, ProcessConfig};
use crate::console::{self, Console};
use crate::{Config, Error, RingManager};

/// A ring manager with its sockets bound, not serving yet.
#[derive(Debug)]
pub struct Bound {
    console: TcpListener,
    console_addr: SocketAddr,
    local_addr: SocketAddr,
    serving: Serving,
    /// Checks every gRPC call against the authorization table; counts its refusals in
    /// `telemetry`, which the console's `/metrics` serves.
    authorizer: mesh_transport::Authorizer,
    telemetry: mesh_telemetry::Telemetry,
    /// Who may act from the console.
    operators: console::actions::Operators,
}

/// What [`Bound::serve`] serves.
#[derive(Debug)]
enum Serving {
    /// The ring manager itself, its gRPC listener, and its failure monitor's tasks (which stop
    /// on `monitor`).
    Embedded {
        grpc: TcpListener,
        manager: RingManager,
        tracker: TaskTracker,
        monitor: CancellationToken,
    },
    /// A candidate for the lead in Consul (boxed: the variants' sizes differ widely).
    Consul {
        ring: ConsulRing,
        manager: Config,
        leader: Box<LeaderConfig>,
    },
}

/// Binds the console and, embedded, the gRPC listener, and creates the ring manager, whose
/// failure monitor runs from now until `cancel` or until [`Bound::serve`] ends.
pub async fn bind(config: ProcessConfig, cancel: &CancellationToken) -> Result<Bound, Error> {
    let telemetry = config.telemetry.clone();
    let operators = config.operators.clone();
    let authorizer = mesh_transport::Authorizer::new(&telemetry);
    let console = side_port::bind_http(config.console).await?;
    let console_addr = console.local_addr()?;
    let (local_addr, serving) = match config.backend {
        Backend::Embedded { state_file } => {
            let grpc = side_port::bind(config.listen).await?;
            let tracker = TaskTracker::new();
            let monitor = cancel.child_token();
            let manager = RingManager::new(config.manager, state_file, &tracker, monitor.clone())?;
            manager.set_nearest(config.nearest);
            let local_addr = grpc.local_addr()?;
            let serving = Serving::Embedded {
                grpc,
                manager,
                tracker,
                monitor,
            };
            (local_addr, serving)
        }
        Backend::Consul {
            ring,
            endpoint,
            session_ttl,
            lock_delay,
        } => {
            let leader = LeaderConfig {
                endpoint,
                listen: config.listen,
                session_ttl,
                lock_delay,
                nearest: config.nearest,
            };
            let serving = Serving::Consul {
                ring,
                manager: config.manager,
                leader: Box::new(leader),
            };
            (config.listen, serving)
        }
    };
    Ok(Bound {
        console,
        console_addr,
        local_addr,
        serving,
        authorizer,
        telemetry,
        operators,
    })
}

impl Bound {
    /// The gRPC address: bound (embedded), or the one it binds while it leads (on Consul).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound console address.
    pub fn console_addr(&self) -> SocketAddr {
        self.console_addr
    }

    /// The embedded ring manager (none on Consul, where one exists only while leading).
    pub fn manager(&self) -> Option<&RingManager> {
        match &self.serving {
            Serving::Embedded { manager, .. } => Some(manager),
            Serving::Consul { .. } => None,
        }
    }

    /// Serves gRPC (on Consul: campaigns, and serves while it leads) and the console until
    /// `cancel`, or until either stops (which stops the other).
    pub async fn serve(self, cancel: CancellationToken) -> Result<(), Error> {
        let stop = cancel.child_token();
        let (served, console) = match self.serving {
            Serving::Embedded {
                grpc,
                manager,
                tracker,
                monitor,
            } => {
                let console = Console::embedded(manager.clone())
                    .with_metrics(self.telemetry)
                    .with_operators(self.operators);
                let grpc = crate::serve(manager, grpc, self.authorizer, stop.clone());
                let console = console::serve(console, self.console, stop.clone());
                let results =
                    tokio::join!(spawn_until(grpc, stop.clone()), spawn_until(console, stop));
                monitor.cancel();
                tracker.close();
                tracker.wait().await;
                results
            }
            Serving::Consul {
                ring,
                manager,
                leader,
            } => {
                let (leadership, leading) = watch::channel(None);
                let console = Console::consul(leading)
                    .with_metrics(self.telemetry)
                    .with_operators(self.operators);
                let campaign = run_leader_election_with(
                    ring,
                    manager,
                    *leader,
                    leadership,
                    self.authorizer,
                    stop.clone(),
                );
                let console = console::serve(console, self.console, stop.clone());
                tokio::join!(
                    spawn_until(campaign, stop.clone()),
                    spawn_until(console, stop)
                )
            }
        };
        served?;
        console
    }
}

/// The `ring-manager` command: binds, registers in Consul when on it, says where (`listening
/// on ADDR`, then `console on URL`), and serves until `cancel`.
pub async fn run(args: Args, cancel: CancellationToken) -> Result<(), Error> {
    let config = ProcessConfig::from_args(&args)?;
    let service = match &config.backend {
        Backend::Consul { ring, endpoint, .. } => {
            let id = endpoint
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            let def = service_def("ring-manager", id, config.listen, Some(endpoint), vec![]);
            Some((ring.clone(), def))
        }
        Backend::Embedded { .. } => None,
    };
    let bound = bind(config, &cancel).await?;
    let registration = match service {
        Some((ring, def)) => Registration::start(&ring, def, &cancel),
        None => Registration::none(),
    };
    println!("listening on {}", bound.local_addr());
    println!("console on http://{}/", bound.console_addr());
    registration.during(bound.serve(cancel)).await
}
