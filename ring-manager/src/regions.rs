//! Regions: the gateways of each region as they report themselves, each region's drain state,
//! and where a draining region's clients should go (its nearest healthy region).
//!
//! Soft state: gateways report about every half second, so a restarted (or newly elected) ring
//! manager knows every live gateway within a second; a drain in progress must be issued again
//! after a ring manager restart.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_proto::ring as pb;
use tonic::Status;

/// Default: goodbyes per second per gateway during a drain.
pub const DEFAULT_DRAIN_RATE: u32 = 100;
/// A gateway not heard from for this long no longer counts.
pub const GATEWAY_STALE: Duration = Duration::from_secs(3);

#[derive(Debug)]
struct Gateway {
    region: String,
    url: String,
    connections: u64,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct State {
    gateways: BTreeMap<String, Gateway>,
    /// Draining regions and their rate.
    draining: BTreeMap<String, u32>,
    /// Configured nearest regions per region, nearest first.
    nearest: BTreeMap<String, Vec<String>>,
    /// Revoked tokens, which every report's directive brings the gateway up to date with.
    revocations: crate::revocations::Revocations,
}

/// The regions a ring manager knows.
#[derive(Debug, Default)]
pub struct Regions {
    state: Mutex<State>,
}

impl Regions {
    /// Regions with `nearest` configured (region -> nearest regions first); a region without
    /// a configured order prefers the others by name.
    pub fn new(nearest: Vec<(String, Vec<String>)>) -> Self {
        Regions {
            state: Mutex::new(State {
                nearest: nearest.into_iter().collect(),
                ..State::default()
            }),
        }
    }

    /// Replaces the configured nearest regions.
    pub fn set_nearest(&self, nearest: Vec<(String, Vec<String>)>) {
        self.state().nearest = nearest.into_iter().collect();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a gateway's report; answers whether its region drains, where to send clients, and
    /// the token revocations it lacks.
    pub fn report(&self, report: pb::GatewayReport) -> pb::GatewayDirective {
        let mut state = self.state();
        let region = report.region.clone();
        let held = (report.revocations_generation, report.revocations_version);
        state.gateways.insert(
            report.gateway,
            Gateway {
                region: report.region,
                url: report.url,
                connections: report.connections,
                last_seen: Instant::now(),
            },
        );
        let mut directive = match state.draining.get(&region).copied() {
            Some(rate) => pb::GatewayDirective {
                draining: true,
                rate,
                redirect: Self::redirect(&state, &region),
                ..Default::default()
            },
            None => pb::GatewayDirective::default(),
        };
        state.revocations.catch_up(held.0, held.1, &mut directive);
        directive
    }

    /// Revokes tokens by `jti` until they expire (see [`crate::revocations`]).
    pub fn revoke(
        &self,
        request: pb::RevokeTokensRequest,
    ) -> Result<pb::RevokeTokensResponse, Status> {
        self.state().revocations.revoke(request.jtis)
    }

    /// Every known region, nearest first for `region`.
    fn order(state: &State, region: &str) -> Vec<String> {
        let mut known: Vec<String> = state
            .gateways
            .values()
            .map(|g| g.region.clone())
            .chain(state.nearest.keys().cloned())
            .filter(|r| r != region)
            .collect();
        known.sort();
        known.dedup();
        let mut order = state.nearest.get(region).cloned().unwrap_or_default();
        order.retain(|r| r != region);
        for r in known {
            if !order.contains(&r) {
                order.push(r);
            }
        }
        order
    }

    /// Base URLs of the live gateways of the nearest healthy region, least loaded first.
    fn redirect(state: &State, region: &str) -> Vec<String> {
        let now = Instant::now();
        for candidate in Self::order(state, region) {
            if state.draining.contains_key(&candidate) {
                continue;
            }
            let mut live: Vec<&Gateway> = state
                .gateways
                .values()
                .filter(|g| {
                    g.region == candidate && now.duration_since(g.last_seen) < GATEWAY_STALE
                })
                .collect();
            if live.is_empty() {
                continue;
            }
            live.sort_by_key(|g| g.connections);
            return live.into_iter().map(|g| g.url.clone()).collect();
        }
        Vec::new()
    }

    /// Starts draining `region` at `rate` goodbyes per second per gateway (0: the default).
    pub fn drain(&self, region: &str, rate: u32) -> Result<pb::RegionsView, Status> {
        let mut state = self.state();
        if !state.gateways.values().any(|g| g.region == region) {
            return Err(Status::failed_precondition(format!(
                "no gateway of region {region} has reported"
            )));
        }
        let mut trial = State {
            gateways: BTreeMap::new(),
            draining: state.draining.clone(),
            nearest: state.nearest.clone(),
            revocations: Default::default(),
        };
        trial.draining.insert(region.to_string(), 1);
        // Only the gateways matter for the check; borrow them from the real state.
        std::mem::swap(&mut trial.gateways, &mut state.gateways);
        let target = Self::redirect(&trial, region);
        std::mem::swap(&mut trial.gateways, &mut state.gateways);
        if target.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no healthy region to move {region}'s clients to"
            )));
        }
        let rate = if rate == 0 { DEFAULT_DRAIN_RATE } else { rate };
        state.draining.insert(region.to_string(), rate);
        tracing::info!(region, rate, "draining region");
        Ok(Self::view_locked(&state))
    }

    /// Ends `region`'s drain.
    pub fn undrain(&self, region: &str) -> pb::RegionsView {
        let mut state = self.state();
        if state.draining.remove(region).is_some() {
            tracing::info!(region, "region no longer draining");
        }
        Self::view_locked(&state)
    }

    /// What `ctl regions` shows.
    pub fn view(&self) -> pb::RegionsView {
        Self::view_locked(&self.state())
    }

    fn view_locked(state: &State) -> pb::RegionsView {
        let now = Instant::now();
        let mut regions: BTreeMap<String, pb::RegionView> = BTreeMap::new();
        for (id, g) in &state.gateways {
            let stale = now.duration_since(g.last_seen) >= GATEWAY_STALE;
            let view = regions.entry(g.region.clone()).or_default();
            if !stale {
                view.connections += g.connections;
            }
            view.gateways.push(pb::GatewayView {
                id: id.clone(),
                url: g.url.clone(),
                connections: if stale { 0 } else { g.connections },
                last_seen_ms: now.duration_since(g.last_seen).as_millis() as u64,
            });
        }
        for region in state.draining.keys().chain(state.nearest.keys()) {
            regions.entry(region.clone()).or_default();
        }
        pb::RegionsView {
            regions: regions
                .into_iter()
                .map(|(region, mut view)| {
                    view.draining = state.draining.contains_key(&region);
                    view.rate = state.draining.get(&region).copied().unwrap_or(0);
                    view.nearest = Self::order(state, &region);
                    view.region = region;
                    view
                })
                .collect(),
        }
    }
}
