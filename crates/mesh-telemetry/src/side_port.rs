//! The HTTP side port of a gRPC service (`/metrics`, `/healthz`, `/readyz`; a ring manager's
//! console): where it is unless `--http` says otherwise, and serving it beside the service.
//!
//! The rule is the ring manager console's (50050 -> 50090), for every gRPC service: the gRPC
//! port + [`HTTP_PORT_OFFSET`] on loopback — the `--listen` address itself if it is a loopback
//! one, else `127.0.0.1` (`::1` for IPv6) — so that a service listening for gRPC on every
//! interface still keeps its metrics and console on the machine. Port 0 stays "the OS picks",
//! so that a service on an ephemeral port gets an ephemeral side port. A side port off loopback
//! (only by `--http`) needs the HTTP token ([`crate::access`]).

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::access::{Access, loopback_like};
use crate::{Error, Telemetry};

/// How far a gRPC service's HTTP port is from its gRPC port by default.
pub const HTTP_PORT_OFFSET: u16 = 40;

/// The HTTP address of a gRPC service listening on `grpc`: `explicit` (its `--http`) if given,
/// else loopback ([`loopback_like`] `grpc`'s address) with the port + [`HTTP_PORT_OFFSET`] (0
/// when `grpc`'s is 0, or when the sum would not be a port).
pub fn http_addr(explicit: Option<SocketAddr>, grpc: SocketAddr) -> SocketAddr {
    explicit.unwrap_or_else(|| {
        let port = match grpc.port() {
            0 => 0,
            p => p.checked_add(HTTP_PORT_OFFSET).unwrap_or(0),
        };
        SocketAddr::new(loopback_like(grpc.ip()), port)
    })
}

/// Binds a listener on `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Binds an HTTP side port or console on `addr`: off loopback only with the HTTP token
/// ([`Access::required`]).
pub async fn bind_http(addr: SocketAddr) -> Result<TcpListener, Error> {
    Access::required(addr)?;
    bind(addr).await
}

/// A gRPC service whose telemetry is served on an HTTP side port beside it: what [`Bound`]
/// binds and serves. Each service crate implements it for its `Config`.
pub trait Service: Send + 'static {
    /// The service's error; a failed bind or a failed HTTP side becomes one.
    type Error: From<Error> + From<std::io::Error> + Send + 'static;

    /// The metrics and readiness its HTTP side serves.
    fn telemetry(&self) -> Telemetry;

    /// Serves the service on `listener` until `cancel`.
    fn serve(
        self,
        listener: TcpListener,
        cancel: CancellationToken,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static;
}

/// A service with its gRPC and HTTP sockets bound, not serving yet: a caller that bound port 0
/// learns the addresses here.
#[derive(Debug)]
pub struct Bound<S> {
    service: S,
    grpc: TcpListener,
    http: TcpListener,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
}

