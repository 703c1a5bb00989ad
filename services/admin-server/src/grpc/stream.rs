//! PublishStream, the web app's firehose: posts and events pipelined over one stream, each
//! checked and routed exactly as PostMessage or PublishEvent would be (the same code), and
//! answered by its id with the ts or status that call would give.
//!
//! One task per stream reads requests in order and starts each one's publish at once; the
//! publishes go out to the owners' publish streams in the order they were read (so requests to
//! one channel are given ts in stream order), and their answers are held back per channel
//! until every earlier request to that channel is answered ([`Lanes`]). The task stops reading
//! while [`MAX_UNANSWERED`] requests (or [`MAX_UNANSWERED_BYTES`] of them) wait for their
//! answers, and while the caller does not read its replies, so HTTP/2 flow control holds a
//! caller that runs ahead. It ends when the caller has sent everything and every request is
//! answered, when the caller cancels (what was not answered yet is given up), or with the
//! service.

use std::collections::hash_map::{Entry, HashMap};
use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, Hash};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use mesh_proto::admin as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{AdminService, status};
use crate::error::AdminError;

/// Requests one stream keeps unanswered at once (the first reply says so): what 100,000
/// publishes a second need at 100 ms of acknowledgement latency.
pub const MAX_UNANSWERED: usize = 10_000;
/// Bytes of request bodies one stream keeps unanswered at once: past it the stream stops
/// reading too, so that a stream of large events holds at most this much.
pub const MAX_UNANSWERED_BYTES: usize = 32 << 20;
/// Replies queued to the caller; when full, the stream waits for the caller to read.
const REPLY_QUEUE: usize = 1024;
/// The method's name in the request metrics.
const METHOD: &str = "PublishStream";

/// The reply stream PublishStream answers with.
pub type ReplyStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::PublishStreamReply, Status>> + Send>>;

/// Which requests' answers wait for which: a request with a channel waits for the earlier ones
/// to the same channel (by the channel id's hash: two channels that share one wait for each
/// other, which orders more than needed and never less).
type Lane = u64;

/// One answered request: its lane and place in it (none for a request with no channel id),
/// and its reply.
struct Answered {
    lane: Option<(Lane, u64)>,
    reply: pb::PublishStreamReply,
    bytes: usize,
}

/// The answers of each lane held back until every earlier request of the lane is answered.
#[derive(Default)]
struct Lanes {
    /// Per lane with requests unanswered: the next place to give, the next place to answer,
    /// and the answers that came early, by place.
    open: HashMap<Lane, LaneState, foldhash::fast::RandomState>,
}

#[derive(Default)]
struct LaneState {
    given: u64,
    next: u64,
    early: BTreeMap<u64, Answered>,
}

impl Lanes {
    /// The place of the next request of `lane`.
    fn place(&mut self, lane: Lane) -> u64 {
        let state = self.open.entry(lane).or_default();
        state.given += 1;
        state.given - 1
    }

    /// Takes `answered`; appends to `ready` it and the early answers it lets go, in order.
    fn answer(&mut self, answered: Answered, ready: &mut VecDeque<Answered>) {
        let Some((lane, place)) = answered.lane else {
            ready.push_back(answered);
            return;
        };
        let Entry::Occupied(mut entry) = self.open.entry(lane) else {
            // Every placed request's lane is open until it is answered.
            ready.push_back(answered);
            return;
        };
        let state = entry.get_mut();
        if place != state.next {
            state.early.insert(place, answered);
            return;
        }
        ready.push_back(answered);
        state.next += 1;
        while let Some(next) = state.early.remove(&state.next) {
            ready.push_back(next);
            state.next += 1;
        }
        if state.next == state.given {
            entry.remove();
        }
    }
}

