"""Prometheus figures for reparents; `proxy.metrics` serves them with the data path's own."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
# The failure detector (reparent/watch.py).
DETECTIONS = Counter(
    "baton_detector_detections",
    "What the failure detector found, by shard and reason (acted on or only reported)",
    ["shard", "reason"],
    registry=None,
)
PROBE_FAILURES = Counter(
    "baton_detector_probe_failures",
    "Probes of a server that got no answer",
    ["server"],
    registry=None,
)
DETECTOR_ACTIONS = Counter(
    "baton_detector_actions",
    "Actions the failure detector carried out (run_ers, restart_replication, ...) by outcome",
    ["action", "outcome"],
    registry=None,
)
LAST_DETECTION = Gauge(
    "baton_detector_last_detection_timestamp_seconds",
    "When the detector last found a shard's primary dead (Unix time)",
    ["shard"],
    registry=None,
)
# Seconds, for both detector histograms: a detection at the defaults takes 1-1.5 s.
_DETECTOR_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0, 30.0)
DETECTION_SECONDS = Histogram(
    "baton_detector_detection_seconds",
    "Dead or hung primaries: seconds from the first sign of the fault (the first failed probe,"
    " or the first heartbeat a replica missed) to the decision to reparent",
    ["shard"],
    registry=None,
    buckets=_DETECTOR_BUCKETS,
)
RECOVERY_SECONDS = Histogram(
    "baton_detector_recovery_seconds",
    "Seconds from the detector's decision to reparent to the new primary published (held"
    " writes flow to it from then on)",
    ["shard"],
    registry=None,
    buckets=_DETECTOR_BUCKETS,
)
MISMATCHES = Gauge(
    "baton_topology_mismatches",
    "How many ways a shard's servers contradict its config and store (0: they agree); while"
    " above 0 nothing is done about the shard automatically (baton ctl check shows them)",
    ["shard"],
    registry=None,
)
COLLECTORS = (
    REPARENTS,
    PHASE_SECONDS,
    DETECTIONS,
    PROBE_FAILURES,
    DETECTOR_ACTIONS,
    LAST_DETECTION,
    DETECTION_SECONDS,
    RECOVERY_SECONDS,
    MISMATCHES,
)


def observe(record: ReparentRecord) -> None:
    REPARENTS.labels(str(record.kind), str(record.outcome)).inc()
    for phase in record.phases:
        PHASE_SECONDS.labels(str(record.kind), phase.call).observe(phase.duration_ms / 1000)