impl<S: Service> Bound<S> {
    /// Binds `service`'s gRPC on `listen` and its HTTP side on `http`, by default next to it
    /// on loopback ([`http_addr`]). An HTTP side off loopback without the HTTP token is refused
    /// before anything is bound.
    pub async fn bind(
        service: S,
        listen: SocketAddr,
        http: Option<SocketAddr>,
    ) -> Result<Self, S::Error> {
        let asked = http_addr(http, listen);
        Access::required(asked)?;
        let grpc = bind(listen).await?;
        let http = bind(asked).await?;
        let bound = |listener: &TcpListener, addr| {
            listener
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })
        };
        Ok(Bound {
            grpc_addr: bound(&grpc, listen)?,
            http_addr: bound(&http, asked)?,
            service,
            grpc,
            http,
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The service, to adjust before it serves (say, its telemetry once its id is known).
    pub fn service_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// Serves gRPC and the HTTP side until `cancel`. Each runs on a task of its own (aborted
    /// if this future is dropped); both stop on one token (a child of `cancel`), so that when
    /// either ends, on its own or failing, the other is stopped too. Returns the service's
    /// error if it failed, else the HTTP side's.
    pub async fn serve(self, cancel: CancellationToken) -> Result<(), S::Error> {
        let stop = cancel.child_token();
        let telemetry = self.service.telemetry();
        let served = spawn_until(self.service.serve(self.grpc, stop.clone()), stop.clone());
        let http = crate::http::serve(self.http, telemetry, stop.clone());
        let http = spawn_until(http, stop);
        let (served, http) = tokio::join!(served, http);
        served?;
        Ok(http?)
    }
}

/// Runs `future` on a task of its own (aborted when the returned future is dropped), then
/// cancels `stop`: its partner's signal that it ended. A panic is an error.
pub async fn spawn_until<E>(
    future: impl Future<Output = Result<(), E>> + Send + 'static,
    stop: CancellationToken,
) -> Result<(), E>
where
    E: From<std::io::Error> + Send + 'static,
{
    let task = AbortOnDropHandle::new(tokio::spawn(future));
    let result = task.await;
    stop.cancel();
    result.unwrap_or_else(|panic| Err(std::io::Error::other(panic).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_side_port_is_the_grpc_port_plus_40_on_loopback_unless_given() {
        let grpc: SocketAddr = "127.0.0.1:50061".parse().unwrap();
        assert_eq!(http_addr(None, grpc).to_string(), "127.0.0.1:50101");
        let other_loopback: SocketAddr = "127.0.0.7:50061".parse().unwrap();
        assert_eq!(
            http_addr(None, other_loopback).to_string(),
            "127.0.0.7:50101"
        );
        // gRPC on every interface (or one of them): the side port stays on the machine.
        let everywhere: SocketAddr = "0.0.0.0:50061".parse().unwrap();
        assert_eq!(http_addr(None, everywhere).to_string(), "127.0.0.1:50101");
        let public: SocketAddr = "10.0.0.5:50061".parse().unwrap();
        assert_eq!(http_addr(None, public).to_string(), "127.0.0.1:50101");
        let v6: SocketAddr = "[::]:50061".parse().unwrap();
        assert_eq!(http_addr(None, v6).to_string(), "[::1]:50101");
        let ephemeral: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(http_addr(None, ephemeral).to_string(), "127.0.0.1:0");
        let top: SocketAddr = "127.0.0.1:65500".parse().unwrap();
        assert_eq!(http_addr(None, top).port(), 0);
        let given: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(http_addr(Some(given), grpc), given);
    }

    #[tokio::test]
    async fn a_side_port_off_loopback_without_a_token_is_refused_before_binding() {
        // No token is configured in this test process.
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = grpc.local_addr().unwrap();
        let refused = Bound::bind(Brief, taken, Some("0.0.0.0:0".parse().unwrap()))
            .await
            .unwrap_err();
        // Refused for the token, not for the gRPC port already in use: nothing was bound.
        assert!(
            refused.to_string().contains("needs a bearer token"),
            "{refused}"
        );
        assert!(bind_http("0.0.0.0:0".parse().unwrap()).await.is_err());
        assert!(bind_http("127.0.0.1:0".parse().unwrap()).await.is_ok());
    }

    /// A service that ends at once.
    #[derive(Debug)]
    struct Brief;

    impl Service for Brief {
        type Error = std::io::Error;

        fn telemetry(&self) -> Telemetry {
            Telemetry::default()
        }

        async fn serve(self, _: TcpListener, _: CancellationToken) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl From<Error> for std::io::Error {
        fn from(e: Error) -> Self {
            std::io::Error::other(e)
        }
    }

    #[tokio::test]
    async fn a_service_that_ends_stops_its_http_side() {
        let bound = Bound::bind(Brief, "127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        assert_ne!(bound.local_addr().port(), 0);
        assert_ne!(bound.http_addr().port(), 0);
        let cancel = CancellationToken::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            bound.serve(cancel.clone()),
        )
        .await
        .expect("the HTTP side stops with the service")
        .expect("no error");
        assert!(
            !cancel.is_cancelled(),
            "only the service's own token is cancelled"
        );
    }
}
