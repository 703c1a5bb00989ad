//! Routing calls to the channel server that owns a channel, by the ring.
//!
//! Admin servers and gateways use [`ChannelRouter`]: it picks the owner in the newest ring it
//! knows, and when a call lands mid-move (the server says another node owns the slot, or is
//! unreachable) it waits for a newer ring and tries again, within a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::{ChannelEvent, ChannelId, Ts};
use mesh_proto::channel as pb;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use ring_client::RingWatcher;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::wire::{event_from_proto, event_to_proto, opt_ts, ts_str};

/// How long a routed call keeps retrying across ring changes.
pub const ROUTE_DEADLINE: Duration = Duration::from_secs(5);
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before retrying an unreachable channel server.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Why a routed call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    /// The channel server refused the request as invalid.
    #[error("{0}")]
    Invalid(String),
    /// No channel server could take the call before the deadline.
    #[error("no channel server available: {0}")]
    Unavailable(String),
    /// The channel server answered with an unexpected error.
    #[error("channel server error: {0}")]
    Internal(String),
    /// The channel's publish rate (its policy) is spent: not published; not retried.
    #[error("over the channel's publish rate: {0}")]
    RateLimited(String),
}

/// One page of history, as routed callers see it.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub events: Vec<ChannelEvent>,
    pub oldest: Option<Ts>,
    pub has_more: bool,
    /// Complete after this ts (`None`: from the start); an older cursor has a gap.
    pub complete_after: Option<Ts>,
}

/// Calls the owning channel server of a channel.
#[derive(Debug, Clone)]
pub struct ChannelRouter {
    ring: RingWatcher,
    /// One lazily connected client per channel-server address.
    clients: Arc<Mutex<HashMap<String, ChannelServerClient<Channel>>>>,
    /// One publish stream per channel-server address, opened on the first publish.
    pipes: Arc<Mutex<HashMap<String, Arc<Pipe>>>>,
    /// The publish streams' tasks, and what ends them with the service.
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Publishes a stream waits for, by request id.
type Waiting = HashMap<u64, Waiter>;

/// A publish waiting in a stream: for its request to be taken by the stream, then for its reply.
#[derive(Debug)]
struct Waiter {
    /// When the stream took the request: the attempt's time starts then.
    taken: Option<tokio::time::Instant>,
    reply: oneshot::Sender<Result<pb::PublishResponse, Status>>,
}

/// Whether the stream sends `request`: only while its publish still waits for it (one given
/// up while queued, timed out or cancelled, is never sent, so that a publish answered as
/// failed was not delivered either). Notes when the request went on its way.
fn take_if_waited(waiting: &Mutex<Waiting>, request: &pb::PublishStreamRequest) -> bool {
    match lock(waiting).get_mut(&request.id) {
        Some(waiter) => {
            waiter.taken = Some(tokio::time::Instant::now());
            true
        }
        None => false,
    }
}

/// When a publish looked at `now` gives up its attempt: [`ATTEMPT_TIMEOUT`] after the stream
/// took its request, and not while the request is still queued (the route's deadline bounds
/// that wait).
fn attempt_ends(taken: Option<tokio::time::Instant>, now: tokio::time::Instant) -> AttemptEnds {
    match taken {
        None => AttemptEnds::LookAgain(now + ATTEMPT_TIMEOUT),
        Some(taken) if taken + ATTEMPT_TIMEOUT > now => {
            AttemptEnds::LookAgain(taken + ATTEMPT_TIMEOUT)
        }
        Some(_) => AttemptEnds::Now,
    }
}

/// See [`attempt_ends`].
#[derive(Debug, PartialEq, Eq)]
enum AttemptEnds {
    LookAgain(tokio::time::Instant),
    Now,
}

/// Requests queued to one publish stream.
const PIPE_QUEUE: usize = 4096;

/// A publish stream to one channel server: requests go out as they come, replies are matched
/// by id. Its task ends when the stream breaks (every waiting publish then fails as
/// unavailable, and is retried as a broken call would be), when the router drops it, or when
/// the service is cancelled.
#[derive(Debug)]
struct Pipe {
    tx: mpsc::Sender<pb::PublishStreamRequest>,
    waiting: Arc<Mutex<Waiting>>,
    next_id: AtomicU64,
}

/// Takes a publish's waiting entry out when the publish is given up (timed out, cancelled).
struct Forget<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.waiting).remove(&self.id);
    }
}

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

