//! Token hygiene, attacked through the real interfaces: a short HS256 secret is refused by every
//! entry point that takes one; every minted token carries a fresh `jti` and can be revoked;
//! `iss`/`aud` are enforced when configured and ignored when not; a token sent as `?token=`
//! appears in no log line of a gateway (the real process, at trace level); and the admin
//! server's reflection shows the public API alone.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use channelmesh::MeshConfig;
use mesh_core::{ChannelId, Identity, IssuerAudience, TeamId, TokenKey, UserId};
use mesh_proto::admin::{MintTokenRequest, RevokeTokensRequest, RevokedToken};
use mesh_transport::Role;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::reflection::reflect;
use crate::support::{Rtm, WAIT, admin, admin_at, child_tls, eventually, mesh, mesh_with, web_api};

const BIN: &str = env!("CARGO_BIN_EXE_channelmesh");

/// The refusal every entry point gives a 9-byte secret.
const SHORT_REFUSAL: &str =
    "CHANNELMESH_JWT_SECRET: the HS256 secret is 9 bytes; it must be at least 32 bytes";

/// The issuer and audience of the meshes that check them.
const ISSUER: &str = "https://webapp.example";
const AUDIENCE: &str = "channelmesh";

fn claims(issuer: &str, audience: &str) -> IssuerAudience {
    IssuerAudience::new(Some(issuer.into()), Some(audience.into()))
}

/// Runs `channelmesh args` with `secret`, which must exit with an error within [`WAIT`]; its
/// stderr.
fn refused(args: &[&str], secret: &str) -> String {
    let log = std::env::temp_dir().join(format!(
        "channelmesh-refused-{}-{}.log",
        std::process::id(),
        args[0]
    ));
    // The services get a certificate: what is refused is the secret, not the transport.
    let tls = match args[0] {
        "gateway" => child_tls(Role::Gateway, "us-east-1"),
        "admin-server" => child_tls(Role::Admin, "admin-refused"),
        _ => Vec::new(),
    };
    let mut child = Command::new(BIN)
        .args(&tls)
        .args(args)
        .env("CHANNELMESH_JWT_SECRET", secret)
        .env("CHANNELMESH_ADMIN_TOKEN", "attack-admin-token")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} started with the secret {secret:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
    stderr
}

#[tokio::test]
async fn every_entry_point_refuses_a_short_hs256_secret() {
    let any = "127.0.0.1:0";
    let entry_points: [&[&str]; 4] = [
        &["gateway", "--region", "us-east", "--listen", any],
        &["admin-server", "--listen", any],
        &["token", "--user", "U1", "--team", "T1"],
        &[
            "dev",
            "--admin",
            any,
            "--ring-manager",
            any,
            "--us-east",
            any,
            "--eu-west",
            any,
            "--channel-server-port",
            "0",
            "--presence-ring-manager",
            any,
            "--presence-server-port",
            "0",
        ],
    ];
    for args in entry_points {
        let stderr = refused(args, "devsecret");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(SHORT_REFUSAL),
            "{args:?}: {stderr}"
        );
        // One byte short is as short.
        let stderr = refused(args, &"x".repeat(31));
        assert!(stderr.contains("is 31 bytes"), "{args:?}: {stderr}");
    }
    // 32 bytes is enough.
    cli_token(&"x".repeat(32), &[], &[]);

    // The libraries refuse it too, whoever builds their configuration.
    let mesh = mesh().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = gateway::Config {
        id: "short-1".into(),
        region: "short".into(),
        ring: ring_client::RingSource::Direct(format!("http://{}", mesh.ring_manager)),
        presence_ring: None,
        public_url: None,
        jwt_secret: b"devsecret".to_vec(),
        connect_url_ttl: gateway::tickets::DEFAULT_TICKET_TTL,
        limits: Default::default(),
        tokens: Default::default(),
        redirect_allow: Default::default(),
        policy_file: None,
        boot: None,
    };
    let error = gateway::serve(gateway, listener, CancellationToken::new())
        .await
        .expect_err("a gateway with a short secret does not start")
        .to_string();
    assert!(error.contains("must be at least 32 bytes"), "{error}");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_server::Config {
        ring: ring_client::RingSource::Direct(format!("http://{}", mesh.ring_manager)),
        presence_ring: None,
        admin_token: "attack-admin-token".into(),
        jwt_secret: b"devsecret".to_vec(),
        jwt_claims: IssuerAudience::default(),
        telemetry: Default::default(),
        public_tls: None,
    };
    let error = admin_server::serve(admin, listener, CancellationToken::new())
        .await
        .expect_err("an admin server with a short secret does not start")
        .to_string();
    assert_eq!(
        error,
        SHORT_REFUSAL.to_string() + " (e.g. 32 random bytes as 64 hex digits)"
    );
}

