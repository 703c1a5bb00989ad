//! What `channelmesh dev` prints once the mesh is up: every service's address (and pid, for
//! child processes), the HTTP listeners, the consoles, the secrets it generated, and how long
//! start-up took.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_telemetry::side_port::http_addr;

use super::mesh::{Mesh, MeshConfig};
use super::processes::Processes;

/// How the mesh's services speak to each other, as `dev` prints it.
#[derive(Debug)]
pub struct Security {
    /// The state directory with the CA and the operator credential; `None`: `--insecure`.
    state_dir: Option<PathBuf>,
}

impl Security {
    /// Mutual TLS with the CA in `state_dir`, or plaintext without one.
    pub fn new(state_dir: Option<&Path>) -> Security {
        Security {
            state_dir: state_dir.map(Path::to_path_buf),
        }
    }
}

/// What `dev` prints once the mesh is up.
#[derive(Debug)]
pub struct Summary {
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
    /// The in-process mesh, started from `config`.
    pub fn in_process(mesh: &Mesh, config: &MeshConfig) -> Summary {
        let actives = config.channel_servers.len();
        let presence_actives = config.presence_servers.len();
        Summary {
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
        }
    }

    /// The mesh of child processes `procs`, started from `config`, on Consul or not.
    pub fn multi_process(procs: &Processes, config: &MeshConfig, on_consul: bool) -> Summary {
        let mut ring_managers = vec![(procs.ring_manager.addr, Some(procs.ring_manager.pid))];
        ring_managers.extend(
            procs
                .extra_ring_managers
                .iter()
                .map(|p| (p.addr, Some(p.pid))),
        );
        Summary {
            mode: if on_consul {
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
                .map(|((id, _), asked)| (id, http_addr(None, asked)))
                .collect(),
            started_in: procs.started_in,
        }
    }

    /// Prints it, with the `secrets` (env var, value, generated) that were generated and how
    /// the services speak to each other.
    pub fn print(&self, secrets: &[(&str, String, bool)], security: &Security) {
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
        match &security.state_dir {
            Some(dir) => {
                println!("  internal gRPC    mutual TLS; CA and operator credential (for ctl) in:");
                println!("  state dir        {}", dir.display());
            }
            None => println!(
                "  internal gRPC    PLAINTEXT, unauthenticated (--insecure): this machine only"
            ),
        }
        for (name, value, generated) in secrets {
            if *generated {
                println!("  {name}={value}  (generated)");
            }
        }
        println!("ready in {} ms", self.started_in.as_millis());
    }
}
