//! `channelmesh bench`: load and latency measurements run from their own process, through the
//! mesh's real interfaces (the RTM connect flow and the admin gRPC API).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use mesh_core::{ChannelId, Identity, TeamId, TokenKey, UserId};
use mesh_proto::admin::PostMessageRequest;
use mesh_proto::admin::admin_client::AdminClient;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::mesh::unix_now;

/// What `bench latency` measures against.
#[derive(Debug, Clone)]
pub struct LatencyConfig {
    /// The RTM base URL of the gateway the client connects to.
    pub gateway: String,
    /// The admin server's address, "host:port".
    pub admin: String,
    pub admin_token: String,
    pub jwt_secret: String,
    /// Messages to post, one at a time.
    pub messages: usize,
    /// Messages posted first and not counted.
    pub warmup: usize,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyReport {
    pub messages: usize,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
    /// The same percentiles for the PostMessage call alone (until the admin server answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_rpc: Option<Box<LatencyReport>>,
}

/// Posts messages one at a time through the admin API and times each until the connected
/// client receives it.
pub async fn latency(config: LatencyConfig) -> anyhow::Result<LatencyReport> {
    let channel = format!("CBENCH{}", unix_now());
    let now = unix_now();
    let identity = Identity {
        user: UserId::new("UBENCH")?,
        team: TeamId::new("TBENCH")?,
        name: None,
        channels: vec![ChannelId::new(&channel)?],
        expires_at: now + 3600,
    };
    let token = TokenKey::hs256(config.jwt_secret.as_bytes()).mint(&identity, now)?;
    let reply: Value = reqwest::Client::new()
        .post(format!("{}rtm.connect", config.gateway))
        .bearer_auth(&token)
        .send()
        .await
        .context("calling rtm.connect")?
        .json()
        .await?;
    let url = reply["url"]
        .as_str()
        .with_context(|| format!("rtm.connect answered {reply}"))?;
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "hello" {
        bail!("expected hello, got {first}");
    }

    let mut admin = AdminClient::connect(format!("http://{}", config.admin)).await?;
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", config.admin_token).parse()?;
    let mut samples = Vec::with_capacity(config.messages);
    let mut rpc = Vec::with_capacity(config.messages);
    for i in 0..config.warmup + config.messages {
        let text = format!("bench {i}");
        let mut request = tonic::Request::new(PostMessageRequest {
            channel: channel.clone(),
            user: "UPOSTER".into(),
            text: text.clone(),
            team: String::new(),
        });
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        let sent = Instant::now();
        admin.post_message(request).await?;
        let acked = sent.elapsed();
        loop {
            let frame = next_json(&mut ws).await?;
            if frame["type"] == "message" && frame["text"] == text.as_str() {
                break;
            }
        }
        if i >= config.warmup {
            samples.push(sent.elapsed());
            rpc.push(acked);
        }
    }
    let _ = ws.close(None).await;
    Ok(LatencyReport {
        post_rpc: Some(Box::new(report(&mut rpc))),
        ..report(&mut samples)
    })
}

async fn next_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no frame within 10 s")?
            .context("the gateway closed the socket")??;
        if let Message::Text(text) = msg {
            return Ok(serde_json::from_str(text.as_str())?);
        }
    }
}

fn report(samples: &mut [Duration]) -> LatencyReport {
    samples.sort_unstable();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0, |d| d.as_micros() as u64)
    };
    let total: u128 = samples.iter().map(Duration::as_micros).sum();
    LatencyReport {
        messages: samples.len(),
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        max_us: samples.last().map_or(0, |d| d.as_micros() as u64),
        mean_us: total.checked_div(samples.len() as u128).unwrap_or(0) as u64,
        post_rpc: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let r = report(&mut samples);
        assert_eq!(
            (r.p50_us, r.p90_us, r.p99_us, r.max_us, r.mean_us),
            (50, 90, 99, 100, 50)
        );
        assert_eq!(report(&mut []).max_us, 0);
    }
}
