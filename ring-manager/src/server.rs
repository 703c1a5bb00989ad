//! The embedded ring manager: a registry of channel servers and the publisher of the ring.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use mesh_core::{NodeId, Ring, RingNode};
use mesh_proto::ring as pb;
use mesh_proto::ring::ring_manager_server::{RingManager as RingManagerRpc, RingManagerServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::convert::ring_to_proto;

/// A registered channel server.
#[derive(Debug, Clone)]
struct Member {
    addr: String,
    pid: u32,
}

/// The ring manager's state: members and the published ring.
#[derive(Debug, Clone)]
pub struct RingManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Registered channel servers by id. The lock is never held across an await.
    members: Mutex<BTreeMap<NodeId, Member>>,
    /// The published ring; every watcher follows it.
    ring: watch::Sender<Arc<Ring>>,
    /// Ends every watch stream when the server shuts down.
    cancel: CancellationToken,
}

impl RingManager {
    /// A ring manager with no members (epoch 0).
    pub fn new(cancel: CancellationToken) -> Self {
        let (ring, _) = watch::channel(Arc::new(Ring::empty()));
        RingManager {
            inner: Arc::new(Inner {
                members: Mutex::new(BTreeMap::new()),
                ring,
                cancel,
            }),
        }
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.inner.ring.borrow().clone()
    }

    /// Follows the ring in process.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Ring>> {
        self.inner.ring.subscribe()
    }

    /// Adds (or re-announces) a channel server; publishes a new epoch when membership changed.
    pub fn register(&self, id: NodeId, addr: String, pid: u32) -> u64 {
        let mut members = self.inner.members.lock().unwrap_or_else(|e| e.into_inner());
        let unchanged = members.get(&id).is_some_and(|m| m.addr == addr);
        members.insert(
            id.clone(),
            Member {
                addr: addr.clone(),
                pid,
            },
        );
        if unchanged {
            return self.inner.ring.borrow().epoch();
        }
        let nodes: Vec<RingNode> = members
            .iter()
            .map(|(id, m)| RingNode {
                id: id.clone(),
                addr: m.addr.clone(),
            })
            .collect();
        let next = self.inner.ring.borrow().rebalanced(&nodes);
        let epoch = next.epoch();
        tracing::info!(node = %id, %addr, epoch, "channel server registered; new ring epoch");
        self.inner.ring.send_replace(Arc::new(next));
        epoch
    }

    fn to_proto(&self, ring: &Ring) -> pb::Ring {
        let members = self.inner.members.lock().unwrap_or_else(|e| e.into_inner());
        ring_to_proto(ring, |id| {
            let pid = members.get(id).map_or(0, |m| m.pid);
            ("active".to_string(), pid)
        })
    }
}

type RingStream = Pin<Box<dyn Stream<Item = Result<pb::Ring, Status>> + Send>>;

#[tonic::async_trait]
impl RingManagerRpc for RingManager {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let id = NodeId::new(&req.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.addr.is_empty() {
            return Err(Status::invalid_argument("addr is required"));
        }
        let epoch = RingManager::register(self, id, req.addr, req.pid);
        Ok(Response::new(pb::RegisterResponse { epoch }))
    }

    type WatchRingStream = RingStream;

    async fn watch_ring(
        &self,
        _request: Request<pb::WatchRingRequest>,
    ) -> Result<Response<RingStream>, Status> {
        let this = self.clone();
        let stream = WatchStream::new(self.subscribe())
            .map(move |ring| Ok(this.to_proto(&ring)))
            .take_until(self.inner.cancel.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_ring(
        &self,
        _request: Request<pb::GetRingRequest>,
    ) -> Result<Response<pb::Ring>, Status> {
        Ok(Response::new(self.to_proto(&self.ring())))
    }
}

/// Serves `manager` on `listener` until `cancel` fires.
pub async fn serve(
    manager: RingManager,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), crate::Error> {
    tracing::info!(addr = ?listener.local_addr().ok(), "ring manager listening");
    tonic::transport::Server::builder()
        .add_service(RingManagerServer::new(manager))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}
