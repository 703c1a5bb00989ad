//! Catching up from the channel servers' history, one way for the three cases: a channel joined
//! while connected (its history since the join), a client resuming from its cursors (since each
//! cursor, paged, or a `history_gap` when history no longer reaches back that far), and the hub
//! re-subscribing a channel that moved (since the newest ts it delivered).
//!
//! Each reads with [`read`], renders with [`render`], and hands on what it read to be written
//! before the live events that waited for it, merged by [`merge`]: history first, then the
//! live events, each persisted event once, in ts order.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use channel_client::router::History;
use channel_client::{ChannelRouter, RouteError};
use mesh_core::{ChannelEvent, ChannelId, Ts};
use mesh_rtm as rtm;
use tokio::sync::oneshot;

use crate::metrics::GatewayMetrics;
use crate::outbox::Outbox;
use crate::vocab::{Backlog, Control, Outbound, Rendered};

/// The most events one history read returns: a join's or a re-subscription's catch-up reads
/// one such page, a resume up to [`MAX_PAGES`].
pub const CATCH_UP_LIMIT: u32 = 1000;
/// The most history pages a resume reads per channel; past it the client is told of a gap.
const MAX_PAGES: usize = 10;

/// Reads `channel`'s history after `since` (`None`: from its start), one page.
pub async fn read(
    router: &ChannelRouter,
    channel: &ChannelId,
    since: Option<Ts>,
) -> Result<History, RouteError> {
    router.history(channel, since, CATCH_UP_LIMIT).await
}

/// History events rendered for `channel`'s subscribers (those with nothing to show are left
/// out).
pub fn render<'a>(
    channel: &'a ChannelId,
    events: &'a [ChannelEvent],
) -> impl Iterator<Item = Arc<Rendered>> + 'a {
    events.iter().filter_map(move |event| {
        Some(Arc::new(Rendered {
            channel: channel.clone(),
            ts: event.ts,
            frame: Utf8Bytes::from(rtm::render(event)?),
            received: None,
        }))
    })
}

/// History first, then the live events that waited for it: each persisted event once and in
/// ts order (none at or before `after`, none at or before one already taken), transient ones
/// (no ts) as they come. `ts` reads an item's ts.
pub fn merge<T>(
    after: Option<Ts>,
    history: impl IntoIterator<Item = T>,
    live: impl IntoIterator<Item = T>,
    ts: impl Fn(&T) -> Option<Ts>,
) -> impl Iterator<Item = T> {
    let mut newest = after;
    history
        .into_iter()
        .chain(live)
        .filter(move |item| match ts(item) {
            Some(ts) if newest.is_some_and(|n| ts <= n) => false,
            Some(ts) => {
                newest = Some(ts);
                true
            }
            None => true,
        })
}

/// After a join: waits (at most `timeout`) for the channel's upstream subscription, reads its
/// history since the join, and queues both to the connection as one backlog, written after
/// `channel_joined`.
pub async fn join(
    router: ChannelRouter,
    outbox: Arc<Outbox>,
    channel: ChannelId,
    since: Option<Ts>,
    waiting: Vec<oneshot::Receiver<()>>,
    timeout: Duration,
) {
    let subscribed = tokio::time::timeout(timeout, futures::future::join_all(waiting)).await;
    if !matches!(&subscribed, Ok(r) if r.iter().all(Result::is_ok)) {
        tracing::warn!(%channel, "joined channel not subscribed in time; delivering live events only");
    }
    let mut events = Vec::new();
    if since.is_some() {
        match read(&router, &channel, since).await {
            Ok(history) => {
                if history.has_more {
                    tracing::warn!(%channel, "more than {CATCH_UP_LIMIT} events since the join; catching up on the first ones");
                }
                events = render(&channel, &history.events).collect();
            }
            Err(e) => {
                tracing::warn!(%channel, error = %e, "reading history of a joined channel failed")
            }
        }
    }
    let backlog = Backlog {
        preface: Some(rtm::channel_joined(&channel)),
        channel,
        after: None,
        events,
    };
    outbox.push_own(Outbound::control(Control::Backlog(backlog)));
}

