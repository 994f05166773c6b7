"""The run record: what every results page and JSON says about where its numbers came from
(the machine, the versions, the commit, the command, what else ran on the CPUs meanwhile).

On 2 shared cores the neighbours matter as much as the numbers: a test run or another
benchmark beside this one is the first thing to rule out before reading a regression.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.process import binary

ROOT = Path(__file__).resolve().parent.parent


def _first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (out.stdout or out.stderr).strip().splitlines()[0]


def load_average() -> list[float]:
    """1, 5 and 15 minute load: on 2 shared cores, the first thing to check for noise."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare these numbers with others: cores, versions, commit."""
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "mariadb": _first_line([binary("mariadbd"), "--version"]),
        "sysbench": _first_line(["sysbench", "--version"]),
        "haproxy": _first_line([binary("haproxy"), "-v"]),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "load_average_start": load_average(),
    }


# What else shares the CPUs: test runs, other servers, load generators, proxies.
NEIGHBOURS = re.compile(r"pytest|mariadbd|sysbench|proxy\.cli serve|haproxy")


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


def head_lines(title: str, record: dict[str, Any]) -> list[str]:
    """The head of a results page: when, on what, at which commit, what else ran, and the
    command that made it."""
    m = record["machine"]
    return [
        f"# {title}",
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
    ]


def run_record(
    args: argparse.Namespace,
    command: str,
    machine: dict[str, Any],
    neighbours_start: dict[str, dict[str, Any]],
    **fields: Any,
) -> dict[str, Any]:
    """What every results JSON starts with (the command, the machine, the options, what else
    ran and the load at the end), then `fields`; called once the run's own processes are
    stopped, so that they do not count as neighbours."""
    return {
        "command": command,
        "machine": machine,
        "settings": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
        "neighbours_start": neighbours_start,
        "neighbours_end": neighbours(),
        "load_average_end": load_average(),
        **fields,
    }


def dump_json(record: dict[str, Any]) -> str:
    """Indented, except that a list of lists (a client's requests: thousands of rows) has one
    row per line instead of one number per line."""

    def compact(value: Any, indent: str) -> str:
        inner = indent + "  "
        if isinstance(value, dict) and value:
            items = [f"{inner}{json.dumps(k)}: {compact(v, inner)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{indent}}}"
        if isinstance(value, list) and value:
            if all(isinstance(v, list) for v in value):
                rows = [f"{inner}{json.dumps(v)}" for v in value]
            else:
                rows = [f"{inner}{compact(v, inner)}" for v in value]
            return "[\n" + ",\n".join(rows) + f"\n{indent}]"
        return json.dumps(value)

    return compact(record, "") + "\n"
