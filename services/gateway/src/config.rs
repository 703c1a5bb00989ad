//! A gateway's configuration: the `gateway` command's flags ([`Args`]) and the typed [`Config`]
//! that the crate's `serve` runs with, made from them once.
//!
//! The limit flags are one table ([`LIMIT_FLAGS`]) that parses straight into [`Limits`]
//! (`Limits` is a `clap::Args`), gives each flag's default from `Limits::default()`, and turns
//! limits back into flags for child processes ([`limit_args`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Arg, ArgAction, ArgMatches, Command, value_parser};
use mesh_core::TeamId;
use ring_client::{RingArgs, RingSource};

use crate::boot::{self, BootConfig, BootMode};
use crate::limits::{Cidr, Limits};
use crate::region::{AllowEntry, RedirectAllow};
use crate::{tickets, tokens};

/// Default: the address to serve on (RTM's HTTP calls and WebSockets, `/metrics`, `/healthz`,
/// `/readyz`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Env var: the HS256 secret client tokens are signed with (optional with public keys; at least
/// 32 bytes).
pub const ENV_JWT_SECRET: &str = "CHANNELMESH_JWT_SECRET";
/// Env var: the `iss` every client token must carry (`--jwt-issuer`).
pub const ENV_JWT_ISSUER: &str = "CHANNELMESH_JWT_ISSUER";
/// Env var: the `aud` every client token must carry (`--jwt-audience`).
pub const ENV_JWT_AUDIENCE: &str = "CHANNELMESH_JWT_AUDIENCE";

/// Why the flags and the environment make no gateway configuration. (Its own type rather than
/// the crate's `Error`, so that this module stays below the crate root: the root uses it.)
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither the HS256 secret nor a public key: no token could be checked.
    #[error("set {ENV_JWT_SECRET}, or give --jwt-public-key or --jwks")]
    NoTokenKey,
    /// The HS256 secret is too short to sign with.
    #[error("{ENV_JWT_SECRET}: {0}")]
    JwtSecret(mesh_core::TokenError),
    #[error("--ping-interval-secs must be above 0 and below --idle-timeout-secs")]
    PingInterval,
    /// The `--ring-manager`/`--consul*` flags name no usable ring.
    #[error(transparent)]
    RingArgs(#[from] ring_client::Error),
    /// `--boot-url` without the secret its requests are signed with.
    #[error(
        "--boot-url needs the secret in {} (requests to the web app are signed)",
        mesh_hooks::SECRET_ENV
    )]
    BootSecret,
    /// The policy file does not load: refused before anything binds.
    #[error(transparent)]
    Policy(#[from] mesh_policy::PolicyFileError),
}

/// The `gateway` command's flags (its HS256 secret comes from [`ENV_JWT_SECRET`]).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The region it serves, e.g. us-east.
    #[arg(long)]
    pub region: String,
    /// Its id, unique in the mesh; defaults to REGION-1.
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// The base URL clients reach it at (e.g. its region's Envoy); defaults to the listen
    /// address.
    #[arg(long)]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub ring: RingArgs,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub policy: mesh_policy::PolicyArgs,
    /// While its region drains, forward clients' `rtm.connect` (with their token) only to the
    /// gateways at these origins (`http://10.0.0.7:8080`) or host patterns
    /// (`https://*.gw.example.com`): repeatable, or a comma list. None: no forwarding.
    #[arg(
        long = "redirect-allow",
        env = "CHANNELMESH_REDIRECT_ALLOW",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub redirect_allow: Vec<AllowEntry>,
    #[command(flatten)]
    pub boot: BootArgs,
}

