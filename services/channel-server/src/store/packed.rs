//! How the store packs an event: its body in one exact-size allocation (a tag, length-prefixed
//! fields, then the last field to the end), and back.

use bytes::Bytes;
use mesh_core::{ChannelId, EventBody, TeamId, Ts, UserId};

use super::{EVENT_OVERHEAD, Stored};

/// A stored event as the store keeps it: its ts beside one exact-size allocation holding the
/// whole body. An [`EventBody`] would cost a heap block per id and text (~100 B of `Arc<str>`
/// per message beyond its text) and 72 B of slot; this costs ~19 B beyond the text plus 24.
#[derive(Debug)]
pub(super) struct Packed {
    pub(super) ts: Ts,
    body: Box<[u8]>,
}

/// Body tags of [`Packed`].
mod tag {
    pub const MESSAGE: u8 = 1;
    pub const TYPING: u8 = 2;
    pub const MEMBER_JOINED: u8 = 3;
    pub const MEMBER_LEFT: u8 = 4;
    pub const CHANNEL_JOINED: u8 = 5;
    pub const CHANNEL_LEFT: u8 = 6;
    pub const RAW: u8 = 7;
}

/// Bytes of `n` as LEB128.
fn varint_len(n: usize) -> usize {
    (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize
}

/// A body: `tag`, then `fields` each prefixed by its length (LEB128), then `last`, which runs
/// to the end. Allocated once at its exact size. An absent id is written empty (ids never are).
fn write(tag: u8, fields: &[&[u8]], last: &[u8]) -> Box<[u8]> {
    let size = 1
        + fields
            .iter()
            .map(|f| varint_len(f.len()) + f.len())
            .sum::<usize>()
        + last.len();
    let mut out = Vec::with_capacity(size);
    out.push(tag);
    for field in fields {
        let mut n = field.len();
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(field);
    }
    out.extend_from_slice(last);
    out.into_boxed_slice()
}

/// Reads what [`write`] wrote; `None` on anything else.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn len(&mut self) -> Option<usize> {
        let mut n = 0usize;
        for shift in (0..usize::BITS).step_by(7) {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            n |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn field(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        if n > self.0.len() {
            return None;
        }
        let (field, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(field)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.field()?).ok()
    }

    fn rest(self) -> &'a [u8] {
        self.0
    }

    fn rest_str(self) -> Option<&'a str> {
        std::str::from_utf8(self.0).ok()
    }
}

fn team_bytes(team: &Option<TeamId>) -> &[u8] {
    team.as_ref().map_or(&[], |t| t.as_str().as_bytes())
}

fn opt_team(s: &str) -> Option<Option<TeamId>> {
    if s.is_empty() {
        Some(None)
    } else {
        TeamId::new(s).ok().map(Some)
    }
}

impl Packed {
    pub(super) fn pack(ts: Ts, event: &EventBody) -> Self {
        let body = match event {
            EventBody::Message {
                user,
                text,
                team: t,
            } => write(
                tag::MESSAGE,
                &[user.as_str().as_bytes(), team_bytes(t)],
                text.as_bytes(),
            ),
            EventBody::Typing { user } => write(tag::TYPING, &[], user.as_str().as_bytes()),
            EventBody::MemberJoined { user, team: t } => write(
                tag::MEMBER_JOINED,
                &[user.as_str().as_bytes()],
                team_bytes(t),
            ),
            EventBody::MemberLeft { user } => {
                write(tag::MEMBER_LEFT, &[], user.as_str().as_bytes())
            }
            EventBody::ChannelJoined { channel, since } => {
                let micros = since.map(|s| s.as_micros().to_le_bytes());
                write(
                    tag::CHANNEL_JOINED,
                    &[micros.as_ref().map_or(&[][..], |m| &m[..])],
                    channel.as_str().as_bytes(),
                )
            }
            EventBody::ChannelLeft { channel } => {
                write(tag::CHANNEL_LEFT, &[], channel.as_str().as_bytes())
            }
            EventBody::Raw { kind, json } => write(tag::RAW, &[kind.as_bytes()], json),
        };
        Packed { ts, body }
    }

