//! Connect tickets: `rtm.connect` hands out a single-use, short-lived WebSocket URL per call.
//!
//! A ticket of a capped team holds its place under the team and user caps only for
//! [`SLOT_HOLD`]: long enough for a client to open the URL it was just given, short enough that
//! a caller who mints URLs and never opens them cannot lock the team out for the URLs' whole
//! life. A URL opened after the hold asks for a place again at the upgrade.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::{ChannelId, Identity, Ts};
use rand::RngCore;

use crate::boot::{BootMode, Booted};
use crate::presence::TeamSlot;

/// How long a connect URL stays valid, by default.
pub const DEFAULT_TICKET_TTL: Duration = Duration::from_secs(30);
/// The most outstanding tickets one gateway holds; past it `rtm.connect` answers `ratelimited`.
pub const MAX_TICKETS: usize = 100_000;
/// How long an unused ticket holds its place under the team and user caps. Clients open the
/// URL within milliseconds of `rtm.connect`; after the hold the place goes back, and the
/// upgrade asks for one again (refused with `too_many_connections` if the team filled up).
pub const SLOT_HOLD: Duration = Duration::from_secs(5);

/// What a ticket admits.
#[derive(Debug)]
pub struct Ticket<S = TeamSlot> {
    pub identity: Identity,
    /// The token's `team_max_connections` claim: a place asked for again at the upgrade is
    /// under it too.
    pub team_max_connections: Option<u32>,
    /// The client asked for `batch_presence_aware=1`.
    pub batch_presence: bool,
    /// Resume cursors: per channel, the last ts the client has.
    pub cursors: Vec<(ChannelId, Ts)>,
    /// The connection's place under its team's and user's caps, when they apply and the
    /// ticket is younger than [`SLOT_HOLD`]: held by the ticket, then by the connection.
    pub slot: Option<S>,
    /// The channels the web app gave (`--boot-url`) and how they join the token's: shared
    /// with the boot cache, united with the identity's only when the URL is opened, so an
    /// outstanding ticket holds no copy of them.
    pub booted: Option<(Arc<Booted>, BootMode)>,
    issued: Instant,
    expires: Instant,
}

/// Outstanding tickets.
#[derive(Debug)]
pub struct Tickets<S = TeamSlot> {
    map: Mutex<HashMap<String, Ticket<S>>>,
    ttl: Duration,
}

impl<S> Tickets<S> {
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
        team_max_connections: Option<u32>,
        batch_presence: bool,
        cursors: Vec<(ChannelId, Ts)>,
        slot: Option<S>,
        booted: Option<(Arc<Booted>, BootMode)>,
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
                team_max_connections,
                batch_presence,
                cursors,
                slot,
                booted,
                issued: now,
                expires: now + self.ttl,
            },
        );
        Some(id)
    }

    /// At `now`: drops expired tickets, and takes the places of tickets older than
    /// [`SLOT_HOLD`]. Returns the places taken (expired tickets' and held too long), to be
    /// dropped — and so released — by the caller, outside the lock.
    pub fn sweep(&self, now: Instant) -> Vec<S> {
        let mut released = Vec::new();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, ticket| {
            if ticket.expires <= now || now.saturating_duration_since(ticket.issued) >= SLOT_HOLD {
                released.extend(ticket.slot.take());
            }
            ticket.expires > now
        });
        released
    }

    /// Redeems a ticket: it works once, and only before it expires.
    pub fn redeem(&self, id: &str) -> Option<Ticket<S>> {
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

    fn identity() -> Identity {
        Identity {
            user: UserId::new("U1").unwrap(),
            team: TeamId::new("T1").unwrap(),
            name: None,
            channels: vec![],
            expires_at: 0,
            jti: None,
        }
    }

    #[test]
    fn tickets_are_single_use() {
        let tickets: Tickets<()> = Tickets::new(DEFAULT_TICKET_TTL);
        let id = tickets
            .issue(identity(), None, false, vec![], None, None)
            .unwrap();
        assert!(tickets.redeem(&id).is_some());
        assert!(tickets.redeem(&id).is_none());
        assert!(tickets.redeem("nope").is_none());
    }

    #[test]
    fn an_unused_ticket_gives_its_place_back_after_the_hold_and_stays_valid() {
        let tickets: Tickets<&str> = Tickets::new(Duration::from_secs(300));
        let id = tickets
            .issue(identity(), None, false, vec![], Some("place"), None)
            .unwrap();
        let issued = Instant::now();
        assert!(tickets.sweep(issued).is_empty(), "held during the hold");
        let after = issued + SLOT_HOLD + Duration::from_millis(1);
        assert_eq!(tickets.sweep(after), ["place"]);
        assert!(tickets.sweep(after).is_empty(), "given back once");
        // Still a valid URL, without a place: the upgrade asks for one.
        let ticket = tickets.redeem(&id).unwrap();
        assert!(ticket.slot.is_none());
    }

    #[test]
    fn a_ticket_used_within_the_hold_keeps_its_place() {
        let tickets: Tickets<&str> = Tickets::new(DEFAULT_TICKET_TTL);
        let id = tickets
            .issue(identity(), None, false, vec![], Some("place"), None)
            .unwrap();
        assert_eq!(tickets.redeem(&id).unwrap().slot, Some("place"));
    }

    #[test]
    fn an_expired_ticket_is_dropped_with_its_place() {
        let tickets: Tickets<&str> = Tickets::new(Duration::from_millis(10));
        let id = tickets
            .issue(identity(), None, false, vec![], Some("place"), None)
            .unwrap();
        let later = Instant::now() + Duration::from_millis(20);
        assert_eq!(tickets.sweep(later), ["place"]);
        assert!(tickets.redeem(&id).is_none());
    }
}
