"""`python -m bench.failover`: what clients see across planned switchovers, four ways.

One private sandbox (db1 primary, db2 and db3 replicas) and one write workload, driven in turn
through four paths while Baton's controller (`baton ctl --json prs`) moves the primary between
db1 and db2 at fixed times:

- direct: clients connect to the primary's own port and, when a request fails, reconnect to
  whichever server `baton ctl --json status` names now (an application behind a failover tool
  that updates DNS or a VIP). The Baton that switches carries no traffic.
- haproxy: HAProxy in TCP mode in front of all three servers, routing to the one whose HTTP
  check says it is writable (`@@read_only=0`), checked every 100 ms, closing the sessions of a
  server it marks down. The same Baton switches, again without traffic.
- baton-unbuffered: clients through Baton with `[buffer] enabled = false`.
- baton-buffered: clients through Baton as configured by default, holding commands while it
  switches.

The workload on each path is sysbench `oltp_write_only` at a fixed rate (half of the capacity
measured through Baton at the start) plus a Python client that logs every insert's start, end
and outcome. Per path: the client's errors and reconnects, sysbench's errors and exit, the
commands Baton held, latency in steady state and around the switches, the write pause and the
time back to full throughput. The table goes to stdout and, with the exact command, the machine
and the raw data, to OUT/failover.md, OUT/failover.json and one OUT/failover-PATH.png per path.

Why it is built this way:
- One sandbox, one run, the paths back to back: the same servers, data and machine noise, so
  the paths differ only in how clients reach the primary. Each Baton of the run keeps its
  topology in one store, so the next path's Baton starts from the primary the last one left.
- The Python client is the measure (bench.probe): sysbench reports once a second and cannot
  follow a primary that moves, but it is the realistic background load on the servers. On the
  paths that drop clients it runs with `--mysql-ignore-errors=all` under `timeout -s KILL`,
  because Debian's sysbench 1.0.20 crashes (SIGSEGV) on its first reconnect (akopytov/sysbench
  #527); its exit is recorded as it happened, crash included.
- Throughput per 100 ms counts the client's successful inserts by their completion time. The
  client is paced (it does not catch up after a stall), so a bucket below its steady rate is
  writes that did not happen, not writes that were late.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.figures import quantile, sample_sum, scrape_metrics
from bench.probe import (
    WINDOW_S,
    FixedTarget,
    Request,
    Target,
    compact,
    count_probe_rows,
    create_probe_table,
    ctl_json,
    current_primary,
    expand,
    hold_ms,
    min_duration,
    phase_ms,
    probing,
    switch_times,
    switchover,
)
from bench.process import exit_on_signals, progress, run_main
from bench.record import ROOT, dump_json, head_lines, machine_info, neighbours, run_record
from bench.stack import Stack, running_stack
from bench.sysbench import Background, in_background
from bench.writes import paced_write_command, parse_load, setup_writes

PATHS = ("direct", "haproxy", "baton-unbuffered", "baton-buffered")
LABELS = {
    "direct": "direct, client follows `ctl status`",
    "haproxy": "HAProxy, read_only health check",
    "baton-unbuffered": "Baton, buffer off",
    "baton-buffered": "Baton, buffer on",
}
PORT_RANGE = range(20000, 30000)  # the ports this machine's benchmarks may use
SERVICE_OFFSET = 50  # Baton, HAProxy and the health agents listen from base port + this
REPLICAS = 2
PROBE_WRITERS = 4
PROBE_RATE = 100  # inserts per second per writer: 40 per 100 ms bucket in all
BUCKET_S = 0.1
FULL_THROUGHPUT = 0.9  # a bucket at or above this share of the steady rate counts as full
RECOVERED_BUCKETS = 5  # buckets whose mean must be full again: "back to full throughput"
REFRESH_S = 0.1  # the direct client asks `ctl status` at most this often
SYSBENCH_GRACE_S = 5  # sysbench is killed this long after its --time
STRANDED_CHECK_S = 0.5  # Baton's sessions are looked at this long before the load ends
POLL_S = 0.05  # how often sysbench is checked for an early end while waiting
SHORT_RATE = 100  # --short skips the capacity run and uses this sysbench rate
# option: (default, default with --short); a rate of None means half the measured capacity
DEFAULTS = {"duration": (60, 6), "switches": (10, 1), "rate": (None, SHORT_RATE)}
SHORT_SWITCH_S = 3.0  # --short's one switchover, in a 6 s load
ROUTING_TIMEOUT_S = 10.0
METRICS = ("baton_buffer_held", "baton_buffer_evicted", "baton_errors")
# sysbench's exit as `timeout -s KILL` passes it on: a signal that ended sysbench (its own
# crash, or timeout's KILL) ends timeout too, so Popen sees -N.
EXITS = {0: "ok", -9: "killed at timeout", 124: "killed at timeout", -11: "SIGSEGV"}


# -- options ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.failover", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=int, help="seconds of load per path (default 60)")
    parser.add_argument("--switches", type=int, help="planned switchovers per path (default 10)")
    parser.add_argument("--threads", type=int, default=8, help="sysbench threads")
    parser.add_argument(
        "--rate", type=int, help="sysbench --rate; skips the capacity run (default: capacity/2)"
    )
    parser.add_argument("--out", type=Path, help="results dir (default bench/results)")
    parser.add_argument("--base-port", type=int, default=21601, help="port of db1")
    parser.add_argument(
        "--short",
        action="store_true",
        help=f"smoke run: 6 s per path, 1 switch, rate {SHORT_RATE}, results to a temp dir",
    )
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Apply the --short defaults, then refuse what would fail only minutes into the run."""
    for name, (full, short) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, short if args.short else full)
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="failover-short-"))
            if args.short
            else ROOT / "bench/results"
        )
    if args.switches < 1 or args.threads < 1 or (args.rate is not None and args.rate < 1):
        parser.error("--switches, --threads and --rate must be at least 1")
    if args.short and args.switches != 1:
        parser.error("--short runs one switchover per path")
    needed = 2 * SHORT_SWITCH_S if args.short else min_duration(args.switches)
    if args.duration < needed:
        parser.error(f"--duration must be at least {needed:g} s for {args.switches} switches")
    last = args.base_port + SERVICE_OFFSET + 20  # Baton, HAProxy and agents fit well within
    if args.base_port not in PORT_RANGE or last not in PORT_RANGE:
        parser.error(f"--base-port must leave room in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")
    return args


