//! Disconnect orders: a short-lived, bounded, versioned list of "close this user's connections"
//! that gateways follow through their reports, as they follow the revocations
//! ([`crate::revocations`]).
//!
//! Each order gets the next version; a gateway reports the (generation, version) it holds and
//! the directive carries the orders newer than that, oldest first and a page at a time. The
//! generation is random per ring manager start. A gateway reporting generation 0 has just
//! started: every connection it holds is newer than the orders, so it gets none and is
//! brought to the current version. One reporting another nonzero generation last heard from
//! another ring manager (a restart, a leader failover) and gets every order held.
//!
//! Soft state: orders expire after [`ORDER_TTL`] (a later connect is unaffected), and are not
//! saved; a restarted ring manager starts an empty list under a new generation.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_core::{TeamId, UserId};

/// How long an order is held (and given to gateways that have not taken it yet).
pub const ORDER_TTL: Duration = Duration::from_secs(60);
/// The most orders held at once; past it a call is refused (RESOURCE_EXHAUSTED) until some
/// expire.
pub const MAX_ORDERS: usize = 10_000;
/// The most orders one call may carry, and one directive.
pub const MAX_ORDERS_PER_CALL: usize = 1_000;
/// The longest close reason, in bytes; a longer one is cut on a character boundary.
pub const MAX_REASON_BYTES: usize = 100;

/// One order: close `user`'s live connections (only `team`'s when given) with `reason`, telling
/// the client whether to reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisconnectOrder {
    pub user: UserId,
    /// `None`: every connection of the user.
    pub team: Option<TeamId>,
    /// At most [`MAX_REASON_BYTES`].
    pub reason: String,
    /// Close code 4010 when true, 4011 when false.
    pub reconnect: bool,
    /// When the ring manager took it, Unix milliseconds.
    pub issued_at_ms: u64,
}

/// The list after a `DisconnectUsers` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnected {
    /// The list's version (bumped by every order).
    pub version: u64,
    /// Orders held (not yet expired).
    pub held: u64,
}

/// What a gateway lacks: the orders newer than the version it reported, and the generation
/// and version it holds once it has taken them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrdersCatchUp {
    pub generation: u64,
    pub version: u64,
    /// Oldest first.
    pub orders: Vec<DisconnectOrder>,
}

/// Why a `DisconnectUsers` call was refused (the whole call: it is all or nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DisconnectError {
    #[error("no disconnect order given")]
    NoOrders,
    #[error("{0} disconnect orders in one call; at most {MAX_ORDERS_PER_CALL}")]
    TooManyInOneCall(usize),
    /// The list is full; it holds this many.
    #[error(
        "the disconnect list holds {0} orders of at most {MAX_ORDERS}; each is forgotten a minute after it was given"
    )]
    Full(usize),
}

/// The disconnect list.
#[derive(Debug, Clone)]
pub struct Disconnects {
    generation: u64,
    version: u64,
    /// (version, when taken, order), oldest first.
    orders: VecDeque<(u64, Instant, DisconnectOrder)>,
}

impl Default for Disconnects {
    fn default() -> Self {
        Disconnects {
            // Random per start (RandomState is seeded from the OS), never 0: 0 is a gateway
            // that has just started.
            generation: RandomState::new().build_hasher().finish().max(1),
            version: 0,
            orders: VecDeque::new(),
        }
    }
}

/// Now, in Unix milliseconds.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `reason` cut to at most [`MAX_REASON_BYTES`], on a character boundary.
pub fn cut_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

impl Disconnects {
    /// Takes `orders` at `now` (their reasons cut, their issue time stamped): each gets the
    /// next version. All or nothing: too many, or a full list, refuses the whole call.
    pub fn order(
        &mut self,
        orders: Vec<DisconnectOrder>,
        now: Instant,
    ) -> Result<Disconnected, DisconnectError> {
        if orders.is_empty() {
            return Err(DisconnectError::NoOrders);
        }
        if orders.len() > MAX_ORDERS_PER_CALL {
            return Err(DisconnectError::TooManyInOneCall(orders.len()));
        }
        self.expire(now);
        if self.orders.len() + orders.len() > MAX_ORDERS {
            return Err(DisconnectError::Full(self.orders.len()));
        }
        let issued_at_ms = unix_ms();
        for order in orders {
            self.version += 1;
            tracing::info!(
                version = self.version,
                user = %order.user,
                team = order.team.as_ref().map(|t| t.as_str()).unwrap_or(""),
                reconnect = order.reconnect,
                "disconnect ordered"
            );
            let order = DisconnectOrder {
                reason: cut_reason(order.reason),
                issued_at_ms,
                ..order
            };
            self.orders.push_back((self.version, now, order));
        }
        Ok(Disconnected {
            version: self.version,
            held: self.orders.len() as u64,
        })
    }

    /// Drops the orders taken [`ORDER_TTL`] or more before `now`.
    fn expire(&mut self, now: Instant) {
        while let Some((_, at, _)) = self.orders.front() {
            if now.saturating_duration_since(*at) < ORDER_TTL {
                break;
            }
            self.orders.pop_front();
        }
    }

    /// Orders held at `now`.
    pub fn held(&mut self, now: Instant) -> usize {
        self.expire(now);
        self.orders.len()
    }

