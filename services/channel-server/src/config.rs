//! A channel server's configuration: the `channel-server` command's flags ([`Args`]) and the
//! typed [`Config`] that [`crate::serve`] runs with, made from them once.

use std::net::SocketAddr;

use mesh_core::NodeId;
use ring_client::{RingArgs, RingSource};

use crate::idempotency::{self, Bounds};
use crate::members;
use crate::replication;
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
    /// How long a publish's idempotency key is remembered (ms): a publish with the same key
    /// within it gets the first one's ts and is not stored or delivered again.
    #[arg(long, env = "CHANNELMESH_IDEMPOTENCY_WINDOW_MS", default_value_t = idempotency::DEFAULT_AGE.as_millis() as u64)]
    pub idempotency_window_ms: u64,
    /// Idempotency keys remembered per channel, the oldest forgotten first (0: none).
    #[arg(long, env = "CHANNELMESH_IDEMPOTENCY_KEYS", default_value_t = idempotency::DEFAULT_KEYS)]
    pub idempotency_keys: usize,
    /// Replication: bytes per second at most that filling one new follower's copy of this
    /// node's slots sends (in the background, while publishes go on).
    #[arg(long, env = "CHANNELMESH_CATCH_UP_RATE", default_value_t = replication::DEFAULT_CATCH_UP_RATE)]
    pub catch_up_rate: u64,
    /// Address to serve /metrics, /healthz and /readyz on. Default: --listen's port + 40
    /// (50061 -> 50101) on loopback, or a port the OS picks when --listen's is 0. Off
    /// loopback it needs --http-token.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    #[command(flatten)]
    pub ring: RingArgs,
    #[command(flatten)]
    pub policy: mesh_policy::PolicyArgs,
    /// Channel webhooks (channel_occupied/vacated, member_added/removed,
    /// user_offline_message), sent by the owner of each channel.
    #[command(flatten)]
    pub webhooks: mesh_hooks::WebhookArgs,
    /// How long (ms) a user's last connection to a channel, or a channel's last subscriber,
    /// must stay gone before member_removed / channel_vacated are told: a client reconnecting
    /// to another gateway or region within it is not seen to leave.
    #[arg(long, env = "CHANNELMESH_VACATE_GRACE_MS", default_value_t = members::DEFAULT_GRACE_MS)]
    pub vacate_grace_ms: u64,
    /// Test hook (clock skew), hidden: offsets the clock this process stamps ts with by this
    /// many milliseconds (negative: behind). Process-wide; logged loudly.
    #[arg(
        long,
        hide = true,
        env = "CHANNELMESH_CLOCK_OFFSET_MS",
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    pub clock_offset_ms: i64,
}

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
    /// Each channel's window of idempotency keys.
    pub window: Bounds,
    /// Join as a standby: no slots until it replaces a node or an operator adds it.
    pub standby: bool,
    /// Test hook: milliseconds added to the clock ts are stamped with (0 in production).
    pub clock_offset_ms: i64,
    /// Bytes per second one catch-up of a new follower sends at most.
    pub catch_up_rate: u64,
    /// Where the channel webhooks go (none: no webhooks).
    pub webhooks: mesh_hooks::WebhookArgs,
    /// Bounds of the member accounting, and the grace before a departure counts.
    pub members: members::Bounds,
    /// Its metrics and readiness (served over HTTP by the caller): ready while it holds its
    /// lease.
    pub telemetry: mesh_telemetry::Telemetry,
    /// Channel policies (`--policy-file`: history bounds, publish rates), reloaded on SIGHUP;
    /// none: defaults.
    pub policy_file: Option<std::path::PathBuf>,
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
            window: Bounds::default(),
            standby: false,
            clock_offset_ms: 0,
            catch_up_rate: replication::DEFAULT_CATCH_UP_RATE,
            policy_file: None,
            webhooks: mesh_hooks::WebhookArgs::default(),
            members: members::Bounds::default(),
        }
    }

    /// The configuration `args` ask for.
    pub fn from_args(args: &Args) -> Result<Config, Error> {
        let node = NodeId::new(&args.id)?;
        let ring = args.ring.source().map_err(Error::RingArgs)?;
        // Read once here so that a bad file stops the start before anything binds; `serve`
        // loads it again and follows reloads.
        if let Some(path) = &args.policy.policy_file {
            mesh_policy::load(path)?;
        }
        Ok(Config {
            advertise: args.advertise.clone(),
            standby: args.standby,
            clock_offset_ms: args.clock_offset_ms,
            catch_up_rate: args.catch_up_rate,
            policy_file: args.policy.policy_file.clone(),
            webhooks: args.webhooks.clone(),
            members: members::Bounds {
                grace_ms: args.vacate_grace_ms,
                ..members::Bounds::default()
            },
            window: Bounds {
                keys: args.idempotency_keys,
                age: std::time::Duration::from_millis(args.idempotency_window_ms),
            },
            ..Config::new(node, ring)
        })
    }
}
