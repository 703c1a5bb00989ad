//! A service's policy file (`--policy-file`, [`ENV_POLICY_FILE`]): read and parsed at start —
//! a bad file refuses the start — and again on every reload the process asks for
//! ([`request_reload`]: `channelmesh` asks on SIGHUP). A file that fails to load on a reload
//! leaves the policies in force as they were, logged and counted
//! (`channelmesh_policy_reloads_total{outcome="error"}`); the loaded file's hash and
//! `version` are on /metrics (`channelmesh_policy_info`).
//!
//! The format and its precedence rules: [`mesh_core::policy`] and docs/policies.md.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mesh_core::policy::{Policies, PolicyError, SharedPolicies};
use mesh_telemetry::{Telemetry, prometheus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The policy file's environment variable.
pub const ENV_POLICY_FILE: &str = "CHANNELMESH_POLICY_FILE";

/// The `--policy-file` flag, flattened into each service's flags that enforce policies.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PolicyArgs {
    /// Channel policies and team connection caps (TOML, docs/policies.md); reloaded on SIGHUP.
    #[arg(long, env = ENV_POLICY_FILE)]
    pub policy_file: Option<PathBuf>,
}

impl PolicyArgs {
    /// The flags that give a child process the same file.
    pub fn to_args(&self) -> Vec<String> {
        self.policy_file
            .iter()
            .map(|p| format!("--policy-file={}", p.display()))
            .collect()
    }
}

/// Why a policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("reading the policy file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the policy file {path}, {error}")]
    Invalid { path: PathBuf, error: PolicyError },
}

/// The process's reloads asked for so far; every loader of the process watches it.
fn reload_signal() -> &'static watch::Sender<u64> {
    static SIGNAL: OnceLock<watch::Sender<u64>> = OnceLock::new();
    SIGNAL.get_or_init(|| watch::Sender::new(0))
}

/// Asks every policy file of this process to be read again (the binary calls it on SIGHUP;
/// an in-process mesh's services all reload).
pub fn request_reload() {
    reload_signal().send_modify(|n| *n += 1);
}

/// Reload requests from now on: `changed()` resolves at the next [`request_reload`].
pub fn reloads() -> watch::Receiver<u64> {
    reload_signal().subscribe()
}

/// Reads and parses the policy file at `path`.
pub fn load(path: &Path) -> Result<Policies, PolicyFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| PolicyFileError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    Policies::parse(&text).map_err(|error| PolicyFileError::Invalid {
        path: path.to_path_buf(),
        error,
    })
}

/// The policies of a service with `path` as its policy file (none: every channel has the
/// default policy), reloaded on every [`request_reload`] until `cancel`, by a task on
/// `tracker`. Fails when the file cannot be loaded now.
pub fn start(
    path: Option<&Path>,
    telemetry: &Telemetry,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<SharedPolicies, PolicyFileError> {
    let Some(path) = path else {
        return Ok(SharedPolicies::default());
    };
    let metrics = Metrics::new(telemetry);
    let policies = load(path)?;
    metrics.in_force(path, &policies);
    let shared = SharedPolicies::new(policies);
    let mut reloads = reloads();
    reloads.mark_unchanged();
    let (path, reloading) = (path.to_path_buf(), shared.clone());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                // Cancel-safe: a request missed while reloading is seen as a change.
                changed = reloads.changed() => if changed.is_err() { return },
            }
            reload(&path, &reloading, &metrics);
        }
    });
    Ok(shared)
}

/// Reads `path` again into `shared`, or keeps what `shared` holds when it does not load.
fn reload(path: &Path, shared: &SharedPolicies, metrics: &Metrics) {
    match load(path) {
        Ok(policies) => {
            metrics.in_force(path, &policies);
            metrics.reloads.with_label_values(&["ok"]).inc();
            shared.replace(policies);
        }
        Err(error) => {
            tracing::error!(%error, hash = %shared.current().hash(), "policy reload failed; the policies in force stay");
            metrics.reloads.with_label_values(&["error"]).inc();
        }
    }
}

/// The policy file's metrics.
struct Metrics {
    reloads: prometheus::IntCounterVec,
    info: prometheus::IntGaugeVec,
    rules: prometheus::IntGauge,
}

impl Metrics {
    fn new(telemetry: &Telemetry) -> Metrics {
        let reloads = telemetry.counter_vec(
            "channelmesh_policy_reloads_total",
            "Reloads of the policy file asked for (SIGHUP), by outcome: ok, or error (the policies in force stay).",
            &["outcome"],
        );
        for outcome in ["ok", "error"] {
            reloads.with_label_values(&[outcome]);
        }
        Metrics {
            reloads,
            info: telemetry.gauge_vec(
                "channelmesh_policy_info",
                "The policy file in force: 1 for its hash (xxh3 of its bytes) and its own `version`.",
                &["hash", "version"],
            ),
            rules: telemetry.gauge(
                "channelmesh_policy_rules",
                "Channel rules in the policy file in force.",
            ),
        }
    }

    /// `policies`, from `path`, are in force from now on: logged and shown.
    fn in_force(&self, path: &Path, policies: &Policies) {
        tracing::info!(
            path = %path.display(),
            rules = policies.rules().len(),
            teams = policies.teams(),
            hash = %policies.hash(),
            version = policies.version(),
            "channel policies in force"
        );
        self.info.reset();
        self.info
            .with_label_values(&[&policies.hash(), policies.version()])
            .set(1);
        self.rules.set(policies.rules().len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A fresh directory of the test's own.
    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-policy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn a_reload_takes_a_good_file_and_keeps_the_old_policies_over_a_bad_one() {
        let path = dir("reload").join("policy.toml");
        std::fs::write(&path, "[[channel]]\nmatch = \"C1\"\nread_only = true\n").unwrap();
        let telemetry = Telemetry::default();
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let shared = start(Some(&path), &telemetry, &tracker, cancel.clone()).unwrap();
        assert!(shared.for_channel("C1").read_only);
        let hash = shared.current().hash();
        assert!(telemetry.encode().contains(&format!("hash=\"{hash}\"")));

        std::fs::write(&path, "version = \"v2\"\n").unwrap();
        request_reload();
        until("the new file", || !shared.for_channel("C1").read_only).await;
        assert!(telemetry.encode().contains("version=\"v2\""));

        std::fs::write(&path, "[[channel]]\nmatch = \"C1\"\nread_only = maybe\n").unwrap();
        request_reload();
        until("the failed reload counted", || {
            telemetry
                .encode()
                .contains("channelmesh_policy_reloads_total{outcome=\"error\"} 1")
        })
        .await;
        assert_eq!(shared.current().version(), "v2");
        assert!(telemetry.encode().contains("outcome=\"ok\"} 1"));
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn a_bad_file_at_start_is_an_error_naming_the_file_and_line() {
        let dir = dir("bad");
        let path = dir.join("policy.toml");
        std::fs::write(&path, "\n[teams]\nT1 = \"many\"\n").unwrap();
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let error = start(Some(&path), &Telemetry::default(), &tracker, cancel)
            .unwrap_err()
            .to_string();
        assert!(error.contains("policy.toml, line 3: "), "{error}");
        let missing = load(&dir.join("none.toml")).unwrap_err().to_string();
        assert!(missing.starts_with("reading the policy file"), "{missing}");
    }
}