    /// What a gateway holding (`generation`, `version`) lacks at `now`: the live orders newer
    /// than `version`, at most [`MAX_ORDERS_PER_CALL`] (see the module's comment for other
    /// generations).
    pub fn catch_up(&mut self, generation: u64, version: u64, now: Instant) -> OrdersCatchUp {
        self.expire(now);
        let from = match generation {
            // A gateway that has just started: nothing it holds is older than the orders.
            0 => self.version,
            g if g == self.generation => version,
            _ => 0,
        };
        let orders: Vec<&(u64, Instant, DisconnectOrder)> = self
            .orders
            .iter()
            .filter(|(v, ..)| *v > from)
            .take(MAX_ORDERS_PER_CALL)
            .collect();
        let last = match orders.len() {
            MAX_ORDERS_PER_CALL => orders.last().map_or(self.version, |(v, ..)| *v),
            // Everything sent: the gateway is at the current version even if the newest
            // orders have expired since (or it claimed a version beyond ours).
            _ => self.version,
        };
        OrdersCatchUp {
            generation: self.generation,
            version: last,
            orders: orders.into_iter().map(|(_, _, o)| o.clone()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(user: &str, team: Option<&str>) -> DisconnectOrder {
        DisconnectOrder {
            user: UserId::new(user).unwrap(),
            team: team.map(|t| TeamId::new(t).unwrap()),
            reason: "bye".into(),
            reconnect: false,
            issued_at_ms: 0,
        }
    }

    fn users(c: &OrdersCatchUp) -> Vec<&str> {
        c.orders.iter().map(|o| o.user.as_str()).collect()
    }

    #[test]
    fn gateways_catch_up_by_version_and_a_new_gateway_gets_nothing_old() {
        let mut d = Disconnects::default();
        let now = Instant::now();
        let reply = d.order(vec![order("U1", None), order("U2", Some("T1"))], now);
        assert_eq!(
            reply.unwrap(),
            Disconnected {
                version: 2,
                held: 2
            }
        );
        // A gateway that has just started: none of its connections is older than the orders.
        let c = d.catch_up(0, 0, now);
        assert!(c.orders.is_empty());
        assert_eq!(c.version, 2);
        assert_ne!(c.generation, 0);
        let generation = c.generation;
        // One that holds version 1 gets the second order only.
        let c = d.catch_up(generation, 1, now);
        assert_eq!(users(&c), ["U2"]);
        assert_eq!(c.orders[0].team.as_ref().map(TeamId::as_str), Some("T1"));
        assert_eq!(c.version, 2);
        assert!(d.catch_up(generation, 2, now).orders.is_empty());
        d.order(vec![order("U3", None)], now).unwrap();
        let c = d.catch_up(generation, 2, now);
        assert_eq!((users(&c), c.version), (vec!["U3"], 3));
        // One that last heard from another ring manager gets every order held.
        let c = d.catch_up(generation.wrapping_add(1).max(1), 7, now);
        assert_eq!(users(&c), ["U1", "U2", "U3"]);
        // A gateway claiming a version beyond ours gets nothing, and ours.
        let c = d.catch_up(generation, u64::MAX, now);
        assert!(c.orders.is_empty());
        assert_eq!(c.version, 3);
    }

    #[test]
    fn orders_expire_so_a_later_connect_is_unaffected() {
        let mut d = Disconnects::default();
        let now = Instant::now();
        d.order(vec![order("U1", None)], now).unwrap();
        let later = now + ORDER_TTL;
        let c = d.catch_up(d.generation, 0, later);
        assert!(c.orders.is_empty(), "expired");
        assert_eq!(c.version, 1, "the gateway is still brought up to date");
        assert_eq!(d.held(later), 0);
        assert!(d.issued_stamped_now());
    }

    impl Disconnects {
        /// Every order held was stamped with a real time.
        fn issued_stamped_now(&self) -> bool {
            self.orders.iter().all(|(.., o)| o.issued_at_ms > 0)
        }
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(cut_reason("short".into()), "short");
        let long = "é".repeat(MAX_REASON_BYTES); // 2 bytes each
        let cut = cut_reason(long);
        assert_eq!(cut.len(), MAX_REASON_BYTES);
        let odd = format!("a{}", "é".repeat(MAX_REASON_BYTES));
        let cut = cut_reason(odd);
        assert_eq!(cut.len(), MAX_REASON_BYTES - 1);
        assert!(cut.starts_with('a'));
        let mut d = Disconnects::default();
        let mut o = order("U1", None);
        o.reason = "x".repeat(500);
        d.order(vec![o], Instant::now()).unwrap();
        let c = d.catch_up(d.generation, 0, Instant::now());
        assert_eq!(c.orders[0].reason.len(), MAX_REASON_BYTES);
    }

    #[test]
    fn calls_are_bounded_and_the_list_is_bounded_until_orders_expire() {
        let mut d = Disconnects::default();
        let now = Instant::now();
        assert_eq!(d.order(vec![], now), Err(DisconnectError::NoOrders));
        let many = |n: usize| (0..n).map(|i| order(&format!("U{i}"), None)).collect();
        assert_eq!(
            d.order(many(MAX_ORDERS_PER_CALL + 1), now),
            Err(DisconnectError::TooManyInOneCall(MAX_ORDERS_PER_CALL + 1))
        );
        for _ in 0..MAX_ORDERS / MAX_ORDERS_PER_CALL {
            d.order(many(MAX_ORDERS_PER_CALL), now).unwrap();
        }
        assert_eq!(
            d.order(many(1), now),
            Err(DisconnectError::Full(MAX_ORDERS))
        );
        // Pages: a directive carries at most a call's worth, and says how far it got.
        let c = d.catch_up(d.generation, 0, now);
        assert_eq!(c.orders.len(), MAX_ORDERS_PER_CALL);
        assert_eq!(c.version, MAX_ORDERS_PER_CALL as u64);
        let c = d.catch_up(d.generation, c.version, now);
        assert_eq!(c.orders[0].user.as_str(), "U0");
        assert_eq!(c.version, 2 * MAX_ORDERS_PER_CALL as u64);
        // Once they expire there is room again.
        d.order(many(1), now + ORDER_TTL).unwrap();
    }
}
