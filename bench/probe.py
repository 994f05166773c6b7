"""The Python client that records every request a benchmark makes, and the planned switchovers
it is measured against.

Why it is built this way:
- The client is the ground truth for what an application sees. sysbench times whole
  transactions, per second only as a percentile, and says whether something failed, not which
  single statement waited how long; the client logs every request's start, end and outcome on
  the same wall clock as Baton's reports, so each pause can be put next to its switchover.
- Where a client reconnects after an error is a `Target`: a proxy's one address for Baton and
  HAProxy, the current primary for clients that connect to the servers themselves. The rest of
  the client is the same on every path, so the paths differ only in what is being compared.
- Switchovers go through `baton ctl`, as an operator would run them, so the measured switch is
  the one Baton's controller performs, whichever path the clients take.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pymysql

from bench.sysbench import DATABASE
from harness.clients import connect

SWITCH_BETWEEN = ("db1", "db2")  # db1 and db2 take turns as primary, db3 follows every switch
FIRST_SWITCH_S = 5.0  # the load settles first
LAST_SWITCH_MARGIN_S = 5.0  # the last switch and the +-2 s after it end before the load does
WINDOW_S = 2.0  # a request is attributed to a switch within this much of its ctl call
HOLD_PHASES = ("holding", "revoked", "established")


# -- when to switch --------------------------------------------------------------------------


def switch_times(duration: int, switches: int) -> list[float]:
    """Seconds after the load starts: the first at FIRST_SWITCH_S, then evenly spaced up to
    LAST_SWITCH_MARGIN_S before the end."""
    if switches == 1:
        return [FIRST_SWITCH_S]
    step = (duration - FIRST_SWITCH_S - LAST_SWITCH_MARGIN_S) / (switches - 1)
    return [FIRST_SWITCH_S + i * step for i in range(switches)]


def min_duration(switches: int) -> float:
    """The shortest load that fits `switches`: each needs about a second, and the +-WINDOW_S
    windows around them must not overlap."""
    return FIRST_SWITCH_S + LAST_SWITCH_MARGIN_S + (switches - 1) * (2 * WINDOW_S + 1)


# -- the client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One INSERT as the client saw it; times are wall-clock seconds, like Baton's reports."""

    writer: int
    start: float
    end: float
    error: str | None  # "code: message", or None if it succeeded

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000


def connect_app(port: int) -> pymysql.Connection:
    """The application account on 127.0.0.1:port, as a plain app would connect."""
    # The read timeout is longer than the buffer's 10 s window: a held insert is not a timeout.
    return connect(port, database=DATABASE, connect_timeout=10, read_timeout=60, write_timeout=60)


class Target(Protocol):
    """Where a writer connects, and what it tells when a request through there failed."""

    def port(self) -> int: ...

    def failed(self, port: int) -> None: ...


@dataclass(frozen=True)
class FixedTarget:
    """A proxy's one address: a client behind it never has to find the primary itself."""

    address: int

    def port(self) -> int:
        return self.address

    def failed(self, port: int) -> None:
        """Nothing to learn: the proxy's address does not change."""


class Probe:
    """Writers that each insert one row at a steady pace and log every request.

    Paced, not flat out, so a stall shows as one long request instead of as fewer requests;
    after a stall the next insert goes at once and the pace resumes, without a catch-up burst
    that would add load right after the switch. A failed request closes its connection and the
    next one reconnects to wherever the target says, so later requests still measure the path
    rather than a broken connection; the time that reconnect takes is part of that request.
    """

    def __init__(self, target: Target, writers: int, rate: int, table: str) -> None:
        self.target = target
        self.table = table
        self.period = 1.0 / rate
        self._stop = threading.Event()
        self.requests: list[list[Request]] = [[] for _ in range(writers)]
        self._reconnects = [0] * writers  # one counter per thread: no lock needed
        # Connect here, in the caller's thread, so a path that refuses logins fails the run.
        port = target.port()
        self._conns = [(connect_app(port), port) for _ in range(writers)]
        self._threads = [
            threading.Thread(target=self._write, args=(i,), name=f"probe-{i}", daemon=True)
            for i in range(writers)
        ]

    def _write(self, writer: int) -> None:
        conn: pymysql.Connection | None
        conn, port = self._conns[writer]
        log = self.requests[writer]
        seq = 0
        due = time.monotonic()
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            due = max(due + self.period, time.monotonic())
            start = time.time()
            error = None
            try:
                if conn is None:
                    self._reconnects[writer] += 1
                    port = self.target.port()
                    conn = connect_app(port)
                with conn.cursor() as cur:
                    self.request(cur, writer, seq)
            except pymysql.MySQLError as e:
                error = ": ".join(str(a) for a in e.args)
                if conn is not None:
                    conn.close()
                conn = None
                self.target.failed(port)
            log.append(Request(writer, start, time.time(), error))
            seq += 1
        if conn is not None:
            conn.close()

    def request(self, cur: pymysql.cursors.Cursor, writer: int, seq: int) -> None:
        """One request: an insert (bench.reads' readers read instead)."""
        cur.execute(f"INSERT INTO {self.table} (writer, seq) VALUES (%s, %s)", (writer, seq))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def finish(self) -> None:
        """Stop the writers and wait for them; a request in flight ends within read_timeout."""
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(70)

    @property
    def reconnects(self) -> int:
        return sum(self._reconnects)

    def all_requests(self) -> list[Request]:
        return sorted((r for log in self.requests for r in log), key=lambda r: r.start)