impl ChannelRouter {
    /// A router following `ring`; its publish streams' tasks go on `tracker` and end with
    /// `cancel`.
    pub fn new(ring: RingWatcher, tracker: &TaskTracker, cancel: CancellationToken) -> Self {
        ChannelRouter {
            ring,
            clients: Arc::new(Mutex::new(HashMap::new())),
            pipes: Arc::new(Mutex::new(HashMap::new())),
            tracker: tracker.clone(),
            cancel,
        }
    }

    /// The publish stream to the channel server at `addr`, opened if needed.
    fn pipe(&self, addr: &str) -> Result<Arc<Pipe>, RouteError> {
        let mut pipes = self.pipes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pipe) = pipes.get(addr)
            && !pipe.tx.is_closed()
        {
            return Ok(pipe.clone());
        }
        let mut client = self.client(addr)?;
        let (tx, rx) = mpsc::channel(PIPE_QUEUE);
        let pipe = Arc::new(Pipe {
            tx,
            waiting: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
        });
        let waiting = pipe.waiting.clone();
        let requests = {
            let waiting = waiting.clone();
            let queued = tokio_stream::wrappers::ReceiverStream::new(rx);
            tokio_stream::StreamExt::filter(queued, move |request| {
                take_if_waited(&waiting, request)
            })
        };
        let addr_owned = addr.to_string();
        // Ends with the stream: when it breaks, or when every sender (the router's map entry
        // and the publishes in flight) is gone and the server finishes the closed stream; or
        // with the service.
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            let streaming = async {
                let mut replies = client.publish_stream(requests).await?.into_inner();
                while let Some(reply) = replies.message().await? {
                    let Some(waiter) = lock(&waiting).remove(&reply.id) else {
                        continue; // Given up on already.
                    };
                    let answer = match Code::from_i32(reply.code) {
                        Code::Ok => Ok(pb::PublishResponse { ts: reply.ts }),
                        code => Err(Status::new(code, reply.message)),
                    };
                    let _ = waiter.reply.send(answer);
                }
                Ok::<_, Status>(())
            };
            let outcome = tokio::select! {
                _ = cancel.cancelled() => Err(Status::unavailable("the service is shutting down")),
                outcome = streaming => outcome,
            };
            let why = match outcome {
                Ok(()) => "the publish stream ended".to_string(),
                Err(status) => format!("the publish stream broke: {}", status.message()),
            };
            tracing::debug!(addr = %addr_owned, %why, "publish stream closed");
            for (_, waiter) in lock(&waiting).drain() {
                let _ = waiter.reply.send(Err(Status::unavailable(why.clone())));
            }
        });
        pipes.insert(addr.to_string(), pipe.clone());
        Ok(pipe)
    }

    /// One publish over the stream to `addr`, answered as the unary call would be. It waits
    /// for room in the stream's queue and for its turn as long as its caller lets it (the
    /// route's deadline); its attempt's time, [`ATTEMPT_TIMEOUT`], starts when the stream
    /// takes the request. Given up before that, it is never sent.
    async fn publish_piped(
        &self,
        addr: &str,
        publish: pb::PublishRequest,
    ) -> Result<tonic::Response<pb::PublishResponse>, Status> {
        let pipe = self
            .pipe(addr)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let id = pipe.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, mut answer) = oneshot::channel();
        lock(&pipe.waiting).insert(id, Waiter { taken: None, reply });
        let _forget = Forget {
            waiting: &pipe.waiting,
            id,
        };
        let mut request = pb::PublishStreamRequest {
            id,
            publish: Some(publish),
            trace_context: HashMap::new(),
            idempotency_key: String::new(),
        };
        // The channel server's span joins this one's trace.
        mesh_telemetry::propagation::inject_map(&mut request.trace_context);
        if pipe.tx.send(request).await.is_err() {
            return Err(Status::unavailable("the publish stream closed"));
        }
        // One timer per publish, looked at again only when it fires: no wake-up when the
        // stream takes the request.
        let mut look = tokio::time::Instant::now() + ATTEMPT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(look, &mut answer).await {
                Ok(Ok(answer)) => return answer.map(tonic::Response::new),
                Ok(Err(_)) => return Err(Status::unavailable("the publish stream closed")),
                Err(_) => {}
            }
            let taken = lock(&pipe.waiting).get(&id).and_then(|w| w.taken);
            match attempt_ends(taken, tokio::time::Instant::now()) {
                AttemptEnds::LookAgain(at) => look = at,
                AttemptEnds::Now => {
                    return Err(Status::unavailable(format!(
                        "{addr} did not answer in time"
                    )));
                }
            }
        }
    }

    /// A client for the channel server at `addr` ("host:port"), connected lazily and shared.
    pub fn client(&self, addr: &str) -> Result<ChannelServerClient<Channel>, RouteError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(addr) {
            return Ok(client.clone());
        }
        let endpoint = mesh_transport::endpoint(addr)
            .map_err(|e| RouteError::Internal(format!("bad channel server address {addr}: {e}")))?
            .connect_timeout(ATTEMPT_TIMEOUT)
            .tcp_nodelay(true);
        let client = ChannelServerClient::new(endpoint.connect_lazy());
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Publishes `event` on its channel's owner; returns the assigned ts (none if transient).
    /// Every attempt carries one idempotency key, fresh for this publish: an attempt the
    /// channel server applied but answered too late (or over a broken stream) is answered with
    /// the same ts when retried, not stored twice.
    pub async fn publish(&self, event: &ChannelEvent) -> Result<Option<Ts>, RouteError> {
        let key = match event.body.is_transient() {
            true => String::new(), // Never stored: nothing to repeat.
            false => new_idempotency_key(),
        };
        self.publish_keyed(event, &key).await
    }

    /// [`ChannelRouter::publish`] under the caller's idempotency `key` (a client's own, for
    /// retries the caller makes; at most 256 bytes).
    pub async fn publish_keyed(
        &self,
        event: &ChannelEvent,
        key: &str,
    ) -> Result<Option<Ts>, RouteError> {
        let proto = event_to_proto(event);
        let span = tracing::debug_span!("route.publish", channel = %event.channel);
        // The publish stream times each attempt from when it takes the request.
        let reply = self
            .route_within(&event.channel, None, |_, addr, epoch| {
                let publish = pb::PublishRequest {
                    epoch,
                    event: Some(proto.clone()),
                    idempotency_key: key.to_string(),
                };
                async move { self.publish_piped(&addr, publish).await }
            })
            .instrument(span)
            .await?;
        opt_ts(&reply.ts).map_err(|e| RouteError::Internal(e.to_string()))
    }

    /// Reads up to `limit` events of `channel` after `since`.
    pub async fn history(
        &self,
        channel: &ChannelId,
        since: Option<Ts>,
        limit: u32,
    ) -> Result<History, RouteError> {
        let reply = self
            .route(channel, |mut client, _, epoch| {
                let mut request = tonic::Request::new(pb::HistoryRequest {
                    epoch,
                    channel: channel.to_string(),
                    since_ts: ts_str(since),
                    limit,
                });
                mesh_telemetry::propagation::inject_metadata(request.metadata_mut());
                async move { client.history(request).await }
            })
            .await?;
        let bad = |e: crate::wire::WireError| RouteError::Internal(e.to_string());
        Ok(History {
            events: reply
                .events
                .into_iter()
                .map(event_from_proto)
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            oldest: opt_ts(&reply.oldest_ts).map_err(bad)?,
            has_more: reply.has_more,
            complete_after: opt_ts(&reply.complete_after_ts).map_err(bad)?,
        })
    }

    /// The state of `channel` on its owner (the admin API's ChannelInfo): last ts, history,
    /// live subscribers per gateway.
    pub async fn channel_info(
        &self,
        channel: &ChannelId,
    ) -> Result<pb::ChannelInfoResponse, RouteError> {
        self.route(channel, |mut client, _, epoch| {
            let request = pb::ChannelInfoRequest {
                epoch,
                channel: channel.to_string(),
            };
            async move { client.channel_info(request).await }
        })
        .await
    }

    /// Calls `call` on every channel server that owns slots in one ring (its client, its
    /// address, the ring's epoch), all in the same epoch: when one of them fails, the whole
    /// round is tried again on a newer ring (or after a pause) until the deadline. The answers
    /// in the ring's node order. For questions about every channel (the admin API's
    /// ListChannels), each server answering for the slots it owns.
    pub async fn on_every_owner<T, F, Fut>(&self, call: F) -> Result<Vec<T>, RouteError>
    where
        F: Fn(ChannelServerClient<Channel>, String, u64) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + ROUTE_DEADLINE;
        loop {
            let ring = self.ring.current();
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let owners: Vec<_> = ring
                .nodes()
                .iter()
                .filter(|n| ring.slots_owned(&n.id) > 0)
                .collect();
            if owners.is_empty() {
                self.ring
                    .wait_for(remaining, "a ring with channel servers", |r| {
                        !r.nodes().is_empty()
                    })
                    .await
                    .map_err(|e| RouteError::Unavailable(e.to_string()))?;
                continue;
            }
            let mut calls = Vec::with_capacity(owners.len());
            for owner in &owners {
                let client = self.client(&owner.addr)?;
                let attempt = call(client, owner.addr.clone(), ring.epoch());
                calls.push(async move {
                    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                        Ok(Ok(reply)) => Ok(reply.into_inner()),
                        Ok(Err(status)) => Err(status),
                        Err(_) => Err(Status::unavailable(format!(
                            "{} did not answer in time",
                            owner.id
                        ))),
                    }
                });
            }
            let answers = futures::future::join_all(calls).await;
            let mut replies = Vec::with_capacity(answers.len());
            let mut failed = None;
            for answer in answers {
                match answer {
                    Ok(reply) => replies.push(reply),
                    Err(status) => {
                        failed = Some(status);
                        break;
                    }
                }
            }
            let Some(status) = failed else {
                return Ok(replies);
            };
            self.before_retry(&status, ring.epoch(), deadline, "every owner")
                .await?;
        }
    }

    /// What follows an attempt under ring epoch `epoch` that failed with `status` (see
    /// [`after_failure`]): waits for a newer ring, or pauses, before the caller tries again;
    /// `Err` when it must not (the deadline passed, or the failure is final). `what` names the
    /// call's target in the logs.
    async fn before_retry(
        &self,
        status: &Status,
        epoch: u64,
        deadline: tokio::time::Instant,
        what: &str,
    ) -> Result<(), RouteError> {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match after_failure(status, remaining) {
            Next::AwaitNewerRing => {
                tracing::debug!(what, "routed mid-move; waiting for a newer ring");
                self.ring
                    .wait_for_epoch(epoch + 1, remaining)
                    .await
                    .map_err(|_| RouteError::Unavailable(status.message().to_string()))?;
            }
            Next::Retry => {
                tracing::debug!(what, error = %status.message(), "channel server unavailable; retrying");
                // Retry after the pause, or at once when a new ring comes (the node was
                // declared down and its slots moved).
                let _ = self
                    .ring
                    .wait_for_epoch(epoch + 1, RETRY_PAUSE.min(remaining))
                    .await;
            }
            Next::Fail(error) => return Err(error),
        }
        Ok(())
    }

    /// Calls `call` on the owner of `channel`, retrying across ring changes until the deadline;
    /// each attempt within [`ATTEMPT_TIMEOUT`].
    async fn route<T, F, Fut>(&self, channel: &ChannelId, call: F) -> Result<T, RouteError>
    where
        F: Fn(ChannelServerClient<Channel>, String, u64) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.route_within(channel, Some(ATTEMPT_TIMEOUT), call)
            .await
    }

    /// [`ChannelRouter::route`], each attempt within `attempt` (`None`: the call bounds its own
    /// attempts, within what is left of the deadline).
    async fn route_within<T, F, Fut>(
        &self,
        channel: &ChannelId,
        attempt: Option<Duration>,
        call: F,
    ) -> Result<T, RouteError>
    where
        F: Fn(ChannelServerClient<Channel>, String, u64) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + ROUTE_DEADLINE;
        loop {
            let ring = self.ring.current();
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(owner) = ring.owner_of(channel) else {
                self.ring
                    .wait_for(remaining, "a ring with channel servers", |r| {
                        r.owner_of(channel).is_some()
                    })
                    .await
                    .map_err(|e| RouteError::Unavailable(e.to_string()))?;
                continue;
            };
            let client = self.client(&owner.addr)?;
            let status = match tokio::time::timeout(
                attempt.unwrap_or(remaining),
                call(client, owner.addr.clone(), ring.epoch()),
            )
            .await
            {
                Ok(Ok(reply)) => return Ok(reply.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => Status::unavailable(format!("{} did not answer in time", owner.id)),
            };
            let what = format!("{channel} on {}", owner.id);
            self.before_retry(&status, ring.epoch(), deadline, &what)
                .await?;
        }
    }
}

