//! `latency`: admin -> client delivery latency. Posts messages one at a time through the admin
//! API and times each until a connected RTM client receives it.

use std::time::{Duration, Instant};

use mesh_core::{ChannelId, Identity, TeamId, UserId};

use crate::client::{self, Admin};
use crate::clock::unix_now;

/// Env var: the HS256 secret client tokens are signed with.
const ENV_JWT_SECRET: &str = "CHANNELMESH_JWT_SECRET";
/// Env var: the admin API's bearer token.
const ENV_ADMIN_TOKEN: &str = "CHANNELMESH_ADMIN_TOKEN";

/// `latency`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// RTM base URL of the gateway the client connects to.
    #[arg(long, default_value = "http://127.0.0.1:8080/api/")]
    gateway: String,
    /// Admin server address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    admin: String,
    /// Messages to time.
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Messages sent first and not counted.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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

/// Measures and prints the report.
pub async fn main(args: Args) -> anyhow::Result<()> {
    let admin_token = required_env(ENV_ADMIN_TOKEN)?;
    let jwt_secret = required_env(ENV_JWT_SECRET)?;
    let report = latency(&args, &admin_token, &jwt_secret).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "admin -> client delivery latency over {} messages",
        report.messages
    );
    println!("  p50  {:>8} us", report.p50_us);
    println!("  p90  {:>8} us", report.p90_us);
    println!("  p99  {:>8} us", report.p99_us);
    println!("  max  {:>8} us", report.max_us);
    println!("  mean {:>8} us", report.mean_us);
    if let Some(rpc) = &report.post_rpc {
        println!(
            "  (the PostMessage call alone: p50 {} us, p99 {} us, max {} us)",
            rpc.p50_us, rpc.p99_us, rpc.max_us
        );
    }
    Ok(())
}

/// A required secret from the environment.
fn required_env(name: &str) -> anyhow::Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => anyhow::bail!("{name} must be set (only `channelmesh dev` generates it)"),
    }
}

/// Posts messages one at a time through the admin API and times each until the connected
/// client receives it.
async fn latency(
    args: &Args,
    admin_token: &str,
    jwt_secret: &str,
) -> anyhow::Result<LatencyReport> {
    let channel = format!("CBENCH{}", unix_now());
    let now = unix_now();
    let identity = Identity {
        user: UserId::new("UBENCH")?,
        team: TeamId::new("TBENCH")?,
        name: None,
        channels: vec![ChannelId::new(&channel)?],
        expires_at: now + 3600,
        jti: None,
    };
    let mut ws = client::connect(&args.gateway, jwt_secret, &identity).await?;
    let mut admin = Admin::connect(&args.admin, admin_token).await?;
    let mut samples = Vec::with_capacity(args.messages);
    let mut rpc = Vec::with_capacity(args.messages);
    for i in 0..args.warmup + args.messages {
        let text = format!("bench {i}");
        let sent = Instant::now();
        admin.post(channel.clone(), "UPOSTER", text.clone()).await?;
        let acked = sent.elapsed();
        loop {
            let frame = client::next_json(&mut ws).await?;
            if frame["type"] == "message" && frame["text"] == text.as_str() {
                break;
            }
        }
        if i >= args.warmup {
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

/// Nearest-rank percentiles of `samples` (sorted here).
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
