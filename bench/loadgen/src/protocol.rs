//! Coordinator <-> worker messages: one JSON object per line, over the worker's stdin (orders)
//! and stdout (what it did). Histograms travel in HdrHistogram's V2 format, base64, so the
//! coordinator merges exact percentiles.

use anyhow::Context;
use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// An order to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ToWorker {
    /// The first line: what to do. The worker connects its clients and answers `Ready`.
    Plan(Box<Plan>),
    /// Start publishing (or churning).
    Go,
    /// Start publishing one rate step: `rate` messages/s over the whole run (replaces the
    /// plan's rate); answered by nothing until `Stop`.
    Step { rate: u64 },
    /// Stop publishing, wait for outstanding acknowledgements, answer `Stopped`.
    Stop,
    /// After a step settled: answer `Collected` with the step's histograms (then reset) and
    /// the running counters.
    Collect,
    /// Close the clients and answer `Report`.
    Finish,
}

/// What a worker tells the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum FromWorker {
    /// Running totals, a few times a second.
    Progress(Counters),
    /// Every client tried to connect.
    Ready {
        /// Per channel, how many of this worker's connected clients receive what is published
        /// to it.
        receivers: Vec<u32>,
        /// Wall-clock span of the connecting, unix microseconds.
        connect_started_us: u64,
        connect_finished_us: u64,
    },
    /// Publishing stopped; per channel, the messages the server acknowledged (closed loop) or
    /// that were sent and not refused (open loop), since the start of the run.
    Stopped {
        published: Vec<u64>,
        /// Deliveries received by the moment publishing stopped, since the start of the run.
        #[serde(default)]
        delivered: u64,
        /// The CPU this worker used from `Go`/`Step` to `Stop`, and that span's wall time, s.
        #[serde(default)]
        cpu_seconds: f64,
        #[serde(default)]
        publish_seconds: f64,
    },
    /// The answer to `Collect`: the step's histograms and the running counters.
    Collected {
        latency: String,
        acks: String,
        counters: Counters,
    },
    /// The final figures.
    Report(Box<WorkerReport>),
    /// The worker cannot go on.
    Failed { error: String },
}

/// A worker's running totals.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    pub connected: u64,
    pub connect_failures: u64,
    /// Messages the server acknowledged.
    pub published: u64,
    /// Messages sent (open loop: what `published` reports).
    #[serde(default)]
    pub sent: u64,
    /// Messages the server refused (RTM `ok:false`, NATS `-ERR`).
    pub publish_errors: u64,
    /// Sent but not acknowledged when publishing stopped.
    pub unacked: u64,
    /// Messages received (publish timestamps this run wrote).
    pub delivered: u64,
    /// Connections the server closed or that failed while the run went on.
    pub disconnects: u64,
    /// connect-storm: reconnects that succeeded and that failed.
    pub reconnects: u64,
    pub reconnect_failures: u64,
}

/// A worker's final figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub counters: Counters,
    /// Publish -> receive latency, microseconds.
    pub latency: String,
    /// Publish -> acknowledgement latency, microseconds.
    pub acks: String,
    /// Connect (rtm.connect + WebSocket + hello, or WebSocket + INFO + SUB + PONG), microseconds.
    pub connect: String,
    /// Unix microseconds of the first publish and the last delivery (0: none).
    pub first_publish_us: u64,
    pub last_delivery_us: u64,
    /// The CPU this worker's process used from `Go` to `Stop`, and that span's wall time,
    /// seconds (0 when it was not measured).
    #[serde(default)]
    pub cpu_seconds: f64,
    #[serde(default)]
    pub publish_seconds: f64,
}

/// A histogram as base64 V2.
pub fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The inverse of [`encode`].
pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("a histogram's base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("a histogram's V2 bytes: {e:?}"))
}

/// The histograms every process records into: 1 us to 60 s at 3 significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip_exactly() {
        let mut h = histogram().unwrap();
        for v in [1u64, 10, 250, 999, 1000, 12_345, 5_000_000] {
            h.record(v).unwrap();
        }
        let back = decode(&encode(&h).unwrap()).unwrap();
        assert_eq!(back.len(), h.len());
        for q in [0.5, 0.99, 0.999, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q));
        }
        assert!(decode("not base64!").is_err());
    }

    #[test]
    fn merged_histograms_give_exact_percentiles() {
        let mut a = histogram().unwrap();
        let mut b = histogram().unwrap();
        let mut all = histogram().unwrap();
        for v in 1..=1000u64 {
            let h = if v % 3 == 0 { &mut a } else { &mut b };
            h.record(v * 7).unwrap();
            all.record(v * 7).unwrap();
        }
        let mut merged = decode(&encode(&a).unwrap()).unwrap();
        merged.add(decode(&encode(&b).unwrap()).unwrap()).unwrap();
        for q in [0.5, 0.99, 0.999] {
            assert_eq!(merged.value_at_quantile(q), all.value_at_quantile(q));
        }
    }

    #[test]
    fn orders_are_tagged_lines() {
        let line = serde_json::to_string(&ToWorker::Go).unwrap();
        assert_eq!(line, r#"{"cmd":"go"}"#);
        assert!(matches!(
            serde_json::from_str::<ToWorker>(r#"{"cmd":"finish"}"#).unwrap(),
            ToWorker::Finish
        ));
    }
}
