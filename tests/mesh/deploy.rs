//! The deployment files, checked without Docker or Envoy (neither runs where this project is
//! built): each region's Envoy config (`envoy/<region>.yaml`) against the structure Envoy's v3 API
//! requires and against the gateways it fronts, and `docker-compose.yml` against the real binary's
//! flags and against itself.
//!
//! YAML is read with `yaml-rust2`: pure Rust, maintained, YAML 1.2 with anchors and aliases, and a
//! plain document tree, which is all these checks need (`serde_yaml` is unmaintained). It does not
//! apply YAML 1.1 merge keys (`<<: *channelmesh` in docker-compose.yml); `merged` applies them as
//! Compose does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};

use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_channelmesh");
const REGIONS: [&str; 2] = ["us-east", "eu-west"];
const SUBCOMMANDS: [&str; 6] = [
    "ring-manager",
    "channel-server",
    "presence-server",
    "admin-server",
    "gateway",
    // Once, before the others: the certificates of the mesh's mutual TLS.
    "certs",
];

// Names and `@type`s of the Envoy extensions the configs use, as Envoy's v3 API spells them.
const HCM: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "envoy.filters.http.router";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const HEALTH_CHECK: &str = "envoy.filters.http.health_check";
const HEALTH_CHECK_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck";
const TLS: &str = "envoy.transport_sockets.tls";
const TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// Where the Envoy image finds its certificate and key (mounted from ./envoy/tls).
const TLS_DIR: &str = "/etc/envoy/tls/";

// ---- YAML -------------------------------------------------------------------------------------

fn load(relative: &str) -> Yaml {
    let text = read(relative);
    let mut docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"));
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    docs.remove(0)
}

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The node at `path` (keys and list indexes separated by dots); a missing one fails the test.
fn at<'a>(node: &'a Yaml, path: &str) -> &'a Yaml {
    let mut here = node;
    for step in path.split('.') {
        here = match step.parse::<usize>() {
            Ok(index) => &here[index],
            Err(_) => &here[step],
        };
        assert!(!here.is_badvalue(), "missing `{path}` (no `{step}`)");
    }
    here
}

fn has(node: &Yaml, key: &str) -> bool {
    !node[key].is_badvalue()
}

fn string<'a>(node: &'a Yaml, path: &str) -> &'a str {
    let value = at(node, path);
    value
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string: {value:?}"))
}

fn int(node: &Yaml, path: &str) -> i64 {
    let value = at(node, path);
    value
        .as_i64()
        .unwrap_or_else(|| panic!("`{path}` is not an integer: {value:?}"))
}

/// A non-empty list.
fn list<'a>(node: &'a Yaml, path: &str) -> &'a [Yaml] {
    let value = at(node, path);
    let items = value
        .as_vec()
        .unwrap_or_else(|| panic!("`{path}` is not a list: {value:?}"));
    assert!(!items.is_empty(), "`{path}` is empty");
    items
}

/// A `google.protobuf.Duration` as Envoy's YAML takes it ("15s", "0.5s"), in seconds.
fn seconds(node: &Yaml, path: &str) -> f64 {
    let text = string(node, path);
    text.strip_suffix('s')
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("`{path}` is not a duration like \"15s\": {text:?}"))
}

/// Applies YAML merge keys (`<<: *anchor`, `<<: [*a, *b]`) as Compose does: a key written in the
/// mapping wins over a merged one, an earlier merged mapping over a later one.
fn merged(node: &Yaml) -> Yaml {
    match node {
        Yaml::Hash(hash) => {
            let merge_key = Yaml::String("<<".to_string());
            let mut out = Hash::new();
            for (key, value) in hash.iter().filter(|(key, _)| **key != merge_key) {
                out.insert(key.clone(), merged(value));
            }
            let sources = match hash.get(&merge_key) {
                None => vec![],
                Some(Yaml::Array(sources)) => sources.iter().collect(),
                Some(source) => vec![source],
            };
            for source in sources {
                let Yaml::Hash(source) = merged(source) else {
                    panic!("`<<` merges a mapping, not {source:?}")
                };
                for (key, value) in source {
                    if !out.contains_key(&key) {
                        out.insert(key, value);
                    }
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.iter().map(merged).collect()),
        other => other.clone(),
    }
}

// ---- docker-compose.yml -----------------------------------------------------------------------

/// docker-compose.yml's services, merge keys applied.
fn compose() -> BTreeMap<String, Yaml> {
    let doc = merged(&load("docker-compose.yml"));
    let services = at(&doc, "services")
        .as_hash()
        .expect("`services` is a mapping");
    services
        .iter()
        .map(|(name, service)| (name.as_str().unwrap().to_string(), service.clone()))
        .collect()
}

fn strings(node: &Yaml, key: &str) -> Vec<String> {
    match &node[key] {
        Yaml::BadValue => vec![],
        Yaml::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .unwrap_or_else(|| panic!("`{key}` holds a non-string: {item:?}"))
                    .to_string()
            })
            .collect(),
        other => panic!("`{key}` is not a list of strings: {other:?}"),
    }
}

