"""Pieces every Baton benchmark needs: a private stack (sandbox, Baton, HAProxy), sysbench runs
with parsed results, and a description of the machine the numbers came from.

Why it is built this way:
- Each benchmark starts its own sandbox on its own ports, so a developer's `.sandbox` or a test
  run on the same machine is never loaded or touched, and stops every process it started by
  the pid it recorded, never by name.
- HAProxy in TCP mode is the yardstick: it is what Baton replaces, and it does nothing a
  protocol-aware proxy does, so "Baton / HAProxy" is the price of parsing the protocol.
- sysbench runs under `timeout -s KILL` in its own session: the stock Debian build can loop
  forever on a broken connection and ignore `--time` (lab.md, gotcha 6), and a Ctrl-C must not
  leave it behind.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from reparent.sandbox import APP, HOST, Sandbox
from tests.fixtures import Baton, free_port, start_baton

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "sbtest"  # created by the sandbox, owned by nobody else
BENCH_PORT_HINT = 22400  # Baton and HAProxy listen from here, apart from the servers' ports
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# sysbench gets this much longer than --time before it is killed: start-up plus a slow drain.
SYSBENCH_GRACE = 30
PREPARE_TIMEOUT = 600


# -- processes -------------------------------------------------------------------------------


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT; always reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, what: str) -> None:
    """Return once `port` accepts connections; raise with the log if `proc` dies or is slow."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                _stop_process(proc)
                raise RuntimeError(f"{what} did not listen on {port}:\n{_tail(log)}")
            time.sleep(0.05)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


@dataclass
class HAProxy:
    """A foreground `haproxy` in its own session, so only we decide when it stops."""

    proc: subprocess.Popen[bytes]
    config: Path
    port: int
    log: Path

    def stop(self) -> None:
        _stop_process(self.proc)


def start_haproxy(workdir: Path, port: int, servers: list[tuple[str, int]]) -> HAProxy:
    """HAProxy in TCP mode on `port` in front of `servers` (host, port), first one preferred.

    `balance first` sends every connection to the first server that is up, which is how HAProxy
    is put in front of a primary; no health check, so it never marks a server down on its own.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        "global",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 1h",
        "    timeout server 1h",
        "",
        "frontend mysql",
        f"    bind {HOST}:{port}",
        "    default_backend primary",
        "",
        "backend primary",
        "    balance first",
    ]
    lines += [f"    server db{i + 1} {host}:{p}" for i, (host, p) in enumerate(servers)]
    config = workdir / "haproxy.cfg"
    config.write_text("\n".join(lines) + "\n")
    log = workdir / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [_binary("haproxy"), "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_listening(proc, port, log, "haproxy")
    return HAProxy(proc, config, port, log)


@dataclass
class Stack:
    """One sandbox with Baton and HAProxy in front of its primary: the three paths compared."""

    workdir: Path
    sandbox: Sandbox
    baton: Baton
    haproxy: HAProxy

    @property
    def primary_port(self) -> int:
        return next(s["port"] for s in self.sandbox.status()["servers"] if s["role"] == "primary")

    def ports(self) -> dict[str, int]:
        """Where a client connects for each path."""
        return {"direct": self.primary_port, "baton": self.baton.port, "haproxy": self.haproxy.port}

    def check_alive(self) -> None:
        """Raise if a proxy died: every later run through it would measure nothing."""
        for name, proc, log in (
            ("baton", self.baton.proc, self.baton.log),
            ("haproxy", self.haproxy.proc, self.haproxy.log),
        ):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")


@contextmanager
def running_stack(base_port: int, replicas: int) -> Iterator[Stack]:
    """Start a private stack in a temp dir and stop all of it, by pid, however the block ends.

    The temp dir (logs, generated configs) is deleted after a clean run and kept, with its path
    on stderr, after a failure, because then its logs are the evidence.
    """
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    sandbox = Sandbox(workdir / "sandbox", base_port=base_port, replicas=replicas)
    baton: Baton | None = None
    haproxy: HAProxy | None = None
    ok = False
    try:
        progress(f"sandbox up: {replicas + 1} servers from port {base_port}")
        sandbox.up()
        baton = start_baton(sandbox.config_path, workdir / "baton", BENCH_PORT_HINT)
        primary = next(s for s in sandbox.status()["servers"] if s["role"] == "primary")
        haproxy = start_haproxy(
            workdir / "haproxy",
            free_port(baton.metrics_port + 1),
            [(primary["host"], primary["port"])],
        )
        stack = Stack(workdir, sandbox, baton, haproxy)
        progress("listening: " + ", ".join(f"{k} {v}" for k, v in stack.ports().items()))
        yield stack
        ok = True
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave servers behind.
        stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in stopping}
        try:
            for proxy in (haproxy, baton):
                if proxy is not None:
                    proxy.stop()
            sandbox.down()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"logs kept in {workdir}")


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit, as Ctrl-C already is KeyboardInterrupt, so the
    `finally` blocks that stop servers run when a job runner or a closed terminal ends us."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def progress(message: str) -> None:
    """One line on stderr, so stdout stays the result table."""
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# -- sysbench --------------------------------------------------------------------------------


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


# -- the record ------------------------------------------------------------------------------


def _binary(name: str) -> str:
    # /usr/sbin is not on every user's PATH, and that is where Debian puts haproxy and mariadbd.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} not found; run `make setup`")
    return found


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
        "mariadb": _first_line([_binary("mariadbd"), "--version"]),
        "sysbench": _first_line(["sysbench", "--version"]),
        "haproxy": _first_line([_binary("haproxy"), "-v"]),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "load_average_start": load_average(),
    }
