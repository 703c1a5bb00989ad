//! `channelmesh ctl`: SRE operations against the ring manager — the ring and its nodes
//! ([`ring`]), the regions ([`regions`]), token revocation, and a live view of the console
//! ([`top`]).

mod regions;
mod ring;
mod top;

use std::time::Duration;

use anyhow::Context;
use mesh_transport::Transport;
use ring_client::RingArgs;
use tokio_util::sync::CancellationToken;

use crate::dev::state::{self, StateDirArg};

pub use ring::{NodeOp, NodeView, OwnerView, RingView, ring_view};
pub use top::render_top;

/// Env var: the ring manager console's URL (for `ctl top`).
const ENV_CONSOLE: &str = "CHANNELMESH_CONSOLE";
/// The console of the ring manager `dev` starts, and the default `ctl top` reads.
const DEFAULT_CONSOLE: &str = "http://127.0.0.1:50090";
/// The shortest refresh interval of `ctl top`.
const MIN_TOP_INTERVAL: Duration = Duration::from_millis(100);
/// How long `ctl revoke` waits for the ring manager.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `ctl` command's flags.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    #[command(flatten)]
    ring: RingArgs,
    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Without --tls-*: the operator credential of the `dev` whose state directory this is.
    #[command(flatten)]
    state_dir: StateDirArg,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CtlCommand {
    /// The ring: epoch, and every node with its state, slots, pid, address and replicas (slots
    /// it leads, follows, and follows still being filled).
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

/// Runs one `ctl` command; `ctl top` refreshes until `cancel`, the others are one call.
/// `transport`: what the `--tls-*`/`--insecure` flags ask for; without them, the operator
/// credential in the state directory of `dev`.
pub async fn run(
    args: CtlArgs,
    transport: Option<Transport>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let json = args.json;
    // Found only by the commands that call the ring manager (`top` reads the console), which
    // call it as an operator.
    let ring_manager = || async {
        let operator = match transport {
            Some(t) => t,
            None => state::operator(&args.state_dir.dir())?,
        };
        mesh_transport::configure(operator)?;
        let source = args.ring.source()?;
        source.endpoint().await.context("finding the ring manager")
    };
    match args.command {
        CtlCommand::Top {
            console,
            once,
            interval_ms,
        } => {
            let every = Duration::from_millis(interval_ms).max(MIN_TOP_INTERVAL);
            top::top(&console, once, json, every, cancel).await
        }
        CtlCommand::Ring => ring::ring(&ring_manager().await?, json).await,
        CtlCommand::Owner { channel } => ring::owner(&ring_manager().await?, &channel, json).await,
        CtlCommand::DrainNode { id } => {
            let endpoint = ring_manager().await?;
            ring::node_op(&endpoint, NodeOp::Drain, Some(&id), json).await
        }
        CtlCommand::ReplaceNode { id } => {
            let endpoint = ring_manager().await?;
            ring::node_op(&endpoint, NodeOp::Replace, Some(&id), json).await
        }
        CtlCommand::AddNode { id } => {
            let endpoint = ring_manager().await?;
            ring::node_op(&endpoint, NodeOp::Add, id.as_deref(), json).await
        }
        CtlCommand::Regions => regions::regions(&ring_manager().await?, json).await,
        CtlCommand::DrainRegion { region, rate } => {
            regions::region_op(&ring_manager().await?, &region, true, rate, json).await
        }
        CtlCommand::UndrainRegion { region } => {
            regions::region_op(&ring_manager().await?, &region, false, 0, json).await
        }
        CtlCommand::Revoke { jtis, until } => revoke(&ring_manager().await?, jtis, until).await,
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
    let reply = tokio::time::timeout(REVOKE_TIMEOUT, call)
        .await
        .context("the ring manager did not answer in time")??;
    println!(
        "revocation list version {}: {} revoked tokens held",
        reply.version, reply.held
    );
    Ok(())
}