fn command(service: &Yaml) -> Vec<String> {
    strings(service, "command")
}

/// Services built from ./Dockerfile: their command is a subcommand of the channelmesh binary.
fn runs_channelmesh(service: &Yaml) -> bool {
    service["image"]
        .as_str()
        .is_some_and(|image| image.starts_with("channelmesh"))
}

/// Services of the mesh: built from ./Dockerfile, and not the one-shot `certs`.
fn serves(service: &Yaml) -> bool {
    runs_channelmesh(service) && command(service).first().map(String::as_str) != Some("certs")
}

/// The value of `--name VALUE` (or `--name=VALUE`) in a command.
fn flag<'a>(command: &'a [String], name: &str) -> Option<&'a str> {
    let long = format!("--{name}");
    let with_value = format!("--{name}=");
    command.iter().enumerate().find_map(|(i, arg)| {
        if *arg == long {
            command.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(&with_value)
        }
    })
}

fn port_of(address: &str) -> u16 {
    let (_, port) = address
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{address:?} has no port"));
    port.parse()
        .unwrap_or_else(|_| panic!("{address:?}: bad port"))
}

/// `(host port, container port)` of each published port ("8443:8443", "127.0.0.1:8080:8080").
fn published(service: &Yaml) -> Vec<(u16, u16)> {
    strings(service, "ports")
        .iter()
        .map(|spec| {
            let spec = spec.split('/').next().unwrap();
            let parts: Vec<&str> = spec.split(':').collect();
            let container: u16 = parts[parts.len() - 1].parse().unwrap();
            let host = if parts.len() > 1 {
                parts[parts.len() - 2].parse().unwrap()
            } else {
                container
            };
            (host, container)
        })
        .collect()
}

/// `(source, target)` of each volume ("./envoy/us-east.yaml:/etc/envoy/envoy.yaml:ro").
fn volumes(service: &Yaml) -> Vec<(String, String)> {
    strings(service, "volumes")
        .iter()
        .map(|spec| {
            let mut parts = spec.split(':');
            let source = parts.next().unwrap().to_string();
            let target = parts
                .next()
                .unwrap_or_else(|| panic!("volume {spec:?} has no target"))
                .to_string();
            (source, target)
        })
        .collect()
}

fn depends_on(service: &Yaml) -> Vec<String> {
    match &service["depends_on"] {
        Yaml::Hash(long_form) => long_form
            .keys()
            .map(|name| name.as_str().unwrap().to_string())
            .collect(),
        _ => strings(service, "depends_on"),
    }
}

/// `(scheme, authority, path)` of an absolute URL.
fn url_parts(url: &str) -> (&str, &str, &str) {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("{url:?} is not an absolute URL"));
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    (scheme, authority, path)
}

/// A gateway in docker-compose.yml.
#[derive(Debug)]
struct Gateway {
    service: String,
    id: String,
    listen_port: u16,
    public_url: String,
}

fn gateways(services: &BTreeMap<String, Yaml>, region: &str) -> Vec<Gateway> {
    services
        .iter()
        .filter(|(_, service)| runs_channelmesh(service))
        .filter_map(|(name, service)| {
            let command = command(service);
            (command.first().map(String::as_str) == Some("gateway")
                && flag(&command, "region") == Some(region))
            .then(|| Gateway {
                service: name.clone(),
                id: flag(&command, "id")
                    .unwrap_or_else(|| panic!("{name}: no --id"))
                    .to_string(),
                listen_port: port_of(
                    flag(&command, "listen").unwrap_or_else(|| panic!("{name}: no --listen")),
                ),
                public_url: flag(&command, "public-url")
                    .unwrap_or_else(|| panic!("{name}: no --public-url"))
                    .to_string(),
            })
        })
        .collect()
}

// ---- envoy/<region>.yaml ----------------------------------------------------------------------

fn envoy(region: &str) -> Yaml {
    load(&format!("envoy/{region}.yaml"))
}

/// The HTTP connection manager's config of a listener's (only) filter chain.
fn hcm(listener: &Yaml) -> &Yaml {
    let chains = list(listener, "filter_chains");
    assert_eq!(chains.len(), 1, "one filter chain per listener");
    let filters = list(&chains[0], "filters");
    assert_eq!(
        filters.len(),
        1,
        "the HTTP connection manager is the only network filter"
    );
    assert_eq!(string(&filters[0], "name"), HCM);
    let config = at(&filters[0], "typed_config");
    assert_eq!(string(config, "@type"), HCM_TYPE);
    config
}

