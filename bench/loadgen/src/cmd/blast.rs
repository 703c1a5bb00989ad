//! `blast`: the load generator's headroom check. A trivial server that speaks just enough of the
//! RTM connect flow (`rtm.connect`, the WebSocket, `hello`, acks) or of NATS over WebSocket
//! (INFO, PONG) for a normal `fanout` run to connect to it, then writes pre-built delivery
//! frames — an RTM message event, or a NATS `MSG` — stamped with the current time to every
//! connection at a fixed total rate, evenly paced. What the fanout run reports (delivered/s,
//! latency, its own CPU) then measures the load generator alone: it shows how many deliveries
//! per second one load-generator core takes before it is the bottleneck.
//!
//! Blasting starts with the first publish the run sends (its `Go`), so the run's deliveries
//! are counted from its first publish on; publishes are acknowledged and never delivered. The
//! server runs on one thread of its own (pin it with `taskset`). Each connection's unsent bytes
//! are bounded: a connection over [`MAX_BACKLOG`] gets no new frames until it drains, and the
//! frames it missed are counted as `skipped` (the load generator is not keeping up).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use memchr::memmem;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::clock::{digits, micros_now};
use crate::plan::Target;
use crate::wsraw::{self, Role};

/// How often the pacer writes what is due.
const TICK: Duration = Duration::from_millis(1);
/// Unsent bytes one connection may hold before it is skipped.
const MAX_BACKLOG: usize = 4 * 1024 * 1024;
/// How often the blaster says what it did (stderr).
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The largest client frame accepted (publishes are small).
const MAX_CLIENT_FRAME: usize = 1024 * 1024;
/// Digits of a Unix time in microseconds (until the year 2286).
const TS_DIGITS: usize = 16;

/// `blast`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where to listen. Point `fanout --gateway http://ADDR/api/` (channelmesh) or
    /// `--gateway ws://ADDR` (nats) at it.
    #[arg(long, default_value = "127.0.0.1:32090")]
    pub listen: SocketAddr,
    /// The protocol to speak.
    #[arg(long, value_enum, default_value = "channelmesh")]
    pub target: Target,
    /// Deliveries per second over all connections, once the first publish arrived.
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Message text size in bytes (as `fanout --payload`).
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// Stop after this many seconds (0: on SIGINT/SIGTERM only).
    #[arg(long, default_value_t = 0)]
    pub seconds: u64,
}

/// Runs the blaster on a thread of its own until `--seconds` pass or a signal arrives.
pub async fn main(args: Args) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let token = cancel.clone();
    std::thread::Builder::new()
        .name("blaster".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the blaster's runtime")
                .and_then(|runtime| runtime.block_on(serve(args, token)));
            let _ = tx.send(result);
        })
        .context("starting the blaster's thread")?;
    let result = rx
        .await
        .context("the blaster's thread ended without a word")?;
    cancel.cancel();
    result
}

/// One connection's write side.
struct Conn {
    half: OwnedWriteHalf,
    /// Bytes not yet written.
    out: Vec<u8>,
}

impl Conn {
    /// Writes what the socket takes now; false when the connection failed.
    fn try_flush(&mut self) -> bool {
        while !self.out.is_empty() {
            match self.half.try_write(&self.out) {
                Ok(0) => return false,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        true
    }
}

/// What the blaster shares between its pacer and its connections' readers (one thread: the
/// lock is never contended, and never held across an await).
struct State {
    conns: Mutex<HashMap<u64, Conn>>,
    /// Set by the first publish: blasting starts.
    go: AtomicBool,
    written: AtomicU64,
    skipped: AtomicU64,
}

async fn serve(args: Args, cancel: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "blast: {:?} on {addr}, {} deliveries/s once the first publish arrives",
        args.target, args.rate
    );
    let state = Arc::new(State {
        conns: Mutex::new(HashMap::new()),
        go: AtomicBool::new(false),
        written: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
    });
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(pace(args.clone(), state.clone(), cancel.clone()));
    let deadline = async {
        if args.seconds == 0 {
            std::future::pending::<()>().await
        } else {
            tokio::time::sleep(Duration::from_secs(args.seconds)).await
        }
    };
    tokio::pin!(deadline);
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = &mut deadline => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                next_id += 1;
                let (state, cancel, target) = (state.clone(), cancel.clone(), args.target);
                tracker.spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        r = connection(stream, addr, next_id, target, &state) => {
                            if let Err(e) = r {
                                tracing::debug!(error = %format!("{e:#}"), "a blast connection ended");
                            }
                        }
                    }
                    if let Ok(mut conns) = state.conns.lock() {
                        conns.remove(&next_id);
                    }
                });
            }
        }
    }
    cancel.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    eprintln!(
        "blast: wrote {} deliveries, skipped {}",
        state.written.load(Ordering::Relaxed),
        state.skipped.load(Ordering::Relaxed)
    );
    Ok(())
}

