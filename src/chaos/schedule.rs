//! The faults a run injects and when: a pure function of the seed, the run's length, the
//! fault kinds asked for and the mesh's layout, so that the same seed replays the same run.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// What a fault does to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// `kill -9`, down for the fault's length, then started again with the same command line.
    Kill,
    /// SIGSTOP for the fault's length, then SIGCONT.
    Stop,
    /// A channel server restarted at once with its ts clock behind by `skew_ms`, then
    /// restarted again with a true clock when the fault ends.
    Skew,
    /// Cut off from the rest of the mesh for the fault's length (not implemented here yet:
    /// reported as skipped).
    Partition,
}

/// Which kind of process a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ChannelServer,
    Gateway,
    PresenceServer,
    Admin,
    RingManager,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::ChannelServer,
        Role::Gateway,
        Role::PresenceServer,
        Role::Admin,
        Role::RingManager,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::ChannelServer => "channel-server",
            Role::Gateway => "gateway",
            Role::PresenceServer => "presence-server",
            Role::Admin => "admin",
            Role::RingManager => "ring-manager",
        }
    }
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Kill, Action::Stop, Action::Skew, Action::Partition];

    pub fn name(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Stop => "stop",
            Action::Skew => "skew",
            Action::Partition => "partition",
        }
    }

    /// The roles this action applies to: clock skew only to channel servers (the only ones
    /// that stamp ts).
    fn roles(self) -> &'static [Role] {
        match self {
            Action::Skew => &[Role::ChannelServer],
            _ => &Role::ALL,
        }
    }
}

/// A kind of fault: an action on a role, e.g. `kill channel-server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Kind {
    pub action: Action,
    pub role: Role,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action.name(), self.role.name())
    }
}

impl Kind {
    /// Every kind there is.
    pub fn all() -> Vec<Kind> {
        Action::ALL
            .iter()
            .flat_map(|&action| {
                action
                    .roles()
                    .iter()
                    .map(move |&role| Kind { action, role })
            })
            .collect()
    }

    /// The kinds `spec` names: comma-separated `ACTION` (every role it applies to) or
    /// `ACTION:ROLE`, e.g. `kill,stop:ring-manager`; `all` for every kind.
    pub fn parse_list(spec: &str) -> Result<Vec<Kind>, String> {
        let mut kinds = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "all" {
                kinds.extend(Kind::all());
                continue;
            }
            let (action, role) = match item.split_once(':') {
                Some((a, r)) => (a, Some(r)),
                None => (item, None),
            };
            let action = Action::ALL
                .into_iter()
                .find(|a| a.name() == action)
                .ok_or_else(|| format!("unknown fault action {action:?} in {item:?}"))?;
            match role {
                None => kinds.extend(action.roles().iter().map(|&role| Kind { action, role })),
                Some(role) => {
                    let role = action
                        .roles()
                        .iter()
                        .copied()
                        .find(|r| r.name() == role)
                        .ok_or_else(|| format!("{item:?}: no such fault"))?;
                    kinds.push(Kind { action, role });
                }
            }
        }
        kinds.sort();
        kinds.dedup();
        if kinds.is_empty() {
            return Err("no fault kinds".into());
        }
        Ok(kinds)
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    /// When it starts, from the start of the workload.
    #[serde(serialize_with = "secs")]
    pub at: Duration,
    pub kind: Kind,
    /// Which process of its role (an index into that role's processes).
    pub target: usize,
    /// How long the target is down, stopped, skewed or cut off.
    #[serde(serialize_with = "secs")]
    pub length: Duration,
    /// With [`Action::Skew`]: how far behind the clock is, in milliseconds.
    pub skew_ms: i64,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// SplitMix64: a tiny seeded generator, so that a schedule depends on nothing but its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }
}

/// When the first fault may start: the workload runs unharmed for this long first.
pub const WARM_UP: Duration = Duration::from_secs(5);
/// No fault runs in the last stretch of a run, so the mesh recovers before the check.
pub const COOL_DOWN: Duration = Duration::from_secs(10);

/// The schedule for `seed` over `run` with `kinds`; `targets(role)` is how many processes of
/// `role` the mesh has. Faults run one at a time, each followed by 3–8 s of quiet.
pub fn schedule(
    seed: u64,
    run: Duration,
    kinds: &[Kind],
    targets: impl Fn(Role) -> usize,
) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let kinds: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| targets(k.role) > 0)
        .collect();
    let mut faults = Vec::new();
    if kinds.is_empty() {
        return faults;
    }
    let end = run.saturating_sub(COOL_DOWN);
    let mut at = WARM_UP;
    loop {
        let kind = kinds[rng.range(0, kinds.len() as u64 - 1) as usize];
        let target = rng.range(0, targets(kind.role) as u64 - 1) as usize;
        let length_ms = match kind.action {
            Action::Kill => rng.range(500, 5_000),
            Action::Stop => rng.range(1_000, 10_000),
            Action::Skew => rng.range(5_000, 15_000),
            Action::Partition => rng.range(1_000, 10_000),
        };
        let skew_ms = match kind.action {
            Action::Skew => -(rng.range(2_000, 10_000) as i64),
            _ => 0,
        };
        let length = Duration::from_millis(length_ms);
        if at + length > end {
            break;
        }
        faults.push(Fault {
            at,
            kind,
            target,
            length,
            skew_ms,
        });
        at += length + Duration::from_millis(rng.range(3_000, 8_000));
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(role: Role) -> usize {
        match role {
            Role::ChannelServer => 4,
            Role::Gateway => 2,
            Role::PresenceServer => 3,
            Role::Admin => 1,
            Role::RingManager => 2,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let run = Duration::from_secs(600);
        let a = schedule(1, run, &Kind::all(), layout);
        assert_eq!(a, schedule(1, run, &Kind::all(), layout));
        assert_ne!(a, schedule(2, run, &Kind::all(), layout));
        assert!(a.len() > 20, "{}", a.len());
    }

    #[test]
    fn faults_are_in_order_apart_within_the_run_and_of_the_kinds_asked() {
        let run = Duration::from_secs(300);
        let kinds = Kind::parse_list("kill:gateway,stop").unwrap();
        let faults = schedule(7, run, &kinds, layout);
        for pair in faults.windows(2) {
            assert!(pair[0].at + pair[0].length < pair[1].at);
        }
        for f in &faults {
            assert!(kinds.contains(&f.kind));
            assert!(f.at >= WARM_UP && f.at + f.length <= run - COOL_DOWN);
            assert!(f.target < layout(f.kind.role));
            if f.kind.action == Action::Stop {
                assert!(f.length >= Duration::from_secs(1) && f.length <= Duration::from_secs(10));
            }
        }
    }

    #[test]
    fn fault_lists_parse() {
        assert_eq!(Kind::parse_list("all").unwrap().len(), Kind::all().len());
        assert_eq!(Kind::parse_list("skew").unwrap().len(), 1);
        assert_eq!(Kind::parse_list("kill").unwrap().len(), 5);
        assert!(Kind::parse_list("skew:gateway").is_err());
        assert!(Kind::parse_list("explode").is_err());
        assert!(Kind::parse_list("").is_err());
    }

    #[test]
    fn a_role_the_mesh_lacks_gets_no_faults() {
        let faults = schedule(3, Duration::from_secs(120), &Kind::all(), |r| {
            usize::from(r == Role::Admin)
        });
        assert!(faults.iter().all(|f| f.kind.role == Role::Admin));
    }
}
