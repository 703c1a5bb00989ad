//! A runtime on a thread of its own, for the tasks that keep a node's leases: a ring lease's
//! heartbeats and lapse decisions, a gateway's presence sessions.
//!
//! A lease is lost by silence, and on a service's own runtime a heartbeat waits its turn behind
//! whatever work is queued there: the thousands of connection tasks of a gateway's fan-out
//! burst, or the member sets of every channel a ring change moved to a channel server. Here it
//! waits only for the operating system to run one more thread. The thread's runtime has one
//! worker and runs nothing else, so the service's bulk work never delays it, and it costs one
//! thread and its stack while idle.

use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A current-thread runtime on a new thread named `name`, until `cancel` fires: then the tasks
/// still on it are dropped, and `grace` bounds the wait for the runtime to end (its tasks end
/// on the same token, so none should be left). When the thread cannot be made, the
/// caller's own runtime serves instead (with a warning): the leases are kept as before, only
/// without the protection.
pub fn runtime(name: &str, cancel: CancellationToken, grace: Duration) -> Handle {
    let made = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|runtime| {
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    runtime.block_on(cancel.cancelled());
                    runtime.shutdown_timeout(grace);
                })
                .map(|_| handle)
        });
    match made {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!(thread = name, error = %e, "no thread of its own for this lease's tasks; they share the service's runtime");
            Handle::current()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn its_tasks_run_on_the_named_thread_until_cancelled() {
        let cancel = CancellationToken::new();
        let handle = runtime("lease-test", cancel.clone(), Duration::from_millis(100));
        let name = handle
            .spawn(async { std::thread::current().name().map(str::to_string) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("lease-test"));
        // A task still running when the thread is told to end is dropped after the grace.
        let forever = handle.spawn(std::future::pending::<()>());
        cancel.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(10), forever)
            .await
            .expect("the runtime ended its tasks");
        assert!(ended.unwrap_err().is_cancelled());
    }
}
