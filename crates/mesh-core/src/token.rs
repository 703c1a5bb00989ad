//! Client tokens: JWTs the web application signs and every gateway checks locally.
//!
//! Claims: `sub` (user id), `team`, `channels` (channel ids the holder may read and post to),
//! `exp` (Unix seconds), optional `name`, `iat`, `nbf`, `jti` (the id a revocation names) and
//! `team_max_connections` (the team's connection cap, as the web app sets it: [`Verified`]).
//!
//! A [`Verifier`] holds every key a gateway accepts: the HS256 secret, RS256/EdDSA public keys
//! (PEM) and keys from a JWKS document. Each key verifies only the algorithm it is for, so an
//! RS256 public key never checks an HS256 token (algorithm confusion), and `alg: none` does not
//! parse at all. [`TokenKey`] signs HS256 tokens (the dev mesh, `channelmesh token`, MintToken).
//! An HS256 secret is at least [`MIN_HS256_SECRET_BYTES`] long, or no key is made of it.
//!
//! Optionally a deployment names its tokens' issuer and audience ([`IssuerAudience`]): a
//! verifier then requires `iss` and `aud` to match, and a [`TokenKey`] sets them on every token
//! it mints. Unset, neither is checked (a token may carry them or not).
//! This crate does no I/O: callers read key files and hand over their bytes.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::{ChannelId, TeamId, UserId};

/// How many channels one token may list.
pub const MAX_TOKEN_CHANNELS: usize = 10_000;

/// Clock skew tolerated when checking `exp` and `nbf`, in seconds, by default.
pub const LEEWAY_SECS: u64 = 30;

/// The largest leeway a verifier accepts: more would make expiry meaningless.
pub const MAX_LEEWAY_SECS: u64 = 86_400;

/// The longest token accepted, in bytes; a longer one is refused before it is decoded. Room for
/// [`MAX_TOKEN_CHANNELS`] channels.
pub const MAX_TOKEN_BYTES: usize = 512 * 1024;

/// The longest `jti` accepted, in bytes.
pub const MAX_JTI_BYTES: usize = 256;

/// The most keys one JWKS document may hold: each token without a `kid` may be tried on all.
pub const MAX_JWKS_KEYS: usize = 64;

/// The shortest HS256 secret accepted, in bytes: HMAC-SHA256's output size (RFC 7518, 3.2).
/// A shorter secret can be brute-forced offline from any one token.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Why a token was refused, or a key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("no key verifies {0} tokens")]
    NoKey(String),
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("token could not be signed: {0}")]
    Signing(String),
    #[error("key {origin}: {reason}")]
    Key { origin: String, reason: String },
    /// An HS256 secret shorter than [`MIN_HS256_SECRET_BYTES`] (its length in bytes).
    #[error(
        "the HS256 secret is {0} bytes; it must be at least {MIN_HS256_SECRET_BYTES} bytes (e.g. 32 random bytes as 64 hex digits)"
    )]
    ShortSecret(usize),
}

/// Refuses an HS256 secret shorter than [`MIN_HS256_SECRET_BYTES`].
pub fn check_hs256_secret(secret: &[u8]) -> Result<(), TokenError> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(TokenError::ShortSecret(secret.len()));
    }
    Ok(())
}

/// The issuer (`iss`) and audience (`aud`) a deployment's tokens carry, each optional. A
/// verifier requires each one set (a token without it, or with another value, is refused); a
/// [`TokenKey`] writes each one set into every token it mints. Unset, the claim is neither
/// required nor checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssuerAudience {
    /// The `iss` every token must carry, e.g. `https://chat.example.com`.
    pub issuer: Option<String>,
    /// A value the token's `aud` (a string, or an array of them) must hold, e.g.
    /// `channelmesh`.
    pub audience: Option<String>,
}

impl IssuerAudience {
    /// `issuer` and `audience`, each ignored when empty.
    pub fn new(issuer: Option<String>, audience: Option<String>) -> Self {
        IssuerAudience {
            issuer: issuer.filter(|i| !i.is_empty()),
            audience: audience.filter(|a| !a.is_empty()),
        }
    }

