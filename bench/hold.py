"""`python -m bench.hold`: how long clients wait while Baton switches the primary under load.

A private sandbox (db1 primary, db2 and db3 replicas) with Baton in front, buffering on (the
default config). sysbench `oltp_write_only` first runs unthrottled through Baton to find this
machine's capacity, then again at half of it for the whole run while a small Python client
writes alongside and N planned switchovers (`baton ctl --json prs`) move the primary between
db1 and db2; db3 follows each time. Per switchover it records Baton's report (each phase's
duration), the hold time and the worst latency a client saw around it; at the end Baton's
buffer and reparent metrics. The table goes to stdout and, with the machine, the exact
commands and the raw data, to OUT/hold.md and OUT/hold.json.

Why it is built this way:
- Half capacity, not full: at full load a replica lags and the catch-up wait, not the
  switchover, is measured (lab.md: gtid_wait 1.4 s unthrottled against 48 ms median under a
  moderate load). Half leaves headroom for that catch-up and still has writes in flight at
  every moment of a switch.
- The Python client is the ground truth for what a client sees. sysbench times whole
  transactions (several statements), per second only as a percentile, and stops at its first
  error (`--mysql-ignore-errors=none`): it says whether anything failed, not which single
  statement waited how long. The client logs every request's start, end and outcome on the
  same wall clock as Baton's reports, so each pause can be put next to its switchover.
- The hold time comes from Baton's own report, the only place that knows when holding began
  and ended; `baton_buffer_hold_seconds` says how long single commands actually waited.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    DATABASE,
    ROOT,
    SYSBENCH_GRACE,
    Stack,
    exit_on_signals,
    in_background,
    load_average,
    machine_info,
    progress,
    run_sysbench,
    running_stack,
    sysbench_command,
    sysbench_prepare,
)
from reparent.sandbox import APP, HOST

PORT_RANGE = range(20000, 30000)  # the ports this machine's benchmarks may use
REPLICAS = 2  # db1 and db2 take turns as primary, db3 follows every switch
SWITCH_BETWEEN = ("db1", "db2")
TABLES, TABLE_SIZE = 4, 10000
CAPACITY_SECONDS = 10
FIRST_SWITCH_S = 5.0  # the load settles first
LAST_SWITCH_MARGIN_S = 5.0  # the last switch and the +-2 s after it end before the load does
WINDOW_S = 2.0  # client latency is attributed to a switch within this much of its ctl call
HOLD_PHASES = ("holding", "revoked", "established")
PROBE_WRITERS = 4
PROBE_RATE = 50  # inserts per second per writer
PROBE_TABLE = "hold_probe"
GOAL_P50_MS, GOAL_P99_MS = 150.0, 400.0
METRICS = (
    "baton_buffer_hold_seconds",
    "baton_buffer_held",
    "baton_buffer_flushed",
    "baton_buffer_evicted",
    "baton_buffer_starts",
    "baton_buffer_stops",
    "baton_reparent_phase_seconds",
    "baton_reparents",
    "baton_errors",
)
# What else shares the CPUs: test runs, other servers, load generators, proxies.
NEIGHBOURS = re.compile(r"pytest|mariadbd|sysbench|proxy\.cli serve|haproxy")


# -- options ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hold", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=int, help="seconds of load (default 60, --quick 20)")
    parser.add_argument("--switches", type=int, help="planned switchovers (default 10, --quick 3)")
    parser.add_argument(
        "--threads", type=int, default=8, help="sysbench threads (capacity and load)"
    )
    parser.add_argument(
        "--rate", type=int, help="sysbench --rate; skips the capacity run (default: capacity/2)"
    )
    parser.add_argument("--out", type=Path, help="results dir (default bench/results)")
    parser.add_argument("--base-port", type=int, default=21301, help="port of the primary")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20 s, 3 switches, results to a temp dir"
    )
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Apply the --quick defaults, then refuse what would fail only minutes into the run."""
    if args.duration is None:
        args.duration = 20 if args.quick else 60
    if args.switches is None:
        args.switches = 3 if args.quick else 10
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="hold-quick-")) if args.quick else ROOT / "bench/results"
        )
    if args.switches < 1 or args.threads < 1 or (args.rate is not None and args.rate < 1):
        parser.error("--switches, --threads and --rate must be at least 1")
    # Each switch needs about a second, and the +-2 s windows should not overlap.
    needed = FIRST_SWITCH_S + LAST_SWITCH_MARGIN_S + (args.switches - 1) * (2 * WINDOW_S + 1)
    if args.duration < needed:
        parser.error(f"--duration must be at least {needed:g} s for {args.switches} switches")
    if args.base_port not in PORT_RANGE or args.base_port + REPLICAS not in PORT_RANGE:
        parser.error(f"servers must fit in ports {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")
    return args


