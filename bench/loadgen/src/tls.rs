//! The `--tls-*` flags `channelmesh` takes, taken here too (`channelmesh bench` passes them on):
//! with them, the load generator's gRPC calls (admin API, ring manager, presence server) dial
//! TLS. The same flags and env vars as the `channelmesh` binary's.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// TLS for gRPC between the services (and to the admin API): all three files, or none.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// The CA certificate (PEM) every service's certificate is signed by; with --tls-cert and
    /// --tls-key, every gRPC server of this process serves TLS and every gRPC client dials TLS.
    #[arg(long, global = true, env = "CHANNELMESH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM): valid for the addresses others dial it at, with
    /// the serverAuth and clientAuth key usages.
    #[arg(long, global = true, env = "CHANNELMESH_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, global = true, env = "CHANNELMESH_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Servers refuse clients without a certificate signed by the CA (mutual TLS).
    #[arg(long, global = true, env = "CHANNELMESH_TLS_REQUIRE_CLIENT_CERT")]
    tls_require_client_cert: bool,
}

impl TlsArgs {
    /// Sets this process's gRPC transport from the flags (nothing when none is given).
    pub fn configure(&self) -> anyhow::Result<()> {
        let (ca, cert, key) = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => {
                anyhow::ensure!(
                    !self.tls_require_client_cert,
                    "--tls-require-client-cert needs --tls-ca, --tls-cert and --tls-key"
                );
                return Ok(());
            }
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            _ => anyhow::bail!("TLS needs all of --tls-ca, --tls-cert and --tls-key"),
        };
        let read = |path: &Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        mesh_transport::configure(mesh_transport::Tls {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
            require_client_cert: self.tls_require_client_cert,
        })
        .map_err(anyhow::Error::msg)
    }
}
