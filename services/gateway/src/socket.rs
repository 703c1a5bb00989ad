//! A client's WebSocket: the upgrade, and a socket that writes text frames itself.
//!
//! tungstenite reads the client's frames (masked, possibly fragmented, with control frames in
//! between) and writes the rare control frames: pong replies, ping, close. Every text frame the
//! gateway sends is encoded here instead, straight into one buffer per write: a server frame is
//! a 2–10 byte header and the payload, unmasked, so a batch of fan-out events becomes one
//! contiguous write with one copy of each payload, into a buffer the thread's connections
//! share ([`Outgoing`]). Going through tungstenite's `Sink` cost a
//! frame object, a second buffer, and a lock of the split halves per frame: a third of the
//! gateway's time under fan-out load (the profile is in docs/decisions.md, "Text frames are written by the gateway itself").
//!
//! The two writers never interleave inside a frame: the buffer is written whole before
//! tungstenite writes anything, and what tungstenite queued while reading (a pong) is flushed
//! before the buffer is.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, Stream, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
pub use tokio_tungstenite::tungstenite::{Error, Message};

use crate::vocab::Rendered;

/// Largest write buffer kept for reuse; a larger one (after a burst) is freed once written.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Write buffers kept per thread for the next write.
const SPARE_BUFFERS: usize = 8;

/// A new write buffer's capacity: a batch of fan-out events fits without growing it.
const START_CAPACITY: usize = 8 * 1024;

thread_local! {
    /// Write buffers written out, for the next write on this thread. A connection encodes
    /// its frames into one only when it writes, and nearly every write completes at once,
    /// so under fan-out load the same buffer or two take every connection's batch in turn
    /// and stay in the CPU cache, where a buffer per connection (a thousand connections'
    /// worth of kilobytes) was cold at every write. An idle connection holds none.
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A WebSocket upgrade request (HTTP/1.1 only: the gateway does not speak HTTP/2).
#[derive(Debug)]
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket upgrade: answered 400 (426 for a wrong version).
#[derive(Debug)]
pub struct NotUpgrade(StatusCode, &'static str);

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        let mut response = (self.0, self.1).into_response();
        if self.0 == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let bad = |what| NotUpgrade(StatusCode::BAD_REQUEST, what);
        if parts.version != Version::HTTP_11 || parts.method != Method::GET {
            return Err(bad("a WebSocket upgrade is an HTTP/1.1 GET"));
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(bad("Connection header must include `upgrade`"));
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(bad("Upgrade header must be `websocket`"));
        }
        if !header_has_token(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "Sec-WebSocket-Version must be 13",
            ));
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(bad("Sec-WebSocket-Key header is missing"))?;
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(bad("connection is not upgradable"))?;
        Ok(Upgrade { key, on_upgrade })
    }
}

/// Whether `name`'s comma-separated values include `token`, ignoring case.
fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Upgrade {
    /// Answers 101 and, once hyper hands the connection over, runs `then` with the socket.
    /// `then` is spawned; it should be tracked by the caller's task tracker.
    pub fn on_upgrade<F, Fut>(self, config: WebSocketConfig, then: F) -> Response
    where
        F: FnOnce(ClientSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            // Fails only when the client went away before the 101 was written.
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            then(ClientSocket::new(ws)).await;
        });
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// The text frames for the next write, gathered in order, and the write in progress.
///
/// Fan-out events are kept by reference until the write: each is encoded (header and
/// payload, one copy) straight into a write buffer shared by the thread's connections.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// Frames gathered since the last write began, in order.
    pieces: Vec<Piece>,
    /// The encoded frames of the connection's own pieces, in order.
    own: Vec<u8>,
    /// The write in progress: the pieces encoded. Empty (no capacity) between writes.
    buf: Vec<u8>,
    /// Bytes of `buf` written: a write interrupted part-way resumes here, so a frame is never
    /// cut by another.
    sent: usize,
}

#[derive(Debug)]
enum Piece {
    /// A channel event, shared with its other subscribers.
    Event(Arc<Rendered>),
    /// The next `len` bytes of `own`.
    Own(usize),
}

impl Outgoing {
    /// Appends a channel event's frame.
    pub fn event(&mut self, event: Arc<Rendered>) {
        self.pieces.push(Piece::Event(event));
    }

    /// Appends a text frame holding `text`.
    pub fn text(&mut self, text: &str) {
        let before = self.own.len();
        encode_text(&mut self.own, text.as_bytes());
        self.pieces.push(Piece::Own(self.own.len() - before));
    }

