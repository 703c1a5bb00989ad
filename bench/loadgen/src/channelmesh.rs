//! Starting channelmesh as a user would: the `channelmesh` binary (beside this one, or at
//! `$CHANNELMESH_BIN`) run as a child process, its addresses read from what it prints. One
//! service (`Service`: its `listening on ADDR` line), or a whole `dev --multi-process` mesh on
//! ports the OS picks (`Dev`: the summary `dev` prints once the mesh is up, with every
//! service's address and pid). Their other output lines go to stdout as `[name] line`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Env var: the `channelmesh` binary to run, instead of the one beside this binary.
pub const ENV_BIN: &str = "CHANNELMESH_BIN";
/// The binary's file name, beside this one.
const BIN: &str = "channelmesh";
/// How long a service may take to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `dev --multi-process` may take to start every service and assemble both rings
/// (each child may take 20 s to start, the rings 30 s to assemble).
const DEV_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `dev` may take to stop after SIGTERM (its own shutdown grace is 10 s).
const DEV_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The `channelmesh` binary: `$CHANNELMESH_BIN`, else `channelmesh` beside this executable.
pub fn binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os(ENV_BIN).filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .context("locating this program")?
            .parent()
            .context("this program has no directory")?
            .join(BIN),
    };
    if !path.is_file() {
        bail!(
            "this benchmark runs channelmesh, which is not at {}: build it with \
             `cargo build --release -p channelmesh --bin channelmesh` (it lands beside \
             channelmesh-loadgen), or set {ENV_BIN} to its path",
            path.display()
        );
    }
    Ok(path)
}

/// Prints what a child prints after the lines read here (as `[name] line` when `name` is
/// given), so that it never blocks on a full pipe.
fn forward(name: Option<&str>, mut lines: Lines<BufReader<ChildStdout>>) {
    let prefix = name.map(|n| format!("[{n}] ")).unwrap_or_default();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("{prefix}{line}");
        }
    });
}

/// Starts `channelmesh ARGS...` with stdout piped to this process, stderr inherited.
fn spawn(args: &[&str]) -> anyhow::Result<(Child, Lines<BufReader<ChildStdout>>)> {
    let mut child = Command::new(binary()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting channelmesh {}", args.join(" ")))?;
    let stdout = child.stdout.take().context("the child's stdout is piped")?;
    Ok((child, BufReader::new(stdout).lines()))
}

/// One service, `channelmesh SUBCOMMAND ...`; killed when dropped.
#[derive(Debug)]
pub struct Service {
    /// The address it printed in its `listening on ADDR` line.
    pub addr: SocketAddr,
    _child: Child,
}

impl Service {
    /// Starts `channelmesh ARGS...` and waits for its `listening on ADDR` line; `name` prefixes
    /// the lines it prints after that.
    pub async fn start(name: &str, args: &[&str]) -> anyhow::Result<Self> {
        let (child, mut lines) = spawn(args)?;
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .with_context(|| format!("{name} did not start within {START_TIMEOUT:?}"))??
            .with_context(|| format!("{name} exited before listening"))?;
        let addr: SocketAddr = first
            .strip_prefix("listening on ")
            .with_context(|| format!("{name} printed {first:?}"))?
            .parse()?;
        forward(Some(name), lines);
        Ok(Self {
            addr,
            _child: child,
        })
    }
}

/// A ring node in `dev`'s summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub addr: SocketAddr,
    pub standby: bool,
    pub pid: Option<u32>,
}

/// What `dev` prints once its mesh is up, as far as a benchmark needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The (first) ring manager's gRPC address.
    pub ring_manager: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Channel servers, active then standby.
    pub channel_servers: Vec<Node>,
    /// (region, address) per gateway.
    pub gateways: Vec<(String, SocketAddr)>,
}

impl Summary {
    /// Takes in one line of `dev`'s summary; true once it is the last (`ready in N ms`).
    fn read(&mut self, line: &str) -> bool {
        let line = line.trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        // The first address on the line, `grpc://ADDR` or `http://ADDR/api/`.
        let addr = words.iter().find_map(|w| {
            let rest = w
                .strip_prefix("grpc://")
                .or_else(|| w.strip_prefix("http://"))?;
            rest.trim_end_matches("/api/")
                .trim_end_matches('/')
                .parse()
                .ok()
        });
        let pid = words
            .iter()
            .position(|w| *w == "pid")
            .and_then(|i| words.get(i + 1)?.parse().ok());
        if line.starts_with("ring manager") {
            self.ring_manager = self.ring_manager.or(addr);
        } else if line.starts_with("admin server") {
            self.admin = addr;
        } else if line.starts_with("channel server")
            && let (Some(id), Some(addr)) = (words.get(2), addr)
        {
            self.channel_servers.push(Node {
                id: id.to_string(),
                addr,
                standby: words.contains(&"(standby)"),
                pid,
            });
        } else if line.starts_with("gateway ")
            && let (Some(region), Some(addr)) = (words.get(1), addr)
        {
            self.gateways.push((region.to_string(), addr));
        }
        line.starts_with("ready in ")
    }
}

/// `dev`'s flag for the replication factor.
const REPLICATION_FLAG: &str = "--replication-factor";

/// `dev`'s flags for replication factor `factor`: `--replication-factor N`, or none for factor
/// 1 from a build without replication (which is factor 1); a higher factor from such a build is
/// an error.
pub async fn replication_flags(factor: u32) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(factor >= 1, "a replication factor is at least 1");
    let help = Command::new(binary()?)
        .args(["dev", "--help"])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running channelmesh dev --help")?;
    let supported = String::from_utf8_lossy(&help.stdout).contains(REPLICATION_FLAG);
    match (supported, factor) {
        (true, _) => Ok(vec![REPLICATION_FLAG.to_string(), factor.to_string()]),
        (false, 1) => Ok(Vec::new()),
        (false, _) => bail!(
            "this channelmesh has no `dev {REPLICATION_FLAG}` (no replication): it runs \
             replication factor 1 only"
        ),
    }
}

