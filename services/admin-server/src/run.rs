//! Starting an admin server: [`bind`] its gRPC and HTTP sockets (so that a caller on port 0
//! learns its addresses), then [`Bound::serve`] both; [`run`] is the `admin-server` command.

use std::net::SocketAddr;

use mesh_telemetry::side_port::Sockets;
use tokio_util::sync::CancellationToken;

use crate::config::telemetry;
use crate::{Args, Config, Error};

/// An admin server with its sockets bound, not serving yet.
#[derive(Debug)]
pub struct Bound {
    config: Config,
    sockets: Sockets,
}

/// Binds an admin server's gRPC socket on `listen` and its HTTP side (`/metrics`, `/healthz`,
/// `/readyz`) on `http`, by default next to it ([`mesh_telemetry::side_port::http_addr`]).
pub async fn bind(
    config: Config,
    listen: SocketAddr,
    http: Option<SocketAddr>,
) -> Result<Bound, Error> {
    let sockets = Sockets::bind(listen, http).await?;
    Ok(Bound { config, sockets })
}

impl Bound {
    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.sockets.grpc_addr()
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.sockets.http_addr()
    }

    /// Serves gRPC and HTTP until `cancel`, or until either stops (which stops the other).
    pub async fn serve(self, cancel: CancellationToken) -> Result<(), Error> {
        let Bound { config, sockets } = self;
        let telemetry = config.telemetry.clone();
        sockets
            .serve(telemetry, &cancel, |grpc, stop| {
                crate::serve(config, grpc, stop)
            })
            .await
    }
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
    bound.config.telemetry = telemetry(&id);
    let service = ring_client::consul_ring::service_def("admin-server", &id, local, None, vec![]);
    let registration = args.ring.consul.register(service, &cancel)?;
    println!("http on {}", bound.http_addr());
    registration.during(bound.serve(cancel)).await
}
