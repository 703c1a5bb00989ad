//! Conversions between the ring's protobuf form and [`mesh_core::Ring`]: the only place that
//! knows both.

use mesh_core::{Handoff, NodeId, Ring, RingNode};
use mesh_proto::ring as pb;

use crate::Error;

/// The protobuf form of `ring`, with each node's state and pid from `info`.
pub fn ring_to_proto(ring: &Ring, info: impl Fn(&NodeId) -> (String, u32)) -> pb::Ring {
    pb::Ring {
        generation: ring.generation(),
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
        slot_followers: ring
            .follower_parts()
            .into_iter()
            .map(|nodes| pb::SlotFollowers { nodes })
            .collect(),
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
    let followers = ring.slot_followers.into_iter().map(|f| f.nodes).collect();
    Ok(
        Ring::from_replicated_parts(ring.epoch, nodes, ring.slot_owner, followers)
            .map_err(|e| Error::InvalidRing(e.to_string()))?
            .with_generation(ring.generation)
            .with_handoffs(handoffs),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> RingNode {
        RingNode {
            id: NodeId::new(id).unwrap(),
            addr: format!("{id}.internal:7001"),
        }
    }

    fn ring() -> Ring {
        let before = Ring::empty().rebalanced(&[node("cs-1"), node("cs-2")]);
        let after = before
            .rebalanced(&[node("cs-1"), node("cs-2"), node("cs-3")])
            .with_followers(&before, 2);
        let moves = after.moves_from(&before);
        after.with_handoffs(moves).with_generation(0x5eed)
    }

    #[test]
    fn a_ring_round_trips_through_its_protobuf_form() {
        let ring = ring();
        assert!(!ring.handoffs().is_empty(), "the test ring has handoffs");
        assert!(ring.is_replicated(), "the test ring has followers");
        let proto = ring_to_proto(&ring, |_| (String::new(), 0));
        assert_eq!(proto.generation, 0x5eed);
        let back = ring_from_proto(proto).unwrap();
        assert_eq!(back, ring);
        assert_eq!(back.generation(), 0x5eed);
    }

    #[test]
    fn each_node_carries_its_state_and_pid() {
        let proto = ring_to_proto(&ring(), |id| {
            let pid = id.as_str().trim_start_matches("cs-").parse().unwrap();
            (format!("state of {id}"), pid)
        });
        assert_eq!(proto.nodes.len(), 3);
        for n in &proto.nodes {
            assert_eq!(n.state, format!("state of {}", n.id));
            assert_eq!(n.pid.to_string(), n.id.trim_start_matches("cs-"));
        }
        assert!(proto.members.is_empty(), "members are the server's to add");
        assert_eq!(proto.slot_owner.len(), mesh_core::SLOT_COUNT);
    }

    #[test]
    fn invalid_ids_and_shapes_are_refused() {
        let good = ring_to_proto(&ring(), |_| (String::new(), 0));
        let invalid =
            |proto: pb::Ring| matches!(ring_from_proto(proto), Err(Error::InvalidRing(_)));

        let mut bad_node = good.clone();
        bad_node.nodes[0].id = "cs 1".into();
        assert!(invalid(bad_node), "a node id with a space");
        let mut bad_from = good.clone();
        bad_from.handoffs[0].from_node = String::new();
        assert!(invalid(bad_from), "an empty handoff source");
        let mut bad_to = good.clone();
        bad_to.handoffs[0].to_node = "to/where".into();
        assert!(invalid(bad_to), "a bad handoff target");
        let mut short = good.clone();
        short.slot_owner.pop();
        assert!(invalid(short), "a slot short");
        let mut past = good.clone();
        past.slot_owner[0] = 9;
        assert!(invalid(past), "an owner past the nodes");
        let mut own_follower = good.clone();
        own_follower.slot_followers[0].nodes = vec![good.slot_owner[0]];
        assert!(invalid(own_follower), "an owner following its own slot");
        let mut few = good;
        few.slot_followers.pop();
        assert!(invalid(few), "followers for a slot short");
    }

    #[test]
    fn the_empty_ring_round_trips() {
        let proto = ring_to_proto(&Ring::empty(), |_| (String::new(), 0));
        assert_eq!(ring_from_proto(proto).unwrap(), Ring::empty());
    }
}