/// `channelmesh token` with `secret` and `env`: (the token, its jti, its expiry) as printed.
fn cli_token(secret: &str, env: &[(&str, &str)], args: &[&str]) -> (String, String, u64) {
    let out = Command::new(BIN)
        .args(["token", "--user", "U1", "--team", "T1", "--channel", "C1"])
        .args(args)
        .env("CHANNELMESH_JWT_SECRET", secret)
        .env_remove("CHANNELMESH_JWT_ISSUER")
        .env_remove("CHANNELMESH_JWT_AUDIENCE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // "jti J expires E (revoke: channelmesh ctl revoke J --until E)"
    let words: Vec<&str> = stderr.split_whitespace().collect();
    assert_eq!(words[0..1], ["jti"], "{stderr}");
    assert_eq!(words[2], "expires", "{stderr}");
    (token, words[1].to_string(), words[3].parse().unwrap())
}

/// A token's claims, unverified.
fn claims_of(token: &str) -> Value {
    jsonwebtoken::dangerous::insecure_decode_claims(token).unwrap()
}

#[tokio::test]
async fn every_minted_token_has_a_fresh_jti_and_can_be_revoked() {
    let mesh = mesh().await;
    let base = mesh.rtm_base_url("us-east").unwrap();
    let mut admin = admin(&mesh).await;

    let (cli, cli_jti, cli_exp) = cli_token(&mesh.jwt_secret, &[], &[]);
    let (again, again_jti, _) = cli_token(&mesh.jwt_secret, &[], &[]);
    assert_ne!(cli_jti, again_jti, "a fresh jti per token");
    assert_eq!(claims_of(&cli)["jti"], cli_jti.as_str());
    assert_eq!(claims_of(&cli)["exp"], cli_exp);
    let request = MintTokenRequest {
        user: "U2".into(),
        team: "T1".into(),
        channels: vec!["C1".into()],
        ttl_seconds: 600,
        name: String::new(),
    };
    let minted = admin.mint_token(request).await.unwrap().into_inner();
    assert_eq!(claims_of(&minted.token)["jti"], minted.jti.as_str());
    assert_eq!(claims_of(&minted.token)["exp"], minted.expires_at);

    let mut by_cli = Rtm::connect(&base, &cli).await.unwrap();
    let mut by_admin = Rtm::connect(&base, &minted.token).await.unwrap();
    let mut bystander = Rtm::connect(&base, &again).await.unwrap();
    let revoke = |jti: &str, expires_at| RevokeTokensRequest {
        jtis: vec![RevokedToken {
            jti: jti.into(),
            expires_at,
        }],
    };
    admin
        .revoke_tokens(revoke(&cli_jti, cli_exp))
        .await
        .unwrap();
    assert_eq!(by_cli.closed().await, Some(4003));
    admin
        .revoke_tokens(revoke(&minted.jti, minted.expires_at))
        .await
        .unwrap();
    assert_eq!(by_admin.closed().await, Some(4003));
    let revoked = json!({"ok": false, "error": "token_revoked"});
    assert_eq!(web_api(&base, "rtm.connect", Some(&cli)).await, revoked);
    bystander.send(json!({"id": 1, "type": "ping"})).await;
    bystander.expect("pong", |v| v["type"] == "pong").await;
}

/// `identity`'s token signed with `secret`, carrying `claims`' iss and aud.
fn token_with(secret: &str, claims: IssuerAudience) -> String {
    let now = channelmesh::mesh::unix_now();
    let identity = Identity {
        user: UserId::new("U1").unwrap(),
        team: TeamId::new("T1").unwrap(),
        name: None,
        channels: vec![ChannelId::new("C1").unwrap()],
        expires_at: now + 600,
        jti: None,
    };
    TokenKey::hs256(secret.as_bytes())
        .unwrap()
        .expect(claims)
        .mint(&identity, now)
        .unwrap()
}

/// Whether the gateway at `base` takes `token` (`auth.test`), else its error.
async fn auth(base: &str, token: &str) -> Result<(), String> {
    let reply = web_api(base, "auth.test", Some(token)).await;
    match reply["ok"].as_bool() {
        Some(true) => Ok(()),
        _ => Err(reply["error"].as_str().unwrap_or_default().to_string()),
    }
}

#[tokio::test]
async fn iss_and_aud_are_enforced_when_configured_and_ignored_when_not() {
    let strict = mesh_with(MeshConfig {
        jwt_claims: claims(ISSUER, AUDIENCE),
        ..MeshConfig::ephemeral()
    })
    .await;
    let base = strict.rtm_base_url("us-east").unwrap();
    let secret = strict.jwt_secret.clone();

    // MintToken sets them, and its tokens pass.
    let minted = admin(&strict)
        .await
        .mint_token(MintTokenRequest {
            user: "U1".into(),
            team: "T1".into(),
            channels: vec!["C1".into()],
            ttl_seconds: 600,
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let got = claims_of(&minted.token);
    assert_eq!(
        (&got["iss"], &got["aud"]),
        (&json!(ISSUER), &json!(AUDIENCE))
    );
    assert_eq!(auth(&base, &minted.token).await, Ok(()));
    // So does `channelmesh token` configured as the mesh is (env or flags).
    let env = [
        ("CHANNELMESH_JWT_ISSUER", ISSUER),
        ("CHANNELMESH_JWT_AUDIENCE", AUDIENCE),
    ];
    let (by_env, _, _) = cli_token(&secret, &env, &[]);
    assert_eq!(auth(&base, &by_env).await, Ok(()));
    let flags = ["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE];
    let (by_flags, _, _) = cli_token(&secret, &[], &flags);
    assert_eq!(auth(&base, &by_flags).await, Ok(()));

    // Signed with the right secret, but for another issuer or audience, or for none.
    let invalid = Err("invalid_auth".to_string());
    let (unconfigured, _, _) = cli_token(&secret, &[], &[]);
    for (what, token) in [
        ("no iss or aud", unconfigured),
        (
            "another issuer",
            token_with(&secret, claims("https://evil.example", AUDIENCE)),
        ),
        (
            "another audience",
            token_with(&secret, claims(ISSUER, "billing")),
        ),
        (
            "no aud",
            token_with(&secret, IssuerAudience::new(Some(ISSUER.into()), None)),
        ),
        (
            "no iss",
            token_with(&secret, IssuerAudience::new(None, Some(AUDIENCE.into()))),
        ),
    ] {
        assert_eq!(auth(&base, &token).await, invalid, "{what}");
        let reply = web_api(&base, "rtm.connect", Some(&token)).await;
        assert_eq!(reply["error"], "invalid_auth", "{what}");
    }

    // Unconfigured, a mesh takes tokens with or without them.
    let plain = mesh().await;
    let base = plain.rtm_base_url("us-east").unwrap();
    let secret = plain.jwt_secret.clone();
    for token in [
        token_with(&secret, IssuerAudience::default()),
        token_with(&secret, claims("https://anyone.example", "anything")),
    ] {
        assert_eq!(auth(&base, &token).await, Ok(()));
    }
}

/// A `channelmesh` service as a child process next to `mesh` (on its rings, with its secrets),
/// logging at trace level; its output is kept to be read after it stops.
struct ServiceProcess {
    child: Child,
    addr: SocketAddr,
    stdout: Arc<Mutex<String>>,
    stderr: std::path::PathBuf,
}

impl ServiceProcess {
    /// A gateway of the region `logged`, with `global` flags before and `extra` after.
    fn gateway(mesh: &channelmesh::Mesh, global: &[&str], extra: &[&str]) -> Self {
        let command = ["gateway", "--region", "logged", "--listen", "127.0.0.1:0"];
        Self::start(mesh, global, &[&command[..], extra].concat())
    }

    /// `channelmesh global… args…`, waiting for its `listening on ADDR`.
    fn start(mesh: &channelmesh::Mesh, global: &[&str], args: &[&str]) -> Self {
        let stderr = std::env::temp_dir().join(format!(
            "channelmesh-{}-log-{}-{}.log",
            args[0],
            std::process::id(),
            rand::random::<u32>()
        ));
        // Its certificate from the mesh's CA, as the gateway `logged-1` or the admin server.
        let tls = match args[0] {
            "gateway" => child_tls(Role::Gateway, "logged-1"),
            _ => child_tls(Role::Admin, "admin-logged"),
        };
        let mut child = Command::new(BIN)
            .args(global)
            .args(&tls)
            .args(args)
            .args(["--ring-manager", &format!("http://{}", mesh.ring_manager)])
            .args([
                "--presence-ring-manager",
                &format!("http://{}", mesh.presence_ring_manager),
            ])
            .env("CHANNELMESH_JWT_SECRET", &mesh.jwt_secret)
            .env("CHANNELMESH_ADMIN_TOKEN", &mesh.admin_token)
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("the service prints").unwrap();
        let addr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{args:?} printed {first:?}"))
            .parse()
            .unwrap();
        let stdout = Arc::new(Mutex::new(first + "\n"));
        let kept = stdout.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut kept = kept.lock().unwrap();
                kept.push_str(&line);
                kept.push('\n');
            }
        });
        ServiceProcess {
            child,
            addr,
            stdout,
            stderr,
        }
    }

    fn base(&self) -> String {
        format!("http://{}/api/", self.addr)
    }

    /// Stops it (SIGTERM) and returns everything it wrote.
    fn stop(mut self) -> String {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let status = self.child.wait().unwrap();
        let mut all = std::fs::read_to_string(&self.stderr).unwrap();
        let _ = std::fs::remove_file(&self.stderr);
        all.push_str(&self.stdout.lock().unwrap());
        assert!(status.success(), "the service exited with {status}:\n{all}");
        all
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

#[tokio::test]
async fn a_token_in_the_query_appears_in_no_log_line_of_the_gateway() {
    let mesh = mesh().await;
    let wrong = "a secret of thirty-two bytes, but not the mesh's";
    for format in [&[][..], &["--log-json"][..]] {
        let gateway = ServiceProcess::gateway(&mesh, format, &[]);
        let base = gateway.base();
        let token = mesh.token("U1", "T1", &["C1"]).unwrap();
        let forged = token_with(wrong, IssuerAudience::default());
        let http = reqwest::Client::new();
        let get = |url: String| {
            let http = http.clone();
            async move {
                http.get(url)
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap()
            }
        };

        // A gateway just started may not know the presence ring yet (users.getPresence then
        // answers presence_unavailable rather than guess): wait until it does.
        eventually("the gateway answers presence", || async {
            let reply = web_api(&base, "users.getPresence", Some(&token)).await;
            (reply["ok"] == true).then_some(())
        })
        .await;
        // Every route that reads a token, with it in the query (and once by an encoded name).
        let reply = get(format!("{base}auth.test?token={token}")).await;
        assert_eq!(reply["ok"], true, "{reply}");
        let reply = get(format!("{base}auth.test?%74oken={token}")).await;
        assert_eq!(reply["ok"], true, "{reply}");
        let reply = get(format!("{base}users.getPresence?token={token}&user=U1")).await;
        assert_eq!(reply["ok"], true, "{reply}");
        let reply = get(format!(
            "{base}users.setPresence?token={token}&presence=auto"
        ))
        .await;
        assert_eq!(reply["ok"], true, "{reply}");
        let reply = get(format!("{base}auth.test?token={forged}")).await;
        assert_eq!(reply["error"], "invalid_auth", "{reply}");
        let reply = get(format!(
            "{base}rtm.connect?token={token}&batch_presence_aware=1"
        ))
        .await;
        let url = reply["url"].as_str().expect("a connect URL").to_string();
        let ticket = url.rsplit('/').next().unwrap().to_string();
        // The WebSocket, with the token on its URL too (the gateway ignores it there).
        let mut rtm = Rtm::open(&format!("{url}?token={token}")).await.unwrap();
        rtm.expect("hello", |v| v["type"] == "hello").await;
        rtm.send(json!({"id": 1, "type": "ping"})).await;
        rtm.expect("pong", |v| v["type"] == "pong").await;
        drop(rtm);

        let logs = gateway.stop();
        // The access log ran (so the check below could have failed), with the token redacted.
        assert!(
            logs.contains("http request") && logs.contains("token=REDACTED"),
            "no access log line with a redacted token:\n{}",
            &logs[..logs.len().min(4000)]
        );
        let signature = |t: &str| t.rsplit('.').next().unwrap().to_string();
        for (what, secret) in [
            ("the token", token.clone()),
            ("the token's signature", signature(&token)),
            ("the forged token", forged.clone()),
            ("the forged token's signature", signature(&forged)),
            ("the connect URL's ticket", ticket),
        ] {
            if let Some(at) = logs.find(&secret) {
                let line = logs[..at].rsplit('\n').next().unwrap_or_default();
                panic!("{what} is in the gateway's log ({format:?}): {line}…");
            }
        }
    }
}

#[tokio::test]
async fn admin_server_and_gateway_processes_set_and_check_iss_and_aud_by_their_flags() {
    let mesh = mesh().await;
    let flags = ["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE];
    let gateway = ServiceProcess::gateway(&mesh, &[], &flags);
    let admin_args = [&["admin-server", "--listen", "127.0.0.1:0"][..], &flags].concat();
    let admin = ServiceProcess::start(&mesh, &[], &admin_args);
    let minted = admin_at(admin.addr, &mesh.admin_token)
        .await
        .mint_token(MintTokenRequest {
            user: "U1".into(),
            team: "T1".into(),
            channels: vec![],
            ttl_seconds: 600,
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let base = gateway.base();
    assert_eq!(auth(&base, &minted.token).await, Ok(()));
    // The in-process mesh's admin server sets neither claim.
    let plain = token_with(&mesh.jwt_secret, IssuerAudience::default());
    assert_eq!(auth(&base, &plain).await, Err("invalid_auth".into()));
    // Neither process logs the token, nor the admin server its bearer token (trace level).
    for logs in [gateway.stop(), admin.stop()] {
        assert!(logs.contains("listening on"), "{logs}");
        for secret in [&minted.token, &mesh.admin_token] {
            assert!(!logs.contains(secret.as_str()), "{secret} is in a log");
        }
    }
}

#[tokio::test]
async fn reflection_shows_the_public_admin_api_alone() {
    let mesh = mesh().await;
    // The public API is there, by its symbol.
    let answer = reflect(
        mesh.admin,
        MessageRequest::FileContainingSymbol("channelmesh.admin.v1.Admin".into()),
    )
    .await
    .unwrap();
    assert!(
        matches!(answer, MessageResponse::FileDescriptorResponse(ref f) if !f.file_descriptor_proto.is_empty()),
        "{answer:?}"
    );
    // The internal services, their messages and their files are not, by any question.
    let questions = [
        "channelmesh.ring.v1.RingManager",
        "channelmesh.channel.v1.ChannelServer",
        "channelmesh.presence.v1.Presence",
        "channelmesh.ring.v1.RevokeTokensRequest",
    ]
    .map(|symbol| MessageRequest::FileContainingSymbol(symbol.into()))
    .into_iter()
    .chain(
        [
            "channelmesh/ring/v1/ring.proto",
            "channelmesh/channel/v1/channel.proto",
            "channelmesh/presence/v1/presence.proto",
        ]
        .map(|file| MessageRequest::FileByFilename(file.into())),
    );
    for question in questions {
        let answer = reflect(mesh.admin, question.clone()).await;
        let refused = match &answer {
            Err(status) => status.code() == tonic::Code::NotFound,
            Ok(MessageResponse::ErrorResponse(e)) => e.error_code == tonic::Code::NotFound as i32,
            Ok(_) => false,
        };
        assert!(refused, "reflection answers {question:?} with {answer:?}");
    }
}
