//! Regions: the gateways of each region as they report themselves, each region's drain state,
//! and where a draining region's clients should go (its nearest healthy region).
//!
//! The gateways are soft state: they report about every half second, so a restarted (or newly
//! elected) ring manager knows every live gateway within a second. The drains and the token
//! revocations are not: they are saved with the ring ([`Regions::durable`]) before a change is
//! answered, and a restarted or newly elected ring manager restores them
//! ([`Regions::restore`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::disconnects::{
    DisconnectError, DisconnectOrder, Disconnected, Disconnects, OrdersCatchUp,
};
use crate::revocations::{CatchUp, RevocationError, Revocations, Revoked, RevokedToken};

/// Default: goodbyes per second per gateway during a drain.
pub const DEFAULT_DRAIN_RATE: u32 = 100;
/// A gateway not heard from for this long no longer counts.
pub const GATEWAY_STALE: Duration = Duration::from_secs(3);

/// A gateway's report of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayReport {
    pub gateway: String,
    pub region: String,
    /// The gateway's base URL for clients (no `/api/`).
    pub url: String,
    pub connections: u64,
    /// The revocation list the gateway holds: (generation, version), (0, 0) at first.
    pub revocations: (u64, u64),
    /// The disconnect orders the gateway has taken: (generation, version), (0, 0) at first.
    pub disconnects: (u64, u64),
}

/// The answer to a report: whether the gateway's region drains, where its clients go, and the
/// revocations it lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directive {
    pub draining: bool,
    /// Goodbyes per second while draining.
    pub rate: u32,
    /// Base URLs of healthy gateways to send clients to (the nearest healthy region's, least
    /// loaded first).
    pub redirect: Vec<String>,
    pub revocations: CatchUp,
    pub disconnects: OrdersCatchUp,
}

/// Every region, as `ctl regions` and the console show them. Serialized as the bare list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegionsView {
    /// Sorted by name.
    pub regions: Vec<RegionView>,
}

/// A region, as `ctl regions --json` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionView {
    pub region: String,
    pub draining: bool,
    /// Goodbyes per second per gateway while draining.
    pub rate: u32,
    /// Connections of its live gateways.
    pub connections: u64,
    /// Nearest regions first.
    pub nearest: Vec<String>,
    /// Sorted by id.
    pub gateways: Vec<GatewayView>,
}

/// A gateway of a region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayView {
    pub id: String,
    pub url: String,
    /// 0 once stale.
    pub connections: u64,
    /// Milliseconds since its last report.
    pub last_seen_ms: u64,
    /// Not heard from for [`GATEWAY_STALE`]: no longer counted.
    pub stale: bool,
}

impl GatewayView {
    /// Whether a gateway last seen `last_seen_ms` ago is stale (the same as measuring the
    /// age itself: milliseconds are truncated).
    pub fn is_stale(last_seen_ms: u64) -> bool {
        last_seen_ms >= GATEWAY_STALE.as_millis() as u64
    }
}

/// Why a region operation or report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// A report without a gateway id or a region.
    #[error("gateway and region are required")]
    Unnamed,
    #[error("no gateway of region {0} has reported")]
    NoGateway(String),
    /// Draining it would leave its clients nowhere to go.
    #[error("no healthy region to move {0}'s clients to")]
    NoHealthyRegion(String),
}

#[derive(Debug)]
struct Gateway {
    region: String,
    url: String,
    connections: u64,
    last_seen: Instant,
}

impl Gateway {
    fn live(&self, now: Instant) -> bool {
        now.duration_since(self.last_seen) < GATEWAY_STALE
    }
}

/// What of the regions is saved with the ring: the regions draining (with their rate) and the
/// token revocations. Taken before a change, put back if the change cannot be saved.
#[derive(Debug, Clone)]
pub struct Durable {
    draining: BTreeMap<String, u32>,
    revocations: Revocations,
}

