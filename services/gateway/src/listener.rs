//! The gateway's accept loop: HTTP/1.1 with upgrades, a cap on open sockets, and a deadline
//! on request headers.
//!
//! `axum::serve` cannot bound either, so the gateway drives hyper itself (the pattern of
//! axum's "serve-with-hyper" example). Each accepted socket holds a permit of a semaphore
//! sized to `Limits::max_sockets` for as long as the socket lives — through a WebSocket
//! upgrade, since the permit travels inside the I/O object — so at the cap accept simply waits
//! instead of failing with EMFILE. hyper's `header_read_timeout` ends connections whose
//! request headers do not arrive in time (slowloris), on every request of a keep-alive
//! connection; bodies have their own deadline where they are read (`admission`). Each request
//! carries its TCP peer's address (axum's `ConnectInfo`), for the per-address limits.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::Request;
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause after a failed accept (the process is out of file descriptors, say).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long HTTP connections get to finish when the gateway shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A TCP stream that holds one of the listener's socket permits until it is dropped.
#[derive(Debug)]
struct Capped {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Open sockets of one listener, for operators and tests.
#[derive(Debug)]
pub struct Sockets {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Sockets {
    pub fn new(max: usize) -> Self {
        Sockets {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Sockets open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// Whether hyper ended a connection because its request headers did not arrive in time.
fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Serves `app` on `listener` until `cancel`, holding at most `sockets.max` sockets open and
/// giving each request `header_timeout` to send its headers.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    app: Router,
    sockets: &Sockets,
    header_timeout: Duration,
    header_timeouts: mesh_telemetry::prometheus::IntCounter,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let builder = Arc::new(builder.http1_only());
    let service = TowerToHyperService::new(app);
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = sockets.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        // Events are small frames written as they come: Nagle's algorithm would hold them
        // back behind the client's delayed ACKs (tens of milliseconds).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let io = TokioIo::new(Capped {
            io: tcp,
            _permit: permit,
        });
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let app = service.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            app.call(request)
        });
        let timeouts = header_timeouts.clone();
        tracker.spawn(async move {
            let connection = builder.serve_connection_with_upgrades(io, service);
            if let Err(e) = watcher.watch(connection).await {
                if is_header_timeout(e.as_ref()) {
                    timeouts.inc();
                }
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("http connections still open after the shutdown grace");
    }
}
