//! gRPC between the services: mutual TLS (rustls) with identities in the certificates, one
//! authorization table, and the public admin API's own listener.
//!
//! One setting per process, made once at start ([`configure`], from the binary's `--tls-*` or
//! `--insecure` flags, or by `dev` with the certificates it generates): every internal gRPC
//! server of the process then requires a client certificate signed by the CA and checks each
//! call against the authorization table ([`internal_server`], [`authz`]), and every gRPC client
//! dials TLS presenting the process's certificate ([`endpoint`]). A process-wide setting rather
//! than a field in every service's config: every internal connection (routers, ring watchers,
//! leases, presence sessions, hand-offs, probes) must agree, and a forgotten one would silently
//! stay plaintext. [`Transport::Insecure`] is the explicit plaintext opt-out; a process that
//! never configures its transport (a library's own tests) speaks plaintext too, and the binary
//! never runs one unconfigured.
//!
//! Certificates: one CA (PEM) that signed every service's certificate, and per process a
//! certificate chain and key (PEM) naming the process's identities ([`identity`]) and the
//! addresses others dial (IP or DNS subject alternative names), usable both as a server and as
//! a client (extended key usages serverAuth and clientAuth).
//!
//! The admin API is public: [`public_server`] serves it plaintext, or TLS with a server
//! certificate of its own, and never asks for a client certificate (callers present a bearer
//! token).

mod args;
pub mod authz;
pub mod identity;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Server, ServerTlsConfig};

pub use args::TlsArgs;
pub use authz::{AuthorizeLayer, Authorizer};
pub use identity::{Caller, Identity, IdentityError, Role};

/// Errors of setting up the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TLS needs all of --tls-ca, --tls-cert and --tls-key")]
    IncompleteTls,
    #[error(
        "--insecure (plaintext) and --tls-ca/--tls-cert/--tls-key (mutual TLS) ask for opposite things: give one"
    )]
    InsecureWithTls,
    #[error(
        "{command} needs mutual TLS between the services: give --tls-ca, --tls-cert and --tls-key \
         (env CHANNELMESH_TLS_CA, CHANNELMESH_TLS_CERT, CHANNELMESH_TLS_KEY; `channelmesh certs` \
         issues them), or --insecure for plaintext on loopback only"
    )]
    NoTransport { command: String },
    #[error(
        "--insecure serves plaintext gRPC with no authentication, and {addr} is not a loopback \
         address: add --insecure-allow-remote if that is really meant, or use mutual TLS \
         (--tls-ca, --tls-cert, --tls-key)"
    )]
    InsecureRemote { addr: std::net::SocketAddr },
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    BadCertificate(String),
    /// The process's transport was already set otherwise ([`configure`]).
    #[error("{0}")]
    Configured(String),
}

/// A process's TLS material.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The CA certificate(s), PEM, that peers' certificates are checked against.
    pub ca: Vec<u8>,
    /// This process's certificate chain, PEM: presented as a server and as a client.
    pub cert: Vec<u8>,
    /// Its private key, PEM.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identities", &self.identities().unwrap_or_default())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The three PEM files.
    pub fn read(ca: &Path, cert: &Path, key: &Path) -> Result<Credentials, Error> {
        Ok(Credentials {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
        })
    }

    /// The identities its certificate names.
    pub fn identities(&self) -> Result<Vec<Identity>, Error> {
        let first = CertificateDer::pem_slice_iter(&self.cert)
            .next()
            .ok_or_else(|| Error::BadCertificate("no certificate in the PEM".into()))?
            .map_err(|e| Error::BadCertificate(format!("the certificate's PEM: {e}")))?;
        Ok(identity::identities_of(&first))
    }
}

/// How a process speaks gRPC to the other services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext, no identities, no authorization (`--insecure`).
    Insecure,
    /// Mutual TLS with these credentials: servers require a client certificate signed by the
    /// CA and enforce the authorization table.
    Mtls(Credentials),
}

/// A PEM file's bytes.
fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

static TRANSPORT: RwLock<Option<Arc<Transport>>> = RwLock::new(None);

