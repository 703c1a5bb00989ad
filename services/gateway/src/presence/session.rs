//! One session (a gRPC stream) with one presence server: it opens with what its [`Peer`] says
//! (a snapshot of everything this gateway reports to that server, then the questions still
//! open), carries the deltas queued to it and a heartbeat, hands every server message back to
//! the peer, and reconnects with backoff until its queue is dropped or the gateway stops.

use std::time::Duration;

use mesh_core::NodeId;
use mesh_proto::presence as pb;
use mesh_proto::presence::gateway_message::Kind;
use mesh_proto::presence::presence_client::PresenceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Messages queued to one presence session; past it the session restarts from a snapshot.
pub(super) const SESSION_QUEUE: usize = 4096;
/// How long one connect or query to a presence server may take.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The first and the longest pause between reconnects to a presence server.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The side of the gateway a session serves (the presence hub).
pub(super) trait Peer: Send + Sync + 'static {
    /// What opens a session with `node`: a snapshot first, then the questions among the
    /// messages `queued` meanwhile (the deltas among them are in the snapshot already; they
    /// are taken from the queue in the same step, so none is lost or sent twice).
    fn opening(&self, node: &NodeId, queued: &mut mpsc::Receiver<Kind>) -> Vec<Kind>;

    /// A message from the presence server.
    fn on_server(&self, message: pb::ServerMessage);
}

/// How one connection of a session ended.
enum SessionEnd {
    /// The hub dropped the session's queue: it is no longer wanted.
    Dropped,
    /// The stream failed; reconnect.
    Broken(String),
}

/// How often a session says something when there is nothing else to say.
fn presence_heartbeat() -> Duration {
    Duration::from_secs(1)
}

/// A runtime on a thread of its own, for the sessions and their heartbeats
/// ([`ring_client::own_thread`]): under a fan-out burst the gateway's runtime has thousands of
/// connection tasks queued (a team message to 17,900 clients), and a session waiting its turn
/// behind them went silent past its lease — the presence server then took every user of the
/// gateway offline. Ends when `cancel` fires (the sessions end on the same token; anything left
/// is dropped with the runtime).
pub(super) fn sessions_runtime(cancel: CancellationToken) -> tokio::runtime::Handle {
    ring_client::own_thread::runtime("presence-sessions", cancel, CALL_TIMEOUT)
}

/// One session with presence server `node` at `addr`, reconnecting until its queue `rx` is
/// dropped (the server no longer owns any of our users) or `cancel` fires.
pub(super) async fn run<P: Peer>(
    peer: P,
    node: NodeId,
    addr: String,
    mut rx: mpsc::Receiver<Kind>,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            o = once(&peer, &node, &addr, &mut rx) => o,
        };
        match outcome {
            SessionEnd::Dropped => return,
            SessionEnd::Broken(why) => {
                tracing::debug!(%node, %addr, %why, retry_in = ?backoff, "presence session interrupted");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        // A ring change that moved all our users elsewhere dropped this session's queue.
        if rx.is_closed() {
            return;
        }
    }
}

/// One connection of the session, until it breaks or its queue is dropped.
async fn once<P: Peer>(
    peer: &P,
    node: &NodeId,
    addr: &str,
    rx: &mut mpsc::Receiver<Kind>,
) -> SessionEnd {
    let endpoint = match mesh_transport::endpoint(addr) {
        Ok(e) => e.connect_timeout(CALL_TIMEOUT).tcp_nodelay(true),
        Err(e) => return SessionEnd::Broken(e.to_string()),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return SessionEnd::Broken(e.to_string()),
    };
    // The outgoing stream: a snapshot first (built with every queued delta discarded, as
    // the snapshot already holds them), then deltas and heartbeats.
    let (out_tx, out_rx) = mpsc::channel::<pb::GatewayMessage>(SESSION_QUEUE);
    for kind in peer.opening(node, rx) {
        let _ = out_tx.try_send(pb::GatewayMessage { kind: Some(kind) });
    }
    let mut incoming = match PresenceClient::new(channel)
        .session(ReceiverStream::new(out_rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return SessionEnd::Broken(status.to_string()),
    };
    tracing::debug!(%node, %addr, "presence session open");
    let mut heartbeat = tokio::time::interval(presence_heartbeat());
    loop {
        tokio::select! {
            // Cancel-safe: recv loses nothing when another branch wins.
            item = rx.recv() => {
                let Some(kind) = item else { return SessionEnd::Dropped };
                if out_tx.send(pb::GatewayMessage { kind: Some(kind) }).await.is_err() {
                    return SessionEnd::Broken("outgoing stream closed".into());
                }
            }
            _ = heartbeat.tick() => {
                let beat = pb::GatewayMessage { kind: Some(Kind::Heartbeat(pb::Heartbeat {})) };
                if out_tx.send(beat).await.is_err() {
                    return SessionEnd::Broken("outgoing stream closed".into());
                }
            }
            // Cancel-safe: message() loses nothing when another branch wins.
            message = incoming.message() => match message {
                Ok(Some(message)) => peer.on_server(message),
                Ok(None) => return SessionEnd::Broken("the presence server ended the session".into()),
                Err(status) => return SessionEnd::Broken(status.to_string()),
            },
        }
    }
}
