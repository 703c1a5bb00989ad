//! A channel server's configuration: the `channel-server` command's flags ([`Args`]) and the
//! typed [`Config`] that [`crate::serve`] runs with, made from them once.

use std::net::SocketAddr;

use mesh_core::NodeId;
use ring_client::{RingArgs, RingSource};

use crate::{Error, Limits};

/// Default: the address to serve gRPC on (a port the OS picks).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";
/// Default: responses queued per gateway stream before that gateway counts as fallen behind.
pub const DEFAULT_GATEWAY_QUEUE: usize = 65_536;

/// The `channel-server` command's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Its id on the ring, e.g. cs-1.
    #[arg(long)]
    pub id: String,
    /// Address to serve gRPC on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Address others dial, if not the listen address.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Join as a standby: no slots until it replaces a failed node or is added.
    #[arg(long)]
    pub standby: bool,
    /// Address to serve /metrics, /healthz and /readyz on. Default: --listen's port + 40
    /// (50061 -> 50101) on loopback, or a port the OS picks when --listen's is 0. Off
    /// loopback it needs --http-token.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    #[command(flatten)]
    pub ring: RingArgs,
    /// Test hook, hidden: stamp ts with a clock this many milliseconds off (negative: behind),
    /// as a host with a skewed clock would. The chaos harness's clock-skew fault.
    #[arg(long, hide = true, env = ENV_TEST_CLOCK_SKEW_MS, default_value_t = 0, allow_negative_numbers = true)]
    pub test_clock_skew_ms: i64,
}

/// The environment variable of `--test-clock-skew-ms`.
pub const ENV_TEST_CLOCK_SKEW_MS: &str = "CHANNELMESH_TEST_CLOCK_SKEW_MS";

/// Configuration of one channel server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Its id on the ring, e.g. "cs-1".
    pub node: NodeId,
    /// Where the ring and the ring manager are found.
    pub ring: RingSource,
    /// The address other services dial; defaults to the bound address.
    pub advertise: Option<String>,
    /// History bounds.
    pub limits: Limits,
    /// Responses queued per gateway stream.
    pub gateway_queue: usize,
    /// Join as a standby: no slots until it replaces a node or an operator adds it.
    pub standby: bool,
    /// Its metrics and readiness (served over HTTP by the caller): ready while it holds its
    /// lease.
    pub telemetry: mesh_telemetry::Telemetry,
}

impl Config {
    /// An active channel server `node` on `ring`, reached at its bound address, with the
    /// default limits and its metrics labelled with its id.
    pub fn new(node: NodeId, ring: RingSource) -> Config {
        Config {
            telemetry: mesh_telemetry::Telemetry::new(&[("node", node.as_str())]),
            node,
            ring,
            advertise: None,
            limits: Limits::default(),
            gateway_queue: DEFAULT_GATEWAY_QUEUE,
            standby: false,
        }
    }

    /// The configuration `args` ask for.
    pub fn from_args(args: &Args) -> Result<Config, Error> {
        let node = NodeId::new(&args.id)?;
        let ring = args.ring.source().map_err(Error::RingArgs)?;
        Ok(Config {
            advertise: args.advertise.clone(),
            standby: args.standby,
            ..Config::new(node, ring)
        })
    }
}
