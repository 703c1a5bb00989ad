//! The Consul backend's server side: ring managers elect a leader with a Consul session lock,
//! and the leader writes the ring to Consul KV (check-and-set, fenced by its lock). The keys,
//! and how every service follows them, are in `ring_client::consul_ring`.
//!
//! Every ring manager also follows the ring as services do (the same acceptance rule,
//! `consul_ring::check`), keeping the last good record it saw. A new leader resumes from the
//! stored record only if an earlier leader could have written it (a lower lock index, or its
//! own session's); otherwise from that last good record, or not at all. It then writes the
//! ring at once, stamped with its own lock index and session, so that readers — which accept
//! only the current leader's record — find it. While it leads it keeps the ring key its own:
//! when anyone else writes the key, it writes its ring back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ring_client::consul::{BlockingLoop, Consul, KvEntry};
use ring_client::consul_ring::{
    BACKOFF_MAX, BACKOFF_MIN, BLOCKING_WAIT, MIN_QUERY_SPACING, decode_record, follow_records,
};
pub use ring_client::consul_ring::{ConsulRing, DEFAULT_PREFIX, LeaderInfo, Record};

use crate::server::{Config, RingManager, Store};
use crate::state_file::Saved;

/// Default: the leader's session TTL (Consul's minimum is 10 s; it may wait up to twice that
/// before invalidating a session whose holder died).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10);
/// Default: how long the lock stays untakeable after its holder's session is invalidated
/// (Consul's default is 15 s; a small one speeds failover while still letting a dying leader's
/// in-flight writes fail first — and they cannot succeed anyway, being fenced).
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(1);
/// How long a leader retries binding its gRPC address (a previous leadership of the same
/// process may still be closing it).
const BIND_RETRY: Duration = Duration::from_secs(5);
/// How long a graceful step-down waits to flush the last ring and release the lock.
const STEP_DOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// How a ring manager runs on Consul.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// The gRPC endpoint others dial when this one leads, e.g. `http://10.0.0.5:50050`.
    pub endpoint: String,
    /// The address it serves gRPC on while it leads.
    pub listen: SocketAddr,
    pub session_ttl: Duration,
    pub lock_delay: Duration,
    /// Each region's nearest regions, nearest first (for drains).
    pub nearest: Vec<(String, Vec<String>)>,
}

/// Runs one ring manager of a Consul-backed group until `cancel`: it campaigns for the lock;
/// while it holds it, it serves the ring manager on `config.listen`, resumed from the ring in
/// KV, and writes every change back; when it loses the lock (or a fenced write is refused) it
/// stops serving and campaigns again.
pub async fn run_leader_election(
    ring: ConsulRing,
    manager_config: Config,
    config: LeaderConfig,
    cancel: CancellationToken,
) -> Result<(), crate::Error> {
    let (leadership, _) = watch::channel(None);
    let authorizer = mesh_transport::Authorizer::new(&mesh_telemetry::Telemetry::default());
    run_leader_election_with(ring, manager_config, config, leadership, authorizer, cancel).await
}

/// [`run_leader_election`], publishing on `leadership` the ring manager while this one leads
/// and `None` while it follows (the console shows the one that serves); every leadership's
/// gRPC server checks calls with `authorizer`.
pub async fn run_leader_election_with(
    ring: ConsulRing,
    manager_config: Config,
    config: LeaderConfig,
    leadership: watch::Sender<Option<RingManager>>,
    authorizer: mesh_transport::Authorizer,
    cancel: CancellationToken,
) -> Result<(), crate::Error> {
    // The last ring record this ring manager accepted as a reader: what it resumes from if,
    // once it leads, the stored record is not an earlier leader's.
    let (last_good, seen) = watch::channel(None);
    let following = cancel.child_token();
    let follower = tokio::spawn(follow_records(
        ring.clone(),
        following.clone(),
        move |outcome| {
            if let Ok(record) = outcome {
                last_good.send_replace(Some(Arc::new(record)));
            }
        },
    ));
    let mut backoff = BACKOFF_MIN;
    while !cancel.is_cancelled() {
        let name = format!("channelmesh-ring-manager {}", config.endpoint);
        let session = match ring
            .consul
            .create_session(&name, config.session_ttl, config.lock_delay)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot create a consul session");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        tracing::info!(%session, "consul session created; campaigning for the ring manager lock");
        let session_alive = cancel.child_token();
        let renewer = tokio::spawn(renew(
            ring.consul.clone(),
            session.clone(),
            config.session_ttl,
            session_alive.clone(),
        ));
        campaign(
            &ring,
            manager_config,
            &config,
            (&session, &leadership, &seen, &authorizer),
            &session_alive,
        )
        .await;
        session_alive.cancel();
        let _ = renewer.await;
        // Best effort: a clean exit lets a follower take over without waiting for the TTL.
        if cancel.is_cancelled() {
            let release = async {
                let _ = ring.consul.release(&ring.lock_key(), &session).await;
                let _ = ring.consul.destroy_session(&session).await;
            };
            let _ = tokio::time::timeout(STEP_DOWN_TIMEOUT, release).await;
        }
    }
    following.cancel();
    let _ = follower.await;
    Ok(())
}

