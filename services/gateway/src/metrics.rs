//! The gateway's metrics (`channelmesh_gateway_*`, every series labelled with `gateway` and
//! `region`), registered in its own [`Telemetry`] and served on its HTTP port at `/metrics`.
//! docs/operations.md ("Metrics, traces, health") lists them; every client limit is counted here.

use std::sync::Arc;
use std::time::Instant;

use mesh_telemetry::Telemetry;

use crate::close::{Close, codes};
use mesh_telemetry::prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

/// Handles on one gateway's metrics; shared by its hub, routes and connections.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    /// WebSocket connections that reached `hello`.
    pub connects: IntCounter,
    /// Connects refused, by reason (`max_connections`, `handshake_rate`, `user_rate`,
    /// `address_rate`, `draining`, ...).
    pub connect_refusals: IntCounterVec,
    /// Calls of the other Slack methods refused, by method and reason (`user_rate`,
    /// `address_rate`).
    pub api_refusals: IntCounterVec,
    /// Requests refused for their body, by reason (`too_large`, `timeout`).
    pub body_refusals: IntCounterVec,
    /// Places under the team and user caps given back by connect URLs not used within the
    /// hold (`tickets::SLOT_HOLD`).
    pub ticket_places_released: IntCounter,
    /// Keys each per-user or per-address rate limit remembers, by table (set at scrape time).
    pub rate_limit_keys: IntGaugeVec,
    /// Connections ended, by close code (`none`: the client went away without one).
    pub disconnects: IntCounterVec,
    /// Connections closed as slow consumers (4008: queue overflow or a stalled write).
    pub slow_consumers: IntCounter,
    /// Client frames refused by the per-connection rate limit (error 11).
    pub rate_limited: IntCounter,
    /// Typing indicators dropped as repeats within the typing interval.
    pub typing_coalesced: IntCounter,
    /// HTTP connections closed because their request headers did not arrive in time.
    pub header_timeouts: IntCounter,
    /// Client posts (messages, typing) refused, by reason (`not_in_channel`,
    /// `read_only_channel`: the user's or the team's own channel).
    pub posts_refused: IntCounterVec,
    /// `ChannelJoined`/`ChannelLeft` directives a connection ignored: they came on a channel
    /// other than its user's own.
    pub directives_ignored: IntCounter,
    /// Presence answers and changes withheld from a client: the user is of another team, or
    /// their team is not known.
    pub presence_withheld: IntCounter,
    /// Redirect targets skipped by a draining gateway: not on `--redirect-allow`.
    pub redirects_refused: IntCounter,
    /// Items not queued to a connection because its queue (items or bytes) was full.
    pub queue_drops: IntCounter,
    /// Events queued to local connections by the fan-out: one per event per receiving
    /// connection, all-time.
    pub delivered: IntCounter,
    /// Events handed to connections' sockets (live, catch-up and resumed).
    pub written: IntCounter,
    /// Channel server -> gateway: from the channel server's fan-out to this gateway's
    /// receipt (wall clocks of two machines; same-host figures are exact).
    pub cs_to_gateway: Histogram,
    /// Gateway -> socket: from the event's receipt to its write to a connection's socket.
    pub gateway_to_socket: Histogram,
    /// Upstream subscription streams that failed (each is reopened).
    pub upstream_failures: IntCounter,
    /// Catch-ups from history after a resubscription, by outcome (`ok`, `failed`).
    pub catch_ups: IntCounterVec,
    /// Resumes from client cursors, and those that had to say `history_gap`.
    pub resumes: IntCounter,
    pub history_gaps: IntCounter,
    /// `history_gap` frames written to live connections when a channel's history floor
    /// jumped (or a catch-up could not be read whole).
    pub live_gaps: IntCounter,
    /// Set at scrape time.
    pub connections: IntGauge,
    pub channels: IntGauge,
    pub upstreams: IntGauge,
    pub presence_watched: IntGauge,
    pub presence_online: IntGauge,
    pub presence_sessions: IntGauge,
    pub ring_epoch: IntGauge,
    pub draining: IntGauge,
}

