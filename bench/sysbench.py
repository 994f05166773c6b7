"""sysbench as the benchmarks run it: the command line, a run in the background, its summary
parsed.

sysbench runs under `timeout -s KILL` in its own session: the stock Debian build (1.0.20) can
loop forever on a broken connection and ignore `--time`, and a Ctrl-C must not leave it behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from reparent.sandbox import APP, HOST

DATABASE = "sbtest"  # created by the sandbox, owned by nobody else
# sysbench gets this much longer than --time before it is killed: start-up plus a slow drain.
SYSBENCH_GRACE = 30
PREPARE_TIMEOUT = 600


def sysbench_command(
    workload: str, port: int, action: str, options: dict[str, str | int]
) -> list[str]:
    """`sysbench WORKLOAD --opt=value ... ACTION` as the app user against 127.0.0.1:port."""
    args = [
        "sysbench",
        workload,
        "--db-driver=mysql",
        f"--mysql-host={HOST}",
        f"--mysql-port={port}",
        f"--mysql-user={APP.user}",
        f"--mysql-password={APP.password}",
        f"--mysql-db={DATABASE}",
    ]
    args += [f"--{k}={v}" for k, v in options.items()]
    return [*args, action]


@dataclass(frozen=True)
class SysbenchResult:
    """The numbers from one `sysbench ... run` summary."""

    qps: float
    tps: float
    p95_ms: float
    avg_ms: float
    max_ms: float
    errors: int
    reconnects: int
    seconds: float


# Lines of the 1.0.x summary, e.g. "    queries:   200000 (20000.00 per sec.)".
_SUMMARY = {
    "transactions": re.compile(r"^\s*transactions:\s+(\d+)\s+\(([\d.]+) per sec\.\)", re.M),
    "queries": re.compile(r"^\s*queries:\s+(\d+)\s+\(([\d.]+) per sec\.\)", re.M),
    "errors": re.compile(r"^\s*ignored errors:\s+(\d+)", re.M),
    "reconnects": re.compile(r"^\s*reconnects:\s+(\d+)", re.M),
    "seconds": re.compile(r"^\s*total time:\s+([\d.]+)s", re.M),
    "avg": re.compile(r"^\s*avg:\s+([\d.]+)", re.M),
    "max": re.compile(r"^\s*max:\s+([\d.]+)", re.M),
    "p95": re.compile(r"^\s*95th percentile:\s+([\d.]+)", re.M),
}


def parse_sysbench(output: str) -> SysbenchResult:
    """Parse the summary; raise ValueError naming the first line that is missing."""
    found: dict[str, re.Match[str]] = {}
    for name, pattern in _SUMMARY.items():
        match = pattern.search(output)
        if match is None:
            raise ValueError(f"sysbench output has no {name!r} line")
        found[name] = match
    return SysbenchResult(
        qps=float(found["queries"][2]),
        tps=float(found["transactions"][2]),
        p95_ms=float(found["p95"][1]),
        avg_ms=float(found["avg"][1]),
        max_ms=float(found["max"][1]),
        errors=int(found["errors"][1]),
        reconnects=int(found["reconnects"][1]),
        seconds=float(found["seconds"][1]),
    )


@dataclass(frozen=True)
class SysbenchRun:
    """What one sysbench process did: its command, exit code, output and parsed result."""

    command: list[str]
    returncode: int
    output: str
    result: SysbenchResult | None
    problem: str | None  # why there is no result: exit code, kill or unparsable output


@dataclass
class Background:
    """A command started by `in_background`; `wait` returns its exit code and output."""

    command: list[str]  # as started, inside its `timeout -s KILL` wrapper
    proc: subprocess.Popen[bytes]
    output: IO[bytes]

    def wait(self) -> tuple[int, str]:
        self.proc.wait()
        self.output.seek(0)
        return self.proc.returncode, self.output.read().decode(errors="replace")


@contextmanager
def in_background(command: list[str], timeout_s: int) -> Iterator[Background]:
    """Run `command` under `timeout -s KILL`, in its own session, while the block runs.

    If the block is left before the command has ended (an error, Ctrl-C), the whole group
    (timeout and sysbench) is killed instead of orphaning sysbench. Output goes to a temporary
    file, not a pipe, so a run that reports every second cannot stall on a full pipe while the
    caller is busy with something else (switchovers, say).
    """
    full = ["timeout", "-s", "KILL", str(timeout_s), *command]
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield Background(full, proc, output)
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def run_sysbench(command: list[str], duration_s: int) -> SysbenchRun:
    """One `sysbench ... run` of `duration_s` seconds; a failure is recorded, not raised, so
    one broken path does not cost the numbers of the others."""
    timeout_s = duration_s + SYSBENCH_GRACE
    with in_background(command, timeout_s) as run:
        returncode, output = run.wait()
    full = run.command
    if returncode != 0:
        reason = f"killed after {timeout_s} s" if returncode in (124, 137) else "failed"
        return SysbenchRun(full, returncode, output, None, f"{reason}, rc {returncode}")
    try:
        return SysbenchRun(full, 0, output, parse_sysbench(output), None)
    except ValueError as e:
        return SysbenchRun(full, 0, output, None, str(e))


def sysbench_prepare(command: list[str]) -> None:
    """Create and fill the tables; raise with sysbench's output if it fails, since every run
    after a failed prepare would measure errors."""
    with in_background(command, PREPARE_TIMEOUT) as run:
        returncode, output = run.wait()
    if returncode != 0:
        raise RuntimeError(f"sysbench prepare failed (rc {returncode}):\n{output[-2000:]}")
