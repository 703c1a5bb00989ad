//! The two clients a benchmark drives a mesh through, as a user's app would: one RTM client
//! (the real connect flow, then JSON frames) and the admin API's `PostMessage` with its bearer
//! token. `latency` and `failover` use both; the load workers post through [`Admin`].

use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use mesh_core::{Identity, TokenKey};
use mesh_proto::admin::admin_client::AdminClient;
use mesh_proto::admin::{PostMessageRequest, PublishStreamReply, PublishStreamRequest};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::clock::unix_now;

/// An RTM client's WebSocket (`wss://` when the gateway's connect URL says so).
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long [`next_json`] waits for a frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects an RTM client for `identity` through the gateway at base URL `gateway` (the real
/// connect flow: token, `rtm.connect`, WebSocket, `hello`).
pub async fn connect(
    gateway: &str,
    jwt_secret: &str,
    identity: &Identity,
) -> anyhow::Result<Socket> {
    let now = unix_now();
    let token = TokenKey::hs256(jwt_secret.as_bytes())?.mint(identity, now)?;
    let reply: Value = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .post(format!("{gateway}rtm.connect"))
        .bearer_auth(&token)
        .send()
        .await
        .context("calling rtm.connect")?
        .json()
        .await?;
    let url = reply["url"]
        .as_str()
        .with_context(|| format!("rtm.connect answered {reply}"))?;
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "hello" {
        bail!("expected hello, got {first}");
    }
    Ok(ws)
}

/// The next text frame, as JSON.
pub async fn next_json(ws: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .context("no frame within 10 s")?
            .context("the gateway closed the socket")??;
        if let Message::Text(text) = msg {
            return Ok(serde_json::from_str(text.as_str())?);
        }
    }
}

/// The admin API, with its bearer token on every call.
#[derive(Debug, Clone)]
pub struct Admin {
    client: AdminClient<tonic::transport::Channel>,
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Admin {
    /// Connects to the public admin API at `addr` ("host:port", plaintext; or
    /// "https://host:port", checked against this process's --tls-ca).
    pub async fn connect(addr: &str, admin_token: &str) -> anyhow::Result<Self> {
        let ca = match mesh_transport::transport().as_deref() {
            Some(mesh_transport::Transport::Mtls(c)) => Some(c.ca.clone()),
            _ => None,
        };
        let channel = mesh_transport::public_endpoint(addr, ca.as_deref())?
            .connect()
            .await
            .context("connecting to the admin server")?;
        Ok(Self {
            client: AdminClient::new(channel),
            bearer: format!("Bearer {admin_token}").parse()?,
        })
    }

    /// Opens a `PublishStream` (the firehose) that sends `requests` in order; the replies
    /// come on the returned stream.
    pub async fn publish_stream(
        &mut self,
        requests: impl futures::Stream<Item = PublishStreamRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<PublishStreamReply>, tonic::Status> {
        let mut request = tonic::Request::new(requests);
        request
            .metadata_mut()
            .insert("authorization", self.bearer.clone());
        Ok(self.client.publish_stream(request).await?.into_inner())
    }

    /// Posts `text` to `channel` as `user`.
    pub async fn post(
        &mut self,
        channel: String,
        user: &str,
        text: String,
    ) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(PostMessageRequest {
            channel,
            user: user.to_string(),
            text,
            team: String::new(),
            idempotency_key: String::new(),
        });
        request
            .metadata_mut()
            .insert("authorization", self.bearer.clone());
        self.client.post_message(request).await.map(drop)
    }
}
