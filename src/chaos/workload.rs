//! The workload a chaos run drives through the mesh's real interfaces, recording what it saw
//! ([`Recorder`]): RTM clients in each region that stay subscribed to the run's channels and
//! resume with their cursors after every disconnect; publishers through RTM `message` frames
//! and through the admin API's PostMessage, each publish carrying a unique id in its text; a
//! presence sampler (GetPresence); a history reader (History).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use mesh_proto::admin::admin_client::AdminClient;
use mesh_proto::admin::{GetPresenceRequest, HistoryRequest, PostMessageRequest};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::log::{
    ClientLog, Delivery, Gap, Logs, Outcome, PresenceChange, PresenceSample, Publish, Via, id_of,
};

/// How long one call (an RTM connect step, a publish, an admin call) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that hears nothing for this long (messages flow all the time) reconnects.
const SILENCE: Duration = Duration::from_secs(20);
/// Pause before a client reconnects.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// How often the presence sampler and the history reader run.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const HISTORY_EVERY: Duration = Duration::from_secs(2);
/// The team every chaos user is in.
pub const TEAM: &str = "TCHAOS";

/// Per channel: every (ts, id) the history API returned.
type History = BTreeMap<String, std::collections::BTreeSet<(String, String)>>;

/// Where everything the workload sees is written; the checker reads it at the end.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    publishes: Mutex<Vec<Publish>>,
    clients: Vec<Mutex<ClientLog>>,
    /// Every (ts, id) history reads returned, per channel, and how many reads were disordered.
    history: Mutex<(History, usize)>,
    presence: Mutex<Vec<PresenceSample>>,
}

impl Recorder {
    /// A recorder for `clients` (user, region), its clock starting now.
    pub fn new(clients: &[(String, String)]) -> Self {
        Recorder {
            start: Instant::now(),
            publishes: Mutex::default(),
            clients: clients
                .iter()
                .map(|(user, region)| {
                    Mutex::new(ClientLog {
                        user: user.clone(),
                        region: region.clone(),
                        ..ClientLog::default()
                    })
                })
                .collect(),
            history: Mutex::default(),
            presence: Mutex::default(),
        }
    }

    /// Seconds since the recorder started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn client(&self, i: usize) -> std::sync::MutexGuard<'_, ClientLog> {
        self.clients[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, p: Publish) {
        lock(&self.publishes).push(p);
    }

    /// Publishes that failed or got no answer, sent within `from..to`.
    pub fn failed_between(&self, from: f64, to: f64) -> usize {
        lock(&self.publishes)
            .iter()
            .filter(|p| p.sent >= from && p.sent < to && p.acked_ts().is_none())
            .count()
    }

