//! Static stability and fencing with real processes: a frozen ring manager costs no publish,
//! and a channel server cut off from the ring manager while its peers still hear it stops
//! accepting writes before its slots are given away.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::processes::{ADMIN_TOKEN, Dev, signal};
use crate::support::{admin_at, poster, ring_with};

#[tokio::test]
async fn a_ring_manager_frozen_for_ten_seconds_fails_no_publish() {
    let dev = Dev::start("rm-frozen-10s");
    let admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let (before, _) = ring_with(dev.ring_manager, &dev.operator).await;
    let stop = CancellationToken::new();
    let posts = poster(&admin, "CSTABLE", stop.clone());
    posts.acked_since(Instant::now(), 20).await;

    signal(dev.ring_manager_pid, Signal::SIGSTOP);
    // The fault itself, not a wait for anything: the ring manager stays frozen for 10 s while
    // the posts go on (every lease lapses after 400 ms; the channel servers find that none of
    // them hears the ring manager and keep serving on the ring they know).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let frozen_posts = posts.next_index();
    signal(dev.ring_manager_pid, Signal::SIGCONT);
    posts.acked_since(Instant::now(), 20).await;
    stop.cancel();
    let (acked, failed) = posts.finish().await;
    assert_eq!(failed, 0, "posts failed around the freeze");
    assert!(acked.len() >= frozen_posts, "{} acked", acked.len());

    // Its own freeze counted as nobody's silence: the ring keeps its active nodes.
    let (after, members) = ring_with(dev.ring_manager, &dev.operator).await;
    assert!(after.same_assignment(&before), "{members:?}");
    assert!(members.iter().all(|m| m.state != "down"), "{members:?}");
}