/// A fresh idempotency key: 128 random bits in hex, so that no two publishes share one.
fn new_idempotency_key() -> String {
    format!("r-{:032x}", rand::random::<u128>())
}

/// What a routed call does after an attempt failed with a status.
#[derive(Debug)]
enum Next {
    /// Another node owns the slot now: wait for the ring that says so (and fail as
    /// unavailable if none comes before the deadline).
    AwaitNewerRing,
    /// The channel server is unreachable: try again after a pause or on a newer ring.
    Retry,
    /// Give up with this error.
    Fail(RouteError),
}

/// The one table from a channel server's failed answer to the router's next step, with
/// `remaining` left before the call's deadline.
fn after_failure(status: &Status, remaining: Duration) -> Next {
    // The connection broke mid-call (the node died): as good as unavailable. A publish it may
    // have taken died with it (its history went too), so retrying on the new owner is what
    // keeps the post; at worst a gateway saw it once before the crash.
    let code = match status.code() {
        Code::Unknown if broke_mid_call(status) => Code::Unavailable,
        code => code,
    };
    match code {
        Code::FailedPrecondition => Next::AwaitNewerRing,
        Code::Unavailable | Code::Cancelled if !remaining.is_zero() => Next::Retry,
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            Next::Fail(RouteError::Unavailable(status.message().to_string()))
        }
        Code::InvalidArgument | Code::OutOfRange => {
            Next::Fail(RouteError::Invalid(status.message().to_string()))
        }
        Code::ResourceExhausted => {
            Next::Fail(RouteError::RateLimited(status.message().to_string()))
        }
        _ => Next::Fail(RouteError::Internal(status.to_string())),
    }
}

