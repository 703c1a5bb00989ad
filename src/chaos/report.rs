//! The end of a chaos run: its result as a table for people, or as JSON (`--json`).

use serde::Serialize;

use super::check::Findings;
use super::log::FaultRecord;

/// A run's result.
#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub minutes: f64,
    /// The binary the mesh's processes ran.
    pub mesh_bin: String,
    pub faults: Vec<FaultRecord>,
    pub findings: Findings,
    /// No invariant broken.
    pub ok: bool,
}

impl Report {
    /// The table: faults by kind with their cost in availability, then the messages, then
    /// presence, then the verdict.
    pub fn table(&self) -> String {
        let f = &self.findings;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "chaos --seed {} --minutes {} ({})",
            self.seed, self.minutes, self.mesh_bin
        ));
        line(format!(
            "{:<24} {:>8} {:>8} {:>16} {:>14}",
            "fault kind", "injected", "skipped", "failed publishes", "unavailable s"
        ));
        for (kind, s) in &f.per_kind {
            line(format!(
                "{:<24} {:>8} {:>8} {:>16} {:>14}",
                kind, s.injected, s.skipped, s.failed_publishes, s.unavailable_seconds
            ));
        }
        line(format!(
            "messages: {} published, {} acknowledged, {} failed, {} unanswered",
            f.published, f.acknowledged, f.failed, f.unanswered
        ));
        line(format!(
            "          {} lost ({} missed deliveries), {} duplicated, {} redelivered, {} out of \
             order, {} ts backwards",
            f.lost,
            f.missed_deliveries,
            f.duplicated,
            f.redelivered,
            f.out_of_order,
            f.ts_backwards
        ));
        line(format!(
            "          {} history_gap frames (covering {} deliveries), {} never seen in history, \
             {} clients checked, {} excluded",
            f.gaps, f.gap_covered, f.not_in_history, f.clients_checked, f.clients_excluded
        ));
        line(format!(
            "presence: {} samples, {} false away, {} unavailable, {} flaps",
            f.presence_samples, f.presence_false_away, f.presence_unavailable, f.presence_flaps
        ));
        for (what, ids) in &f.examples {
            line(format!("  e.g. {what}: {}", ids.join(", ")));
        }
        if self.ok {
            line("result: every invariant held".into());
        } else {
            line(format!("result: BROKEN: {}", f.violations.join("; ")));
        }
        out
    }
}
