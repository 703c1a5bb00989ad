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
}

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

/// Closes a connection from outside its task, with a reason.
#[derive(Debug, Default)]
pub struct Closer {
    token: CancellationToken,
    reason: OnceLock<Close>,
}

impl Closer {
    /// Closes the connection for `reason`, unless it is already closing; true if this call
    /// set the reason.
    pub fn close(&self, reason: Close) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }

    /// Why the connection was closed, once it was.
    pub fn reason(&self) -> Option<Close> {
        self.reason.get().copied()
    }

    /// Fires when the connection is closed.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Close; 10] = [
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
            ]
        );
    }

    #[test]
    fn only_a_revoked_token_must_not_reconnect() {
        let stay_away: Vec<Close> = ALL.into_iter().filter(|c| !c.reconnect()).collect();
        assert_eq!(stay_away, [Close::Revoked]);
    }

    #[test]
    fn reasons_fit_a_close_frame() {
        // A close frame's payload is at most 125 bytes, two of them the code.
        assert!(ALL.iter().all(|c| c.reason().len() <= 123));
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
