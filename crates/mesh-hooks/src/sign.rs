//! The signature on every request channelmesh makes to the web app (webhooks, boot): the header
//! `X-Channelmesh-Signature: sha256=<hex of HMAC-SHA256(secret, raw body)>`, as Pusher signs its
//! webhooks. The receiver computes the same over the exact bytes it received and compares in
//! constant time ([`Secret::verify`] does it for Rust receivers and the tests).

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "X-Channelmesh-Signature";

/// The secret shared with the web app (`CHANNELMESH_WEBHOOK_SECRET`). Never printed.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from its bytes (the environment variable's value as given).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The secret's bytes, to hand it to a child process by environment. Never log them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The header's value for `body`: `sha256=` and 64 lowercase hex digits.
    pub fn sign(&self, body: &[u8]) -> String {
        let mac = self.mac(body).finalize().into_bytes();
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256=");
        for byte in mac {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        out
    }

    /// Whether `header` is this secret's signature of `body` (compared in constant time).
    pub fn verify(&self, body: &[u8], header: &str) -> bool {
        let Some(hex) = header.strip_prefix("sha256=") else {
            return false;
        };
        let Some(expected) = decode_hex(hex) else {
            return false;
        };
        self.mac(body).verify_slice(&expected).is_ok()
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        mac.update(body);
        mac
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    hex.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_rfc_4231_test_case_2() {
        // RFC 4231, 4.3: key "Jefe", data "what do ya want for nothing?".
        let secret = Secret::new("Jefe");
        let body = b"what do ya want for nothing?";
        assert_eq!(
            secret.sign(body),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verifies_its_own_signature_and_nothing_else() {
        let secret = Secret::new("s3cret");
        let header = secret.sign(b"{\"a\":1}");
        assert!(secret.verify(b"{\"a\":1}", &header));
        assert!(!secret.verify(b"{\"a\":2}", &header));
        assert!(!Secret::new("other").verify(b"{\"a\":1}", &header));
        assert!(!secret.verify(b"{\"a\":1}", header.trim_start_matches("sha256=")));
        assert!(!secret.verify(b"{\"a\":1}", "sha256=zz"));
    }
}
