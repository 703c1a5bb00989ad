//! Starting a channel server: [`bind`] its gRPC and HTTP sockets (so that a caller on port 0
//! learns its addresses), then serve both ([`Bound::serve`](side_port::Bound::serve));
//! [`run`] is the `channel-server` command.

use std::future::Future;
use std::net::SocketAddr;

use mesh_telemetry::side_port::{self, Service};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Args, Config, Error};

/// A channel server with its sockets bound, not serving yet.
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

/// Binds a channel server's gRPC socket on `listen` and its HTTP side (`/metrics`, `/healthz`,
/// `/readyz`) on `http`, by default next to it on loopback ([`side_port::http_addr`]).
pub async fn bind(
    config: Config,
    listen: SocketAddr,
    http: Option<SocketAddr>,
) -> Result<Bound, Error> {
    Bound::bind(config, listen, http).await
}

/// The `channel-server` command: binds, says where (`listening on ADDR`, then `http on ADDR`),
/// registers in Consul when given, and serves until `cancel`.
pub async fn run(args: Args, cancel: CancellationToken) -> Result<(), Error> {
    let config = Config::from_args(&args)?;
    if args.test_clock_skew_ms != 0 {
        tracing::warn!(
            skew_ms = args.test_clock_skew_ms,
            "--test-clock-skew-ms: this channel server stamps ts with a clock {} ms off; a test \
             hook for fault injection, never for production",
            args.test_clock_skew_ms
        );
        mesh_core::ts::set_clock_skew(args.test_clock_skew_ms.saturating_mul(1_000));
    }
    let bound = bind(config, args.listen, args.http).await?;
    println!("listening on {}", bound.local_addr());
    let service = ring_client::consul_ring::service_def(
        "channel-server",
        &args.id,
        bound.local_addr(),
        args.advertise.as_deref(),
        vec![],
    );
    let registration = args
        .ring
        .consul
        .register(service, &cancel)
        .map_err(Error::RingArgs)?;
    println!("http on {}", bound.http_addr());
    registration.during(bound.serve(cancel)).await
}
