//! `ctl regions`, `ctl drain-region` and `ctl undrain-region`: the regions as the ring manager
//! reports them.

use serde::Serialize;

use super::ring::connect;

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