/// One accepted connection: `rtm.connect` calls over plain HTTP (answered with a WebSocket URL
/// back to this server) until it asks for a WebSocket; then the protocol's greeting, and its
/// reader until it closes.
async fn connection(
    mut stream: TcpStream,
    addr: SocketAddr,
    id: u64,
    target: Target,
    state: &State,
) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let (head, leftover) = loop {
        let (head, mut leftover) = wsraw::read_head(&mut stream).await?;
        let upgrade = head
            .split(|&b| b == b'\n')
            .filter_map(|l| wsraw::http_header(l.trim_ascii_end(), "upgrade"))
            .any(|v| v.eq_ignore_ascii_case(b"websocket"));
        if upgrade {
            break (head, leftover);
        }
        // An `rtm.connect` call: skip its body, answer with the WebSocket URL.
        let length = head
            .split(|&b| b == b'\n')
            .find_map(|l| wsraw::http_header(l.trim_ascii_end(), "content-length"))
            .and_then(digits)
            .unwrap_or(0) as usize;
        while leftover.len() < length {
            anyhow::ensure!(stream.read_buf(&mut leftover).await? > 0, "closed mid-body");
        }
        let body = format!(r#"{{"ok":true,"url":"ws://{addr}/blast"}}"#);
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, answer.as_bytes()).await?;
    };
    let (ws, _) = wsraw::accept_head(stream, &head, leftover).await?;
    let (stream, leftover) = ws.into_parts();
    let (read, write) = stream.into_split();
    let mut conn = Conn {
        half: write,
        out: Vec::new(),
    };
    match target {
        Target::Channelmesh => wsraw::encode(
            &mut conn.out,
            Role::Server,
            wsraw::OP_TEXT,
            br#"{"type":"hello"}"#,
        ),
        Target::Nats => wsraw::encode(
            &mut conn.out,
            Role::Server,
            wsraw::OP_BINARY,
            b"INFO {\"server_id\":\"blast\",\"max_payload\":1048576,\"proto\":1}\r\n",
        ),
    }
    conn.try_flush();
    state
        .conns
        .lock()
        .map_err(|_| anyhow::anyhow!("a poisoned lock"))?
        .insert(id, conn);
    read_client(read, leftover, id, target, state).await
}