/// Boot from the web app: on `rtm.connect`, ask `--boot-url` for the user's channels.
#[derive(Debug, Clone, clap::Args)]
pub struct BootArgs {
    /// The web app's boot endpoint: on `rtm.connect` the gateway POSTs `{"user","team"}` there
    /// (signed with CHANNELMESH_WEBHOOK_SECRET, required) and takes the answer's `channels`.
    #[arg(long, env = "CHANNELMESH_BOOT_URL")]
    pub boot_url: Option<String>,
    /// The web app's channels join the token's (`union`) or stand in for them (`replace`).
    #[arg(long, env = "CHANNELMESH_BOOT_MODE", value_enum, default_value_t = BootMode::Union)]
    pub boot_mode: BootMode,
    /// Milliseconds the web app has to answer; past it `rtm.connect` answers `boot_timeout`.
    #[arg(long, env = "CHANNELMESH_BOOT_DEADLINE_MS", default_value_t = boot::DEFAULT_DEADLINE.as_millis() as u64)]
    pub boot_deadline_ms: u64,
    /// Seconds an answer is reused for the same user's later connects (0: not cached).
    #[arg(long, env = "CHANNELMESH_BOOT_CACHE_SECS", default_value_t = boot::DEFAULT_CACHE_TTL.as_secs())]
    pub boot_cache_secs: u64,
    /// The most users whose answers are cached (least recently used go first).
    #[arg(long, env = "CHANNELMESH_BOOT_CACHE_USERS", default_value_t = boot::DEFAULT_CACHE_USERS)]
    pub boot_cache_users: usize,
    /// The most users asked about at once; past it `rtm.connect` answers `ratelimited`.
    #[arg(long, env = "CHANNELMESH_BOOT_MAX_IN_FLIGHT", default_value_t = boot::DEFAULT_MAX_IN_FLIGHT)]
    pub boot_max_in_flight: usize,
}

impl BootArgs {
    /// The boot configuration, `None` without `--boot-url`; the secret comes from the
    /// environment and is required with it.
    pub fn config(&self) -> Result<Option<BootConfig>, ConfigError> {
        let Some(url) = self.boot_url.clone().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let secret = mesh_hooks::secret_from_env().map_err(|_| ConfigError::BootSecret)?;
        Ok(Some(BootConfig {
            url,
            secret,
            deadline: Duration::from_millis(self.boot_deadline_ms.max(1)),
            cache_ttl: Duration::from_secs(self.boot_cache_secs),
            cache_users: self.boot_cache_users,
            max_in_flight: self.boot_max_in_flight,
            mode: self.boot_mode,
        }))
    }
}

/// Configuration of one gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// This gateway's id, unique in the mesh, e.g. "us-east-1".
    pub id: String,
    /// Its region, e.g. "us-east".
    pub region: String,
    /// Where the ring is found.
    pub ring: RingSource,
    /// Where the presence ring is found; without one, presence frames get an error reply.
    pub presence_ring: Option<RingSource>,
    /// The base URL clients reach this gateway at (e.g. "http://127.0.0.1:8080", or the
    /// region's Envoy); defaults to the bound address. WebSocket URLs use the same host.
    pub public_url: Option<String>,
    /// The HS256 secret client tokens are signed with; empty when the gateway accepts only
    /// public-key tokens (`tokens`).
    pub jwt_secret: Vec<u8>,
    /// Public keys for RS256/EdDSA tokens, and the clock-skew leeway.
    pub tokens: tokens::TokenConfig,
    /// How long a connect URL from `rtm.connect` stays valid.
    pub connect_url_ttl: std::time::Duration,
    /// What one client may do (docs/operations.md, "Limits").
    pub limits: Limits,
    /// Where a draining gateway may forward `rtm.connect` (empty: nowhere).
    pub redirect_allow: RedirectAllow,
    /// Channel policies and team caps (`--policy-file`), reloaded on SIGHUP; none: defaults.
    pub policy_file: Option<std::path::PathBuf>,
    /// Boot from the web app (`--boot-url`), when configured.
    pub boot: Option<BootConfig>,
}

impl Config {
    /// The configuration `args` and the environment ask for.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        // Optional when public keys are given: such a gateway never needs the secret.
        let jwt_secret = std::env::var(ENV_JWT_SECRET).unwrap_or_default();
        if jwt_secret.is_empty() && args.tokens.public_keys.is_empty() && args.tokens.jwks.is_none()
        {
            return Err(ConfigError::NoTokenKey);
        }
        if !jwt_secret.is_empty() {
            mesh_core::token::check_hs256_secret(jwt_secret.as_bytes())
                .map_err(ConfigError::JwtSecret)?;
        }
        // Read once here so that a bad file stops the start before anything binds; `serve`
        // loads it again and follows reloads.
        if let Some(path) = &args.policy.policy_file {
            mesh_policy::load(path)?;
        }
        Ok(Config {
            id: args.id.clone().unwrap_or_else(|| default_id(&args.region)),
            region: args.region.clone(),
            ring: args.ring.source()?,
            presence_ring: Some(args.ring.presence_source()?),
            public_url: args.public_url.clone(),
            jwt_secret: jwt_secret.into_bytes(),
            connect_url_ttl: tickets::DEFAULT_TICKET_TTL,
            limits: checked(args.limits.clone())?,
            tokens: args.tokens.config(),
            redirect_allow: RedirectAllow::new(args.redirect_allow.clone()),
            policy_file: args.policy.policy_file.clone(),
            boot: args.boot.config()?,
        })
    }
}

