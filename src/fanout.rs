//! `channelmesh bench fanout`: many RTM clients subscribed to few channels, messages published
//! through the admin API at a set rate; reports delivered messages per second, publish ->
//! receive latency (HDR histogram; the publish time travels in the message), the connect rate,
//! and lost messages.
//!
//! One process here; the next steps (several processes, 127.0.0.x source addresses, the
//! nats-server comparison) build on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use mesh_core::{ChannelId, Identity, TeamId, UserId};
use mesh_proto::admin::PostMessageRequest;
use mesh_proto::admin::admin_client::AdminClient;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::connect_client;
use crate::mesh::unix_now;

/// Clients connecting at once.
const CONNECT_PARALLEL: usize = 64;
/// Concurrent publishers (each a gRPC client) sharing the rate.
const PUBLISHERS: usize = 8;
/// How long to wait for the last deliveries after publishing stops.
const DRAIN_WAIT: Duration = Duration::from_secs(3);

/// What `bench fanout` runs.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// RTM base URLs; clients are spread over them round-robin.
    pub gateways: Vec<String>,
    /// The admin server, "host:port".
    pub admin: String,
    pub admin_token: String,
    pub jwt_secret: String,
    pub clients: usize,
    pub channels: usize,
    /// Messages per second, over all channels.
    pub rate: u64,
    pub duration: Duration,
    /// Message text size in bytes (at least the header).
    pub payload: usize,
    /// Print a progress line every second.
    pub progress: bool,
}

/// What it measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FanoutReport {
    pub clients: usize,
    pub channels: usize,
    pub fanout: f64,
    pub payload_bytes: usize,
    pub connect_per_s: f64,
    pub published: u64,
    pub publish_errors: u64,
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub expected: u64,
    pub lost: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

fn micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs the fan-out workload against a running mesh.
pub async fn fanout(config: FanoutConfig) -> anyhow::Result<FanoutReport> {
    anyhow::ensure!(
        config.clients > 0 && config.channels > 0,
        "clients and channels must be > 0"
    );
    anyhow::ensure!(!config.gateways.is_empty(), "at least one gateway");
    let run = unix_now();
    let channel = |i: usize| format!("CFAN{run}X{}", i % config.channels);
    let subscribers: Vec<u64> = (0..config.channels)
        .map(|c| ((config.clients + config.channels - 1 - c) / config.channels) as u64)
        .collect();

    // Connect every client through the real flow.
    let started = Instant::now();
    let sockets = futures::stream::iter(0..config.clients)
        .map(|i| {
            let gateway = config.gateways[i % config.gateways.len()].clone();
            let secret = config.jwt_secret.clone();
            let channel = channel(i);
            async move {
                let identity = Identity {
                    user: UserId::new(&format!("UFAN{i}"))?,
                    team: TeamId::new("TBENCH")?,
                    name: None,
                    channels: vec![ChannelId::new(&channel)?],
                    expires_at: unix_now() + 3600,
                };
                connect_client(&gateway, &secret, &identity).await
            }
        })
        .buffer_unordered(CONNECT_PARALLEL)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()
        .context("connecting the clients")?;
    let connect_per_s = config.clients as f64 / started.elapsed().as_secs_f64();

    // Readers: each keeps its own histogram, merged at the end.
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = Vec::with_capacity(sockets.len());
    for mut ws in sockets {
        let (delivered, stop) = (delivered.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = ws.next() => m,
                };
                let Some(Ok(Message::Text(text))) = msg else {
                    if matches!(msg, None | Some(Err(_))) {
                        break;
                    }
                    continue;
                };
                // The text starts with "b<publish micros>:".
                let Some(start) = text.as_str().find("\"text\":\"b") else {
                    continue;
                };
                let rest = &text.as_str()[start + 9..];
                let Some(sent) = rest.split(':').next().and_then(|s| s.parse::<u64>().ok()) else {
                    continue;
                };
                let _ = histogram.record(micros_now().saturating_sub(sent).max(1));
                delivered.fetch_add(1, Ordering::Relaxed);
            }
            let _ = ws.close(None).await;
            anyhow::Ok(histogram)
        }));
    }

    // Publishers share the rate.
    let published = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let per_channel: Arc<Vec<AtomicU64>> =
        Arc::new((0..config.channels).map(|_| AtomicU64::new(0)).collect());
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", config.admin_token).parse()?;
    let publishers = PUBLISHERS.min(config.rate.max(1) as usize);
    let interval = Duration::from_secs_f64(publishers as f64 / config.rate.max(1) as f64);
    let deadline = Instant::now() + config.duration;
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let mut admin = AdminClient::connect(format!("http://{}", config.admin)).await?;
        let (published, errors, per_channel, bearer) = (
            published.clone(),
            errors.clone(),
            per_channel.clone(),
            bearer.clone(),
        );
        let channels: Vec<String> = (0..config.channels).map(&channel).collect();
        let payload = config.payload;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut n = p;
            while Instant::now() < deadline {
                tick.tick().await;
                let c = n % channels.len();
                n += publishers;
                let mut text = format!("b{}:{n}:", micros_now());
                while text.len() < payload {
                    text.push('x');
                }
                let mut request = tonic::Request::new(PostMessageRequest {
                    channel: channels[c].clone(),
                    user: "UFANPUB".into(),
                    text,
                    team: String::new(),
                });
                request
                    .metadata_mut()
                    .insert("authorization", bearer.clone());
                match admin.post_message(request).await {
                    Ok(_) => {
                        published.fetch_add(1, Ordering::Relaxed);
                        per_channel[c].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let publishing = Instant::now();
    if config.progress {
        let mut last = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = delivered.load(Ordering::Relaxed);
            eprintln!(
                "  {:>5.1} s  published {:>9}  delivered {:>10}  ({:>9} /s)",
                publishing.elapsed().as_secs_f64(),
                published.load(Ordering::Relaxed),
                now,
                now - last
            );
            last = now;
        }
    }
    for t in tasks {
        t.await?;
    }
    let publish_secs = publishing.elapsed().as_secs_f64();
    let expected: u64 = per_channel
        .iter()
        .zip(&subscribers)
        .map(|(n, s)| n.load(Ordering::Relaxed) * s)
        .sum();
    // Let the last deliveries arrive.
    let waited = Instant::now();
    while delivered.load(Ordering::Relaxed) < expected && waited.elapsed() < DRAIN_WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total_secs = publish_secs + waited.elapsed().as_secs_f64();
    stop.cancel();
    let mut histogram = Histogram::<u64>::new(3)?;
    for r in readers {
        histogram.add(r.await??)?;
    }
    let got = delivered.load(Ordering::Relaxed);
    Ok(FanoutReport {
        clients: config.clients,
        channels: config.channels,
        fanout: config.clients as f64 / config.channels as f64,
        payload_bytes: config.payload,
        connect_per_s,
        published: published.load(Ordering::Relaxed),
        publish_errors: errors.load(Ordering::Relaxed),
        delivered: got,
        delivered_per_s: got as f64 / total_secs,
        expected,
        lost: expected.saturating_sub(got),
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
    })
}
