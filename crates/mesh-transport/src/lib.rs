//! gRPC between the services: plaintext by default, TLS or mutual TLS (rustls) when the process
//! is given certificates.
//!
//! One setting per process, made once at start ([`configure`], from the binary's `--tls-*`
//! flags): every gRPC server of the process then serves TLS ([`server`]) and every gRPC
//! client dials TLS, presenting the same certificate ([`endpoint`]). A process-wide setting
//! rather than a field in every service's config: every internal connection (routers, ring
//! watchers, leases, presence sessions, hand-offs, probes) must agree, and a forgotten one would
//! silently stay plaintext.
//!
//! Certificates: one CA (PEM) that signed every service's certificate, and per process a
//! certificate chain and key (PEM) valid for the addresses the others dial (IP or DNS subject
//! alternative names) and usable both as a server and as a client (extended key usages
//! serverAuth and clientAuth). With `require_client_cert`, servers refuse clients without a
//! certificate signed by the CA: mutual TLS.
//!
//! [`TlsArgs`] are the `--tls-*` flags that ask for it, in every process.

mod args;

use std::sync::OnceLock;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

pub use args::TlsArgs;

/// Errors of setting up the transport from the `--tls-*` flags.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--tls-require-client-cert needs --tls-ca, --tls-cert and --tls-key")]
    ClientCertWithoutTls,
    #[error("TLS needs all of --tls-ca, --tls-cert and --tls-key")]
    IncompleteTls,
    #[error("reading {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The process's TLS was already set otherwise ([`configure`]).
    #[error("{0}")]
    Configured(String),
}

/// TLS material of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CA certificate(s), PEM, that peers' certificates are checked against.
    pub ca: Vec<u8>,
    /// This process's certificate chain, PEM: presented as a server and as a client.
    pub cert: Vec<u8>,
    /// Its private key, PEM.
    pub key: Vec<u8>,
    /// Servers require a client certificate signed by `ca` (mutual TLS).
    pub require_client_cert: bool,
}

static TLS: OnceLock<Tls> = OnceLock::new();

/// Sets this process's TLS, once. A second call with other material is refused: a process
/// cannot speak two ways.
pub fn configure(tls: Tls) -> Result<(), String> {
    let set = TLS.get_or_init(|| tls.clone());
    if *set == tls {
        Ok(())
    } else {
        Err("TLS is already configured differently in this process".into())
    }
}

/// This process's TLS, if any.
pub fn tls() -> Option<&'static Tls> {
    TLS.get()
}

/// An endpoint for `uri` (`http://host:port`, `https://host:port` or `host:port`): TLS with
/// this process's certificate when configured, plaintext otherwise.
pub fn endpoint(uri: &str) -> Result<Endpoint, tonic::transport::Error> {
    let authority = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))
        .unwrap_or(uri)
        .trim_end_matches('/');
    match tls() {
        None => Endpoint::from_shared(format!("http://{authority}")),
        Some(tls) => {
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca))
                .identity(Identity::from_pem(&tls.cert, &tls.key));
            Endpoint::from_shared(format!("https://{authority}"))?.tls_config(config)
        }
    }
}

/// A gRPC server builder: TLS (requiring client certificates when so configured) when this
/// process has TLS, plaintext otherwise.
pub fn server() -> Result<Server, tonic::transport::Error> {
    let builder = Server::builder();
    match tls() {
        None => Ok(builder),
        Some(tls) => {
            let mut config =
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
            if tls.require_client_cert {
                config = config.client_ca_root(Certificate::from_pem(&tls.ca));
            }
            builder.tls_config(config)
        }
    }
}
