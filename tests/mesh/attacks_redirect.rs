//! A forged redirect: a "gateway" reported to the ring manager with an attacker's URL, then
//! its region's neighbour drained, so that the draining gateways would forward every client's
//! `rtm.connect` — bearer token included — to the attacker. A gateway forwards only to the
//! origins on its `--redirect-allow` (`dev` allows its own gateways), and with none forwards
//! nowhere.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::ring::{DrainRegionRequest, GatewayReport};
use mesh_transport::Role;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::support::{Rtm, acting_as, eventually, mesh, rm_at, rm_with, web_api};
use crate::support::{gateway_metrics, metric_sum};

/// Long enough for a goodbye to have arrived if one were coming (a negative check).
const QUIET: Duration = Duration::from_millis(700);

/// The attacker's "gateway": a real HTTP listener that records every byte it is sent and
/// answers every request as a gateway admitting the caller would (to its own WebSocket).
struct Attacker {
    url: String,
    received: Arc<Mutex<Vec<String>>>,
    _stop: DropGuard,
}

impl Attacker {
    async fn start() -> Attacker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = CancellationToken::new();
        let (log, cancel) = (received.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    log.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    let body = format!(r#"{{"ok":true,"url":"ws://{addr}/rtm/stolen"}}"#);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        });
        Attacker {
            url: format!("http://{addr}"),
            received,
            _stop: stop.drop_guard(),
        }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

/// Reports a gateway `id` of `region` at `url` with no connection, every 300 ms until dropped
/// (as a live gateway does), with a gateway certificate naming `id`: a compromised or
/// misconfigured gateway, since the ring manager takes reports only from gateways as themselves.
fn keep_reporting(ring_manager: SocketAddr, id: &str, region: &str, url: &str) -> DropGuard {
    let stop = CancellationToken::new();
    let report = GatewayReport {
        gateway: id.into(),
        region: region.into(),
        url: url.into(),
        connections: 0,
        ..GatewayReport::default()
    };
    let cancel = stop.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let mut rm = rm_with(ring_manager, &acting_as(Role::Gateway, &id)).await;
        loop {
            let _ = rm.report_gateway(report.clone()).await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    });
    stop.drop_guard()
}

/// The redirect a gateway of `region` is told now (as a probe gateway of that region hears it).
async fn redirect_told(ring_manager: SocketAddr, region: &str) -> Vec<String> {
    let report = GatewayReport {
        gateway: format!("{region}-probe"),
        region: region.into(),
        url: "http://127.0.0.1:1".into(),
        ..GatewayReport::default()
    };
    let probe = acting_as(Role::Gateway, &format!("{region}-probe"));
    let directive = rm_with(ring_manager, &probe)
        .await
        .report_gateway(report)
        .await;
    directive.unwrap().into_inner().redirect
}

/// Drains `region` (once its gateway at `base` has reported) and waits until that gateway
/// knows it (its `/healthz` fails).
async fn drain(ring_manager: SocketAddr, region: &str, base: &str) {
    eventually("the region drained", || async {
        let request = DrainRegionRequest {
            region: region.into(),
            rate: 0,
        };
        let view = rm_at(ring_manager).await.drain_region(request).await.ok()?;
        let regions = view.into_inner().regions;
        regions
            .iter()
            .any(|r| r.region == region && r.draining)
            .then_some(())
    })
    .await;
    let healthz = format!("{}/healthz", base.trim_end_matches("/api/"));
    eventually("its gateway draining", || async {
        let status = reqwest::get(&healthz).await.ok()?.status();
        (status == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_draining_gateway_never_forwards_a_token_to_a_gateway_not_on_its_allowlist() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let eu = mesh.rtm_base_url("eu-west").unwrap();
    let eu_origin = eu.trim_end_matches("/api/").trim_end_matches("/api");
    // The real eu-west gateway carries one client, so that the forged one (no connection) is
    // the least loaded: first in the redirect list.
    let _eu_client = Rtm::connect(&eu, &mesh.token("UEU", "T1", &[]).unwrap())
        .await
        .unwrap();
    let attacker = Attacker::start().await;
    let _forged = keep_reporting(mesh.ring_manager, "eu-west-evil", "eu-west", &attacker.url);

    drain(mesh.ring_manager, "us-east", &us).await;
    // The attack is set: us-east's gateways are told to send clients to the attacker first.
    eventually("the forged gateway first in the redirect", || async {
        let redirect = redirect_told(mesh.ring_manager, "us-east").await;
        (redirect.first() == Some(&attacker.url) && redirect.iter().any(|u| u == eu_origin))
            .then_some(())
    })
    .await;
    // A client of the draining region is sent to the real eu-west gateway...
    let token = mesh.token("UVICTIM", "T1", &[]).unwrap();
    let reply = web_api(&us, "rtm.connect", Some(&token)).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let ws = reply["url"].as_str().unwrap();
    let eu_ws = eu_origin.replacen("http://", "ws://", 1);
    assert!(ws.starts_with(&format!("{eu_ws}/rtm/")), "{reply}");
    let mut moved = Rtm::open(ws).await.unwrap();
    let hello: Value = moved.next().await.unwrap();
    assert_eq!(hello["type"], "hello", "{hello}");
    // ... and the attacker got nothing: no connection, no request, no token. (The gateway
    // tries its targets in order and the attacker records a request before answering it, so
    // a call to it would be on record by now.)
    let received = attacker.received();
    assert!(received.is_empty(), "the attacker received {received:?}");
    // Skipped and counted.
    let text = gateway_metrics(&us).await;
    let refused = metric_sum(&text, "channelmesh_gateway_redirects_refused_total", &[]);
    assert!(refused >= 1.0, "{refused}: {text}");
    assert_eq!(
        web_api(&us, "rtm.connect", Some(&token)).await["ok"],
        json!(true)
    );
    assert!(attacker.received().is_empty());
}

#[tokio::test]
async fn a_gateway_without_an_allowlist_forwards_nobody() {
    let mesh = mesh().await;
    // A gateway of its own region, started as `channelmesh gateway` is without
    // --redirect-allow. In this process, beside the mesh: the process's certificate names it too.
    crate::support::trust(&[mesh_transport::Identity::new(Role::Gateway, "ap-south-1").unwrap()]);
    let config = gateway::Config {
        id: "ap-south-1".into(),
        region: "ap-south".into(),
        ring: ring_client::RingSource::Direct(format!("http://{}", mesh.ring_manager)),
        presence_ring: None,
        public_url: None,
        jwt_secret: mesh.jwt_secret.clone().into_bytes(),
        connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
        limits: Default::default(),
        redirect_allow: Default::default(),
        policy_file: None,
        boot: None,
        tokens: Default::default(),
    };
    let bound = gateway::run::bind(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ap = format!("http://{}/api/", bound.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(bound.serve(stop.clone()));
    let _stop = stop.drop_guard();
    let token = mesh.token("UAP", "T1", &[]).unwrap();
    let mut client = eventually("the ap-south gateway admits", || async {
        Rtm::connect(&ap, &token).await.ok()
    })
    .await;
    let attacker = Attacker::start().await;
    // eu-west comes first for ap-south (no nearest regions configured: by name).
    let _forged = keep_reporting(mesh.ring_manager, "eu-west-evil", "eu-west", &attacker.url);
    drain(mesh.ring_manager, "ap-south", &ap).await;
    eventually("the forged gateway in the redirect", || async {
        let redirect = redirect_told(mesh.ring_manager, "ap-south").await;
        redirect.contains(&attacker.url).then_some(())
    })
    .await;
    // Refused as when no region can take the caller; the attacker hears nothing.
    let reply = web_api(&ap, "rtm.connect", Some(&token)).await;
    assert_eq!(reply, json!({"ok": false, "error": "ratelimited"}));
    // Nowhere to send them: the gateway does not say goodbye to its clients.
    client
        .expect_none(QUIET, "a goodbye with nowhere to go", |v| {
            v["type"] == "goodbye"
        })
        .await;
    let received = attacker.received();
    assert!(received.is_empty(), "the attacker received {received:?}");
    let text = gateway_metrics(&ap).await;
    let refused = metric_sum(&text, "channelmesh_gateway_redirects_refused_total", &[]);
    assert_eq!(refused, 0.0, "nothing was even considered: {text}");
}
