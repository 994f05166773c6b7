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

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import IO, Any, NoReturn

import pymysql
from prometheus_client.parser import text_string_to_metric_families

from reparent.config import Account
from reparent.sandbox import ADMIN, APP, HOST, STORE_FILE, Sandbox
from tests.fixtures import Baton, dump_toml, free_port, start_baton

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
    stats: Path | None  # its admin socket, in health-check mode

    def stop(self) -> None:
        _stop_process(self.proc)

    def up_servers(self) -> list[str]:
        """The servers HAProxy would route to now, by its own health checks."""
        if self.stats is None:
            raise RuntimeError("haproxy was started without health checks")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        rows = list(csv.DictReader(text.lstrip("# ").splitlines()))
        return [
            r["svname"]
            for r in rows
            if r["svname"] not in ("FRONTEND", "BACKEND") and r["status"] == "UP"
        ]


def start_haproxy(
    workdir: Path,
    port: int,
    servers: list[tuple[str, int]],
    health_ports: list[int] | None = None,
) -> HAProxy:
    """HAProxy in TCP mode on `port` in front of `servers` (host, port), first one preferred.

    `balance first` sends every connection to the first server that is up, which is how HAProxy
    is put in front of a primary. Without `health_ports` there is no health check, so it never
    marks a server down on its own. With them, each server is checked every 100 ms over HTTP
    on its port there (a HealthAgent: 200 only when writable), one failed check marks it down
    and closes its sessions, one good check marks it up: HAProxy set up as a failover peer, as
    fast as its checks allow (design.md, "HAProxy as a failover peer").
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stats = workdir / "haproxy.sock" if health_ports is not None else None
    lines = ["global", "    maxconn 4096"]
    if stats is not None:
        lines.append(f"    stats socket {stats} mode 600 level admin")
    lines += [
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
    checks = [""] * len(servers)
    if health_ports is not None:
        lines += [
            "    option httpchk GET /",
            "    timeout check 500ms",
            "    default-server inter 100 fastinter 100 downinter 100 fall 1 rise 1 "
            "on-marked-down shutdown-sessions",
        ]
        checks = [f" check port {p}" for p in health_ports]
    lines += [
        f"    server db{i + 1} {host}:{p}{check}"
        for i, ((host, p), check) in enumerate(zip(servers, checks, strict=True))
    ]
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
    return HAProxy(proc, config, port, log, stats)


class _CheckHandler(BaseHTTPRequestHandler):
    """Answers HAProxy's check: 200 when the agent's server is writable, else 503."""

    server: _AgentServer

    def do_GET(self) -> None:
        self.send_response(200 if self.server.agent.writable() else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: ten checks a second per server would bury the progress lines."""


class _AgentServer(HTTPServer):
    agent: HealthAgent


class HealthAgent:
    """The tiny script behind HAProxy's HTTP check for one MariaDB server, in a thread.

    It asks `@@read_only` over one persistent admin connection, so a check costs one query, not
    a login; a server that does not answer, or is read-only, gets 503. The admin account is
    used because it is the one that may read a fenced server; it never writes.
    """

    def __init__(self, server_port: int, port: int) -> None:
        self.server_port = server_port
        self.port = port
        self._conn: pymysql.Connection | None = None
        self._http = _AgentServer((HOST, port), _CheckHandler)
        self._http.agent = self
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), name=f"health-{port}", daemon=True
        )
        self._thread.start()

    def writable(self) -> bool:
        try:
            if self._conn is None:
                self._conn = connect(self.server_port, ADMIN, connect_timeout=0.4, read_timeout=0.4)
            with self._conn.cursor() as cur:
                cur.execute("SELECT @@read_only")
                return int(cur.fetchone()[0]) == 0
        except pymysql.MySQLError:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return False

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(STOP_TIMEOUT)
        if self._conn is not None:
            self._conn.close()


