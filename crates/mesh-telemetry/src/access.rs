//! Who may read a service's HTTP endpoints beyond its health probes — `/metrics`, a ring
//! manager's console, a gateway's `/stats`: anyone on a loopback listener; on any other
//! address, only a caller presenting this process's HTTP token (`--http-token`, env
//! `CHANNELMESH_HTTP_TOKEN`) as `Authorization: Bearer <token>` (or as the password of HTTP
//! Basic authentication, which a browser on the console sends by itself). `/healthz` and
//! `/readyz` stay open everywhere: orchestrators and load balancers probe them.
//!
//! The rule is decided by the address a listener is bound to, not by where a caller comes
//! from: a listener on `127.0.0.0/8` or `::1` is reachable only from the machine. Listeners
//! that serve nothing but these endpoints (side ports, consoles) refuse to start off loopback
//! without a token ([`Access::required`]); the gateway, whose port is public for its clients,
//! answers 403 on `/metrics` and `/stats` there instead ([`Access::Closed`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::Error;

/// Env var: the HTTP token.
pub const ENV_HTTP_TOKEN: &str = "CHANNELMESH_HTTP_TOKEN";
/// The shortest HTTP token accepted.
pub const MIN_HTTP_TOKEN_LEN: usize = 16;
/// The health probes, open on every listener.
const PROBES: [&str; 2] = ["/healthz", "/readyz"];
/// The realm both challenges name.
const REALM: &str = "channelmesh";

/// A bearer token for the HTTP endpoints; never printed.
#[derive(Clone)]
pub struct HttpToken(Arc<str>);

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpToken(..)")
    }
}

impl HttpToken {
    /// A token of at least [`MIN_HTTP_TOKEN_LEN`] bytes, without spaces or control characters
    /// (it travels in a header).
    pub fn new(raw: &str) -> Result<Self, Error> {
        if raw.len() < MIN_HTTP_TOKEN_LEN {
            return Err(Error::HttpToken(format!(
                "it has {} bytes; at least {MIN_HTTP_TOKEN_LEN} are needed",
                raw.len()
            )));
        }
        if raw
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(Error::HttpToken(
                "it holds a space or a control character".to_string(),
            ));
        }
        Ok(HttpToken(raw.into()))
    }

    /// The token itself, to send it (`ctl top`) or hand it to a child process.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the token, in time that does not depend on where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        expected.len() == presented.len()
            && expected
                .iter()
                .zip(presented)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// The process's HTTP token, set once at start ([`configure`]).
static TOKEN: OnceLock<Option<HttpToken>> = OnceLock::new();

/// Sets this process's HTTP token (`None`: it has none). Once per process: a second call with
/// another token is an error.
pub fn configure(token: Option<HttpToken>) -> Result<(), Error> {
    let same = |a: &Option<HttpToken>, b: &Option<HttpToken>| match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.matches(b.expose().as_bytes()),
        _ => false,
    };
    let set = TOKEN.get_or_init(|| token.clone());
    if same(set, &token) {
        Ok(())
    } else {
        Err(Error::HttpToken("configured twice".to_string()))
    }
}

/// This process's HTTP token, if it has one.
pub fn token() -> Option<HttpToken> {
    TOKEN.get().cloned().flatten()
}

