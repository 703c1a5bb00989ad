//! Conversions between the ring's protobuf form and [`mesh_core::Ring`]: the only place that
//! knows both.

use mesh_core::{NodeId, Ring, RingNode};
use mesh_proto::ring as pb;

use crate::Error;

/// The protobuf form of `ring`, with each node's state and pid from `info`.
pub fn ring_to_proto(ring: &Ring, info: impl Fn(&NodeId) -> (String, u32)) -> pb::Ring {
    pb::Ring {
        epoch: ring.epoch(),
        nodes: ring
            .nodes()
            .iter()
            .map(|n| {
                let (state, pid) = info(&n.id);
                pb::Node {
                    id: n.id.to_string(),
                    addr: n.addr.clone(),
                    state,
                    pid,
                }
            })
            .collect(),
        slot_owner: ring.owners().collect(),
    }
}

/// The ring a protobuf message describes, checked.
pub fn ring_from_proto(ring: pb::Ring) -> Result<Ring, Error> {
    let nodes = ring
        .nodes
        .into_iter()
        .map(|n| {
            Ok(RingNode {
                id: NodeId::new(&n.id).map_err(|e| Error::InvalidRing(e.to_string()))?,
                addr: n.addr,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ring::from_parts(ring.epoch, nodes, ring.slot_owner)
        .map_err(|e| Error::InvalidRing(e.to_string()))
}
