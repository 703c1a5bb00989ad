//! The invariant checker: reads a run's [`Logs`] and counts every way the mesh broke its
//! promises — acknowledged messages lost (outside reported gaps), duplicated, out of order, ts
//! going backwards, users with a live connection shown away — and how long publishes failed
//! per fault kind.

use std::collections::{BTreeMap, HashMap, HashSet};

use mesh_core::Ts;
use serde::Serialize;

use super::log::{ClientLog, FaultRecord, Logs, Publish};
use super::schedule::{Action, Role};

/// How long after a (re)connect, or a gateway freeze, presence may still lag: the presence
/// grace (2 s), the gateway lease (3 s) and a margin.
pub const PRESENCE_SETTLE_SECS: f64 = 6.0;
/// How many example ids a finding lists.
const EXAMPLES: usize = 10;

/// Per fault kind: what was injected and what publishing saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindStats {
    pub injected: usize,
    pub skipped: usize,
    /// Publishes that failed (or got no answer) during its faults or after them, until the
    /// next fault.
    pub failed_publishes: usize,
    /// Distinct seconds in which at least one such publish failed.
    pub unavailable_seconds: usize,
}

/// What the checker found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    pub published: usize,
    pub acknowledged: usize,
    pub failed: usize,
    /// Publishes with no answer (the connection or call ended first).
    pub unanswered: usize,
    /// Acknowledged messages that a client subscribed throughout never got outside a
    /// reported gap, or that nobody (no client, no history read) ever saw.
    pub lost: usize,
    /// (client, message) pairs behind `lost`.
    pub missed_deliveries: usize,
    /// `history_gap` frames received.
    pub gaps: usize,
    /// (client, message) pairs missed but covered by a `history_gap`.
    pub gap_covered: usize,
    /// Publishes that exist under two or more ts (one publish stored twice).
    pub duplicated: usize,
    /// Deliveries of a message to a client that already had it.
    pub redelivered: usize,
    /// Deliveries whose ts is below the client's previous one on that channel.
    pub out_of_order: usize,
    /// Acknowledged publishes whose ts is at or below that of a publish acknowledged on the
    /// same channel before they were sent.
    pub ts_backwards: usize,
    /// Acknowledged messages never seen in a history read (information: a channel server
    /// killed takes its history, which the periodic reads may not have seen yet).
    pub not_in_history: usize,
    /// History reads that were not in ascending ts order.
    pub history_disorder: usize,
    pub presence_samples: usize,
    /// GetPresence said `away` about a user connected throughout.
    pub presence_false_away: usize,
    /// GetPresence said UNAVAILABLE (not a violation).
    pub presence_unavailable: usize,
    /// A `presence_change` to away about a user connected throughout.
    pub presence_flaps: usize,
    /// Clients whose deliveries were checked (connected at the end).
    pub clients_checked: usize,
    /// Clients not connected at the end: the mesh did not take them back within the settling
    /// time after the last fault (a violation), or they never connected.
    pub clients_excluded: usize,
    /// Per fault kind (`kill channel-server`, ...; `none` for failures outside any fault).
    pub per_kind: BTreeMap<String, KindStats>,
    /// Examples of lost, duplicated and disordered message ids.
    pub examples: BTreeMap<String, Vec<String>>,
    /// Every invariant broken, in words; empty when the run is clean.
    pub violations: Vec<String>,
}

/// Checks `logs`.
pub fn check(logs: &Logs) -> Findings {
    let mut f = Findings {
        published: logs.publishes.len(),
        history_disorder: logs.history_disorder,
        ..Findings::default()
    };
    for p in &logs.publishes {
        match &p.outcome {
            super::log::Outcome::Acked(_) => f.acknowledged += 1,
            super::log::Outcome::Failed(_) => f.failed += 1,
            super::log::Outcome::Unknown(_) => f.unanswered += 1,
        }
    }
    deliveries(logs, &mut f);
    duplicates(logs, &mut f);
    ts_order(logs, &mut f);
    presence(logs, &mut f);
    availability(logs, &mut f);
    f.violations = violations(&f);
    f
}

