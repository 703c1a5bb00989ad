//! Wall-clock time as the load generator uses it: Unix seconds for tokens, Unix microseconds for
//! the publish time each message carries (one clock, one machine), and reading that time back
//! from a received message's text (with [`digits`], which the NATS parser reads sizes with).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in seconds: tokens' `iat` and `exp`, and unique names.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix time in microseconds: the publish timestamp messages carry.
pub fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The publish time at the start of a message text after its leading `b`: digits up to `:`.
pub fn sent_at(text: &[u8]) -> Option<u64> {
    let end = text.iter().position(|&b| b == b':')?;
    digits(&text[..end])
}

/// An unsigned decimal number, all of `field`; None for anything else (or an overflow). By
/// hand rather than through `str::parse`: every receiver reads every message.
pub fn digits(field: &[u8]) -> Option<u64> {
    if field.is_empty() {
        return None;
    }
    field.iter().try_fold(0u64, |n, &b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_times_are_read_from_the_text() {
        assert_eq!(
            sent_at(b"1700000000123456:7:xx"),
            Some(1_700_000_000_123_456)
        );
        assert_eq!(sent_at(b"12x:7"), None);
        assert_eq!(sent_at(b"123"), None);
        assert_eq!(sent_at(b":7"), None);
        assert_eq!(sent_at(b"99999999999999999999999:7"), None);
    }
}
