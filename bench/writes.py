"""The write workload of the switchover benchmarks (bench/hold.py, bench/failover.py):
sysbench `oltp_write_only`, paced at a fixed rate and reporting every second, so each second of
a run can be put next to what happened in it."""

from __future__ import annotations

import re
import shlex
from typing import Any

from bench.process import progress
from bench.sysbench import run_sysbench, sysbench_command, sysbench_prepare

WRITE_WORKLOAD = "oltp_write_only"
WRITE_TABLES, WRITE_TABLE_SIZE = 4, 10000
CAPACITY_SECONDS = 10


def write_options(threads: int, seconds: int, ignore_errors: str = "none") -> dict[str, str | int]:
    """The write workload's sysbench options: text protocol, uniform keys, no event limit.

    `ignore_errors` is sysbench's `--mysql-ignore-errors`: "none" stops a thread at its first
    error (a path that must show none), "all" carries on (a path that drops clients)."""
    return {
        "tables": WRITE_TABLES,
        "table-size": WRITE_TABLE_SIZE,
        "threads": threads,
        "time": seconds,
        "events": 0,
        "rand-type": "uniform",
        "db-ps-mode": "disable",
        "mysql-ignore-errors": ignore_errors,
    }


def paced_write_command(
    port: int, threads: int, seconds: int, rate: int, ignore_errors: str = "none"
) -> list[str]:
    """The write workload at a fixed `rate` (transactions/s), reporting every second with a
    99th percentile, so each second of a run can be put next to what happened in it."""
    options = {
        **write_options(threads, seconds, ignore_errors),
        "rate": rate,
        "report-interval": 1,
        "percentile": 99,
        "histogram": "on",
    }
    return sysbench_command(WRITE_WORKLOAD, port, "run", options)


def prepare_writes(port: int) -> list[str]:
    """Create and fill the write workload's tables through `port`; return the command."""
    command = sysbench_command(
        WRITE_WORKLOAD,
        port,
        "prepare",
        {"tables": WRITE_TABLES, "table-size": WRITE_TABLE_SIZE, "threads": WRITE_TABLES},
    )
    progress(f"prepare: {WRITE_TABLES} tables x {WRITE_TABLE_SIZE} rows")
    sysbench_prepare(command)
    return command


def setup_writes(
    primary_port: int, capacity_port: int, threads: int, rate: int | None
) -> dict[str, Any]:
    """Prepare the tables through the primary and settle the load's rate: `rate` if given, else
    half the capacity measured through `capacity_port`. Half, not full: at full load a replica
    lags and the catch-up wait, not the switchover, would be measured; half still has writes in
    flight at every moment of a switch. Returns the record's prepare command, capacity run
    (None with `rate`) and rate."""
    prepare = prepare_writes(primary_port)
    capacity = None if rate else measure_capacity(capacity_port, threads)
    return {
        "prepare_command": shlex.join(prepare),
        "capacity": capacity,
        "rate": rate or max(1, round(capacity["tps"] / 2)),
    }


def measure_capacity(port: int, threads: int) -> dict[str, Any]:
    """tps of an unthrottled CAPACITY_SECONDS write run through `port`, with no switchover."""
    options = {**write_options(threads, CAPACITY_SECONDS), "report-interval": 0}
    run = run_sysbench(sysbench_command(WRITE_WORKLOAD, port, "run", options), CAPACITY_SECONDS)
    if run.result is None:
        raise RuntimeError(f"capacity run {run.problem}:\n{run.output[-2000:]}")
    r = run.result
    progress(f"capacity: {r.tps:.0f} tps, p95 {r.p95_ms} ms, errors {r.errors}")
    return {
        "command": shlex.join(run.command),
        "tps": r.tps,
        "p95_ms": r.p95_ms,
        "max_ms": r.max_ms,
        "errors": r.errors,
    }


_INTERVAL = re.compile(
    r"^\[\s*(?P<second>\d+)s \] thds: \d+ tps: (?P<tps>[\d.]+) qps: [\d.]+ .*?"
    r"lat \(ms,\d+%\): (?P<p99>[\d.]+) err/s: (?P<errors>[\d.]+) reconn/s: (?P<reconnects>[\d.]+)",
    re.M,
)
_LOAD_SUMMARY = {  # name: (pattern, type)
    "transactions": (r"^\s*transactions:\s+(\d+)", int),
    "tps": (r"^\s*transactions:\s+\d+\s+\(([\d.]+) per sec\.\)", float),
    "errors": (r"^\s*ignored errors:\s+(\d+)", int),
    "reconnects": (r"^\s*reconnects:\s+(\d+)", int),
    "avg_ms": (r"^\s*avg:\s+([\d.]+)", float),
    "p99_ms": (r"^\s*99th percentile:\s+([\d.]+)", float),
    "max_ms": (r"^\s*max:\s+([\d.]+)", float),
}


def parse_load(output: str) -> dict[str, Any]:
    """A paced run's summary (a 99th percentile, which parse_sysbench, made for steady's 95th,
    does not read) and its per-second reports; a missing line is None, so a run that crashed
    before its summary still gives the seconds it reported."""
    summary: dict[str, Any] = {}
    for name, (pattern, kind) in _LOAD_SUMMARY.items():
        match = re.search(pattern, output, re.M)
        summary[name] = None if match is None else kind(match[1])
    summary["intervals"] = [
        {k: float(v) for k, v in m.groupdict().items()} for m in _INTERVAL.finditer(output)
    ]
    return summary
