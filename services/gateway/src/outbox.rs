//! A connection's outgoing queue, bounded in items and bytes, and the [`ConnSink`] through
//! which the hub and presence push into it.
//!
//! The hub's fan-out pushes into it without waiting; the connection's task takes items out and
//! writes them; a push past the bound closes the connection as a slow consumer. It replaces a tokio `mpsc` channel, which allocates a block of 32 slots for
//! every connection up front: an idle connection's outbox holds an empty `VecDeque` (no
//! allocation), a flag and a waker.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Wake, Waker};

use futures::task::AtomicWaker;
use mesh_core::{TeamId, UserId};

use crate::close::{Close, Closer};
use crate::socket::ReadMark;
use crate::vocab::{ConnId, Outbound};

/// Capacity kept by a queue that has emptied; more is given back, so a connection that once
/// had a burst does not hold the burst's memory while idle.
const KEEP_CAPACITY: usize = 64;

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds its bound in items or bytes: the connection is a slow consumer.
    Full,
    /// The connection has ended.
    Closed,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Outbound>,
    /// Bytes of `items` as [`Outbound::queued_bytes`] counts them.
    bytes: usize,
    closed: bool,
}

/// One connection's outgoing queue.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Set by a push, taken by [`Outbox::ready`]: the task is woken once per batch of pushes,
    /// not once per push, and no push is missed.
    signaled: AtomicBool,
    /// The connection's task, to wake.
    waker: AtomicWaker,
    /// Set when the client's socket woke the task (the outbox is the socket's [`ReadMark`]).
    read_woken: AtomicBool,
    max_items: usize,
    max_bytes: usize,
}