/// The id of a region's first gateway, e.g. "us-east-1": the default.
pub fn default_id(region: &str) -> String {
    format!("{region}-1")
}

/// `limits`, if they make sense together: the gateway pings within the idle timeout.
pub fn checked(limits: Limits) -> Result<Limits, ConfigError> {
    if limits.ping_interval.is_zero() || limits.ping_interval >= limits.idle_timeout {
        return Err(ConfigError::PingInterval);
    }
    Ok(limits)
}

/// Which client tokens a gateway accepts beyond the HS256 secret (CHANNELMESH_JWT_SECRET, which
/// becomes optional when a public key is given).
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// A PEM public key (RSA: RS256 tokens; Ed25519: EdDSA tokens); repeatable.
    #[arg(
        long = "jwt-public-key",
        env = "CHANNELMESH_JWT_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub public_keys: Vec<PathBuf>,
    /// A JWKS file of public keys, selected by the token's `kid`.
    #[arg(long, env = "CHANNELMESH_JWKS")]
    pub jwks: Option<PathBuf>,
    /// Clock skew tolerated on a token's `exp` and `nbf`, in seconds.
    #[arg(long, env = "CHANNELMESH_JWT_LEEWAY_SECS", default_value_t = mesh_core::token::LEEWAY_SECS)]
    pub jwt_leeway_secs: u64,
    /// Require every token's `iss` to be this (unset: `iss` is not checked).
    #[arg(long, env = ENV_JWT_ISSUER)]
    pub jwt_issuer: Option<String>,
    /// Require every token's `aud` to hold this (unset: `aud` is not checked).
    #[arg(long, env = ENV_JWT_AUDIENCE)]
    pub jwt_audience: Option<String>,
}

impl TokenArgs {
    /// The token keys these flags name.
    pub fn config(&self) -> tokens::TokenConfig {
        tokens::TokenConfig {
            public_keys: self.public_keys.clone(),
            jwks: self.jwks.clone(),
            leeway_secs: self.jwt_leeway_secs,
            claims: mesh_core::IssuerAudience::new(
                self.jwt_issuer.clone(),
                self.jwt_audience.clone(),
            ),
        }
    }
}

/// Where a limit flag's value lands in [`Limits`], and how it is written.
#[derive(Clone, Copy)]
enum Field {
    /// A count.
    U32(fn(&mut Limits) -> &mut u32),
    /// A count or a size in bytes.
    Usize(fn(&mut Limits) -> &mut usize),
    /// A duration in seconds (fractions allowed).
    Secs(fn(&mut Limits) -> &mut Duration),
    /// A duration in milliseconds.
    Millis(fn(&mut Limits) -> &mut Duration),
    /// `TEAM=N`, repeatable: the per-team caps.
    TeamCaps,
    /// `ADDRESS[/BITS]`, repeatable or comma-separated: the trusted proxies.
    Proxies,
    /// A switch: `--NAME` (or `--NAME=true`) turns it on.
    Bool(fn(&mut Limits) -> &mut bool),
}

/// One limit flag: `--NAME`, its help, and its field of [`Limits`].
struct LimitFlag {
    name: &'static str,
    help: &'static str,
    field: Field,
}