@dataclass
class Stack:
    """One sandbox with Baton and HAProxy in front of it: the paths compared.

    Every Baton of the stack keeps its topology in one store file, so a Baton started after
    another (`restart_baton`) knows the primary and term the last one's switchovers left.
    """

    workdir: Path
    sandbox: Sandbox
    baton: Baton
    haproxy: HAProxy
    service_port: int  # where Baton's ports are searched from
    agents: list[HealthAgent]  # HAProxy's health checks, in health-check mode

    @property
    def primary_port(self) -> int:
        """The port of the primary the sandbox started with (not the current one)."""
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

    def restart_baton(self, name: str, buffer: dict[str, Any] | None = None) -> Baton:
        """Stop Baton and start another from the sandbox's config, with `[buffer]` set to
        `buffer` if given; its files go to WORKDIR/name, so each Baton's log is kept apart."""
        self.baton.stop()
        self.baton = _start_baton(self.sandbox, self.workdir, name, self.service_port, buffer)
        return self.baton


def _start_baton(
    sandbox: Sandbox, workdir: Path, name: str, port_hint: int, buffer: dict[str, Any] | None
) -> Baton:
    """`baton serve` on the sandbox, its store in WORKDIR (shared by every Baton of a stack)."""
    config = sandbox.config_path
    if buffer is not None:
        data = tomllib.loads(config.read_text())
        data["buffer"] = buffer
        (workdir / name).mkdir(parents=True, exist_ok=True)
        config = workdir / name / "source.toml"
        config.write_text(dump_toml(data))
    store = {"store": str(workdir / STORE_FILE)}
    return start_baton(config, workdir / name, port_hint, controller=store)


@contextmanager
def running_stack(
    base_port: int,
    replicas: int,
    service_port: int = BENCH_PORT_HINT,
    health_checks: bool = False,
) -> Iterator[Stack]:
    """Start a private stack in a temp dir and stop all of it, by pid, however the block ends.

    Baton, HAProxy (and its health agents) listen on free ports from `service_port`. Without
    `health_checks` HAProxy fronts only the primary, unchecked; with them it fronts every
    server and routes to the writable one (see start_haproxy).

    The temp dir (logs, generated configs) is deleted after a clean run and kept, with its path
    on stderr, after a failure, because then its logs are the evidence.
    """
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    sandbox = Sandbox(workdir / "sandbox", base_port=base_port, replicas=replicas)
    baton: Baton | None = None
    haproxy: HAProxy | None = None
    agents: list[HealthAgent] = []
    stack: Stack | None = None
    ok = False
    try:
        progress(f"sandbox up: {replicas + 1} servers from port {base_port}")
        sandbox.up()
        baton = _start_baton(sandbox, workdir, "baton", service_port, None)
        servers = sandbox.status()["servers"]
        if not health_checks:
            servers = [s for s in servers if s["role"] == "primary"]
        addresses = [(s["host"], s["port"]) for s in servers]
        if health_checks:
            # Each agent listens before the next free port is looked for, so none collide;
            # appended one by one, so the clean-up stops those started before a failure.
            for _, server_port in addresses:
                agents.append(HealthAgent(server_port, free_port(baton.metrics_port + 1)))
        haproxy = start_haproxy(
            workdir / "haproxy",
            free_port(baton.metrics_port + 1),
            addresses,
            [a.port for a in agents] if health_checks else None,
        )
        stack = Stack(workdir, sandbox, baton, haproxy, service_port, agents)
        progress("listening: " + ", ".join(f"{k} {v}" for k, v in stack.ports().items()))
        yield stack
        ok = True
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave servers behind.
        stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in stopping}
        try:
            for proxy in (haproxy, stack.baton if stack is not None else baton):
                if proxy is not None:
                    proxy.stop()
            for agent in agents:
                agent.stop()
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


# -- the write workload ----------------------------------------------------------------------

WRITE_WORKLOAD = "oltp_write_only"
WRITE_TABLES, WRITE_TABLE_SIZE = 4, 10000
CAPACITY_SECONDS = 10


def write_options(threads: int, seconds: int, ignore_errors: str = "none") -> dict[str, str | int]:
    """The write workload's sysbench options: text protocol, uniform keys, no event limit.

    `ignore_errors` is sysbench's `--mysql-ignore-errors`: "none" stops a thread at its first
    error (a path that must show none), "all" carries on (a path that drops clients)."""
    return {
        "tables": WRITE_TABLES,
        "table-size": WRITE_TABLE_SIZE,
        "threads": threads,
        "time": seconds,
        "events": 0,
        "rand-type": "uniform",
        "db-ps-mode": "disable",
        "mysql-ignore-errors": ignore_errors,
    }