/// Whether `ip` reaches only this machine: `127.0.0.0/8`, `::1`, or `::ffff:127.x.y.z`.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// A loopback address of `ip`'s family: `ip` itself if it is one, else `127.0.0.1` or `::1`.
pub fn loopback_like(ip: IpAddr) -> IpAddr {
    match ip {
        ip if is_loopback(ip) => ip,
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Whether `path` is a health probe, open on every listener.
pub fn is_probe(path: &str) -> bool {
    PROBES.contains(&path)
}

/// Who may read a listener's protected endpoints.
#[derive(Debug, Clone)]
pub enum Access {
    /// A loopback listener: anyone (on this machine).
    Open,
    /// Off loopback: callers with the token.
    Token(HttpToken),
    /// Off loopback, and the process has no token: nobody.
    Closed,
}

impl Access {
    /// The access of a listener bound to `addr`, with this process's token.
    pub fn at(addr: SocketAddr) -> Access {
        Self::with(addr, token())
    }

    /// The access of a listener bound to `addr` with `token`.
    pub fn with(addr: SocketAddr, token: Option<HttpToken>) -> Access {
        match token {
            _ if is_loopback(addr.ip()) => Access::Open,
            Some(token) => Access::Token(token),
            None => Access::Closed,
        }
    }

    /// [`Access::at`] for a listener that serves only protected endpoints and the probes (a
    /// side port, a console): off loopback without a token it would serve nothing useful to
    /// anyone, so it is a configuration error, reported before anything is bound.
    pub fn required(addr: SocketAddr) -> Result<Access, Error> {
        match Self::at(addr) {
            Access::Closed => Err(Error::HttpTokenRequired { addr }),
            access => Ok(access),
        }
    }

    /// The refusal of a request for `path` with `headers`, or `None` if it may read it.
    fn refuse(&self, path: &str, headers: &HeaderMap) -> Option<Response> {
        let token = match self {
            Access::Open => return None,
            Access::Token(token) => token,
            Access::Closed => {
                let body = format!(
                    "forbidden: {path} is served off loopback only to holders of the service's \
                     --http-token, and this service has none\n"
                );
                return Some(refusal(StatusCode::FORBIDDEN, body));
            }
        };
        if presented(headers).is_some_and(|p| token.matches(&p)) {
            return None;
        }
        let body = format!(
            "unauthorized: {path} on this address needs `Authorization: Bearer <token>` (the \
             service's --http-token)\n"
        );
        let mut response = refusal(StatusCode::UNAUTHORIZED, body);
        let challenges = response.headers_mut();
        for challenge in [
            format!("Bearer realm=\"{REALM}\""),
            format!("Basic realm=\"{REALM}\", charset=\"UTF-8\""),
        ] {
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                challenges.append(header::WWW_AUTHENTICATE, value);
            }
        }
        Some(response)
    }
}

fn refusal(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The secret a request presents: a Bearer token, or the password of Basic credentials.
fn presented(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(credentials.as_bytes().to_vec())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = BASE64.decode(credentials).ok()?;
        let colon = decoded.iter().position(|b| *b == b':')?;
        Some(decoded[colon + 1..].to_vec())
    } else {
        None
    }
}

/// `router` with the paths for which `protected` holds guarded by the access of a listener
/// bound to `listening` ([`Access::at`]); other paths pass untouched. A closed listener is
/// logged once, here.
pub fn guard(router: Router, listening: SocketAddr, protected: fn(&str) -> bool) -> Router {
    let access = Access::at(listening);
    match &access {
        Access::Open => return router,
        Access::Token(_) => {
            tracing::info!(addr = %listening, "HTTP endpoints beyond the health probes need the --http-token here")
        }
        Access::Closed => tracing::warn!(
            addr = %listening,
            "not a loopback address and no --http-token: HTTP endpoints beyond the health probes answer 403 here"
        ),
    }
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let access = access.clone();
        async move {
            let path = req.uri().path();
            if protected(path)
                && let Some(refused) = access.refuse(path, req.headers())
            {
                return refused;
            }
            next.run(req).await
        }
    }))
}

/// Every path but the health probes: what side ports and consoles protect.
pub fn all_but_probes(path: &str) -> bool {
    !is_probe(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-http";

    fn token() -> HttpToken {
        HttpToken::new(SECRET).unwrap()
    }

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        h
    }

    #[test]
    fn loopback_is_open_and_anything_else_needs_the_token() {
        for open in [
            "127.0.0.1:1",
            "127.0.0.2:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            let addr: SocketAddr = open.parse().unwrap();
            assert!(matches!(Access::with(addr, None), Access::Open), "{open}");
            assert!(
                matches!(Access::with(addr, Some(token())), Access::Open),
                "{open}"
            );
        }
        for off in ["0.0.0.0:1", "10.0.0.5:1", "[::]:1", "[2001:db8::1]:1"] {
            let addr: SocketAddr = off.parse().unwrap();
            assert!(matches!(Access::with(addr, None), Access::Closed), "{off}");
            assert!(
                matches!(Access::with(addr, Some(token())), Access::Token(_)),
                "{off}"
            );
        }
        assert_eq!(
            loopback_like("0.0.0.0".parse().unwrap()).to_string(),
            "127.0.0.1"
        );
        assert_eq!(loopback_like("::".parse().unwrap()).to_string(), "::1");
        assert_eq!(
            loopback_like("127.0.0.3".parse().unwrap()).to_string(),
            "127.0.0.3"
        );
    }

    #[test]
    fn a_token_must_be_long_and_printable() {
        assert!(HttpToken::new("short").is_err());
        assert!(HttpToken::new("0123456789abcde f").is_err());
        assert!(HttpToken::new(SECRET).is_ok());
        assert_eq!(format!("{:?}", token()), "HttpToken(..)");
    }

    #[test]
    fn only_the_token_as_bearer_or_basic_password_is_admitted() {
        let access = Access::Token(token());
        let basic = |user_pass: &str| format!("Basic {}", BASE64.encode(user_pass));
        for ok in [
            format!("Bearer {SECRET}"),
            format!("bearer {SECRET}"),
            basic(&format!("ops:{SECRET}")),
            basic(&format!(":{SECRET}")),
        ] {
            assert!(access.refuse("/metrics", &headers(&ok)).is_none(), "{ok}");
        }
        for bad in [
            "Bearer nope".to_string(),
            format!("Bearer {SECRET}x"),
            format!("Token {SECRET}"),
            basic(&format!("{SECRET}:nope")),
            basic(SECRET),
        ] {
            let refused = access.refuse("/metrics", &headers(&bad)).unwrap();
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{bad}");
            let challenges: Vec<_> = refused
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .collect();
            assert_eq!(challenges.len(), 2);
        }
        let none = access.refuse("/metrics", &HeaderMap::new()).unwrap();
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
        let closed = Access::Closed
            .refuse("/metrics", &headers(&format!("Bearer {SECRET}")))
            .unwrap();
        assert_eq!(closed.status(), StatusCode::FORBIDDEN);
    }
}
