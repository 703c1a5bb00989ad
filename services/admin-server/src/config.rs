//! An admin server's configuration: the `admin-server` command's flags ([`Args`]), its secrets
//! from the environment, and the typed [`Config`] that [`crate::serve`] runs with.

use std::net::SocketAddr;
use std::path::PathBuf;

use mesh_transport::ServerTls;

use ring_client::{RingArgs, RingSource};

use crate::Error;

/// Default: the address to serve gRPC on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Env var: the admin API's bearer token.
pub const ENV_ADMIN_TOKEN: &str = "CHANNELMESH_ADMIN_TOKEN";
/// Env var: the HS256 secret client tokens are signed with.
pub const ENV_JWT_SECRET: &str = "CHANNELMESH_JWT_SECRET";

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
    /// (50051 -> 50091).
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
    /// The HS256 secret client tokens are signed with (`CHANNELMESH_JWT_SECRET`), for MintToken.
    pub jwt_secret: Vec<u8>,
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
            jwt_secret: required_env(ENV_JWT_SECRET)?.into_bytes(),
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

/// A secret from the environment variable `name`, which must be set and not empty.
pub fn required_env(name: &'static str) -> Result<String, Error> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => Err(Error::MissingEnv(name)),
    }
}