    /// Frames gathered since the last write began.
    pub fn frames(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.buf.len() == self.sent
    }

    /// Frees what is kept between writes, once nothing is waiting.
    pub fn release(&mut self) {
        if self.is_empty() {
            self.pieces = Vec::new();
            self.own = Vec::new();
        }
    }

    /// Encodes the gathered frames into a write buffer (the last write must be complete).
    fn encode(&mut self) {
        debug_assert_eq!(self.buf.len(), self.sent);
        let mut buf = SPARE
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| Vec::with_capacity(START_CAPACITY));
        let mut own = 0;
        for piece in self.pieces.drain(..) {
            match piece {
                Piece::Event(event) => encode_text(&mut buf, event.frame.as_bytes()),
                Piece::Own(len) => {
                    buf.extend_from_slice(&self.own[own..own + len]);
                    own += len;
                }
            }
        }
        self.own.clear();
        self.buf = buf;
        self.sent = 0;
    }

    /// The write buffer is written out: it goes back to the thread's spares.
    fn written(&mut self) {
        self.sent = 0;
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() > 0 && buf.capacity() <= KEEP_CAPACITY {
            buf.clear();
            SPARE.with_borrow_mut(|spare| {
                if spare.len() < SPARE_BUFFERS {
                    spare.push(buf);
                }
            });
        }
    }
}

#[cfg(test)]
impl Outgoing {
    /// The text of each frame gathered, in order, emptying it (for tests).
    pub(crate) fn texts(&mut self) -> Vec<String> {
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        self.encode();
        let buf = std::mem::take(&mut self.buf);
        self.sent = 0;
        let mut cursor = io::Cursor::new(buf.as_slice());
        let mut texts = Vec::new();
        while (cursor.position() as usize) < buf.len() {
            let (_, len) = FrameHeader::parse(&mut cursor)
                .expect("a whole header")
                .expect("a header");
            let start = cursor.position() as usize;
            let end = start + len as usize;
            texts.push(String::from_utf8_lossy(&buf[start..end]).into_owned());
            cursor.set_position(end as u64);
        }
        texts
    }
}

/// Appends an unmasked text frame (FIN set) holding `payload` to `buf`.
fn encode_text(buf: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len();
    if len < 126 {
        buf.extend_from_slice(&[0x81, len as u8]);
    } else if let Ok(len) = u16::try_from(len) {
        buf.extend_from_slice(&[0x81, 126]);
        buf.extend_from_slice(&len.to_be_bytes());
    } else {
        buf.extend_from_slice(&[0x81, 127]);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

/// A client's WebSocket after the upgrade.
#[derive(Debug)]
pub struct ClientSocket {
    ws: WebSocketStream<TokioIo<Upgraded>>,
    /// tungstenite may have queued a control frame (a pong, a close reply) while reading.
    control_queued: bool,
    /// A write of the buffer stopped part-way (its future was dropped: the connection is
    /// closing). Until it is finished, reading is held back: tungstenite writes its pong
    /// replies while reading, and one would land inside the cut frame.
    mid_write: bool,
    /// Marks the socket as woken, when the connection gave one ([`ClientSocket::mark_reads`]).
    reads: Option<Reads>,
}

/// Whether a client's socket woke its connection's task since the socket was last polled.
///
/// The connection's task is woken mostly by the fan-out, and each time it looks at every
/// source it waits on: polling the socket through tungstenite (its frame reader, its wakers,
/// the upgraded stream's layers) to learn that nothing arrived was 3.6% of `dev`'s core
/// at 4,000 published/s in the fan-out benchmark, where the subscribers send nothing. With a
/// mark, the socket is polled with a waker that sets the mark before it wakes the task, and it
/// is polled again only when marked, or when its last poll gave a frame (more may be
/// buffered). The mark lives in something the connection already holds (its outbox): no
/// allocation of its own per connection.
pub trait ReadMark: Send + Sync + 'static {
    /// Takes the mark: whether the socket was woken since the last take.
    fn take(&self) -> bool;
    /// Sets the mark, so that the next poll reads.
    fn set(&self);
    /// Wakes `waker`'s task when the mark is set.
    fn register(&self, waker: &Waker);
}

/// The mark, and a waker that sets it.
struct Reads {
    mark: Arc<dyn ReadMark>,
    waker: Waker,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reads")
    }
}

impl ClientSocket {
    fn new(ws: WebSocketStream<TokioIo<Upgraded>>) -> Self {
        ClientSocket {
            ws,
            control_queued: false,
            mid_write: false,
            reads: None,
        }
    }

