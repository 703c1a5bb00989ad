//! Validated identifiers: channels, users, teams and ring nodes.
//!
//! Slack gives every addressable thing a channel id — an ordinary channel, a user, a team — so
//! a user's own channel is the user id itself and a team's channel is the team id.

use std::fmt;
use std::sync::Arc;

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id is longer than {MAX_ID_LEN} bytes")]
    TooLong { kind: &'static str },
    #[error("{kind} id may hold only ASCII letters, digits and -_.:")]
    BadChar { kind: &'static str },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(IdError::BadChar { kind });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: &str) -> Result<Self, IdError> {
                validate($kind, s)?;
                Ok(Self(Arc::from(s)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

id_type!(
    /// A channel: an ordinary channel, a user's own channel, a team's channel.
    ChannelId,
    "channel"
);
id_type!(
    /// A user.
    UserId,
    "user"
);
id_type!(
    /// A team (workspace).
    TeamId,
    "team"
);
id_type!(
    /// A channel server on the ring.
    NodeId,
    "node"
);

impl From<&UserId> for ChannelId {
    /// A user's own channel.
    fn from(user: &UserId) -> Self {
        ChannelId(user.0.clone())
    }
}

impl From<&TeamId> for ChannelId {
    /// A team's channel.
    fn from(team: &TeamId) -> Self {
        ChannelId(team.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_slack_style_ids() {
        assert!(ChannelId::new("C024BE91L").is_ok());
        assert!(UserId::new("U0G9QF9C6").is_ok());
        assert!(NodeId::new("cs-1").is_ok());
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(ChannelId::new(""), Err(IdError::Empty { kind: "channel" }));
        assert_eq!(
            ChannelId::new(&"C".repeat(65)),
            Err(IdError::TooLong { kind: "channel" })
        );
        assert_eq!(UserId::new("U 1"), Err(IdError::BadChar { kind: "user" }));
        assert!(ChannelId::new("C\u{e9}").is_err());
    }

    #[test]
    fn users_and_teams_are_channels() {
        let u = UserId::new("U1").unwrap();
        assert_eq!(ChannelId::from(&u).as_str(), "U1");
    }
}