    /// How many clients have a connection open.
    pub fn connected(&self) -> usize {
        (0..self.clients.len())
            .filter(|&i| self.client(i).connected())
            .count()
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Logs {
        let (history, history_disorder) = lock(&self.history).clone();
        Logs {
            publishes: lock(&self.publishes).clone(),
            clients: (0..self.clients.len())
                .map(|i| self.client(i).clone())
                .collect(),
            history,
            history_disorder,
            presence: lock(&self.presence).clone(),
            faults: Vec::new(),
            end: self.now(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `rtm.connect` on `base` (`http://host:port/api/`) with `token` and resume `cursors`, the
/// WebSocket, and its `hello`.
async fn rtm_connect(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    cursors: &BTreeMap<String, String>,
) -> anyhow::Result<Ws> {
    let mut url = format!("{base}rtm.connect");
    if !cursors.is_empty() {
        let list: Vec<String> = cursors.iter().map(|(c, ts)| format!("{c}:{ts}")).collect();
        url.push_str(&format!("?cursors={}", list.join(",")));
    }
    let reply: Value = http
        .post(url)
        .bearer_auth(token)
        .timeout(CALL_TIMEOUT)
        .send()
        .await?
        .json()
        .await?;
    if reply["ok"] != json!(true) {
        bail!("rtm.connect refused: {reply}");
    }
    let url = reply["url"].as_str().context("rtm.connect has a url")?;
    let (mut ws, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .context("the WebSocket did not open in time")??;
    // Subscribing may take the gateway up to 10 s before `hello`.
    let hello = tokio::time::timeout(CALL_TIMEOUT * 2, next_json(&mut ws))
        .await
        .context("no hello in time")??;
    if hello["type"] != "hello" {
        bail!("the first frame was {hello}, not hello");
    }
    Ok(ws)
}

/// The next JSON text frame; an error when the socket closes or fails.
async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws.next().await.context("the socket ended")?? {
            Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
            Message::Close(frame) => bail!("closed: {frame:?}"),
            _ => continue,
        }
    }
}

/// The current wall clock as a ts: a new client's cursor on channels it has heard nothing on.
fn wall_ts() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    mesh_core::Ts::from_micros(micros).to_string()
}

/// One RTM client (`index` in the recorder) on the gateway at `base`, until `cancel`.
pub async fn client(
    rec: Arc<Recorder>,
    index: usize,
    base: String,
    token: String,
    channels: Vec<String>,
    watch: Vec<String>,
    cancel: CancellationToken,
) {
    let http = reqwest::Client::new();
    let ours: HashSet<String> = channels.iter().cloned().collect();
    let mut cursors: BTreeMap<String, String> = BTreeMap::new();
    while !cancel.is_cancelled() {
        let connected = tokio::select! {
            c = rtm_connect(&http, &base, &token, &cursors) => c,
            () = cancel.cancelled() => break,
        };
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(_) => {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        rec.client(index).sessions.push((rec.now(), None));
        if cursors.is_empty() {
            let now = wall_ts();
            cursors = channels.iter().map(|c| (c.clone(), now.clone())).collect();
        }
        let sub = json!({"type": "presence_sub", "ids": watch}).to_string();
        let mut open = ws.send(Message::Text(sub.into())).await.is_ok();
        while open {
            // Cancel-safe: a frame half-read when the run ends is of no interest.
            // The run ends with the connection still open: its session stays open.
            let frame = tokio::select! {
                f = tokio::time::timeout(SILENCE, next_json(&mut ws)) => f,
                () = cancel.cancelled() => return,
            };
            let Ok(Ok(frame)) = frame else {
                open = false;
                continue;
            };
            let at = rec.now();
            let channel = frame["channel"].as_str().unwrap_or_default();
            match frame["type"].as_str().unwrap_or_default() {
                "message" if ours.contains(channel) => {
                    let ts = frame["ts"].as_str().unwrap_or_default().to_string();
                    if let Some(id) = frame["text"].as_str().and_then(id_of) {
                        rec.client(index).deliveries.push(Delivery {
                            channel: channel.to_string(),
                            ts: ts.clone(),
                            id: id.to_string(),
                            at,
                        });
                    }
                    cursors.insert(channel.to_string(), ts);
                }
                "history_gap" => {
                    rec.client(index).gaps.push(Gap {
                        channel: channel.to_string(),
                        cursor: frame["cursor"].as_str().unwrap_or_default().to_string(),
                        oldest_ts: frame["oldest_ts"].as_str().map(str::to_string),
                        at,
                    });
                }
                "presence_change" => {
                    let presence = frame["presence"].as_str().unwrap_or_default();
                    let users: Vec<&str> = match frame["users"].as_array() {
                        Some(users) => users.iter().filter_map(Value::as_str).collect(),
                        None => frame["user"].as_str().into_iter().collect(),
                    };
                    let mut log = rec.client(index);
                    for user in users {
                        log.presence.push(PresenceChange {
                            user: user.to_string(),
                            presence: presence.to_string(),
                            at,
                        });
                    }
                }
                _ => {
                    if let (true, Some(ts)) = (ours.contains(channel), frame["event_ts"].as_str()) {
                        cursors.insert(channel.to_string(), ts.to_string());
                    }
                }
            }
        }
        let end = rec.now();
        if let Some(session) = rec.client(index).sessions.last_mut() {
            session.1 = Some(end);
        }
        if !cancel.is_cancelled() {
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }
}

/// A publisher's pace: one publish every `every`, numbered, round-robin over the channels.
struct Pace {
    tick: tokio::time::Interval,
    n: u64,
    prefix: String,
    channels: Vec<String>,
}

impl Pace {
    fn new(prefix: String, channels: Vec<String>, every: Duration) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Pace {
            tick,
            n: 0,
            prefix,
            channels,
        }
    }

    /// Waits for the next publish's turn: its number, id and channel; None once `cancel` fires.
    async fn next(&mut self, cancel: &CancellationToken) -> Option<(u64, String, String)> {
        tokio::select! {
            _ = self.tick.tick() => {}
            () = cancel.cancelled() => return None,
        }
        self.n += 1;
        let channel = self.channels[self.n as usize % self.channels.len()].clone();
        Some((self.n, format!("{}-{}", self.prefix, self.n), channel))
    }
}

/// Publishes through RTM `message` frames on the gateway at `base` as `token`'s user, one
/// every `every`, round-robin over `channels`, until `cancel`. Ids are `PREFIX-N`.
pub async fn rtm_publisher(
    rec: Arc<Recorder>,
    prefix: String,
    base: String,
    token: String,
    channels: Vec<String>,
    every: Duration,
    cancel: CancellationToken,
) {
    let http = reqwest::Client::new();
    let mut ws: Option<Ws> = None;
    let mut pace = Pace::new(prefix, channels, every);
    while let Some((n, id, channel)) = pace.next(&cancel).await {
        let sent = rec.now();
        let socket = match ws.as_mut() {
            Some(ws) => ws,
            None => match rtm_connect(&http, &base, &token, &BTreeMap::new()).await {
                Ok(socket) => ws.insert(socket),
                // A publish that could not be sent: the mesh was unavailable to this publisher.
                Err(e) => {
                    rec.publish(Publish {
                        id,
                        channel,
                        via: Via::Rtm,
                        sent,
                        answered: rec.now(),
                        outcome: Outcome::Failed(format!("connect: {e:#}")),
                    });
                    continue;
                }
            },
        };
        let frame =
            json!({"id": n, "type": "message", "channel": channel, "text": format!("chaos {id}")});
        let outcome = match socket.send(Message::Text(frame.to_string().into())).await {
            Err(e) => Outcome::Unknown(format!("send: {e}")),
            Ok(()) => tokio::time::timeout(CALL_TIMEOUT, async {
                loop {
                    match next_json(socket).await {
                        Err(e) => return Outcome::Unknown(e.to_string()),
                        Ok(reply) if reply["reply_to"] == json!(n) => {
                            return match reply["ts"].as_str() {
                                Some(ts) if reply["ok"] == json!(true) => {
                                    Outcome::Acked(ts.to_string())
                                }
                                _ => Outcome::Failed(reply["error"].to_string()),
                            };
                        }
                        Ok(_) => continue,
                    }
                }
            })
            .await
            .unwrap_or_else(|_| Outcome::Unknown("no reply in time".into())),
        };
        if matches!(outcome, Outcome::Unknown(_)) {
            ws = None;
        }
        rec.publish(Publish {
            id,
            channel,
            via: Via::Rtm,
            sent,
            answered: rec.now(),
            outcome,
        });
    }
}

/// Adds the admin bearer token to every call.
#[derive(Debug, Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| tonic::Status::internal("the admin token is not ASCII"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

/// An admin API client for `addr` that reconnects by itself.
pub fn admin(addr: SocketAddr, token: &str) -> anyhow::Result<Admin> {
    let channel = mesh_transport::public_endpoint(&addr.to_string(), None)?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    Ok(AdminClient::with_interceptor(
        channel,
        Bearer(token.to_string()),
    ))
}

/// Publishes through the admin API's PostMessage as `user`, one every `every`, round-robin
/// over `channels`, until `cancel`. Ids are `PREFIX-N`.
pub async fn admin_publisher(
    rec: Arc<Recorder>,
    prefix: String,
    mut admin: Admin,
    user: String,
    channels: Vec<String>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut pace = Pace::new(prefix, channels, every);
    while let Some((_, id, channel)) = pace.next(&cancel).await {
        let request = PostMessageRequest {
            channel: channel.clone(),
            user: user.clone(),
            text: format!("chaos {id}"),
            team: TEAM.to_string(),
            // As a careful web app does: a retry of this post would be the same message.
            idempotency_key: id.clone(),
        };
        let sent = rec.now();
        let outcome = match tokio::time::timeout(CALL_TIMEOUT, admin.post_message(request)).await {
            Ok(Ok(reply)) => Outcome::Acked(reply.into_inner().ts),
            Ok(Err(status)) => {
                Outcome::Failed(format!("{:?}: {}", status.code(), status.message()))
            }
            Err(_) => Outcome::Unknown("no answer in time".into()),
        };
        rec.publish(Publish {
            id,
            channel,
            via: Via::Admin,
            sent,
            answered: rec.now(),
            outcome,
        });
    }
}

/// Asks GetPresence about `users` every second until `cancel`.
pub async fn presence_sampler(
    rec: Arc<Recorder>,
    mut admin: Admin,
    users: Vec<String>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => break,
        }
        let sent = rec.now();
        let request = GetPresenceRequest {
            users: users.clone(),
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, admin.get_presence(request)).await;
        let answered = rec.now();
        let samples: Vec<PresenceSample> = match answer {
            Ok(Ok(reply)) => reply
                .into_inner()
                .users
                .into_iter()
                .map(|u| PresenceSample {
                    user: u.user,
                    sent,
                    answered,
                    presence: u.presence,
                })
                .collect(),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => users
                .iter()
                .filter(|u| status.message().contains(u.as_str()))
                .map(|u| PresenceSample {
                    user: u.clone(),
                    sent,
                    answered,
                    presence: "unavailable".into(),
                })
                .collect(),
            // The admin server itself down or slow: nothing said about presence.
            _ => Vec::new(),
        };
        lock(&rec.presence).extend(samples);
    }
}

/// Reads every channel's retained history every two seconds until `cancel`, and once more at
/// the end.
pub async fn history_reader(
    rec: Arc<Recorder>,
    mut admin: Admin,
    channels: Vec<String>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(HISTORY_EVERY);
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            () = cancel.cancelled() => true,
        };
        for channel in &channels {
            read_history(&rec, &mut admin, channel).await;
        }
        if stop {
            break;
        }
    }
}

/// Reads `channel`'s retained history, page by page, into the recorder.
async fn read_history(rec: &Recorder, admin: &mut Admin, channel: &str) {
    let mut since = String::new();
    loop {
        let request = HistoryRequest {
            channel: channel.to_string(),
            since_ts: since.clone(),
            limit: 1_000,
        };
        let Ok(Ok(reply)) = tokio::time::timeout(CALL_TIMEOUT, admin.history(request)).await else {
            return;
        };
        let reply = reply.into_inner();
        let mut guard = lock(&rec.history);
        let (history, disorder) = &mut *guard;
        let seen = history.entry(channel.to_string()).or_default();
        let mut last = since.clone();
        for event in &reply.events {
            if event.ts <= last && !last.is_empty() {
                *disorder += 1;
            }
            last = event.ts.clone();
            let text = serde_json::from_str::<Value>(&event.event_json)
                .ok()
                .and_then(|v| v["text"].as_str().map(str::to_string));
            if let Some(id) = text.as_deref().and_then(id_of) {
                seen.insert((event.ts.clone(), id.to_string()));
            }
        }
        drop(guard);
        if !reply.has_more || reply.events.is_empty() || last == since {
            return;
        }
        since = last;
    }
}
