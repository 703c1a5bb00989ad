//! The RTM wire format: parsing client frames and rendering server frames. The only place that
//! knows RTM JSON; everything past it sees [`ClientFrame`] and domain events.

use mesh_core::event::MAX_TEXT_BYTES;
use mesh_core::{ChannelEvent, ChannelId, EventBody, Ts, UserId};
use serde_json::{Map, Value, json};

/// RTM error codes the gateway sends (`{"error":{"code":N,"msg":..}}`). Documented in docs/rtm.md ("Error replies").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame is not a JSON object.
    BadJson = 1,
    /// A message without text (Slack's own code 2).
    NoText = 2,
    /// The frame's `type` is missing or unknown.
    UnknownType = 3,
    /// A required field is missing or has the wrong JSON type.
    BadField = 4,
    /// The channel id is not valid.
    BadChannel = 5,
    /// The connection's user is not a member of the channel: msg `not_in_channel`.
    NotInChannel = 6,
    /// The message text is over 16 KiB: msg `msg_too_long`.
    TooLong = 7,
    /// A binary frame: only text frames carry RTM.
    Binary = 8,
    /// The channel server could not take the event; try again.
    Unavailable = 9,
    /// A `presence_sub`/`presence_query` names more than [`MAX_PRESENCE_IDS`] users:
    /// msg `too_many_ids`.
    TooManyIds = 10,
    /// The connection sends frames faster than its limit: msg `ratelimited`. The frame was
    /// dropped; slow down (persisting closes the connection with code 4029).
    RateLimited = 11,
    /// The channel carries the server's events only — the user's own channel, and the
    /// team's unless the gateway allows posts there: msg `restricted_action_read_only_channel`
    /// (Slack's error for a post to a read-only channel).
    ReadOnlyChannel = 12,
    /// The channel's publish rate (its policy) is spent: msg `rate_limited`. The message was
    /// not posted; the connection stays open.
    ChannelRateLimited = 13,
}

/// The most user ids one `presence_sub` or `presence_query` may name (Slack's clients keep it
/// to the users on screen).
pub const MAX_PRESENCE_IDS: usize = 500;

/// An RTM error: a code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtmError {
    pub code: ErrorCode,
    pub msg: String,
    /// The client's `id`, when the frame had a numeric one: the error is then a reply.
    pub reply_to: Option<i64>,
}

impl RtmError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, reply_to: Option<i64>) -> Self {
        RtmError {
            code,
            msg: msg.into(),
            reply_to,
        }
    }

    /// `{"ok":false,"reply_to":N,"error":{..}}` when there is an id, else a `type:error` event.
    pub fn render(&self) -> String {
        let error = json!({"code": self.code as u16, "msg": self.msg});
        let value = match self.reply_to {
            Some(id) => json!({"ok": false, "reply_to": id, "error": error}),
            None => json!({"type": "error", "error": error}),
        };
        value.to_string()
    }
}

/// The longest `client_msg_id` a message frame may carry (Slack's are 36-byte UUIDs).
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 128;

/// A frame a client sent.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `{"type":"ping","id":N,..}`: answered with a pong echoing `id` and other scalar fields.
    Ping { fields: Map<String, Value> },
    /// `{"id":N,"type":"message","channel":C,"text":T}`, with the client's optional
    /// `client_msg_id`: a re-sent frame with the same one is the same message.
    Message {
        id: i64,
        channel: ChannelId,
        text: String,
        client_msg_id: Option<String>,
    },
    /// `{"id":N,"type":"typing","channel":C}`.
    Typing { id: Option<i64>, channel: ChannelId },
    /// `{"type":"presence_sub","ids":[U..]}`: watch exactly these users.
    PresenceSub { id: Option<i64>, ids: Vec<UserId> },
    /// `{"type":"presence_query","ids":[U..]}`: their presence, once.
    PresenceQuery { id: Option<i64>, ids: Vec<UserId> },
}

