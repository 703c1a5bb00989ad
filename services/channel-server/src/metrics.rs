//! The channel server's metrics (`channelmesh_channel_*`), registered in its
//! [`mesh_telemetry::Telemetry`]; docs/operations.md ("Metrics, traces, health") lists them.

use mesh_core::EventBody;
use mesh_telemetry::Telemetry;
use mesh_telemetry::prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};

/// Handles on the channel server's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Events taken by Publish, by kind.
    pub published: IntCounterVec,
    /// Publish handling time, from the request to the event queued to every gateway.
    pub publish_seconds: Histogram,
    /// Publishes answered with the ts of an earlier publish with the same idempotency key
    /// (a retry), neither stored nor delivered again.
    pub publishes_deduplicated: IntCounter,
    /// Event copies queued to gateway streams (one per subscribed gateway per event).
    pub fanned_out: IntCounter,
    /// Gateway streams ended because their queue was full (the gateway fell behind).
    pub streams_fallen_behind: IntCounter,
    /// History reads, by outcome: `hit` (events returned) or `empty`.
    pub history_reads: IntCounterVec,
    /// Handoff attempts this node made, by outcome (`ok`, `failed`, `abandoned`).
    pub handoffs_sent: IntCounterVec,
    /// Channel history floors that jumped: a gateway had delivered past the channel's clock
    /// here, or a slot's state was lost (a takeover, a handoff that did not arrive in time).
    pub floor_jumps: IntCounter,
    /// Channels received in handoffs.
    pub handoff_channels_received: IntCounter,
    /// Set at scrape: open gateway streams, channel subscriptions, queued replies, channels
    /// held, the ring epoch known, slots owned, whether the lease holds.
    pub gateway_streams: IntGauge,
    pub subscriptions: IntGauge,
    pub queued_replies: IntGauge,
    pub channels: IntGauge,
    pub ring_epoch: IntGauge,
    pub slots_owned: IntGauge,
    pub lease_serving: IntGauge,
    pub replicated_out: IntCounterVec,
    pub replicated_in: IntCounter,
    pub replication_pending: IntGauge,
    pub slots_followed: IntGauge,
    pub slots_catching_up: IntGauge,
    pub catch_up_slots: IntCounterVec,
    pub catch_up_bytes: IntCounter,
    /// Channel facts for the web app (occupied, vacated, member added/removed, offline
    /// message) produced by the member accounting.
    pub member_facts: IntCounter,
    /// Set at scrape: gateway × channel × user entries accounted, and member reports not
    /// counted because a bound was reached.
    pub member_entries: IntGauge,
    pub members_known: IntGauge,
    pub member_reports_dropped: IntGauge,
}