    /// Makes `validation` require and check the claims that are set.
    fn apply(&self, validation: &mut Validation) {
        let mut required = vec!["exp", "sub"];
        validation.iss = None;
        validation.aud = None;
        // A token's `aud` is ignored unless an audience is configured.
        validation.validate_aud = false;
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
            validation.validate_aud = true;
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
    }
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
    /// The token's id (`jti`), which a revocation names; tokens without one cannot be revoked.
    pub jti: Option<String>,
}

/// A verified token: its holder, and the claims that are not about who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub identity: Identity,
    /// `team_max_connections`: the holder's team's connection cap as the web app states it
    /// (0 or absent: none). The gateway applies the smallest of it and its own.
    pub team_max_connections: Option<u32>,
}

impl Identity {
    /// Every channel a connection of this identity receives: its user's own channel, its team's
    /// channel, then the token's channels, without repeats.
    pub fn all_channels(&self) -> Vec<ChannelId> {
        let mut all = Vec::with_capacity(self.channels.len() + 2);
        // A set, not `Vec::contains`: a token (or a boot answer) may name 10,000 channels.
        let mut seen = std::collections::HashSet::with_capacity(all.capacity());
        let own = [ChannelId::from(&self.user), ChannelId::from(&self.team)];
        for c in own.iter().chain(&self.channels) {
            if seen.insert(c) {
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    team_max_connections: Option<u32>,
    /// Only written: `jsonwebtoken` checks `iss` and `aud` on the raw claims.
    #[serde(default, skip_serializing_if = "Option::is_none", skip_deserializing)]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", skip_deserializing)]
    aud: Option<String>,
}

impl Claims {
    fn into_verified(self) -> Result<Verified, TokenError> {
        let team_max_connections = self.team_max_connections.filter(|&n| n > 0);
        Ok(Verified {
            identity: self.into_identity()?,
            team_max_connections,
        })
    }

    fn into_identity(self) -> Result<Identity, TokenError> {
        let bad = |e: crate::IdError| TokenError::InvalidClaims(e.to_string());
        if self.channels.len() > MAX_TOKEN_CHANNELS {
            return Err(TokenError::InvalidClaims(format!(
                "more than {MAX_TOKEN_CHANNELS} channels"
            )));
        }
        if self.jti.as_ref().is_some_and(|j| j.len() > MAX_JTI_BYTES) {
            return Err(TokenError::InvalidClaims(format!(
                "jti longer than {MAX_JTI_BYTES} bytes"
            )));
        }
        Ok(Identity {
            user: UserId::new(&self.sub).map_err(bad)?,
            team: TeamId::new(&self.team).map_err(bad)?,
            name: self.name,
            channels: self
                .channels
                .iter()
                .map(|c| ChannelId::new(c))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            expires_at: self.exp,
            jti: self.jti.filter(|j| !j.is_empty()),
        })
    }
}

/// One key a verifier accepts, for exactly one algorithm.
#[derive(Clone)]
struct VerifyKey {
    /// The JWKS `kid`; PEM keys and the HS256 secret have none.
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
    /// Where it came from, for logs: "HS256 secret", a file name, "jwks kid rsa-1".
    origin: String,
}

/// Checks client tokens against every key a gateway accepts, with a clock-skew leeway.
///
/// Key selection: a token's `alg` picks keys for that algorithm only; a token with a `kid` is
/// tried on the key of that `kid` and on keys without one (PEM files, the secret); a token
/// without a `kid` is tried on every key of its algorithm.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<VerifyKey>,
    leeway_secs: u64,
    /// The `iss` and `aud` every token must carry, when set.
    expected: IssuerAudience,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("{:?} {}", k.alg, k.origin))
            .collect();
        f.debug_struct("Verifier")
            .field("keys", &keys)
            .field("leeway_secs", &self.leeway_secs)
            .field("expected", &self.expected)
            .finish()
    }
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            keys: Vec::new(),
            leeway_secs: LEEWAY_SECS,
            expected: IssuerAudience::default(),
        }
    }
}

