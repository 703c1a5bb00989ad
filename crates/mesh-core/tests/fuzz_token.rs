//! Fuzzing token verification on stable Rust: arbitrary strings, JWT-shaped strings with
//! arbitrary headers and claims, claims signed with the real key (so the claim checks run), and
//! valid HS256/RS256/EdDSA tokens mutated a few bytes at a time. Nothing may panic, and nothing
//! but an unmodified valid token may be accepted.
//!
//! `CHANNELMESH_FUZZ_CASES=N` runs N cases per target (default: a few seconds' worth).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh_core::token::{MAX_TOKEN_CHANNELS, TokenKey, Verifier, mint_with};
use mesh_core::{ChannelId, Identity, TeamId, UserId};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// 32 bytes: the shortest HS256 secret accepted.
const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-sec";

fn cases(default: u32) -> u32 {
    std::env::var("CHANNELMESH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fuzz<S: Strategy>(name: &str, cases: u32, strategy: S, check: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let runs = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |input| {
        runs.fetch_add(1, Ordering::Relaxed);
        check(input);
        Ok(())
    });
    eprintln!("fuzz {name}: {} executions", runs.load(Ordering::Relaxed));
    if let Err(e) = result {
        panic!("fuzz {name} found a failing input: {e}");
    }
}

macro_rules! key_file {
    ($name:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/", $name)).as_slice()
    };
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A verifier holding every kind of key: the secret, both PEM public keys, the JWKS.
fn verifier() -> Verifier {
    let mut v = Verifier::default();
    v.add_hs256(SECRET).unwrap();
    v.add_public_key_pem(key_file!("rsa-public.pem"), "rsa")
        .unwrap();
    v.add_public_key_pem(key_file!("ed25519-public.pem"), "ed")
        .unwrap();
    v.add_jwks(key_file!("jwks.json"), "jwks").unwrap();
    v
}

fn identity() -> Identity {
    Identity {
        user: UserId::new("U1").unwrap(),
        team: TeamId::new("T1").unwrap(),
        name: Some("ann".into()),
        channels: vec![ChannelId::new("C1").unwrap()],
        // Fixed (year 2096), so that an accepted token's identity compares equal.
        expires_at: 4_000_000_000,
        jti: Some("jti-1".into()),
    }
}

/// One valid token per algorithm (and a JWKS kid).
fn valid_tokens() -> Vec<String> {
    let id = identity();
    let mut kid = Header::new(Algorithm::RS256);
    kid.kid = Some("rsa-2".into());
    vec![
        TokenKey::hs256(SECRET).unwrap().mint(&id, now()).unwrap(),
        mint_with(
            &Header::new(Algorithm::RS256),
            &EncodingKey::from_rsa_pem(key_file!("rsa-private.pem")).unwrap(),
            &id,
            now(),
        )
        .unwrap(),
        mint_with(
            &Header::new(Algorithm::EdDSA),
            &EncodingKey::from_ed_pem(key_file!("ed25519-private.pem")).unwrap(),
            &id,
            now(),
        )
        .unwrap(),
        mint_with(
            &kid,
            &EncodingKey::from_rsa_pem(key_file!("rsa2-private.pem")).unwrap(),
            &id,
            now(),
        )
        .unwrap(),
    ]
}

/// Verifies `token`; an accepted token must be one of `valid`, with the identity it was minted
/// for.
fn check(v: &Verifier, valid: &[String], token: &str) {
    match v.verify(token) {
        Ok(id) => {
            assert!(
                valid.iter().any(|t| t == token),
                "accepted a token that was not minted: {token:?}"
            );
            assert_eq!(id, identity());
        }
        Err(e) => {
            // Every refusal renders (the gateway logs it).
            let _ = e.to_string();
        }
    }
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e20f64..1e20).prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Headers a forger would try: real and bogus algorithms (`none` among them), kids, extras.
fn header() -> impl Strategy<Value = Value> {
    let alg = prop_oneof![
        Just(json!("none")),
        Just(json!("None")),
        Just(json!("HS256")),
        Just(json!("HS512")),
        Just(json!("RS256")),
        Just(json!("PS256")),
        Just(json!("ES256")),
        Just(json!("EdDSA")),
        any_json(),
    ];
    let kid = prop_oneof![
        Just(json!("rsa-1")),
        Just(json!("rsa-2")),
        Just(json!("ed-1")),
        any_json(),
    ];
    (
        prop::option::of(alg),
        prop::option::of(kid),
        prop::option::of(any_json()),
    )
        .prop_map(|(alg, kid, extra)| {
            let mut h = serde_json::Map::new();
            h.insert("typ".into(), json!("JWT"));
            if let Some(a) = alg {
                h.insert("alg".into(), a);
            }
            if let Some(k) = kid {
                h.insert("kid".into(), k);
            }
            if let Some(x) = extra {
                h.insert("crit".into(), x);
            }
            Value::Object(h)
        })
}

/// Claims near the real ones: each field right, wrong-typed, absent or extreme.
fn claims() -> impl Strategy<Value = Value> {
    let exp = prop_oneof![
        Just(json!(now() + 3600)),
        Just(json!(now() - 10)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1e300)),
        any_json(),
    ];
    let channels = prop_oneof![
        prop::collection::vec("C[A-Z0-9]{0,8}".prop_map(Value::from), 0..5).prop_map(Value::Array),
        Just(Value::Array(
            (0..=MAX_TOKEN_CHANNELS)
                .map(|i| json!(format!("C{i}")))
                .collect()
        )),
        any_json(),
    ];
    let id = prop_oneof![
        "[UT][A-Z0-9]{0,8}".prop_map(Value::from),
        ".{0,80}".prop_map(Value::from),
        any_json()
    ];
    (
        prop::option::of(id.clone()),
        prop::option::of(id),
        prop::option::of(exp),
        prop::option::of(channels),
        prop::option::of(any_json()),
        prop::option::of(any_json()),
    )
        .prop_map(|(sub, team, exp, channels, nbf, jti)| {
            let mut c = serde_json::Map::new();
            for (k, v) in [
                ("sub", sub),
                ("team", team),
                ("exp", exp),
                ("channels", channels),
                ("nbf", nbf),
                ("jti", jti),
            ] {
                if let Some(v) = v {
                    c.insert(k.into(), v);
                }
            }
            Value::Object(c)
        })
}