impl GatewayMetrics {
    /// Registers a gateway's metrics in `telemetry`.
    pub fn new(telemetry: &Telemetry) -> Arc<Self> {
        let t = telemetry;
        Arc::new(GatewayMetrics {
            connects: t.counter(
                "channelmesh_gateway_connects_total",
                "WebSocket connections that reached hello.",
            ),
            connect_refusals: t.counter_vec(
                "channelmesh_gateway_connect_refusals_total",
                "rtm.connect calls and WebSocket upgrades refused, by reason.",
                &["reason"],
            ),
            api_refusals: t.counter_vec(
                "channelmesh_gateway_api_refusals_total",
                "auth.test and users.* calls refused, by method and reason.",
                &["method", "reason"],
            ),
            body_refusals: t.counter_vec(
                "channelmesh_gateway_request_body_refusals_total",
                "Requests refused for their body (too_large: over the cap; timeout: not sent in time), by reason.",
                &["reason"],
            ),
            ticket_places_released: t.counter(
                "channelmesh_gateway_ticket_places_released_total",
                "Places under team and user caps given back by connect URLs not used within the hold.",
            ),
            rate_limit_keys: t.gauge_vec(
                "channelmesh_gateway_rate_limit_keys",
                "Users or client addresses a per-user or per-address rate limit remembers, by table.",
                &["table"],
            ),
            disconnects: t.counter_vec(
                "channelmesh_gateway_disconnects_total",
                "Connections ended, by the close code the gateway sent (none: the client left).",
                &["code"],
            ),
            slow_consumers: t.counter(
                "channelmesh_gateway_slow_consumer_disconnects_total",
                "Connections closed as slow consumers (4008): queue over its bound, or a write stalled.",
            ),
            rate_limited: t.counter(
                "channelmesh_gateway_rate_limited_frames_total",
                "Client frames refused by the per-connection rate limit (error 11).",
            ),
            typing_coalesced: t.counter(
                "channelmesh_gateway_typing_coalesced_total",
                "Typing indicators dropped as repeats of one user in one channel.",
            ),
            header_timeouts: t.counter(
                "channelmesh_gateway_header_timeouts_total",
                "HTTP connections closed: request headers not sent within the handshake timeout.",
            ),
            posts_refused: t.counter_vec(
                "channelmesh_gateway_posts_refused_total",
                "Client messages and typing refused, by reason (not_in_channel, restricted_action_read_only_channel, policy_read_only, channel_rate_limited, typing_not_relayed).",
                &["reason"],
            ),
            directives_ignored: t.counter(
                "channelmesh_gateway_directives_ignored_total",
                "Channel join/leave directives a connection ignored: not on its user's own channel.",
            ),
            presence_withheld: t.counter(
                "channelmesh_gateway_presence_withheld_total",
                "Presence answers and changes withheld from a client: a user of another team, or of no known team.",
            ),
            redirects_refused: t.counter(
                "channelmesh_gateway_redirects_refused_total",
                "Gateways a draining gateway did not forward rtm.connect to: not on --redirect-allow.",
            ),
            queue_drops: t.counter(
                "channelmesh_gateway_queue_drops_total",
                "Items not queued to a connection because its outgoing queue was full (the connection is closed).",
            ),
            delivered: t.counter(
                "channelmesh_gateway_events_delivered_total",
                "Events queued to local connections by the fan-out: one per event per receiving connection.",
            ),
            written: t.counter(
                "channelmesh_gateway_events_written_total",
                "Events handed to connections' sockets (live, catch-up and resumed).",
            ),
            cs_to_gateway: t.latency(
                "channelmesh_gateway_cs_to_gateway_seconds",
                "Channel server -> gateway: from the channel server's fan-out to this gateway's receipt.",
            ),
            gateway_to_socket: t.latency(
                "channelmesh_gateway_gateway_to_socket_seconds",
                "Gateway -> socket: from an event's receipt to its write to a connection's socket.",
            ),
            upstream_failures: t.counter(
                "channelmesh_gateway_upstream_failures_total",
                "Subscription streams to channel servers that failed (their channels resubscribe).",
            ),
            catch_ups: t.counter_vec(
                "channelmesh_gateway_catch_ups_total",
                "History catch-ups after a channel's resubscription, by outcome.",
                &["outcome"],
            ),
            resumes: t.counter(
                "channelmesh_gateway_resumes_total",
                "Channels resumed from a client's cursor.",
            ),
            history_gaps: t.counter(
                "channelmesh_gateway_history_gaps_total",
                "Resumes that told the client history_gap (history no longer reached its cursor).",
            ),
            live_gaps: t.counter(
                "channelmesh_gateway_live_history_gaps_total",
                "history_gap frames written to live connections: a channel's history floor jumped past what they had, or a catch-up could not be read whole.",
            ),
            connections: t.gauge(
                "channelmesh_gateway_connections",
                "Open client connections.",
            ),
            channels: t.gauge(
                "channelmesh_gateway_channels",
                "Channels wanted by at least one local connection.",
            ),
            upstreams: t.gauge(
                "channelmesh_gateway_upstream_streams",
                "Open subscription streams to channel servers.",
            ),
            presence_watched: t.gauge(
                "channelmesh_gateway_presence_watched_users",
                "Users watched by this gateway's connections (presence subscriptions, each user once).",
            ),
            presence_online: t.gauge(
                "channelmesh_gateway_presence_online_users",
                "Users with a connection on this gateway.",
            ),
            presence_sessions: t.gauge(
                "channelmesh_gateway_presence_sessions",
                "Open sessions to presence servers.",
            ),
            ring_epoch: t.gauge(
                "channelmesh_gateway_ring_epoch",
                "The newest ring epoch this gateway routes by.",
            ),
            draining: t.gauge(
                "channelmesh_gateway_draining",
                "1 while the gateway's region drains, else 0.",
            ),
        })
    }

