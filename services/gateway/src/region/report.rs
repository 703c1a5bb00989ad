//! The report task: every half second it tells the ring manager this gateway's place (id,
//! region, URL, connections, the revocations it holds) and applies the directive it gets back;
//! while the region drains it says goodbye to the next batch of connections every tick.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesh_proto::ring::GatewayReport;
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use ring_client::RingSource;
use tokio_util::sync::CancellationToken;

use super::state::{CALL_TIMEOUT, RegionState};

/// How often the gateway reports itself.
const REPORT_INTERVAL: Duration = Duration::from_millis(500);
/// How often a draining gateway says goodbye to its next batch.
const DRAIN_TICK: Duration = Duration::from_millis(100);

/// What the report task needs: who this gateway is, where the ring manager is, and the state
/// it keeps up to date.
#[derive(Debug)]
pub struct Reporter {
    /// This gateway's id.
    pub gateway: String,
    /// Its region.
    pub region: String,
    /// The base URL clients reach it at.
    pub url: String,
    /// Where the ring manager is found.
    pub ring_source: RingSource,
    /// The region state the directives update.
    pub state: Arc<RegionState>,
    /// Open client connections, reported.
    pub connections: Arc<AtomicU64>,
    pub cancel: CancellationToken,
}

impl Reporter {
    /// Reports this gateway until it stops, and drains it while its region drains.
    pub async fn run(self) {
        let region = &self.state;
        let mut client: Option<RingManagerClient<tonic::transport::Channel>> = None;
        let mut report = tokio::time::interval(REPORT_INTERVAL);
        let mut tick = tokio::time::interval(DRAIN_TICK);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = report.tick() => {
                    let (revocations_generation, revocations_version) = region.revocations_held();
                    let (disconnects_generation, disconnects_version) = region.disconnects_held();
                    let request = GatewayReport {
                        revocations_generation,
                        revocations_version,
                        disconnects_generation,
                        disconnects_version,
                        gateway: self.gateway.clone(),
                        region: self.region.clone(),
                        url: self.url.clone(),
                        connections: self.connections.load(Ordering::Relaxed),
                    };
                    if client.is_none() {
                        client = self.connect().await;
                    }
                    let Some(c) = client.as_mut() else { continue };
                    match tokio::time::timeout(CALL_TIMEOUT, c.report_gateway(request)).await {
                        Ok(Ok(directive)) => region.apply(&directive.into_inner()),
                        // The ring manager is away: keep the last directive (static stability).
                        _ => client = None,
                    }
                }
                _ = tick.tick() => {
                    if region.draining() && region.has_redirect() {
                        let per_tick = (region.rate() as usize / 10).max(1);
                        region.close_batch(per_tick);
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Option<RingManagerClient<tonic::transport::Channel>> {
        let endpoint = self.ring_source.endpoint().await.ok()?;
        let channel = mesh_transport::endpoint(&endpoint)
            .ok()?
            .connect_timeout(CALL_TIMEOUT)
            .connect()
            .await
            .ok()?;
        Some(RingManagerClient::new(channel))
    }
}
