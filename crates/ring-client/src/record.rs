//! The ring record: the ring and its members as the ring manager saves them — in its state file
//! (embedded backend) and in Consul KV (Consul backend), where every service reads it.

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

/// Everything the ring manager needs to resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub epoch: u64,
    /// (id, addr) of each slot owner, in the ring's order.
    pub nodes: Vec<(String, String)>,
    /// Index into `nodes` per slot.
    pub slot_owner: Vec<u32>,
    pub members: Vec<SavedMember>,
    pub next_incarnation: u64,
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
        Ring::from_parts(self.epoch, nodes, self.slot_owner.clone()).map_err(|e| e.to_string())
    }

    /// The parts of `ring` to save.
    pub fn ring_parts(ring: &Ring) -> (u64, Vec<(String, String)>, Vec<u32>) {
        (
            ring.epoch(),
            ring.nodes()
                .iter()
                .map(|n| (n.id.to_string(), n.addr.clone()))
                .collect(),
            ring.owners().collect(),
        )
    }
}
