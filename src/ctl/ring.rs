//! `ctl ring`, `ctl owner` and the node operations (`drain-node`, `replace-node`,
//! `add-node`): the ring as the ring manager serves it.

use anyhow::Context;
use mesh_core::{ChannelId, slot_of};
use mesh_proto::ring::ring_manager_client::RingManagerClient;
use mesh_proto::ring::{GetRingRequest, NodeRequest, Ring};
use serde::Serialize;
use tonic::transport::Channel;

/// A node as `ctl ring --json` prints it.
#[derive(Debug, Serialize)]
pub struct NodeView {
    pub id: String,
    pub addr: String,
    pub state: String,
    pub slots: u32,
    pub pid: u32,
    /// Its share of replication.
    pub replicas: Replicas,
}

/// A node's share of replication, as `ctl ring --json` prints it.
#[derive(Debug, Serialize)]
pub struct Replicas {
    /// Slots it owns (leads).
    pub led: u32,
    /// Slots it follows (holds a copy of, for their owners).
    pub followed: u32,
    /// Followed slots its last heartbeat reported as still being filled.
    pub catching_up: u32,
}

/// The ring as `ctl ring --json` prints it.
#[derive(Debug, Serialize)]
pub struct RingView {
    pub epoch: u64,
    pub nodes: Vec<NodeView>,
}

/// A channel's owner as `ctl owner --json` prints it.
#[derive(Debug, Serialize)]
pub struct OwnerView {
    pub channel: String,
    pub slot: u16,
    pub node: String,
    pub addr: String,
}

/// A ring manager client for `endpoint`, giving up after 3 s.
pub(super) async fn connect(endpoint: &str) -> anyhow::Result<RingManagerClient<Channel>> {
    let channel = mesh_transport::endpoint(endpoint)?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("connecting to the ring manager at {endpoint}"))?;
    Ok(RingManagerClient::new(channel))
}

/// Every registered node with its state and slot count.
pub fn ring_view(ring: &Ring) -> RingView {
    RingView {
        epoch: ring.epoch,
        nodes: ring
            .members
            .iter()
            .map(|m| NodeView {
                id: m.id.clone(),
                addr: m.addr.clone(),
                state: m.state.clone(),
                slots: m.slots,
                pid: m.pid,
                replicas: Replicas {
                    led: m.slots,
                    followed: m.slots_followed,
                    catching_up: m.catching_up,
                },
            })
            .collect(),
    }
}

fn print_ring(view: &RingView) {
    println!("ring epoch {}", view.epoch);
    println!(
        "{:<12} {:<9} {:>6} {:>8} {:>9} {:>8}  ADDR",
        "NODE", "STATE", "SLOTS", "PID", "FOLLOWED", "CATCHUP"
    );
    for n in &view.nodes {
        println!(
            "{:<12} {:<9} {:>6} {:>8} {:>9} {:>8}  {}",
            n.id, n.state, n.slots, n.pid, n.replicas.followed, n.replicas.catching_up, n.addr
        );
    }
}

fn emit(view: &RingView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(view)?);
    } else {
        print_ring(view);
    }
    Ok(())
}

/// `ctl ring`.
pub async fn ring(endpoint: &str, json: bool) -> anyhow::Result<()> {
    let ring = connect(endpoint)
        .await?
        .get_ring(GetRingRequest {})
        .await?
        .into_inner();
    emit(&ring_view(&ring), json)
}

/// `ctl owner <channel>`.
pub async fn owner(endpoint: &str, channel: &str, json: bool) -> anyhow::Result<()> {
    let id = ChannelId::new(channel)?;
    let proto = connect(endpoint)
        .await?
        .get_ring(GetRingRequest {})
        .await?
        .into_inner();
    let ring = ring_client::convert::ring_from_proto(proto)?;
    let slot = slot_of(&id);
    let node = ring.owner(slot).with_context(|| {
        format!(
            "no channel server owns slot {slot} (epoch {})",
            ring.epoch()
        )
    })?;
    let view = OwnerView {
        channel: channel.to_string(),
        slot,
        node: node.id.to_string(),
        addr: node.addr.clone(),
    };
    if json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        println!(
            "channel {} -> slot {} -> {} ({}) in epoch {}",
            view.channel,
            view.slot,
            view.node,
            view.addr,
            ring.epoch()
        );
    }
    Ok(())
}

/// The node operations.
#[derive(Debug, Clone, Copy)]
pub enum NodeOp {
    Drain,
    Replace,
    Add,
}

/// `ctl drain-node`, `ctl replace-node`, `ctl add-node`.
pub async fn node_op(
    endpoint: &str,
    op: NodeOp,
    node: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connect(endpoint).await?;
    let before = client.get_ring(GetRingRequest {}).await?.into_inner();
    let request = NodeRequest {
        node_id: node.unwrap_or_default().to_string(),
    };
    let after = match op {
        NodeOp::Drain => client.drain_node(request).await,
        NodeOp::Replace => client.replace_node(request).await,
        NodeOp::Add => client.add_node(request).await,
    }
    .map_err(|status| anyhow::anyhow!("{}", status.message()))?
    .into_inner();
    let moved = after
        .slot_owner
        .iter()
        .zip(&before.slot_owner)
        .filter(|(a, b)| {
            after.nodes.get(**a as usize).map(|n| &n.id)
                != before.nodes.get(**b as usize).map(|n| &n.id)
        })
        .count();
    if !json {
        let verb = match op {
            NodeOp::Drain => "drained",
            NodeOp::Replace => "replaced",
            NodeOp::Add => "added",
        };
        println!(
            "{verb} {}: epoch {} -> {}, {moved} of {} slots moved",
            node.unwrap_or("a standby"),
            before.epoch,
            after.epoch,
            after.slot_owner.len()
        );
    }
    emit(&ring_view(&after), json)
}
