//! Certificates for the mesh's mutual TLS: a CA ([`Authority`]) and the certificates it issues,
//! each naming one or more identities (`<id>.<role>.channelmesh`) and the hosts others dial,
//! usable as server and as client. `dev` makes a throwaway CA per run;
//! `channelmesh certs` ([`run`]) makes or reuses one in a directory and issues certificates
//! for a deployment (docker-compose.yml runs it once, into a shared volume).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_transport::{Credentials, Identity, Role, Transport};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The CA's certificate in a directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key in a directory (mode 0600).
pub const CA_KEY: &str = "ca.key";
/// How long a CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issued certificate is valid, by default.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// How far back an issued certificate is valid from, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// The CA's name. Fixed, so that a CA is rebuilt from its key alone ([`Authority::load`]).
const CA_NAME: &str = "channelmesh CA";
/// The operator identity `dev` and the test kit issue for `ctl`.
pub const DEV_OPERATOR: &str = "ops";

/// A certificate authority: its certificate and key, and the identities and hosts it named in
/// this process's certificate (see [`Authority::configure_process`]).
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    process: Mutex<(BTreeSet<Identity>, BTreeSet<String>)>,
}

impl std::fmt::Debug for Authority {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// The CA's parameters: everything but its validity is fixed, so that [`Authority::load`]
/// rebuilds the same issuer from the key.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "channelmesh");
    params
}

/// `now - BACKDATE` to `now + valid`.
fn validity(params: &mut CertificateParams, valid: Duration) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::try_from(valid)?;
    Ok(())
}

impl Authority {
    /// A new CA, valid for ten years.
    pub fn generate() -> anyhow::Result<Authority> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = ca_params();
        validity(&mut params, CA_VALIDITY)?;
        let cert = params.self_signed(&key).context("signing the CA")?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(ca_params(), key),
            process: Mutex::default(),
        })
    }

    /// The throwaway CA of this process, made on first use: `dev`'s, and the test kit's (one
    /// per test process, so that every mesh of the process shares its transport).
    pub fn for_this_process() -> anyhow::Result<&'static Authority> {
        static PROCESS: OnceLock<Authority> = OnceLock::new();
        if let Some(ca) = PROCESS.get() {
            return Ok(ca);
        }
        let ca = Authority::generate()?;
        Ok(PROCESS.get_or_init(|| ca))
    }

    /// The CA in `dir` (`ca.pem`, `ca.key`), as [`Authority::save`] wrote it.
    pub fn load(dir: &Path) -> anyhow::Result<Authority> {
        let cert_pem = fs::read_to_string(dir.join(CA_CERT))
            .with_context(|| format!("reading {}", dir.join(CA_CERT).display()))?;
        let key_pem = fs::read_to_string(dir.join(CA_KEY))
            .with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?;
        let key = KeyPair::from_pem(&key_pem).context("the CA key")?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("the CA certificate: {e}"))?;
        // The certificate's public key is the key's: its bytes appear in the certificate.
        let public = key.public_key_raw();
        if !cert.windows(public.len()).any(|w| w == public) {
            bail!(
                "{} is not the key of {}",
                dir.join(CA_KEY).display(),
                dir.join(CA_CERT).display()
            );
        }
        Ok(Authority {
            issuer: Issuer::new(ca_params(), key),
            cert_pem,
            key_pem,
            process: Mutex::default(),
        })
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        write(&dir.join(CA_CERT), self.cert_pem.as_bytes(), 0o644)?;
        write(&dir.join(CA_KEY), self.key_pem.as_bytes(), 0o600)
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate naming `identities` and `hosts` (IP addresses or DNS names), usable as
    /// server and as client, valid for `valid`, with its key.
    pub fn issue(
        &self,
        identities: &[Identity],
        hosts: &[String],
        valid: Duration,
    ) -> anyhow::Result<Credentials> {
        let Some(first) = identities.first() else {
            bail!("a certificate names at least one identity");
        };
        let names: Vec<String> = identities
            .iter()
            .map(Identity::san)
            .chain(hosts.iter().cloned())
            .collect();
        let mut params = CertificateParams::new(names).context("the certificate's names")?;
        params
            .distinguished_name
            .push(DnType::CommonName, first.san());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, valid)?;
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the certificate")?;
        Ok(Credentials {
            ca: self.cert_pem.clone().into_bytes(),
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
        })
    }

    /// The operator credential `ctl` uses against a mesh of this CA.
    pub fn operator(&self) -> anyhow::Result<Credentials> {
        let ops = Identity::new(Role::Operator, DEV_OPERATOR)?;
        self.issue(&[ops], &[], days(DEFAULT_VALIDITY_DAYS))
    }

    /// Makes this process speak mutual TLS with a certificate naming `identities` and `hosts`
    /// (and every identity and host this authority named for the process before, so that
    /// several in-process meshes can share it). A process whose transport another CA
    /// configured, or `--insecure`, is refused.
    pub fn configure_process(
        &self,
        identities: &[Identity],
        hosts: &[String],
    ) -> anyhow::Result<()> {
        let mut named = self.process.lock().unwrap_or_else(|e| e.into_inner());
        named.0.extend(identities.iter().cloned());
        named.1.extend(hosts.iter().cloned());
        let all: Vec<Identity> = named.0.iter().cloned().collect();
        let hosts: Vec<String> = named.1.iter().cloned().collect();
        let credentials = self.issue(&all, &hosts, days(DEFAULT_VALIDITY_DAYS))?;
        mesh_transport::configure(Transport::Mtls(credentials))?;
        Ok(())
    }
}

