//! The `--tls-*` flags every process takes, and turning them into this process's transport.

use std::path::{Path, PathBuf};

use crate::{Error, Tls};

/// TLS for gRPC between the services (and to the admin API): all three files, or none.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The CA certificate (PEM) every service's certificate is signed by; with --tls-cert and
    /// --tls-key, every gRPC server of this process serves TLS and every gRPC client dials TLS.
    #[arg(long, global = true, env = "CHANNELMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM): valid for the addresses others dial it at, with
    /// the serverAuth and clientAuth key usages.
    #[arg(long, global = true, env = "CHANNELMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, global = true, env = "CHANNELMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Servers refuse clients without a certificate signed by the CA (mutual TLS).
    #[arg(long, global = true, env = "CHANNELMESH_TLS_REQUIRE_CLIENT_CERT")]
    pub tls_require_client_cert: bool,
}

impl TlsArgs {
    /// Sets this process's gRPC transport from the flags (nothing when none is given).
    pub fn configure(&self) -> Result<(), Error> {
        let (ca, cert, key) = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) if self.tls_require_client_cert => {
                return Err(Error::ClientCertWithoutTls);
            }
            (None, None, None) => return Ok(()),
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            _ => return Err(Error::IncompleteTls),
        };
        crate::configure(Tls {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
            require_client_cert: self.tls_require_client_cert,
        })
        .map_err(Error::Configured)
    }

    /// The same settings as arguments, for child processes.
    pub fn to_args(&self) -> Vec<String> {
        let files = [
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
        ];
        let mut args: Vec<String> = files
            .into_iter()
            .filter_map(|(flag, path)| Some(format!("{flag}={}", path.as_ref()?.display())))
            .collect();
        if self.tls_require_client_cert {
            args.push("--tls-require-client-cert".into());
        }
        args
    }
}

/// A PEM file's bytes.
fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_go_to_children_as_given() {
        let args = TlsArgs {
            tls_ca: Some("ca.pem".into()),
            tls_cert: Some("cert.pem".into()),
            tls_key: Some("key.pem".into()),
            tls_require_client_cert: true,
        };
        assert_eq!(
            args.to_args(),
            [
                "--tls-ca=ca.pem",
                "--tls-cert=cert.pem",
                "--tls-key=key.pem",
                "--tls-require-client-cert"
            ]
        );
        assert!(TlsArgs::default().to_args().is_empty());
    }

    #[test]
    fn some_files_but_not_all_are_refused() {
        let args = TlsArgs {
            tls_ca: Some("ca.pem".into()),
            ..TlsArgs::default()
        };
        assert!(matches!(args.configure(), Err(Error::IncompleteTls)));
        let args = TlsArgs {
            tls_require_client_cert: true,
            ..TlsArgs::default()
        };
        assert!(matches!(args.configure(), Err(Error::ClientCertWithoutTls)));
        assert!(TlsArgs::default().configure().is_ok());
    }
}