impl ClientFrame {
    /// The client's `id` for the frame, when it has one.
    pub fn id(&self) -> Option<i64> {
        match self {
            ClientFrame::Ping { fields } => fields.get("id").and_then(Value::as_i64),
            ClientFrame::Message { id, .. } => Some(*id),
            ClientFrame::Typing { id, .. }
            | ClientFrame::PresenceSub { id, .. }
            | ClientFrame::PresenceQuery { id, .. } => *id,
        }
    }
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<ClientFrame, RtmError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| RtmError::new(ErrorCode::BadJson, format!("invalid JSON: {e}"), None))?;
    let Value::Object(mut fields) = value else {
        return Err(RtmError::new(
            ErrorCode::BadJson,
            "a frame must be a JSON object",
            None,
        ));
    };
    let id = fields.get("id").and_then(Value::as_i64);
    let kind = match fields.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(RtmError::new(
                ErrorCode::BadField,
                "type must be a string",
                id,
            ));
        }
        None => return Err(RtmError::new(ErrorCode::UnknownType, "type is missing", id)),
    };
    match kind {
        "ping" => {
            fields.remove("type");
            Ok(ClientFrame::Ping { fields })
        }
        "message" => {
            let id = match fields.get("id") {
                Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
                    RtmError::new(ErrorCode::BadField, "id must be an integer", None)
                })?,
                Some(_) => {
                    return Err(RtmError::new(
                        ErrorCode::BadField,
                        "id must be a number",
                        None,
                    ));
                }
                None => return Err(RtmError::new(ErrorCode::BadField, "id is required", None)),
            };
            let channel = channel_field(&fields, Some(id))?;
            let text = match fields.get("text") {
                Some(Value::String(t)) if !t.is_empty() => t,
                Some(Value::String(_)) | None | Some(Value::Null) => {
                    return Err(RtmError::new(
                        ErrorCode::NoText,
                        "message text is missing",
                        Some(id),
                    ));
                }
                Some(_) => {
                    return Err(RtmError::new(
                        ErrorCode::BadField,
                        "text must be a string",
                        Some(id),
                    ));
                }
            };
            if text.len() > MAX_TEXT_BYTES {
                return Err(RtmError::new(ErrorCode::TooLong, "msg_too_long", Some(id)));
            }
            let client_msg_id = match fields.get("client_msg_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(m)) if m.is_empty() => None,
                Some(Value::String(m)) if m.len() <= MAX_CLIENT_MSG_ID_BYTES => Some(m.clone()),
                Some(Value::String(_)) => {
                    return Err(RtmError::new(
                        ErrorCode::BadField,
                        format!("client_msg_id must be at most {MAX_CLIENT_MSG_ID_BYTES} bytes"),
                        Some(id),
                    ));
                }
                Some(_) => {
                    return Err(RtmError::new(
                        ErrorCode::BadField,
                        "client_msg_id must be a string",
                        Some(id),
                    ));
                }
            };
            Ok(ClientFrame::Message {
                id,
                channel,
                text: text.clone(),
                client_msg_id,
            })
        }
        "typing" => Ok(ClientFrame::Typing {
            channel: channel_field(&fields, id)?,
            id,
        }),
        "presence_sub" => Ok(ClientFrame::PresenceSub {
            ids: ids_field(&fields, id)?,
            id,
        }),
        "presence_query" => Ok(ClientFrame::PresenceQuery {
            ids: ids_field(&fields, id)?,
            id,
        }),
        other => Err(RtmError::new(
            ErrorCode::UnknownType,
            format!("unsupported type {other:?}"),
            id,
        )),
    }
}

fn ids_field(fields: &Map<String, Value>, id: Option<i64>) -> Result<Vec<UserId>, RtmError> {
    let Some(Value::Array(ids)) = fields.get("ids") else {
        return Err(RtmError::new(
            ErrorCode::BadField,
            "ids must be an array of user ids",
            id,
        ));
    };
    if ids.len() > MAX_PRESENCE_IDS {
        return Err(RtmError::new(ErrorCode::TooManyIds, "too_many_ids", id));
    }
    let mut users = Vec::with_capacity(ids.len());
    for value in ids {
        let Value::String(raw) = value else {
            return Err(RtmError::new(
                ErrorCode::BadField,
                "ids must be an array of user ids",
                id,
            ));
        };
        let user = UserId::new(raw)
            .map_err(|e| RtmError::new(ErrorCode::BadField, format!("ids: {e}"), id))?;
        if !users.contains(&user) {
            users.push(user);
        }
    }
    Ok(users)
}

fn channel_field(fields: &Map<String, Value>, id: Option<i64>) -> Result<ChannelId, RtmError> {
    match fields.get("channel") {
        Some(Value::String(c)) => {
            ChannelId::new(c).map_err(|e| RtmError::new(ErrorCode::BadChannel, e.to_string(), id))
        }
        Some(_) => Err(RtmError::new(
            ErrorCode::BadField,
            "channel must be a string",
            id,
        )),
        None => Err(RtmError::new(
            ErrorCode::BadField,
            "channel is required",
            id,
        )),
    }
}

/// `{"type":"hello"}`.
pub fn hello() -> String {
    r#"{"type":"hello"}"#.to_string()
}

/// `{"type":"goodbye"}`: the server is about to close; reconnect.
pub fn goodbye() -> String {
    r#"{"type":"goodbye"}"#.to_string()
}

/// The pong for a ping: `type:pong`, `reply_to` = the ping's id, other scalar fields echoed.
pub fn pong(mut fields: Map<String, Value>) -> String {
    let id = fields.remove("id").unwrap_or(Value::Null);
    fields.retain(|_, v| !v.is_object() && !v.is_array());
    fields.insert("type".into(), Value::from("pong"));
    fields.insert("reply_to".into(), id);
    Value::Object(fields).to_string()
}

