//! Regions: draining a region moves every client to the nearest healthy region with nothing
//! lost or duplicated.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::support::{Rtm, admin, mesh, poster, rm_at, web_api};

const CLIENTS: usize = 300;
const CHANNELS: usize = 10;

/// One client as an unmodified Slack client behaves: on `goodbye` or a closed socket it calls
/// `rtm.connect` again on the same base URL and follows the URL it gets.
struct Client {
    base: String,
    token: String,
    rtm: Rtm,
    /// Message ts in arrival order.
    seen: Vec<String>,
    reconnects: usize,
}

impl Client {
    async fn reconnect(&mut self) {
        for _ in 0..50 {
            let reply = web_api(&self.base, "rtm.connect", Some(&self.token)).await;
            if let Some(url) = reply["url"].as_str()
                && let Ok(mut rtm) = Rtm::open(url).await
                && rtm.next().await.is_ok_and(|v| v["type"] == "hello")
            {
                self.rtm = rtm;
                self.reconnects += 1;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not reconnect");
    }

    /// Reads until `stop`, following goodbyes.
    async fn run(mut self, stop: CancellationToken) -> Client {
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return self,
                f = self.rtm.next() => f,
            };
            match frame {
                Ok(v) if v["type"] == "message" && v["user"] == "UPOSTER" => {
                    self.seen.push(v["ts"].as_str().unwrap().to_string());
                }
                Ok(v) if v["type"] == "goodbye" => self.reconnect().await,
                Ok(_) => {}
                Err(_) => self.reconnect().await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_region_moves_every_client_with_nothing_lost_or_duplicated() {
    let mesh = mesh().await;
    let us = mesh.rtm_base_url("us-east").unwrap();
    let us_addr = mesh
        .gateways
        .iter()
        .find(|(r, _)| r == "us-east")
        .unwrap()
        .1;
    let eu_addr = mesh
        .gateways
        .iter()
        .find(|(r, _)| r == "eu-west")
        .unwrap()
        .1;
    let stats = |addr| async move {
        reqwest::get(format!("http://{addr}/stats"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };

    // Several hundred clients on us-east, each in one of the channels.
    let channel = |i: usize| format!("CDRAIN{}", i % CHANNELS);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let token = mesh
            .token(&format!("UDRAIN{i}"), "T1", &[&channel(i)])
            .unwrap();
        let rtm = Rtm::connect(&us, &token).await.unwrap();
        clients.push(Client {
            base: us.clone(),
            token,
            rtm,
            seen: Vec::new(),
            reconnects: 0,
        });
    }
    // Messages to every channel at a steady rate throughout.
    let admin = admin(&mesh).await;
    let stop_posting = CancellationToken::new();
    let posters: Vec<_> = (0..CHANNELS)
        .map(|c| poster(&admin, &channel(c), stop_posting.clone()))
        .collect();
    let stop_reading = CancellationToken::new();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(c.run(stop_reading.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Drain us-east (the gateways learn it from their next report).
    let started = Instant::now();
    let view = rm_at(mesh.ring_manager)
        .await
        .drain_region(mesh_proto::ring::DrainRegionRequest {
            region: "us-east".into(),
            rate: 200,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        view.regions
            .iter()
            .any(|r| r.region == "us-east" && r.draining)
    );
    crate::support::eventually_within(
        "us-east empty and every client on eu-west",
        Duration::from_secs(30),
        || async {
            let (us, eu) = (stats(us_addr).await, stats(eu_addr).await);
            (us["connections"] == 0 && eu["connections"] == json!(CLIENTS)).then_some(())
        },
    )
    .await;
    let drained_in = started.elapsed();
    let health = reqwest::get(format!("http://{us_addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        503,
        "a draining gateway fails its health check"
    );

    // A little more traffic on the new region, then stop and let the last messages arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_posting.cancel();
    let mut acked: Vec<Vec<String>> = Vec::new();
    let mut failed = 0;
    for p in posters {
        let (a, f) = p.await.unwrap();
        failed += f;
        acked.push(a.into_iter().map(|(_, ts, _)| ts).collect());
    }
    assert_eq!(failed, 0, "no post failed during the drain");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_reading.cancel();
    let mut lost = 0;
    let mut duplicated = 0;
    let reconnects = Arc::new(Mutex::new(0));
    for (i, reader) in readers.into_iter().enumerate() {
        let client = reader.await.unwrap();
        *reconnects.lock().await += client.reconnects;
        let want: HashSet<&String> = acked[i % CHANNELS].iter().collect();
        let got: HashSet<&String> = client.seen.iter().collect();
        duplicated += client.seen.len() - got.len();
        lost += want.difference(&got).count();
        let mut sorted = client.seen.clone();
        sorted.sort();
        assert_eq!(
            sorted, client.seen,
            "client {i} got messages out of ts order"
        );
        assert!(
            client.rtm.url.contains(&eu_addr.to_string()),
            "client {i} ended on {}",
            client.rtm.url
        );
    }
    let total: usize = acked.iter().map(Vec::len).sum();
    println!(
        "drained {CLIENTS} clients from us-east in {} ms at 200/s; {total} messages posted; lost {lost}, duplicated {duplicated}; {} reconnects",
        drained_in.as_millis(),
        reconnects.lock().await
    );
    assert_eq!((lost, duplicated), (0, 0));
}
