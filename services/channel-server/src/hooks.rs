//! The edge to the webhooks: a channel [`Fact`] becomes a [`mesh_hooks::Event`] (its JSON
//! fields), keyed by its channel so that a channel's events reach the web app in order.

use mesh_hooks::Event;
use serde_json::{Map, Value};

use crate::members::{Fact, FactKind};

/// `fact` as the web app reads it: `channel`, `user` and `team` where known, `time_ms`, and for
/// a message to an offline member its `ts`, `text` and `sender`.
pub fn event(fact: Fact) -> Event {
    let mut fields = Map::new();
    fields.insert("channel".into(), Value::from(fact.channel.as_str()));
    if let Some(user) = &fact.user {
        fields.insert("user".into(), Value::from(user.as_str()));
    }
    if let Some(team) = &fact.team {
        fields.insert("team".into(), Value::from(team.as_str()));
    }
    fields.insert("time_ms".into(), Value::from(fact.time_ms));
    let name = fact.kind.name();
    if let FactKind::OfflineMessage { ts, text, sender } = fact.kind {
        fields.insert("ts".into(), Value::from(ts.to_string()));
        fields.insert("text".into(), Value::from(text));
        fields.insert("sender".into(), Value::from(sender.as_str()));
    }
    Event {
        id: fact.id,
        name,
        key: fact.channel.to_string(),
        fields,
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::{ChannelId, Ts, UserId};

    use super::*;

    #[test]
    fn an_offline_message_carries_its_ts_text_and_sender_keyed_by_channel() {
        let ts = Ts::parse("1700000000.000042").unwrap();
        let fact = Fact {
            kind: FactKind::OfflineMessage {
                ts,
                text: "hi".into(),
                sender: UserId::new("U2").unwrap(),
            },
            channel: ChannelId::new("C1").unwrap(),
            user: Some(UserId::new("U1").unwrap()),
            team: None,
            time_ms: 1_700_000_000_000,
            id: "user_offline_message:C1:U1:1700000000.000042".into(),
        };
        let event = event(fact);
        assert_eq!(
            (event.name, event.key.as_str()),
            ("user_offline_message", "C1")
        );
        let json = Value::Object(event.fields);
        assert_eq!(json["ts"], "1700000000.000042");
        assert_eq!(json["text"], "hi");
        assert_eq!(json["sender"], "U2");
        assert_eq!(json["user"], "U1");
        assert_eq!(json["time_ms"], 1_700_000_000_000u64);
        assert!(json.get("team").is_none());
    }
}
