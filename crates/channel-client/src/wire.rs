//! Conversions between channel events and their protobuf form: the one place that knows both.
//! Admin servers and gateways use it too when they call channel servers.

use mesh_core::{ChannelEvent, ChannelId, EventBody, Origin, TeamId, Ts, UserId};
use mesh_proto::channel as pb;
use mesh_proto::channel::event::Body;

/// Why a protobuf event is not a valid channel event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Id(#[from] mesh_core::IdError),
    #[error("{0}")]
    Ts(#[from] mesh_core::TsError),
    #[error("event has no body")]
    MissingBody,
}

fn opt_team(s: &str) -> Result<Option<TeamId>, WireError> {
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(TeamId::new(s)?))
    }
}

/// Parses an optional ts: "" is none.
pub fn opt_ts(s: &str) -> Result<Option<Ts>, WireError> {
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(Ts::parse(s)?))
    }
}

/// Renders an optional ts: none is "".
pub fn ts_str(ts: Option<Ts>) -> String {
    ts.map(|t| t.to_string()).unwrap_or_default()
}

/// The protobuf form of a body.
pub fn body_to_proto(body: &EventBody) -> Body {
    match body {
        EventBody::Message { user, text, team } => Body::Message(pb::Message {
            user: user.to_string(),
            text: text.clone(),
            team: team.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        }),
        EventBody::Typing { user } => Body::Typing(pb::Typing {
            user: user.to_string(),
        }),
        EventBody::MemberJoined { user, team } => Body::MemberJoined(pb::MemberJoined {
            user: user.to_string(),
            team: team.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        }),
        EventBody::MemberLeft { user } => Body::MemberLeft(pb::MemberLeft {
            user: user.to_string(),
        }),
        EventBody::ChannelJoined { channel, since } => Body::ChannelJoined(pb::ChannelJoined {
            channel: channel.to_string(),
            since_ts: ts_str(*since),
        }),
        EventBody::ChannelLeft { channel } => Body::ChannelLeft(pb::ChannelLeft {
            channel: channel.to_string(),
        }),
        EventBody::Raw { kind, json } => Body::Raw(pb::RawEvent {
            r#type: kind.clone(),
            json: json.clone(),
        }),
    }
}

/// The body a protobuf body describes.
pub fn body_from_proto(body: Body) -> Result<EventBody, WireError> {
    Ok(match body {
        Body::Message(m) => EventBody::Message {
            user: UserId::new(&m.user)?,
            text: m.text,
            team: opt_team(&m.team)?,
        },
        Body::Typing(t) => EventBody::Typing {
            user: UserId::new(&t.user)?,
        },
        Body::MemberJoined(m) => EventBody::MemberJoined {
            user: UserId::new(&m.user)?,
            team: opt_team(&m.team)?,
        },
        Body::MemberLeft(m) => EventBody::MemberLeft {
            user: UserId::new(&m.user)?,
        },
        Body::ChannelJoined(j) => EventBody::ChannelJoined {
            channel: ChannelId::new(&j.channel)?,
            since: opt_ts(&j.since_ts)?,
        },
        Body::ChannelLeft(l) => EventBody::ChannelLeft {
            channel: ChannelId::new(&l.channel)?,
        },
        Body::Raw(r) => EventBody::Raw {
            kind: r.r#type,
            json: r.json,
        },
    })
}

/// The protobuf form of an event.
pub fn event_to_proto(event: &ChannelEvent) -> pb::Event {
    let (origin_gateway, origin_conn) = match &event.origin {
        Some(o) => (o.gateway.clone(), o.conn),
        None => (String::new(), 0),
    };
    pb::Event {
        channel: event.channel.to_string(),
        ts: ts_str(event.ts),
        body: Some(body_to_proto(&event.body)),
        origin_gateway,
        origin_conn,
        // Set by the fan-out only: history and handoffs carry neither.
        published_micros: 0,
        trace_context: Default::default(),
    }
}

/// The event a protobuf event describes.
pub fn event_from_proto(event: pb::Event) -> Result<ChannelEvent, WireError> {
    Ok(ChannelEvent {
        channel: ChannelId::new(&event.channel)?,
        ts: opt_ts(&event.ts)?,
        body: body_from_proto(event.body.ok_or(WireError::MissingBody)?)?,
        origin: (!event.origin_gateway.is_empty()).then_some(Origin {
            gateway: event.origin_gateway,
            conn: event.origin_conn,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_body() {
        let u = UserId::new("U1").unwrap();
        let c = ChannelId::new("C1").unwrap();
        let bodies = [
            EventBody::Message {
                user: u.clone(),
                text: "hi".into(),
                team: Some(TeamId::new("T1").unwrap()),
            },
            EventBody::Typing { user: u.clone() },
            EventBody::MemberJoined {
                user: u.clone(),
                team: None,
            },
            EventBody::MemberLeft { user: u.clone() },
            EventBody::ChannelJoined {
                channel: c.clone(),
                since: Some(Ts::from_micros(5)),
            },
            EventBody::ChannelLeft { channel: c.clone() },
            EventBody::Raw {
                kind: "reaction_added".into(),
                json: bytes::Bytes::from_static(b"{}"),
            },
        ];
        for body in bodies {
            let event = ChannelEvent {
                channel: c.clone(),
                ts: Some(Ts::from_micros(7)),
                body,
                origin: Some(Origin {
                    gateway: "gw".into(),
                    conn: 3,
                }),
            };
            assert_eq!(event_from_proto(event_to_proto(&event)), Ok(event));
        }
    }

    #[test]
    fn refuses_bad_ids() {
        let mut e = event_to_proto(&ChannelEvent {
            channel: ChannelId::new("C1").unwrap(),
            ts: None,
            body: EventBody::Typing {
                user: UserId::new("U1").unwrap(),
            },
            origin: None,
        });
        e.channel = "bad id".into();
        assert!(event_from_proto(e.clone()).is_err());
        e.channel = "C1".into();
        e.body = None;
        assert_eq!(event_from_proto(e), Err(WireError::MissingBody));
    }

    #[test]
    fn an_empty_ts_is_none_and_a_bad_one_is_refused() {
        assert_eq!(opt_ts(""), Ok(None));
        assert_eq!(ts_str(None), "");
        let ts = Ts::from_micros(1_700_000_000_123_456);
        assert_eq!(opt_ts(&ts_str(Some(ts))), Ok(Some(ts)));
        assert!(matches!(opt_ts("yesterday"), Err(WireError::Ts(_))));
    }

    #[test]
    fn an_event_without_ts_or_origin_goes_out_with_empty_fields() {
        let event = ChannelEvent {
            channel: ChannelId::new("C1").unwrap(),
            ts: None,
            body: EventBody::MemberLeft {
                user: UserId::new("U1").unwrap(),
            },
            origin: None,
        };
        let proto = event_to_proto(&event);
        assert_eq!(proto.ts, "");
        assert_eq!((proto.origin_gateway.as_str(), proto.origin_conn), ("", 0));
        assert_eq!(proto.published_micros, 0, "set by the fan-out only");
        assert_eq!(event_from_proto(proto), Ok(event));
    }
}
