//! A minimal RFC 6455 WebSocket over a tokio `TcpStream`, for the load generator's clients (and
//! the `blast` bench's server side): the HTTP/1.1 upgrade by hand from a chosen source address,
//! then frames parsed in place from one read buffer per connection and handed out as borrowed
//! payload slices — no UTF-8 validation, no allocation per frame.
//!
//! Reading is two steps, so that a `select!` never holds a borrowed frame across its other
//! branches: [`WsStream::ready`] waits (cancel-safely) until a data frame is buffered, then
//! [`WsStream::try_next`] hands out the buffered frames one at a time without waiting. Pings are
//! answered with pongs, a close is answered and ends the stream; fragmented messages and
//! compression are refused with a clear error (neither channelmesh nor nats-server sends them
//! to these clients).
//!
//! Writing: frames are appended to one write buffer ([`WsStream::push`]) and written with one
//! [`WsStream::flush`] per batch. A client masks its frames, with the zero key: legal, and the
//! payload is copied as is.
//!
//! Memory: the read buffer is allocated on the first read, grows for a large frame and goes
//! back to [`READ_CHUNK`] when it empties; with [`WsStream::set_lean`] both buffers are freed
//! whenever they empty, so a mostly idle client holds only its socket.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long the TCP connect, and then the upgrade, may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(20);
/// How much a read asks for at least: a batch of small frames in one system call.
pub const READ_CHUNK: usize = 8 * 1024;
/// The largest frame accepted by default: nats-server's max_payload with room for its framing.
pub const MAX_FRAME: usize = 1024 * 1024 + 64 * 1024;
/// The longest HTTP upgrade request or response accepted.
const MAX_HEAD: usize = 16 * 1024;
/// A write buffer above this is freed rather than kept once written.
const KEEP_WRITE: usize = 64 * 1024;
/// RFC 6455's GUID for Sec-WebSocket-Accept.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Opcodes (RFC 6455 §5.2).
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A data frame handed to the reader: its payload, borrowed from the read buffer until the
/// next call that reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// [`OP_TEXT`] or [`OP_BINARY`].
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Which end of the connection this is: a client masks what it sends (RFC 6455 §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// A frame's place in the read buffer, as [`parse`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub fin: bool,
    pub opcode: u8,
    /// The payload's bytes in the buffer (unmasked in place).
    pub payload: Range<usize>,
    /// The whole frame's length: where the next one starts.
    pub len: usize,
}

/// What [`parse`] needs before it can say more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// This many bytes in all (the whole frame, or its header so far).
    Bytes(usize),
}