    /// A connection said `hello`.
    pub fn connected(&self) {
        self.connects.inc();
    }

    /// A connect refused for `reason`.
    pub fn connect_refused(&self, reason: &str) {
        self.connect_refusals.with_label_values(&[reason]).inc();
    }

    /// A call of `method` (`auth.test`, `users.getPresence`, ...) refused for `reason`.
    pub fn api_refused(&self, method: &str, reason: &str) {
        self.api_refusals.with_label_values(&[method, reason]).inc();
    }

    /// A request refused for its body, for `reason`.
    pub fn body_refused(&self, reason: &str) {
        self.body_refusals.with_label_values(&[reason]).inc();
    }

    /// A connection ended, closed for `close` (`None`: without a close frame from us).
    pub fn disconnected(&self, close: Option<Close>) {
        let code = close.map(Close::code);
        let label = code.map_or_else(|| "none".to_string(), |c| c.to_string());
        self.disconnects.with_label_values(&[&label]).inc();
        if code == Some(codes::SLOW_CONSUMER) {
            self.slow_consumers.inc();
        }
    }

    /// A client frame refused by the rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// `n` events were written to a connection's socket in one batch, the oldest of them
    /// received by the gateway at `oldest`. The latency is observed once per batch (its
    /// oldest event's), not per event: per event it cost the fan-out a clock read and a
    /// histogram update for every recipient.
    pub fn written(&self, n: u64, oldest: Option<Instant>) {
        self.written.inc_by(n);
        if let Some(received) = oldest {
            self.gateway_to_socket
                .observe(received.elapsed().as_secs_f64());
        }
    }

    /// An event fanned out at `published_micros` (the channel server's clock) arrived now.
    pub fn received(&self, published_micros: u64) -> Instant {
        if let Some(age) = mesh_telemetry::metrics::seconds_since_unix_micros(published_micros) {
            self.cs_to_gateway.observe(age);
        }
        Instant::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_valid_and_labelled() {
        let telemetry = Telemetry::new(&[("gateway", "us-east-1"), ("region", "us-east")]);
        let metrics = GatewayMetrics::new(&telemetry);
        metrics.disconnected(Some(Close::WriteStalled));
        metrics.disconnected(None);
        metrics.connect_refused("max_connections");
        let text = telemetry.encode();
        assert!(!text.contains("invalid"), "{text}");
        let slow = text
            .lines()
            .find(|l| l.starts_with("channelmesh_gateway_slow_consumer_disconnects_total{"))
            .expect("the slow-consumer counter is exported");
        assert!(slow.contains("gateway=\"us-east-1\""), "{slow}");
        assert!(slow.contains("region=\"us-east\""), "{slow}");
        assert!(slow.ends_with(" 1"), "{slow}");
        assert!(text.contains("code=\"4008\""));
        assert!(text.contains("code=\"none\""));
    }
}
