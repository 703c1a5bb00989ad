//! A presence server's configuration: the `presence-server` command's flags ([`Args`]) and the
//! typed [`Config`] that [`crate::serve`] runs with, made from them once.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::NodeId;
use ring_client::{RingArgs, RingSource};

use crate::{DEFAULT_GATEWAY_LEASE, DEFAULT_GRACE, Error};

/// Default: the address to serve gRPC on (a port the OS picks).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// The `presence-server` command's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Its id on the presence ring, e.g. ps-1.
    #[arg(long)]
    pub id: String,
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Address others dial, if not the listen address.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Join as a standby: no users until it replaces a failed server or is added.
    #[arg(long)]
    pub standby: bool,
    /// How long a user stays active after their last connection ends (ms): a reconnect
    /// within it produces no away/active pair.
    #[arg(long, default_value_t = DEFAULT_GRACE.as_millis() as u64)]
    pub grace_ms: u64,
    /// How long a gateway's session may stay silent before its users' reports are dropped
    /// (ms).
    #[arg(long, default_value_t = DEFAULT_GATEWAY_LEASE.as_millis() as u64)]
    pub gateway_lease_ms: u64,
    /// Address to serve /metrics, /healthz and /readyz on. Default: --listen's port + 40 on
    /// loopback. Off loopback it needs --http-token.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    #[command(flatten)]
    pub ring: RingArgs,
    /// Where `presence_changed` events go.
    #[command(flatten)]
    pub webhooks: mesh_hooks::WebhookArgs,
}

/// Configuration of one presence server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Its id on the presence ring, e.g. "ps-1".
    pub node: NodeId,
    /// Where the presence ring and its ring manager are found.
    pub ring: RingSource,
    /// The address other services dial; defaults to the bound address.
    pub advertise: Option<String>,
    /// Join as a standby.
    pub standby: bool,
    pub grace: Duration,
    pub gateway_lease: Duration,
    /// Its metrics and readiness (served over HTTP by the caller): ready while it holds its
    /// lease on the presence ring.
    pub telemetry: mesh_telemetry::Telemetry,
    /// Where `presence_changed` events go (no URL: nowhere).
    pub webhooks: mesh_hooks::WebhookArgs,
}

impl Config {
    /// An active presence server `node` on the presence ring `ring`, reached at its bound
    /// address, with the default timing and its metrics labelled with its id.
    pub fn new(node: NodeId, ring: RingSource) -> Config {
        Config {
            telemetry: mesh_telemetry::Telemetry::new(&[("node", node.as_str())]),
            node,
            ring,
            advertise: None,
            standby: false,
            grace: DEFAULT_GRACE,
            gateway_lease: DEFAULT_GATEWAY_LEASE,
            webhooks: mesh_hooks::WebhookArgs::default(),
        }
    }

    /// The configuration `args` ask for.
    pub fn from_args(args: &Args) -> Result<Config, Error> {
        let node = NodeId::new(&args.id)?;
        let ring = args.ring.presence_source().map_err(Error::RingArgs)?;
        Ok(Config {
            advertise: args.advertise.clone(),
            standby: args.standby,
            grace: Duration::from_millis(args.grace_ms),
            gateway_lease: Duration::from_millis(args.gateway_lease_ms),
            webhooks: args.webhooks.clone(),
            ..Config::new(node, ring)
        })
    }
}
