//! Starting a gateway: [`bind`] its socket (so that a caller on port 0 learns its address),
//! then [`Bound::serve`]; [`run`] is the `gateway` command. A gateway serves `/metrics`,
//! `/healthz` and `/readyz` on its own port: there is no side port.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Args, Config, Error};

/// A gateway with its socket bound, not serving yet.
#[derive(Debug)]
pub struct Bound {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
}

/// Binds a gateway's socket on `listen`.
pub async fn bind(config: Config, listen: SocketAddr) -> Result<Bound, Error> {
    let listener = mesh_telemetry::side_port::bind(listen).await?;
    Ok(Bound {
        local_addr: listener.local_addr()?,
        config,
        listener,
    })
}

impl Bound {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the gateways it may forward clients to while its region drains (for a mesh
    /// whose gateways learn each other's addresses once bound).
    pub fn with_redirect_allow(mut self, allow: crate::region::RedirectAllow) -> Self {
        self.config.redirect_allow = allow;
        self
    }

    /// Serves until `cancel`; clients get `goodbye` on the way out.
    pub async fn serve(self, cancel: CancellationToken) -> Result<(), Error> {
        crate::serve(self.config, self.listener, cancel).await
    }
}

/// The `gateway` command: binds, says where (`listening on ADDR`), registers in Consul when
/// given, and serves until `cancel`.
pub async fn run(args: Args, cancel: CancellationToken) -> Result<(), Error> {
    let config = Config::from_args(&args)?;
    let bound = bind(config, args.listen).await?;
    println!("listening on {}", bound.local_addr());
    let meta = vec![("region".to_string(), bound.config.region.clone())];
    let service = ring_client::consul_ring::service_def(
        "gateway",
        &bound.config.id,
        bound.local_addr(),
        None,
        meta,
    );
    let registration = args.ring.consul.register(service, &cancel)?;
    registration.during(bound.serve(cancel)).await
}
