//! Channel policies: the operator's file (TOML) parsed into [`Policies`], and which rule a
//! channel falls under. No I/O: the services read the file and hand over its text.
//!
//! ```toml
//! version = "2026-12-07"          # optional: shown on /metrics beside the file's hash
//!
//! [[channel]]
//! match = "CANN*"                 # a glob (`*` any run, `?` one character) or an exact id
//! read_only = true                # clients may not post; the admin API may
//! relay_typing = false            # typing indicators are not relayed
//!
//! [[channel]]
//! match = "C*"
//! history_max_events = 50         # per-channel bounds, within the server's own
//! history_max_age = "7d"          # s, m, h or d
//! publish_rate = { per_second = 5, burst = 10 }   # clients' messages, on the channel's owner
//!
//! [teams]
//! T123 = 500                      # the team's connection cap (0: uncapped)
//! ```
//!
//! Precedence: a channel falls under **one** rule, the most specific that matches it — the
//! rule whose pattern has the most literal (non-wildcard) characters, an exact id before a
//! glob with as many; between equals, the one first in the file. Fields the rule leaves out
//! take their defaults (writable, typing relayed, no bounds but the server's, no rate); rules
//! are not merged.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;

use crate::ids::{ChannelId, TeamId};

/// The longest pattern a rule may have (a channel id is shorter).
const MAX_PATTERN_BYTES: usize = 256;

/// What a channel may do, as its rule says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelPolicy {
    /// Clients may not post (messages or typing); the admin API may.
    pub read_only: bool,
    /// Typing indicators are relayed (default true).
    pub relay_typing: bool,
    /// Events kept at most, within the server's own bound.
    pub history_max_events: Option<usize>,
    /// Events older than this are dropped on the channel's next trim (a publish or a read).
    pub history_max_age: Option<Duration>,
    /// Clients' messages per second, with a burst, counted on the channel's owner.
    pub publish_rate: Option<PublishRate>,
}

/// The policy of a channel no rule matches.
pub const DEFAULT_POLICY: ChannelPolicy = ChannelPolicy {
    read_only: false,
    relay_typing: true,
    history_max_events: None,
    history_max_age: None,
    publish_rate: None,
};

impl Default for ChannelPolicy {
    fn default() -> Self {
        DEFAULT_POLICY
    }
}

/// A publish rate: `per_second` on average, `burst` at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawRate")]
pub struct PublishRate {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: f64,
    burst: Option<u32>,
}

impl TryFrom<RawRate> for PublishRate {
    type Error = String;

    fn try_from(raw: RawRate) -> Result<Self, String> {
        if !(raw.per_second.is_finite() && raw.per_second > 0.0) {
            return Err(format!(
                "publish_rate.per_second must be above 0 (got {})",
                raw.per_second
            ));
        }
        let burst = raw
            .burst
            .unwrap_or_else(|| raw.per_second.ceil().max(1.0) as u32);
        if burst == 0 {
            return Err("publish_rate.burst must be at least 1".into());
        }
        Ok(PublishRate {
            per_second: raw.per_second,
            burst,
        })
    }
}

/// A channel-id pattern: an exact id, or a glob with `*` (any run) and `?` (one character).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    /// Characters that are not wildcards: the pattern's specificity.
    literals: usize,
    exact: bool,
}

impl Pattern {
    /// `text` as a pattern, if it is one.
    pub fn new(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("match must not be empty".into());
        }
        if text.len() > MAX_PATTERN_BYTES {
            return Err(format!("match is longer than {MAX_PATTERN_BYTES} bytes"));
        }
        let literals = text.chars().filter(|c| !matches!(c, '*' | '?')).count();
        let exact = literals == text.chars().count();
        if exact {
            ChannelId::new(text).map_err(|e| format!("match {text:?} is no channel id: {e}"))?;
        }
        Ok(Pattern {
            text: text.to_string(),
            literals,
            exact,
        })
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &str) -> bool {
        if self.exact {
            return self.text == id;
        }
        glob(self.text.as_bytes(), id.as_bytes())
    }

    /// Sorts before every less specific pattern.
    fn precedence(&self) -> (std::cmp::Reverse<usize>, bool) {
        (std::cmp::Reverse(self.literals), !self.exact)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Pattern::new(&text).map_err(serde::de::Error::custom)
    }
}