/// Reads a client's frames: acknowledges RTM messages (`ok: true`), answers NATS PINGs, starts
/// the blast at the first publish, ends at a close.
async fn read_client(
    mut read: OwnedReadHalf,
    mut buf: Vec<u8>,
    id: u64,
    target: Target,
    state: &State,
) -> anyhow::Result<()> {
    let id_field = memmem::Finder::new(br#""id":"#);
    let mut start = 0;
    loop {
        let mut answers = Vec::new();
        loop {
            let parsed = match wsraw::parse(&mut buf[start..], MAX_CLIENT_FRAME)? {
                Ok(p) => p,
                Err(_) => break,
            };
            let payload = &buf[start + parsed.payload.start..start + parsed.payload.end];
            start += parsed.len;
            match parsed.opcode {
                wsraw::OP_CLOSE => return Ok(()),
                wsraw::OP_PING => {
                    wsraw::encode(&mut answers, Role::Server, wsraw::OP_PONG, payload)
                }
                _ if target == Target::Channelmesh => {
                    if let Some(at) = id_field.find(payload) {
                        let rest = &payload[at + id_field.needle().len()..];
                        let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                        let ack = format!(
                            r#"{{"ok":true,"reply_to":{},"ts":"1.000001"}}"#,
                            String::from_utf8_lossy(&rest[..n])
                        );
                        wsraw::encode(&mut answers, Role::Server, wsraw::OP_TEXT, ack.as_bytes());
                        state.go.store(true, Ordering::Relaxed);
                    }
                }
                _ => {
                    // NATS: a PONG per PING (the connect's and each burst's); blasting starts
                    // with the first PUB.
                    for _ in memmem::find_iter(payload, b"PING\r\n") {
                        wsraw::encode(&mut answers, Role::Server, wsraw::OP_BINARY, b"PONG\r\n");
                    }
                    if memmem::find(payload, b"PUB ").is_some() {
                        state.go.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        if !answers.is_empty() {
            let mut conns = state
                .conns
                .lock()
                .map_err(|_| anyhow::anyhow!("a poisoned lock"))?;
            if let Some(conn) = conns.get_mut(&id) {
                conn.out.extend_from_slice(&answers);
                if !conn.try_flush() {
                    return Ok(());
                }
            }
        }
        buf.drain(..start);
        start = 0;
        buf.reserve(4096);
        if read.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// The delivery the blaster sends, pre-built: the whole frame, and where its timestamp's
/// digits are.
struct Template {
    frame: Vec<u8>,
    ts_at: usize,
    /// NATS: one `MSG` (the WebSocket frame is built per connection and tick around several).
    nats: bool,
}

impl Template {
    fn new(target: Target, payload: usize) -> Self {
        let mut text = format!("b{:0TS_DIGITS$}:0:", 0);
        text.extend(std::iter::repeat_n('x', payload.saturating_sub(text.len())));
        match target {
            Target::Channelmesh => {
                let json = format!(
                    r#"{{"type":"message","channel":"CBLAST","user":"UBLAST","text":"{text}","ts":"1700000000.000001","team":"TBENCH"}}"#
                );
                let mut frame = Vec::new();
                wsraw::encode(&mut frame, Role::Server, wsraw::OP_TEXT, json.as_bytes());
                let ts_at = memmem::find(&frame, br#""text":"b"#).unwrap_or(0) + 9;
                Self {
                    frame,
                    ts_at,
                    nats: false,
                }
            }
            Target::Nats => {
                let msg = format!("MSG CBLAST 1 {}\r\n{text}\r\n", text.len());
                let ts_at = msg.find("\r\nb").unwrap_or(0) + 3;
                Self {
                    frame: msg.into_bytes(),
                    ts_at,
                    nats: true,
                }
            }
        }
    }

    /// Stamps the frame with `now` (unix microseconds).
    fn stamp(&mut self, now: u64) {
        let digits = format!("{now:0TS_DIGITS$}");
        self.frame[self.ts_at..self.ts_at + TS_DIGITS]
            .copy_from_slice(&digits.as_bytes()[..TS_DIGITS]);
    }

    /// Appends `n` deliveries to `out`: RTM one frame each, NATS one frame of `n` MSGs.
    fn append(&self, out: &mut Vec<u8>, n: u64) {
        if self.nats {
            wsraw::encode_with(out, Role::Server, wsraw::OP_BINARY, |out| {
                for _ in 0..n {
                    out.extend_from_slice(&self.frame);
                }
            });
        } else {
            for _ in 0..n {
                out.extend_from_slice(&self.frame);
            }
        }
    }
}

/// Every tick, writes the deliveries due since the first publish, spread evenly over the
/// connections (round-robin, so each gets its share over time), stamped with the tick's time.
async fn pace(args: Args, state: Arc<State>, cancel: CancellationToken) {
    let mut template = Template::new(args.target, args.payload);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut started: Option<Instant> = None;
    let mut due_sent = 0u64;
    let mut turn = 0usize;
    let mut ids: Vec<u64> = Vec::new();
    let mut report = Instant::now();
    let mut last_written = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if started.is_none() && state.go.load(Ordering::Relaxed) {
            started = Some(Instant::now());
        }
        let Ok(mut conns) = state.conns.lock() else {
            return;
        };
        let mut dead = Vec::new();
        if let Some(started) = started {
            let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
            let now_due = due.saturating_sub(due_sent);
            due_sent = due;
            ids.clear();
            ids.extend(conns.keys().copied());
            ids.sort_unstable();
            if !ids.is_empty() && now_due > 0 {
                template.stamp(micros_now());
                let n = ids.len() as u64;
                let (each, extra) = (now_due / n, now_due % n);
                for k in 0..ids.len() {
                    let id = ids[(turn + k) % ids.len()];
                    let count = each + u64::from((k as u64) < extra);
                    let Some(conn) = conns.get_mut(&id) else {
                        continue;
                    };
                    if count == 0 {
                        continue;
                    }
                    if conn.out.len() > MAX_BACKLOG {
                        state.skipped.fetch_add(count, Ordering::Relaxed);
                        continue;
                    }
                    template.append(&mut conn.out, count);
                    state.written.fetch_add(count, Ordering::Relaxed);
                }
                turn = (turn + extra as usize) % ids.len();
            }
        }
        for (id, conn) in conns.iter_mut() {
            if !conn.try_flush() {
                dead.push(*id);
            }
        }
        for id in dead {
            conns.remove(&id);
        }
        if report.elapsed() >= REPORT_EVERY {
            let written = state.written.load(Ordering::Relaxed);
            let backlog: usize = conns.values().map(|c| c.out.len()).sum();
            eprintln!(
                "blast: {} connections, {:.0} deliveries/s written, {} skipped, {} bytes unsent",
                conns.len(),
                (written - last_written) as f64 / report.elapsed().as_secs_f64(),
                state.skipped.load(Ordering::Relaxed),
                backlog
            );
            last_written = written;
            report = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_deliveries_read_back_as_this_runs_messages() {
        let mut t = Template::new(Target::Channelmesh, 200);
        t.stamp(1_765_000_000_123_456);
        let mut buf = t.frame.clone();
        let p = wsraw::parse(&mut buf, 1 << 20).unwrap().unwrap();
        let text = std::str::from_utf8(&buf[p.payload]).unwrap();
        assert_eq!(
            crate::rtm::classify(text.as_bytes()),
            crate::rtm::Incoming::Delivery {
                sent_us: 1_765_000_000_123_456
            }
        );
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(json["text"].as_str().unwrap().len(), 200);

        let mut t = Template::new(Target::Nats, 200);
        t.stamp(1_765_000_000_000_001);
        let mut out = Vec::new();
        t.append(&mut out, 3);
        let p = wsraw::parse(&mut out, 1 << 20).unwrap().unwrap();
        let mut parser = crate::nats::Parser::default();
        let mut got = Vec::new();
        parser.each(&out[p.payload], |op| got.push(op)).unwrap();
        let want = crate::nats::Op::Msg {
            sent_us: Some(1_765_000_000_000_001),
        };
        assert_eq!(got, vec![want.clone(), want.clone(), want]);
    }
}
