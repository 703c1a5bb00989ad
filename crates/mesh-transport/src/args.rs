//! The transport flags every process takes — `--tls-*` (mutual TLS) or `--insecure`
//! (plaintext) — and turning them into this process's [`Transport`].

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{Credentials, Error, Transport};

/// Mutual TLS for gRPC between the services (all three files), or `--insecure`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The CA certificate (PEM) every service's certificate is signed by; with --tls-cert and
    /// --tls-key, every internal gRPC server of this process requires a client certificate
    /// signed by it, and every gRPC client dials TLS presenting --tls-cert.
    #[arg(long, global = true, env = "CHANNELMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM): names its identities (`<id>.<role>.channelmesh`)
    /// and the addresses others dial it at, with the serverAuth and clientAuth key usages.
    #[arg(long, global = true, env = "CHANNELMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, global = true, env = "CHANNELMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Accepted for compatibility: internal servers always require a client certificate
    /// signed by the CA (mutual TLS).
    #[arg(long, global = true, env = "CHANNELMESH_TLS_REQUIRE_CLIENT_CERT")]
    pub tls_require_client_cert: bool,
    /// Plaintext gRPC between the services, with no authentication and no authorization: for
    /// a mesh on one machine only. Logs a warning at start; refused with a non-loopback
    /// listen address unless --insecure-allow-remote is given too.
    #[arg(long, global = true, env = "CHANNELMESH_INSECURE")]
    pub insecure: bool,
    /// With --insecure: serve plaintext on non-loopback addresses too (anyone who reaches the
    /// port can drive the mesh).
    #[arg(long, global = true, env = "CHANNELMESH_INSECURE_ALLOW_REMOTE")]
    pub insecure_allow_remote: bool,
}

impl TlsArgs {
    /// The transport the flags ask for; `None` when they ask for none.
    pub fn transport(&self) -> Result<Option<Transport>, Error> {
        let files = (&self.tls_ca, &self.tls_cert, &self.tls_key);
        match (self.insecure, files) {
            (true, (None, None, None)) => Ok(Some(Transport::Insecure)),
            (true, _) => Err(Error::InsecureWithTls),
            (false, (None, None, None)) => Ok(None),
            (false, (Some(ca), Some(cert), Some(key))) => {
                Ok(Some(Transport::Mtls(Credentials::read(ca, cert, key)?)))
            }
            (false, _) => Err(Error::IncompleteTls),
        }
    }

    /// Whether TLS files were given.
    pub fn has_files(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some()
    }

    /// Refuses `--insecure` with a listen address off loopback, unless
    /// `--insecure-allow-remote` says the operator means it.
    pub fn check_listen(&self, addrs: &[SocketAddr]) -> Result<(), Error> {
        if !self.insecure || self.insecure_allow_remote {
            return Ok(());
        }
        match addrs.iter().find(|a| !a.ip().is_loopback()) {
            Some(addr) => Err(Error::InsecureRemote { addr: *addr }),
            None => Ok(()),
        }
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
        let switches = [
            ("--tls-require-client-cert", self.tls_require_client_cert),
            ("--insecure", self.insecure),
            ("--insecure-allow-remote", self.insecure_allow_remote),
        ];
        args.extend(
            switches
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(flag, _)| flag.to_string()),
        );
        args
    }
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
            ..TlsArgs::default()
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
        let insecure = TlsArgs {
            insecure: true,
            insecure_allow_remote: true,
            ..TlsArgs::default()
        };
        assert_eq!(
            insecure.to_args(),
            ["--insecure", "--insecure-allow-remote"]
        );
        assert!(TlsArgs::default().to_args().is_empty());
    }

    #[test]
    fn some_files_but_not_all_or_files_and_insecure_are_refused() {
        let args = TlsArgs {
            tls_ca: Some("ca.pem".into()),
            ..TlsArgs::default()
        };
        assert!(matches!(args.transport(), Err(Error::IncompleteTls)));
        let args = TlsArgs {
            tls_ca: Some("ca.pem".into()),
            insecure: true,
            ..TlsArgs::default()
        };
        assert!(matches!(args.transport(), Err(Error::InsecureWithTls)));
        assert!(matches!(TlsArgs::default().transport(), Ok(None)));
        let insecure = TlsArgs {
            insecure: true,
            ..TlsArgs::default()
        };
        assert!(matches!(
            insecure.transport(),
            Ok(Some(Transport::Insecure))
        ));
    }

    #[test]
    fn insecure_stays_on_loopback_unless_allowed() {
        let loopback: SocketAddr = "127.0.0.1:50050".parse().unwrap();
        let v6: SocketAddr = "[::1]:50050".parse().unwrap();
        let anywhere: SocketAddr = "0.0.0.0:50050".parse().unwrap();
        let insecure = TlsArgs {
            insecure: true,
            ..TlsArgs::default()
        };
        assert!(insecure.check_listen(&[loopback, v6]).is_ok());
        let refused = insecure.check_listen(&[loopback, anywhere]).unwrap_err();
        assert!(matches!(refused, Error::InsecureRemote { addr } if addr == anywhere));
        let allowed = TlsArgs {
            insecure_allow_remote: true,
            ..insecure
        };
        assert!(allowed.check_listen(&[anywhere]).is_ok());
        assert!(TlsArgs::default().check_listen(&[anywhere]).is_ok());
    }
}