/// `{"type":"history_gap","channel":C,"cursor":TS,"oldest_ts":TS|null}`: history no longer
/// reaches back to the client's cursor for that channel; events between may be lost, so the
/// client must refetch the channel. `oldest_ts` is the oldest event still held.
pub fn history_gap(channel: &ChannelId, cursor: Ts, oldest: Option<Ts>) -> String {
    json!({
        "type": "history_gap",
        "channel": channel.as_str(),
        "cursor": cursor.to_string(),
        "oldest_ts": oldest.map(|t| t.to_string()),
    })
    .to_string()
}

/// `{"type":"presence_change","user":U,"presence":"active"|"away"}`.
pub fn presence_change(user: &UserId, active: bool) -> String {
    json!({"type": "presence_change", "user": user.as_str(), "presence": presence(active)})
        .to_string()
}

/// The batch form, for clients that connected with `batch_presence_aware=1`:
/// `{"type":"presence_change","users":[U..],"presence":..}`.
pub fn presence_change_batch(users: &[&UserId], active: bool) -> String {
    let users: Vec<&str> = users.iter().map(|u| u.as_str()).collect();
    json!({"type": "presence_change", "users": users, "presence": presence(active)}).to_string()
}

fn presence(active: bool) -> &'static str {
    if active { "active" } else { "away" }
}

/// `{"ok":true,"reply_to":N}`: a frame with an id was taken.
pub fn ok_reply(id: i64) -> String {
    json!({"ok": true, "reply_to": id}).to_string()
}

/// The ack of a sent message.
pub fn message_ack(id: i64, ts: Ts, text: &str) -> String {
    // A struct, not a `json!` map: one of these per published message, and the map would
    // allocate per key.
    #[derive(serde::Serialize)]
    struct Ack<'a> {
        ok: bool,
        reply_to: i64,
        ts: String,
        text: &'a str,
    }
    let ack = Ack {
        ok: true,
        reply_to: id,
        ts: ts.to_string(),
        text,
    };
    serde_json::to_string(&ack).unwrap_or_default()
}

/// A message event as clients get it; the others are rare enough for `json!`.
#[derive(serde::Serialize)]
struct MessageEvent<'a> {
    r#type: &'static str,
    channel: &'a str,
    user: &'a str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    team: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_ts: Option<&'a str>,
}

/// `{"type":"channel_joined","channel":{"id":C,..}}`.
pub fn channel_joined(channel: &ChannelId) -> String {
    json!({"type": "channel_joined", "channel": {"id": channel.as_str(), "is_member": true}})
        .to_string()
}

/// `{"type":"channel_left","channel":C}`.
pub fn channel_left(channel: &ChannelId) -> String {
    json!({"type": "channel_left", "channel": channel.as_str()}).to_string()
}

/// Slack's channel type letter: G (private), D (direct message), else C.
fn channel_type(channel: &ChannelId) -> &'static str {
    match channel.as_str().as_bytes().first() {
        Some(b'G') => "G",
        Some(b'D') => "D",
        _ => "C",
    }
}