def switch_times(duration: int, switches: int) -> list[float]:
    """Seconds after the load starts: the first at FIRST_SWITCH_S, then evenly spaced up to
    LAST_SWITCH_MARGIN_S before the end."""
    if switches == 1:
        return [FIRST_SWITCH_S]
    step = (duration - FIRST_SWITCH_S - LAST_SWITCH_MARGIN_S) / (switches - 1)
    return [FIRST_SWITCH_S + i * step for i in range(switches)]


# -- the Python client -----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One INSERT as the client saw it; times are wall-clock seconds, like Baton's reports."""

    writer: int
    start: float
    end: float
    error: str | None  # "code: message", or None if it succeeded

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000


def _connect(port: int) -> pymysql.Connection:
    return pymysql.connect(
        host=HOST,
        port=port,
        user=APP.user,
        password=APP.password,
        database=DATABASE,
        autocommit=True,
        ssl_disabled=True,
        connect_timeout=10,
        read_timeout=60,  # longer than the buffer's 10 s window: a held insert is not a timeout
        write_timeout=60,
    )


class Probe:
    """Writers that each insert one row at a steady pace and log every request.

    Paced, not flat out, so a stall shows as one long request instead of as fewer requests;
    after a stall the next insert goes at once and the pace resumes, without a catch-up burst
    that would add load right after the switch. A failed request reconnects, so later requests
    still measure Baton rather than a broken connection.
    """

    def __init__(self, port: int, writers: int, rate: int) -> None:
        self.port = port
        self.period = 1.0 / rate
        self._stop = threading.Event()
        self.requests: list[list[Request]] = [[] for _ in range(writers)]
        self._reconnects = [0] * writers  # one counter per thread: no lock needed
        # Connect here, in the caller's thread, so a Baton that refuses logins fails the run.
        self._conns = [_connect(port) for _ in range(writers)]
        self._threads = [
            threading.Thread(target=self._write, args=(i,), name=f"probe-{i}", daemon=True)
            for i in range(writers)
        ]

    def _write(self, writer: int) -> None:
        conn: pymysql.Connection | None = self._conns[writer]
        log = self.requests[writer]
        seq = 0
        due = time.monotonic()
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            due = max(due + self.period, time.monotonic())
            start = time.time()
            error = None
            try:
                if conn is None:
                    self._reconnects[writer] += 1
                    conn = _connect(self.port)
                with conn.cursor() as cur:
                    cur.execute(
                        f"INSERT INTO {PROBE_TABLE} (writer, seq) VALUES (%s, %s)", (writer, seq)
                    )
            except pymysql.MySQLError as e:
                error = ": ".join(str(a) for a in e.args)
                if conn is not None:
                    conn.close()
                conn = None
            log.append(Request(writer, start, time.time(), error))
            seq += 1
        if conn is not None:
            conn.close()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def finish(self) -> None:
        """Stop the writers and wait for them; a request in flight ends within read_timeout."""
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(70)

    @property
    def reconnects(self) -> int:
        return sum(self._reconnects)

    def all_requests(self) -> list[Request]:
        return sorted((r for log in self.requests for r in log), key=lambda r: r.start)


@contextmanager
def probing(port: int) -> Iterator[Probe]:
    """Run the probe's writers while the block runs; stop and join them however it ends."""
    probe = Probe(port, PROBE_WRITERS, PROBE_RATE)
    probe.start()
    try:
        yield probe
    finally:
        probe.finish()


def create_probe_table(port: int) -> None:
    conn = _connect(port)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {PROBE_TABLE} (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
                " writer TINYINT NOT NULL, seq INT NOT NULL, at TIMESTAMP(6) NOT NULL"
                " DEFAULT CURRENT_TIMESTAMP(6))"
            )
    finally:
        conn.close()


def count_probe_rows(port: int) -> int:
    """Rows in the probe's table, through Baton: each successful insert must be there once."""
    conn = _connect(port)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {PROBE_TABLE}")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


# -- switchovers -----------------------------------------------------------------------------


def ctl_command(stack: Stack, *args: str) -> list[str]:
    """`baton ctl --socket S ARGS` with the venv's own `baton`, as an operator would run it."""
    return [
        str(Path(sys.executable).with_name("baton")),
        "ctl",
        "--socket",
        stack.baton.socket,
        *args,
    ]


