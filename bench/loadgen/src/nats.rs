//! The NATS side, over nats-server's WebSocket listener: connect (INFO, CONNECT, SUB, PING ->
//! PONG), the PUB frame, and a parser for the server's byte stream (several protocol messages
//! can share one WebSocket frame and one can span frames).

use std::net::IpAddr;
use std::time::Duration;

use crate::clock::{digits, sent_at};
use crate::ws::{self, Socket};
use crate::wsraw;
use anyhow::{Context, bail};

/// How long each connect step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest control line accepted (INFO is the long one).
const MAX_LINE: usize = 64 * 1024;
/// The largest message payload accepted (nats-server's default max_payload).
const MAX_PAYLOAD: usize = 1024 * 1024;

/// Connects to nats-server's WebSocket listener at `url` from `source` and subscribes to
/// `subjects`; returns once the server answered the PING sent after the SUBs, so the
/// subscriptions are in place. `echo: false`, like RTM: a connection does not receive what it
/// publishes.
pub async fn connect(
    url: &str,
    source: IpAddr,
    subjects: &[String],
) -> anyhow::Result<(Socket, Parser)> {
    let mut ws = ws::dial(url, source).await?;
    let mut parser = Parser::default();
    let mut hello = String::from(
        "CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"lang\":\"rust\",\"version\":\"channelmesh-bench\",\"protocol\":1}\r\n",
    );
    for (sid, subject) in subjects.iter().enumerate() {
        hello.push_str(&format!("SUB {subject} {}\r\n", sid + 1));
    }
    hello.push_str("PING\r\n");
    let mut sent = false;
    loop {
        let open = tokio::time::timeout(STEP_TIMEOUT, ws.ready())
            .await
            .context("nats-server said nothing in time")??;
        anyhow::ensure!(open, "nats-server closed the socket while connecting");
        while let Some(frame) = ws.try_next()? {
            parser.feed(frame.payload);
        }
        while let Some(op) = parser.next()? {
            match op {
                Op::Info if !sent => {
                    ws.push(wsraw::OP_BINARY, hello.as_bytes());
                    sent = true;
                }
                Op::Pong if sent => {
                    ws.flush().await?;
                    return Ok((ws, parser));
                }
                Op::Ping => ws.push(wsraw::OP_BINARY, PONG),
                Op::Err(e) => bail!("nats-server: -ERR {e}"),
                _ => {}
            }
        }
        ws.flush().await?;
    }
}

