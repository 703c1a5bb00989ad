//! Conversions between the ring's protobuf form and [`mesh_core::Ring`]: the only place that
//! knows both.

use mesh_core::{Handoff, NodeId, Ring, RingNode};
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
        members: Vec::new(),
        handoffs: ring
            .handoffs()
            .iter()
            .map(|h| pb::Handoff {
                from_node: h.from.to_string(),
                to_node: h.to.to_string(),
            })
            .collect(),
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
    let bad = |e: mesh_core::IdError| Error::InvalidRing(e.to_string());
    let handoffs = ring
        .handoffs
        .iter()
        .map(|h| {
            Ok(Handoff {
                from: NodeId::new(&h.from_node).map_err(bad)?,
                to: NodeId::new(&h.to_node).map_err(bad)?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Ring::from_parts(ring.epoch, nodes, ring.slot_owner)
        .map_err(|e| Error::InvalidRing(e.to_string()))?
        .with_handoffs(handoffs))
}
