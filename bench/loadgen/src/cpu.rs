//! The load generator's own CPU. A run must give a verdict about the server, not about the load
//! generator: each worker measures the CPU its process used while publishing, and the
//! coordinator sets the sum against the cores the load generator may run on (its affinity, e.g.
//! `taskset -c 1` in `bench/compare.sh`). A run above [`BOUND_SHARE`] of them is marked
//! load-generator bound.

use std::time::Duration;

/// Above this share of its cores, the load generator may be what limited the run.
pub const BOUND_SHARE: f64 = 0.85;

/// Clock ticks per second of `/proc/<pid>/stat`'s times: Linux's `USER_HZ`, 100 on every
/// architecture this runs on.
const USER_HZ: u64 = 100;

/// This process's user and system CPU time so far, all threads (`/proc/self/stat`).
pub fn process_cpu() -> Option<Duration> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// The summed user and system CPU time of processes `pids` and their descendants
/// (`/proc/PID/stat`; see [`tree`]); None without pids, or when one of `pids` cannot be read.
pub fn processes_cpu(pids: &[u32]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    let roots = pids
        .iter()
        .try_fold(Duration::ZERO, |sum, &pid| Some(sum + cpu_of(pid)?))?;
    // A descendant that ended in between is left out.
    let descendants = tree(pids)
        .into_iter()
        .filter(|pid| !pids.contains(pid))
        .filter_map(cpu_of)
        .sum::<Duration>();
    Some(roots + descendants)
}

/// Process `pid`'s user and system CPU time so far.
fn cpu_of(pid: u32) -> Option<Duration> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `pids` and every live descendant of theirs: a server that runs as several processes (`dev
/// --multi-process` starts each service as a child) is measured whole. The load generator
/// itself and its workers are never counted, even when a server started it (a test).
pub fn tree(pids: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let ppid = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| parse_ppid(&stat));
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found: Vec<u32> = pids.to_vec();
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        for &(pid, _) in parents.iter().filter(|(_, ppid)| *ppid == parent) {
            if pid != me && !found.contains(&pid) {
                found.push(pid);
            }
        }
        next += 1;
    }
    found
}

/// The parent's pid (field 4) of a `/proc/<pid>/stat` line.
fn parse_ppid(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// How many CPUs this process may run on (`Cpus_allowed_list` in `/proc/self/status`).
pub fn allowed_cpus() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(list.trim())
}

/// `utime` + `stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces and parentheses: fields are counted after the last
/// `)`.
fn parse_stat(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: field 3 (state) is the first; utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// The number of CPUs in a list such as `0-3,6,8-9`.
fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.split(',') {
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to): (usize, usize) = (from.parse().ok()?, to.parse().ok()?);
                count += to.checked_sub(from)? + 1;
            }
            None => {
                part.parse::<usize>().ok()?;
                count += 1;
            }
        }
    }
    (count > 0).then_some(count)
}

/// The load generator's share of its cores over a run: CPU seconds used (all workers) over
/// the run's wall seconds, divided by the cores it may use.
pub fn share(cpu_seconds: f64, wall_seconds: f64, cores: usize) -> f64 {
    if wall_seconds <= 0.0 || cores == 0 {
        return 0.0;
    }
    cpu_seconds / wall_seconds / cores as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_a_name_with_spaces_and_parentheses() {
        let stat =
            "4242 (load (gen) 1) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 3 0 1";
        assert_eq!(parse_stat(stat), Some(Duration::from_millis(3_000)));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
    }

    #[test]
    fn reads_the_parent_after_a_name_with_spaces_and_parentheses() {
        assert_eq!(parse_ppid("4242 (load (gen) 1) S 17 4242 4242 0"), Some(17));
        assert_eq!(parse_ppid("4242 (x)"), None);
    }

    #[test]
    fn a_process_tree_holds_the_children_and_their_children() {
        // sh starts a child shell, which starts a sleep; both wait.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sh -c 'sleep 30; true' & wait"])
            .spawn()
            .unwrap();
        let root = sh.id();
        let spin = std::time::Instant::now();
        let mut found = tree(&[root]);
        while found.len() < 3 && spin.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
            found = tree(&[root]);
        }
        for pid in found.iter().rev() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        let _ = sh.wait();
        assert_eq!(found[0], root);
        assert_eq!(found.len(), 3, "the shells and the sleep: {found:?}");
    }

    #[test]
    fn counts_the_cpus_of_a_list() {
        assert_eq!(parse_cpu_list("1"), Some(1));
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_cores() {
        // Spins until the kernel has counted a clock tick of CPU for this process (on a busy
        // machine that can take far longer than the tick), for at most a minute.
        let spin = std::time::Instant::now();
        while process_cpu().is_none_or(|cpu| cpu <= Duration::ZERO)
            && spin.elapsed() < Duration::from_secs(60)
        {}
        assert!(process_cpu().is_some_and(|cpu| cpu > Duration::ZERO));
        assert!(allowed_cpus().is_some_and(|n| n >= 1));
        assert!(processes_cpu(&[std::process::id()]).is_some_and(|cpu| cpu > Duration::ZERO));
        assert_eq!(processes_cpu(&[]), None);
    }

    #[test]
    fn a_share_is_cpu_over_wall_over_cores() {
        assert!((share(1.7, 2.0, 1) - 0.85).abs() < 1e-9);
        assert!((share(1.0, 1.0, 2) - 0.5).abs() < 1e-9);
        assert_eq!(share(1.0, 0.0, 2), 0.0);
    }
}