def path_switch_times(args: argparse.Namespace) -> list[float]:
    """When to switch, in seconds after the load starts; --short switches mid-load."""
    return [SHORT_SWITCH_S] if args.short else switch_times(args.duration, args.switches)


# -- where the direct client reconnects ------------------------------------------------------


class PrimaryTarget:
    """The current primary's port, as `baton ctl --json status` names it.

    This is what an application behind a failover tool that updates DNS or a VIP reaches after
    its next lookup. The answer is cached and looked up again only after a request through it
    failed, at most once per REFRESH_S for all writers together: an application does not ask
    before every statement, and a lookup that still names the old primary (the switch is not
    committed yet) is simply retried at the next error. Lookups are counted for the record.
    """

    def __init__(self, socket: str, ports: dict[str, int]) -> None:
        self.socket = socket
        self.ports = ports
        self.lookups = 0
        self._lock = threading.Lock()
        self._port = ports[current_primary(socket)]
        self._stale = False
        self._looked_up = time.monotonic()

    def port(self) -> int:
        with self._lock:
            if self._stale and time.monotonic() - self._looked_up >= REFRESH_S:
                self._look_up()
            return self._port

    def failed(self, port: int) -> None:
        with self._lock:
            if port == self._port:
                self._stale = True

    def _look_up(self) -> None:
        """Under the lock, so the writers that failed together wait for one answer."""
        self._looked_up = time.monotonic()
        self.lookups += 1
        try:
            self._port = self.ports[current_primary(self.socket)]
        except (RuntimeError, subprocess.TimeoutExpired):
            return  # the controller did not answer: keep the old port, ask again next error
        self._stale = False


# -- one path --------------------------------------------------------------------------------


def wait_routing(stack: Stack, primary: str) -> None:
    """Return once HAProxy's health checks route to `primary` alone; a load started earlier
    would measure HAProxy's start-up, not a switchover."""
    deadline = time.monotonic() + ROUTING_TIMEOUT_S
    while (up := stack.haproxy.up_servers()) != [primary]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"haproxy routes to {up}, not to {primary} alone")
        time.sleep(0.05)


