//! Which client tokens a gateway accepts: the HS256 secret and/or public keys (PEM files, a
//! JWKS file), read once at start-up into a [`Verifier`], with the `iss`/`aud` they must carry
//! when configured.

use std::path::PathBuf;

use mesh_core::IssuerAudience;
use mesh_core::token::{LEEWAY_SECS, Verifier};

/// Token keys beyond the HS256 secret, the clock-skew leeway, and the required `iss`/`aud`.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// PEM files of RS256 (RSA) or EdDSA (Ed25519) public keys; the algorithm follows the key
    /// type (`--jwt-public-key`, repeatable).
    pub public_keys: Vec<PathBuf>,
    /// A JWKS file (`{"keys":[...]}`) of public keys, selected by `kid` (`--jwks`).
    pub jwks: Option<PathBuf>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (`--jwt-leeway-secs`).
    pub leeway_secs: u64,
    /// The `iss` and `aud` every token must carry, when set (`--jwt-issuer`,
    /// `--jwt-audience`); unset, neither is checked.
    pub claims: IssuerAudience,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            public_keys: Vec::new(),
            jwks: None,
            leeway_secs: LEEWAY_SECS,
            claims: IssuerAudience::default(),
        }
    }
}

/// Why the token keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenConfigError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] mesh_core::TokenError),
    #[error("no token key: give the HS256 secret, --jwt-public-key or --jwks")]
    NoKey,
}

/// The verifier for `secret` (empty: none; else at least 32 bytes) and `config`'s key files.
pub fn load(secret: &[u8], config: &TokenConfig) -> Result<Verifier, TokenConfigError> {
    let mut verifier = Verifier::new(config.leeway_secs)?.expect(config.claims.clone());
    if !secret.is_empty() {
        verifier.add_hs256(secret)?;
    }
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|error| TokenConfigError::Read {
            path: path.clone(),
            error,
        })
    };
    for path in &config.public_keys {
        let alg = verifier.add_public_key_pem(&read(path)?, &path.display().to_string())?;
        tracing::info!(path = %path.display(), ?alg, "accepting tokens signed by a public key");
    }
    if let Some(path) = &config.jwks {
        let n = verifier.add_jwks(&read(path)?, &path.display().to_string())?;
        tracing::info!(path = %path.display(), keys = n, "accepting tokens signed by JWKS keys");
    }
    if verifier.is_empty() {
        return Err(TokenConfigError::NoKey);
    }
    if let Some(issuer) = &config.claims.issuer {
        tracing::info!(%issuer, "tokens must carry this iss");
    }
    if let Some(audience) = &config.claims.audience {
        tracing::info!(%audience, "tokens must carry this aud");
    }
    Ok(verifier)
}

#[cfg(test)]
mod tests {
    use mesh_core::TokenError;

    use super::*;

    #[test]
    fn a_short_secret_is_refused_and_an_empty_one_is_none() {
        let error = load(b"devsecret", &TokenConfig::default()).unwrap_err();
        assert!(matches!(
            error,
            TokenConfigError::Key(TokenError::ShortSecret(9))
        ));
        assert!(matches!(
            load(b"", &TokenConfig::default()),
            Err(TokenConfigError::NoKey)
        ));
        assert!(load(&[7; 32], &TokenConfig::default()).is_ok());
    }

    #[test]
    fn the_verifier_requires_the_configured_claims() {
        let claims = IssuerAudience::new(Some("webapp".into()), Some("channelmesh".into()));
        let config = TokenConfig {
            claims: claims.clone(),
            ..TokenConfig::default()
        };
        assert_eq!(load(&[7; 32], &config).unwrap().expected(), &claims);
    }
}