impl Outbox {
    /// An empty outbox holding at most `max_items` items and `max_bytes` bytes.
    pub fn new(max_items: usize, max_bytes: usize) -> Self {
        Outbox {
            queue: Mutex::new(Queue::default()),
            signaled: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            read_woken: AtomicBool::new(true),
            max_items,
            max_bytes,
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` without waiting.
    pub fn push(&self, item: Outbound) -> Result<(), Refused> {
        let bytes = item.queued_bytes();
        {
            let mut q = self.queue();
            if q.closed {
                return Err(Refused::Closed);
            }
            if q.items.len() >= self.max_items || q.bytes + bytes > self.max_bytes {
                return Err(Refused::Full);
            }
            q.bytes += bytes;
            q.items.push_back(item);
        }
        self.signal();
        Ok(())
    }

    /// Queues `items`, in order, under one lock and with one wake-up; stops at the bound.
    /// Returns how many were queued, and why the rest were not.
    pub fn push_all<'a>(
        &self,
        items: impl Iterator<Item = &'a Outbound>,
    ) -> (u64, Result<(), Refused>) {
        let mut queued = 0;
        let result = {
            let mut q = self.queue();
            if q.closed {
                return (0, Err(Refused::Closed));
            }
            let mut result = Ok(());
            for item in items {
                let bytes = item.queued_bytes();
                if q.items.len() >= self.max_items || q.bytes + bytes > self.max_bytes {
                    result = Err(Refused::Full);
                    break;
                }
                q.bytes += bytes;
                q.items.push_back(item.clone());
                queued += 1;
            }
            result
        };
        if queued > 0 {
            self.signal();
        }
        (queued, result)
    }

    /// Queues `item` whatever the bound (for the connection's own, bounded, catch-up items).
    pub fn push_own(&self, item: Outbound) {
        {
            let mut q = self.queue();
            if q.closed {
                return;
            }
            q.bytes += item.queued_bytes();
            q.items.push_back(item);
        }
        self.signal();
    }

    /// Wakes the task unless a wake is already pending.
    fn signal(&self) {
        if !self.signaled.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// The next item, if any, without waiting.
    pub fn pop(&self) -> Option<Outbound> {
        let mut q = self.queue();
        let item = q.items.pop_front()?;
        q.bytes -= item.queued_bytes();
        if q.items.is_empty() && q.items.capacity() > KEEP_CAPACITY {
            q.items.shrink_to(KEEP_CAPACITY);
        }
        Some(item)
    }

    /// Moves up to `max` items, oldest first, into `out`, under one lock.
    pub fn pop_into(&self, out: &mut Vec<Outbound>, max: usize) {
        let mut q = self.queue();
        out.reserve(max.min(q.items.len()));
        for _ in 0..max {
            let Some(item) = q.items.pop_front() else {
                break;
            };
            q.bytes -= item.queued_bytes();
            out.push(item);
        }
        if q.items.is_empty() && q.items.capacity() > KEEP_CAPACITY {
            q.items.shrink_to(KEEP_CAPACITY);
        }
    }

    /// Waits until something may have been pushed. Cancel-safe: the signal is taken only
    /// when this resolves.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| {
            if self.signaled.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A push between the check and the registration woke the old waker, if any.
            if self.signaled.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Makes [`Outbox::ready`] resolve again: items are left after a batch.
    pub fn rearm(&self) {
        if !self.queue().items.is_empty() {
            self.signaled.store(true, Ordering::Release);
        }
    }

    /// The connection ended: later pushes are refused and what is queued is dropped.
    pub fn close(&self) {
        let mut q = self.queue();
        q.closed = true;
        q.items = VecDeque::new();
        q.bytes = 0;
    }
}

/// The connection's socket is read only when it woke the task, and the outbox, which the
/// connection holds anyway, keeps that mark: see [`ReadMark`].
impl ReadMark for Outbox {
    fn take(&self) -> bool {
        self.read_woken.swap(false, Ordering::AcqRel)
    }

    fn set(&self) {
        self.read_woken.store(true, Ordering::Release);
    }

    fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }
}

/// The waker the socket is polled with: marks the socket, then wakes the connection's task.
impl Wake for Outbox {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.set();
        self.waker.wake();
    }
}

#[cfg(test)]
impl Outbox {
    /// Everything queued, oldest first (for tests).
    pub(crate) fn take_all(&self) -> Vec<Outbound> {
        let mut items = Vec::new();
        self.pop_into(&mut items, usize::MAX);
        items
    }
}

/// How the hub and presence reach one connection.
#[derive(Debug, Clone)]
pub struct ConnSink {
    pub id: ConnId,
    pub user: UserId,
    /// The user's team, reported with its channel memberships upstream (`None` in tests).
    pub team: Option<TeamId>,
    pub(crate) outbox: Arc<Outbox>,
    closer: Arc<Closer>,
}

impl ConnSink {
    /// A sink queueing into `outbox`; `closer` ends the connection.
    pub fn new(id: ConnId, user: UserId, outbox: Arc<Outbox>, closer: Arc<Closer>) -> Self {
        ConnSink {
            id,
            user,
            team: None,
            outbox,
            closer,
        }
    }

    /// The same sink, naming the user's team.
    pub fn with_team(mut self, team: TeamId) -> Self {
        self.team = Some(team);
        self
    }

    /// Queues without waiting; a full queue (in items or bytes) closes the connection as a
    /// slow consumer: the fan-out never waits for one client.
    pub fn push(&self, item: Outbound) -> bool {
        match self.outbox.push(item) {
            Ok(()) => true,
            Err(Refused::Full) => {
                self.slow_consumer();
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    /// Closes the connection as a slow consumer (once).
    pub(crate) fn slow_consumer(&self) {
        if self.closer.close(Close::QueueOverflow) {
            tracing::info!(conn = self.id, user = %self.user, "closing slow consumer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Outbound {
        Outbound::frame("x".repeat(n))
    }

    #[test]
    fn a_queued_item_is_two_words() {
        // Every subscriber's queue gets one per event: the rare kinds are boxed.
        assert_eq!(
            std::mem::size_of::<Outbound>(),
            2 * std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn bounded_in_items_and_bytes() {
        let outbox = Outbox::new(3, 100);
        assert_eq!(outbox.push(frame(40)), Ok(()));
        assert_eq!(outbox.push(frame(40)), Ok(()));
        assert_eq!(outbox.push(frame(40)), Err(Refused::Full));
        assert_eq!(outbox.push(frame(20)), Ok(()));
        assert_eq!(outbox.push(frame(0)), Err(Refused::Full));
        assert!(outbox.pop().is_some());
        assert_eq!(outbox.push(frame(40)), Ok(()));
        outbox.close();
        assert!(outbox.pop().is_none());
        assert_eq!(outbox.push(frame(1)), Err(Refused::Closed));
    }

    #[test]
    fn a_batch_is_queued_up_to_the_bound_and_taken_in_order() {
        let outbox = Outbox::new(3, 1000);
        let items: Vec<Outbound> = (1..=4).map(frame).collect();
        let (queued, result) = outbox.push_all(items.iter());
        assert_eq!((queued, result), (3, Err(Refused::Full)));
        let mut out = Vec::new();
        outbox.pop_into(&mut out, 2);
        outbox.pop_into(&mut out, 5);
        let lens: Vec<usize> = out.iter().map(Outbound::queued_bytes).collect();
        assert_eq!(lens, [1, 2, 3]);
        assert_eq!(outbox.push_all(items[..1].iter()), (1, Ok(())));
        outbox.close();
        assert_eq!(outbox.push_all(items.iter()), (0, Err(Refused::Closed)));
    }

    #[test]
    fn a_full_sink_closes_its_connection_as_a_slow_consumer() {
        let outbox = Arc::new(Outbox::new(1, 100));
        let closer = Arc::new(Closer::default());
        let user = UserId::new("U1").unwrap();
        let sink = ConnSink::new(7, user, outbox.clone(), closer.clone());
        assert!(sink.push(frame(1)));
        assert_eq!(closer.reason(), None);
        assert!(!sink.push(frame(1)));
        assert_eq!(closer.reason(), Some(Close::QueueOverflow));
        assert!(closer.token().is_cancelled());
        // A closed outbox refuses quietly: the connection is already gone.
        outbox.close();
        let quiet = Arc::new(Closer::default());
        let user = UserId::new("U1").unwrap();
        let gone = ConnSink::new(8, user, outbox, quiet.clone());
        assert!(!gone.push(frame(1)));
        assert_eq!(quiet.reason(), None);
    }

    #[test]
    fn the_outbox_marks_its_socket_when_woken_through_it_and_wakes_the_task() {
        use std::sync::atomic::AtomicUsize;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let outbox = Arc::new(Outbox::new(8, 1024));
        // A new socket reads on its first poll.
        assert!(outbox.take());
        assert!(!outbox.take(), "taken");
        outbox.register(&Waker::from(task.clone()));
        Waker::from(outbox.clone()).wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "the task was woken");
        assert!(outbox.take(), "and the socket marked");
        assert!(!outbox.take());
        // A push wakes the task without marking the socket.
        outbox.register(&Waker::from(task.clone()));
        outbox.push(frame(1)).unwrap();
        assert_eq!(task.0.load(Ordering::Relaxed), 2);
        assert!(!outbox.take());
    }

    #[tokio::test]
    async fn a_push_before_waiting_is_not_missed() {
        let outbox = Outbox::new(8, 1024);
        outbox.push(frame(1)).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), outbox.ready())
            .await
            .expect("the permit was kept");
        assert!(outbox.pop().is_some());
    }
}
