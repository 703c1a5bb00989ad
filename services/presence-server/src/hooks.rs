//! The `presence_changed` webhook: a [`Change`] of the state machine as the event the web app
//! receives, `{"id", "name": "presence_changed", "user", "presence": "active"|"away",
//! "team"?, "time_ms"}`, keyed by the user (so each user's events arrive in order).
//!
//! The id is derived from the fact: the user, the presence, and when that state began as the
//! gateways report it (`since_ms`). A server that takes a user over re-announces a user who
//! stayed connected (or goes away one who left) with the same id, so the receiver's dedup by id
//! collapses the two; a change whose time no gateway gave is stamped with the time it is
//! published, unique per emission.

use mesh_hooks::Event;
use serde_json::{Map, Value};

use crate::state::Change;

/// The event's name.
pub const PRESENCE_CHANGED: &str = "presence_changed";

/// `change` as the webhook event, `now_ms` standing in for a time the gateways did not give.
pub fn presence_changed(change: &Change, now_ms: u64) -> Event {
    let presence = if change.active { "active" } else { "away" };
    let (since, origin) = match change.since_ms {
        Some(t) => (t, ""),
        // Published here and only here: its own fact.
        None => (now_ms, "-at"),
    };
    let mut fields = Map::new();
    fields.insert("user".into(), Value::String(change.user.to_string()));
    fields.insert("presence".into(), Value::String(presence.into()));
    if let Some(team) = &change.team {
        fields.insert("team".into(), Value::String(team.to_string()));
    }
    fields.insert("time_ms".into(), Value::from(since));
    Event {
        id: format!("pc-{}-{presence}{origin}-{since}", change.user),
        name: PRESENCE_CHANGED,
        key: change.user.to_string(),
        fields,
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::{TeamId, UserId};
    use serde_json::json;

    use super::*;

    fn change(active: bool, since_ms: Option<u64>) -> Change {
        Change {
            user: UserId::new("U1").unwrap(),
            active,
            team: Some(TeamId::new("T1").unwrap()),
            since_ms,
        }
    }

    #[test]
    fn the_same_fact_has_the_same_id_and_a_servers_own_fact_its_time() {
        let a = presence_changed(&change(true, Some(5)), 100);
        let again = presence_changed(&change(true, Some(5)), 999);
        assert_eq!(a.id, again.id, "re-announced later, by another server");
        assert_eq!(a.key, "U1");
        let v: serde_json::Value = serde_json::from_str(&a.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"id": a.id, "name": "presence_changed", "user": "U1", "presence": "active",
                   "team": "T1", "time_ms": 5})
        );
        let away = presence_changed(&change(false, None), 100);
        assert_eq!(away.fields["time_ms"], json!(100));
        assert_ne!(away.id, presence_changed(&change(false, Some(100)), 100).id);
        assert_ne!(away.id, presence_changed(&change(false, None), 101).id);
    }
}
