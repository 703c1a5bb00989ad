//! Replicated channels from outside: `kill -9` of the channel server that owns the channels
//! under load loses no acknowledged post and gives no `history_gap`; a publish retried with its
//! idempotency key (grpcio) or `client_msg_id` (slack_sdk) across the failover is one message
//! with one ts; the admin `History` says how complete it is. With `--replication-factor 1`, the
//! unreplicated contract: a kill loses history, and `complete_after_ts` and `history_gap` say so.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::ChannelId;
use mesh_proto::admin::{HistoryRequest, PostMessageRequest};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::ChildStdout;
use tokio_util::sync::CancellationToken;

use crate::processes::{ADMIN_TOKEN, Dev, signal};
use crate::real_clients::{client_command, python, repo};
use crate::support::{Admin, Rtm, admin_at, eventually, mesh, post, ring_with, state_of, try_post};

/// Events a channel's history holds: the tests post fewer, so that every post stays in it.
const HISTORY_EVENTS: usize = channel_server::store::DEFAULT_HISTORY_EVENTS;

/// `dev --multi-process` (three channel servers and a standby) whose ring gives every slot
/// `factor - 1` followers.
fn dev(name: &str, factor: u32) -> Dev {
    let dir = Dev::dir(name);
    let state_file = dir.join("ring.json");
    let args = [
        "--ring-manager".to_string(),
        "127.0.0.1:0".to_string(),
        "--presence-ring-manager".to_string(),
        "127.0.0.1:0".to_string(),
        "--ring-state-file".to_string(),
        state_file.display().to_string(),
        "--replication-factor".to_string(),
        factor.to_string(),
    ];
    Dev::launch(&args, state_file, dir)
}

/// The channel servers that own `channels` now (id and pid), and checks that the ring is
/// replicated as `factor` says.
async fn owners(dev: &Dev, channels: &[&str], factor: u32) -> Vec<(String, u32)> {
    let (ring, members) = dev.settled(factor).await;
    assert_eq!(
        ring.is_replicated(),
        factor > 1,
        "replication factor {factor}"
    );
    channels
        .iter()
        .map(|c| {
            let owner = ring.owner_of(&ChannelId::new(c).unwrap()).unwrap();
            let member = members.iter().find(|m| m.id == owner.id.as_str()).unwrap();
            (member.id.clone(), member.pid)
        })
        .collect()
}

/// `kill -9` of `victim`; waits until the ring manager declared it down (its slots moved).
async fn kill_and_wait_down(dev: &Dev, (victim, pid): &(String, u32)) {
    signal(*pid, Signal::SIGKILL);
    let killed = Instant::now();
    eventually("the killed channel server is declared down", || async {
        let (_, members) = ring_with(dev.ring_manager, &dev.operator).await;
        (state_of(&members, victim) == "down").then_some(())
    })
    .await;
    println!(
        "kill -9 of {victim} -> declared down after {} ms",
        killed.elapsed().as_millis()
    );
}

