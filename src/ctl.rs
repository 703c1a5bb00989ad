//! `channelmesh ctl`: SRE operations against the ring manager.

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

async fn connect(endpoint: &str) -> anyhow::Result<RingManagerClient<Channel>> {
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
            })
            .collect(),
    }
}

fn print_ring(view: &RingView) {
    println!("ring epoch {}", view.epoch);
    println!(
        "{:<12} {:<9} {:>6} {:>8}  ADDR",
        "NODE", "STATE", "SLOTS", "PID"
    );
    for n in &view.nodes {
        println!(
            "{:<12} {:<9} {:>6} {:>8}  {}",
            n.id, n.state, n.slots, n.pid, n.addr
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

/// A region as `ctl regions --json` prints it.
#[derive(Debug, Serialize)]
pub struct RegionJson {
    pub region: String,
    pub draining: bool,
    pub rate: u32,
    pub connections: u64,
    pub nearest: Vec<String>,
    pub gateways: Vec<GatewayJson>,
}

/// A gateway as `ctl regions --json` prints it.
#[derive(Debug, Serialize)]
pub struct GatewayJson {
    pub id: String,
    pub url: String,
    pub connections: u64,
    pub last_seen_ms: u64,
}

fn regions_json(view: mesh_proto::ring::RegionsView) -> Vec<RegionJson> {
    view.regions
        .into_iter()
        .map(|r| RegionJson {
            region: r.region,
            draining: r.draining,
            rate: r.rate,
            connections: r.connections,
            nearest: r.nearest,
            gateways: r
                .gateways
                .into_iter()
                .map(|g| GatewayJson {
                    id: g.id,
                    url: g.url,
                    connections: g.connections,
                    last_seen_ms: g.last_seen_ms,
                })
                .collect(),
        })
        .collect()
}

fn print_regions(regions: &[RegionJson], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(regions)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<14} {:>11}  {:<20} GATEWAYS",
        "REGION", "STATE", "CONNECTIONS", "NEAREST"
    );
    for r in regions {
        let state = if r.draining {
            format!("draining {}/s", r.rate)
        } else {
            "serving".to_string()
        };
        let gateways: Vec<String> = r
            .gateways
            .iter()
            .map(|g| format!("{} ({})", g.id, g.connections))
            .collect();
        println!(
            "{:<10} {:<14} {:>11}  {:<20} {}",
            r.region,
            state,
            r.connections,
            r.nearest.join(","),
            gateways.join(" ")
        );
    }
    Ok(())
}

/// `ctl regions`.
pub async fn regions(endpoint: &str, json: bool) -> anyhow::Result<()> {
    let view = connect(endpoint)
        .await?
        .regions(mesh_proto::ring::RegionsRequest {})
        .await?
        .into_inner();
    print_regions(&regions_json(view), json)
}

/// `ctl drain-region` (`drain`) and `ctl undrain-region`.
pub async fn region_op(
    endpoint: &str,
    region: &str,
    drain: bool,
    rate: u32,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connect(endpoint).await?;
    let request = mesh_proto::ring::DrainRegionRequest {
        region: region.to_string(),
        rate,
    };
    let view = if drain {
        client.drain_region(request).await
    } else {
        client.undrain_region(request).await
    }
    .map_err(|status| anyhow::anyhow!("{}", status.message()))?
    .into_inner();
    if !json {
        let verb = if drain { "draining" } else { "undrained" };
        println!("{verb} {region}");
    }
    print_regions(&regions_json(view), json)
}

/// How long `ctl top` waits for the console to answer.
const TOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Recent epochs `ctl top` lists.
const TOP_EPOCHS: usize = 8;

/// `ctl top`: the console's numbers in the terminal, redrawn every `every` until `cancel`
/// (or printed once). Reads `CONSOLE/api/state`.
pub async fn top(
    console: &str,
    once: bool,
    json: bool,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let url = format!("{}/api/state", console.trim_end_matches('/'));
    let client = reqwest::Client::builder().timeout(TOP_TIMEOUT).build()?;
    loop {
        let fetched = fetch_state(&client, &url).await;
        if once {
            let snapshot = fetched?;
            if json {
                println!("{}", serde_json::to_string(&snapshot)?);
            } else {
                print!("{}", render_top(&snapshot));
            }
            return Ok(());
        }
        match fetched {
            // One JSON line per refresh, for scripts that follow it.
            Ok(snapshot) if json => println!("{}", serde_json::to_string(&snapshot)?),
            // Home the cursor and clear the screen, then draw.
            Ok(snapshot) => print!("\x1b[H\x1b[2J{}", render_top(&snapshot)),
            Err(e) if json => eprintln!("{e:#}"),
            Err(e) => print!("\x1b[H\x1b[2J{e:#}\n(retrying every {every:?})\n"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn fetch_state(
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<ring_manager::console::Snapshot> {
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("reading the ring manager console at {url}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    response
        .json()
        .await
        .with_context(|| format!("{url} did not answer a console snapshot"))
}

/// Unix milliseconds as `HH:MM:SS` UTC.
fn clock(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// What `ctl top` draws: the epoch, every node, every region, the recent epochs.
pub fn render_top(s: &ring_manager::console::Snapshot) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let ready = if s.ready { "" } else { ", not ready" };
    let _ = writeln!(
        out,
        "ring manager ({}{ready})  epoch {}  {} slots  at {} UTC",
        s.role,
        s.epoch,
        s.slot_count,
        clock(s.at_ms)
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<12} {:<9} {:>6} {:>7} {:>10} {:>8}  ADDR",
        "NODE", "STATE", "SLOTS", "SHARE", "HEARTBEAT", "PID"
    );
    for n in &s.nodes {
        let share = 100.0 * n.slots as f64 / s.slot_count.max(1) as f64;
        let _ = writeln!(
            out,
            "{:<12} {:<9} {:>6} {:>6.1}% {:>7} ms {:>8}  {}",
            n.id, n.state, n.slots, share, n.heartbeat_ms, n.pid, n.addr
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<10} {:<14} {:>11}  GATEWAYS",
        "REGION", "STATE", "CONNECTIONS"
    );
    for r in &s.regions {
        let state = if r.draining {
            format!("draining {}/s", r.rate)
        } else {
            "serving".to_string()
        };
        let gateways: Vec<String> = r
            .gateways
            .iter()
            .map(|g| {
                let stale = if g.stale { ", stale" } else { "" };
                format!("{} ({}{stale})", g.id, g.connections)
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<10} {:<14} {:>11}  {}",
            r.region,
            state,
            r.connections,
            gateways.join(" ")
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "RECENT EPOCHS");
    for e in s.epochs.iter().take(TOP_EPOCHS) {
        let moves: Vec<String> = e
            .moves
            .iter()
            .map(|m| {
                let from = m.from.as_deref().unwrap_or("-");
                let to = m.to.as_deref().unwrap_or("-");
                format!("{from}->{to} {}", m.slots)
            })
            .collect();
        let _ = writeln!(
            out,
            "{:>6}  {}  {:>5} moved  {}  [{}]",
            e.epoch,
            clock(e.at_ms),
            e.moved,
            e.cause,
            moves.join(", ")
        );
    }
    out
}
