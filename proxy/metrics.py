"""Prometheus figures for the data path, served over HTTP on the config's metrics port."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.packets import COMMAND_NAMES
from reparent import metrics as reparent_metrics

REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in reparent_metrics.COLLECTORS:
    REGISTRY.register(_collector)

CLIENT_CONNECTIONS = Gauge(
    "baton_client_connections_open", "Client connections open now", registry=REGISTRY
)
CLIENT_CONNECTIONS_TOTAL = Counter(
    "baton_client_connections_accepted", "Client connections accepted", registry=REGISTRY
)
LOGINS = Counter(
    "baton_logins",
    "Client logins accepted (at connect and COM_CHANGE_USER), by how the client proved who it "
    "is (mysql_native_password, caching_sha2_fast, caching_sha2_full, mysql_clear_password, "
    "ed25519)",
    ["method"],
    registry=REGISTRY,
)
COMPRESSED_SESSIONS = Counter(
    "baton_client_compressed_sessions",
    "Client sessions that logged in with the compressed protocol (CLIENT_COMPRESS)",
    registry=REGISTRY,
)
LOGIN_FAILURES = Counter(
    "baton_login_failures",
    "Client logins refused, by reason (access_denied, unknown_user, unfenced_user, "
    "unsupported_plugin, cleartext_without_tls, backend_unreachable, bad_handshake, timeout, "
    "server_refused, client_gone, insecure_transport)",
    ["reason"],
    registry=REGISTRY,
)
CONNECTIONS_REFUSED = Counter(
    "baton_connections_refused",
    "Client connections refused before the greeting, by reason (max_connections, fd_budget, "
    "blocked)",
    ["reason"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "baton_errors",
    "Error packets sent to clients, by code and by origin (backend or baton)",
    ["code", "origin"],
    registry=REGISTRY,
)


class CommandStats(Collector):
    """Commands by type and their latency, kept in plain ints on the data path.

    prometheus-client's own Counter and Histogram take a lock and several calls per update,
    which cost more than a relayed point select's parsing; these figures are built into
    metric families only when Prometheus scrapes.
    """

    BUCKETS = (
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
    )

    def __init__(self) -> None:
        self.by_command = [0] * 256
        self.bucket_counts = [0] * (len(self.BUCKETS) + 1)
        self.seconds = 0.0

    def observe(self, command: int, seconds: float) -> None:
        self.by_command[command] += 1
        self.bucket_counts[bisect_left(self.BUCKETS, seconds)] += 1
        self.seconds += seconds

    def collect(self) -> Iterator[Metric]:
        commands = CounterMetricFamily(
            "baton_commands", "Client commands by type", labels=["command"]
        )
        for code, n in enumerate(self.by_command):
            if n:
                commands.add_metric([COMMAND_NAMES.get(code, hex(code))], n)
        yield commands
        cumulative = list(accumulate(self.bucket_counts))
        buckets = [(repr(le), c) for le, c in zip(self.BUCKETS, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(
            "baton_command_seconds",
            "Time from a client command to the end of its response",
            buckets=buckets,
            sum_value=self.seconds,
        )


COMMAND_STATS = CommandStats()
REGISTRY.register(COMMAND_STATS)

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
SESSIONS_MOVED = Counter(
    "baton_sessions_moved",
    "Sessions whose state was moved to a new server connection (after a switch or a lost "
    "connection), by outcome",
    ["outcome"],
    registry=REGISTRY,
)
FAILED_COMMANDS = Counter(
    "baton_failed_commands",
    "Commands that failed on the primary before any of their result reached the client, by "
    "cause (read_only, lost, unreachable) and outcome (held for the next primary, or passed)",
    ["cause", "outcome"],
    registry=REGISTRY,
)
SESSIONS_ENDED_BY_SERVER = Counter(
    "baton_sessions_ended_by_server",
    "Sessions whose server connection the writable primary ended (a KILL, wait_timeout), "
    "ended for the client too, as direct",
    registry=REGISTRY,
)
SESSIONS_REFUSED = Counter(
    "baton_sessions_refused",
    "Sessions that could not move to a new primary, by the state that could not move",
    ["reason"],
    registry=REGISTRY,
)
SWITCH_SESSIONS = Counter(
    "baton_switch_sessions",
    "Sessions when a switch began, by what they were doing (idle, in_statement, "
    "in_transaction), and transactions the demotion rolled back (rolled_back)",
    ["case"],
    registry=REGISTRY,
)
HOLD_SECONDS = Histogram(
    "baton_buffer_hold_seconds",
    "How long a held command waited before it was flushed",
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.4, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0),
)
POOL_BORROW_SECONDS = Histogram(
    "baton_pool_borrow_seconds",
    "How long a session waited for a pooled connection (an idle one, a new one, or a wait "
    "for a full pool); the state restored on it is not counted",
    registry=REGISTRY,
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
POOL_RESTORE_SECONDS = Histogram(
    "baton_pool_restore_seconds",
    "How long restoring a session's state on a borrowed connection took (what differed)",
    registry=REGISTRY,
    buckets=(0.00001, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
POOL_OPENED = Counter(
    "baton_pool_opened",
    "Server connections the pools opened",
    ["server"],
    registry=REGISTRY,
)
CLIENT_PROTOCOL_ERRORS = Counter(
    "baton_client_protocol_errors",
    "Client connections closed for a malformed or oversized packet",
    registry=REGISTRY,
)
# Read routing (proxy/readroute.py, proxy/readpath.py).
ROUTED = Counter(
    "baton_routed_commands",
    "Commands of sessions that route reads, by server and kind (read: a statement that "
    "qualified for a replica, wherever it ran; write: anything else)",
    ["server", "kind"],
    registry=REGISTRY,
)
READ_FALLBACKS = Counter(
    "baton_read_fallbacks",
    "Reads that qualified for a replica but ran on the primary, by reason (no_replica, "
    "causal_timeout, replica_failed, session_state)",
    ["reason"],
    registry=REGISTRY,
)
READ_RETRIES = Counter(
    "baton_read_retries",
    "Reads retried on another server after their replica failed before any result reached "
    "the client, by the replica that failed",
    ["server"],
    registry=REGISTRY,
)
CAUSAL_WAITS = Counter(
    "baton_causal_waits",
    "Causal reads that waited on a replica for a position, by outcome (applied, timeout)",
    ["outcome"],
    registry=REGISTRY,
)
CAUSAL_WAIT_SECONDS = Histogram(
    "baton_causal_wait_seconds",
    "How long causal reads waited on a replica for a position",
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
READS_DURING_HOLD = Counter(
    "baton_reads_during_hold",
    "Reads served by a replica while the shard held its commands for a switch",
    registry=REGISTRY,
)
REPLICA_LAG = Gauge(
    "baton_replica_lag_seconds",
    "Each replica's Seconds_Behind_Master as the read monitor last saw it (-1: not known)",
    ["server"],
    registry=REGISTRY,
)


def serve(host: str, port: int) -> None:
    """Start the metrics HTTP endpoint in a background thread (prometheus-client's own)."""
    start_http_server(port, addr=host, registry=REGISTRY)


# TLS (proxy/tls.py for clients, backend.tls for servers).
CLIENT_TLS = Counter(
    "baton_client_tls_handshakes",
    "Client connections that asked for TLS, by result (ok, failed)",
    ["result"],
    registry=REGISTRY,
)
TLS_RELOADS = Counter(
    "baton_tls_reloads",
    "Reloads of Baton's certificate and key for clients, by result (ok, failed: the old one "
    "stays in use)",
    ["result"],
    registry=REGISTRY,
)
BACKEND_TLS_FAILURES = Counter(
    "baton_backend_tls_failures",
    "Connections to a server refused for TLS (a certificate that does not verify against "
    "backend.ca, a server without TLS when backend.tls requires it, a failed handshake)",
    ["server"],
    registry=REGISTRY,
)
