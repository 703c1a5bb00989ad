//! A client's WebSocket: the upgrade, and a socket that writes text frames itself.
//!
//! tungstenite reads the client's frames (masked, possibly fragmented, with control frames in
//! between) and writes the rare control frames: pong replies, ping, close. Every text frame the
//! gateway sends is encoded here instead, straight into one buffer per write: a server frame is
//! a 2–10 byte header and the payload, unmasked, so a batch of fan-out events becomes one
//! contiguous write with one copy of each payload. Going through tungstenite's `Sink` cost a
//! frame object, a second buffer, and a lock of the split halves per frame: a third of the
//! gateway's time under fan-out load (the profile is in ARCHITECTURE.md).
//!
//! The two writers never interleave inside a frame: the buffer is written whole before
//! tungstenite writes anything, and what tungstenite queued while reading (a pong) is flushed
//! before the buffer is.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

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

/// Buffer capacity kept between writes, so a busy connection does not grow its buffer again
/// for every write; a larger one (after a burst) is given back at once, and a quiet
/// connection gives back all of it ([`Outgoing::release`]).
const KEEP_CAPACITY: usize = 64 * 1024;

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
            then(ClientSocket {
                ws,
                control_queued: false,
                mid_write: false,
            })
            .await;
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

/// Text frames encoded for one write, and how much of them is written.
#[derive(Debug, Default)]
pub struct Outgoing {
    buf: Vec<u8>,
    /// Bytes of `buf` written: a write interrupted part-way resumes here, so a frame is never
    /// cut by another.
    sent: usize,
    frames: usize,
}

impl Outgoing {
    /// Appends a text frame holding `text`.
    pub fn text(&mut self, text: &str) {
        let payload = text.as_bytes();
        let len = payload.len();
        // FIN + text opcode; a server's frames are not masked.
        if len < 126 {
            self.buf.extend_from_slice(&[0x81, len as u8]);
        } else if let Ok(len) = u16::try_from(len) {
            self.buf.extend_from_slice(&[0x81, 126]);
            self.buf.extend_from_slice(&len.to_be_bytes());
        } else {
            self.buf.extend_from_slice(&[0x81, 127]);
            self.buf.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.buf.extend_from_slice(payload);
        self.frames += 1;
    }

    /// Frames gathered since the last complete write.
    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == self.sent
    }

    /// Frees the buffer if nothing is waiting in it.
    pub fn release(&mut self) {
        if self.is_empty() {
            self.buf = Vec::new();
            self.sent = 0;
            self.frames = 0;
        }
    }

    fn written(&mut self) {
        self.buf.clear();
        self.sent = 0;
        self.frames = 0;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(KEEP_CAPACITY);
        }
    }
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
}

impl ClientSocket {
    /// Writes `out` whole (emptying it), after anything tungstenite queued. Cancel-safe: when
    /// the future is dropped part-way, the next call goes on from the first unwritten byte.
    pub async fn write(&mut self, out: &mut Outgoing) -> Result<(), Error> {
        if self.control_queued {
            self.ws.flush().await?;
            self.control_queued = false;
        }
        self.mid_write = true;
        let io = self.ws.get_mut();
        while out.sent < out.buf.len() {
            let n = io.write(&out.buf[out.sent..]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            out.sent += n;
        }
        self.mid_write = false;
        out.written();
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
        let next = self.ws.poll_next_unpin(cx);
        if let Poll::Ready(Some(Ok(Message::Ping(_) | Message::Close(_)))) = &next {
            self.control_queued = true;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frames_carry_their_length_in_the_shortest_form() {
        let mut out = Outgoing::default();
        out.text("hi");
        assert_eq!(out.buf, b"\x81\x02hi");
        let mut out = Outgoing::default();
        out.text(&"x".repeat(126));
        assert_eq!(&out.buf[..4], &[0x81, 126, 0, 126]);
        assert_eq!(out.buf.len(), 4 + 126);
        let mut out = Outgoing::default();
        out.text(&"x".repeat(70_000));
        assert_eq!(&out.buf[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(out.frames(), 1);
    }

    #[test]
    fn frames_decode_with_tungstenite() {
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        let mut out = Outgoing::default();
        let texts = ["a", &"b".repeat(300), ""];
        for t in texts {
            out.text(t);
        }
        let mut cursor = std::io::Cursor::new(out.buf.as_slice());
        for t in texts {
            let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final);
            assert!(header.mask.is_none());
            let start = cursor.position() as usize;
            assert_eq!(&out.buf[start..start + len as usize], t.as_bytes());
            cursor.set_position((start + len as usize) as u64);
        }
        assert_eq!(cursor.position() as usize, out.buf.len());
    }
}