/// Glob matching of bytes: `*` any run (empty too), `?` one byte. Linear backtracking on the
/// last `*`, so no pattern is exponential.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A duration as an operator writes it: `90` (seconds), `"90s"`, `"15m"`, `"2h"`, `"7d"`.
#[derive(Debug, Clone, Copy)]
struct Age(Duration);

impl<'de> Deserialize<'de> for Age {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        let secs = match Raw::deserialize(d)? {
            Raw::Secs(s) => Some(s),
            Raw::Text(text) => parse_age(&text),
        };
        match secs {
            Some(s) if s > 0 => Ok(Age(Duration::from_secs(s))),
            _ => Err(serde::de::Error::custom(
                "history_max_age must be a positive duration: seconds, or e.g. \"90s\", \"15m\", \"2h\", \"7d\"",
            )),
        }
    }
}

/// Seconds in `text` ("90s", "15m", "2h", "7d", "90").
fn parse_age(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(scale)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    pattern: Pattern,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    relay_typing: Option<bool>,
    history_max_events: Option<Positive>,
    history_max_age: Option<Age>,
    publish_rate: Option<PublishRate>,
}

/// A count of at least 1.
#[derive(Debug, Clone, Copy)]
struct Positive(usize);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            0 => Err(serde::de::Error::custom("must be at least 1")),
            n => Ok(Positive(usize::try_from(n).unwrap_or(usize::MAX))),
        }
    }
}

/// A team id as a table key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TeamKey(TeamId);

impl<'de> Deserialize<'de> for TeamKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        TeamId::new(&text)
            .map(TeamKey)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is no team id: {e}")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: Option<String>,
    #[serde(default)]
    channel: Vec<RawRule>,
    #[serde(default)]
    teams: HashMap<TeamKey, u32>,
}

/// One rule: the channels it covers and their policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub pattern: Pattern,
    pub policy: ChannelPolicy,
}

/// Why a policy file was refused: the line (1-based) when known, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct PolicyError {
    pub line: Option<usize>,
    pub message: String,
}

/// Every rule of a policy file, most specific first, and the teams' connection caps.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policies {
    rules: Vec<Rule>,
    /// The rules of exact ids, by id (an index into `rules`): an exact id beats every glob
    /// that matches it (a glob has fewer literals than any id it matches, or as many and
    /// loses the tie), so a channel with one is found without scanning the globs.
    exact: HashMap<String, usize>,
    /// The indexes of the glob rules, most specific first.
    globs: Vec<usize>,
    teams: HashMap<TeamId, u32>,
    version: String,
    hash: u64,
}

impl Policies {
    /// No rule: every channel has the default policy, no team a cap of the file's.
    pub fn none() -> Policies {
        Policies::default()
    }