#[test]
fn fuzz_verify_arbitrary_strings() {
    let (v, valid) = (verifier(), valid_tokens());
    fuzz(
        "verify(bytes)",
        cases(3_000),
        prop::collection::vec(any::<u8>(), 0..600),
        |bytes| check(&v, &valid, &String::from_utf8_lossy(&bytes)),
    );
    fuzz(
        "verify(dotted)",
        cases(3_000),
        "[A-Za-z0-9_=+/-]{0,80}\\.[A-Za-z0-9_=+/-]{0,200}\\.[A-Za-z0-9_=+/-]{0,400}",
        |s| check(&v, &valid, &s),
    );
}

#[test]
fn fuzz_verify_forged_headers_and_claims() {
    let (v, valid) = (verifier(), valid_tokens());
    let signature = prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9_-]{0,400}",
        Just(valid[1].rsplit('.').next().unwrap().to_string()),
    ];
    fuzz(
        "verify(forged)",
        cases(2_000),
        (header(), claims(), signature),
        |(h, c, sig)| check(&v, &valid, &format!("{}.{}.{sig}", b64(&h), b64(&c))),
    );
}

#[test]
fn fuzz_verify_signed_arbitrary_claims() {
    // Correctly signed, so every claim check runs on odd claims; whatever is accepted must be
    // within the token limits.
    let v = verifier();
    let key = EncodingKey::from_secret(SECRET);
    fuzz("verify(signed claims)", cases(1_000), claims(), |c| {
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, &key).unwrap();
        if let Ok(id) = v.verify(&token) {
            assert!(id.channels.len() <= MAX_TOKEN_CHANNELS);
            assert!(
                id.jti
                    .as_ref()
                    .is_none_or(|j| j.len() <= mesh_core::token::MAX_JTI_BYTES)
            );
            assert_eq!(Some(id.user.as_str()), c["sub"].as_str());
        }
    });
}

#[test]
fn fuzz_verify_mutated_valid_tokens() {
    let (v, valid) = (verifier(), valid_tokens());
    for token in &valid {
        assert_eq!(v.verify(token).unwrap(), identity(), "{token}");
    }
    let mutations = prop::collection::vec((any::<prop::sample::Index>(), 0u8..128, 0u8..4), 1..4);
    fuzz(
        "verify(mutated)",
        // RSA verification is slow in debug builds: fewer cases by default.
        cases(1_000),
        (0..valid.len(), mutations),
        |(which, mutations)| {
            let mut bytes = valid[which].clone().into_bytes();
            for (at, byte, op) in mutations {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => {
                        bytes.remove(i);
                    }
                    2 => bytes.insert(i, byte),
                    // Flip the low bit of a base64 character: the smallest change.
                    _ => bytes[i] ^= 1,
                }
            }
            check(&v, &valid, &String::from_utf8_lossy(&bytes));
        },
    );
}

/// Segment swaps between valid tokens: each part is genuine, the whole is not.
#[test]
fn spliced_tokens_are_refused() {
    let (v, valid) = (verifier(), valid_tokens());
    let parts: Vec<Vec<&str>> = valid.iter().map(|t| t.split('.').collect()).collect();
    let mut tried = 0;
    for a in &parts {
        for b in &parts {
            for c in &parts {
                let token = format!("{}.{}.{}", a[0], b[1], c[2]);
                check(&v, &valid, &token);
                tried += 1;
            }
        }
    }
    eprintln!("spliced: {tried} tokens");
}