/// `PUB subject len\r\npayload\r\n`, plus `PING\r\n` when `ping`: one WebSocket frame.
pub fn publish_frame(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// The answer to the server's keep-alive.
pub const PONG: &[u8] = b"PONG\r\n";

/// A PING, whose PONG acknowledges everything sent before it.
pub const PING: &[u8] = b"PING\r\n";

/// A server protocol message, as far as the load generator cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Info,
    /// A message; `sent_us` when its payload carries this run's publish timestamp.
    Msg {
        sent_us: Option<u64>,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// Parses the server's byte stream: bytes go in with [`Parser::feed`], whole protocol messages
/// come out of [`Parser::next`]; or both at once with [`Parser::each`], the receive path.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    /// Where the unparsed bytes start.
    at: usize,
}

impl Parser {
    /// Appends bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at * 2 >= self.buf.len() {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole protocol message, or None until more bytes arrive. Malformed input is an
    /// error: the connection cannot be trusted after it.
    pub fn next(&mut self) -> anyhow::Result<Option<Op>> {
        let Some((op, used)) = parse(&self.buf[self.at..])? else {
            return Ok(None);
        };
        self.at += used;
        Ok(Some(op))
    }

    /// Feeds `bytes` and hands every whole protocol message to `f`. A frame usually holds
    /// whole messages only, and then they are read from `bytes` in place: every receiver
    /// reads every delivery, so the copy into the buffer is saved on the hot path.
    pub fn each(&mut self, bytes: &[u8], mut f: impl FnMut(Op)) -> anyhow::Result<()> {
        if self.at < self.buf.len() {
            self.feed(bytes);
            while let Some(op) = self.next()? {
                f(op);
            }
            return Ok(());
        }
        let mut at = 0;
        while let Some((op, used)) = parse(&bytes[at..])? {
            at += used;
            f(op);
        }
        self.buf.clear();
        self.at = 0;
        self.buf.extend_from_slice(&bytes[at..]);
        Ok(())
    }
}

/// The protocol message at the start of `rest` and its length in bytes, or None when it is
/// not all there yet.
fn parse(rest: &[u8]) -> anyhow::Result<Option<(Op, usize)>> {
    let Some(eol) = rest
        .iter()
        .position(|&b| b == b'\n')
        .filter(|&n| n > 0 && rest[n - 1] == b'\r')
        .map(|n| n - 1)
    else {
        if rest.len() > MAX_LINE {
            bail!("a NATS control line longer than {MAX_LINE} bytes");
        }
        if rest.contains(&b'\n') {
            bail!("a NATS control line ending in a bare LF");
        }
        return Ok(None);
    };
    let line = &rest[..eol];
    let verb_end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let verb = &line[..verb_end];
    let op = if verb.eq_ignore_ascii_case(b"MSG") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let args = &line[verb_end..];
        let mut fields: [&[u8]; 4] = [&[]; 4];
        let mut count = 0;
        for field in args
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|f| !f.is_empty())
        {
            if count == fields.len() {
                count += 1;
                break;
            }
            fields[count] = field;
            count += 1;
        }
        let len = match count {
            3 | 4 => digits(fields[count - 1]),
            _ => None,
        }
        .with_context(|| format!("a malformed MSG line: {}", String::from_utf8_lossy(args)))?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_PAYLOAD {
            bail!("a NATS message of {len} bytes");
        }
        let start = eol + 2;
        if rest.len() < start + len + 2 {
            return Ok(None);
        }
        let payload = &rest[start..start + len];
        if &rest[start + len..start + len + 2] != b"\r\n" {
            bail!("a NATS message not followed by CRLF");
        }
        let sent_us = payload.strip_prefix(b"b").and_then(sent_at);
        return Ok(Some((Op::Msg { sent_us }, start + len + 2)));
    } else if verb.eq_ignore_ascii_case(b"PING") {
        Op::Ping
    } else if verb.eq_ignore_ascii_case(b"PONG") {
        Op::Pong
    } else if verb.eq_ignore_ascii_case(b"INFO") {
        Op::Info
    } else if verb.eq_ignore_ascii_case(b"+OK") {
        Op::Ok
    } else if verb.eq_ignore_ascii_case(b"-ERR") {
        Op::Err(
            String::from_utf8_lossy(&line[verb_end..])
                .trim()
                .to_string(),
        )
    } else {
        bail!(
            "an unknown NATS operation: {}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        )
    };
    Ok(Some((op, eol + 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut Parser) -> Vec<Op> {
        std::iter::from_fn(|| p.next().unwrap()).collect()
    }

    #[test]
    fn messages_may_share_a_frame_or_span_frames() {
        let mut p = Parser::default();
        p.feed(
            b"INFO {\"server_id\":\"x\"}\r\nPING\r\nMSG C1 1 10\r\nb123:4:xxx\r\nMSG C1 1 5\r\nb12",
        );
        assert_eq!(
            all(&mut p),
            vec![Op::Info, Op::Ping, Op::Msg { sent_us: Some(123) }]
        );
        p.feed(b"3:\r");
        assert_eq!(all(&mut p), vec![]);
        p.feed(b"\nPONG\r\n-ERR 'Slow Consumer'\r\n");
        assert_eq!(
            all(&mut p),
            vec![
                Op::Msg { sent_us: Some(123) },
                Op::Pong,
                Op::Err("'Slow Consumer'".into())
            ]
        );
    }

    #[test]
    fn each_reads_the_same_however_the_stream_is_cut() {
        let stream: &[u8] =
            b"INFO {}\r\nMSG C1 1 10\r\nb123:4:xxx\r\nPING\r\nMSG C2 2 R 6\r\nb9:1:x\r\nPONG\r\n";
        let want = vec![
            Op::Info,
            Op::Msg { sent_us: Some(123) },
            Op::Ping,
            Op::Msg { sent_us: Some(9) },
            Op::Pong,
        ];
        for cut in 0..=stream.len() {
            for second in cut..=stream.len() {
                let mut p = Parser::default();
                let mut got = Vec::new();
                for part in [&stream[..cut], &stream[cut..second], &stream[second..]] {
                    p.each(part, |op| got.push(op)).unwrap();
                }
                assert_eq!(got, want, "cut at {cut} and {second}");
            }
        }
        let mut p = Parser::default();
        assert!(p.each(b"MSG C1 1 x\r\n", |_| {}).is_err());
        assert!(p.each(b"PING\nPONG\r\n", |_| {}).is_err());
    }

    #[test]
    fn a_reply_subject_and_foreign_payloads_are_fine() {
        let mut p = Parser::default();
        p.feed(b"MSG C1 1 INBOX.1 5\r\nhello\r\n+OK\r\n");
        assert_eq!(all(&mut p), vec![Op::Msg { sent_us: None }, Op::Ok]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"BOGUS\r\n"[..],
            b"MSG C1 1\r\n",
            b"MSG C1 1 3\r\nabcXY",
            b"MSG C1 1 99999999\r\n",
        ] {
            let mut p = Parser::default();
            p.feed(bad);
            assert!(p.next().is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut p = Parser::default();
        p.feed(&vec![b'x'; MAX_LINE + 1]);
        assert!(p.next().is_err());
    }

    #[test]
    fn publish_frames_are_pub_lines() {
        let mut out = Vec::new();
        publish_frame(&mut out, "C1", b"b1:2:");
        out.extend_from_slice(PING);
        assert_eq!(out, b"PUB C1 5\r\nb1:2:\r\nPING\r\n");
    }
}
