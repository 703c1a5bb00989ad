//! The flags every process takes: logging and tracing (`--log-json`, `--otlp-endpoint`), and
//! the HTTP token (`--http-token`).

/// How a process logs and whether it exports traces; [`crate::init`] takes them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off when
    /// unset. `dev --multi-process` passes it to every child.
    #[arg(long, global = true, env = crate::init::ENV_OTLP_ENDPOINT)]
    pub otlp_endpoint: Option<String>,
}

impl LogArgs {
    /// The same settings as arguments, for child processes.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.log_json {
            args.push("--log-json".to_string());
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            args.extend(["--otlp-endpoint".to_string(), endpoint.clone()]);
        }
        args
    }
}

/// The bearer token of the HTTP endpoints beyond the health probes, where they are served off
/// loopback ([`crate::access`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HttpArgs {
    /// Bearer token for /metrics, the ring manager's console and a gateway's /stats where they
    /// listen off loopback (at least 16 bytes); `ctl top` sends it. A side port or console
    /// off loopback does not start without it. Children of `dev --multi-process` inherit it.
    #[arg(long, global = true, env = crate::access::ENV_HTTP_TOKEN, hide_env_values = true)]
    pub http_token: Option<String>,
}

impl HttpArgs {
    /// Sets this process's HTTP token from the flag (none when unset or empty).
    pub fn configure(&self) -> Result<(), crate::Error> {
        let token = self
            .http_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(crate::access::HttpToken::new)
            .transpose()?;
        crate::access::configure(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_go_to_children_as_given() {
        assert!(LogArgs::default().to_args().is_empty());
        let args = LogArgs {
            log_json: true,
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
        };
        assert_eq!(
            args.to_args(),
            ["--log-json", "--otlp-endpoint", "http://127.0.0.1:4317"]
        );
    }
}