/// Every limit flag, in `--help` order; docs/operations.md ("Limits") lists them.
const LIMIT_FLAGS: &[LimitFlag] = &[
    LimitFlag {
        name: "client-frames-per-sec",
        help: "Client frames one connection may send per second, sustained (0: no limit); past it the frame gets a `ratelimited` error",
        field: Field::U32(|l| &mut l.frames_per_sec),
    },
    LimitFlag {
        name: "client-frame-burst",
        help: "Frames a connection may send at once above that rate",
        field: Field::U32(|l| &mut l.frame_burst),
    },
    LimitFlag {
        name: "refusals-before-close",
        help: "Refused frames in a row after which a connection is closed (4029)",
        field: Field::U32(|l| &mut l.refusals_before_close),
    },
    LimitFlag {
        name: "client-publish-bytes",
        help: "Bytes of client messages and typing one connection may have being published and not yet answered; at it the connection's socket is not read until answers come (at most 4096 publishes in flight)",
        field: Field::Usize(|l| &mut l.publish_bytes),
    },
    LimitFlag {
        name: "outbound-queue-bytes",
        help: "Bytes queued to one connection before it is closed as a slow consumer (4008)",
        field: Field::Usize(|l| &mut l.outbound_bytes),
    },
    LimitFlag {
        name: "write-timeout-secs",
        help: "Seconds a write to a client may stall before it is closed as a slow consumer (4008)",
        field: Field::Secs(|l| &mut l.write_timeout),
    },
    LimitFlag {
        name: "typing-interval-ms",
        help: "Milliseconds within which a user's repeated typing in a channel is coalesced",
        field: Field::Millis(|l| &mut l.typing_interval),
    },
    LimitFlag {
        name: "max-connections",
        help: "Client connections per gateway; past it `rtm.connect` answers `ratelimited`",
        field: Field::Usize(|l| &mut l.max_connections),
    },
    LimitFlag {
        name: "max-sockets",
        help: "Open sockets per gateway (clients and HTTP calls); at the cap accept waits. Lowered to fit the process's open-files limit",
        field: Field::Usize(|l| &mut l.max_sockets),
    },
    LimitFlag {
        name: "handshakes-per-sec",
        help: "`rtm.connect` calls per second per gateway (0: no limit)",
        field: Field::U32(|l| &mut l.handshakes_per_sec),
    },
    LimitFlag {
        name: "handshake-timeout-secs",
        help: "Seconds a request may take to send its headers (slowloris)",
        field: Field::Secs(|l| &mut l.handshake_timeout),
    },
    LimitFlag {
        name: "idle-timeout-secs",
        help: "Seconds a connection may stay silent (not even a pong) before it is closed (4001)",
        field: Field::Secs(|l| &mut l.idle_timeout),
    },
    LimitFlag {
        name: "ping-interval-secs",
        help: "Seconds between the gateway's pings to each connection",
        field: Field::Secs(|l| &mut l.ping_interval),
    },
    LimitFlag {
        name: "team-connection-limit",
        help: "Concurrent connections per team across all gateways and regions (0: no cap); past it `rtm.connect` answers `too_many_connections`. Counted by the presence servers",
        field: Field::U32(|l| &mut l.team_connections),
    },
    LimitFlag {
        name: "team-limit",
        help: "A team's own cap, replacing --team-connection-limit: TEAM=N (repeatable; 0: no cap)",
        field: Field::TeamCaps,
    },
    LimitFlag {
        name: "user-connection-limit",
        help: "Concurrent connections per user across all gateways (0: no cap)",
        field: Field::U32(|l| &mut l.user_connections),
    },
    LimitFlag {
        name: "connects-per-user-per-sec",
        help: "`rtm.connect` calls per second per user (the token's subject), with bursts of 10 s worth (0: no limit); past it `ratelimited`",
        field: Field::U32(|l| &mut l.connects_per_user),
    },
    LimitFlag {
        name: "connects-per-addr-per-sec",
        help: "`rtm.connect` calls per second per client address (an IPv6 /64), with bursts of 10 s worth (0: no limit); past it `ratelimited`",
        field: Field::U32(|l| &mut l.connects_per_addr),
    },
    LimitFlag {
        name: "api-calls-per-user-per-sec",
        help: "`auth.test` and `users.*` calls per second per user, with bursts of 10 s worth (0: no limit); past it `ratelimited`",
        field: Field::U32(|l| &mut l.api_calls_per_user),
    },
    LimitFlag {
        name: "api-calls-per-addr-per-sec",
        help: "`auth.test` and `users.*` calls per second per client address, with bursts of 10 s worth (0: no limit); past it `ratelimited`",
        field: Field::U32(|l| &mut l.api_calls_per_addr),
    },
    LimitFlag {
        name: "request-body-bytes",
        help: "The largest request body accepted; past it HTTP 413 `request_too_large`",
        field: Field::Usize(|l| &mut l.request_body_bytes),
    },
    LimitFlag {
        name: "request-body-timeout-secs",
        help: "Seconds a request may take to send its body once its headers are in (slowloris on bodies); past it HTTP 408 `request_timeout` and the connection is closed",
        field: Field::Secs(|l| &mut l.request_body_timeout),
    },
    LimitFlag {
        name: "trusted-proxy",
        help: "A proxy (ADDRESS or ADDRESS/BITS; repeatable or comma-separated) whose X-Forwarded-For names the client for the per-address limits: the region's Envoys, and the gateways that forward rtm.connect while their region drains",
        field: Field::Proxies,
    },
    LimitFlag {
        name: "allow-team-channel-posts",
        help: "Let clients post messages and typing to their team's channel (by default it carries server events only, and a client post gets error 12)",
        field: Field::Bool(|l| &mut l.team_channel_posts),
    },
];

