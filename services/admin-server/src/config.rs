//! An admin server's configuration: the `admin-server` command's flags ([`Args`]), its secrets
//! from the environment, and the typed [`Config`] that [`crate::serve`] runs with.

use std::net::SocketAddr;
use std::path::PathBuf;

use mesh_transport::ServerTls;

use mesh_core::IssuerAudience;
use ring_client::{RingArgs, RingSource};

use crate::Error;

/// Default: the address to serve gRPC on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Env var: the admin API's bearer token.
pub const ENV_ADMIN_TOKEN: &str = "CHANNELMESH_ADMIN_TOKEN";
/// Env var: the HS256 secret client tokens are signed with (at least 32 bytes).
pub const ENV_JWT_SECRET: &str = "CHANNELMESH_JWT_SECRET";
/// Env var: the `iss` minted tokens carry (`--jwt-issuer`).
pub const ENV_JWT_ISSUER: &str = "CHANNELMESH_JWT_ISSUER";
/// Env var: the `aud` minted tokens carry (`--jwt-audience`).
pub const ENV_JWT_AUDIENCE: &str = "CHANNELMESH_JWT_AUDIENCE";

/// The `admin-server` command's flags (its secrets come from [`ENV_ADMIN_TOKEN`] and
/// [`ENV_JWT_SECRET`]).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Its id in Consul's catalog, unique in the mesh; defaults to the listen address.
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Address to serve /metrics, /healthz and /readyz on. Default: --listen's port + 40
    /// (50051 -> 50091) on loopback. Off loopback it needs --http-token.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// The admin API's own server certificate (PEM, valid for the name the web app dials):
    /// with --admin-tls-key, the public listener serves TLS (no client certificate asked;
    /// callers present the bearer token). Without it, plaintext. Apart from the mesh's
    /// --tls-* certificate, which this server presents on its calls to the other services.
    #[arg(long, env = "CHANNELMESH_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// The admin API certificate's private key (PEM).
    #[arg(long, env = "CHANNELMESH_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub ring: RingArgs,
    #[command(flatten)]
    pub claims: ClaimArgs,
}

/// The `iss` and `aud` minted tokens carry, for gateways that check them (their `--jwt-issuer`
/// and `--jwt-audience`): MintToken's and `channelmesh token`'s flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClaimArgs {
    /// Set this `iss` on every token minted (unset: none).
    #[arg(long, env = ENV_JWT_ISSUER)]
    pub jwt_issuer: Option<String>,
    /// Set this `aud` on every token minted (unset: none).
    #[arg(long, env = ENV_JWT_AUDIENCE)]
    pub jwt_audience: Option<String>,
}

impl ClaimArgs {
    /// The claims these flags set.
    pub fn claims(&self) -> IssuerAudience {
        IssuerAudience::new(self.jwt_issuer.clone(), self.jwt_audience.clone())
    }
}

/// Configuration of one admin server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the ring is found.
    pub ring: RingSource,
    /// Where the presence ring is found, if the mesh has presence servers.
    pub presence_ring: Option<RingSource>,
    /// The bearer token every call must present (`CHANNELMESH_ADMIN_TOKEN`).
    pub admin_token: String,
    /// The HS256 secret client tokens are signed with (`CHANNELMESH_JWT_SECRET`), for MintToken:
    /// at least 32 bytes.
    pub jwt_secret: Vec<u8>,
    /// The `iss` and `aud` MintToken sets, when set.
    pub jwt_claims: IssuerAudience,
    /// Its metrics and readiness (served over HTTP by the caller): ready once the ring has
    /// channel servers to route to.
    pub telemetry: mesh_telemetry::Telemetry,
    /// The public listener's own certificate: TLS when set, plaintext otherwise.
    pub public_tls: Option<ServerTls>,
}

impl Config {
    /// The configuration `args` and the environment ask for. Its metrics are unlabelled until
    /// the server's id is known ([`telemetry`]): by default its bound address.
    pub fn from_args(args: &Args) -> Result<Config, Error> {
        Ok(Config {
            ring: args.ring.source()?,
            presence_ring: Some(args.ring.presence_source()?),
            admin_token: required_env(ENV_ADMIN_TOKEN)?,
            jwt_secret: jwt_secret_from_env()?,
            jwt_claims: args.claims.claims(),
            telemetry: mesh_telemetry::Telemetry::default(),
            public_tls: match (&args.admin_tls_cert, &args.admin_tls_key) {
                (Some(cert), Some(key)) => Some(ServerTls::read(cert, key)?),
                _ => None,
            },
        })
    }
}

/// The metrics of the admin server `id`, labelled with it.
pub fn telemetry(id: &str) -> mesh_telemetry::Telemetry {
    mesh_telemetry::Telemetry::new(&[("admin", id)])
}

/// The HS256 secret in [`ENV_JWT_SECRET`], which must be at least 32 bytes.
pub fn jwt_secret_from_env() -> Result<Vec<u8>, Error> {
    let secret = required_env(ENV_JWT_SECRET)?;
    check_jwt_secret(&secret)?;
    Ok(secret.into_bytes())
}

/// Refuses an HS256 secret shorter than 32 bytes, naming [`ENV_JWT_SECRET`].
pub fn check_jwt_secret(secret: &str) -> Result<(), Error> {
    mesh_core::token::check_hs256_secret(secret.as_bytes()).map_err(Error::JwtSecret)
}

/// A secret from the environment variable `name`, which must be set and not empty.
pub fn required_env(name: &'static str) -> Result<String, Error> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => Err(Error::MissingEnv(name)),
    }
}