fn key_error(origin: &str, reason: impl std::fmt::Display) -> TokenError {
    TokenError::Key {
        origin: origin.to_string(),
        reason: reason.to_string(),
    }
}

impl Verifier {
    /// A verifier with no keys yet, tolerating `leeway_secs` of clock skew (at most
    /// [`MAX_LEEWAY_SECS`]).
    pub fn new(leeway_secs: u64) -> Result<Self, TokenError> {
        if leeway_secs > MAX_LEEWAY_SECS {
            return Err(key_error(
                "leeway",
                format!("{leeway_secs} s is more than the {MAX_LEEWAY_SECS} s allowed"),
            ));
        }
        Ok(Verifier {
            keys: Vec::new(),
            leeway_secs,
            expected: IssuerAudience::default(),
        })
    }

    /// Requires every token, whatever its key, to carry the `iss` and `aud` `expected` sets.
    pub fn expect(mut self, expected: IssuerAudience) -> Self {
        for key in &mut self.keys {
            expected.apply(&mut key.validation);
        }
        self.expected = expected;
        self
    }

    /// The `iss` and `aud` every token must carry.
    pub fn expected(&self) -> &IssuerAudience {
        &self.expected
    }

    /// The clock skew tolerated, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Whether no key was added: such a verifier refuses every token.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    fn push(&mut self, kid: Option<String>, alg: Algorithm, key: DecodingKey, origin: String) {
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        self.expected.apply(&mut validation);
        self.keys.push(VerifyKey {
            kid,
            alg,
            key,
            validation,
            origin,
        });
    }

    /// Accepts HS256 tokens signed with `secret`, which is at least [`MIN_HS256_SECRET_BYTES`]
    /// long.
    pub fn add_hs256(&mut self, secret: &[u8]) -> Result<(), TokenError> {
        check_hs256_secret(secret)?;
        self.push(
            None,
            Algorithm::HS256,
            DecodingKey::from_secret(secret),
            "HS256 secret".into(),
        );
        Ok(())
    }

    /// Accepts tokens signed by the private half of the PEM public key `pem` (`-----BEGIN
    /// PUBLIC KEY-----`, or `RSA PUBLIC KEY`): RS256 for an RSA key, EdDSA for an Ed25519 key.
    /// `origin` names it in errors and logs (e.g. the file name). Returns the algorithm.
    pub fn add_public_key_pem(
        &mut self,
        pem: &[u8],
        origin: &str,
    ) -> Result<Algorithm, TokenError> {
        let text = std::str::from_utf8(pem).map_err(|_| key_error(origin, "not PEM text"))?;
        if text.contains("PRIVATE KEY") {
            // The gateway must never need a signing key; refuse rather than guess.
            return Err(key_error(origin, "a private key; give the public key"));
        }
        let (alg, key) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            (Algorithm::RS256, key)
        } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            (Algorithm::EdDSA, key)
        } else {
            return Err(key_error(
                origin,
                "not an RSA or Ed25519 public key in PEM (BEGIN PUBLIC KEY)",
            ));
        };
        self.push(None, alg, key, origin.to_string());
        Ok(alg)
    }

    /// Accepts tokens signed by the keys of the JWKS document `json` (`{"keys":[...]}`): RSA
    /// keys (RS256, or the key's own `alg` of the RSA family), Ed25519 keys (EdDSA) and P-256 /
    /// P-384 keys (ES256 / ES384). Symmetric (`oct`) keys are refused: a JWKS file holds
    /// public keys. Returns how many keys were added.
    pub fn add_jwks(&mut self, json: &[u8], origin: &str) -> Result<usize, TokenError> {
        let set: JwkSet = serde_json::from_slice(json)
            .map_err(|e| key_error(origin, format!("not JWKS: {e}")))?;
        if set.keys.len() > MAX_JWKS_KEYS {
            return Err(key_error(
                origin,
                format!("{} keys; at most {MAX_JWKS_KEYS}", set.keys.len()),
            ));
        }
        let mut added = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let kid = jwk.common.key_id.clone();
            let name = match &kid {
                Some(kid) => format!("{origin} kid {kid}"),
                None => format!("{origin} key #{i}"),
            };
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    AlgorithmFamily::Ed
                }
                AlgorithmParameters::EllipticCurve(p)
                    if matches!(p.curve, EllipticCurve::P256 | EllipticCurve::P384) =>
                {
                    AlgorithmFamily::Ec
                }
                _ => {
                    return Err(key_error(
                        &name,
                        "not an RSA, Ed25519, P-256 or P-384 public key",
                    ));
                }
            };
            let default = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                    Algorithm::ES384
                }
                _ => match family {
                    AlgorithmFamily::Rsa => Algorithm::RS256,
                    AlgorithmFamily::Ec => Algorithm::ES256,
                    _ => Algorithm::EdDSA,
                },
            };
            let alg = match jwk.common.key_algorithm {
                None => default,
                Some(declared) => match Algorithm::try_from(declared) {
                    Ok(alg) if family.algorithms().contains(&alg) => alg,
                    _ => {
                        return Err(key_error(
                            &name,
                            format!("alg {declared} does not fit the key type"),
                        ));
                    }
                },
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| key_error(&name, e))?;
            added.push((kid, alg, key, name));
        }
        let n = added.len();
        for (kid, alg, key, name) in added {
            self.push(kid, alg, key, name);
        }
        Ok(n)
    }

    /// Checks the signature, expiry and claims of `token`.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        self.verify_claims(token).map(|v| v.identity)
    }

    /// [`Verifier::verify`], with the claims beyond the identity.
    pub fn verify_claims(&self, token: &str) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let candidates = self.keys.iter().filter(|k| {
            k.alg == header.alg
                && match (&header.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        });
        let mut last = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation) {
                Ok(data) => return data.claims.into_verified(),
                Err(e) => match e.kind() {
                    // Another key may verify it.
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidKeyFormat
                    | ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidEcdsaKey => last = Some(TokenError::BadSignature),
                    // The signature verified (claims are checked after it): the answer is final.
                    _ => return Err(classify(&e)),
                },
            }
        }
        Err(last.unwrap_or_else(|| {
            let kid = header
                .kid
                .map(|k| format!(" with kid {:?}", truncate(&k)))
                .unwrap_or_default();
            TokenError::NoKey(format!("{:?}{kid}", header.alg))
        }))
    }
}

