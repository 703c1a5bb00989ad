//! Who a peer is: the identities its certificate names, each a role and an id, written as a DNS
//! subject alternative name `<id>.<role>.channelmesh` (e.g. `cs-1.channel-server.channelmesh`).
//! A certificate may name several (the in-process `dev` mesh holds one naming every service of
//! the process); it also names the hosts others dial, which are not identities.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;

/// The domain every identity's name ends in.
pub const DOMAIN: &str = "channelmesh";

/// The longest id an identity may have (its name must stay a valid DNS name).
const MAX_ID_LEN: usize = 200;

/// What a service is, as far as the authorization table cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Gateway,
    ChannelServer,
    PresenceServer,
    Admin,
    RingManager,
    /// An SRE with `channelmesh ctl`.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::Gateway,
        Role::ChannelServer,
        Role::PresenceServer,
        Role::Admin,
        Role::RingManager,
        Role::Operator,
    ];

    /// Its name, as certificates and the authorization table write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::ChannelServer => "channel-server",
            Role::PresenceServer => "presence-server",
            Role::Admin => "admin",
            Role::RingManager => "ring-manager",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Role, IdentityError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| IdentityError::Role(s.to_string()))
    }
}

/// Why a role or an identity is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{0:?} is not a role: one of gateway, channel-server, presence-server, admin, ring-manager, operator"
    )]
    Role(String),
    #[error(
        "{0:?} cannot be named in a certificate: an id is 1 to 200 characters of dot-separated labels of letters, digits, '-' and '_'"
    )]
    Id(String),
    #[error("{0:?} is not ROLE/ID")]
    Spec(String),
}

/// One identity: a role and the id the service runs under (a ring node's id, a gateway's id,
/// an operator's name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub role: Role,
    pub id: String,
}

impl Identity {
    /// `id` in `role`; the id must fit in a DNS name.
    pub fn new(role: Role, id: &str) -> Result<Identity, IdentityError> {
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if id.is_empty() || id.len() > MAX_ID_LEN || !id.split('.').all(label_ok) {
            return Err(IdentityError::Id(id.to_string()));
        }
        Ok(Identity {
            role,
            id: id.to_string(),
        })
    }

    /// Its subject alternative name: `<id>.<role>.channelmesh`.
    pub fn san(&self) -> String {
        format!("{}.{}.{DOMAIN}", self.id, self.role)
    }

    /// The identity a DNS subject alternative name names, if it is one (`None` for a host
    /// name such as `cs-1` or `localhost`).
    pub fn from_san(name: &str) -> Option<Identity> {
        let split = name.len().checked_sub(DOMAIN.len() + 1)?;
        let (rest, domain) = name.split_at_checked(split)?;
        let domain = domain.strip_prefix('.')?;
        if !domain.eq_ignore_ascii_case(DOMAIN) {
            return None;
        }
        let (id, role) = rest.rsplit_once('.')?;
        Identity::new(role.parse().ok()?, id).ok()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.san())
    }
}

/// `ROLE/ID`, as `channelmesh certs` takes it.
impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Identity, IdentityError> {
        let (role, id) = s
            .split_once('/')
            .ok_or_else(|| IdentityError::Spec(s.to_string()))?;
        Identity::new(role.parse()?, id)
    }
}

/// The identities a certificate (DER) names; none if it does not parse.
pub fn identities_of(certificate: &CertificateDer<'_>) -> Vec<Identity> {
    let Ok(parsed) = webpki::EndEntityCert::try_from(certificate) else {
        return Vec::new();
    };
    let mut identities: Vec<Identity> = parsed
        .valid_dns_names()
        .filter_map(Identity::from_san)
        .collect();
    identities.sort();
    identities.dedup();
    identities
}

/// Who called: what the authorization layer puts into each request's extensions for the
/// handlers. Built from the peer's verified certificate (the TLS handshake already checked it
/// against the CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The process runs `--insecure`: no transport identity, and no check refuses anything.
    Unauthenticated,
    /// The identities the caller's certificate names (none when it names no channelmesh
    /// identity, or the peer sent no certificate).
    Identified(Vec<Identity>),
}

