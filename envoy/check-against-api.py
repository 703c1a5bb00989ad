#!/usr/bin/env python3
"""Parses envoy/<region>.yaml into Envoy's v3 Bootstrap message with Envoy's own API protos.

An optional check, run by hand (no test depends on it): protobuf's JSON parser refuses any field
name, enum value, duration or `@type` that Envoy's API does not define. It does not run Envoy's
validation rules (required fields, ranges); tests/mesh/deploy.rs checks the ones these files use.

    python3 -m venv /tmp/envoy-api && /tmp/envoy-api/bin/pip install xds-protos pyyaml
    /tmp/envoy-api/bin/python envoy/check-against-api.py envoy/us-east.yaml envoy/eu-west.yaml

xds-protos is the Python code generated from envoyproxy/data-plane-api, published by gRPC.
"""
import sys

import yaml
from google.protobuf import json_format

# The messages behind every `@type` in the configs must be imported to be resolvable.
import envoy.config.bootstrap.v3.bootstrap_pb2 as bootstrap
import envoy.extensions.access_loggers.stream.v3.stream_pb2  # noqa: F401
import envoy.extensions.filters.http.health_check.v3.health_check_pb2  # noqa: F401
import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2  # noqa: F401
import envoy.extensions.transport_sockets.tls.v3.tls_pb2  # noqa: F401

for path in sys.argv[1:]:
    with open(path) as f:
        json_format.ParseDict(yaml.safe_load(f), bootstrap.Bootstrap())
    print(f"{path}: parses as envoy.config.bootstrap.v3.Bootstrap")
