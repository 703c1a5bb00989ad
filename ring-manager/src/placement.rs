//! Ring changes the ring manager builds beyond those of `mesh_core::Ring`, for adding a node
//! to a replicated ring without losing anything: the node first joins owning nothing
//! ([`joined`]), so that the next ring gives it follower places to fill, and once its copies
//! are filled it takes its fair share of primaries on slots it follows ([`lead_followed`]).
//!
//! Both return a ring without followers, like `Ring::rebalanced`: the caller places them with
//! `Ring::with_followers` (`Membership::publish` does).

use mesh_core::{NodeId, Ring, RingNode, SLOT_COUNT, Slot};

/// The next epoch's ring with `node` added, owning nothing; `None` if it is already on the
/// ring or the ring has no owner.
pub fn joined(ring: &Ring, node: RingNode) -> Option<Ring> {
    if ring.nodes().is_empty() || ring.nodes().iter().any(|n| n.id == node.id) {
        return None;
    }
    let mut nodes = ring.nodes().to_vec();
    nodes.push(node);
    let owners = ring.owners().collect();
    Ring::from_parts(ring.epoch() + 1, nodes, owners)
        .ok()
        .map(|next| next.with_generation(ring.generation()))
}

/// The next epoch's ring in which `node` (on the ring) owns its fair share of slots, taken
/// from the nodes above their share — first among the slots `node` follows (it holds their
/// history), then the highest-numbered others. Shares are as in `Ring::rebalanced`: every node
/// `SLOT_COUNT / n` or one more (the extra ones to the nodes holding the most already, never
/// to `node`). `None` if `node` is not on the ring or would gain nothing.
pub fn lead_followed(ring: &Ring, node: &NodeId) -> Option<Ring> {
    let nodes = ring.nodes();
    let me = nodes.iter().position(|n| &n.id == node)?;
    let n = nodes.len();
    let mut owners: Vec<u32> = ring.owners().collect();
    if owners.len() != SLOT_COUNT {
        return None;
    }
    let mut held = vec![0usize; n];
    for &o in &owners {
        held[o as usize] += 1;
    }
    let (base, extra) = (SLOT_COUNT / n, SLOT_COUNT % n);
    let mut order: Vec<usize> = (0..n).filter(|&i| i != me).collect();
    order.sort_by(|&a, &b| held[b].cmp(&held[a]).then(a.cmp(&b)));
    let mut quota = vec![base; n];
    for &i in order.iter().take(extra) {
        quota[i] += 1;
    }
    if held[me] >= quota[me] {
        return None;
    }
    // Followed slots first, each group in slot order; then the others from the top.
    let followed = (0..SLOT_COUNT as Slot).filter(|&s| ring.follows(node, s));
    let others = (0..SLOT_COUNT as Slot)
        .rev()
        .filter(|&s| !ring.follows(node, s));
    for slot in followed.chain(others) {
        if held[me] >= quota[me] {
            break;
        }
        let owner = owners[usize::from(slot)] as usize;
        if owner != me && held[owner] > quota[owner] {
            owners[usize::from(slot)] = me as u32;
            held[owner] -= 1;
            held[me] += 1;
        }
    }
    Ring::from_parts(ring.epoch() + 1, nodes.to_vec(), owners)
        .ok()
        .map(|next| next.with_generation(ring.generation()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> RingNode {
        RingNode {
            id: NodeId::new(id).unwrap(),
            addr: format!("{id}:1"),
        }
    }

    #[test]
    fn a_joined_node_owns_nothing_then_leads_its_share_on_slots_it_follows() {
        let three = Ring::empty()
            .with_generation(9)
            .rebalanced(&[node("a"), node("b"), node("c")]);
        let three = three.clone().with_followers(&three, 2);
        let join = joined(&three, node("d")).unwrap();
        assert_eq!(join.epoch(), three.epoch() + 1);
        assert_eq!(join.generation(), 9);
        assert_eq!(join.slots_owned(&node("d").id), 0);
        assert!(
            (0..SLOT_COUNT as Slot).all(|s| join.owner(s) == three.owner(s)),
            "no slot moves when it joins"
        );
        assert!(joined(&join, node("d")).is_none(), "already on the ring");
        assert!(joined(&Ring::empty(), node("d")).is_none());
        let following = join.with_followers(&three, 2);
        let d = node("d").id;
        let followed = following.slots_followed(&d);
        assert!(followed >= SLOT_COUNT / 4, "{followed}");
        let lead = lead_followed(&following, &d).unwrap();
        assert_eq!(lead.slots_owned(&d), SLOT_COUNT / 4);
        for s in 0..SLOT_COUNT as Slot {
            if lead.owns(&d, s) {
                assert!(
                    following.follows(&d, s),
                    "slot {s}: d leads only slots it followed"
                );
            } else {
                assert_eq!(lead.owner(s), following.owner(s), "slot {s} stays");
            }
        }
        for other in ["a", "b", "c"] {
            let owned = lead.slots_owned(&node(other).id);
            assert!(owned.abs_diff(SLOT_COUNT / 4) <= 1, "{other}: {owned}");
        }
        assert!(lead_followed(&lead, &d).is_none(), "it has its share");
        assert!(lead_followed(&lead, &node("zz").id).is_none());
    }

    #[test]
    fn a_node_following_too_few_slots_takes_the_rest_from_the_top() {
        // Nobody follows: every slot d takes comes from the fullest nodes' highest slots.
        let two = Ring::empty().rebalanced(&[node("a"), node("b")]);
        let join = joined(&two, node("d")).unwrap();
        let d = node("d").id;
        let lead = lead_followed(&join, &d).unwrap();
        assert_eq!(lead.slots_owned(&d), SLOT_COUNT / 3);
        let total: usize = ["a", "b", "d"]
            .iter()
            .map(|n| lead.slots_owned(&node(n).id))
            .sum();
        assert_eq!(total, SLOT_COUNT);
    }
}
