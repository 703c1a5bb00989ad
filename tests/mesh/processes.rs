//! Failures of real processes: `channelmesh dev --multi-process`, then SIGKILL, SIGSTOP and
//! a ring manager restart.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use channel_client::wire::event_to_proto;
use mesh_core::{ChannelEvent, ChannelId, EventBody, Identity, NodeId, TeamId, TokenKey, UserId};
use mesh_proto::channel::PublishRequest;
use mesh_proto::channel::channel_server_client::ChannelServerClient;
use mesh_proto::ring::Member;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use crate::support::{
    Rtm, admin_at, eventually, eventually_within, moves, post, post_index, poster, presence_of,
    ring_with, state_of, web_api,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_channelmesh");
/// 32 bytes: the shortest HS256 secret the services take.
const JWT_SECRET: &str = "process-test-secret-process-test";
pub const ADMIN_TOKEN: &str = "process-test-admin";

/// How long a fresh mesh may take to settle: every follower filled.
const SETTLE: Duration = Duration::from_secs(30);

/// `channelmesh dev --multi-process` on ports the OS picks; stopped (SIGTERM) on drop.
pub struct Dev {
    child: Child,
    /// Its stderr, removed when it stops.
    log: PathBuf,
    pub ring_manager: SocketAddr,
    pub ring_manager_pid: u32,
    /// Every ring manager (several on Consul): address and pid.
    pub ring_managers: Vec<(SocketAddr, u32)>,
    pub admin: SocketAddr,
    pub us_east: SocketAddr,
    /// The eu-west gateway's address and pid.
    pub eu_west: (SocketAddr, u32),
    pub presence_ring_manager: SocketAddr,
    /// (id, pid) of each presence server.
    pub presence_servers: Vec<(String, u32)>,
    /// The embedded ring manager's state file (empty: none).
    pub state_file: PathBuf,
    /// `dev`'s state directory: its CA, its children's certificates, the operator's.
    pub state_dir: PathBuf,
    /// The operator credential `dev` wrote there.
    pub operator: mesh_transport::Transport,
}

fn addr_after(line: &str, scheme: &str) -> SocketAddr {
    let rest = &line[line.find(scheme).unwrap() + scheme.len()..];
    let end = rest
        .find(|c: char| c == '/' || c.is_whitespace())
        .unwrap_or(rest.len());
    rest[..end].parse().unwrap()
}

impl Dev {
    /// The embedded ring manager, with a state file.
    pub fn start(name: &str) -> Dev {
        let dir = Self::dir(name);
        let state_file = dir.join("ring.json");
        Self::start_with_state_file(state_file, dir)
    }

    /// [`Dev::start`] without replication (`--replication-factor 1`): a standby takes over a
    /// dead node's slots, for the tests about that case.
    pub fn start_unreplicated(name: &str) -> Dev {
        let dir = Self::dir(name);
        let state_file = dir.join("ring.json");
        let mut args = Self::embedded_args(&state_file);
        args.extend(["--replication-factor".to_string(), "1".to_string()]);
        Self::launch(&args, state_file, dir)
    }

    /// The flags of an embedded ring manager on port 0 with the state file `state_file`.
    pub(crate) fn embedded_args(state_file: &std::path::Path) -> Vec<String> {
        vec![
            "--ring-manager".to_string(),
            "127.0.0.1:0".to_string(),
            "--presence-ring-manager".to_string(),
            "127.0.0.1:0".to_string(),
            "--ring-state-file".to_string(),
            state_file.display().to_string(),
        ]
    }

    /// The embedded ring manager, with the state file `state_file`, in the test's directory
    /// `dir` (see [`Dev::dir`]).
    pub fn start_with_state_file(state_file: PathBuf, dir: PathBuf) -> Dev {
        let args = Self::embedded_args(&state_file);
        Self::launch(&args, state_file, dir)
    }

    /// An empty directory of the test's own: `dev`'s state directory and its ring file.
    pub fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("channelmesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The `--tls-*` flags of the certificate `dev` issued to its child `id`.
    pub fn tls_flags(&self, id: &str) -> Vec<String> {
        let file = |name: &str| self.state_dir.join(name).display().to_string();
        vec![
            format!("--tls-ca={}", file("ca.pem")),
            format!("--tls-cert={}", file(&format!("{id}.pem"))),
            format!("--tls-key={}", file(&format!("{id}.key"))),
        ]
    }

    /// Calling as `dev`'s child `id` (with the certificate `dev` issued to it).
    pub fn as_child(&self, id: &str) -> mesh_transport::Transport {
        let file = |name: &str| self.state_dir.join(name);
        mesh_transport::Transport::Mtls(
            mesh_transport::Credentials::read(
                &file("ca.pem"),
                &file(&format!("{id}.pem")),
                &file(&format!("{id}.key")),
            )
            .unwrap(),
        )
    }

    /// Runs `channelmesh ARGS` as `dev`'s child `id` (with its certificate), output discarded.
    pub fn spawn_as(&self, id: &str, args: &[&str]) -> Child {
        Command::new(BIN)
            .args(args)
            .args(self.tls_flags(id))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The presence server that owns `user` now: its id and pid.
    pub async fn presence_owner(&self, user: &str) -> (String, u32) {
        let (ring, _) = ring_with(self.presence_ring_manager, &self.operator).await;
        let owner = ring
            .owner_of(&ChannelId::new(user).unwrap())
            .unwrap()
            .id
            .to_string();
        let pid = self
            .presence_servers
            .iter()
            .find(|(id, _)| *id == owner)
            .unwrap()
            .1;
        (owner, pid)
    }

    /// Waits until the ring is settled as `factor` says: every active channel server leads
    /// slots, every slot has its `factor - 1` followers, and every follower's copy is filled
    /// (only a copy in sync is promoted with its history). Returns the ring and its members.
    pub async fn settled(&self, factor: u32) -> (mesh_core::Ring, Vec<Member>) {
        eventually_within("every follower filled", SETTLE, || async {
            let (ring, members) = ring_with(self.ring_manager, &self.operator).await;
            let active = members.iter().filter(|m| m.state == "active");
            let leading = active.clone().all(|m| m.slots > 0);
            let followed: u32 = active.clone().map(|m| m.slots_followed).sum();
            let filling: u32 = active.map(|m| m.catching_up).sum();
            let want = mesh_core::SLOT_COUNT as u32 * (factor - 1);
            if leading && followed == want && filling == 0 {
                return Ok((ring, members));
            }
            let seen: Vec<String> = members
                .iter()
                .map(|m| {
                    let (id, state, led) = (&m.id, &m.state, m.slots);
                    let (followed, filling) = (m.slots_followed, m.catching_up);
                    format!("{id} {state} leads {led} follows {followed} filling {filling}")
                })
                .collect();
            Err(format!("epoch {}: {seen:?}", ring.epoch()))
        })
        .await
    }

    /// The channel server that owns `channel` now: its id and pid.
    pub async fn channel_owner(&self, channel: &str) -> (String, u32) {
        let (ring, members) = ring_with(self.ring_manager, &self.operator).await;
        let owner = ring.owner_of(&ChannelId::new(channel).unwrap()).unwrap();
        let member = members.iter().find(|m| m.id == owner.id.as_str()).unwrap();
        (member.id.clone(), member.pid)
    }

    /// On the Consul agent at `consul`, with a ring manager on each of `ring_managers` (they
    /// need fixed ports: a ring manager's address is published before it is bound).
    pub fn on_consul(name: &str, consul: &str, ring_managers: &[SocketAddr]) -> Dev {
        Self::on_consul_with(name, consul, ring_managers, &[])
    }

    /// [`Dev::on_consul`] with more `dev` flags (e.g. `--consul-token`).
    pub fn on_consul_with(
        name: &str,
        consul: &str,
        ring_managers: &[SocketAddr],
        more: &[&str],
    ) -> Dev {
        let mut args = vec![
            "--consul".to_string(),
            consul.to_string(),
            "--consul-prefix".to_string(),
            format!("test-{name}"),
            "--ring-manager".to_string(),
            ring_managers[0].to_string(),
            // A ring manager on Consul needs a fixed port: it is published before it is bound.
            "--presence-ring-manager".to_string(),
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string(),
        ];
        for rm in &ring_managers[1..] {
            args.extend(["--extra-ring-manager".to_string(), rm.to_string()]);
        }
        args.extend(more.iter().map(|s| s.to_string()));
        Self::launch(&args, PathBuf::new(), Self::dir(name))
    }

    /// `dev --multi-process` with `extra` flags, its ring manager's state file (if any) and
    /// its state directory (see [`Dev::dir`]).
    pub fn launch(extra: &[String], state_file: PathBuf, state_dir: PathBuf) -> Dev {
        Self::launch_with_env(extra, &[], state_file, state_dir)
    }

    /// [`Dev::launch`] with `env` set in `dev`'s environment (e.g. the webhooks' secret).
    pub fn launch_with_env(
        extra: &[String],
        env: &[(&str, &str)],
        state_file: PathBuf,
        state_dir: PathBuf,
    ) -> Dev {
        // Its log, to say why when it stops before it is ready.
        static LAUNCHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = LAUNCHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log =
            std::env::temp_dir().join(format!("channelmesh-dev-{}-{n}.log", std::process::id()));
        let mut child = Command::new(BIN)
            .args(["dev", "--multi-process", "--admin", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(&state_dir)
            .args([
                "--us-east",
                "127.0.0.1:0",
                "--eu-west",
                "127.0.0.1:0",
                "--channel-server-port",
                "0",
                "--presence-server-port",
                "0",
            ])
            .args(extra)
            .env("CHANNELMESH_JWT_SECRET", JWT_SECRET)
            .env("CHANNELMESH_ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut ring_managers, mut admin, mut us_east) = (Vec::new(), None, None);
        let (mut eu_west, mut presence_ring_manager, mut presence_servers) =
            (None, None, Vec::new());
        let pid_of = |line: &str| -> u32 {
            line.rsplit("pid ")
                .next()
                .and_then(|p| p.trim().parse().ok())
                .expect("a pid")
        };
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.starts_with("  ring manager") {
                let pid = line
                    .rsplit("pid ")
                    .next()
                    .and_then(|p| p.trim().parse().ok());
                ring_managers.push((
                    addr_after(&line, "grpc://"),
                    pid.expect("the ring manager's pid"),
                ));
            } else if line.starts_with("  admin server") {
                admin = Some(addr_after(&line, "grpc://"));
            } else if line.starts_with("  gateway us-east") {
                us_east = Some(addr_after(&line, "http://"));
            } else if line.starts_with("  gateway eu-west") {
                eu_west = Some((addr_after(&line, "http://"), pid_of(&line)));
            } else if line.starts_with("  presence ring") {
                presence_ring_manager = Some(addr_after(&line, "grpc://"));
            } else if let Some(rest) = line.strip_prefix("  presence server  ") {
                let id = rest.split_whitespace().next().unwrap().to_string();
                presence_servers.push((id, pid_of(&line)));
            } else if line.starts_with("ready in") {
                break;
            }
        }
        if ring_managers.is_empty() || us_east.is_none() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "dev stopped before it was ready; the end of its log:\n{}",
                tail.join("\n")
            );
        }
        // Keep reading its stdout so that it never blocks.
        std::thread::spawn(move || for _ in lines {});
        let (ring_manager, ring_manager_pid) =
            *ring_managers.first().expect("dev printed the ring manager");
        Dev {
            child,
            log,
            ring_manager,
            ring_manager_pid,
            ring_managers,
            admin: admin.expect("dev printed the admin server"),
            us_east: us_east.expect("dev printed the us-east gateway"),
            eu_west: eu_west.expect("dev printed the eu-west gateway"),
            presence_ring_manager: presence_ring_manager.expect("dev printed the presence ring"),
            presence_servers,
            state_file,
            operator: mesh_transport::Transport::Mtls(
                mesh_transport::Credentials::read(
                    &state_dir.join("ca.pem"),
                    &state_dir.join("operator.pem"),
                    &state_dir.join("operator.key"),
                )
                .unwrap(),
            ),
            state_dir,
        }
    }

    pub fn token(&self, user: &str, channels: &[&str]) -> String {
        let now = channelmesh::mesh::unix_now();
        let identity = Identity {
            user: UserId::new(user).unwrap(),
            team: TeamId::new("T1").unwrap(),
            name: None,
            channels: channels
                .iter()
                .map(|c| ChannelId::new(c).unwrap())
                .collect(),
            expires_at: now + 3600,
            jti: None,
        };
        TokenKey::hs256(JWT_SECRET.as_bytes())
            .unwrap()
            .mint(&identity, now)
            .unwrap()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/api/", self.us_east)
    }

    /// The `dev` process's pid (SIGHUP it to reload the policy file everywhere).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
        // KEEP_DEV_LOG=1 keeps the mesh's log (its path: /tmp/channelmesh-dev-PID-N.log).
        if std::env::var_os("KEEP_DEV_LOG").is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

#[tokio::test]
async fn sigkill_of_the_owner_moves_only_its_slots_to_the_standby_and_delivery_resumes() {
    let dev = Dev::start_unreplicated("sigkill");
    let channel = "CKILL";
    let mut client = Rtm::connect(&dev.base_url(), &dev.token("UREADER", &[channel]))
        .await
        .unwrap();
    let admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let (before, members) = ring_with(dev.ring_manager, &dev.operator).await;
    let victim = before
        .owner_of(&ChannelId::new(channel).unwrap())
        .unwrap()
        .id
        .to_string();
    let pid = members.iter().find(|m| m.id == victim).unwrap().pid;

    // Posts keep coming.
    let stop = CancellationToken::new();
    let posting = poster(&admin, channel, stop.clone());
    client
        .expect("a first message", |v| v["type"] == "message")
        .await;

    signal(pid, Signal::SIGKILL);
    let killed_at = Instant::now();
    let first_after_kill = posting.next_index();
    client
        .expect("a message posted after the kill", |v| {
            post_index(v).is_some_and(|i| i >= first_after_kill)
        })
        .await;
    let resumed_in = killed_at.elapsed();
    stop.cancel();
    let (_, failed) = posting.finish().await;
    assert_eq!(failed, 0, "no post failed across the kill");
    println!(
        "kill -9 of {victim} -> delivery resumed in {} ms",
        resumed_in.as_millis()
    );

    let (after, members) = ring_with(dev.ring_manager, &dev.operator).await;
    assert!(after.epoch() > before.epoch());
    let moved = moves(&before, &after);
    let owned = before.slots_owned(&NodeId::new(&victim).unwrap());
    assert_eq!(moved.len(), owned, "only the dead node's slots move");
    assert!(
        moved
            .iter()
            .all(|(_, from, to)| *from == victim && to == "cs-4")
    );
    println!(
        "slots moved: {} of {} ({:.1}%)",
        moved.len(),
        mesh_core::SLOT_COUNT,
        100.0 * moved.len() as f64 / mesh_core::SLOT_COUNT as f64
    );
    assert_eq!(state_of(&members, &victim), "down");
    assert_eq!(state_of(&members, "cs-4"), "active");
}

#[tokio::test]
async fn a_node_declared_dead_that_comes_back_is_refused() {
    let dev = Dev::start("fence");
    let channel = ChannelId::new("CFENCED").unwrap();
    let (before, members) = ring_with(dev.ring_manager, &dev.operator).await;
    let victim = before.owner_of(&channel).unwrap().clone();
    let pid = members
        .iter()
        .find(|m| m.id == victim.id.as_str())
        .unwrap()
        .pid;

    // Frozen: it holds its socket open but says nothing, until declared down.
    signal(pid, Signal::SIGSTOP);
    let frozen = Instant::now();
    eventually("the frozen node is declared down", || async {
        let (_, members) = ring_with(dev.ring_manager, &dev.operator).await;
        (state_of(&members, victim.id.as_str()) == "down").then_some(())
    })
    .await;
    println!(
        "SIGSTOP of {} -> declared down after {} ms",
        victim.id,
        frozen.elapsed().as_millis()
    );
    signal(pid, Signal::SIGCONT);

    // Back at once, with the old ring in memory: it must not serve the slot it lost.
    // As the admin server would publish, with its certificate.
    let connection = mesh_transport::endpoint_with(&victim.addr, &dev.as_child("admin-1"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stale = ChannelServerClient::new(connection);
    let event = ChannelEvent {
        channel: channel.clone(),
        ts: None,
        body: EventBody::Message {
            user: UserId::new("U1").unwrap(),
            text: "stale".into(),
            team: None,
        },
        origin: None,
    };
    let refused = stale
        .publish(PublishRequest {
            epoch: before.epoch(),
            event: Some(event_to_proto(&event)),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused.code(),
            tonic::Code::Unavailable | tonic::Code::FailedPrecondition
        ),
        "{refused:?}"
    );

    // The mesh serves the channel elsewhere, and the node comes back as a standby.
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    post(
        &mut admin,
        channel.as_str(),
        "U1",
        "served by the new owner",
    )
    .await;
    eventually("the fenced node re-registers as a standby", || async {
        let (_, members) = ring_with(dev.ring_manager, &dev.operator).await;
        (state_of(&members, victim.id.as_str()) == "standby").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_ring_manager_frozen_past_the_silence_limit_wakes_and_declares_nobody_down() {
    let dev = Dev::start("rm-frozen");
    let channel = "CFROZEN";
    let mut client = Rtm::connect(&dev.base_url(), &dev.token("UREADER", &[channel]))
        .await
        .unwrap();
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    post(&mut admin, channel, "UPOSTER", "before the freeze").await;
    client
        .expect("the first post", |v| v["type"] == "message")
        .await;
    let (before, _) = ring_with(dev.ring_manager, &dev.operator).await;

    signal(dev.ring_manager_pid, Signal::SIGSTOP);
    // A deliberate window: frozen for longer than the silence limit (2 s), past which the
    // monitor declares a silent node down without a probe.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(dev.ring_manager_pid, Signal::SIGCONT);

    // Awake, it renews the leases (posts succeed again)...
    let ts = eventually("a post after the ring manager wakes", || async {
        let request = mesh_proto::admin::PostMessageRequest {
            channel: channel.into(),
            user: "UPOSTER".into(),
            text: "after the freeze".into(),
            team: String::new(),
            idempotency_key: String::new(),
        };
        admin
            .clone()
            .post_message(request)
            .await
            .map(|r| r.into_inner().ts)
    })
    .await;
    let got = client
        .expect("the post after the freeze", |v| {
            v["text"] == "after the freeze"
        })
        .await;
    assert_eq!(got["ts"], ts.as_str());
    // ...and its own freeze counted as nobody's silence: the ring is the one before, every
    // node still in it.
    let (after, members) = ring_with(dev.ring_manager, &dev.operator).await;
    assert_eq!(after.epoch(), before.epoch(), "{members:?}");
    assert!(after.same_assignment(&before));
    assert!(members.iter().all(|m| m.state != "down"), "{members:?}");
}

#[tokio::test]
async fn the_data_plane_outlives_the_ring_manager_which_restarts_with_the_same_ring() {
    let dev = Dev::start("rm-restart");
    let channel = "CSTATIC";
    let mut client = Rtm::connect(&dev.base_url(), &dev.token("UREADER", &[channel]))
        .await
        .unwrap();
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let (before, _) = ring_with(dev.ring_manager, &dev.operator).await;

    signal(dev.ring_manager_pid, Signal::SIGKILL);
    // A clock that must pass, not a wait for an event: well past the lease length (400 ms),
    // the channel servers keep serving on the ring they know (static stability). Nothing the
    // test can observe marks the moment a lease would have lapsed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..3 {
        let ts = post(
            &mut admin,
            channel,
            "UPOSTER",
            &format!("while the ring manager is down {i}"),
        )
        .await;
        let got = client
            .expect("a message posted without a ring manager", |v| {
                v["type"] == "message"
            })
            .await;
        assert_eq!(got["ts"], ts.as_str());
    }

    // A new ring manager on the same address and state file resumes the same ring.
    let mut restarted = Command::new(BIN)
        .args([
            "ring-manager",
            "--listen",
            &dev.ring_manager.to_string(),
            "--state-file",
        ])
        .arg(&dev.state_file)
        .args(dev.tls_flags("rm-1"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let after = eventually("the restarted ring manager answers", || async {
        let channel = mesh_transport::endpoint_with(&dev.ring_manager.to_string(), &dev.operator)
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = mesh_proto::ring::ring_manager_client::RingManagerClient::new(channel);
        let proto = client
            .get_ring(mesh_proto::ring::GetRingRequest {})
            .await
            .ok()?
            .into_inner();
        ring_client::convert::ring_from_proto(proto).ok()
    })
    .await;
    assert!(
        after.same_assignment(&before),
        "the same epoch and slot owners: {after:?} vs {before:?}"
    );
    // The channel servers' leases carry over: nobody is declared down, nothing moves. A
    // deliberate "nothing happens" window, longer than the ring manager's suspicion delay and
    // probe (500 + 200 ms): no later event proves that a declaration did not happen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (later, members) = ring_with(dev.ring_manager, &dev.operator).await;
    assert!(later.same_assignment(&before), "{later:?} vs {before:?}");
    assert!(
        members
            .iter()
            .filter(|m| m.id != "cs-4")
            .all(|m| m.state == "active"),
        "{members:?}"
    );
    let ts = post(&mut admin, channel, "UPOSTER", "after the restart").await;
    let got = client
        .expect("a message after the restart", |v| {
            v["text"] == "after the restart"
        })
        .await;
    assert_eq!(got["ts"], ts.as_str());
    let _ = restarted.kill();
    let _ = restarted.wait();
}

#[tokio::test]
async fn a_frozen_gateway_loses_its_lease_and_its_users_go_away() {
    let dev = Dev::start("frozen-gateway");
    let mut a = Rtm::connect(&dev.base_url(), &dev.token("UA", &[]))
        .await
        .unwrap();
    let eu = format!("http://{}/api/", dev.eu_west.0);
    let _b = Rtm::connect(&eu, &dev.token("UB", &[])).await.unwrap();
    a.send(serde_json::json!({"type": "presence_sub", "ids": ["UB"]}))
        .await;
    a.expect("B active", |v| presence_of(v, "UB", "active"))
        .await;
    // Frozen, B's socket and the gateway's presence session stay open but say nothing: only
    // the lease (3 s) and then the grace period (2 s) turn B away.
    signal(dev.eu_west.1, Signal::SIGSTOP);
    let frozen = Instant::now();
    a.expect("B away once the gateway's lease lapsed", |v| {
        presence_of(v, "UB", "away")
    })
    .await;
    println!(
        "gateway SIGSTOP -> its user away after {} ms",
        frozen.elapsed().as_millis()
    );
    signal(dev.eu_west.1, Signal::SIGCONT);
}

#[tokio::test]
async fn get_presence_answers_unavailable_rather_than_away_while_the_users_presence_server_is_silent()
 {
    let dev = Dev::start("presence-silent");
    let token = dev.token("UON", &[]);
    let _online = Rtm::connect(&dev.base_url(), &token).await.unwrap();
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    let ask = || mesh_proto::admin::GetPresenceRequest {
        users: vec!["UON".into()],
    };
    eventually("UON active", || async {
        let reply = admin.clone().get_presence(ask()).await.ok()?.into_inner();
        (reply.users[0].presence == "active").then_some(())
    })
    .await;
    let (_, pid) = dev.presence_owner("UON").await;
    // Frozen: its socket accepts, nothing answers. The admin API's and the gateway's calls,
    // made at once, are routed to it (the ring still names it) and wait out their deadline.
    signal(pid, Signal::SIGSTOP);
    let base = dev.base_url();
    let (refused, web) = tokio::join!(
        admin.get_presence(ask()),
        web_api(&base, "users.getPresence", Some(&token))
    );
    signal(pid, Signal::SIGCONT);
    let status = refused.expect_err("no guess while the owner is silent");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("UON"), "{status:?}");
    assert_eq!(
        web,
        serde_json::json!({"ok": false, "error": "presence_unavailable"})
    );
}

#[tokio::test]
async fn a_killed_presence_server_is_replaced_and_watchers_keep_the_right_state() {
    let dev = Dev::start("presence-kill");
    let mut a = Rtm::connect(&dev.base_url(), &dev.token("UA", &[]))
        .await
        .unwrap();
    let eu = format!("http://{}/api/", dev.eu_west.0);
    let mut b = Rtm::connect(&eu, &dev.token("UB", &[])).await.unwrap();
    a.send(serde_json::json!({"type": "presence_sub", "ids": ["UB"]}))
        .await;
    a.expect("B active", |v| presence_of(v, "UB", "active"))
        .await;
    let (owner, pid) = dev.presence_owner("UB").await;
    signal(pid, Signal::SIGKILL);
    eventually("another presence server owns B", || async {
        let (after, _) = ring_with(dev.presence_ring_manager, &dev.operator).await;
        (after.owner_of(&ChannelId::new("UB").unwrap())?.id.as_str() != owner).then_some(())
    })
    .await;
    // Rebuilt from the gateways' re-reports: no away/active flap for A...
    a.expect_none(
        Duration::from_millis(1500),
        "a presence change while B stayed online",
        |v| presence_of(v, "UB", "away") || presence_of(v, "UB", "active"),
    )
    .await;
    // ...and the new owner tracks B from here on.
    b.ws.close(None).await.unwrap();
    a.expect("B away, from the new owner", |v| {
        presence_of(v, "UB", "away")
    })
    .await;
}

#[tokio::test]
async fn a_presence_failover_with_no_standby_left_flaps_nobody_online_in_the_other_region() {
    let dev = Dev::start("presence-no-standby");
    let users: Vec<String> = (0..8).map(|i| format!("UB{i}")).collect();
    let eu = format!("http://{}/api/", dev.eu_west.0);
    let mut online = Vec::new();
    for user in &users {
        online.push(Rtm::connect(&eu, &dev.token(user, &[])).await.unwrap());
    }
    let mut a = Rtm::connect(&dev.base_url(), &dev.token("UA", &[]))
        .await
        .unwrap();
    a.send(serde_json::json!({"type": "presence_sub", "ids": users}))
        .await;
    let mut active = std::collections::HashSet::new();
    while active.len() < users.len() {
        let v = a
            .expect("the eu-west users active", |v| {
                users.iter().any(|u| presence_of(v, u, "active"))
            })
            .await;
        active.extend(users.iter().filter(|u| presence_of(&v, u, "active")));
    }
    let flapped = |v: &serde_json::Value| users.iter().any(|u| presence_of(v, u, "away"));
    let mut pids: std::collections::HashMap<String, u32> =
        dev.presence_servers.iter().cloned().collect();
    // First the standby goes, so that each failover spreads a server's users over the
    // survivor, which learns of them from the ring and from the gateways in either order.
    let (_, members) = ring_with(dev.presence_ring_manager, &dev.operator).await;
    let standby = members
        .iter()
        .find(|m| m.state == "standby")
        .expect("dev runs a presence standby")
        .id
        .clone();
    signal(pids[&standby], Signal::SIGKILL);
    eventually("the presence standby declared down", || async {
        let (_, members) = ring_with(dev.presence_ring_manager, &dev.operator).await;
        (state_of(&members, &standby) != "standby").then_some(())
    })
    .await;
    // Which of the two learns first is a race: a few rounds of kill and rejoin.
    let mut restarted = Reaped(Vec::new());
    for round in 0..5 {
        let (victim, _) = dev.presence_owner(&users[0]).await;
        signal(pids[&victim], Signal::SIGKILL);
        eventually("the survivor owns every slot", || async {
            let (after, _) = ring_with(dev.presence_ring_manager, &dev.operator).await;
            (after.slots_owned(&NodeId::new(&victim).unwrap()) == 0
                && after
                    .owner_of(&ChannelId::new(&users[0]).unwrap())
                    .is_some())
            .then_some(())
        })
        .await;
        // Nobody in eu-west went offline: A must hear no away while the survivor warms up
        // (1.5 s) or after; twice the warm-up covers both.
        a.expect_none(
            Duration::from_secs(3),
            &format!("an away while every eu-west user stayed online (round {round})"),
            flapped,
        )
        .await;
        // The victim comes back and takes half the slots (and users) back: no flap either.
        let child = dev.spawn_as(
            &victim,
            &[
                "presence-server",
                "--id",
                &victim,
                "--listen",
                "127.0.0.1:0",
                "--ring-manager",
                &format!("http://{}", dev.ring_manager),
                "--presence-ring-manager",
                &format!("http://{}", dev.presence_ring_manager),
            ],
        );
        pids.insert(victim.clone(), child.id());
        restarted.0.push(child);
        eventually("the victim back with slots", || async {
            let (after, _) = ring_with(dev.presence_ring_manager, &dev.operator).await;
            (after.slots_owned(&NodeId::new(&victim).unwrap()) > 0).then_some(())
        })
        .await;
        a.expect_none(
            Duration::from_secs(3),
            &format!("an away while the victim rejoined (round {round})"),
            flapped,
        )
        .await;
    }
    // The owners track the users from here on.
    online[0].ws.close(None).await.unwrap();
    a.expect("UB0 away", |v| presence_of(v, &users[0], "away"))
        .await;
}

/// Child processes a test started, killed when it ends (however it ends).
struct Reaped(Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP proxy in front of one address: from [`HeldReplies::hold`] on, whatever the server
/// sends back over any connection in the next `for` is held until it passes, so that a call
/// the server answered at once is answered late.
#[derive(Clone, Default)]
struct HeldReplies(std::sync::Arc<std::sync::Mutex<Option<tokio::time::Instant>>>);

impl HeldReplies {
    fn hold(&self, r#for: Duration) {
        *self.0.lock().unwrap() = Some(tokio::time::Instant::now() + r#for);
    }

    /// Serves the proxy on `listener`, forwarding to `to`, for as long as the test runs.
    fn serve(&self, listener: tokio::net::TcpListener, to: SocketAddr) {
        let held = self.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                });
                let held = held.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let until = *held.0.lock().unwrap();
                        if let Some(until) = until {
                            tokio::time::sleep_until(until).await;
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
}

#[tokio::test]
async fn a_publish_applied_but_answered_after_the_attempt_timeout_is_stored_once_with_one_ts() {
    let dev = Dev::start("idempotent-retry");
    // A channel server of our own (the standby's identity) behind a proxy: the ring names the
    // proxy, so every call to it, the admin server's publishes included, goes through it.
    let (_, members) = ring_with(dev.ring_manager, &dev.operator).await;
    let standby = members.iter().find(|m| m.state == "standby").unwrap();
    let id = standby.id.clone();
    signal(standby.pid, Signal::SIGKILL);
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let held = HeldReplies::default();
    held.serve(proxy, listen);
    let child = dev.spawn_as(
        &id,
        &[
            "channel-server",
            "--id",
            &id,
            "--listen",
            &listen.to_string(),
            "--advertise",
            &proxy_addr.to_string(),
            "--ring-manager",
            &format!("http://{}", dev.ring_manager),
        ],
    );
    let _reaped = Reaped(vec![child]);
    let node = NodeId::new(&id).unwrap();
    let channel = eventually("our channel server active with slots", || async {
        let (ring, members) = ring_with(dev.ring_manager, &dev.operator).await;
        (state_of(&members, &id) == "active" && ring.slots_owned(&node) > 0).then_some(())?;
        (0..10_000)
            .map(|i| format!("CIDEM{i}"))
            .find(|c| ring.owner_of(&ChannelId::new(c).unwrap()).unwrap().id == node)
    })
    .await;
    let mut admin = admin_at(dev.admin, ADMIN_TOKEN).await;
    // Once answered at once, so that the admin server's publish stream is open...
    eventually("a first post through the proxy", || async {
        let mut admin = admin.clone();
        let reply = admin
            .post_message(mesh_proto::admin::PostMessageRequest {
                channel: channel.clone(),
                user: "UPOSTER".into(),
                text: "warm-up".into(),
                team: String::new(),
                idempotency_key: String::new(),
            })
            .await;
        reply.ok().map(drop)
    })
    .await;
    // ...then applied at once but answered after the router's 2 s attempt timeout: the
    // router retries on the same channel server, which has the event already.
    held.hold(Duration::from_millis(2500));
    let ts = post(&mut admin, &channel, "UPOSTER", "once only").await;
    let history = admin
        .history(mesh_proto::admin::HistoryRequest {
            channel: channel.clone(),
            since_ts: String::new(),
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let copies: Vec<&str> = history
        .events
        .iter()
        .filter(|e| e.event_json.contains("once only"))
        .map(|e| e.ts.as_str())
        .collect();
    assert_eq!(
        copies,
        [ts.as_str()],
        "stored once, with the ts acknowledged"
    );
}