/// The last good ring record a ring manager saw as a reader.
type LastGood = watch::Receiver<Option<Arc<Record>>>;

/// Renews `session` every third of its TTL; cancels `alive` when Consul says it is gone or
/// when no renewal succeeded for a whole TTL.
async fn renew(consul: Consul, session: String, ttl: Duration, alive: CancellationToken) {
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = alive.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let lost = match consul.renew_session(&session).await {
            Ok(true) => {
                last_ok = Instant::now();
                false
            }
            Ok(false) => {
                tracing::warn!(%session, "consul session was invalidated");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the consul session");
                lapsed(last_ok.elapsed(), ttl)
            }
        };
        if lost {
            alive.cancel();
            return;
        }
    }
}

/// Whether a session last renewed `since_renewed` ago is lost to renewals that keep failing:
/// after a whole TTL, Consul may have invalidated it.
fn lapsed(since_renewed: Duration, ttl: Duration) -> bool {
    since_renewed >= ttl
}

/// The next retry pause after `backoff`: twice as long, at most [`BACKOFF_MAX`].
fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(BACKOFF_MAX)
}

/// Whether the lock, as its KV entry shows it, is held by `session`.
fn held_by(lock: Option<&KvEntry>, session: &str) -> bool {
    lock.and_then(|l| l.session.as_deref()) == Some(session)
}

/// How long a campaign that did not win the lock pauses before trying again: the backoff when
/// another session holds it, a gentle pace (a quarter of the lock delay, within bounds) while
/// the lock is free but in its lock delay.
fn campaign_pause(held: bool, backoff: Duration, lock_delay: Duration) -> Duration {
    if held {
        backoff
    } else {
        (lock_delay / 4).clamp(MIN_QUERY_SPACING, BACKOFF_MAX)
    }
}

/// What a campaign leads with: its Consul session, where it publishes its ring manager while
/// it leads, the last good record it saw as a reader, and what checks the calls it serves.
type Leading<'a> = (
    &'a str,
    &'a watch::Sender<Option<RingManager>>,
    &'a LastGood,
    &'a mesh_transport::Authorizer,
);

