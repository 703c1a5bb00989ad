//! The load generator's client WebSocket (RTM and NATS alike): dialled from a chosen source
//! address, with a small read buffer so that tens of thousands of clients fit in a process.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;

/// A client's WebSocket.
pub type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// How long the TCP connect, and then the WebSocket handshake, may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(20);

/// The clients' WebSocket settings: a 4 KiB read buffer instead of tungstenite's 128 KiB, so
/// tens of thousands of idle clients fit in a few processes (messages here are small), and
/// because tungstenite zeroes the free part of the buffer before every read: with 16 KiB that
/// memset was 7% of a worker's time at 650,000 deliveries/s. A larger frame (a NATS batch)
/// still arrives whole; it takes a few more reads.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4 * 1024)
}

/// Opens a WebSocket to `url` from `source` (bound before connecting, so each worker uses its
/// own address and port range).
pub async fn dial(url: &str, source: IpAddr) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::http::Uri;
    let uri: Uri = url
        .parse()
        .with_context(|| format!("a WebSocket URL: {url}"))?;
    let host = uri.host().with_context(|| format!("no host in {url}"))?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .with_context(|| format!("no address for {host} of the source's family"))?;
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // Ports in TIME_WAIT from closed clients (connect-storm) may be bound again.
    socket.set_reuseaddr(true)?;
    socket.bind((source, 0).into())?;
    let stream = tokio::time::timeout(DIAL_TIMEOUT, socket.connect(addr))
        .await
        .context("TCP connect timed out")?
        .with_context(|| format!("connecting to {addr} from {source}"))?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio::time::timeout(
        DIAL_TIMEOUT,
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())),
    )
    .await
    .context("WebSocket handshake timed out")??;
    Ok(ws)
}
