"""`python -m bench.holdstart`: how long after `ctl prs` the proxy starts holding, busy vs idle.

Issue 13 asked that client load must not delay a switch: with the controller in the proxy's own
process, writes stopped a median 217 ms after the `ctl prs` call through a busy Baton against
116 ms through an idle one. Here each Baton (one process, `proxy.workers = 0`, and a supervisor
with one worker per core) runs PRS back and forth between two servers, alternately idle and
under sysbench oltp_point_select (16 threads, reads only, so the candidate never lags and only
the proxy's load differs). The figure is the time from the moment the request is written to
the control socket to the moment the proxy (the first worker to) starts holding: from then on
its next command is held. That moment is read from the proxy's own log line
(`holding commands for term N`), stamped to the millisecond by the same clock.

Results go to stdout and OUT/holdstart.md (with the command and every switch).
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
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.process import exit_on_signals, progress
from bench.record import ROOT, load_average, machine_info
from bench.sysbench import sysbench_command, sysbench_prepare
from harness.baton import Baton, start_baton
from proxy.ctl import request
from reparent.sandbox import Sandbox

CORES = len(os.sched_getaffinity(0))
_HOLDING = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (?:w\d+ )?proxy\.holder: shard \S+: "
    r"holding commands for term (\d+)",
    re.M,
)


def holding_at(log: Path, term: int) -> float | None:
    """When the proxy (its first worker to) started holding for `term`, in epoch seconds."""
    stamps = [
        datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for m in _HOLDING.finditer(log.read_text())
        if int(m.group(2)) == term
    ]
    return min(stamps) if stamps else None


def one_switch(baton: Baton, servers: list[str]) -> dict[str, Any]:
    status = request(baton.socket, "status")
    shard = status["shards"][0]
    to = next(s for s in servers if s != shard["primary"])
    sent = time.time()
    report = request(baton.socket, "prs", to=to)
    deadline = time.monotonic() + 5
    held = holding_at(baton.log, shard["term"] + 1)
    while held is None and time.monotonic() < deadline:  # the log is written a moment later
        time.sleep(0.05)
        held = holding_at(baton.log, shard["term"] + 1)
    phases = {p["call"]: p["duration_ms"] for p in report["phases"] if p["call"] != "journal"}
    # The writes before the hold: up to HOLDING, the one that tells the proxies.
    early = ("started", "candidate_chosen", "prepared", "holding")
    before = [
        p["duration_ms"] for p in report["phases"] if p["call"] == "journal" and p["step"] in early
    ]
    to_holding = None if held is None else (held - sent) * 1000
    return {
        "term": shard["term"] + 1,
        "outcome": report["outcome"],
        "to_holding_ms": to_holding,
        # What is left once the servers' calls and the store's writes are taken out: the
        # controller's own time and the event's way to the proxy.
        "rest_ms": None
        if to_holding is None
        else to_holding
        - sum(before)
        - phases.get("preflight", 0)
        - phases.get("choose", 0)
        - phases.get("prepare", 0),
        "preflight_ms": phases.get("preflight", 0.0),
        "choose_ms": phases.get("choose"),
        "prepare_ms": phases.get("prepare"),
        "journal_ms": [p["duration_ms"] for p in report["phases"] if p["call"] == "journal"],
        "journal_before_ms": sum(before),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.holdstart", description=__doc__)
    parser.add_argument("--rounds", type=int, default=8, help="switches per Baton and load")
    parser.add_argument("--workers", type=int, default=CORES, help="workers of the second Baton")
    parser.add_argument("--threads", type=int, default=16, help="sysbench threads when busy")
    parser.add_argument("--base-port", type=int, default=22301, help="port of the primary")
    parser.add_argument("--service-port", type=int, default=22400, help="Batons' ports from")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "bench.holdstart", *(argv or sys.argv[1:])])
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="baton-holdstart-"))
    sandbox = Sandbox(workdir / "sandbox", base_port=args.base_port, replicas=1)
    table = {"tables": 4, "table-size": 10000}
    switches: dict[str, list[dict[str, Any]]] = {}
    with exit_on_signals():
        try:
            sandbox.up()
            servers = [s["name"] for s in sandbox.status()["servers"]]
            primary = next(s["port"] for s in sandbox.status()["servers"] if s["role"] == "primary")
            sysbench_prepare(sysbench_command("oltp_point_select", primary, "prepare", table))
            for workers in (0, args.workers):
                name = f"workers={workers}"
                baton = start_baton(
                    sandbox.config_path,
                    workdir / f"w{workers}",
                    args.service_port,
                    proxy={"workers": workers},
                    controller={"store": str(workdir / f"w{workers}" / "store.json")},
                    detector={"enabled": False},
                )
                try:
                    for i in range(args.rounds):
                        for load in ("idle", "busy"):
                            bench = None
                            if load == "busy":
                                options = {**table, "threads": args.threads, "time": 4}
                                bench = subprocess.Popen(
                                    sysbench_command(
                                        "oltp_point_select", baton.port, "run", options
                                    ),
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                )
                                time.sleep(1.5)
                            row = {"load": load, **one_switch(baton, servers)}
                            row["load_1m"] = load_average()[0]
                            if bench is not None:
                                bench.wait(30)
                            switches.setdefault(name, []).append(row)
                            progress(
                                f"{name} #{i + 1} {load}: holding after "
                                f"{row['to_holding_ms']:.1f} ms (preflight "
                                f"{row['preflight_ms']:.1f}, choose {row['choose_ms']:.1f}, "
                                f"prepare {row['prepare_ms']:.1f}, journal "
                                f"{', '.join(f'{j:.1f}' for j in row['journal_ms'])} ms)"
                            )
                            time.sleep(0.5)
                finally:
                    baton.stop()
        finally:
            sandbox.down()
    lines = [
        "# From `ctl prs` to the first held command: busy vs idle proxy",
        "",
        f"- Date: {machine['date']}; commit {machine['commit']}; {machine['nproc']} CPUs",
        f"- Load average at the end: {load_average()}",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "| Baton | load | switches | to holding p50 ms | max ms | preflight p50 | choose p50 "
        "| prepare p50 "
        "| journal writes before the hold p50 | the rest p50 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for name, rows in switches.items():
        for load in ("idle", "busy"):
            got = [r for r in rows if r["load"] == load and r["to_holding_ms"] is not None]
            if not got:
                continue
            p50 = statistics.median(r["to_holding_ms"] for r in got)
            summary[f"{name} {load}"] = p50
            lines.append(
                f"| {name} | {load} | {len(got)} | {p50:.1f} "
                f"| {max(r['to_holding_ms'] for r in got):.1f} "
                f"| {statistics.median(r['preflight_ms'] for r in got):.1f} "
                f"| {statistics.median(r['choose_ms'] for r in got):.1f} "
                f"| {statistics.median(r['prepare_ms'] for r in got):.1f} "
                f"| {statistics.median(r['journal_before_ms'] for r in got):.1f} "
                f"| {statistics.median(r['rest_ms'] for r in got):.1f} |"
            )
    for name in switches:
        idle, busy = summary.get(f"{name} idle"), summary.get(f"{name} busy")
        if idle is not None and busy is not None:
            lines.append("")
            rest = {
                load: statistics.median(
                    r["rest_ms"] for r in switches[name] if r["load"] == load and r["rest_ms"]
                )
                for load in ("idle", "busy")
            }
            lines.append(
                f"{name}: busy - idle = {busy - idle:.1f} ms at the median; of the rest (the "
                "controller and the event's way to the proxy) "
                f"{rest['busy'] - rest['idle']:.1f} ms."
            )
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (args.out / "holdstart.md").write_text(text)
    (args.out / "holdstart.json").write_text(json.dumps(switches, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