class KeptLoad:
    """sysbench on one path until `end` (monotonic), started again whenever it ends early.

    Debian's sysbench 1.0.20 crashes on its first reconnect (akopytov/sysbench#527), which on
    the paths that drop clients is the first switchover: without a restart those paths would
    carry the Python client alone for most of the run while the others carry sysbench too, and
    their numbers would not compare. An application's supervisor would start it again; so does this,
    after the switch call has returned, to wherever `command_for` points then. Every run is
    recorded with its exit, so each crash is counted, not hidden.
    """

    def __init__(self, command_for: Callable[[int], list[str]], end: float) -> None:
        self.command_for = command_for  # seconds of load -> the sysbench command
        self.end = end
        self.runs: list[dict[str, Any]] = []
        self._current: tuple[AbstractContextManager[Background], Background, float] | None = None

    def __enter__(self) -> KeptLoad:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Kill a run still going (the block was left early) and reap it."""
        if self._current is not None:
            self._current[0].__exit__(None, None, None)

    def _start(self) -> None:
        # Rounded: the first run is started a moment after the path's clock, and must still
        # ask sysbench for the whole --duration.
        seconds = max(1, round(self.end - time.monotonic()))
        runner = in_background(self.command_for(seconds), seconds + SYSBENCH_GRACE_S)
        self._current = (runner, runner.__enter__(), time.time())

    def _record(self) -> None:
        assert self._current is not None
        runner, load, started = self._current
        returncode, output = load.wait()
        runner.__exit__(None, None, None)
        self._current = None
        self.runs.append(
            {
                "command": shlex.join(load.command),
                "started": started,
                "ended": time.time(),
                "returncode": returncode,
                "summary": parse_load(output),
                "output_tail": output[-3000:],
            }
        )

    def poll(self) -> None:
        """Record a run that has ended; start another if a whole second of load is left."""
        if self._current is not None and self._current[1].proc.poll() is not None:
            self._record()
            if self.end - time.monotonic() >= 1:
                self._start()

    def wait(self) -> None:
        """Wait for the last run to end (its --time ends with the path) and record it."""
        if self._current is not None:
            self._record()


def wait_until(deadline: float, load: KeptLoad) -> None:
    """Sleep until `deadline` (monotonic), keeping the load going meanwhile."""
    while (left := deadline - time.monotonic()) > 0:
        load.poll()
        time.sleep(min(POLL_S, left))


def run_path(
    args: argparse.Namespace, stack: Stack, path: str, rate: int, number: int
) -> dict[str, Any]:
    """The paced load, the client and the switchovers on one path, all at once."""
    if path == "baton-unbuffered":
        stack.restart_baton(path, {"enabled": False})
    elif path == "baton-buffered":
        stack.restart_baton(path)  # the sandbox's config: the buffer's defaults
    socket = stack.baton.socket
    ports = {s["name"]: s["port"] for s in stack.sandbox.status()["servers"]}
    source = current_primary(socket)
    target: Target
    if path == "direct":
        target = PrimaryTarget(socket, ports)
    elif path == "haproxy":
        wait_routing(stack, source)
        target = FixedTarget(stack.haproxy.port)
    else:
        target = FixedTarget(stack.baton.port)

    def command_for(seconds: int) -> list[str]:
        # Direct: the primary now, looked up as the client does (after a switch has returned).
        port = ports[current_primary(socket)] if path == "direct" else target.port()
        return paced_write_command(port, args.threads, seconds, rate, "all")

    table = "failover_" + path.replace("-", "_")
    create_probe_table(ports[source], table)
    switches: list[dict[str, Any]] = []
    with probing(target, PROBE_WRITERS, PROBE_RATE, table) as probe:
        started, t0 = time.time(), time.monotonic()
        with KeptLoad(command_for, t0 + args.duration) as load:
            progress(
                f"path {number}/{len(PATHS)} {path}: {rate} tps for {args.duration} s, "
                f"client {PROBE_WRITERS} x {PROBE_RATE}/s"
            )
            for i, at in enumerate(path_switch_times(args), 1):
                wait_until(t0 + at, load)
                s = switchover(socket, i, source)
                switches.append(s)
                report = s["report"]
                errors = sum(r.error is not None for log in probe.requests for r in log)
                if report is not None and report.get("outcome") == "succeeded":
                    source = report["new_primary"]
                    progress(
                        f"  {path} prs {i}: {s['from']} -> {s['to']} in "
                        f"{sum(phase_ms(report).values()):.0f} ms; client errors so far {errors}"
                    )
                else:
                    progress(
                        f"  {path} prs {i} FAILED (rc {s['returncode']}): {s['stderr'][-300:]}"
                    )
                    source = current_primary(socket)
            wait_until(t0 + args.duration - STRANDED_CHECK_S, load)
            stranded = stranded_sessions(socket) if path.startswith("baton") else None
            wait_until(t0 + args.duration, load)
            probe.finish()
            load.wait()
    requests = probe.all_requests()
    exits = ", ".join(describe_exit(r["returncode"]) for r in load.runs)
    progress(f"  {path} done: sysbench {exits}; client {len(requests)} requests")
    held = None
    if path.startswith("baton"):
        held = scrape_metrics(stack.baton.metrics_port, METRICS)
        stack.check_alive()
    return {
        "path": path,
        "label": LABELS[path],
        "load": {"started": started, "rate": rate, "runs": load.runs},
        "switchovers": switches,
        "stranded_sessions": stranded,
        "probe": {
            "writers": PROBE_WRITERS,
            "rate_per_writer": PROBE_RATE,
            "table": table,
            "reconnects": probe.reconnects,
            "lookups": target.lookups if isinstance(target, PrimaryTarget) else None,
            "rows_found": count_probe_rows(ports[current_primary(socket)], table),
            "requests": compact(requests, started),
        },
        "metrics": held,
    }


def stranded_sessions(socket: str) -> list[dict[str, Any]]:
    """Baton's sessions whose server connection is not on the current primary, from `baton
    ctl --json sessions`: after a switch, every session should have moved at its next
    command, so one still on the old primary near the end of the load is stuck there."""
    primary = current_primary(socket)
    return [
        {k: s[k] for k in ("id", "backend", "in_transaction", "in_flight")}
        for s in ctl_json(socket, "sessions")
        if s["backend"] and s["backend"].split()[0] != primary
    ]


def describe_exit(returncode: int) -> str:
    return EXITS.get(returncode, f"rc {returncode}")


# -- analysis --------------------------------------------------------------------------------


def requests_of(run: dict[str, Any]) -> list[Request]:
    return expand(run["probe"]["requests"], run["load"]["started"])


def windows_of(run: dict[str, Any]) -> list[tuple[float, float]]:
    """Each switch's window: WINDOW_S before its ctl call to WINDOW_S after ctl returned."""
    return [(s["called"] - WINDOW_S, s["returned"] + WINDOW_S) for s in run["switchovers"]]


def buckets(ends: list[float], start: float, seconds: float) -> list[int]:
    """Successful writes per BUCKET_S from `start`, by completion time."""
    counts = [0] * round(seconds / BUCKET_S)
    for end in ends:
        i = int((end - start) / BUCKET_S)
        if 0 <= i < len(counts):
            counts[i] += 1
    return counts


def longest_gap(ends: list[float], lo: float, hi: float) -> tuple[float, float] | None:
    """The longest interval between two consecutive successful completions (sorted `ends`)
    that overlaps [lo, hi], as (from, to)."""
    gaps = [(a, b) for a, b in zip(ends, ends[1:], strict=False) if b >= lo and a <= hi]
    return max(gaps, key=lambda g: g[1] - g[0], default=None)


def back_to_full(
    counts: list[int], start: float, steady: float, called: float, until: float
) -> float | None:
    """Seconds from `called` until throughput is full again; None if it is not before the
    load ends, 0 if no bucket from the call to `until` fell below FULL_THROUGHPUT of `steady`.

    Full again is the start of the first bucket after the first low one from which the next
    RECOVERED_BUCKETS buckets average FULL_THROUGHPUT of `steady` or more. Counted from the
    first low bucket, because a switch blocks writes only after its first phases: the first
    full bucket after the call is often before the dip. Averaged, because on shared CPUs a
    single bucket below the mark is common in steady state too; a dip that lasts is not."""
    threshold = FULL_THROUGHPUT * steady
    first = int((called - start) / BUCKET_S)
    last = min(len(counts), int((until - start) / BUCKET_S) + 1)
    low = next((i for i in range(max(0, first), last) if counts[i] < threshold), None)
    if low is None:
        return 0.0
    for i in range(low + 1, len(counts) - RECOVERED_BUCKETS + 1):
        if statistics.mean(counts[i : i + RECOVERED_BUCKETS]) >= threshold:
            return start + i * BUCKET_S - called
    return None


def latency_stats(requests: list[Request]) -> dict[str, float | None]:
    ms = [r.latency_ms for r in requests]
    return {
        "p50_ms": quantile(ms, 0.50),
        "p99_ms": quantile(ms, 0.99),
        "max_ms": max(ms, default=None),
    }


def sysbench_totals(runs: list[dict[str, Any]], duration: int) -> dict[str, Any]:
    """Over a path's sysbench runs: how many and how each ended, errors and reconnects, and the
    transactions per second it kept up. A run that died before its summary counts by its
    per-second reports (rates over one second each: summed, they are counts)."""
    transactions = errors = reconnects = 0.0
    exits: dict[str, int] = {}
    for run in runs:
        summary, intervals = run["summary"], run["summary"]["intervals"]
        if summary["errors"] is not None:
            transactions += summary["transactions"]
            errors += summary["errors"]
            reconnects += summary["reconnects"]
        else:
            transactions += sum(i["tps"] for i in intervals)
            errors += sum(i["errors"] for i in intervals)
            reconnects += sum(i["reconnects"] for i in intervals)
        exit = describe_exit(run["returncode"])
        exits[exit] = exits.get(exit, 0) + 1
    return {
        "runs": len(runs),
        "exits": exits,
        "errors": round(errors),
        "reconnects": round(reconnects),
        "tps": transactions / duration,
    }


def analyse(run: dict[str, Any], duration: int) -> dict[str, Any]:
    """The path's summary and per-switch rows, from its raw record."""
    start = run["load"]["started"]
    requests = requests_of(run)
    windows = windows_of(run)

    def near_switch(r: Request) -> bool:
        return any(r.start <= hi and r.end >= lo for lo, hi in windows)

    ok = [r for r in requests if r.error is None]
    ends = sorted(r.end for r in ok)
    counts = buckets(ends, start, duration)
    steady_buckets = [
        c
        for i, c in enumerate(counts)
        if not any(
            start + i * BUCKET_S < hi and start + (i + 1) * BUCKET_S > lo for lo, hi in windows
        )
    ]
    steady_rate = statistics.median(steady_buckets) if steady_buckets else 0.0
    steady_low = sum(c < FULL_THROUGHPUT * steady_rate for c in steady_buckets)
    rows = []
    for s, (lo, hi) in zip(run["switchovers"], windows, strict=True):
        report = s["report"]
        # From the call on: a gap before it is the machine's, not the switch's.
        gap = longest_gap(ends, s["called"], hi)
        near = [r for r in requests if r.start <= hi and r.end >= lo]
        recovered = back_to_full(counts, start, steady_rate, s["called"], hi)
        rows.append(
            {
                "index": s["index"],
                "from": s["from"],
                "to": s["to"],
                "outcome": "no report" if report is None else report["outcome"],
                "prs_ms": sum(phase_ms(report).values()) if report else None,
                "hold_phases_ms": hold_ms(report) if report else None,
                "ctl_ms": (s["returned"] - s["called"]) * 1000,
                "client_errors": sum(r.error is not None for r in near),
                "write_pause_ms": None if gap is None else (gap[1] - gap[0]) * 1000,
                "pause_from_call_ms": None if gap is None else (gap[0] - s["called"]) * 1000,
                "back_to_full_ms": None if recovered is None else recovered * 1000,
            }
        )
    pauses = [r["write_pause_ms"] for r in rows if r["write_pause_ms"] is not None]
    fulls = [r["back_to_full_ms"] for r in rows if r["back_to_full_ms"] is not None]
    steady_gap = max(
        (
            b - a
            for a, b in zip(ends, ends[1:], strict=False)
            if not any(b >= lo and a <= hi for lo, hi in windows)
        ),
        default=None,
    )
    metrics = run["metrics"] or {}
    errors = {
        f"{m['labels']['code']}/{m['labels']['origin']}": m["value"]
        for m in metrics.get("baton_errors", [])
        if m["name"].endswith("_total")
    }
    return {
        "summary": {
            "path": run["path"],
            "label": run["label"],
            "switchovers": len(rows),
            "succeeded": sum(r["outcome"] == "succeeded" for r in rows),
            "client_requests": len(requests),
            "client_errors": sum(r.error is not None for r in requests),
            "client_error_kinds": error_kinds(requests),
            "client_reconnects": run["probe"]["reconnects"],
            "client_rows_acknowledged": sum(r.error is None for r in requests),
            "client_rows_found": run["probe"]["rows_found"],
            "primary_lookups": run["probe"]["lookups"],
            "held": sample_sum(metrics, "baton_buffer_held", "_total"),
            "evicted": sample_sum(metrics, "baton_buffer_evicted", "_total"),
            "baton_errors": errors,
            "stranded_sessions": run["stranded_sessions"],
            "steady": latency_stats([r for r in ok if not near_switch(r)]),
            "switching": latency_stats([r for r in ok if near_switch(r)]),
            "steady_rate_per_bucket": steady_rate,
            "steady_longest_gap_ms": None if steady_gap is None else steady_gap * 1000,
            "steady_buckets": len(steady_buckets),
            "steady_buckets_low": steady_low,
            "write_pause_p50_ms": quantile(pauses, 0.5),
            "write_pause_max_ms": max(pauses, default=None),
            "back_to_full_p50_ms": quantile(fulls, 0.5),
            "back_to_full_max_ms": max(fulls, default=None),
            "not_back_to_full": sum(r["back_to_full_ms"] is None for r in rows),
            "sysbench_rate": run["load"]["rate"],
            **{
                f"sysbench_{k}": v
                for k, v in sysbench_totals(run["load"]["runs"], duration).items()
            },
        },
        "per_switch": rows,
        "buckets": counts,
    }


def error_kinds(requests: list[Request]) -> dict[str, int]:
    """Failed requests by MySQL error code (the text before the first colon)."""
    kinds: dict[str, int] = {}
    for r in requests:
        if r.error is not None:
            code = r.error.split(":", 1)[0]
            kinds[code] = kinds.get(code, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


# -- the record ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _three(stats: dict[str, float | None]) -> str:
    return " / ".join(_ms(stats[k]) for k in ("p50_ms", "p99_ms", "max_ms"))


def sysbench_cell(s: dict[str, Any]) -> str:
    exits = ", ".join(f"{n} {exit}" for exit, n in s["sysbench_exits"].items())
    runs = f"{s['sysbench_runs']} run{'s' if s['sysbench_runs'] > 1 else ''}"
    return f"{runs}: {exits}; {s['sysbench_errors']} err, {s['sysbench_reconnects']} reconn"


def table(summaries: list[dict[str, Any]]) -> str:
    """One row per path: what clients saw and how long writes stopped."""
    lines = [
        "| path | client errors | client reconnects | sysbench | held by Baton "
        "| steady p50 / p99 / max ms | switch windows p50 / p99 / max ms "
        "| write pause p50 / max ms | back to full throughput p50 / max ms |",
        "|---|---:|---:|---|---:|---|---|---|---|",
    ]
    for s in summaries:
        full = f"{_ms(s['back_to_full_p50_ms'])} / {_ms(s['back_to_full_max_ms'])}"
        if s["not_back_to_full"]:
            full += f" ({s['not_back_to_full']} not within the window)"
        lines.append(
            f"| {s['label']} | {s['client_errors']} of {s['client_requests']} "
            f"| {s['client_reconnects']} | {sysbench_cell(s)} | {s['held']:g} "
            f"| {_three(s['steady'])} | {_three(s['switching'])} "
            f"| {_ms(s['write_pause_p50_ms'])} / {_ms(s['write_pause_max_ms'])} | {full} |"
        )
    return "\n".join(lines)


def switch_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| # | from -> to | outcome | prs ms | hold phases ms | client errors (window) "
        "| write pause ms | pause starts after call ms | back to full ms |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['index']} | {r['from']} -> {r['to']} | {r['outcome']} | {_ms(r['prs_ms'])} "
        f"| {_ms(r['hold_phases_ms'])} | {r['client_errors']} | {_ms(r['write_pause_ms'])} "
        f"| {_ms(r['pause_from_call_ms'])} | {_ms(r['back_to_full_ms'])} |"
        for r in rows
    ]
    return "\n".join(lines)


def path_lines(run: dict[str, Any]) -> list[str]:
    s = run["summary"]
    kinds = ", ".join(f"{code}: {n}" for code, n in s["client_error_kinds"].items()) or "none"
    lines = [
        f"### {s['label']}",
        "",
        f"![{s['label']}](failover-{s['path']}.png)",
        "",
        f"- Switchovers: {s['succeeded']} of {s['switchovers']} succeeded",
        f"- Python client: {s['client_requests']} inserts, {s['client_errors']} errors "
        f"(by code: {kinds}), {s['client_reconnects']} reconnects; rows found "
        f"{s['client_rows_found']}, acknowledged {s['client_rows_acknowledged']}",
        f"- Steady state: {s['steady_rate_per_bucket']:g} successful inserts per 100 ms "
        f"(median), {s['steady_buckets_low']} of {s['steady_buckets']} buckets below "
        f"{FULL_THROUGHPUT:.0%} of that; longest gap between two inserts "
        f"{_ms(s['steady_longest_gap_ms'])} ms",
        f"- sysbench: {sysbench_cell(s)}; {s['sysbench_tps']:.0f} tps over the path "
        f"(asked: {s['sysbench_rate']})",
    ]
    if s["primary_lookups"] is not None:
        lines.append(f"- `baton ctl --json status` lookups by the client: {s['primary_lookups']}")
    if run["path"].startswith("baton"):
        errors = ", ".join(f"{k}: {v:g}" for k, v in s["baton_errors"].items()) or "none"
        lines.append(
            f"- Baton: `baton_buffer_held_total` {s['held']:g}, `baton_buffer_evicted_total` "
            f"{s['evicted']:g}; `baton_errors_total` (code/origin): {errors}"
        )
        stranded = s["stranded_sessions"]
        lines.append(
            f"- Sessions still connected to a server that is no longer primary "
            f"{STRANDED_CHECK_S:g} s before the load ended (`baton ctl --json sessions`): "
            f"{len(stranded)}" + "".join(f"; session {x['id']} on {x['backend']}" for x in stranded)
        )
    lines += [
        "",
        "Load (its first run; a run that ended early was started again with the time left, "
        + ("against the primary of that moment):" if run["path"] == "direct" else "the same way):"),
        "",
        f"    {run['load']['runs'][0]['command']}",
        "",
        switch_table(run["per_switch"]),
        "",
    ]
    return lines


def report(record: dict[str, Any]) -> str:
    """failover.md: enough to judge and to repeat the numbers without the JSON."""
    s = record["settings"]
    runs = record["paths"]
    times = ", ".join(f"{t:.1f}" for t in record["switch_times"])
    title = (
        "Planned switchovers under write load: direct, HAProxy, Baton without and with its buffer"
    )
    lines = [
        *head_lines(title, record),
        "## Summary",
        "",
        table([r["summary"] for r in runs]),
        "",
        "What the columns are:",
        "",
        "- client errors, reconnects: the Python client's failed inserts of all it made, and "
        "its reconnects (it reconnects after every failed request).",
        "- sysbench: its runs on the path and how they ended (under `timeout -s KILL`): a run "
        "that ended early (crashed) was started again, with the time left, once the switch "
        "call had returned, so every path carries the same load; then its ignored errors and "
        "reconnects over all runs (for a crashed run, summed from its per-second reports).",
        "- held by Baton: `baton_buffer_held_total` at the end of the path (its own Baton); "
        "no Baton is on the direct and HAProxy paths, so 0 there.",
        f"- steady / switch windows: latency of the client's successful inserts outside and "
        f"inside the switch windows ({WINDOW_S:g} s before each `ctl prs` call to {WINDOW_S:g} "
        "s after it returned). A failed insert counts as an error, not as a latency.",
        "- write pause: the longest time between two successful inserts' completions (any "
        f"writer) that overlaps the time from a `ctl prs` call to {WINDOW_S:g} s after it "
        "returned; p50 over the switchovers, and the max.",
        f"- back to full throughput: from the `ctl prs` call (which includes starting the "
        f"`baton ctl` process) until the client's successful inserts per {BUCKET_S * 1000:.0f} "
        f"ms average {FULL_THROUGHPUT:.0%} or more of the steady rate (the median bucket "
        f"outside the windows) over the next {RECOVERED_BUCKETS} buckets, searched from the "
        "first bucket after the call that fell below that mark; 0 if none did up to "
        f"{WINDOW_S:g} s after the call returned. Steady state has single low buckets too: "
        "each path's page says how many.",
        "",
        "## How it ran",
        "",
        f"One sandbox: db1 primary, db2 and db3 replicas on ports {s['base_port']}-"
        f"{s['base_port'] + REPLICAS}. The paths ran one after another, each for "
        f"{s['duration']} s with {s['switches']} planned switchover(s) alternating db1 <-> db2 "
        f"at {times} s after its load started. sysbench, the Python client, the servers, "
        "Baton, HAProxy and the health agents share the same CPUs.",
        "",
        "- direct: the Baton that switches (`baton serve` with the sandbox's config) carries no "
        "traffic. sysbench connects to the primary at the start and cannot follow it. The "
        "client reconnects after each failed insert to the primary named by `baton ctl --json "
        f"status`, looked up only after an error, at most every {REFRESH_S * 1000:.0f} ms.",
        "- haproxy: HAProxy 2.6 in TCP mode, `balance first` over db1, db2, db3, `option "
        "httpchk`, `inter 100 fastinter 100 downinter 100 fall 1 rise 1 on-marked-down "
        "shutdown-sessions`; each check is answered by a small HTTP server thread in the "
        "benchmark per MariaDB server: 200 if `@@read_only=0` on its persistent admin "
        "connection, else 503. The same Baton switches, without traffic.",
        "- baton-unbuffered: a new `baton serve` with `[buffer] enabled = false`, the clients "
        "through it; it switches too.",
        "- baton-buffered: a new `baton serve` with the sandbox's config (buffer on, defaults).",
        "",
        "Not covered: an emergency switch (`kill -9` of the primary, then `ctl ers`); this "
        "benchmark has no mode for it.",
        "",
        "Prepared once, directly against the primary:",
        "",
        f"    {record['prepare_command']}",
        "",
        "Capacity (unthrottled, through Baton, no switchover):",
        "",
        f"    {record['capacity']['command'] if record['capacity'] else '(skipped: --rate)'}",
        "",
        "Each switchover (the target alternates):",
        "",
        f"    {runs[0]['switchovers'][0]['command']}",
        "",
        f"Python client: {PROBE_WRITERS} threads, each its own PyMySQL connection (ssl_disabled, "
        f"autocommit), one-row INSERTs paced at {PROBE_RATE}/s per thread into a table of its "
        "path; every request's start, end and error is in failover.json (`paths[].probe."
        "requests`: writer, start in ms after `load.started` (wall-clock seconds), latency in "
        "ms, error).",
        "",
        "## Per path",
        "",
    ]
    for run in runs:
        lines += path_lines(run)
    return "\n".join(lines) + "\n"


