//! Integration tests: each boots a whole mesh in-process on 127.0.0.1:0 and drives it through
//! its real interfaces (RTM over WebSocket, the admin API over gRPC, real client libraries).

// A failed unwrap in a test is a test failure with a backtrace: what a test should do.
#![allow(clippy::unwrap_used)]

mod admin_connections;
mod admin_stream;
mod attacks_clients;
mod attacks_console;
mod attacks_consul;
mod attacks_dos;
mod attacks_grpc;
mod attacks_redirect;
mod attacks_tokens;
mod bad_input;
mod bench_smoke;
mod boot;
mod channel_hooks;
mod chaos;
mod charm;
mod cli;
mod console;
mod console_actions;
mod consul;
mod ctl;
mod deploy;
mod durability;
mod flow_control;
mod fuzz_connect;
mod idempotency;
mod limits;
mod message_path;
mod metrics;
mod moves;
mod policies;
mod presence;
mod processes;
mod real_clients;
mod reflection;
mod regions;
mod replication;
mod resume;
mod revocation;
mod scale_smoke;
mod stability;
mod support;
mod team_caps;
mod tls;
mod token_keys;
// Not `mod tracing`: that name would shadow the `tracing` crate in this test crate.
#[path = "tracing.rs"]
mod traces;
mod webhooks;
