//! `ctl regions`, `ctl drain-region` and `ctl undrain-region`: the regions as the ring manager
//! reports them.

use ring_manager::regions::RegionsView;

use super::ring::connect;

/// Prints the regions as a table, or with `json` as the JSON list of `ring_manager::regions::RegionView`s (the same
/// view the console serves).
fn print_regions(view: mesh_proto::ring::RegionsView, json: bool) -> anyhow::Result<()> {
    let regions = RegionsView::from(view).regions;
    if json {
        println!("{}", serde_json::to_string(&regions)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<14} {:>11}  {:<20} GATEWAYS",
        "REGION", "STATE", "CONNECTIONS", "NEAREST"
    );
    for r in &regions {
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
    print_regions(view, json)
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
    print_regions(view, json)
}