impl LimitFlag {
    /// The flag, with its default taken from `defaults`.
    fn arg(&self, defaults: &mut Limits) -> Arg {
        let arg = Arg::new(self.name)
            .long(self.name)
            .help(self.help)
            .value_name(self.name.to_uppercase().replace('-', "_"));
        match self.field {
            Field::U32(field) => arg
                .value_parser(value_parser!(u32))
                .default_value(field(defaults).to_string()),
            Field::Usize(field) => arg
                .value_parser(value_parser!(usize))
                .default_value(field(defaults).to_string()),
            Field::Secs(field) => arg
                .value_parser(parse_secs)
                .default_value(field(defaults).as_secs_f64().to_string()),
            Field::Millis(field) => arg
                .value_parser(value_parser!(u64).map(Duration::from_millis))
                .default_value(field(defaults).as_millis().to_string()),
            Field::TeamCaps => arg
                .value_name("TEAM_LIMITS")
                .value_parser(parse_team_limit)
                .action(ArgAction::Append),
            Field::Proxies => arg
                .value_name("CIDR")
                .value_parser(|raw: &str| raw.parse::<Cidr>())
                .value_delimiter(',')
                .action(ArgAction::Append),
            Field::Bool(field) => arg
                .value_name("BOOL")
                .value_parser(value_parser!(bool))
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true")
                .default_value(field(defaults).to_string()),
        }
    }

    /// Sets this flag's field of `limits` from `matches`, if the flag has a value there.
    fn update(&self, limits: &mut Limits, matches: &ArgMatches) {
        match self.field {
            Field::U32(field) => {
                if let Some(v) = matches.get_one::<u32>(self.name) {
                    *field(limits) = *v;
                }
            }
            Field::Usize(field) => {
                if let Some(v) = matches.get_one::<usize>(self.name) {
                    *field(limits) = *v;
                }
            }
            Field::Secs(field) | Field::Millis(field) => {
                if let Some(v) = matches.get_one::<Duration>(self.name) {
                    *field(limits) = *v;
                }
            }
            Field::TeamCaps => {
                if let Some(caps) = matches.get_many::<(TeamId, u32)>(self.name) {
                    limits.team_overrides = caps.cloned().collect();
                }
            }
            Field::Proxies => {
                if let Some(proxies) = matches.get_many::<Cidr>(self.name) {
                    limits.trusted_proxies = proxies.copied().collect();
                }
            }
            Field::Bool(field) => {
                if let Some(v) = matches.get_one::<bool>(self.name) {
                    *field(limits) = *v;
                }
            }
        }
    }

    /// This flag as arguments (`--NAME=VALUE`, one per value) saying what `limits` hold.
    fn to_args(&self, limits: &mut Limits) -> Vec<String> {
        let name = self.name;
        match self.field {
            Field::U32(field) => vec![format!("--{name}={}", field(limits))],
            Field::Usize(field) => vec![format!("--{name}={}", field(limits))],
            Field::Secs(field) => vec![format!("--{name}={}", field(limits).as_secs_f64())],
            Field::Millis(field) => vec![format!("--{name}={}", field(limits).as_millis())],
            Field::TeamCaps => limits
                .team_overrides
                .iter()
                .map(|(team, n)| format!("--{name}={team}={n}"))
                .collect(),
            Field::Proxies => limits
                .trusted_proxies
                .iter()
                .map(|cidr| format!("--{name}={cidr}"))
                .collect(),
            Field::Bool(field) => vec![format!("--{name}={}", field(limits))],
        }
    }
}