fn clusters(doc: &Yaml) -> BTreeMap<&str, &Yaml> {
    list(doc, "static_resources.clusters")
        .iter()
        .map(|cluster| (string(cluster, "name"), cluster))
        .collect()
}

/// `(host, port)` of every endpoint of a cluster.
fn endpoints(cluster: &Yaml) -> BTreeSet<(String, u16)> {
    let mut found = BTreeSet::new();
    for locality in list(cluster, "load_assignment.endpoints") {
        for lb_endpoint in list(locality, "lb_endpoints") {
            let address = at(lb_endpoint, "endpoint.address.socket_address");
            let port = int(address, "port_value");
            assert!((1..=65535).contains(&port), "port {port}");
            found.insert((string(address, "address").to_string(), port as u16));
        }
    }
    found
}

/// Where Envoy sends a request for `path`: the first route that matches, as Envoy picks it.
#[derive(Debug)]
struct Routed<'a> {
    route: &'a Yaml,
    cluster: &'a str,
    /// The path the upstream sees, after `prefix_rewrite`.
    upstream_path: String,
}

fn route<'a>(hcm: &'a Yaml, path: &str) -> Option<Routed<'a>> {
    let hosts = list(hcm, "route_config.virtual_hosts");
    assert_eq!(hosts.len(), 1, "one virtual host");
    assert_eq!(strings(&hosts[0], "domains"), ["*"]);
    let without_query = path.split('?').next().unwrap();
    list(&hosts[0], "routes").iter().find_map(|route| {
        let matched = if has(&route["match"], "prefix") {
            let prefix = string(route, "match.prefix");
            without_query.strip_prefix(prefix).map(|rest| {
                match route["route"]["prefix_rewrite"].as_str() {
                    Some(rewrite) => format!("{rewrite}{rest}"),
                    None => without_query.to_string(),
                }
            })
        } else {
            (string(route, "match.path") == without_query).then(|| without_query.to_string())
        };
        matched.map(|upstream_path| Routed {
            route,
            cluster: string(route, "route.cluster"),
            upstream_path,
        })
    })
}

/// The listener port Envoy serves TLS on.
fn tls_port(doc: &Yaml) -> u16 {
    let tls: Vec<u16> = list(doc, "static_resources.listeners")
        .iter()
        .filter(|listener| has(&listener["filter_chains"][0], "transport_socket"))
        .map(|listener| int(listener, "address.socket_address.port_value") as u16)
        .collect();
    assert_eq!(tls.len(), 1, "one TLS listener");
    tls[0]
}

// ---- Envoy -------------------------------------------------------------------------------------