/// Campaigns with `session` until it is lost, leading whenever the lock is won.
async fn campaign(
    ring: &ConsulRing,
    manager_config: Config,
    config: &LeaderConfig,
    (session, leadership, seen, authorizer): Leading<'_>,
    alive: &CancellationToken,
) {
    let lock_key = ring.lock_key();
    let info = LeaderInfo {
        endpoint: config.endpoint.clone(),
        pid: std::process::id(),
    };
    let value = serde_json::to_vec(&info).unwrap_or_default();
    let mut blocking = BlockingLoop::new(MIN_QUERY_SPACING);
    let mut backoff = BACKOFF_MIN;
    while !alive.is_cancelled() {
        match ring.consul.acquire(&lock_key, session, value.clone()).await {
            Ok(true) => {
                backoff = BACKOFF_MIN;
                let leading = (session, leadership, seen, authorizer);
                match lead(ring, manager_config, config, leading, alive).await {
                    Ok(()) => {}
                    Err(e @ crate::Error::UntrustedRing(_)) => {
                        // Let another ring manager, which may have seen a good record, try;
                        // come back after a pause.
                        tracing::error!(error = %e, "stepping down");
                        let _ = ring.consul.release(&lock_key, session).await;
                        tokio::select! {
                            _ = alive.cancelled() => return,
                            _ = tokio::time::sleep(BACKOFF_MAX) => {}
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "leadership ended with an error"),
                }
                continue;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot campaign for the lock");
                tokio::select! {
                    _ = alive.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff);
                continue;
            }
        }
        // Someone else leads, or the lock is free but in its lock-delay. Only the first is
        // worth a blocking query (until the holder's session ends); the second is retried at
        // a gentle pace.
        let held = match ring.consul.get(&lock_key, None).await {
            Ok((entry, index)) => {
                blocking.observe(index);
                entry.is_some_and(|e| e.session.is_some())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the ring manager lock");
                false
            }
        };
        if held {
            tokio::select! {
                _ = alive.cancelled() => return,
                _ = blocking.pace() => {}
            }
            // Cancel-safe: a dropped query loses nothing.
            let answer = tokio::select! {
                _ = alive.cancelled() => return,
                a = ring.consul.get(&lock_key, Some((blocking.index(), BLOCKING_WAIT))) => a,
            };
            match answer {
                Ok((_, index)) => {
                    blocking.observe(index);
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch the ring manager lock"),
            }
        }
        let pause = campaign_pause(held, backoff, config.lock_delay);
        tokio::select! {
            _ = alive.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Leads while `session` holds the lock: serves the ring manager, resumed from KV (or from the
/// last good record `seen`, see [`resume_from`]), writes it back at once under its own fence,
/// then writes every change, fenced by the lock, and keeps the ring key its own. Returns when
/// leadership ends.
async fn lead(
    ring: &ConsulRing,
    manager_config: Config,
    config: &LeaderConfig,
    (session, leadership, seen, authorizer): Leading<'_>,
    alive: &CancellationToken,
) -> Result<(), crate::Error> {
    let (lock, _) = ring.consul.get(&ring.lock_key(), None).await?;
    let Some(lock) = lock.filter(|l| held_by(Some(l), session)) else {
        return Ok(());
    };
    let fence = Fence {
        lock_index: lock.lock_index,
        session: session.to_string(),
        leader: config.endpoint.clone(),
    };
    let (stored, _) = ring.consul.get(&ring.ring_key(), None).await?;
    let modify_index = stored.as_ref().map_or(0, |e| e.modify_index);
    let stored = stored.map(|e| decode_record(&e.value).map_err(|e| e.to_string()));
    let last_good = seen.borrow().clone();
    let saved = resume_from(&fence, stored, last_good.as_deref())?;
    let leading = alive.child_token();
    let tracker = TaskTracker::new();
    // The resumed state goes out first, stamped with this leader's fence: readers accept only
    // the current leader's record.
    let (latest, updates) = watch::channel(None);
    if let Some(saved) = &saved {
        latest.send_replace(Some((0, Arc::new(saved.clone()))));
    }
    // The number of the latest state written: a change is answered once it is in KV.
    let (stored, stored_rx) = watch::channel(0);
    let epoch = saved.as_ref().map_or(0, |s| s.epoch);
    let manager = RingManager::resume(
        manager_config,
        saved,
        Store::Latest {
            latest,
            written: stored_rx,
        },
        &tracker,
        leading.clone(),
    )?;
    manager.set_nearest(config.nearest.clone());
    tracing::info!(
        lock_index = fence.lock_index,
        epoch,
        endpoint = %config.endpoint,
        "leading the ring managers"
    );
    let lock_index = fence.lock_index;
    let (written, written_rx) = watch::channel(modify_index);
    let rewrite = Arc::new(Notify::new());
    tracker.spawn(write_ring(
        ring.clone(),
        fence,
        modify_index,
        updates,
        (written, stored, rewrite.clone()),
        leading.clone(),
    ));
    tracker.spawn(guard_ring(
        ring.clone(),
        written_rx,
        rewrite,
        leading.clone(),
    ));
    tracker.spawn(watch_lock(
        ring.clone(),
        session.to_string(),
        leading.clone(),
    ));
    let listener = bind_with_retry(config.listen, &leading).await?;
    leadership.send_replace(Some(manager.clone()));
    let served = crate::grpc::serve(manager, listener, authorizer.clone(), leading.clone()).await;
    leadership.send_replace(None);
    leading.cancel();
    tracker.close();
    tracker.wait().await;
    tracing::info!(lock_index, "no longer leading the ring managers");
    served
}

/// What a new leader (holding `fence`) resumes from: the `stored` record if an earlier holder
/// of the lock could have written it — a lower lock index, or this session's own (from an
/// earlier term of the same session) — else the `last_good` record it saw as a reader (logged
/// as an error), else nothing if the key is absent. A stored record no earlier leader wrote,
/// with no good one to fall back on, is refused: resuming it would hand its ring to readers
/// under this leader's fence.
fn resume_from(
    fence: &Fence,
    stored: Option<Result<Record, String>>,
    last_good: Option<&Record>,
) -> Result<Option<Saved>, crate::Error> {
    let problem = match stored {
        None => None,
        Some(Ok(record)) => match fence.earlier(&record) {
            Ok(()) => return Ok(Some(record.saved)),
            Err(why) => Some(why),
        },
        Some(Err(unreadable)) => Some(format!("it is unreadable: {unreadable}")),
    };
    match (problem, last_good) {
        (None, None) => Ok(None),
        (None, Some(good)) => {
            tracing::warn!(
                epoch = good.saved.epoch,
                "the ring key is gone from consul; resuming the last good ring this ring manager saw"
            );
            Ok(Some(good.saved.clone()))
        }
        (Some(why), Some(good)) => {
            tracing::error!(
                problem = %why,
                epoch = good.saved.epoch,
                "the ring record in consul was not written by an earlier leader; resuming the last good ring this ring manager saw"
            );
            Ok(Some(good.saved.clone()))
        }
        (Some(why), None) => Err(crate::Error::UntrustedRing(format!(
            "{why}; and this ring manager saw no good record to resume from instead (if the \
             lock key was deleted on purpose, delete the ring key too to start an empty ring)"
        ))),
    }
}

async fn bind_with_retry(
    addr: SocketAddr,
    cancel: &CancellationToken,
) -> Result<TcpListener, crate::Error> {
    let deadline = Instant::now() + BIND_RETRY;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline && !cancel.is_cancelled() => {
                tracing::warn!(%addr, error = %e, "binding the ring manager's address; retrying");
                tokio::time::sleep(BACKOFF_MIN).await;
            }
            Err(e) => return Err(crate::Error::Io(e)),
        }
    }
}

/// The leader's identity stamped on each record it writes: what readers check against the
/// lock (`consul_ring::check`).
#[derive(Debug, Clone)]
struct Fence {
    /// Its lock index: the fencing token.
    lock_index: u64,
    /// The session it holds the lock with.
    session: String,
    /// Its gRPC endpoint.
    leader: String,
}

impl Fence {
    /// `saved`, stamped as this leader's.
    fn record(&self, saved: &Saved) -> Record {
        Record {
            lock_index: self.lock_index,
            session: Some(self.session.clone()),
            leader: self.leader.clone(),
            saved: saved.clone(),
        }
    }

    /// Whether `record` can have been written by an earlier holder of the lock than this one:
    /// under a lower lock index, or under this one by this session (an earlier term of it).
    fn earlier(&self, record: &Record) -> Result<(), String> {
        if record.lock_index < self.lock_index
            || (record.lock_index == self.lock_index
                && record.session.as_deref() == Some(self.session.as_str()))
        {
            return Ok(());
        }
        Err(format!(
            "it claims lock index {} and session {:?}, but this leader holds the lock at index {} \
             with session {}",
            record.lock_index, record.session, self.lock_index, self.session
        ))
    }
}

/// Writes each new state to the ring key, in order, by a transaction that checks the lock is
/// still this session's and the key was not written by anyone else since; and writes the
/// latest state again when `rewrite` is notified. A refused session check (or an ACL refusal)
/// means leadership is lost: it stops leading at once. A refused check-and-set with the lock
/// still ours means someone else wrote the ring key: it is logged, and this leader's state is
/// written over it. Each modify index written goes to `written`, and the number of each state
/// written (as [`Store::Latest`] numbers them) to `stored`.
async fn write_ring(
    ring: ConsulRing,
    fence: Fence,
    mut modify_index: u64,
    mut updates: watch::Receiver<Option<(u64, Arc<Saved>)>>,
    (written, stored, rewrite): (watch::Sender<u64>, watch::Sender<u64>, Arc<Notify>),
    leading: CancellationToken,
) {
    let lock_key = ring.lock_key();
    let ring_key = ring.ring_key();
    loop {
        // On cancellation, flush what is still unwritten (bounded by a timeout), then stop.
        // Cancel-safe: a notification or change missed here is taken on the next turn.
        let stopping = tokio::select! {
            _ = leading.cancelled() => true,
            changed = updates.changed() => changed.is_err(),
            () = rewrite.notified() => false,
        };
        if stopping && !updates.has_changed().unwrap_or(false) {
            return;
        }
        let Some((number, saved)) = updates.borrow_and_update().clone() else {
            continue;
        };
        let value = match serde_json::to_vec(&fence.record(&saved)) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the ring record");
                continue;
            }
        };
        let deadline = Instant::now() + STEP_DOWN_TIMEOUT;
        let mut backoff = BACKOFF_MIN;
        loop {
            let retry = match ring
                .consul
                .fenced_cas(&lock_key, &fence.session, &ring_key, &value, modify_index)
                .await
            {
                Ok(Ok(index)) => {
                    modify_index = index;
                    written.send_replace(index);
                    stored.send_replace(number);
                    tracing::debug!(epoch = saved.epoch, index, "ring written to consul");
                    break;
                }
                Ok(Err(refused)) if refused.failed(0) || refused.denied() => {
                    let reasons: Vec<String> = refused.0.iter().map(|e| e.to_string()).collect();
                    tracing::error!(
                        ?reasons,
                        "consul refused the fenced ring write: this ring manager no longer leads"
                    );
                    leading.cancel();
                    return;
                }
                Ok(Err(_)) => {
                    // The lock is ours but the key moved: someone else wrote (or deleted) it.
                    match ring.consul.get(&ring_key, None).await {
                        Ok((entry, _)) => {
                            let claims = entry.as_ref().map(|e| {
                                decode_record(&e.value)
                                    .map(|r| {
                                        format!(
                                            "lock index {}, leader {:?}",
                                            r.lock_index, r.leader
                                        )
                                    })
                                    .unwrap_or_else(|e| e.to_string())
                            });
                            tracing::error!(
                                ?claims,
                                "the ring key in consul was written by someone other than this leader; writing this leader's ring over it"
                            );
                            modify_index = entry.map_or(0, |e| e.modify_index);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the ring key"),
                    }
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot write the ring to consul; retrying");
                    true
                }
            };
            if retry {
                if leading.is_cancelled() && Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = next_backoff(backoff);
            }
        }
        if stopping {
            return;
        }
    }
}

/// While leading, follows the ring key by blocking queries and notifies `rewrite` whenever its
/// modify index is not the last one this leader wrote (`written`): someone else wrote or
/// deleted it, and the writer puts this leader's ring back.
async fn guard_ring(
    ring: ConsulRing,
    written: watch::Receiver<u64>,
    rewrite: Arc<Notify>,
    leading: CancellationToken,
) {
    let key = ring.ring_key();
    watch_key(&ring, &key, "the ring key", &leading, |entry| {
        let current = entry.map_or(0, |e| e.modify_index);
        if current != *written.borrow() {
            rewrite.notify_one();
        }
        true
    })
    .await;
}

/// Stops leading when the lock key shows another (or no) session.
async fn watch_lock(ring: ConsulRing, session: String, leading: CancellationToken) {
    let key = ring.lock_key();
    watch_key(&ring, &key, "the lock", &leading, |entry| {
        if held_by(entry.as_ref(), &session) {
            return true;
        }
        let holder = entry.and_then(|e| e.session);
        tracing::warn!(?holder, "the ring manager lock is no longer ours");
        leading.cancel();
        false
    })
    .await;
}

/// While `leading`, follows `key` by blocking queries and hands each answer to `seen` until it
/// returns false. Consul unreachable: retried every [`BACKOFF_MAX`] (the session renewer
/// decides when the session is lost).
async fn watch_key(
    ring: &ConsulRing,
    key: &str,
    what: &str,
    leading: &CancellationToken,
    mut seen: impl FnMut(Option<KvEntry>) -> bool,
) {
    let mut blocking = BlockingLoop::new(MIN_QUERY_SPACING);
    loop {
        tokio::select! {
            _ = leading.cancelled() => return,
            _ = blocking.pace() => {}
        }
        // Cancel-safe: a dropped query loses nothing.
        let answer = tokio::select! {
            _ = leading.cancelled() => return,
            a = ring.consul.get(key, Some((blocking.index(), BLOCKING_WAIT))) => a,
        };
        match answer {
            Ok((entry, index)) => {
                blocking.observe(index);
                if !seen(entry) {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch {what}");
                tokio::select! {
                    _ = leading.cancelled() => return,
                    _ = tokio::time::sleep(BACKOFF_MAX) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(session: Option<&str>) -> KvEntry {
        KvEntry {
            key: "channelmesh/ring-manager/leader".into(),
            value: Vec::new(),
            session: session.map(String::from),
            lock_index: 3,
            modify_index: 9,
        }
    }

    #[test]
    fn only_the_sessions_own_lock_counts_as_held_by_it() {
        assert!(held_by(Some(&lock(Some("s1"))), "s1"));
        assert!(!held_by(Some(&lock(Some("s2"))), "s1"));
        assert!(!held_by(Some(&lock(None)), "s1"), "a released lock");
        assert!(!held_by(None, "s1"), "no lock key yet");
    }

    #[test]
    fn retries_back_off_to_a_cap_and_a_free_lock_is_retried_gently() {
        let mut backoff = BACKOFF_MIN;
        let mut seen = vec![backoff];
        while backoff < BACKOFF_MAX {
            backoff = next_backoff(backoff);
            seen.push(backoff);
        }
        assert_eq!(seen[1], BACKOFF_MIN * 2);
        assert_eq!(next_backoff(BACKOFF_MAX), BACKOFF_MAX);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        // Held by another: the backoff. Free but in its lock delay: a quarter of the delay,
        // never busier than the query spacing nor lazier than the backoff cap.
        assert_eq!(campaign_pause(true, backoff, DEFAULT_LOCK_DELAY), backoff);
        assert_eq!(
            campaign_pause(false, backoff, Duration::from_millis(400)),
            Duration::from_millis(100)
        );
        assert_eq!(
            campaign_pause(false, backoff, Duration::ZERO),
            MIN_QUERY_SPACING
        );
        assert_eq!(
            campaign_pause(false, backoff, Duration::from_secs(60)),
            BACKOFF_MAX
        );
    }

    #[test]
    fn a_session_is_lost_after_a_whole_ttl_without_a_renewal() {
        assert!(!lapsed(DEFAULT_SESSION_TTL / 3 * 2, DEFAULT_SESSION_TTL));
        assert!(lapsed(DEFAULT_SESSION_TTL, DEFAULT_SESSION_TTL));
    }

    fn saved(epoch: u64) -> Saved {
        Saved {
            epoch,
            next_incarnation: 1,
            ..Saved::default()
        }
    }

    fn record(lock_index: u64, session: &str, epoch: u64) -> Record {
        Record {
            lock_index,
            session: Some(session.into()),
            leader: String::new(),
            saved: saved(epoch),
        }
    }

    #[test]
    fn a_new_leader_resumes_only_what_an_earlier_leader_wrote() {
        let fence = Fence {
            lock_index: 5,
            session: "s5".into(),
            leader: String::new(),
        };
        let epoch =
            |resumed: Result<Option<Saved>, crate::Error>| resumed.unwrap().map(|s| s.epoch);
        let good = record(4, "s4", 30);
        // Nothing stored, nothing seen: an empty ring.
        assert_eq!(epoch(resume_from(&fence, None, None)), None);
        // An earlier leader's record, or this session's own from an earlier term.
        let earlier = Some(Ok(record(4, "s4", 31)));
        assert_eq!(epoch(resume_from(&fence, earlier, Some(&good))), Some(31));
        let own = Some(Ok(record(5, "s5", 32)));
        assert_eq!(epoch(resume_from(&fence, own, None)), Some(32));
        // A record no earlier leader wrote — a lock index the lock never reached, or this
        // index under another session — or an unreadable one: the last good record instead.
        for forged in [record(u64::MAX, "s5", 1_000_000), record(5, "intruder", 33)] {
            assert_eq!(
                epoch(resume_from(&fence, Some(Ok(forged.clone())), Some(&good))),
                Some(30)
            );
            let refused = resume_from(&fence, Some(Ok(forged)), None).unwrap_err();
            assert!(
                matches!(&refused, crate::Error::UntrustedRing(why) if why.contains("this leader holds the lock at index 5")),
                "{refused}"
            );
        }
        let unreadable = Some(Err("not json".to_string()));
        assert_eq!(
            epoch(resume_from(&fence, unreadable, Some(&good))),
            Some(30)
        );
        // The ring key deleted: the last good record.
        assert_eq!(epoch(resume_from(&fence, None, Some(&good))), Some(30));
    }

    #[test]
    fn every_record_carries_the_leaders_fence() {
        let saved = Saved {
            next_incarnation: 1,
            ..Saved::default()
        };
        let fence = Fence {
            lock_index: 7,
            session: "s7".into(),
            leader: "http://10.0.0.5:50050".into(),
        };
        let record = fence.record(&saved);
        assert_eq!(record.lock_index, 7);
        assert_eq!(record.session.as_deref(), Some("s7"));
        assert_eq!(record.leader, "http://10.0.0.5:50050");
        assert_eq!(record.saved, saved);
        let decoded =
            ring_client::consul_ring::decode_record(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(decoded, record);
    }
}
