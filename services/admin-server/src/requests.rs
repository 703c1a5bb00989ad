//! What the admin API accepts, checked before anything is routed: ids, message texts, raw
//! events, history cursors, presence lookups and token lifetimes. Plain functions of the
//! request's fields, returning the domain error.

use bytes::Bytes;
use mesh_core::event::{MAX_RAW_EVENT_BYTES, MAX_TEXT_BYTES};
use mesh_core::{ChannelId, EventBody, TeamId, Ts, UserId};
use serde_json::Value;

use crate::error::AdminError;

/// Event types a publisher may not send: they are the protocol's own frames.
const RESERVED_TYPES: &[&str] = &["hello", "goodbye", "pong", "error", "reconnect_url"];
/// Lifetime of a minted token when the call asks for 0 seconds.
const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;
/// The longest lifetime MintToken grants.
const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// The most users one `GetPresence` may ask about.
pub const MAX_PRESENCE_USERS: usize = 500;
/// The most channels one `Broadcast` may name.
pub const MAX_BROADCAST_CHANNELS: usize = 1_000;
/// ListChannels' page size when the call asks for 0, and the largest.
const DEFAULT_LIST_LIMIT: u32 = 100;
const MAX_LIST_LIMIT: u32 = 1_000;

/// The channel id in `field`.
pub fn channel(field: &'static str, value: &str) -> Result<ChannelId, AdminError> {
    ChannelId::new(value).map_err(|error| AdminError::BadId { field, error })
}

/// The user id in `user`.
pub fn user(value: &str) -> Result<UserId, AdminError> {
    UserId::new(value).map_err(|error| AdminError::BadId {
        field: "user",
        error,
    })
}

/// The team id in `team`.
pub fn team(value: &str) -> Result<TeamId, AdminError> {
    TeamId::new(value).map_err(|error| AdminError::BadId {
        field: "team",
        error,
    })
}

/// The team id in `team`, which may be empty.
pub fn opt_team(value: &str) -> Result<Option<TeamId>, AdminError> {
    if value.is_empty() {
        return Ok(None);
    }
    team(value).map(Some)
}

/// The history cursor in `since_ts`, which may be empty.
pub fn since(value: &str) -> Result<Option<Ts>, AdminError> {
    if value.is_empty() {
        return Ok(None);
    }
    Ts::parse(value).map(Some).map_err(AdminError::BadSince)
}

/// The longest idempotency key a caller may give.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// The channel server's key for a caller's `idempotency_key` (`None` when empty): in the
/// admin API's own key space, apart from the routers' and RTM clients' keys.
pub fn idempotency_key(value: &str) -> Result<Option<String>, AdminError> {
    match value.len() {
        0 => Ok(None),
        n if n > MAX_IDEMPOTENCY_KEY_BYTES => Err(AdminError::IdempotencyKeyTooLong),
        _ => Ok(Some(format!("admin:{value}"))),
    }
}

/// A message posted by `user` (of `team`, if any).
pub fn message(user_id: &str, text: String, team_id: &str) -> Result<EventBody, AdminError> {
    if text.is_empty() {
        return Err(AdminError::MissingText);
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(AdminError::TextTooLong);
    }
    Ok(EventBody::Message {
        user: user(user_id)?,
        text,
        team: opt_team(team_id)?,
    })
}

/// A raw event: a JSON object of at most [`MAX_RAW_EVENT_BYTES`] with a string `type` that is
/// not one of the protocol's own.
pub fn raw_event(json: String) -> Result<EventBody, AdminError> {
    if json.len() > MAX_RAW_EVENT_BYTES {
        return Err(AdminError::EventTooLarge);
    }
    let value: Value =
        serde_json::from_str(&json).map_err(|e| AdminError::InvalidJson(e.to_string()))?;
    let kind = match value.get("type") {
        Some(Value::String(kind)) if !kind.is_empty() => kind.clone(),
        _ if !value.is_object() => return Err(AdminError::NotAnObject),
        _ => return Err(AdminError::NoEventType),
    };
    if RESERVED_TYPES.contains(&kind.as_str()) {
        return Err(AdminError::ReservedType(kind));
    }
    Ok(EventBody::Raw {
        kind,
        json: Bytes::from(json),
    })
}