#[test]
fn envoy_configs_have_the_structure_of_envoys_v3_api() {
    for region in REGIONS {
        let doc = envoy(region);
        let admin = at(&doc, "admin.address.socket_address");
        assert_eq!(
            string(admin, "address"),
            "127.0.0.1",
            "{region}: admin on loopback"
        );
        assert_eq!(int(admin, "port_value"), 9901);

        let clusters = clusters(&doc);
        assert_eq!(
            clusters.len(),
            list(&doc, "static_resources.clusters").len(),
            "{region}: cluster names are unique"
        );
        let mut routed_clusters = BTreeSet::new();
        let listeners = list(&doc, "static_resources.listeners");
        let mut names = BTreeSet::new();
        for listener in listeners {
            assert!(
                names.insert(string(listener, "name")),
                "listener names are unique"
            );
            let address = at(listener, "address.socket_address");
            assert!(!string(address, "address").is_empty());
            assert!((1..=65535).contains(&int(address, "port_value")));

            let chain = &list(listener, "filter_chains")[0];
            if has(chain, "transport_socket") {
                let socket = at(chain, "transport_socket");
                assert_eq!(string(socket, "name"), TLS);
                assert_eq!(string(socket, "typed_config.@type"), TLS_TYPE);
                let common = at(socket, "typed_config.common_tls_context");
                assert!(
                    ["TLSv1_2", "TLSv1_3"]
                        .contains(&string(common, "tls_params.tls_minimum_protocol_version"))
                );
                // WebSocket upgrades are HTTP/1.1: the listener must offer it.
                assert!(strings(common, "alpn_protocols").contains(&"http/1.1".to_string()));
                for certificate in list(common, "tls_certificates") {
                    for file in ["certificate_chain.filename", "private_key.filename"] {
                        let path = string(certificate, file);
                        assert!(path.starts_with(TLS_DIR), "{region}: {file} {path}");
                    }
                }
            }

            let hcm = hcm(listener);
            assert!(!string(hcm, "stat_prefix").is_empty());
            assert!(["AUTO", "HTTP1"].contains(&string(hcm, "codec_type")));
            let upgrades = list(hcm, "upgrade_configs");
            assert!(
                upgrades
                    .iter()
                    .any(|u| string(u, "upgrade_type").eq_ignore_ascii_case("websocket")),
                "{region}: WebSocket upgrades enabled"
            );
            assert!(seconds(hcm, "request_headers_timeout") > 0.0);
            assert!(seconds(hcm, "stream_idle_timeout") > 0.0);
            assert!(seconds(hcm, "common_http_protocol_options.idle_timeout") > 0.0);
            assert!(
                !has(
                    &hcm["common_http_protocol_options"],
                    "max_connection_duration"
                ),
                "a maximum connection duration would cut long-lived WebSockets"
            );

            let filters = list(hcm, "http_filters");
            for filter in filters {
                assert!(!string(filter, "name").is_empty());
                assert!(string(filter, "typed_config.@type").starts_with("type.googleapis.com/"));
            }
            let last = filters.last().unwrap();
            assert_eq!(string(last, "name"), ROUTER, "the router filter comes last");
            assert_eq!(string(last, "typed_config.@type"), ROUTER_TYPE);
            let health = filters
                .iter()
                .find(|f| string(f, "name") == HEALTH_CHECK)
                .expect("the health check filter (what /healthcheck/fail fails)");
            assert_eq!(string(health, "typed_config.@type"), HEALTH_CHECK_TYPE);
            // Pass-through: /healthz still reaches a gateway until an SRE fails the checks.
            assert_eq!(
                at(health, "typed_config.pass_through_mode").as_bool(),
                Some(true)
            );
            let matcher = &list(health, "typed_config.headers")[0];
            assert_eq!(string(matcher, "name"), ":path");
            assert_eq!(string(matcher, "string_match.exact"), "/healthz");

            for host in list(hcm, "route_config.virtual_hosts") {
                assert!(!string(host, "name").is_empty());
                assert!(!strings(host, "domains").is_empty());
                for route in list(host, "routes") {
                    let matcher = at(route, "match");
                    assert_eq!(
                        usize::from(has(matcher, "prefix")) + usize::from(has(matcher, "path")),
                        1,
                        "{region}: a route matches by exactly one of prefix and path: {route:?}"
                    );
                    let cluster = string(route, "route.cluster");
                    assert!(
                        clusters.contains_key(cluster),
                        "{region}: no cluster {cluster}"
                    );
                    routed_clusters.insert(cluster);
                    if has(&route["route"], "timeout") {
                        assert!(seconds(route, "route.timeout") >= 0.0);
                    }
                }
            }
        }
        // Both listeners (TLS and plain) serve the same routes through the same filters.
        let managers: Vec<&Yaml> = listeners.iter().map(hcm).collect();
        for key in [
            "route_config",
            "http_filters",
            "upgrade_configs",
            "stream_idle_timeout",
        ] {
            assert!(
                managers.iter().all(|m| m[key] == managers[0][key]),
                "{region}: listeners differ in {key}"
            );
        }
        assert!(tls_port(&doc) > 0);

        for (name, cluster) in &clusters {
            assert!(
                routed_clusters.contains(name),
                "{region}: cluster {name} is never routed to"
            );
            assert_eq!(string(cluster, "type"), "STRICT_DNS");
            assert_eq!(string(cluster, "lb_policy"), "ROUND_ROBIN");
            assert!(seconds(cluster, "connect_timeout") > 0.0);
            assert_eq!(string(cluster, "load_assignment.cluster_name"), *name);
            assert!(!endpoints(cluster).is_empty());
            for check in list(cluster, "health_checks") {
                let timeout = seconds(check, "timeout");
                assert!(timeout > 0.0 && timeout < seconds(check, "interval"));
                assert!(int(check, "unhealthy_threshold") >= 1);
                assert!(int(check, "healthy_threshold") >= 1);
                // Readiness, not liveness: a draining gateway leaves the rotation.
                assert_eq!(string(check, "http_health_check.path"), "/readyz");
            }
            let outlier = at(cluster, "outlier_detection");
            assert!(int(outlier, "consecutive_5xx") >= 1);
            assert!(seconds(outlier, "interval") > 0.0);
            assert!(seconds(outlier, "base_ejection_time") > 0.0);
            assert!((1..=100).contains(&int(outlier, "max_ejection_percent")));
            // Envoy's default of 1024 connections per cluster would cap the open WebSockets.
            let limits = &list(cluster, "circuit_breakers.thresholds")[0];
            assert!(int(limits, "max_connections") > 1024);
            assert!(int(limits, "max_requests") > 1024);
        }
    }
}

