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
  switchover, is what gets measured (on this machine, before Baton: the catch-up wait took 1.4 s
  under an unthrottled load against a 48 ms median under a moderate one). Half leaves headroom
  for that catch-up and still has writes in flight at every moment of a switch.
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
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.figures import quantile, sample_sum, scrape_metrics
from bench.probe import (
    FIRST_SWITCH_S,
    HOLD_PHASES,
    SWITCH_BETWEEN,
    WINDOW_S,
    FixedTarget,
    Request,
    compact,
    count_probe_rows,
    create_probe_table,
    current_primary,
    expand,
    hold_ms,
    in_hold,
    in_window,
    min_duration,
    phase_ms,
    probing,
    switch_times,
    switchover,
)
from bench.process import exit_on_signals, progress, run_main
from bench.record import ROOT, dump_json, head_lines, machine_info, neighbours, run_record
from bench.stack import BENCH_PORT_HINT, Stack, running_stack
from bench.sysbench import DATABASE, SYSBENCH_GRACE, in_background
from bench.writes import paced_write_command, parse_load, setup_writes

PORT_RANGE = range(20000, 30000)  # the ports this machine's benchmarks may use
REPLICAS = 2  # db1 and db2 take turns as primary, db3 follows every switch
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
        "--service-port", type=int, default=BENCH_PORT_HINT, help="proxies' ports from here"
    )
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
    needed = min_duration(args.switches)
    if args.duration < needed:
        parser.error(f"--duration must be at least {needed:g} s for {args.switches} switches")
    if args.base_port not in PORT_RANGE or args.base_port + REPLICAS not in PORT_RANGE:
        parser.error(f"servers must fit in ports {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")
    return args


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
    """Wall time from the start of 'holding' (the revocation) to the end of the last phase
    inside the hold: the sum plus whatever ran between the phases untimed."""
    held = [p for p in report["phases"] if in_hold(p)]
    if not held or held[0]["step"] != HOLD_PHASES[0]:
        return None
    end = held[-1]["started_at"] + held[-1]["duration_ms"] / 1000
    return (end - held[0]["started_at"]) * 1000


# -- metrics ---------------------------------------------------------------------------------


def bucket_bound(metrics: dict[str, list[dict[str, Any]]], family: str, q: float) -> str:
    """The smallest histogram bucket bound holding at least `q` of the observations."""
    buckets = [s for s in metrics.get(family, []) if s["name"] == f"{family}_bucket"]
    total = sample_sum(metrics, family, "_count")
    if not total:
        return "-"
    for b in sorted(buckets, key=lambda s: float(s["labels"]["le"])):
        if b["value"] >= q * total:
            return f"<= {b['labels']['le']} s"
    return "-"


# -- the run ---------------------------------------------------------------------------------