impl AdminService {
    /// Starts serving one PublishStream: the first reply (id 0, `max_unanswered`) is queued at
    /// once; the stream's task goes on the service's tracker.
    pub(super) fn publish_stream_of(
        &self,
        incoming: Streaming<pb::PublishStreamRequest>,
    ) -> ReplyStream {
        let (tx, rx) = mpsc::channel(REPLY_QUEUE);
        let first = pb::PublishStreamReply {
            max_unanswered: MAX_UNANSWERED as u32,
            ..Default::default()
        };
        // The queue is empty: the first reply always fits.
        let _ = tx.try_send(Ok(first));
        let this = self.clone();
        self.tasks.tracker.spawn(async move {
            let outcome = this.serve_stream(incoming, &tx).await;
            if let Err(status) = outcome {
                // Best effort: the caller may be gone.
                let _ = tx.try_send(Err(status));
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    /// The stream's loop: read, start, answer in lane order, until the stream is done.
    async fn serve_stream(
        &self,
        mut incoming: Streaming<pb::PublishStreamRequest>,
        tx: &mpsc::Sender<Result<pb::PublishStreamReply, Status>>,
    ) -> Result<(), Status> {
        let cancel = self.tasks.cancel.clone();
        let hasher = foldhash::fast::FixedState::default();
        let mut lanes = Lanes::default();
        let mut in_flight = FuturesUnordered::new();
        let mut ready: VecDeque<Answered> = VecDeque::new();
        let mut unanswered = Unanswered::open(&self.metrics);
        let mut unanswered_bytes = 0usize;
        let mut reading = true;
        let ok = self.metrics.requests.with_label_values(&[METHOD, "ok"]);
        loop {
            // Replies ready in lane order go out first, as fast as the caller reads them.
            while let Some(answered) = ready.pop_front() {
                unanswered.answered();
                unanswered_bytes -= answered.bytes;
                match answered.reply.code {
                    0 => ok.inc(),
                    code => {
                        let code = format!("{:?}", tonic::Code::from_i32(code as i32));
                        self.metrics
                            .requests
                            .with_label_values(&[METHOD, &code])
                            .inc();
                    }
                }
                // Cancel-safe: a reply not sent is dropped with the stream.
                tokio::select! {
                    _ = cancel.cancelled() => return Err(shutting_down()),
                    sent = tx.send(Ok(answered.reply)) => {
                        if sent.is_err() {
                            return Ok(()); // The caller is gone: nothing more to answer.
                        }
                    }
                }
            }
            if !reading && unanswered.count == 0 {
                return Ok(());
            }
            let room = unanswered.count < MAX_UNANSWERED && unanswered_bytes < MAX_UNANSWERED_BYTES;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(shutting_down()),
                // Answers first: they make room.
                Some(answered) = in_flight.next(), if !in_flight.is_empty() => {
                    lanes.answer(answered, &mut ready);
                }
                // Cancel-safe: message() loses nothing when another branch wins.
                next = incoming.message(), if reading && room => match next {
                    Ok(Some(request)) => {
                        let bytes = request_bytes(&request);
                        let lane = lane_of(&request, &hasher).map(|lane| (lane, lanes.place(lane)));
                        unanswered.read();
                        unanswered_bytes += bytes;
                        // Pushed in order; first polled in order (FuturesUnordered polls new
                        // futures in the order they came), which is when each reaches its
                        // owner's publish stream: the order the owner gives ts in.
                        in_flight.push(async move {
                            let reply = self.answer(request).await;
                            Answered { lane, reply, bytes }
                        });
                    }
                    // The caller sent everything: answer what is left, then end.
                    Ok(None) => reading = false,
                    // The caller cancelled or the connection broke: give up the rest.
                    Err(status) => {
                        tracing::debug!(error = %status.message(), "publish stream ended by the caller");
                        return Ok(());
                    }
                },
            }
        }
    }

    /// One request's reply: what PostMessage or PublishEvent would answer.
    async fn answer(&self, request: pb::PublishStreamRequest) -> pb::PublishStreamReply {
        let id = request.id;
        let answer = match (id, request.body) {
            (0, _) => Err(AdminError::ZeroId),
            (_, None) => Err(AdminError::NoBody),
            (_, Some(pb::publish_stream_request::Body::Post(post))) => {
                self.post(post).await.map(|r| r.ts)
            }
            (_, Some(pb::publish_stream_request::Body::Event(event))) => {
                self.publish_raw(event).await.map(|r| r.ts)
            }
        };
        match answer {
            Ok(ts) => pb::PublishStreamReply {
                id,
                ts,
                ..Default::default()
            },
            Err(error) => {
                let status = status(error);
                pb::PublishStreamReply {
                    id,
                    code: status.code() as u32,
                    message: status.message().to_string(),
                    ..Default::default()
                }
            }
        }
    }
}

/// A stream's count of unanswered requests, mirrored in the service's gauges; dropped with the
/// stream, it takes the stream and what it left unanswered off them.
struct Unanswered {
    count: usize,
    streams: mesh_telemetry::prometheus::IntGauge,
    gauge: mesh_telemetry::prometheus::IntGauge,
}

impl Unanswered {
    fn open(metrics: &super::Metrics) -> Self {
        metrics.streams.inc();
        Unanswered {
            count: 0,
            streams: metrics.streams.clone(),
            gauge: metrics.stream_unanswered.clone(),
        }
    }

    fn read(&mut self) {
        self.count += 1;
        self.gauge.inc();
    }

    fn answered(&mut self) {
        self.count -= 1;
        self.gauge.dec();
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.gauge.sub(self.count as i64);
        self.streams.dec();
    }
}

/// The lane of a request: its channel's (none without one: such a request fails at once).
fn lane_of(request: &pb::PublishStreamRequest, hasher: &impl BuildHasher) -> Option<Lane> {
    let channel = match &request.body {
        Some(pb::publish_stream_request::Body::Post(post)) => &post.channel,
        Some(pb::publish_stream_request::Body::Event(event)) => &event.channel,
        None => return None,
    };
    (!channel.is_empty()).then(|| {
        let mut state = hasher.build_hasher();
        channel.hash(&mut state);
        std::hash::Hasher::finish(&state)
    })
}

/// What a request holds while it waits for its answer, roughly: its text or event.
fn request_bytes(request: &pb::PublishStreamRequest) -> usize {
    match &request.body {
        Some(pb::publish_stream_request::Body::Post(post)) => post.text.len() + post.channel.len(),
        Some(pb::publish_stream_request::Body::Event(event)) => {
            event.event_json.len() + event.channel.len()
        }
        None => 0,
    }
}

/// The stream's end when the service stops.
fn shutting_down() -> Status {
    Status::unavailable("the admin server is shutting down")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(lane: Option<(Lane, u64)>, id: u64) -> Answered {
        Answered {
            lane,
            reply: pb::PublishStreamReply {
                id,
                ..Default::default()
            },
            bytes: 0,
        }
    }

    fn ids(ready: &mut VecDeque<Answered>) -> Vec<u64> {
        ready.drain(..).map(|a| a.reply.id).collect()
    }

    #[test]
    fn answers_go_out_in_each_lanes_order_and_other_lanes_do_not_wait() {
        let mut lanes = Lanes::default();
        let mut ready: VecDeque<Answered> = VecDeque::new();
        let a: Vec<_> = (0..3).map(|_| lanes.place(1)).collect();
        let b = lanes.place(2);
        assert_eq!(a, [0, 1, 2]);
        // The lane's third and second answers come first: held.
        lanes.answer(answered(Some((1, a[2])), 13), &mut ready);
        lanes.answer(answered(Some((1, a[1])), 12), &mut ready);
        assert!(ready.is_empty());
        // Another lane's answer and one with no lane go at once.
        lanes.answer(answered(Some((2, b)), 21), &mut ready);
        lanes.answer(answered(None, 99), &mut ready);
        assert_eq!(ids(&mut ready), [21, 99]);
        // The first lets the held ones go, in order; the lanes are then closed.
        lanes.answer(answered(Some((1, a[0])), 11), &mut ready);
        assert_eq!(ids(&mut ready), [11, 12, 13]);
        assert!(lanes.open.is_empty(), "nothing is kept for answered lanes");
        // A lane opened again starts over.
        assert_eq!(lanes.place(1), 0);
    }
}