def paced_write_command(
    port: int, threads: int, seconds: int, rate: int, ignore_errors: str = "none"
) -> list[str]:
    """The write workload at a fixed `rate` (transactions/s), reporting every second with a
    99th percentile, so each second of a run can be put next to what happened in it."""
    options = {
        **write_options(threads, seconds, ignore_errors),
        "rate": rate,
        "report-interval": 1,
        "percentile": 99,
        "histogram": "on",
    }
    return sysbench_command(WRITE_WORKLOAD, port, "run", options)


def prepare_writes(port: int) -> list[str]:
    """Create and fill the write workload's tables through `port`; return the command."""
    command = sysbench_command(
        WRITE_WORKLOAD,
        port,
        "prepare",
        {"tables": WRITE_TABLES, "table-size": WRITE_TABLE_SIZE, "threads": WRITE_TABLES},
    )
    progress(f"prepare: {WRITE_TABLES} tables x {WRITE_TABLE_SIZE} rows")
    sysbench_prepare(command)
    return command


def setup_writes(
    primary_port: int, capacity_port: int, threads: int, rate: int | None
) -> dict[str, Any]:
    """Prepare the tables through the primary and settle the load's rate: `rate` if given, else
    half the capacity measured through `capacity_port`. Half, not full: at full load a replica
    lags and the catch-up wait, not the switchover, would be measured; half still has writes in
    flight at every moment of a switch. Returns the record's prepare command, capacity run
    (None with `rate`) and rate."""
    prepare = prepare_writes(primary_port)
    capacity = None if rate else measure_capacity(capacity_port, threads)
    return {
        "prepare_command": shlex.join(prepare),
        "capacity": capacity,
        "rate": rate or max(1, round(capacity["tps"] / 2)),
    }


def measure_capacity(port: int, threads: int) -> dict[str, Any]:
    """tps of an unthrottled CAPACITY_SECONDS write run through `port`, with no switchover."""
    options = {**write_options(threads, CAPACITY_SECONDS), "report-interval": 0}
    run = run_sysbench(sysbench_command(WRITE_WORKLOAD, port, "run", options), CAPACITY_SECONDS)
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
    """A paced run's summary (a 99th percentile, which parse_sysbench, made for steady's 95th,
    does not read) and its per-second reports; a missing line is None, so a run that crashed
    before its summary still gives the seconds it reported."""
    summary: dict[str, Any] = {}
    for name, (pattern, kind) in _LOAD_SUMMARY.items():
        match = re.search(pattern, output, re.M)
        summary[name] = None if match is None else kind(match[1])
    summary["intervals"] = [
        {k: float(v) for k, v in m.groupdict().items()} for m in _INTERVAL.finditer(output)
    ]
    return summary


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


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with `main`'s code; Ctrl-C exits with 130 after the clean-up it triggered."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped")
        sys.exit(130)


def connect(port: int, account: Account = APP, **options: Any) -> pymysql.Connection:
    """PyMySQL to 127.0.0.1:port as `account`, autocommit and without TLS (the sandbox has
    none); `options` are PyMySQL's (database, timeouts)."""
    return pymysql.connect(
        host=HOST,
        port=port,
        user=account.user,
        password=account.password,
        autocommit=True,
        ssl_disabled=True,
        **options,
    )


def scrape_metrics(port: int, families: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """The named families from Baton's endpoint, as samples with their labels."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        family.name: [
            {"name": s.name, "labels": dict(s.labels), "value": s.value} for s in family.samples
        ]
        for family in text_string_to_metric_families(text)
        if family.name in families
    }


def sample_sum(metrics: dict[str, list[dict[str, Any]]], family: str, suffix: str) -> float:
    """The family's samples named family + suffix, summed over labels (0 if there are none)."""
    return sum(s["value"] for s in metrics.get(family, []) if s["name"] == family + suffix)


def quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); with 10 values the
    p99 lies between the two largest, so it is nearly the maximum."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


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