/// The regions a ring manager knows, and the revoked tokens every report's directive brings
/// the gateway up to date with.
#[derive(Debug, Default)]
pub struct Regions {
    gateways: BTreeMap<String, Gateway>,
    /// Draining regions and their rate.
    draining: BTreeMap<String, u32>,
    /// Configured nearest regions per region, nearest first.
    nearest: BTreeMap<String, Vec<String>>,
    revocations: Revocations,
    /// Disconnect orders: soft state, never saved.
    disconnects: Disconnects,
}

impl Regions {
    /// Regions knowing no gateway yet, with the saved drains (region, rate) and revocations.
    pub fn restore(draining: Vec<(String, u32)>, revoked: Vec<RevokedToken>) -> Self {
        for (region, rate) in &draining {
            tracing::info!(region, rate, "region still draining (restored)");
        }
        Regions {
            draining: draining.into_iter().collect(),
            revocations: Revocations::restore(revoked),
            ..Regions::default()
        }
    }

    /// What is saved with the ring: the regions draining (region, rate) by name, and the
    /// revoked tokens.
    pub fn saved(&self) -> (Vec<(String, u32)>, Vec<RevokedToken>) {
        (
            self.draining
                .iter()
                .map(|(region, &rate)| (region.clone(), rate))
                .collect(),
            self.revocations.saved(),
        )
    }

    /// A copy of what is saved with the ring, to put back if a change cannot be saved.
    pub fn durable(&self) -> Durable {
        Durable {
            draining: self.draining.clone(),
            revocations: self.revocations.clone(),
        }
    }

    /// Puts back what [`Regions::durable`] took (a change that could not be saved).
    pub fn put_back(&mut self, durable: Durable) {
        self.draining = durable.draining;
        self.revocations = durable.revocations;
    }

    /// Replaces the configured nearest regions (region -> nearest regions first); a region
    /// without a configured order prefers the others by name.
    pub fn set_nearest(&mut self, nearest: Vec<(String, Vec<String>)>) {
        self.nearest = nearest.into_iter().collect();
    }

    /// Takes a gateway's report at `now`; answers whether its region drains, where to send
    /// clients, and the token revocations it lacks.
    pub fn report(
        &mut self,
        report: GatewayReport,
        now: Instant,
    ) -> Result<Directive, RegionError> {
        if report.gateway.is_empty() || report.region.is_empty() {
            return Err(RegionError::Unnamed);
        }
        let region = report.region.clone();
        let (generation, version) = report.revocations;
        let (orders_generation, orders_version) = report.disconnects;
        self.gateways.insert(
            report.gateway,
            Gateway {
                region: report.region,
                url: report.url,
                connections: report.connections,
                last_seen: now,
            },
        );
        let mut directive = match self.draining.get(&region).copied() {
            Some(rate) => Directive {
                draining: true,
                rate,
                redirect: self.redirect(&region, now),
                ..Directive::default()
            },
            None => Directive::default(),
        };
        directive.revocations = self.revocations.catch_up(generation, version);
        directive.disconnects = self
            .disconnects
            .catch_up(orders_generation, orders_version, now);
        Ok(directive)
    }

    /// Orders gateways to close users' connections (see [`crate::disconnects`]).
    pub fn disconnect(
        &mut self,
        orders: Vec<DisconnectOrder>,
        now: Instant,
    ) -> Result<Disconnected, DisconnectError> {
        self.disconnects.order(orders, now)
    }

    /// Revokes tokens by `jti` until they expire (see [`crate::revocations`]).
    pub fn revoke(&mut self, entries: Vec<RevokedToken>) -> Result<Revoked, RevocationError> {
        self.revocations.revoke(entries)
    }

    /// Every known region, nearest first for `region`.
    fn order(&self, region: &str) -> Vec<String> {
        let mut known: Vec<String> = self
            .gateways
            .values()
            .map(|g| g.region.clone())
            .chain(self.nearest.keys().cloned())
            .filter(|r| r != region)
            .collect();
        known.sort();
        known.dedup();
        let mut order = self.nearest.get(region).cloned().unwrap_or_default();
        order.retain(|r| r != region);
        for r in known {
            if !order.contains(&r) {
                order.push(r);
            }
        }
        order
    }

