"""`python -m bench.cpu`: Baton's own CPU time per 1,000 relayed commands.

Throughput on this shared 2-core machine moves with whatever else runs on it; the CPU time
Baton's process spends per command moves much less, so it is the figure that shows whether a
change to the data path made it cheaper or dearer. sysbench oltp_point_select runs a fixed
number of events through Baton; the figure is the process's utime + stime from /proc/PID/stat
over the run, divided by the queries sysbench reports. The median of the repeats is the result.
`--ps-mode disable` (the default) sends text queries, `auto` server-side prepared statements.

`--baseline DIR` starts a second Baton from another source tree (say a `git worktree` of main)
on the same sandbox and alternates the runs between the two, so both meet the same neighbours.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench.process import exit_on_signals, progress
from bench.record import load_average
from bench.stack import running_stack
from bench.sysbench import run_sysbench, sysbench_command, sysbench_prepare
from harness.baton import Baton, start_baton


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(baton: Baton, options: dict[str, str | int]) -> tuple[float, float]:
    """One sysbench run through `baton`: (ms of Baton's CPU per 1,000 commands, qps)."""
    before = cpu_seconds(baton.proc.pid)
    run = run_sysbench(sysbench_command("oltp_point_select", baton.port, "run", options), 600)
    used = cpu_seconds(baton.proc.pid) - before
    if run.result is None:
        raise SystemExit(f"sysbench failed: {run.problem}: {run.output[-500:]}")
    queries = run.result.qps * run.result.seconds
    return used / queries * 1e6, run.result.qps


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000, help="sysbench events per run")
    parser.add_argument("--threads", type=int, default=8, help="sysbench threads")
    parser.add_argument(
        "--ps-mode", default="disable", choices=("disable", "auto"), help="sysbench --db-ps-mode"
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs per Baton; the median counts")
    parser.add_argument("--base-port", type=int, default=23501, help="port of the primary")
    parser.add_argument("--service-port", type=int, default=23550, help="Baton's ports from")
    parser.add_argument("--baseline", type=Path, help="another source tree to compare with")
    args = parser.parse_args()
    table: dict[str, str | int] = {"tables": 4, "table-size": 10000}
    options = {
        **table,
        "threads": args.threads,
        "events": args.events,
        "time": 0,
        "db-ps-mode": args.ps_mode,
    }
    with exit_on_signals(), running_stack(args.base_port, 1, args.service_port) as stack:
        sysbench_prepare(
            sysbench_command("oltp_point_select", stack.primary_port, "prepare", table)
        )
        batons = {"this tree": stack.baton}
        if args.baseline is not None:
            batons[str(args.baseline)] = start_baton(
                stack.sandbox.config_path,
                stack.workdir / "baseline",
                stack.baton.metrics_port + 1,
                controller={"store": str(stack.workdir / "baseline" / "store.json")},
                detector={"enabled": False},
                source=args.baseline.resolve(),
            )
        figures: dict[str, list[float]] = {name: [] for name in batons}
        try:
            for i in range(args.repeat):
                for name, baton in batons.items():
                    ms, qps = measure(baton, options)
                    figures[name].append(ms)
                    progress(
                        f"run {i + 1} {name}: {ms:.1f} ms CPU per 1,000 commands "
                        f"({qps:.0f} qps, load {load_average()[0]})"
                    )
        finally:
            if args.baseline is not None:
                batons[str(args.baseline)].stop()
        for name, runs in figures.items():
            print(
                f"{name}: Baton CPU per 1,000 point selects, median "
                f"{statistics.median(runs):.1f} ms (runs: {', '.join(f'{f:.1f}' for f in runs)})"
            )


if __name__ == "__main__":
    main()