/// Resuming from a cursor: reads `channel`'s history after `cursor`, page by page, and queues
/// it to the connection as one backlog — after a `history_gap` when history no longer reaches
/// back to the cursor, or when there is too much to resume (then without the events: the
/// client refetches).
pub async fn resume(
    router: ChannelRouter,
    metrics: Arc<GatewayMetrics>,
    outbox: Arc<Outbox>,
    channel: ChannelId,
    cursor: Ts,
) {
    let mut events = Vec::new();
    // History no longer reaches back to the cursor: `Some(oldest ts still held)`.
    let mut gap: Option<Option<Ts>> = None;
    let mut since = cursor;
    let mut oldest_held = None;
    for page in 0.. {
        if page == MAX_PAGES {
            tracing::info!(%channel, "too much missed to resume; telling the client to refetch");
            gap = Some(oldest_held);
            events.clear();
            break;
        }
        let history = match read(&router, &channel, Some(since)).await {
            Ok(h) => h,
            Err(e) => {
                // Not silent: the client hears it may have missed something.
                tracing::warn!(%channel, error = %e, "history unavailable for a resume");
                gap = Some(None);
                break;
            }
        };
        if page == 0 {
            oldest_held = history.oldest;
            if history.complete_after.is_some_and(|c| cursor < c) {
                gap = Some(history.oldest);
            }
        }
        since = history
            .events
            .iter()
            .filter_map(|event| event.ts)
            .fold(since, |since, ts| since.max(ts));
        events.extend(render(&channel, &history.events));
        if !history.has_more || history.events.is_empty() {
            break;
        }
    }
    metrics.resumes.inc();
    if gap.is_some() {
        metrics.history_gaps.inc();
    }
    let backlog = Backlog {
        preface: gap.map(|oldest| rtm::history_gap(&channel, cursor, oldest)),
        channel,
        after: Some(cursor),
        events,
    };
    outbox.push_own(Outbound::control(Control::Backlog(backlog)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{EventBody, UserId};

    fn ts(micros: u64) -> Ts {
        Ts::parse(&format!("1700000000.{micros:06}")).unwrap()
    }

    /// Items named by their ts (`Some`) or transient (`None`), merged and read back.
    fn merged(after: Option<u64>, history: &[Option<u64>], live: &[Option<u64>]) -> Vec<String> {
        let item = |t: &Option<u64>| (t.map(ts), format!("{t:?}"));
        let history: Vec<_> = history.iter().map(item).collect();
        let live: Vec<_> = live.iter().map(item).collect();
        merge(after.map(ts), history, live, |(ts, _)| *ts)
            .map(|(_, name)| name)
            .collect()
    }

    #[test]
    fn history_then_live_once_each_in_ts_order() {
        // Live events overlap the end of the history read: each is written once.
        assert_eq!(
            merged(None, &[Some(1), Some(2), Some(3)], &[Some(3), Some(4)]),
            ["Some(1)", "Some(2)", "Some(3)", "Some(4)"]
        );
        // Nothing at or before the cursor.
        assert_eq!(
            merged(Some(2), &[Some(1), Some(2), Some(3)], &[Some(2), Some(5)]),
            ["Some(3)", "Some(5)"]
        );
        // A live event older than the history read is not written out of order.
        assert_eq!(
            merged(None, &[Some(5)], &[Some(4), Some(6)]),
            ["Some(5)", "Some(6)"]
        );
    }

    #[test]
    fn transient_events_pass_where_they_came() {
        assert_eq!(
            merged(Some(1), &[Some(2)], &[None, Some(2), None, Some(3)]),
            ["Some(2)", "None", "None", "Some(3)"]
        );
        assert_eq!(merged(None, &[], &[]), Vec::<String>::new());
    }

    #[test]
    fn rendering_keeps_what_subscribers_see() {
        let channel = ChannelId::new("C1").unwrap();
        let user = UserId::new("U1").unwrap();
        let events = vec![
            ChannelEvent {
                channel: channel.clone(),
                ts: Some(ts(1)),
                body: EventBody::Message {
                    user: user.clone(),
                    text: "hi".into(),
                    team: None,
                },
                origin: None,
            },
            // Membership events are each connection's own business: nothing to render.
            ChannelEvent {
                channel: channel.clone(),
                ts: Some(ts(2)),
                body: EventBody::ChannelLeft {
                    channel: channel.clone(),
                },
                origin: None,
            },
        ];
        let rendered: Vec<Arc<Rendered>> = render(&channel, &events).collect();
        assert_eq!(rendered.len(), 1);
        assert_eq!(rendered[0].ts, Some(ts(1)));
        assert_eq!(rendered[0].received, None);
        assert!(rendered[0].frame.as_str().contains("\"text\":\"hi\""));
    }
}
