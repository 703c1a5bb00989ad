//! A process's resident set size, from `/proc/PID/status`: what `channel-memory` and the
//! `--server-pid` readings of the load scenarios measure.

/// The resident set of process `pid` (a number, or `self`), in bytes.
pub fn rss_of(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| anyhow::anyhow!("reading the status of process {pid}: {e}"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))?;
    Ok(kb * 1024)
}

/// This process's resident set, in bytes.
pub fn own() -> anyhow::Result<u64> {
    rss_of("self")
}

/// The summed resident sets of `pids` and their descendants ([`crate::cpu::tree`]), in bytes;
/// None without pids.
pub fn sum(pids: &[u32]) -> anyhow::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = 0;
    for pid in pids {
        total += rss_of(&pid.to_string())?;
    }
    // A descendant that ended in between is left out.
    for pid in crate::cpu::tree(pids).iter().filter(|p| !pids.contains(p)) {
        total += rss_of(&pid.to_string()).unwrap_or(0);
    }
    Ok(Some(total))
}