/// The first 64 bytes of `s` (at a character boundary), for error messages.
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn classify(e: &jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidIssuer => {
            TokenError::InvalidClaims("iss is not the expected issuer".into())
        }
        ErrorKind::InvalidAudience => {
            TokenError::InvalidClaims("aud does not name the expected audience".into())
        }
        ErrorKind::Json(_)
        | ErrorKind::MissingRequiredClaim(_)
        | ErrorKind::InvalidClaimFormat(_) => TokenError::InvalidClaims(e.to_string()),
        _ => TokenError::Malformed(e.to_string()),
    }
}

/// Signs and checks tokens with one HS256 secret, setting (and requiring) the configured `iss`
/// and `aud`.
#[derive(Clone)]
pub struct TokenKey {
    encoding: EncodingKey,
    verifier: Verifier,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(HS256, <secret>)")
    }
}

impl TokenKey {
    /// A key for HS256 with `secret`, which is at least [`MIN_HS256_SECRET_BYTES`] long.
    pub fn hs256(secret: &[u8]) -> Result<Self, TokenError> {
        let mut verifier = Verifier::default();
        verifier.add_hs256(secret)?;
        Ok(TokenKey {
            encoding: EncodingKey::from_secret(secret),
            verifier,
        })
    }

    /// Sets the `iss` and `aud` of `expected` on every token minted, and requires them of every
    /// token verified.
    pub fn expect(mut self, expected: IssuerAudience) -> Self {
        self.verifier = self.verifier.expect(expected);
        self
    }

