//! One subscription stream from this gateway to one channel server.
//!
//! The hub queues subscribe/unsubscribe commands; this task carries them and hands every reply
//! back to the hub, through [`Downstream`] (so this module knows nothing of the hub). When the
//! stream fails the hub resubscribes its channels on a new stream.

use channel_client::GATEWAY_ID_HEADER;
use channel_client::wire::event_from_proto;
use futures::FutureExt;
use mesh_core::{ChannelEvent, ChannelId, NodeId, Ts};
use mesh_proto::channel as pb;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_proto::channel::subscribe_response::Reply;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::GatewayMetrics;

/// The most events handed to the hub at once.
const BATCH: usize = 256;

/// Where a stream hands what its channel server says: the hub.
pub trait Downstream: Send + Sync + 'static {
    /// This gateway's id, sent with the subscription and named in traces.
    fn gateway(&self) -> &str;
    /// The gateway's metrics.
    fn metrics(&self) -> &GatewayMetrics;
    /// Events from `from`, in order, received at `received`.
    fn deliver_batch(&self, from: &NodeId, batch: Vec<ChannelEvent>, received: Instant);
    /// `node` confirmed `channel`, whose newest ts there is `head`, its history complete only
    /// after `complete_after`.
    fn subscribed(
        &self,
        node: &NodeId,
        channel: &ChannelId,
        head: Option<Ts>,
        complete_after: Option<Ts>,
    );
    /// `node` says `channel`'s history floor jumped to `floor`.
    fn gap(&self, node: &NodeId, channel: &ChannelId, floor: Ts);
    /// `node` refused `channel`.
    fn refused(&self, node: &NodeId, channel: &str, reason: &str);
    /// The stream to `node` ended on its own.
    fn upstream_lost(&self, node: &NodeId);
}

/// The hub's handle on an upstream stream.
#[derive(Debug)]
pub struct Upstream {
    /// Commands to send, in order.
    pub commands: mpsc::Sender<pb::SubscribeRequest>,
    /// Ends the stream.
    pub cancel: CancellationToken,
}

/// Opens a stream to channel server `node` at `addr` on a tracked task.
pub fn spawn<H: Downstream>(
    hub: H,
    node: NodeId,
    addr: String,
    queue: usize,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Upstream {
    let (tx, rx) = mpsc::channel(queue);
    tracker.spawn(run(hub, node, addr, rx, cancel.clone()));
    Upstream {
        commands: tx,
        cancel,
    }
}

async fn run<H: Downstream>(
    hub: H,
    node: NodeId,
    addr: String,
    commands: mpsc::Receiver<pb::SubscribeRequest>,
    cancel: CancellationToken,
) {
    let result = tokio::select! {
        _ = cancel.cancelled() => return,
        r = stream(&hub, &node, &addr, commands) => r,
    };
    match result {
        Ok(()) => tracing::info!(%node, "upstream stream ended"),
        Err(e) => {
            hub.metrics().upstream_failures.inc();
            tracing::warn!(%node, %addr, error = %e, "upstream stream failed")
        }
    }
    if !cancel.is_cancelled() {
        hub.upstream_lost(&node);
    }
}

async fn stream<H: Downstream>(
    hub: &H,
    node: &NodeId,
    addr: &str,
    commands: mpsc::Receiver<pb::SubscribeRequest>,
) -> Result<(), String> {
    let channel = mesh_transport::endpoint(addr)
        .map_err(|e| e.to_string())?
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(ReceiverStream::new(commands));
    if let Ok(value) = hub.gateway().parse() {
        request.metadata_mut().insert(GATEWAY_ID_HEADER, value);
    }
    let mut replies = ChannelServerClient::new(channel)
        .max_decoding_message_size(16 * 1024 * 1024)
        .subscribe(request)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    tracing::debug!(%node, "upstream stream open");
    let mut batch: Vec<pb::Event> = Vec::new();
    // A reply read while gathering a batch, to handle after it.
    let mut ahead: Option<pb::SubscribeResponse> = None;
    loop {
        let reply = match ahead.take() {
            Some(reply) => reply,
            None => match replies.message().await.map_err(|e| e.to_string())? {
                Some(reply) => reply,
                None => break,
            },
        };
        match reply.reply {
            Some(Reply::Events(events)) => {
                batch.extend(events.events);
                // The replies already here are delivered together: one lock of the hub, and
                // one wake-up per connection and channel, for the lot.
                let mut ended = None;
                while batch.len() < BATCH {
                    match replies.message().now_or_never() {
                        None => break,
                        Some(Ok(Some(pb::SubscribeResponse {
                            reply: Some(Reply::Events(more)),
                        }))) => batch.extend(more.events),
                        Some(Ok(Some(other))) => {
                            ahead = Some(other);
                            break;
                        }
                        Some(Ok(None)) => ended = Some(Ok(())),
                        Some(Err(e)) => ended = Some(Err(e.to_string())),
                    }
                    if ended.is_some() {
                        break;
                    }
                }
                deliver(hub, node, &mut batch);
                if let Some(ended) = ended {
                    return ended;
                }
            }
            Some(Reply::Subscribed(s)) => match mesh_core::ChannelId::new(&s.channel) {
                Ok(channel) => {
                    let head = channel_client::wire::opt_ts(&s.head_ts).ok().flatten();
                    // A floor that does not parse is taken as a gap, never as none.
                    let complete_after = channel_client::wire::opt_ts(&s.complete_after_ts)
                        .unwrap_or(Some(Ts::from_micros(u64::MAX)));
                    hub.subscribed(node, &channel, head, complete_after)
                }
                Err(e) => tracing::warn!(%node, error = %e, "bad channel in subscribe reply"),
            },
            Some(Reply::Gap(g)) => match (
                mesh_core::ChannelId::new(&g.channel),
                Ts::parse(&g.complete_after_ts),
            ) {
                (Ok(channel), Ok(floor)) => hub.gap(node, &channel, floor),
                _ => {
                    tracing::warn!(%node, channel = g.channel, "bad history gap from a channel server")
                }
            },
            Some(Reply::Refused(r)) => hub.refused(node, &r.channel, &r.reason),
            None => {}
        }
    }
    Ok(())
}

/// Hands `batch` (emptied) to the hub. Traced events (tracing on) go one at a time, each in a
/// span joined to its publish's trace; the others together. Order is kept.
fn deliver<H: Downstream>(hub: &H, node: &NodeId, batch: &mut Vec<pb::Event>) {
    let mut plain = Vec::with_capacity(batch.len());
    let mut received = Instant::now();
    for mut event in batch.drain(..) {
        received = hub.metrics().received(event.published_micros);
        let trace = std::mem::take(&mut event.trace_context);
        let event = match event_from_proto(event) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(%node, error = %e, "dropping a malformed event");
                continue;
            }
        };
        if trace.is_empty() {
            plain.push(event);
            continue;
        }
        if !plain.is_empty() {
            hub.deliver_batch(node, std::mem::take(&mut plain), received);
        }
        let span = tracing::debug_span!("gateway.deliver", gateway = %hub.gateway(), channel = %event.channel);
        mesh_telemetry::propagation::set_parent_from_map(&span, &trace);
        let _entered = span.enter();
        hub.deliver_batch(node, vec![event], received);
    }
    if !plain.is_empty() {
        hub.deliver_batch(node, plain, received);
    }
}