/// The frame every subscriber of the event's channel receives, rendered once per gateway.
/// `None` for membership events, which each connection handles itself.
pub fn render(event: &ChannelEvent) -> Option<String> {
    let channel = event.channel.as_str();
    let ts = event.ts.map(|t| t.to_string());
    let mut value = match &event.body {
        EventBody::Message { user, text, team } => {
            let message = MessageEvent {
                r#type: "message",
                channel,
                user: user.as_str(),
                text,
                team: team.as_ref().map(|t| t.as_str()),
                ts: ts.as_deref(),
                event_ts: ts.as_deref(),
            };
            return serde_json::to_string(&message).ok();
        }
        EventBody::Typing { user } => {
            json!({"type": "user_typing", "channel": channel, "user": user.as_str()})
        }
        EventBody::MemberJoined { user, team } => {
            let mut v = json!({"type": "member_joined_channel", "user": user.as_str(), "channel": channel, "channel_type": channel_type(&event.channel)});
            if let Some(team) = team {
                v["team"] = Value::from(team.as_str());
            }
            v
        }
        EventBody::MemberLeft { user } => {
            json!({"type": "member_left_channel", "user": user.as_str(), "channel": channel, "channel_type": channel_type(&event.channel)})
        }
        EventBody::ChannelJoined { .. } | EventBody::ChannelLeft { .. } => return None,
        EventBody::Raw { json, .. } => match serde_json::from_slice::<Value>(json) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                tracing::warn!(%channel, "dropping a raw event that is not a JSON object");
                return None;
            }
        },
    };
    if let Some(ts) = ts {
        value["event_ts"] = Value::from(ts);
    }
    Some(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::UserId;

    fn code(text: &str) -> (ErrorCode, Option<i64>) {
        let e = parse(text).unwrap_err();
        (e.code, e.reply_to)
    }

    #[test]
    fn parses_client_frames() {
        assert_eq!(
            parse(r#"{"id":1,"type":"message","channel":"C1","text":"hi"}"#).unwrap(),
            ClientFrame::Message {
                id: 1,
                channel: ChannelId::new("C1").unwrap(),
                text: "hi".into(),
                client_msg_id: None,
            }
        );
        assert!(matches!(
            parse(r#"{"id":2,"type":"message","channel":"C1","text":"hi","client_msg_id":"m-1"}"#)
                .unwrap(),
            ClientFrame::Message { client_msg_id: Some(m), .. } if m == "m-1"
        ));
        let long = format!(
            r#"{{"id":3,"type":"message","channel":"C1","text":"hi","client_msg_id":"{}"}}"#,
            "m".repeat(MAX_CLIENT_MSG_ID_BYTES + 1)
        );
        assert_eq!(code(&long), (ErrorCode::BadField, Some(3)));
        assert_eq!(
            code(r#"{"id":4,"type":"message","channel":"C1","text":"hi","client_msg_id":7}"#),
            (ErrorCode::BadField, Some(4))
        );
        assert!(matches!(
            parse(r#"{"type":"ping","id":7}"#).unwrap(),
            ClientFrame::Ping { .. }
        ));
        assert!(matches!(
            parse(r#"{"type":"typing","channel":"C1"}"#).unwrap(),
            ClientFrame::Typing { id: None, .. }
        ));
    }

    #[test]
    fn bad_frames_get_codes() {
        assert_eq!(code("not json"), (ErrorCode::BadJson, None));
        assert_eq!(code("[1,2]"), (ErrorCode::BadJson, None));
        assert_eq!(code(r#"{"id":3}"#), (ErrorCode::UnknownType, Some(3)));
        assert_eq!(
            code(r#"{"id":3,"type":"launch"}"#),
            (ErrorCode::UnknownType, Some(3))
        );
        assert_eq!(
            code(r#"{"id":3,"type":"message","channel":"C1"}"#),
            (ErrorCode::NoText, Some(3))
        );
        assert_eq!(
            code(r#"{"id":3,"type":"message","channel":5,"text":"x"}"#),
            (ErrorCode::BadField, Some(3))
        );
        assert_eq!(
            code(r#"{"id":"3","type":"message","channel":"C1","text":"x"}"#),
            (ErrorCode::BadField, None)
        );
        assert_eq!(
            code(r#"{"id":3,"type":"message","channel":"bad id","text":"x"}"#),
            (ErrorCode::BadChannel, Some(3))
        );
        let long = format!(
            r#"{{"id":3,"type":"message","channel":"C1","text":"{}"}}"#,
            "x".repeat(MAX_TEXT_BYTES + 1)
        );
        assert_eq!(code(&long), (ErrorCode::TooLong, Some(3)));
    }

    #[test]
    fn renders_replies() {
        let e = RtmError::new(ErrorCode::NoText, "message text is missing", Some(4));
        assert_eq!(
            e.render(),
            r#"{"error":{"code":2,"msg":"message text is missing"},"ok":false,"reply_to":4}"#
        );
        let ClientFrame::Ping { fields } =
            parse(r#"{"type":"ping","id":9,"time":5,"nested":{}}"#).unwrap()
        else {
            panic!()
        };
        let pong: Value = serde_json::from_str(&pong(fields)).unwrap();
        assert_eq!(pong, json!({"type":"pong","reply_to":9,"time":5}));
    }

    #[test]
    fn renders_events_with_ts() {
        let event = ChannelEvent {
            channel: ChannelId::new("C1").unwrap(),
            ts: Some(Ts::from_micros(1_700_000_000_000_001)),
            body: EventBody::Message {
                user: UserId::new("U1").unwrap(),
                text: "hi".into(),
                team: None,
            },
            origin: None,
        };
        let v: Value = serde_json::from_str(&render(&event).unwrap()).unwrap();
        assert_eq!(v["ts"], "1700000000.000001");
        assert_eq!(v["type"], "message");
        let raw = ChannelEvent {
            body: EventBody::Raw {
                kind: "reaction_added".into(),
                json: bytes::Bytes::from_static(br#"{"type":"reaction_added","reaction":"x"}"#),
            },
            ..event
        };
        let v: Value = serde_json::from_str(&render(&raw).unwrap()).unwrap();
        assert_eq!(v["event_ts"], "1700000000.000001");
        assert_eq!(v["reaction"], "x");
    }
}
