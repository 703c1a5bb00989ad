//! Resume cursors as a parameter: a reconnecting client says, per channel, the last `ts` it has
//! (`cursors=C1:TS1,C2:TS2` on `rtm.connect` or on the WebSocket URL); a draining gateway
//! passes them on the same way to the gateway it sends the client to.

use mesh_core::{ChannelId, Ts};

/// The most cursors one connection may give.
pub const MAX_CURSORS: usize = 1000;

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

/// Renders cursors as the `cursors` parameter: `C1:TS1,C2:TS2`.
pub fn cursors_param(cursors: &[(ChannelId, Ts)]) -> String {
    cursors
        .iter()
        .map(|(c, ts)| format!("{c}:{ts}"))
        .collect::<Vec<_>>()
        .join(",")
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

    #[test]
    fn the_parameter_reads_back_as_written() {
        let cursors = parse_cursors("C1:1700000000.000100,C2:1700000000.000200").unwrap();
        assert_eq!(
            cursors_param(&cursors),
            "C1:1700000000.000100,C2:1700000000.000200"
        );
        assert_eq!(parse_cursors(&cursors_param(&cursors)), Ok(cursors));
    }

    #[test]
    fn too_many_cursors_are_refused() {
        let raw: Vec<String> = (0..=MAX_CURSORS)
            .map(|i| format!("C{i}:1700000000.000100"))
            .collect();
        assert_eq!(parse_cursors(&raw.join(",")), Err(BadCursors));
        assert!(parse_cursors(&raw[..MAX_CURSORS].join(",")).is_ok());
    }
}
