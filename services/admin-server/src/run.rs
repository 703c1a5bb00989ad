//! Starting an admin server: [`bind`] its gRPC and HTTP sockets (so that a caller on port 0
//! learns its addresses), then serve both ([`Bound::serve`](side_port::Bound::serve));
//! [`run`] is the `admin-server` command.

use std::future::Future;
use std::net::SocketAddr;

use mesh_telemetry::side_port::{self, Service};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::telemetry;
use crate::{Args, Config, Error};

/// An admin server with its sockets bound, not serving yet.
pub type Bound = side_port::Bound<Config>;

impl Service for Config {
    type Error = Error;

    fn telemetry(&self) -> mesh_telemetry::Telemetry {
        self.telemetry.clone()
    }

    fn serve(
        self,
        listener: TcpListener,
        cancel: CancellationToken,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        crate::serve(self, listener, cancel)
    }
}

/// Binds an admin server's gRPC socket on `listen` and its HTTP side (`/metrics`, `/healthz`,
/// `/readyz`) on `http`, by default next to it on loopback ([`side_port::http_addr`]).
pub async fn bind(
    config: Config,
    listen: SocketAddr,
    http: Option<SocketAddr>,
) -> Result<Bound, Error> {
    Bound::bind(config, listen, http).await
}

/// The `admin-server` command: reads its secrets, binds, says where (`listening on ADDR`, then
/// `http on ADDR`), registers in Consul when given (by `--id`, else its address), and serves
/// until `cancel`.
pub async fn run(args: Args, cancel: CancellationToken) -> Result<(), Error> {
    let config = Config::from_args(&args)?;
    let mut bound = bind(config, args.listen, args.http).await?;
    let local = bound.local_addr();
    println!("listening on {local}");
    let id = args.id.clone().unwrap_or_else(|| local.to_string());
    bound.service_mut().telemetry = telemetry(&id);
    let service = ring_client::consul_ring::service_def("admin-server", &id, local, None, vec![]);
    let registration = args.ring.consul.register(service, &cancel)?;
    println!("http on {}", bound.http_addr());
    registration.during(bound.serve(cancel)).await
}