def analyse(record: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-switchover rows and the summary, from the raw record."""
    load_start = record["load"]["started"]
    requests = expand(record["probe"]["requests"], load_start)
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
        "hold_p50_ms": quantile(holds, 0.50),
        "hold_p99_ms": quantile(holds, 0.99),
        "hold_max_ms": max(holds, default=None),
        "hold_span_p50_ms": quantile(spans, 0.50),
        "hold_span_p99_ms": quantile(spans, 0.99),
        "hold_span_max_ms": max(spans, default=None),
        "client_worst_per_switch_p50_ms": quantile(worsts, 0.50),
        "client_worst_per_switch_p99_ms": quantile(worsts, 0.99),
        "client_worst_ms": max((r.latency_ms for r in requests), default=None),
        "client_worst_outside_windows_ms": max((r.latency_ms for r in outside), default=None),
        "client_median_ms": quantile([r.latency_ms for r in requests], 0.50),
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
        "buffer_held": sample_sum(record["metrics"], "baton_buffer_held", "_total"),
        "buffer_evicted": sample_sum(record["metrics"], "baton_buffer_evicted", "_total"),
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


def run_load(args: argparse.Namespace, stack: Stack, rate: int) -> dict[str, Any]:
    """The throttled load, the probe and the switchovers, all at once."""
    command = paced_write_command(stack.baton.port, args.threads, args.duration, rate)
    source = current_primary(stack.baton.socket)
    switches: list[dict[str, Any]] = []
    target = FixedTarget(stack.baton.port)
    with probing(target, PROBE_WRITERS, PROBE_RATE, PROBE_TABLE) as probe:
        with in_background(command, args.duration + SYSBENCH_GRACE) as load:
            started, t0 = time.time(), time.monotonic()
            progress(f"load: {rate} tps for {args.duration} s, probe {PROBE_WRITERS} writers")
            for i, at in enumerate(switch_times(args.duration, args.switches), 1):
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                s = switchover(stack.baton.socket, i, source)
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
                    source = current_primary(stack.baton.socket)
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
            "requests": compact(requests, started),
        },
    }


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
        f"- Hold time (sum of the phases inside the hold, store writes included): "
        f"p50 {_ms(s['hold_p50_ms'])} ms, p99 {_ms(s['hold_p99_ms'])} ms, "
        f"max {_ms(s['hold_max_ms'])} ms; {goal('goal')}",
        f"- Hold span (the same on the wall clock, with what ran untimed between phases): "
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
    held = sample_sum(m, hold, "_count")
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
        f"- `baton_buffer_held_total` {sample_sum(m, 'baton_buffer_held', '_total'):g}, "
        f"`baton_buffer_flushed_total` {sample_sum(m, 'baton_buffer_flushed', '_total'):g}, "
        f"`baton_buffer_evicted_total` {sum(evicted.values()):g}"
        + (f" ({', '.join(f'{k} {v:g}' for k, v in evicted.items())})" if evicted else ""),
        f"- `baton_buffer_starts_total` {sample_sum(m, 'baton_buffer_starts', '_total'):g}; "
        f"`baton_errors_total`: {', '.join(errors) or 'none'}",
        f"- `{hold}`: {held:g} commands, "
        f"mean {1000 * sample_sum(m, hold, '_sum') / max(1, held):.1f} ms, "
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
        total = sample_sum(one, phase, "_sum")
        lines.append(
            f"| {label['call']} | {c['value']:g} | {1000 * total / c['value']:.1f} "
            f"| {bucket_bound(one, phase, 0.99)} |"
        )
    return lines


def report(record: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """hold.md: enough to judge and to repeat the numbers without the JSON."""
    s = record["settings"]
    first = next((x["report"] for x in record["switchovers"] if x["report"]), None)
    phases = " -> ".join(p["step"] for p in first["phases"]) if first else "(no report)"
    lines = [
        *head_lines("Hold time across planned switchovers under write load", record),
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
        "- hold ms: the sum of the durations of the calls of 'holding', 'revoked' and "
        "'established' and of the store writes after the one that starts the hold ('journal' "
        "phases; a planned switch has one there, its last, which publishes the new primary).",
        "- hold span ms: the same interval on the wall clock (start of the revocation to the "
        "end of the last write), so it also counts what ran between the phases untimed; the "
        "proxies stop holding after the event's hop to their loop, which no phase times.",
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
        "the defaults); HAProxy is started with the stack (bench/stack.py) but carries no traffic. "
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser)
    command = shlex.join(["python", "-m", "bench.hold", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info()
    neighbours_start = neighbours()
    with (
        exit_on_signals(),
        running_stack(args.base_port, REPLICAS, args.service_port) as stack,
    ):
        port = stack.baton.port
        setup = setup_writes(stack.primary_port, port, args.threads, args.rate)
        create_probe_table(port, PROBE_TABLE)
        run = run_load(args, stack, setup["rate"])
        run["probe"]["rows_found"] = count_probe_rows(port, PROBE_TABLE)
        metrics = scrape_metrics(stack.baton.metrics_port, METRICS)
        stack.check_alive()
    record = run_record(args, command, machine, neighbours_start, **setup, **run, metrics=metrics)
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
    run_main(main)
