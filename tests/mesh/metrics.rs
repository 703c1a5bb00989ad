//! Metrics and health: after a scripted workload, every service's `/metrics` (parsed with a real
//! Prometheus text parser) counts exactly what the workload did; `/readyz` says ready on every
//! service, and not ready on a draining gateway.

use std::net::SocketAddr;

use channelmesh::Mesh;
use serde_json::json;

use crate::support::{self, Rtm, eventually};

/// Messages posted.
const MESSAGES: usize = 25;
const CHANNEL: &str = "CMETRICS";

pub(crate) async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics has a body");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text format")
}

/// The sum of `name`'s samples whose labels include `labels`.
pub(crate) fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

async fn ready(addr: SocketAddr) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}/readyz"))
        .await
        .expect("/readyz answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

fn gateway(mesh: &Mesh, region: &str) -> SocketAddr {
    mesh.gateways
        .iter()
        .find(|(r, _)| r == region)
        .map(|(_, a)| *a)
        .expect("the region has a gateway")
}

fn http_of(mesh: &Mesh, prefix: &str) -> Vec<(String, SocketAddr)> {
    mesh.http
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .cloned()
        .collect()
}

#[tokio::test]
async fn every_service_counts_what_the_workload_did() {
    let mesh = support::mesh().await;
    let (us, eu) = (gateway(&mesh, "us-east"), gateway(&mesh, "eu-west"));
    // S = 3 subscribers across both regions: two on us-east, one on eu-west.
    let subscribers = [
        ("UMET1", "us-east"),
        ("UMET2", "us-east"),
        ("UMET3", "eu-west"),
    ];
    let mut clients = Vec::new();
    for (user, region) in subscribers {
        let token = mesh.token(user, "TMET", &[CHANNEL]).unwrap();
        let base = mesh.rtm_base_url(region).unwrap();
        clients.push(Rtm::connect(&base, &token).await.unwrap());
    }
    let mut admin = support::admin(&mesh).await;
    for i in 0..MESSAGES {
        support::post(&mut admin, CHANNEL, "UWEBAPP", &format!("m{i}")).await;
    }
    for client in &mut clients {
        for i in 0..MESSAGES {
            let text = format!("m{i}");
            client
                .expect("the posted message", |v| {
                    v["type"] == "message" && v["text"] == json!(text)
                })
                .await;
        }
    }
    let delivered = (MESSAGES * subscribers.len()) as f64;

    // Gateways: every message to every subscriber, counted once, in the region it reached.
    let (us_m, eu_m) = (scrape(us).await, scrape(eu).await);
    let labels = |g: &'static str, r: &'static str| [("gateway", g), ("region", r)];
    let total = |name: &str| {
        value(&us_m, name, &labels("us-east-1", "us-east"))
            + value(&eu_m, name, &labels("eu-west-1", "eu-west"))
    };
    assert_eq!(
        total("channelmesh_gateway_events_delivered_total"),
        delivered
    );
    assert_eq!(
        value(&us_m, "channelmesh_gateway_events_delivered_total", &[]),
        (MESSAGES * 2) as f64
    );
    assert_eq!(total("channelmesh_gateway_events_written_total"), delivered);
    assert_eq!(
        total("channelmesh_gateway_gateway_to_socket_seconds_count"),
        delivered,
        "one gateway -> socket latency per event written"
    );
    assert_eq!(
        total("channelmesh_gateway_cs_to_gateway_seconds_count"),
        (MESSAGES * 2) as f64,
        "each gateway received each message once from its channel server"
    );
    assert_eq!(value(&us_m, "channelmesh_gateway_connections", &[]), 2.0);
    assert_eq!(value(&eu_m, "channelmesh_gateway_connections", &[]), 1.0);
    assert_eq!(total("channelmesh_gateway_connects_total"), 3.0);
    assert_eq!(total("channelmesh_gateway_queue_drops_total"), 0.0);
    assert_eq!(
        total("channelmesh_gateway_slow_consumer_disconnects_total"),
        0.0
    );
    assert!(value(&us_m, "channelmesh_gateway_upstream_streams", &[]) >= 1.0);
    assert!(value(&us_m, "channelmesh_gateway_ring_epoch", &[]) >= 1.0);

    // Admin server: every post, and its routing latency.
    let admin_http = http_of(&mesh, "admin")[0].1;
    let admin_m = scrape(admin_http).await;
    let posts = [("method", "PostMessage"), ("outcome", "ok")];
    assert_eq!(
        value(&admin_m, "channelmesh_admin_requests_total", &posts),
        MESSAGES as f64
    );
    assert_eq!(
        value(&admin_m, "channelmesh_admin_publish_seconds_count", &[]),
        MESSAGES as f64
    );

    // Channel servers: the owner took every message once and queued it to both gateways.
    let mut published = Vec::new();
    let (mut fanned_out, mut slots) = (0.0, 0.0);
    for (node, addr) in http_of(&mesh, "cs-") {
        let m = scrape(addr).await;
        let kind = [("node", node.as_str()), ("kind", "message")];
        published.push(value(
            &m,
            "channelmesh_channel_events_published_total",
            &kind,
        ));
        fanned_out += value(&m, "channelmesh_channel_events_fanned_out_total", &[]);
        slots += value(&m, "channelmesh_channel_slots_owned", &[]);
        assert_eq!(value(&m, "channelmesh_channel_lease_serving", &[]), 1.0);
    }
    published.sort_by(f64::total_cmp);
    assert_eq!(published, vec![0.0, 0.0, 0.0, MESSAGES as f64]);
    assert_eq!(fanned_out, (MESSAGES * 2) as f64);
    assert_eq!(slots, mesh_core::SLOT_COUNT as f64);

    // Presence servers: the three online users, over every gateway's sessions.
    eventually("presence servers track the three users", || async {
        let mut users = 0.0;
        for (_, addr) in http_of(&mesh, "ps-") {
            users += value(&scrape(addr).await, "channelmesh_presence_users", &[]);
        }
        (users == 3.0).then_some(())
    })
    .await;

    // Ring manager: the dev layout's ring.
    let ring = scrape(mesh.console).await;
    assert_eq!(
        value(&ring, "channelmesh_ring_members", &[("state", "active")]),
        3.0
    );
    assert_eq!(value(&ring, "channelmesh_ring_standbys", &[]), 1.0);
    assert_eq!(
        value(&ring, "channelmesh_ring_slots", &[]),
        mesh_core::SLOT_COUNT as f64
    );
    assert!(value(&ring, "channelmesh_ring_epoch", &[]) >= 1.0);
    let presence_ring = scrape(mesh.presence_console).await;
    assert_eq!(
        value(
            &presence_ring,
            "channelmesh_ring_members",
            &[("state", "active")]
        ),
        2.0,
        "each ring manager's console shows its own ring"
    );
}

#[tokio::test]
async fn every_service_is_ready_and_a_draining_gateway_is_not() {
    let mesh = support::mesh().await;
    let (us, eu) = (gateway(&mesh, "us-east"), gateway(&mesh, "eu-west"));
    let mut addrs: Vec<(String, SocketAddr)> = mesh.http.clone();
    addrs.push(("us-east".into(), us));
    addrs.push(("eu-west".into(), eu));
    addrs.push(("console".into(), mesh.console));
    for (name, addr) in &addrs {
        let (status, body) = ready(*addr).await;
        assert_eq!(status, 200, "{name} is ready: {body}");
        let health = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap();
        assert_eq!(health.status(), 200, "{name} is alive");
    }
    assert_eq!(
        addrs.len(),
        1 + 4 + 3 + 2 + 1,
        "admin, channel servers, presence servers, gateways, console"
    );

    support::rm_at(mesh.ring_manager)
        .await
        .drain_region(mesh_proto::ring::DrainRegionRequest {
            region: "us-east".into(),
            rate: 0,
        })
        .await
        .unwrap();
    let body = eventually("the draining gateway is not ready", || async {
        let (status, body) = ready(us).await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("draining"), "{body}");
    assert_eq!(
        value(&scrape(us).await, "channelmesh_gateway_draining", &[]),
        1.0
    );
    assert_eq!(ready(eu).await.0, 200, "the other region stays ready");

    // A stopped channel server's HTTP listener goes with it.
    let (node, addr) = http_of(&mesh, "cs-")[0].clone();
    assert!(mesh.stop_channel_server(&node));
    eventually("the stopped channel server's HTTP is gone", || async {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .is_err()
            .then_some(())
    })
    .await;
}
