//! ListChannels' paging, apart from the wire: every channel server answers a page of the
//! channels of the slots it owns, in id order; [`merge`] makes one page of them, and
//! [`PageToken`] is the opaque cursor the caller hands back for the next one (the last id
//! returned).
//!
//! Why a merged page misses nothing: a server that had more (`has_more`) returned its first
//! `limit` channels after the cursor, so every channel it did not return sorts after all of
//! those; the merged page is the first `limit` of the union, so it ends at or before that
//! server's last channel, and the next page (after the merged page's last id) finds the rest.

use mesh_core::ChannelId;

use crate::error::AdminError;

/// A channel with live subscribers, as one channel server counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub channel: String,
    /// Live client connections subscribed to it, across every gateway.
    pub subscribers: u64,
    /// Distinct users among them.
    pub members: u64,
}

/// One channel server's page: its channels in id order, and whether more follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub channels: Vec<Summary>,
    pub has_more: bool,
}

/// The cursor of a listing: the last channel id of the page before (opaque to callers: the
/// id's bytes in hex, checked to be an id when handed back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageToken(pub ChannelId);

impl PageToken {
    /// The token's text.
    pub fn encode(&self) -> String {
        self.0
            .as_str()
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The cursor in `token` (`None` for "", the first page); one this API did not give is
    /// refused.
    pub fn decode(token: &str) -> Result<Option<PageToken>, AdminError> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || AdminError::BadPageToken;
        if !token.len().is_multiple_of(2) {
            return Err(bad());
        }
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| {
                token
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        let id = String::from_utf8(bytes).map_err(|_| bad())?;
        ChannelId::new(&id)
            .map(|c| Some(PageToken(c)))
            .map_err(|_| bad())
    }
}

/// One page of at most `limit` channels from every server's `pages`, in id order (a channel
/// two servers report — a slot moving between them — once, with the larger counts), and the
/// token of the next page when there is more.
pub fn merge(pages: Vec<Page>, limit: usize) -> (Vec<Summary>, Option<PageToken>) {
    let more_somewhere = pages.iter().any(|p| p.has_more);
    let mut all: Vec<Summary> = pages.into_iter().flat_map(|p| p.channels).collect();
    all.sort_by(|a, b| a.channel.cmp(&b.channel));
    let mut merged: Vec<Summary> = Vec::with_capacity(all.len().min(limit + 1));
    for s in all {
        match merged.last_mut() {
            Some(last) if last.channel == s.channel => {
                last.subscribers = last.subscribers.max(s.subscribers);
                last.members = last.members.max(s.members);
            }
            _ => merged.push(s),
        }
    }
    let more = more_somewhere || merged.len() > limit;
    merged.truncate(limit);
    let next = match more {
        true => merged
            .last()
            .and_then(|s| ChannelId::new(&s.channel).ok())
            .map(PageToken),
        false => None,
    };
    (merged, next)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn summary(channel: &str, subscribers: u64) -> Summary {
        Summary {
            channel: channel.into(),
            subscribers,
            members: 1,
        }
    }

    /// What one server answers from the channels it holds: the first `limit` after `after`.
    fn answer(held: &[Summary], after: Option<&str>, limit: usize) -> Page {
        let rest: Vec<Summary> = held
            .iter()
            .filter(|s| after.is_none_or(|a| s.channel.as_str() > a))
            .cloned()
            .collect();
        Page {
            has_more: rest.len() > limit,
            channels: rest.into_iter().take(limit).collect(),
        }
    }

    #[test]
    fn tokens_round_trip_and_anything_else_is_refused() {
        let token = PageToken(ChannelId::new("C-general.1:x").unwrap());
        let text = token.encode();
        assert!(text.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(PageToken::decode(&text).unwrap(), Some(token));
        assert_eq!(PageToken::decode("").unwrap(), None);
        for bad in ["zz", "abc", "2020", "c3", "%%", "434", "e282ac"] {
            // "2020" is two spaces, "c3" half a character, "e282ac" a non-ASCII one.
            assert!(
                matches!(PageToken::decode(bad), Err(AdminError::BadPageToken)),
                "{bad}"
            );
        }
    }

    #[test]
    fn pages_merge_by_id_and_a_channel_two_servers_report_is_listed_once() {
        let a = Page {
            channels: vec![summary("C1", 2), summary("C4", 1)],
            has_more: false,
        };
        let b = Page {
            channels: vec![summary("C2", 5), summary("C4", 3)],
            has_more: false,
        };
        let (page, next) = merge(vec![a.clone(), b.clone()], 10);
        let ids: Vec<(&str, u64)> = page
            .iter()
            .map(|s| (s.channel.as_str(), s.subscribers))
            .collect();
        assert_eq!(ids, [("C1", 2), ("C2", 5), ("C4", 3)]);
        assert_eq!(next, None);
        // Cut at the limit: the token is the last id returned.
        let (page, next) = merge(vec![a, b], 2);
        assert_eq!(page.len(), 2);
        assert_eq!(next.map(|t| t.0.to_string()).as_deref(), Some("C2"));
        // A server with more says so even when the merged page is short.
        let more = Page {
            channels: vec![summary("C9", 1)],
            has_more: true,
        };
        let (_, next) = merge(vec![more], 1);
        assert_eq!(next.map(|t| t.0.to_string()).as_deref(), Some("C9"));
        assert_eq!(merge(vec![], 100), (vec![], None));
    }

    #[test]
    fn paging_through_three_servers_lists_every_channel_once_in_order() {
        // 3 servers holding interleaved channels; pages of every size.
        let mut servers: Vec<Vec<Summary>> = vec![Vec::new(); 3];
        let mut want = BTreeMap::new();
        for i in 0..97u64 {
            let id = format!("C{:03}", (i * 37) % 101);
            servers[(i % 3) as usize].push(summary(&id, i));
            want.insert(id, i);
        }
        for s in &mut servers {
            s.sort_by(|a, b| a.channel.cmp(&b.channel));
        }
        for limit in [1, 2, 5, 32, 100, 1000] {
            let mut seen = Vec::new();
            let mut token: Option<PageToken> = None;
            for _ in 0..200 {
                let after = token.as_ref().map(|t| t.0.to_string());
                let pages = servers
                    .iter()
                    .map(|held| answer(held, after.as_deref(), limit))
                    .collect();
                let (page, next) = merge(pages, limit);
                assert!(page.len() <= limit);
                seen.extend(page.into_iter().map(|s| (s.channel, s.subscribers)));
                // The token goes through its text form, as a caller hands it back.
                token = match next {
                    Some(t) => PageToken::decode(&t.encode()).unwrap(),
                    None => break,
                };
            }
            let want: Vec<(String, u64)> = want.clone().into_iter().collect();
            assert_eq!(seen, want, "limit {limit}");
        }
    }
}
