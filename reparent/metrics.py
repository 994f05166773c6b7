"""Prometheus figures for reparents; `proxy.metrics` serves them with the data path's own."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from reparent.topology import ReparentRecord

# Not registered here: reparent/ must not know where metrics are served.
REPARENTS = Counter(
    "baton_reparents", "Reparents by kind and outcome", ["kind", "outcome"], registry=None
)
PHASE_SECONDS = Histogram(
    "baton_reparent_phase_seconds",
    "Duration of each call of a reparent (choose, prepare, revoke, establish, commit, ...)",
    ["kind", "call"],
    registry=None,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
COLLECTORS = (REPARENTS, PHASE_SECONDS)


def observe(record: ReparentRecord) -> None:
    REPARENTS.labels(str(record.kind), str(record.outcome)).inc()
    for phase in record.phases:
        PHASE_SECONDS.labels(str(record.kind), phase.call).observe(phase.duration_ms / 1000)