/// Whether `status` is the client's own report of a broken connection rather than an answer.
fn broke_mid_call(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring_client::RingSource;

    const LEFT: Duration = Duration::from_secs(1);

    fn next(code: Code, remaining: Duration) -> Next {
        after_failure(&Status::new(code, "the reason"), remaining)
    }

    #[test]
    fn a_call_routed_mid_move_waits_for_the_newer_ring() {
        assert!(matches!(
            next(Code::FailedPrecondition, LEFT),
            Next::AwaitNewerRing
        ));
        // Even at the deadline: the wait itself then fails as unavailable.
        assert!(matches!(
            next(Code::FailedPrecondition, Duration::ZERO),
            Next::AwaitNewerRing
        ));
    }

    #[test]
    fn an_unreachable_server_is_retried_until_the_deadline() {
        for code in [Code::Unavailable, Code::Cancelled] {
            assert!(matches!(next(code, LEFT), Next::Retry), "{code:?}");
            assert!(
                matches!(
                    next(code, Duration::ZERO),
                    Next::Fail(RouteError::Unavailable(m)) if m == "the reason"
                ),
                "{code:?} at the deadline"
            );
        }
        assert!(
            matches!(
                next(Code::DeadlineExceeded, LEFT),
                Next::Fail(RouteError::Unavailable(_))
            ),
            "a server that ran out of time is not retried"
        );
    }

    #[test]
    fn a_refused_request_is_invalid_and_anything_else_internal() {
        for code in [Code::InvalidArgument, Code::OutOfRange] {
            assert!(
                matches!(next(code, LEFT), Next::Fail(RouteError::Invalid(m)) if m == "the reason"),
                "{code:?}"
            );
        }
        for code in [
            Code::NotFound,
            Code::Internal,
            Code::PermissionDenied,
            Code::Unknown,
        ] {
            match next(code, LEFT) {
                Next::Fail(RouteError::Internal(m)) => assert!(m.contains("the reason"), "{m}"),
                other => panic!("{code:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_spent_publish_rate_fails_at_once_and_says_so() {
        assert!(matches!(
            next(Code::ResourceExhausted, LEFT),
            Next::Fail(RouteError::RateLimited(m)) if m == "the reason"
        ));
    }

    #[test]
    fn a_connection_that_broke_mid_call_counts_as_unavailable() {
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        assert_eq!(broken.code(), Code::Unknown);
        assert!(broke_mid_call(&broken));
        assert!(matches!(after_failure(&broken, LEFT), Next::Retry));
        // An Unknown the server itself answered is not a broken connection.
        assert!(!broke_mid_call(&Status::unknown("the server's own error")));
    }

    #[test]
    fn a_publish_given_up_while_queued_is_never_sent_and_a_sent_one_is_timed_from_then() {
        let waiting = Mutex::new(Waiting::new());
        let request = |id| pb::PublishStreamRequest {
            id,
            ..Default::default()
        };
        let (reply, _answer) = oneshot::channel();
        lock(&waiting).insert(1, Waiter { taken: None, reply });
        assert!(
            take_if_waited(&waiting, &request(1)),
            "still waited for: sent"
        );
        let taken = lock(&waiting).get(&1).and_then(|w| w.taken);
        assert!(taken.is_some(), "its attempt's time starts now");
        // Given up (timed out or cancelled) before the stream took it.
        let (reply, _answer) = oneshot::channel();
        lock(&waiting).insert(2, Waiter { taken: None, reply });
        drop(Forget {
            waiting: &waiting,
            id: 2,
        });
        assert!(
            !take_if_waited(&waiting, &request(2)),
            "given up: never sent"
        );
    }

    #[test]
    fn an_attempt_runs_out_only_its_timeout_after_the_stream_took_it() {
        let start = tokio::time::Instant::now();
        let later = |ms| start + Duration::from_millis(ms);
        // Still queued: however long it has waited, it waits on (the route's deadline bounds it).
        assert_eq!(
            attempt_ends(None, later(10_000)),
            AttemptEnds::LookAgain(later(10_000) + ATTEMPT_TIMEOUT)
        );
        // Taken at 1.5 s: its attempt ends at 1.5 s + the timeout, not before.
        assert_eq!(
            attempt_ends(Some(later(1_500)), later(2_000)),
            AttemptEnds::LookAgain(later(1_500) + ATTEMPT_TIMEOUT)
        );
        assert_eq!(
            attempt_ends(Some(later(1_500)), later(1_500) + ATTEMPT_TIMEOUT),
            AttemptEnds::Now
        );
    }

    #[tokio::test]
    async fn a_bad_channel_server_address_is_an_internal_error() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ring = RingWatcher::spawn(
            RingSource::Direct("http://127.0.0.1:1".into()),
            &tracker,
            cancel.clone(),
        );
        let router = ChannelRouter::new(ring, &tracker, cancel.clone());
        assert!(router.client("127.0.0.1:7001").is_ok(), "connected lazily");
        assert!(matches!(
            router.client("not an address"),
            Err(RouteError::Internal(m)) if m.contains("not an address")
        ));
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
