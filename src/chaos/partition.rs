//! Network partitions on loopback: every child of the run lives in a cgroup v2 of its own
//! (joined before it opens a socket), and a partition is an nftables table whose rules drop
//! the packets of one child's sockets to and from its peers' ports, matched by cgroup
//! (`socket cgroupv2`). Healing deletes the table.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

/// Where the cgroup v2 hierarchy is mounted beside v1 (Debian's hybrid layout), and alone.
const HYBRID: &str = "/sys/fs/cgroup/unified";
const UNIFIED: &str = "/sys/fs/cgroup";

/// This run's partitions: its nftables table and its cgroups.
#[derive(Debug)]
pub struct Partitions {
    /// The nftables table (family inet) a partition's rules go in.
    table: String,
    /// This run's cgroup directory; each child's is under it.
    root: PathBuf,
    /// The same, as nftables names it (relative to /sys/fs/cgroup).
    rel: String,
}

/// A process a partition cuts: its cgroup name and its listening port.
#[derive(Debug, Clone)]
pub struct Side {
    pub name: String,
    pub port: u16,
}

impl Partitions {
    /// Partitions for run `id`, or why this machine cannot make them (no cgroup v2, no `nft`,
    /// not allowed).
    pub async fn new(id: &str) -> anyhow::Result<Partitions> {
        let (mount, prefix) = if Path::new(HYBRID).join("cgroup.controllers").exists() {
            (HYBRID, "unified/")
        } else if Path::new(UNIFIED).join("cgroup.controllers").exists() {
            (UNIFIED, "")
        } else {
            bail!("no cgroup v2 hierarchy at {HYBRID} or {UNIFIED}");
        };
        let root = Path::new(mount).join(id);
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the cgroup {}", root.display()))?;
        let partitions = Partitions {
            table: id.replace('-', "_"),
            root,
            rel: format!("{prefix}{id}"),
        };
        partitions
            .nft(&format!(
                "add table inet {t}\ndelete table inet {t}\n",
                t = partitions.table
            ))
            .await
            .context("nftables (Debian's nftables package: `nft`) cannot be used")?;
        Ok(partitions)
    }

    /// The directory the children's cgroups go in.
    pub fn cgroups(&self) -> &Path {
        &self.root
    }

    /// Cuts `target` off from `peers` (both ways, new and open connections alike); with no
    /// peers, from everyone.
    pub async fn cut(&self, target: &Side, peers: &[Side]) -> anyhow::Result<()> {
        let t = &self.table;
        let cg = |name: &str| format!("socket cgroupv2 level 2 \"{}/{name}\"", self.rel);
        let mut script = format!(
            "add table inet {t}\n\
             add chain inet {t} out {{ type filter hook output priority 0; }}\n\
             add chain inet {t} in {{ type filter hook input priority 0; }}\n"
        );
        if peers.is_empty() {
            for chain in ["out", "in"] {
                script.push_str(&format!(
                    "add rule inet {t} {chain} {} drop\n",
                    cg(&target.name)
                ));
            }
        } else {
            let ports: Vec<String> = peers.iter().map(|p| p.port.to_string()).collect();
            let ports = format!("{{ {} }}", ports.join(", "));
            let me = cg(&target.name);
            script.push_str(&format!(
                "add rule inet {t} out {me} tcp dport {ports} drop\n"
            ));
            script.push_str(&format!(
                "add rule inet {t} in {me} tcp sport {ports} drop\n"
            ));
            for peer in peers {
                let them = cg(&peer.name);
                let port = target.port;
                script.push_str(&format!(
                    "add rule inet {t} out {them} tcp dport {port} drop\n"
                ));
                script.push_str(&format!(
                    "add rule inet {t} in {them} tcp sport {port} drop\n"
                ));
            }
        }
        self.nft(&script).await
    }

    /// Ends every partition.
    pub async fn heal(&self) -> anyhow::Result<()> {
        self.nft(&format!("delete table inet {}\n", self.table))
            .await
    }

    /// Ends every partition and removes the cgroups (their processes must have exited).
    pub async fn remove(&self) {
        let _ = self.heal().await;
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.root);
    }

    /// Runs the nftables `script` (`nft -f -`).
    async fn nft(&self, script: &str) -> anyhow::Result<()> {
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running nft")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await?;
        }
        let out =
            tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
                .await
                .context("nft did not finish within 10 s")??;
        if !out.status.success() {
            bail!(
                "nft failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}