def current_primary(stack: Stack) -> str:
    out = subprocess.run(
        ctl_command(stack, "--json", "status"), capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise RuntimeError(f"baton ctl status failed: {out.stderr.strip()}")
    return json.loads(out.stdout)["shards"][0]["primary"]


def switchover(stack: Stack, index: int, source: str) -> dict[str, Any]:
    """One `baton ctl --json prs` to the other of db1/db2, with when the bench called it."""
    target = SWITCH_BETWEEN[1] if source == SWITCH_BETWEEN[0] else SWITCH_BETWEEN[0]
    command = ctl_command(stack, "--json", "prs", "--to", target)
    called = time.time()
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    returned = time.time()
    try:
        report = json.loads(out.stdout) if out.stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    return {
        "index": index,
        "from": source,
        "to": target,
        "command": shlex.join(command),
        "returncode": out.returncode,
        "stderr": out.stderr.strip(),
        "called": called,
        "returned": returned,
        "report": report,
    }


def phase_ms(report: dict[str, Any]) -> dict[str, float]:
    """Each phase's duration, by step, in report order (a step seen twice is summed)."""
    phases: dict[str, float] = {}
    for p in report["phases"]:
        phases[p["step"]] = phases.get(p["step"], 0.0) + p["duration_ms"]
    return phases


def hold_ms(report: dict[str, Any]) -> float:
    """The sum of the HOLD_PHASES durations: revoke, establish and commit."""
    return sum(ms for step, ms in phase_ms(report).items() if step in HOLD_PHASES)


def largest_part(report: dict[str, Any]) -> str:
    """Which part of the hold took longest: one of HOLD_PHASES, or 'gaps' (the untimed steps
    between them) when those add up to more; where to look first when a hold is slow."""
    phases = phase_ms(report)
    parts = {step: phases.get(step, 0.0) for step in HOLD_PHASES}
    span = hold_span_ms(report)
    if span is not None:
        parts["gaps"] = span - hold_ms(report)
    return max(parts, key=lambda k: parts[k])


def hold_span_ms(report: dict[str, Any]) -> float | None:
    """Wall time from the start of 'holding' to the end of 'established': the sum plus the
    journal writes between the phases, which the phase durations leave out."""
    held = [p for p in report["phases"] if p["step"] in HOLD_PHASES]
    if not held or held[0]["step"] != HOLD_PHASES[0] or held[-1]["step"] != HOLD_PHASES[-1]:
        return None
    end = held[-1]["started_at"] + held[-1]["duration_ms"] / 1000
    return (end - held[0]["started_at"]) * 1000


# -- sysbench --------------------------------------------------------------------------------


def sysbench_options(args: argparse.Namespace, duration: int) -> dict[str, str | int]:
    return {
        "tables": TABLES,
        "table-size": TABLE_SIZE,
        "threads": args.threads,
        "time": duration,
        "events": 0,
        "rand-type": "uniform",
        "db-ps-mode": "disable",
        "mysql-ignore-errors": "none",
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
    """The load run's summary (a 99th percentile, which bench.common's parser, made for
    steady's 95th, does not read) and its per-second reports; a missing line is None."""
    summary: dict[str, Any] = {}
    for name, (pattern, kind) in _LOAD_SUMMARY.items():
        match = re.search(pattern, output, re.M)
        summary[name] = None if match is None else kind(match[1])
    summary["intervals"] = [
        {k: float(v) for k, v in m.groupdict().items()} for m in _INTERVAL.finditer(output)
    ]
    return summary


# -- metrics ---------------------------------------------------------------------------------


def scrape_metrics(port: int) -> dict[str, list[dict[str, Any]]]:
    """The METRICS families from Baton's endpoint, as samples with their labels."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        family.name: [
            {"name": s.name, "labels": dict(s.labels), "value": s.value} for s in family.samples
        ]
        for family in text_string_to_metric_families(text)
        if family.name in METRICS
    }


def _sample(metrics: dict[str, list[dict[str, Any]]], family: str, suffix: str) -> float:
    """The family's samples named family + suffix, summed over labels (0 if there are none)."""
    return sum(s["value"] for s in metrics.get(family, []) if s["name"] == family + suffix)


def bucket_bound(metrics: dict[str, list[dict[str, Any]]], family: str, q: float) -> str:
    """The smallest histogram bucket bound holding at least `q` of the observations."""
    buckets = [s for s in metrics.get(family, []) if s["name"] == f"{family}_bucket"]
    total = _sample(metrics, family, "_count")
    if not total:
        return "-"
    for b in sorted(buckets, key=lambda s: float(s["labels"]["le"])):
        if b["value"] >= q * total:
            return f"<= {b['labels']['le']} s"
    return "-"


# -- the run ---------------------------------------------------------------------------------


def in_window(requests: list[Request], start: float, end: float) -> list[Request]:
    """Requests in flight at any moment of [start, end]."""
    return [r for r in requests if r.start <= end and r.end >= start]


def analyse(record: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-switchover rows and the summary, from the raw record."""
    load_start = record["load"]["started"]
    requests = [
        Request(w, load_start + at / 1000, load_start + (at + ms) / 1000, error)
        for w, at, ms, error in record["probe"]["requests"]
    ]
    intervals = record["load"]["summary"]["intervals"]
    rows: list[dict[str, Any]] = []
    attributed: set[Request] = set()
    for s in record["switchovers"]:
        report = s["report"]
        ok = report is not None and report.get("outcome") == "succeeded"
        w_start, w_end = s["called"] - WINDOW_S, s["returned"] + WINDOW_S
        near = in_window(requests, w_start, w_end)
        attributed.update(near)
        worst = max(near, key=lambda r: r.latency_ms, default=None)
        # sysbench's report for second k covers [k-1, k) after its start (within a few ms).
        seconds = [
            i["p99"]
            for i in intervals
            if load_start + i["second"] - 1 <= w_end and load_start + i["second"] >= w_start
        ]
        rows.append(
            {
                "index": s["index"],
                "from": s["from"],
                "to": s["to"],
                "outcome": "no report" if report is None else report["outcome"],
                "ok": ok,
                "total_ms": sum(phase_ms(report).values()) if report else None,
                "phases_ms": phase_ms(report) if report else {},
                "hold_ms": hold_ms(report) if report else None,
                "hold_span_ms": hold_span_ms(report) if report else None,
                "largest_part": largest_part(report) if report else None,
                "ctl_ms": (s["returned"] - s["called"]) * 1000,
                "client_worst_ms": None if worst is None else worst.latency_ms,
                "client_requests": len(near),
                "client_errors": sum(r.error is not None for r in near),
                "sysbench_worst_p99_ms": max(seconds, default=None),
                "held": None if report is None else report.get("held"),
                "evicted": None if report is None else report.get("evicted"),
            }
        )
    holds = [r["hold_ms"] for r in rows if r["ok"]]
    spans = [r["hold_span_ms"] for r in rows if r["ok"] and r["hold_span_ms"] is not None]
    worsts = [r["client_worst_ms"] for r in rows if r["client_worst_ms"] is not None]
    outside = [r for r in requests if r not in attributed]
    sb = record["load"]["summary"]
    largest = [r["largest_part"] for r in rows if r["ok"]]
    summary = {
        "switchovers": len(rows),
        "succeeded": len(holds),
        "largest_part": {part: largest.count(part) for part in sorted(set(largest))},
        "hold_p50_ms": _quantile(holds, 0.50),
        "hold_p99_ms": _quantile(holds, 0.99),
        "hold_max_ms": max(holds, default=None),
        "hold_span_p50_ms": _quantile(spans, 0.50),
        "hold_span_p99_ms": _quantile(spans, 0.99),
        "hold_span_max_ms": max(spans, default=None),
        "client_worst_per_switch_p50_ms": _quantile(worsts, 0.50),
        "client_worst_per_switch_p99_ms": _quantile(worsts, 0.99),
        "client_worst_ms": max((r.latency_ms for r in requests), default=None),
        "client_worst_outside_windows_ms": max((r.latency_ms for r in outside), default=None),
        "client_median_ms": _quantile([r.latency_ms for r in requests], 0.50),
        "client_requests": len(requests),
        "client_errors": sum(r.error is not None for r in requests),
        "client_reconnects": record["probe"]["reconnects"],
        "client_rows_expected": sum(r.error is None for r in requests),
        "client_rows_found": record["probe"]["rows_found"],
        "sysbench_returncode": record["load"]["returncode"],
        "sysbench_tps": sb["tps"],
        "sysbench_transactions": sb["transactions"],
        "sysbench_errors": sb["errors"],
        "sysbench_reconnects": sb["reconnects"],
        "sysbench_p99_ms": sb["p99_ms"],
        "sysbench_max_ms": sb["max_ms"],
        "capacity_tps": record["capacity"]["tps"] if record["capacity"] else None,
        "rate": record["rate"],
        "buffer_held": _sample(record["metrics"], "baton_buffer_held", "_total"),
        "buffer_evicted": _sample(record["metrics"], "baton_buffer_evicted", "_total"),
        "reports_held": sum(r["held"] or 0 for r in rows),
        "reports_evicted": sum(r["evicted"] or 0 for r in rows),
    }
    # The goal read three ways: the hold time, its wall-clock span, and what the
    # Python client saw per switchover; they differ by the untimed steps between phases.
    for name, p50, p99 in (
        ("goal", "hold_p50_ms", "hold_p99_ms"),
        ("goal_span", "hold_span_p50_ms", "hold_span_p99_ms"),
        ("goal_client", "client_worst_per_switch_p50_ms", "client_worst_per_switch_p99_ms"),
    ):
        summary[f"{name}_p50_met"] = summary[p50] is not None and summary[p50] < GOAL_P50_MS
        summary[f"{name}_p99_met"] = summary[p99] is not None and summary[p99] < GOAL_P99_MS
    return rows, summary


def _quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); with 10 values the
    p99 lies between the two largest, so it is nearly the maximum."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def measure_capacity(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """tps of an unthrottled CAPACITY_SECONDS run through Baton, with no switchover."""
    options = {**sysbench_options(args, CAPACITY_SECONDS), "report-interval": 0}
    run = run_sysbench(sysbench_command("oltp_write_only", port, "run", options), CAPACITY_SECONDS)
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


def run_load(args: argparse.Namespace, stack: Stack, rate: int) -> dict[str, Any]:
    """The throttled load, the probe and the switchovers, all at once."""
    options = {
        **sysbench_options(args, args.duration),
        "rate": rate,
        "report-interval": 1,
        "percentile": 99,
        "histogram": "on",
    }
    command = sysbench_command("oltp_write_only", stack.baton.port, "run", options)
    source = current_primary(stack)
    switches: list[dict[str, Any]] = []
    with probing(stack.baton.port) as probe:
        with in_background(command, args.duration + SYSBENCH_GRACE) as load:
            started, t0 = time.time(), time.monotonic()
            progress(f"load: {rate} tps for {args.duration} s, probe {PROBE_WRITERS} writers")
            for i, at in enumerate(switch_times(args.duration, args.switches), 1):
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                s = switchover(stack, i, source)
                switches.append(s)
                report = s["report"]
                if report is not None and report.get("outcome") == "succeeded":
                    source = report["new_primary"]
                    progress(
                        f"prs {i}: {s['from']} -> {s['to']} hold {hold_ms(report):.1f} ms, "
                        f"total {sum(phase_ms(report).values()):.1f} ms"
                    )
                else:
                    progress(f"prs {i} FAILED (rc {s['returncode']}): {s['stderr'][-300:]}")
                    source = current_primary(stack)
            returncode, output = load.wait()
        probe.finish()
    requests = probe.all_requests()
    progress(f"load done (rc {returncode}); probe: {len(requests)} requests")
    return {
        "load": {
            "command": shlex.join(load.command),
            "started": started,
            "returncode": returncode,
            "summary": parse_load(output),
            "output_tail": output[-6000:],
        },
        "switchovers": switches,
        "probe": {
            "writers": PROBE_WRITERS,
            "rate_per_writer": PROBE_RATE,
            "reconnects": probe.reconnects,
            # Compact: [writer, ms from the load's start, latency ms, error], to the microsecond.
            "requests": [
                [r.writer, round((r.start - started) * 1000, 3), round(r.latency_ms, 3), r.error]
                for r in requests
            ],
        },
    }


def neighbours() -> dict[str, dict[str, Any]]:
    """Processes that may compete for the CPUs (test runs, servers, load), by pid, with the CPU
    seconds they have used so far: comparing two calls says what else worked during the run.
    Called when none of this run's own processes are up (its servers, stopped but not yet
    reaped, are skipped)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True)
    found: dict[str, dict[str, Any]] = {}
    for line in out.stdout.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if not NEIGHBOURS.search(args) or "<defunct>" in args:
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # it ended in between
        fields = stat.rsplit(")", 1)[1].split()  # from field 3 (state) on
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        found[pid] = {"args": args[:100], "cpu_s": ticks / os.sysconf("SC_CLK_TCK")}
    return found


def neighbour_lines(start: dict[str, dict[str, Any]], end: dict[str, dict[str, Any]]) -> list[str]:
    """One line per process seen at the start or the end, with its CPU use in between."""
    lines = []
    for pid in sorted({*start, *end}, key=int):
        if pid in start and pid in end:
            used = f"{end[pid]['cpu_s'] - start[pid]['cpu_s']:.2f} CPU s during the run"
        elif pid in end:
            used = f"started during the run, {end[pid]['cpu_s']:.2f} CPU s by its end"
        else:
            used = "ended during the run"
        lines.append(f"  - {pid}: {used}: `{(end.get(pid) or start[pid])['args']}`")
    return lines or ["  - none"]


# -- the record ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Per switchover: the report's phases and hold, and what clients saw around it."""
    steps: list[str] = []
    for r in rows:
        steps += [s for s in r["phases_ms"] if s not in steps]
    lines = [
        "| # | from -> to | outcome | total ms | "
        + " | ".join(f"{s} ms" for s in steps)
        + " | hold ms | hold span ms | largest part | client worst ms (+-2 s) | client errors "
        "| sysbench worst 1 s p99 ms |",
        "|---:|---|---|---:|" + "---:|" * len(steps) + "---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        phases = " | ".join(_ms(r["phases_ms"].get(s)) for s in steps)
        lines.append(
            f"| {r['index']} | {r['from']} -> {r['to']} | {r['outcome']} | {_ms(r['total_ms'])} "
            f"| {phases} | {_ms(r['hold_ms'])} | {_ms(r['hold_span_ms'])} "
            f"| {r['largest_part'] or '-'} "
            f"| {_ms(r['client_worst_ms'])} | {r['client_errors']} "
            f"| {_ms(r['sysbench_worst_p99_ms'])} |"
        )
    return "\n".join(lines)


def summary_lines(s: dict[str, Any]) -> list[str]:
    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    def goal(name: str) -> str:
        return (
            f"goal p50 < {GOAL_P50_MS:g} ms {verdict(s[f'{name}_p50_met'])}, "
            f"p99 < {GOAL_P99_MS:g} ms {verdict(s[f'{name}_p99_met'])}"
        )

    return [
        f"- Switchovers: {s['succeeded']} of {s['switchovers']} succeeded",
        f"- Hold time (sum of the holding, revoked and established phases): "
        f"p50 {_ms(s['hold_p50_ms'])} ms, p99 {_ms(s['hold_p99_ms'])} ms, "
        f"max {_ms(s['hold_max_ms'])} ms; {goal('goal')}",
        f"- Hold span (the same on the wall clock, with the journal writes between phases): "
        f"p50 {_ms(s['hold_span_p50_ms'])} ms, p99 {_ms(s['hold_span_p99_ms'])} ms, "
        f"max {_ms(s['hold_span_max_ms'])} ms; {goal('goal_span')}",
        "- Largest part of the hold: "
        + (", ".join(f"{k} in {v}" for k, v in s["largest_part"].items()) or "-")
        + f" of {s['succeeded']}",
        f"- Worst client latency per switchover: p50 {_ms(s['client_worst_per_switch_p50_ms'])} "
        f"ms, p99 {_ms(s['client_worst_per_switch_p99_ms'])} ms; {goal('goal_client')}",
        f"- Python client: {s['client_requests']} inserts, {s['client_errors']} errors, "
        f"{s['client_reconnects']} reconnects, worst {_ms(s['client_worst_ms'])} ms "
        f"(outside the switch windows {_ms(s['client_worst_outside_windows_ms'])} ms), "
        f"median {_ms(s['client_median_ms'])} ms; rows found {s['client_rows_found']} "
        f"of {s['client_rows_expected']} acknowledged",
        f"- sysbench: rc {s['sysbench_returncode']}, {_ms(s['sysbench_tps'])} tps, "
        f"{s['sysbench_errors']} errors, {s['sysbench_reconnects']} reconnects, "
        f"p99 {_ms(s['sysbench_p99_ms'])} ms, max {_ms(s['sysbench_max_ms'])} ms",
        f"- Capacity: {_ms(s['capacity_tps'])} tps; rate used: {s['rate']} tps",
        f"- Commands held by Baton's buffer (metrics): {s['buffer_held']:g}, evicted "
        f"{s['buffer_evicted']:g}; the reports' own `held`/`evicted` fields add up to "
        f"{s['reports_held']}/{s['reports_evicted']}",
    ]


def metrics_lines(m: dict[str, list[dict[str, Any]]]) -> list[str]:
    hold = "baton_buffer_hold_seconds"
    held = _sample(m, hold, "_count")
    evicted = {
        s["labels"]["reason"]: s["value"]
        for s in m.get("baton_buffer_evicted", [])
        if s["name"].endswith("_total")
    }
    errors = [
        f"{s['labels']['code']}/{s['labels']['origin']}: {s['value']:g}"
        for s in m.get("baton_errors", [])
        if s["name"].endswith("_total")
    ]
    lines = [
        f"- `baton_buffer_held_total` {_sample(m, 'baton_buffer_held', '_total'):g}, "
        f"`baton_buffer_flushed_total` {_sample(m, 'baton_buffer_flushed', '_total'):g}, "
        f"`baton_buffer_evicted_total` {sum(evicted.values()):g}"
        + (f" ({', '.join(f'{k} {v:g}' for k, v in evicted.items())})" if evicted else ""),
        f"- `baton_buffer_starts_total` {_sample(m, 'baton_buffer_starts', '_total'):g}; "
        f"`baton_errors_total`: {', '.join(errors) or 'none'}",
        f"- `{hold}`: {held:g} commands, "
        f"mean {1000 * _sample(m, hold, '_sum') / max(1, held):.1f} ms, "
        f"50% {bucket_bound(m, hold, 0.5)}, 99% {bucket_bound(m, hold, 0.99)}, "
        f"all {bucket_bound(m, hold, 1.0)}",
        "",
        "| bucket le (s) | held commands (cumulative) |",
        "|---:|---:|",
    ]
    lines += [
        f"| {s['labels']['le']} | {s['value']:g} |"
        for s in m.get(hold, [])
        if s["name"] == f"{hold}_bucket"
    ]
    lines += [
        "",
        "`baton_reparent_phase_seconds` (every reparent of the run):",
        "",
        "| call | count | mean ms | 99% within |",
        "|---|---:|---:|---|",
    ]
    phase = "baton_reparent_phase_seconds"
    for c in [s for s in m.get(phase, []) if s["name"] == f"{phase}_count"]:
        label = c["labels"]
        # One histogram per label set (kind, call); its buckets add `le` to those labels.
        one = {
            phase: [
                s for s in m[phase] if {k: v for k, v in s["labels"].items() if k != "le"} == label
            ]
        }
        total = _sample(one, phase, "_sum")
        lines.append(
            f"| {label['call']} | {c['value']:g} | {1000 * total / c['value']:.1f} "
            f"| {bucket_bound(one, phase, 0.99)} |"
        )
    return lines


def report(record: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """hold.md: enough to judge and to repeat the numbers without the JSON."""
    m = record["machine"]
    s = record["settings"]
    first = next((x["report"] for x in record["switchovers"] if x["report"]), None)
    phases = " -> ".join(p["step"] for p in first["phases"]) if first else "(no report)"
    lines = [
        "# Hold time across planned switchovers under write load",
        "",
        f"- Date: {m['date']}",
        f"- Machine: {m['nproc']} CPUs, {m['host']}, Linux {m['kernel']}, Python {m['python']}",
        f"- Versions: {m['mariadb']}; {m['sysbench']}",
        f"- Baton commit: {m['commit']}",
        f"- Load average (1/5/15 min): {m['load_average_start']} at start, "
        f"{record['load_average_end']} at end",
        "- Other processes that could compete for the CPUs (test runs, servers, load "
        "generators, proxies), with the CPU time each used while this ran (the load average "
        "also counts the minutes before the start; these seconds are what actually competed):",
        *neighbour_lines(record["neighbours_start"], record["neighbours_end"]),
        "",
        "Command:",
        "",
        f"    {record['command']}",
        "",
        "## Summary",
        "",
        *summary_lines(summary),
        "",
        "## Per switchover",
        "",
        table(rows),
        "",
        "What the columns are:",
        "",
        f"- Phases, from Baton's report (`baton ctl --json prs`), in order: {phases}. Each "
        "phase is named after the journaled step during which a mechanism call ran: "
        "'started' = choose the candidate, 'candidate_chosen' = prepare it (catch up while the "
        "old primary still serves), 'holding' = revoke (proxies hold new commands from the "
        "moment this step is published; drain, then fence the old primary), 'revoked' = "
        "establish (the candidate reaches the old primary's final GTID and becomes writable), "
        "'established' = commit the new primary and term to the store, after which the proxies "
        "are told and flush.",
        "- total ms: the sum of all phases, as `baton ctl prs` prints it.",
        "- hold ms: the sum of the durations of 'holding', 'revoked' and 'established', i.e. "
        "from the start of HOLDING to the end of ESTABLISHED in phase time.",
        "- hold span ms: the same interval on the wall clock (start of 'holding' to end of "
        "'established'), so it also counts the journal writes between the phases; the "
        "proxies actually stop holding after one more write (the finished record) and the "
        "event's hop to the proxy's loop, which no phase times.",
        "- largest part: the longest of the three hold phases, or 'gaps' when the untimed "
        "steps between them (span minus hold) took longer.",
        f"- client worst ms: the longest single insert of the Python client in flight at any "
        f"moment from {WINDOW_S:g} s before the ctl call to {WINDOW_S:g} s after it returned; "
        "client errors: failed inserts in that window.",
        "- sysbench worst 1 s p99: the highest per-second 99th percentile sysbench reported "
        "in that window (its seconds aligned to the load's start within a few ms).",
        "",
        "## Baton's metrics at the end of the run",
        "",
        *metrics_lines(record["metrics"]),
        "",
        "## How it ran",
        "",
        f"One sandbox: db1 primary, db2 and db3 replicas on ports {s['base_port']}-"
        f"{s['base_port'] + REPLICAS}; `baton serve` with the sandbox's config (buffering on, "
        "the defaults); HAProxy is started by bench.common's stack but carries no traffic. "
        "sysbench, the Python client, the servers and Baton share the same CPUs. The "
        f"switchovers alternate {SWITCH_BETWEEN[0]} <-> {SWITCH_BETWEEN[1]}; the first "
        f"{FIRST_SWITCH_S:g} s after the load starts, the rest evenly spaced "
        f"({', '.join(f'{t:.1f}' for t in switch_times(s['duration'], s['switches']))} s).",
        "",
        "Prepared once, directly against the primary:",
        "",
        f"    {record['prepare_command']}",
        "",
        "Capacity (unthrottled, no switchover):",
        "",
        f"    {record['capacity']['command'] if record['capacity'] else '(skipped: --rate)'}",
        "",
        "Load:",
        "",
        f"    {record['load']['command']}",
        "",
        "Each switchover (the target alternates):",
        "",
        f"    {record['switchovers'][0]['command']}",
        "",
        f"Python client: {PROBE_WRITERS} threads, each its own PyMySQL connection to Baton "
        f"(ssl_disabled, autocommit), one-row INSERTs into `{DATABASE}.{PROBE_TABLE}` paced at "
        f"{PROBE_RATE}/s per thread; every request's start, end and error is in hold.json "
        "(`probe.requests`: writer, start in ms after `load.started` (wall-clock seconds, "
        "like the reports' `started_at`), latency in ms, error).",
    ]
    return "\n".join(lines) + "\n"


def dump_json(record: dict[str, Any]) -> str:
    """Indented like steady.json, except the probe's requests, one per line: thousands of rows
    that would otherwise take five lines each."""
    requests = record["probe"]["requests"]
    rest = {**record, "probe": {**record["probe"], "requests": "@REQUESTS@"}}
    rows = ",\n      ".join(json.dumps(r) for r in requests)
    return json.dumps(rest, indent=2).replace('"@REQUESTS@"', f"[\n      {rows}\n    ]") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser)
    command = shlex.join(["python", "-m", "bench.hold", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info()
    neighbours_start = neighbours()
    with exit_on_signals(), running_stack(args.base_port, REPLICAS) as stack:
        port = stack.baton.port
        prepare = sysbench_command(
            "oltp_write_only",
            stack.primary_port,
            "prepare",
            {"tables": TABLES, "table-size": TABLE_SIZE, "threads": TABLES},
        )
        progress(f"prepare: {TABLES} tables x {TABLE_SIZE} rows")
        sysbench_prepare(prepare)
        create_probe_table(port)
        capacity = None if args.rate else measure_capacity(args, port)
        rate = args.rate or max(1, round(capacity["tps"] / 2))
        run = run_load(args, stack, rate)
        run["probe"]["rows_found"] = count_probe_rows(port)
        metrics = scrape_metrics(stack.baton.metrics_port)
        stack.check_alive()
    record = {
        "command": command,
        "machine": machine,
        "settings": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
        "neighbours_start": neighbours_start,
        "neighbours_end": neighbours(),
        "load_average_end": load_average(),
        "prepare_command": shlex.join(prepare),
        "capacity": capacity,
        "rate": rate,
        **run,
        "metrics": metrics,
    }
    rows, summary = analyse(record)
    record["summary"] = summary
    record["per_switchover"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hold.json").write_text(dump_json(record))
    (args.out / "hold.md").write_text(report(record, rows, summary))
    print(table(rows))
    print()
    print("\n".join(summary_lines(summary)))
    progress(f"wrote {args.out / 'hold.md'} and {args.out / 'hold.json'}")
    failed = (
        summary["succeeded"] < summary["switchovers"]
        or summary["client_errors"]
        or summary["sysbench_returncode"] != 0
        or summary["client_rows_found"] != summary["client_rows_expected"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped")
        sys.exit(130)
