//! Lookups over the pool against a real gRPC presence server (a stand-in that answers
//! `Query`): many lookups share one TCP connection, and a server that restarts on the same
//! address is reached again through the same pooled channel.

#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{Stream, StreamExt};
use mesh_core::{NodeId, Ring, RingNode, UserId};
use mesh_proto::presence as pb;
use mesh_proto::presence::presence_server::{Presence, PresenceServer};
use presence_client::{Pool, lookup};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Answers every user active.
struct AllActive;

#[tonic::async_trait]
impl Presence for AllActive {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

    async fn session(
        &self,
        _: Request<Streaming<pb::GatewayMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let users = request
            .into_inner()
            .users
            .into_iter()
            .map(|user| pb::UserPresence {
                user,
                active: true,
                team: String::new(),
            })
            .collect();
        Ok(Response::new(pb::QueryResponse { users }))
    }

    async fn connections(
        &self,
        _: Request<pb::ConnectionsRequest>,
    ) -> Result<Response<pb::ConnectionsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves [`AllActive`] on `listener` until `stop`, counting the TCP connections it accepts.
fn serve(listener: TcpListener, accepted: Arc<AtomicUsize>, stop: CancellationToken) {
    let incoming = TcpListenerStream::new(listener).inspect(move |_| {
        accepted.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(PresenceServer::new(AllActive))
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await
            .unwrap();
    });
}

/// Polls `check` (every 20 ms, for at most 10 s) until it answers `Some`.
async fn poll<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within 10 s");
        // The poll interval, not a wait by itself.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn ring_of(addr: &str) -> Ring {
    Ring::empty().rebalanced(&[RingNode {
        id: NodeId::new("ps-1").unwrap(),
        addr: addr.to_string(),
    }])
}

#[tokio::test]
async fn lookups_share_one_connection_and_follow_a_restarted_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    serve(listener, accepted.clone(), stop.clone());

    let pool = Pool::new();
    let ring = ring_of(&addr.to_string());
    let users: Vec<UserId> = (0..3)
        .map(|i| UserId::new(&format!("U{i}")).unwrap())
        .collect();
    for _ in 0..20 {
        let answer = lookup(&pool, &ring, &users).await;
        assert!(answer.iter().all(|p| p.active), "{answer:?}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "20 lookups, one connection"
    );
    assert_eq!(pool.len(), 1);

    // The server goes away and comes back on the same address: the pooled channel
    // reconnects (a lookup in between reads everyone as away).
    stop.cancel();
    let listener = poll(|| async { TcpListener::bind(addr).await.ok() }).await;
    let again = Arc::new(AtomicUsize::new(0));
    serve(listener, again.clone(), CancellationToken::new());
    poll(|| async {
        let answer = lookup(&pool, &ring, &users).await;
        answer.iter().all(|p| p.active).then_some(())
    })
    .await;
    assert_eq!(pool.len(), 1, "still one channel for the address");
}
