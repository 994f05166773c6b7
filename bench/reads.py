"""`python -m bench.reads`: the failover benchmark's read path. Planned switchovers under a
mixed load in split mode: do the reads notice them?

One private sandbox (db1 primary, db2 and db3 replicas) and one Baton with `routing.mode =
"split"`. Paced writers insert rows (bench.probe's client) and paced readers read one row,
each request logged with its start, end and outcome, while `baton ctl --json prs` moves the
primary between db1 and db2 at fixed times. Writes pause during each switch as they do without
read routing (the hold); reads run on the replicas and are never held.

Per run: errors, read latency p50/p99/max in steady state (outside +-WINDOW_S of every switch)
and around the switches (inside), write latency the same way and each switch's write pause,
and the reads Baton served while it held the writes (`baton_reads_during_hold`). The table goes
to stdout and, with the command, the machine and the raw data, to OUT/reads.md, OUT/reads.json
and OUT/reads.png (read and write latency over time, switchovers in orange). The exit status is
1 if any request failed, a switch did not succeed, or the read p99 around the switches is more
than twice its steady value (the issue's bar).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pymysql
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.figures import quantile
from bench.probe import (
    WINDOW_S,
    FixedTarget,
    Probe,
    Request,
    compact,
    connect_app,
    create_probe_table,
    current_primary,
    in_window,
    min_duration,
    probing,
    switch_times,
    switchover,
)
from bench.process import exit_on_signals, progress, run_main
from bench.record import ROOT, dump_json, head_lines, machine_info, neighbours, run_record
from harness.baton import Baton, start_baton
from reparent.sandbox import Sandbox

TABLE = "bench_reads"
REPLICAS = 2


class Readers(Probe):
    """Paced readers through Baton, each request logged: bench.probe's client, reading the
    row the run inserted first instead of inserting."""

    def request(self, cur: pymysql.cursors.Cursor, writer: int, seq: int) -> None:
        cur.execute(f"SELECT seq FROM {self.table} WHERE id = 1")
        cur.fetchall()


def stats(requests: list[Request]) -> dict[str, Any]:
    ms = [r.latency_ms for r in requests if r.error is None]
    return {
        "requests": len(requests),
        "errors": sum(r.error is not None for r in requests),
        "p50_ms": quantile(ms, 0.5),
        "p99_ms": quantile(ms, 0.99),
        "max_ms": max(ms, default=None),
    }


def split(requests: list[Request], switches: list[dict[str, Any]]) -> tuple[list, list]:
    """(steady, around switches): inside +-WINDOW_S of a ctl call, or outside all of them."""
    around = set()
    for sw in switches:
        around.update(
            id(r) for r in in_window(requests, sw["called"] - WINDOW_S, sw["called"] + WINDOW_S)
        )
    return (
        [r for r in requests if id(r) not in around],
        [r for r in requests if id(r) in around],
    )


def analyse(
    reads: list[Request], writes: list[Request], switches: list[dict[str, Any]]
) -> dict[str, Any]:
    read_steady, read_around = split(reads, switches)
    write_steady, write_around = split(writes, switches)
    pauses = []
    for sw in switches:
        window = in_window(writes, sw["called"], sw["returned"] + WINDOW_S)
        pauses.append(max((r.latency_ms for r in window), default=None))
    summary = {
        "reads_steady": stats(read_steady),
        "reads_switching": stats(read_around),
        "writes_steady": stats(write_steady),
        "writes_switching": stats(write_around),
        "write_pause_ms": pauses,
        "switches_succeeded": sum(
            1 for sw in switches if sw["report"] and sw["report"].get("outcome") == "succeeded"
        ),
    }
    steady, around = summary["reads_steady"]["p99_ms"], summary["reads_switching"]["p99_ms"]
    summary["read_p99_ratio"] = None if not steady or around is None else around / steady
    return summary


def plot(
    reads: list[Request],
    writes: list[Request],
    switches: list[dict[str, Any]],
    start: float,
    duration: int,
    path: Path,
    title: str,
) -> None:
    fig = Figure(figsize=(11, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for requests, colour, label in ((writes, "tab:red", "writes"), (reads, "tab:blue", "reads")):
        ok = [r for r in requests if r.error is None]
        ax.scatter(
            [r.start - start for r in ok],
            [max(r.latency_ms, 0.05) for r in ok],
            s=3,
            c=colour,
            marker=".",
            label=f"{label} ({len(ok)})",
        )
    for sw in switches:
        ax.axvspan(sw["called"] - start, sw["returned"] - start, color="orange", alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_xlabel("seconds since the load started")
    ax.set_xlim(0, duration)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(s: dict[str, Any]) -> str:
    lines = [
        "| requests | count | errors | steady p50 / p99 / max ms "
        "| switch windows p50 / p99 / max ms |",
        "|---|---:|---:|---|---|",
    ]
    for kind in ("reads", "writes"):
        st, sw = s[f"{kind}_steady"], s[f"{kind}_switching"]
        lines.append(
            f"| {kind} | {st['requests'] + sw['requests']} | {st['errors'] + sw['errors']} "
            f"| {_ms(st['p50_ms'])} / {_ms(st['p99_ms'])} / {_ms(st['max_ms'])} "
            f"| {_ms(sw['p50_ms'])} / {_ms(sw['p99_ms'])} / {_ms(sw['max_ms'])} |"
        )
    return "\n".join(lines)


def report(record: dict[str, Any]) -> str:
    s = record["summary"]
    pauses = ", ".join(_ms(p) for p in s["write_pause_ms"])
    ratio = s["read_p99_ratio"]
    return "\n".join(
        [
            *head_lines("Reads across planned switchovers, split mode (bench.reads)", record),
            table(s),
            "",
            f"- Read p99 around the switches / steady: {'-' if ratio is None else f'{ratio:.2f}'}x",
            "- Reads served on replicas while the shard held its writes: "
            f"{record['reads_during_hold']:g}",
            f"- Switchovers succeeded: {s['switches_succeeded']} of {len(record['switchovers'])}",
            "- Write pause per switch (ms, the slowest write from the ctl call to "
            f"{WINDOW_S:g} s after it returned): {pauses}",
            "",
            "![read and write latency](reads.png)",
            "",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.reads", description=__doc__)
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--switches", type=int, default=10, help="planned switchovers")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--read-rate", type=int, default=200, help="reads per second per reader")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--write-rate", type=int, default=100, help="writes per second per writer")
    parser.add_argument("--base-port", type=int, default=21701, help="port of db1")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration < min_duration(args.switches):
        parser.error(
            f"--duration: at least {min_duration(args.switches):g} s for {args.switches} switches"
        )
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.reads", *given])
    machine = machine_info()
    neighbours_start = neighbours()
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-reads-"))
    sandbox = Sandbox(workdir / "sandbox", base_port=args.base_port, replicas=REPLICAS)
    baton: Baton | None = None
    switches: list[dict[str, Any]] = []
    with exit_on_signals():
        try:
            progress(f"sandbox up from port {args.base_port}")
            sandbox.up()
            baton = start_baton(
                sandbox.config_path,
                workdir / "baton",
                args.base_port + 100,
                extra={"routing": {"mode": "split", "monitor_interval": 0.2}},
            )
            create_probe_table(baton.port, TABLE)
            with connect_app(baton.port) as conn, conn.cursor() as cur:
                cur.execute(f"INSERT INTO {TABLE} (writer, seq) VALUES (0, 0)")
            time.sleep(1.0)  # the row reaches the replicas
            times = switch_times(args.duration, args.switches)
            progress(
                f"{args.duration} s of load, switchovers at "
                f"{', '.join(f'{t:.0f}' for t in times)} s"
            )
            start = time.time()
            with (
                probing(FixedTarget(baton.port), args.writers, args.write_rate, TABLE) as writers,
                probing(
                    FixedTarget(baton.port), args.readers, args.read_rate, TABLE, Readers
                ) as readers,
            ):
                for i, at in enumerate(times):
                    time.sleep(max(0.0, start + at - time.time()))
                    switches.append(switchover(baton.socket, i + 1, current_primary(baton.socket)))
                time.sleep(max(0.0, start + args.duration - time.time()))
            page = baton.scrape()
            during = sum(
                float(line.split()[-1])
                for line in page.splitlines()
                if line.startswith("baton_reads_during_hold_total ")
            )
        finally:
            if baton is not None:
                baton.stop()
            sandbox.down()
    reads, writes = readers.all_requests(), writers.all_requests()
    summary = analyse(reads, writes, switches)
    record = run_record(
        args,
        command,
        machine,
        neighbours_start,
        summary=summary,
        reads_during_hold=during,
        switchovers=switches,
        reads=compact(reads, start),
        writes=compact(writes, start),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    ratio = summary["read_p99_ratio"]
    plot(
        reads,
        writes,
        switches,
        start,
        args.duration,
        args.out / "reads.png",
        f"split mode, {args.switches} switchovers: read p99 around them "
        f"{'-' if ratio is None else f'{ratio:.2f}'}x steady; {during:g} reads during holds",
    )
    (args.out / "reads.json").write_text(dump_json(record))
    (args.out / "reads.md").write_text(report(record))
    print(table(summary))
    print(f"read p99 ratio: {ratio}; reads during holds: {during:g}")
    errors = summary["reads_steady"]["errors"] + summary["reads_switching"]["errors"]
    errors += summary["writes_steady"]["errors"] + summary["writes_switching"]["errors"]
    ok = (
        errors == 0
        and summary["switches_succeeded"] == len(switches)
        and ratio is not None
        and ratio <= 2.0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