#[test]
fn both_regions_envoy_configs_differ_only_in_the_region_name() {
    assert_eq!(
        read("envoy/us-east.yaml").replace("us-east", "eu-west"),
        read("envoy/eu-west.yaml"),
        "envoy/eu-west.yaml is envoy/us-east.yaml with the region renamed"
    );
}

/// Every access log command operator of `format` (`%NAME%`, `%NAME(ARG)%`, `%NAME(ARG):N%`),
/// the format having no literal `%`.
fn operators(format: &str) -> Vec<&str> {
    let parts: Vec<&str> = format.split('%').collect();
    assert!(parts.len() % 2 == 1, "unbalanced % in {format:?}");
    parts.into_iter().skip(1).step_by(2).collect()
}

/// Why the access log operator `op` could write a credential, if it could: a client's token
/// may come as `?token=` on the path, and in the authorization or cookie header.
fn leaks_a_credential(op: &str) -> Option<&'static str> {
    let (name, arg) = match op.split_once('(') {
        Some((name, rest)) => (name, rest.split(')').next().unwrap_or_default()),
        None => (op.split(':').next().unwrap_or_default(), ""),
    };
    let arg = arg.to_ascii_lowercase();
    match name {
        "PATH" if !arg.starts_with("nq") => Some("the path with its query"),
        // REQUEST_HEADER and RESPONSE_TRAILER are the newer names of REQ and TRAILER.
        "REQ" | "REQUEST_HEADER" | "REQ_WITHOUT_QUERY" | "TRAILER" | "RESPONSE_TRAILER" => {
            let headers: Vec<&str> = arg.split('?').collect();
            if name != "REQ_WITHOUT_QUERY"
                && headers
                    .iter()
                    .any(|h| [":path", "x-envoy-original-path"].contains(h))
            {
                Some("the path header with its query")
            } else if headers
                .iter()
                .any(|h| ["authorization", "cookie"].contains(h))
            {
                Some("a credential header")
            } else {
                None
            }
        }
        "QUERY_PARAM" => Some("a query parameter"),
        "CEL" | "TYPED_CEL" | "METADATA" | "DYNAMIC_METADATA" => {
            Some("an expression that can read anything")
        }
        _ => None,
    }
}

