//! Connect tickets: `rtm.connect` hands out a single-use, short-lived WebSocket URL per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::{ChannelId, Identity, Ts};
use rand::RngCore;

use crate::presence::TeamSlot;

/// How long a connect URL stays valid, by default.
pub const DEFAULT_TICKET_TTL: Duration = Duration::from_secs(30);
/// The most outstanding tickets one gateway holds; past it `rtm.connect` answers `ratelimited`.
pub const MAX_TICKETS: usize = 100_000;

/// What a ticket admits.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub identity: Identity,
    /// The client asked for `batch_presence_aware=1`.
    pub batch_presence: bool,
    /// Resume cursors: per channel, the last ts the client has.
    pub cursors: Vec<(ChannelId, Ts)>,
    /// The connection's place under its team's cap, when the team has one: held while the
    /// ticket is outstanding, then by the connection.
    pub slot: Option<Arc<TeamSlot>>,
    expires: Instant,
}

/// Outstanding tickets.
#[derive(Debug)]
pub struct Tickets {
    map: Mutex<HashMap<String, Ticket>>,
    ttl: Duration,
}

impl Tickets {
    /// Tickets valid for `ttl` each.
    pub fn new(ttl: Duration) -> Self {
        Tickets {
            map: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Issues a ticket id for `identity`, or `None` when too many are outstanding.
    pub fn issue(
        &self,
        identity: Identity,
        batch_presence: bool,
        cursors: Vec<(ChannelId, Ts)>,
        slot: Option<TeamSlot>,
    ) -> Option<String> {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TICKETS / 2 {
            map.retain(|_, t| t.expires > now);
        }
        if map.len() >= MAX_TICKETS {
            return None;
        }
        map.insert(
            id.clone(),
            Ticket {
                identity,
                batch_presence,
                cursors,
                slot: slot.map(Arc::new),
                expires: now + self.ttl,
            },
        );
        Some(id)
    }

    /// Drops expired tickets (and so frees their team slots).
    pub fn purge_expired(&self) {
        let now = Instant::now();
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, t| t.expires > now);
    }

    /// Redeems a ticket: it works once, and only before it expires.
    pub fn redeem(&self, id: &str) -> Option<Ticket> {
        let ticket = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)?;
        (ticket.expires > Instant::now()).then_some(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::{TeamId, UserId};

    #[test]
    fn tickets_are_single_use() {
        let tickets = Tickets::new(DEFAULT_TICKET_TTL);
        let identity = Identity {
            user: UserId::new("U1").unwrap(),
            team: TeamId::new("T1").unwrap(),
            name: None,
            channels: vec![],
            expires_at: 0,
            jti: None,
        };
        let id = tickets.issue(identity, false, vec![], None).unwrap();
        assert!(tickets.redeem(&id).is_some());
        assert!(tickets.redeem(&id).is_none());
        assert!(tickets.redeem("nope").is_none());
    }
}
