//! Go's `time.ParseDuration` syntax, which Consul uses for every duration it accepts.
//!
//! Consul parses `wait`, session `TTL` and `LockDelay`, and check `TTL` and
//! `DeregisterCriticalServiceAfter` with Go's parser, so the fake accepts the same spellings
//! ("10s", "1m30s", "1.5h", "100ms", "0") and words its errors the same way.

use std::time::Duration;

/// Parses a Go duration string. Negative durations are rejected: nothing Consul takes from
/// these endpoints means anything below zero.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let invalid = || format!("time: invalid duration {}", go_quote(text));
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() || rest.starts_with('-') {
        return Err(invalid());
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = match &rest[..number_end] {
            "" | "." => return Err(invalid()),
            digits => digits.parse().map_err(|_| invalid())?,
        };
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "" => return Err(format!("time: missing unit in duration {}", go_quote(text))),
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            unit => {
                return Err(format!(
                    "time: unknown unit {} in duration {}",
                    go_quote(unit),
                    go_quote(text)
                ));
            }
        };
        nanos += number * scale;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

/// Quotes a string the way Go's `%q` does for the printable text these messages carry.
pub(crate) fn go_quote(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_spellings() {
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn words_errors_like_go() {
        assert_eq!(
            parse("10"),
            Err(r#"time: missing unit in duration "10""#.into())
        );
        assert_eq!(
            parse("5x"),
            Err(r#"time: unknown unit "x" in duration "5x""#.into())
        );
        assert_eq!(parse(""), Err(r#"time: invalid duration """#.into()));
        assert_eq!(parse("-1s"), Err(r#"time: invalid duration "-1s""#.into()));
    }
}
