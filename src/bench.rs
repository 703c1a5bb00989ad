//! `channelmesh bench`: load and latency measurements run from their own process, through the
//! mesh's real interfaces (the RTM connect flow and the admin gRPC API).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use mesh_core::{ChannelId, Identity, TeamId, TokenKey, UserId};
use mesh_proto::admin::PostMessageRequest;
use mesh_proto::admin::admin_client::AdminClient;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::mesh::unix_now;

/// What `bench latency` measures against.
#[derive(Debug, Clone)]
pub struct LatencyConfig {
    /// The RTM base URL of the gateway the client connects to.
    pub gateway: String,
    /// The admin server's address, "host:port".
    pub admin: String,
    pub admin_token: String,
    pub jwt_secret: String,
    /// Messages to post, one at a time.
    pub messages: usize,
    /// Messages posted first and not counted.
    pub warmup: usize,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyReport {
    pub messages: usize,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
    /// The same percentiles for the PostMessage call alone (until the admin server answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_rpc: Option<Box<LatencyReport>>,
}

/// Posts messages one at a time through the admin API and times each until the connected
/// client receives it.
pub async fn latency(config: LatencyConfig) -> anyhow::Result<LatencyReport> {
    let channel = format!("CBENCH{}", unix_now());
    let now = unix_now();
    let identity = Identity {
        user: UserId::new("UBENCH")?,
        team: TeamId::new("TBENCH")?,
        name: None,
        channels: vec![ChannelId::new(&channel)?],
        expires_at: now + 3600,
        jti: None,
    };
    let mut ws = connect_client(&config.gateway, &config.jwt_secret, &identity).await?;

    let mut admin = AdminClient::new(mesh_transport::endpoint(&config.admin)?.connect().await?);
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", config.admin_token).parse()?;
    let mut samples = Vec::with_capacity(config.messages);
    let mut rpc = Vec::with_capacity(config.messages);
    for i in 0..config.warmup + config.messages {
        let text = format!("bench {i}");
        let mut request = tonic::Request::new(PostMessageRequest {
            channel: channel.clone(),
            user: "UPOSTER".into(),
            text: text.clone(),
            team: String::new(),
        });
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        let sent = Instant::now();
        admin.post_message(request).await?;
        let acked = sent.elapsed();
        loop {
            let frame = next_json(&mut ws).await?;
            if frame["type"] == "message" && frame["text"] == text.as_str() {
                break;
            }
        }
        if i >= config.warmup {
            samples.push(sent.elapsed());
            rpc.push(acked);
        }
    }
    let _ = ws.close(None).await;
    Ok(LatencyReport {
        post_rpc: Some(Box::new(report(&mut rpc))),
        ..report(&mut samples)
    })
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects an RTM client for `identity` through the gateway at base URL `gateway` (the real
/// connect flow: token, `rtm.connect`, WebSocket, `hello`).
pub(crate) async fn connect_client(
    gateway: &str,
    jwt_secret: &str,
    identity: &Identity,
) -> anyhow::Result<Socket> {
    let now = unix_now();
    let token = TokenKey::hs256(jwt_secret.as_bytes()).mint(identity, now)?;
    let reply: Value = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .post(format!("{gateway}rtm.connect"))
        .bearer_auth(&token)
        .send()
        .await
        .context("calling rtm.connect")?
        .json()
        .await?;
    let url = reply["url"]
        .as_str()
        .with_context(|| format!("rtm.connect answered {reply}"))?;
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "hello" {
        bail!("expected hello, got {first}");
    }
    Ok(ws)
}

async fn next_json(ws: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no frame within 10 s")?
            .context("the gateway closed the socket")??;
        if let Message::Text(text) = msg {
            return Ok(serde_json::from_str(text.as_str())?);
        }
    }
}

fn report(samples: &mut [Duration]) -> LatencyReport {
    samples.sort_unstable();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0, |d| d.as_micros() as u64)
    };
    let total: u128 = samples.iter().map(Duration::as_micros).sum();
    LatencyReport {
        messages: samples.len(),
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        max_us: samples.last().map_or(0, |d| d.as_micros() as u64),
        mean_us: total.checked_div(samples.len() as u128).unwrap_or(0) as u64,
        post_rpc: None,
    }
}