@contextmanager
def probing(
    target: Target, writers: int, rate: int, table: str, kind: type[Probe] = Probe
) -> Iterator[Probe]:
    """Run the probe's clients while the block runs; stop and join them however it ends."""
    probe = kind(target, writers, rate, table)
    probe.start()
    try:
        yield probe
    finally:
        probe.finish()


def create_probe_table(port: int, table: str) -> None:
    with connect_app(port) as conn, conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " writer TINYINT NOT NULL, seq INT NOT NULL, at TIMESTAMP(6) NOT NULL"
            " DEFAULT CURRENT_TIMESTAMP(6))"
        )


def count_probe_rows(port: int, table: str) -> int:
    """Rows in the probe's table: each successful insert must be there once."""
    with connect_app(port) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {table}")
        return int(cur.fetchone()[0])


def compact(requests: list[Request], started: float) -> list[list[Any]]:
    """[writer, ms after `started`, latency ms, error] per request, to the microsecond: a
    results file holds thousands of them, one short line each."""
    return [
        [r.writer, round((r.start - started) * 1000, 3), round(r.latency_ms, 3), r.error]
        for r in requests
    ]


def expand(rows: list[list[Any]], started: float) -> list[Request]:
    """The requests `compact` wrote, back on the wall clock."""
    return [
        Request(w, started + at / 1000, started + (at + ms) / 1000, error)
        for w, at, ms, error in rows
    ]


def in_window(requests: list[Request], start: float, end: float) -> list[Request]:
    """Requests in flight at any moment of [start, end]."""
    return [r for r in requests if r.start <= end and r.end >= start]


# -- switchovers -----------------------------------------------------------------------------


def ctl_command(socket: str, *args: str) -> list[str]:
    """`baton ctl --socket S ARGS` with the venv's own `baton`, as an operator would run it."""
    return [str(Path(sys.executable).with_name("baton")), "ctl", "--socket", socket, *args]


def ctl_json(socket: str, *args: str) -> Any:
    """What `baton ctl --json ARGS` prints; RuntimeError with its message if it fails."""
    out = subprocess.run(
        ctl_command(socket, "--json", *args), capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise RuntimeError(f"baton ctl {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def current_primary(socket: str) -> str:
    """The primary's name, as `baton ctl --json status` reports it."""
    return ctl_json(socket, "status")["shards"][0]["primary"]


def switchover(socket: str, index: int, source: str) -> dict[str, Any]:
    """One `baton ctl --json prs` to the other of db1/db2, with when the bench called it."""
    target = SWITCH_BETWEEN[1] if source == SWITCH_BETWEEN[0] else SWITCH_BETWEEN[0]
    command = ctl_command(socket, "--json", "prs", "--to", target)
    called = time.time()
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    returned = time.time()
    try:
        report = json.loads(out.stdout) if out.stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    return {
        "index": index,
        "from": source,
        "to": target,
        "command": shlex.join(command),
        "returncode": out.returncode,
        "stderr": out.stderr.strip(),
        "called": called,
        "returned": returned,
        "report": report,
    }


def phase_ms(report: dict[str, Any]) -> dict[str, float]:
    """Each phase's duration, by step, in report order (a step seen twice is summed); the
    store's writes under "journal", whatever their step."""
    phases: dict[str, float] = {}
    for p in report["phases"]:
        key = "journal" if p.get("call") == "journal" else p["step"]
        phases[key] = phases.get(key, 0.0) + p["duration_ms"]
    return phases


def in_hold(phase: dict[str, Any]) -> bool:
    """Is this phase of a report inside the hold? The calls of HOLD_PHASES (revoke,
    establish, commit), and the store writes after the one that starts the hold: that one
    (step 'holding') ends before the proxies hear of the switch."""
    if phase.get("call") == "journal":
        return phase["step"] not in ("started", "candidate_chosen", "prepared", "holding")
    return phase["step"] in HOLD_PHASES


def hold_ms(report: dict[str, Any]) -> float:
    """The sum of the durations of the phases inside the hold."""
    return sum(p["duration_ms"] for p in report["phases"] if in_hold(p))
