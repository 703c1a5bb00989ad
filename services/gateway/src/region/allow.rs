//! Where a draining gateway may forward a client's `rtm.connect` (with the client's token):
//! the `--redirect-allow` list of gateway origins (`http://10.0.0.7:8080`) and host patterns
//! (`https://*.gw.example.com`). The ring manager's directives say where the nearest healthy
//! region's gateways are, from what gateways reported of themselves; a URL nobody configured is
//! never called. An empty list allows nothing: redirects are off (docs/decisions.md).

use std::fmt;

use reqwest::Url;

/// One entry of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// Exactly this host.
    Exact(String),
    /// Any host ending in this suffix (with its leading dot): `*.gw.example.com` ->
    /// `.gw.example.com`; at least one label must come before it.
    Suffix(String),
}

/// An allowed origin or host pattern: `scheme://host[:port]`, host possibly `*.domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    scheme: String,
    host: Host,
    /// The port; the scheme's own (80, 443) when the entry names none.
    port: u16,
    /// The entry as given, for logs.
    raw: String,
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl std::str::FromStr for AllowEntry {
    type Err = String;

    /// `http[s]://host[:port]` (a trailing `/` is allowed, nothing else after the host); the
    /// host may be `*.domain` (any host under that domain).
    fn from_str(raw: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("{raw:?}: {why} (want scheme://host[:port] or scheme://*.domain[:port])")
        };
        let (scheme, rest) = raw.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme is not http or https"));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', '\\']) {
            return Err(bad("not an origin"));
        }
        let (wildcard, rest) = match rest.strip_prefix("*.") {
            Some(domain) => (true, domain),
            None => (false, rest),
        };
        if rest.contains('*') {
            return Err(bad("a wildcard stands only for the leftmost labels"));
        }
        // Parsed as the URL it stands for, so that it is read exactly as targets are.
        let url = Url::parse(&format!("{scheme}://{rest}/")).map_err(|e| bad(&e.to_string()))?;
        let host = url.host_str().ok_or_else(|| bad("no host"))?.to_string();
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        Ok(AllowEntry {
            scheme,
            host: if wildcard {
                Host::Suffix(format!(".{host}"))
            } else {
                Host::Exact(host)
            },
            port,
            raw: raw.to_string(),
        })
    }
}

impl AllowEntry {
    /// The origin of a gateway's base URL `http://{addr}`: what `dev` allows for its own.
    pub fn origin(addr: std::net::SocketAddr) -> AllowEntry {
        format!("http://{addr}")
            .parse()
            .expect("a socket address makes an origin")
    }

    fn allows(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host_ok = match &self.host {
            Host::Exact(h) => host == h,
            Host::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        };
        url.scheme() == self.scheme && host_ok && url.port_or_known_default() == Some(self.port)
    }
}

/// The gateways a draining gateway may forward `rtm.connect` to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedirectAllow(Vec<AllowEntry>);

impl RedirectAllow {
    pub fn new(entries: Vec<AllowEntry>) -> Self {
        RedirectAllow(entries)
    }

    /// No entry: redirects are off.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `rtm.connect` URL of the gateway at base URL `target`, if that gateway is allowed:
    /// the very URL checked is the one to call. A URL with credentials in it is never allowed.
    pub fn connect_url(&self, target: &str) -> Option<Url> {
        let url = Url::parse(&format!("{}/api/rtm.connect", target.trim_end_matches('/'))).ok()?;
        let plain = url.username().is_empty() && url.password().is_none();
        (plain && self.0.iter().any(|e| e.allows(&url))).then_some(url)
    }

    /// The entries, for the log at start.
    pub fn entries(&self) -> impl Iterator<Item = &AllowEntry> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(entries: &[&str]) -> RedirectAllow {
        RedirectAllow::new(entries.iter().map(|e| e.parse().unwrap()).collect())
    }

    fn allowed(list: &RedirectAllow, target: &str) -> bool {
        list.connect_url(target).is_some()
    }

    #[test]
    fn an_origin_allows_exactly_its_scheme_host_and_port() {
        let list = allow(&["http://127.0.0.1:8081", "https://eu.example.com"]);
        assert!(allowed(&list, "http://127.0.0.1:8081"));
        assert!(allowed(&list, "http://127.0.0.1:8081/"));
        assert!(allowed(&list, "https://eu.example.com"));
        assert!(allowed(&list, "https://eu.example.com:443"));
        assert!(allowed(&list, "HTTPS://EU.example.com"));
        for target in [
            "http://127.0.0.1:8082",
            "https://127.0.0.1:8081",
            "http://127.0.0.2:8081",
            "http://eu.example.com",
            "https://eu.example.com:8443",
            "https://eu.example.com.evil.net",
            "https://evil.net#https://eu.example.com",
            "https://user:pw@eu.example.com",
            "https://eu.example.com@evil.net",
            "not a url",
            "",
        ] {
            assert!(!allowed(&list, target), "{target}");
        }
        // What is called is the URL checked.
        assert_eq!(
            list.connect_url("http://127.0.0.1:8081/").unwrap().as_str(),
            "http://127.0.0.1:8081/api/rtm.connect"
        );
    }

    #[test]
    fn a_pattern_allows_hosts_under_its_domain_only() {
        let list = allow(&["https://*.gw.example.com"]);
        assert!(allowed(&list, "https://eu-1.gw.example.com"));
        assert!(allowed(&list, "https://a.b.gw.example.com"));
        for target in [
            "https://gw.example.com",
            "https://evilgw.example.com",
            "https://eu-1.gw.example.com.evil.net",
            "http://eu-1.gw.example.com",
            "https://eu-1.gw.example.com:8443",
        ] {
            assert!(!allowed(&list, target), "{target}");
        }
        let with_port = allow(&["http://*.internal:8080"]);
        assert!(allowed(&with_port, "http://gw-1.internal:8080"));
        assert!(!allowed(&with_port, "http://gw-1.internal"));
    }

    #[test]
    fn nothing_is_allowed_by_an_empty_list() {
        let list = RedirectAllow::default();
        assert!(list.is_empty());
        assert!(!allowed(&list, "http://127.0.0.1:8081"));
    }

    #[test]
    fn entries_that_are_not_origins_are_refused() {
        for raw in [
            "127.0.0.1:8081",
            "ftp://gw.example.com",
            "https://gw.example.com/path",
            "https://gw.example.com?x",
            "https://user@gw.example.com",
            "https://gw.*.example.com",
            "https://*",
            "https://",
            "http://gw.example.com:notaport",
        ] {
            assert!(raw.parse::<AllowEntry>().is_err(), "{raw}");
        }
        let entry: AllowEntry = "https://*.gw.example.com/".parse().unwrap();
        assert_eq!(entry.to_string(), "https://*.gw.example.com/");
        let addr = "127.0.0.1:8081".parse().unwrap();
        assert!(
            RedirectAllow::new(vec![AllowEntry::origin(addr)])
                .connect_url("http://127.0.0.1:8081")
                .is_some()
        );
    }
}