/// `n` days.
pub fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 24 * 3600)
}

/// Writes `bytes` to `path` with `mode`, replacing what was there.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `credentials` as `dir/NAME.pem` and `dir/NAME.key` (mode 0600); returns their paths.
pub fn save_credentials(
    dir: &Path,
    name: &str,
    credentials: &Credentials,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    write(&cert, &credentials.cert, 0o644)?;
    write(&key, &credentials.key, 0o600)?;
    Ok((cert, key))
}

/// One certificate to issue: `ROLE/ID`, or `ROLE/ID=HOST,HOST` with the hosts others dial it
/// at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub identity: Identity,
    pub hosts: Vec<String>,
}

impl FromStr for Spec {
    type Err = String;

    fn from_str(s: &str) -> Result<Spec, String> {
        let (identity, hosts) = s.split_once('=').unwrap_or((s, ""));
        Ok(Spec {
            identity: identity.parse().map_err(|e| format!("{e}"))?,
            hosts: hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

/// The `certs` command's flags.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Where the CA is (`ca.pem`, `ca.key`; made there if absent) and where each certificate
    /// is written, as ID.pem and ID.key.
    #[arg(long, env = "CHANNELMESH_CERTS_DIR")]
    dir: PathBuf,
    /// How long each certificate is valid, in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    days: u32,
    /// The certificates to issue: ROLE/ID, or ROLE/ID=HOST,HOST with the names or addresses
    /// others dial the service at. ROLE is gateway, channel-server, presence-server, admin,
    /// ring-manager or operator; e.g. channel-server/cs-1=cs-1 gateway/us-east-1 operator/ops.
    specs: Vec<Spec>,
}

/// `channelmesh certs`: makes the CA in `--dir` unless one is there, then issues every
/// certificate asked for from it.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let authority = if args.dir.join(CA_KEY).exists() {
        let authority = Authority::load(&args.dir)?;
        println!("using the CA in {}", args.dir.join(CA_CERT).display());
        authority
    } else {
        let authority = Authority::generate()?;
        authority.save(&args.dir)?;
        println!("made a CA: {}", args.dir.join(CA_CERT).display());
        authority
    };
    let mut ids = BTreeSet::new();
    for spec in &args.specs {
        if !ids.insert(spec.identity.id.as_str()) {
            bail!(
                "{} is asked for twice (files are named by id)",
                spec.identity.id
            );
        }
    }
    for spec in &args.specs {
        let credentials = authority.issue(
            std::slice::from_ref(&spec.identity),
            &spec.hosts,
            days(args.days),
        )?;
        let (cert, _) = save_credentials(&args.dir, &spec.identity.id, &credentials)?;
        let hosts = if spec.hosts.is_empty() {
            String::new()
        } else {
            format!(" (hosts {})", spec.hosts.join(", "))
        };
        println!("issued {} for {}{hosts}", cert.display(), spec.identity);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_is_an_identity_and_its_hosts() {
        let spec: Spec = "channel-server/cs-1=cs-1,10.0.0.5".parse().unwrap();
        assert_eq!(
            spec.identity,
            Identity::new(Role::ChannelServer, "cs-1").unwrap()
        );
        assert_eq!(spec.hosts, ["cs-1", "10.0.0.5"]);
        let bare: Spec = "operator/ops".parse().unwrap();
        assert!(bare.hosts.is_empty());
        assert!("cs-1".parse::<Spec>().is_err());
        assert!("wizard/cs-1".parse::<Spec>().is_err());
    }

    #[test]
    fn an_issued_certificate_names_its_identities_and_a_saved_ca_issues_the_same_way() {
        let dir =
            std::env::temp_dir().join(format!("channelmesh-certs-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let ca = Authority::generate().unwrap();
        ca.save(&dir).unwrap();
        // In the order identities_of gives them (sorted by role, then id).
        let ids = [
            Identity::new(Role::Gateway, "us-east-1").unwrap(),
            Identity::new(Role::ChannelServer, "cs-1").unwrap(),
        ];
        let issued = ca.issue(&ids, &["127.0.0.1".into()], days(1)).unwrap();
        assert_eq!(issued.identities().unwrap(), ids);
        let loaded = Authority::load(&dir).unwrap();
        assert_eq!(loaded.ca_pem(), ca.ca_pem());
        let again = loaded.issue(&ids[..1], &[], days(1)).unwrap();
        assert_eq!(again.identities().unwrap(), ids[..1]);
        // Another CA's key does not pass for this one's.
        let other = Authority::generate().unwrap();
        write(&dir.join(CA_KEY), other.key_pem.as_bytes(), 0o600).unwrap();
        assert!(Authority::load(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