/// Every event of `channel` the admin `History` holds, oldest first, as (ts, user, text), and
/// its `complete_after_ts`.
async fn history(admin: &mut Admin, channel: &str) -> (Vec<(String, String, String)>, String) {
    let (mut events, mut since, mut complete_after) = (Vec::new(), String::new(), None);
    loop {
        let page = admin
            .history(HistoryRequest {
                channel: channel.into(),
                since_ts: since.clone(),
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        complete_after.get_or_insert(page.complete_after_ts);
        for e in &page.events {
            let v: Value = serde_json::from_str(&e.event_json).unwrap();
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            events.push((e.ts.clone(), field("user"), field("text")));
        }
        match page.events.last() {
            Some(last) if page.has_more => since = last.ts.clone(),
            _ => return (events, complete_after.unwrap_or_default()),
        }
    }
}

/// Runs a real client's script (`python tests/clients/python/SCRIPT ARGS`) with `config`;
/// asserts it printed OK; returns what it printed.
async fn script(script: &str, args: &[&str], config: &Value) -> String {
    let path = repo().join("tests/clients/python").join(script);
    let output = client_command(&python(), &path, config)
        .args(args)
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), output)
        .await
        .expect("the client script finishes")
        .expect("the client script runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.lines().any(|l| l == "OK"),
        "{script} {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The admin API's address, token and protos, for `admin_replication.py`.
fn admin_config(admin: std::net::SocketAddr, token: &str) -> Value {
    json!({
        "admin_addr": admin.to_string(),
        "admin_token": token,
        "proto_root": repo().join("proto"),
    })
}

#[tokio::test]
async fn grpcio_history_says_whether_it_is_complete_from_the_start() {
    let mesh = mesh().await;
    let mut config = admin_config(mesh.admin, &mesh.admin_token);
    config["trimmed_channel"] = json!("CTRIMMED");
    config["intact_channel"] = json!("CINTACT");
    script("admin_replication.py", &["complete"], &config).await;
}

#[tokio::test]
async fn grpcio_post_retried_with_its_key_across_a_failover_is_one_message_with_one_ts() {
    let dev = dev("rp-grpcio", 2);
    let channel = "CRETRY";
    let owner = owners(&dev, &[channel], 2).await.remove(0);
    let mut config = admin_config(dev.admin, ADMIN_TOKEN);
    config["channel"] = json!(channel);
    config["key"] = json!("web-order-4711");
    config["text"] = json!("posted once, retried across a crash");
    let posted = script("admin_replication.py", &["post"], &config).await;
    let ts = posted
        .lines()
        .find_map(|l| l.strip_prefix("ts "))
        .expect("the post's ts")
        .to_string();

    // The owner dies after it answered; the web app did not hear the answer and retries.
    kill_and_wait_down(&dev, &owner).await;
    config["want_ts"] = json!(ts);
    script("admin_replication.py", &["retry"], &config).await;
}

#[tokio::test]
async fn slack_sdk_message_resent_with_its_client_msg_id_across_a_failover_is_delivered_once() {
    let dev = dev("rp-rtm", 2);
    let channel = "CRESEND";
    let owner = owners(&dev, &[channel], 2).await.remove(0);
    let config = json!({
        "us_east": dev.base_url(),
        "eu_west": format!("http://{}/api/", dev.eu_west.0),
        "ann_token": dev.token("UANN", &[channel]),
        "bob_token": dev.token("UBOB", &[channel]),
        "channel": channel,
    });
    let script = repo().join("tests/clients/python/rtm_v2_failover.py");
    let mut child = client_command(&python(), &script, &config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    loop {
        let line = next_line(&mut lines).await;
        let Some(line) = line else {
            panic!("the script ended before sending: {printed:?}")
        };
        let sent = line.starts_with("sent ");
        printed.push(line);
        if sent {
            break;
        }
    }
    kill_and_wait_down(&dev, &owner).await;
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"killed\n").await.unwrap();
    while let Some(line) = next_line(&mut lines).await {
        printed.push(line);
    }
    let status = child.wait().await.unwrap();
    assert!(
        status.success() && printed.iter().any(|l| l == "OK"),
        "rtm_v2_failover.py failed ({status}): {printed:#?}"
    );
}

/// The script's next line (`None` once it closed its stdout), within a minute.
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<String> {
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the script prints within a minute")
        .unwrap();
    if let Some(line) = &line {
        println!("{line}");
    }
    line
}

/// An acknowledged post: where, what, its ts, and when the answer came.
struct Acked {
    channel: String,
    text: String,
    ts: String,
    at: Instant,
}

/// Posts, one every 5 ms, to `channels` in turn, as `UPOSTER` with the texts `p0`, `p1`, ...,
/// until `stop`; every acknowledged post, in order.
struct ChatPoster {
    acked: Arc<Mutex<Vec<Acked>>>,
    task: tokio::task::JoinHandle<usize>,
}

impl ChatPoster {
    fn start(admin: &Admin, channels: &[&str], stop: CancellationToken) -> ChatPoster {
        let mut admin = admin.clone();
        let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let task = tokio::spawn({
            let acked = acked.clone();
            async move {
                let mut failed = 0;
                for i in 0.. {
                    if stop.is_cancelled() {
                        break;
                    }
                    let channel = channels[i % channels.len()].clone();
                    let text = format!("p{i}");
                    let request = PostMessageRequest {
                        channel: channel.clone(),
                        user: "UPOSTER".into(),
                        text: text.clone(),
                        team: String::new(),
                        idempotency_key: String::new(),
                    };
                    match admin.post_message(request).await {
                        Ok(reply) => {
                            let (ts, at) = (reply.into_inner().ts, Instant::now());
                            let ack = Acked {
                                channel,
                                text,
                                ts,
                                at,
                            };
                            acked.lock().unwrap().push(ack);
                        }
                        Err(status) => {
                            eprintln!("post {text} to {channel} failed: {status}");
                            failed += 1;
                        }
                    }
                    // Pacing: a steady load, not a wait for anything.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                failed
            }
        });
        ChatPoster { acked, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `n` more posts than `from` are acknowledged.
    async fn acked_past(&self, from: usize, n: usize) {
        eventually(&format!("{n} more posts acknowledged"), || async {
            (self.acked() >= from + n).then_some(())
        })
        .await;
    }

    /// Stops (its token must have fired): the acknowledged posts, and how many failed.
    async fn finish(self) -> (Vec<Acked>, usize) {
        let failed = self.task.await.unwrap();
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, failed)
    }
}

/// Reads `client`'s frames until every ts in `want` (per channel) arrived: each once, in ts
/// order per channel, and no `history_gap`.
async fn receive_every(who: &str, client: &mut Rtm, want: &HashMap<String, Vec<String>>) {
    let mut missing: HashSet<(String, String)> = want
        .iter()
        .flat_map(|(c, tss)| tss.iter().map(move |ts| (c.clone(), ts.clone())))
        .collect();
    let (mut seen, mut last) = (HashSet::new(), HashMap::<String, String>::new());
    while !missing.is_empty() {
        let frame = client
            .expect("the next post", |v| {
                v["type"] == "history_gap" || (v["type"] == "message" && v["user"] == "UPOSTER")
            })
            .await;
        assert_ne!(frame["type"], "history_gap", "{who} got {frame}");
        let key = (
            frame["channel"].as_str().unwrap().to_string(),
            frame["ts"].as_str().unwrap().to_string(),
        );
        let last = last.entry(key.0.clone()).or_default();
        assert!(key.1 > *last, "{who}, {}: {} after {last}", key.0, key.1);
        *last = key.1.clone();
        missing.remove(&key);
        assert!(seen.insert(key), "{who} got a duplicate {frame}");
    }
}

/// Checks the admin `History` of every channel posted to: each acknowledged post exactly once,
/// in ts order; beyond them at most the posts that failed (a post applied whose answer was
/// lost). Answers the channels whose history says it is incomplete (checked last by the caller,
/// after what clients received).
async fn every_acked_post_is_in_history_once(
    admin: &mut Admin,
    acked: &[Acked],
    failed: usize,
) -> Vec<String> {
    let mut incomplete = Vec::new();
    let mut per_channel: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    for a in acked {
        per_channel
            .entry(&a.channel)
            .or_default()
            .push((&a.text, &a.ts));
    }
    let mut extra = 0;
    for (channel, posts) in per_channel {
        let (events, complete_after) = history(admin, channel).await;
        let held: Vec<(&str, &str)> = events
            .iter()
            .filter(|(_, user, _)| user == "UPOSTER")
            .map(|(ts, _, text)| (text.as_str(), ts.as_str()))
            .collect();
        let mut ts: Vec<&str> = held.iter().map(|(_, ts)| *ts).collect();
        ts.dedup();
        assert_eq!(ts.len(), held.len(), "{channel}: a ts twice");
        assert!(ts.is_sorted(), "{channel}: out of ts order");
        let texts: HashSet<&str> = held.iter().map(|(text, _)| *text).collect();
        assert_eq!(texts.len(), held.len(), "{channel}: a post held twice");
        assert!(
            held.len() < HISTORY_EVENTS,
            "{channel}: history may be trimmed"
        );
        let held: HashSet<(&str, &str)> = held.into_iter().collect();
        let lost: Vec<_> = posts.iter().filter(|p| !held.contains(p)).collect();
        assert!(
            lost.is_empty(),
            "{channel}: {} of {} acknowledged posts lost, the first {:?}; complete after {complete_after:?}",
            lost.len(),
            posts.len(),
            &lost[..lost.len().min(3)]
        );
        // A floor from before every post (a slot taken over while the mesh started, before any
        // post) is true and covers nothing acknowledged; one at or after a post would say a
        // post may be missing.
        let covers_a_post = posts.iter().any(|(_, ts)| *ts <= complete_after.as_str());
        if !complete_after.is_empty() && covers_a_post {
            incomplete.push(format!(
                "{channel}: complete only after {complete_after}, every post held from {:?}",
                events.first().map(|(ts, _, _)| ts)
            ));
        }
        extra += held.len() - posts.len();
    }
    assert!(
        extra <= failed,
        "{extra} posts held that were not acknowledged"
    );
    incomplete
}

/// The experiment: posts every 5 ms to `channels`, `kill -9` of the owner of the first
/// mid-stream once `per_channel` posts per channel are acknowledged, posts on through the
/// failover as many again. A client connected throughout and one that
/// resumes with its cursor after the failover get every acknowledged post once, and no gap;
/// the admin `History` holds each once, in order.
async fn kill_under_load(name: &str, channels: &[&str], per_channel: usize) {
    // Every post stays in history: fewer than it holds, with room for the posts in flight.
    assert!(2 * per_channel + 10 < HISTORY_EVENTS);
    let posts = per_channel * channels.len();
    let dev = dev(name, 2);
    let owners = owners(&dev, channels, 2).await;
    let victim = owners[0].clone();
    let on_victim = owners.iter().filter(|o| **o == victim).count();
    println!(
        "{} channels, {on_victim} of them on {}",
        channels.len(),
        victim.0
    );
    // Clients subscribed throughout, one in each region.
    let token = dev.token("UREADER", channels);
    let eu = format!("http://{}/api/", dev.eu_west.0);
    let mut live = Rtm::connect(&dev.base_url(), &token).await.unwrap();
    let mut live_eu = Rtm::connect(&eu, &token).await.unwrap();
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;

    let stop = CancellationToken::new();
    let posting = ChatPoster::start(&admin, channels, stop.clone());
    // A second client reads for a while, then leaves with its cursor on the first channel.
    let mut leaving = Rtm::connect(&dev.base_url(), &dev.token("ULEAVER", &channels[..1]))
        .await
        .unwrap();
    let mut cursor = String::new();
    for _ in 0..5 {
        let v = leaving
            .expect("a post", |v| {
                v["type"] == "message" && v["user"] == "UPOSTER"
            })
            .await;
        cursor = v["ts"].as_str().unwrap().to_string();
    }
    leaving.ws.close(None).await.unwrap();
    drop(leaving);
    posting.acked_past(0, posts).await;

    let before = posting.acked();
    let killed_at = Instant::now();
    kill_and_wait_down(&dev, &victim).await;
    // Posts go on through the failover, and well after it.
    posting.acked_past(before, posts).await;
    let mut resumed = Rtm::connect_with(
        &eu,
        &dev.token("ULEAVER", &channels[..1]),
        &format!("?cursors={}:{cursor}", channels[0]),
    )
    .await
    .unwrap();
    posting.acked_past(posting.acked(), channels.len()).await;
    stop.cancel();
    let (acked, failed) = posting.finish().await;
    // Shown, not asserted: the longest pause in acknowledgements after the kill.
    let pause = acked
        .windows(2)
        .filter(|w| w[1].at > killed_at)
        .map(|w| w[1].at - w[0].at.max(killed_at))
        .max()
        .unwrap_or_default();
    println!(
        "{} posts acknowledged ({before} before the kill), {failed} failed; acknowledgements \
         paused for at most {} ms after the kill",
        acked.len(),
        pause.as_millis()
    );

    let incomplete = every_acked_post_is_in_history_once(&mut admin, &acked, failed).await;
    let mut want: HashMap<String, Vec<String>> = HashMap::new();
    for a in &acked {
        want.entry(a.channel.clone())
            .or_default()
            .push(a.ts.clone());
    }
    receive_every("the us-east client", &mut live, &want).await;
    receive_every("the eu-west client", &mut live_eu, &want).await;
    let after_cursor: Vec<String> = want[channels[0]]
        .iter()
        .filter(|ts| ts.as_str() > cursor.as_str())
        .cloned()
        .collect();
    receive_every(
        "the client resumed with its cursor",
        &mut resumed,
        &HashMap::from([(channels[0].to_string(), after_cursor)]),
    )
    .await;
    // And the admin API says no channel's history may miss an acknowledged post.
    assert_eq!(incomplete, Vec::<String>::new());
}

#[tokio::test]
async fn kill_9_of_the_owner_under_load_loses_no_acknowledged_post_and_gives_no_gap() {
    kill_under_load("rp-kill-one", &["CLOAD"], 35).await;
}

#[tokio::test]
async fn kill_9_under_a_chat_load_on_many_channels_loses_no_acknowledged_post() {
    let names: Vec<String> = (0..24).map(|i| format!("CCHAT{i:02}")).collect();
    let channels: Vec<&str> = names.iter().map(String::as_str).collect();
    kill_under_load("rp-kill-chat", &channels, 4).await;
}

#[tokio::test]
async fn with_replication_factor_1_a_kill_loses_history_and_says_so() {
    let dev = dev("rp-factor-1", 1);
    let channel = "CUNREPLICATED";
    let owner = owners(&dev, &[channel], 1).await.remove(0);
    let mut client = Rtm::connect(&dev.base_url(), &dev.token("UREADER", &[channel]))
        .await
        .unwrap();
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let mut posted = Vec::new();
    for i in 0..3 {
        posted.push(post(&mut admin, channel, "UPOSTER", &format!("before {i}")).await);
    }
    for ts in &posted {
        client.expect("a post", |v| v["ts"] == ts.as_str()).await;
    }

    kill_and_wait_down(&dev, &owner).await;
    let after = eventually("a post after the kill", || {
        try_post(&admin, channel, "after")
    })
    .await;
    // The history before the kill died with its only copy, and the answer says so.
    let (events, complete_after) = history(&mut admin, channel).await;
    let held: Vec<&str> = events.iter().map(|(ts, _, _)| ts.as_str()).collect();
    assert_eq!(held, [after.as_str()]);
    assert!(
        complete_after.as_str() >= posted[2].as_str() && complete_after < after,
        "complete after {complete_after:?}: the last post before the kill was {}",
        posted[2]
    );
    let frame = client
        .expect("a gap or the post", |v| {
            v["type"] == "history_gap" || v["ts"] == after.as_str()
        })
        .await;
    assert_eq!(frame["type"], "history_gap", "{frame}");
    client
        .expect("the post", |v| v["ts"] == after.as_str())
        .await;
}

/// The memory bench measures a follower copy: `channelmesh bench channel-memory --mesh` fills
/// real channel servers at factor 1 and 2 (no RSS figure is asserted: only that each run filled
/// every channel, that the second ring had followers, and that the cost was computed).
#[tokio::test]
async fn the_channel_memory_bench_measures_factor_1_and_2_on_real_channel_servers() {
    let loadgen = std::path::Path::new(crate::processes::BIN).with_file_name("channelmesh-loadgen");
    assert!(
        loadgen.is_file(),
        "{} is missing: build it with `cargo build -p channelmesh-loadgen`",
        loadgen.display()
    );
    let run = tokio::process::Command::new(crate::processes::BIN)
        .args([
            "bench",
            "channel-memory",
            "--mesh",
            "--replication-factor",
            "2",
        ])
        .args(["--channels", "300", "--events", "2", "--json"])
        .env_remove("CHANNELMESH_LOADGEN")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the bench finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    let factors: Vec<u64> = runs
        .iter()
        .map(|r| r["replication_factor"].as_u64().unwrap())
        .collect();
    assert_eq!(factors, [1, 2], "{report}");
    for run in runs {
        assert_eq!(
            (run["posted"].as_u64(), run["post_errors"].as_u64()),
            (Some(600), Some(0))
        );
    }
    let followed = |run: &Value| -> u64 {
        run["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["slots_followed"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(followed(&runs[0]), 0);
    assert_eq!(followed(&runs[1]), mesh_core::SLOT_COUNT as u64);
    assert!(
        report["follower_copy_bytes_per_channel"].is_number(),
        "{report}"
    );
}