fn example(f: &mut Findings, what: &str, id: &str) {
    let list = f.examples.entry(what.to_string()).or_default();
    if list.len() < EXAMPLES {
        list.push(id.to_string());
    }
}

fn ts_of(s: &str) -> u64 {
    Ts::parse(s).map(Ts::as_micros).unwrap_or(0)
}

/// Lost messages, gaps, redeliveries and order, per client.
fn deliveries(logs: &Logs, f: &mut Findings) {
    let acked: Vec<(&Publish, &str)> = logs
        .publishes
        .iter()
        .filter_map(|p| Some((p, p.acked_ts()?)))
        .collect();
    let mut seen_anywhere: HashSet<&str> = HashSet::new();
    for set in logs.history.values() {
        seen_anywhere.extend(set.iter().map(|(_, id)| id.as_str()));
    }
    let in_history = seen_anywhere.clone();
    let mut lost: HashSet<&str> = HashSet::new();
    let mut covered_ids: HashSet<&str> = HashSet::new();
    for client in &logs.clients {
        f.gaps += client.gaps.len();
        seen_anywhere.extend(client.deliveries.iter().map(|d| d.id.as_str()));
        order_and_redelivery(client, f);
        let Some(hello) = client.first_hello() else {
            f.clients_excluded += 1;
            continue;
        };
        if !client.connected() {
            f.clients_excluded += 1;
            continue;
        }
        f.clients_checked += 1;
        let got: HashSet<&str> = client.deliveries.iter().map(|d| d.id.as_str()).collect();
        for &(p, ts) in &acked {
            if p.sent <= hello || got.contains(p.id.as_str()) {
                continue;
            }
            let ts = ts_of(ts);
            let covered = client.gaps.iter().any(|g| {
                g.channel == p.channel
                    && p.sent < g.at
                    && ts > ts_of(&g.cursor)
                    && g.oldest_ts.as_deref().is_none_or(|o| ts < ts_of(o))
            });
            if covered {
                f.gap_covered += 1;
                covered_ids.insert(p.id.as_str());
            } else {
                f.missed_deliveries += 1;
                lost.insert(p.id.as_str());
            }
        }
    }
    for &(p, _) in &acked {
        if !in_history.contains(p.id.as_str()) {
            f.not_in_history += 1;
        }
        if !seen_anywhere.contains(p.id.as_str()) && !covered_ids.contains(p.id.as_str()) {
            lost.insert(p.id.as_str());
        }
    }
    f.lost = lost.len();
    let mut lost: Vec<&str> = lost.into_iter().collect();
    lost.sort();
    for id in lost {
        example(f, "lost", id);
    }
}

/// Redeliveries and order violations of one client.
fn order_and_redelivery(client: &ClientLog, f: &mut Findings) {
    let mut had: HashSet<&str> = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    for d in &client.deliveries {
        if !had.insert(d.id.as_str()) {
            f.redelivered += 1;
            example(f, "redelivered", &d.id);
            continue;
        }
        let ts = ts_of(&d.ts);
        let last = last.entry(d.channel.as_str()).or_insert(0);
        if ts <= *last {
            f.out_of_order += 1;
            example(f, "out_of_order", &d.id);
        }
        *last = (*last).max(ts);
    }
}

/// Publishes that exist under two or more ts: acknowledged, in history, or delivered.
fn duplicates(logs: &Logs, f: &mut Findings) {
    let mut ts_of_id: HashMap<&str, HashSet<&str>> = HashMap::new();
    for p in &logs.publishes {
        if let Some(ts) = p.acked_ts() {
            ts_of_id.entry(&p.id).or_default().insert(ts);
        }
    }
    for set in logs.history.values() {
        for (ts, id) in set {
            ts_of_id.entry(id).or_default().insert(ts);
        }
    }
    for client in &logs.clients {
        for d in &client.deliveries {
            ts_of_id.entry(&d.id).or_default().insert(&d.ts);
        }
    }
    let mut dups: Vec<&str> = ts_of_id
        .iter()
        .filter(|(_, ts)| ts.len() > 1)
        .map(|(id, _)| *id)
        .collect();
    dups.sort();
    f.duplicated = dups.len();
    for id in dups {
        example(f, "duplicated", id);
    }
}