impl Caller {
    /// The caller presenting `certs` (the peer's chain, its own certificate first).
    pub fn from_peer_certs(certs: Option<&[CertificateDer<'_>]>) -> Caller {
        Caller::Identified(
            certs
                .and_then(|c| c.first())
                .map(identities_of)
                .unwrap_or_default(),
        )
    }

    /// Whether it has `role` (any id).
    pub fn has_role(&self, role: Role) -> bool {
        match self {
            Caller::Unauthenticated => true,
            Caller::Identified(ids) => ids.iter().any(|i| i.role == role),
        }
    }

    /// Whether it is `id` in one of `roles`: the "as itself" check.
    pub fn is(&self, roles: &[Role], id: &str) -> bool {
        match self {
            Caller::Unauthenticated => true,
            Caller::Identified(ids) => ids.iter().any(|i| roles.contains(&i.role) && i.id == id),
        }
    }

    /// Its roles, for a metric label: sorted, joined by `+`; `none` without any, `insecure`
    /// when unauthenticated.
    pub fn roles_label(&self) -> String {
        match self {
            Caller::Unauthenticated => "insecure".into(),
            Caller::Identified(ids) if ids.is_empty() => "none".into(),
            Caller::Identified(ids) => {
                let mut roles: Vec<&str> = ids.iter().map(|i| i.role.as_str()).collect();
                roles.sort_unstable();
                roles.dedup();
                roles.join("+")
            }
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unauthenticated => f.write_str("an unauthenticated caller (--insecure)"),
            Caller::Identified(ids) if ids.is_empty() => {
                f.write_str("a caller whose certificate names no channelmesh identity")
            }
            Caller::Identified(ids) => {
                let names: Vec<String> = ids.iter().map(Identity::san).collect();
                f.write_str(&names.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role, id: &str) -> Identity {
        Identity::new(role, id).unwrap()
    }

    #[test]
    fn an_identity_round_trips_through_its_name() {
        for identity in [
            id(Role::ChannelServer, "cs-1"),
            id(Role::Gateway, "us-east-1"),
            id(Role::Operator, "ops"),
            id(Role::Admin, "admin.eu_1"),
        ] {
            assert_eq!(Identity::from_san(&identity.san()), Some(identity));
        }
        assert_eq!(
            id(Role::PresenceServer, "ps-2").san(),
            "ps-2.presence-server.channelmesh"
        );
        assert_eq!(
            Identity::from_san("CS-1.Channel-Server.ChannelMesh"),
            Some(id(Role::ChannelServer, "CS-1"))
        );
    }

    #[test]
    fn host_names_and_strangers_are_no_identity() {
        for name in [
            "localhost",
            "cs-1",
            "channelmesh",
            ".channelmesh",
            "cs-1.channelmesh",
            "cs-1.wizard.channelmesh",
            "cs-1.channel-server.example.com",
            "cs-1.channel-serverchannelmesh",
            "..channel-server.channelmesh",
        ] {
            assert_eq!(Identity::from_san(name), None, "{name}");
        }
    }

    #[test]
    fn ids_must_fit_in_a_dns_name() {
        for bad in ["", "a b", "a:1", "a..b", ".a", "é", &"x".repeat(64)] {
            assert!(Identity::new(Role::Gateway, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            "channel-server/cs-1".parse::<Identity>(),
            Ok(id(Role::ChannelServer, "cs-1"))
        );
        assert_eq!(
            "cs-1".parse::<Identity>(),
            Err(IdentityError::Spec("cs-1".into()))
        );
        assert_eq!(
            "wizard/x".parse::<Identity>(),
            Err(IdentityError::Role("wizard".into()))
        );
    }

    #[test]
    fn a_caller_is_only_what_its_certificate_names() {
        let caller = Caller::Identified(vec![
            id(Role::ChannelServer, "cs-1"),
            id(Role::Gateway, "us-east-1"),
        ]);
        assert!(caller.has_role(Role::Gateway));
        assert!(!caller.has_role(Role::Operator));
        assert!(caller.is(&[Role::ChannelServer, Role::PresenceServer], "cs-1"));
        assert!(!caller.is(&[Role::ChannelServer], "cs-2"));
        assert!(!caller.is(&[Role::ChannelServer], "us-east-1"));
        assert_eq!(caller.roles_label(), "channel-server+gateway");
        assert_eq!(
            caller.to_string(),
            "cs-1.channel-server.channelmesh, us-east-1.gateway.channelmesh"
        );
        let nobody = Caller::from_peer_certs(None);
        assert!(!nobody.has_role(Role::Gateway));
        assert_eq!(nobody.roles_label(), "none");
        assert!(Caller::Unauthenticated.is(&[Role::Operator], "anyone"));
    }
}
