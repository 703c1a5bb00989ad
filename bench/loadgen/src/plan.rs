//! What a run does and who is in which channel: derived the same way, from the same [`Plan`],
//! by the coordinator and by every worker, so only the parameters travel between processes.

use std::net::IpAddr;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Few channels, many subscribers each.
    Fanout,
    /// Many small channels (mostly 2-5 members online, a few larger), a publisher in each.
    Chat,
    /// Connect/disconnect churn while the rest stay connected.
    ConnectStorm,
    /// As many connections as asked, held: memory per connection.
    Idle,
}

/// The server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// channelmesh gateways, through the RTM connect flow.
    Channelmesh,
    /// nats-server's WebSocket listener.
    Nats,
}

/// Who publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PublishMode {
    /// gRPC `PostMessage` calls to the admin server (channelmesh only).
    Admin,
    /// Designated member clients, over their own WebSocket (shape `per-channel`).
    Clients,
    /// One extra connection (worker 0's) publishing to every channel in turn (shape
    /// `firehose`): for channelmesh a member of every channel, for nats a plain connection. It
    /// receives nothing (no echo) and is not counted as a receiver.
    Firehose,
}

/// The publish shape of an open-loop run (`--shape`), each a [`PublishMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// (a) One publisher connection per channel: its first member.
    PerChannel,
    /// (b) One connection publishing to every channel round-robin.
    Firehose,
    /// (c) The web app's path: the admin API's `PublishStream` from one process.
    Admin,
}

impl Shape {
    pub fn publish(self) -> PublishMode {
        match self {
            Shape::PerChannel => PublishMode::Clients,
            Shape::Firehose => PublishMode::Firehose,
            Shape::Admin => PublishMode::Admin,
        }
    }
}

/// Admin-API publishers in a whole run (each one gRPC client, one call at a time), spread over
/// the workers.
pub const ADMIN_PUBLISHERS: usize = 8;

/// Everything a worker needs: the first line on its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub scenario: Scenario,
    pub target: Target,
    pub publish: PublishMode,
    /// Where clients connect, round-robin by client index: RTM base URLs (channelmesh) or
    /// WebSocket URLs (nats).
    pub gateways: Vec<String>,
    /// The admin server, "host:port" (channelmesh with `--publish admin`).
    pub admin: String,
    pub admin_token: String,
    pub jwt_secret: String,
    /// Clients in the whole run.
    pub clients: usize,
    pub channels: usize,
    /// Message size in bytes (at least the timestamp header).
    pub payload: usize,
    /// Messages per second over the whole run; 0: as fast as the window allows.
    pub rate: u64,
    /// Unacknowledged messages one publisher may have outstanding.
    pub window: usize,
    /// connect-storm: the fraction of clients that reconnect per second.
    pub churn: f64,
    /// Seeds the chat scenario's channel sizes.
    pub seed: u64,
    /// Makes channel and user ids unique to this run.
    pub run: u64,
    /// Worker processes in the run, and this one's index.
    pub processes: usize,
    pub worker: usize,
    /// The address this worker's sockets are bound to.
    pub source: IpAddr,
    /// Connects in progress at once, per worker.
    pub connect_parallel: usize,
    /// Open loop: publishers never wait for acknowledgements (acks are read and counted).
    #[serde(default)]
    pub open_loop: bool,
    /// Open-loop admin publishing: `PublishStream` streams, all in worker 0.
    #[serde(default = "one")]
    pub admin_streams: usize,
}

fn one() -> usize {
    1
}

impl Plan {
    /// Channel `c`'s id (and NATS subject).
    pub fn channel(&self, c: u32) -> String {
        format!("C{}X{c}", self.run)
    }

    /// Client `i`'s user id.
    pub fn user(&self, i: usize) -> String {
        format!("U{}X{i}", self.run)
    }

    /// The clients this worker runs: every `processes`-th, starting at its index; worker 0
    /// also runs the firehose connection (index `clients`) with `--shape firehose`.
    pub fn mine(&self) -> impl Iterator<Item = usize> + use<> {
        let firehose =
            (self.publish == PublishMode::Firehose && self.worker == 0).then_some(self.clients);
        (self.worker..self.clients)
            .step_by(self.processes.max(1))
            .chain(firehose)
    }

    /// Whether member `index` is the firehose connection.
    pub fn is_firehose(&self, index: usize) -> bool {
        self.publish == PublishMode::Firehose && index == self.clients
    }

    /// Whether the admin API publishes with `PublishStream` (open loop) rather than
    /// `PostMessage` calls one at a time.
    pub fn admin_streams(&self) -> bool {
        self.publish == PublishMode::Admin && self.open_loop
    }

    /// Publishing clients in the whole run, counted once per channel they publish to.
    pub fn publisher_slots(&self, members: &[Member]) -> usize {
        match self.publish {
            PublishMode::Admin if self.open_loop => self.admin_streams.max(1),
            PublishMode::Admin => ADMIN_PUBLISHERS,
            PublishMode::Clients | PublishMode::Firehose => {
                members.iter().map(|m| m.publishes.len()).sum()
            }
        }
    }
}

/// One client's part in the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Member {
    /// Channels it is in (indexes).
    pub channels: Vec<u32>,
    /// Channels it publishes to, in turn (with `--publish clients`).
    pub publishes: Vec<u32>,
}