/// Per channel, a publish sent after another was acknowledged must get a higher ts.
fn ts_order(logs: &Logs, f: &mut Findings) {
    let mut by_channel: BTreeMap<&str, Vec<(&Publish, u64)>> = BTreeMap::new();
    for p in &logs.publishes {
        if let Some(ts) = p.acked_ts() {
            by_channel
                .entry(&p.channel)
                .or_default()
                .push((p, ts_of(ts)));
        }
    }
    for (_, mut acks) in by_channel {
        // Acknowledgements in time order, with the highest ts acknowledged so far.
        acks.sort_by(|a, b| a.0.answered.total_cmp(&b.0.answered));
        let mut prefix_max = Vec::with_capacity(acks.len());
        let mut max = 0;
        for &(_, ts) in &acks {
            max = max.max(ts);
            prefix_max.push(max);
        }
        for &(p, ts) in &acks {
            let before = acks.partition_point(|(a, _)| a.answered < p.sent);
            if before > 0 && ts <= prefix_max[before - 1] {
                f.ts_backwards += 1;
                example(f, "ts_backwards", &p.id);
            }
        }
    }
}

/// Whether a fault on `user`'s gateway (a region's gateway frozen or killed) touches
/// `from..=to`: its users' presence is then legitimately in doubt.
fn gateway_fault(faults: &[FaultRecord], region: &str, from: f64, to: f64) -> bool {
    faults.iter().any(|fault| {
        fault.kind.role == Role::Gateway
            && fault.kind.action != Action::Skew
            && fault.target.ends_with(region)
            && fault.start <= to
            && fault.end + PRESENCE_SETTLE_SECS >= from
    })
}

/// No user with a live connection is shown away.
fn presence(logs: &Logs, f: &mut Findings) {
    let clients: HashMap<&str, &ClientLog> =
        logs.clients.iter().map(|c| (c.user.as_str(), c)).collect();
    for s in &logs.presence {
        f.presence_samples += 1;
        if s.presence == "unavailable" {
            f.presence_unavailable += 1;
            continue;
        }
        let Some(client) = clients.get(s.user.as_str()) else {
            continue;
        };
        let from = s.sent - PRESENCE_SETTLE_SECS;
        if s.presence == "away"
            && client.connected_throughout(from, s.answered)
            && !gateway_fault(&logs.faults, &client.region, from, s.answered)
        {
            f.presence_false_away += 1;
            example(
                f,
                "presence_false_away",
                &format!("{} at {:.1}s", s.user, s.sent),
            );
        }
    }
    for watcher in &logs.clients {
        for change in &watcher.presence {
            let Some(client) = clients.get(change.user.as_str()) else {
                continue;
            };
            let from = change.at - PRESENCE_SETTLE_SECS;
            if change.presence == "away"
                && client.connected_throughout(from, change.at)
                && !gateway_fault(&logs.faults, &client.region, from, change.at)
                && !gateway_fault(&logs.faults, &watcher.region, from, change.at)
            {
                f.presence_flaps += 1;
                example(
                    f,
                    "presence_flaps",
                    &format!("{} at {:.1}s", change.user, change.at),
                );
            }
        }
    }
}

/// The fault a failure at `at` belongs to: the latest one injected by then (a mesh that did
/// not recover from a fault keeps failing on its account).
fn fault_at(faults: &[FaultRecord], at: f64) -> Option<&FaultRecord> {
    faults
        .iter()
        .filter(|fault| fault.skipped.is_none() && fault.start <= at)
        .max_by(|a, b| a.start.total_cmp(&b.start))
}

