//! Why the gateway closes a client's WebSocket: one type, [`Close`], whose one table gives each
//! reason its close code, its reason text and whether the client should reconnect; and the
//! [`Closer`] through which the hub, the region and the connection itself end a connection.
//!
//! | reason | code | reason text | reconnect? |
//! |---|---|---|---|
//! | [`Close::ShuttingDown`] | 1001 | server shutting down | yes, at once (after `goodbye`) |
//! | [`Close::Draining`] | 1001 | region draining | yes, at once (after `goodbye`) |
//! | [`Close::FrameTooBig`] | 1009 | frame over the size limit | yes, after fixing the frame |
//! | [`Close::SubscribeTimeout`] | 1013 | subscriptions timed out | yes, with backoff |
//! | [`Close::Idle`] | 4001 | idle timeout | yes |
//! | [`Close::Revoked`] | 4003 | token revoked | only with a new token |
//! | [`Close::QueueOverflow`] | 4008 | slow consumer: outgoing queue overflowed | yes |
//! | [`Close::BacklogOverflow`] | 4008 | slow consumer: catch-up buffer overflowed | yes |
//! | [`Close::WriteStalled`] | 4008 | slow consumer: a write stalled | yes |
//! | [`Close::RateLimited`] | 4029 | rate limited: too many frames | yes, after slowing down |
//! | [`Close::Disconnected`] `{ reconnect: true }` | 4010 | the web app's reason (else "disconnected") | yes |
//! | [`Close::Disconnected`] `{ reconnect: false }` | 4011 | the web app's reason (else "disconnected") | no |
//!
//! A disconnect's reason text is the web app's (`DisconnectUser.reason`): the [`Closer`]
//! carries it beside the reason, cut to fit a close frame ([`close_text`]).
//!
//! docs/rtm.md ("Close codes") gives clients the same table by code.

use std::sync::OnceLock;

use tokio_util::sync::CancellationToken;

/// The WebSocket close codes the gateway sends (docs/rtm.md, "Close codes").
pub mod codes {
    /// The server is shutting down, or its region drains (after `goodbye`): reconnect.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The channels could not be subscribed in time: reconnect later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The client sent nothing, not even a pong, for the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4001;
    /// The connection's token was revoked: get a new token before reconnecting.
    pub const TOKEN_REVOKED: u16 = 4003;
    /// The client did not read fast enough (its queue overflowed, or a write stalled):
    /// reconnect.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client kept sending past its frame rate limit after `ratelimited` errors.
    pub const RATE_LIMITED: u16 = 4029;
    /// The web app disconnected the user (admin API `DisconnectUser`, reconnect true):
    /// reconnect.
    pub const DISCONNECTED_RECONNECT: u16 = 4010;
    /// The web app disconnected the user and the client should not reconnect.
    pub const DISCONNECTED: u16 = 4011;
}

/// The longest reason text a close frame carries, in bytes: its payload is at most 125 bytes,
/// two of them the code.
pub const MAX_CLOSE_TEXT: usize = 123;
/// A disconnect's reason text cut to at most this many bytes (the admin API's promise).
pub const MAX_DISCONNECT_TEXT: usize = 100;

/// Why the gateway closes a connection (with a close frame; a client that goes away on its
/// own gets none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The gateway is shutting down.
    ShuttingDown,
    /// The region drains: goodbye, with the connection's cursors kept for its reconnect.
    Draining,
    /// The client sent a frame over the size limit.
    FrameTooBig,
    /// The connection's channels were not subscribed upstream in time.
    SubscribeTimeout,
    /// The client sent nothing for the idle timeout.
    Idle,
    /// Its token was revoked (by `jti`): do not reconnect with it.
    Revoked,
    /// Its outgoing queue was full: it does not read fast enough.
    QueueOverflow,
    /// A joined or resumed channel's live events overflowed while its history was read.
    BacklogOverflow,
    /// A write to it did not complete within the write timeout.
    WriteStalled,
    /// It kept sending past its frame rate limit.
    RateLimited,
    /// The web app disconnected its user (`DisconnectUser`), saying whether to reconnect.
    Disconnected { reconnect: bool },
}

impl Close {
    /// The one table: (close code, reason text, whether the client should reconnect).
    const fn row(self) -> (u16, &'static str, bool) {
        use codes::*;
        match self {
            Close::ShuttingDown => (GOING_AWAY, "server shutting down", true),
            Close::Draining => (GOING_AWAY, "region draining", true),
            Close::FrameTooBig => (TOO_BIG, "frame over the size limit", true),
            Close::SubscribeTimeout => (TRY_AGAIN_LATER, "subscriptions timed out", true),
            Close::Idle => (IDLE_TIMEOUT, "idle timeout", true),
            Close::Revoked => (TOKEN_REVOKED, "token revoked", false),
            Close::QueueOverflow => (
                SLOW_CONSUMER,
                "slow consumer: outgoing queue overflowed",
                true,
            ),
            Close::BacklogOverflow => (
                SLOW_CONSUMER,
                "slow consumer: catch-up buffer overflowed",
                true,
            ),
            Close::WriteStalled => (SLOW_CONSUMER, "slow consumer: a write stalled", true),
            Close::RateLimited => (RATE_LIMITED, "rate limited: too many frames", true),
            Close::Disconnected { reconnect: true } => {
                (DISCONNECTED_RECONNECT, "disconnected", true)
            }
            Close::Disconnected { reconnect: false } => (DISCONNECTED, "disconnected", false),
        }
    }

