//! Client tokens: HS256 JWTs the web application signs and every gateway checks locally.
//!
//! Claims: `sub` (user id), `team`, `channels` (channel ids the holder may read and post to),
//! `exp` (Unix seconds), optional `name` and `iat`.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::{ChannelId, TeamId, UserId};

/// How many channels one token may list.
pub const MAX_TOKEN_CHANNELS: usize = 10_000;

/// Clock skew tolerated when checking `exp`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token has expired")]
    Expired,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("token could not be signed: {0}")]
    Signing(String),
}

/// A verified token holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub team: TeamId,
    /// Display name; the user id when the token has none.
    pub name: Option<String>,
    /// The channels of the token (not counting the user's and team's own channels).
    pub channels: Vec<ChannelId>,
    /// Unix seconds.
    pub expires_at: u64,
}

impl Identity {
    /// Every channel a connection of this identity receives: its user's own channel, its team's
    /// channel, then the token's channels, without repeats.
    pub fn all_channels(&self) -> Vec<ChannelId> {
        let mut all = vec![ChannelId::from(&self.user), ChannelId::from(&self.team)];
        for c in &self.channels {
            if !all.contains(c) {
                all.push(c.clone());
            }
        }
        all
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    team: String,
    #[serde(default)]
    channels: Vec<String>,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Signs and checks tokens with one HS256 secret.
#[derive(Clone)]
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(HS256, <secret>)")
    }
}

impl TokenKey {
    /// A key for HS256 with `secret`.
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        TokenKey {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Checks the signature, expiry and claims of `token`.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => {
                    TokenError::InvalidClaims(e.to_string())
                }
                _ => TokenError::Malformed(e.to_string()),
            })?;
        let claims = data.claims;
        let bad = |e: crate::IdError| TokenError::InvalidClaims(e.to_string());
        if claims.channels.len() > MAX_TOKEN_CHANNELS {
            return Err(TokenError::InvalidClaims(format!(
                "more than {MAX_TOKEN_CHANNELS} channels"
            )));
        }
        Ok(Identity {
            user: UserId::new(&claims.sub).map_err(bad)?,
            team: TeamId::new(&claims.team).map_err(bad)?,
            name: claims.name,
            channels: claims
                .channels
                .iter()
                .map(|c| ChannelId::new(c))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            expires_at: claims.exp,
        })
    }

    /// Signs a token for `identity` (valid until `identity.expires_at`), issued at `now_secs`.
    pub fn mint(&self, identity: &Identity, now_secs: u64) -> Result<String, TokenError> {
        let claims = Claims {
            sub: identity.user.to_string(),
            team: identity.team.to_string(),
            channels: identity.channels.iter().map(|c| c.to_string()).collect(),
            exp: identity.expires_at,
            name: identity.name.clone(),
            iat: Some(now_secs),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn identity(exp: u64) -> Identity {
        Identity {
            user: UserId::new("U1").unwrap(),
            team: TeamId::new("T1").unwrap(),
            name: Some("ann".into()),
            channels: vec![ChannelId::new("C1").unwrap()],
            expires_at: exp,
        }
    }

    #[test]
    fn round_trips() {
        let key = TokenKey::hs256(b"secret");
        let token = key.mint(&identity(now() + 60), now()).unwrap();
        assert_eq!(key.verify(&token).unwrap(), identity(now() + 60));
    }

    #[test]
    fn refuses_expired_wrong_secret_and_garbage() {
        let key = TokenKey::hs256(b"secret");
        let expired = key.mint(&identity(now() - 3600), now() - 7200).unwrap();
        assert_eq!(key.verify(&expired), Err(TokenError::Expired));
        let other = TokenKey::hs256(b"other")
            .mint(&identity(now() + 60), now())
            .unwrap();
        assert_eq!(key.verify(&other), Err(TokenError::BadSignature));
        assert!(matches!(
            key.verify("garbage"),
            Err(TokenError::Malformed(_))
        ));
        assert!(key.verify("").is_err());
    }

    #[test]
    fn lists_own_and_team_channels_first() {
        let mut id = identity(0);
        id.channels.push(ChannelId::new("U1").unwrap());
        let all: Vec<String> = id.all_channels().iter().map(|c| c.to_string()).collect();
        assert_eq!(all, ["U1", "T1", "C1"]);
    }
}
