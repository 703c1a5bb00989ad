//! `dev`'s state directory: where each run writes its throwaway CA, the certificates of its
//! child processes and the operator credential `ctl` finds by default. One `dev` at a time
//! uses a directory (`dev.pid` says which).
//!
//! The directory: `--state-dir`, else `$CHANNELMESH_STATE_DIR`, else
//! `$XDG_STATE_HOME/channelmesh/dev`, else `~/.local/state/channelmesh/dev`.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mesh_transport::{Credentials, Transport};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::certs::{self, Authority, CA_CERT};

/// Env var: the state directory of `dev` (and where `ctl` looks for its operator credential).
pub const ENV_STATE_DIR: &str = "CHANNELMESH_STATE_DIR";
/// The operator credential's file name (`operator.pem`, `operator.key`).
pub const OPERATOR: &str = "operator";
/// The file naming the `dev` that uses the directory.
const PID_FILE: &str = "dev.pid";

/// The default state directory: `$XDG_STATE_HOME/channelmesh/dev`, else
/// `~/.local/state/channelmesh/dev`, else `.channelmesh-dev` (no home).
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".local/state"))
        });
    match base {
        Some(base) => base.join("channelmesh/dev"),
        None => PathBuf::from(".channelmesh-dev"),
    }
}

/// The state directory's flag, shared by `dev` and `ctl`.
#[derive(Debug, Clone, clap::Args)]
pub struct StateDirArg {
    /// Where `dev` writes its throwaway CA, its services' certificates and the operator
    /// credential `ctl` uses by default [default: $XDG_STATE_HOME/channelmesh/dev, or
    /// ~/.local/state/channelmesh/dev].
    #[arg(long = "state-dir", env = ENV_STATE_DIR)]
    pub path: Option<PathBuf>,
}

impl StateDirArg {
    /// The directory: given, or the default.
    pub fn dir(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(default_dir)
    }
}

/// A state directory this `dev` holds; the claim is released when dropped.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Claims `path` (made if absent, mode 0700) for this process: refused while another live
    /// `dev` holds it.
    pub fn claim(path: &Path) -> anyhow::Result<StateDir> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("creating the state directory {}", path.display()))?;
        let pid_file = path.join(PID_FILE);
        if let Ok(text) = fs::read_to_string(&pid_file)
            && let Ok(pid) = text.trim().parse::<i32>()
            && pid != std::process::id() as i32
            && matches!(kill(Pid::from_raw(pid), None), Ok(()) | Err(Errno::EPERM))
        {
            bail!(
                "another channelmesh dev (pid {pid}) uses the state directory {}: stop it, or \
                 give this one its own with --state-dir",
                path.display()
            );
        }
        certs::write(
            &pid_file,
            format!("{}\n", std::process::id()).as_bytes(),
            0o644,
        )?;
        Ok(StateDir {
            path: path.to_path_buf(),
        })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes this run's CA and the operator credential for `ctl`.
    pub fn write_authority(&self, authority: &Authority) -> anyhow::Result<()> {
        authority.save(&self.path)?;
        certs::save_credentials(&self.path, OPERATOR, &authority.operator()?)?;
        Ok(())
    }

    /// Writes `credentials` as `NAME.pem` and `NAME.key`; returns the `--tls-*` flags that
    /// point a child process at them.
    pub fn child_flags(
        &self,
        name: &str,
        credentials: &Credentials,
    ) -> anyhow::Result<Vec<String>> {
        let (cert, key) = certs::save_credentials(&self.path, name, credentials)?;
        Ok(vec![
            format!("--tls-ca={}", self.path.join(CA_CERT).display()),
            format!("--tls-cert={}", cert.display()),
            format!("--tls-key={}", key.display()),
        ])
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.path.join(PID_FILE));
    }
}

/// The operator credential a `dev` wrote into `dir`, for `ctl`.
pub fn operator(dir: &Path) -> anyhow::Result<Transport> {
    let (ca, cert, key) = (
        dir.join(CA_CERT),
        dir.join(format!("{OPERATOR}.pem")),
        dir.join(format!("{OPERATOR}.key")),
    );
    if !cert.exists() {
        bail!(
            "no credentials for the ring manager: {} does not exist. `channelmesh dev` writes \
             one there while it runs (or pass --state-dir DIR of the dev you run); for another \
             mesh give --tls-ca, --tls-cert and --tls-key with an operator certificate \
             (`channelmesh certs --dir DIR operator/NAME` issues one); against a mesh run with \
             --insecure, --insecure",
            cert.display()
        );
    }
    Ok(Transport::Mtls(Credentials::read(&ca, &cert, &key)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_dev_at_a_time_claims_a_directory() {
        let dir =
            std::env::temp_dir().join(format!("channelmesh-state-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        {
            let state = StateDir::claim(&dir).unwrap();
            // This process may claim it again (a restart in the same process).
            let _again = StateDir::claim(state.path()).unwrap();
        }
        // A live other process holds it: pid 1 is always alive.
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(PID_FILE), "1\n").unwrap();
        let refused = StateDir::claim(&dir).unwrap_err().to_string();
        assert!(refused.contains("pid 1"), "{refused}");
        // A dead one does not.
        fs::write(dir.join(PID_FILE), format!("{}\n", i32::MAX)).unwrap();
        let state = StateDir::claim(&dir).unwrap();
        let authority = Authority::generate().unwrap();
        state.write_authority(&authority).unwrap();
        let Transport::Mtls(ops) = operator(&dir).unwrap() else {
            panic!("mutual TLS")
        };
        assert_eq!(
            ops.identities().unwrap()[0].to_string(),
            "ops.operator.channelmesh"
        );
        drop(state);
        assert!(!dir.join(PID_FILE).exists());
        let missing = operator(&dir.join("nowhere")).unwrap_err().to_string();
        assert!(missing.contains("channelmesh dev"), "{missing}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