/// Every client's channels and publishing duty.
///
/// - fanout: client `i` is in channel `i % channels`; with client publishing, the first
///   member of each channel (client `c`) publishes to it.
/// - chat: channel sizes are drawn (seeded): 95% have 2-5 members, 5% have 10-50; members are
///   consecutive clients, wrapping, so a client is in several channels when the sizes add up
///   to more than the clients. Each channel's first member publishes to it.
/// - connect-storm, idle: client `i` is in channel `i % channels`; nobody publishes.
/// - with `--shape firehose`, nobody of the above publishes; one more member (index
///   `clients`) is in every channel and publishes to every one in turn.
pub fn members(plan: &Plan) -> Vec<Member> {
    let n = plan.clients;
    let mut members = vec![Member::default(); n];
    if n == 0 || plan.channels == 0 {
        return members;
    }
    let publish = plan.publish == PublishMode::Clients;
    match plan.scenario {
        Scenario::Fanout | Scenario::ConnectStorm | Scenario::Idle => {
            for (i, m) in members.iter_mut().enumerate() {
                let c = (i % plan.channels) as u32;
                m.channels.push(c);
                if publish && plan.scenario == Scenario::Fanout && i < plan.channels {
                    m.publishes.push(c);
                }
            }
        }
        Scenario::Chat => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
            let mut cursor = 0usize;
            for c in 0..plan.channels as u32 {
                let size = if rng.random_bool(0.05) {
                    rng.random_range(10..=50)
                } else {
                    rng.random_range(2..=5)
                };
                let size = usize::min(size, n);
                for k in 0..size {
                    members[(cursor + k) % n].channels.push(c);
                }
                if publish {
                    members[cursor % n].publishes.push(c);
                }
                cursor = (cursor + size) % n;
            }
        }
    }
    if plan.publish == PublishMode::Firehose {
        let all: Vec<u32> = (0..plan.channels as u32).collect();
        members.push(Member {
            channels: all.clone(),
            publishes: all,
        });
    }
    members
}

/// Per channel, the members that receive a message published to it: all of them with admin
/// publishing, all but the publisher with client publishing (neither RTM nor NATS with
/// `echo:false` sends a message back to the connection that sent it).
pub fn receivers_of(plan: &Plan, member: &Member, out: &mut [u32]) {
    for &c in &member.channels {
        let sender = plan.publish != PublishMode::Admin && member.publishes.contains(&c);
        if !sender && let Some(n) = out.get_mut(c as usize) {
            *n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(scenario: Scenario, clients: usize, channels: usize) -> Plan {
        Plan {
            scenario,
            target: Target::Nats,
            publish: PublishMode::Clients,
            gateways: vec![],
            admin: String::new(),
            admin_token: String::new(),
            jwt_secret: String::new(),
            clients,
            channels,
            payload: 200,
            rate: 0,
            window: 16,
            churn: 0.1,
            seed: 7,
            run: 1,
            processes: 3,
            worker: 1,
            source: IpAddr::from([127, 0, 0, 3]),
            connect_parallel: 8,
            open_loop: false,
            admin_streams: 1,
        }
    }

    #[test]
    fn fanout_has_one_publisher_per_channel_and_the_rest_receive() {
        let p = plan(Scenario::Fanout, 100, 10);
        let m = members(&p);
        assert_eq!(p.publisher_slots(&m), 10);
        let mut receivers = vec![0; 10];
        m.iter().for_each(|m| receivers_of(&p, m, &mut receivers));
        assert_eq!(receivers, vec![9; 10]);
    }

    #[test]
    fn chat_channels_are_small_mostly_and_every_one_has_a_publisher() {
        let p = plan(Scenario::Chat, 1000, 2000);
        let m = members(&p);
        let mut sizes = vec![0u32; 2000];
        for member in &m {
            for &c in &member.channels {
                sizes[c as usize] += 1;
            }
        }
        assert!(sizes.iter().all(|&s| (2..=50).contains(&s)));
        let small = sizes.iter().filter(|&&s| s <= 5).count();
        assert!(small > 1800, "{small} of 2000 channels have 2-5 members");
        assert_eq!(p.publisher_slots(&m), 2000);
        // The same plan gives the same channels in every process.
        assert_eq!(members(&p), m);
    }

    #[test]
    fn the_firehose_is_one_more_member_that_publishes_everywhere_and_receives_nothing() {
        let mut p = plan(Scenario::Fanout, 100, 10);
        p.publish = PublishMode::Firehose;
        let m = members(&p);
        assert_eq!(m.len(), 101);
        assert!(m[..100].iter().all(|m| m.publishes.is_empty()));
        assert_eq!(m[100].publishes.len(), 10);
        assert_eq!(p.publisher_slots(&m), 10);
        let mut receivers = vec![0; 10];
        m.iter().for_each(|m| receivers_of(&p, m, &mut receivers));
        assert_eq!(receivers, vec![10; 10]);
        p.worker = 0;
        assert_eq!(p.mine().last(), Some(100));
        assert!(p.is_firehose(100));
        p.worker = 1;
        assert_eq!(p.mine().last(), Some(97));
    }

    #[test]
    fn workers_split_the_clients_without_overlap() {
        let p = plan(Scenario::Idle, 10, 1);
        assert_eq!(p.mine().collect::<Vec<_>>(), vec![1, 4, 7]);
    }
}