    /// The WebSocket close code.
    pub const fn code(self) -> u16 {
        self.row().0
    }

    /// The close frame's reason text.
    pub const fn reason(self) -> &'static str {
        self.row().1
    }

    /// Whether the client should reconnect (with the same token).
    pub const fn reconnect(self) -> bool {
        self.row().2
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn close_text(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Closes a connection from outside its task, with a reason.
#[derive(Debug, Default)]
pub struct Closer {
    token: CancellationToken,
    /// Why, and the close frame's text when it is not the reason's own.
    reason: OnceLock<(Close, Option<String>)>,
}

impl Closer {
    /// Closes the connection for `reason`, unless it is already closing; true if this call
    /// set the reason.
    pub fn close(&self, reason: Close) -> bool {
        self.close_saying(reason, None)
    }

    /// [`Closer::close`] with `text` as the close frame's reason text instead of the reason's
    /// own (a disconnect's, from the web app; cut to [`MAX_DISCONNECT_TEXT`] bytes; empty:
    /// the reason's own).
    pub fn close_saying(&self, reason: Close, text: Option<&str>) -> bool {
        let text = text
            .filter(|t| !t.is_empty())
            .map(|t| close_text(t, MAX_DISCONNECT_TEXT).to_string());
        let first = self.reason.set((reason, text)).is_ok();
        self.token.cancel();
        first
    }

    /// Why the connection was closed, once it was.
    pub fn reason(&self) -> Option<Close> {
        self.reason.get().map(|(close, _)| *close)
    }

    /// The close frame's reason text, when it is not the reason's own.
    pub fn text(&self) -> Option<&str> {
        self.reason.get().and_then(|(_, text)| text.as_deref())
    }

    /// Fires when the connection is closed.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Close; 12] = [
        Close::ShuttingDown,
        Close::Draining,
        Close::FrameTooBig,
        Close::SubscribeTimeout,
        Close::Idle,
        Close::Revoked,
        Close::QueueOverflow,
        Close::BacklogOverflow,
        Close::WriteStalled,
        Close::RateLimited,
        Close::Disconnected { reconnect: true },
        Close::Disconnected { reconnect: false },
    ];

    #[test]
    fn the_codes_on_the_wire_are_those_clients_are_told() {
        let wire: Vec<(u16, &str)> = ALL.iter().map(|c| (c.code(), c.reason())).collect();
        assert_eq!(
            wire,
            [
                (1001, "server shutting down"),
                (1001, "region draining"),
                (1009, "frame over the size limit"),
                (1013, "subscriptions timed out"),
                (4001, "idle timeout"),
                (4003, "token revoked"),
                (4008, "slow consumer: outgoing queue overflowed"),
                (4008, "slow consumer: catch-up buffer overflowed"),
                (4008, "slow consumer: a write stalled"),
                (4029, "rate limited: too many frames"),
                (4010, "disconnected"),
                (4011, "disconnected"),
            ]
        );
    }

    #[test]
    fn only_a_revoked_token_and_a_disconnect_without_reconnect_must_not_reconnect() {
        let stay_away: Vec<Close> = ALL.into_iter().filter(|c| !c.reconnect()).collect();
        assert_eq!(
            stay_away,
            [Close::Revoked, Close::Disconnected { reconnect: false }]
        );
    }

    #[test]
    fn a_disconnects_text_is_the_web_apps_cut_on_a_character_boundary() {
        let closer = Closer::default();
        let long = format!("a{}", "é".repeat(100));
        assert!(closer.close_saying(Close::Disconnected { reconnect: false }, Some(&long)));
        let text = closer.text().unwrap();
        assert_eq!(text.len(), MAX_DISCONNECT_TEXT - 1);
        assert!(long.starts_with(text));
        assert_eq!(closer.reason().map(Close::code), Some(4011));
        // An empty text is the reason's own.
        let plain = Closer::default();
        plain.close_saying(Close::Disconnected { reconnect: true }, Some(""));
        assert_eq!(plain.text(), None);
        assert_eq!(close_text("héllo", 2), "h");
    }

    #[test]
    fn reasons_fit_a_close_frame() {
        // A close frame's payload is at most 125 bytes, two of them the code.
        assert!(ALL.iter().all(|c| c.reason().len() <= MAX_CLOSE_TEXT));
        const { assert!(MAX_DISCONNECT_TEXT <= MAX_CLOSE_TEXT) };
    }

    #[test]
    fn the_first_reason_wins() {
        let closer = Closer::default();
        assert_eq!(closer.reason(), None);
        assert!(!closer.token().is_cancelled());
        assert!(closer.close(Close::Draining));
        assert!(!closer.close(Close::Revoked));
        assert_eq!(closer.reason(), Some(Close::Draining));
        assert!(closer.token().is_cancelled());
    }
}
