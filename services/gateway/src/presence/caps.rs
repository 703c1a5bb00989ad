//! Team and user connection caps, as this gateway sees them: the connections its teams'
//! presence servers granted and that are not yet released, and the questions (`Acquire`)
//! still waiting for their answer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_core::{TeamId, UserId};
use tokio::sync::oneshot;

/// Unanswered `Acquire`s are forgotten after this.
const PENDING_FORGET: Duration = Duration::from_secs(30);

/// Why a team's presence server did not grant a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The team is at its cap.
    Team,
    /// The user is at their cap.
    User,
    /// The count is not available right now (a takeover, or no answer in time): retry.
    Retry,
}

/// An `Acquire` waiting for its answer: when it was asked, for whom, and who waits (if anyone
/// still does).
type Pending = (
    Instant,
    TeamId,
    UserId,
    oneshot::Sender<Result<(), Refused>>,
);

/// Connections held under caps, and the questions in flight.
#[derive(Debug, Default)]
pub(super) struct Caps {
    /// Connections granted by teams' presence servers and not yet released, per (team, user).
    held: HashMap<(TeamId, UserId), u32>,
    /// `Acquire`s waiting for their answer, by request number.
    pending: HashMap<u64, Pending>,
    next_request: u64,
}

impl Caps {
    /// Asks for one more connection of `user` in `team` at `now`, answered on `answer`;
    /// returns the request number. Questions a lost session never answered are forgotten.
    pub(super) fn ask(
        &mut self,
        team: &TeamId,
        user: &UserId,
        answer: oneshot::Sender<Result<(), Refused>>,
        now: Instant,
    ) -> u64 {
        self.next_request += 1;
        let request = self.next_request;
        self.pending
            .retain(|_, (asked, ..)| now.duration_since(*asked) < PENDING_FORGET);
        self.pending
            .insert(request, (now, team.clone(), user.clone(), answer));
        request
    }

    /// The presence server answered `request`: a grant is held from the moment it is heard
    /// (snapshots from now on count it), and the answer goes to whoever waits. Returns the
    /// (team, user) of a grant nobody waits for any more: it must be released.
    pub(super) fn answered(
        &mut self,
        request: u64,
        granted: bool,
        refused: &str,
    ) -> Option<(TeamId, UserId)> {
        let (_, team, user, waiting) = self.pending.remove(&request)?;
        let outcome = match (granted, refused) {
            (true, _) => Ok(()),
            (false, "team") => Err(Refused::Team),
            (false, "user") => Err(Refused::User),
            (false, _) => Err(Refused::Retry),
        };
        if outcome.is_ok() {
            *self.held.entry((team.clone(), user.clone())).or_default() += 1;
        }
        if let Err(Ok(())) = waiting.send(outcome) {
            // Granted after the caller gave up waiting: hand it back.
            tracing::debug!(request, "releasing a late connection grant");
            return Some((team, user));
        }
        None
    }

    /// A held connection of `user` in `team` ended.
    pub(super) fn release(&mut self, team: &TeamId, user: &UserId) {
        let key = (team.clone(), user.clone());
        if let Some(n) = self.held.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&key);
            }
        }
    }

    /// Connections held, per (team, user).
    pub(super) fn held(&self) -> impl Iterator<Item = (&TeamId, &UserId, u32)> {
        self.held.iter().map(|((team, user), n)| (team, user, *n))
    }

    /// Questions waiting for an answer: request number and team.
    pub(super) fn pending(&self) -> impl Iterator<Item = (u64, &TeamId)> {
        self.pending
            .iter()
            .map(|(request, (_, team, ..))| (*request, team))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (TeamId, UserId) {
        (TeamId::new("T1").unwrap(), UserId::new("U1").unwrap())
    }

    fn held(caps: &Caps) -> Vec<u32> {
        caps.held().map(|(_, _, n)| n).collect()
    }

    #[test]
    fn a_grant_is_held_until_released() {
        let (team, user) = ids();
        let mut caps = Caps::default();
        let (tx, mut rx) = oneshot::channel();
        let request = caps.ask(&team, &user, tx, Instant::now());
        assert_eq!(caps.pending().count(), 1);
        assert_eq!(caps.answered(request, true, ""), None);
        assert_eq!(rx.try_recv(), Ok(Ok(())));
        assert_eq!(held(&caps), [1]);
        assert_eq!(caps.pending().count(), 0);
        // A second answer to the same request is stale.
        assert_eq!(caps.answered(request, true, ""), None);
        assert_eq!(held(&caps), [1]);
        caps.release(&team, &user);
        assert!(held(&caps).is_empty());
        // Releasing what is not held changes nothing.
        caps.release(&team, &user);
        assert!(held(&caps).is_empty());
    }

    #[test]
    fn refusals_say_which_cap() {
        let (team, user) = ids();
        let mut caps = Caps::default();
        for (reason, expected) in [
            ("team", Refused::Team),
            ("user", Refused::User),
            ("moved", Refused::Retry),
        ] {
            let (tx, mut rx) = oneshot::channel();
            let request = caps.ask(&team, &user, tx, Instant::now());
            assert_eq!(caps.answered(request, false, reason), None);
            assert_eq!(rx.try_recv(), Ok(Err(expected)));
        }
        assert!(held(&caps).is_empty());
    }

    #[test]
    fn a_late_grant_is_handed_back() {
        let (team, user) = ids();
        let mut caps = Caps::default();
        let (tx, rx) = oneshot::channel();
        let request = caps.ask(&team, &user, tx, Instant::now());
        drop(rx);
        assert_eq!(
            caps.answered(request, true, ""),
            Some((team.clone(), user.clone()))
        );
        // Counted until the caller releases it, as the grant was heard.
        assert_eq!(held(&caps), [1]);
        // A late refusal needs nothing handed back.
        let (tx, rx) = oneshot::channel();
        let request = caps.ask(&team, &user, tx, Instant::now());
        drop(rx);
        assert_eq!(caps.answered(request, false, "team"), None);
    }

    #[test]
    fn unanswered_questions_are_forgotten() {
        let (team, user) = ids();
        let mut caps = Caps::default();
        let start = Instant::now();
        let (tx, _rx) = oneshot::channel();
        let old = caps.ask(&team, &user, tx, start);
        let (tx, _rx2) = oneshot::channel();
        let new = caps.ask(&team, &user, tx, start + PENDING_FORGET);
        assert!(new > old);
        let pending: Vec<u64> = caps.pending().map(|(r, _)| r).collect();
        assert_eq!(pending, [new]);
    }
}
