//! channelmesh's calls to the web app, over HTTP: every one a POST of a JSON body signed with the
//! shared secret (`CHANNELMESH_WEBHOOK_SECRET`), so the web app can tell them from anybody
//! else's.
//!
//! - [`sign`]: the signature header, `X-Channelmesh-Signature: sha256=<hex of
//!   HMAC-SHA256(secret, raw body)>`, made and checked.
//! - [`webhooks`]: events for the web app (`channel_occupied`, `member_added`,
//!   `presence_changed`, …), batched, ordered per key, retried, bounded.

pub mod sign;
pub mod webhooks;

pub use sign::{SIGNATURE_HEADER, Secret};
pub use webhooks::{Event, HooksError, SECRET_ENV, WebhookArgs, Webhooks, secret_from_env};
