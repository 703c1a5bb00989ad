//! The load generator's client WebSocket (RTM and NATS alike): [`crate::wsraw`] dialled from a
//! chosen source address, frames read in place from one small buffer per connection so that
//! tens of thousands of clients fit in a process and every delivery costs no allocation.

use std::net::IpAddr;

/// A client's WebSocket.
pub type Socket = crate::wsraw::WsStream;

/// Opens a WebSocket to `url` from `source` (bound before connecting, so each worker uses its
/// own address; ports are picked at connect time).
pub async fn dial(url: &str, source: IpAddr) -> anyhow::Result<Socket> {
    crate::wsraw::connect(url, source, &[]).await
}