def plot(run: dict[str, Any], duration: int, path: Path) -> None:
    """The path's timeline: every insert's latency, successful inserts per 100 ms, and the
    switchovers (from the ctl call to its return), on one time axis from the load's start."""
    start = run["load"]["started"]
    s = run["summary"]
    requests = requests_of(run)
    fig = Figure(figsize=(11, 6))
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    for ok, style in ((True, {"s": 3, "c": "tab:blue"}), (False, {"s": 12, "c": "tab:red"})):
        chosen = [r for r in requests if (r.error is None) == ok]
        top.scatter(
            [r.start - start for r in chosen],
            [max(r.latency_ms, 0.05) for r in chosen],
            marker="." if ok else "x",
            label=f"{'successful' if ok else 'failed'} ({len(chosen)})",
            **style,
        )
    top.set_yscale("log")
    top.set_ylabel("insert latency (ms)")
    top.legend(loc="upper right", fontsize=8)
    counts = run["buckets"]
    bottom.step(
        [i * BUCKET_S for i in range(len(counts))], counts, where="post", lw=0.8, c="tab:green"
    )
    bottom.axhline(
        FULL_THROUGHPUT * s["steady_rate_per_bucket"], ls=":", c="gray", lw=0.8, label="90% steady"
    )
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("successful / 100 ms")
    bottom.set_xlabel("seconds since the load started")
    bottom.legend(loc="lower right", fontsize=8)
    for sw in run["switchovers"]:
        for ax in (top, bottom):
            ax.axvspan(sw["called"] - start, sw["returned"] - start, color="orange", alpha=0.3)
            ax.axvline(sw["called"] - start, c="darkorange", lw=0.8)
    top.set_title(
        f"{s['label']}: {s['client_errors']} client errors, write pause max "
        f"{_ms(s['write_pause_max_ms'])} ms (orange: switchovers)",
        fontsize=10,
    )
    bottom.set_xlim(0, duration)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.failover", *given])
    machine = machine_info()
    neighbours_start = neighbours()
    runs = []
    with (
        exit_on_signals(),
        running_stack(
            args.base_port, REPLICAS, args.base_port + SERVICE_OFFSET, health_checks=True
        ) as stack,
    ):
        # Capacity through Baton, the path with the most work per write on these CPUs.
        setup = setup_writes(stack.primary_port, stack.baton.port, args.threads, args.rate)
        for number, path in enumerate(PATHS, 1):
            runs.append(run_path(args, stack, path, setup["rate"], number))
    record = run_record(
        args,
        command,
        machine,
        neighbours_start,
        **setup,
        switch_times=path_switch_times(args),
        paths=runs,
    )
    for run in runs:
        run.update(analyse(run, args.duration))
    args.out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        plot(run, args.duration, args.out / f"failover-{run['path']}.png")
    (args.out / "failover.json").write_text(dump_json(record))
    (args.out / "failover.md").write_text(report(record))
    print(table([run["summary"] for run in runs]))
    progress(f"wrote failover.md, failover.json and {len(runs)} PNGs to {args.out}")
    failed = any(r["summary"]["succeeded"] < r["summary"]["switchovers"] for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
