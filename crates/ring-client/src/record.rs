//! The ring record: the ring and its members as the ring manager saves them — in its state file
//! (embedded backend) and in Consul KV (Consul backend), where every service reads it — with
//! the ring's generation, the regions draining and the revoked tokens.
//!
//! Fields added since the first format have defaults, so older state files and records still
//! load: no generation (0; the ring manager resuming one starts a generation and saves it), no
//! drains, no revocations.

use mesh_core::{NodeId, Ring, RingNode};
use serde::{Deserialize, Serialize};

/// One member as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMember {
    pub id: String,
    pub addr: String,
    pub pid: u32,
    pub state: String,
    pub incarnation: u64,
}

/// A region draining, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDrain {
    pub region: String,
    /// Goodbyes per second per gateway.
    pub rate: u32,
}

/// A revoked token, as saved: its `jti` and when the token expires (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRevocation {
    pub jti: String,
    pub expires_at: u64,
}

/// A ring as saved: epoch, (id, addr) per node, owner index per slot, follower indexes per slot.
pub type RingParts = (u64, Vec<(String, String)>, Vec<u32>, Vec<Vec<u32>>);

/// Everything the ring manager needs to resume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The ring history ([`Ring::generation`]); 0 in records of older ring managers.
    #[serde(default)]
    pub generation: u64,
    pub epoch: u64,
    /// (id, addr) of each slot owner, in the ring's order.
    pub nodes: Vec<(String, String)>,
    /// Index into `nodes` per slot.
    pub slot_owner: Vec<u32>,
    /// Indexes into `nodes` of each slot's followers (empty: none; records of older ring
    /// managers have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slot_followers: Vec<Vec<u32>>,
    pub members: Vec<SavedMember>,
    pub next_incarnation: u64,
    /// Regions draining, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining_regions: Vec<SavedDrain>,
    /// Revoked tokens not yet expired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<SavedRevocation>,
}

impl Saved {
    /// The saved ring.
    pub fn ring(&self) -> Result<Ring, String> {
        let nodes = self
            .nodes
            .iter()
            .map(|(id, addr)| {
                Ok(RingNode {
                    id: NodeId::new(id).map_err(|e| e.to_string())?,
                    addr: addr.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ring::from_replicated_parts(
            self.epoch,
            nodes,
            self.slot_owner.clone(),
            self.slot_followers.clone(),
        )
        .map(|ring| ring.with_generation(self.generation))
        .map_err(|e| e.to_string())
    }

    /// The parts of `ring` to save (its generation is saved on its own): epoch, nodes, owner
    /// and followers per slot.
    pub fn ring_parts(ring: &Ring) -> RingParts {
        (
            ring.epoch(),
            ring.nodes()
                .iter()
                .map(|n| (n.id.to_string(), n.addr.clone()))
                .collect(),
            ring.owners().collect(),
            ring.follower_parts(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Ring {
        let node = |id: &str, addr: &str| RingNode {
            id: NodeId::new(id).unwrap(),
            addr: addr.into(),
        };
        Ring::empty()
            .rebalanced(&[node("cs-1", "10.0.0.1:7001"), node("cs-2", "10.0.0.2:7001")])
            .rebalanced(&[
                node("cs-1", "10.0.0.1:7001"),
                node("cs-2", "10.0.0.2:7001"),
                node("cs-3", "10.0.0.3:7001"),
            ])
            .with_generation(0xfeed)
    }

    fn saved(ring: &Ring) -> Saved {
        let (epoch, nodes, slot_owner, slot_followers) = Saved::ring_parts(ring);
        Saved {
            generation: ring.generation(),
            epoch,
            nodes,
            slot_owner,
            slot_followers,
            members: Vec::new(),
            next_incarnation: 1,
            ..Saved::default()
        }
    }

    #[test]
    fn a_saved_ring_comes_back_the_same() {
        let ring = ring();
        let back = saved(&ring).ring().unwrap();
        assert_eq!(back.epoch(), 2);
        assert_eq!(back.generation(), 0xfeed);
        assert!(back.same_assignment(&ring));
        assert_eq!(back.nodes(), ring.nodes());
    }

    #[test]
    fn a_saved_record_round_trips_through_json() {
        let mut record = saved(&ring());
        record.members.push(SavedMember {
            id: "cs-1".into(),
            addr: "10.0.0.1:7001".into(),
            pid: 42,
            state: "active".into(),
            incarnation: 3,
        });
        record.draining_regions.push(SavedDrain {
            region: "us-east".into(),
            rate: 50,
        });
        record.revoked.push(SavedRevocation {
            jti: "j-1".into(),
            expires_at: 2_000_000_000,
        });
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<Saved>(&json).unwrap(), record);
    }

    #[test]
    fn a_record_of_the_first_format_loads_with_no_generation_drains_or_revocations() {
        let mut json = serde_json::to_value(saved(&ring())).unwrap();
        let object = json.as_object_mut().unwrap();
        for added in ["generation", "draining_regions", "revoked"] {
            object.remove(added);
        }
        let old: Saved = serde_json::from_value(json).unwrap();
        assert_eq!(old.generation, 0);
        assert!(old.draining_regions.is_empty() && old.revoked.is_empty());
        let ring = old.ring().unwrap();
        assert_eq!((ring.generation(), ring.epoch()), (0, 2));
    }

    #[test]
    fn a_bad_record_is_refused() {
        let good = saved(&ring());
        let mut short = good.clone();
        short.slot_owner.truncate(10);
        assert!(short.ring().is_err(), "too few slots");
        let mut bad_owner = good.clone();
        bad_owner.slot_owner[0] = 3;
        assert!(bad_owner.ring().is_err(), "an owner index past the nodes");
        let mut bad_id = good.clone();
        bad_id.nodes[1].0 = "cs 2".into();
        assert!(bad_id.ring().is_err(), "an invalid node id");
        let mut twice = good;
        twice.nodes[1].0 = "cs-1".into();
        assert!(twice.ring().is_err(), "the same node twice");
    }
}