    /// The event back. `None` only if the bytes are not what [`Packed::pack`] writes, which
    /// only ever writes ids that validated and text that was a `String`.
    pub(super) fn unpack(&self) -> Option<Stored> {
        let (&tag, rest) = self.body.split_first()?;
        let mut r = Reader(rest);
        let body = match tag {
            tag::MESSAGE => {
                let user = UserId::new(r.str()?).ok()?;
                let team = opt_team(r.str()?)?;
                let text = r.rest_str()?.to_owned();
                EventBody::Message { user, text, team }
            }
            tag::TYPING => EventBody::Typing {
                user: UserId::new(r.rest_str()?).ok()?,
            },
            tag::MEMBER_JOINED => {
                let user = UserId::new(r.str()?).ok()?;
                let team = opt_team(r.rest_str()?)?;
                EventBody::MemberJoined { user, team }
            }
            tag::MEMBER_LEFT => EventBody::MemberLeft {
                user: UserId::new(r.rest_str()?).ok()?,
            },
            tag::CHANNEL_JOINED => {
                let since = match r.field()? {
                    [] => None,
                    micros => Some(Ts::from_micros(u64::from_le_bytes(micros.try_into().ok()?))),
                };
                let channel = ChannelId::new(r.rest_str()?).ok()?;
                EventBody::ChannelJoined { channel, since }
            }
            tag::CHANNEL_LEFT => EventBody::ChannelLeft {
                channel: ChannelId::new(r.rest_str()?).ok()?,
            },
            tag::RAW => {
                let kind = r.str()?.to_owned();
                let json = Bytes::copy_from_slice(r.rest());
                EventBody::Raw { kind, json }
            }
            _ => return None,
        };
        Some(Stored { ts: self.ts, body })
    }

    /// Bytes this event counts for in the budgets.
    pub(super) fn counted(&self) -> usize {
        self.body.len() + EVENT_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(s: &str) -> ChannelId {
        ChannelId::new(s).unwrap()
    }

    #[test]
    fn every_stored_kind_round_trips() {
        let user = UserId::new("U0G9QF9C6").unwrap();
        let team = Some(TeamId::new("T024BE7LD").unwrap());
        let bodies = [
            EventBody::Message {
                user: user.clone(),
                text: "h\u{e9}llo \u{1f44b}".into(),
                team: team.clone(),
            },
            EventBody::Message {
                user: user.clone(),
                text: String::new(),
                team: None,
            },
            EventBody::Typing { user: user.clone() },
            EventBody::MemberJoined {
                user: user.clone(),
                team: team.clone(),
            },
            EventBody::MemberJoined {
                user: user.clone(),
                team: None,
            },
            EventBody::MemberLeft { user },
            EventBody::ChannelJoined {
                channel: c("C1"),
                since: Some(Ts::from_micros(1_700_000_000_000_123)),
            },
            EventBody::ChannelJoined {
                channel: c("C1"),
                since: None,
            },
            EventBody::ChannelLeft { channel: c("C2") },
            EventBody::Raw {
                kind: "reaction_added".repeat(20),
                json: Bytes::from(vec![b'x'; 70_000]),
            },
        ];
        for body in bodies {
            let ts = Ts::from_micros(42);
            let packed = Packed::pack(ts, &body);
            assert_eq!(packed.unpack(), Some(Stored { ts, body }));
        }
    }

    #[test]
    fn bodies_are_allocated_at_their_exact_size() {
        for n in [0, 1, 127, 128, 16_383, 16_384, 70_000] {
            let field = vec![b'k'; n];
            let body = write(tag::RAW, &[&field], b"{}");
            assert_eq!(body.len(), 1 + varint_len(n) + n + 2);
            assert_eq!(
                varint_len(n),
                match n {
                    0..128 => 1,
                    128..16_384 => 2,
                    _ => 3,
                }
            );
            let (_, rest) = body.split_first().unwrap();
            let mut r = Reader(rest);
            assert_eq!(r.field(), Some(&field[..]));
            assert_eq!(r.rest(), b"{}");
        }
    }

    #[test]
    fn foreign_bytes_do_not_unpack() {
        for bytes in [
            &[][..],
            &[0],
            &[tag::MESSAGE, 200],
            &[tag::MESSAGE, 1, b' ', 0],
        ] {
            let packed = Packed {
                ts: Ts::default(),
                body: bytes.into(),
            };
            assert_eq!(packed.unpack(), None, "{bytes:?}");
        }
    }

    proptest! {
        #[test]
        fn messages_round_trip(user in "[A-Z0-9]{1,64}", team in proptest::option::of("[A-Za-z0-9_.:-]{1,64}"), text in ".{0,300}") {
            let body = EventBody::Message {
                user: UserId::new(&user).unwrap(),
                text,
                team: team.map(|t| TeamId::new(&t).unwrap()),
            };
            let packed = Packed::pack(Ts::from_micros(7), &body);
            prop_assert_eq!(packed.unpack(), Some(Stored { ts: Ts::from_micros(7), body }));
        }

    }
}
