//! Minting client tokens, one way for MintToken and `channelmesh token` alike: HS256 with the
//! secret (at least 32 bytes), a fresh random `jti` on every token so that any token can be
//! revoked, and the configured `iss` and `aud` (docs/admin-api.md, "Client tokens").

use mesh_core::{Identity, IssuerAudience, TokenError, TokenKey};

/// A minted token and what revoking it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// The JWT.
    pub token: String,
    /// Its `jti`: 128 random bits, hex.
    pub jti: String,
    /// Its `exp`, Unix seconds: how long a revocation of it must last.
    pub expires_at: u64,
}

/// Signs client tokens with the HS256 secret.
#[derive(Debug, Clone)]
pub struct Minter {
    key: TokenKey,
}

impl Minter {
    /// Signs with `secret`, which is at least 32 bytes, and sets the `iss` and `aud` of
    /// `claims` that are set.
    pub fn new(secret: &[u8], claims: IssuerAudience) -> Result<Self, TokenError> {
        Ok(Minter {
            key: TokenKey::hs256(secret)?.expect(claims),
        })
    }

    /// A token for `identity`, whose `jti` is replaced by a fresh one, issued at `now_secs`.
    pub fn mint(&self, mut identity: Identity, now_secs: u64) -> Result<Minted, TokenError> {
        let jti = new_jti();
        identity.jti = Some(jti.clone());
        Ok(Minted {
            token: self.key.mint(&identity, now_secs)?,
            jti,
            expires_at: identity.expires_at,
        })
    }
}

/// A fresh token id: 128 random bits, hex.
fn new_jti() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use mesh_core::{ChannelId, TeamId, UserId};

    use super::*;

    const SECRET: &[u8] = b"admin-test-secret-of-32-bytes-ok";

    fn identity(jti: Option<&str>) -> Identity {
        Identity {
            user: UserId::new("U1").unwrap(),
            team: TeamId::new("T1").unwrap(),
            name: None,
            channels: vec![ChannelId::new("C1").unwrap()],
            expires_at: 4_000_000_000,
            jti: jti.map(str::to_string),
        }
    }

    #[test]
    fn every_token_gets_a_fresh_jti_it_carries() {
        let minter = Minter::new(SECRET, IssuerAudience::default()).unwrap();
        let key = TokenKey::hs256(SECRET).unwrap();
        let mut seen = std::collections::HashSet::new();
        for given in [None, Some("chosen"), None] {
            let minted = minter.mint(identity(given), 1).unwrap();
            assert_eq!(minted.jti.len(), 32);
            assert!(seen.insert(minted.jti.clone()), "a jti repeated");
            let verified = key.verify(&minted.token).unwrap();
            assert_eq!(verified.jti.as_deref(), Some(minted.jti.as_str()));
            assert_eq!(verified.expires_at, minted.expires_at);
        }
    }

    #[test]
    fn refuses_a_short_secret() {
        assert_eq!(
            Minter::new(b"devsecret", IssuerAudience::default()).unwrap_err(),
            TokenError::ShortSecret(9)
        );
    }

    #[test]
    fn sets_the_configured_issuer_and_audience() {
        let claims = IssuerAudience::new(Some("webapp".into()), Some("channelmesh".into()));
        let minted = Minter::new(SECRET, claims.clone())
            .unwrap()
            .mint(identity(None), 1)
            .unwrap();
        let strict = TokenKey::hs256(SECRET).unwrap().expect(claims);
        assert!(strict.verify(&minted.token).is_ok());
        let unconfigured = Minter::new(SECRET, IssuerAudience::default()).unwrap();
        let plain = unconfigured.mint(identity(None), 1).unwrap();
        assert!(strict.verify(&plain.token).is_err());
    }
}