/// What `bench failover` measured in one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverRun {
    /// The channel server killed (the owner of the client's channel).
    pub killed: String,
    /// From SIGKILL until the client received a message posted after it.
    pub delivery_resumed_ms: f64,
    /// From SIGKILL until the ring manager published the new epoch.
    pub new_epoch_ms: f64,
    /// Slots that changed owner, and how many there are.
    pub slots_moved: usize,
    pub slots_total: usize,
    /// Whether every moved slot went from the killed node to one standby.
    pub only_dead_nodes_slots_to_one_standby: bool,
}

/// `bench failover`: each run and the median.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverReport {
    pub runs: Vec<FailoverRun>,
    pub median_delivery_resumed_ms: f64,
    pub median_new_epoch_ms: f64,
}

/// Kills the channel server owning a channel a client listens on, while posts keep coming, in
/// a fresh multi-process mesh per run (this binary's `dev --multi-process` layout on ports the
/// OS picks), and measures how long delivery stops.
pub async fn failover(runs: usize) -> anyhow::Result<FailoverReport> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let mut results = Vec::new();
    for run in 0..runs {
        let config = crate::mesh::MeshConfig::ephemeral();
        let procs =
            crate::multiprocess::start_all(&config, &crate::multiprocess::Options::default())
                .await?;
        let stop_mesh = tokio_util::sync::CancellationToken::new();
        let rm = format!("http://{}", procs.ring_manager.addr);
        let gateway = format!("http://{}/api/", procs.gateways[0].1.addr);
        let admin_addr = procs.admin.addr;
        let mesh = tokio::spawn(procs.run_until_stopped(stop_mesh.clone(), Duration::from_secs(5)));

        let channel = ChannelId::new(&format!("CFAILOVER{run}"))?;
        let identity = Identity {
            user: UserId::new("UBENCH")?,
            team: TeamId::new("TBENCH")?,
            name: None,
            channels: vec![channel.clone()],
            expires_at: unix_now() + 3600,
            jti: None,
        };
        let mut ws = connect_client(&gateway, &config.jwt_secret, &identity).await?;
        let tracker = tokio_util::task::TaskTracker::new();
        let watcher = ring_client::RingWatcher::spawn(
            ring_client::RingSource::Direct(rm.clone()),
            &tracker,
            stop_mesh.clone(),
        );
        let before = watcher
            .wait_for(Duration::from_secs(10), "the ring", |r| {
                r.owner_of(&channel).is_some()
            })
            .await?;
        let victim = before.owner_of(&channel).context("an owner")?.id.clone();
        let mut rm_client =
            mesh_proto::ring::ring_manager_client::RingManagerClient::connect(rm.clone()).await?;
        let members = rm_client
            .get_ring(mesh_proto::ring::GetRingRequest {})
            .await?
            .into_inner()
            .members;
        let pid = members
            .iter()
            .find(|m| m.id == victim.as_str())
            .context("the owner's pid")?
            .pid;

        let mut admin = AdminClient::new(
            mesh_transport::endpoint(&admin_addr.to_string())?
                .connect()
                .await?,
        );
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", config.admin_token).parse()?;
        let next = Arc::new(AtomicUsize::new(0));
        let posting = {
            let (next, stop, channel) = (next.clone(), stop_mesh.clone(), channel.to_string());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let mut request = tonic::Request::new(PostMessageRequest {
                        channel: channel.clone(),
                        user: "UPOSTER".into(),
                        text: format!("f{i}"),
                        team: String::new(),
                    });
                    request
                        .metadata_mut()
                        .insert("authorization", bearer.clone());
                    // A post that fails is simply not counted; the measurement is of delivery.
                    let _ = admin.post_message(request).await;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        // Delivery is flowing before the kill.
        while next_json(&mut ws).await?["type"] != "message" {}

        let epoch = before.epoch();
        let killed_at = Instant::now();
        let first_after = next.load(Ordering::SeqCst);
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
        let new_epoch = {
            let watcher = watcher.clone();
            tokio::spawn(async move {
                let ring = watcher
                    .wait_for_epoch(epoch + 1, Duration::from_secs(10))
                    .await;
                (killed_at.elapsed(), ring)
            })
        };
        loop {
            let frame = next_json(&mut ws).await?;
            let index = frame["text"]
                .as_str()
                .and_then(|t| t.strip_prefix('f'))
                .and_then(|t| t.parse::<usize>().ok());
            if frame["type"] == "message" && index.is_some_and(|i| i >= first_after) {
                break;
            }
        }
        let resumed = killed_at.elapsed();
        let (epoch_after, after) = new_epoch.await?;
        let after = after?;
        let moved: Vec<_> = (0..mesh_core::SLOT_COUNT as mesh_core::Slot)
            .filter_map(|s| {
                let (a, b) = (before.owner(s)?, after.owner(s)?);
                (a.id != b.id).then(|| (a.id.clone(), b.id.clone()))
            })
            .collect();
        let targets: std::collections::HashSet<_> = moved.iter().map(|(_, to)| to).collect();
        results.push(FailoverRun {
            killed: victim.to_string(),
            delivery_resumed_ms: resumed.as_secs_f64() * 1e3,
            new_epoch_ms: epoch_after.as_secs_f64() * 1e3,
            slots_moved: moved.len(),
            slots_total: mesh_core::SLOT_COUNT,
            only_dead_nodes_slots_to_one_standby: targets.len() == 1
                && moved.iter().all(|(from, _)| *from == victim),
        });
        stop_mesh.cancel();
        let _ = posting.await;
        let _ = ws.close(None).await;
        tracker.close();
        tracker.wait().await;
        mesh.await?;
    }
    let median = |f: fn(&FailoverRun) -> f64| {
        let mut v: Vec<f64> = results.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(FailoverReport {
        median_delivery_resumed_ms: median(|r| r.delivery_resumed_ms),
        median_new_epoch_ms: median(|r| r.new_epoch_ms),
        runs: results,
    })
}

/// `bench presence`: changes in flight (sent, not yet at every watcher), well under the
/// presence server's per-session queue.
const PRESENCE_WINDOW: u64 = 1024;

/// What `bench presence` measures against.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Users whose presence flips.
    pub users: usize,
    /// Gateway sessions that watch every one of them.
    pub watchers: usize,
    /// How long to drive the load.
    pub duration: Duration,
}