/// A `channelmesh dev --multi-process` mesh; stopped (SIGTERM) when dropped.
#[derive(Debug)]
pub struct Dev {
    /// What it printed once it was up.
    pub summary: Summary,
    child: Child,
}

impl Dev {
    /// Runs `channelmesh dev --multi-process --insecure` with every service on a port the OS
    /// picks and these secrets, its ring giving every slot `replication_factor - 1` followers
    /// (`dev --replication-factor`; `None`: `dev`'s default; a build without replication runs
    /// factor 1 only), and waits for its summary.
    pub async fn start_multi_process(
        jwt_secret: &str,
        admin_token: &str,
        replication_factor: Option<u32>,
    ) -> anyhow::Result<Self> {
        let any = "127.0.0.1:0";
        let replication = match replication_factor {
            Some(factor) => replication_flags(factor).await?,
            None => Vec::new(),
        };
        // A state directory of its own, apart from a `dev` the user may run.
        let state_dir =
            std::env::temp_dir().join(format!("channelmesh-bench-{}", std::process::id()));
        let mut command = Command::new(binary()?);
        command
            .args(["dev", "--multi-process", "--channel-server-port", "0"])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--presence-server-port", "0", "--ring-manager", any])
            .args(["--presence-ring-manager", any, "--admin", any])
            .args(["--us-east", any, "--eu-west", any])
            // Plaintext inside: this process watches the ring of one fresh mesh after another,
            // each with a throwaway CA of its own, and a process speaks with one transport.
            .arg("--insecure")
            // Thousands of clients per source address (a worker process each): no
            // per-address connect limit.
            .args(["--connects-per-addr-per-sec", "0"])
            .args(&replication)
            .env("CHANNELMESH_JWT_SECRET", jwt_secret)
            .env("CHANNELMESH_ADMIN_TOKEN", admin_token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Not SIGKILL: `dev` must live to stop its children (see `Drop`).
            .kill_on_drop(false);
        let mut child = command.spawn().context("starting channelmesh dev")?;
        let stdout = child.stdout.take().context("dev's stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        // Built now so that an error below stops it (`Drop`).
        let mut dev = Dev {
            summary: Summary::default(),
            child,
        };
        let read = async {
            loop {
                let Some(line) = lines.next_line().await? else {
                    bail!("channelmesh dev exited before its mesh was up");
                };
                if line.starts_with('[') {
                    // A child's own line, which `dev` passes on.
                    println!("{line}");
                } else if dev.summary.read(&line) {
                    return anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(DEV_TIMEOUT, read)
            .await
            .with_context(|| format!("channelmesh dev was not up within {DEV_TIMEOUT:?}"))??;
        // Its children's lines, which `dev` prefixes itself.
        forward(None, lines);
        Ok(dev)
    }

    /// Stops the mesh as ctrl-c would (SIGTERM: `dev` stops its children) and waits for it;
    /// SIGKILL if it takes too long.
    pub async fn stop(mut self) {
        self.terminate();
        if tokio::time::timeout(DEV_STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("channelmesh dev did not stop in time; killing it");
            let _ = self.child.kill().await;
        }
    }

    fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
}

impl Drop for Dev {
    /// On an early return: SIGTERM, so that `dev` stops its children on its own (a SIGKILL
    /// would leave them running).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary as `channelmesh dev --multi-process` prints it (src/main.rs `Summary`).
    const SUMMARY: &str = "\
channelmesh dev mesh (multi-process)
  ring manager     grpc://127.0.0.1:41001  pid 101
  channel server   cs-1 grpc://127.0.0.1:41011  pid 111
  channel server   cs-2 grpc://127.0.0.1:41012  pid 112
  channel server   cs-3 grpc://127.0.0.1:41013  pid 113
  channel server   cs-4 grpc://127.0.0.1:41014 (standby)  pid 114
  admin server     grpc://127.0.0.1:41002  (channelmesh.admin.v1.Admin, reflection on)  pid 102
  presence ring    grpc://127.0.0.1:41003  (its ring manager)  pid 103
  presence server  ps-1 grpc://127.0.0.1:41021  pid 121
  gateway us-east  http://127.0.0.1:41031/api/  (RTM base URL)  pid 131
  gateway eu-west  http://127.0.0.1:41032/api/  (RTM base URL)  pid 132
  http admin       http://127.0.0.1:41042/metrics  (/healthz, /readyz)
  console          http://127.0.0.1:41090/  (SRE console; /healthz, /readyz)
  CHANNELMESH_JWT_SECRET=abc  (generated)
ready in 812 ms";

    #[test]
    fn the_dev_summary_gives_addresses_and_pids() {
        let mut summary = Summary::default();
        let ends: Vec<bool> = SUMMARY.lines().map(|l| summary.read(l)).collect();
        assert_eq!(ends.iter().filter(|e| **e).count(), 1);
        assert_eq!(ends.last(), Some(&true));
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(summary.ring_manager, Some(addr(41001)));
        assert_eq!(summary.admin, Some(addr(41002)));
        assert_eq!(
            summary.gateways,
            vec![
                ("us-east".to_string(), addr(41031)),
                ("eu-west".to_string(), addr(41032))
            ]
        );
        assert_eq!(summary.channel_servers.len(), 4);
        assert_eq!(
            summary.channel_servers[3],
            Node {
                id: "cs-4".into(),
                addr: addr(41014),
                standby: true,
                pid: Some(114),
            }
        );
        assert_eq!(summary.channel_servers[1].pid, Some(112));
    }
}
