//! The RTM side: the real connect flow (token, `rtm.connect`, WebSocket, `hello`) from a chosen
//! source address, the send frame, and what a received frame means to the load generator.

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Context, bail};
use memchr::memmem::{self, Finder};
use mesh_core::{ChannelId, Identity, TeamId, TokenKey, UserId};
use serde_json::Value;

use crate::clock::{sent_at, unix_now};
use crate::ws::{self, Socket};
use crate::wsraw;

/// How long the connect flow's steps may take, each.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects client `user` in `channels` through the gateway at base URL `gateway`; the HTTP
/// call goes through `http` (bound to the worker's source address), the WebSocket from
/// `source`.
pub async fn connect(
    http: &reqwest::Client,
    gateway: &str,
    source: IpAddr,
    jwt_secret: &str,
    user: &str,
    channels: &[String],
) -> anyhow::Result<Socket> {
    let identity = Identity {
        user: UserId::new(user)?,
        team: TeamId::new("TBENCH")?,
        name: None,
        channels: channels
            .iter()
            .map(|c| ChannelId::new(c))
            .collect::<Result<_, _>>()?,
        expires_at: unix_now() + 3600,
        jti: None,
    };
    let token = TokenKey::hs256(jwt_secret.as_bytes())?.mint(&identity, unix_now())?;
    let reply: Value = tokio::time::timeout(STEP_TIMEOUT, async {
        http.post(format!("{gateway}rtm.connect"))
            .bearer_auth(&token)
            .send()
            .await?
            .json::<Value>()
            .await
    })
    .await
    .context("rtm.connect timed out")?
    .context("calling rtm.connect")?;
    let url = reply["url"]
        .as_str()
        .with_context(|| format!("rtm.connect answered {reply}"))?;
    let mut ws = ws::dial(url, source).await?;
    loop {
        let frame = tokio::time::timeout(STEP_TIMEOUT, ws.next())
            .await
            .context("no hello in time")??
            .context("the gateway closed the socket before hello")?;
        if frame.opcode != wsraw::OP_TEXT {
            continue;
        }
        if memmem::find(frame.payload, br#""type":"hello""#).is_some() {
            return Ok(ws);
        }
        bail!(
            "expected hello, got {}",
            String::from_utf8_lossy(frame.payload)
        );
    }
}

/// The frame that posts `text` to `channel`, acknowledged with `reply_to: id`.
pub fn message_frame(id: u64, channel: &str, text: &str) -> String {
    serde_json::json!({"id": id, "type": "message", "channel": channel, "text": text}).to_string()
}

/// What a frame from the gateway is, to the load generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A message this run published, sent at unix microseconds `sent_us`.
    Delivery { sent_us: u64 },
    /// The answer to our message `id`.
    Ack { id: u64, ok: bool },
    /// Anything else (presence, joins, pongs).
    Other,
}

/// Classifies a frame by looking for the few fields that matter rather than parsing the JSON:
/// every delivery is read by every receiver, so this is the load generator's hot path (the
/// NATS side is just as lean). Message texts this run writes hold no quotes or escapes.
///
/// A message event as channelmesh renders it starts with its type, which no reply does: it
/// needs one search, for its text. Other frames (any field order) are told apart by the
/// fields they carry. The searchers are built once, not per frame.
pub fn classify(frame: &[u8]) -> Incoming {
    static TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""text":"b"#));
    static REPLY_TO: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""reply_to":"#));
    static MESSAGE: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(br#""type":"message""#));
    let delivery = |frame: &[u8]| match TEXT.find(frame) {
        Some(at) => match sent_at(&frame[at + TEXT.needle().len()..]) {
            Some(sent_us) => Incoming::Delivery { sent_us },
            None => Incoming::Other,
        },
        None => Incoming::Other,
    };
    if frame.starts_with(br#"{"type":"message","#) {
        return delivery(frame);
    }
    if let Some(at) = REPLY_TO.find(frame) {
        let at = at + REPLY_TO.needle().len();
        let digits = frame[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let id = std::str::from_utf8(&frame[at..at + digits])
            .ok()
            .and_then(|d| d.parse().ok());
        if let Some(id) = id {
            let ok = memmem::find(frame, br#""ok":true"#).is_some();
            // A pong also carries reply_to; only acks carry ok.
            if ok || memmem::find(frame, br#""ok":false"#).is_some() {
                return Incoming::Ack { id, ok };
            }
        }
        return Incoming::Other;
    }
    if MESSAGE.find(frame).is_none() {
        return Incoming::Other;
    }
    delivery(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_told_apart() {
        let event = r#"{"channel":"C1","team":"T","text":"b1700000000123456:7:xxxx","ts":"1.000001","type":"message","user":"U1"}"#;
        assert_eq!(
            classify(event.as_bytes()),
            Incoming::Delivery {
                sent_us: 1_700_000_000_123_456
            }
        );
        let ack = r#"{"ok":true,"reply_to":42,"text":"b1:2:","ts":"1.2"}"#;
        assert_eq!(classify(ack.as_bytes()), Incoming::Ack { id: 42, ok: true });
        let refused = r#"{"error":{"code":2,"msg":"no"},"ok":false,"reply_to":9}"#;
        assert_eq!(
            classify(refused.as_bytes()),
            Incoming::Ack { id: 9, ok: false }
        );
        assert_eq!(
            classify(r#"{"reply_to":3,"type":"pong"}"#.as_bytes()),
            Incoming::Other
        );
        assert_eq!(
            classify(r#"{"type":"message","text":"hello"}"#.as_bytes()),
            Incoming::Other
        );
        assert_eq!(
            classify(r#"{"type":"presence_change"}"#.as_bytes()),
            Incoming::Other
        );
        let rendered =
            r#"{"type":"message","channel":"C1","user":"U1","text":"b77:1:xx","ts":"1.2"}"#;
        assert_eq!(
            classify(rendered.as_bytes()),
            Incoming::Delivery { sent_us: 77 }
        );
        assert_eq!(
            classify(r#"{"type":"message","channel":"C1","text":"not ours"}"#.as_bytes()),
            Incoming::Other
        );
        // Field order does not matter.
        assert_eq!(
            classify(r#"{"type":"message","text":"b5:1:x","channel":"C1"}"#.as_bytes()),
            Incoming::Delivery { sent_us: 5 }
        );
        assert_eq!(
            classify(r#"{"text":"b1:2:","reply_to":7,"ok":true}"#.as_bytes()),
            Incoming::Ack { id: 7, ok: true }
        );
    }

    #[test]
    fn the_send_frame_is_rtm_json() {
        let frame: Value = serde_json::from_str(&message_frame(5, "C1", "b1:2:x")).unwrap();
        assert_eq!(frame["id"], 5);
        assert_eq!(frame["type"], "message");
        assert_eq!(frame["channel"], "C1");
        assert_eq!(frame["text"], "b1:2:x");
    }
}