#[test]
fn no_envoy_access_log_holds_a_token() {
    // The check itself: Envoy's default format logs `?token=` with the path.
    let default = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\"";
    assert!(
        operators(default)
            .into_iter()
            .any(|op| leaks_a_credential(op).is_some())
    );
    for op in [
        "PATH",
        "PATH(WQ:ORIG)",
        "REQ(Authorization)",
        "REQUEST_HEADER(X-ENVOY-ORIGINAL-PATH?:PATH)",
        "REQUEST_HEADER(cookie):10",
        "QUERY_PARAM(token)",
    ] {
        assert!(leaks_a_credential(op).is_some(), "{op}");
    }
    for op in [
        "PATH(NQ:ORIG_OR_PATH)",
        "PATH(NQ)",
        "REQ(:AUTHORITY)",
        "REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)",
        "START_TIME",
    ] {
        assert_eq!(leaks_a_credential(op), None, "{op}");
    }

    for region in REGIONS {
        let doc = envoy(region);
        for listener in list(&doc, "static_resources.listeners") {
            let name = string(listener, "name");
            let logs = list(hcm(listener), "access_log");
            assert!(!logs.is_empty(), "{name}: no access log");
            for log in logs {
                // Without a format of its own, Envoy logs the path with its query.
                let format = string(
                    log,
                    "typed_config.log_format.text_format_source.inline_string",
                );
                let ops = operators(format);
                assert!(
                    ops.iter().any(|op| op.starts_with("PATH(NQ")),
                    "{name}: the path, without its query, is logged: {format}"
                );
                for op in ops {
                    if let Some(why) = leaks_a_credential(op) {
                        panic!("{name}: %{op}% logs {why}: {format}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_websocket_url_reaches_only_the_gateway_that_issued_it() {
    let services = compose();
    for region in REGIONS {
        let doc = envoy(region);
        let clusters = clusters(&doc);
        let own = gateways(&services, region);
        let other = REGIONS.iter().find(|r| **r != region).unwrap();
        let others = gateways(&services, other);
        for listener in list(&doc, "static_resources.listeners") {
            let hcm = hcm(listener);
            for gateway in &own {
                // The gateway builds its WebSocket URLs as public URL + "/rtm/<ticket>".
                let (_, _, base) = url_parts(&gateway.public_url);
                let ws_path = format!("{base}/rtm/0123456789abcdef");
                let routed = route(hcm, &ws_path)
                    .unwrap_or_else(|| panic!("{region}: no route for {ws_path}"));
                assert_eq!(
                    endpoints(clusters[routed.cluster]),
                    BTreeSet::from([(gateway.service.clone(), gateway.listen_port)]),
                    "{region}: {ws_path} must reach {} and nothing else",
                    gateway.service
                );
                assert_eq!(routed.upstream_path, "/rtm/0123456789abcdef");
                assert_eq!(
                    seconds(routed.route, "route.timeout"),
                    0.0,
                    "{region}: a WebSocket route has no timeout"
                );
                assert!(seconds(routed.route, "route.idle_timeout") >= 300.0);
            }
            // Every gateway-prefixed route belongs to a gateway of this region, and only to it.
            for route in list(hcm, "route_config.virtual_hosts.0.routes") {
                let Some(rest) = route["match"]["prefix"]
                    .as_str()
                    .and_then(|p| p.strip_prefix("/gw/"))
                else {
                    continue;
                };
                let id = rest.split('/').next().unwrap();
                let owners: Vec<&Gateway> = own
                    .iter()
                    .filter(|g| url_parts(&g.public_url).2 == format!("/gw/{id}"))
                    .collect();
                assert_eq!(owners.len(), 1, "{region}: /gw/{id}/ has no single gateway");
                assert_eq!(
                    endpoints(clusters[string(route, "route.cluster")]),
                    BTreeSet::from([(owners[0].service.clone(), owners[0].listen_port)])
                );
            }
            // The other region's WebSocket URLs are not served here.
            for gateway in &others {
                let path = format!("{}/rtm/0123", url_parts(&gateway.public_url).2);
                assert!(route(hcm, &path).is_none(), "{region} routes {path}");
            }
        }
    }
}

#[test]
fn the_api_and_healthz_reach_every_gateway_of_the_region_and_nothing_else_is_exposed() {
    let services = compose();
    for region in REGIONS {
        let doc = envoy(region);
        let clusters = clusters(&doc);
        let all: BTreeSet<(String, u16)> = gateways(&services, region)
            .into_iter()
            .map(|g| (g.service, g.listen_port))
            .collect();
        for listener in list(&doc, "static_resources.listeners") {
            let hcm = hcm(listener);
            for path in [
                "/api/auth.test",
                "/api/rtm.connect?batch_presence_aware=1",
                "/api/users.setPresence",
                "/api/users.getPresence?user=U1",
                "/healthz",
            ] {
                let routed = route(hcm, path).unwrap_or_else(|| panic!("{region}: no {path}"));
                assert_eq!(endpoints(clusters[routed.cluster]), all, "{region}: {path}");
                assert_eq!(routed.upstream_path, path.split('?').next().unwrap());
                assert!(seconds(routed.route, "route.timeout") > 0.0);
            }
            for path in ["/stats", "/rtm/0123", "/gw/nobody/rtm/0123", "/"] {
                assert!(
                    route(hcm, path).is_none(),
                    "{region}: {path} must not be routed"
                );
            }
        }
    }
}

#[test]
fn every_cluster_endpoint_is_a_gateway_of_its_region_at_its_listen_port() {
    let services = compose();
    for region in REGIONS {
        let doc = envoy(region);
        for (name, cluster) in clusters(&doc) {
            for (host, port) in endpoints(cluster) {
                let service = services.get(&host).unwrap_or_else(|| {
                    panic!("{region}: cluster {name}: no compose service {host}")
                });
                let command = command(service);
                assert_eq!(command[0], "gateway", "{region}: {host} is not a gateway");
                assert_eq!(flag(&command, "region"), Some(region), "{host}'s region");
                assert_eq!(
                    port_of(flag(&command, "listen").unwrap()),
                    port,
                    "{host}'s port"
                );
            }
        }
    }
}

// ---- docker-compose.yml ------------------------------------------------------------------------

#[test]
fn compose_commands_are_accepted_by_the_real_binary() {
    let help_exits = |args: &[String]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--help")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The check itself: clap prints help and exits 0 only when every flag before `--help` is known
    // and its value parses.
    let (status, _) = help_exits(&["gateway".to_string(), "--no-such-flag".to_string()]);
    assert_eq!(status.code(), Some(2));

    let services = compose();
    let mut checked = 0;
    for (name, service) in services.iter().filter(|(_, s)| runs_channelmesh(s)) {
        let command = command(service);
        assert!(
            SUBCOMMANDS.contains(&command[0].as_str()),
            "{name}: {command:?}"
        );
        let (status, stderr) = help_exits(&command);
        assert!(status.success(), "{name}: {command:?} is refused: {stderr}");
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} channelmesh services");
}

#[test]
fn compose_services_agree_with_each_other() {
    let services = compose();
    for (name, service) in &services {
        for dependency in depends_on(service) {
            assert!(
                services.contains_key(&dependency),
                "{name} depends on unknown {dependency}"
            );
        }
        for (source, _) in volumes(service) {
            if let Some(relative) = source.strip_prefix("./") {
                assert!(
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join(relative)
                        .exists(),
                    "{name} mounts missing {source}"
                );
            }
        }
        if !serves(service) {
            continue;
        }
        let command = command(service);
        let listen = flag(&command, "listen").unwrap_or_else(|| panic!("{name}: no --listen"));
        for (_, container) in published(service) {
            assert_eq!(
                container,
                port_of(listen),
                "{name} publishes a port it does not serve"
            );
        }
        if let Some(advertise) = flag(&command, "advertise") {
            // "http://ring-manager-1:50050" for ring managers, "cs-1:50061" for the others.
            let authority = advertise.split_once("://").map_or(advertise, |(_, a)| a);
            let (host, _) = authority.rsplit_once(':').unwrap();
            assert_eq!(host, name, "{name} advertises another service's name");
            assert_eq!(
                port_of(authority),
                port_of(listen),
                "{name} advertises another port"
            );
        }
    }
}

#[test]
fn every_compose_service_presents_the_certificate_the_certs_service_issued_for_it() {
    let services = compose();
    let issued = command(&services["certs"]);
    let dir = flag(&issued, "dir").expect("certs --dir");
    for (name, service) in &services {
        if !serves(service) {
            continue;
        }
        let command = command(service);
        let id = match command[0].as_str() {
            // Ring managers are named by the host they advertise.
            "ring-manager" => name.as_str(),
            _ => flag(&command, "id").unwrap_or_else(|| panic!("{name}: no --id")),
        };
        let role = match command[0].as_str() {
            "admin-server" => "admin",
            other => other,
        };
        let spec = issued
            .iter()
            .find(|s| s.starts_with(&format!("{role}/{id}")))
            .unwrap_or_else(|| panic!("{name}: certs issues no {role}/{id}"));
        // A service others dial is issued for its host name.
        if flag(&command, "advertise").is_some() {
            assert_eq!(spec, &format!("{role}/{id}={name}"), "{name}");
        }
        assert_eq!(
            flag(&command, "tls-ca"),
            Some(format!("{dir}/ca.pem").as_str())
        );
        assert_eq!(
            flag(&command, "tls-cert"),
            Some(format!("{dir}/{id}.pem").as_str())
        );
        assert_eq!(
            flag(&command, "tls-key"),
            Some(format!("{dir}/{id}.key").as_str())
        );
        assert!(
            volumes(service).contains(&("certs".to_string(), dir.to_string())),
            "{name} does not mount the certificates"
        );
        assert!(depends_on(service).contains(&"certs".to_string()), "{name}");
    }
    // ctl (docker compose exec ... channelmesh ctl) finds the operator's in the state directory.
    assert!(issued.iter().any(|s| s == "operator/operator"));
}

#[test]
fn compose_runs_an_envoy_before_two_gateways_per_region() {
    let services = compose();
    let mut ids = BTreeSet::new();
    for region in REGIONS {
        let name = format!("envoy-{region}");
        let service = services
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} service"));
        assert!(string(service, "image").starts_with("envoyproxy/envoy:"));
        let doc = envoy(region);

        // Its config is this region's file, mounted where its command points Envoy.
        let command = command(service);
        let config = command
            .iter()
            .position(|arg| arg == "-c")
            .and_then(|i| command.get(i + 1))
            .unwrap_or_else(|| panic!("{name}: no -c in {command:?}"));
        let mounts = volumes(service);
        assert!(
            mounts.contains(&(format!("./envoy/{region}.yaml"), config.clone())),
            "{name} does not run envoy/{region}.yaml: {mounts:?}"
        );
        // The TLS files it reads are under a mount.
        assert!(
            mounts.iter().any(|(source, target)| source == "./envoy/tls"
                && TLS_DIR.trim_end_matches('/') == target),
            "{name} does not mount ./envoy/tls at {TLS_DIR}"
        );

        // It publishes listener ports of its config, the TLS one among them.
        let listener_ports: BTreeSet<u16> = list(&doc, "static_resources.listeners")
            .iter()
            .map(|l| int(l, "address.socket_address.port_value") as u16)
            .collect();
        let ports = published(service);
        for (_, container) in &ports {
            assert!(
                listener_ports.contains(container),
                "{name} publishes {container}"
            );
        }
        let (tls_host_port, _) = *ports
            .iter()
            .find(|(_, container)| *container == tls_port(&doc))
            .unwrap_or_else(|| panic!("{name} does not publish its TLS listener"));

        // Two gateways, each behind its own /gw/<id> prefix on this Envoy's public TLS port, and
        // reachable only through Envoy.
        let gateways = gateways(&services, region);
        assert_eq!(gateways.len(), 2, "{region}: {gateways:?}");
        let dependencies = depends_on(service);
        for gateway in &gateways {
            assert!(
                ids.insert(gateway.id.clone()),
                "gateway id {} twice",
                gateway.id
            );
            let (scheme, authority, path) = url_parts(&gateway.public_url);
            assert_eq!(
                scheme, "https",
                "{}: clients come in through TLS",
                gateway.service
            );
            assert_eq!(
                port_of(authority),
                tls_host_port,
                "{}'s public port",
                gateway.service
            );
            assert_eq!(path, format!("/gw/{}", gateway.id));
            assert!(published(&services[&gateway.service]).is_empty());
            assert!(
                dependencies.contains(&gateway.service),
                "{name} starts before {}",
                gateway.service
            );
        }
    }
}

#[test]
fn every_compose_service_is_health_checked_on_its_http_port() {
    let services = compose();
    let mut checked = 0;
    for (name, service) in services.iter().filter(|(_, s)| serves(s)) {
        let command = command(service);
        let listen = port_of(flag(&command, "listen").unwrap());
        // Gateways serve HTTP on their own port; gRPC services next to it (+40), unless --http.
        let (port, path) = match command[0].as_str() {
            "gateway" => (listen, "/readyz"),
            // A Consul follower is alive but not ready: liveness only.
            "ring-manager" => (listen + 40, "/healthz"),
            _ => (
                flag(&command, "http").map_or(listen + 40, port_of),
                "/readyz",
            ),
        };
        let test = strings(at(service, "healthcheck"), "test");
        assert_eq!(
            test[..3],
            ["CMD", "channelmesh", "probe"],
            "{name}: {test:?}"
        );
        assert_eq!(
            test[3],
            format!("http://127.0.0.1:{port}{path}"),
            "{name}'s health check"
        );
        let out = Command::new(BIN)
            .args(&test[2..])
            .arg("--help")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {test:?} is refused");
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} channelmesh services");
}

/// A compose `environment` mapping's value (a missing one fails the test).
fn env<'a>(service: &'a Yaml, name: &str) -> &'a str {
    string(service, &format!("environment.{name}"))
}

#[test]
fn compose_runs_consul_with_acls_on_loopback_and_every_service_has_its_token() {
    let services = compose();
    let consul = &services["consul"];

    // Published on the host's loopback only.
    let ports = strings(consul, "ports");
    assert!(!ports.is_empty());
    for spec in &ports {
        assert!(
            spec.starts_with("127.0.0.1:"),
            "consul publishes {spec} beyond loopback"
        );
    }

    // ACLs on, deny by default, the bootstrap token from CONSUL_HTTP_TOKEN.
    let config: serde_json::Value = serde_json::from_str(env(consul, "CONSUL_LOCAL_CONFIG"))
        .expect("CONSUL_LOCAL_CONFIG is JSON");
    let acl = &config["acl"];
    assert_eq!(acl["enabled"], true, "{config}");
    assert_eq!(acl["default_policy"], "deny", "{config}");
    let token_var = "${CONSUL_HTTP_TOKEN}";
    assert_eq!(acl["tokens"]["initial_management"], token_var, "{config}");
    assert_eq!(acl["tokens"]["agent"], token_var, "{config}");
    let required = |value: &str| value.starts_with("${CONSUL_HTTP_TOKEN:?") && value.ends_with('}');
    assert!(required(env(consul, "CONSUL_HTTP_TOKEN")));

    // Every channelmesh service gets the same token (required: compose refuses to start
    // without it), under the name the binary reads, and the optional HTTP token.
    let mut checked = 0;
    for (name, service) in services.iter().filter(|(_, s)| serves(s)) {
        assert!(
            required(env(service, "CONSUL_HTTP_TOKEN")),
            "{name}: {}",
            env(service, "CONSUL_HTTP_TOKEN")
        );
        assert_eq!(
            env(service, "CHANNELMESH_HTTP_TOKEN"),
            "${CHANNELMESH_HTTP_TOKEN:-}"
        );
        assert!(env(service, "CHANNELMESH_CONSUL").starts_with("http://consul:"));
        let command = command(service);
        let help = Command::new(BIN)
            .args([command[0].as_str(), "--help"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for var in [
            "CONSUL_HTTP_TOKEN",
            "CHANNELMESH_HTTP_TOKEN",
            "CHANNELMESH_CONSUL",
        ] {
            assert!(
                help.contains(&format!("env: {var}")),
                "{name}: {} reads no {var}",
                command[0]
            );
        }
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} channelmesh services");
}
