//! This gateway's place in its region: it reports itself to the ring manager about every half
//! second, and when its region drains it fails its health check, sends `rtm.connect` callers to
//! the nearest healthy region (with resume cursors), and says goodbye to its clients in paced
//! batches — lame duck, no reconnect storm. The same reports bring the token revocation list:
//! revoked tokens are refused, and connections holding them closed (4003); and the web app's
//! disconnect orders: the connections they name are closed (4010, 4011).
//!
//! [`state`] holds what the directives say and the connections to close ([`disconnects`]: the
//! orders and whom they match); [`report`] is the
//! task that reports and applies the directives; [`allow`] is where `rtm.connect` may be
//! forwarded (`--redirect-allow`).

pub mod allow;
pub mod disconnects;
pub mod report;
pub mod state;

pub use allow::{AllowEntry, RedirectAllow};
pub use report::Reporter;
pub use state::{MAX_REVOKED, RegionState};