/// `limits` as the limit flags that give them, for gateway child processes.
pub fn limit_args(limits: &Limits) -> Vec<String> {
    // The table reaches fields through `&mut`; read them from a copy.
    let mut limits = limits.clone();
    LIMIT_FLAGS
        .iter()
        .flat_map(|flag| flag.to_args(&mut limits))
        .collect()
}

impl clap::Args for Limits {
    fn augment_args(command: Command) -> Command {
        let mut defaults = Limits::default();
        LIMIT_FLAGS.iter().fold(command, |command, flag| {
            command.arg(flag.arg(&mut defaults))
        })
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl clap::FromArgMatches for Limits {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut limits = Limits::default();
        limits.update_from_arg_matches(matches)?;
        Ok(limits)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for flag in LIMIT_FLAGS {
            flag.update(self, matches);
        }
        // At least one: a connection is closed only after a refused frame.
        self.refusals_before_close = self.refusals_before_close.max(1);
        Ok(())
    }
}

/// Seconds, fractions allowed.
fn parse_secs(raw: &str) -> Result<Duration, String> {
    let secs: f64 = raw
        .parse()
        .map_err(|e: std::num::ParseFloatError| e.to_string())?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{secs} is not a duration"))
}

/// `TEAM=N`.
fn parse_team_limit(raw: &str) -> Result<(TeamId, u32), String> {
    let (team, n) = raw
        .split_once('=')
        .ok_or_else(|| format!("{raw}: expected TEAM=N"))?;
    let team = TeamId::new(team).map_err(|e| format!("{team}: {e}"))?;
    let n = n.parse().map_err(|_| format!("{n}: not a number"))?;
    Ok((team, n))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        limits: Limits,
    }

    fn parse(args: &[&str]) -> Result<Limits, clap::Error> {
        Cli::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
            .map(|c| c.limits)
    }

    #[derive(Debug, Parser)]
    struct TokenCli {
        #[command(flatten)]
        tokens: TokenArgs,
    }

    #[test]
    fn issuer_and_audience_flags_make_the_claims_required() {
        let parse = |args: &[&str]| {
            TokenCli::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
                .unwrap()
                .tokens
                .config()
                .claims
        };
        let claims = parse(&["--jwt-issuer", "webapp", "--jwt-audience=channelmesh"]);
        assert_eq!(claims.issuer.as_deref(), Some("webapp"));
        assert_eq!(claims.audience.as_deref(), Some("channelmesh"));
        assert_eq!(
            parse(&["--jwt-issuer="]),
            mesh_core::IssuerAudience::default()
        );
    }

    #[test]
    fn no_flags_are_the_default_limits() {
        assert_eq!(parse(&[]).unwrap(), Limits::default());
    }

