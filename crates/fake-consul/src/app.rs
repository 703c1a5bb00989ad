//! What the HTTP handlers and the timer task share: the state mutex, the change signal that
//! wakes blocking queries, the request counters, the "no leader" switch and the ACL token.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::state::State;

/// A parsed blocking query: `?index=` and the effective `?wait=` (default, cap and jitter
/// already applied).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockingQuery {
    /// The index the client has seen; 0 means "do not block".
    pub(crate) min_index: u64,
    /// How long to hold the request at most.
    pub(crate) wait: Duration,
    /// The state's epoch when the request arrived: a `reset_index` after that releases it.
    pub(crate) epoch: u64,
}

/// Recorded by the HTTP layer when a request arrives, before it is counted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    /// The state's epoch at arrival.
    pub(crate) epoch: u64,
}

#[derive(Debug)]
pub(crate) struct App {
    /// The whole store. Never held across an `.await`.
    state: Mutex<State>,
    /// Bumped after every change to `state`; blocking queries wait on it and then re-check
    /// their index.
    changed: watch::Sender<u64>,
    /// How many requests were served, by path.
    requests: Mutex<HashMap<String, u64>>,
    /// While set, every request fails as if the cluster had no leader.
    pub(crate) unavailable: AtomicBool,
    /// With ACLs on, the one management token; `None` while ACLs are off.
    acl: Mutex<Option<String>>,
    /// Cancelled on shutdown: stops the server and the timers and releases blocked queries.
    pub(crate) cancel: CancellationToken,
}

fn unpoisoned<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl App {
    pub(crate) fn new(cancel: CancellationToken) -> Self {
        App {
            state: Mutex::new(State::new()),
            changed: watch::Sender::new(0),
            requests: Mutex::new(HashMap::new()),
            unavailable: AtomicBool::new(false),
            acl: Mutex::new(None),
            cancel,
        }
    }

    /// Reads the state.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&unpoisoned(&self.state))
    }

    /// Changes the state and wakes blocked queries.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut unpoisoned(&self.state));
        self.changed.send_modify(|n| *n += 1);
        out
    }

    /// Like [`App::write`], but wakes blocked queries only if `f` reports a change.
    pub(crate) fn update(&self, f: impl FnOnce(&mut State) -> bool) {
        if f(&mut unpoisoned(&self.state)) {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// The management token while ACLs are on.
    pub(crate) fn acl_token(&self) -> Option<String> {
        unpoisoned(&self.acl).clone()
    }

    /// Turns ACLs on with `token` as the management token, or off.
    pub(crate) fn set_acl_token(&self, token: Option<String>) {
        *unpoisoned(&self.acl) = token;
    }

    /// Counts one request to `path`.
    pub(crate) fn count(&self, path: &str) {
        *unpoisoned(&self.requests)
            .entry(path.to_owned())
            .or_default() += 1;
    }

    /// How many requests were served whose path starts with `prefix`.
    pub(crate) fn request_count(&self, prefix: &str) -> u64 {
        let requests = unpoisoned(&self.requests);
        requests
            .iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Runs a blocking query: answers at once unless `query.min_index` is set and `read`
    /// reports an index no greater than it; then waits until the index grows, the wait
    /// elapses, the index is reset (`reset_index`, like a snapshot restore, at any time since
    /// the request arrived) or the fake shuts down, and answers with whatever `read` sees then.
    pub(crate) async fn blocking<T>(
        &self,
        query: BlockingQuery,
        read: impl Fn(&State) -> (u64, T),
    ) -> (u64, T) {
        let deadline = Instant::now() + query.wait;
        // Subscribing before the first read means no change can slip in between.
        let mut changes = self.changed.subscribe();
        let snapshot = |state: &State| {
            let (index, out) = read(state);
            (index, out, state.epoch)
        };
        let (mut index, mut out, mut epoch) = self.read(snapshot);
        while query.min_index > 0 && index <= query.min_index && epoch == query.epoch {
            tokio::select! {
                // Cancel-safe: a change missed here is picked up by the re-read below.
                changed = changes.changed() => if changed.is_err() { break },
                () = sleep_until(deadline) => break,
                () = self.cancel.cancelled() => break,
            }
            (index, out, epoch) = self.read(snapshot);
        }
        (index, out)
    }
}
