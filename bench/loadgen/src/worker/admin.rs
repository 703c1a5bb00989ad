//! The admin-API publishers of a worker (`--publish admin`): each makes `PostMessage` calls one
//! at a time, at its share of the rate, to the channels in turn.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{Active, Phase, Shared};
use crate::client::Admin;
use crate::clock::micros_now;

/// One admin-API publisher: `PostMessage` calls one at a time, its share of the rate, to the
/// channels in turn.
pub(super) async fn publisher(shared: Arc<Shared>, task: usize) {
    let mut active = Active::new(&shared.active_publishers);
    if let Err(e) = publish(&shared, task).await {
        tracing::warn!(task, error = %format!("{e:#}"), "admin publisher stopped");
    }
    active.settle();
}

async fn publish(shared: &Shared, task: usize) -> anyhow::Result<()> {
    let plan = &shared.plan;
    let mut admin = Admin::connect(&plan.admin, &plan.admin_token).await?;
    let mut phase = shared.phase.clone();
    while *phase.borrow_and_update() != Phase::Running {
        tokio::select! {
            _ = shared.cancel.cancelled() => return Ok(()),
            changed = phase.changed() => changed?,
        }
    }
    let rate = plan.rate_per_slot(plan.publisher_slots(&shared.members));
    let offset = if rate > 0.0 {
        rand::rng().random::<f64>() / rate
    } else {
        0.0
    };
    let started = Instant::now();
    let channels = plan.channels.max(1);
    let mut c = task % channels;
    let mut sent = 0u64;
    while *phase.borrow() == Phase::Running && !shared.cancel.is_cancelled() {
        if rate > 0.0 {
            let at = (sent as f64 + 1.0) / rate - offset;
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
        let sent_us = micros_now();
        let posted = admin
            .post(shared.names[c].clone(), "UBENCHPUB", shared.text(sent))
            .await;
        match posted {
            Ok(_) => shared.acked(c as u32, sent_us),
            Err(_) => {
                shared
                    .counters
                    .publish_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        c = (c + 1) % channels;
    }
    Ok(())
}
