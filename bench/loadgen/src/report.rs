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
    /// Whether publishers never waited for acknowledgements (`--open-loop`); then `published`
    /// counts what was sent.
    pub open_loop: bool,
    /// Messages sent, and acknowledged by the server.
    pub sent: u64,
    pub acked: u64,
    /// Rate steps (`--rates`, or open loop), in order; empty for a single closed-loop run.
    pub steps: Vec<StepReport>,
    /// The highest step that was sustainable ([`StepReport::sustainable`]), and what it
    /// delivered per second; None when none was.
    pub max_sustainable_rate: Option<u64>,
    pub max_sustainable_delivered_per_s: Option<f64>,
}

/// A step is sustainable only with a p99 publish -> receive latency up to this.
pub const SUSTAINABLE_P99_US: u64 = 100_000;
/// A step failed badly (two in a row end the stepping) with a p99 over this, or anything lost.
const BAD_P99_US: u64 = 1_000_000;
/// Publishers kept the pace when they sent at least this share of the step's rate.
const PACE_SHARE: f64 = 0.95;

/// One rate step: `rate` messages/s over the whole run, published for `seconds`, then settled.
/// Latencies in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// The offered rate, messages/s published over the whole run.
    pub rate: u64,
    /// How long it published.
    pub seconds: f64,
    pub sent: u64,
    pub sent_per_s: f64,
    pub acked: u64,
    pub publish_errors: u64,
    pub expected: u64,
    pub delivered: u64,
    /// Deliveries received while the step published, per second.
    pub delivered_per_s: f64,
    /// Expected deliveries that had not arrived once the step settled.
    pub lost: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub ack_p50_us: u64,
    pub ack_p99_us: u64,
    /// The `--server-pid` processes' CPU while the step published, in cores.
    pub server_cpu_cores: Option<f64>,
    /// The load generator's CPU while the step published, in cores, and whether it was over
    /// 85% of its cores (then the step does not count).
    pub loadgen_cpu_cores: f64,
    pub loadgen_bound: bool,
    /// Whether the publishers sent at least 95% of the offered rate (a publisher its server
    /// holds back falls behind: open loop shows it here and in the latency).
    pub kept_pace: bool,
    /// 0 lost, no publish errors, p99 <= 100 ms, the pace kept, not load-generator bound.
    pub sustainable: bool,
}

impl StepReport {
    /// Sets `kept_pace` and `sustainable` from the figures.
    pub fn judge(&mut self) {
        self.kept_pace = self.sent as f64 >= self.rate as f64 * self.seconds * PACE_SHARE;
        self.sustainable = self.lost == 0
            && self.publish_errors == 0
            && self.p99_us <= SUSTAINABLE_P99_US
            && self.kept_pace
            && !self.loadgen_bound;
    }

    /// Whether the server gave way badly at this step: anything lost, a p99 over a second, or
    /// publishers held to under half the rate. Two such steps in a row end the stepping.
    pub fn failed_badly(&self) -> bool {
        self.lost > 0
            || self.p99_us > BAD_P99_US
            || (self.sent as f64) < self.rate as f64 * self.seconds * 0.5
    }
}

impl Report {
    /// The steps' table: one row per step, and the max sustainable.
    fn steps_table(&self, t: &mut String) {
        let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
        let _ = writeln!(
            t,
            "  {:>8} {:>9} {:>12} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}  verdict",
            "rate/s",
            "sent/s",
            "delivered/s",
            "lost",
            "errors",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "srv cpu",
            "lg cpu"
        );
        for s in &self.steps {
            let verdict = if s.sustainable {
                "ok".to_string()
            } else {
                let mut why = Vec::new();
                if s.lost > 0 {
                    why.push("lost");
                }
                if s.publish_errors > 0 {
                    why.push("errors");
                }
                if s.p99_us > SUSTAINABLE_P99_US {
                    why.push("p99 > 100 ms");
                }
                if !s.kept_pace {
                    why.push("pace not kept");
                }
                if s.loadgen_bound {
                    why.push("LOAD-GENERATOR BOUND");
                }
                why.join(", ")
            };
            let _ = writeln!(
                t,
                "  {:>8} {:>9.0} {:>12.0} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7.2}  {verdict}",
                s.rate,
                s.sent_per_s,
                s.delivered_per_s,
                s.lost,
                s.publish_errors,
                ms(s.p50_us),
                ms(s.p99_us),
                ms(s.p999_us),
                ms(s.max_us),
                s.server_cpu_cores
                    .map_or("-".to_string(), |c| format!("{c:.2}")),
                s.loadgen_cpu_cores,
            );
        }
        let _ = writeln!(
            t,
            "  max sustainable: {}",
            match (
                self.max_sustainable_rate,
                self.max_sustainable_delivered_per_s
            ) {
                (Some(r), Some(d)) => format!("{r} published/s, {d:.0} delivered/s"),
                _ => "none of the steps".to_string(),
            }
        );
    }

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
                    if r.open_loop {
                        format!(
                            "{} B messages, publish {:?}, open loop (publishers never wait)",
                            r.payload_bytes, r.publish
                        )
                    } else {
                        format!(
                            "{} B messages, publish {:?}, rate {rate}, window {}",
                            r.payload_bytes, r.publish, r.window
                        )
                    },
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
        if !r.steps.is_empty() {
            let _ = writeln!(
                t,
                "  rate steps (published/s over the run; latency publish -> receive):"
            );
            self.steps_table(&mut t);
        }
        t
    }
}