/// The users of one presence lookup, at most [`MAX_PRESENCE_USERS`].
pub fn presence_users(users: &[String]) -> Result<Vec<UserId>, AdminError> {
    if users.len() > MAX_PRESENCE_USERS {
        return Err(AdminError::TooManyUsers);
    }
    users
        .iter()
        .map(|u| {
            UserId::new(u).map_err(|error| AdminError::BadId {
                field: "users",
                error,
            })
        })
        .collect()
}

/// A Broadcast's channels, each parsed on its own (a bad id fails that channel only): at
/// least one, at most [`MAX_BROADCAST_CHANNELS`], none twice.
pub fn broadcast_channels(
    channels: &[String],
) -> Result<Vec<Result<ChannelId, AdminError>>, AdminError> {
    if channels.is_empty() {
        return Err(AdminError::NoChannels);
    }
    if channels.len() > MAX_BROADCAST_CHANNELS {
        return Err(AdminError::TooManyChannels);
    }
    let mut seen = std::collections::HashSet::with_capacity(channels.len());
    for c in channels {
        if !seen.insert(c.as_str()) {
            return Err(AdminError::DuplicateChannel(c.clone()));
        }
    }
    Ok(channels.iter().map(|c| channel("channels", c)).collect())
}

/// What a Broadcast publishes: the event when `event_json` is given (then no user, text or team),
/// else a message of `user_id` (as [`message`]).
pub fn broadcast_body(
    user_id: &str,
    text: String,
    team_id: &str,
    event_json: String,
) -> Result<EventBody, AdminError> {
    match event_json.is_empty() {
        true => message(user_id, text, team_id),
        false if !user_id.is_empty() || !text.is_empty() || !team_id.is_empty() => {
            Err(AdminError::MessageAndEvent)
        }
        false => raw_event(event_json),
    }
}

/// ListChannels' `prefix` ("" for every channel): it must begin an id (its characters are
/// an id's).
pub fn channel_prefix(prefix: &str) -> Result<(), AdminError> {
    if prefix.is_empty() {
        return Ok(());
    }
    channel("prefix", prefix).map(|_| ())
}

/// ListChannels' page size when the call asks for `asked` (0: the default; at most 1,000).
pub fn list_limit(asked: u32) -> u32 {
    match asked {
        0 => DEFAULT_LIST_LIMIT,
        n => n.min(MAX_LIST_LIMIT),
    }
}