/// `bench presence`: what one presence server sustained.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PresenceReport {
    pub users: usize,
    pub watchers: usize,
    pub seconds: f64,
    /// Presence reports the presence server took and turned into changes, per second.
    pub reports_per_s: f64,
    /// Presence changes it pushed to watching gateways (one user's change to one gateway is
    /// one), per second.
    pub pushed_per_s: f64,
}

/// Starts one presence server (and the ring manager of its ring) as child processes, then,
/// as one reporting gateway and `watchers` watching gateways on real gRPC sessions, flips
/// users between away and active as fast as the server takes the reports, and counts what it
/// pushes back, until every change reached every watcher.
pub async fn presence(config: PresenceConfig) -> anyhow::Result<PresenceReport> {
    use mesh_proto::presence as pb;
    use mesh_proto::presence::gateway_message::Kind;
    use mesh_proto::presence::presence_client::PresenceClient;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let mesh = crate::mesh::MeshConfig::ephemeral();
    let rm = crate::multiprocess::start(
        "ring-manager",
        &[
            "ring-manager".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        &mesh,
    )
    .await?;
    let rm_url = format!("http://{}", rm.addr);
    let ps = crate::multiprocess::start(
        "presence-server",
        &[
            "presence-server".into(),
            "--id".into(),
            "ps-1".into(),
            "--presence-ring-manager".into(),
            rm_url.clone(),
            "--grace-ms".into(),
            "0".into(),
        ],
        &mesh,
    )
    .await?;
    let tracker = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let ring = ring_client::RingWatcher::spawn(
        ring_client::RingSource::Direct(rm_url),
        &tracker,
        stop.clone(),
    );
    ring.wait_for(
        Duration::from_secs(10),
        "the presence server on its ring",
        |r| !r.nodes().is_empty(),
    )
    .await?;
    // Past the warm-up that follows gaining the whole ring.
    tokio::time::sleep(presence_server::WARM_UP * 2).await;

    let users: Vec<String> = (0..config.users).map(|i| format!("UBENCH{i}")).collect();
    let endpoint = format!("http://{}", ps.addr);
    let session =
        |snapshot: pb::Snapshot| {
            let endpoint = endpoint.clone();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<pb::GatewayMessage>(4096);
                tx.send(pb::GatewayMessage {
                    kind: Some(Kind::Snapshot(snapshot)),
                })
                .await?;
                let outgoing = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                });
                let incoming = PresenceClient::connect(endpoint)
                    .await?
                    .session(outgoing)
                    .await?
                    .into_inner();
                anyhow::Ok((tx, incoming))
            }
        };
    let pushed = Arc::new(AtomicU64::new(0));
    let mut watchers = Vec::new();
    for w in 0..config.watchers {
        let (tx, mut incoming) = session(pb::Snapshot {
            gateway: format!("watcher-{w}"),
            watched: users.clone(),
            ..Default::default()
        })
        .await?;
        let pushed = pushed.clone();
        watchers.push(tokio::spawn(async move {
            // A gateway's heartbeat keeps the session's lease.
            let mut beat = tokio::time::interval(presence_server::HEARTBEAT_INTERVAL);
            loop {
                tokio::select! {
                    _ = beat.tick() => {
                        let heartbeat = pb::GatewayMessage { kind: Some(Kind::Heartbeat(pb::Heartbeat {})) };
                        if tx.send(heartbeat).await.is_err() {
                            return;
                        }
                    }
                    message = incoming.message() => match message {
                        Ok(Some(message)) => {
                            pushed.fetch_add(message.users.len() as u64, Ordering::Relaxed);
                        }
                        _ => return,
                    },
                }
            }
        }));
    }
    // The reporting gateway has every user online; each report is a manual away or back,
    // which the server publishes at once (automatic aways wait for the grace period and
    // coalesce, which would hide the work).
    let (reporter, _replies) = session(pb::Snapshot {
        gateway: "reporter".into(),
        online: users
            .iter()
            .map(|u| pb::UserOnline {
                user: u.clone(),
                connections: 1,
            })
            .collect(),
        ..Default::default()
    })
    .await?;
    // Let the watches' first answers and the users' arrivals pass before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = pushed.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut reports = 0u64;
    let mut away = vec![false; users.len()];
    'drive: while started.elapsed() < config.duration {
        for (i, user) in users.iter().enumerate() {
            away[i] = !away[i];
            reports += 1;
            let report = pb::GatewayMessage {
                kind: Some(Kind::Manual(pb::Manual {
                    user: user.clone(),
                    away: away[i],
                    set_at_ms: reports,
                })),
            };
            reporter.send(report).await?;
            if reports.is_multiple_of(256) {
                if started.elapsed() >= config.duration {
                    break 'drive;
                }
                // A closed loop: at most WINDOW changes not yet at every watcher, so the rate
                // is what the server sustains, not a flood it must cut off.
                let watchers = config.watchers.max(1) as u64;
                let waiting = Instant::now();
                while reports.saturating_sub((pushed.load(Ordering::Relaxed) - before) / watchers)
                    > PRESENCE_WINDOW
                {
                    if waiting.elapsed() > Duration::from_secs(2) {
                        anyhow::bail!("the presence server stopped pushing changes");
                    }
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    // Done when every change reached every watcher (or they stopped coming): the rate is
    // what the server actually processed, not what the sockets buffered.
    let want = reports * config.watchers as u64;
    let mut last = (0, Instant::now());
    let elapsed = loop {
        let now = pushed.load(Ordering::Relaxed) - before;
        if now >= want {
            break started.elapsed().as_secs_f64();
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            anyhow::bail!(
                "the presence server stopped pushing after {now} of {want} changes \
                 (a watcher cut off as a slow consumer?)"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let pushed_total = pushed.load(Ordering::Relaxed) - before;
    stop.cancel();
    drop(reporter);
    for w in watchers {
        w.abort();
    }
    tracker.close();
    tracker.wait().await;
    drop(ps);
    drop(rm);
    Ok(PresenceReport {
        users: config.users,
        watchers: config.watchers,
        seconds: elapsed,
        reports_per_s: reports as f64 / elapsed,
        pushed_per_s: pushed_total as f64 / elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let r = report(&mut samples);
        assert_eq!(
            (r.p50_us, r.p90_us, r.p99_us, r.max_us, r.mean_us),
            (50, 90, 99, 100, 50)
        );
        assert_eq!(report(&mut []).max_us, 0);
    }
}