    /// From now on the socket is read only when `mark` says it woke (see [`ReadMark`]); the
    /// next poll reads.
    pub fn mark_reads<M: ReadMark + Wake>(&mut self, mark: Arc<M>) {
        mark.set();
        self.reads = Some(Reads {
            waker: Waker::from(mark.clone()),
            mark,
        });
    }

    /// Writes `out` whole (emptying it), after anything tungstenite queued. Cancel-safe: when
    /// the future is dropped part-way, the next call goes on from the first unwritten byte.
    pub async fn write(&mut self, out: &mut Outgoing) -> Result<(), Error> {
        if self.control_queued {
            self.ws.flush().await?;
            self.control_queued = false;
        }
        self.mid_write = true;
        let io = self.ws.get_mut();
        loop {
            if out.sent == out.buf.len() {
                out.written();
                if out.pieces.is_empty() {
                    break;
                }
                out.encode();
            }
            let n = io.write(&out.buf[out.sent..]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            out.sent += n;
        }
        self.mid_write = false;
        Ok(())
    }

    /// Sends a control frame (ping, close) through tungstenite, after `out`.
    pub async fn send(&mut self, out: &mut Outgoing, message: Message) -> Result<(), Error> {
        self.write(out).await?;
        self.ws.send(message).await
    }

    /// Flushes what tungstenite still holds (a close reply) and ends the stream.
    pub async fn close(&mut self) -> Result<(), Error> {
        self.ws.close(None).await
    }
}

impl Stream for ClientSocket {
    type Item = Result<Message, Error>;

