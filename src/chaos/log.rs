//! What a run records, as the workload saw it: every publish and its answer, what each client
//! received, what the history API held, what presence said, and the faults injected. The
//! checker ([`super::check`]) reads only this. Times are seconds since the workload started.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::schedule::Kind;

/// How a publish was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// An RTM `message` frame.
    Rtm,
    /// The admin API's PostMessage.
    Admin,
}

/// What came of a publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Acknowledged with this ts.
    Acked(String),
    /// Refused or failed with this error.
    Failed(String),
    /// No answer: the connection or the call ended first.
    Unknown(String),
}

/// One publish. Its `id` is written into its text, so it is recognised wherever it shows up.
#[derive(Debug, Clone, Serialize)]
pub struct Publish {
    pub id: String,
    pub channel: String,
    pub via: Via,
    pub sent: f64,
    pub answered: f64,
    pub outcome: Outcome,
}

impl Publish {
    /// Its ts, if it was acknowledged.
    pub fn acked_ts(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Acked(ts) => Some(ts),
            _ => None,
        }
    }
}

/// A message a client received.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub channel: String,
    pub ts: String,
    pub id: String,
    pub at: f64,
}

/// A `history_gap` a client received.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub channel: String,
    /// The cursor it resumed from ("" when none).
    pub cursor: String,
    /// The oldest ts the channel still held (None: nothing).
    pub oldest_ts: Option<String>,
    pub at: f64,
}

/// A `presence_change` a client received.
#[derive(Debug, Clone, Serialize)]
pub struct PresenceChange {
    pub user: String,
    pub presence: String,
    pub at: f64,
}

/// Everything one RTM client saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientLog {
    pub user: String,
    pub region: String,
    /// Its connections: (hello, end); `end` None while it is open.
    pub sessions: Vec<(f64, Option<f64>)>,
    pub deliveries: Vec<Delivery>,
    pub gaps: Vec<Gap>,
    pub presence: Vec<PresenceChange>,
}

impl ClientLog {
    /// When it first said hello.
    pub fn first_hello(&self) -> Option<f64> {
        self.sessions.first().map(|s| s.0)
    }

    /// Whether a connection was open for all of `from..=to`.
    pub fn connected_throughout(&self, from: f64, to: f64) -> bool {
        self.sessions
            .iter()
            .any(|&(start, end)| start <= from && end.is_none_or(|end| end >= to))
    }

    /// Whether a connection is open now.
    pub fn connected(&self) -> bool {
        self.sessions.last().is_some_and(|s| s.1.is_none())
    }
}

/// One answer of the admin API's GetPresence about one user.
#[derive(Debug, Clone, Serialize)]
pub struct PresenceSample {
    pub user: String,
    pub sent: f64,
    pub answered: f64,
    /// `active`, `away`, or `unavailable` (the call said UNAVAILABLE).
    pub presence: String,
}

/// One fault as injected.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: Kind,
    /// The target's name, e.g. `cs-2`.
    pub target: String,
    pub start: f64,
    /// When the target was back (restarted, continued, unskewed).
    pub end: f64,
    /// Why it could not be injected, if it was not.
    pub skipped: Option<String>,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default)]
pub struct Logs {
    pub publishes: Vec<Publish>,
    pub clients: Vec<ClientLog>,
    /// Per channel: every (ts, id) the history API ever returned.
    pub history: BTreeMap<String, BTreeSet<(String, String)>>,
    /// History reads whose events were not in ascending ts order.
    pub history_disorder: usize,
    pub presence: Vec<PresenceSample>,
    pub faults: Vec<FaultRecord>,
    /// When publishing stopped.
    pub end: f64,
}

/// The id a chaos message's text carries (`chaos <id>`), if it is one.
pub fn id_of(text: &str) -> Option<&str> {
    text.strip_prefix("chaos ")
}