impl Metrics {
    /// Registers the channel server's metrics in `telemetry`.
    pub fn new(telemetry: &Telemetry) -> Self {
        let t = telemetry;
        Metrics {
            member_facts: t.counter(
                "channelmesh_channel_member_facts_total",
                "Channel facts for the web app (channel_occupied/vacated, member_added/removed, user_offline_message) produced here.",
            ),
            member_entries: t.gauge(
                "channelmesh_channel_member_entries",
                "Gateway x channel x user entries of the member accounting.",
            ),
            members_known: t.gauge(
                "channelmesh_channel_members_known",
                "Users known to belong to channels here (seen subscribed, or joined), for user_offline_message.",
            ),
            member_reports_dropped: t.gauge(
                "channelmesh_channel_member_reports_dropped",
                "Member reports not counted because a bound of the accounting was reached (since start).",
            ),
            published: t.counter_vec(
                "channelmesh_channel_events_published_total",
                "Events taken by Publish, by kind.",
                &["kind"],
            ),
            publish_seconds: t.latency(
                "channelmesh_channel_publish_seconds",
                "Publish handling time: owner check, append, and queueing to every subscribed gateway.",
            ),
            publishes_deduplicated: t.counter(
                "channelmesh_channel_publishes_deduplicated_total",
                "Publishes whose idempotency key the channel had seen: answered with the first publish's ts, not stored or delivered again.",
            ),
            fanned_out: t.counter(
                "channelmesh_channel_events_fanned_out_total",
                "Event copies queued to gateway streams (one per subscribed gateway per event).",
            ),
            streams_fallen_behind: t.counter(
                "channelmesh_channel_streams_fallen_behind_total",
                "Gateway streams ended because their queue was full (the gateway resubscribes).",
            ),
            history_reads: t.counter_vec(
                "channelmesh_channel_history_reads_total",
                "History reads, by outcome: hit (events returned) or empty.",
                &["outcome"],
            ),
            handoffs_sent: t.counter_vec(
                "channelmesh_channel_handoffs_sent_total",
                "Handoff attempts of moved channels' state to a new owner, by outcome: ok, failed (retried), abandoned.",
                &["outcome"],
            ),
            floor_jumps: t.counter(
                "channelmesh_channel_floor_jumps_total",
                "Channel history floors that jumped (gateways are told history_gap): a gateway had delivered past the channel's clock here.",
            ),
            handoff_channels_received: t.counter(
                "channelmesh_channel_handoff_channels_received_total",
                "Channels whose state arrived in handoffs from their previous owner.",
            ),
            gateway_streams: t.gauge(
                "channelmesh_channel_gateway_streams",
                "Open subscription streams from gateways.",
            ),
            subscriptions: t.gauge(
                "channelmesh_channel_subscriptions",
                "Channel subscriptions of gateways (a channel subscribed by two gateways counts twice).",
            ),
            queued_replies: t.gauge(
                "channelmesh_channel_stream_queued_replies",
                "Replies queued to gateway streams and not yet sent, over all streams.",
            ),
            channels: t.gauge(
                "channelmesh_channel_channels",
                "Channels held in memory (with history or a ts floor).",
            ),
            ring_epoch: t.gauge(
                "channelmesh_channel_ring_epoch",
                "The newest ring epoch this channel server knows.",
            ),
            slots_owned: t.gauge(
                "channelmesh_channel_slots_owned",
                "Slots this channel server owns in that epoch.",
            ),
            lease_serving: t.gauge(
                "channelmesh_channel_lease_serving",
                "1 while this channel server holds its lease and may serve, else 0.",
            ),
            replicated_out: t.counter_vec(
                "channelmesh_channel_replicated_events_total",
                "Events this node sent its slots' followers, by outcome: acked (stored there) or refused (fenced: the follower's ring disagrees).",
                &["outcome"],
            ),
            replicated_in: t.counter(
                "channelmesh_channel_replica_events_stored_total",
                "Events stored here as a follower, replicated by their slot's owner.",
            ),
            replication_pending: t.gauge(
                "channelmesh_channel_replication_pending",
                "Events given a ts and waiting for their followers' acknowledgement before they are stored, delivered and answered.",
            ),
            slots_followed: t.gauge(
                "channelmesh_channel_slots_followed",
                "Slots this channel server follows (holds a copy of) in its ring.",
            ),
            slots_catching_up: t.gauge(
                "channelmesh_channel_slots_catching_up",
                "Followed slots whose copy is still being filled by their owner (not promotable with their history yet).",
            ),
            catch_up_slots: t.counter_vec(
                "channelmesh_channel_catch_up_slots_total",
                "Slots of catch-ups, by direction: sent (as owner, confirmed by the follower) or filled (as follower).",
                &["direction"],
            ),
            catch_up_bytes: t.counter(
                "channelmesh_channel_catch_up_bytes_total",
                "Bytes of channel state sent to followers in catch-ups.",
            ),
        }
    }

    /// Counts one published event.
    pub fn published(&self, body: &EventBody) {
        self.published.with_label_values(&[kind(body)]).inc();
    }
}

/// The `kind` label of an event.
fn kind(body: &EventBody) -> &'static str {
    match body {
        EventBody::Message { .. } => "message",
        EventBody::Typing { .. } => "typing",
        EventBody::MemberJoined { .. } => "member_joined",
        EventBody::MemberLeft { .. } => "member_left",
        EventBody::ChannelJoined { .. } => "channel_joined",
        EventBody::ChannelLeft { .. } => "channel_left",
        EventBody::Raw { .. } => "raw",
    }
}