    /// Checks the signature, expiry and claims of `token`.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        self.verifier.verify(token)
    }

    /// Signs a token for `identity` (valid until `identity.expires_at`), issued at `now_secs`,
    /// with the configured `iss` and `aud`.
    pub fn mint(&self, identity: &Identity, now_secs: u64) -> Result<String, TokenError> {
        mint_for(
            &Header::new(Algorithm::HS256),
            &self.encoding,
            identity,
            self.verifier.expected(),
            now_secs,
        )
    }
}

/// Signs a token for `identity` with any key and header, without `iss` or `aud` (tests and
/// tools sign RS256/EdDSA tokens with it; the mesh itself signs only HS256).
pub fn mint_with(
    header: &Header,
    key: &EncodingKey,
    identity: &Identity,
    now_secs: u64,
) -> Result<String, TokenError> {
    mint_for(header, key, identity, &IssuerAudience::default(), now_secs)
}

/// [`mint_with`], with the `iss` and `aud` `claims` sets.
pub fn mint_for(
    header: &Header,
    key: &EncodingKey,
    identity: &Identity,
    claims: &IssuerAudience,
    now_secs: u64,
) -> Result<String, TokenError> {
    mint_capped(header, key, identity, claims, None, now_secs)
}

/// [`mint_for`], with the `team_max_connections` claim when `team_max_connections` is set.
pub fn mint_capped(
    header: &Header,
    key: &EncodingKey,
    identity: &Identity,
    claims: &IssuerAudience,
    team_max_connections: Option<u32>,
    now_secs: u64,
) -> Result<String, TokenError> {
    let (iss, aud) = (claims.issuer.clone(), claims.audience.clone());
    let claims = Claims {
        sub: identity.user.to_string(),
        team: identity.team.to_string(),
        channels: identity.channels.iter().map(|c| c.to_string()).collect(),
        exp: identity.expires_at,
        name: identity.name.clone(),
        iat: Some(now_secs),
        jti: identity.jti.clone(),
        team_max_connections,
        iss,
        aud,
    };
    jsonwebtoken::encode(header, &claims, key).map_err(|e| TokenError::Signing(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret of the shortest length accepted.
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER: &[u8] = b"another secret of thirty-two b..";

    fn key() -> TokenKey {
        TokenKey::hs256(SECRET).unwrap()
    }

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
            jti: Some("j-1".into()),
        }
    }

    #[test]
    fn the_team_cap_claim_round_trips_and_zero_is_none() {
        let encoding = EncodingKey::from_secret(SECRET);
        let header = Header::new(Algorithm::HS256);
        let none = IssuerAudience::default();
        let id = identity(now() + 60);
        for (cap, read) in [(Some(7), Some(7)), (Some(0), None), (None, None)] {
            let token = mint_capped(&header, &encoding, &id, &none, cap, now()).unwrap();
            let verified = key().verifier.verify_claims(&token).unwrap();
            assert_eq!(verified.identity, id);
            assert_eq!(verified.team_max_connections, read, "{cap:?}");
        }
    }

    #[test]
    fn round_trips() {
        let key = key();
        let token = key.mint(&identity(now() + 60), now()).unwrap();
        assert_eq!(key.verify(&token).unwrap(), identity(now() + 60));
    }

    #[test]
    fn refuses_expired_wrong_secret_and_garbage() {
        let key = key();
        let expired = key.mint(&identity(now() - 3600), now() - 7200).unwrap();
        assert_eq!(key.verify(&expired), Err(TokenError::Expired));
        let other = TokenKey::hs256(OTHER)
            .unwrap()
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

    macro_rules! key_file {
        ($name:literal) => {
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/", $name)).as_slice()
        };
    }

    fn signed(alg: Algorithm, kid: Option<&str>, private: &[u8], id: &Identity) -> String {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private).unwrap(),
            _ => EncodingKey::from_secret(private),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        mint_with(&header, &key, id, now()).unwrap()
    }

    fn public_only() -> Verifier {
        let mut v = Verifier::new(LEEWAY_SECS).unwrap();
        assert_eq!(
            v.add_public_key_pem(key_file!("rsa-public.pem"), "rsa-public.pem"),
            Ok(Algorithm::RS256)
        );
        assert_eq!(
            v.add_public_key_pem(key_file!("ed25519-public.pem"), "ed25519-public.pem"),
            Ok(Algorithm::EdDSA)
        );
        v
    }

    #[test]
    fn public_keys_verify_rs256_and_eddsa() {
        let v = public_only();
        let id = identity(now() + 60);
        let rs = signed(Algorithm::RS256, None, key_file!("rsa-private.pem"), &id);
        assert_eq!(v.verify(&rs).unwrap(), id);
        let ed = signed(
            Algorithm::EdDSA,
            None,
            key_file!("ed25519-private.pem"),
            &id,
        );
        assert_eq!(v.verify(&ed).unwrap(), id);
        // The other key pairs of the same kinds do not verify.
        let rs2 = signed(Algorithm::RS256, None, key_file!("rsa2-private.pem"), &id);
        assert_eq!(v.verify(&rs2), Err(TokenError::BadSignature));
        let ed2 = signed(
            Algorithm::EdDSA,
            None,
            key_file!("ed25519b-private.pem"),
            &id,
        );
        assert_eq!(v.verify(&ed2), Err(TokenError::BadSignature));
    }

    #[test]
    fn refuses_algorithm_confusion_and_none() {
        let v = public_only();
        let id = identity(now() + 60);
        // HS256 signed with the public key's bytes as the secret: the classic confusion.
        let confused = signed(Algorithm::HS256, None, key_file!("rsa-public.pem"), &id);
        assert!(matches!(v.verify(&confused), Err(TokenError::NoKey(_))));
        // An RS256 header on an EdDSA signature, and the other way round.
        let ed = signed(
            Algorithm::EdDSA,
            None,
            key_file!("ed25519-private.pem"),
            &id,
        );
        let rs = signed(Algorithm::RS256, None, key_file!("rsa-private.pem"), &id);
        let swap = |token: &str, header: &str| {
            let rest = token.split_once('.').unwrap().1;
            format!("{header}.{rest}")
        };
        let rs_header = rs.split('.').next().unwrap();
        let ed_header = ed.split('.').next().unwrap();
        assert_eq!(
            v.verify(&swap(&ed, rs_header)),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            v.verify(&swap(&rs, ed_header)),
            Err(TokenError::BadSignature)
        );
        // alg none, unsigned.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
            rs.split('.').nth(1).unwrap()
        );
        assert!(matches!(v.verify(&none), Err(TokenError::Malformed(_))));
        // A secret-only verifier refuses public-key tokens.
        assert!(matches!(key().verify(&rs), Err(TokenError::NoKey(_))));
    }

    #[test]
    fn leeway_is_configurable() {
        let mut strict = Verifier::new(0).unwrap();
        strict
            .add_public_key_pem(key_file!("rsa-public.pem"), "rsa")
            .unwrap();
        let mut lenient = Verifier::new(120).unwrap();
        lenient
            .add_public_key_pem(key_file!("rsa-public.pem"), "rsa")
            .unwrap();
        let private = key_file!("rsa-private.pem");
        let just_expired = signed(Algorithm::RS256, None, private, &identity(now() - 60));
        assert_eq!(strict.verify(&just_expired), Err(TokenError::Expired));
        assert!(lenient.verify(&just_expired).is_ok());
        let long_expired = signed(Algorithm::RS256, None, private, &identity(now() - 600));
        assert_eq!(lenient.verify(&long_expired), Err(TokenError::Expired));
        assert!(Verifier::new(MAX_LEEWAY_SECS + 1).is_err());
    }

    #[test]
    fn jwks_selects_by_kid() {
        let mut v = Verifier::default();
        assert_eq!(v.add_jwks(key_file!("jwks.json"), "jwks.json"), Ok(3));
        let id = identity(now() + 60);
        let rsa2 = key_file!("rsa2-private.pem");
        let good = signed(Algorithm::RS256, Some("rsa-2"), rsa2, &id);
        assert_eq!(v.verify(&good).unwrap(), id);
        // Signed by rsa-2 but naming rsa-1: rsa-1's key is the only one tried.
        let wrong_kid = signed(Algorithm::RS256, Some("rsa-1"), rsa2, &id);
        assert_eq!(v.verify(&wrong_kid), Err(TokenError::BadSignature));
        let unknown = signed(Algorithm::RS256, Some("rsa-9"), rsa2, &id);
        assert!(matches!(v.verify(&unknown), Err(TokenError::NoKey(_))));
        // No kid: every RS256 key is tried.
        let no_kid = signed(Algorithm::RS256, None, rsa2, &id);
        assert_eq!(v.verify(&no_kid).unwrap(), id);
        let ed = signed(
            Algorithm::EdDSA,
            Some("ed-1"),
            key_file!("ed25519b-private.pem"),
            &id,
        );
        assert_eq!(v.verify(&ed).unwrap(), id);
    }

    #[test]
    fn refuses_tampered_payloads() {
        let v = public_only();
        let id = identity(now() + 60);
        let token = signed(Algorithm::RS256, None, key_file!("rsa-private.pem"), &id);
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = id.clone();
        forged.channels.push(ChannelId::new("C-secret").unwrap());
        let other = signed(
            Algorithm::RS256,
            None,
            key_file!("rsa2-private.pem"),
            &forged,
        );
        let payload = other.split('.').nth(1).unwrap();
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(v.verify(&tampered), Err(TokenError::BadSignature));
    }

    #[test]
    fn refuses_bad_key_files() {
        let mut v = Verifier::default();
        assert!(matches!(
            v.add_public_key_pem(key_file!("rsa-private.pem"), "rsa-private.pem"),
            Err(TokenError::Key { .. })
        ));
        assert!(v.add_public_key_pem(b"not a key", "x").is_err());
        assert!(v.add_jwks(b"{}", "x").is_err());
        assert!(
            v.add_jwks(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, "x")
                .is_err()
        );
        assert_eq!(v.add_hs256(b""), Err(TokenError::ShortSecret(0)));
        assert!(v.is_empty());
    }

    #[test]
    fn refuses_oversized_tokens_and_jti() {
        let key = key();
        assert!(matches!(
            key.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(TokenError::Malformed(_))
        ));
        let mut id = identity(now() + 60);
        id.jti = Some("j".repeat(MAX_JTI_BYTES + 1));
        let token = key.mint(&id, now()).unwrap();
        assert!(matches!(
            key.verify(&token),
            Err(TokenError::InvalidClaims(_))
        ));
    }

    #[test]
    fn refuses_secrets_shorter_than_32_bytes() {
        let short = &SECRET[..MIN_HS256_SECRET_BYTES - 1];
        assert_eq!(check_hs256_secret(short), Err(TokenError::ShortSecret(31)));
        assert!(check_hs256_secret(SECRET).is_ok());
        assert!(matches!(
            TokenKey::hs256(short),
            Err(TokenError::ShortSecret(31))
        ));
        assert!(TokenKey::hs256(b"devsecret").is_err());
        let mut v = Verifier::default();
        assert_eq!(v.add_hs256(short), Err(TokenError::ShortSecret(31)));
        assert!(v.is_empty());
        assert_eq!(
            TokenError::ShortSecret(9).to_string(),
            "the HS256 secret is 9 bytes; it must be at least 32 bytes (e.g. 32 random bytes as 64 hex digits)"
        );
    }

    fn expected(issuer: Option<&str>, audience: Option<&str>) -> IssuerAudience {
        IssuerAudience::new(issuer.map(str::to_string), audience.map(str::to_string))
    }

    /// The claims of `token`, unverified.
    fn claims_of(token: &str) -> serde_json::Value {
        use base64::Engine;
        let payload = token.split('.').nth(1).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        serde_json::from_slice(&json).unwrap()
    }

    #[test]
    fn a_configured_key_mints_iss_and_aud_and_requires_them() {
        let id = identity(now() + 60);
        let both = expected(Some("https://chat.example.com"), Some("channelmesh"));
        let strict = key().expect(both.clone());
        let token = strict.mint(&id, now()).unwrap();
        let claims = claims_of(&token);
        assert_eq!(claims["iss"], "https://chat.example.com");
        assert_eq!(claims["aud"], "channelmesh");
        assert_eq!(strict.verify(&token).unwrap(), id);

        // Unconfigured, neither claim is set, and neither is checked.
        let plain = key().mint(&id, now()).unwrap();
        let claims = claims_of(&plain);
        assert!(claims.get("iss").is_none() && claims.get("aud").is_none());
        assert_eq!(key().verify(&token).unwrap(), id, "iss and aud ignored");
        assert!(matches!(
            strict.verify(&plain),
            Err(TokenError::InvalidClaims(m)) if m.contains("iss")
        ));

        // Each claim alone: missing, or another value, is refused.
        let other_issuer = key()
            .expect(expected(Some("https://evil.example"), Some("channelmesh")))
            .mint(&id, now())
            .unwrap();
        assert!(matches!(
            strict.verify(&other_issuer),
            Err(TokenError::InvalidClaims(m)) if m.contains("iss")
        ));
        let other_audience = key()
            .expect(expected(Some("https://chat.example.com"), Some("billing")))
            .mint(&id, now())
            .unwrap();
        assert!(matches!(
            strict.verify(&other_audience),
            Err(TokenError::InvalidClaims(m)) if m.contains("aud")
        ));
        let issuer_only = key()
            .expect(expected(Some("https://chat.example.com"), None))
            .mint(&id, now())
            .unwrap();
        assert!(matches!(
            strict.verify(&issuer_only),
            Err(TokenError::InvalidClaims(m)) if m.contains("aud")
        ));
        // Only the issuer required: any audience, or none, passes.
        let wants_issuer = key().expect(expected(Some("https://chat.example.com"), None));
        assert!(wants_issuer.verify(&issuer_only).is_ok());
        assert!(wants_issuer.verify(&other_audience).is_ok());
        // Empty values are unset.
        assert_eq!(expected(Some(""), Some("")), IssuerAudience::default());
    }

    #[test]
    fn an_audience_array_passes_when_it_holds_the_audience() {
        let id = identity(now() + 60);
        let claims = json_claims(&id, serde_json::json!(["billing", "channelmesh"]));
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let wants = |aud: &str| key().expect(expected(None, Some(aud)));
        assert_eq!(wants("channelmesh").verify(&token).unwrap(), id);
        assert!(wants("chat").verify(&token).is_err());
    }

    fn json_claims(id: &Identity, aud: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "sub": id.user.as_str(),
            "team": id.team.as_str(),
            "channels": ["C1"],
            "name": "ann",
            "exp": id.expires_at,
            "jti": "j-1",
            "aud": aud,
        })
    }

    #[test]
    fn public_key_verifiers_require_iss_and_aud_too() {
        let id = identity(now() + 60);
        let v = public_only().expect(expected(Some("webapp"), Some("channelmesh")));
        let private = key_file!("rsa-private.pem");
        let plain = signed(Algorithm::RS256, None, private, &id);
        assert!(matches!(
            v.verify(&plain),
            Err(TokenError::InvalidClaims(_))
        ));
        let with = mint_for(
            &Header::new(Algorithm::RS256),
            &EncodingKey::from_rsa_pem(private).unwrap(),
            &id,
            &expected(Some("webapp"), Some("channelmesh")),
            now(),
        )
        .unwrap();
        assert_eq!(v.verify(&with).unwrap(), id);
    }
}