/// A minted token's lifetime in seconds when the call asks for `asked` (0: the default).
pub fn token_ttl(asked: u64) -> u64 {
    match asked {
        0 => DEFAULT_TOKEN_TTL_SECS,
        n => n.min(MAX_TOKEN_TTL_SECS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_needs_text_within_its_bound_and_valid_ids() {
        assert!(matches!(
            message("U1", String::new(), ""),
            Err(AdminError::MissingText)
        ));
        let long = "x".repeat(MAX_TEXT_BYTES + 1);
        assert!(matches!(
            message("U1", long, ""),
            Err(AdminError::TextTooLong)
        ));
        assert!(matches!(
            message("", "hi".into(), ""),
            Err(AdminError::BadId { field: "user", .. })
        ));
        assert!(matches!(
            message("U1", "hi".into(), "not a team"),
            Err(AdminError::BadId { field: "team", .. })
        ));
        assert_eq!(
            message("U1", "hi".into(), "").unwrap(),
            EventBody::Message {
                user: UserId::new("U1").unwrap(),
                text: "hi".into(),
                team: None,
            }
        );
    }

    #[test]
    fn a_raw_event_is_an_object_with_a_type_of_its_own() {
        let refused = |json: &str| raw_event(json.to_string()).unwrap_err().to_string();
        assert!(refused("{").starts_with("event_json: invalid JSON: "));
        assert_eq!(refused("[1]"), "event_json: must be a JSON object");
        assert_eq!(refused("{\"a\":1}"), "event_json: needs a string \"type\"");
        assert_eq!(
            refused("{\"type\":\"\"}"),
            "event_json: needs a string \"type\""
        );
        assert_eq!(
            refused("{\"type\":\"hello\"}"),
            "event_json: type \"hello\" is reserved for the protocol"
        );
        let big = format!(
            "{{\"type\":\"x\",\"p\":\"{}\"}}",
            "a".repeat(MAX_RAW_EVENT_BYTES)
        );
        assert_eq!(
            refused(&big),
            format!("event_json: over {MAX_RAW_EVENT_BYTES} bytes")
        );
        let json = "{\"type\":\"reaction_added\"}";
        assert_eq!(
            raw_event(json.into()).unwrap(),
            EventBody::Raw {
                kind: "reaction_added".into(),
                json: Bytes::from(json),
            }
        );
    }

    #[test]
    fn presence_lookups_are_bounded_and_token_lifetimes_capped() {
        let many = vec!["U1".to_string(); MAX_PRESENCE_USERS + 1];
        assert!(matches!(
            presence_users(&many),
            Err(AdminError::TooManyUsers)
        ));
        assert_eq!(
            presence_users(&many[1..]).unwrap().len(),
            MAX_PRESENCE_USERS
        );
        assert_eq!(token_ttl(0), DEFAULT_TOKEN_TTL_SECS);
        assert_eq!(token_ttl(60), 60);
        assert_eq!(token_ttl(u64::MAX), MAX_TOKEN_TTL_SECS);
        assert_eq!(since("").unwrap(), None);
        assert!(matches!(since("yesterday"), Err(AdminError::BadSince(_))));
    }

    #[test]
    fn a_broadcast_names_distinct_channels_within_its_bound_and_one_body() {
        let ids = |n: usize| (0..n).map(|i| format!("C{i}")).collect::<Vec<_>>();
        assert!(matches!(
            broadcast_channels(&[]),
            Err(AdminError::NoChannels)
        ));
        assert!(matches!(
            broadcast_channels(&ids(MAX_BROADCAST_CHANNELS + 1)),
            Err(AdminError::TooManyChannels)
        ));
        assert_eq!(
            broadcast_channels(&ids(MAX_BROADCAST_CHANNELS))
                .unwrap()
                .len(),
            MAX_BROADCAST_CHANNELS
        );
        let twice = ["C1".to_string(), "C2".into(), "C1".into()];
        assert_eq!(
            broadcast_channels(&twice).unwrap_err().to_string(),
            "channels: C1 is listed twice"
        );
        // A bad id fails its own channel only.
        let parsed = broadcast_channels(&["C1".into(), "no good".into()]).unwrap();
        assert!(parsed[0].is_ok());
        assert!(matches!(
            parsed[1],
            Err(AdminError::BadId {
                field: "channels",
                ..
            })
        ));
        let event = r#"{"type":"announcement"}"#.to_string();
        assert!(matches!(
            broadcast_body("U1", "hi".into(), "", event.clone()),
            Err(AdminError::MessageAndEvent)
        ));
        assert!(matches!(
            broadcast_body("", String::new(), "T1", event.clone()),
            Err(AdminError::MessageAndEvent)
        ));
        assert!(matches!(
            broadcast_body("", String::new(), "", event),
            Ok(EventBody::Raw { .. })
        ));
        assert!(matches!(
            broadcast_body("", String::new(), "", String::new()),
            Err(AdminError::MissingText)
        ));
        assert!(matches!(
            broadcast_body("U1", "hi".into(), "T1", String::new()),
            Ok(EventBody::Message { .. })
        ));
    }

    #[test]
    fn listing_limits_and_prefixes() {
        assert_eq!(list_limit(0), 100);
        assert_eq!(list_limit(7), 7);
        assert_eq!(list_limit(5_000), 1_000);
        assert!(channel_prefix("").is_ok());
        assert!(channel_prefix("C-team.").is_ok());
        assert!(matches!(
            channel_prefix("C team"),
            Err(AdminError::BadId {
                field: "prefix",
                ..
            })
        ));
    }
}
