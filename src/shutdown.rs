//! How every command stops: ctrl-c or SIGTERM cancels one token ([`cancel_on_signals`]), and
//! the command then has one grace period to finish ([`supervise`]); what has not stopped by
//! then is abandoned, loudly. SIGHUP reloads the policy file of the commands that take one
//! ([`reload_on_sighup`]).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The error of a command abandoned after its grace period.
#[derive(Debug, thiserror::Error)]
#[error("did not stop within {grace:?} of the signal")]
pub struct Abandoned {
    pub grace: Duration,
}

/// Cancels `cancel` on ctrl-c or SIGTERM: the one signal handler of the process.
pub fn cancel_on_signals(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate())
        .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for SIGTERM"));
    tokio::spawn(async move {
        let term = async {
            match term {
                Ok(mut term) => term.recv().await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutting down");
        cancel.cancel();
    });
}

/// Asks this process's policy files to be read again on every SIGHUP, until `cancel`: the
/// services that take `--policy-file`, and `dev` (every service in-process; forwarded to the
/// children with `--multi-process`). Other commands keep SIGHUP's default (they end).
pub fn reload_on_sighup(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: no policy reloads");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            tracing::info!("SIGHUP: reloading the policy file");
            mesh_policy::request_reload();
        }
    });
}

/// Runs `work` to its end; once `cancel` fires, gives it `grace` to finish, and then abandons
/// it (drops it) with a warning and [`Abandoned`].
pub async fn supervise(
    work: impl Future<Output = anyhow::Result<()>>,
    cancel: &CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return result,
        () = cancel.cancelled() => {}
    }
    match tokio::time::timeout(grace, work).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                ?grace,
                "did not stop within the grace period; abandoning it"
            );
            Err(Abandoned { grace }.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn work_that_ends_by_itself_gives_its_own_result() {
        let cancel = CancellationToken::new();
        let failed = supervise(async { anyhow::bail!("no") }, &cancel, GRACE).await;
        assert_eq!(failed.unwrap_err().to_string(), "no");
        assert!(supervise(async { Ok(()) }, &cancel, GRACE).await.is_ok());
    }

    #[tokio::test]
    async fn work_that_stops_within_the_grace_after_the_signal_ends_cleanly() {
        let cancel = CancellationToken::new();
        let stopping = cancel.clone();
        let work = async move {
            stopping.cancelled().await;
            tokio::time::sleep(GRACE / 2).await;
            Ok(())
        };
        cancel.cancel();
        assert!(supervise(work, &cancel, GRACE).await.is_ok());
    }

    #[tokio::test]
    async fn work_that_does_not_stop_is_abandoned_after_the_grace() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let started = tokio::time::Instant::now();
        let error = supervise(std::future::pending(), &cancel, GRACE)
            .await
            .unwrap_err();
        assert!(error.is::<Abandoned>(), "{error}");
        assert!(started.elapsed() >= GRACE);
    }
}