/// Failed publishes and unavailable seconds per fault kind.
fn availability(logs: &Logs, f: &mut Findings) {
    for fault in &logs.faults {
        let stats = f.per_kind.entry(fault.kind.to_string()).or_default();
        match fault.skipped {
            Some(_) => stats.skipped += 1,
            None => stats.injected += 1,
        }
    }
    let mut seconds: BTreeMap<String, HashSet<u64>> = BTreeMap::new();
    for p in &logs.publishes {
        if p.acked_ts().is_some() {
            continue;
        }
        let kind = fault_at(&logs.faults, p.sent)
            .map(|fault| fault.kind.to_string())
            .unwrap_or_else(|| "none".to_string());
        seconds
            .entry(kind.clone())
            .or_default()
            .insert(p.sent as u64);
        f.per_kind.entry(kind).or_default().failed_publishes += 1;
    }
    for (kind, secs) in seconds {
        f.per_kind.entry(kind).or_default().unavailable_seconds = secs.len();
    }
}

fn violations(f: &Findings) -> Vec<String> {
    let mut v = Vec::new();
    let mut broken = |n: usize, what: &str| {
        if n > 0 {
            v.push(format!("{n} {what}"));
        }
    };
    broken(f.lost, "acknowledged messages lost outside reported gaps");
    broken(
        f.duplicated,
        "publishes stored twice (two ts for one message)",
    );
    broken(f.redelivered, "messages delivered twice to one client");
    broken(f.out_of_order, "deliveries out of ts order");
    broken(
        f.ts_backwards,
        "acknowledged ts that went backwards in a channel",
    );
    broken(f.history_disorder, "history reads out of ts order");
    broken(
        f.presence_false_away,
        "GetPresence answers of away for a connected user",
    );
    broken(
        f.presence_flaps,
        "presence changes to away for a connected user",
    );
    broken(
        f.clients_excluded,
        "clients not connected at the end (the mesh did not take them back)",
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::log::{Delivery, Gap, Outcome, PresenceSample, Via};
    use crate::chaos::schedule::Kind;

    fn publish(id: &str, sent: f64, ts: Option<&str>) -> Publish {
        Publish {
            id: id.into(),
            channel: "C1".into(),
            via: Via::Admin,
            sent,
            answered: sent + 0.01,
            outcome: match ts {
                Some(ts) => Outcome::Acked(ts.into()),
                None => Outcome::Failed("unavailable".into()),
            },
        }
    }

    fn delivery(id: &str, ts: &str, at: f64) -> Delivery {
        Delivery {
            channel: "C1".into(),
            ts: ts.into(),
            id: id.into(),
            at,
        }
    }

    fn client(deliveries: Vec<Delivery>) -> ClientLog {
        ClientLog {
            user: "U1".into(),
            region: "us-east".into(),
            sessions: vec![(0.0, None)],
            deliveries,
            ..ClientLog::default()
        }
    }

    fn logs() -> Logs {
        Logs {
            publishes: vec![
                publish("a", 1.0, Some("1700000000.000001")),
                publish("b", 2.0, Some("1700000000.000002")),
                publish("c", 3.0, Some("1700000000.000003")),
            ],
            clients: vec![client(vec![
                delivery("a", "1700000000.000001", 1.1),
                delivery("b", "1700000000.000002", 2.1),
                delivery("c", "1700000000.000003", 3.1),
            ])],
            end: 4.0,
            ..Logs::default()
        }
    }

    #[test]
    fn a_clean_run_has_no_violations() {
        let f = check(&logs());
        assert_eq!(f.acknowledged, 3);
        assert!(f.violations.is_empty(), "{:?}", f.violations);
        // Never read from history: information only.
        assert_eq!(f.not_in_history, 3);
    }

    #[test]
    fn a_missed_message_is_lost_unless_a_gap_covers_it() {
        let mut l = logs();
        l.clients[0].deliveries.remove(1);
        let f = check(&l);
        assert_eq!((f.lost, f.missed_deliveries), (1, 1));
        assert_eq!(f.examples["lost"], vec!["b".to_string()]);

        l.clients[0].gaps.push(Gap {
            channel: "C1".into(),
            cursor: "1700000000.000001".into(),
            oldest_ts: Some("1700000000.000003".into()),
            at: 2.5,
        });
        let f = check(&l);
        assert_eq!((f.lost, f.gap_covered, f.gaps), (0, 1, 1));
        assert!(f.violations.is_empty());
    }

    #[test]
    fn a_client_connected_after_a_publish_need_not_have_it() {
        let mut l = logs();
        l.clients[0].sessions = vec![(1.5, None)];
        l.clients[0].deliveries.remove(0);
        // Nobody saw it at all: lost.
        assert_eq!(check(&l).lost, 1);
        // The channel's history has it: fine.
        let held = ("1700000000.000001".to_string(), "a".to_string());
        l.history.entry("C1".into()).or_default().insert(held);
        assert!(check(&l).violations.is_empty());
    }

    #[test]
    fn duplicates_order_and_backwards_ts_are_violations() {
        let mut l = logs();
        // Stored twice under two ts, and delivered twice.
        l.clients[0]
            .deliveries
            .push(delivery("c", "1700000000.000004", 3.2));
        let f = check(&l);
        assert_eq!((f.duplicated, f.redelivered), (1, 1));

        let mut l = logs();
        l.clients[0].deliveries.swap(0, 1);
        assert_eq!(check(&l).out_of_order, 1);

        let mut l = logs();
        l.publishes[2].outcome = Outcome::Acked("1700000000.000000".into());
        l.clients[0].deliveries[2].ts = "1700000000.000000".into();
        let f = check(&l);
        assert_eq!(f.ts_backwards, 1);
        assert!(!f.violations.is_empty());
    }

    #[test]
    fn a_client_the_mesh_did_not_take_back_is_a_violation() {
        let mut l = logs();
        l.clients[0].sessions = vec![(0.0, Some(3.5))];
        let f = check(&l);
        assert_eq!((f.clients_checked, f.clients_excluded), (0, 1));
        assert_eq!(f.violations.len(), 1, "{:?}", f.violations);
    }

    #[test]
    fn presence_away_counts_only_for_a_user_connected_throughout() {
        let mut l = logs();
        l.clients[0].sessions = vec![(0.0, Some(10.0)), (12.0, None)];
        let sample = |sent: f64, presence: &str| PresenceSample {
            user: "U1".into(),
            sent,
            answered: sent + 0.1,
            presence: presence.into(),
        };
        l.presence = vec![
            sample(8.0, "away"),
            sample(11.0, "away"),
            sample(13.0, "away"),
            sample(30.0, "unavailable"),
        ];
        let f = check(&l);
        assert_eq!(f.presence_false_away, 1);
        assert_eq!(f.presence_unavailable, 1);
    }

    #[test]
    fn failures_count_against_the_fault_they_happen_in() {
        let mut l = logs();
        let kind = Kind::parse_list("kill:admin").unwrap()[0];
        l.faults.push(FaultRecord {
            kind,
            target: "admin-server".into(),
            start: 10.0,
            end: 12.0,
            skipped: None,
        });
        l.publishes.extend([
            publish("d", 10.5, None),
            publish("e", 10.7, None),
            publish("f", 11.2, None),
            publish("g", 50.0, None),
        ]);
        let f = check(&l);
        // Failures until the next fault are this one's: the mesh had not recovered.
        let stats = &f.per_kind["kill admin"];
        assert_eq!((stats.injected, stats.failed_publishes), (1, 4));
        assert_eq!(stats.unavailable_seconds, 3);
        assert!(!f.per_kind.contains_key("none"));
        assert!(f.violations.is_empty());
    }
}
