//! The flags that say where the rings are — `--ring-manager`, `--presence-ring-manager` and the
//! `--consul*` group, taken by every service and by `ctl` — and keeping a service registered in
//! Consul's catalog while it runs.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::consul::ServiceDef;
use crate::consul_ring::{self, ConsulRing};
use crate::{Error, RingSource};

/// Env var: the ring manager's gRPC endpoint.
pub const ENV_RING_MANAGER: &str = "CHANNELMESH_RING_MANAGER";
/// The ring manager `dev` starts, and the default everyone else dials.
pub const DEFAULT_RING_MANAGER: &str = "http://127.0.0.1:50050";
/// Env var: the presence ring's ring manager.
pub const ENV_PRESENCE_RING_MANAGER: &str = "CHANNELMESH_PRESENCE_RING_MANAGER";
/// The presence ring manager `dev` starts, and the default everyone else dials.
pub const DEFAULT_PRESENCE_RING_MANAGER: &str = "http://127.0.0.1:50052";
/// Env var: the Consul agent to use instead of a fixed ring manager.
pub const ENV_CONSUL: &str = "CHANNELMESH_CONSUL";
/// Env var: Consul's ACL token (Consul's own name for it).
pub const ENV_CONSUL_TOKEN: &str = "CONSUL_HTTP_TOKEN";

/// The key prefix of the presence ring in Consul, given the channel ring's.
pub fn presence_prefix(prefix: &str) -> String {
    format!("{prefix}/presence")
}

/// Where the channel ring and the presence ring are found.
#[derive(Debug, Clone, clap::Args)]
pub struct RingArgs {
    /// The ring manager's gRPC endpoint (ignored with --consul).
    #[arg(long, env = ENV_RING_MANAGER, default_value = DEFAULT_RING_MANAGER)]
    pub ring_manager: String,
    /// The presence ring's ring manager (ignored with --consul, where the presence ring lives
    /// under CONSUL_PREFIX/presence).
    #[arg(long, env = ENV_PRESENCE_RING_MANAGER, default_value = DEFAULT_PRESENCE_RING_MANAGER)]
    pub presence_ring_manager: String,
    #[command(flatten)]
    pub consul: ConsulArgs,
}

impl RingArgs {
    /// Where the ring comes from: Consul if given, else the ring manager's endpoint.
    pub fn source(&self) -> Result<RingSource, Error> {
        Ok(match self.consul.ring()? {
            Some(ring) => RingSource::Consul(ring),
            None => RingSource::Direct(self.ring_manager.clone()),
        })
    }

    /// Where the presence ring comes from: Consul under the presence prefix if given, else the
    /// presence ring manager's endpoint.
    pub fn presence_source(&self) -> Result<RingSource, Error> {
        let consul = ConsulArgs {
            consul_prefix: presence_prefix(&self.consul.consul_prefix),
            ..self.consul.clone()
        };
        Ok(match consul.ring()? {
            Some(ring) => RingSource::Consul(ring),
            None => RingSource::Direct(self.presence_ring_manager.clone()),
        })
    }
}

/// The Consul agent, when the mesh runs on one.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsulArgs {
    /// Use the Consul agent at this address (e.g. http://127.0.0.1:8500): the ring and the
    /// leading ring manager are found there, and the service registers there with a TTL check.
    #[arg(long, env = ENV_CONSUL)]
    pub consul: Option<String>,
    /// The prefix of channelmesh's keys in Consul KV.
    #[arg(long, default_value = consul_ring::DEFAULT_PREFIX)]
    pub consul_prefix: String,
    /// Consul ACL token.
    #[arg(long, env = ENV_CONSUL_TOKEN, hide_env_values = true)]
    pub consul_token: Option<String>,
}

impl ConsulArgs {
    /// The ring in Consul, with `--consul`.
    pub fn ring(&self) -> Result<Option<ConsulRing>, Error> {
        self.consul
            .as_deref()
            .map(|url| {
                ConsulRing::new(url, self.consul_token.clone(), &self.consul_prefix).map_err(
                    |source| Error::ConsulFlag {
                        url: url.to_string(),
                        source: Box::new(source),
                    },
                )
            })
            .transpose()
    }

    /// With `--consul`, keeps `service` registered (see [`Registration`]); nothing without.
    pub fn register(
        &self,
        service: ServiceDef,
        cancel: &CancellationToken,
    ) -> Result<Registration, Error> {
        Ok(match self.ring()? {
            Some(ring) => Registration::start(&ring, service, cancel),
            None => Registration::none(),
        })
    }
}

/// A service's entry in Consul's catalog, kept with a TTL check that passes while the process
/// runs ([`consul_ring::keep_registered`]); [`Registration::end`] removes it.
#[derive(Debug)]
pub struct Registration {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// Registers `service` in Consul's catalog (where `ring` lives) until `cancel` or
    /// [`Registration::end`].
    pub fn start(ring: &ConsulRing, service: ServiceDef, cancel: &CancellationToken) -> Self {
        let stop = cancel.child_token();
        let task = tokio::spawn(consul_ring::keep_registered(
            ring.consul.clone(),
            service,
            stop.clone(),
        ));
        Registration {
            stop,
            task: Some(task),
        }
    }

    /// No registration: a service not on Consul.
    pub fn none() -> Self {
        Registration {
            stop: CancellationToken::new(),
            task: None,
        }
    }

    /// Runs `serving` (the service itself), then ends the registration: the service stays in
    /// the catalog exactly while it serves.
    pub async fn during<T>(self, serving: impl Future<Output = T>) -> T {
        let served = serving.await;
        self.end().await;
        served
    }

    /// Stops passing the check and waits for the deregistration (itself bounded in time).
    pub async fn end(self) {
        self.stop.cancel();
        if let Some(task) = self.task
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "the consul registration task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ring: RingArgs,
    }

    #[test]
    fn without_consul_the_rings_are_the_ring_managers() {
        let cli = Cli::parse_from(["x", "--presence-ring-manager", "http://10.0.0.1:50052"]);
        assert!(
            matches!(cli.ring.source(), Ok(RingSource::Direct(e)) if e == DEFAULT_RING_MANAGER)
        );
        assert!(
            matches!(cli.ring.presence_source(), Ok(RingSource::Direct(e)) if e == "http://10.0.0.1:50052")
        );
    }

    #[test]
    fn on_consul_the_presence_ring_lives_under_its_own_prefix() {
        let cli = Cli::parse_from([
            "x",
            "--consul",
            "http://127.0.0.1:8500",
            "--consul-prefix",
            "p",
        ]);
        assert!(matches!(cli.ring.source(), Ok(RingSource::Consul(r)) if r.prefix == "p"));
        assert!(
            matches!(cli.ring.presence_source(), Ok(RingSource::Consul(r)) if r.prefix == "p/presence")
        );
    }

    #[test]
    fn a_bad_consul_address_names_the_flag() {
        let cli = Cli::parse_from(["x", "--consul", "127.0.0.1:8500"]);
        let error = cli.ring.source().expect_err("no scheme");
        assert!(
            error.to_string().starts_with("--consul 127.0.0.1:8500"),
            "{error}"
        );
    }
}
