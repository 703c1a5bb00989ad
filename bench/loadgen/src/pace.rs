//! Publish pacing: when each publishing client's next message is due, and a thread that wakes
//! the client at that moment.
//!
//! tokio's timer has a 1 ms resolution, so at thousands of messages per second its wake-ups
//! bunch the publishers onto the same millisecond ticks, and each tick fires a burst of
//! fan-outs at the server and back at the receivers: the load generator would be measuring its
//! own bursts. A thread sleeping with the OS clock (microseconds) wakes each publisher at its
//! own instant instead, and the publishers' phases are spread evenly over one period, so the
//! whole run publishes at an even pace. The clock still decides how many messages are due
//! ([`due`]); a wake-up only says "look now".

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The longest the pacing thread sleeps before it looks at its cancellation token again.
const MAX_SLEEP: Duration = Duration::from_millis(20);
/// Wake-ups come this much after the due instant, so the publisher's own reading of the clock
/// (floating point) surely counts the message as due.
const SLACK: Duration = Duration::from_micros(2);

/// One publisher's schedule: message `n` (from 0) is due `(n + phase) / rate` seconds after
/// the start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Messages per second.
    pub rate: f64,
    /// Where in its period the publisher fires, in [0, 1).
    pub phase: f64,
}

impl Schedule {
    /// Messages due `elapsed` after the start.
    pub fn due(&self, elapsed: Duration) -> u64 {
        let x = elapsed.as_secs_f64() * self.rate - self.phase;
        if self.rate <= 0.0 || x < 0.0 {
            0
        } else {
            x as u64 + 1
        }
    }

    /// When message `n` is due, after the start (the pacing thread wakes a little later).
    fn at(&self, n: u64) -> Duration {
        self.due_at(n) + SLACK
    }

    /// When message `n` (from 0) is due, after the start: an open-loop message carries this
    /// as its publish time, so a publisher held back shows in the latency.
    pub fn due_at(&self, n: u64) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((n as f64 + self.phase) / self.rate)
    }
}

/// Phases spread evenly: publisher slot `k` of `slots` in the whole run fires `k / slots` of
/// the way into its period.
pub fn phase(k: usize, slots: usize) -> f64 {
    if slots == 0 {
        0.0
    } else {
        (k % slots) as f64 / slots as f64
    }
}

/// Starts the pacing thread: from `start`, it wakes `wakes[i]` each time publisher `i`'s next
/// message is due, until `stop` is cancelled. Wakes use `notify_one`, which keeps one permit
/// for a publisher that is not waiting (busy, or its window full), so none is lost.
pub fn spawn(
    start: Instant,
    publishers: Vec<(Schedule, Arc<Notify>)>,
    stop: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || run(start, &publishers, &stop))
}

fn run(start: Instant, publishers: &[(Schedule, Arc<Notify>)], stop: &CancellationToken) {
    // (due, publisher, message number), earliest first.
    let mut queue: BinaryHeap<Reverse<(Duration, usize, u64)>> = publishers
        .iter()
        .enumerate()
        .filter(|(_, (s, _))| s.rate > 0.0 && s.rate.is_finite())
        .map(|(i, (s, _))| Reverse((s.at(0), i, 0)))
        .collect();
    while !stop.is_cancelled() {
        let Some(&Reverse((at, i, n))) = queue.peek() else {
            return;
        };
        let now = start.elapsed();
        if at > now {
            std::thread::sleep((at - now).min(MAX_SLEEP));
            continue;
        }
        queue.pop();
        let (schedule, wake) = &publishers[i];
        wake.notify_one();
        // Behind (a rate beyond what one thread can wake for): one wake-up covers all that is
        // due, as the publisher counts from the clock.
        let next = (n + 1).max(schedule.due(start.elapsed()));
        queue.push(Reverse((schedule.at(next), i, next)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_fall_due_at_their_phase_in_each_period() {
        let s = Schedule {
            rate: 100.0,
            phase: 0.25,
        };
        assert_eq!(s.due(Duration::ZERO), 0);
        assert_eq!(s.due(Duration::from_micros(2_490)), 0);
        assert_eq!(s.due(Duration::from_micros(2_510)), 1);
        assert_eq!(s.due(Duration::from_micros(12_490)), 1);
        assert_eq!(s.due(Duration::from_micros(12_510)), 2);
        // The wake-up for each message finds it due.
        for n in 0..1000 {
            assert_eq!(s.due(s.at(n)), n + 1);
        }
        let idle = Schedule {
            rate: 0.0,
            phase: 0.0,
        };
        assert_eq!(idle.due(Duration::from_secs(5)), 0);
    }

    #[test]
    fn phases_are_spread_over_the_period() {
        let phases: Vec<f64> = (0..4).map(|k| phase(k, 4)).collect();
        assert_eq!(phases, vec![0.0, 0.25, 0.5, 0.75]);
        assert_eq!(phase(3, 0), 0.0);
    }

    #[test]
    fn the_thread_wakes_each_publisher_and_stops_when_told() {
        let wakes: Vec<Arc<Notify>> = (0..3).map(|_| Arc::new(Notify::new())).collect();
        let publishers = wakes
            .iter()
            .enumerate()
            .map(|(k, w)| {
                let s = Schedule {
                    rate: 1000.0,
                    phase: phase(k, 3),
                };
                (s, w.clone())
            })
            .collect();
        let stop = CancellationToken::new();
        let thread = spawn(Instant::now(), publishers, stop.clone()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            for w in &wakes {
                tokio::time::timeout(Duration::from_secs(10), w.notified())
                    .await
                    .expect("a wake-up");
            }
        });
        stop.cancel();
        thread.join().unwrap();
    }
}
