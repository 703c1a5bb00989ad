//! One module per benchmark group: its flags, the measurement, and how its report is printed
//! (a table, or one JSON line with `--json`).

pub mod blast;
pub mod channel_memory;
pub mod failover;
pub mod latency;
pub mod load;
pub mod presence;
pub mod scale;
