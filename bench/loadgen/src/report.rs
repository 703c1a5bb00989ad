//! What a run measured: one flat record (`--json`) and its summary table.

use std::fmt::Write;

use serde::Serialize;

use crate::plan::{PublishMode, Scenario, Target};

/// A run's figures. Latencies in microseconds; rates per second.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub target: Target,
    pub publish: PublishMode,
    pub processes: usize,
    pub clients: usize,
    pub connected: u64,
    pub connect_failures: u64,
    pub channels: usize,
    /// Channel memberships per channel (clients / channels in the fanout scenario).
    pub fanout: f64,
    pub payload_bytes: usize,
    /// The requested rate (0: as fast as the window allows) and window.
    pub rate: u64,
    pub window: usize,
    pub connect_per_s: f64,
    pub connect_p50_us: u64,
    pub connect_p99_us: u64,
    pub connect_max_us: u64,
    /// From the first publish to the last delivery.
    pub seconds: f64,
    pub published: u64,
    pub published_per_s: f64,
    pub publish_errors: u64,
    pub unacked: u64,
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub expected: u64,
    /// Expected deliveries that never arrived. Must be 0.
    pub lost: u64,
    /// Connections that closed or failed while the run went on.
    pub disconnects: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Publish -> acknowledgement (RTM `reply_to`, NATS PONG, the admin API's answer).
    pub ack_p50_us: u64,
    pub ack_p99_us: u64,
    pub reconnects: u64,
    pub reconnect_failures: u64,
    pub reconnects_per_s: f64,
    /// Summed VmRSS of `--server-pid`s before connecting and once all were connected.
    pub server_rss_before_bytes: Option<u64>,
    pub server_rss_after_bytes: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    /// The load generator's own CPU while publishing, in cores (all workers), the cores it may
    /// run on, and whether it used more than 85% of them: then the run may have measured the
    /// load generator rather than the server, and its figures do not count.
    pub loadgen_cpu_cores: f64,
    pub loadgen_cores: usize,
    pub loadgen_bound: bool,
}

impl Report {
    /// The summary table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let r = self;
        let _ = writeln!(
            t,
            "{:?} against {:?}: {} clients ({} connected, {} failed) in {} processes, {} channels (mean {:.1} members)",
            r.scenario,
            r.target,
            r.clients,
            r.connected,
            r.connect_failures,
            r.processes,
            r.channels,
            r.fanout
        );
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<20} {v}");
        };
        row(
            "connect",
            format!(
                "{:.0} /s, p50 {} us, p99 {} us, max {} us",
                r.connect_per_s, r.connect_p50_us, r.connect_p99_us, r.connect_max_us
            ),
        );
        match r.scenario {
            Scenario::Fanout | Scenario::Chat => {
                let rate = match r.rate {
                    0 => "max".to_string(),
                    n => format!("{n} /s"),
                };
                row(
                    "workload",
                    format!(
                        "{} B messages, publish {:?}, rate {rate}, window {}",
                        r.payload_bytes, r.publish, r.window
                    ),
                );
                row(
                    "published",
                    format!(
                        "{} ({:.0} /s), {} errors, {} unacknowledged",
                        r.published, r.published_per_s, r.publish_errors, r.unacked
                    ),
                );
                row(
                    "delivered",
                    format!(
                        "{} of {} expected in {:.1} s",
                        r.delivered, r.expected, r.seconds
                    ),
                );
                row("delivered rate", format!("{:.0} msgs/s", r.delivered_per_s));
                row("lost", r.lost.to_string());
                row(
                    "latency",
                    format!(
                        "p50 {} us, p99 {} us, p99.9 {} us, max {} us",
                        r.p50_us, r.p99_us, r.p999_us, r.max_us
                    ),
                );
                row(
                    "ack latency",
                    format!("p50 {} us, p99 {} us", r.ack_p50_us, r.ack_p99_us),
                );
                row(
                    "load generator",
                    format!(
                        "{:.2} of {} cores while publishing{}",
                        r.loadgen_cpu_cores,
                        r.loadgen_cores,
                        if r.loadgen_bound {
                            ": LOAD-GENERATOR BOUND (over 85%), this run does not count"
                        } else {
                            ""
                        }
                    ),
                );
            }
            Scenario::ConnectStorm => {
                row(
                    "reconnects",
                    format!(
                        "{} ({:.0} /s), {} failed",
                        r.reconnects, r.reconnects_per_s, r.reconnect_failures
                    ),
                );
            }
            Scenario::Idle => {}
        }
        row("disconnects", r.disconnects.to_string());
        if let (Some(before), Some(after)) = (r.server_rss_before_bytes, r.server_rss_after_bytes) {
            row(
                "server RSS",
                format!(
                    "{:.1} MiB -> {:.1} MiB, {} per connection",
                    before as f64 / 1048576.0,
                    after as f64 / 1048576.0,
                    r.rss_per_connection_bytes
                        .map_or("-".to_string(), |b| format!("{b:.0} B"))
                ),
            );
        }
        t
    }
}
