//! Slack-style timestamps: "SECONDS.MICROS", unique and increasing per channel.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};

/// A position in a channel: microseconds since the Unix epoch, rendered "SECONDS.MICROS".
///
/// Rendered with six fraction digits, so for every date up to the year 2286 the text sorts in
/// the same order as the number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ts(u64);

/// Why a string is not a ts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ts must look like \"1700000000.000123\" (seconds, a dot, six digits)")]
pub struct TsError;

impl Ts {
    /// The ts at `micros` microseconds since the Unix epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Ts(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Parses "SECONDS.MICROS" (exactly six fraction digits).
    pub fn parse(s: &str) -> Result<Self, TsError> {
        let (secs, frac) = s.split_once('.').ok_or(TsError)?;
        if secs.is_empty()
            || secs.len() > 12
            || frac.len() != 6
            || !secs.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(TsError);
        }
        let secs: u64 = secs.parse().map_err(|_| TsError)?;
        let frac: u64 = frac.parse().map_err(|_| TsError)?;
        Ok(Ts(secs * 1_000_000 + frac))
    }
}

impl fmt::Display for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

impl fmt::Debug for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ts({self})")
    }
}

/// Hands out a channel's timestamps: the wall clock, but never equal to or before the last one.
#[derive(Debug, Clone, Copy, Default)]
pub struct TsClock {
    last: Ts,
}

impl TsClock {
    /// A clock whose next ts is after `floor`.
    pub fn starting_after(floor: Ts) -> Self {
        TsClock { last: floor }
    }

    /// The newest ts handed out (or the floor).
    pub fn last(&self) -> Ts {
        self.last
    }

    /// The next ts given the wall clock `now_micros`.
    pub fn next(&mut self, now_micros: u64) -> Ts {
        let next = Ts(now_micros.max(self.last.0 + 1));
        self.last = next;
        next
    }
}

/// The test hook's offset of the clock ts are stamped with, in microseconds (0: none).
static CLOCK_SKEW_MICROS: AtomicI64 = AtomicI64::new(0);

/// Test hook (the chaos harness's clock-skew fault): from now on [`skewed`] moves every wall
/// clock reading by `micros`, as if this host's clock were that far off. Never for production.
pub fn set_clock_skew(micros: i64) {
    CLOCK_SKEW_MICROS.store(micros, Ordering::Relaxed);
}

/// The wall-clock reading `now_micros` as this process stamps ts with it: moved by the offset
/// [`set_clock_skew`] set (none unless a test asked for one).
pub fn skewed(now_micros: u64) -> u64 {
    now_micros.saturating_add_signed(CLOCK_SKEW_MICROS.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn renders_and_parses() {
        let ts = Ts::from_micros(1_700_000_000_000_123);
        assert_eq!(ts.to_string(), "1700000000.000123");
        assert_eq!(Ts::parse("1700000000.000123"), Ok(ts));
        for bad in [
            "",
            "1700000000",
            "1700000000.123",
            "a.000001",
            ".000001",
            "1.0000001",
            "-1.000001",
        ] {
            assert_eq!(Ts::parse(bad), Err(TsError), "{bad:?}");
        }
    }

    #[test]
    fn clock_never_repeats_even_when_wall_clock_goes_back() {
        let mut clock = TsClock::default();
        let a = clock.next(1_000);
        let b = clock.next(1_000);
        let c = clock.next(500);
        assert!(a < b && b < c);
    }

    #[test]
    fn skew_moves_the_clock_both_ways_without_wrapping() {
        assert_eq!(skewed(1_000), 1_000);
        set_clock_skew(-2_000);
        assert_eq!(skewed(5_000), 3_000);
        assert_eq!(skewed(1_000), 0);
        set_clock_skew(500);
        assert_eq!(skewed(1_000), 1_500);
        set_clock_skew(0);
    }

    proptest! {
        #[test]
        fn text_order_is_number_order(a in 0u64..9_999_999_999_999_999, b in 0u64..9_999_999_999_999_999) {
            let (ta, tb) = (Ts::from_micros(a), Ts::from_micros(b));
            // Same-width seconds sort as text; the range covers dates to the year 2286.
            if ta.to_string().len() == tb.to_string().len() {
                prop_assert_eq!(ta.cmp(&tb), ta.to_string().cmp(&tb.to_string()));
            }
            prop_assert_eq!(Ts::parse(&ta.to_string()), Ok(ta));
        }
    }
}
