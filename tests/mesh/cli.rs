//! The `channelmesh` binary itself: `dev`, `token`, and services refusing to start unconfigured.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use mesh_core::TokenKey;

const BIN: &str = env!("CARGO_BIN_EXE_channelmesh");

fn without_secrets(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("CHANNELMESH_JWT_SECRET")
        .env_remove("CHANNELMESH_ADMIN_TOKEN")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn services_refuse_to_start_without_their_secrets() {
    for (args, missing) in [
        (
            // --insecure: the transport is checked first (on loopback plaintext is allowed).
            vec![
                "gateway",
                "--insecure",
                "--region",
                "us-east",
                "--listen",
                "127.0.0.1:0",
            ],
            "CHANNELMESH_JWT_SECRET",
        ),
        (
            vec!["admin-server", "--insecure", "--listen", "127.0.0.1:0"],
            "CHANNELMESH_ADMIN_TOKEN",
        ),
        (
            vec!["token", "--user", "U1", "--team", "T1"],
            "CHANNELMESH_JWT_SECRET",
        ),
    ] {
        let out = without_secrets(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} started without {missing}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The error line (after the --insecure warning, for the services).
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("error: ") && l.contains(missing)),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn token_mints_a_jwt_the_gateway_accepts() {
    let out = without_secrets(&[
        "token",
        "--user",
        "U1",
        "--team",
        "T1",
        "--channel",
        "C1",
        "--channel",
        "C2",
        "--name",
        "ann",
    ])
    .env("CHANNELMESH_JWT_SECRET", "cli-secret")
    .output()
    .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let identity = TokenKey::hs256(b"cli-secret").verify(token.trim()).unwrap();
    assert_eq!(identity.user.as_str(), "U1");
    assert_eq!(identity.team.as_str(), "T1");
    assert_eq!(identity.name.as_deref(), Some("ann"));
    let channels: Vec<&str> = identity.channels.iter().map(|c| c.as_str()).collect();
    assert_eq!(channels, ["C1", "C2"]);
}

#[test]
fn dev_prints_its_endpoints_and_secrets_then_stops_on_sigterm() {
    // Its log, to show on failure.
    let log = std::env::temp_dir().join(format!("channelmesh-dev-{}.log", std::process::id()));
    let mut child = without_secrets(&[
        "dev",
        "--admin",
        "127.0.0.1:0",
        "--ring-manager",
        "127.0.0.1:0",
        "--us-east",
        "127.0.0.1:0",
        "--eu-west",
        "127.0.0.1:0",
        "--channel-server-port",
        "0",
        "--presence-ring-manager",
        "127.0.0.1:0",
        "--presence-server-port",
        "0",
    ])
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let ready = line.starts_with("ready in ");
        lines.push(line);
        if ready {
            break;
        }
    }
    let text = lines.join("\n");
    assert!(
        lines.last().is_some_and(|l| l.starts_with("ready in ")),
        "{text}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for want in [
        "admin server",
        "gateway us-east",
        "gateway eu-west",
        "cs-3",
        "presence server  ps-3",
        "CHANNELMESH_JWT_SECRET=",
        "CHANNELMESH_ADMIN_TOKEN=",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(
        exit.success(),
        "dev exited with {exit} after SIGTERM; its log:\n{stderr}"
    );
}