    /// The client's next frame. Cancel-safe, as tungstenite's stream is. Pending, without
    /// reading, while a write is cut part-way: that happens only when the connection is
    /// closing, and the close writes the rest first.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.mid_write {
            return Poll::Pending;
        }
        let this = &mut *self;
        let next = match &this.reads {
            None => this.ws.poll_next_unpin(cx),
            Some(reads) => {
                reads.mark.register(cx.waker());
                if !reads.mark.take() {
                    return Poll::Pending;
                }
                let next = this
                    .ws
                    .poll_next_unpin(&mut Context::from_waker(&reads.waker));
                if next.is_ready() {
                    // More frames may be buffered already: the next poll reads again.
                    reads.mark.set();
                }
                next
            }
        };
        if let Poll::Ready(Some(Ok(Message::Ping(_) | Message::Close(_)))) = &next {
            this.control_queued = true;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `out` writes next.
    fn encoded(out: &mut Outgoing) -> Vec<u8> {
        out.encode();
        std::mem::take(&mut out.buf)
    }

    #[test]
    fn text_frames_carry_their_length_in_the_shortest_form() {
        let mut out = Outgoing::default();
        out.text("hi");
        assert_eq!(encoded(&mut out), b"\x81\x02hi");
        out.text(&"x".repeat(126));
        let buf = encoded(&mut out);
        assert_eq!(&buf[..4], &[0x81, 126, 0, 126]);
        assert_eq!(buf.len(), 4 + 126);
        out.text(&"x".repeat(70_000));
        assert_eq!(out.frames(), 1);
        let buf = encoded(&mut out);
        assert_eq!(&buf[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(out.frames(), 0);
    }

    #[test]
    fn events_and_own_frames_keep_their_order_and_decode_with_tungstenite() {
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        let event = |text: &str| {
            Arc::new(Rendered {
                channel: mesh_core::ChannelId::new("C1").unwrap(),
                ts: None,
                frame: text.to_string().into(),
                received: None,
            })
        };
        let long = "b".repeat(300);
        let texts = ["a", &long, "", "c", "d"];
        let mut out = Outgoing::default();
        out.text(texts[0]);
        out.event(event(texts[1]));
        out.text(texts[2]);
        out.event(event(texts[3]));
        out.text(texts[4]);
        assert_eq!(out.frames(), 5);
        let buf = encoded(&mut out);
        let mut cursor = std::io::Cursor::new(buf.as_slice());
        for t in texts {
            let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final);
            assert!(header.mask.is_none());
            let start = cursor.position() as usize;
            assert_eq!(&buf[start..start + len as usize], t.as_bytes());
            cursor.set_position((start + len as usize) as u64);
        }
        assert_eq!(cursor.position() as usize, buf.len());
        assert!(out.is_empty());
    }

    /// A socket served through [`Upgrade`] on a loopback port, and its client, which has a
    /// small receive buffer so the server's writes block as soon as it stops reading.
    async fn socket_pair() -> (
        ClientSocket,
        WebSocketStream<tokio::net::TcpStream>,
        tokio::task::JoinHandle<()>,
    ) {
        use std::sync::Mutex;
        let (tx, rx) = tokio::sync::oneshot::channel::<ClientSocket>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let app = axum::Router::new().route(
            "/ws",
            axum::routing::get(move |upgrade: Upgrade| {
                let tx = tx.lock().unwrap().take();
                async move {
                    upgrade.on_upgrade(WebSocketConfig::default(), move |socket| async move {
                        if let Some(tx) = tx {
                            let _ = tx.send(socket);
                        }
                    })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let tcp = tokio::net::TcpSocket::new_v4().unwrap();
        tcp.set_recv_buffer_size(4096).unwrap();
        let stream = tcp.connect(addr).await.unwrap();
        let (client, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
            .await
            .unwrap();
        let socket = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
            .await
            .unwrap()
            .unwrap();
        (socket, client, server)
    }

    #[tokio::test]
    async fn a_socket_read_through_its_mark_gets_a_frame_that_arrives_while_it_waits() {
        use std::time::Duration;
        let (mut socket, mut client, server) = socket_pair().await;
        socket.mark_reads(Arc::new(crate::outbox::Outbox::new(8, 1024)));
        // The first poll reads and finds nothing; the frame sent later wakes the task through
        // the mark, and the next poll reads it.
        let sending = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.send(Message::text("late")).await.unwrap();
            client
        };
        let (got, mut client) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(10), socket.next()),
            sending
        );
        let got = got.expect("the frame woke the socket").unwrap().unwrap();
        assert_eq!(got, Message::text("late"));
        // Two frames in one go: the second is read from tungstenite's buffer without a wake.
        client.send(Message::text("one")).await.unwrap();
        client.send(Message::text("two")).await.unwrap();
        for want in ["one", "two"] {
            let got = tokio::time::timeout(Duration::from_secs(10), socket.next())
                .await
                .expect("read")
                .unwrap()
                .unwrap();
            assert_eq!(got, Message::text(want));
        }
        server.abort();
    }

    #[tokio::test]
    async fn nothing_is_read_while_a_write_is_cut_and_the_close_finishes_it_first() {
        use futures::FutureExt;
        use std::time::Duration;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let (mut socket, mut client, server) = socket_pair().await;
        // More than the socket buffers hold: with the client not reading, the write cannot
        // complete, and the timeout cuts it part-way, as a connection's close does.
        let text = "x".repeat(12 << 20);
        let mut out = Outgoing::default();
        out.text(&text);
        let cut = tokio::time::timeout(Duration::from_millis(200), socket.write(&mut out)).await;
        assert!(cut.is_err(), "12 MiB went into the socket buffers");
        assert!(!out.is_empty());

        // The client pings meanwhile. Reading it now would make tungstenite write its pong
        // into the middle of the cut frame: the socket reads nothing until the write is done.
        client
            .send(Message::Ping(b"p".to_vec().into()))
            .await
            .unwrap();
        // Time for the ping to arrive (should it not have, on a slow machine, the check below
        // can only pass wrongly, never fail wrongly).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            socket.next().now_or_never().is_none(),
            "read while a write was cut"
        );

        // Closing writes the rest of the frame first, then the close frame.
        let close = Message::Close(Some(CloseFrame {
            code: 4000.into(),
            reason: "done".into(),
        }));
        let reading = async {
            let mut got = Vec::new();
            while let Some(msg) = client.next().await {
                let msg = msg.expect("every frame the client reads is whole");
                let end = matches!(msg, Message::Close(_));
                got.push(msg);
                if end {
                    break;
                }
            }
            got
        };
        let (sent, got) = tokio::time::timeout(
            Duration::from_secs(30),
            futures::future::join(socket.send(&mut out, close), reading),
        )
        .await
        .expect("the close and the reads finish");
        sent.unwrap();
        assert_eq!(
            got.len(),
            2,
            "{:?}",
            got.iter().map(Message::len).collect::<Vec<_>>()
        );
        assert_eq!(got[0], Message::Text(text.into()));
        let Message::Close(Some(frame)) = &got[1] else {
            panic!("the last frame is not the close: {:?}", got[1]);
        };
        assert_eq!(u16::from(frame.code), 4000);
        // And the ping was kept for after: read now, whole.
        let ping = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap();
        assert!(matches!(ping, Some(Ok(Message::Ping(_)))), "{ping:?}");
        server.abort();
    }
}
