"""`python -m bench.cpu`: Baton's own CPU time per 1,000 relayed commands.

Throughput on this shared 2-core machine moves with whatever else runs on it; the CPU time
Baton's process spends per command hardly does, so it is the figure that shows whether a change
to the data path made it cheaper or dearer. sysbench oltp_point_select runs a fixed number of
events through Baton; the figure is the process's utime + stime from /proc/PID/stat over the
run, divided by the queries sysbench reports. Each repeat prints its own figure; the median is
the result.
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench.process import exit_on_signals, progress
from bench.record import load_average
from bench.stack import running_stack
from bench.sysbench import run_sysbench, sysbench_command, sysbench_prepare


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000, help="sysbench events per run")
    parser.add_argument("--threads", type=int, default=8, help="sysbench threads")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the median counts")
    parser.add_argument("--base-port", type=int, default=23501, help="port of the primary")
    parser.add_argument("--service-port", type=int, default=23550, help="Baton's ports from")
    args = parser.parse_args()
    options: dict[str, str | int] = {"tables": 4, "table-size": 10000}
    with exit_on_signals(), running_stack(args.base_port, 1, args.service_port) as stack:
        port = stack.ports()["baton"]
        sysbench_prepare(
            sysbench_command("oltp_point_select", stack.primary_port, "prepare", options)
        )
        run = {**options, "threads": args.threads, "events": args.events, "time": 0}
        pid = stack.baton.proc.pid
        figures = []
        for i in range(args.repeat):
            before = cpu_seconds(pid)
            result = run_sysbench(
                sysbench_command("oltp_point_select", port, "run", run), 600
            ).result
            used = cpu_seconds(pid) - before
            if result is None:
                raise SystemExit("sysbench failed")
            queries = result.qps * result.seconds
            figures.append(used / queries * 1000 * 1000)
            progress(
                f"run {i + 1}: {queries:.0f} queries, Baton {used:.2f} s CPU: "
                f"{figures[-1]:.1f} ms per 1,000 commands ({result.qps:.0f} qps, "
                f"load {load_average()[0]})"
            )
        print(
            f"Baton CPU per 1,000 point selects: median {statistics.median(figures):.1f} ms "
            f"(runs: {', '.join(f'{f:.1f}' for f in figures)})"
        )


if __name__ == "__main__":
    main()
