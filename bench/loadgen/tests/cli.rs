//! The `channelmesh-loadgen` binary as `channelmesh bench` runs it: its commands, and one
//! measurement that needs no mesh (`channel-memory`, in-process) end to end with `--json`.
//!
//! Having an integration test also makes `cargo test`/`cargo nextest run` of the workspace
//! build this binary, which the root package's bench smoke tests run through `channelmesh
//! bench`.

use std::process::Command;

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_channelmesh-loadgen");

#[test]
fn help_lists_every_benchmark_and_hides_the_worker() {
    let out = Command::new(LOADGEN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in [
        "fanout",
        "chat",
        "connect-storm",
        "idle",
        "presence",
        "channel-memory",
        "failover",
        "latency",
        "scale",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "no {command} in\n{help}"
        );
    }
    assert!(!help.contains("worker"), "{help}");
    for flag in ["--log-json", "--otlp-endpoint", "--tls-ca"] {
        assert!(help.contains(flag), "no {flag} in\n{help}");
    }
}

#[test]
fn channel_memory_reports_json() {
    let out = Command::new(LOADGEN)
        .args([
            "channel-memory",
            "--channels",
            "1000",
            "--events",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["channels"], 1000, "{report}");
    assert_eq!(report["events_per_channel"], 2, "{report}");
    assert_eq!(report["text_bytes"], 200, "{report}");
    assert_eq!(report["text_sizes"], "fixed", "{report}");
    assert_eq!(report["evictions"], 0, "{report}");
    for field in [
        "mean_text_bytes",
        "rss_before_bytes",
        "rss_after_bytes",
        "bytes_per_channel",
        "overhead_per_event",
        "fill_secs",
    ] {
        assert!(report[field].is_number(), "no {field} in {report}");
    }
}

#[test]
fn a_missing_environment_is_an_error_not_a_panic() {
    let out = Command::new(LOADGEN)
        .arg("latency")
        .env_remove("CHANNELMESH_ADMIN_TOKEN")
        .env_remove("CHANNELMESH_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CHANNELMESH_ADMIN_TOKEN must be set"),
        "{stderr}"
    );
}
