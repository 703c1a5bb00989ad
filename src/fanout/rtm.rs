//! The RTM side: the real connect flow (token, `rtm.connect`, WebSocket, `hello`) from a chosen
//! source address, the send frame, and what a received frame means to the load generator.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use mesh_core::{ChannelId, Identity, TeamId, TokenKey, UserId};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::Socket;
use crate::mesh::unix_now;

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
    let token = TokenKey::hs256(jwt_secret.as_bytes()).mint(&identity, unix_now())?;
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
    let mut ws = super::dial(url, source).await?;
    loop {
        let msg = tokio::time::timeout(STEP_TIMEOUT, ws.next())
            .await
            .context("no hello in time")?
            .context("the gateway closed the socket before hello")??;
        if let Message::Text(text) = msg {
            if text.as_str().contains(r#""type":"hello""#) {
                return Ok(ws);
            }
            bail!("expected hello, got {}", text.as_str());
        }
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
/// `contains` (SIMD in std) rules out the rare kinds first; only the delivery's text is
/// searched for its position (against channelmesh at 650,000 deliveries/s, a position search
/// per field was a tenth of a worker's time).
pub fn classify(frame: &str) -> Incoming {
    const REPLY_TO: &str = r#""reply_to":"#;
    const TEXT: &str = r#""text":"b"#;
    if frame.contains(REPLY_TO) {
        let Some(at) = frame.find(REPLY_TO).map(|at| at + REPLY_TO.len()) else {
            return Incoming::Other;
        };
        let digits = frame.as_bytes()[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if let Ok(id) = frame[at..at + digits].parse() {
            let ok = frame.contains(r#""ok":true"#);
            // A pong also carries reply_to; only acks carry ok.
            if ok || frame.contains(r#""ok":false"#) {
                return Incoming::Ack { id, ok };
            }
        }
        return Incoming::Other;
    }
    if !frame.contains(r#""type":"message""#) {
        return Incoming::Other;
    }
    match frame.find(TEXT) {
        Some(at) => match super::sent_at(&frame.as_bytes()[at + TEXT.len()..]) {
            Some(sent_us) => Incoming::Delivery { sent_us },
            None => Incoming::Other,
        },
        None => Incoming::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_told_apart() {
        let event = r#"{"channel":"C1","team":"T","text":"b1700000000123456:7:xxxx","ts":"1.000001","type":"message","user":"U1"}"#;
        assert_eq!(
            classify(event),
            Incoming::Delivery {
                sent_us: 1_700_000_000_123_456
            }
        );
        let ack = r#"{"ok":true,"reply_to":42,"text":"b1:2:","ts":"1.2"}"#;
        assert_eq!(classify(ack), Incoming::Ack { id: 42, ok: true });
        let refused = r#"{"error":{"code":2,"msg":"no"},"ok":false,"reply_to":9}"#;
        assert_eq!(classify(refused), Incoming::Ack { id: 9, ok: false });
        assert_eq!(classify(r#"{"reply_to":3,"type":"pong"}"#), Incoming::Other);
        assert_eq!(
            classify(r#"{"type":"message","text":"hello"}"#),
            Incoming::Other
        );
        assert_eq!(classify(r#"{"type":"presence_change"}"#), Incoming::Other);
        // Field order does not matter.
        assert_eq!(
            classify(r#"{"type":"message","text":"b5:1:x","channel":"C1"}"#),
            Incoming::Delivery { sent_us: 5 }
        );
        assert_eq!(
            classify(r#"{"text":"b1:2:","reply_to":7,"ok":true}"#),
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
