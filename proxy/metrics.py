"""Prometheus figures for the data path, served over HTTP on the config's metrics port."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

REGISTRY = CollectorRegistry(auto_describe=True)

CLIENT_CONNECTIONS = Gauge(
    "baton_client_connections_open", "Client connections open now", registry=REGISTRY
)
CLIENT_CONNECTIONS_TOTAL = Counter(
    "baton_client_connections_accepted", "Client connections accepted", registry=REGISTRY
)
LOGIN_FAILURES = Counter(
    "baton_login_failures", "Client logins refused (the connection is closed)", registry=REGISTRY
)
COMMANDS = Counter("baton_commands", "Client commands by type", ["command"], registry=REGISTRY)
ERRORS = Counter(
    "baton_errors",
    "Error packets sent to clients, by code and by origin (backend or baton)",
    ["code", "origin"],
    registry=REGISTRY,
)
COMMAND_SECONDS = Histogram(
    "baton_command_seconds",
    "Time from a client command to the end of its response",
    registry=REGISTRY,
    buckets=(
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    ),
)
BACKEND_CONNECTIONS = Gauge(
    "baton_backend_connections", "Backend connections open now", ["server"], registry=REGISTRY
)
BACKEND_CONNECT_FAILURES = Counter(
    "baton_backend_connect_failures",
    "Backend connections that could not be opened",
    ["server"],
    registry=REGISTRY,
)
BACKEND_LOST = Counter(
    "baton_backend_lost",
    "Backend connections lost while a session used them",
    ["server"],
    registry=REGISTRY,
)
BACKEND_UP = Gauge(
    "baton_backend_up",
    "1 when the last attempt to reach the server succeeded",
    ["server"],
    registry=REGISTRY,
)
CLIENT_PROTOCOL_ERRORS = Counter(
    "baton_client_protocol_errors",
    "Client connections closed for a malformed or oversized packet",
    registry=REGISTRY,
)


def serve(host: str, port: int) -> None:
    """Start the metrics HTTP endpoint in a background thread (prometheus-client's own)."""
    start_http_server(port, addr=host, registry=REGISTRY)