/// Sets this process's transport. Once set it stays, with one exception: a certificate from
/// the same CA naming at least the identities of the current one replaces it (an in-process
/// mesh of the test kit adds the identities of its services to the process's certificate;
/// connections made before keep theirs). Anything else is refused: a process cannot speak two
/// ways.
pub fn configure(transport: Transport) -> Result<(), Error> {
    let mut current = TRANSPORT.write().unwrap_or_else(|e| e.into_inner());
    let replace = match (current.as_deref(), &transport) {
        (None, _) => true,
        (Some(now), new) if now == new => false,
        (Some(Transport::Mtls(now)), Transport::Mtls(new)) if now.ca == new.ca => {
            let (had, has) = (now.identities()?, new.identities()?);
            if !had.iter().all(|i| has.contains(i)) {
                return Err(Error::Configured(
                    "this process's certificate can only grow: the new one leaves out identities"
                        .into(),
                ));
            }
            true
        }
        _ => {
            return Err(Error::Configured(
                "this process's transport is already configured differently".into(),
            ));
        }
    };
    if replace {
        *current = Some(Arc::new(transport));
    }
    Ok(())
}

/// This process's transport, if configured.
pub fn transport() -> Option<Arc<Transport>> {
    TRANSPORT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether this process speaks mutual TLS.
pub fn is_mutual_tls() -> bool {
    matches!(transport().as_deref(), Some(Transport::Mtls(_)))
}

/// `host:port` of `uri` (`http://host:port`, `https://host:port` or `host:port`).
fn authority(uri: &str) -> &str {
    uri.strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))
        .unwrap_or(uri)
        .trim_end_matches('/')
}

/// An endpoint for `uri` (`http://host:port`, `https://host:port` or `host:port`) of another
/// service: mutual TLS with this process's certificate when configured, plaintext otherwise.
pub fn endpoint(uri: &str) -> Result<Endpoint, tonic::transport::Error> {
    match transport() {
        Some(transport) => endpoint_with(uri, &transport),
        None => endpoint_with(uri, &Transport::Insecure),
    }
}

/// An endpoint for `uri` with explicit credentials rather than the process's: for `ctl` and
/// tests that call as someone else.
pub fn endpoint_with(
    uri: &str,
    transport: &Transport,
) -> Result<Endpoint, tonic::transport::Error> {
    let authority = authority(uri);
    match transport {
        Transport::Insecure => Endpoint::from_shared(format!("http://{authority}")),
        Transport::Mtls(c) => {
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&c.ca))
                .identity(tonic::transport::Identity::from_pem(&c.cert, &c.key));
            Endpoint::from_shared(format!("https://{authority}"))?.tls_config(config)
        }
    }
}

/// An endpoint for the public admin API at `uri`: plaintext for `http://host:port` or
/// `host:port`; for `https://host:port` TLS checked against `ca` (PEM), presenting no client
/// certificate (the API takes a bearer token).
pub fn public_endpoint(uri: &str, ca: Option<&[u8]>) -> Result<Endpoint, tonic::transport::Error> {
    if !uri.starts_with("https://") {
        return Endpoint::from_shared(format!("http://{}", authority(uri)));
    }
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = ca {
        config = config.ca_certificate(Certificate::from_pem(ca));
    }
    Endpoint::from_shared(uri.trim_end_matches('/').to_string())?.tls_config(config)
}

/// An internal gRPC server: with mutual TLS it requires a client certificate signed by the CA
/// and enforces the authorization table through `authorizer` (which handlers use for their
/// "as itself" checks); `--insecure`, plaintext and open.
pub type InternalServer = Server<tower_layer::Stack<AuthorizeLayer, tower_layer::Identity>>;

/// An internal gRPC server builder for this process's transport (see [`InternalServer`]).
pub fn internal_server(authorizer: &Authorizer) -> Result<InternalServer, tonic::transport::Error> {
    let builder = Server::builder();
    let builder = match transport().as_deref() {
        Some(Transport::Mtls(c)) => builder.tls_config(
            ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(&c.cert, &c.key))
                .client_ca_root(Certificate::from_pem(&c.ca)),
        )?,
        Some(Transport::Insecure) | None => builder,
    };
    Ok(builder.layer(authorizer.layer()))
}

/// The public admin API's own server certificate (PEM): its listener's TLS, apart from the
/// mesh's.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ServerTls {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The two PEM files.
    pub fn read(cert: &Path, key: &Path) -> Result<ServerTls, Error> {
        Ok(ServerTls {
            cert: read(cert)?,
            key: read(key)?,
        })
    }
}

/// A server for the public admin API: plaintext, or TLS with its own certificate; it never
/// asks for a client certificate.
pub fn public_server(tls: Option<&ServerTls>) -> Result<Server, tonic::transport::Error> {
    let builder = Server::builder();
    match tls {
        None => Ok(builder),
        Some(tls) => builder.tls_config(
            ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key)),
        ),
    }
}
