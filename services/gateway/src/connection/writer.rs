//! Writing to a client: the frames gathered, in one write within the write timeout (given up
//! early when the connection is closed from outside), and the close frame.

use std::task::Poll;
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

use crate::close::Close;
use crate::socket::{ClientSocket, Message, Outgoing};

/// How long the close frame may take to write before the socket is dropped regardless.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a write went.
pub(super) enum Written {
    Done,
    /// `stop` fired first: the connection is being closed from outside.
    Interrupted,
    /// The socket failed: the client is gone.
    Broken,
    /// The client did not take the frames within the write timeout.
    Stalled,
}

/// Writes `frames` (emptying it) in one write, and a ping after them when `ping`, within
/// `timeout`; gives up early when `stop` fires, so a client that stopped reading never holds
/// its connection's task. What an interrupted write left is written before the close frame.
///
/// Nearly every write is taken whole by the socket at once: the write is tried first, and the
/// timer and the watch on `stop` are set up only for one the socket did not take. Under
/// fan-out load that is most of a write's cost outside the kernel (a cancellation token's
/// lock, its waiter list and a clock read per write: 2.3% of `dev`'s core at 4,000
/// published/s in the fan-out benchmark, the largest item of the write). A `stop` that fired
/// before the write is seen by the connection's next turn, after the frames that were ready.
pub(super) async fn write(
    socket: &mut ClientSocket,
    frames: &mut Outgoing,
    ping: bool,
    timeout: Duration,
    stop: Option<&CancellationToken>,
) -> Written {
    let writing = async {
        match ping {
            true => socket.send(frames, Message::Ping(Default::default())).await,
            false => socket.write(frames).await,
        }
    };
    let mut writing = std::pin::pin!(writing);
    // Polled with the task's own context: a socket that is full registers this task for
    // writability, as the awaits below would.
    let first = std::future::poll_fn(|cx| Poll::Ready(writing.as_mut().poll(cx))).await;
    let result = match first {
        Poll::Ready(result) => Ok(result),
        Poll::Pending => {
            let timed = tokio::time::timeout(timeout, writing);
            match stop {
                Some(stop) => tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Written::Interrupted,
                    result = timed => result,
                },
                None => timed.await,
            }
        }
    };
    match result {
        Ok(Ok(())) => Written::Done,
        Ok(Err(_)) => Written::Broken,
        Err(_) => Written::Stalled,
    }
}

/// The close frame for `close`: its code and reason text (`text` when given: a disconnect's,
/// already cut to fit).
pub(super) fn close_frame(close: Close, text: Option<&str>) -> Message {
    use tokio_tungstenite::tungstenite::Utf8Bytes;
    let reason = match text {
        Some(text) => Utf8Bytes::from(crate::close::close_text(text, crate::close::MAX_CLOSE_TEXT)),
        None => Utf8Bytes::from_static(close.reason()),
    };
    Message::Close(Some(CloseFrame {
        code: close.code().into(),
        reason,
    }))
}

/// The closing handshake: sends the close frame for `close` after what is gathered, then
/// reads (and drops) what the client still sends until its close. Closing the socket with
/// unread input would reset it, and the client would lose our close frame, and its code, with
/// the reset. What was being written when the close came is finished first, so the close
/// frame does not land inside a text frame.
pub(super) async fn close(
    socket: &mut ClientSocket,
    frames: &mut Outgoing,
    close: Close,
    text: Option<&str>,
) {
    use futures::StreamExt;
    let frame = close_frame(close, text);
    let sent = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(frames, frame)).await;
    if matches!(sent, Ok(Ok(()))) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Some(Ok(msg)) = socket.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}