/// Parses the frame at the start of `buf`, unmasking a masked payload in place: `Ok(Err(need))`
/// while it is not all there. Refuses reserved bits (no extension is negotiated), unknown
/// opcodes, a control frame that is fragmented or over 125 bytes, and a frame over `max`.
pub fn parse(buf: &mut [u8], max: usize) -> anyhow::Result<Result<Parsed, Need>> {
    if buf.len() < 2 {
        return Ok(Err(Need::Bytes(2)));
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    ensure!(
        b0 & 0x70 == 0,
        "a WebSocket frame with reserved bits set ({b0:#04x}): no extension was negotiated"
    );
    ensure!(
        matches!(
            opcode,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ),
        "a WebSocket frame with the unknown opcode {opcode:#x}"
    );
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(Err(Need::Bytes(4)));
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Err(Need::Bytes(10)));
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= OP_CLOSE {
        ensure!(
            fin && len <= 125,
            "a fragmented or oversized WebSocket control frame"
        );
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    ensure!(
        len <= max,
        "a WebSocket frame of {len} bytes (at most {max} accepted)"
    );
    let key = if masked {
        if buf.len() < at + 4 {
            return Ok(Err(Need::Bytes(at + 4)));
        }
        let key = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(key)
    } else {
        None
    };
    let end = at + len;
    if buf.len() < end {
        return Ok(Err(Need::Bytes(end)));
    }
    if let Some(key) = key.filter(|k| *k != [0; 4]) {
        for (i, b) in buf[at..end].iter_mut().enumerate() {
            *b ^= key[i & 3];
        }
    }
    Ok(Ok(Parsed {
        fin,
        opcode,
        payload: at..end,
        len: end,
    }))
}

/// A frame's header for a payload of `len` bytes: masked with the zero key for a client,
/// unmasked for a server. Returns the bytes and how many of them are used.
fn header(role: Role, opcode: u8, len: usize) -> ([u8; 14], usize) {
    let mask = if role == Role::Client { 0x80 } else { 0 };
    let mut head = [0u8; 14];
    head[0] = 0x80 | opcode;
    let mut n = match len {
        0..=125 => {
            head[1] = mask | len as u8;
            2
        }
        126..=0xFFFF => {
            head[1] = mask | 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            head[1] = mask | 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    if role == Role::Client {
        // The zero mask key: the payload goes out as is.
        n += 4;
    }
    (head, n)
}

/// Appends one whole frame to `out`.
pub fn encode(out: &mut Vec<u8>, role: Role, opcode: u8, payload: &[u8]) {
    let (head, n) = header(role, opcode, payload.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
}

/// Appends one whole frame to `out` whose payload `fill` appends (straight into `out`: no copy
/// of the payload). Room for the longest header is left first; once the payload's length is
/// known the header goes at its end, and the unused room is removed.
pub fn encode_with(out: &mut Vec<u8>, role: Role, opcode: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    let room = if role == Role::Client { 14 } else { 10 };
    out.resize(at + room, 0);
    fill(out);
    let (head, n) = header(role, opcode, out.len() - at - room);
    let gap = room - n;
    out[at + gap..at + room].copy_from_slice(&head[..n]);
    if gap > 0 {
        out.drain(at..at + gap);
    }
}

/// One WebSocket connection.
#[derive(Debug)]
pub struct WsStream {
    stream: TcpStream,
    role: Role,
    /// Bytes read and not yet consumed are `rbuf[start..]`.
    rbuf: Vec<u8>,
    start: usize,
    /// A data frame parsed and not yet handed out by [`WsStream::try_next`].
    pending: Option<Parsed>,
    /// Frames to send; `wbuf[wpos..]` is not yet written.
    wbuf: Vec<u8>,
    wpos: usize,
    /// The largest frame accepted.
    max_frame: usize,
    /// Free both buffers whenever they empty.
    lean: bool,
    /// A close frame or the end of the stream was read: nothing more comes.
    closed: bool,
    /// We sent a close frame.
    close_sent: bool,
}

impl WsStream {
    /// Wraps a stream whose upgrade is done; `leftover` is what was read past the handshake.
    pub fn new(stream: TcpStream, role: Role, leftover: Vec<u8>) -> Self {
        Self {
            stream,
            role,
            rbuf: leftover,
            start: 0,
            pending: None,
            wbuf: Vec::new(),
            wpos: 0,
            max_frame: MAX_FRAME,
            lean: false,
            closed: false,
            close_sent: false,
        }
    }

    /// Frees the buffers whenever they empty (an allocation per read instead of a buffer held
    /// per connection: for many mostly idle clients).
    pub fn set_lean(&mut self, lean: bool) {
        self.lean = lean;
        self.shrink();
    }

    /// Accepts frames up to `max` bytes.
    #[allow(dead_code, reason = "for callers with other limits; the tests use it")]
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max;
    }

    /// The bytes this connection's buffers hold now (capacity, not contents).
    #[allow(
        dead_code,
        reason = "for memory reports (the scale bench); the tests use it"
    )]
    pub fn buffered_capacity(&self) -> usize {
        self.rbuf.capacity() + self.wbuf.capacity()
    }

    /// Waits until a data frame is buffered: true, or false once the stream has ended (a close
    /// frame, answered, or the peer's EOF). Cancel-safe: dropping it loses nothing. Answers
    /// pings on the way, without waiting for the socket.
    pub async fn ready(&mut self) -> anyhow::Result<bool> {
        loop {
            if self.pending.is_some() {
                return Ok(true);
            }
            if self.parse_buffered()? {
                continue;
            }
            if self.closed {
                return Ok(false);
            }
            self.reserve();
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                self.closed = true;
            }
        }
    }

    /// The next data frame already buffered, or None; when nothing is buffered, one
    /// non-blocking read is tried first. Never waits.
    pub fn try_next(&mut self) -> anyhow::Result<Option<Frame<'_>>> {
        if self.pending.is_none() && !self.parse_buffered()? && !self.closed {
            self.reserve();
            self.try_read()?;
            if !self.parse_buffered()? {
                return Ok(None);
            }
        }
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        Ok(Some(Frame {
            opcode: p.opcode,
            payload: &self.rbuf[p.payload],
        }))
    }

    /// Waits for and returns the next data frame; None once the stream has ended.
    pub async fn next(&mut self) -> anyhow::Result<Option<Frame<'_>>> {
        if !self.ready().await? {
            return Ok(None);
        }
        self.try_next()
    }

    /// Parses buffered frames until a data frame is pending (true) or the buffer holds no
    /// whole frame (false); control frames are answered here.
    fn parse_buffered(&mut self) -> anyhow::Result<bool> {
        while !self.closed {
            let parsed = match parse(&mut self.rbuf[self.start..], self.max_frame)? {
                Ok(p) => p,
                Err(Need::Bytes(_)) => {
                    if self.start == self.rbuf.len() {
                        self.rbuf.clear();
                        self.start = 0;
                        if self.lean {
                            self.rbuf = Vec::new();
                        }
                    }
                    return Ok(false);
                }
            };
            let base = self.start;
            self.start += parsed.len;
            let payload = parsed.payload.start + base..parsed.payload.end + base;
            match parsed.opcode {
                OP_TEXT | OP_BINARY if parsed.fin => {
                    self.pending = Some(Parsed { payload, ..parsed });
                    return Ok(true);
                }
                OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                    bail!("a fragmented WebSocket message: not supported by this client")
                }
                OP_PING => {
                    let (role, data) = (self.role, &self.rbuf[payload]);
                    encode(&mut self.wbuf, role, OP_PONG, data);
                    self.try_flush()?;
                }
                OP_CLOSE => {
                    // Echo the code (the first two bytes), as RFC 6455 §5.5.1 asks.
                    let code = self.rbuf[payload].get(..2).map(<[u8]>::to_vec);
                    if !self.close_sent {
                        let role = self.role;
                        encode(
                            &mut self.wbuf,
                            role,
                            OP_CLOSE,
                            code.as_deref().unwrap_or(&[]),
                        );
                        self.close_sent = true;
                        self.try_flush()?;
                    }
                    self.closed = true;
                }
                _ => {} // A pong.
            }
        }
        Ok(false)
    }

    /// Makes room for a read: moves unconsumed bytes to the front, then ensures a chunk (or the
    /// rest of a large frame) fits. A buffer grown for a large frame goes back to a chunk when
    /// it empties.
    fn reserve(&mut self) {
        if self.start > 0 {
            self.rbuf.drain(..self.start);
            self.start = 0;
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > 4 * READ_CHUNK {
            self.rbuf = Vec::new();
        }
        let want = match parse(&mut self.rbuf, usize::MAX) {
            Ok(Err(Need::Bytes(n))) => n.min(self.max_frame + 14),
            _ => 0,
        };
        let room = want.saturating_sub(self.rbuf.len()).max(READ_CHUNK);
        self.rbuf.reserve(room);
    }

    /// Frees what lean mode lets go of.
    fn shrink(&mut self) {
        if self.lean {
            if self.start >= self.rbuf.len() && self.pending.is_none() {
                self.rbuf = Vec::new();
                self.start = 0;
            }
            if self.wpos >= self.wbuf.len() {
                self.wbuf = Vec::new();
                self.wpos = 0;
            }
        }
    }

    /// Appends a frame to the write buffer; [`WsStream::flush`] sends it.
    pub fn push(&mut self, opcode: u8, payload: &[u8]) {
        encode(&mut self.wbuf, self.role, opcode, payload);
    }

    /// Appends the frame whose payload `fill` writes straight into the write buffer.
    #[allow(dead_code, reason = "for publishers that build payloads in place")]
    pub fn push_with(&mut self, opcode: u8, fill: impl FnOnce(&mut Vec<u8>)) {
        encode_with(&mut self.wbuf, self.role, opcode, fill);
    }

    /// Whether frames wait to be written.
    pub fn wants_flush(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    /// Writes the write buffer out. Cancel-safe: what was written is remembered, the rest is
    /// written by the next flush.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        while self.wpos < self.wbuf.len() {
            let n = self.stream.write(&self.wbuf[self.wpos..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.wpos += n;
        }
        self.written();
        Ok(())
    }

    /// [`WsStream::flush`], reading what the peer sends meanwhile into the read buffer (taken
    /// by the next [`WsStream::ready`]), as a real client reads while it writes. A server that
    /// stops reading a publisher until its replies are read (flow control) would otherwise
    /// wait on a client blocked in its write: each side waits for the other until the server
    /// gives up on the client. Cancel-safe, as `flush` is.
    pub async fn flush_reading(&mut self) -> std::io::Result<()> {
        loop {
            self.try_flush()?;
            if !self.wants_flush() {
                return Ok(());
            }
            tokio::select! {
                writable = self.stream.writable() => writable?,
                readable = self.stream.readable(), if !self.closed => {
                    readable?;
                    // Appended: a frame parsed and not yet handed out keeps its place.
                    if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK {
                        self.rbuf.reserve(READ_CHUNK);
                    }
                    self.try_read()?;
                }
            }
        }
    }

    /// Appends what the socket holds now to the read buffer, without waiting; notes the end of
    /// the stream.
    fn try_read(&mut self) -> std::io::Result<()> {
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => self.closed = true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Writes what the socket takes now, without waiting.
    fn try_flush(&mut self) -> std::io::Result<()> {
        while self.wpos < self.wbuf.len() {
            match self.stream.try_write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.written();
        Ok(())
    }

    /// The write buffer is all written: empty it.
    fn written(&mut self) {
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > KEEP_WRITE {
            self.wbuf = Vec::new();
        }
        self.shrink();
    }

    /// Sends a close frame (`code`, normal closure 1000 by default) unless one was sent, then
    /// shuts the write side down. The caller bounds it with a timeout.
    pub async fn close(&mut self, code: Option<u16>) -> std::io::Result<()> {
        if !self.close_sent {
            let code = code.unwrap_or(1000).to_be_bytes();
            self.push(OP_CLOSE, &code);
            self.close_sent = true;
        }
        self.flush().await?;
        self.stream.shutdown().await
    }

    /// The TCP stream and the bytes read from it and not yet consumed (a server splitting the
    /// connection into a reader and a writer of its own).
    pub fn into_parts(mut self) -> (TcpStream, Vec<u8>) {
        self.rbuf.drain(..self.start);
        (self.stream, self.rbuf)
    }
}

/// The `Sec-WebSocket-Accept` answer to `key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A `ws://host:port/path` URL's parts.
fn split_url(url: &str) -> anyhow::Result<(&str, u16, &str)> {
    let rest = match url.strip_prefix("ws://") {
        Some(rest) => rest,
        None if url.starts_with("wss://") => {
            bail!("wss:// is not supported by the load generator's client: {url}")
        }
        None => bail!("not a ws:// URL: {url}"),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) if rest.as_bytes()[at] == b'/' => (&rest[..at], &rest[at..]),
        Some(at) => (&rest[..at], "/"),
        None => (rest, "/"),
    };
    // With a query but no path the request target still needs its slash.
    ensure!(
        !rest[authority.len()..].starts_with('?'),
        "a ws:// URL with a query and no path: {url}"
    );
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (
            host,
            port.parse().with_context(|| format!("the port of {url}"))?,
        ),
        _ => (authority, 80),
    };
    ensure!(!host.is_empty(), "no host in {url}");
    Ok((host, port, path))
}

/// A TCP connection to `addr` from `source`, bound with `IP_BIND_ADDRESS_NO_PORT` (the port is
/// picked at connect time, so many connections share a source address as long as the 4-tuple
/// is unique) and `SO_REUSEADDR` (ports in TIME_WAIT from closed clients may be bound again).
pub async fn dial_tcp(addr: SocketAddr, source: IpAddr) -> anyhow::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv4() {
        // Best effort: without it the bind takes a port of its own.
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
    }
    socket.bind((source, 0).into())?;
    let stream = tokio::time::timeout(DIAL_TIMEOUT, socket.connect(addr))
        .await
        .context("TCP connect timed out")?
        .with_context(|| format!("connecting to {addr} from {source}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a WebSocket to `url` (`ws://` only) from `source`, with `headers` added to the upgrade
/// request.
pub async fn connect(
    url: &str,
    source: IpAddr,
    headers: &[(&str, &str)],
) -> anyhow::Result<WsStream> {
    let (host, port, path) = split_url(url)?;
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .with_context(|| format!("no address for {host} of the source's family"))?;
    let stream = dial_tcp(addr, source).await?;
    tokio::time::timeout(DIAL_TIMEOUT, upgrade(stream, host, port, path, headers))
        .await
        .context("WebSocket handshake timed out")?
        .with_context(|| format!("the WebSocket upgrade at {url}"))
}

/// The client's side of the upgrade on a connected stream.
async fn upgrade(
    mut stream: TcpStream,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<WsStream> {
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let (head, leftover) = read_head(&mut stream).await?;
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.trim_ascii_end());
    let status = lines.next().unwrap_or_default();
    ensure!(
        status.starts_with(b"HTTP/1.1 101"),
        "the server answered {}",
        String::from_utf8_lossy(status)
    );
    let want = accept_key(key.as_bytes());
    let accepted = lines
        .filter_map(|l| http_header(l, "sec-websocket-accept"))
        .any(|v| v == want.as_bytes());
    ensure!(accepted, "no or a wrong Sec-WebSocket-Accept");
    Ok(WsStream::new(stream, Role::Client, leftover))
}

/// Reads an HTTP head (up to the blank line): the head, and the bytes read past it.
pub async fn read_head(stream: &mut TcpStream) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            let leftover = buf.split_off(at + 4);
            return Ok((buf, leftover));
        }
        ensure!(buf.len() <= MAX_HEAD, "an HTTP head over {MAX_HEAD} bytes");
        buf.reserve(1024);
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("the peer closed the connection during the upgrade");
        }
    }
}

