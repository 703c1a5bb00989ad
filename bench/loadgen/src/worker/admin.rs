//! The admin-API publishers of a worker (`--publish admin`, shape `admin`): closed loop, each
//! makes `PostMessage` calls one at a time, at its share of the rate, to the channels in turn;
//! open loop, the web app's firehose: worker 0 alone sends the whole rate over one or a few
//! `PublishStream`s, on the clock, never waiting for an answer (answers are read and counted).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_proto::admin::publish_stream_request::Body;
use mesh_proto::admin::{PostMessageRequest, PublishStreamRequest};
use rand::Rng;
use tokio::sync::mpsc;

use super::connection::Pending;
use super::{Active, Phase, Shared};
use crate::client::Admin;
use crate::clock::micros_now;
use crate::pace::{self, Schedule};

/// The user admin publishers post as.
const USER: &str = "UBENCHPUB";
/// Requests a stream holds before they go out (the stream's own HTTP/2 window is beyond).
const STREAM_QUEUE: usize = 4096;
/// How often a stream sends what has fallen due: the web app's backend publishes in bursts
/// anyway, and at 100,000/s a millisecond is 100 requests.
const STREAM_TICK: Duration = Duration::from_millis(1);

/// One admin-API publisher: `PostMessage` calls one at a time, its share of each step's rate,
/// to the channels in turn.
pub(super) async fn publisher(shared: Arc<Shared>, task: usize) {
    if let Err(e) = publish(&shared, task).await {
        tracing::warn!(task, error = %format!("{e:#}"), "admin publisher stopped");
    }
}

async fn publish(shared: &Shared, task: usize) -> anyhow::Result<()> {
    let plan = &shared.plan;
    let mut admin = Admin::connect(&plan.admin, &plan.admin_token).await?;
    let mut phase = shared.phase.clone();
    let channels = plan.channels.max(1);
    let mut c = task % channels;
    let mut sent = 0u64;
    loop {
        while *phase.borrow_and_update() != Phase::Running {
            tokio::select! {
                _ = shared.cancel.cancelled() => return Ok(()),
                changed = phase.changed() => changed?,
            }
        }
        let mut active = Active::new(&shared.active_publishers);
        let step = shared.step();
        let slots = plan.publisher_slots(&shared.members).max(1);
        let rate = step.rate as f64 / slots as f64;
        let offset = if rate > 0.0 {
            rand::rng().random::<f64>() / rate
        } else {
            0.0
        };
        let started = Instant::now();
        let mut in_step = 0u64;
        while *phase.borrow() == Phase::Running && !shared.cancel.is_cancelled() {
            if rate > 0.0 {
                let at = (in_step as f64 + 1.0) / rate - offset;
                let wait = at - started.elapsed().as_secs_f64();
                if wait > 0.0 {
                    tokio::select! {
                        _ = shared.cancel.cancelled() => return Ok(()),
                        _ = phase.changed() => continue,
                        _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
                    }
                }
            }
            sent += 1;
            in_step += 1;
            let sent_us = micros_now();
            shared.sent(c as u32);
            let posted = admin
                .post(shared.names[c].clone(), USER, shared.text(sent))
                .await;
            match posted {
                Ok(_) => shared.acked(c as u32, sent_us),
                Err(_) => shared.refused(c as u32),
            }
            c = (c + 1) % channels;
        }
        active.settle();
    }
}

/// One `PublishStream` of the open-loop admin shape: stream `stream` of the run's
/// `admin_streams` sends its share of each step's rate, phased among the others.
pub(super) async fn streamer(shared: Arc<Shared>, stream: usize) {
    if let Err(e) = stream_publish(&shared, stream).await {
        shared
            .counters
            .publish_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(stream, error = %format!("{e:#}"), "admin PublishStream stopped");
    }
}

async fn stream_publish(shared: &Shared, stream: usize) -> anyhow::Result<()> {
    let plan = &shared.plan;
    let streams = plan.admin_streams.max(1);
    let mut admin = Admin::connect(&plan.admin, &plan.admin_token).await?;
    let (tx, mut rx) = mpsc::channel::<PublishStreamRequest>(STREAM_QUEUE);
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut replies = admin
        .publish_stream(requests)
        .await
        .context("the admin API refused PublishStream")?;
    let mut phase = shared.phase.clone();
    let mut tick = tokio::time::interval(STREAM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let channels = plan.channels.max(1);
    let mut c = stream % channels;
    let mut id = 0u64;
    let mut pending = Pending::default();
    let mut active: Option<Active> = None;
    let mut running = false;
    // The current step: its start, this stream's schedule, what it sent in it.
    let mut step = (
        Instant::now(),
        0u64,
        Schedule {
            rate: 0.0,
            phase: 0.0,
        },
        0u64,
    );
    // The run may have started while this stream connected: look at the phase at once.
    phase.mark_changed();
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => {
                shared
                    .counters
                    .unacked
                    .fetch_add(pending.outstanding as u64, Ordering::Relaxed);
                return Ok(());
            }
            changed = phase.changed() => {
                changed?;
                running = *phase.borrow_and_update() == Phase::Running;
                if running {
                    let s = shared.step();
                    let schedule = Schedule {
                        rate: s.rate as f64 / streams as f64,
                        phase: pace::phase(stream, streams),
                    };
                    step = (s.go, s.go_us, schedule, 0);
                    active = Some(Active::new(&shared.active_publishers));
                }
            }
            _ = tick.tick(), if running => {
                let (go, go_us, schedule, sent) = &mut step;
                let due = schedule.due(go.elapsed());
                while *sent < due {
                    // Full: this stream is behind; what is due goes on the next tick.
                    let Ok(permit) = tx.try_reserve() else { break };
                    id += 1;
                    let stamp = *go_us + schedule.due_at(*sent).as_micros() as u64;
                    permit.send(PublishStreamRequest {
                        id,
                        body: Some(Body::Post(PostMessageRequest {
                            channel: shared.names[c].clone(),
                            user: USER.to_string(),
                            text: shared.text_at(id, stamp),
                            team: String::new(),
                            idempotency_key: String::new(),
                        })),
                    });
                    pending.push(id, c as u32, micros_now());
                    shared.sent(c as u32);
                    *sent += 1;
                    c = (c + 1) % channels;
                }
            }
            reply = replies.message() => {
                let Some(reply) = reply.context("the PublishStream failed")? else {
                    anyhow::bail!("the admin server ended the PublishStream");
                };
                // Id 0 only says how many the server keeps unanswered.
                if reply.id != 0
                    && let Some((c, sent_us)) = pending.take(reply.id)
                {
                    if reply.code == 0 {
                        shared.acked(c, sent_us);
                    } else {
                        shared.refused(c);
                    }
                }
            }
        }
        if !running
            && !pending.waiting()
            && let Some(a) = active.as_mut()
        {
            a.settle();
        }
    }
}
