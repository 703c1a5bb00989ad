//! Resuming from cursors: a client that reconnects says, per channel, the last `ts` it has
//! (`cursors=C1:TS1,C2:TS2` on `rtm.connect` or on the WebSocket URL) and gets what it missed
//! from the channel servers' history, in order, before live events — or, when the history no
//! longer reaches back that far, a `history_gap` event for that channel first.

use std::sync::Arc;

use crate::outbox::Outbox;
use axum::extract::ws::Utf8Bytes;
use mesh_core::{ChannelId, Ts};
use mesh_rtm as rtm;

use crate::Shared;
use crate::hub::{Control, Outbound, Rendered};

/// The most cursors one connection may give.
pub const MAX_CURSORS: usize = 1000;
/// Events read per history call while resuming.
const PAGE: u32 = 1000;
/// The most history pages a resume reads per channel; past it the client is told of a gap.
const MAX_PAGES: usize = 10;

/// Why cursors were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadCursors;

/// Parses `C1:1700000000.000100,C2:...` (empty: none).
pub fn parse_cursors(raw: &str) -> Result<Vec<(ChannelId, Ts)>, BadCursors> {
    let mut cursors: Vec<(ChannelId, Ts)> = Vec::new();
    for pair in raw.split(',').filter(|p| !p.is_empty()) {
        let (channel, ts) = pair.split_once(':').ok_or(BadCursors)?;
        let channel = ChannelId::new(channel).map_err(|_| BadCursors)?;
        let ts = Ts::parse(ts).map_err(|_| BadCursors)?;
        match cursors.iter_mut().find(|(c, _)| *c == channel) {
            Some(existing) => existing.1 = existing.1.max(ts),
            None => cursors.push((channel, ts)),
        }
        if cursors.len() > MAX_CURSORS {
            return Err(BadCursors);
        }
    }
    Ok(cursors)
}

/// What a resume found for one channel.
#[derive(Debug, Clone)]
pub struct Resumed {
    pub channel: ChannelId,
    pub cursor: Ts,
    /// History no longer reaches back to the cursor: `Some(oldest ts still held)`.
    pub gap: Option<Option<Ts>>,
    pub events: Vec<Arc<Rendered>>,
}

/// Reads `channel`'s history after `cursor` and queues it to the connection.
pub async fn resume(shared: Arc<Shared>, outbox: Arc<Outbox>, channel: ChannelId, cursor: Ts) {
    let mut resumed = Resumed {
        channel: channel.clone(),
        cursor,
        gap: None,
        events: Vec::new(),
    };
    let mut since = cursor;
    let mut oldest_held = None;
    for page in 0.. {
        if page == MAX_PAGES {
            tracing::info!(%channel, "too much missed to resume; telling the client to refetch");
            resumed.gap = Some(oldest_held);
            resumed.events.clear();
            break;
        }
        let history = match shared.router.history(&channel, Some(since), PAGE).await {
            Ok(h) => h,
            Err(e) => {
                // Not silent: the client hears it may have missed something.
                tracing::warn!(%channel, error = %e, "history unavailable for a resume");
                resumed.gap = Some(None);
                break;
            }
        };
        if page == 0 {
            oldest_held = history.oldest;
            if history.complete_after.is_some_and(|c| cursor < c) {
                resumed.gap = Some(history.oldest);
            }
        }
        for event in &history.events {
            since = since.max(event.ts.unwrap_or(since));
            if let Some(frame) = rtm::render(event) {
                resumed.events.push(Arc::new(Rendered {
                    channel: channel.clone(),
                    ts: event.ts,
                    frame: Utf8Bytes::from(frame),
                    received: None,
                }));
            }
        }
        if !history.has_more || history.events.is_empty() {
            break;
        }
    }
    shared.hub.metrics().resumes.inc();
    if resumed.gap.is_some() {
        shared.hub.metrics().history_gaps.inc();
    }
    outbox.push_own(Outbound::control(Control::Resume(resumed)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cursors_and_refuses_garbage() {
        let c = parse_cursors("C1:1700000000.000100,C2:1700000000.000200,C1:1700000000.000300")
            .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].1.to_string(), "1700000000.000300");
        assert!(parse_cursors("").unwrap().is_empty());
        assert!(parse_cursors("C1").is_err());
        assert!(parse_cursors("C1:yesterday").is_err());
        assert!(parse_cursors("not a channel:1700000000.000100").is_err());
    }
}