    /// Parses a policy file's `text`.
    pub fn parse(text: &str) -> Result<Policies, PolicyError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| PolicyError {
            line: e.span().map(|s| line_of(text, s.start)),
            message: e.message().trim_end().to_string(),
        })?;
        let mut rules: Vec<Rule> = raw
            .channel
            .into_iter()
            .map(|r| Rule {
                pattern: r.pattern,
                policy: ChannelPolicy {
                    read_only: r.read_only,
                    relay_typing: r.relay_typing.unwrap_or(true),
                    history_max_events: r.history_max_events.map(|p| p.0),
                    history_max_age: r.history_max_age.map(|a| a.0),
                    publish_rate: r.publish_rate,
                },
            })
            .collect();
        // Stable: between equals, the file's order.
        rules.sort_by_key(|r| r.pattern.precedence());
        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            match rule.pattern.exact {
                // The first of two rules for one id wins, as the order says.
                true => {
                    exact.entry(rule.pattern.text.clone()).or_insert(i);
                }
                false => globs.push(i),
            }
        }
        Ok(Policies {
            rules,
            exact,
            globs,
            teams: raw.teams.into_iter().map(|(k, v)| (k.0, v)).collect(),
            version: raw.version.unwrap_or_default(),
            hash: xxhash_rust::xxh3::xxh3_64(text.as_bytes()),
        })
    }

    /// The rule `channel` falls under, if any.
    pub fn rule_for(&self, channel: &str) -> Option<&Rule> {
        let found = self.exact.get(channel).copied().or_else(|| {
            self.globs
                .iter()
                .copied()
                .find(|&i| self.rules[i].pattern.matches(channel))
        });
        found.map(|i| &self.rules[i])
    }

    /// `channel`'s policy.
    pub fn for_channel(&self, channel: &str) -> ChannelPolicy {
        self.rule_for(channel).map_or(DEFAULT_POLICY, |r| r.policy)
    }

    /// The file's cap on `team`'s connections, if it names the team (0: uncapped).
    pub fn team_cap(&self, team: &TeamId) -> Option<u32> {
        self.teams.get(team).copied()
    }

    /// The rules, most specific first.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The teams the file caps.
    pub fn teams(&self) -> usize {
        self.teams.len()
    }

    /// The file's own `version` ("" when it has none).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The file's hash (xxh3 of its bytes) as 16 hex digits: which file is loaded.
    pub fn hash(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

/// The 1-based line of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The policies in force, shared by every task of a service and replaced whole on a reload.
#[derive(Debug, Clone, Default)]
pub struct SharedPolicies(Arc<RwLock<Arc<Policies>>>);

impl SharedPolicies {
    /// Shared `policies`.
    pub fn new(policies: Policies) -> SharedPolicies {
        SharedPolicies(Arc::new(RwLock::new(Arc::new(policies))))
    }

    /// The policies in force now.
    pub fn current(&self) -> Arc<Policies> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `policies` in force.
    pub fn replace(&self, policies: Policies) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policies);
    }

    /// `channel`'s policy now.
    pub fn for_channel(&self, channel: &str) -> ChannelPolicy {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .for_channel(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Policies {
        Policies::parse(text).unwrap()
    }

    fn error(text: &str) -> PolicyError {
        Policies::parse(text).unwrap_err()
    }

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("policy.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let p = parse(&example);
        assert_eq!(p.version(), "2026-12-07");
        let ann = p.for_channel("CANNOUNCE");
        assert!(ann.read_only && !ann.relay_typing);
        assert_eq!(ann.history_max_events, None, "rules are not merged");
        let general = p.for_channel("CGENERAL");
        assert_eq!(general.history_max_events, Some(50));
        assert_eq!(
            general.history_max_age,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            general.publish_rate,
            Some(PublishRate {
                per_second: 5.0,
                burst: 10
            })
        );
        assert_eq!(p.for_channel("GPRIVATE"), DEFAULT_POLICY);
        assert_eq!(p.team_cap(&TeamId::new("T123").unwrap()), Some(500));
        assert_eq!(p.team_cap(&TeamId::new("T9").unwrap()), None);
    }

    #[test]
    fn the_most_specific_rule_wins_then_the_first_in_the_file() {
        let p = parse(
            r#"
            [[channel]]
            match = "C*"
            history_max_events = 1
            [[channel]]
            match = "CA*"
            history_max_events = 2
            [[channel]]
            match = "CA?"
            history_max_events = 3
            [[channel]]
            match = "C?B"
            history_max_events = 4
            [[channel]]
            match = "CAB"
            history_max_events = 5
            [[channel]]
            match = "*"
            history_max_events = 6
            "#,
        );
        let events = |c: &str| p.for_channel(c).history_max_events;
        // "CAB" exact beats the globs with as many literals ("CA?", "C?B"... have 2).
        assert_eq!(events("CAB"), Some(5));
        // Rules whose patterns tie (the same exact id) keep the file's order.
        let twice =
            parse("[[channel]]\nmatch = \"C1\"\nread_only = true\n[[channel]]\nmatch = \"C1\"\n");
        assert!(twice.for_channel("C1").read_only);
        // "CA*" and "CA?" both have 2 literals: the first in the file.
        assert_eq!(events("CAC"), Some(2));
        assert_eq!(events("CXB"), Some(4));
        assert_eq!(events("CZZZ"), Some(1));
        assert_eq!(events("GZ"), Some(6));
    }

    #[test]
    fn globs_match_runs_and_single_characters() {
        let m = |p: &str, id: &str| Pattern::new(p).unwrap().matches(id);
        assert!(m("C*", "C"));
        assert!(m("C*", "CABC"));
        assert!(m("*ANN*", "CXANNY"));
        assert!(m("C*-ann", "CTEAM-ann"));
        assert!(!m("C*-ann", "CTEAM-annx"));
        assert!(m("C?", "C1"));
        assert!(!m("C?", "C12"));
        assert!(m("C*1*2", "C1x1y2"));
        assert!(!m("CABC", "CAB"));
        assert!(m("CABC", "CABC"));
    }

    #[test]
    fn an_empty_file_is_no_policy() {
        let p = parse("");
        assert!(p.rules().is_empty());
        assert_eq!(p.for_channel("C1"), DEFAULT_POLICY);
        assert_eq!(p.hash(), Policies::parse("").unwrap().hash());
        assert_ne!(p.hash(), parse("# a comment\n").hash());
    }

    #[test]
    fn bad_files_are_refused_naming_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("[[channel]]\nmatch = \"C*\"\nread_only = yes\n", 3, ""),
            (
                "[[channel]]\nmatch = \"C*\"\nread_onyl = true\n",
                3,
                "read_onyl",
            ),
            ("\n[[channel]]\nmatch = \"\"\n", 3, "empty"),
            ("[[channel]]\nmatch = \"C 1\"\n", 2, "no channel id"),
            ("[[channel]]\nread_only = true\n", 1, "match"),
            (
                "[[channel]]\nmatch = \"C*\"\n\npublish_rate = { per_second = 0 }\n",
                4,
                "above 0",
            ),
            (
                "[[channel]]\nmatch = \"C*\"\npublish_rate = { per_second = 1, burst = 0 }\n",
                3,
                "burst",
            ),
            (
                "[[channel]]\nmatch = \"C*\"\nhistory_max_events = 0\n",
                3,
                "at least 1",
            ),
            (
                "[[channel]]\nmatch = \"C*\"\nhistory_max_age = \"7 weeks\"\n",
                3,
                "history_max_age",
            ),
            ("[teams]\nT1 = 5\n\"not a team\" = 3\n", 3, "no team id"),
            ("[teams]\nT1 = -5\n", 2, ""),
            ("unknown = 1\n", 1, "unknown"),
        ];
        for (text, line, says) in cases {
            let e = error(text);
            assert_eq!(e.line, Some(*line), "{text:?}: {e}");
            assert!(e.to_string().contains(says), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")), "{e}");
        }
    }

    #[test]
    fn ages_and_rates_take_their_forms() {
        assert_eq!(parse_age("90"), Some(90));
        assert_eq!(parse_age("90s"), Some(90));
        assert_eq!(parse_age("15m"), Some(900));
        assert_eq!(parse_age("2h"), Some(7200));
        assert_eq!(parse_age("7d"), Some(604_800));
        assert_eq!(parse_age("7w"), None);
        assert_eq!(parse_age("s"), None);
        let p = parse(
            "[[channel]]\nmatch = \"C*\"\nhistory_max_age = 30\npublish_rate = { per_second = 0.5 }\n",
        );
        let c = p.for_channel("C1");
        assert_eq!(c.history_max_age, Some(Duration::from_secs(30)));
        assert_eq!(
            c.publish_rate,
            Some(PublishRate {
                per_second: 0.5,
                burst: 1
            })
        );
    }

    #[test]
    fn shared_policies_are_replaced_whole() {
        let shared = SharedPolicies::default();
        assert!(!shared.for_channel("C1").read_only);
        shared.replace(parse("[[channel]]\nmatch = \"C1\"\nread_only = true\n"));
        assert!(shared.for_channel("C1").read_only);
        assert!(!shared.for_channel("C2").read_only);
    }
}