    #[test]
    fn every_flag_lands_in_its_field() {
        let limits = parse(&[
            "--client-frames-per-sec=1",
            "--client-frame-burst=2",
            "--refusals-before-close=3",
            "--outbound-queue-bytes=4",
            "--client-publish-bytes=22",
            "--write-timeout-secs=0.5",
            "--typing-interval-ms=6",
            "--max-connections=7",
            "--max-sockets=8",
            "--handshakes-per-sec=9",
            "--handshake-timeout-secs=10",
            "--idle-timeout-secs=11",
            "--ping-interval-secs=1.5",
            "--team-connection-limit=13",
            "--team-limit=T1=14",
            "--team-limit",
            "T2=0",
            "--user-connection-limit=15",
            "--connects-per-user-per-sec=16",
            "--connects-per-addr-per-sec=17",
            "--api-calls-per-user-per-sec=18",
            "--api-calls-per-addr-per-sec=19",
            "--request-body-bytes=20",
            "--request-body-timeout-secs=21",
            "--trusted-proxy=10.0.0.0/8,192.0.2.1",
            "--trusted-proxy",
            "fd00::/8",
            "--allow-team-channel-posts",
        ])
        .unwrap();
        let want = Limits {
            frames_per_sec: 1,
            frame_burst: 2,
            refusals_before_close: 3,
            outbound_bytes: 4,
            publish_bytes: 22,
            write_timeout: Duration::from_millis(500),
            typing_interval: Duration::from_millis(6),
            max_connections: 7,
            max_sockets: 8,
            handshakes_per_sec: 9,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(11),
            ping_interval: Duration::from_millis(1500),
            team_connections: 13,
            team_overrides: [
                (TeamId::new("T1").unwrap(), 14),
                (TeamId::new("T2").unwrap(), 0),
            ]
            .into_iter()
            .collect(),
            user_connections: 15,
            connects_per_user: 16,
            connects_per_addr: 17,
            api_calls_per_user: 18,
            api_calls_per_addr: 19,
            request_body_bytes: 20,
            request_body_timeout: Duration::from_secs(21),
            trusted_proxies: ["10.0.0.0/8", "192.0.2.1", "fd00::/8"]
                .map(|c| c.parse().unwrap())
                .to_vec(),
            team_channel_posts: true,
        };
        assert_eq!(limits, want);
        let off = parse(&["--allow-team-channel-posts=false"]).unwrap();
        assert!(!off.team_channel_posts);
    }

    #[test]
    fn limits_survive_the_way_to_a_child_process() {
        let limits = parse(&[
            "--write-timeout-secs=0.25",
            "--team-limit=T9=3",
            "--trusted-proxy=10.0.0.0/8,::1",
            "--allow-team-channel-posts",
        ])
        .unwrap();
        let args = limit_args(&limits);
        let again = parse(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert_eq!(again, limits);
        assert_eq!(
            limit_args(&Limits::default()).len(),
            LIMIT_FLAGS.len() - 2,
            "one argument per flag, none for no team caps and no trusted proxies"
        );
    }

    #[test]
    fn zero_refusals_means_one() {
        let limits = parse(&["--refusals-before-close=0"]).unwrap();
        assert_eq!(limits.refusals_before_close, 1);
    }

    #[test]
    fn bad_values_are_refused_by_flag() {
        let error = parse(&["--write-timeout-secs=-1"]).unwrap_err().to_string();
        assert!(error.contains("-1 is not a duration"), "{error}");
        let error = parse(&["--team-limit=T1"]).unwrap_err().to_string();
        assert!(error.contains("T1: expected TEAM=N"), "{error}");
        let error = parse(&["--trusted-proxy=10.0.0.0/40"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("the prefix must be 0 to 32 bits"), "{error}");
    }

    #[test]
    fn the_ping_interval_must_be_below_the_idle_timeout() {
        let at_idle = parse(&["--ping-interval-secs=120"]).unwrap();
        let error = checked(at_idle).unwrap_err().to_string();
        assert_eq!(
            error,
            "--ping-interval-secs must be above 0 and below --idle-timeout-secs"
        );
        assert!(checked(parse(&["--ping-interval-secs=0"]).unwrap()).is_err());
        assert!(checked(Limits::default()).is_ok());
    }
}

#[cfg(test)]
mod redirect_tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: Args,
    }

    fn redirect_allow(args: &[&str]) -> Result<Vec<String>, clap::Error> {
        let base = ["gateway", "--region", "us-east"];
        let cli = Cli::try_parse_from(base.iter().chain(args.iter()).copied())?;
        Ok(cli
            .gateway
            .redirect_allow
            .iter()
            .map(|e| e.to_string())
            .collect())
    }

    #[test]
    fn redirect_allow_is_repeatable_and_takes_comma_lists() {
        let got = redirect_allow(&[
            "--redirect-allow",
            "http://10.0.0.7:8080,https://*.gw.example.com",
            "--redirect-allow=http://10.0.0.8:8080",
        ])
        .unwrap();
        assert_eq!(
            got,
            [
                "http://10.0.0.7:8080",
                "https://*.gw.example.com",
                "http://10.0.0.8:8080"
            ]
        );
        assert!(redirect_allow(&["--redirect-allow", "10.0.0.7:8080"]).is_err());
        assert!(redirect_allow(&["--redirect-allow", "https://gw.example.com/api"]).is_err());
    }
}