    /// Base URLs of the live gateways of the nearest healthy region, least loaded first.
    fn redirect(&self, region: &str, now: Instant) -> Vec<String> {
        for candidate in self.order(region) {
            if self.draining.contains_key(&candidate) {
                continue;
            }
            let mut live: Vec<&Gateway> = self
                .gateways
                .values()
                .filter(|g| g.region == candidate && g.live(now))
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
    pub fn drain(
        &mut self,
        region: &str,
        rate: u32,
        now: Instant,
    ) -> Result<RegionsView, RegionError> {
        if !self.gateways.values().any(|g| g.region == region) {
            return Err(RegionError::NoGateway(region.to_string()));
        }
        // The redirect never considers the region itself, so it is the same before and after
        // the region starts draining.
        if self.redirect(region, now).is_empty() {
            return Err(RegionError::NoHealthyRegion(region.to_string()));
        }
        let rate = if rate == 0 { DEFAULT_DRAIN_RATE } else { rate };
        self.draining.insert(region.to_string(), rate);
        tracing::info!(region, rate, "draining region");
        Ok(self.view(now))
    }

    /// Ends `region`'s drain.
    pub fn undrain(&mut self, region: &str, now: Instant) -> RegionsView {
        if self.draining.remove(region).is_some() {
            tracing::info!(region, "region no longer draining");
        }
        self.view(now)
    }

    /// What `ctl regions` shows at `now`: every region with a gateway, a drain or a configured
    /// nearest order.
    pub fn view(&self, now: Instant) -> RegionsView {
        let mut regions: BTreeMap<String, RegionView> = BTreeMap::new();
        for (id, g) in &self.gateways {
            let age = now.duration_since(g.last_seen);
            let live = g.live(now);
            let view = regions.entry(g.region.clone()).or_default();
            if live {
                view.connections += g.connections;
            }
            view.gateways.push(GatewayView {
                id: id.clone(),
                url: g.url.clone(),
                connections: if live { g.connections } else { 0 },
                last_seen_ms: age.as_millis() as u64,
                stale: !live,
            });
        }
        for region in self.draining.keys().chain(self.nearest.keys()) {
            regions.entry(region.clone()).or_default();
        }
        RegionsView {
            regions: regions
                .into_iter()
                .map(|(region, mut view)| {
                    view.draining = self.draining.contains_key(&region);
                    view.rate = self.draining.get(&region).copied().unwrap_or(0);
                    view.nearest = self.order(&region);
                    view.region = region;
                    view
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(gateway: &str, region: &str, connections: u64) -> GatewayReport {
        GatewayReport {
            gateway: gateway.into(),
            region: region.into(),
            url: format!("http://{gateway}"),
            connections,
            revocations: (0, 0),
            disconnects: (0, 0),
        }
    }

    fn nearest(pairs: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        pairs
            .iter()
            .map(|(r, n)| (r.to_string(), n.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn drains_and_revocations_are_restored_and_put_back() {
        let mut regions = Regions::default();
        let now = Instant::now();
        regions.report(report("us-1", "us", 1), now).unwrap();
        regions.report(report("eu-1", "eu", 1), now).unwrap();
        regions.drain("us", 7, now).unwrap();
        let far = u64::MAX / 2;
        let token = RevokedToken {
            jti: "j".into(),
            expires_at: far,
        };
        regions.revoke(vec![token.clone()]).unwrap();
        let (draining, revoked) = regions.saved();
        assert_eq!(draining, [("us".to_string(), 7)]);
        assert_eq!(revoked, std::slice::from_ref(&token));
        // A restarted ring manager: the drain holds before any gateway reports again.
        let mut back = Regions::restore(draining, revoked);
        let view = back.view(now);
        assert!(
            view.regions
                .iter()
                .any(|r| r.region == "us" && r.draining && r.rate == 7)
        );
        let directive = back.report(report("us-1", "us", 1), now).unwrap();
        assert!(directive.draining);
        assert_eq!(directive.revocations.revoked, [token]);
        // A change put back leaves what was before it.
        let before = back.durable();
        back.undrain("us", now);
        back.put_back(before);
        assert!(back.report(report("us-1", "us", 1), now).unwrap().draining);
    }

    #[test]
    fn a_report_needs_a_gateway_and_a_region() {
        let mut regions = Regions::default();
        let now = Instant::now();
        assert_eq!(
            regions.report(report("", "us", 1), now),
            Err(RegionError::Unnamed)
        );
        assert_eq!(
            regions.report(report("gw-1", "", 1), now),
            Err(RegionError::Unnamed)
        );
        assert!(regions.view(now).regions.is_empty());
        let directive = regions.report(report("gw-1", "us", 1), now).unwrap();
        assert!(!directive.draining && directive.redirect.is_empty());
        assert_ne!(directive.revocations.generation, 0);
    }

    #[test]
    fn a_drain_sends_clients_to_the_nearest_healthy_region_least_loaded_first() {
        let mut regions = Regions::default();
        regions.set_nearest(nearest(&[("us", &["eu", "ap"])]));
        let now = Instant::now();
        for (gw, region, load) in [
            ("us-1", "us", 5),
            ("eu-1", "eu", 9),
            ("eu-2", "eu", 2),
            ("ap-1", "ap", 0),
        ] {
            regions.report(report(gw, region, load), now).unwrap();
        }
        let view = regions.drain("us", 0, now).unwrap();
        let us = view.regions.iter().find(|r| r.region == "us").unwrap();
        assert!(us.draining);
        assert_eq!(us.rate, DEFAULT_DRAIN_RATE);
        assert_eq!(us.nearest, ["eu", "ap"]);
        let directive = regions.report(report("us-1", "us", 5), now).unwrap();
        assert!(directive.draining);
        assert_eq!(directive.rate, DEFAULT_DRAIN_RATE);
        assert_eq!(directive.redirect, ["http://eu-2", "http://eu-1"]);
        // A draining region is no one's target: with eu draining too, us goes to ap.
        regions.drain("eu", 7, now).unwrap();
        let directive = regions.report(report("us-1", "us", 5), now).unwrap();
        assert_eq!(directive.redirect, ["http://ap-1"]);
        let eu = regions.report(report("eu-1", "eu", 9), now).unwrap();
        assert_eq!((eu.draining, eu.rate), (true, 7));
        // Undrained, us serves again and eu's clients may go back to it.
        let view = regions.undrain("us", now);
        assert!(!view.regions.iter().any(|r| r.region == "us" && r.draining));
        let directive = regions.report(report("us-1", "us", 5), now).unwrap();
        assert!(!directive.draining && directive.redirect.is_empty());
        // eu has no configured order: it prefers the others by name.
        assert_eq!(
            regions
                .report(report("eu-1", "eu", 9), now)
                .unwrap()
                .redirect,
            ["http://ap-1"]
        );
        regions.drain("ap", 0, now).unwrap();
        assert_eq!(
            regions
                .report(report("eu-1", "eu", 9), now)
                .unwrap()
                .redirect,
            ["http://us-1"]
        );
    }

    #[test]
    fn a_drain_is_refused_without_gateways_or_a_healthy_region() {
        let mut regions = Regions::default();
        let now = Instant::now();
        assert_eq!(
            regions.drain("us", 0, now),
            Err(RegionError::NoGateway("us".into()))
        );
        regions.report(report("us-1", "us", 1), now).unwrap();
        assert_eq!(
            regions.drain("us", 0, now),
            Err(RegionError::NoHealthyRegion("us".into()))
        );
        // A region whose gateways are all stale is not healthy.
        regions.report(report("eu-1", "eu", 1), now).unwrap();
        let later = now + GATEWAY_STALE;
        regions.report(report("us-1", "us", 1), later).unwrap();
        assert_eq!(
            regions.drain("us", 0, later),
            Err(RegionError::NoHealthyRegion("us".into()))
        );
        assert!(regions.drain("us", 0, now).is_ok());
        // Undraining a region that does not drain changes nothing.
        assert_eq!(regions.undrain("ap", now), regions.view(now));
    }

    #[test]
    fn stale_gateways_stay_listed_but_no_longer_count() {
        let mut regions = Regions::default();
        regions.set_nearest(nearest(&[("ap", &[])]));
        let now = Instant::now();
        regions.report(report("us-1", "us", 4), now).unwrap();
        regions
            .report(report("us-2", "us", 6), now + Duration::from_secs(2))
            .unwrap();
        let view = regions.view(now + GATEWAY_STALE + Duration::from_millis(1));
        let names: Vec<&str> = view.regions.iter().map(|r| r.region.as_str()).collect();
        assert_eq!(names, ["ap", "us"], "a configured region is listed too");
        let us = &view.regions[1];
        assert_eq!(us.connections, 6);
        assert_eq!(
            us.gateways,
            [
                GatewayView {
                    id: "us-1".into(),
                    url: "http://us-1".into(),
                    connections: 0,
                    last_seen_ms: 3001,
                    stale: true,
                },
                GatewayView {
                    id: "us-2".into(),
                    url: "http://us-2".into(),
                    connections: 6,
                    last_seen_ms: 1001,
                    stale: false,
                },
            ]
        );
        assert!(GatewayView::is_stale(3000) && !GatewayView::is_stale(2999));
    }

    #[test]
    fn the_view_serializes_as_the_console_and_ctl_json() {
        let view = RegionsView {
            regions: vec![RegionView {
                region: "us".into(),
                draining: true,
                rate: 100,
                connections: 2,
                nearest: vec!["eu".into()],
                gateways: vec![GatewayView {
                    id: "gw".into(),
                    url: "http://gw".into(),
                    connections: 2,
                    last_seen_ms: 40,
                    stale: false,
                }],
            }],
        };
        let json = serde_json::to_string(&view).unwrap();
        assert_eq!(
            json,
            r#"[{"region":"us","draining":true,"rate":100,"connections":2,"nearest":["eu"],"gateways":[{"id":"gw","url":"http://gw","connections":2,"last_seen_ms":40,"stale":false}]}]"#
        );
        assert_eq!(serde_json::from_str::<RegionsView>(&json).unwrap(), view);
    }

    #[test]
    fn reports_carry_the_revocations_the_gateway_lacks() {
        let mut regions = Regions::default();
        let now = Instant::now();
        let first = regions.report(report("gw", "us", 0), now).unwrap();
        assert!(first.revocations.revoked.is_empty());
        let far = u64::MAX / 2;
        regions
            .revoke(vec![RevokedToken {
                jti: "j".into(),
                expires_at: far,
            }])
            .unwrap();
        let mut r = report("gw", "us", 0);
        r.revocations = (first.revocations.generation, first.revocations.version);
        let next = regions.report(r, now).unwrap();
        assert_eq!(next.revocations.revoked.len(), 1);
        assert_eq!(next.revocations.version, first.revocations.version + 1);
    }

    #[test]
    fn reports_carry_the_disconnect_orders_the_gateway_lacks() {
        let mut regions = Regions::default();
        let now = Instant::now();
        let first = regions.report(report("gw", "us", 0), now).unwrap();
        assert!(first.disconnects.orders.is_empty());
        let order = DisconnectOrder {
            user: mesh_core::UserId::new("U1").unwrap(),
            team: None,
            reason: "bye".into(),
            reconnect: true,
            issued_at_ms: 0,
        };
        let done = regions.disconnect(vec![order], now).unwrap();
        assert_eq!((done.version, done.held), (1, 1));
        let mut r = report("gw", "us", 0);
        r.disconnects = (first.disconnects.generation, first.disconnects.version);
        let next = regions.report(r.clone(), now).unwrap();
        let users: Vec<&str> = next
            .disconnects
            .orders
            .iter()
            .map(|o| o.user.as_str())
            .collect();
        assert_eq!(users, ["U1"]);
        assert_eq!(next.disconnects.version, 1);
        // Not durable: a restored state has none, and putting back a failed change keeps them.
        regions.put_back(regions.durable());
        assert_eq!(regions.report(r, now).unwrap().disconnects.orders.len(), 1);
    }
}