/// The value of header `name` (lower case) if `line` is that header.
pub fn http_header<'a>(line: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    line[..colon]
        .eq_ignore_ascii_case(name.as_bytes())
        .then(|| line[colon + 1..].trim_ascii())
}

/// The server's side of the upgrade on an accepted stream: reads the GET, checks it asks for a
/// WebSocket, answers 101. The request's path comes back with the stream.
#[allow(
    dead_code,
    reason = "the blaster peeks at the head first (accept_head); the tests use it"
)]
pub async fn accept(mut stream: TcpStream) -> anyhow::Result<(WsStream, String)> {
    let (head, leftover) = read_head(&mut stream).await?;
    accept_head(stream, &head, leftover).await
}

/// [`accept`] once the request's `head` was read (and `leftover`, the bytes read past it).
pub async fn accept_head(
    mut stream: TcpStream,
    head: &[u8],
    leftover: Vec<u8>,
) -> anyhow::Result<(WsStream, String)> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.trim_ascii_end());
    let request = lines.next().unwrap_or_default();
    let path = request
        .strip_prefix(b"GET ")
        .and_then(|r| r.split(|&b| b == b' ').next())
        .context("not a GET request")?;
    let path = String::from_utf8_lossy(path).into_owned();
    let key = lines
        .find_map(|l| http_header(l, "sec-websocket-key"))
        .context("no Sec-WebSocket-Key")?;
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.set_nodelay(true)?;
    Ok((WsStream::new(stream, Role::Server, leftover), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(role: Role, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, role, opcode, payload);
        out
    }

    /// A masked frame with a non-zero key, as a real client would send.
    fn masked(opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut out = frame(Role::Client, opcode, payload);
        let at = out.len() - payload.len();
        out[at - 4..at].copy_from_slice(&key);
        for (i, b) in out[at..].iter_mut().enumerate() {
            *b ^= key[i & 3];
        }
        out
    }

    #[test]
    fn lengths_of_7_16_and_64_bits() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for role in [Role::Client, Role::Server] {
                let mut buf = frame(role, OP_BINARY, &payload);
                let header = match len {
                    0..=125 => 2,
                    126..=65_535 => 4,
                    _ => 10,
                } + if role == Role::Client { 4 } else { 0 };
                assert_eq!(buf.len(), header + len, "len {len}");
                let total = buf.len();
                let p = parse(&mut buf, MAX_FRAME).unwrap().unwrap();
                assert_eq!((p.fin, p.opcode, p.len), (true, OP_BINARY, total));
                assert_eq!(&buf[p.payload], &payload[..]);
            }
        }
    }

    #[test]
    fn a_masked_frame_is_unmasked_in_place() {
        let mut buf = masked(OP_TEXT, b"hello, world", [0x37, 0xfa, 0x21, 0x3d]);
        let p = parse(&mut buf, MAX_FRAME).unwrap().unwrap();
        assert_eq!(&buf[p.payload], b"hello, world");
    }

    #[test]
    fn a_partial_frame_says_what_it_needs() {
        let whole = frame(Role::Server, OP_TEXT, &[b'x'; 300]);
        for cut in 0..whole.len() {
            let mut part = whole[..cut].to_vec();
            match parse(&mut part, MAX_FRAME).unwrap() {
                Err(Need::Bytes(n)) => assert!(n > cut && n <= whole.len(), "cut {cut}: {n}"),
                Ok(p) => panic!("cut {cut} parsed {p:?}"),
            }
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let too_big = frame(Role::Server, OP_BINARY, &[0; 2000]);
        assert!(parse(&mut too_big.clone(), 1000).is_err());
        let mut reserved = frame(Role::Server, OP_TEXT, b"x");
        reserved[0] |= 0x40;
        assert!(parse(&mut reserved, MAX_FRAME).is_err());
        let mut unknown = frame(Role::Server, OP_TEXT, b"x");
        unknown[0] = 0x83;
        assert!(parse(&mut unknown, MAX_FRAME).is_err());
        let mut fragmented_ping = frame(Role::Server, OP_PING, b"x");
        fragmented_ping[0] &= 0x7F;
        assert!(parse(&mut fragmented_ping, MAX_FRAME).is_err());
        let mut long_ping = frame(Role::Server, OP_PING, &[0; 126]);
        assert!(parse(&mut long_ping, MAX_FRAME).is_err());
    }

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            split_url("ws://127.0.0.1:4223").unwrap(),
            ("127.0.0.1", 4223, "/")
        );
        assert_eq!(
            split_url("ws://localhost/rtm?ticket=abc").unwrap(),
            ("localhost", 80, "/rtm?ticket=abc")
        );
        assert_eq!(split_url("ws://[::1]:9/x").unwrap(), ("[::1]", 9, "/x"));
        assert!(split_url("wss://h/").is_err());
        assert!(split_url("http://h/").is_err());
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn encode_with_writes_the_same_bytes_as_encode() {
        for len in [0, 5, 125, 126, 1000, 65_535, 70_000] {
            let payload = vec![b'y'; len];
            for role in [Role::Client, Role::Server] {
                let mut a = b"before".to_vec();
                let mut b = a.clone();
                encode(&mut b, role, OP_TEXT, &payload);
                encode_with(&mut a, role, OP_TEXT, |out| out.extend_from_slice(&payload));
                assert_eq!(a, b, "len {len} {role:?}");
            }
        }
    }

    /// A WebSocket of `role` over a real loopback connection, and the raw peer socket.
    async fn pair_with(role: Role) -> (WsStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (
            WsStream::new(ours.unwrap(), role, Vec::new()),
            theirs.unwrap().0,
        )
    }

    /// Reads every data frame until the stream ends, collecting payloads.
    async fn read_all(ws: &mut WsStream) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        while ws.ready().await.unwrap() {
            while let Some(f) = ws.try_next().unwrap() {
                got.push((f.opcode, f.payload.to_vec()));
            }
        }
        got
    }

    #[tokio::test]
    async fn frames_split_across_reads_come_out_whole() {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, len) in [3usize, 0, 125, 126, 300, 70_000, 10]
            .into_iter()
            .enumerate()
        {
            let payload = vec![b'a' + i as u8; len];
            stream.extend(frame(Role::Server, OP_TEXT, &payload));
            want.push((OP_TEXT, payload));
        }
        stream.extend(frame(Role::Server, OP_CLOSE, &1000u16.to_be_bytes()));
        for step in [1, 2, 7, 1000, 100_000] {
            let (mut ws, mut peer) = pair_with(Role::Client).await;
            let writer = {
                let stream = stream.clone();
                tokio::spawn(async move {
                    for part in stream.chunks(step) {
                        peer.write_all(part).await.unwrap();
                        peer.flush().await.unwrap();
                        tokio::task::yield_now().await;
                    }
                    // The client's close answer: a masked close frame with the code.
                    let mut answer = [0u8; 8];
                    peer.read_exact(&mut answer).await.unwrap();
                    answer
                })
            };
            assert_eq!(read_all(&mut ws).await, want, "in pieces of {step}");
            let answer = writer.await.unwrap();
            assert_eq!(answer, [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]);
        }
    }

    #[tokio::test]
    async fn a_flush_reads_what_the_peer_sends_meanwhile() {
        // The peer writes more than the sockets hold before it reads anything, as a server
        // answering publishes it will not read more of until its answers are read.
        const BYTES: usize = 16 << 20;
        let (mut ws, mut peer) = pair_with(Role::Client).await;
        let payload = vec![b'x'; 60_000];
        let mut answers = Vec::new();
        while answers.len() < BYTES {
            answers.extend(frame(Role::Server, OP_BINARY, &payload));
        }
        let frames = answers.len() / (payload.len() + 4);
        let peer_side = tokio::spawn(async move {
            peer.write_all(&answers).await.unwrap();
            let mut got = vec![0u8; BYTES];
            peer.read_exact(&mut got).await.unwrap();
        });
        for _ in 0..BYTES / 60_000 + 1 {
            ws.push(OP_BINARY, &payload);
        }
        // A plain flush would wait forever here: both sockets full, neither side reading.
        tokio::time::timeout(std::time::Duration::from_secs(120), ws.flush_reading())
            .await
            .expect("the flush completes while the peer waits to be read")
            .unwrap();
        for _ in 0..frames {
            let f = ws.next().await.unwrap().unwrap();
            assert_eq!(f.payload.len(), payload.len());
        }
        peer_side.await.unwrap();
    }

    #[tokio::test]
    async fn pings_are_answered_and_pongs_ignored() {
        let (mut ws, mut peer) = pair_with(Role::Client).await;
        let mut stream = masked(OP_PING, b"are you there", [1, 2, 3, 4]);
        stream.extend(frame(Role::Server, OP_PONG, b"stray"));
        stream.extend(frame(Role::Server, OP_BINARY, b"data"));
        peer.write_all(&stream).await.unwrap();
        let f = ws.next().await.unwrap().unwrap();
        assert_eq!((f.opcode, f.payload), (OP_BINARY, &b"data"[..]));
        let want = frame(Role::Client, OP_PONG, b"are you there");
        let mut pong = vec![0; want.len()];
        peer.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, want);
    }

    #[tokio::test]
    async fn fragments_and_oversized_frames_end_the_stream_with_an_error() {
        let (mut ws, mut peer) = pair_with(Role::Client).await;
        let mut first = frame(Role::Server, OP_TEXT, b"half");
        first[0] &= 0x7F;
        peer.write_all(&first).await.unwrap();
        let err = ws.ready().await.unwrap_err();
        assert!(format!("{err}").contains("fragmented"), "{err}");

        let (mut ws, mut peer) = pair_with(Role::Client).await;
        ws.set_max_frame(1000);
        peer.write_all(&frame(Role::Server, OP_BINARY, &[0; 1001]))
            .await
            .unwrap();
        let err = ws.ready().await.unwrap_err();
        assert!(format!("{err}").contains("1001 bytes"), "{err}");
    }

    #[tokio::test]
    async fn the_peers_eof_ends_the_stream() {
        let (mut ws, peer) = pair_with(Role::Client).await;
        drop(peer);
        assert!(!ws.ready().await.unwrap());
        assert!(ws.try_next().unwrap().is_none());
    }

    #[tokio::test]
    async fn a_lean_stream_frees_its_buffers_between_reads() {
        let (mut ws, mut peer) = pair_with(Role::Client).await;
        ws.set_lean(true);
        ws.push(OP_TEXT, b"hi");
        ws.flush().await.unwrap();
        peer.write_all(&frame(Role::Server, OP_TEXT, b"one"))
            .await
            .unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().payload, b"one");
        assert!(ws.try_next().unwrap().is_none());
        // The frame was handed out and nothing else is buffered: nothing is held.
        ws.shrink();
        assert_eq!(ws.buffered_capacity(), 0);
    }

    #[tokio::test]
    async fn client_and_server_upgrade_and_talk() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (mut ws, path) = accept(stream).await.unwrap();
            assert_eq!(path, "/chat?x=1");
            // Sent right after the 101: it may arrive with the handshake's answer.
            ws.push(OP_TEXT, b"hello");
            ws.flush().await.unwrap();
            let f = ws.next().await.unwrap().unwrap();
            let echo = f.payload.to_vec();
            ws.push(OP_BINARY, &echo);
            ws.flush().await.unwrap();
            assert!(!ws.ready().await.unwrap());
        });
        let url = format!("ws://{addr}/chat?x=1");
        let mut ws = connect(&url, "127.0.0.1".parse().unwrap(), &[("X-Bench", "1")])
            .await
            .unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().payload, b"hello");
        ws.push_with(OP_TEXT, |out| out.extend_from_slice(b"ping me back"));
        ws.flush().await.unwrap();
        let f = ws.next().await.unwrap().unwrap();
        assert_eq!((f.opcode, f.payload), (OP_BINARY, &b"ping me back"[..]));
        ws.close(None).await.unwrap();
        server.await.unwrap();
    }
}
