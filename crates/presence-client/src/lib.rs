//! Asking presence servers: routing users to their owners on the presence ring, over pooled
//! channels ([`Pool`]).

mod pool;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use mesh_core::{ChannelId, NodeId, Ring, TeamId, UserId};
use mesh_proto::presence as pb;
use mesh_proto::presence::presence_client::PresenceClient;

pub use pool::{IDLE, MAX_CHANNELS, Pool};

/// How long one query to a presence server may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Presence servers asked at once.
const PARALLEL: usize = 16;

/// A user's presence as their presence server answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub user: UserId,
    pub active: bool,
    /// The user's team as last reported with their connections; `None` when the server does
    /// not know it (or could not be asked).
    pub team: Option<TeamId>,
    /// Whether a presence server answered for the user. `false`: none could be asked in time
    /// (none owns the user yet, or the owner did not answer), and `active: false` is a guess,
    /// not an answer; a caller that must not guess reports the lookup as unavailable.
    pub answered: bool,
}

impl Presence {
    /// The answer `p` of a presence server; `None` when its user id does not parse. A team
    /// that is empty or does not parse is no team.
    pub fn from_proto(p: pb::UserPresence) -> Option<Self> {
        Some(Presence {
            user: UserId::new(&p.user).ok()?,
            active: p.active,
            team: TeamId::new(&p.team).ok(),
            answered: true,
        })
    }

    /// Away, team unknown, unanswered: what is said of a user nobody could answer for.
    fn unknown(user: UserId) -> Self {
        Presence {
            user,
            active: false,
            team: None,
            answered: false,
        }
    }
}

/// The presence server that owns `user` under `ring`: its id and address.
pub fn owner(ring: &Ring, user: &UserId) -> Option<(NodeId, String)> {
    owner_of(ring, &ChannelId::from(user))
}

/// The presence server that owns `key` under `ring` (a user's channel for the user's
/// presence, a team's channel for the team's connection count).
pub fn owner_of(ring: &Ring, key: &ChannelId) -> Option<(NodeId, String)> {
    ring.owner_of(key).map(|n| (n.id.clone(), n.addr.clone()))
}

/// The presence of `ids` under `ring`, in the order asked, one query per presence server over
/// `pool`'s channels; a user nobody could answer in time for is away, team unknown.
pub async fn lookup(pool: &Pool, ring: &Ring, ids: &[UserId]) -> Vec<Presence> {
    let mut by_owner: HashMap<String, Vec<UserId>> = HashMap::new();
    for user in ids {
        if let Some((_, addr)) = owner(ring, user) {
            by_owner.entry(addr).or_default().push(user.clone());
        }
    }
    let queries = by_owner.into_iter().map(|(addr, users)| async move {
        let ask = async {
            let channel = pool.channel(&addr).ok()?;
            let request = pb::QueryRequest {
                users: users.iter().map(ToString::to_string).collect(),
            };
            PresenceClient::new(channel).query(request).await.ok()
        };
        match tokio::time::timeout(CALL_TIMEOUT, ask).await {
            Ok(Some(reply)) => reply
                .into_inner()
                .users
                .into_iter()
                .filter_map(Presence::from_proto)
                .collect(),
            _ => users.into_iter().map(Presence::unknown).collect::<Vec<_>>(),
        }
    });
    let answers: Vec<Vec<Presence>> = futures::stream::iter(queries)
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut known: HashMap<UserId, Presence> = answers
        .into_iter()
        .flatten()
        .map(|p| (p.user.clone(), p))
        .collect();
    ids.iter()
        .map(|u| {
            known
                .remove(u)
                .unwrap_or_else(|| Presence::unknown(u.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use mesh_core::RingNode;

    use super::*;

    fn ring(addrs: &[(&str, &str)]) -> Ring {
        let nodes: Vec<RingNode> = addrs
            .iter()
            .map(|(id, addr)| RingNode {
                id: NodeId::new(id).unwrap(),
                addr: addr.to_string(),
            })
            .collect();
        Ring::empty().rebalanced(&nodes)
    }

    fn users(n: usize) -> Vec<UserId> {
        (0..n)
            .map(|i| UserId::new(&format!("U{i}")).unwrap())
            .collect()
    }

    #[test]
    fn a_user_is_owned_by_the_owner_of_their_own_channel() {
        let ring = ring(&[("ps-1", "10.0.0.1:7101"), ("ps-2", "10.0.0.2:7101")]);
        let mut owners = std::collections::HashSet::new();
        for user in users(64) {
            let (id, addr) = owner(&ring, &user).unwrap();
            let node = ring.owner_of(&ChannelId::from(&user)).unwrap();
            assert_eq!((&id, &addr), (&node.id, &node.addr), "{user}");
            owners.insert(id);
        }
        assert_eq!(owners.len(), 2, "64 users spread over both servers");
    }

    #[test]
    fn a_team_is_owned_by_the_owner_of_its_channel() {
        let ring = ring(&[("ps-1", "10.0.0.1:7101"), ("ps-2", "10.0.0.2:7101")]);
        let team = ChannelId::from(&TeamId::new("T1").unwrap());
        let node = ring.owner_of(&team).unwrap();
        assert_eq!(
            owner_of(&ring, &team),
            Some((node.id.clone(), node.addr.clone()))
        );
    }

    #[test]
    fn an_answer_without_a_valid_team_has_none() {
        let answer = |user: &str, team: &str| {
            Presence::from_proto(pb::UserPresence {
                user: user.into(),
                active: true,
                team: team.into(),
            })
        };
        let team = answer("U1", "T1").and_then(|p| p.team);
        assert_eq!(team.as_ref().map(TeamId::as_str), Some("T1"));
        assert_eq!(answer("U1", "").and_then(|p| p.team), None);
        assert_eq!(answer("U1", "not a team").and_then(|p| p.team), None);
        assert_eq!(answer("not a user", "T1"), None);
    }

    #[test]
    fn nobody_owns_anything_on_an_empty_ring() {
        assert_eq!(owner(&Ring::empty(), &users(1)[0]), None);
    }

    #[tokio::test]
    async fn users_nobody_can_answer_for_are_unanswered_in_the_order_asked() {
        let ids = users(5);
        let expected: Vec<Presence> = ids.iter().cloned().map(Presence::unknown).collect();
        assert!(
            expected
                .iter()
                .all(|p| !p.answered && !p.active && p.team.is_none())
        );
        let pool = Pool::new();
        // No presence server at all.
        assert_eq!(lookup(&pool, &Ring::empty(), &ids).await, expected);
        // Presence servers that do not answer (nothing listens on port 1).
        let unreachable = ring(&[("ps-1", "127.0.0.1:1"), ("ps-2", "127.0.0.1:1")]);
        assert_eq!(lookup(&pool, &unreachable, &ids).await, expected);
    }
}
