//! The `channelmesh` binary itself: `dev`, `token`, and services refusing to start unconfigured.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use mesh_core::TokenKey;

const BIN: &str = env!("CARGO_BIN_EXE_channelmesh");

/// 32 bytes: the shortest HS256 secret accepted.
const CLI_SECRET: &str = "cli-secret-cli-secret-cli-secret";

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
fn services_need_mutual_tls_or_an_explicit_insecure_kept_on_loopback() {
    let refusal = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Neither certificates nor --insecure: refused, saying what to give.
    let none = refusal(&["ring-manager", "--listen", "127.0.0.1:0"]);
    assert!(
        none.contains("error: ring-manager needs mutual TLS between the services")
            && none.contains("--tls-ca, --tls-cert and --tls-key")
            && none.contains("--insecure"),
        "{none}"
    );
    // --insecure off loopback: refused without the second flag, after the warning.
    let remote = refusal(&["ring-manager", "--insecure", "--listen", "0.0.0.0:0"]);
    assert!(
        remote.contains("0.0.0.0:0 is not a loopback address"),
        "{remote}"
    );
    assert!(
        remote.contains("add --insecure-allow-remote if that is really meant"),
        "{remote}"
    );
    // Only some of the certificate files.
    let partial = refusal(&["ring-manager", "--tls-ca", "/nonexistent/ca.pem"]);
    assert!(
        partial.contains("TLS needs all of --tls-ca, --tls-cert and --tls-key"),
        "{partial}"
    );
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
    .env("CHANNELMESH_JWT_SECRET", CLI_SECRET)
    .output()
    .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let identity = TokenKey::hs256(CLI_SECRET.as_bytes())
        .unwrap()
        .verify(token.trim())
        .unwrap();
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
    // Where a user's dev keeps its state by default, in a folder of the test's own.
    let xdg = std::env::temp_dir().join(format!("channelmesh-xdg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&xdg);
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
    .env_remove("CHANNELMESH_STATE_DIR")
    .env("XDG_STATE_HOME", &xdg)
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
        "internal gRPC    mutual TLS",
        &format!("state dir        {}", xdg.join("channelmesh/dev").display()),
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // `ctl` finds the operator credential there with no flag, and the ring manager takes it.
    let rm = lines
        .iter()
        .find_map(|l| l.strip_prefix("  ring manager     grpc://"))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("dev printed its ring manager");
    let ctl = |xdg: &std::path::Path| {
        Command::new(BIN)
            .args([
                "ctl",
                "--ring-manager",
                &format!("http://{rm}"),
                "--json",
                "ring",
            ])
            .env_remove("CHANNELMESH_STATE_DIR")
            .env("XDG_STATE_HOME", xdg)
            .output()
            .unwrap()
    };
    let ring = ctl(&xdg);
    assert!(
        ring.status.success(),
        "{}",
        String::from_utf8_lossy(&ring.stderr)
    );
    assert!(String::from_utf8_lossy(&ring.stdout).contains("cs-3"));
    // Elsewhere, no credential: ctl says where it looked and what to give.
    let elsewhere = ctl(&xdg.join("elsewhere"));
    assert!(!elsewhere.status.success());
    let why = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        why.contains("does not exist. `channelmesh dev` writes"),
        "{why}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(&xdg);
    assert!(
        exit.success(),
        "dev exited with {exit} after SIGTERM; its log:\n{stderr}"
    );
}
